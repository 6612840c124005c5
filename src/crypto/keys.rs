//! The node's two long-term secrets: an Ed25519 signing key (identity) and an X25519 static key
//! (Noise). Their `Debug` never shows key bytes.

use ed25519_dalek::SigningKey;
use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} key has {len} bytes, expected 32")]
    BadLength { what: &'static str, len: usize },
}

/// The node's secret keys.
pub struct NodeKeys {
    signing: SigningKey,
    noise: StaticSecret,
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKeys")
            .field("signing_public", &hex::encode(self.signing_public()))
            .field("noise_public", &hex::encode(self.noise_public()))
            .finish_non_exhaustive()
    }
}

fn exact32(what: &'static str, bytes: &[u8]) -> Result<[u8; 32], KeyError> {
    bytes.try_into().map_err(|_| KeyError::BadLength {
        what,
        len: bytes.len(),
    })
}

impl NodeKeys {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let signing = SigningKey::generate(rng);
        let noise = StaticSecret::random_from_rng(rng);
        NodeKeys { signing, noise }
    }

    pub fn from_secret_bytes(signing: &[u8], noise: &[u8]) -> Result<Self, KeyError> {
        Ok(NodeKeys {
            signing: SigningKey::from_bytes(&exact32("signing", signing)?),
            noise: StaticSecret::from(exact32("noise", noise)?),
        })
    }

    pub fn signing_secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn noise_secret_bytes(&self) -> [u8; 32] {
        self.noise.to_bytes()
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn signing_public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn noise_public(&self) -> [u8; 32] {
        PublicKey::from(&self.noise).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_redacted_debug() {
        let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
        let again =
            NodeKeys::from_secret_bytes(&keys.signing_secret_bytes(), &keys.noise_secret_bytes())
                .expect("valid key bytes");
        assert_eq!(keys.signing_public(), again.signing_public());
        assert_eq!(keys.noise_public(), again.noise_public());
        let debug = format!("{keys:?}");
        assert!(!debug.contains(&hex::encode(keys.signing_secret_bytes())));
        assert!(!debug.contains(&hex::encode(keys.noise_secret_bytes())));
        assert!(NodeKeys::from_secret_bytes(&[0; 31], &[0; 32]).is_err());
    }
}
