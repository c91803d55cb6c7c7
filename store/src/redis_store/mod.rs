//! Owns the Redis implementation of [`Store`], on one Redis or a Redis
//! Cluster ([`crate::RedisTarget`]): one multiplexed, self-reconnecting
//! connection, connected lazily so that a handler starts while Redis is down
//! and serves 503s until it comes back. Every operation runs under a
//! deadline, and every command, transaction and script touches keys of one
//! user only, which the cluster layout puts in one hash slot (`{uid}`);
//! the operations that span users (accepting a contact, deleting a user)
//! are ordered steps, each within one slot, that a retry completes.
//! Revocations are also published on a pub/sub channel (which a cluster
//! broadcasts to every node) that a background subscriber (started by the
//! first [`Store::revocation_events`] call, stopped when the store is
//! dropped) turns into local events, so that every process sharing the
//! Redis hears them. Key schema: `SCHEMA.md`.

use crate::tokens::check_platform;
use crate::{
    Accounts, Contacts, KeyRecord, Keys, PlatformTokens, Registrations, Revocation,
    RevocationEvent, Revocations, Store, StoreError, StoreFuture, StoredToken, TokenPage,
    REVOCATION_EVENTS_CAPACITY,
};
use crate::{RedisConn, RedisConnection, RedisTarget};
use envelope::b64_encode;
use futures::StreamExt;
use protocol::uid::UserId;
use redis::AsyncCommands;
use std::future::Future;
use std::sync::Once;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

mod accounts;
mod contacts;
mod keys;
mod registrations;
mod revocations;
mod sign_ups;
mod tokens;

#[cfg(test)]
mod cluster_faults;

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

/// The first step of accepting a contact, in the target's slot: removes the
/// request (`KEYS[1]` = the target's incoming requests, `ARGV[1]` = the
/// requester) and adds the requester to the target's contacts (`KEYS[2]`).
/// 1: accepted now; 2: already accepted (the second step may not have run:
/// the caller runs it again); 0: no such request.
const ACCEPT_SCRIPT: &str = r"
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 2
end
return 0
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
    /// Key names: today's on one Redis, hash-tagged on a cluster.
    layout: Layout,
    accept: redis::Script,
    revoke: redis::Script,
    replace: redis::Script,
    guarded_set: redis::Script,
    guarded_hset: redis::Script,
    hset_if_exists: redis::Script,
    incr_if_exists: redis::Script,
    hit: redis::Script,
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

/// How a user's key is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `mqgate:<kind>:<uid>`, the names a single Redis has always held
    /// (kept so that an upgrade finds its data).
    Plain,
    /// `mqgate:<kind>:{<uid>}`: every key of a user in one hash slot, so
    /// that a script or transaction over them runs on one cluster node.
    Tagged,
}

impl Layout {
    fn of(target: &RedisTarget) -> Layout {
        if target.is_cluster() {
            Layout::Tagged
        } else {
            Layout::Plain
        }
    }

    /// The name of `uid`'s key of `kind` (`mqgate:key:<uid>`, ...).
    fn key(self, kind: &str, uid: &str) -> String {
        match self {
            Layout::Plain => format!("{KEY_PREFIX}{kind}:{uid}"),
            Layout::Tagged => format!("{KEY_PREFIX}{kind}:{{{uid}}}"),
        }
    }

    /// The uid in a key name `kind_prefix` + uid (as [`Layout::key`] writes it).
    fn uid_in<'k>(self, name: &'k str, kind_prefix: &str) -> Option<&'k str> {
        let rest = name.strip_prefix(kind_prefix)?;
        match self {
            Layout::Plain => Some(rest),
            Layout::Tagged => rest.strip_prefix('{')?.strip_suffix('}'),
        }
    }
}

impl RedisStore {
    /// Parses `url` (one Redis, or several comma-separated cluster nodes:
    /// [`RedisTarget::parse`]) without connecting: the store connects on
    /// first use.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let target = RedisTarget::parse(url).map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(Self::with_target(target))
    }

    /// Like [`RedisStore::new`], for a target already parsed.
    pub fn with_target(target: RedisTarget) -> Self {
        let layout = Layout::of(&target);
        let redis = RedisConnection::new(target);
        let (events, _) = broadcast::channel(REVOCATION_EVENTS_CAPACITY);
        let stop = CancellationToken::new();
        RedisStore {
            redis,
            layout,
            accept: redis::Script::new(ACCEPT_SCRIPT),
            revoke: redis::Script::new(REVOKE_SCRIPT),
            replace: redis::Script::new(REPLACE_SCRIPT),
            guarded_set: redis::Script::new(&format!("{REVOCATION_GUARD}{GUARDED_SET}")),
            guarded_hset: redis::Script::new(&format!("{REVOCATION_GUARD}{GUARDED_HSET}")),
            hset_if_exists: redis::Script::new(sign_ups::HSET_IF_EXISTS),
            incr_if_exists: redis::Script::new(sign_ups::INCR_IF_EXISTS),
            hit: redis::Script::new(sign_ups::HIT),
            events,
            subscriber: Once::new(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        }
    }

    /// The name of `uid`'s key of `kind` in this store's layout.
    fn key(&self, kind: &str, uid: &UserId) -> String {
        self.layout.key(kind, uid.as_str())
    }

    /// Whether the store is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.layout == Layout::Tagged
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

    async fn conn(&self) -> Result<RedisConn, StoreError> {
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
                    .key(self.key("revoked", uid))
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
        F: FnOnce(RedisConn) -> Fut,
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
///
/// `nodes` are the configured Redis nodes: one for a single Redis; on a
/// cluster, classic pub/sub reaches every node, so the subscription is held
/// on one node and moves to the next one in the list when that node fails.
async fn relay_revocations(
    nodes: Vec<redis::Client>,
    events: broadcast::Sender<RevocationEvent>,
    stop: CancellationToken,
) {
    let mut gap = false;
    let mut next = 0usize;
    loop {
        let Some(client) = nodes.get(next % nodes.len().max(1)) else {
            tracing::warn!("no Redis node to subscribe to revocations on");
            return;
        };
        next = next.wrapping_add(1);
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
                // Stay on this node while it holds.
                next = next.wrapping_sub(1);
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
                // Try the next node first: this one may be gone.
                next = next.wrapping_add(1);
            }
            Err(error) => {
                if !gap {
                    tracing::warn!(%error, "cannot subscribe to the revocation channel; retrying");
                }
            }
        }
        gap = true;
        // Every node tried once without success: pause before the next round.
        if next.is_multiple_of(nodes.len().max(1)) || nodes.len() == 1 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
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
    use testkit::{RedisCluster, RedisServer};

    /// The Redis suite: the conformance of every domain, the sign-up
    /// state, and revocations heard by another instance. Run against one
    /// Redis and against a Redis Cluster.
    async fn suite(url: &str) {
        let store = RedisStore::connect(url).await.unwrap();
        crate::conformance::exercise(&store).await;
        crate::conformance::sign_ups(&store).await;
        let listener = RedisStore::connect(url).await.unwrap();
        let revoker = RedisStore::connect(url).await.unwrap();
        let events = listener.revocation_events();
        crate::conformance::exercise_events(&revoker, events).await;
    }

    #[tokio::test]
    async fn suite_on_one_redis() {
        let server = RedisServer::start();
        suite(&server.url()).await;
    }

    #[tokio::test]
    async fn suite_on_a_cluster() {
        let cluster = RedisCluster::start();
        let store = RedisStore::connect(&cluster.redis_url()).await.unwrap();
        assert!(store.is_cluster());
        suite(&cluster.redis_url()).await;
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
