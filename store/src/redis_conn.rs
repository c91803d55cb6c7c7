//! Owns the one way the workspace reaches Redis: `REDIS_URL` parsed once into
//! a [`RedisTarget`] (one server, or a Redis Cluster named by several
//! comma-separated node URLs), and the shared, self-reconnecting
//! [`RedisConn`] made from it on first use, with the same short timeouts for
//! the store, the identity service's state and cross-node delivery (an
//! outage becomes a fast error, not a hang).

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value,
};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The forms `REDIS_URL` takes, quoted by every refusal.
pub const REDIS_URL_FORMS: &str = "expected redis://[:password@]host[:port][/db] for one Redis, \
or several node URLs separated by commas for Redis Cluster \
(redis://10.0.0.1:7000,redis://10.0.0.2:7000,redis://10.0.0.3:7000)";

/// Why a `REDIS_URL` was refused. The messages name the faulty entry by its
/// position, never its text (a URL may carry a password), and say how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlError {
    /// Nothing but commas and spaces.
    #[error("REDIS_URL is empty: {REDIS_URL_FORMS}; unset it to use the embedded store")]
    Empty,
    /// An entry is empty (`a,,b` or a trailing comma).
    #[error("REDIS_URL entry {0} is empty: remove the extra comma ({REDIS_URL_FORMS})")]
    EmptyEntry(usize),
    /// An entry is not a Redis URL.
    #[error("REDIS_URL entry {0} is not a Redis URL: {REDIS_URL_FORMS}")]
    NotAUrl(usize),
    /// A `rediss://` entry: this build has no TLS to Redis.
    #[error("REDIS_URL entry {0} asks for TLS (rediss://), which this build does not include: use redis:// (on a private network, or through a TLS tunnel)")]
    Tls(usize),
    /// A cluster entry names a unix socket: the cluster answers with TCP addresses.
    #[error("REDIS_URL entry {0} is a unix socket: Redis Cluster nodes are reached over TCP, use redis://host:port")]
    UnixSocket(usize),
    /// A cluster entry selects a database other than 0.
    #[error("REDIS_URL entry {0} selects a database: Redis Cluster has only database 0, remove the /<db> part")]
    Database(usize),
    /// Cluster entries differ in TLS, user or password.
    #[error("REDIS_URL entry {0} differs from entry 1 in its scheme (redis:// or rediss://), user or password: every node of a cluster is reached the same way")]
    Mismatch(usize),
    /// The same node is listed twice.
    #[error("REDIS_URL entry {0} repeats an earlier node: list each cluster node once")]
    Duplicate(usize),
    /// The cluster client refused the list.
    #[error("REDIS_URL: the node list is refused ({0}); {REDIS_URL_FORMS}")]
    Cluster(String),
}

/// Where Redis is: `REDIS_URL` parsed once. One URL is one Redis (a
/// standalone server, or the primary of a replicated one); several are seed
/// nodes of a Redis Cluster (the client learns the rest of the cluster from
/// them, so three are enough, but listing every node lets the store start
/// while some are down).
#[derive(Clone)]
pub enum RedisTarget {
    /// One Redis.
    Single(ConnectionInfo),
    /// A Redis Cluster, by its seed nodes (two or more).
    Cluster(Vec<ConnectionInfo>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs may carry a password: only the shape is printed.
        match self {
            RedisTarget::Single(_) => f.write_str("RedisTarget::Single"),
            RedisTarget::Cluster(nodes) => write!(f, "RedisTarget::Cluster({} nodes)", nodes.len()),
        }
    }
}

impl std::str::FromStr for RedisTarget {
    type Err = RedisUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        RedisTarget::parse(url)
    }
}

/// 1 s to connect, 2 s per answer: the store's [`crate::StoreError::Unavailable`]
/// comes fast while Redis is away.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisTarget {
    /// Parses `REDIS_URL`: one URL selects one Redis, several comma-separated
    /// URLs (spaces around commas allowed) select Redis Cluster.
    pub fn parse(url: &str) -> Result<Self, RedisUrlError> {
        let entries: Vec<&str> = url.split(',').map(str::trim).collect();
        if entries.iter().all(|e| e.is_empty()) {
            return Err(RedisUrlError::Empty);
        }
        let mut nodes = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let position = i + 1;
            if entry.is_empty() {
                return Err(RedisUrlError::EmptyEntry(position));
            }
            if !(entry.starts_with("redis://")
                || entry.starts_with("rediss://")
                || entry.starts_with("redis+unix://")
                || entry.starts_with("unix://"))
            {
                return Err(RedisUrlError::NotAUrl(position));
            }
            let info = entry.into_connection_info().map_err(|_| {
                if entry.starts_with("rediss://") {
                    RedisUrlError::Tls(position)
                } else {
                    RedisUrlError::NotAUrl(position)
                }
            })?;
            nodes.push(info);
        }
        if nodes.len() == 1 {
            return nodes
                .pop()
                .map(RedisTarget::Single)
                .ok_or(RedisUrlError::Empty);
        }
        check_cluster_nodes(&nodes)?;
        ClusterClientBuilder::new(nodes.clone())
            .build()
            .map_err(|e| RedisUrlError::Cluster(e.to_string()))?;
        Ok(RedisTarget::Cluster(nodes))
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// A client for each configured node (one for a single Redis), for
    /// connections that must reach one node: classic pub/sub, which a
    /// cluster broadcasts to every node, so any node will do.
    pub fn node_clients(&self) -> redis::RedisResult<Vec<redis::Client>> {
        match self {
            RedisTarget::Single(info) => Ok(vec![redis::Client::open(info.clone())?]),
            RedisTarget::Cluster(nodes) => nodes.iter().cloned().map(redis::Client::open).collect(),
        }
    }

    /// The cluster client builder with the workspace's timeouts, for a
    /// caller that needs more (a RESP3 push sender for sharded pub/sub);
    /// `None` for a single Redis.
    pub fn cluster_builder(&self) -> Option<ClusterClientBuilder> {
        match self {
            RedisTarget::Single(_) => None,
            RedisTarget::Cluster(nodes) => Some(
                ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    // A failover or a slot move: a few quick retries on
                    // MOVED/ASK/refused connections while the slot map is
                    // refreshed; the caller's deadline bounds the rest.
                    .retries(5)
                    .min_retry_wait(50)
                    .max_retry_wait(500),
            ),
        }
    }

    /// The [`ConnectionManager`] settings for a single Redis: 1 s to
    /// connect, 2 s per answer, one retry.
    pub fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(500)
    }

    /// Opens a multiplexed connection that reconnects by itself: a
    /// `ConnectionManager` for one Redis, a cluster connection (which follows
    /// MOVED/ASK and refreshes its slot map after failovers) for a cluster.
    /// Fails when no configured node answers.
    pub async fn connect(&self) -> redis::RedisResult<RedisConn> {
        match self {
            RedisTarget::Single(info) => {
                let client = redis::Client::open(info.clone())?;
                let manager =
                    ConnectionManager::new_with_config(client, Self::manager_config()).await?;
                Ok(RedisConn::Single(manager))
            }
            RedisTarget::Cluster(_) => {
                let client: ClusterClient = self
                    .cluster_builder()
                    .ok_or_else(|| {
                        redis::RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "not a cluster",
                        ))
                    })?
                    .build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// The checks [`ClusterClientBuilder::build`] makes, with messages that name
/// the entry and the fix, plus duplicates.
fn check_cluster_nodes(nodes: &[ConnectionInfo]) -> Result<(), RedisUrlError> {
    let first = nodes.first().ok_or(RedisUrlError::Empty)?;
    let mut seen: Vec<&ConnectionAddr> = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let position = i + 1;
        if matches!(node.addr, ConnectionAddr::Unix(_)) {
            return Err(RedisUrlError::UnixSocket(position));
        }
        if node.redis.db != 0 {
            return Err(RedisUrlError::Database(position));
        }
        let same_auth = node.redis.username == first.redis.username
            && node.redis.password == first.redis.password
            && is_tls(&node.addr) == is_tls(&first.addr);
        if !same_auth {
            return Err(RedisUrlError::Mismatch(position));
        }
        if seen.contains(&&node.addr) {
            return Err(RedisUrlError::Duplicate(position));
        }
        seen.push(&node.addr);
    }
    Ok(())
}

fn is_tls(addr: &ConnectionAddr) -> bool {
    matches!(addr, ConnectionAddr::TcpTls { .. })
}

/// A shared connection to the [`RedisTarget`]: cheap to clone (clones share
/// one multiplexed connection per node), usable wherever the `redis` crate
/// takes an async connection (commands, pipelines, scripts).
// Not boxed: a clone is taken per operation, and a box would allocate each time.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisConn {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis connection made on first use and shared by every caller.
pub struct RedisConnection {
    target: RedisTarget,
    conn: OnceCell<RedisConn>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.write_str("RedisConnection")
    }
}

impl RedisConnection {
    /// Parses `url` without connecting.
    pub fn open(url: &str) -> Result<Self, RedisUrlError> {
        Ok(Self::new(RedisTarget::parse(url)?))
    }

    /// For an already parsed target, without connecting.
    pub fn new(target: RedisTarget) -> Self {
        RedisConnection {
            target,
            conn: OnceCell::new(),
        }
    }

    /// What `REDIS_URL` named.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The shared connection, made on first use (see [`RedisTarget::connect`]).
    pub async fn get(&self) -> redis::RedisResult<RedisConn> {
        let conn = self.conn.get_or_try_init(|| self.target.connect()).await?;
        Ok(conn.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_single_several_are_a_cluster() {
        let single = RedisTarget::parse("redis://:pw@127.0.0.1:6379/2").unwrap();
        assert!(!single.is_cluster());
        let cluster = RedisTarget::parse(
            "redis://127.0.0.1:7000, redis://127.0.0.1:7001,redis://127.0.0.1:7002",
        )
        .unwrap();
        let RedisTarget::Cluster(nodes) = &cluster else {
            panic!("a cluster")
        };
        assert_eq!(nodes.len(), 3);
        assert_eq!(format!("{cluster:?}"), "RedisTarget::Cluster(3 nodes)");
        assert!(!format!("{single:?}").contains("pw"));
    }

    #[test]
    fn bad_lists_are_refused_with_the_fix() {
        let cases: &[(&str, RedisUrlError, &str)] = &[
            ("", RedisUrlError::Empty, "unset it"),
            (" , ", RedisUrlError::Empty, "commas"),
            (
                "redis://a:1,,redis://b:1",
                RedisUrlError::EmptyEntry(2),
                "remove the extra comma",
            ),
            (
                "redis://a:1,redis://b:1,",
                RedisUrlError::EmptyEntry(3),
                "extra comma",
            ),
            ("localhost:6379", RedisUrlError::NotAUrl(1), "redis://"),
            ("redis://a:1,b:2", RedisUrlError::NotAUrl(2), "commas"),
            (
                "redis://a:1,redis://b:1/3",
                RedisUrlError::Database(2),
                "remove the /<db>",
            ),
            (
                "redis://:x@a:1,redis://:y@b:1",
                RedisUrlError::Mismatch(2),
                "password",
            ),
            (
                "redis://u:x@a:1,redis://v:x@b:1",
                RedisUrlError::Mismatch(2),
                "user",
            ),
            (
                "redis://a:1,rediss://b:1",
                RedisUrlError::Tls(2),
                "redis://",
            ),
            (
                "redis://a:1,redis://a:1",
                RedisUrlError::Duplicate(2),
                "once",
            ),
            (
                "redis://a:1,redis+unix:///tmp/r.sock",
                RedisUrlError::UnixSocket(2),
                "TCP",
            ),
        ];
        for (url, want, hint) in cases {
            let err = RedisTarget::parse(url).unwrap_err();
            assert_eq!(&err, want, "{url}");
            let text = err.to_string();
            assert!(
                text.contains(hint) && text.contains("REDIS_URL"),
                "{url}: {text}"
            );
        }
        // A password never appears in a refusal.
        let err = RedisTarget::parse("redis://:hunter2@a:1,nope").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
