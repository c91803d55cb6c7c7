//! Owns the service's short-lived state: registration sessions (the number,
//! the current code and its expiry, wrong tries, resends, the uid once
//! verified) and the per-minute rate counters. In Redis (keys `idp:*`, every
//! one with a TTL) when `REDIS_URL` is set, so that several instances share
//! it; otherwise in two capped in-memory maps.
//!
//! Sessions are keyed by the SHA-256 of their token, never the token itself:
//! a copy of the state does not let anyone act as a client. Registrations
//! (what outlives a session) are in the shared store, not here.

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Prefix of every Redis key the service writes.
pub const KEY_PREFIX: &str = "idp:";
/// Longest one Redis operation may take.
const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("too many registrations in progress; try again later")]
    Full,
}

/// A registration session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The E.164 number being registered.
    pub msisdn: String,
    /// The code sent last, while unused.
    pub code: Option<String>,
    /// When that code expires, Unix seconds.
    pub code_expires: u64,
    /// Wrong codes tried.
    pub attempts: u32,
    /// Codes sent again.
    pub resends: u32,
    /// Set once the number is verified.
    pub uid: Option<String>,
    /// The `iat` of the device token issued when the number was verified
    /// (0 when unknown): `/unregister` with this session's token is refused
    /// once a revocation covers that token, as for the token itself.
    pub verified_at: u64,
}

/// The id a session is stored under: hex SHA-256 of its token.
pub fn session_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where sessions and counters live.
pub enum State {
    Memory(MemoryState),
    /// Boxed: the client and scripts are large beside the maps.
    Redis(Box<RedisState>),
}

impl State {
    /// Redis when `redis_url` is given (connected on first use), otherwise
    /// memory holding at most `max_entries` sessions and as many counters.
    pub fn open(redis_url: Option<&str>, max_entries: usize) -> Result<State, StateError> {
        match redis_url {
            Some(url) => Ok(State::Redis(Box::new(RedisState::new(url)?))),
            None => Ok(State::Memory(MemoryState::new(max_entries))),
        }
    }

    pub async fn create_session(
        &self,
        id: &str,
        msisdn: &str,
        ttl: Duration,
    ) -> Result<(), StateError> {
        match self {
            State::Memory(m) => m.create_session(id, msisdn, ttl),
            State::Redis(r) => r.create_session(id, msisdn, ttl).await,
        }
    }

    pub async fn session(&self, id: &str) -> Result<Option<Session>, StateError> {
        match self {
            State::Memory(m) => Ok(m.session(id)),
            State::Redis(r) => r.session(id).await,
        }
    }

    /// Stores a new code for the session (replacing any earlier one).
    /// `false` when the session is gone.
    pub async fn set_code(&self, id: &str, code: &str, expires: u64) -> Result<bool, StateError> {
        match self {
            State::Memory(m) => Ok(m.update(id, |s| {
                s.code = Some(code.to_owned());
                s.code_expires = expires;
            })),
            State::Redis(r) => {
                r.hset_if_exists(
                    id,
                    &[("code", code), ("code_expires", &expires.to_string())],
                )
                .await
            }
        }
    }

    /// Counts one more wrong code; the new count (`None`: session gone).
    pub async fn add_attempt(&self, id: &str) -> Result<Option<u32>, StateError> {
        self.increment(id, "attempts").await
    }

    /// Counts one more resend; the new count (`None`: session gone).
    pub async fn add_resend(&self, id: &str) -> Result<Option<u32>, StateError> {
        self.increment(id, "resends").await
    }

    async fn increment(&self, id: &str, field: &'static str) -> Result<Option<u32>, StateError> {
        match self {
            State::Memory(m) => {
                let mut count = None;
                m.update(id, |s| {
                    let slot = if field == "attempts" {
                        &mut s.attempts
                    } else {
                        &mut s.resends
                    };
                    *slot = slot.saturating_add(1);
                    count = Some(*slot);
                });
                Ok(count)
            }
            State::Redis(r) => r.increment(id, field).await,
        }
    }

    /// Removes the code if it is still there: `true` for exactly one caller,
    /// which makes a code single-use even under concurrent tries.
    pub async fn take_code(&self, id: &str) -> Result<bool, StateError> {
        match self {
            State::Memory(m) => {
                let mut taken = false;
                m.update(id, |s| taken = s.code.take().is_some());
                Ok(taken)
            }
            State::Redis(r) => r.take_code(id).await,
        }
    }

    /// Records the verified uid in the session, and the `iat` of the token
    /// issued for it.
    pub async fn mark_verified(&self, id: &str, uid: &str, iat: u64) -> Result<bool, StateError> {
        match self {
            State::Memory(m) => Ok(m.update(id, |s| {
                s.uid = Some(uid.to_owned());
                s.verified_at = iat;
            })),
            State::Redis(r) => {
                let iat = iat.to_string();
                r.hset_if_exists(id, &[("uid", uid), ("verified_at", iat.as_str())])
                    .await
            }
        }
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), StateError> {
        match self {
            State::Memory(m) => {
                m.sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
                Ok(())
            }
            State::Redis(r) => r.delete_session(id).await,
        }
    }

    /// Counts one request against `key` in the current window of `window`;
    /// the count so far in the window.
    pub async fn hit(&self, key: &str, window: Duration) -> Result<u32, StateError> {
        match self {
            State::Memory(m) => m.hit(key, window),
            State::Redis(r) => r.hit(key, window).await,
        }
    }
}

/// The in-memory state: two maps, each capped at `max_entries`; expired
/// entries are dropped when a map is full, and when they are read.
pub struct MemoryState {
    max_entries: usize,
    sessions: Mutex<HashMap<String, (Session, Instant)>>,
    counters: Mutex<HashMap<String, (u32, Instant)>>,
}

impl MemoryState {
    pub fn new(max_entries: usize) -> MemoryState {
        MemoryState {
            max_entries,
            sessions: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// How many sessions and counters are held (tests check the caps).
    pub fn len(&self) -> (usize, usize) {
        let sessions = self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        (sessions, counters)
    }

    fn create_session(&self, id: &str, msisdn: &str, ttl: Duration) -> Result<(), StateError> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.len() >= self.max_entries {
            sessions.retain(|_, (_, expires)| *expires > now);
            if sessions.len() >= self.max_entries {
                return Err(StateError::Full);
            }
        }
        let session = Session {
            msisdn: msisdn.to_owned(),
            ..Session::default()
        };
        sessions.insert(id.to_owned(), (session, now + ttl));
        Ok(())
    }

    fn session(&self, id: &str) -> Option<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get(id) {
            Some((session, expires)) if *expires > Instant::now() => Some(session.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    /// Applies `change` to a live session; `false` when there is none.
    fn update(&self, id: &str, change: impl FnOnce(&mut Session)) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get_mut(id) {
            Some((session, expires)) if *expires > Instant::now() => {
                change(session);
                true
            }
            _ => false,
        }
    }

    fn hit(&self, key: &str, window: Duration) -> Result<u32, StateError> {
        let now = Instant::now();
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((count, ends)) = counters.get_mut(key) {
            if *ends > now {
                *count = count.saturating_add(1);
                return Ok(*count);
            }
            *count = 1;
            *ends = now + window;
            return Ok(1);
        }
        if counters.len() >= self.max_entries {
            counters.retain(|_, (_, ends)| *ends > now);
            if counters.len() >= self.max_entries {
                // Fail closed: an attacker filling the map must not lift the limits.
                return Err(StateError::Full);
            }
        }
        counters.insert(key.to_owned(), (1, now + window));
        Ok(1)
    }
}

/// `HSET` only on a session that still exists (an expired one must not come
/// back without a TTL).
const HSET_IF_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
";

/// `HINCRBY` only on a session that still exists; -1 otherwise.
const INCR_IF_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return -1
";

/// A fixed-window counter: the first hit of a window sets its expiry.
const HIT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// The Redis state.
pub struct RedisState {
    redis: store::RedisConnection,
    hset: redis::Script,
    incr: redis::Script,
    hit: redis::Script,
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(format!("redis: {e}"))
}

fn session_key(id: &str) -> String {
    format!("{KEY_PREFIX}s:{id}")
}

impl RedisState {
    /// Parses `url` without connecting.
    pub fn new(url: &str) -> Result<RedisState, StateError> {
        let redis =
            store::RedisConnection::open(url).map_err(|e| StateError::Unavailable(e.into()))?;
        Ok(RedisState {
            redis,
            hset: redis::Script::new(HSET_IF_EXISTS),
            incr: redis::Script::new(INCR_IF_EXISTS),
            hit: redis::Script::new(HIT),
        })
    }

    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self.redis.get().await.map_err(unavailable)?;
            op(conn).await.map_err(unavailable)
        };
        tokio::time::timeout(OP_TIMEOUT, work)
            .await
            .map_err(|_| StateError::Unavailable("redis: operation timed out".into()))?
    }

    async fn create_session(
        &self,
        id: &str,
        msisdn: &str,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let key = session_key(id);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(&key)
                .arg("msisdn")
                .arg(msisdn)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ms)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn session(&self, id: &str) -> Result<Option<Session>, StateError> {
        let key = session_key(id);
        let fields: HashMap<String, String> = self
            .run(|mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await?;
        let Some(msisdn) = fields.get("msisdn") else {
            return Ok(None);
        };
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Some(Session {
            msisdn: msisdn.clone(),
            code: fields.get("code").cloned(),
            code_expires: number("code_expires"),
            attempts: u32::try_from(number("attempts")).unwrap_or(u32::MAX),
            resends: u32::try_from(number("resends")).unwrap_or(u32::MAX),
            uid: fields.get("uid").cloned(),
            verified_at: number("verified_at"),
        }))
    }

    async fn hset_if_exists(&self, id: &str, pairs: &[(&str, &str)]) -> Result<bool, StateError> {
        let key = session_key(id);
        let mut invocation = self.hset.key(&key);
        for (field, value) in pairs {
            invocation.arg(*field).arg(*value);
        }
        let done: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(done == 1)
    }

    async fn increment(&self, id: &str, field: &str) -> Result<Option<u32>, StateError> {
        let key = session_key(id);
        let count: i64 = self
            .run(|mut c| async move { self.incr.key(&key).arg(field).invoke_async(&mut c).await })
            .await?;
        Ok(u32::try_from(count).ok())
    }

    async fn take_code(&self, id: &str) -> Result<bool, StateError> {
        let key = session_key(id);
        let removed: i64 = self
            .run(|mut c| async move {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg("code")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(removed == 1)
    }

    async fn delete_session(&self, id: &str) -> Result<(), StateError> {
        let key = session_key(id);
        self.run(|mut c| async move { redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await })
            .await
    }

    async fn hit(&self, key: &str, window: Duration) -> Result<u32, StateError> {
        let key = format!("{KEY_PREFIX}r:{key}");
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let count: i64 = self
            .run(|mut c| async move { self.hit.key(&key).arg(ms).invoke_async(&mut c).await })
            .await?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exercise(state: &State) {
        let id = session_id("token-1");
        assert_eq!(state.session(&id).await.unwrap(), None);
        state
            .create_session(&id, "+15551234567", Duration::from_secs(60))
            .await
            .unwrap();
        let s = state.session(&id).await.unwrap().unwrap();
        assert_eq!(s.msisdn, "+15551234567");
        assert_eq!(
            (s.code.clone(), s.attempts, s.resends, s.uid.clone()),
            (None, 0, 0, None)
        );
        assert!(state.set_code(&id, "123456", 99).await.unwrap());
        assert_eq!(state.add_attempt(&id).await.unwrap(), Some(1));
        assert_eq!(state.add_attempt(&id).await.unwrap(), Some(2));
        assert_eq!(state.add_resend(&id).await.unwrap(), Some(1));
        let s = state.session(&id).await.unwrap().unwrap();
        assert_eq!(
            (s.code.as_deref(), s.code_expires, s.attempts, s.resends),
            (Some("123456"), 99, 2, 1)
        );
        assert!(state.take_code(&id).await.unwrap());
        assert!(!state.take_code(&id).await.unwrap(), "a code is taken once");
        assert!(state.mark_verified(&id, "uid1", 1234).await.unwrap());
        assert_eq!(
            state.session(&id).await.unwrap().unwrap().uid.as_deref(),
            Some("uid1")
        );
        assert_eq!(state.session(&id).await.unwrap().unwrap().verified_at, 1234);
        state.delete_session(&id).await.unwrap();
        assert_eq!(state.session(&id).await.unwrap(), None);
        // A gone session is not brought back by updates.
        assert!(!state.set_code(&id, "1", 1).await.unwrap());
        assert_eq!(state.add_attempt(&id).await.unwrap(), None);
        assert!(!state.mark_verified(&id, "u", 1).await.unwrap());
        assert_eq!(state.session(&id).await.unwrap(), None);
        // Counters.
        for n in 1..=3 {
            assert_eq!(
                state
                    .hit("a:1.2.3.4", Duration::from_secs(60))
                    .await
                    .unwrap(),
                n
            );
        }
        assert_eq!(
            state
                .hit("a:1.2.3.5", Duration::from_secs(60))
                .await
                .unwrap(),
            1
        );
        assert_eq!(state.hit("w", Duration::from_millis(200)).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            state.hit("w", Duration::from_millis(200)).await.unwrap(),
            1,
            "a new window"
        );
        // Expiry.
        let short = session_id("short");
        state
            .create_session(&short, "+15551234567", Duration::from_millis(200))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(state.session(&short).await.unwrap(), None);
    }

    #[tokio::test]
    async fn memory_state_behaves() {
        exercise(&State::open(None, 100).unwrap()).await;
    }

    #[tokio::test]
    async fn redis_state_behaves() {
        let redis = testkit::RedisServer::start();
        exercise(&State::open(Some(&redis.url()), 100).unwrap()).await;
    }

    #[test]
    fn memory_maps_are_capped() {
        let m = MemoryState::new(100);
        for i in 0..100 {
            m.create_session(&format!("s{i}"), "+1", Duration::from_secs(60))
                .unwrap();
            m.hit(&format!("c{i}"), Duration::from_secs(60)).unwrap();
        }
        assert!(matches!(
            m.create_session("one-more", "+1", Duration::from_secs(60)),
            Err(StateError::Full)
        ));
        assert!(matches!(
            m.hit("one-more", Duration::from_secs(60)),
            Err(StateError::Full)
        ));
        // A known counter still counts.
        assert_eq!(m.hit("c0", Duration::from_secs(60)).unwrap(), 2);
        assert_eq!(m.len(), (100, 100));
    }

    #[test]
    fn session_ids_hide_the_token() {
        let id = session_id("secret-token");
        assert_eq!(id.len(), 64);
        assert!(!id.contains("secret"));
    }
}
