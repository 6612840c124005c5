//! The signed identity document and the one-line contact card made from it.
//!
//! The signature covers every field of the body, both public keys included (the original
//! BitDust left its key out). Verification checks the exact bytes received, never a re-encoding.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use prost::Message as _;

use super::keys::NodeKeys;
use crate::proto::{IdentityBody, SignedIdentity};

/// Domain separation for identity signatures.
const SIGNING_CONTEXT: &[u8] = b"bitdust.v1.identity\0";
/// Prefix of a contact card; the version digit changes with the card format.
pub const CARD_PREFIX: &str = "bitdust1:";
pub const IDENTITY_FORMAT: u32 = 1;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_CONTACTS: usize = 8;
/// Cards are pasted by hand and sent in handshakes: keep them small.
pub const MAX_IDENTITY_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("contact card must start with `{CARD_PREFIX}`")]
    NotACard,
    #[error("contact card is not valid base64url (truncated or mangled?)")]
    BadEncoding,
    #[error("identity is {0} bytes, more than the {MAX_IDENTITY_BYTES} allowed")]
    TooLarge(usize),
    #[error("identity does not decode: {0}")]
    Malformed(String),
    #[error("identity format {0} is not supported (this node reads format {IDENTITY_FORMAT})")]
    UnsupportedFormat(u32),
    #[error("identity signature is invalid: the card was altered or signed by another key")]
    BadSignature,
    #[error("invalid name: {0}")]
    BadName(String),
    #[error("invalid contact address `{0}`: expected tcp://HOST:PORT")]
    BadContact(String),
}

/// A node id: derived from the Ed25519 public key, shown as 32 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 16]);

impl NodeId {
    pub fn from_signing_key(public: &[u8; 32]) -> Self {
        let hash = blake3::derive_key("bitdust.v1 node id", public);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash[..16]);
        NodeId(id)
    }

    /// The id whose bytes these are (as `as_bytes` returns them, e.g. read back from a key).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        NodeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn parse(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(NodeId(bytes.try_into().ok()?))
    }

    /// The first 8 hex characters, for compact displays.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

/// Exactly 16 bytes, else an error (a stored key or record of the wrong length).
impl TryFrom<&[u8]> for NodeId {
    type Error = std::array::TryFromSliceError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        Ok(NodeId(bytes.try_into()?))
    }
}

/// A node id given by a user that is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a node id (32 hex characters)")]
pub struct BadNodeId(pub String);

impl std::str::FromStr for NodeId {
    type Err = BadNodeId;

    fn from_str(text: &str) -> Result<Self, BadNodeId> {
        NodeId::parse(text).ok_or_else(|| BadNodeId(text.to_string()))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Checks a contact address: `tcp://HOST:PORT` with a non-zero port.
pub fn validate_contact(contact: &str) -> Result<(), IdentityError> {
    let bad = || IdentityError::BadContact(contact.to_string());
    let rest = contact.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok(())
}

pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(IdentityError::BadName(format!(
            "must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(IdentityError::BadName(
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// A verified identity: the decoded body together with the exact signed bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    body: IdentityBody,
    signed: SignedIdentity,
    node_id: NodeId,
    signing_key: [u8; 32],
    noise_key: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("name", &self.body.name)
            .field("revision", &self.body.revision)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Builds and signs a new identity document.
    pub fn create(
        keys: &NodeKeys,
        name: &str,
        contacts: Vec<String>,
        revision: u64,
        timestamp: u64,
    ) -> Result<Self, IdentityError> {
        validate_name(name)?;
        if contacts.len() > MAX_CONTACTS {
            return Err(IdentityError::BadContact(format!(
                "more than {MAX_CONTACTS} contacts"
            )));
        }
        for c in &contacts {
            validate_contact(c)?;
        }
        let body = IdentityBody {
            format: IDENTITY_FORMAT,
            signing_key: keys.signing_public().to_vec(),
            noise_key: keys.noise_public().to_vec(),
            name: name.to_string(),
            contacts,
            revision,
            timestamp,
        };
        let body_bytes = body.encode_to_vec();
        let signature = keys.signing_key().sign(&signed_message(&body_bytes));
        let signed = SignedIdentity {
            body: body_bytes,
            signature: signature.to_bytes().to_vec(),
        };
        Self::verify(signed)
    }

    /// The same identity with new contacts: revision + 1, re-signed.
    pub fn with_contacts(
        &self,
        keys: &NodeKeys,
        contacts: Vec<String>,
        timestamp: u64,
    ) -> Result<Self, IdentityError> {
        Self::create(
            keys,
            &self.body.name,
            contacts,
            self.body.revision + 1,
            timestamp,
        )
    }

    /// Verifies a signed identity: size, format, keys and signature over the exact body bytes.
    pub fn verify(signed: SignedIdentity) -> Result<Self, IdentityError> {
        let size = signed.body.len() + signed.signature.len();
        if size > MAX_IDENTITY_BYTES {
            return Err(IdentityError::TooLarge(size));
        }
        let body = IdentityBody::decode(signed.body.as_slice())
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        if body.format != IDENTITY_FORMAT {
            return Err(IdentityError::UnsupportedFormat(body.format));
        }
        let signing_key: [u8; 32] = body
            .signing_key
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::Malformed("signing key is not 32 bytes".into()))?;
        let noise_key: [u8; 32] = body
            .noise_key
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::Malformed("noise key is not 32 bytes".into()))?;
        let verifying =
            VerifyingKey::from_bytes(&signing_key).map_err(|_| IdentityError::BadSignature)?;
        let signature =
            Signature::from_slice(&signed.signature).map_err(|_| IdentityError::BadSignature)?;
        verifying
            .verify_strict(&signed_message(&signed.body), &signature)
            .map_err(|_| IdentityError::BadSignature)?;
        validate_name(&body.name)?;
        if body.contacts.len() > MAX_CONTACTS {
            return Err(IdentityError::BadContact(format!(
                "more than {MAX_CONTACTS} contacts"
            )));
        }
        for c in &body.contacts {
            validate_contact(c)?;
        }
        Ok(Identity {
            node_id: NodeId::from_signing_key(&signing_key),
            body,
            signed,
            signing_key,
            noise_key,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() > MAX_IDENTITY_BYTES + 16 {
            return Err(IdentityError::TooLarge(bytes.len()));
        }
        let signed =
            SignedIdentity::decode(bytes).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        Self::verify(signed)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.signed.encode_to_vec()
    }

    /// Parses and verifies a one-line contact card (surrounding whitespace is ignored).
    pub fn from_card(card: &str) -> Result<Self, IdentityError> {
        let encoded = card
            .trim()
            .strip_prefix(CARD_PREFIX)
            .ok_or(IdentityError::NotACard)?;
        if encoded.len() > MAX_IDENTITY_BYTES * 2 {
            return Err(IdentityError::TooLarge(encoded.len()));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| IdentityError::BadEncoding)?;
        Self::from_bytes(&bytes)
    }

    /// The contact card: one line a friend pastes into `bitdust peer add`.
    pub fn card(&self) -> String {
        format!("{CARD_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }

    pub fn signed(&self) -> &SignedIdentity {
        &self.signed
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn name(&self) -> &str {
        &self.body.name
    }

    pub fn contacts(&self) -> &[String] {
        &self.body.contacts
    }

    pub fn revision(&self) -> u64 {
        self.body.revision
    }

    pub fn timestamp(&self) -> u64 {
        self.body.timestamp
    }

    pub fn signing_key(&self) -> &[u8; 32] {
        &self.signing_key
    }

    /// The X25519 key a Noise session with this node must present.
    pub fn noise_key(&self) -> &[u8; 32] {
        &self.noise_key
    }

    /// Whether `newer` may replace this identity: same signing key, higher revision.
    pub fn is_superseded_by(&self, newer: &Identity) -> bool {
        newer.signing_key == self.signing_key && newer.revision() > self.revision()
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn sample() -> (NodeKeys, Identity) {
        let keys = NodeKeys::generate(&mut OsRng);
        let id = Identity::create(
            &keys,
            "alice",
            vec!["tcp://127.0.0.1:7771".into()],
            1,
            1_700_000_000,
        )
        .expect("valid identity");
        (keys, id)
    }

    #[test]
    fn card_roundtrip() {
        let (keys, id) = sample();
        let card = id.card();
        assert!(!card.contains(char::is_whitespace));
        let back = Identity::from_card(&format!("  {card}\n")).expect("card parses");
        assert_eq!(back, id);
        assert_eq!(
            back.node_id(),
            NodeId::from_signing_key(&keys.signing_public())
        );
        assert_eq!(back.noise_key(), &keys.noise_public());
        assert_eq!(NodeId::parse(&id.node_id().to_string()), Some(id.node_id()));
    }

    #[test]
    fn node_id_from_its_bytes() {
        let id = NodeId::from_signing_key(&[7; 32]);
        assert_eq!(NodeId::from_bytes(*id.as_bytes()), id);
        assert_eq!(NodeId::try_from(id.as_bytes().as_slice()).ok(), Some(id));
        assert!(NodeId::try_from(&id.as_bytes()[..15]).is_err());
        assert!(NodeId::try_from([0u8; 17].as_slice()).is_err());
    }

    #[test]
    fn tampered_body_is_rejected() {
        let (_, id) = sample();
        let mut signed = id.signed().clone();
        // Change the name inside the encoded body: the bytes differ, the signature no longer fits.
        let pos = signed
            .body
            .windows(5)
            .position(|w| w == b"alice")
            .expect("name in body");
        signed.body[pos] = b'm';
        assert_eq!(Identity::verify(signed), Err(IdentityError::BadSignature));
    }

    #[test]
    fn swapped_noise_key_is_rejected() {
        // The noise key is covered by the signature: substituting another is detected.
        let (keys, id) = sample();
        let other = NodeKeys::generate(&mut OsRng);
        let mut body = IdentityBody::decode(id.signed().body.as_slice()).expect("decodes");
        body.noise_key = other.noise_public().to_vec();
        let signed = SignedIdentity {
            body: body.encode_to_vec(),
            signature: id.signed().signature.clone(),
        };
        assert_eq!(Identity::verify(signed), Err(IdentityError::BadSignature));
        // Re-signing with another signing key makes a different node, not a forged one.
        let forged = Identity::create(&other, "alice", vec![], 5, 1).expect("valid");
        assert_ne!(forged.node_id(), id.node_id());
        assert!(!id.is_superseded_by(&forged));
        drop(keys);
    }

    #[test]
    fn truncated_and_garbage_cards_are_rejected() {
        let (_, id) = sample();
        let card = id.card();
        for cut in [
            card.len() - 1,
            card.len() - 10,
            CARD_PREFIX.len() + 3,
            CARD_PREFIX.len(),
        ] {
            assert!(
                Identity::from_card(&card[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
        assert_eq!(Identity::from_card("hello"), Err(IdentityError::NotACard));
        assert_eq!(
            Identity::from_card("bitdust1:!!!"),
            Err(IdentityError::BadEncoding)
        );
    }

    #[test]
    fn wrong_signature_is_rejected() {
        let (_, id) = sample();
        let mut signed = id.signed().clone();
        signed.signature[0] ^= 1;
        assert_eq!(
            Identity::verify(signed.clone()),
            Err(IdentityError::BadSignature)
        );
        signed.signature.truncate(10);
        assert_eq!(Identity::verify(signed), Err(IdentityError::BadSignature));
    }

    #[test]
    fn contact_change_bumps_revision_and_resigns() {
        let (keys, id) = sample();
        let newer = id
            .with_contacts(&keys, vec!["tcp://198.51.100.4:7771".into()], 1_700_000_100)
            .expect("valid");
        assert_eq!(newer.revision(), id.revision() + 1);
        assert_eq!(newer.node_id(), id.node_id());
        assert_ne!(newer.signed().signature, id.signed().signature);
        assert!(id.is_superseded_by(&newer));
        assert!(!newer.is_superseded_by(&id));
        assert!(Identity::from_card(&newer.card()).is_ok());
    }

    #[test]
    fn bad_fields_are_rejected() {
        let keys = NodeKeys::generate(&mut OsRng);
        assert!(Identity::create(&keys, "", vec![], 1, 0).is_err());
        assert!(Identity::create(&keys, "a", vec!["udp://x:1".into()], 1, 0).is_err());
        assert!(Identity::create(&keys, "a", vec!["tcp://x:0".into()], 1, 0).is_err());
        assert!(Identity::create(&keys, "a", vec!["tcp://[::1]:7".into()], 1, 0).is_ok());
    }
}
