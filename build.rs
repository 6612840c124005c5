//! Compiles `proto/*.proto` with the pure-Rust `protox`, so no system `protoc` is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The wire protocol (`bitdust.v1`) and the on-disk records (`bitdust.store.v1`).
    let protos = ["proto/bitdust.proto", "proto/store.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(descriptors)?;
    Ok(())
}
