//! The protocol envelope on the wire: encoding, decoding with version and shape checks, and
//! typed errors whose `reason` names a counter in `status`.

use prost::Message as _;

use crate::proto::{Envelope, PROTOCOL_VERSION, envelope::Body};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("message does not decode as an envelope: {0}")]
    Malformed(String),
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u32),
    #[error("envelope has no body")]
    MissingBody,
    #[error("envelope has request id 0")]
    ZeroRequestId,
}

impl EnvelopeError {
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Malformed(_)
            | EnvelopeError::MissingBody
            | EnvelopeError::ZeroRequestId => "malformed",
            EnvelopeError::UnsupportedVersion(_) => "unsupported_version",
        }
    }
}

/// Builds an envelope of this protocol version.
pub fn envelope(request_id: u64, reply_to: u64, body: Body) -> Envelope {
    Envelope {
        version: PROTOCOL_VERSION,
        request_id,
        reply_to,
        body: Some(body),
    }
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    envelope.encode_to_vec()
}

/// Decodes and checks an envelope; never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    let envelope = Envelope::decode(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if envelope.version != PROTOCOL_VERSION {
        return Err(EnvelopeError::UnsupportedVersion(envelope.version));
    }
    if envelope.request_id == 0 {
        return Err(EnvelopeError::ZeroRequestId);
    }
    if envelope.body.is_none() {
        return Err(EnvelopeError::MissingBody);
    }
    Ok(envelope)
}

/// The body's name, for logs (never its contents).
pub fn body_name(body: &Body) -> &'static str {
    match body {
        Body::Identity(_) => "identity",
        Body::Ping(_) => "ping",
        Body::Pong(_) => "pong",
        Body::ServiceRequest(_) => "service_request",
        Body::ServiceAccept(_) => "service_accept",
        Body::ServiceRefuse(_) => "service_refuse",
        Body::ServiceCancel(_) => "service_cancel",
        Body::StoreFragment(_) => "store_fragment",
        Body::RetrieveFragment(_) => "retrieve_fragment",
        Body::FragmentData(_) => "fragment_data",
        Body::ListFragments(_) => "list_fragments",
        Body::FragmentList(_) => "fragment_list",
        Body::DeleteFragment(_) => "delete_fragment",
        Body::AuditChallenge(_) => "audit_challenge",
        Body::AuditProof(_) => "audit_proof",
        Body::SliceChallenge(_) => "slice_challenge",
        Body::FragmentSlice(_) => "fragment_slice",
        Body::Ack(_) => "ack",
        Body::Fail(_) => "fail",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Ping, Pong};
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_checks() {
        let e = envelope(7, 0, Body::Ping(Ping { nonce: 42 }));
        assert_eq!(decode(&encode(&e)), Ok(e));
        let mut old = envelope(7, 0, Body::Pong(Pong { nonce: 1 }));
        old.version = 2;
        assert_eq!(
            decode(&encode(&old)),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        let mut zero = envelope(1, 0, Body::Ping(Ping { nonce: 1 }));
        zero.request_id = 0;
        assert_eq!(decode(&encode(&zero)), Err(EnvelopeError::ZeroRequestId));
        let mut empty = envelope(1, 0, Body::Ping(Ping { nonce: 1 }));
        empty.body = None;
        assert_eq!(decode(&encode(&empty)), Err(EnvelopeError::MissingBody));
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff]),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn valid_envelopes_roundtrip(id in 1u64.., reply in any::<u64>(), nonce in any::<u64>()) {
            let e = envelope(id, reply, Body::Ping(Ping { nonce }));
            prop_assert_eq!(decode(&encode(&e)), Ok(e));
        }
    }
}
