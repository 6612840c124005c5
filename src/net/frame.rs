//! Length-delimited framing: each frame is a 4-byte big-endian length
//! followed by that many bytes. Built on
//! [`tokio_util::codec::LengthDelimitedCodec`], with the length prefix checked
//! *before* the codec sees it so that an oversized prefix yields
//! [`NetError::FrameTooLarge`] with the claimed length, and nothing of the
//! claimed size is ever allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::net::NetError;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Largest Noise message (handshake or transport), per the Noise spec.
pub const NOISE_MAX_MSG: usize = 65_535;

/// Hard maximum frame body length: each frame carries exactly one Noise
/// message, at most [`NOISE_MAX_MSG`] bytes. A longer declared length closes
/// the connection as soon as the length is read (PROTOCOL.md §2).
pub const MAX_FRAME: usize = NOISE_MAX_MSG;

/// Decoder/encoder for the wire framing. Decodes into `BytesMut` frame bodies
/// (zero-copy slices of the read buffer).
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    /// True when the next bytes in the buffer are a length prefix (the inner
    /// codec consumes the prefix once it has seen it).
    at_head: bool,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameCodec {
    pub fn new() -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_offset(0)
            .length_field_length(LEN_PREFIX)
            .length_adjustment(0)
            .big_endian()
            .max_frame_length(MAX_FRAME)
            .new_codec();
        FrameCodec {
            inner,
            at_head: true,
        }
    }
}

fn too_large(len: usize) -> NetError {
    NetError::FrameTooLarge {
        len,
        max: MAX_FRAME,
    }
}

/// Maps the inner codec's I/O errors; its "frame too big" error cannot occur
/// (we check first) but is mapped defensively.
fn map_inner(e: std::io::Error) -> NetError {
    if e.kind() == std::io::ErrorKind::InvalidData
        && e.get_ref()
            .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
    {
        too_large(MAX_FRAME + 1)
    } else {
        NetError::Io(e)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = NetError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, NetError> {
        if self.at_head {
            if src.len() < LEN_PREFIX {
                return Ok(None);
            }
            let len = (&src[..LEN_PREFIX]).get_u32() as usize;
            if len > MAX_FRAME {
                return Err(too_large(len));
            }
        }
        match self.inner.decode(src).map_err(map_inner)? {
            Some(frame) => {
                self.at_head = true;
                Ok(Some(frame))
            }
            None => {
                // With >= LEN_PREFIX bytes available at the head the inner
                // codec consumed the prefix and now waits for the body.
                self.at_head = false;
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, NetError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() && self.at_head => Ok(None),
            None => Err(NetError::UnexpectedEof),
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = NetError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), NetError> {
        if item.len() > MAX_FRAME {
            return Err(too_large(item.len()));
        }
        self.inner.encode(item, dst).map_err(map_inner)
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = NetError;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), NetError> {
        put_frame_header(dst, item.len())?;
        dst.extend_from_slice(item);
        Ok(())
    }
}

/// Appends the length prefix of a frame whose `len`-byte body the caller
/// writes right after (used to encrypt directly into the write buffer).
/// Reserves room for prefix and body.
pub fn put_frame_header(dst: &mut BytesMut, len: usize) -> Result<(), NetError> {
    if len > MAX_FRAME {
        return Err(too_large(len));
    }
    dst.reserve(LEN_PREFIX + len);
    dst.put_u32(len as u32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{FramedRead, FramedWrite};

    fn encode(body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new().encode(body, &mut buf).unwrap();
        buf
    }

    #[test]
    fn roundtrip_and_partial_input() {
        let mut wire = encode(b"hello");
        wire.extend_from_slice(&encode(b""));
        wire.extend_from_slice(&encode(&[7u8; 1000]));
        let mut codec = FrameCodec::new();
        let mut src = BytesMut::new();
        let mut out = Vec::new();
        // Feed one byte at a time to exercise the head/body state tracking.
        for b in wire {
            src.put_u8(b);
            while let Some(f) = codec.decode(&mut src).unwrap() {
                out.push(f.to_vec());
            }
        }
        assert_eq!(out, vec![b"hello".to_vec(), vec![], vec![7u8; 1000]]);
        assert!(codec.decode_eof(&mut src).unwrap().is_none());
    }

    #[test]
    fn max_frame_accepted_oversize_rejected() {
        let mut codec = FrameCodec::new();
        let mut src = encode(&vec![1u8; MAX_FRAME]);
        assert_eq!(codec.decode(&mut src).unwrap().unwrap().len(), MAX_FRAME);

        let mut src = BytesMut::from(&((MAX_FRAME + 1) as u32).to_be_bytes()[..]);
        match codec.decode(&mut src) {
            Err(NetError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (MAX_FRAME + 1, MAX_FRAME));
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut buf = BytesMut::new();
        assert!(matches!(
            codec.encode(Bytes::from(vec![0u8; MAX_FRAME + 1]), &mut buf),
            Err(NetError::FrameTooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    /// Protocol review G5: 65536..=65599 used to be waited for (the codec had 64 bytes of
    /// slack); the first length above the Noise maximum is refused on the prefix alone.
    #[test]
    fn the_first_length_above_the_noise_maximum_is_refused_on_its_prefix() {
        let mut codec = FrameCodec::new();
        let mut src = BytesMut::from(&((NOISE_MAX_MSG + 1) as u32).to_be_bytes()[..]);
        match codec.decode(&mut src) {
            Err(NetError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (65_536, 65_535));
            }
            other => panic!("a 65536-byte frame must close at once, got {other:?}"),
        }
    }

    #[test]
    fn huge_prefix_no_allocation() {
        let mut codec = FrameCodec::new();
        let mut src = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3][..]);
        let err = codec.decode(&mut src).unwrap_err();
        assert!(matches!(
            err,
            NetError::FrameTooLarge {
                len: 0xFFFF_FFFF,
                ..
            }
        ));
        assert_eq!(err.reason(), "frame_too_large");
        assert!(src.capacity() < 1024);
    }

    #[test]
    fn eof_mid_frame() {
        let mut codec = FrameCodec::new();
        let wire = encode(b"abcdef");
        for cut in 1..wire.len() {
            let mut src = BytesMut::from(&wire[..cut]);
            let mut codec2 = FrameCodec::new();
            assert!(codec2.decode(&mut src).unwrap().is_none());
            assert!(matches!(
                codec2.decode_eof(&mut src),
                Err(NetError::UnexpectedEof)
            ));
        }
        let mut empty = BytesMut::new();
        assert!(codec.decode_eof(&mut empty).unwrap().is_none());
    }

    #[tokio::test]
    async fn over_a_stream() {
        let (a, b) = tokio::io::duplex(1024);
        let mut w = FramedWrite::new(a, FrameCodec::new());
        let mut r = FramedRead::new(b, FrameCodec::new());
        let writer = tokio::spawn(async move {
            for i in 0..50u32 {
                w.send(Bytes::from(vec![i as u8; (i as usize) * 300]))
                    .await
                    .unwrap();
            }
            w.get_mut().shutdown().await.unwrap();
        });
        for i in 0..50u32 {
            let f = r.next().await.unwrap().unwrap();
            assert_eq!(f.len(), i as usize * 300);
            assert!(f.iter().all(|&x| x == i as u8));
        }
        assert!(r.next().await.is_none());
        writer.await.unwrap();
    }

    proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096),
                                split in 0usize..4096) {
            let mut codec = FrameCodec::new();
            let split = split.min(data.len());
            let mut src = BytesMut::from(&data[..split]);
            let mut total = 0usize;
            let mut fed_rest = false;
            loop {
                match codec.decode(&mut src) {
                    Ok(Some(f)) => { prop_assert!(f.len() <= MAX_FRAME); total += f.len(); }
                    Ok(None) if !fed_rest => { src.extend_from_slice(&data[split..]); fed_rest = true; }
                    Ok(None) => { let _ = codec.decode_eof(&mut src); break; }
                    Err(_) => break,
                }
            }
            prop_assert!(total <= data.len());
        }
    }
}
