//! Owns the one way the workspace reaches Redis: a client parsed from
//! `REDIS_URL` without connecting, and a reconnecting `ConnectionManager`
//! made on first use, with the same short timeouts for the store and the
//! identity service's state (an outage becomes a fast error, not a hang).

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Why a `REDIS_URL` was refused, with the fix.
pub const INVALID_REDIS_URL: &str =
    "REDIS_URL is not a valid Redis URL (expected redis://[:password@]host[:port][/db])";

/// A Redis connection made on first use and shared by every caller.
pub struct RedisConnection {
    client: redis::Client,
    manager: OnceCell<ConnectionManager>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.write_str("RedisConnection")
    }
}

impl RedisConnection {
    /// Parses `url` without connecting; `Err` is [`INVALID_REDIS_URL`].
    pub fn open(url: &str) -> Result<Self, &'static str> {
        let client = redis::Client::open(url).map_err(|_| INVALID_REDIS_URL)?;
        Ok(RedisConnection {
            client,
            manager: OnceCell::new(),
        })
    }

    /// The client, for what a manager cannot do (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The shared connection, made on first use: 1 s to connect, 2 s per
    /// answer, one retry.
    pub async fn get(&self) -> redis::RedisResult<ConnectionManager> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(1))
                    .set_response_timeout(Duration::from_secs(2))
                    .set_number_of_retries(1)
                    .set_max_delay(500);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(manager.clone())
    }
}
