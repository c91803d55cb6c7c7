//! Owns the identity service's short-lived sign-up state, the [`SignUps`]
//! domain: registration sessions (the number, the current code and its
//! expiry, wrong tries, resends, the uid once verified) and the per-window
//! rate counters. In Redis (keys `idp:*`, every one with a TTL, see
//! `SCHEMA.md`) when `REDIS_URL` is set, so that several instances share it;
//! otherwise in two capped in-memory maps ([`MemorySignUps`]): the state
//! lives minutes, so a restart losing it only asks for a new code.
//!
//! Sessions are stored under an id the identity service derives from the
//! session token (its SHA-256), never the token itself. Registrations (what
//! outlives a session) are the [`crate::Registrations`] domain.

mod memory;

pub use memory::MemorySignUps;

use crate::{RedisStore, StoreError, StoreFuture};
use std::sync::Arc;
use std::time::Duration;

/// Prefix of every Redis key of the sign-up state.
pub const SIGN_UP_KEY_PREFIX: &str = "idp:";

/// A registration session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignUpSession {
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

/// Sign-up sessions and rate counters. Updates of a session that expired or
/// was deleted change nothing (an expired session must not come back without
/// its expiry). [`StoreError::Full`] when the in-memory maps are full.
pub trait SignUps: Send + Sync + 'static {
    /// Starts a session for `msisdn` that expires after `ttl`.
    fn create_session<'a>(
        &'a self,
        id: &'a str,
        msisdn: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;

    /// The live session `id`, if any.
    fn session<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<SignUpSession>>;

    /// Stores a new code for the session (replacing any earlier one).
    /// `false` when the session is gone.
    fn set_code<'a>(&'a self, id: &'a str, code: &'a str, expires: u64) -> StoreFuture<'a, bool>;

    /// Counts one more wrong code; the new count (`None`: session gone).
    fn add_attempt<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u32>>;

    /// Counts one more resend; the new count (`None`: session gone).
    fn add_resend<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u32>>;

    /// Removes the code if it is still there: `true` for exactly one caller,
    /// which makes a code single-use even under concurrent tries.
    fn take_code<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;

    /// Records the verified uid in the session, and the `iat` of the token
    /// issued for it. `false` when the session is gone.
    fn mark_verified<'a>(&'a self, id: &'a str, uid: &'a str, iat: u64) -> StoreFuture<'a, bool>;

    /// Ends the session.
    fn delete_session<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()>;

    /// Counts one request against `key` in the current window of `window`;
    /// the count so far in the window.
    fn hit<'a>(&'a self, key: &'a str, window: Duration) -> StoreFuture<'a, u32>;
}

/// Opens the sign-up state: Redis when `redis_url` is given (connected on
/// first use), otherwise memory holding at most `max_entries` sessions and
/// as many counters.
pub fn open_sign_ups(
    redis_url: Option<&str>,
    max_entries: usize,
) -> Result<Arc<dyn SignUps>, StoreError> {
    match redis_url {
        Some(url) => Ok(Arc::new(RedisStore::new(url)?)),
        None => Ok(Arc::new(MemorySignUps::new(max_entries))),
    }
}
