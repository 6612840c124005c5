//! Keys and signatures: the node's long-term keys, its signed identity document, and the keys
//! derived from the owner's master secret for backups.
//! Pure: no file or network IO here (see `node::home` for where keys live on disk).

pub mod derive;
pub mod identity;
pub mod keyfile;
pub mod keys;
