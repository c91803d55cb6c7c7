//! Owns the connections to Redis: one shared multiplexed connection for
//! every short command (appends, replays, acknowledgements), reconnected by
//! the `redis` crate's manager, a connection of its own for each blocking
//! read (a `BLOCK` must never hold up other commands), and the address and
//! credentials the sharded pub/sub connection (`resp`) dials.

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ConnectionAddr};
use std::time::Duration;

/// How long one short command may wait for its answer: a stalled Redis
/// fails the command (counted as dropped), never a session.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the cluster store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("REDIS_URL: {0}")]
    Url(redis::RedisError),
    #[error("Redis does not answer: {0}")]
    Unreachable(redis::RedisError),
    #[error("cross-node delivery needs a plain TCP Redis URL for sharded pub/sub (redis://host:port); TLS and Unix sockets are not supported yet")]
    Transport,
}

/// The connections of one node to one Redis.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    shared: ConnectionManager,
    /// `host:port` of the server, for the pub/sub connection.
    pubsub_addr: String,
    auth: Option<(Option<String>, String)>,
}

impl Redis {
    /// Connects to `url` and waits for its first answer.
    pub async fn connect(url: &str) -> Result<Redis, RedisError> {
        let client = redis::Client::open(url).map_err(RedisError::Url)?;
        let info = client.get_connection_info();
        let pubsub_addr = match &info.addr {
            ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            _ => return Err(RedisError::Transport),
        };
        let auth = info
            .redis
            .password
            .clone()
            .map(|password| (info.redis.username.clone(), password));
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let shared = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(RedisError::Unreachable)?;
        Ok(Redis {
            client,
            shared,
            pubsub_addr,
            auth,
        })
    }

    /// The shared connection for short commands.
    pub fn shared(&self) -> ConnectionManager {
        self.shared.clone()
    }

    /// A connection of its own, for blocking reads (`XREADGROUP BLOCK`):
    /// its answers may take up to `block` plus the response timeout.
    pub async fn own(&self, block: Duration) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(block + RESPONSE_TIMEOUT);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Where the pub/sub connection dials, and with which credentials.
    pub fn pubsub_target(&self) -> (&str, Option<(Option<String>, String)>) {
        (&self.pubsub_addr, self.auth.clone())
    }
}
