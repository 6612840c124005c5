//! Keys and signatures: the node's long-term keys and its signed identity document.
//! Pure: no file or network IO here (see `node::home` for where keys live on disk).

pub mod identity;
pub mod keys;
