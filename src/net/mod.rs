//! Encrypted, authenticated peer-to-peer transport.
//!
//! * [`frame`]: 4-byte big-endian length-delimited framing with a hard
//!   maximum frame length ([`frame::MAX_FRAME`]).
//! * [`noise`]: a `Noise_XX_25519_ChaChaPoly_BLAKE2s` handshake over any
//!   `AsyncRead + AsyncWrite` stream, then a chunked message transport whose
//!   read and write halves can be driven from separate tasks.
//! * [`link`]: the identity exchange after the handshake, then request/reply over a session.
//! * [`admission`]: limits on inbound connections that have not authenticated yet.
//! * [`budget`]: the bytes one authenticated peer can make the node hold, across its links.
//! * [`bandwidth`]: upload and download limits (token buckets, schedules); [`paced`] applies
//!   them to a session's reads and writes.
//!
//! The handshake only proves that the peer holds the private half of
//! [`noise::NoiseSession::remote_static`]; the caller must check that key
//! against the peer's signed identity card before trusting the session.
//!
//! Nothing in this module logs key material or payload bytes.

pub mod admission;
pub mod bandwidth;
pub mod budget;
pub mod envelope;
pub mod frame;
pub mod link;
pub mod noise;
pub mod paced;

/// Errors of the transport layer. Each variant has a short, stable
/// [`NetError::reason`] usable as a metrics/counter key.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Underlying I/O failure (connection reset, broken pipe, ...).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),

    /// A length prefix announced a frame larger than allowed.
    #[error("frame too large: {len} bytes (max {max})")]
    FrameTooLarge { len: usize, max: usize },

    /// The handshake did not complete within its deadline.
    #[error("noise handshake timed out")]
    HandshakeTimeout,

    /// The Noise handshake failed (bad message, failed DH, bad key, ...).
    #[error("noise handshake failed: {0}")]
    Handshake(#[from] snow::Error),

    /// A transport message failed authentication/decryption.
    #[error("noise message failed to decrypt")]
    Decrypt,

    /// A logical message exceeds the configured maximum.
    #[error("message too large: {len} bytes (max {max})")]
    MessageTooLarge { len: usize, max: usize },

    /// A decrypted chunk was malformed (unknown flag, empty continuation).
    #[error("malformed message chunk")]
    BadChunk,

    /// The stream ended in the middle of a frame, a message or a handshake.
    #[error("unexpected end of stream")]
    UnexpectedEof,

    /// The session can no longer be used (after a previous error, an
    /// interrupted send, shutdown, or nonce exhaustion).
    #[error("session closed")]
    Closed,
}

impl NetError {
    /// Short stable identifier, e.g. for counters: `"frame_too_large"`.
    pub fn reason(&self) -> &'static str {
        match self {
            NetError::Io(_) => "io",
            NetError::FrameTooLarge { .. } => "frame_too_large",
            NetError::HandshakeTimeout => "handshake_timeout",
            NetError::Handshake(_) => "handshake",
            NetError::Decrypt => "decrypt",
            NetError::MessageTooLarge { .. } => "message_too_large",
            NetError::BadChunk => "bad_chunk",
            NetError::UnexpectedEof => "unexpected_eof",
            NetError::Closed => "closed",
        }
    }
}

/// Generates a fresh X25519 static keypair `(private, public)` with snow's
/// builder (OS randomness).
///
/// # Panics
/// Only if the operating system's random number generator is unavailable.
pub fn generate_static_keypair() -> ([u8; 32], [u8; 32]) {
    let kp = snow::Builder::new(noise::noise_params())
        .generate_keypair()
        .expect("X25519 keypair generation (OS RNG unavailable?)");
    let mut private = [0u8; 32];
    let mut public = [0u8; 32];
    private.copy_from_slice(&kp.private);
    public.copy_from_slice(&kp.public);
    (private, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct() {
        let all = [
            NetError::Io(std::io::Error::other("x")),
            NetError::FrameTooLarge { len: 1, max: 0 },
            NetError::HandshakeTimeout,
            NetError::Handshake(snow::Error::Decrypt),
            NetError::Decrypt,
            NetError::MessageTooLarge { len: 1, max: 0 },
            NetError::BadChunk,
            NetError::UnexpectedEof,
            NetError::Closed,
        ];
        let mut reasons: Vec<_> = all.iter().map(NetError::reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), all.len());
    }

    #[test]
    fn keypairs_are_random_and_consistent() {
        let (a_priv, a_pub) = generate_static_keypair();
        let (b_priv, b_pub) = generate_static_keypair();
        assert_ne!(a_priv, b_priv);
        assert_ne!(a_pub, b_pub);
        assert_ne!(a_priv, a_pub);
    }
}
