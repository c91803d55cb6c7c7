//! Owns this crate's view of Redis: the store's shared connection
//! (`store::RedisTarget::connect`: one Redis, or a Redis Cluster whose
//! connection routes each command by its key's slot and follows
//! MOVED/ASK), the slot map ([`Topology`]: which master holds a key, read
//! with `CLUSTER SLOTS`, refreshed when a connection says it moved), and
//! the connections that must reach that master themselves: one per
//! blocking read (a `BLOCK` must never hold up other commands) and one
//! RESP3 connection per shard for sharded pub/sub, whose pushes
//! (`smessage`, `ssubscribe`, `sunsubscribe`, a lost connection) go to a
//! sender of the caller's; and batched writes ([`Redis::send_grouped`]):
//! on a cluster, one pipeline per master on a direct connection to it.

use parking_lot::Mutex;
use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, ProtocolVersion};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use store::{RedisConn, RedisTarget, RedisUrlError};
use tokio::time::Instant;

/// How long one short command may wait for its answer: a stalled Redis
/// fails the command (counted as dropped), never a session.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The slot map is read again at most this often.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(250);
/// How long a failed append is retried before it is dropped (counted).
pub const APPEND_RETRY_FOR: Duration = Duration::from_secs(10);
/// Slots of Redis Cluster.
const SLOTS: u16 = 16384;
/// How long a batch waits for its replicas (`WAIT n 100`) when
/// `BROKER_CLUSTER_WAIT_REPLICAS` is set.
pub const WAIT_TIMEOUT: Duration = Duration::from_millis(100);

/// Whether a batch waits for replicas under `BROKER_CLUSTER_WAIT_REPLICAS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    /// What a client was told is stored, or a record a resume relies on
    /// (appends, session records, retained messages): ends with `WAIT`.
    Awaited,
    /// What a failover may lose at the cost of a duplicate at most (a
    /// handler's `XACK`: the command is delivered again once idle; a
    /// takeover announcement): no `WAIT`, which would cost a round trip
    /// and a replica acknowledgement per batch for nothing.
    Unawaited,
}

/// Why the cluster store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error(transparent)]
    Url(#[from] RedisUrlError),
    #[error("Redis does not answer: {0}")]
    Unreachable(redis::RedisError),
    #[error("cross-node delivery reaches Redis over TCP (redis://host:port); Unix sockets are not supported")]
    Transport,
}

/// A master: `host:port`, as the cluster names it.
pub type NodeAddr = Arc<str>;

/// The connections of one node to Redis (one server or a cluster).
#[derive(Clone)]
pub struct Redis {
    target: RedisTarget,
    shared: RedisConn,
    topology: Arc<Topology>,
    /// One multiplexed connection per master, for batched writes.
    direct: Arc<Mutex<HashMap<NodeAddr, MultiplexedConnection>>>,
    /// Replicas each batched write waits for (`WAIT`); 0 = none.
    wait_replicas: u8,
}

impl Redis {
    /// Connects to `url` (`REDIS_URL`: one URL, or several for a cluster)
    /// and waits for its first answer.
    /// `wait_replicas` > 0: each batch sent by [`Redis::send_grouped`]
    /// ends with `WAIT wait_replicas 100` on its connection.
    pub async fn connect(url: &str, wait_replicas: u8) -> Result<Redis, RedisError> {
        let target = RedisTarget::parse(url)?;
        let template = match &target {
            RedisTarget::Single(info) => info.clone(),
            RedisTarget::Cluster(nodes) => nodes.first().cloned().ok_or(RedisError::Transport)?,
        };
        if !matches!(template.addr, ConnectionAddr::Tcp(..)) {
            return Err(RedisError::Transport);
        }
        let shared = target.connect().await.map_err(RedisError::Unreachable)?;
        let topology = Arc::new(Topology::new(&target, template));
        let redis = Redis {
            target,
            shared,
            topology,
            direct: Arc::default(),
            wait_replicas,
        };
        redis.refresh().await.map_err(RedisError::Unreachable)?;
        Ok(redis)
    }

    /// The shared connection for short commands (routed by slot on a
    /// cluster: a pipeline must keep to one slot).
    pub fn shared(&self) -> RedisConn {
        self.shared.clone()
    }

    /// Replicas a batched write waits for (`BROKER_CLUSTER_WAIT_REPLICAS`;
    /// 0 = none), for writers that build their own pipeline.
    pub fn wait_replicas(&self) -> u8 {
        self.wait_replicas
    }

    /// Whether Redis is a cluster.
    pub fn is_cluster(&self) -> bool {
        self.target.is_cluster()
    }

    /// The master holding `key` (from the last slot map read).
    pub fn master_of(&self, key: &str) -> Option<NodeAddr> {
        self.topology.master_of(key)
    }

    /// Reads the slot map again (a failover, a moved slot), at most every
    /// 250 ms; a single Redis has nothing to read.
    pub async fn refresh(&self) -> redis::RedisResult<()> {
        if !self.is_cluster() || !self.topology.due() {
            return Ok(());
        }
        let mut conn = self.shared();
        let value: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        self.topology.set(parse_slots(&value));
        // Connections to nodes that are no longer masters are let go.
        let masters = self.topology.masters();
        self.direct.lock().retain(|addr, _| masters.contains(addr));
        Ok(())
    }

    /// A connection of its own to the master holding `key`, for blocking
    /// reads (`XREADGROUP BLOCK`): its answers may take up to `block` plus
    /// the response timeout. A moved slot answers `MOVED`: the caller
    /// refreshes and asks again.
    pub async fn own(
        &self,
        key: &str,
        block: Duration,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let addr = self.master_or_refresh(key).await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(block + RESPONSE_TIMEOUT);
        redis::Client::open(self.topology.info(&addr, ProtocolVersion::RESP2))?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// A RESP3 connection to the master `addr` for sharded pub/sub: what
    /// the server pushes goes to `push` (which must not block), and a lost
    /// connection pushes `Disconnection`.
    pub async fn subscriber(
        &self,
        addr: &str,
        push: impl AsyncPushSender,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_push_sender(push);
        redis::Client::open(self.topology.info(addr, ProtocolVersion::RESP3))?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// `items` in groups a pipeline may carry: one group on a single
    /// Redis, one per slot of `key(item)` on a cluster (the cluster
    /// connection refuses a pipeline across slots).
    pub fn by_slot<'a, T>(&self, items: &'a [T], key: impl Fn(&T) -> &str) -> Vec<Vec<&'a T>> {
        if !self.is_cluster() {
            return vec![items.iter().collect()];
        }
        let mut groups: std::collections::HashMap<u16, Vec<&'a T>> =
            std::collections::HashMap::new();
        for item in items {
            let slot = redis::cluster_routing::get_slot(key(item).as_bytes());
            groups.entry(slot).or_default().push(item);
        }
        groups.into_values().collect()
    }

    /// Sends `items` in pipelines made by `pipe(group, full)`, the
    /// groups concurrently, and says how each group went (its size and
    /// result). On one Redis: one pipeline on the shared connection. On a
    /// cluster: one pipeline per master (from the slot map) on a direct
    /// connection to it, so a batch costs one round trip per master, not
    /// one per slot. `full` false first (`EVALSHA`); refused as
    /// `NOSCRIPT`, a group is sent again at once with `full` true. A group
    /// that fails otherwise (`MOVED`/`ASK`, a lost master), or whose slot
    /// no known master holds, is sent again with `full` true one pipeline
    /// per slot on the shared connection, which follows redirections,
    /// through [`Redis::send_retrying`] (the slot map read again first).
    /// A group that partly ran before failing may be appended twice.
    pub async fn send_grouped<T>(
        &self,
        items: &[T],
        key: impl Fn(&T) -> &str,
        pipe: impl Fn(&[&T], bool) -> redis::Pipeline,
        replication: Replication,
    ) -> Vec<(u64, redis::RedisResult<()>)> {
        self.send_grouped_items(items, key, pipe, replication)
            .await
            .into_iter()
            .map(|(group, sent)| (group.len() as u64, sent))
            .collect()
    }

    /// [`Redis::send_grouped`], saying which items each result is for
    /// (every item in exactly one group), so that each may be answered.
    pub async fn send_grouped_items<'a, T>(
        &self,
        items: &'a [T],
        key: impl Fn(&T) -> &str,
        pipe: impl Fn(&[&T], bool) -> redis::Pipeline,
        replication: Replication,
    ) -> Vec<(Vec<&'a T>, redis::RedisResult<()>)> {
        let (pipe, key) = (&pipe, &key);
        if !self.is_cluster() {
            let group: Vec<&T> = items.iter().collect();
            let mut conn = self.shared();
            let mut sent = self
                .send_waiting(pipe(&group, false), &mut conn, group.len(), replication)
                .await;
            if sent.is_err() {
                sent = self.send_retrying(&pipe(&group, true)).await;
            }
            return vec![(group, sent)];
        }
        let (groups, unmapped) = {
            let ranges = self.topology.ranges.lock();
            group_by_master(&ranges, items, key)
        };
        let direct = groups.into_iter().map(|(addr, group)| async move {
            let sent = match self.direct(&addr).await {
                Ok(mut conn) => {
                    let mut sent = self
                        .send_waiting(pipe(&group, false), &mut conn, group.len(), replication)
                        .await;
                    if matches!(&sent, Err(e) if e.kind() == redis::ErrorKind::NoScriptError) {
                        sent = self
                            .send_waiting(pipe(&group, true), &mut conn, group.len(), replication)
                            .await;
                    }
                    if sent.is_err() {
                        // A lost or moved master: connect afresh next time.
                        self.direct.lock().remove(&addr);
                    }
                    sent
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(()) => vec![(group, Ok(()))],
                Err(_) => {
                    let _ = self.refresh().await;
                    self.send_per_slot(&group, key, pipe).await
                }
            }
        });
        let unmapped = async {
            if unmapped.is_empty() {
                return Vec::new();
            }
            let _ = self.refresh().await;
            self.send_per_slot(&unmapped, key, pipe).await
        };
        let (direct, unmapped) = futures::join!(futures::future::join_all(direct), unmapped);
        direct.into_iter().flatten().chain(unmapped).collect()
    }

    /// Sends `pipe` on `conn`; with `BROKER_CLUSTER_WAIT_REPLICAS` n > 0
    /// and [`Replication::Awaited`] it ends with `WAIT n 100` on the same connection, so the batch
    /// counts as appended once n replicas acknowledged it. Fewer within
    /// the timeout: still appended (the master has it), logged at warn.
    async fn send_waiting(
        &self,
        mut pipe: redis::Pipeline,
        conn: &mut impl redis::aio::ConnectionLike,
        items: usize,
        replication: Replication,
    ) -> redis::RedisResult<()> {
        if self.wait_replicas == 0 || replication == Replication::Unawaited {
            return pipe.query_async::<()>(conn).await;
        }
        pipe.cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
        let values: Vec<redis::Value> = pipe.query_async(conn).await?;
        let acked = match values.last() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        if acked < i64::from(self.wait_replicas) {
            tracing::warn!(
                acked,
                wanted = self.wait_replicas,
                items,
                "cluster_wait_short: a batch was appended but fewer replicas than BROKER_CLUSTER_WAIT_REPLICAS acknowledged it within 100 ms"
            );
        }
        Ok(())
    }

    /// `items` again, with the script in full, one pipeline per slot on
    /// the shared (redirection-following) connection, bounded retries.
    async fn send_per_slot<'a, T>(
        &self,
        items: &[&'a T],
        key: &impl Fn(&T) -> &str,
        pipe: &impl Fn(&[&T], bool) -> redis::Pipeline,
    ) -> Vec<(Vec<&'a T>, redis::RedisResult<()>)> {
        let groups = self.by_slot(items, |item| key(item));
        let sent = groups.into_iter().map(|group| async move {
            let group: Vec<&'a T> = group.into_iter().copied().collect();
            let sent = self.send_retrying(&pipe(&group, true)).await;
            (group, sent)
        });
        futures::future::join_all(sent).await
    }

    /// The multiplexed connection to the master `addr` (made on first
    /// use).
    async fn direct(&self, addr: &NodeAddr) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.direct.lock().get(addr) {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let conn = redis::Client::open(self.topology.info(addr, ProtocolVersion::RESP2))?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.direct.lock().insert(addr.clone(), conn.clone());
        Ok(conn)
    }

    /// Sends `pipe` on the shared connection; a failure (a master down,
    /// a failover under way) is retried with backoff (0.1 to 1 s, the slot
    /// map read again) for up to [`APPEND_RETRY_FOR`], so an outage of a
    /// few seconds delays appends instead of losing them. A retried
    /// pipeline may have partly run: entries may be appended twice.
    pub async fn send_retrying(&self, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        let deadline = Instant::now() + APPEND_RETRY_FOR;
        let mut wait = Duration::from_millis(100);
        let mut conn = self.shared();
        loop {
            match pipe.query_async::<()>(&mut conn).await {
                Err(e)
                    if Instant::now() + wait < deadline
                        && e.kind() != redis::ErrorKind::NoScriptError =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                    let _ = self.refresh().await;
                }
                sent => return sent,
            }
        }
    }

    async fn master_or_refresh(&self, key: &str) -> redis::RedisResult<NodeAddr> {
        if let Some(addr) = self.master_of(key) {
            return Ok(addr);
        }
        self.refresh().await?;
        self.master_of(key).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::ClusterDown, "no master holds this slot"))
        })
    }
}

/// The slot map: which master holds each slot. A single Redis holds all.
pub struct Topology {
    /// (first slot, last slot, master), sorted.
    ranges: Mutex<Vec<(u16, u16, NodeAddr)>>,
    /// The credentials and settings every node is reached with.
    template: ConnectionInfo,
    read_at: Mutex<Option<Instant>>,
}

impl Topology {
    fn new(target: &RedisTarget, template: ConnectionInfo) -> Topology {
        let ranges = match (&template.addr, target) {
            (ConnectionAddr::Tcp(host, port), RedisTarget::Single(_)) => {
                vec![(0, SLOTS - 1, format!("{host}:{port}").into())]
            }
            _ => Vec::new(),
        };
        Topology {
            ranges: Mutex::new(ranges),
            template,
            read_at: Mutex::new(None),
        }
    }

    fn due(&self) -> bool {
        let mut read_at = self.read_at.lock();
        let now = Instant::now();
        if read_at.is_some_and(|at| now.duration_since(at) < REFRESH_AT_MOST_EVERY) {
            return false;
        }
        *read_at = Some(now);
        true
    }

    fn set(&self, mut ranges: Vec<(u16, u16, NodeAddr)>) {
        if ranges.is_empty() {
            return;
        }
        ranges.sort_unstable_by_key(|range| range.0);
        *self.ranges.lock() = ranges;
    }

    /// The masters of the slot map.
    fn masters(&self) -> Vec<NodeAddr> {
        self.ranges
            .lock()
            .iter()
            .map(|(_, _, addr)| addr.clone())
            .collect()
    }

    fn master_of(&self, key: &str) -> Option<NodeAddr> {
        let slot = redis::cluster_routing::get_slot(key.as_bytes());
        master_of_slot(&self.ranges.lock(), slot)
    }

    /// How to reach `addr` (`host:port`) with the configured credentials.
    fn info(&self, addr: &str, protocol: ProtocolVersion) -> ConnectionInfo {
        let mut info = self.template.clone();
        if let Some((host, port)) = addr.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                info.addr = ConnectionAddr::Tcp(host.to_owned(), port);
            }
        }
        info.redis.protocol = protocol;
        info
    }
}

fn master_of_slot(ranges: &[(u16, u16, NodeAddr)], slot: u16) -> Option<NodeAddr> {
    ranges
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, addr)| addr.clone())
}

/// `items` grouped by the master holding `key(item)`'s slot in `ranges`,
/// in their order within each group; those of a slot no master holds
/// apart.
#[allow(clippy::type_complexity)]
fn group_by_master<'a, T>(
    ranges: &[(u16, u16, NodeAddr)],
    items: &'a [T],
    key: impl Fn(&T) -> &str,
) -> (Vec<(NodeAddr, Vec<&'a T>)>, Vec<&'a T>) {
    let mut groups: Vec<(NodeAddr, Vec<&'a T>)> = Vec::new();
    let mut unmapped = Vec::new();
    for item in items {
        let slot = redis::cluster_routing::get_slot(key(item).as_bytes());
        match master_of_slot(ranges, slot) {
            Some(addr) => match groups.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, group)) => group.push(item),
                None => groups.push((addr, vec![item])),
            },
            None => unmapped.push(item),
        }
    }
    (groups, unmapped)
}

/// `CLUSTER SLOTS`: `[[first, last, [host, port, id, ..], replicas..], ..]`.
fn parse_slots(value: &redis::Value) -> Vec<(u16, u16, NodeAddr)> {
    use redis::Value::{Array, BulkString, Int, SimpleString};
    let Array(ranges) = value else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Array(parts) = range else { return None };
            let slot = |v: Option<&redis::Value>| match v {
                Some(Int(n)) => u16::try_from(*n).ok().filter(|s| *s < SLOTS),
                _ => None,
            };
            let (first, last) = (slot(parts.first())?, slot(parts.get(1))?);
            let Some(Array(master)) = parts.get(2) else {
                return None;
            };
            let host = match master.first()? {
                BulkString(host) => String::from_utf8(host.clone()).ok()?,
                SimpleString(host) => host.clone(),
                _ => return None,
            };
            let port = match master.get(1)? {
                Int(port) => u16::try_from(*port).ok()?,
                _ => return None,
            };
            (!host.is_empty() && first <= last)
                .then(|| (first, last, NodeAddr::from(format!("{host}:{port}"))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value::{Array, BulkString, Int, Nil};

    fn node(host: &str, port: i64) -> redis::Value {
        Array(vec![
            BulkString(host.as_bytes().to_vec()),
            Int(port),
            BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn slot_maps_are_read_and_looked_up() {
        let reply = Array(vec![
            Array(vec![
                Int(5461),
                Int(10922),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Array(vec![Int(0), Int(5460), node("127.0.0.1", 7000)]),
            Array(vec![Int(10923), Int(16383), node("127.0.0.1", 7002)]),
            // Damaged ranges are skipped.
            Array(vec![Int(1), Int(99999), node("127.0.0.1", 1)]),
            Array(vec![Int(1), Int(2), node("", 1)]),
            Array(vec![Int(1), Int(2), Nil]),
            Nil,
        ]);
        let mut ranges = parse_slots(&reply);
        ranges.sort_unstable_by_key(|range| range.0);
        assert_eq!(ranges.len(), 3);
        // (slot) -> master
        let table = [
            (0, Some("127.0.0.1:7000")),
            (5460, Some("127.0.0.1:7000")),
            (5461, Some("127.0.0.1:7001")),
            (16383, Some("127.0.0.1:7002")),
        ];
        for (slot, master) in table {
            assert_eq!(
                master_of_slot(&ranges, slot).as_deref(),
                master,
                "slot {slot}"
            );
        }
        assert_eq!(master_of_slot(&ranges[..1], 16000), None);
        assert!(parse_slots(&Nil).is_empty());
    }

    #[test]
    fn batches_are_grouped_by_master() {
        let (a, b): (NodeAddr, NodeAddr) = ("10.0.0.1:7000".into(), "10.0.0.2:7000".into());
        // Slots 0-8191 on a, 8192-12287 on b, 12288-16383 held by no one.
        let ranges = vec![(0, 8191, a.clone()), (8192, 12287, b.clone())];
        let slot = |key: &str| redis::cluster_routing::get_slot(key.as_bytes());
        // Keys whose slots fall on each side.
        let keys: Vec<String> = (0..200).map(|n| format!("r:{{{n}}}")).collect();
        let on_a: Vec<&String> = keys.iter().filter(|k| slot(k) <= 8191).collect();
        let on_b: Vec<&String> = keys
            .iter()
            .filter(|k| (8192..=12287).contains(&slot(k)))
            .collect();
        let nowhere: Vec<&String> = keys.iter().filter(|k| slot(k) > 12287).collect();
        assert!(!on_a.is_empty() && !on_b.is_empty() && !nowhere.is_empty());
        let (groups, unmapped) = group_by_master(&ranges, &keys, |k| k);
        // One group per master, each in the batch's order, nothing lost.
        assert_eq!(groups.len(), 2);
        let group_of = |addr: &NodeAddr| {
            groups
                .iter()
                .find(|(master, _)| master == addr)
                .map(|(_, group)| group.clone())
        };
        assert_eq!(group_of(&a), Some(on_a));
        assert_eq!(group_of(&b), Some(on_b));
        assert_eq!(unmapped, nowhere);
        // Keys sharing a hash tag share a slot, so a master.
        let same = [
            "r:{42}".to_owned(),
            "c:{42}".to_owned(),
            "r:{42}".to_owned(),
        ];
        let (groups, unmapped) = group_by_master(&ranges, &same, |k| k);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].1.len(), 3);
        assert!(unmapped.is_empty());
        // An empty map holds nothing: every item is unmapped.
        let (groups, unmapped) = group_by_master(&[], &same, |k| k);
        assert!(groups.is_empty());
        assert_eq!(unmapped.len(), 3);
    }
}

#[cfg(test)]
#[path = "redis_conn_wait_tests.rs"]
mod wait_tests;
