//! Owns the in-memory [`SignUps`] backend: two maps, each capped at
//! `max_entries`; expired entries are dropped when a map is full, and when
//! they are read. A full map fails closed ([`StoreError::Full`]): an attacker
//! filling it must not lift the rate limits.

use super::{SignUpSession, SignUps};
use crate::{StoreError, StoreFuture};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The in-memory sign-up state.
pub struct MemorySignUps {
    max_entries: usize,
    sessions: Mutex<HashMap<String, (SignUpSession, Instant)>>,
    counters: Mutex<HashMap<String, (u32, Instant)>>,
}

impl std::fmt::Debug for MemorySignUps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySignUps")
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

/// An answer that is ready now.
fn ready<'a, T: Send + 'a>(result: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

impl MemorySignUps {
    /// Holding at most `max_entries` sessions and as many counters.
    pub fn new(max_entries: usize) -> MemorySignUps {
        MemorySignUps {
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

    fn create(&self, id: &str, msisdn: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.len() >= self.max_entries {
            sessions.retain(|_, (_, expires)| *expires > now);
            if sessions.len() >= self.max_entries {
                return Err(StoreError::Full);
            }
        }
        let session = SignUpSession {
            msisdn: msisdn.to_owned(),
            ..SignUpSession::default()
        };
        sessions.insert(id.to_owned(), (session, now + ttl));
        Ok(())
    }

    fn get(&self, id: &str) -> Option<SignUpSession> {
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
    fn update(&self, id: &str, change: impl FnOnce(&mut SignUpSession)) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get_mut(id) {
            Some((session, expires)) if *expires > Instant::now() => {
                change(session);
                true
            }
            _ => false,
        }
    }

    /// Adds one to the counter `pick` chooses; the new count (`None`: gone).
    fn increment(&self, id: &str, pick: fn(&mut SignUpSession) -> &mut u32) -> Option<u32> {
        let mut count = None;
        self.update(id, |s| {
            let slot = pick(s);
            *slot = slot.saturating_add(1);
            count = Some(*slot);
        });
        count
    }

    fn count(&self, key: &str, window: Duration) -> Result<u32, StoreError> {
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
                return Err(StoreError::Full);
            }
        }
        counters.insert(key.to_owned(), (1, now + window));
        Ok(1)
    }
}

impl SignUps for MemorySignUps {
    fn create_session<'a>(
        &'a self,
        id: &'a str,
        msisdn: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        ready(self.create(id, msisdn, ttl))
    }

    fn session<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<SignUpSession>> {
        ready(Ok(self.get(id)))
    }

    fn set_code<'a>(&'a self, id: &'a str, code: &'a str, expires: u64) -> StoreFuture<'a, bool> {
        ready(Ok(self.update(id, |s| {
            s.code = Some(code.to_owned());
            s.code_expires = expires;
        })))
    }

    fn add_attempt<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u32>> {
        ready(Ok(self.increment(id, |s| &mut s.attempts)))
    }

    fn add_resend<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u32>> {
        ready(Ok(self.increment(id, |s| &mut s.resends)))
    }

    fn take_code<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let mut taken = false;
        self.update(id, |s| taken = s.code.take().is_some());
        ready(Ok(taken))
    }

    fn mark_verified<'a>(&'a self, id: &'a str, uid: &'a str, iat: u64) -> StoreFuture<'a, bool> {
        ready(Ok(self.update(id, |s| {
            s.uid = Some(uid.to_owned());
            s.verified_at = iat;
        })))
    }

    fn delete_session<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        ready(Ok(()))
    }

    fn hit<'a>(&'a self, key: &'a str, window: Duration) -> StoreFuture<'a, u32> {
        ready(self.count(key, window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn behaves() {
        crate::conformance::sign_ups(&MemorySignUps::new(100)).await;
    }

    #[tokio::test]
    async fn maps_are_capped() {
        let m = MemorySignUps::new(100);
        for i in 0..100 {
            m.create_session(&format!("s{i}"), "+1", Duration::from_secs(60))
                .await
                .unwrap();
            m.hit(&format!("c{i}"), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(matches!(
            m.create_session("one-more", "+1", Duration::from_secs(60))
                .await,
            Err(StoreError::Full)
        ));
        assert!(matches!(
            m.hit("one-more", Duration::from_secs(60)).await,
            Err(StoreError::Full)
        ));
        // A known counter still counts.
        assert_eq!(m.hit("c0", Duration::from_secs(60)).await.unwrap(), 2);
        assert_eq!(m.len(), (100, 100));
    }
}
