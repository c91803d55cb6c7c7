//! Owns the embedded implementation of [`Store`]: one redb file (by default
//! `DATA_DIR/store.redb`), each operation one ACID transaction run on the
//! blocking pool, committed durably before it returns, so data survives a
//! restart or a crash. Revocation events are an in-process broadcast (one
//! process owns the file, so nobody else can revoke). Key schema: `SCHEMA.md`.

use super::{
    check_platform, KeyRecord, Revocation, RevocationEvent, Store, StoreError, StoreFuture,
    StoredToken, TokenPage, REVOCATION_EVENTS_CAPACITY,
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
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

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

/// Entries per [`Store::platform_tokens_page`] page.
const TOKEN_PAGE: usize = 256;

/// Expired nonces are swept once every this many `remember_nonce` calls (a power of two).
const SWEEP_EVERY: u64 = 1024;

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    db: Arc<Database>,
    nonce_calls: AtomicU64,
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
        txn.commit().map_err(db_err)?;
        let (events, _) = broadcast::channel(REVOCATION_EVENTS_CAPACITY);
        Ok(EmbeddedStore {
            db: Arc::new(db),
            nonce_calls: AtomicU64::new(0),
            events,
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

    fn put_key_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        record: &'a KeyRecord,
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        let uid = uid.as_str().to_owned();
        let bytes = record.encode();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            if refused_in(&txn, &uid, iat)? {
                return Ok(false);
            }
            txn.open_table(KEYS)
                .map_err(db_err)?
                .insert(uid.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)?;
            Ok(true)
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

    fn revoke_user<'a>(&'a self, uid: &'a UserId, revocation: Revocation) -> StoreFuture<'a, ()> {
        let write = self.record_revocation(uid, revocation);
        let uid = uid.clone();
        let events = self.events.clone();
        Box::pin(async move {
            let revocation = write.await?;
            // No subscriber is fine: nobody is listening yet.
            let _ = events.send(RevocationEvent::Revoked { uid, revocation });
            Ok(())
        })
    }

    fn record_revocation<'a>(
        &'a self,
        uid: &'a UserId,
        revocation: Revocation,
    ) -> StoreFuture<'a, Revocation> {
        let name = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let merged = {
                let mut all = txn.open_table(REVOKED).map_err(db_err)?;
                let mut before = txn.open_table(REVOKED_BEFORE).map_err(db_err)?;
                let merged = match read_revocation(&all, &before, &name)? {
                    Some(old) => old.merge(revocation),
                    None => revocation,
                };
                match merged {
                    Revocation::All => {
                        all.insert(name.as_str(), protocol::claims::now_secs())
                            .map_err(db_err)?;
                        before.remove(name.as_str()).map_err(db_err)?;
                    }
                    Revocation::IssuedBefore(cutoff) => {
                        before.insert(name.as_str(), cutoff).map_err(db_err)?;
                    }
                }
                merged
            };
            txn.commit().map_err(db_err)?;
            Ok(merged)
        })
    }

    fn restore_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(REVOKED)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            txn.open_table(REVOKED_BEFORE)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
    }

    fn revocation<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<Revocation>> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let all = txn.open_table(REVOKED).map_err(db_err)?;
            let before = txn.open_table(REVOKED_BEFORE).map_err(db_err)?;
            read_revocation(&all, &before, &uid)
        })
    }

    fn revocation_events(&self) -> broadcast::Receiver<RevocationEvent> {
        self.events.subscribe()
    }

    fn put_registration<'a>(&'a self, uid: &'a UserId, registered_at: u64) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(REGISTRATIONS)
                .map_err(db_err)?
                .insert(uid.as_str(), registered_at)
                .map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
    }

    fn registration<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<u64>> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(REGISTRATIONS).map_err(db_err)?;
            let at = table.get(uid.as_str()).map_err(db_err)?;
            Ok(at.map(|v| v.value()))
        })
    }

    fn put_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
    ) -> StoreFuture<'a, ()> {
        if let Err(e) = check_platform(platform) {
            return Box::pin(async move { Err(e) });
        }
        let name = token_key(uid.as_str(), platform);
        let sealed = sealed.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(TOKENS)
                .map_err(db_err)?
                .insert(name.as_str(), sealed.as_slice())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
    }

    fn put_platform_token_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        if let Err(e) = check_platform(platform) {
            return Box::pin(async move { Err(e) });
        }
        let uid = uid.as_str().to_owned();
        let name = token_key(&uid, platform);
        let sealed = sealed.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            if refused_in(&txn, &uid, iat)? {
                return Ok(false);
            }
            txn.open_table(TOKENS)
                .map_err(db_err)?
                .insert(name.as_str(), sealed.as_slice())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)?;
            Ok(true)
        })
    }

    fn platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        if check_platform(platform).is_err() {
            return Box::pin(async { Ok(None) });
        }
        let name = token_key(uid.as_str(), platform);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(TOKENS).map_err(db_err)?;
            let sealed = table.get(name.as_str()).map_err(db_err)?;
            Ok(sealed.map(|v| v.value().to_vec()))
        })
    }

    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        let uid = uid.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(TOKENS).map_err(db_err)?;
            let (from, to) = token_range(&uid);
            let mut out = Vec::new();
            for entry in table.range(from.as_str()..to.as_str()).map_err(db_err)? {
                let (key, _) = entry.map_err(db_err)?;
                if let Some((_, platform)) = key.value().split_once('\x1f') {
                    out.push(platform.to_owned());
                }
            }
            // Keys are sorted by platform already; sort anyway for the contract.
            out.sort();
            Ok(out)
        })
    }

    fn delete_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, bool> {
        if check_platform(platform).is_err() {
            return Box::pin(async { Ok(false) });
        }
        let name = token_key(uid.as_str(), platform);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let had = txn
                .open_table(TOKENS)
                .map_err(db_err)?
                .remove(name.as_str())
                .map_err(db_err)?
                .is_some();
            txn.commit().map_err(db_err)?;
            Ok(had)
        })
    }

    fn replace_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        old: &'a [u8],
        new: &'a [u8],
    ) -> StoreFuture<'a, bool> {
        if check_platform(platform).is_err() {
            return Box::pin(async { Ok(false) });
        }
        let name = token_key(uid.as_str(), platform);
        let (old, new) = (old.to_vec(), new.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let replaced = {
                let mut table = txn.open_table(TOKENS).map_err(db_err)?;
                let current = table
                    .get(name.as_str())
                    .map_err(db_err)?
                    .map(|v| v.value().to_vec());
                if current.as_deref() == Some(old.as_slice()) {
                    table
                        .insert(name.as_str(), new.as_slice())
                        .map_err(db_err)?;
                    true
                } else {
                    false
                }
            };
            txn.commit().map_err(db_err)?;
            Ok(replaced)
        })
    }

    fn platform_tokens_page<'a>(&'a self, cursor: Option<&'a str>) -> StoreFuture<'a, TokenPage> {
        let cursor = cursor.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(TOKENS).map_err(db_err)?;
            let start = match cursor.as_deref() {
                Some(after) => Bound::Excluded(after),
                None => Bound::Unbounded,
            };
            let mut page = TokenPage::default();
            let mut last = None;
            for entry in table
                .range::<&str>((start, Bound::Unbounded))
                .map_err(db_err)?
                .take(TOKEN_PAGE)
            {
                let (key, sealed) = entry.map_err(db_err)?;
                let key = key.value();
                let (uid, platform) = key
                    .split_once('\x1f')
                    .ok_or_else(|| StoreError::Corrupt("token key without separator".into()))?;
                let uid = UserId::parse(uid)
                    .map_err(|e| StoreError::Corrupt(format!("token key uid: {e}")))?;
                page.tokens.push(StoredToken {
                    uid,
                    platform: platform.to_owned(),
                    sealed: sealed.value().to_vec(),
                });
                last = Some(key.to_owned());
            }
            if page.tokens.len() == TOKEN_PAGE {
                page.next = last;
            }
            Ok(page)
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
            txn.open_table(REGISTRATIONS)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            {
                let (from, to) = token_range(&uid);
                txn.open_table(TOKENS)
                    .map_err(db_err)?
                    .retain_in(from.as_str()..to.as_str(), |_, _| false)
                    .map_err(db_err)?;
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
    use envelope::AesKey;

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
