//! Owns users' platform tokens and account deletion: the `tokens` handler.
//!
//! - `store_token {"platform", "token": {...}}` seals the token (a JSON
//!   object of at most [`MAX_TOKEN_BYTES`]) and stores it, replacing an older
//!   one; reply `{"status": 200, "platform"}` on `<uid>_store_token`.
//! - `list_tokens {}`: `{"status": 200, "platforms": [...]}` on
//!   `<uid>_list_tokens` (names only, never the tokens).
//! - `revoke_token {"platform"}`: deletes it; `{"status": 200, "platform"}`
//!   on `<uid>_revoke_token`, 404 when there was none.
//! - `delete_account {}`: first records the user's revocation
//!   (`IssuedBefore(now + 1)`, see `broker::revocation`; from then on every
//!   command of the user's current tokens is refused, `401 token revoked`,
//!   and so are their wills), then deletes the user's sync key, platform
//!   tokens, contacts, contact requests and registration, answers
//!   `{"status": 200}` on `<uid>_delete_account`, and announces the
//!   revocation [`REVOKE_AFTER_REPLY`] later, which ends their live sessions.
//!   A revocation that cannot be recorded deletes nothing (503).
//!
//! Platform names must be configured (`PLATFORMS`). Tokens are sealed with
//! AES-256-GCM under the master key (`TOKENS_MASTER_KEY`), a random 96-bit
//! nonce per seal, and `uid NUL platform` as associated data, so a sealed
//! token copied to another user or platform does not open. The sealed form
//! is `0x01 | key id (4 bytes) | nonce (12) | ciphertext and tag`; the key id
//! (the first 4 bytes of SHA-256 over a label and the key) tells which
//! master key sealed it, so [`rotate_master_key`] re-seals only old ones and
//! `TOKENS_MASTER_KEY_PREVIOUS` still opens them meanwhile.

use crate::Shared;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine as _;
use protocol::UserId;
use rand::RngCore;
use sdk::{Command, HandlerError, Reply, Worker};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use store::{PlatformTokens, Revocation, Revocations, StoreError};

/// Largest token accepted, as compact JSON bytes: OAuth tokens with a
/// refresh token and scopes fit many times over.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// File in `DATA_DIR` holding the generated master key when
/// `TOKENS_MASTER_KEY` is unset (embedded store only).
pub const DEV_MASTER_KEY_FILE: &str = "tokens_master_key";

/// Version byte of the sealed form.
const SEALED_VERSION: u8 = 1;
/// Bytes of the key id.
const KEY_ID_LEN: usize = 4;
/// Bytes of the AES-GCM nonce.
const NONCE_LEN: usize = 12;
/// Bytes before the ciphertext.
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

/// How long `delete_account` waits after answering before it announces the
/// user's revocation (recorded before anything was deleted): the
/// announcement ends the session at once, and the answer must reach the
/// device first. The broker's periodic revocation poll ends the sessions
/// if the announcement is lost.
pub const REVOKE_AFTER_REPLY: Duration = Duration::from_millis(300);

/// Why a master key or a sealed token is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a master key must be 32 bytes, as 64 hex characters or base64 (make one with `openssl rand -hex 32`)")]
    BadKey,
    #[error("the sealed token is malformed")]
    Malformed,
    #[error("the sealed token was sealed under an unknown master key")]
    UnknownKey,
    #[error("the sealed token does not open (wrong key, user or platform, or tampered)")]
    Open,
    #[error("sealing failed")]
    Seal,
    #[error("master key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
}

/// One AES-256 master key and its id.
#[derive(Clone)]
pub struct MasterKey {
    id: [u8; KEY_ID_LEN],
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The id is derived from the key but reveals nothing useful; the key never prints.
        write!(f, "MasterKey(id {})", hex(&self.id))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    text.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some((hex_digit(*hi)? << 4) | hex_digit(*lo)?),
            _ => None,
        })
        .collect()
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

impl MasterKey {
    /// A key from its 32 bytes.
    pub fn from_array(bytes: [u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"mqgate tokens master key id\0")
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        for (slot, byte) in id.iter_mut().zip(digest.iter()) {
            *slot = *byte;
        }
        MasterKey {
            id,
            cipher: Aes256Gcm::new(&bytes.into()),
        }
    }

    /// A key from a slice that must be 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let array: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadKey)?;
        Ok(Self::from_array(array))
    }

    /// Parses 64 hex characters or base64 (standard or URL-safe, padded or
    /// not) of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let text = text.trim();
        let bytes = if text.len() == 64 { unhex(text) } else { None }
            .or_else(|| {
                let engines = [
                    &base64::engine::general_purpose::STANDARD,
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ];
                engines.iter().find_map(|e| e.decode(text).ok())
            })
            .ok_or(SealError::BadKey)?;
        Self::from_bytes(&bytes)
    }

    /// A fresh random key and its hex form (for the development key file).
    pub fn generate() -> (Self, String) {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        (Self::from_array(bytes), hex(&bytes))
    }

    /// The key id written into every token it seals.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    /// Reads the key in `path`, or makes one there (mode 0600) when the file
    /// does not exist. An unreadable or invalid file is an error, never
    /// replaced: the tokens sealed under it would be lost.
    pub fn load_or_generate(path: &Path) -> Result<Self, SealError> {
        let file_error = |reason: String| SealError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| file_error(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| file_error(e.to_string()))?;
                }
                let (key, text) = Self::generate();
                write_private(path, &format!("{text}\n")).map_err(|e| file_error(e.to_string()))?;
                tracing::warn!(
                    path = %path.display(),
                    "TOKENS_MASTER_KEY is unset: generated a development master key for platform tokens; set TOKENS_MASTER_KEY in production"
                );
                Ok(key)
            }
            Err(e) => Err(file_error(e.to_string())),
        }
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, contents)
    }
}

/// The current master key, and the previous one while a rotation runs.
#[derive(Clone, Debug)]
pub struct MasterKeys {
    /// Seals every new token; opens tokens sealed under it.
    pub current: MasterKey,
    /// Only opens tokens sealed before the rotation.
    pub previous: Option<MasterKey>,
}

/// The associated data binding a sealed token to its user and platform.
fn associated_data(uid: &UserId, platform: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(uid.as_str().len() + 1 + platform.len());
    aad.extend_from_slice(uid.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(platform.as_bytes());
    aad
}

/// The key id a sealed token names.
pub fn sealed_key_id(sealed: &[u8]) -> Option<[u8; KEY_ID_LEN]> {
    if sealed.first() != Some(&SEALED_VERSION) {
        return None;
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(sealed.get(1..1 + KEY_ID_LEN)?);
    Some(id)
}

impl MasterKeys {
    /// Seals `plaintext` for `uid` and `platform` under the current key.
    pub fn seal(
        &self,
        uid: &UserId,
        platform: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(uid, platform);
        let ciphertext = self
            .current
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Seal)?;
        let mut sealed = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&self.current.id);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// Opens a token sealed for `uid` and `platform` under the current or
    /// the previous key.
    pub fn open(&self, uid: &UserId, platform: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let id = sealed_key_id(sealed).ok_or(SealError::Malformed)?;
        let key = if id == self.current.id {
            &self.current
        } else {
            self.previous
                .as_ref()
                .filter(|k| k.id == id)
                .ok_or(SealError::UnknownKey)?
        };
        let nonce = sealed
            .get(1 + KEY_ID_LEN..HEADER_LEN)
            .ok_or(SealError::Malformed)?;
        let ciphertext = sealed.get(HEADER_LEN..).ok_or(SealError::Malformed)?;
        let aad = associated_data(uid, platform);
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Open)
    }

    /// Whether `sealed` is under the current key already.
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed_key_id(sealed) == Some(self.current.id)
    }
}

/// The `store_token` command.
#[derive(Debug, Deserialize)]
pub struct StoreToken {
    /// A configured platform name.
    pub platform: String,
    /// The platform token: any JSON object (e.g. `{"access_token": ...}`).
    pub token: Value,
}

/// The `revoke_token` command.
#[derive(Debug, Deserialize)]
pub struct RevokeToken {
    pub platform: String,
}

/// Commands without fields (`list_tokens`, `delete_account`). Unknown
/// fields such as `request_id` are ignored.
#[derive(Debug, Deserialize)]
pub struct NoFields {}

/// The worker serving `store_token`, `list_tokens`, `revoke_token` and
/// `delete_account`.
pub fn worker(shared: Arc<Shared>) -> Worker {
    let (a, b, c, d) = (shared.clone(), shared.clone(), shared.clone(), shared);
    Worker::new("tokens")
        .on("store_token", move |cmd: Command<StoreToken>| {
            let shared = Arc::clone(&a);
            async move { store_token(&shared, cmd).await }
        })
        .on("list_tokens", move |cmd: Command<NoFields>| {
            let shared = Arc::clone(&b);
            async move { list_tokens(&shared, cmd).await }
        })
        .on("revoke_token", move |cmd: Command<RevokeToken>| {
            let shared = Arc::clone(&c);
            async move { revoke_token(&shared, cmd).await }
        })
        .on("delete_account", move |cmd: Command<NoFields>| {
            let shared = Arc::clone(&d);
            async move { delete_account(&shared, cmd).await }
        })
}

/// The configured platform called `name`, or a 404 (the name shown cut to 64 characters).
fn configured_platform<'a>(shared: &'a Shared, name: &str) -> Result<&'a str, HandlerError> {
    shared
        .settings
        .platform(name)
        .map(|p| p.name.as_str())
        .ok_or_else(|| {
            let shown: String = name.chars().take(64).collect();
            HandlerError::not_found(format!("unknown platform {shown:?}"))
        })
}

/// Handles `store_token`.
pub async fn store_token(shared: &Shared, cmd: Command<StoreToken>) -> Result<Reply, HandlerError> {
    let platform = configured_platform(shared, &cmd.body.platform)?;
    let Value::Object(token) = &cmd.body.token else {
        return Err(HandlerError::bad_request("token must be a JSON object"));
    };
    if token.is_empty() {
        return Err(HandlerError::bad_request("token must not be empty"));
    }
    let plaintext = serde_json::to_vec(token)
        .map_err(|_| HandlerError::bad_request("token cannot be encoded"))?;
    if plaintext.len() > MAX_TOKEN_BYTES {
        return Err(HandlerError::new(
            413,
            format!("token is larger than {MAX_TOKEN_BYTES} bytes"),
        ));
    }
    let sealed = shared
        .master_keys()?
        .seal(&cmd.user_id, platform, &plaintext)
        .map_err(|e| {
            tracing::error!(error = %e, "sealing a platform token failed");
            HandlerError::internal("crypto failure")
        })?;
    // A device's command is written only while its token is not revoked,
    // checked atomically with the write: the SDK's check ran before the
    // handler, and an account deletion may have been recorded since.
    let stored = match cmd.token_iat {
        Some(iat) => {
            shared
                .store
                .put_platform_token_unless_revoked(
                    store::SealedToken {
                        uid: &cmd.user_id,
                        platform,
                        sealed: &sealed,
                    },
                    iat,
                )
                .await?
        }
        None => {
            shared
                .store
                .put_platform_token(&cmd.user_id, platform, &sealed)
                .await?;
            true
        }
    };
    if !stored {
        tracing::info!(uid = %cmd.user_id, %platform, "platform token not stored: the token was revoked meanwhile");
        return Err(HandlerError::new(401, "token revoked"));
    }
    tracing::info!(uid = %cmd.user_id, %platform, "platform token stored");
    Ok(Reply::json(
        "store_token",
        json!({"status": 200, "platform": platform}),
    ))
}

/// Handles `list_tokens`.
pub async fn list_tokens(shared: &Shared, cmd: Command<NoFields>) -> Result<Reply, HandlerError> {
    let platforms = shared.store.platforms_with_tokens(&cmd.user_id).await?;
    Ok(Reply::json(
        "list_tokens",
        json!({"status": 200, "platforms": platforms}),
    ))
}

/// Handles `revoke_token`.
pub async fn revoke_token(
    shared: &Shared,
    cmd: Command<RevokeToken>,
) -> Result<Reply, HandlerError> {
    // Not only configured names: a platform removed from PLATFORMS may
    // still hold a token, and its user must be able to revoke it.
    let platform = cmd.body.platform.as_str();
    if !store::valid_platform_name(platform) {
        return Err(HandlerError::bad_request(
            "platform must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    if !shared
        .store
        .delete_platform_token(&cmd.user_id, platform)
        .await?
    {
        return Err(match shared.settings.platform(platform) {
            Some(_) => HandlerError::not_found(format!("no stored token for platform {platform}")),
            None => HandlerError::not_found(format!("unknown platform {platform:?}")),
        });
    }
    tracing::info!(uid = %cmd.user_id, %platform, "platform token revoked");
    Ok(Reply::json(
        "revoke_token",
        json!({"status": 200, "platform": platform}),
    ))
}

/// Attempts at recording a deletion's revocation before `delete_account`
/// gives up (503, nothing deleted): about 0.7 s of retries, so a blip in
/// the store does not fail the command, and the device is not kept waiting.
const RECORD_ATTEMPTS: u32 = 4;

/// Runs the store operation `op` for `uid` until it succeeds or `attempts`
/// have failed, pausing `first_pause` after the first failure and twice as
/// long after each next one (at most 5 s); the error of the last attempt.
/// `what` names the operation in the log.
async fn with_retries<T, Op, Fut>(
    uid: &UserId,
    what: &str,
    attempts: u32,
    first_pause: Duration,
    mut op: Op,
) -> Result<T, StoreError>
where
    Op: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pause = first_pause;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) if attempt >= attempts => return Err(error),
            Err(error) => {
                tracing::warn!(%uid, attempt, %error, "{what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

/// Records `revocation` for `uid` without announcing it, retrying a store
/// outage briefly ([`RECORD_ATTEMPTS`]); the error of the last attempt.
pub async fn record_with_retries(
    store: &dyn Revocations,
    uid: &UserId,
    revocation: Revocation,
) -> Result<Revocation, StoreError> {
    with_retries(
        uid,
        "recording a deletion's revocation",
        RECORD_ATTEMPTS,
        Duration::from_millis(100),
        || store.record_revocation(uid, revocation),
    )
    .await
}

/// Announces `revocation` for `uid` (recording it again, merged), retrying a
/// store outage for a while (8 attempts over about 20 s): the user's live
/// sessions must be cut.
pub async fn revoke_with_retries(store: &dyn Revocations, uid: &UserId, revocation: Revocation) {
    let announced = with_retries(
        uid,
        "announcing a deleted account's revocation",
        8,
        Duration::from_millis(200),
        || store.revoke_user(uid, revocation),
    )
    .await;
    match announced {
        Ok(()) => tracing::info!(%uid, "account deletion announced: live sessions end"),
        Err(error) => {
            tracing::error!(%uid, %error, "could not announce a deleted account's revocation: its live sessions end at the broker's next revocation poll")
        }
    }
}

/// Handles `delete_account`: records the revocation first, so that nothing
/// the user's current sessions send from now on is acted on (the SDK checks
/// it before every command, the broker before every will); then deletes the
/// data, answers, and announces the revocation [`REVOKE_AFTER_REPLY`] later
/// (the announcement cuts the session, which would drop the answer).
pub async fn delete_account(
    shared: &Shared,
    cmd: Command<NoFields>,
) -> Result<Reply, HandlerError> {
    let uid = cmd.user_id;
    // The cut-off is fixed when the command arrives, not when it is written,
    // and covers the sender's own token even when it was issued within the
    // second of an earlier deletion (its `iat` is that cut-off, after now).
    let revocation = Revocation::account_deleted(protocol::claims::now_secs(), cmd.token_iat);
    if let Err(error) = record_with_retries(shared.store.as_ref(), &uid, revocation).await {
        tracing::error!(%uid, %error, "account not deleted: its revocation could not be recorded");
        return Err(HandlerError::unavailable(
            "the account could not be deleted now (nothing was deleted); try again later",
        ));
    }
    // From here on the tokens are refused; the live sessions are cut by the
    // announcement (or the broker's poll), whatever happens below.
    let store = Arc::clone(&shared.store);
    let revoking = uid.clone();
    tokio::spawn(async move {
        tokio::time::sleep(REVOKE_AFTER_REPLY).await;
        revoke_with_retries(store.as_ref(), &revoking, revocation).await;
    });
    if let Err(error) = shared.store.delete_user(&uid).await {
        tracing::error!(%uid, %error, "account revoked but its data could not be deleted");
        return Err(HandlerError::unavailable(
            "the account's tokens are revoked but its data could not be deleted now; sign up again and delete the account",
        ));
    }
    tracing::info!(%uid, "account deleted");
    Ok(Reply::json("delete_account", json!({"status": 200})))
}

/// What [`rotate_master_key`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// Tokens re-sealed under the current key.
    pub resealed: u64,
    /// Tokens already under the current key.
    pub current: u64,
    /// Tokens changed by their user during the rotation (left as they are).
    pub changed_meanwhile: u64,
    /// Tokens that open under neither key (reported, left as they are).
    pub unreadable: u64,
}

/// Re-seals every stored platform token under `keys.current`, opening the
/// old ones with `keys.previous`. Safe to run while handlers serve (a token
/// the user replaces or revokes meanwhile is left alone) and to run again
/// (tokens already under the current key are skipped).
pub async fn rotate_master_key(
    store: &dyn PlatformTokens,
    keys: &MasterKeys,
) -> Result<RotationReport, StoreError> {
    let mut report = RotationReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.platform_tokens_page(cursor.as_deref()).await?;
        for token in page.tokens {
            if keys.is_current(&token.sealed) {
                report.current += 1;
                continue;
            }
            let resealed = keys
                .open(&token.uid, &token.platform, &token.sealed)
                .and_then(|plain| keys.seal(&token.uid, &token.platform, &plain));
            let resealed = match resealed {
                Ok(resealed) => resealed,
                Err(error) => {
                    tracing::error!(uid = %token.uid, platform = %token.platform, %error, "platform token cannot be re-sealed");
                    report.unreadable += 1;
                    continue;
                }
            };
            if store
                .replace_platform_token(
                    store::SealedToken::new(&token.uid, &token.platform, &token.sealed),
                    &resealed,
                )
                .await?
            {
                report.resealed += 1;
            } else {
                report.changed_meanwhile += 1;
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(report),
        }
    }
}

/// The token stored for `platform`, opened: `Ok(None)` when there is none.
pub async fn stored_token(
    shared: &Shared,
    uid: &UserId,
    platform: &str,
) -> Result<Option<Map<String, Value>>, HandlerError> {
    let Some(sealed) = shared.store.platform_token(uid, platform).await? else {
        return Ok(None);
    };
    let unreadable = |what: &str| {
        HandlerError::new(
            424,
            format!(
                "the stored token for platform {platform} cannot be {what}: send store_token again"
            ),
        )
    };
    let plain = shared
        .master_keys()?
        .open(uid, platform, &sealed)
        .map_err(|error| {
            tracing::error!(%uid, %platform, %error, "stored platform token does not open");
            unreadable("read")
        })?;
    match serde_json::from_slice(&plain) {
        Ok(Value::Object(token)) => Ok(Some(token)),
        _ => Err(unreadable("decoded")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> MasterKeys {
        MasterKeys {
            current: MasterKey::generate().0,
            previous: None,
        }
    }

    #[test]
    fn seal_binds_user_and_platform() {
        let keys = keys();
        let a = UserId::parse("a1").unwrap();
        let b = UserId::parse("b1").unwrap();
        let sealed = keys.seal(&a, "gmail", b"{\"x\":1}").unwrap();
        assert_eq!(keys.open(&a, "gmail", &sealed).unwrap(), b"{\"x\":1}");
        assert_eq!(keys.open(&b, "gmail", &sealed), Err(SealError::Open));
        assert_eq!(keys.open(&a, "twitter", &sealed), Err(SealError::Open));
        // uid "a1" + platform "x" must differ from uid "a" + platform "1x".
        let a_short = UserId::parse("a").unwrap();
        let s2 = keys.seal(&a, "x", b"t").unwrap();
        assert_eq!(keys.open(&a_short, "1x", &s2), Err(SealError::Open));
        // Tampering anywhere is detected.
        for i in [0, 1, 5, HEADER_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(keys.open(&a, "gmail", &bad).is_err(), "byte {i}");
        }
        assert_eq!(
            keys.open(&a, "gmail", &sealed[..10]),
            Err(SealError::Malformed)
        );
        assert_eq!(keys.open(&a, "gmail", &[]), Err(SealError::Malformed));
        // A fresh nonce every time.
        assert_ne!(
            keys.seal(&a, "gmail", b"t").unwrap(),
            keys.seal(&a, "gmail", b"t").unwrap()
        );
    }

    #[test]
    fn previous_key_opens_until_rotated() {
        let old = keys();
        let uid = UserId::parse("u").unwrap();
        let sealed = old.seal(&uid, "p", b"secret").unwrap();
        let new = MasterKeys {
            current: MasterKey::generate().0,
            previous: Some(old.current.clone()),
        };
        assert!(!new.is_current(&sealed));
        assert_eq!(new.open(&uid, "p", &sealed).unwrap(), b"secret");
        let without_previous = MasterKeys {
            current: new.current.clone(),
            previous: None,
        };
        assert_eq!(
            without_previous.open(&uid, "p", &sealed),
            Err(SealError::UnknownKey)
        );
    }

    #[test]
    fn master_keys_parse_from_hex_and_base64_only_when_32_bytes() {
        let hex_key = "00".repeat(32);
        let from_hex = MasterKey::parse(&format!(" {hex_key}\n")).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        let from_b64 = MasterKey::parse(&b64).unwrap();
        assert_eq!(from_hex.id(), from_b64.id());
        assert_ne!(
            from_hex.id(),
            MasterKey::parse(&"01".repeat(32)).unwrap().id()
        );
        for bad in ["", "00", &"zz".repeat(32), &"00".repeat(31), "not a key"] {
            assert_eq!(
                MasterKey::parse(bad).err(),
                Some(SealError::BadKey),
                "{bad:?}"
            );
        }
        let debug = format!("{from_hex:?}");
        assert!(!debug.contains(&hex_key), "{debug}");
    }

    #[test]
    fn dev_key_file_is_made_once_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(DEV_MASTER_KEY_FILE);
        let first = MasterKey::load_or_generate(&path).unwrap();
        let again = MasterKey::load_or_generate(&path).unwrap();
        assert_eq!(first.id(), again.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            MasterKey::load_or_generate(&path),
            Err(SealError::KeyFile { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
    }
}
