//! Owns the embedded implementation of [`Store`]: one redb file (by default
//! `DATA_DIR/store.redb`), each operation one ACID transaction run on the
//! blocking pool, committed durably before it returns, so data survives a
//! restart or a crash. Revocation events are an in-process broadcast (one
//! process owns the file, so nobody else can revoke). Key schema: `SCHEMA.md`.

use crate::tokens::check_platform;
use crate::{
    Accounts, Contacts, KeyRecord, Keys, PlatformTokens, Registrations, Revocation,
    RevocationEvent, Revocations, Store, StoreError, StoreFuture, StoredToken, TokenPage,
    REVOCATION_EVENTS_CAPACITY,
};
use envelope::b64_encode;
use protocol::uid::UserId;
use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

mod accounts;
mod contacts;
mod keys;
mod pairings;
mod registrations;
mod revocations;
mod tokens;

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
/// uid -> when the user was revoked entirely ([`Revocation::All`]), seconds
/// since the epoch.
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");
/// uid -> cut-off of [`Revocation::IssuedBefore`], seconds since the epoch.
const REVOKED_BEFORE: TableDefinition<&str, u64> = TableDefinition::new("revoked_before");
/// uid -> when the user registered, seconds since the epoch.
const REGISTRATIONS: TableDefinition<&str, u64> = TableDefinition::new("registrations");
/// `uid \x1f platform` -> sealed platform token.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// Entries per [`crate::PlatformTokens::platform_tokens_page`] page.
const TOKEN_PAGE: usize = 256;

/// Expired nonces are swept once every this many `remember_nonce` calls (a power of two).
const SWEEP_EVERY: u64 = 1024;

/// Expired pairing records are swept once every this many opens (a power of two).
const SWEEP_PAIRINGS_EVERY: u64 = 64;

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    db: Arc<Database>,
    nonce_calls: AtomicU64,
    /// Counts pairing opens: expired pairing records are swept every
    /// [`SWEEP_PAIRINGS_EVERY`].
    pairing_opens: AtomicU64,
    events: broadcast::Sender<RevocationEvent>,
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

/// The key of a platform token.
fn token_key(uid: &str, platform: &str) -> String {
    format!("{uid}\x1f{platform}")
}

/// The range of keys holding `uid`'s tokens: `uid \x1f` up to, excluding,
/// `uid \x20` (no platform character sorts below `\x20`).
fn token_range(uid: &str) -> (String, String) {
    (format!("{uid}\x1f"), format!("{uid}\x20"))
}

/// The user's revocation as stored in the two tables.
fn read_revocation(
    all: &impl ReadableTable<&'static str, u64>,
    before: &impl ReadableTable<&'static str, u64>,
    uid: &str,
) -> Result<Option<Revocation>, StoreError> {
    if all.get(uid).map_err(db_err)?.is_some() {
        return Ok(Some(Revocation::All));
    }
    Ok(before
        .get(uid)
        .map_err(db_err)?
        .map(|cutoff| Revocation::IssuedBefore(cutoff.value())))
}

/// Whether the user's revocation, read inside the write transaction `txn`,
/// refuses a token issued at `iat`: a guarded write checks and writes in one
/// transaction, so no revocation can be recorded in between.
fn refused_in(txn: &redb::WriteTransaction, uid: &str, iat: u64) -> Result<bool, StoreError> {
    let all = txn.open_table(REVOKED).map_err(db_err)?;
    let before = txn.open_table(REVOKED_BEFORE).map_err(db_err)?;
    Ok(read_revocation(&all, &before, uid)?.is_some_and(|r| r.refuses(Some(iat))))
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
        txn.open_table(REVOKED_BEFORE).map_err(db_err)?;
        txn.open_table(REGISTRATIONS).map_err(db_err)?;
        txn.open_table(TOKENS).map_err(db_err)?;
        txn.open_table(pairings::PAIRINGS).map_err(db_err)?;
        txn.open_table(pairings::PAIRING_USERS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let (events, _) = broadcast::channel(REVOCATION_EVENTS_CAPACITY);
        Ok(EmbeddedStore {
            db: Arc::new(db),
            nonce_calls: AtomicU64::new(0),
            pairing_opens: AtomicU64::new(0),
            events,
        })
    }

    /// Runs `op` in one write transaction on the blocking pool and commits
    /// it durably when `op` succeeds (an error drops, so aborts, it).
    fn write<T, F>(&self, op: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let out = op(&txn)?;
            txn.commit().map_err(db_err)?;
            Ok(out)
        })
    }

    /// Runs `op` in one read transaction on the blocking pool.
    fn read<T, F>(&self, op: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| op(&db.begin_read().map_err(db_err)?))
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
    use crate::NonceUse;
    use envelope::AesKey;
    use std::time::Duration;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"))
            .await
            .unwrap();
        crate::conformance::exercise(&store).await;
        let events = store.revocation_events();
        crate::conformance::exercise_events(&store, events).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pairing_claims_race_to_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"))
            .await
            .unwrap();
        crate::pairings_conformance::racing_claims(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn tokens_registration_and_revocation_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let uid = UserId::parse("68946").unwrap();
        {
            let store = EmbeddedStore::open(&path).await.unwrap();
            store
                .put_platform_token(&uid, "x", b"sealed")
                .await
                .unwrap();
            store.put_registration(&uid, 77).await.unwrap();
            store
                .revoke_user(&uid, Revocation::IssuedBefore(9))
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(&path).await.unwrap();
        assert_eq!(
            store.platform_token(&uid, "x").await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );
        assert_eq!(store.registration(&uid).await.unwrap(), Some(77));
        assert_eq!(
            store.revocation(&uid).await.unwrap(),
            Some(Revocation::IssuedBefore(9))
        );
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
            assert!(store
                .remember_nonce(NonceUse::new(&uid, "k", b"n", ttl))
                .await
                .unwrap());
        }
        let store = EmbeddedStore::open(&path).await.unwrap();
        assert_eq!(store.get_key(&uid).await.unwrap(), Some(record));
        let ttl = Duration::from_secs(60);
        assert!(!store
            .remember_nonce(NonceUse::new(&uid, "k", b"n", ttl))
            .await
            .unwrap());
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
