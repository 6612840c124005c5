//! The architecture invariants (ARCHITECTURE.md), checked on the source:
//! - `src/fsm` and `src/data` do no IO: no async runtime, actors, database, sockets, files,
//!   threads, clock or RNG (time and randomness reach machines through `Ctx`);
//! - each layer imports only the layers below it;
//! - the binary (`main.rs` and `src/cli`) uses only `node`, the status types and `demo`.

use std::path::{Path, PathBuf};

/// Words that mean IO, a clock or randomness; none may appear in a pure module.
const IMPURE: &[&str] = &[
    "tokio",
    "actix",
    "rocksdb",
    "std::net",
    "std::fs",
    "std::thread",
    "std::process",
    "Instant",
    "SystemTime",
    "rand::",
    "getrandom",
    "unix_now",
];

/// What each top-level module of `src` may import from the crate (`crate::NAME`).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "fsm",
        &[
            "fsm",
            "data",
            "crypto",
            "labels",
            "events",
            "for_each_machine",
        ],
    ),
    ("data", &["data", "crypto"]),
    ("crypto", &["crypto", "proto"]),
    ("net", &["net", "proto", "crypto", "unix_now"]),
    // The catalog names chunks and blocks by the pure pipeline's id types.
    ("store", &["store", "proto", "crypto", "data", "unix_now"]),
    // The pipeline's IO edge: runs the pure stages, reads the catalog's types.
    ("pipeline", &["pipeline", "data", "crypto", "store"]),
    ("sim", &["sim", "fsm", "crypto"]),
    (
        "actors",
        &[
            "actors", "fsm", "data", "pipeline", "net", "store", "crypto", "proto", "labels",
            "unix_now",
        ],
    ),
    (
        "node",
        &[
            "node", "actors", "fsm", "data", "net", "store", "crypto", "proto", "unix_now",
        ],
    ),
    // Runs the binary's own CLI as child processes; reads the status types it prints.
    ("demo", &["demo", "node", "actors", "store", "crypto"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate modules a source text names: `crate::x`, and `crate::{x, y}` groups.
fn crate_imports(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn pure_modules_do_no_io() {
    let mut problems = Vec::new();
    for dir in ["fsm", "data"] {
        let mut files = Vec::new();
        rust_files(&src().join(dir), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            // Unit tests may read files (the committed diagrams); the code they test may not.
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            for word in IMPURE {
                if text.contains(word) {
                    problems.push(format!("{} mentions {word}", file.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn each_layer_imports_only_the_layers_below() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (layer, allowed) in LAYERS {
        let mut files = Vec::new();
        rust_files(&src().join(layer), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            for name in crate_imports(&text) {
                checked += 1;
                if !allowed.contains(&name.as_str()) {
                    problems.push(format!("{} imports crate::{name}", file.display()));
                }
            }
        }
    }
    assert!(
        checked > 50,
        "the scan found too few imports to mean anything"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_scanner_sees_grouped_and_plain_imports() {
    let names = crate_imports("use crate::{events, labels};\nuse crate::net::link;\n");
    assert_eq!(names, ["events", "labels", "net"]);
}

/// Drivers read no clock: time comes from the shell (`Io::ctx`), the one place that reads it,
/// or from a `Clock` the node hands them (`ctx_now` is named only in the shell and `src/node`).
#[test]
fn drivers_read_no_clock() {
    let mut files = Vec::new();
    rust_files(&src().join("actors"), &mut files);
    let mut problems = Vec::new();
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "shell.rs" || name == "registry.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        // A driver's unit tests may drive it with the real clock.
        let text = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        for word in ["Instant::now", "SystemTime", "unix_now", "ctx_now"] {
            if text.contains(word) {
                problems.push(format!("{} reads a clock ({word})", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// What the binary (`main.rs`, `src/cli/`) may name of the library: `bitdust::NAME` paths.
const BINARY_MAY_USE: &[&str] = &["node", "demo", "actors::status"];

/// The library paths a source text of the binary names: `bitdust::x::y` (two segments, so that
/// `actors::status` can be told from the rest of `actors`), and `bitdust::{x, y}` groups.
fn library_paths(text: &str) -> Vec<String> {
    let segment = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut paths = Vec::new();
    for (i, _) in text.match_indices("bitdust::") {
        let rest = &text[i + "bitdust::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            paths.extend(inner.split(',').map(|item| item.trim().replace(' ', "")));
            continue;
        }
        let first = segment(rest);
        let after = &rest[first.len()..];
        match after.strip_prefix("::").map(segment) {
            Some(second) if !second.is_empty() => paths.push(format!("{first}::{second}")),
            _ => paths.push(first),
        }
    }
    paths
}

#[test]
fn the_binary_uses_only_node_the_status_types_and_demo() {
    let mut files = vec![src().join("main.rs")];
    rust_files(&src().join("cli"), &mut files);
    assert!(files.len() > 5, "the CLI's verbs were not found: {files:?}");
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        for path in library_paths(&text) {
            checked += 1;
            let allowed = BINARY_MAY_USE
                .iter()
                .any(|a| path == *a || path.starts_with(&format!("{a}::")));
            if !allowed {
                problems.push(format!("{} uses bitdust::{path}", file.display()));
            }
        }
        // The binary has no `crate::` of the library; its own modules are `cli::…`.
        for name in crate_imports(&text) {
            if name != "cli" {
                problems.push(format!("{} names crate::{name}", file.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "the scan found too few library paths to mean anything"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_binary_scanner_tells_status_types_from_the_rest_of_actors() {
    let paths = library_paths(
        "use bitdust::actors::status::NodeStatus;\nuse bitdust::actors::drill;\nbitdust::demo::run(x);\nuse bitdust::{node, store};",
    );
    assert_eq!(
        paths,
        [
            "actors::status",
            "actors::drill",
            "demo::run",
            "node",
            "store"
        ]
    );
    let allowed = |p: &str| {
        BINARY_MAY_USE
            .iter()
            .any(|a| p == *a || p.starts_with(&format!("{a}::")))
    };
    assert!(allowed("actors::status") && allowed("node::client") && allowed("demo::run"));
    assert!(!allowed("actors::drill") && !allowed("store") && !allowed("fsm::diagram_files"));
}
