//! Owns the Redis implementation of [`Store`]: one multiplexed,
//! self-reconnecting `ConnectionManager`, connected lazily so that a handler
//! starts while Redis is down and serves 503s until it comes back. Every
//! operation runs under a deadline. Revocations are also published on a
//! pub/sub channel that a background subscriber (started by the first
//! [`Store::revocation_events`] call, stopped when the store is dropped)
//! turns into local events, so that every process sharing the Redis hears
//! them. Key schema: `SCHEMA.md`.

use super::{
    check_platform, KeyRecord, Revocation, RevocationEvent, Store, StoreError, StoreFuture,
    StoredToken, TokenPage, REVOCATION_EVENTS_CAPACITY,
};
use crate::RedisConnection;
use envelope::b64_encode;
use futures::StreamExt;
use protocol::uid::UserId;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::future::Future;
use std::sync::Once;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Prefix of every key this store writes.
pub const KEY_PREFIX: &str = "mqgate:";

/// The pub/sub channel revocations are announced on: messages are
/// `<uid> <revocation>` with the revocation as [`Revocation::encode`] writes it.
pub const REVOCATION_CHANNEL: &str = "mqgate:revocations";

/// Keys per `SCAN` step when listing platform tokens.
const SCAN_COUNT: usize = 200;

/// Pause before re-subscribing after the subscription failed or was lost.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

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
redis.call('DEL', p .. 'key:' .. u, p .. 'contacts:' .. u, p .. 'requests:in:' .. u, p .. 'requests:out:' .. u,
  p .. 'reg:' .. u, p .. 'tokens:' .. u)
return 1
";

/// Records a revocation merged with the current one (`all` wins, otherwise
/// the later cut-off; any value that is not `before:<n>` counts as `all`)
/// and publishes it, unless the channel (`ARGV[2]`) is empty
/// (`record_revocation`). Returns the recorded value.
const REVOKE_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
local new = ARGV[1]
if cur then
  local c = string.match(cur, '^before:(%d+)$')
  if not c then
    new = 'all'
  else
    local n = string.match(new, '^before:(%d+)$')
    if not n then
      new = 'all'
    elseif tonumber(c) > tonumber(n) then
      new = cur
    end
  end
end
redis.call('SET', KEYS[1], new)
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. new)
end
return new
";

/// The first lines of a guarded write: returns 0 (nothing written) when
/// the user's revocation (`KEYS[1]`) refuses a token issued at `ARGV[1]`:
/// any value that is not `before:<n>` refuses everything, as
/// `Revocation::decode` reads it. Unix seconds are far below 2^53, so Lua's
/// numbers compare them exactly.
const REVOCATION_GUARD: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local c = string.match(cur, '^before:(%d+)$')
  if not c or tonumber(ARGV[1]) < tonumber(c) then
    return 0
  end
end
";

/// A guarded `SET KEYS[2] ARGV[2]` (see [`REVOCATION_GUARD`]).
const GUARDED_SET: &str = r"
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

/// A guarded `HSET KEYS[2] ARGV[2] ARGV[3]` (see [`REVOCATION_GUARD`]).
const GUARDED_HSET: &str = r"
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
";

/// Replaces a hash field only if it still holds the expected value.
const REPLACE_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
";

/// The Redis store. Cheap to share behind an `Arc`.
pub struct RedisStore {
    redis: RedisConnection,
    accept: redis::Script,
    delete: redis::Script,
    revoke: redis::Script,
    replace: redis::Script,
    guarded_set: redis::Script,
    guarded_hset: redis::Script,
    events: broadcast::Sender<RevocationEvent>,
    /// Starts the revocation subscriber once.
    subscriber: Once,
    /// Stops the revocation subscriber when the store is dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
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
        let redis = RedisConnection::open(url).map_err(|e| StoreError::Config(e.into()))?;
        let (events, _) = broadcast::channel(REVOCATION_EVENTS_CAPACITY);
        let stop = CancellationToken::new();
        Ok(RedisStore {
            redis,
            accept: redis::Script::new(ACCEPT_SCRIPT),
            delete: redis::Script::new(DELETE_SCRIPT),
            revoke: redis::Script::new(REVOKE_SCRIPT),
            replace: redis::Script::new(REPLACE_SCRIPT),
            guarded_set: redis::Script::new(&format!("{REVOCATION_GUARD}{GUARDED_SET}")),
            guarded_hset: redis::Script::new(&format!("{REVOCATION_GUARD}{GUARDED_HSET}")),
            events,
            subscriber: Once::new(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
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
        self.redis.get().await.map_err(unavailable)
    }

    /// The revoke script: merges `revocation` into the user's, publishes the
    /// result on `channel` unless it is empty, returns the result.
    async fn merge_revocation(
        &self,
        uid: &UserId,
        revocation: Revocation,
        channel: &str,
    ) -> Result<Revocation, StoreError> {
        let merged: String = self
            .run(move |mut c| async move {
                self.revoke
                    .key(key("revoked", uid.as_str()))
                    .arg(revocation.encode())
                    .arg(channel)
                    .arg(uid.as_str())
                    .invoke_async::<String>(&mut c)
                    .await
            })
            .await?;
        Ok(Revocation::decode(&merged))
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

/// Turns the revocation channel into local events until `stop`, subscribing
/// again after every loss; after a gap it sends [`RevocationEvent::Resync`]
/// because announcements made meanwhile are gone.
async fn relay_revocations(
    client: redis::Client,
    events: broadcast::Sender<RevocationEvent>,
    stop: CancellationToken,
) {
    let mut gap = false;
    loop {
        let subscribe = async {
            let mut pubsub = tokio::time::timeout(OP_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(OP_TIMEOUT, pubsub.subscribe(REVOCATION_CHANNEL))
                .await
                .map_err(|_| "SUBSCRIBE timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let subscribed = tokio::select! {
            _ = stop.cancelled() => return,
            subscribed = subscribe => subscribed,
        };
        match subscribed {
            Ok(pubsub) => {
                if gap {
                    tracing::info!("revocation channel subscribed again");
                    let _ = events.send(RevocationEvent::Resync);
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    match parse_announcement(message.get_payload_bytes()) {
                        Some(event) => {
                            let _ = events.send(event);
                        }
                        None => tracing::warn!("ignoring a malformed revocation announcement"),
                    }
                }
                tracing::warn!("revocation channel lost; subscribing again");
            }
            Err(error) => {
                if !gap {
                    tracing::warn!(%error, "cannot subscribe to the revocation channel; retrying");
                }
            }
        }
        gap = true;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

/// Parses `<uid> <revocation>`.
fn parse_announcement(payload: &[u8]) -> Option<RevocationEvent> {
    let text = std::str::from_utf8(payload).ok()?;
    let (uid, revocation) = text.split_once(' ')?;
    Some(RevocationEvent::Revoked {
        uid: UserId::parse(uid).ok()?,
        revocation: Revocation::decode(revocation),
    })
}

impl Store for RedisStore {
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            c.set::<_, _, ()>(key("key", uid.as_str()), record.encode())
                .await
        }))
    }

    fn put_key_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        record: &'a KeyRecord,
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.run(move |mut c| async move {
            self.guarded_set
                .key(key("revoked", uid.as_str()))
                .key(key("key", uid.as_str()))
                .arg(iat.to_string())
                .arg(record.encode())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|written| written == 1)
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

    fn revoke_user<'a>(&'a self, uid: &'a UserId, revocation: Revocation) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.merge_revocation(uid, revocation, REVOCATION_CHANNEL)
                .await
                .map(|_| ())
        })
    }

    fn record_revocation<'a>(
        &'a self,
        uid: &'a UserId,
        revocation: Revocation,
    ) -> StoreFuture<'a, Revocation> {
        Box::pin(self.merge_revocation(uid, revocation, ""))
    }

    fn restore_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        Box::pin(
            self.run(
                move |mut c| async move { c.del::<_, ()>(key("revoked", uid.as_str())).await },
            ),
        )
    }

    fn revocation<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<Revocation>> {
        Box::pin(async move {
            let raw: Option<String> = self
                .run(move |mut c| async move { c.get(key("revoked", uid.as_str())).await })
                .await?;
            Ok(raw.as_deref().map(Revocation::decode))
        })
    }

    fn revocation_events(&self) -> broadcast::Receiver<RevocationEvent> {
        let receiver = self.events.subscribe();
        self.subscriber.call_once(|| match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(relay_revocations(
                    self.redis.client().clone(),
                    self.events.clone(),
                    self.stop.clone(),
                ));
            }
            Err(_) => tracing::warn!(
                "revocation events need a Tokio runtime; only the periodic poll will see revocations"
            ),
        });
        receiver
    }

    fn put_registration<'a>(&'a self, uid: &'a UserId, registered_at: u64) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            c.set::<_, _, ()>(key("reg", uid.as_str()), registered_at)
                .await
        }))
    }

    fn registration<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<u64>> {
        Box::pin(self.run(move |mut c| async move { c.get(key("reg", uid.as_str())).await }))
    }

    fn put_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            check_platform(platform)?;
            self.run(move |mut c| async move {
                c.hset::<_, _, _, ()>(key("tokens", uid.as_str()), platform, sealed)
                    .await
            })
            .await
        })
    }

    fn put_platform_token_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_platform(platform)?;
            self.run(move |mut c| async move {
                self.guarded_hset
                    .key(key("revoked", uid.as_str()))
                    .key(key("tokens", uid.as_str()))
                    .arg(iat.to_string())
                    .arg(platform)
                    .arg(sealed)
                    .invoke_async::<i64>(&mut c)
                    .await
                    .map(|written| written == 1)
            })
            .await
        })
    }

    fn platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(
            self.run(
                move |mut c| async move { c.hget(key("tokens", uid.as_str()), platform).await },
            ),
        )
    }

    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.hkeys(key("tokens", uid.as_str())).await })
                .await?;
            list.sort();
            Ok(list)
        })
    }

    fn delete_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed: i64 = self
                .run(
                    move |mut c| async move { c.hdel(key("tokens", uid.as_str()), platform).await },
                )
                .await?;
            Ok(removed > 0)
        })
    }

    fn replace_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        old: &'a [u8],
        new: &'a [u8],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let done: i64 = self
                .run(move |mut c| async move {
                    self.replace
                        .key(key("tokens", uid.as_str()))
                        .arg(platform)
                        .arg(old)
                        .arg(new)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(done == 1)
        })
    }

    fn platform_tokens_page<'a>(&'a self, cursor: Option<&'a str>) -> StoreFuture<'a, TokenPage> {
        Box::pin(async move {
            let cursor: u64 = match cursor {
                None => 0,
                Some(text) => text
                    .parse()
                    .map_err(|_| StoreError::Invalid("not a token listing cursor".into()))?,
            };
            let pattern = format!("{KEY_PREFIX}tokens:*");
            let (next, keys): (u64, Vec<String>) = self
                .run(move |mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let mut page = TokenPage {
                tokens: Vec::new(),
                next: (next != 0).then(|| next.to_string()),
            };
            let tokens_prefix = format!("{KEY_PREFIX}tokens:");
            for name in keys {
                let Some(uid) = name
                    .strip_prefix(tokens_prefix.as_str())
                    .and_then(|u| UserId::parse(u).ok())
                else {
                    continue;
                };
                let fields: std::collections::HashMap<String, Vec<u8>> = self
                    .run(move |mut c| async move { c.hgetall(name).await })
                    .await?;
                for (platform, sealed) in fields {
                    page.tokens.push(StoredToken {
                        uid: uid.clone(),
                        platform,
                        sealed,
                    });
                }
            }
            Ok(page)
        })
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
    use testkit::RedisServer;

    #[tokio::test]
    async fn conformance() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        crate::conformance::exercise(&store).await;
    }

    #[tokio::test]
    async fn revocations_reach_other_instances() {
        let server = RedisServer::start();
        let listener = RedisStore::connect(&server.url()).await.unwrap();
        let revoker = RedisStore::connect(&server.url()).await.unwrap();
        let events = listener.revocation_events();
        crate::conformance::exercise_events(&revoker, events).await;
    }

    #[tokio::test]
    async fn resubscribes_after_an_outage_and_asks_for_a_resync() {
        let mut server = RedisServer::start();
        let listener = RedisStore::connect(&server.url()).await.unwrap();
        let events = listener.revocation_events();
        // Subscribed (an event is heard) before the outage.
        let mut events = crate::conformance::exercise_events(&listener, events).await;
        server.stop();
        server.restart();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("a resync within 10 s");
            // Late repeats of the warm-up may come first.
            if got.unwrap() == RevocationEvent::Resync {
                break;
            }
        }
        let revoker = RedisStore::connect(&server.url()).await.unwrap();
        crate::conformance::exercise_events(&revoker, events).await;
    }

    #[test]
    fn announcements_parse() {
        assert_eq!(
            parse_announcement(b"u-1 before:17"),
            Some(RevocationEvent::Revoked {
                uid: UserId::parse("u-1").unwrap(),
                revocation: Revocation::IssuedBefore(17)
            })
        );
        assert_eq!(
            parse_announcement(b"u-1 all"),
            Some(RevocationEvent::Revoked {
                uid: UserId::parse("u-1").unwrap(),
                revocation: Revocation::All
            })
        );
        assert_eq!(parse_announcement(b"bad_uid all"), None);
        assert_eq!(parse_announcement(b"nospace"), None);
        assert_eq!(parse_announcement(&[0xff, b' ', b'a']), None);
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
