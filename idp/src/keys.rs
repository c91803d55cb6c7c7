//! Owns the signing keys: RSA-2048 keys with a `kid` in `IDP_KEYS_DIR` (one
//! PKCS#8 PEM and one metadata JSON `{"kid","created","retired_at"}` each),
//! made on first start, rotated on command; which key signs (the newest
//! active one); which keys the JWKS publishes (every key until all tokens it
//! signed have expired: `retired_at + token TTL + leeway`), and removing the
//! files of keys past that. Also the uid secret kept beside them.
//!
//! The directory is the source of truth: `idp rotate-keys` run as another
//! process changes it, and a running service picks the change up on its
//! next [`KeyRing::reload`] (every few seconds).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

/// RSA modulus size of new keys.
pub const RSA_BITS: usize = 2048;
/// File name of the generated uid secret inside the keys directory.
pub const UID_SECRET_FILE: &str = "uid-secret";
/// Most key files read from the directory (a directory that holds more is refused).
pub const MAX_KEYS: usize = 64;

/// Why keys could not be loaded, made or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keys directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key metadata {path}: {problem}")]
    BadMetadata { path: PathBuf, problem: String },
    #[error("private key {path}: {problem}")]
    BadKey { path: PathBuf, problem: String },
    #[error("generating an RSA key: {0}")]
    Generate(String),
    #[error("the keys directory holds more than {MAX_KEYS} keys: remove retired ones")]
    TooMany,
    #[error("no active signing key (every key is retired): run `idp rotate-keys`")]
    NoActiveKey,
    #[error("signing: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `<kid>.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    pub kid: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds when a newer key took over signing; `None` while it signs.
    pub retired_at: Option<u64>,
}

/// The claims of an issued device token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    pub aud: String,
}

struct LoadedKey {
    meta: KeyMeta,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: serde_json::Value,
}

/// The keys of one directory.
pub struct KeyRing {
    dir: PathBuf,
    /// A retired key is published for this long after its retirement.
    publish_after_retirement: Duration,
    keys: RwLock<BTreeMap<String, LoadedKey>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("dir", &self.dir)
            .field("kids", &self.kids())
            .finish()
    }
}

impl KeyRing {
    /// Opens `dir` (created, mode 0700), loads its keys, makes a first key
    /// when none is active, and removes keys past their publication.
    /// Blocking (key generation and file I/O): call it from start-up code
    /// or `spawn_blocking`.
    pub fn open(dir: &Path, token_ttl: Duration, leeway: Duration) -> Result<KeyRing, KeyError> {
        create_private_dir(dir)?;
        let ring = KeyRing {
            dir: dir.to_owned(),
            publish_after_retirement: token_ttl.saturating_add(leeway),
            keys: RwLock::new(BTreeMap::new()),
        };
        ring.reload(protocol::claims::now_secs())?;
        if ring.active_meta().is_none() {
            let meta = generate_key(dir, protocol::claims::now_secs())?;
            tracing::info!(kid = %meta.kid, "identity service: first signing key made");
            ring.reload(protocol::claims::now_secs())?;
        }
        Ok(ring)
    }

    /// Re-reads the directory: picks up keys and retirements written by
    /// another process, and deletes the files of keys past publication.
    pub fn reload(&self, now: u64) -> Result<(), KeyError> {
        let metas = read_metas(&self.dir)?;
        let mut fresh = BTreeMap::new();
        {
            let current = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            for meta in metas {
                if self.past_publication(&meta, now) {
                    remove_key_files(&self.dir, &meta.kid);
                    tracing::info!(kid = %meta.kid, "retired signing key removed: every token it signed has expired");
                    continue;
                }
                let loaded = match current.get(&meta.kid) {
                    // Already parsed: only the metadata may have changed.
                    Some(old) => LoadedKey {
                        meta: meta.clone(),
                        encoding: old.encoding.clone(),
                        decoding: old.decoding.clone(),
                        jwk: old.jwk.clone(),
                    },
                    None => load_key(&self.dir, meta.clone())?,
                };
                fresh.insert(meta.kid.clone(), loaded);
            }
        }
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// Makes a new key that signs from now on and retires the active ones
    /// (they stay published until their tokens have expired). Blocking.
    pub fn rotate(&self, now: u64) -> Result<String, KeyError> {
        self.reload(now)?;
        let new = generate_key(&self.dir, now)?;
        // Retired once the new key exists: generating it can take a while,
        // and the old key's publication is counted from here.
        let now = now.max(protocol::claims::now_secs());
        for meta in read_metas(&self.dir)? {
            if meta.kid != new.kid && meta.retired_at.is_none() {
                write_meta(
                    &self.dir,
                    &KeyMeta {
                        retired_at: Some(now),
                        ..meta
                    },
                )?;
            }
        }
        self.reload(now)?;
        tracing::info!(kid = %new.kid, "signing key rotated");
        Ok(new.kid)
    }

    fn past_publication(&self, meta: &KeyMeta, now: u64) -> bool {
        meta.retired_at.is_some_and(|retired| {
            retired.saturating_add(self.publish_after_retirement.as_secs()) < now
        })
    }

    /// The metadata of the key that signs: the newest active one.
    pub fn active_meta(&self) -> Option<KeyMeta> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.values()
            .filter(|k| k.meta.retired_at.is_none())
            .max_by_key(|k| (k.meta.created, k.meta.kid.clone()))
            .map(|k| k.meta.clone())
    }

    /// The metadata of every key loaded now, sorted by kid.
    pub fn metas(&self) -> Vec<KeyMeta> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.values().map(|k| k.meta.clone()).collect()
    }

    /// The kids loaded now, sorted.
    pub fn kids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.keys().cloned().collect()
    }

    /// Signs `claims` with the active key (RS256, its `kid` in the header).
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, KeyError> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let active = keys
            .values()
            .filter(|k| k.meta.retired_at.is_none())
            .max_by_key(|k| (k.meta.created, k.meta.kid.clone()))
            .ok_or(KeyError::NoActiveKey)?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(active.meta.kid.clone());
        jsonwebtoken::encode(&header, claims, &active.encoding).map_err(KeyError::Sign)
    }

    /// The JWK set of every key still published at `now`.
    pub fn jwks(&self, now: u64) -> serde_json::Value {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let published: Vec<_> = keys
            .values()
            .filter(|k| !self.past_publication(&k.meta, now))
            .map(|k| k.jwk.clone())
            .collect();
        serde_json::json!({ "keys": published })
    }

    /// The claims of a token this service issued, if its signature (by a key
    /// still published), `exp`, `iss` and `aud` are good.
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now: u64,
    ) -> Option<TokenClaims> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if header.alg != Algorithm::RS256 {
            return None;
        }
        let kid = header.kid?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = keys.get(&kid)?;
        if self.past_publication(&key.meta, now) {
            return None;
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 5;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<TokenClaims>(token, &key.decoding, &validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// The uid secret: the configured one, or the one kept in
/// `dir/uid-secret` (made, 32 random bytes in hex, on first use). It must
/// never change: every uid is derived from it.
pub fn uid_secret(dir: &Path, configured: Option<&str>) -> Result<Vec<u8>, KeyError> {
    if let Some(secret) = configured {
        return Ok(secret.as_bytes().to_vec());
    }
    create_private_dir(dir)?;
    let path = dir.join(UID_SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => {
            return Err(KeyError::BadKey {
                path,
                problem: "shorter than 32 characters: delete it to make a new one (every uid changes) or restore it".into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path)(e)),
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, hex.as_bytes())?;
    tracing::warn!(path = %path.display(), "IDP_UID_SECRET unset: made one and kept it beside the keys; back it up (every uid derives from it)");
    Ok(hex.into_bytes())
}

fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(dir))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (a temporary file renamed), readable
/// by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

fn meta_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}.json"))
}

fn pem_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}.key.pem"))
}

fn write_meta(dir: &Path, meta: &KeyMeta) -> Result<(), KeyError> {
    let path = meta_path(dir, &meta.kid);
    let json = serde_json::to_vec_pretty(meta).map_err(|e| KeyError::BadMetadata {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    write_private(&path, &json)
}

fn remove_key_files(dir: &Path, kid: &str) {
    for path in [pem_path(dir, kid), meta_path(dir, kid)] {
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a retired key file");
            }
        }
    }
}

/// A kid is `k` + the creation time + 8 random hex digits: sortable by age,
/// unique without coordination, and only `[a-z0-9-]`.
fn new_kid(now: u64) -> String {
    let mut bytes = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("k{now}-{hex}")
}

fn generate_key(dir: &Path, now: u64) -> Result<KeyMeta, KeyError> {
    let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, RSA_BITS)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let meta = KeyMeta {
        kid: new_kid(now),
        created: now,
        retired_at: None,
    };
    // The key first, then the metadata that makes it visible.
    write_private(&pem_path(dir, &meta.kid), pem.as_bytes())?;
    write_meta(dir, &meta)?;
    Ok(meta)
}

fn read_metas(dir: &Path) -> Result<Vec<KeyMeta>, KeyError> {
    let mut metas = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        if metas.len() >= MAX_KEYS {
            return Err(KeyError::TooMany);
        }
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        let meta: KeyMeta = serde_json::from_slice(&bytes).map_err(|e| KeyError::BadMetadata {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        if path.file_stem().and_then(|s| s.to_str()) != Some(meta.kid.as_str()) {
            return Err(KeyError::BadMetadata {
                path,
                problem: "the file name is not <kid>.json".into(),
            });
        }
        metas.push(meta);
    }
    Ok(metas)
}

fn load_key(dir: &Path, meta: KeyMeta) -> Result<LoadedKey, KeyError> {
    let path = pem_path(dir, &meta.kid);
    let pem = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let bad = |problem: String| KeyError::BadKey {
        path: path.clone(),
        problem,
    };
    let key = RsaPrivateKey::from_pkcs8_pem(&pem).map_err(|e| bad(e.to_string()))?;
    let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
    let decoding = DecodingKey::from_rsa_components(&n, &e).map_err(|e| bad(e.to_string()))?;
    let jwk = serde_json::json!({
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": meta.kid, "n": n, "e": e,
    });
    Ok(LoadedKey {
        meta,
        encoding,
        decoding,
        jwk,
    })
}

/// The private key PEM of `kid` (tests sign with a retired key through it).
pub fn private_key_pem(dir: &Path, kid: &str) -> Result<String, KeyError> {
    let path = pem_path(dir, kid);
    std::fs::read_to_string(&path).map_err(io_error(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(100);
    const LEEWAY: Duration = Duration::from_secs(10);

    fn claims(now: u64) -> TokenClaims {
        TokenClaims {
            sub: "abc".into(),
            iat: now,
            exp: now + 100,
            iss: "iss".into(),
            aud: "aud".into(),
        }
    }

    #[test]
    fn first_start_makes_a_key_and_a_restart_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::open(dir.path(), TTL, LEEWAY).unwrap();
        let kid = ring.active_meta().unwrap().kid;
        let again = KeyRing::open(dir.path(), TTL, LEEWAY).unwrap();
        assert_eq!(again.active_meta().unwrap().kid, kid);
        assert_eq!(again.kids(), vec![kid.clone()]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(pem_path(dir.path(), &kid))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
        }
    }

    #[test]
    fn rotation_signs_with_the_new_key_and_publishes_the_old_until_its_tokens_expired() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::open(dir.path(), TTL, LEEWAY).unwrap();
        let now = protocol::claims::now_secs();
        let old = ring.active_meta().unwrap().kid;
        let old_token = ring.sign(&claims(now)).unwrap();
        let new = ring.rotate(now).unwrap();
        assert_ne!(old, new);
        let new_token = ring.sign(&claims(now)).unwrap();
        let header = jsonwebtoken::decode_header(&new_token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(new.as_str()));
        assert_eq!(header.alg, Algorithm::RS256);

        let kids_at = |t: u64| -> Vec<String> {
            ring.jwks(t)["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_owned())
                .collect()
        };
        let retired = ring
            .metas()
            .iter()
            .find(|m| m.kid == old)
            .and_then(|m| m.retired_at)
            .unwrap();
        assert!(retired >= now);
        // Both published while a token of the old key may still be valid.
        assert_eq!(kids_at(retired + 110).len(), 2);
        assert!(ring.verify(&old_token, "iss", "aud", now).is_some());
        // Past retired_at + TTL + leeway: only the new one.
        assert_eq!(kids_at(retired + 111), vec![new.clone()]);
        ring.reload(retired + 111).unwrap();
        assert_eq!(ring.kids(), vec![new.clone()]);
        assert!(!meta_path(dir.path(), &old).exists());
        assert!(!pem_path(dir.path(), &old).exists());
        assert!(ring.verify(&new_token, "iss", "aud", now).is_some());
        assert!(ring.verify(&new_token, "other", "aud", now).is_none());
    }

    #[test]
    fn another_process_rotating_is_picked_up_by_reload() {
        let dir = tempfile::tempdir().unwrap();
        let serving = KeyRing::open(dir.path(), TTL, LEEWAY).unwrap();
        let cli = KeyRing::open(dir.path(), TTL, LEEWAY).unwrap();
        let now = protocol::claims::now_secs();
        let new = cli.rotate(now).unwrap();
        assert_ne!(serving.active_meta().unwrap().kid, new);
        serving.reload(now).unwrap();
        assert_eq!(serving.active_meta().unwrap().kid, new);
        assert_eq!(serving.kids().len(), 2);
    }

    #[test]
    fn the_uid_secret_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = uid_secret(dir.path(), None).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(uid_secret(dir.path(), None).unwrap(), a);
        assert_eq!(
            uid_secret(dir.path(), Some("configured")).unwrap(),
            b"configured"
        );
    }
}
