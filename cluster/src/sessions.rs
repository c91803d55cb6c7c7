//! Owns the persistent device sessions this node holds, as the cluster
//! sees them: each one's record (`record.rs`) kept here and written to
//! Redis by one task (queued, coalesced, never awaited by a session; a
//! lease refreshed while the session is live here), read back at CONNECT
//! on the node a device reconnects to (`ClusterDelivery::resume`), and
//! released when another node took the session. Each one's cursor is
//! the end of the prefix of the replies injected for it that its client
//! acknowledged (`cursor.rs`): the replies are tracked here as they are
//! injected (`replies::deliver`), and a session whose cursor stalls is
//! resynced by a replay aimed at it alone (`listener.rs`).
//!
//! Writes are conditional: a node writes a record only while Redis names
//! it the owner (or there is none); the node a session resumed on claims
//! it with a full write. So a node that lost its session (the device went
//! to another node) cannot overwrite the new owner's record.

use crate::cursor::Window;
use crate::entry::StreamId;
use crate::listener::Resume;
use crate::record::{self, record_key, tagged_id, Record};
use crate::redis_conn::{Redis, Replication};
use crate::{mono_ms, Node};
use broker::delivery::{Resumed, SessionSubscription};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

/// Writes a record if this node owns it (or it is new, or the write is a
/// claim), with its time to live.
const WRITE_SCRIPT: &str = "\
local owner = redis.call('HGET', KEYS[1], 'node')
if ARGV[2] == '0' and owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'expiry', ARGV[3], 'subs', ARGV[4], 'cursor', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1";
/// Deletes a record this node owns.
const DELETE_SCRIPT: &str = "\
if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// How long a CONNECT's read of its record may take (under the session's
/// own 2 s): beyond it the client is refused, never left waiting.
const READ_WITHIN: Duration = Duration::from_millis(1800);
/// Writes gathered before a batch goes (acknowledgements coalesce).
const COALESCE: Duration = Duration::from_millis(50);
/// How often leases are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Records read at CONNECT and not yet opened (the connection went away
/// in between) beyond this many are forgotten.
const MAX_PENDING: usize = 10_000;
/// Deletions waiting for the writer, at most.
const MAX_REMOVALS: usize = 64 * 1024;
/// Records written per batch.
const BATCH: usize = 512;
/// A tracked reply's Message Expiry passes it this long after its
/// interval (see [`Persistent::injected`]): more than a paced wait (2 s)
/// and the router's acknowledgement of an injection (10 s).
const EXPIRY_MARGIN: Duration = Duration::from_secs(15);

/// One persistent device session held here.
struct Held {
    expiry: Duration,
    subscriptions: Vec<SessionSubscription>,
    /// Its cursor, and the replies injected for it after it.
    window: Window,
    /// Its client is connected here.
    live: bool,
    /// Changed since written.
    dirty: bool,
    /// Resumed from another node: the next write claims the record.
    claim: bool,
    written: Option<Instant>,
}

/// A change Redis must learn that is not a held record's.
enum Removal {
    /// The session expired or started clean here: deleted if this node
    /// owns it (`owned`) or whoever does.
    Delete { key: String, owned: bool },
}

/// The sessions held here, and which per user.
#[derive(Default)]
struct Sessions {
    by_id: HashMap<String, Held>,
    users: HashMap<String, Vec<String>>,
}

impl Sessions {
    fn insert(&mut self, id: &str, held: Held) {
        if self.by_id.insert(id.to_owned(), held).is_none() {
            if let Some(uid) = crate::device_uid(id) {
                self.users
                    .entry(uid.to_owned())
                    .or_default()
                    .push(id.to_owned());
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<Held> {
        let held = self.by_id.remove(id)?;
        if let Some(uid) = crate::device_uid(id) {
            if let Some(ids) = self.users.get_mut(uid) {
                ids.retain(|held| held != id);
                if ids.is_empty() {
                    self.users.remove(uid);
                }
            }
        }
        Some(held)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Held> {
        self.by_id.get_mut(id)
    }
}

/// The persistent device sessions held here, by session id.
#[derive(Default)]
pub struct Persistent {
    held: Mutex<Sessions>,
    /// Records read at CONNECT, by session id: the cursor to replay from.
    resumed: Mutex<HashMap<String, StreamId>>,
    removals: Mutex<Vec<Removal>>,
    changed: Notify,
}

/// A session to resync: its user, its id, and the cursor to replay after.
type Resync = (String, String, StreamId);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Persistent {
    /// Queues `removal`; beyond [`MAX_REMOVALS`] waiting (Redis is slow
    /// or away) it is left to the record's lifetime.
    fn remove(&self, removal: Removal) {
        let mut removals = self.removals.lock();
        if removals.len() < MAX_REMOVALS {
            removals.push(removal);
        }
    }

    /// Whether session `id` is held here (live or kept).
    pub fn holds(&self, id: &str) -> bool {
        self.held.lock().by_id.contains_key(id)
    }

    /// Whether a persistent session of `uid` is held here: its replies go
    /// through the stream, so each carries its id to the client.
    pub fn holds_user(&self, uid: &str) -> bool {
        self.held.lock().users.contains_key(uid)
    }

    /// The persistent sessions of `uid` held here, by id.
    pub fn sessions_of(&self, uid: &str) -> Vec<String> {
        self.held.lock().users.get(uid).cloned().unwrap_or_default()
    }

    /// A connection of device session `id` opened here. A clean start
    /// deletes what Redis held of it; a persistent session is held (again)
    /// with its client live. Returns the cursor to replay the user's
    /// stream from when the session came from another node.
    pub fn open(&self, id: &str, persistent: bool, clean_start: bool) -> Option<StreamId> {
        let resumed = self.resumed.lock().remove(id);
        let mut held = self.held.lock();
        if clean_start {
            held.remove(id);
            if !persistent {
                if let Some(key) = record_key(id) {
                    self.remove(Removal::Delete { key, owned: false });
                }
            }
        }
        if !persistent {
            self.changed.notify_one();
            return None;
        }
        let replay = match (held.get_mut(id), resumed) {
            (Some(kept), _) => {
                kept.live = true;
                kept.dirty = true;
                None
            }
            (None, resumed) => {
                held.insert(
                    id,
                    Held {
                        expiry: Duration::ZERO,
                        subscriptions: Vec::new(),
                        window: Window::new(
                            resumed.unwrap_or_else(|| record::fresh_cursor(now_ms())),
                        ),
                        live: true,
                        dirty: true,
                        // A clean start replaces whatever another node left.
                        claim: true,
                        written: None,
                    },
                );
                resumed
            }
        };
        self.changed.notify_one();
        replay
    }

    fn change(&self, id: &str, change: impl FnOnce(&mut Held) -> bool) {
        if let Some(held) = self.held.lock().get_mut(id) {
            if change(held) {
                held.dirty = true;
                self.changed.notify_one();
            }
        }
    }

    pub fn expiry(&self, id: &str, expiry: Duration) {
        self.change(id, |held| {
            let changed = held.expiry != expiry;
            held.expiry = expiry;
            changed
        });
    }

    pub fn subscribed(&self, id: &str, subscriptions: &[SessionSubscription]) {
        self.change(id, |held| {
            for new in subscriptions {
                held.subscriptions.retain(|s| s.filter != new.filter);
                if held.subscriptions.len() < record::MAX_SUBSCRIPTIONS {
                    held.subscriptions.push(new.clone());
                }
            }
            true
        });
    }

    pub fn unsubscribed(&self, id: &str, filters: &[String]) {
        self.change(id, |held| {
            let before = held.subscriptions.len();
            held.subscriptions.retain(|s| !filters.contains(&s.filter));
            held.subscriptions.len() != before
        });
    }

    /// The client of `id` acknowledged the reply `tag` names.
    pub fn delivered(&self, id: &str, tag: &str) {
        if let Some(reply) = tagged_id(tag) {
            self.change(id, |held| held.window.acked(reply, mono_ms()));
        }
    }

    /// The reply `tag` names will not be written to the client of `id`
    /// (too large for it): not waited for.
    pub fn skipped(&self, id: &str, tag: &str) {
        if let Some(reply) = tagged_id(tag) {
            self.change(id, |held| held.window.skipped(reply, mono_ms()));
        }
    }

    /// Reply `reply` on `topic` was injected into the router here with its
    /// delivery tag, for every session of `uid` (`target` None) or for
    /// session `target` alone: each persistent one held here that the
    /// router serves it to (one of its subscriptions matches) waits for
    /// its acknowledgement. `expiry`: its Message Expiry Interval.
    pub fn injected(
        &self,
        uid: &str,
        topic: &str,
        reply: StreamId,
        expiry: Option<Duration>,
        target: Option<&str>,
    ) {
        let now = mono_ms();
        // The router counts the expiry from when it took the reply, which
        // may be after a paced wait or a slow router: never passed early.
        let expires = expiry.map(|e| {
            now.saturating_add(
                u64::try_from(e.saturating_add(EXPIRY_MARGIN).as_millis()).unwrap_or(u64::MAX),
            )
        });
        let mut sessions = self.held.lock();
        let Sessions { by_id, users } = &mut *sessions;
        let Some(ids) = users.get(uid) else {
            return;
        };
        for id in ids {
            if target.is_some_and(|target| target != id) {
                continue;
            }
            let Some(held) = by_id.get_mut(id) else {
                continue;
            };
            let served = held.subscriptions.iter().any(|s| {
                protocol::topics::split_shared(&s.filter).is_none()
                    && protocol::topics::matches(topic, &s.filter)
            });
            if served {
                held.window.injected(reply, now, expires);
            }
        }
    }

    /// The replay for session `id` (its resume here, or a resync) was
    /// injected whole (`read`), or not: then its cursor stays until a
    /// resync.
    pub fn replayed(&self, id: &str, read: bool) {
        self.change(id, |held| {
            if read {
                held.window.resynced(mono_ms())
            } else {
                held.window.resync_lost();
                false
            }
        });
    }

    /// The connection of `id` ended; the record lives for its expiry.
    pub fn close(&self, id: &str) {
        self.change(id, |held| {
            held.live = false;
            true
        });
    }

    /// Session `id` expired here: its record goes, if still this node's.
    pub fn expire(&self, id: &str) {
        if self.held.lock().remove(id).is_some() {
            if let Some(key) = record_key(id) {
                self.remove(Removal::Delete { key, owned: true });
                self.changed.notify_one();
            }
        }
    }

    /// Session `id` now lives on another node: forgotten here, its record
    /// left to that node.
    pub fn moved(&self, id: &str) -> bool {
        self.held.lock().remove(id).is_some()
    }

    /// Reads session `id`'s record at CONNECT: `Moved` (its subscriptions;
    /// its cursor kept for [`Persistent::open`]) when it lived elsewhere.
    pub async fn resume(self: Arc<Self>, redis: Redis, id: String) -> Resumed {
        if self.holds(&id) {
            return Resumed::Here;
        }
        let Some(key) = record_key(&id) else {
            return Resumed::Here;
        };
        let mut conn = redis.shared();
        let read = tokio::time::timeout(
            READ_WITHIN,
            redis::cmd("HGETALL")
                .arg(&key)
                .query_async::<Vec<(Vec<u8>, Vec<u8>)>>(&mut conn),
        )
        .await;
        let pairs = match read {
            Ok(Ok(pairs)) => pairs,
            Ok(Err(e)) => {
                warn!(error = %e, "a session's record could not be read");
                return Resumed::Unavailable;
            }
            Err(_) => {
                warn!("a session's record was not read in time");
                return Resumed::Unavailable;
            }
        };
        match Record::from_fields(&pairs) {
            Ok(None) => Resumed::Here,
            Ok(Some(record)) => {
                info!(
                    session = id,
                    from = record.node,
                    subscriptions = record.subscriptions.len(),
                    "a persistent session resumes here"
                );
                let mut resumed = self.resumed.lock();
                if resumed.len() >= MAX_PENDING {
                    resumed.clear();
                }
                resumed.insert(id, record.cursor);
                Resumed::Moved(record.subscriptions)
            }
            Err(e) => {
                // Unreadable: started afresh rather than refused forever.
                warn!(error = %e, "a session's record is unreadable: the session starts afresh");
                Resumed::Here
            }
        }
    }

    /// What is due: the removals, the records changed or whose lease
    /// needs refreshing (marked written), and the sessions whose cursor
    /// must resync (`cursor.rs`).
    fn due(&self, node: &str, now: Instant) -> (Vec<Removal>, Vec<(String, Write)>, Vec<Resync>) {
        let removals = std::mem::take(&mut *self.removals.lock());
        let mut writes = Vec::new();
        let mut resyncs = Vec::new();
        let ms = mono_ms();
        for (id, held) in self.held.lock().by_id.iter_mut() {
            if held.window.advance(ms) {
                held.dirty = true;
            }
            if let (Some(uid), Some(from)) =
                (crate::device_uid(id), held.window.resync(ms, held.live))
            {
                resyncs.push((uid.to_owned(), id.clone(), from));
            }
            let refresh = held.live
                && held
                    .written
                    .is_none_or(|at| now.duration_since(at) >= record::LEASE / 3);
            if !(held.dirty || refresh) || writes.len() == BATCH {
                continue;
            }
            let Some(key) = record_key(id) else { continue };
            let record = Record {
                node: node.to_owned(),
                expiry_secs: held.expiry.as_secs(),
                subscriptions: held.subscriptions.clone(),
                cursor: held.window.cursor(),
            };
            writes.push((
                key,
                Write {
                    id: id.clone(),
                    record,
                    claim: held.claim,
                    ttl: record::ttl(held.live, held.expiry),
                },
            ));
            held.dirty = false;
            held.claim = false;
            held.written = Some(now);
        }
        (removals, writes, resyncs)
    }
}

/// `read` (a CONNECT's read of its record); a session that moved here
/// has the listener hold its user's live replies until its replay.
pub async fn holding_replies(
    read: impl std::future::Future<Output = Resumed>,
    resumes: tokio::sync::mpsc::Sender<crate::listener::Resume>,
    uid: Option<String>,
) -> Resumed {
    let resumed = read.await;
    if let (Resumed::Moved(_), Some(uid)) = (&resumed, uid) {
        let _ = resumes.try_send(crate::listener::Resume::Hold(uid));
    }
    resumed
}

/// One record to write.
struct Write {
    id: String,
    record: Record,
    claim: bool,
    ttl: Duration,
}

impl Persistent {
    /// `writes` did not all reach Redis: the sessions still held are
    /// written again (claiming again where they claimed).
    fn retry(&self, writes: &[(String, Write)]) {
        let mut held = self.held.lock();
        for (_, write) in writes {
            if let Some(session) = held.get_mut(&write.id) {
                session.dirty = true;
                session.claim |= write.claim;
            }
        }
    }
}

/// Writes the records of the persistent sessions held here, and deletes
/// the ones that ended, until the node shuts down: a batch (coalesced for
/// a moment) when something changed, and the leases of live sessions
/// refreshed. Sessions whose cursor must resync are handed to the
/// listener (`resumes`) for a replay aimed at each.
pub async fn write(node: Arc<Node>, resumes: mpsc::Sender<Resume>) {
    let persistent = node.persistent.clone();
    let write_script = redis::Script::new(WRITE_SCRIPT);
    let delete_script = redis::Script::new(DELETE_SCRIPT);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut more = false;
    loop {
        if !more {
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                () = persistent.changed.notified() => {
                    tokio::time::sleep(COALESCE).await;
                }
                _ = tick.tick() => {}
            }
        } else if node.shutdown.is_cancelled() {
            return;
        }
        let (removals, writes, resyncs) = persistent.due(&node.id, Instant::now());
        for (uid, session, from) in resyncs {
            info!(
                session,
                "a session's cursor stalled or fell behind: its replies after it are replayed to it"
            );
            let replay = Resume::Replay {
                uid,
                from,
                session: session.clone(),
            };
            if resumes.try_send(replay).is_err() {
                // Asked again on the next tick.
                persistent.replayed(&session, false);
            }
        }
        // A full batch: more may be due at once.
        more = writes.len() == BATCH;
        if !removals.is_empty() {
            let keyed: Vec<(String, bool)> = removals
                .into_iter()
                .map(|Removal::Delete { key, owned }| (key, owned))
                .collect();
            let pipe = |group: &[&(String, bool)], full: bool| {
                let mut pipe = redis::pipe();
                for (key, owned) in group {
                    if *owned {
                        if full {
                            pipe.cmd("EVAL").arg(DELETE_SCRIPT);
                        } else {
                            pipe.cmd("EVALSHA").arg(delete_script.get_hash());
                        }
                        pipe.arg(1).arg(key).arg(&*node.id).ignore();
                    } else {
                        pipe.cmd("DEL").arg(key).ignore();
                    }
                }
                pipe
            };
            for (n, sent) in node
                .redis
                .send_grouped(&keyed, |(key, _)| key, pipe, Replication::Awaited)
                .await
            {
                if let Err(e) = sent {
                    node.metrics().cluster_dropped("session_record", n);
                    warn!(error = %e, records = n, "session records not deleted (they lapse by their TTL)");
                }
            }
        }
        if writes.is_empty() {
            continue;
        }
        let pipe = |group: &[&(String, Write)], full: bool| {
            let mut pipe = redis::pipe();
            for (key, write) in group {
                if full {
                    pipe.cmd("EVAL").arg(WRITE_SCRIPT);
                } else {
                    pipe.cmd("EVALSHA").arg(write_script.get_hash());
                }
                let [_, expiry, subs, cursor] = write.record.fields();
                let ttl_ms = u64::try_from(write.ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .clamp(1, i64::MAX as u64);
                pipe.arg(1)
                    .arg(key)
                    .arg(&write.record.node)
                    .arg(if write.claim { "1" } else { "0" })
                    .arg(expiry.1)
                    .arg(subs.1)
                    .arg(cursor.1)
                    .arg(ttl_ms)
                    .ignore();
            }
            pipe
        };
        let mut failed = false;
        for (n, sent) in node
            .redis
            .send_grouped(&writes, |(key, _)| key, pipe, Replication::Awaited)
            .await
        {
            if let Err(e) = sent {
                failed = true;
                node.metrics().cluster_dropped("session_record", n);
                warn!(error = %e, records = n, "session records not written; written again with the next batch");
            }
        }
        if failed {
            // Which group failed is not told: the whole batch again (the
            // writes are idempotent), after the next tick.
            persistent.retry(&writes);
            more = false;
        }
    }
}
