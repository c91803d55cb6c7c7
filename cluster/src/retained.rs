//! Owns retained messages across nodes. Only handlers publish retained
//! messages (a device's retain flag is cleared by its gate; its will is
//! never retained), to any topic; devices subscribe to their own
//! `<uid>_...` topics, handlers to anything.
//!
//! - Out: a retained publish accepted on any node is queued (bounded) and
//!   stored by one script, in the `{retained}` slot: the hash
//!   `{retained}:topics` (topic -> the time it was stored and the entry;
//!   an empty payload deletes the topic), the byte count
//!   `{retained}:bytes`, and the stream `{retained}:log` (`MAXLEN ~`),
//!   which logs every change. Beyond [`MAX_TOPICS`] topics or
//!   [`MAX_BYTES`] bytes a new message is refused (logged, counted as
//!   `retained_cap`): it stays retained on the node that received it only.
//!   With `BROKER_CLUSTER_WAIT_REPLICAS` n, each batch ends with `WAIT n
//!   100` on its connection, as the appends do: a QoS 1 retained publish's
//!   PUBACK comes once n replicas have it (or the wait ran out, logged).
//! - In: each node reads the log (blocking `XREAD` on a connection of its
//!   own, from the last id it applied, reconnecting with backoff) and hands
//!   each change to its own router as a retained publish (through the
//!   local decision first, so a topic that held a retained message leaves
//!   the gate's inboxes). At start, and whenever it reconnects to a log
//!   that no longer holds the last change it applied (trimmed past it, or
//!   a failover to a replica that never copied it), it loads the whole
//!   hash instead (topics it holds and the hash no longer does are
//!   deleted) and reads on from the log's newest change.
//! - Once per node: the node remembers a digest of what its router holds
//!   per topic (what it received itself, or applied), and a change equal
//!   to it is not applied again, so a live subscriber gets a retained
//!   message once per node (a node's own change comes back in the log).
//!   Retained publishes take only this path, never the user's reply stream.

use crate::entry::{Entry, StreamId};
use crate::redis_conn::{Redis, WAIT_TIMEOUT};
use crate::replies::inject;
use crate::{Append, Node};
use broker::delivery::Delivery;
use broker::inject::InjectLink;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

pub const TOPICS_KEY: &str = "{retained}:topics";
pub const LOG_KEY: &str = "{retained}:log";
pub const BYTES_KEY: &str = "{retained}:bytes";
/// Most retained topics in the cluster (and held per node).
pub const MAX_TOPICS: usize = 10_000;
/// Most bytes of retained entries in the cluster.
pub const MAX_BYTES: u64 = 32 * 1024 * 1024;
/// Changes kept in the log (approximately): a node that missed more while
/// disconnected loads the hash again.
pub const LOG_MAXLEN: usize = 10_000;
/// Retained publishes waiting to be stored; beyond it dropped, counted,
/// and a QoS 1 publish answered `Quota exceeded` (its PUBACK waits for the
/// store, so a handler's in-flight window paces it).
pub const STORE_QUEUE: usize = 4096;
const BATCH: usize = 128;
const BLOCK: Duration = Duration::from_secs(2);
const READ_COUNT: usize = 100;
const LOAD_PAGE: usize = 500;
/// Before every change of the log (`XREAD` from it reads them all).
const LOG_START: StreamId = StreamId { ms: 0, seq: 0 };
/// How long a store is retried (a failover) before it is dropped.
const STORE_RETRY_FOR: Duration = Duration::from_secs(10);

/// Stores (or, with `ARGV[3]` = 1, deletes) one retained topic under the
/// caps, and logs the change. KEYS: topics, log, bytes. ARGV: topic,
/// value, delete, max topics, max bytes, log length. Returns `ok`,
/// `topics` or `bytes` (refused: the cap it hit).
const STORE_SCRIPT: &str = "\
local old = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  if old > 0 then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('DECRBY', KEYS[3], old)
  end
else
  local size = string.len(ARGV[2])
  if old == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 'topics' end
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used - old + size > tonumber(ARGV[5]) then return 'bytes' end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[3], size - old)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', ARGV[1], 'v', ARGV[2])
return 'ok'";

/// What each node's router holds retained, by topic: a digest of the
/// entry (bounded by [`MAX_TOPICS`]).
#[derive(Default)]
pub struct Held(Mutex<HashMap<String, u64>>);

impl Held {
    /// Records what the router now holds for `topic` (an empty payload:
    /// nothing); false when it is already that.
    fn set(&self, topic: &str, entry: &[u8], deleted: bool) -> bool {
        let mut held = self.0.lock();
        if deleted {
            return held.remove(topic).is_some();
        }
        let digest = digest(entry);
        if held.get(topic) == Some(&digest) {
            return false;
        }
        if held.len() < MAX_TOPICS || held.contains_key(topic) {
            held.insert(topic.to_owned(), digest);
        }
        true
    }

    /// A retained publish this node's gate received (its router has it).
    pub fn received(&self, topic: &str, entry: &[u8], deleted: bool) {
        self.set(topic, entry, deleted);
    }

    fn holds(&self, topic: &str) -> bool {
        self.0.lock().contains_key(topic)
    }

    fn topics(&self) -> Vec<String> {
        self.0.lock().keys().cloned().collect()
    }
}

/// FNV-1a 64 of an entry's bytes (what a node's router holds per topic).
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The stored value: the time it was stored (Unix ms, 8 bytes big-endian)
/// then the entry.
pub fn value(stored_ms: u64, entry: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + entry.len());
    value.extend_from_slice(&stored_ms.to_be_bytes());
    value.extend_from_slice(entry);
    value
}

/// The time and entry of a stored value.
pub fn split_value(value: &[u8]) -> Option<(u64, &[u8])> {
    let (ms, entry) = value.split_at_checked(8)?;
    Some((u64::from_be_bytes(ms.try_into().ok()?), entry))
}

/// The entry as it is handed to a router at `now_ms`: its Message Expiry
/// Interval less the whole seconds since it was stored; `None` once
/// expired.
pub fn as_of(mut entry: Entry, stored_ms: u64, now_ms: u64) -> Option<Entry> {
    if let Some(properties) = entry.properties.as_mut() {
        if let Some(interval) = properties.message_expiry_interval {
            let waited = now_ms.saturating_sub(stored_ms) / 1000;
            let left = u64::from(interval).checked_sub(waited).filter(|s| *s > 0)?;
            properties.message_expiry_interval = u32::try_from(left).ok();
        }
    }
    Some(entry)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A retained publish to store: its topic (`key`), entry, and a QoS 1
/// publish's ticket, settled once stored (or refused, or given up).
pub type StoreQueue = mpsc::Sender<Append>;

/// Stores what is queued, one pipelined batch at a time on the `{retained}`
/// slot, until the queue closes or the node shuts down; settles each
/// ticket: stored, or failed (refused by a cap, Redis gave up).
pub async fn store(node: Arc<Node>, mut queue: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        let pipe = store_pipe(batch.iter().map(|a| (a.key.as_str(), &a.entry)), now_ms());
        match store_batch(&node.redis, pipe, batch.len()).await {
            Ok(answers) => {
                let mut answers = answers.into_iter();
                for Append {
                    key: topic, ticket, ..
                } in batch.drain(..)
                {
                    let topic = &topic;
                    let answer = answers.next().unwrap_or_default();
                    if answer == "ok" {
                        node.metrics().cluster_moved("retained_out", 1);
                    } else {
                        node.metrics().cluster_dropped("retained_cap", 1);
                        warn!(topic, cap = %answer, max_topics = MAX_TOPICS, max_bytes = MAX_BYTES, "a retained message is refused by the cluster's cap on retained {answer}: it stays retained on this node only");
                    }
                    Append::settle(ticket, answer == "ok");
                }
            }
            Err(e) => {
                node.metrics()
                    .cluster_dropped("redis_error", batch.len() as u64);
                warn!(error = %e, messages = batch.len(), "retained messages not stored in Redis: retained on this node only");
                for append in batch.drain(..) {
                    Append::settle(append.ticket, false);
                }
            }
        }
        batch.clear();
    }
}

/// The store script of each (topic, entry), stored at `stored` (ms).
fn store_pipe<'a>(
    items: impl Iterator<Item = (&'a str, &'a Bytes)>,
    stored: u64,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for (topic, entry) in items {
        let deleted = Entry::decode(entry).is_ok_and(|e| e.publish.payload.is_empty());
        pipe.cmd("EVAL")
            .arg(STORE_SCRIPT)
            .arg(3)
            .arg(TOPICS_KEY)
            .arg(LOG_KEY)
            .arg(BYTES_KEY)
            .arg(topic)
            .arg(value(stored, entry))
            .arg(if deleted { "1" } else { "0" })
            .arg(MAX_TOPICS)
            .arg(MAX_BYTES)
            .arg(LOG_MAXLEN);
    }
    pipe
}

/// Runs `pipe`, the store scripts of a batch of `scripts` (one slot):
/// their answers. With `BROKER_CLUSTER_WAIT_REPLICAS` n it ends with
/// `WAIT n 100` on the same connection (a keyless command: the cluster
/// connection sends the pipeline to the master of the scripts' slot), so
/// the batch counts as stored once n replicas acknowledged it; fewer
/// within the timeout: still stored (the master has it), logged at warn.
async fn store_batch(
    redis: &Redis,
    mut pipe: redis::Pipeline,
    scripts: usize,
) -> redis::RedisResult<Vec<String>> {
    let replicas = redis.wait_replicas();
    if replicas > 0 {
        pipe.cmd("WAIT")
            .arg(replicas)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
    }
    let values = send(redis, &pipe).await?;
    if replicas > 0 {
        let acked = match values.get(scripts) {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        if acked < i64::from(replicas) {
            warn!(
                acked,
                wanted = replicas,
                messages = scripts,
                "cluster_wait_short: retained messages were stored but fewer replicas than BROKER_CLUSTER_WAIT_REPLICAS acknowledged them within 100 ms"
            );
        }
    }
    Ok(values
        .iter()
        .take(scripts)
        .map(|value| match value {
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            redis::Value::SimpleString(text) => text.clone(),
            _ => String::new(),
        })
        .collect())
}

/// Sends `pipe` (one slot), retrying with backoff through a failover.
async fn send(redis: &Redis, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<redis::Value>> {
    let deadline = Instant::now() + STORE_RETRY_FOR;
    let mut wait = Duration::from_millis(100);
    loop {
        let mut conn = redis.shared();
        match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
            Err(e) if Instant::now() + wait < deadline => {
                warn!(error = %e, retry_in = ?wait, "storing retained messages failed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
                let _ = redis.refresh().await;
            }
            other => return other,
        }
    }
}

/// Follows the log into this node's router until the node shuts down.
pub async fn follow(node: Arc<Node>, held: Arc<Held>) {
    let mut follower = Follower {
        node,
        held,
        last: None,
        link: None,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let shutdown = follower.node.shutdown.clone();
        let followed = tokio::select! {
            _ = shutdown.cancelled() => return,
            followed = follower.follow_until_lost() => followed,
        };
        if let Err(e) = followed {
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            warn!(error = %e, retry_in = ?backoff, "following retained messages in Redis failed");
            let _ = follower.node.redis.refresh().await;
            tokio::select! {
                _ = follower.node.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

struct Follower {
    node: Arc<Node>,
    held: Arc<Held>,
    /// The last change of the log applied here.
    last: Option<StreamId>,
    link: Option<InjectLink>,
}

impl Follower {
    async fn follow_until_lost(&mut self) -> redis::RedisResult<()> {
        let mut conn = self.node.redis.own(LOG_KEY, BLOCK).await?;
        // Reading on after `last` is right only while the log still holds
        // `last`. It does not once trimmed past it, nor after a failover
        // to a replica that never copied it: the promoted master numbers
        // its new changes after its own newest, which may be below `last`
        // (its clock behind the dead master's), so reading after `last`
        // would skip them. Then everything is loaded again (what the hash
        // lost is deleted here too) and the log read from its newest.
        let rewound = match self.last {
            None => true,
            // Loaded from an empty log: every change is after it.
            Some(last) if last == LOG_START => false,
            Some(last) => {
                let id = last.to_string();
                first_id(&mut conn, "XRANGE", &id, &id).await? != Some(last)
            }
        };
        if rewound {
            if self.last.is_some() {
                warn!(
                    last = %self.last.unwrap_or(LOG_START),
                    "the retained log no longer holds the last change applied here (trimmed, or lost by a failover): loading every retained message again"
                );
            }
            let newest = first_id(&mut conn, "XREVRANGE", "+", "-").await?;
            self.load(&mut conn).await?;
            self.last = Some(newest.unwrap_or(LOG_START));
        }
        loop {
            let from = self.last.unwrap_or(LOG_START);
            let value: redis::Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(LOG_KEY)
                .arg(from.to_string())
                .query_async(&mut conn)
                .await?;
            for (id, topic, value) in log_entries(xread_entries(&value)) {
                self.apply(&topic, &value, "retained_in").await;
                self.last = Some(id);
            }
        }
    }

    /// Loads the whole hash (at most [`MAX_TOPICS`]); topics held here
    /// and no longer in it are deleted.
    async fn load(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let mut cursor = "0".to_owned();
        let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
        loop {
            let (next, pairs): (String, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
                .arg(TOPICS_KEY)
                .arg(&cursor)
                .arg("COUNT")
                .arg(LOAD_PAGE)
                .query_async(conn)
                .await?;
            for (topic, value) in pairs {
                if seen.len() >= MAX_TOPICS {
                    break;
                }
                seen.insert(topic, value);
            }
            if next == "0" || seen.len() >= MAX_TOPICS {
                break;
            }
            cursor = next;
        }
        if seen.len() >= MAX_TOPICS {
            warn!(
                max = MAX_TOPICS,
                "more retained topics in Redis than a node holds: the rest are not loaded"
            );
        }
        for topic in self.held.topics() {
            if !seen.contains_key(&topic) {
                self.delete(&topic).await;
            }
        }
        let count = seen.len();
        for (topic, value) in seen {
            self.apply(&topic, &value, "retained_loaded").await;
        }
        info!(topics = count, "retained messages loaded from Redis");
        Ok(())
    }

    /// Hands one stored value to this node's router, unless it holds it.
    async fn apply(&mut self, topic: &str, value: &[u8], what: &'static str) {
        let Some((stored_ms, bytes)) = split_value(value) else {
            self.node.metrics().cluster_dropped("undecodable", 1);
            return;
        };
        let entry = match Entry::decode(bytes) {
            Ok(entry) => entry,
            Err(e) => {
                self.node.metrics().cluster_dropped("undecodable", 1);
                warn!(error = %e, topic, "an unreadable retained entry: skipped");
                return;
            }
        };
        let deleted = entry.publish.payload.is_empty();
        let held_before = self.held.holds(topic);
        if !self.held.set(topic, bytes, deleted) {
            return;
        }
        match as_of(entry, stored_ms, now_ms()) {
            Some(entry) => self.hand_over(topic, entry, what).await,
            // Expired: nothing is retained any more.
            None if held_before => self.delete(topic).await,
            None => {
                self.held.set(topic, &[], true);
            }
        }
    }

    /// Deletes the retained message of `topic` in this node's router.
    async fn delete(&mut self, topic: &str) {
        self.held.set(topic, &[], true);
        let publish = broker::router::protocol::Publish::new(
            Bytes::from(topic.to_owned()),
            Bytes::new(),
            true,
        );
        let entry = Entry {
            origin: String::new(),
            left_to_stream: false,
            publish,
            properties: None,
        };
        self.hand_over(topic, entry, "retained_in").await;
    }

    /// The local decision (inboxes; the table learns the topic is
    /// retained), then the router.
    async fn hand_over(&mut self, topic: &str, entry: Entry, what: &'static str) {
        let routed = self
            .node
            .local()
            .route(topic, &entry.publish, &entry.properties);
        routed.record(self.node.metrics(), topic);
        if routed.needs_router && inject(&self.node, &mut self.link, entry).await {
            self.node.metrics().cluster_moved(what, 1);
        }
    }
}

/// The id of the first entry `XRANGE`/`XREVRANGE` gives from `start`.
async fn first_id(
    conn: &mut redis::aio::MultiplexedConnection,
    command: &str,
    start: &str,
    end: &str,
) -> redis::RedisResult<Option<StreamId>> {
    let value: redis::Value = redis::cmd(command)
        .arg(LOG_KEY)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(crate::stream_entries(&value).first().map(|(id, _)| *id))
}

/// The entries of the one stream of an `XREAD` answer (`[[key,
/// entries]]`, or nil when the block timed out).
fn xread_entries(value: &redis::Value) -> &redis::Value {
    match value {
        redis::Value::Array(streams) => match streams.first() {
            Some(redis::Value::Array(pair)) => pair.get(1).unwrap_or(&redis::Value::Nil),
            _ => &redis::Value::Nil,
        },
        _ => &redis::Value::Nil,
    }
}

/// The changes of the log's entries: (id, topic, value).
fn log_entries(entries: &redis::Value) -> Vec<(StreamId, String, Vec<u8>)> {
    use redis::Value::{Array, BulkString};
    let Array(entries) = entries else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Array(parts) = entry else { return None };
            let id = match parts.first()? {
                BulkString(id) => StreamId::parse(std::str::from_utf8(id).ok()?)?,
                _ => return None,
            };
            let Array(fields) = parts.get(1)? else {
                return None;
            };
            let field = |name: &[u8]| {
                fields.chunks(2).find_map(|pair| match pair {
                    [BulkString(n), BulkString(v)] if n == name => Some(v.clone()),
                    _ => None,
                })
            };
            let topic = String::from_utf8(field(b"t")?).ok()?;
            Some((id, topic, field(b"v")?))
        })
        .collect()
}

#[cfg(test)]
#[path = "retained_tests.rs"]
mod tests;
