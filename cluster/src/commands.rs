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
//!   and acknowledged (`XACK`) once the router has taken it (its PUBACK to
//!   the injecting link): the handler's own PUBACK is not visible here, so
//!   a node that dies between the two loses what its router held (see
//!   ARCHITECTURE.md).
//! - Reclaim: every [`CLAIM_EVERY`], each reader takes over (`XAUTOCLAIM`)
//!   entries of its group idle for more than [`CLAIM_IDLE`]: what a dead
//!   node read and never acknowledged is answered within about
//!   `CLAIM_IDLE + CLAIM_EVERY`.

use crate::entry::{command_key, consumer_group, Entry, StreamId, PARTITIONS};
use crate::replies::inject;
use crate::{Append, Node};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
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
/// Most (topic, group) pairs one node reads (each is [`PARTITIONS`]
/// readers, each with a connection of its own).
pub const MAX_GROUPS: usize = 64;

/// The (topic, consumer group) pairs this node reads, with how many live
/// handler subscriptions want each.
#[derive(Default)]
pub struct Groups {
    wanted: Mutex<HashMap<(String, String), usize>>,
    changed: Notify,
}

impl Groups {
    /// A handler here declared `filter`.
    pub fn add(&self, filter: &str, node: &str) {
        let Some(pair) = consumer_group(filter, node) else {
            return;
        };
        let mut wanted = self.wanted.lock();
        if wanted.len() >= MAX_GROUPS && !wanted.contains_key(&pair) {
            // Each pair costs PARTITIONS connections to Redis.
            warn!(topic = %pair.0, group = %pair.1, max = MAX_GROUPS, "too many command topics read on this node: this one is not");
            return;
        }
        let count = wanted.entry(pair).or_default();
        *count += 1;
        if *count == 1 {
            self.changed.notify_one();
        }
    }

    /// A handler here withdrew `filter`.
    pub fn remove(&self, filter: &str, node: &str) {
        let Some(pair) = consumer_group(filter, node) else {
            return;
        };
        let mut wanted = self.wanted.lock();
        if let Some(count) = wanted.get_mut(&pair) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                wanted.remove(&pair);
                self.changed.notify_one();
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, String)> {
        self.wanted.lock().keys().cloned().collect()
    }

    /// The topics read here (each once).
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.wanted.lock().keys().map(|(t, _)| t.clone()).collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }
}

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
            .send_grouped_items(&indexed, |(_, a)| &a.key, pipe)
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
    loop {
        let wanted = groups.snapshot();
        for pair in &wanted {
            if running.contains_key(pair) {
                continue;
            }
            let stop = node.shutdown.child_token();
            info!(topic = %pair.0, group = %pair.1, "reading a command topic from Redis");
            for partition in 0..PARTITIONS {
                let reader = Reader {
                    node: node.clone(),
                    key: command_key(&pair.0, partition),
                    group: pair.1.clone(),
                    stop: stop.clone(),
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

/// One partition of one command topic, read for one consumer group.
struct Reader {
    node: Arc<Node>,
    key: String,
    group: String,
    stop: CancellationToken,
}

impl Reader {
    async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        while !self.stop.is_cancelled() {
            let started = Instant::now();
            let read = self.read_until_lost().await;
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
    async fn read_until_lost(&self) -> redis::RedisResult<()> {
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
        // What this consumer (this node id) read before and did not
        // acknowledge (a restart under the same BROKER_NODE_ID): first.
        loop {
            let pending = self.read(&mut blocking, "0", None).await?;
            if pending.is_empty() {
                break;
            }
            self.handle(&mut link, pending, "command_in").await?;
        }
        let mut last_claim = Instant::now();
        loop {
            if last_claim.elapsed() >= CLAIM_EVERY {
                last_claim = Instant::now();
                let claimed = self.claim(&mut blocking).await?;
                if !claimed.is_empty() {
                    info!(key = %self.key, group = %self.group, entries = claimed.len(), "took over commands another consumer left unacknowledged");
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

    /// Injects each entry into the local router, then acknowledges them
    /// (trimmed entries, read back empty, are acknowledged as they are).
    /// Stops at the first the router does not take: it and the rest stay
    /// pending, read again from `0` on the next connection.
    async fn handle(
        &self,
        link: &mut Option<broker::inject::InjectLink>,
        entries: Vec<(StreamId, Option<Vec<u8>>)>,
        what: &'static str,
    ) -> redis::RedisResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut done = Vec::with_capacity(entries.len());
        let mut failed = false;
        for (id, bytes) in entries {
            if let Some(bytes) = bytes {
                match Entry::decode(&bytes) {
                    Ok(entry) => {
                        if !inject(&self.node, link, entry).await {
                            failed = true;
                            break;
                        }
                        self.node.metrics().cluster_moved(what, 1);
                    }
                    Err(e) => {
                        self.node.metrics().cluster_dropped("undecodable", 1);
                        warn!(error = %e, key = %self.key, "an unreadable command entry: acknowledged and dropped");
                    }
                }
            }
            done.push(id.to_string());
        }
        if !done.is_empty() {
            let mut conn = self.node.redis.shared();
            redis::cmd("XACK")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&done)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if failed {
            return Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "the local router did not take a command",
            )));
        }
        Ok(())
    }
}
