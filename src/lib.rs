//! bitdust: a peer-to-peer backup node. Friends store each other's encrypted, erasure-coded
//! fragments; only the owner can read them. See ARCHITECTURE.md for the code map.

pub mod actors; // actix shells that run the machines and do their IO
pub mod crypto; // node keys, signed identity documents, contact cards, derived backup keys
pub mod data; // pure backup pipeline: chunk, pack, compress, pad, seal, erasure-code, manifests
pub mod demo; // `bitdust demo`: a loopback network of this binary, backup, restore, verify, report
pub mod fsm; // pure state machines: tables, step, timers, diagrams
pub mod net; // Noise over TCP, framing, envelopes, authenticated links
pub mod node; // config, home directory, logging, control socket, signals, `run`
pub mod pipeline; // the pipeline's IO edge: walk, read, seal on worker threads, stage fragments
pub mod proto; // prost types for the wire protocol and documents
pub mod sim; // deterministic multi-node simulation of the machines (virtual clock, seeded RNG)
pub mod store; // RocksDB (and in-memory) key-value store with column families

/// Seconds since the Unix epoch by the system clock (0 if the clock is before 1970). Only the IO
/// edges call it; state machines get time through their events.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
