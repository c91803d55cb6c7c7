//! Owns the Redis implementation of [`Store`]: one multiplexed,
//! self-reconnecting `ConnectionManager`, connected lazily so that a handler
//! starts while Redis is down and serves 503s until it comes back. Every
//! operation runs under a deadline. Key schema: `SCHEMA.md`.

use super::{KeyRecord, Store, StoreError, StoreFuture};
use crate::envelope::b64_encode;
use crate::uid::UserId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use std::future::Future;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Prefix of every key this store writes.
pub const KEY_PREFIX: &str = "mqgate:";

/// Longest a single store operation may take before it counts as an outage.
const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Atomically turns a pending request into a contact pair.
const ACCEPT_SCRIPT: &str = r"
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('SADD', KEYS[3], ARGV[2])
  redis.call('SADD', KEYS[4], ARGV[1])
  return 1
end
return 0
";

/// Deletes a user's data and their traces in other users' sets.
const DELETE_SCRIPT: &str = r"
local p, u = ARGV[1], ARGV[2]
for _, c in ipairs(redis.call('SMEMBERS', p .. 'contacts:' .. u)) do
  redis.call('SREM', p .. 'contacts:' .. c, u)
end
for _, r in ipairs(redis.call('SMEMBERS', p .. 'requests:in:' .. u)) do
  redis.call('SREM', p .. 'requests:out:' .. r, u)
end
for _, t in ipairs(redis.call('SMEMBERS', p .. 'requests:out:' .. u)) do
  redis.call('SREM', p .. 'requests:in:' .. t, u)
end
redis.call('DEL', p .. 'key:' .. u, p .. 'contacts:' .. u, p .. 'requests:in:' .. u, p .. 'requests:out:' .. u)
return 1
";

/// The Redis store. Cheap to share behind an `Arc`.
pub struct RedisStore {
    client: redis::Client,
    manager: OnceCell<ConnectionManager>,
    accept: redis::Script,
    delete: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.write_str("RedisStore")
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    // `Display` of a RedisError never includes the URL (or its password).
    StoreError::Unavailable(format!("redis: {e}"))
}

fn key(kind: &str, uid: &str) -> String {
    format!("{KEY_PREFIX}{kind}:{uid}")
}

impl RedisStore {
    /// Parses `url` (`redis://[:password@]host[:port][/db]`) without
    /// connecting: the store connects on first use.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|_| {
            StoreError::Config(
                "REDIS_URL is not a valid Redis URL (expected redis://[:password@]host[:port][/db])"
                    .into(),
            )
        })?;
        Ok(RedisStore {
            client,
            manager: OnceCell::new(),
            accept: redis::Script::new(ACCEPT_SCRIPT),
            delete: redis::Script::new(DELETE_SCRIPT),
        })
    }

    /// Like [`RedisStore::new`], then tries to connect once; a Redis that is
    /// down is only a warning (commands get 503 until it is back).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::new(url)?;
        if let Err(error) = store.ping().await {
            tracing::warn!(%error, "Redis is not reachable yet; commands will fail with 503 until it is");
        }
        Ok(store)
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(1))
                    .set_response_timeout(Duration::from_secs(2))
                    .set_number_of_retries(1)
                    .set_max_delay(500);
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs `op` on a connection under [`OP_TIMEOUT`].
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self.conn().await?;
            op(conn).await.map_err(unavailable)
        };
        tokio::time::timeout(OP_TIMEOUT, work)
            .await
            .map_err(|_| StoreError::Unavailable("redis: operation timed out".into()))?
    }
}

impl Store for RedisStore {
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            c.set::<_, _, ()>(key("key", uid.as_str()), record.encode())
                .await
        }))
    }

    fn get_key<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(async move {
            let raw: Option<Vec<u8>> = self
                .run(move |mut c| async move { c.get(key("key", uid.as_str())).await })
                .await?;
            raw.map(|bytes| KeyRecord::decode(&bytes)).transpose()
        })
    }

    fn remember_nonce<'a>(
        &'a self,
        uid: &'a UserId,
        key_id: &'a str,
        nonce: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let name = format!(
                "{KEY_PREFIX}nonce:{}:{key_id}:{}",
                uid.as_str(),
                b64_encode(nonce)
            );
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let set: Option<String> = self
                .run(move |mut c| async move {
                    redis::cmd("SET")
                        .arg(name)
                        .arg(1)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            Ok(set.is_some())
        })
    }

    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            redis::pipe()
                .atomic()
                .sadd(key("requests:in", target.as_str()), requester.as_str())
                .ignore()
                .sadd(key("requests:out", requester.as_str()), target.as_str())
                .ignore()
                .query_async::<()>(&mut c)
                .await
        }))
    }

    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> =
                self.run(move |mut c| async move {
                    c.smembers(key("requests:in", target.as_str())).await
                })
                .await?;
            list.sort();
            Ok(list)
        })
    }

    fn accept_contact<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let done: i64 = self
                .run(move |mut c| async move {
                    self.accept
                        .key(key("requests:in", target.as_str()))
                        .key(key("requests:out", requester.as_str()))
                        .key(key("contacts", requester.as_str()))
                        .key(key("contacts", target.as_str()))
                        .arg(requester.as_str())
                        .arg(target.as_str())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(done == 1)
        })
    }

    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.smembers(key("contacts", uid.as_str())).await })
                .await?;
            list.sort();
            Ok(list)
        })
    }

    fn set_revoked<'a>(&'a self, uid: &'a UserId, revoked: bool) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            let name = key("revoked", uid.as_str());
            if revoked {
                c.set::<_, _, ()>(name, crate::claims::now_secs()).await
            } else {
                c.del::<_, ()>(name).await
            }
        }))
    }

    fn is_revoked<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, bool> {
        Box::pin(self.run(move |mut c| async move { c.exists(key("revoked", uid.as_str())).await }))
    }

    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            self.delete
                .arg(KEY_PREFIX)
                .arg(uid.as_str())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
        }))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.run(|mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
        }))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    #[tokio::test]
    async fn conformance() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        crate::store::conformance::exercise(&store).await;
    }

    #[tokio::test]
    async fn outage_gives_errors_then_recovers() {
        let mut server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let uid = UserId::parse("1").unwrap();
        store.set_revoked(&uid, true).await.unwrap();
        server.stop();
        let err = store.is_revoked(&uid).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        server.restart();
        // The data is gone (no persistence in the test server) but the
        // connection comes back by itself.
        assert!(answers_within_5s(&store).await, "store did not recover");
        assert!(!store.is_revoked(&uid).await.unwrap());
    }

    /// Whether the store answers PING within five seconds.
    async fn answers_within_5s(store: &RedisStore) -> bool {
        for _ in 0..50 {
            if store.ping().await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    #[tokio::test]
    async fn starts_while_redis_is_down() {
        let mut server = RedisServer::start();
        server.stop();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        assert!(store.ping().await.is_err());
        server.restart();
        assert!(answers_within_5s(&store).await, "store did not come up");
    }

    #[tokio::test]
    async fn bad_url_is_a_config_error() {
        assert!(matches!(
            RedisStore::connect("http://nope").await,
            Err(StoreError::Config(_))
        ));
    }
}
