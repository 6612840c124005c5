//! bitdust: a peer-to-peer backup node. Friends store each other's encrypted, erasure-coded
//! fragments; only the owner can read them. See ARCHITECTURE.md for the code map.

pub mod actors; // actix shells that run the machines and do their IO
pub mod crypto; // node keys, signed identity documents, contact cards
pub mod fsm; // pure state machines: tables, step, timers, diagrams
pub mod net; // Noise over TCP, framing, envelopes, authenticated links
pub mod node; // config, home directory, logging, control socket, signals, `run`
pub mod proto; // prost types for the wire protocol and documents
pub mod sim; // deterministic multi-node simulation of the machines (virtual clock, seeded RNG)
pub mod store; // RocksDB (and in-memory) key-value store with column families
