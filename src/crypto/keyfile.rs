//! The recovery key file (`bitdust export-key`, `bitdust recover`): everything a new machine needs
//! to become this node again — the signing key, the Noise key, the backup master secret and the
//! signed identity — in one versioned, checksummed, ASCII-armoured file, protected by a passphrase
//! when one is given. Pure: bytes in, bytes out (the CLI reads and writes the files).
//!
//! Binary layout, version 1 (integers big-endian):
//!
//! ```text
//! magic "BDRECKEY" | version u8 = 1 | protection u8
//!   protection 1 (passphrase): m_kib u32 | t u32 | p u32 | salt [16] | nonce [24]
//! payload_len u32 | payload | checksum [32] = BLAKE3(everything before it)
//! plaintext payload: signing secret [32] | noise secret [32] | master secret [32] | identity bytes
//! ```
//!
//! With a passphrase the payload is XChaCha20-Poly1305 under an Argon2id key from the passphrase,
//! with everything before the payload (the Argon2 parameters included) as associated data, so
//! nobody can weaken the parameters unnoticed. The parameters are stored, so a later version can
//! raise them and still open old files. The checksum is not security (the AEAD is); it tells a
//! damaged file apart from a wrong passphrase, and protects an unprotected file from bit rot.

use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::RngCore as _;

use super::derive::MasterSecret;
use super::identity::{Identity, MAX_IDENTITY_BYTES};
use super::keys::NodeKeys;

const MAGIC: &[u8; 8] = b"BDRECKEY";
pub const FORMAT_VERSION: u8 = 1;
const PROTECTION_NONE: u8 = 0;
const PROTECTION_PASSPHRASE: u8 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const CHECKSUM_LEN: usize = 32;
const SECRETS_LEN: usize = 3 * 32;
const BEGIN: &str = "-----BEGIN BITDUST RECOVERY KEY-----";
const END: &str = "-----END BITDUST RECOVERY KEY-----";
/// Base64 characters per armour line (as PEM).
const LINE: usize = 64;
/// Upper bounds on stored Argon2 parameters: a hostile or corrupt file must not make `open` take
/// all the memory or hours of CPU. Far above anything we write.
const MAX_M_KIB: u32 = 1024 * 1024;
const MAX_T: u32 = 64;
const MAX_P: u32 = 64;

/// Argon2id cost parameters, stored in each protected file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes over the memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

/// What `seal` uses: 64 MiB, 3 passes, 1 lane — about a quarter of a second on a 2-core home
/// server, and 64 MiB per guess for an attacker (OWASP's Argon2id guidance is 19 MiB / t = 2 at
/// the least).
pub const DEFAULT_KDF: KdfParams = KdfParams {
    m_kib: 64 * 1024,
    t: 3,
    p: 1,
};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("not a bitdust recovery key file")]
    NotAKeyFile,
    #[error("the key file is damaged ({0})")]
    Damaged(&'static str),
    #[error(
        "the key file has format version {0}; this bitdust reads version {FORMAT_VERSION} (was it written by a newer bitdust?)"
    )]
    UnsupportedVersion(u8),
    #[error("the key file is protected by a passphrase and none was given")]
    PassphraseNeeded,
    #[error("wrong passphrase for this key file")]
    WrongPassphrase,
    #[error("the key file's contents do not belong together ({0})")]
    Inconsistent(&'static str),
    #[error("an empty passphrase protects nothing; give none instead")]
    EmptyPassphrase,
    #[error("stretching the passphrase failed: {0}")]
    Kdf(argon2::Error),
}

/// The node's secrets and identity as carried by a key file. `Debug` shows the node id only.
pub struct RecoverySecrets {
    keys: NodeKeys,
    master: MasterSecret,
    identity: Identity,
}

impl std::fmt::Debug for RecoverySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoverySecrets")
            .field("node_id", &self.identity.node_id())
            .finish_non_exhaustive()
    }
}

impl RecoverySecrets {
    /// Refuses keys that are not the identity's: a key file that restores a node nobody knows
    /// would be discovered only on the new machine, too late.
    pub fn new(
        keys: NodeKeys,
        master: MasterSecret,
        identity: Identity,
    ) -> Result<Self, KeyFileError> {
        if identity.signing_key() != &keys.signing_public() {
            return Err(KeyFileError::Inconsistent(
                "the signing key is not the identity's",
            ));
        }
        if identity.noise_key() != &keys.noise_public() {
            return Err(KeyFileError::Inconsistent(
                "the Noise key is not the identity's",
            ));
        }
        Ok(RecoverySecrets {
            keys,
            master,
            identity,
        })
    }

    pub fn keys(&self) -> &NodeKeys {
        &self.keys
    }

    pub fn master(&self) -> &MasterSecret {
        &self.master
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// Writes the key file (ASCII armour); with a passphrase, protected by it.
pub fn seal(secrets: &RecoverySecrets, passphrase: Option<&str>) -> Result<Vec<u8>, KeyFileError> {
    seal_with(secrets, passphrase, DEFAULT_KDF)
}

/// [`seal`] with chosen Argon2 parameters (tests use cheap ones).
pub fn seal_with(
    secrets: &RecoverySecrets,
    passphrase: Option<&str>,
    kdf: KdfParams,
) -> Result<Vec<u8>, KeyFileError> {
    // The plaintext of every secret: wiped when this function returns.
    let mut payload = zeroize::Zeroizing::new(Vec::with_capacity(SECRETS_LEN + MAX_IDENTITY_BYTES));
    payload.extend_from_slice(&zeroize::Zeroizing::new(secrets.keys.signing_secret_bytes())[..]);
    payload.extend_from_slice(&zeroize::Zeroizing::new(secrets.keys.noise_secret_bytes())[..]);
    payload.extend_from_slice(&zeroize::Zeroizing::new(secrets.master.to_bytes())[..]);
    payload.extend_from_slice(&secrets.identity.to_bytes());
    let binary = seal_payload(&payload, passphrase, kdf)?;
    Ok(armour(&binary, secrets, passphrase.is_some()))
}

fn seal_payload(
    payload: &[u8],
    passphrase: Option<&str>,
    kdf: KdfParams,
) -> Result<Vec<u8>, KeyFileError> {
    let mut out = Vec::with_capacity(128 + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    match passphrase {
        None => {
            out.push(PROTECTION_NONE);
            push_len(&mut out, payload.len());
            out.extend_from_slice(payload);
        }
        Some("") => return Err(KeyFileError::EmptyPassphrase),
        Some(passphrase) => {
            let mut salt = [0u8; SALT_LEN];
            let mut nonce = [0u8; NONCE_LEN];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            out.push(PROTECTION_PASSPHRASE);
            for v in [kdf.m_kib, kdf.t, kdf.p] {
                out.extend_from_slice(&v.to_be_bytes());
            }
            out.extend_from_slice(&salt);
            out.extend_from_slice(&nonce);
            push_len(&mut out, payload.len() + TAG_LEN);
            let cipher = stretch(passphrase, &salt, kdf)?;
            let sealed = cipher
                .encrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: payload,
                        aad: &out,
                    },
                )
                // Encryption fails only for messages of gigabytes; ours is a few kB.
                .map_err(|_| KeyFileError::Damaged("payload too large to encrypt"))?;
            out.extend_from_slice(&sealed);
        }
    }
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    Ok(out)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    // The payload is a few kB (bounded by MAX_IDENTITY_BYTES), far below u32::MAX.
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

fn stretch(
    passphrase: &str,
    salt: &[u8],
    kdf: KdfParams,
) -> Result<XChaCha20Poly1305, KeyFileError> {
    let params = Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32)).map_err(KeyFileError::Kdf)?;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut key[..])
        .map_err(KeyFileError::Kdf)?;
    Ok(XChaCha20Poly1305::new(&(*key).into()))
}

/// A note for the human who finds the file, then the binary in base64 between BEGIN/END lines.
/// Everything before BEGIN is ignored when opening.
fn armour(binary: &[u8], secrets: &RecoverySecrets, protected: bool) -> Vec<u8> {
    let mut text = format!(
        "bitdust recovery key of node {} ({}).\n{}\nRecover with: bitdust recover --home DIR --key FILE --peer FRIEND_CARD\n",
        secrets.identity.node_id(),
        secrets.identity.name(),
        if protected {
            "Protected by a passphrase: the file and the passphrase together restore every backup."
        } else {
            "NOT PROTECTED: whoever reads this file can read every backup and act as this node."
        }
    );
    text.push_str(BEGIN);
    text.push('\n');
    let encoded = STANDARD.encode(binary);
    for line in encoded.as_bytes().chunks(LINE) {
        // Base64 output is ASCII, so any split is valid UTF-8.
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(END);
    text.push('\n');
    text.into_bytes()
}

/// Reads a key file written by [`seal`] (armoured, or the bare binary); `passphrase` is needed
/// only for a protected one and ignored otherwise.
pub fn open(bytes: &[u8], passphrase: Option<&str>) -> Result<RecoverySecrets, KeyFileError> {
    let binary = unarmour(bytes)?;
    let plain = zeroize::Zeroizing::new(parse(&binary, passphrase)?);
    decode_secrets(&plain)
}

fn unarmour(bytes: &[u8]) -> Result<Vec<u8>, KeyFileError> {
    if bytes.starts_with(MAGIC) {
        return Ok(bytes.to_vec());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| KeyFileError::NotAKeyFile)?;
    let Some(start) = text.find(BEGIN) else {
        return Err(KeyFileError::NotAKeyFile);
    };
    let body = &text[start + BEGIN.len()..];
    let Some(end) = body.find(END) else {
        return Err(KeyFileError::Damaged("truncated: no END line"));
    };
    let encoded: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD
        .decode(encoded)
        .map_err(|_| KeyFileError::Damaged("bad base64"))
}

/// A cursor that reports running out of bytes as truncation.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyFileError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(KeyFileError::Damaged("truncated"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, KeyFileError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, KeyFileError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
}

/// Checks the envelope and returns the plaintext payload.
fn parse(binary: &[u8], passphrase: Option<&str>) -> Result<Vec<u8>, KeyFileError> {
    let mut r = Reader {
        bytes: binary,
        pos: 0,
    };
    if r.take(MAGIC.len()).map_err(|_| KeyFileError::NotAKeyFile)? != MAGIC {
        return Err(KeyFileError::NotAKeyFile);
    }
    // The version first: a newer format may lay out even its checksum differently.
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(KeyFileError::UnsupportedVersion(version));
    }
    let protection = r.u8()?;
    let kdf = match protection {
        PROTECTION_NONE => None,
        PROTECTION_PASSPHRASE => {
            let kdf = KdfParams {
                m_kib: r.u32()?,
                t: r.u32()?,
                p: r.u32()?,
            };
            let salt = r.take(SALT_LEN)?;
            let nonce = r.take(NONCE_LEN)?;
            Some((kdf, salt, nonce))
        }
        _ => return Err(KeyFileError::Damaged("unknown protection")),
    };
    let len = r.u32()? as usize;
    let header_end = r.pos;
    let payload = r.take(len)?;
    let body_end = r.pos;
    let checksum = r.take(CHECKSUM_LEN)?;
    if r.pos != binary.len() {
        return Err(KeyFileError::Damaged("trailing bytes"));
    }
    if blake3::hash(&binary[..body_end]).as_bytes() != checksum {
        return Err(KeyFileError::Damaged("checksum mismatch"));
    }
    let plain = match kdf {
        None => payload.to_vec(),
        Some((kdf, salt, nonce)) => {
            if kdf.m_kib > MAX_M_KIB || kdf.t > MAX_T || kdf.p > MAX_P {
                return Err(KeyFileError::Damaged("implausible Argon2 parameters"));
            }
            let passphrase = passphrase.ok_or(KeyFileError::PassphraseNeeded)?;
            let cipher = stretch(passphrase, salt, kdf)?;
            // The checksum matched, so the bytes are as written: a failure here is the passphrase
            // (or a deliberate forgery, which the AEAD exists to catch).
            cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: payload,
                        aad: &binary[..header_end],
                    },
                )
                .map_err(|_| KeyFileError::WrongPassphrase)?
        }
    };
    Ok(plain)
}

fn decode_secrets(plain: &[u8]) -> Result<RecoverySecrets, KeyFileError> {
    if plain.len() < SECRETS_LEN {
        return Err(KeyFileError::Damaged("payload too short"));
    }
    let (secrets, identity) = plain.split_at(SECRETS_LEN);
    let keys = NodeKeys::from_secret_bytes(&secrets[..32], &secrets[32..64])
        .map_err(|_| KeyFileError::Damaged("bad key length"))?;
    let mut master = [0u8; 32];
    master.copy_from_slice(&secrets[64..96]);
    let identity = Identity::from_bytes(identity)
        .map_err(|_| KeyFileError::Inconsistent("the identity does not verify"))?;
    RecoverySecrets::new(keys, MasterSecret::from_bytes(master), identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters so the unit tests stay fast; the format stores them either way.
    const TEST_KDF: KdfParams = KdfParams {
        m_kib: 256,
        t: 1,
        p: 1,
    };

    fn secrets() -> RecoverySecrets {
        let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
        let identity = Identity::create(&keys, "alice", vec!["tcp://127.0.0.1:7771".into()], 3, 1)
            .expect("identity");
        RecoverySecrets::new(keys, MasterSecret::from_bytes(rand::random()), identity)
            .expect("consistent")
    }

    fn secret_parts(s: &RecoverySecrets) -> [[u8; 32]; 3] {
        [
            s.keys().signing_secret_bytes(),
            s.keys().noise_secret_bytes(),
            s.master().to_bytes(),
        ]
    }

    fn assert_same(a: &RecoverySecrets, b: &RecoverySecrets) {
        assert_eq!(secret_parts(a), secret_parts(b));
        assert_eq!(a.identity(), b.identity());
        assert_eq!(a.identity().to_bytes(), b.identity().to_bytes());
    }

    fn binary_of(file: &[u8]) -> Vec<u8> {
        unarmour(file).expect("armoured")
    }

    fn armour_binary(binary: &[u8]) -> Vec<u8> {
        format!("{BEGIN}\n{}\n{END}\n", STANDARD.encode(binary)).into_bytes()
    }

    /// Rewrites the checksum after an edit, so the test reaches the check behind it.
    fn fix_checksum(binary: &mut [u8]) {
        let body = binary.len() - CHECKSUM_LEN;
        let sum = blake3::hash(&binary[..body]);
        binary[body..].copy_from_slice(sum.as_bytes());
    }

    #[test]
    fn round_trip_protected_and_unprotected() {
        let s = secrets();
        let file = seal_with(&s, Some("correct horse"), TEST_KDF).expect("seal");
        let text = String::from_utf8(file.clone()).expect("armour is text");
        assert!(text.contains(BEGIN) && text.contains(END));
        assert!(text.lines().all(|l| l.len() <= 120));
        assert_same(&s, &open(&file, Some("correct horse")).expect("open"));

        let plain = seal(&s, None).expect("seal");
        assert!(String::from_utf8_lossy(&plain).contains("NOT PROTECTED"));
        assert_same(&s, &open(&plain, None).expect("open"));
        // A passphrase given for an unprotected file does no harm.
        assert_same(&s, &open(&plain, Some("x")).expect("open"));
        // The bare binary is accepted too.
        assert_same(&s, &open(&binary_of(&plain), None).expect("open binary"));
    }

    #[test]
    fn default_parameters_are_stored_and_used() {
        let s = secrets();
        let file = seal(&s, Some("pw")).expect("seal");
        let binary = binary_of(&file);
        let at = MAGIC.len() + 2;
        let m = u32::from_be_bytes(binary[at..at + 4].try_into().expect("4"));
        let t = u32::from_be_bytes(binary[at + 4..at + 8].try_into().expect("4"));
        assert_eq!((m, t), (DEFAULT_KDF.m_kib, DEFAULT_KDF.t));
        assert_same(&s, &open(&file, Some("pw")).expect("open"));
    }

    #[test]
    fn protected_file_holds_no_secret_in_the_clear() {
        let s = secrets();
        let file = seal_with(&s, Some("pw"), TEST_KDF).expect("seal");
        let binary = binary_of(&file);
        let unprotected = binary_of(&seal(&s, None).expect("seal"));
        for secret in secret_parts(&s) {
            // Any 8-byte window of a secret, in the binary or in its text renderings.
            for window in secret.windows(8) {
                let found = |hay: &[u8]| hay.windows(8).any(|w| w == window);
                assert!(!found(&binary), "secret bytes in the protected file");
                // The check can fail: the unprotected file does hold them.
                assert!(found(&unprotected));
            }
            let text = String::from_utf8_lossy(&file);
            assert!(!text.contains(&hex::encode(secret)));
            assert!(!text.contains(&STANDARD.encode(secret)));
        }
    }

    #[test]
    fn wrong_or_missing_passphrase() {
        let s = secrets();
        let file = seal_with(&s, Some("right"), TEST_KDF).expect("seal");
        assert!(matches!(
            open(&file, Some("wrong")),
            Err(KeyFileError::WrongPassphrase)
        ));
        assert!(matches!(
            open(&file, None),
            Err(KeyFileError::PassphraseNeeded)
        ));
        assert!(matches!(
            seal_with(&s, Some(""), TEST_KDF),
            Err(KeyFileError::EmptyPassphrase)
        ));
    }

    #[test]
    fn not_a_key_file() {
        for bytes in [
            &b""[..],
            b"hello",
            b"BDRECKE",
            b"-----BEGIN PGP MESSAGE-----\n",
        ] {
            assert!(
                matches!(open(bytes, None), Err(KeyFileError::NotAKeyFile)),
                "{bytes:?}"
            );
        }
        // Valid armour around something else.
        assert!(matches!(
            open(&armour_binary(b"not ours at all"), None),
            Err(KeyFileError::NotAKeyFile)
        ));
    }

    #[test]
    fn damage_is_detected_and_not_called_a_wrong_passphrase() {
        let s = secrets();
        let file = seal_with(&s, Some("pw"), TEST_KDF).expect("seal");
        let binary = binary_of(&file);
        // Every single flipped byte after the version byte: damaged, never "wrong passphrase".
        for i in MAGIC.len() + 1..binary.len() {
            let mut bad = binary.clone();
            bad[i] ^= 0x20;
            let got = open(&armour_binary(&bad), Some("pw"));
            assert!(
                matches!(got, Err(KeyFileError::Damaged(_))),
                "byte {i}: {got:?}"
            );
        }
        // Truncated: the binary at every length, and the armour without its END line.
        for len in MAGIC.len() + 1..binary.len() {
            let got = open(&binary[..len], Some("pw"));
            assert!(
                matches!(got, Err(KeyFileError::Damaged(_))),
                "len {len}: {got:?}"
            );
        }
        let cut = &file[..file.len() - 20];
        assert!(matches!(
            open(cut, Some("pw")),
            Err(KeyFileError::Damaged(_))
        ));
        // A character outside base64 inside the armour.
        let text = String::from_utf8(file.clone()).expect("text");
        let at = text.find(BEGIN).expect("begin") + BEGIN.len() + 5;
        let mut broken = text.into_bytes();
        broken[at] = b'*';
        assert!(matches!(
            open(&broken, Some("pw")),
            Err(KeyFileError::Damaged("bad base64"))
        ));
        // Trailing bytes after the checksum.
        let mut long = binary.clone();
        long.push(0);
        assert!(matches!(
            open(&long, Some("pw")),
            Err(KeyFileError::Damaged(_))
        ));
    }

    #[test]
    fn unsupported_version() {
        let s = secrets();
        let mut binary = binary_of(&seal(&s, None).expect("seal"));
        binary[MAGIC.len()] = 2;
        fix_checksum(&mut binary);
        assert!(matches!(
            open(&binary, None),
            Err(KeyFileError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn parameters_a_file_claims_are_bounded() {
        let s = secrets();
        let mut binary = binary_of(&seal_with(&s, Some("pw"), TEST_KDF).expect("seal"));
        let at = MAGIC.len() + 2;
        binary[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        fix_checksum(&mut binary);
        assert!(matches!(
            open(&binary, Some("pw")),
            Err(KeyFileError::Damaged("implausible Argon2 parameters"))
        ));
    }

    #[test]
    fn weakened_parameters_fail_authentication() {
        // The header is associated data: lowering t in a file (checksum recomputed, as an
        // attacker would) must not open it.
        let s = secrets();
        let kdf = KdfParams { t: 2, ..TEST_KDF };
        let mut binary = binary_of(&seal_with(&s, Some("pw"), kdf).expect("seal"));
        let at = MAGIC.len() + 2 + 4;
        binary[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
        fix_checksum(&mut binary);
        assert!(matches!(
            open(&binary, Some("pw")),
            Err(KeyFileError::WrongPassphrase)
        ));
    }

    #[test]
    fn keys_that_do_not_match_the_identity_are_refused() {
        let s = secrets();
        let other = NodeKeys::generate(&mut rand::rngs::OsRng);
        assert!(matches!(
            RecoverySecrets::new(
                NodeKeys::generate(&mut rand::rngs::OsRng),
                MasterSecret::from_bytes([1; 32]),
                s.identity().clone()
            ),
            Err(KeyFileError::Inconsistent(_))
        ));
        // A file written with another node's signing key, and one with another Noise key.
        for (signing, noise) in [
            (other.signing_secret_bytes(), s.keys().noise_secret_bytes()),
            (s.keys().signing_secret_bytes(), other.noise_secret_bytes()),
        ] {
            let mut payload = Vec::new();
            payload.extend_from_slice(&signing);
            payload.extend_from_slice(&noise);
            payload.extend_from_slice(&[9; 32]);
            payload.extend_from_slice(&s.identity().to_bytes());
            let binary = seal_payload(&payload, Some("pw"), TEST_KDF).expect("seal");
            assert!(matches!(
                open(&binary, Some("pw")),
                Err(KeyFileError::Inconsistent(_))
            ));
        }
        // An identity whose signature does not verify.
        let mut payload = Vec::new();
        for part in secret_parts(&s) {
            payload.extend_from_slice(&part);
        }
        let mut identity = s.identity().to_bytes();
        let last = identity.len() - 1;
        identity[last] ^= 1;
        payload.extend_from_slice(&identity);
        let binary = seal_payload(&payload, None, TEST_KDF).expect("seal");
        assert!(matches!(
            open(&binary, None),
            Err(KeyFileError::Inconsistent(_))
        ));
    }

    #[test]
    fn debug_shows_no_secret() {
        let s = secrets();
        let debug = format!("{s:?}");
        assert!(debug.contains(&s.identity().node_id().to_string()));
        for secret in secret_parts(&s) {
            assert!(!debug.contains(&hex::encode(secret)));
            assert!(!debug.contains(&format!("{secret:?}")));
        }
    }
}
