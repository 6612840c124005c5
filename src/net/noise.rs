//! Noise XX handshake and chunked, encrypted message transport.
//!
//! Wire format: every Noise message (handshake or transport) travels in one
//! [`frame`](crate::net::frame) (4-byte big-endian length + body, body at
//! most 65535 bytes).
//!
//! After the handshake a logical message (0..=[`MAX_MESSAGE`] bytes by
//! default) is sent as one or more transport chunks. Each chunk's plaintext is
//! a 1-byte flag ([`FLAG_MORE`] = more chunks follow, [`FLAG_FINAL`] = last
//! chunk of the message, [`FLAG_ALONE`] = a whole message, possibly between
//! the chunks of another) followed by up to [`MAX_CHUNK`] bytes of message
//! data; non-final chunks are never empty. Nonces are implicit: each direction
//! counts its transport messages from 0 (the stream is ordered and reliable),
//! which lets the read and write halves run independently on a shared
//! [`snow::StatelessTransportState`] with no lock.
//!
//! The handshake authenticates the peer's X25519 static key only; the caller
//! must compare [`NoiseSession::remote_static`] with the key in the peer's
//! signed identity card (otherwise a relay running its own handshakes with
//! both ends goes unnoticed).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{Sink, SinkExt, Stream, StreamExt};
use snow::{StatelessTransportState, params::NoiseParams};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{Decoder, Encoder, Framed, FramedParts, FramedWrite};

use crate::net::NetError;
use crate::net::frame::{self, FrameCodec, NOISE_MAX_MSG};

/// The Noise protocol name used by every session.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// AEAD tag length (ChaCha20-Poly1305).
pub const TAG_LEN: usize = 16;
/// Per-chunk plaintext header: the flag byte.
pub const CHUNK_HEADER: usize = 1;
/// Largest message data carried by one chunk: 65535 - 16 - 1 = 65518.
pub const MAX_CHUNK: usize = NOISE_MAX_MSG - TAG_LEN - CHUNK_HEADER;
/// Default maximum logical message size (both directions), 64 MiB.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Chunk flag: more chunks of this message follow.
pub const FLAG_MORE: u8 = 0;
/// Chunk flag: last chunk of this message.
pub const FLAG_FINAL: u8 = 1;
/// Chunk flag: a whole message in one chunk, possibly between the chunks of another (sent
/// only to a peer whose identity exchange said it reads them, see PROTOCOL.md §4): pings and
/// small requests do not wait for a long message on a slow link.
pub const FLAG_ALONE: u8 = 2;

/// Encrypted bytes buffered before the writer pushes them to the socket (one flush per
/// message in any case). One frame: a chunk slipped between two chunks of a long message
/// waits behind at most one frame, also on a slow, bandwidth-limited link.
const WRITE_BOUNDARY: usize = NOISE_MAX_MSG + frame::LEN_PREFIX;
/// Read buffer capacity after the handshake.
const READ_CAPACITY: usize = 64 * 1024;
/// Read buffer capacity during the handshake (messages are < 100 bytes).
const HANDSHAKE_READ_CAPACITY: usize = 1024;
/// Length of the BLAKE2s handshake hash.
const HASH_LEN: usize = 32;

/// Parsed [`NOISE_PARAMS`].
pub fn noise_params() -> NoiseParams {
    NOISE_PARAMS
        .parse()
        .expect("NOISE_PARAMS is a valid Noise protocol name")
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// Runs the initiator side of the XX handshake over `io`. Fails with
/// [`NetError::HandshakeTimeout`] if the whole handshake takes longer than
/// `timeout`. The caller must check [`NoiseSession::remote_static`].
pub async fn handshake_initiator<IO>(
    io: IO,
    local_static_private: &[u8; 32],
    prologue: &[u8],
    timeout: Duration,
) -> Result<NoiseSession<IO>, NetError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    with_timeout(timeout, handshake(io, local_static_private, prologue, true)).await
}

/// Runs the responder side of the XX handshake over `io`. Same contract as
/// [`handshake_initiator`]. Both sides must use the same `prologue`.
pub async fn handshake_responder<IO>(
    io: IO,
    local_static_private: &[u8; 32],
    prologue: &[u8],
    timeout: Duration,
) -> Result<NoiseSession<IO>, NetError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    with_timeout(
        timeout,
        handshake(io, local_static_private, prologue, false),
    )
    .await
}

async fn with_timeout<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(NetError::HandshakeTimeout),
    }
}

async fn handshake<IO>(
    io: IO,
    local_static_private: &[u8; 32],
    prologue: &[u8],
    initiator: bool,
) -> Result<NoiseSession<IO>, NetError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let builder = snow::Builder::new(noise_params())
        .local_private_key(local_static_private)?
        .prologue(prologue)?;
    let mut hs = if initiator {
        builder.build_initiator()?
    } else {
        builder.build_responder()?
    };

    let mut framed = Framed::with_capacity(io, FrameCodec::new(), HANDSHAKE_READ_CAPACITY);
    let mut buf = vec![0u8; NOISE_MAX_MSG];
    while !hs.is_handshake_finished() {
        if hs.is_my_turn() {
            let n = hs.write_message(&[], &mut buf)?;
            framed.send(&buf[..n]).await?;
        } else {
            let msg = framed.next().await.ok_or(NetError::UnexpectedEof)??;
            // Our handshake messages carry no payload: bytes beyond the keys mean the peer is
            // not speaking this protocol (e.g. a message sent before the handshake).
            if hs.read_message(&msg, &mut buf)? != 0 {
                return Err(NetError::Handshake(snow::Error::Input));
            }
        }
    }

    let remote_static: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(snow::Error::State(
            snow::error::StateProblem::MissingKeyMaterial,
        ))?;
    let mut handshake_hash = [0u8; HASH_LEN];
    handshake_hash.copy_from_slice(&hs.get_handshake_hash()[..HASH_LEN]);
    let transport = Arc::new(hs.into_stateless_transport_mode()?);

    let sealer = Sealer::new(transport.clone());
    let mut framed = framed.map_codec(|frames| SessionCodec { frames, sealer });
    framed.read_buffer_mut().reserve(READ_CAPACITY);
    framed.set_backpressure_boundary(WRITE_BOUNDARY);
    Ok(NoiseSession {
        framed,
        opener: Opener::new(transport),
        send_state: SendState::new(),
        keys: SessionKeys {
            remote_static,
            handshake_hash,
        },
        peer_reads_alone: false,
    })
}

// ---------------------------------------------------------------------------
// Chunk sealing / opening
// ---------------------------------------------------------------------------

/// One chunk of a logical message, as fed to the sealing encoder.
struct Chunk<'a> {
    data: &'a [u8],
    flag: u8,
}

/// Encrypts chunks straight into the frame write buffer.
struct Sealer {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    /// Plaintext scratch: flag byte + chunk data.
    plain: Vec<u8>,
}

impl Sealer {
    fn new(transport: Arc<StatelessTransportState>) -> Self {
        Sealer {
            transport,
            nonce: 0,
            plain: Vec::with_capacity(NOISE_MAX_MSG),
        }
    }
}

impl<'a> Encoder<Chunk<'a>> for Sealer {
    type Error = NetError;

    fn encode(&mut self, chunk: Chunk<'a>, dst: &mut BytesMut) -> Result<(), NetError> {
        debug_assert!(chunk.data.len() <= MAX_CHUNK);
        self.plain.clear();
        self.plain.push(chunk.flag);
        self.plain.extend_from_slice(chunk.data);
        let ct_len = self.plain.len() + TAG_LEN;

        let head = dst.len();
        frame::put_frame_header(dst, ct_len)?;
        let body = dst.len();
        dst.resize(body + ct_len, 0);
        match self
            .transport
            .write_message(self.nonce, &self.plain, &mut dst[body..])
        {
            Ok(n) => {
                debug_assert_eq!(n, ct_len);
                self.nonce += 1;
                Ok(())
            }
            Err(_) => {
                // Only nonce exhaustion (2^64 - 1 messages) can get here.
                dst.truncate(head);
                Err(NetError::Closed)
            }
        }
    }
}

/// Decrypts frames and reassembles logical messages.
struct Opener {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    /// Decryption scratch, always NOISE_MAX_MSG long (snow's ring backend
    /// decrypts in place when the output is at least as long as the input).
    plain: Vec<u8>,
    /// Partially reassembled message.
    msg: Vec<u8>,
    in_message: bool,
    max_message: usize,
    /// Size of the last multi-chunk message, to pre-size the next one.
    size_hint: usize,
    closed: bool,
}

impl Opener {
    fn new(transport: Arc<StatelessTransportState>) -> Self {
        Opener {
            transport,
            nonce: 0,
            plain: vec![0u8; NOISE_MAX_MSG],
            msg: Vec::new(),
            in_message: false,
            max_message: MAX_MESSAGE,
            size_hint: 0,
            closed: false,
        }
    }

    /// Decrypts one frame; returns the message when it was its last chunk.
    fn open(&mut self, frame: &[u8]) -> Result<Option<Vec<u8>>, NetError> {
        if frame.len() > NOISE_MAX_MSG {
            return Err(NetError::FrameTooLarge {
                len: frame.len(),
                max: NOISE_MAX_MSG,
            });
        }
        let n = self
            .transport
            .read_message(self.nonce, frame, &mut self.plain)
            .map_err(|e| match e {
                snow::Error::State(_) => NetError::Closed,
                _ => NetError::Decrypt,
            })?;
        self.nonce += 1;

        let (&flag, data) = self.plain[..n].split_first().ok_or(NetError::BadChunk)?;
        let last = match flag {
            FLAG_FINAL | FLAG_ALONE => true,
            FLAG_MORE if !data.is_empty() => false,
            _ => return Err(NetError::BadChunk),
        };
        // A flag 0x02 chunk is a message of its own; one in progress goes on after it.
        let alone = flag == FLAG_ALONE;
        let len = if alone {
            data.len()
        } else {
            self.msg.len() + data.len()
        };
        if len > self.max_message {
            return Err(NetError::MessageTooLarge {
                len,
                max: self.max_message,
            });
        }
        if alone || (last && !self.in_message) {
            return Ok(Some(data.to_vec()));
        }
        if !self.in_message {
            // First chunk of a multi-chunk message.
            let want = self.size_hint.max(4 * MAX_CHUNK).min(self.max_message);
            self.msg.reserve_exact(want);
            self.in_message = true;
        }
        self.msg.extend_from_slice(data);
        if !last {
            return Ok(None);
        }
        self.in_message = false;
        self.size_hint = self.msg.len();
        Ok(Some(std::mem::take(&mut self.msg)))
    }
}

async fn recv_from<S>(stream: &mut S, opener: &mut Opener) -> Result<Option<Vec<u8>>, NetError>
where
    S: Stream<Item = Result<BytesMut, NetError>> + Unpin,
{
    let got = recv_gated_from(stream, opener, || std::future::ready(())).await?;
    Ok(got.map(|(msg, _)| msg))
}

/// [`recv_from`] that awaits `on_long` when a message turns out to span chunks, after its first
/// chunk and before the rest is read.
async fn recv_gated_from<S, T, F, Fut>(
    stream: &mut S,
    opener: &mut Opener,
    on_long: F,
) -> Result<Option<(Vec<u8>, Option<T>)>, NetError>
where
    S: Stream<Item = Result<BytesMut, NetError>> + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    if opener.closed {
        return Err(NetError::Closed);
    }
    let mut on_long = Some(on_long);
    let mut gated = None;
    let err = loop {
        match stream.next().await {
            Some(Ok(frame)) => match opener.open(&frame) {
                Ok(Some(msg)) => return Ok(Some((msg, gated))),
                Ok(None) => {
                    if let Some(gate) = on_long.take() {
                        gated = Some(gate().await);
                    }
                    continue;
                }
                Err(e) => break e,
            },
            Some(Err(e)) => break e,
            None if opener.in_message => break NetError::UnexpectedEof,
            None => return Ok(None),
        }
    };
    opener.closed = true;
    Err(err)
}

struct SendState {
    max_message: usize,
    /// Set while a message is partly queued (also if that send was
    /// cancelled), after an I/O error and after shutdown.
    closed: bool,
}

impl SendState {
    fn new() -> Self {
        SendState {
            max_message: MAX_MESSAGE,
            closed: false,
        }
    }
}

async fn send_to<S>(sink: &mut S, state: &mut SendState, msg: &[u8]) -> Result<(), NetError>
where
    S: for<'a> Sink<Chunk<'a>, Error = NetError> + Unpin,
{
    send_between(sink, state, msg, || None::<Vec<u8>>).await?;
    Ok(())
}

/// [`send_to`] that asks `between` after each chunk but the last for whole messages of at
/// most [`MAX_CHUNK`] bytes to slip in as [`FLAG_ALONE`] chunks; returns them, sent.
async fn send_between<S, T, F>(
    sink: &mut S,
    state: &mut SendState,
    msg: &[u8],
    mut between: F,
) -> Result<Vec<T>, NetError>
where
    S: for<'a> Sink<Chunk<'a>, Error = NetError> + Unpin,
    T: AsRef<[u8]>,
    F: FnMut() -> Option<T>,
{
    let mut slipped = Vec::new();
    if state.closed {
        return Err(NetError::Closed);
    }
    if msg.len() > state.max_message {
        return Err(NetError::MessageTooLarge {
            len: msg.len(),
            max: state.max_message,
        });
    }
    // Cleared once the final chunk is queued: a send cancelled mid-message
    // leaves the stream unusable.
    state.closed = true;
    let mut rest = msg;
    loop {
        let (data, tail) = rest.split_at(rest.len().min(MAX_CHUNK));
        let last = tail.is_empty();
        let flag = if last { FLAG_FINAL } else { FLAG_MORE };
        sink.feed(Chunk { data, flag }).await?;
        if last {
            break;
        }
        rest = tail;
        while let Some(whole) = between() {
            let data = whole.as_ref();
            let max = MAX_CHUNK.min(state.max_message);
            if data.len() > max {
                return Err(NetError::MessageTooLarge {
                    len: data.len(),
                    max,
                });
            }
            sink.feed(Chunk {
                data,
                flag: FLAG_ALONE,
            })
            .await?;
            slipped.push(whole);
        }
    }
    state.closed = false;
    if let Err(e) = sink.flush().await {
        state.closed = true;
        return Err(e);
    }
    Ok(slipped)
}

/// Framing codec of an unsplit session: frames in, sealed chunks out.
struct SessionCodec {
    frames: FrameCodec,
    sealer: Sealer,
}

impl Decoder for SessionCodec {
    type Item = BytesMut;
    type Error = NetError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, NetError> {
        self.frames.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, NetError> {
        self.frames.decode_eof(src)
    }
}

impl<'a> Encoder<Chunk<'a>> for SessionCodec {
    type Error = NetError;

    fn encode(&mut self, chunk: Chunk<'a>, dst: &mut BytesMut) -> Result<(), NetError> {
        self.sealer.encode(chunk, dst)
    }
}

// ---------------------------------------------------------------------------
// Public session types
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct SessionKeys {
    remote_static: [u8; 32],
    handshake_hash: [u8; HASH_LEN],
}

/// An established Noise session over `IO`.
pub struct NoiseSession<IO> {
    framed: Framed<IO, SessionCodec>,
    opener: Opener,
    send_state: SendState,
    keys: SessionKeys,
    peer_reads_alone: bool,
}

impl<IO> fmt::Debug for NoiseSession<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseSession")
            .field("sent", &self.framed.codec().sealer.nonce)
            .field("received", &self.opener.nonce)
            .finish_non_exhaustive()
    }
}

impl<IO> NoiseSession<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// The peer's X25519 static public key, as proven by the handshake. Must
    /// be checked against the peer's signed identity card.
    pub fn remote_static(&self) -> [u8; 32] {
        self.keys.remote_static
    }

    /// The Noise handshake hash (unique per session; usable for channel
    /// binding, e.g. signing it with an identity key).
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.keys.handshake_hash
    }

    /// Sets the largest logical message accepted by `send` and `recv`
    /// (default [`MAX_MESSAGE`]).
    /// The peer said (in its identity exchange) that it reads [`FLAG_ALONE`] chunks.
    pub fn set_peer_reads_alone(&mut self, reads: bool) {
        self.peer_reads_alone = reads;
    }

    pub fn set_max_message(&mut self, max: usize) {
        self.send_state.max_message = max;
        self.opener.max_message = max;
    }

    /// Sends one logical message (any size up to the maximum) and flushes.
    /// Cancelling this future mid-message makes later sends fail with
    /// [`NetError::Closed`].
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), NetError> {
        send_to(&mut self.framed, &mut self.send_state, msg).await
    }

    /// Receives the next logical message; `Ok(None)` on a clean end of
    /// stream between messages. Cancel-safe. After an error every later call
    /// returns [`NetError::Closed`].
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, NetError> {
        recv_from(&mut self.framed, &mut self.opener).await
    }

    /// Splits into halves usable from two tasks (via [`tokio::io::split`]).
    pub fn split(self) -> (NoiseReader<ReadHalf<IO>>, NoiseWriter<WriteHalf<IO>>) {
        self.split_with(tokio::io::split)
    }

    /// Splits into halves with a caller-supplied split of the stream, e.g.
    /// `TcpStream::into_split` (lock-free, unlike `tokio::io::split`).
    pub fn split_with<R, W>(
        self,
        split: impl FnOnce(IO) -> (R, W),
    ) -> (NoiseReader<R>, NoiseWriter<W>)
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let parts = self.framed.into_parts();
        let (r, w) = split(parts.io);
        let SessionCodec { frames, sealer } = parts.codec;

        // Bytes read with the last handshake or identity message may already hold whole
        // frames. `Framed::from_parts` marks a non-empty buffer as readable, so they are
        // decoded before the socket is read again; a fresh `FramedRead` would first wait for
        // new bytes, and a request sent together with the identity would stall (issue 11).
        let mut read_parts = FramedParts::new::<&[u8]>(r, frames);
        read_parts.read_buf = parts.read_buf;
        let mut reader = Framed::from_parts(read_parts);
        let spare = reader.read_buffer().capacity() - reader.read_buffer().len();
        reader
            .read_buffer_mut()
            .reserve(READ_CAPACITY.saturating_sub(spare));
        let mut writer = FramedWrite::new(w, sealer);
        writer.set_backpressure_boundary(WRITE_BOUNDARY);
        writer
            .write_buffer_mut()
            .extend_from_slice(&parts.write_buf);
        (
            NoiseReader {
                framed: reader,
                opener: self.opener,
                keys: self.keys,
            },
            NoiseWriter {
                framed: writer,
                state: self.send_state,
                keys: self.keys,
                peer_reads_alone: self.peer_reads_alone,
            },
        )
    }
}

/// Receiving half of a [`NoiseSession`].
pub struct NoiseReader<R> {
    /// A `Framed` rather than a `FramedRead` only for `from_parts` (see `split_with`); it
    /// is never written to.
    framed: Framed<R, FrameCodec>,
    opener: Opener,
    keys: SessionKeys,
}

impl<R> fmt::Debug for NoiseReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseReader")
            .field("received", &self.opener.nonce)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin + Send> NoiseReader<R> {
    /// Receives the next logical message; `Ok(None)` on a clean end of
    /// stream between messages. Cancel-safe. After an error every later call
    /// returns [`NetError::Closed`].
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, NetError> {
        recv_from(&mut self.framed, &mut self.opener).await
    }

    /// Like [`recv`](Self::recv), but once a message turns out to be longer than one chunk
    /// (its first chunk is open, the rest not read yet) awaits `on_long` and returns what it
    /// gave beside the message: the caller can wait there for room (a byte budget) before the
    /// rest of a long message is read. Not cancel-safe while `on_long` runs: a message resumed
    /// after a cancel is read without the gate.
    pub async fn recv_gated<T, F, Fut>(
        &mut self,
        on_long: F,
    ) -> Result<Option<(Vec<u8>, Option<T>)>, NetError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        recv_gated_from(&mut self.framed, &mut self.opener, on_long).await
    }

    /// Sets the largest logical message accepted (default [`MAX_MESSAGE`]).
    pub fn set_max_message(&mut self, max: usize) {
        self.opener.max_message = max;
    }

    /// Whether a long message is partly read: the message just returned was a
    /// [`FLAG_ALONE`] one that came between its chunks.
    pub fn in_message(&self) -> bool {
        self.opener.in_message
    }

    /// The largest logical message accepted.
    pub fn max_message(&self) -> usize {
        self.opener.max_message
    }

    /// The peer's X25519 static public key.
    pub fn remote_static(&self) -> [u8; 32] {
        self.keys.remote_static
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        self.framed.get_ref()
    }
}

/// Sending half of a [`NoiseSession`].
pub struct NoiseWriter<W> {
    framed: FramedWrite<W, Sealer>,
    state: SendState,
    keys: SessionKeys,
    /// The peer said it reads [`FLAG_ALONE`] chunks.
    peer_reads_alone: bool,
}

impl<W> fmt::Debug for NoiseWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseWriter")
            .field("sent", &self.framed.encoder().nonce)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin + Send> NoiseWriter<W> {
    /// Sends one logical message (any size up to the maximum) and flushes.
    /// Cancelling this future mid-message makes later sends fail with
    /// [`NetError::Closed`].
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), NetError> {
        send_to(&mut self.framed, &mut self.state, msg).await
    }

    /// [`send`](Self::send) that, if the peer reads [`FLAG_ALONE`] chunks, slips in the
    /// messages `between` gives (each at most [`MAX_CHUNK`] bytes) between the chunks of a
    /// long `msg`; returns those it sent. `between` is not called for a peer that does not.
    pub async fn send_between<T, F>(&mut self, msg: &[u8], between: F) -> Result<Vec<T>, NetError>
    where
        T: AsRef<[u8]>,
        F: FnMut() -> Option<T>,
    {
        if !self.peer_reads_alone {
            send_to(&mut self.framed, &mut self.state, msg).await?;
            return Ok(Vec::new());
        }
        send_between(&mut self.framed, &mut self.state, msg, between).await
    }

    /// Flushes and shuts down the write direction (the peer's reader then
    /// sees a clean end of stream). Later sends fail with [`NetError::Closed`].
    pub async fn shutdown(&mut self) -> Result<(), NetError> {
        self.state.closed = true;
        SinkExt::<Chunk<'_>>::close(&mut self.framed).await
    }

    /// Sets the largest logical message sent (default [`MAX_MESSAGE`]).
    pub fn set_max_message(&mut self, max: usize) {
        self.state.max_message = max;
    }

    /// The peer's X25519 static public key.
    pub fn remote_static(&self) -> [u8; 32] {
        self.keys.remote_static
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        self.framed.get_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::generate_static_keypair;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const T: Duration = Duration::from_secs(5);
    const PROLOGUE: &[u8] = b"bitdust-test/1";

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    struct Pair {
        a: NoiseSession<DuplexStream>,
        b: NoiseSession<DuplexStream>,
        a_pub: [u8; 32],
        b_pub: [u8; 32],
    }

    async fn connect(a: DuplexStream, b: DuplexStream) -> Pair {
        let (a_priv, a_pub) = generate_static_keypair();
        let (b_priv, b_pub) = generate_static_keypair();
        let (ra, rb) = tokio::join!(
            handshake_initiator(a, &a_priv, PROLOGUE, T),
            handshake_responder(b, &b_priv, PROLOGUE, T),
        );
        Pair {
            a: ra.unwrap(),
            b: rb.unwrap(),
            a_pub,
            b_pub,
        }
    }

    /// Session pair over an in-memory pipe; its 1 MiB buffer lets a test
    /// send messages up to that size before receiving them.
    async fn pair() -> Pair {
        let (a, b) = duplex(1 << 20);
        connect(a, b).await
    }

    #[test]
    fn constants() {
        assert_eq!(MAX_CHUNK, 65_518);
        assert_eq!(noise_params().name, NOISE_PARAMS);
    }

    #[tokio::test]
    async fn handshake_and_exchange() {
        let Pair {
            mut a,
            mut b,
            a_pub,
            b_pub,
        } = pair().await;
        assert_eq!(a.remote_static(), b_pub);
        assert_eq!(b.remote_static(), a_pub);
        assert_eq!(a.handshake_hash(), b.handshake_hash());

        a.send(b"ping").await.unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap(), b"ping");
        b.send(b"pong").await.unwrap();
        a.send(b"").await.unwrap();
        assert_eq!(a.recv().await.unwrap().unwrap(), b"pong");
        assert_eq!(b.recv().await.unwrap().unwrap(), b"");
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }

    /// The byte-level vectors beside proto/PROTOCOL.md (computed there by a second
    /// implementation) come out of this chunk layer byte for byte, and open back.
    #[tokio::test]
    async fn the_spec_vectors_match_this_chunk_layer() {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../proto/test-vectors.json")).unwrap();
        let s = &vectors["session"];
        let hx = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
        let (i_s, i_e) = (
            hx(&s["initiator_static_secret"]),
            hx(&s["initiator_ephemeral_secret"]),
        );
        let (r_s, r_e) = (
            hx(&s["responder_static_secret"]),
            hx(&s["responder_ephemeral_secret"]),
        );
        let prologue = crate::net::link::PROLOGUE;
        let mut i = snow::Builder::new(noise_params())
            .local_private_key(&i_s)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&i_e)
            .prologue(prologue)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut r = snow::Builder::new(noise_params())
            .local_private_key(&r_s)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&r_e)
            .prologue(prologue)
            .unwrap()
            .build_responder()
            .unwrap();
        let (mut buf, mut out) = (vec![0u8; NOISE_MAX_MSG], vec![0u8; NOISE_MAX_MSG]);
        for (step, framed) in s["handshake"].as_array().unwrap().iter().enumerate() {
            let (writer, reader) = if step % 2 == 0 {
                (&mut i, &mut r)
            } else {
                (&mut r, &mut i)
            };
            let n = writer.write_message(&[], &mut buf).unwrap();
            let mut wire = (n as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&buf[..n]);
            assert_eq!(wire, hx(framed), "handshake message {}", step + 1);
            assert_eq!(reader.read_message(&buf[..n], &mut out).unwrap(), 0);
        }
        assert_eq!(i.get_handshake_hash().to_vec(), hx(&s["handshake_hash"]));
        let it = Arc::new(i.into_stateless_transport_mode().unwrap());
        let rt = Arc::new(r.into_stateless_transport_mode().unwrap());

        async fn seal(w: &mut FramedWrite<Vec<u8>, Sealer>, msg: &[u8]) -> Vec<u8> {
            let start = w.get_ref().len();
            send_to(w, &mut SendState::new(), msg).await.unwrap();
            w.get_ref()[start..].to_vec()
        }
        fn open(opener: &mut Opener, wire: &[u8]) -> Vec<u8> {
            let mut rest = wire;
            loop {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                let got = opener.open(&rest[4..4 + len]).unwrap();
                rest = &rest[4 + len..];
                if let Some(msg) = got {
                    assert!(rest.is_empty());
                    return msg;
                }
            }
        }
        let m = &s["messages"];
        let mut i_send = FramedWrite::new(Vec::new(), Sealer::new(it.clone()));
        let mut r_open = Opener::new(rt.clone());
        assert_eq!(
            seal(&mut i_send, &hx(&m[0]["plaintext"])).await,
            hx(&m[0]["wire"])
        );
        assert_eq!(
            open(&mut r_open, &hx(&m[0]["wire"])),
            hx(&m[0]["plaintext"])
        );
        // The chunked one is given by digests: rebuild its plaintext as PROTOCOL.md says.
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let store = crate::net::envelope::encode(&crate::net::envelope::envelope(
            2,
            0,
            crate::proto::envelope::Body::StoreFragment(crate::proto::StoreFragment {
                id: Some(crate::proto::FragmentId {
                    block: blake3::hash(b"vector block").as_bytes().to_vec(),
                    position: 3,
                }),
                hash: blake3::hash(&data).as_bytes().to_vec(),
                data,
            }),
        ));
        let digest = |b: &[u8]| serde_json::Value::from(blake3::hash(b).to_hex().to_string());
        assert_eq!(digest(&store), m[1]["plaintext_blake3"]);
        let wire = seal(&mut i_send, &store).await;
        assert_eq!(digest(&wire), m[1]["wire_blake3"]);
        assert_eq!(wire.len() as u64, m[1]["wire_len"].as_u64().unwrap());
        assert!(wire.ends_with(&hx(&m[1]["last_frame"])));
        assert_eq!(open(&mut r_open, &wire), store);
        let mut r_send = FramedWrite::new(Vec::new(), Sealer::new(rt.clone()));
        let mut i_open = Opener::new(it);
        assert_eq!(
            seal(&mut r_send, &hx(&m[2]["plaintext"])).await,
            hx(&m[2]["wire"])
        );
        assert_eq!(
            open(&mut i_open, &hx(&m[2]["wire"])),
            hx(&m[2]["plaintext"])
        );
    }

    /// Fault 2 of issue 11: messages that arrived in the same read as an earlier one are
    /// still in the session's read buffer when it is split; the reader half must decode them
    /// at once, not wait for more bytes from the socket (which may never come).
    #[tokio::test]
    async fn buffered_messages_survive_the_split() {
        let Pair { mut a, mut b, .. } = pair().await;
        // Both messages are in the pipe before b reads: one read takes both.
        a.send(b"identity").await.unwrap();
        a.send(b"request").await.unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap(), b"identity");
        let (mut br, _bw) = b.split();
        let next = tokio::time::timeout(Duration::from_secs(2), br.recv())
            .await
            .expect("the buffered message is decoded without more input");
        assert_eq!(next.unwrap().unwrap(), b"request");
        // The reader still reads new input from the stream afterwards.
        let (_ar, mut aw) = a.split();
        aw.send(b"later").await.unwrap();
        assert_eq!(br.recv().await.unwrap().unwrap(), b"later");
    }

    #[tokio::test]
    async fn prologue_mismatch_fails() {
        let (a, b) = duplex(4096);
        let (a_priv, _) = generate_static_keypair();
        let (b_priv, _) = generate_static_keypair();
        let (ra, rb) = tokio::join!(
            handshake_initiator(a, &a_priv, b"one", T),
            handshake_responder(b, &b_priv, b"two", T),
        );
        // msg2 is the first one bound to the prologue: the initiator fails to
        // decrypt it and hangs up, so the responder sees the stream end.
        assert!(
            matches!(ra, Err(NetError::Handshake(snow::Error::Decrypt))),
            "{ra:?}"
        );
        assert!(rb.is_err());
    }

    #[tokio::test]
    async fn large_and_empty_messages() {
        let Pair { a, b, .. } = pair().await;
        let sizes = [
            1 << 20,
            200_000,
            0,
            MAX_CHUNK,
            MAX_CHUNK + 1,
            2 * MAX_CHUNK,
            1,
            3_000_000,
        ];
        let (_ar, mut aw) = a.split();
        let (mut br, _bw) = b.split();
        let sender = tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate() {
                aw.send(&pattern(n, i as u8)).await.unwrap();
            }
            aw.shutdown().await.unwrap();
            aw
        });
        for (i, &n) in sizes.iter().enumerate() {
            let m = br.recv().await.unwrap().unwrap();
            assert_eq!(m.len(), n);
            assert!(m == pattern(n, i as u8), "message {i} corrupted");
        }
        assert!(br.recv().await.unwrap().is_none());
        let mut aw = sender.await.unwrap();
        assert!(matches!(aw.send(b"x").await, Err(NetError::Closed)));
    }

    /// Whole messages slipped between the chunks of a long one arrive whole, before it, and
    /// the long one arrives intact after them; a peer that did not ask for them gets none.
    #[tokio::test]
    async fn messages_slip_between_the_chunks_of_a_long_one() {
        let Pair { mut a, b, .. } = pair().await;
        a.set_peer_reads_alone(true);
        let (_ar, mut aw) = a.split();
        let (mut br, _bw) = b.split();
        let long = pattern(5 * MAX_CHUNK + 7, 3);
        let mut small = vec![b"ping".to_vec(), b"audit".to_vec(), Vec::new()].into_iter();
        let slipped = aw.send_between(&long, || small.next()).await.expect("sent");
        // All three went after the first chunk.
        assert_eq!(slipped.len(), 3);
        assert_eq!(br.recv().await.unwrap().unwrap(), b"ping");
        assert_eq!(br.recv().await.unwrap().unwrap(), b"audit");
        assert_eq!(br.recv().await.unwrap().unwrap(), b"");
        assert!(
            br.recv().await.unwrap().unwrap() == long,
            "long message intact"
        );
        // A message too long for one chunk cannot slip in.
        let mut too_long = Some(vec![0u8; MAX_CHUNK + 1]);
        assert!(matches!(
            aw.send_between(&long, || too_long.take()).await,
            Err(NetError::MessageTooLarge { .. })
        ));

        let Pair { a, b, .. } = pair().await;
        let (_ar, mut aw) = a.split();
        let (mut br, _bw) = b.split();
        let mut asked = false;
        let slipped = aw
            .send_between(&long, || {
                asked = true;
                Some(b"x".to_vec())
            })
            .await
            .expect("sent");
        assert!(
            !asked && slipped.is_empty(),
            "not offered to a peer that did not ask"
        );
        assert!(br.recv().await.unwrap().unwrap() == long);
    }

    /// A slipped message is held to the receiver's maximum (the small one before the peer's
    /// identity is checked), like any other.
    #[tokio::test]
    async fn a_slipped_message_obeys_the_maximum() {
        let Pair { mut a, mut b, .. } = pair().await;
        b.set_max_message(8);
        for (len, fits) in [(8, true), (9, false)] {
            let data = vec![1u8; len];
            a.framed
                .send(Chunk {
                    data: &data,
                    flag: FLAG_ALONE,
                })
                .await
                .expect("sent");
            match b.recv().await {
                Ok(Some(got)) => assert!(fits && got == data),
                Err(NetError::MessageTooLarge { len: 9, max: 8 }) => assert!(!fits),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_halves_concurrently() {
        let Pair { a, b, .. } = pair().await;
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        const N: usize = 200;
        let size = |i: usize| (i * 7919) % 150_000;
        // a: writer task and reader task; b: echo-style, also from two tasks.
        let a_tx = tokio::spawn(async move {
            for i in 0..N {
                aw.send(&pattern(size(i), i as u8)).await.unwrap();
            }
            aw.shutdown().await.unwrap();
        });
        let b_tx = tokio::spawn(async move {
            for i in 0..N {
                bw.send(&pattern(size(N - i), i as u8)).await.unwrap();
            }
            bw.shutdown().await.unwrap();
        });
        let a_rx = tokio::spawn(async move {
            for i in 0..N {
                assert_eq!(
                    ar.recv().await.unwrap().unwrap(),
                    pattern(size(N - i), i as u8)
                );
            }
            assert!(ar.recv().await.unwrap().is_none());
        });
        for i in 0..N {
            assert_eq!(br.recv().await.unwrap().unwrap(), pattern(size(i), i as u8));
        }
        assert!(br.recv().await.unwrap().is_none());
        a_tx.await.unwrap();
        b_tx.await.unwrap();
        a_rx.await.unwrap();
    }

    #[tokio::test]
    async fn split_keeps_data_buffered_during_handshake() {
        // The initiator sends right after its last handshake message; the
        // bytes may already sit in the responder's handshake read buffer.
        let Pair { mut a, b, .. } = pair().await;
        a.send(b"early").await.unwrap();
        a.send(&pattern(100_000, 3)).await.unwrap();
        let (mut br, _bw) = b.split();
        assert_eq!(br.recv().await.unwrap().unwrap(), b"early");
        assert_eq!(br.recv().await.unwrap().unwrap(), pattern(100_000, 3));
    }

    #[tokio::test]
    async fn message_size_limits() {
        let Pair { mut a, mut b, .. } = pair().await;
        a.set_max_message(1000);
        assert!(matches!(
            a.send(&[0u8; 1001]).await,
            Err(NetError::MessageTooLarge {
                len: 1001,
                max: 1000
            })
        ));
        // Nothing was sent; the session still works.
        a.send(&[5u8; 1000]).await.unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap(), vec![5u8; 1000]);

        b.set_max_message(100_000);
        a.set_max_message(MAX_MESSAGE);
        a.send(&[1u8; 100_000]).await.unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap().len(), 100_000);
        a.send(&[1u8; 100_001]).await.unwrap();
        let err = b.recv().await.unwrap_err();
        assert!(
            matches!(err, NetError::MessageTooLarge { max: 100_000, .. }),
            "{err:?}"
        );
        assert_eq!(err.reason(), "message_too_large");
        assert!(matches!(b.recv().await, Err(NetError::Closed)));
    }

    #[tokio::test]
    async fn garbage_handshake_is_an_error() {
        let (mut raw, b) = duplex(4096);
        let (b_priv, _) = generate_static_keypair();
        // A well-formed frame holding 80 garbage bytes (too short/invalid).
        let mut junk = vec![0, 0, 0, 80];
        junk.extend(pattern(80, 9));
        raw.write_all(&junk).await.unwrap();
        // msg1 is only the 32-byte ephemeral key: anything after it is refused at once.
        let resp = tokio::spawn(async move { handshake_responder(b, &b_priv, PROLOGUE, T).await });
        let err = resp.await.unwrap().unwrap_err();
        assert!(matches!(err, NetError::Handshake(_)), "{err:?}");
        assert_eq!(err.reason(), "handshake");

        // Random bytes straight to the initiator: length prefix garbage.
        let (a, mut raw) = duplex(4096);
        let (a_priv, _) = generate_static_keypair();
        let init = tokio::spawn(async move { handshake_initiator(a, &a_priv, PROLOGUE, T).await });
        let mut msg1 = [0u8; 36];
        raw.read_exact(&mut msg1).await.unwrap();
        raw.write_all(&pattern(300, 1)).await.unwrap();
        assert!(init.await.unwrap().is_err());

        // Peer hangs up mid-handshake.
        let (a, raw) = duplex(4096);
        drop(raw);
        let (a_priv, _) = generate_static_keypair();
        let err = handshake_initiator(a, &a_priv, PROLOGUE, T)
            .await
            .unwrap_err();
        assert!(
            matches!(err, NetError::Io(_) | NetError::UnexpectedEof),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn oversized_length_prefix() {
        // During the handshake.
        let (a, mut raw) = duplex(4096);
        let (a_priv, _) = generate_static_keypair();
        let init = tokio::spawn(async move { handshake_initiator(a, &a_priv, PROLOGUE, T).await });
        let mut msg1 = [0u8; 36];
        raw.read_exact(&mut msg1).await.unwrap();
        raw.write_all(&[0xFF; 4]).await.unwrap();
        let err = init.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                NetError::FrameTooLarge {
                    len: 0xFFFF_FFFF,
                    ..
                }
            ),
            "{err:?}"
        );

        // After the handshake: inject raw bytes in place of the reader's stream.
        let Pair { b, .. } = pair().await;
        let (mut br, _bw) = b.split_with(|io| (std::io::Cursor::new(vec![0xFF; 8]), io));
        let err = br.recv().await.unwrap_err();
        assert!(
            matches!(
                err,
                NetError::FrameTooLarge {
                    len: 0xFFFF_FFFF,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(matches!(br.recv().await, Err(NetError::Closed)));

        // A frame within MAX_FRAME but above the Noise maximum.
        let Pair { b, .. } = pair().await;
        let mut wire = ((NOISE_MAX_MSG + 1) as u32).to_be_bytes().to_vec();
        wire.resize(4 + NOISE_MAX_MSG + 1, 0);
        let (mut br, _bw) = b.split_with(|io| (std::io::Cursor::new(wire), io));
        assert!(matches!(
            br.recv().await,
            Err(NetError::FrameTooLarge { .. })
        ));
    }

    /// Copies a→b and b→a, flipping one bit of the a→b stream at `flip_at`.
    async fn tamper_proxy(a: DuplexStream, b: DuplexStream, flip_at: usize) {
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut br, &mut aw).await;
        });
        let mut pos = 0usize;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match ar.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (pos..pos + n).contains(&flip_at) {
                buf[flip_at - pos] ^= 0x01;
            }
            pos += n;
            if bw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = bw.shutdown().await;
        let _ = back.await;
    }

    #[tokio::test]
    async fn tampered_ciphertext_is_rejected() {
        // XX on the wire: msg1 = 4+32, msg2 = 4+96, msg3 = 4+64 bytes. The
        // initiator's first transport frame starts at 36 + 68 = 104.
        let (a, pa) = duplex(64 * 1024);
        let (pb, b) = duplex(64 * 1024);
        tokio::spawn(tamper_proxy(pa, pb, 104 + 4 + 10));
        let Pair { mut a, mut b, .. } = connect(a, b).await;
        a.send(b"some message worth protecting").await.unwrap();
        let err = b.recv().await.unwrap_err();
        assert!(matches!(err, NetError::Decrypt), "{err:?}");
        assert_eq!(err.reason(), "decrypt");
        assert!(matches!(b.recv().await, Err(NetError::Closed)));

        // Same proxy, flipping a bit past the tampered region: untouched
        // traffic still flows (sanity check of the offsets above).
        let (a, pa) = duplex(64 * 1024);
        let (pb, b) = duplex(64 * 1024);
        tokio::spawn(tamper_proxy(pa, pb, 1 << 30));
        let Pair { mut a, mut b, .. } = connect(a, b).await;
        a.send(b"some message worth protecting").await.unwrap();
        assert_eq!(
            b.recv().await.unwrap().unwrap(),
            b"some message worth protecting"
        );
    }

    #[tokio::test]
    async fn handshake_timeout() {
        let (a, _silent_peer) = duplex(4096);
        let (a_priv, _) = generate_static_keypair();
        let start = tokio::time::Instant::now();
        let err = handshake_initiator(a, &a_priv, PROLOGUE, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::HandshakeTimeout), "{err:?}");
        assert_eq!(err.reason(), "handshake_timeout");
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(2));

        let (b, _silent_peer) = duplex(4096);
        let err = handshake_responder(b, &a_priv, PROLOGUE, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::HandshakeTimeout), "{err:?}");
    }

    #[tokio::test]
    async fn man_in_the_middle_is_visible_in_remote_static() {
        let (alice_priv, alice_pub) = generate_static_keypair();
        let (bob_priv, bob_pub) = generate_static_keypair();
        let (mallory_priv, mallory_pub) = generate_static_keypair();
        let (alice_io, m_left) = duplex(64 * 1024);
        let (m_right, bob_io) = duplex(64 * 1024);

        // Mallory answers Alice as a responder and calls Bob as an
        // initiator, with her own static key on both sides, then relays.
        let mallory = tokio::spawn(async move {
            let (left, right) = tokio::join!(
                handshake_responder(m_left, &mallory_priv, PROLOGUE, T),
                handshake_initiator(m_right, &mallory_priv, PROLOGUE, T),
            );
            let (mut left, mut right) = (left.unwrap(), right.unwrap());
            let msg = left.recv().await.unwrap().unwrap();
            right.send(&msg).await.unwrap();
            let reply = right.recv().await.unwrap().unwrap();
            left.send(&reply).await.unwrap();
            (left.remote_static(), right.remote_static())
        });
        let (alice, bob) = tokio::join!(
            handshake_initiator(alice_io, &alice_priv, PROLOGUE, T),
            handshake_responder(bob_io, &bob_priv, PROLOGUE, T),
        );
        let (mut alice, mut bob) = (alice.unwrap(), bob.unwrap());

        // The relay works transparently...
        alice.send(b"hello bob").await.unwrap();
        assert_eq!(bob.recv().await.unwrap().unwrap(), b"hello bob");
        bob.send(b"hello alice").await.unwrap();
        assert_eq!(alice.recv().await.unwrap().unwrap(), b"hello alice");

        // ...but each side sees Mallory's key, so the identity-card check
        // (remote_static == key in the peer's signed card) catches it.
        assert_eq!(alice.remote_static(), mallory_pub);
        assert_ne!(alice.remote_static(), bob_pub);
        assert_eq!(bob.remote_static(), mallory_pub);
        assert_ne!(bob.remote_static(), alice_pub);
        assert_ne!(alice.handshake_hash(), bob.handshake_hash());
        let (m_saw_alice, m_saw_bob) = mallory.await.unwrap();
        assert_eq!((m_saw_alice, m_saw_bob), (alice_pub, bob_pub));
    }

    #[tokio::test]
    async fn eof_mid_message_and_mid_frame() {
        // Capture the encrypted stream of a 3-chunk message, then truncate it.
        let Pair { a, b, .. } = pair().await;
        let (_ar, mut aw) = a.split_with(|io| (io, Vec::new()));
        aw.send(&pattern(2 * MAX_CHUNK + 10, 0)).await.unwrap();
        let wire = aw.get_ref().clone();
        let frame_len = LEN_PREFIX_TEST + NOISE_MAX_MSG;
        assert_eq!(
            wire.len(),
            2 * frame_len + LEN_PREFIX_TEST + 1 + 10 + TAG_LEN
        );

        // Cut at a frame boundary (after the first chunk): EOF mid-message.
        let (mut br, _bw) =
            b.split_with(|io| (std::io::Cursor::new(wire[..frame_len].to_vec()), io));
        let err = br.recv().await.unwrap_err();
        assert!(matches!(err, NetError::UnexpectedEof), "{err:?}");

        // Cut inside a frame.
        let Pair { a, b, .. } = pair().await;
        let (_ar, mut aw) = a.split_with(|io| (io, Vec::new()));
        aw.send(b"short").await.unwrap();
        let wire = aw.get_ref().clone();
        let (mut br, _bw) =
            b.split_with(|io| (std::io::Cursor::new(wire[..wire.len() - 1].to_vec()), io));
        assert!(matches!(br.recv().await, Err(NetError::UnexpectedEof)));
    }

    const LEN_PREFIX_TEST: usize = crate::net::frame::LEN_PREFIX;

    #[tokio::test]
    async fn bad_chunks() {
        // Hand-craft transport frames with the real keys: unknown flag, empty
        // plaintext, empty continuation chunk.
        for bad in [vec![7u8, 1, 2], vec![], vec![FLAG_MORE]] {
            let Pair { a, b, .. } = pair().await;
            let (_ar, aw) = a.split_with(|io| (io, Vec::new()));
            let sealer = aw.framed.encoder();
            let mut ct = vec![0u8; bad.len() + TAG_LEN];
            sealer.transport.write_message(0, &bad, &mut ct).unwrap();
            let mut wire = (ct.len() as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&ct);
            let (mut br, _bw) = b.split_with(|io| (std::io::Cursor::new(wire), io));
            let err = br.recv().await.unwrap_err();
            assert!(matches!(err, NetError::BadChunk), "{bad:?}: {err:?}");
        }
    }

    #[tokio::test]
    async fn cancelled_send_closes_writer() {
        // A pipe that nobody reads: the send blocks mid-message.
        let (a, b) = duplex(64 * 1024);
        let Pair { a, b: _b, .. } = connect(a, b).await;
        let (_ar, mut aw) = a.split();
        let r =
            tokio::time::timeout(Duration::from_millis(50), aw.send(&pattern(1 << 20, 0))).await;
        assert!(r.is_err(), "send should have blocked");
        assert!(matches!(aw.send(b"x").await, Err(NetError::Closed)));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Arbitrary bytes as the post-handshake stream: never panics, and
        /// ends in messages, a clean EOF or an error.
        #[test]
        fn reader_survives_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..70_000)) {
            rt().block_on(async {
                let Pair { b, .. } = pair().await;
                let (mut br, _bw) = b.split_with(|io| (std::io::Cursor::new(data), io));
                for _ in 0..1000 {
                    match br.recv().await {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
            });
        }

        /// Real encrypted traffic, optionally truncated and/or with one byte
        /// changed: the untouched prefix decodes exactly, nothing panics, and
        /// a corrupted stream never yields a wrong message.
        #[test]
        fn reader_survives_corrupted_traffic(
            sizes in proptest::collection::vec(0usize..150_000, 1..5),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
            do_flip in any::<bool>(),
            xor in 1u8..=255,
        ) {
            rt().block_on(async {
                let Pair { a, b, .. } = pair().await;
                let (_ar, mut aw) = a.split_with(|io| (io, Vec::new()));
                for (i, &n) in sizes.iter().enumerate() {
                    aw.send(&pattern(n, i as u8)).await.unwrap();
                }
                let mut wire = aw.get_ref().clone();
                if do_flip {
                    let i = flip.index(wire.len());
                    wire[i] ^= xor;
                }
                if do_cut {
                    wire.truncate(cut.index(wire.len()));
                }
                let intact = !do_flip && !do_cut;
                let (mut br, _bw) = b.split_with(|io| (std::io::Cursor::new(wire), io));
                let mut got = 0;
                loop {
                    match br.recv().await {
                        Ok(Some(m)) => {
                            assert!(got < sizes.len());
                            assert!(m == pattern(sizes[got], got as u8), "wrong message accepted");
                            got += 1;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            assert!(!intact, "intact stream failed: {e:?}");
                            break;
                        }
                    }
                }
                if intact {
                    assert_eq!(got, sizes.len());
                }
            });
        }
    }
}
