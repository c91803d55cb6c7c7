//! Owns the Redis implementation of [`Store`]: one multiplexed,
//! self-reconnecting `ConnectionManager`, connected lazily so that a handler
//! starts while Redis is down and serves 503s until it comes back. Every
//! operation runs under a deadline. Revocations are also published on a
//! pub/sub channel that a background subscriber (started by the first
//! [`Store::revocation_events`] call, stopped when the store is dropped)
//! turns into local events, so that every process sharing the Redis hears
//! them. Key schema: `SCHEMA.md`.

use crate::tokens::check_platform;
use crate::RedisConnection;
use crate::{
    Accounts, Contacts, KeyRecord, Keys, PlatformTokens, Registrations, Revocation,
    RevocationEvent, Revocations, Store, StoreError, StoreFuture, StoredToken, TokenPage,
    REVOCATION_EVENTS_CAPACITY,
};
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

mod accounts;
mod contacts;
mod keys;
mod pairings;
mod registrations;
mod revocations;
mod sign_ups;
mod tokens;

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
    hset_if_exists: redis::Script,
    incr_if_exists: redis::Script,
    hit: redis::Script,
    pair_rotate: redis::Script,
    pair_claim: redis::Script,
    pair_decide: redis::Script,
    pair_transition: redis::Script,
    pair_replace: redis::Script,
    pair_del_if: redis::Script,
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
            hset_if_exists: redis::Script::new(sign_ups::HSET_IF_EXISTS),
            incr_if_exists: redis::Script::new(sign_ups::INCR_IF_EXISTS),
            hit: redis::Script::new(sign_ups::HIT),
            pair_rotate: redis::Script::new(pairings::ROTATE),
            pair_claim: redis::Script::new(pairings::CLAIM),
            pair_decide: redis::Script::new(pairings::DECIDE),
            pair_transition: redis::Script::new(pairings::TRANSITION),
            pair_replace: redis::Script::new(pairings::REPLACE),
            pair_del_if: redis::Script::new(pairings::DEL_IF),
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pairing_claims_race_to_one_winner() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        crate::pairings_conformance::racing_claims(std::sync::Arc::new(store)).await;
    }

    #[tokio::test]
    async fn sign_ups_conformance() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        crate::conformance::sign_ups(&store).await;
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
