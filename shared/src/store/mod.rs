//! Owns the handlers' state: the user's current AES key, replay nonces,
//! contact requests and contacts, and the user revocation flag, behind one
//! small async [`Store`] trait with two implementations:
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

mod embedded;
mod redis_store;

pub use embedded::EmbeddedStore;
pub use redis_store::{RedisStore, KEY_PREFIX};

use crate::envelope::AesKey;
use crate::uid::UserId;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

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
            key: crate::envelope::b64_encode(&self.key.0),
            issued_at: self.issued_at,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let wire: KeyRecordWire =
            serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = crate::envelope::b64_decode(&wire.key)
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

/// What sync, publish, contacts and revocation checks need from storage.
///
/// Every method is atomic on its own; none holds a lock across calls.
pub trait Store: Send + Sync + 'static {
    /// Makes `record` the user's only key (the newest replaces every older one).
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()>;

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

    /// Sets or clears the user's revocation flag (the broker disconnects and
    /// refuses a revoked user).
    fn set_revoked<'a>(&'a self, uid: &'a UserId, revoked: bool) -> StoreFuture<'a, ()>;

    /// Whether the user is revoked.
    fn is_revoked<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, bool>;

    /// Deletes the user's key, contacts (both directions) and contact
    /// requests (both directions). The revocation flag is kept: deleting data
    /// must not un-revoke anyone. Nonces expire on their own.
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
    }
}
