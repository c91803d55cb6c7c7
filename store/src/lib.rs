//! Owns the handlers' and the identity service's state: the user's current
//! AES key, replay nonces, contact requests and contacts, registrations,
//! sealed platform tokens, and user revocations (with a live stream of
//! revocation events for the broker), behind one small async [`Store`] trait
//! with two implementations:
//!
//! - [`RedisStore`]: Redis through a reconnecting `ConnectionManager`, shared by
//!   handler processes and broker nodes. An outage turns into
//!   [`StoreError::Unavailable`] (handlers answer 503) and service resumes by
//!   itself when Redis is back.
//! - [`EmbeddedStore`]: a redb file under `DATA_DIR` for the single-process
//!   default; it survives a restart. One process at a time may open it.
//!
//! The key schema of both is in `SCHEMA.md` beside this file.
//!
//! The trait returns boxed futures so that handlers can hold an
//! `Arc<dyn Store>` and not care which one they were given.

mod args;
mod embedded;
mod redis_conn;
mod redis_store;

pub use args::{StoreArgs, DEFAULT_DATA_DIR};

pub use embedded::EmbeddedStore;
pub use redis_conn::{RedisConnection, INVALID_REDIS_URL};
pub use redis_store::{RedisStore, KEY_PREFIX};

use envelope::AesKey;
use protocol::uid::UserId;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// File name of the embedded store inside `DATA_DIR`.
pub const EMBEDDED_FILE: &str = "store.redb";

/// A boxed future returned by [`Store`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing service cannot be reached or did not answer in time;
    /// retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded database failed.
    #[error("embedded store: {0}")]
    Embedded(String),
    /// A stored record could not be decoded.
    #[error("corrupt stored record: {0}")]
    Corrupt(String),
    /// The store could not be opened with the given configuration.
    #[error("store configuration: {0}")]
    Config(String),
    /// The caller passed an argument the store cannot hold (a bad platform name).
    #[error("invalid store argument: {0}")]
    Invalid(String),
}

/// The shared AES key of a user, as `sync` issued it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Identifies this key; `publish` refuses any other id.
    pub key_id: String,
    /// The AES-256 key.
    pub key: AesKey,
    /// When it was issued, seconds since the Unix epoch.
    pub issued_at: u64,
}

/// The stored form of a [`KeyRecord`] (JSON, key in base64).
#[derive(Serialize, Deserialize)]
struct KeyRecordWire {
    key_id: String,
    key: String,
    issued_at: u64,
}

impl KeyRecord {
    fn encode(&self) -> Vec<u8> {
        let wire = KeyRecordWire {
            key_id: self.key_id.clone(),
            key: envelope::b64_encode(&self.key.0),
            issued_at: self.issued_at,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let wire: KeyRecordWire =
            serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = envelope::b64_decode(&wire.key)
            .ok()
            .and_then(|b| AesKey::from_slice(&b).ok())
            .ok_or_else(|| StoreError::Corrupt("key record holds no 32-byte key".into()))?;
        Ok(KeyRecord {
            key_id: wire.key_id,
            key,
            issued_at: wire.issued_at,
        })
    }
}

/// How a user is revoked.
///
/// A revocation outlives the deletion of the user's data: deleting an account
/// records [`Revocation::IssuedBefore`] one second after the deletion, so every
/// token issued until then is refused while a token issued after a new
/// registration (its `iat` is later) works again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Revocation {
    /// Tokens whose `iat` is earlier than this Unix second are refused (a
    /// token without `iat` counts as issued at 0, so it is refused too).
    IssuedBefore(u64),
    /// Every token is refused until an operator restores the user.
    All,
}

impl Revocation {
    /// Whether a token issued at `iat` (Unix seconds; `None` = no `iat`
    /// claim, treated as 0) is refused by this revocation.
    pub fn refuses(&self, iat: Option<u64>) -> bool {
        match self {
            Revocation::All => true,
            Revocation::IssuedBefore(cutoff) => iat.unwrap_or(0) < *cutoff,
        }
    }

    /// The revocation an account deletion records at `now` (Unix seconds)
    /// when the deleting credential was issued at `credential_iat`: every
    /// token issued up to this second is refused, and so is the credential
    /// itself even when it was issued within the second of an earlier
    /// deletion (its `iat` is that cut-off, later than `now`); a token issued
    /// afterwards (a new registration, see the identity service's `issue`)
    /// works. The one rule for `/unregister` and `delete_account`.
    pub fn account_deleted(now: u64, credential_iat: Option<u64>) -> Revocation {
        Revocation::IssuedBefore(now.max(credential_iat.unwrap_or(0)).saturating_add(1))
    }

    /// The stronger of two revocations: `All` wins, otherwise the later cut-off.
    /// Recording a revocation never weakens one already in place (an account
    /// deletion must not lift an operator's ban).
    pub fn merge(self, other: Revocation) -> Revocation {
        match (self, other) {
            (Revocation::IssuedBefore(a), Revocation::IssuedBefore(b)) => {
                Revocation::IssuedBefore(a.max(b))
            }
            _ => Revocation::All,
        }
    }

    /// The stored and published text form: `all` or `before:<unix seconds>`.
    pub fn encode(&self) -> String {
        match self {
            Revocation::All => "all".to_owned(),
            Revocation::IssuedBefore(cutoff) => format!("before:{cutoff}"),
        }
    }

    /// Parses [`Revocation::encode`]'s form. Any other value counts as
    /// [`Revocation::All`]: the legacy flag (the Unix second of the
    /// revocation) and an operator's hand-written `SET mqgate:revoked:<uid> 1`
    /// both mean "refuse everything", and a malformed record must fail closed.
    pub fn decode(text: &str) -> Revocation {
        text.strip_prefix("before:")
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(Revocation::All, Revocation::IssuedBefore)
    }
}

/// What the broker hears on [`Store::revocation_events`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationEvent {
    /// `uid` was revoked (`revocation` is what was recorded, merged with any
    /// earlier revocation).
    Revoked { uid: UserId, revocation: Revocation },
    /// Events may have been missed (the Redis subscription was re-established
    /// after an outage): re-check every live session now.
    Resync,
}

/// How many revocation events a slow subscriber may fall behind before it is
/// told it lagged (it then re-checks every session).
pub const REVOCATION_EVENTS_CAPACITY: usize = 1024;

/// One sealed platform token, as [`Store::platform_tokens_page`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredToken {
    pub uid: UserId,
    pub platform: String,
    /// The sealed bytes exactly as stored (the store never sees plaintext).
    pub sealed: Vec<u8>,
}

/// A page of [`Store::platform_tokens_page`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenPage {
    pub tokens: Vec<StoredToken>,
    /// Pass this back to get the next page; `None` when the listing is done.
    /// A listing may repeat an entry (Redis `SCAN` semantics), never skip one
    /// that existed for the whole listing.
    pub next: Option<String>,
}

/// Longest platform name a store accepts (platform names come from
/// configuration, but the embedded key format needs a bound and no `\x1f`).
pub const MAX_PLATFORM_LEN: usize = 64;

/// Whether `platform` can be a key part: 1-64 characters of
/// `[A-Za-z0-9._-]`. Handlers check their configured names against this.
pub fn valid_platform_name(platform: &str) -> bool {
    !platform.is_empty()
        && platform.len() <= MAX_PLATFORM_LEN
        && platform
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Refuses a platform name that [`valid_platform_name`] rejects.
fn check_platform(platform: &str) -> Result<(), StoreError> {
    if valid_platform_name(platform) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "platform name must be 1-64 characters of A-Z a-z 0-9 . _ -".into(),
        ))
    }
}

/// What sync, publish, contacts, tokens, the identity service and revocation
/// checks need from storage.
///
/// Every method is atomic on its own; none holds a lock across calls.
pub trait Store: Send + Sync + 'static {
    /// Makes `record` the user's only key (the newest replaces every older one).
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()>;

    /// As [`Store::put_key`], unless the user's revocation refuses a token
    /// issued at `iat` (the sending session's token), checked in the same
    /// atomic step as the write (a Lua script; one redb write transaction):
    /// a command that passed its revocation check just before an account
    /// deletion recorded its revocation cannot write just after it.
    /// `Ok(false)`: refused, nothing written.
    fn put_key_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        record: &'a KeyRecord,
        iat: u64,
    ) -> StoreFuture<'a, bool>;

    /// The user's current key, if they ever synced.
    fn get_key<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<KeyRecord>>;

    /// Records that `nonce` was used with key `key_id` by `uid`, for `ttl`.
    /// Returns `true` the first time and `false` for a replay.
    fn remember_nonce<'a>(
        &'a self,
        uid: &'a UserId,
        key_id: &'a str,
        nonce: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Records that `requester` asked `target` to become a contact
    /// (idempotent).
    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()>;

    /// Who is waiting for `target` to accept them, sorted.
    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>>;

    /// If `requester` has a pending request to `target`, removes it and makes
    /// them contacts of each other, atomically, and returns `true`; otherwise
    /// changes nothing and returns `false`.
    fn accept_contact<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, bool>;

    /// The user's contacts, sorted.
    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>>;

    /// Legacy flag API: `true` records [`Revocation::All`], `false` restores
    /// the user (same as [`Store::revoke_user`] / [`Store::restore_user`]).
    fn set_revoked<'a>(&'a self, uid: &'a UserId, revoked: bool) -> StoreFuture<'a, ()> {
        if revoked {
            self.revoke_user(uid, Revocation::All)
        } else {
            self.restore_user(uid)
        }
    }

    /// Whether any revocation is recorded for the user (whatever its kind).
    fn is_revoked<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(self.revocation(uid).await?.is_some()) })
    }

    /// Records `revocation` for the user, merged with any earlier one (see
    /// [`Revocation::merge`]), and announces it on
    /// [`Store::revocation_events`] (Redis: `PUBLISH` on the channel
    /// `mqgate:revocations`, so every process sharing the Redis hears it).
    /// Same as [`Store::record_revocation`] followed by the announcement.
    fn revoke_user<'a>(&'a self, uid: &'a UserId, revocation: Revocation) -> StoreFuture<'a, ()>;

    /// Records `revocation` for the user, merged like [`Store::revoke_user`],
    /// without announcing it: from now on every check against the store
    /// (CONNECT, the handler SDK, the identity service, wills) refuses the
    /// tokens it covers, but live sessions are not cut yet. Returns the
    /// merged revocation now in force.
    ///
    /// Why apart: `delete_account` must make the revocation the first thing
    /// that happens (nothing the user's old sessions send afterwards may be
    /// acted on) while its own answer still has to reach the device; it
    /// announces (with [`Store::revoke_user`]) once the answer is out.
    fn record_revocation<'a>(
        &'a self,
        uid: &'a UserId,
        revocation: Revocation,
    ) -> StoreFuture<'a, Revocation>;

    /// Removes every revocation of the user (operators).
    fn restore_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()>;

    /// The user's revocation, if any.
    fn revocation<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<Revocation>>;

    /// A live feed of revocations recorded through this store or (Redis) by
    /// any process sharing it. Receivers that lag get
    /// `RecvError::Lagged` and should re-check everything, as on
    /// [`RevocationEvent::Resync`]. Delivery is best-effort (a Redis outage
    /// loses events): keep a periodic poll as the fallback. Must be called
    /// inside a Tokio runtime to get Redis events.
    fn revocation_events(&self) -> broadcast::Receiver<RevocationEvent>;

    /// Records that the user registered at `registered_at` (Unix seconds),
    /// replacing an earlier registration.
    fn put_registration<'a>(&'a self, uid: &'a UserId, registered_at: u64) -> StoreFuture<'a, ()>;

    /// When the user registered, if they are registered.
    fn registration<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<u64>>;

    /// Stores the user's sealed token for `platform`, replacing an older one.
    /// `platform` must pass [`valid_platform_name`].
    fn put_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
    ) -> StoreFuture<'a, ()>;

    /// As [`Store::put_platform_token`], unless the user's revocation
    /// refuses a token issued at `iat`, checked atomically with the write
    /// (see [`Store::put_key_unless_revoked`]). `Ok(false)`: refused,
    /// nothing written.
    fn put_platform_token_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
        iat: u64,
    ) -> StoreFuture<'a, bool>;

    /// The user's sealed token for `platform`.
    fn platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// The platforms the user holds a token for, sorted.
    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>>;

    /// Deletes the user's token for `platform`; `true` if there was one.
    fn delete_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, bool>;

    /// Replaces the token only if it is still exactly `old` (for master-key
    /// rotation: a token the user revoked or replaced meanwhile is left alone).
    /// Returns whether it was replaced.
    fn replace_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        old: &'a [u8],
        new: &'a [u8],
    ) -> StoreFuture<'a, bool>;

    /// One page of every stored platform token of every user, for master-key
    /// rotation. Start with `None` and pass back [`TokenPage::next`].
    fn platform_tokens_page<'a>(&'a self, cursor: Option<&'a str>) -> StoreFuture<'a, TokenPage>;

    /// Deletes the user's key, contacts (both directions), contact requests
    /// (both directions), platform tokens and registration. Revocations are
    /// kept: deleting data must not un-revoke anyone. Nonces expire on their
    /// own.
    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()>;

    /// Checks that the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// A short name for logs: `redis` or `embedded`.
    fn kind(&self) -> &'static str;
}

/// Opens the configured store: Redis when `redis_url` is given, otherwise the
/// embedded store in `data_dir/store.redb` (the directory is created).
pub async fn open(redis_url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match redis_url {
        Some(url) => Ok(Arc::new(RedisStore::connect(url).await?)),
        None => Ok(Arc::new(
            EmbeddedStore::open(&data_dir.join(EMBEDDED_FILE)).await?,
        )),
    }
}

/// Like [`open`], on the calling thread and without contacting Redis (it is
/// connected on first use): for start-up code that is not async.
pub fn open_blocking(
    redis_url: Option<&str>,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, StoreError> {
    match redis_url {
        Some(url) => Ok(Arc::new(RedisStore::new(url)?)),
        None => Ok(Arc::new(EmbeddedStore::open_blocking(
            &data_dir.join(EMBEDDED_FILE),
        )?)),
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The same behaviour checks, run against each implementation.
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    pub async fn exercise(store: &dyn Store) {
        store.ping().await.unwrap();
        let a = uid("68946");
        let b = uid("23412");
        let c = uid("777");

        // Keys: newest replaces older.
        assert_eq!(store.get_key(&a).await.unwrap(), None);
        let k1 = KeyRecord {
            key_id: "k1".into(),
            key: AesKey::generate(),
            issued_at: 1,
        };
        let k2 = KeyRecord {
            key_id: "k2".into(),
            key: AesKey::generate(),
            issued_at: 2,
        };
        store.put_key(&a, &k1).await.unwrap();
        assert_eq!(store.get_key(&a).await.unwrap(), Some(k1));
        store.put_key(&a, &k2).await.unwrap();
        assert_eq!(store.get_key(&a).await.unwrap(), Some(k2.clone()));

        // Nonces: once per (user, key); expiry frees them.
        let ttl = Duration::from_secs(60);
        assert!(store.remember_nonce(&a, "k2", b"n1", ttl).await.unwrap());
        assert!(!store.remember_nonce(&a, "k2", b"n1", ttl).await.unwrap());
        assert!(store.remember_nonce(&b, "k2", b"n1", ttl).await.unwrap());
        assert!(store.remember_nonce(&a, "k3", b"n1", ttl).await.unwrap());
        let short = Duration::from_millis(50);
        assert!(store.remember_nonce(&a, "k2", b"n2", short).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(store.remember_nonce(&a, "k2", b"n2", short).await.unwrap());

        // Contacts: accept needs a pending request.
        assert!(!store.accept_contact(&a, &b).await.unwrap());
        store.add_contact_request(&a, &b).await.unwrap();
        store.add_contact_request(&a, &b).await.unwrap();
        store.add_contact_request(&c, &b).await.unwrap();
        assert_eq!(
            store.pending_requests(&b).await.unwrap(),
            vec!["68946".to_string(), "777".to_string()]
        );
        assert!(store.accept_contact(&a, &b).await.unwrap());
        assert!(!store.accept_contact(&a, &b).await.unwrap());
        assert_eq!(store.pending_requests(&b).await.unwrap(), vec!["777"]);
        assert_eq!(store.contacts(&a).await.unwrap(), vec!["23412"]);
        assert_eq!(store.contacts(&b).await.unwrap(), vec!["68946"]);
        assert!(store.accept_contact(&c, &b).await.unwrap());
        assert_eq!(store.contacts(&b).await.unwrap(), vec!["68946", "777"]);

        // Revocation.
        assert!(!store.is_revoked(&c).await.unwrap());
        store.set_revoked(&c, true).await.unwrap();
        assert!(store.is_revoked(&c).await.unwrap());
        store.set_revoked(&c, false).await.unwrap();
        assert!(!store.is_revoked(&c).await.unwrap());

        // Deleting a user removes them from others' lists too.
        store.add_contact_request(&b, &c).await.unwrap();
        store.add_contact_request(&c, &a).await.unwrap();
        store.set_revoked(&b, true).await.unwrap();
        store.delete_user(&b).await.unwrap();
        assert_eq!(store.get_key(&b).await.unwrap(), None);
        assert!(store.contacts(&b).await.unwrap().is_empty());
        assert!(store.contacts(&a).await.unwrap().is_empty());
        assert!(store.contacts(&c).await.unwrap().is_empty());
        assert!(store.pending_requests(&c).await.unwrap().is_empty());
        assert_eq!(store.pending_requests(&a).await.unwrap(), vec!["777"]);
        assert!(store.is_revoked(&b).await.unwrap());
        assert_eq!(store.get_key(&a).await.unwrap(), Some(k2));

        exercise_accounts(store).await;
    }

    /// Registrations, revocations by time, platform tokens and their deletion.
    async fn exercise_accounts(store: &dyn Store) {
        let d = uid("acct-1");
        let e = uid("acct-2");

        // Revocations merge to the stronger one; restore clears every kind.
        assert_eq!(store.revocation(&d).await.unwrap(), None);
        store
            .revoke_user(&d, Revocation::IssuedBefore(100))
            .await
            .unwrap();
        assert_eq!(
            store.revocation(&d).await.unwrap(),
            Some(Revocation::IssuedBefore(100))
        );
        assert!(store.is_revoked(&d).await.unwrap());
        store
            .revoke_user(&d, Revocation::IssuedBefore(50))
            .await
            .unwrap();
        assert_eq!(
            store.revocation(&d).await.unwrap(),
            Some(Revocation::IssuedBefore(100))
        );
        store
            .revoke_user(&d, Revocation::IssuedBefore(200))
            .await
            .unwrap();
        assert_eq!(
            store.revocation(&d).await.unwrap(),
            Some(Revocation::IssuedBefore(200))
        );
        store.revoke_user(&d, Revocation::All).await.unwrap();
        assert_eq!(store.revocation(&d).await.unwrap(), Some(Revocation::All));
        store
            .revoke_user(&d, Revocation::IssuedBefore(300))
            .await
            .unwrap();
        assert_eq!(store.revocation(&d).await.unwrap(), Some(Revocation::All));
        store.restore_user(&d).await.unwrap();
        assert_eq!(store.revocation(&d).await.unwrap(), None);
        assert!(!store.is_revoked(&d).await.unwrap());
        // Recording (without announcing) merges the same way.
        assert_eq!(
            store
                .record_revocation(&d, Revocation::IssuedBefore(70))
                .await
                .unwrap(),
            Revocation::IssuedBefore(70)
        );
        assert_eq!(
            store
                .record_revocation(&d, Revocation::IssuedBefore(60))
                .await
                .unwrap(),
            Revocation::IssuedBefore(70)
        );
        assert_eq!(
            store.revocation(&d).await.unwrap(),
            Some(Revocation::IssuedBefore(70))
        );
        store.restore_user(&d).await.unwrap();
        store.set_revoked(&d, true).await.unwrap();
        assert_eq!(store.revocation(&d).await.unwrap(), Some(Revocation::All));
        store.set_revoked(&d, false).await.unwrap();
        assert_eq!(store.revocation(&d).await.unwrap(), None);

        // Registrations.
        assert_eq!(store.registration(&d).await.unwrap(), None);
        store.put_registration(&d, 1_700_000_000).await.unwrap();
        store.put_registration(&d, 1_700_000_001).await.unwrap();
        assert_eq!(store.registration(&d).await.unwrap(), Some(1_700_000_001));

        // Platform tokens: per user and platform, sealed bytes kept exactly.
        assert!(store.platforms_with_tokens(&d).await.unwrap().is_empty());
        assert_eq!(store.platform_token(&d, "twitter").await.unwrap(), None);
        let sealed_a = [0u8, 1, 2, 255, 0x1f, 0];
        store
            .put_platform_token(&d, "twitter", &sealed_a)
            .await
            .unwrap();
        store.put_platform_token(&d, "gmail", b"g1").await.unwrap();
        store.put_platform_token(&d, "gmail", b"g2").await.unwrap();
        store.put_platform_token(&e, "gmail", b"e1").await.unwrap();
        assert!(matches!(
            store.put_platform_token(&d, "bad\x1fname", b"x").await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(
            store.platforms_with_tokens(&d).await.unwrap(),
            vec!["gmail", "twitter"]
        );
        assert_eq!(
            store
                .platform_token(&d, "twitter")
                .await
                .unwrap()
                .as_deref(),
            Some(&sealed_a[..])
        );
        assert_eq!(
            store.platform_token(&d, "gmail").await.unwrap().as_deref(),
            Some(&b"g2"[..])
        );
        // Compare-and-swap for key rotation.
        assert!(!store
            .replace_platform_token(&d, "gmail", b"g1", b"g3")
            .await
            .unwrap());
        assert!(store
            .replace_platform_token(&d, "gmail", b"g2", b"g3")
            .await
            .unwrap());
        assert!(!store
            .replace_platform_token(&d, "absent", b"g2", b"g3")
            .await
            .unwrap());
        assert_eq!(store.platform_token(&d, "absent").await.unwrap(), None);
        assert_eq!(
            store.platform_token(&d, "gmail").await.unwrap().as_deref(),
            Some(&b"g3"[..])
        );
        assert!(store.delete_platform_token(&d, "twitter").await.unwrap());
        assert!(!store.delete_platform_token(&d, "twitter").await.unwrap());
        assert_eq!(
            store.platforms_with_tokens(&d).await.unwrap(),
            vec!["gmail"]
        );

        // Listing every token, over several pages.
        let many: Vec<UserId> = (0..140).map(|i| uid(&format!("bulk-{i}"))).collect();
        for u in &many {
            store
                .put_platform_token(u, "p1", u.as_str().as_bytes())
                .await
                .unwrap();
            store.put_platform_token(u, "p2", b"two").await.unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = store.platform_tokens_page(cursor.as_deref()).await.unwrap();
            pages += 1;
            assert!(pages < 10_000, "the listing does not end");
            for t in page.tokens {
                if t.platform == "p1" {
                    assert_eq!(t.sealed, t.uid.as_str().as_bytes());
                }
                seen.insert((t.uid.as_str().to_owned(), t.platform));
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 140 * 2 + 2);
        assert!(seen.contains(&("acct-1".to_owned(), "gmail".to_owned())));
        assert!(seen.contains(&("acct-2".to_owned(), "gmail".to_owned())));

        // Deleting the user drops tokens and registration, keeps revocation.
        store
            .revoke_user(&d, Revocation::IssuedBefore(500))
            .await
            .unwrap();
        store.delete_user(&d).await.unwrap();
        assert!(store.platforms_with_tokens(&d).await.unwrap().is_empty());
        assert_eq!(store.platform_token(&d, "gmail").await.unwrap(), None);
        assert_eq!(store.registration(&d).await.unwrap(), None);
        assert_eq!(
            store.revocation(&d).await.unwrap(),
            Some(Revocation::IssuedBefore(500))
        );
        assert_eq!(
            store.platforms_with_tokens(&e).await.unwrap(),
            vec!["gmail"]
        );

        // Guarded writes: refused for a token the revocation refuses,
        // written for one issued at or after the cut-off, and for users
        // without a revocation.
        let key = KeyRecord {
            key_id: "kg".into(),
            key: AesKey::generate(),
            issued_at: 3,
        };
        assert!(!store
            .put_platform_token_unless_revoked(&d, "gmail", b"old", 499)
            .await
            .unwrap());
        assert!(!store.put_key_unless_revoked(&d, &key, 0).await.unwrap());
        assert!(store.platforms_with_tokens(&d).await.unwrap().is_empty());
        assert_eq!(store.get_key(&d).await.unwrap(), None);
        assert!(store
            .put_platform_token_unless_revoked(&d, "gmail", b"new", 500)
            .await
            .unwrap());
        assert!(store.put_key_unless_revoked(&d, &key, 500).await.unwrap());
        assert_eq!(
            store.platform_token(&d, "gmail").await.unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(store.get_key(&d).await.unwrap(), Some(key.clone()));
        assert!(store
            .put_platform_token_unless_revoked(&e, "chat", b"e2", 0)
            .await
            .unwrap());
        assert!(matches!(
            store
                .put_platform_token_unless_revoked(&e, "bad name", b"x", 0)
                .await,
            Err(StoreError::Invalid(_))
        ));
        store.revoke_user(&d, Revocation::All).await.unwrap();
        assert!(!store
            .put_platform_token_unless_revoked(&d, "gmail", b"x", u64::MAX)
            .await
            .unwrap());
        assert!(!store
            .put_key_unless_revoked(&d, &key, u64::MAX)
            .await
            .unwrap());
        assert_eq!(
            store.platform_token(&d, "gmail").await.unwrap().as_deref(),
            Some(&b"new"[..])
        );
        store.restore_user(&d).await.unwrap();
        store.delete_user(&d).await.unwrap();
    }

    /// Revocations recorded through `store` reach `events` (subscribed
    /// before, possibly on another instance sharing the backend).
    pub async fn exercise_events(
        store: &dyn Store,
        mut events: broadcast::Receiver<RevocationEvent>,
    ) -> broadcast::Receiver<RevocationEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let u = uid("evt-1");
        // A Redis subscription is set up in the background: announce until
        // the first one is heard.
        let first = loop {
            store
                .revoke_user(&u, Revocation::IssuedBefore(10))
                .await
                .unwrap();
            match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                Ok(Ok(RevocationEvent::Resync)) => continue,
                Ok(event) => break event.unwrap(),
                Err(_) => {
                    assert!(tokio::time::Instant::now() < deadline, "no event heard");
                }
            }
        };
        assert_eq!(
            first,
            RevocationEvent::Revoked {
                uid: u.clone(),
                revocation: Revocation::IssuedBefore(10)
            }
        );
        // Drain repeats of the first announcement.
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await
        {
        }
        // Recording alone announces nothing; the announcement that follows
        // carries the merged value.
        store
            .record_revocation(&u, Revocation::IssuedBefore(20))
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), events.recv())
                .await
                .is_err(),
            "a recorded revocation is not announced"
        );
        store
            .revoke_user(&u, Revocation::IssuedBefore(15))
            .await
            .unwrap();
        let merged = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            merged,
            RevocationEvent::Revoked {
                uid: u.clone(),
                revocation: Revocation::IssuedBefore(20)
            }
        );
        store.revoke_user(&u, Revocation::All).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            next,
            RevocationEvent::Revoked {
                uid: u.clone(),
                revocation: Revocation::All
            }
        );
        store.restore_user(&u).await.unwrap();
        events
    }

    #[test]
    fn revocation_rules() {
        let r = Revocation::IssuedBefore(100);
        assert!(r.refuses(Some(99)));
        assert!(!r.refuses(Some(100)));
        assert!(r.refuses(None));
        assert!(Revocation::All.refuses(Some(u64::MAX)));
        assert_eq!(Revocation::decode(&r.encode()), r);
        assert_eq!(Revocation::decode("all"), Revocation::All);
        assert_eq!(Revocation::decode("1700000000"), Revocation::All);
        assert_eq!(Revocation::decode("before:x"), Revocation::All);
        assert_eq!(
            Revocation::IssuedBefore(5).merge(Revocation::IssuedBefore(3)),
            Revocation::IssuedBefore(5)
        );
        assert_eq!(
            Revocation::IssuedBefore(5).merge(Revocation::All),
            Revocation::All
        );
        // An account deletion refuses every token up to this second, and
        // the deleting credential even when it was issued in the second of
        // an earlier deletion (its `iat` is later than `now`).
        let deleted = Revocation::account_deleted(1_000, Some(900));
        assert_eq!(deleted, Revocation::IssuedBefore(1_001));
        assert!(deleted.refuses(Some(1_000)) && !deleted.refuses(Some(1_001)));
        let same_second = Revocation::account_deleted(1_000, Some(1_001));
        assert!(same_second.refuses(Some(1_001)));
        assert_eq!(
            Revocation::account_deleted(1_000, None),
            Revocation::IssuedBefore(1_001)
        );
        assert!(valid_platform_name("gmail.v2_x-y"));
        assert!(!valid_platform_name(""));
        assert!(!valid_platform_name("a b"));
        assert!(!valid_platform_name(&"a".repeat(65)));
    }
}
