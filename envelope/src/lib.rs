//! Owns the crypto envelopes of the sync and publish protocols: parsing a
//! device's RSA public key, RSA-OAEP-SHA256 key transport, RSA-PSS-SHA256
//! signatures, AES-256-GCM sealing with the uid as associated data, and the
//! server's persisted RSA key pair. The device side of each step is here too,
//! for tests and example clients.
//!
//! Parameters (fixed by the wire contract in handlers/README.md, "The built-in handlers"):
//! - RSA keys of 2048 to 4096 bits, given as base64 SubjectPublicKeyInfo DER or
//!   PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`).
//! - OAEP with SHA-256 as both the hash and the MGF1 hash, empty label.
//! - PSS with SHA-256, MGF1-SHA-256, salt length 32.
//! - AES-256-GCM, 12-byte nonces, 16-byte tag appended to the ciphertext,
//!   associated data = the uid's bytes.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::pss::{BlindedSigningKey, Signature, VerifyingKey};
use rsa::signature::{RandomizedSigner, SignatureEncoding, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;
use std::path::{Path, PathBuf};

pub use rsa;

/// Smallest RSA modulus accepted from a device, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted from a device, in bits.
pub const MAX_RSA_BITS: usize = 4096;
/// Bits of the server's own RSA key.
pub const SERVER_RSA_BITS: usize = 2048;
/// Length of an AES-256 key in bytes.
pub const AES_KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce in bytes.
pub const NONCE_LEN: usize = 12;

/// An AES-256 key. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct AesKey(pub [u8; AES_KEY_LEN]);

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey(***)")
    }
}

impl AesKey {
    /// A fresh random key from the OS generator.
    pub fn generate() -> Self {
        let mut key = [0u8; AES_KEY_LEN];
        OsRng.fill_bytes(&mut key);
        AesKey(key)
    }

    /// A key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let key: [u8; AES_KEY_LEN] = bytes.try_into().map_err(|_| EnvelopeError::KeyLength)?;
        Ok(AesKey(key))
    }
}

/// Why an envelope operation failed. Messages are safe to send to a device:
/// they never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not valid base64")]
    Base64,
    #[error("not an RSA public key (expected base64 SubjectPublicKeyInfo DER or PEM)")]
    PublicKey,
    #[error("RSA key of {0} bits is not allowed (must be {MIN_RSA_BITS} to {MAX_RSA_BITS} bits)")]
    KeySize(usize),
    #[error("RSA encryption failed")]
    Encrypt,
    #[error("RSA decryption failed")]
    Decrypt,
    #[error("signature does not verify")]
    BadSignature,
    #[error("signing failed")]
    Sign,
    #[error("AES key must be {AES_KEY_LEN} bytes")]
    KeyLength,
    #[error("nonce must be {NONCE_LEN} bytes")]
    NonceLength,
    #[error("decryption failed (wrong key, tampered ciphertext or wrong user)")]
    Open,
    #[error("encryption failed")]
    Seal,
    #[error("server key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
}

/// Decodes standard base64 (surrounding whitespace ignored).
pub fn b64_decode(text: &str) -> Result<Vec<u8>, EnvelopeError> {
    B64.decode(text.trim()).map_err(|_| EnvelopeError::Base64)
}

/// Encodes standard base64.
pub fn b64_encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Parses a device's RSA public key: PEM (`PUBLIC KEY` SPKI or `RSA PUBLIC
/// KEY` PKCS#1) or base64 DER (SPKI, or PKCS#1 as a fallback), and refuses
/// keys outside 2048..=4096 bits.
pub fn parse_public_key(text: &str) -> Result<RsaPublicKey, EnvelopeError> {
    let text = text.trim();
    let key = if text.starts_with("-----BEGIN") {
        RsaPublicKey::from_public_key_pem(text)
            .or_else(|_| RsaPublicKey::from_pkcs1_pem(text))
            .map_err(|_| EnvelopeError::PublicKey)?
    } else {
        let der = b64_decode(text)?;
        RsaPublicKey::from_public_key_der(&der)
            .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
            .map_err(|_| EnvelopeError::PublicKey)?
    };
    let bits = key.n().bits();
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(EnvelopeError::KeySize(bits));
    }
    Ok(key)
}

/// The public key as base64 SubjectPublicKeyInfo DER.
pub fn public_key_to_b64(key: &RsaPublicKey) -> Result<String, EnvelopeError> {
    let der = key
        .to_public_key_der()
        .map_err(|_| EnvelopeError::PublicKey)?;
    Ok(b64_encode(der.as_bytes()))
}

/// RSA-OAEP-SHA256 encryption of `data` (at most `bytes - 66` bytes long).
pub fn oaep_encrypt(key: &RsaPublicKey, data: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    key.encrypt(&mut OsRng, Oaep::new::<Sha256>(), data)
        .map_err(|_| EnvelopeError::Encrypt)
}

/// RSA-OAEP-SHA256 decryption (the device side of sync).
pub fn oaep_decrypt(key: &RsaPrivateKey, ciphertext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    key.decrypt(Oaep::new::<Sha256>(), ciphertext)
        .map_err(|_| EnvelopeError::Decrypt)
}

/// RSA-PSS-SHA256 signature over `message` (blinded, random salt).
pub fn pss_sign(key: &RsaPrivateKey, message: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let signer = BlindedSigningKey::<Sha256>::new(key.clone());
    let signature = signer
        .try_sign_with_rng(&mut OsRng, message)
        .map_err(|_| EnvelopeError::Sign)?;
    Ok(signature.to_vec())
}

/// Verifies an RSA-PSS-SHA256 signature.
pub fn pss_verify(
    key: &RsaPublicKey,
    message: &[u8],
    signature: &[u8],
) -> Result<(), EnvelopeError> {
    let signature = Signature::try_from(signature).map_err(|_| EnvelopeError::BadSignature)?;
    VerifyingKey::<Sha256>::new(key.clone())
        .verify(message, &signature)
        .map_err(|_| EnvelopeError::BadSignature)
}

/// A fresh random 12-byte nonce.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

/// AES-256-GCM encryption; returns the ciphertext with its tag appended.
pub fn aes_seal(
    key: &AesKey,
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if nonce.len() != NONCE_LEN {
        return Err(EnvelopeError::NonceLength);
    }
    Aes256Gcm::new((&key.0).into())
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| EnvelopeError::Seal)
}

/// AES-256-GCM decryption of a ciphertext with its tag appended.
pub fn aes_open(
    key: &AesKey,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if nonce.len() != NONCE_LEN {
        return Err(EnvelopeError::NonceLength);
    }
    Aes256Gcm::new((&key.0).into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| EnvelopeError::Open)
}

/// The server's RSA key pair: signs sync replies. Generated once and kept in
/// a PKCS#8 PEM file (mode 0600) so devices can pin the public key.
#[derive(Clone)]
pub struct ServerKey {
    private: RsaPrivateKey,
    public_b64: String,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey")
            .field("public", &self.public_b64)
            .finish_non_exhaustive()
    }
}

impl ServerKey {
    /// Wraps a private key.
    pub fn from_private(private: RsaPrivateKey) -> Result<Self, EnvelopeError> {
        let public_b64 = public_key_to_b64(&private.to_public_key())?;
        Ok(ServerKey {
            private,
            public_b64,
        })
    }

    /// A freshly generated key pair of [`SERVER_RSA_BITS`] bits.
    pub fn generate() -> Result<Self, EnvelopeError> {
        let private =
            RsaPrivateKey::new(&mut OsRng, SERVER_RSA_BITS).map_err(|_| EnvelopeError::Sign)?;
        Self::from_private(private)
    }

    /// Loads the key from `path`, or generates one and writes it there
    /// (creating parent directories) if the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, EnvelopeError> {
        let fail = |reason: String| EnvelopeError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let private = RsaPrivateKey::from_pkcs8_pem(&pem).map_err(|_| {
                    fail("not a PKCS#8 PEM RSA private key; delete it to generate a new one".into())
                })?;
                Self::from_private(private)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                let pem = key
                    .private
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|_| fail("cannot encode the key".into()))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
                }
                write_private_file(path, pem.as_bytes()).map_err(|e| fail(e.to_string()))?;
                Ok(key)
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The public key as base64 SubjectPublicKeyInfo DER.
    pub fn public_b64(&self) -> &str {
        &self.public_b64
    }

    /// The public key.
    pub fn public_key(&self) -> RsaPublicKey {
        self.private.to_public_key()
    }

    /// RSA-PSS-SHA256 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        pss_sign(&self.private, message)
    }
}

/// Writes `bytes` to a new file readable only by its owner, atomically (a
/// temporary file renamed into place), so a crash never leaves half a key.
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The device side of the protocols: what a mobile app does with its own RSA
/// key pair and the shared AES key. Used by tests and example clients.
pub mod device {
    use super::*;

    /// Decrypts the `encrypted_key` of a sync reply after checking the
    /// server's signature over the encrypted bytes.
    pub fn open_sync_reply(
        device_key: &RsaPrivateKey,
        server_public_key_b64: &str,
        encrypted_key_b64: &str,
        signature_b64: &str,
    ) -> Result<AesKey, EnvelopeError> {
        let server_key = parse_public_key(server_public_key_b64)?;
        let encrypted = b64_decode(encrypted_key_b64)?;
        pss_verify(&server_key, &encrypted, &b64_decode(signature_b64)?)?;
        AesKey::from_slice(&oaep_decrypt(device_key, &encrypted)?)
    }

    /// Encrypts `message` for `uid`; returns base64 `(nonce, ciphertext)` as
    /// the `publish` command carries them.
    pub fn seal_message(
        key: &AesKey,
        uid: &str,
        message: &str,
    ) -> Result<(String, String), EnvelopeError> {
        let nonce = random_nonce();
        let ciphertext = aes_seal(key, &nonce, uid.as_bytes(), message.as_bytes())?;
        Ok((b64_encode(&nonce), b64_encode(&ciphertext)))
    }

    /// The device's public key as base64 SPKI DER, for the `sync` command.
    pub fn public_key_b64(device_key: &RsaPrivateKey) -> Result<String, EnvelopeError> {
        public_key_to_b64(&device_key.to_public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn device_key() -> &'static RsaPrivateKey {
        static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
    }

    #[test]
    fn parses_spki_der_pem_and_pkcs1() {
        let public = device_key().to_public_key();
        let b64 = public_key_to_b64(&public).unwrap();
        assert_eq!(parse_public_key(&b64).unwrap(), public);
        assert_eq!(parse_public_key(&format!("  {b64}\n")).unwrap(), public);
        let pem = public.to_public_key_pem(LineEnding::LF).unwrap();
        assert_eq!(parse_public_key(&pem).unwrap(), public);
        use rsa::pkcs1::EncodeRsaPublicKey;
        let pkcs1 = public.to_pkcs1_pem(LineEnding::LF).unwrap();
        assert_eq!(parse_public_key(&pkcs1).unwrap(), public);
    }

    #[test]
    fn refuses_garbage_and_small_keys() {
        assert!(matches!(
            parse_public_key("%%%"),
            Err(EnvelopeError::Base64)
        ));
        assert!(matches!(
            parse_public_key("aGVsbG8="),
            Err(EnvelopeError::PublicKey)
        ));
        let small = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
        let b64 = public_key_to_b64(&small.to_public_key()).unwrap();
        assert!(matches!(
            parse_public_key(&b64),
            Err(EnvelopeError::KeySize(1024))
        ));
    }

    #[test]
    fn oaep_and_pss_round_trip() {
        let key = device_key();
        let ct = oaep_encrypt(&key.to_public_key(), b"secret bytes").unwrap();
        assert_eq!(oaep_decrypt(key, &ct).unwrap(), b"secret bytes");
        let sig = pss_sign(key, &ct).unwrap();
        pss_verify(&key.to_public_key(), &ct, &sig).unwrap();
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(pss_verify(&key.to_public_key(), &bad, &sig).is_err());
        assert!(pss_verify(&key.to_public_key(), &ct, b"short").is_err());
    }

    #[test]
    fn aes_gcm_binds_the_uid() {
        let key = AesKey::generate();
        let nonce = random_nonce();
        let ct = aes_seal(&key, &nonce, b"68946", b"hello").unwrap();
        assert_eq!(aes_open(&key, &nonce, b"68946", &ct).unwrap(), b"hello");
        assert!(matches!(
            aes_open(&key, &nonce, b"23412", &ct),
            Err(EnvelopeError::Open)
        ));
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert!(aes_open(&key, &nonce, b"68946", &tampered).is_err());
        assert!(matches!(
            aes_open(&key, &nonce[..8], b"68946", &ct),
            Err(EnvelopeError::NonceLength)
        ));
        assert!(format!("{key:?}").contains("***"));
    }

    #[test]
    fn full_sync_then_publish_as_the_device() {
        let server = ServerKey::generate().unwrap();
        let device = device_key();
        let device_pub = parse_public_key(&device::public_key_b64(device).unwrap()).unwrap();
        let shared = AesKey::generate();
        let encrypted = oaep_encrypt(&device_pub, &shared.0).unwrap();
        let signature = server.sign(&encrypted).unwrap();
        let opened = device::open_sync_reply(
            device,
            server.public_b64(),
            &b64_encode(&encrypted),
            &b64_encode(&signature),
        )
        .unwrap();
        assert_eq!(opened, shared);
        let (nonce, ct) = device::seal_message(&opened, "68946", "hi there").unwrap();
        let plain = aes_open(
            &shared,
            &b64_decode(&nonce).unwrap(),
            b"68946",
            &b64_decode(&ct).unwrap(),
        )
        .unwrap();
        assert_eq!(plain, b"hi there");
        // A signature by another key is refused.
        let other = ServerKey::generate().unwrap();
        assert!(device::open_sync_reply(
            device,
            other.public_b64(),
            &b64_encode(&encrypted),
            &b64_encode(&signature),
        )
        .is_err());
    }

    #[test]
    fn server_key_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("server_key.pem");
        let first = ServerKey::load_or_generate(&path).unwrap();
        let second = ServerKey::load_or_generate(&path).unwrap();
        assert_eq!(first.public_b64(), second.public_b64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "junk").unwrap();
        assert!(matches!(
            ServerKey::load_or_generate(&path),
            Err(EnvelopeError::KeyFile { .. })
        ));
    }
}
