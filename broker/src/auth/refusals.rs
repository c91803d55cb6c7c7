//! Owns the short memory of refused credentials: a client retrying a bad
//! token every second is answered from here without verifying it again.
//! Keys are keyed hashes of (username, password), never the secrets.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// Most refusals remembered; beyond it expired ones are dropped, then all.
const MAX_ENTRIES: usize = 100_000;

/// Remembers refusals of type `R` for a fixed time.
pub struct RefusalCache<R> {
    ttl: Duration,
    hasher: RandomState,
    entries: Mutex<HashMap<u64, (R, Instant)>>,
}

impl<R: Clone> RefusalCache<R> {
    pub fn new(ttl: Duration) -> Self {
        RefusalCache {
            ttl,
            hasher: RandomState::new(),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, username: &str, password: &[u8]) -> u64 {
        self.hasher.hash_one((username, password))
    }

    /// The remembered refusal of these credentials, if still fresh.
    pub fn get(&self, username: &str, password: &[u8]) -> Option<R> {
        if self.ttl.is_zero() {
            return None;
        }
        let key = self.key(username, password);
        let mut entries = self.entries.lock();
        match entries.get(&key) {
            Some((refusal, until)) if *until > Instant::now() => Some(refusal.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers that these credentials were refused.
    pub fn remember(&self, username: &str, password: &[u8], refusal: R) {
        if self.ttl.is_zero() {
            return;
        }
        let key = self.key(username, password);
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (refusal, now + self.ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_for_the_ttl_only() {
        let cache = RefusalCache::new(Duration::from_millis(50));
        cache.remember("JWT", b"bad", 7u8);
        assert_eq!(cache.get("JWT", b"bad"), Some(7));
        assert_eq!(cache.get("JWT", b"other"), None);
        assert_eq!(cache.get("handler", b"bad"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("JWT", b"bad"), None);
    }

    #[test]
    fn zero_ttl_disables() {
        let cache = RefusalCache::new(Duration::ZERO);
        cache.remember("JWT", b"bad", 1u8);
        assert_eq!(cache.get("JWT", b"bad"), None);
    }
}
