//! Owns the embedded implementation of [`Store`]: one redb file (by default
//! `DATA_DIR/store.redb`), each operation one ACID transaction run on the
//! blocking pool, committed durably before it returns, so data survives a
//! restart or a crash. Key schema: `SCHEMA.md`.

use super::{KeyRecord, Store, StoreError, StoreFuture};
use crate::envelope::b64_encode;
use crate::uid::UserId;
use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// uid -> JSON key record.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// `uid \x1f key_id \x1f base64(nonce)` -> expiry, ms since the epoch.
const NONCES: TableDefinition<&str, u64> = TableDefinition::new("nonces");
/// target -> requesters waiting for the target to accept.
const REQUESTS_IN: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("requests_in");
/// requester -> targets asked (index for deleting a user).
const REQUESTS_OUT: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("requests_out");
/// uid -> contacts (stored both ways).
const CONTACTS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("contacts");
/// uid -> when the user was revoked, seconds since the epoch.
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");

/// Expired nonces are swept once every this many `remember_nonce` calls (a power of two).
const SWEEP_EVERY: u64 = 1024;

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    db: Arc<Database>,
    nonce_calls: AtomicU64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Embedded(e.into().to_string())
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn sorted_values(
    table: &impl ReadableMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for value in table.get(key).map_err(db_err)? {
        out.push(value.map_err(db_err)?.value().to_owned());
    }
    out.sort();
    Ok(out)
}

impl EmbeddedStore {
    /// Opens (or creates) the database file at `path`, creating its directory,
    /// on the blocking pool. Fails if another process holds it open.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path))
            .await
            .map_err(|e| StoreError::Embedded(e.to_string()))?
    }

    /// Like [`EmbeddedStore::open`], on the calling thread (for start-up code).
    pub fn open_blocking(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Config(format!(
                    "cannot create DATA_DIR {}: {e}; set DATA_DIR to a writable directory",
                    dir.display()
                ))
            })?;
        }
        let db = Database::create(path).map_err(|e| {
            StoreError::Config(format!(
                "cannot open the embedded store {}: {e} (only one process may use it; \
                 set REDIS_URL to share state between processes)",
                path.display()
            ))
        })?;
        // Create every table once so readers never see a missing table.
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(KEYS).map_err(db_err)?;
        txn.open_table(NONCES).map_err(db_err)?;
        txn.open_multimap_table(REQUESTS_IN).map_err(db_err)?;
        txn.open_multimap_table(REQUESTS_OUT).map_err(db_err)?;
        txn.open_multimap_table(CONTACTS).map_err(db_err)?;
        txn.open_table(REVOKED).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            nonce_calls: AtomicU64::new(0),
        })
    }

    /// Runs `op` with the database on the blocking pool.
    fn blocking<T, F>(&self, op: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || op(&db))
                .await
                .map_err(|e| StoreError::Embedded(e.to_string()))?
        })
    }
}

impl Store for EmbeddedStore {
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        let bytes = record.encode();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(KEYS)
                .map_err(db_err)?
                .insert(uid.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
    }

    fn get_key<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<KeyRecord>> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(KEYS).map_err(db_err)?;
            let raw = table.get(uid.as_str()).map_err(db_err)?;
            raw.map(|v| KeyRecord::decode(v.value())).transpose()
        })
    }

    fn remember_nonce<'a>(
        &'a self,
        uid: &'a UserId,
        key_id: &'a str,
        nonce: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let name = format!("{}\x1f{key_id}\x1f{}", uid.as_str(), b64_encode(nonce));
        let sweep = self.nonce_calls.fetch_add(1, Ordering::Relaxed) & (SWEEP_EVERY - 1) == 0;
        self.blocking(move |db| {
            let now = now_millis();
            let expires = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
            let txn = db.begin_write().map_err(db_err)?;
            let fresh = {
                let mut table = txn.open_table(NONCES).map_err(db_err)?;
                if sweep {
                    table.retain(|_, exp| exp > now).map_err(db_err)?;
                }
                let seen = table
                    .get(name.as_str())
                    .map_err(db_err)?
                    .is_some_and(|exp| exp.value() > now);
                if !seen {
                    table.insert(name.as_str(), expires).map_err(db_err)?;
                }
                !seen
            };
            txn.commit().map_err(db_err)?;
            Ok(fresh)
        })
    }

    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()> {
        let (requester, target) = (requester.as_str().to_owned(), target.as_str().to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_multimap_table(REQUESTS_IN)
                .map_err(db_err)?
                .insert(target.as_str(), requester.as_str())
                .map_err(db_err)?;
            txn.open_multimap_table(REQUESTS_OUT)
                .map_err(db_err)?
                .insert(requester.as_str(), target.as_str())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
    }

    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        let target = target.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_multimap_table(REQUESTS_IN).map_err(db_err)?;
            sorted_values(&table, &target)
        })
    }

    fn accept_contact<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, bool> {
        let (requester, target) = (requester.as_str().to_owned(), target.as_str().to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let had = txn
                .open_multimap_table(REQUESTS_IN)
                .map_err(db_err)?
                .remove(target.as_str(), requester.as_str())
                .map_err(db_err)?;
            if !had {
                txn.abort().map_err(db_err)?;
                return Ok(false);
            }
            txn.open_multimap_table(REQUESTS_OUT)
                .map_err(db_err)?
                .remove(requester.as_str(), target.as_str())
                .map_err(db_err)?;
            {
                let mut contacts = txn.open_multimap_table(CONTACTS).map_err(db_err)?;
                contacts
                    .insert(requester.as_str(), target.as_str())
                    .map_err(db_err)?;
                contacts
                    .insert(target.as_str(), requester.as_str())
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(true)
        })
    }

    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_multimap_table(CONTACTS).map_err(db_err)?;
            sorted_values(&table, &uid)
        })
    }

    fn set_revoked<'a>(&'a self, uid: &'a UserId, revoked: bool) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(REVOKED).map_err(db_err)?;
                if revoked {
                    table
                        .insert(uid.as_str(), crate::claims::now_secs())
                        .map_err(db_err)?;
                } else {
                    table.remove(uid.as_str()).map_err(db_err)?;
                }
            }
            txn.commit().map_err(db_err)
        })
    }

    fn is_revoked<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, bool> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(REVOKED).map_err(db_err)?;
            Ok(table.get(uid.as_str()).map_err(db_err)?.is_some())
        })
    }

    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(KEYS)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            {
                let mut contacts = txn.open_multimap_table(CONTACTS).map_err(db_err)?;
                for other in sorted_values(&contacts, &uid)? {
                    contacts
                        .remove(other.as_str(), uid.as_str())
                        .map_err(db_err)?;
                }
                contacts.remove_all(uid.as_str()).map_err(db_err)?;
                let mut incoming = txn.open_multimap_table(REQUESTS_IN).map_err(db_err)?;
                let mut outgoing = txn.open_multimap_table(REQUESTS_OUT).map_err(db_err)?;
                for requester in sorted_values(&incoming, &uid)? {
                    outgoing
                        .remove(requester.as_str(), uid.as_str())
                        .map_err(db_err)?;
                }
                for target in sorted_values(&outgoing, &uid)? {
                    incoming
                        .remove(target.as_str(), uid.as_str())
                        .map_err(db_err)?;
                }
                incoming.remove_all(uid.as_str()).map_err(db_err)?;
                outgoing.remove_all(uid.as_str()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.blocking(|db| db.begin_read().map(|_| ()).map_err(db_err))
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::AesKey;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"))
            .await
            .unwrap();
        crate::store::conformance::exercise(&store).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("s.redb");
        let uid = UserId::parse("68946").unwrap();
        let record = KeyRecord {
            key_id: "k".into(),
            key: AesKey::generate(),
            issued_at: 5,
        };
        {
            let store = EmbeddedStore::open(&path).await.unwrap();
            store.put_key(&uid, &record).await.unwrap();
            let ttl = Duration::from_secs(60);
            assert!(store.remember_nonce(&uid, "k", b"n", ttl).await.unwrap());
        }
        let store = EmbeddedStore::open(&path).await.unwrap();
        assert_eq!(store.get_key(&uid).await.unwrap(), Some(record));
        let ttl = Duration::from_secs(60);
        assert!(!store.remember_nonce(&uid, "k", b"n", ttl).await.unwrap());
    }

    #[tokio::test]
    async fn second_open_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = EmbeddedStore::open(&path).await.unwrap();
        match EmbeddedStore::open(&path).await {
            Err(StoreError::Config(msg)) => assert!(msg.contains("REDIS_URL"), "{msg}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
