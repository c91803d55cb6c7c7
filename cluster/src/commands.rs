//! Owns the handler plane: commands to handler groups (`sync`, `publish`,
//! ...).
//!
//! - Out: a publish to a command topic is appended to one partition of the
//!   topic's streams (`c:{<topic>:<p>}`, `p` a hash of the stamped user id:
//!   one user's commands stay in order), pipelined per batch, from a
//!   bounded queue (full: dropped and counted). The local router does not
//!   get it: local handlers read it from the stream like any other node's.
//! - In: for each handler filter declared on this node, one reader per
//!   partition, each on a Redis connection of its own (its `XREADGROUP
//!   BLOCK` holds nothing else up), in the consumer group of the filter
//!   (`entry::consumer_group`). An entry is injected into the local router
//!   with a delivery tag naming it (`acks::CommandTag`), and acknowledged
//!   (`XACK`, `acks.rs`) once a handler here acknowledged it: its PUBACK
//!   (QoS 1), PUBCOMP (QoS 2), or its write (QoS 0).
//! - Reclaim: every [`CLAIM_EVERY`], each reader takes over (`XAUTOCLAIM`)
//!   entries of its group idle for more than [`CLAIM_IDLE`]: what a dead
//!   node or a dead handler held, or a router dropped, is delivered again
//!   within about `CLAIM_IDLE + CLAIM_EVERY` of its last delivery, at most
//!   `acks::MAX_DELIVERIES` times in all (then acknowledged, dropped,
//!   counted and logged). First it keeps what handlers here are still
//!   working on from looking idle (`XCLAIM` to itself, `JUSTID`: the
//!   delivery count stays), for up to `holds::HOLD_MAX_MS` (`holds.rs`):
//!   a handler whose code runs longer than `CLAIM_IDLE` is not raced by
//!   another node's.

use crate::acks::{CommandTag, MAX_DELIVERIES};
use crate::command_groups::{Groups, MAX_GROUPS};
use crate::entry::{command_key, Entry, StreamId, PARTITIONS};
use crate::mono_ms;
use crate::redis_conn::Replication;
use crate::replies::inject_for;
use crate::{Append, Node};
use broker::delivery::DELIVERY_TAG;
use broker::router::Audience;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Entries kept per command partition (approximately); older ones are
/// trimmed even if no group read them (no handler for hours).
pub const COMMAND_STREAM_MAXLEN: usize = 100_000;
/// Commands waiting to be appended; beyond it they are dropped and counted.
pub const APPEND_QUEUE: usize = 16 * 1024;
/// An entry a consumer read and did not acknowledge for this long is taken
/// over by another reader of its group.
pub const CLAIM_IDLE: Duration = Duration::from_secs(15);
/// How often each reader looks for such entries.
pub const CLAIM_EVERY: Duration = Duration::from_secs(5);
/// How long one blocking read waits for new entries.
const BLOCK: Duration = Duration::from_secs(2);
/// Entries read at once.
const READ_COUNT: usize = 100;
const BATCH: usize = 256;
/// Appends what is queued (to its stream key), one pipelined batch at a
/// time, until the queue closes or the node shuts down; each command's
/// waiting session (a QoS 1 publish) is told how its append went once its
/// pipeline returned (after `WAIT` when `BROKER_CLUSTER_WAIT_REPLICAS` is
/// set; after the retries of [`crate::redis_conn::APPEND_RETRY_FOR`] when
/// it failed).
pub(crate) async fn append(node: Arc<Node>, mut queue: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        let mut tickets: Vec<_> = batch.iter_mut().map(|a| a.ticket.take()).collect();
        let indexed: Vec<(usize, &Append)> = batch.iter().enumerate().collect();
        // One pipeline per master on a cluster, sent together.
        let pipe = |group: &[&(usize, &Append)], _full: bool| {
            let mut pipe = redis::pipe();
            for (_, append) in group {
                pipe.cmd("XADD")
                    .arg(&append.key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(COMMAND_STREAM_MAXLEN)
                    .arg("*")
                    .arg("e")
                    .arg(&append.entry[..])
                    .ignore();
            }
            pipe
        };
        let sent = node
            .redis
            .send_grouped_items(&indexed, |(_, a)| &a.key, pipe, Replication::Awaited)
            .await;
        for (group, sent) in sent {
            let n = group.len() as u64;
            for (i, _) in group {
                Append::settle(tickets.get_mut(*i).and_then(Option::take), sent.is_ok());
            }
            match sent {
                Ok(()) => node.metrics().cluster_moved("command_out", n),
                Err(e) => {
                    node.metrics().cluster_dropped("redis_error", n);
                    warn!(error = %e, commands = n, "commands not appended to Redis: dropped");
                }
            }
        }
        batch.clear();
    }
}

/// Starts and stops the readers as handlers here declare and withdraw
/// command filters, until the node shuts down.
pub async fn supervise(node: Arc<Node>, groups: Arc<Groups>) {
    let mut running: HashMap<(String, String), CancellationToken> = HashMap::new();
    // Pairs whose readers already read this consumer's pending entries
    // once in this process (what an earlier process under the same node
    // name left); bounded by the pairs ever read here.
    let mut replayed: HashSet<(String, String)> = HashSet::new();
    loop {
        let wanted = groups.snapshot();
        for pair in &wanted {
            if running.contains_key(pair) {
                continue;
            }
            let stop = node.shutdown.child_token();
            info!(topic = %pair.0, group = %pair.1, "reading a command topic from Redis");
            let replay = replayed.len() < 4 * MAX_GROUPS && replayed.insert(pair.clone());
            for partition in 0..PARTITIONS {
                let reader = Reader {
                    node: node.clone(),
                    key: command_key(&pair.0, partition),
                    group: pair.1.clone(),
                    audience: audience(&pair.0, &pair.1),
                    stop: stop.clone(),
                    replay,
                };
                tokio::spawn(reader.run());
            }
            running.insert(pair.clone(), stop);
        }
        running.retain(|pair, stop| {
            let keep = wanted.contains(pair);
            if !keep {
                info!(topic = %pair.0, group = %pair.1, "no handler here reads this command topic any more");
                stop.cancel();
            }
            keep
        });
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            () = groups.changed.notified() => {}
        }
    }
}

/// The router subscriptions here that the entries consumer group `group`
/// of `topic` reads are for (`entry::consumer_group` the other way):
/// `s:<g>` is `$share/<g>/<topic>` alone, `n:<node>` the plain
/// subscriptions. Each (topic, group) read here gets each command once,
/// whatever other groups of the topic this node reads.
fn audience(topic: &str, group: &str) -> Audience {
    match group.strip_prefix("s:") {
        Some(shared) => Audience::shared_subscription(shared, topic),
        None => Audience::plain_subscriptions(),
    }
}

/// One partition of one command topic, read for one consumer group.
struct Reader {
    node: Arc<Node>,
    key: String,
    group: String,
    /// The subscriptions here its entries are for: those of its consumer
    /// group only (two groups here each read their own).
    audience: Audience,
    stop: CancellationToken,
    /// Read this consumer's pending entries first (see `supervise`).
    replay: bool,
}

impl Reader {
    async fn run(self) {
        self.read_until_stopped().await;
        // No handler here reads it any more: what they held is no longer
        // kept from the other nodes.
        self.node.holds.lock().forget(&self.key, &self.group);
    }

    async fn read_until_stopped(&self) {
        let mut backoff = Duration::from_millis(100);
        let mut replay = self.replay;
        while !self.stop.is_cancelled() {
            let started = Instant::now();
            let read = self.read_until_lost(&mut replay).await;
            if started.elapsed() > Duration::from_secs(30) {
                // It ran for a while: this failure is a new one.
                backoff = Duration::from_millis(100);
            }
            match read {
                Ok(()) => return,
                Err(e) => {
                    warn!(error = %e, key = %self.key, group = %self.group, retry_in = ?backoff, "reading commands from Redis failed");
                    // A failover or a moved slot: the next connection goes
                    // where the slot map now says.
                    let _ = self.node.redis.refresh().await;
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Reads on a connection of its own until stopped (`Ok`) or an error.
    /// `replay`: first read what this consumer (this node's name) read
    /// before and nobody acknowledged, once (then false). Not on a later
    /// connection: this node's pending entries may be in a handler's hands
    /// here, and what is not acknowledged is taken over once idle anyway.
    async fn read_until_lost(&self, replay: &mut bool) -> redis::RedisResult<()> {
        let mut blocking = self.node.redis.own(&self.key, BLOCK).await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut blocking)
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
            _ => {}
        }
        let mut link = None;
        if *replay {
            let mut from = "0".to_owned();
            loop {
                let pending = self.read(&mut blocking, &from, None).await?;
                let Some((last, _)) = pending.last() else {
                    break;
                };
                from = last.to_string();
                self.handle(&mut link, pending, "command_in").await?;
            }
            *replay = false;
        }
        let mut last_claim = Instant::now();
        loop {
            if last_claim.elapsed() >= CLAIM_EVERY {
                last_claim = Instant::now();
                self.keep_held(&mut blocking).await?;
                let claimed = self.claim(&mut blocking).await?;
                if !claimed.is_empty() {
                    info!(key = %self.key, group = %self.group, entries = claimed.len(), "took over commands another consumer left unacknowledged");
                    let claimed = self.under_the_cap(&mut blocking, claimed).await?;
                    self.handle(&mut link, claimed, "reclaimed").await?;
                }
            }
            let read = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                read = self.read(&mut blocking, ">", Some(BLOCK)) => read?,
            };
            self.handle(&mut link, read, "command_in").await?;
        }
    }

    /// `XREADGROUP` from `id` (`>`: new entries; `0`: this consumer's pending).
    async fn read(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        id: &str,
        block: Option<Duration>,
    ) -> redis::RedisResult<Vec<(StreamId, Option<Vec<u8>>)>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&*self.node.id)
            .arg("COUNT")
            .arg(READ_COUNT);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(id);
        let value: redis::Value = cmd.query_async(conn).await?;
        // [[key, entries]] or nil when the block timed out.
        let redis::Value::Array(streams) = value else {
            return Ok(Vec::new());
        };
        Ok(streams
            .first()
            .and_then(|stream| match stream {
                redis::Value::Array(pair) => pair.get(1),
                _ => None,
            })
            .map(crate::stream_entries)
            .unwrap_or_default())
    }

    /// Keeps the entries handlers here are still working on from looking
    /// idle (`holds.rs`): `XCLAIM` to this consumer with `JUSTID`, which
    /// resets their idle time and leaves their delivery count. An entry no
    /// longer pending (acknowledged meanwhile) is left alone by Redis.
    async fn keep_held(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let due = self
            .node
            .holds
            .lock()
            .due(&self.key, &self.group, mono_ms());
        if due.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = due.iter().map(StreamId::to_string).collect();
        redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&*self.node.id)
            .arg(0)
            .arg(&ids)
            .arg("JUSTID")
            .query_async::<redis::Value>(conn)
            .await?;
        self.node
            .metrics()
            .cluster_moved("command_kept", ids.len() as u64);
        Ok(())
    }

    /// `XAUTOCLAIM`: entries of the group idle past [`CLAIM_IDLE`].
    async fn claim(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<Vec<(StreamId, Option<Vec<u8>>)>> {
        let value: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&*self.node.id)
            .arg(CLAIM_IDLE.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(READ_COUNT)
            .query_async(conn)
            .await?;
        // [next cursor, entries, deleted ids]
        Ok(match value {
            redis::Value::Array(parts) => {
                parts.get(1).map(crate::stream_entries).unwrap_or_default()
            }
            _ => Vec::new(),
        })
    }

    /// Of entries just taken over, those delivered fewer than
    /// [`MAX_DELIVERIES`] times before (the count `XAUTOCLAIM` raised,
    /// read with `XPENDING`); the others are acknowledged, dropped, counted
    /// and logged: no handler ever acknowledged them.
    async fn under_the_cap(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        claimed: Vec<(StreamId, Option<Vec<u8>>)>,
    ) -> redis::RedisResult<Vec<(StreamId, Option<Vec<u8>>)>> {
        let (Some((first, _)), Some((last, _))) = (claimed.first(), claimed.last()) else {
            return Ok(claimed);
        };
        let value: redis::Value = redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(&self.group)
            .arg(first.to_string())
            .arg(last.to_string())
            .arg(claimed.len())
            .arg(&*self.node.id)
            .query_async(conn)
            .await?;
        let counts = delivery_counts(&value);
        let (kept, over): (Vec<_>, Vec<_>) = claimed.into_iter().partition(|(id, _)| {
            counts
                .get(id)
                .is_none_or(|&deliveries| deliveries <= MAX_DELIVERIES)
        });
        if over.is_empty() {
            return Ok(kept);
        }
        let ids: Vec<String> = over.iter().map(|(id, _)| id.to_string()).collect();
        self.node
            .metrics()
            .cluster_dropped("redelivery_cap", ids.len() as u64);
        warn!(key = %self.key, group = %self.group, ids = ?ids, max = MAX_DELIVERIES, "commands delivered to handlers this many times and never acknowledged: dropped");
        self.xack(&ids).await?;
        Ok(kept)
    }

    /// Injects each entry into the local router with its delivery tag: it
    /// is acknowledged when a handler here acknowledges it (`acks.rs`).
    /// Entries trimmed since they were read (read back empty), unreadable
    /// ones, and ones whose tag would be too long (acknowledged once the
    /// router took them, as before tags) are acknowledged here. Stops at
    /// the first the router does not take: it and the rest stay pending,
    /// taken over once idle.
    async fn handle(
        &self,
        link: &mut Option<broker::inject::InjectLink>,
        entries: Vec<(StreamId, Option<Vec<u8>>)>,
        what: &'static str,
    ) -> redis::RedisResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut done = Vec::new();
        let mut failed = false;
        for (id, bytes) in entries {
            let Some(bytes) = bytes else {
                done.push(id.to_string());
                continue;
            };
            let mut entry = match Entry::decode(&bytes) {
                Ok(entry) => entry,
                Err(e) => {
                    self.node.metrics().cluster_dropped("undecodable", 1);
                    warn!(error = %e, key = %self.key, "an unreadable command entry: acknowledged and dropped");
                    done.push(id.to_string());
                    continue;
                }
            };
            let command = CommandTag {
                key: self.key.clone(),
                group: self.group.clone(),
                id,
            };
            let tag = command.encode();
            let tagged = tag.is_some();
            if let Some(tag) = tag {
                entry
                    .properties
                    .get_or_insert_with(Default::default)
                    .user_properties
                    .push((DELIVERY_TAG.to_owned(), tag));
                // Before the injection: a QoS 0 command is acknowledged
                // once written, maybe before the injection returns.
                self.node.holds.lock().injected(&command, mono_ms());
            }
            if !inject_for(&self.node, link, entry, &self.audience).await {
                self.node.holds.lock().released(&command);
                failed = true;
                break;
            }
            self.node.metrics().cluster_moved(what, 1);
            if !tagged {
                done.push(id.to_string());
            }
        }
        if !done.is_empty() {
            self.xack(&done).await?;
        }
        if failed {
            return Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "the local router did not take a command",
            )));
        }
        Ok(())
    }

    async fn xack(&self, ids: &[String]) -> redis::RedisResult<()> {
        let mut conn = self.node.redis.shared();
        redis::cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(ids)
            .query_async::<()>(&mut conn)
            .await
    }
}

/// The delivery count of each entry of an `XPENDING` answer in its
/// extended form (`[[id, consumer, idle ms, deliveries], ...]`).
fn delivery_counts(value: &redis::Value) -> HashMap<StreamId, u64> {
    let redis::Value::Array(rows) = value else {
        return HashMap::new();
    };
    rows.iter()
        .filter_map(|row| {
            let redis::Value::Array(fields) = row else {
                return None;
            };
            let id = match fields.first()? {
                redis::Value::BulkString(id) => StreamId::parse(std::str::from_utf8(id).ok()?)?,
                _ => return None,
            };
            let deliveries = match fields.get(3)? {
                redis::Value::Int(n) => u64::try_from(*n).ok()?,
                _ => return None,
            };
            Some((id, deliveries))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::consumer_group;

    #[test]
    fn each_consumer_group_injects_for_its_own_subscriptions() {
        // (filter a handler here declared, node) -> who the entries of its
        // consumer group are injected for
        let table = [
            ("$share/a/sync", Audience::shared_subscription("a", "sync")),
            ("$share/b/sync", Audience::shared_subscription("b", "sync")),
            (
                "$share/g/jobs/resize",
                Audience::shared_subscription("g", "jobs/resize"),
            ),
            ("sync", Audience::plain_subscriptions()),
        ];
        for (filter, expected) in table {
            let (topic, group) = consumer_group(filter, "n1").unwrap();
            assert_eq!(audience(&topic, &group), expected, "{filter}");
        }
    }

    #[test]
    fn delivery_counts_of_an_xpending_answer() {
        use redis::Value::{Array, BulkString, Int, Nil};
        let row = |id: &str, n: i64| {
            Array(vec![
                BulkString(id.as_bytes().to_vec()),
                BulkString(b"node-a".to_vec()),
                Int(15_000),
                Int(n),
            ])
        };
        let answer = Array(vec![
            row("1-0", 1),
            row("2-5", 6),
            Array(vec![BulkString(b"3-0".to_vec())]),
            row("bad", 2),
            row("4-0", -1),
            Nil,
        ]);
        let counts = delivery_counts(&answer);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[&StreamId { ms: 1, seq: 0 }], 1);
        assert_eq!(counts[&StreamId { ms: 2, seq: 5 }], 6);
        assert!(delivery_counts(&Nil).is_empty());
    }
}
