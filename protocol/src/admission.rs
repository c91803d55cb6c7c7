//! Owns the pieces of connection admission that the broker's listeners and
//! the identity service's HTTP listener share: a cap on how many slots one
//! source ([`AddrKey`]) holds at once, released when its [`SourceSlot`] is
//! dropped, and the bookkeeping that turns a storm of refusals into one log
//! line per episode ([`RefusalEpisodes`]).
//!
//! The broker counts a source's connections that are not answered yet with
//! it; the identity service counts a source's open connections.

use crate::addr_key::AddrKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts the slots each source holds. Entries exist only while a source
/// holds some, so memory follows the sources that are connected, never the
/// ones that once were.
pub struct SourceLimit {
    /// 0 means no limit.
    max: usize,
    counts: Mutex<HashMap<AddrKey, usize>>,
}

/// One slot of a source: released when dropped.
pub struct SourceSlot {
    limit: Arc<SourceLimit>,
    key: AddrKey,
}

impl SourceLimit {
    /// At most `max` slots per source; 0 is no limit.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(SourceLimit {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `key`, unless it already holds `max`.
    pub fn try_admit(self: &Arc<Self>, key: AddrKey) -> Option<SourceSlot> {
        let mut counts = self.counts.lock();
        let count = counts.entry(key).or_insert(0);
        if self.max != 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            limit: self.clone(),
            key,
        })
    }

    /// Slots `key` holds now.
    pub fn held(&self, key: AddrKey) -> usize {
        self.counts.lock().get(&key).copied().unwrap_or(0)
    }

    /// Sources holding at least one slot.
    pub fn sources(&self) -> usize {
        self.counts.lock().len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.limit.counts.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Refusals this far apart belong to different episodes (and log again).
pub const EPISODE_QUIET: Duration = Duration::from_secs(10);

struct Episode {
    last: Instant,
    refused: u64,
}

/// Per kind of refusal `K`: when a refusal begins an episode (the first of
/// its kind after [`EPISODE_QUIET`] without one), so that a caller logs that
/// one and only counts the rest.
pub struct RefusalEpisodes<K> {
    episodes: Mutex<HashMap<K, Episode>>,
}

impl<K: Hash + Eq + Copy> Default for RefusalEpisodes<K> {
    fn default() -> Self {
        RefusalEpisodes {
            episodes: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> RefusalEpisodes<K> {
    /// Records a refusal of kind `why`. `Some(previous)` when it begins an
    /// episode (log it): `previous` is how many refusals the episode before
    /// it counted (`None` for the first one ever). `None`: count it only.
    pub fn record(&self, why: K) -> Option<Option<u64>> {
        self.record_at(why, Instant::now())
    }

    fn record_at(&self, why: K, now: Instant) -> Option<Option<u64>> {
        let mut episodes = self.episodes.lock();
        let episode = episodes.entry(why).or_insert(Episode {
            last: now,
            refused: 0,
        });
        let quiet = now.saturating_duration_since(episode.last) >= EPISODE_QUIET;
        let starts = episode.refused == 0 || quiet;
        let previous = quiet.then_some(episode.refused);
        if quiet {
            episode.refused = 0;
        }
        episode.refused += 1;
        episode.last = now;
        starts.then_some(previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn key(text: &str) -> AddrKey {
        AddrKey::of(text.parse::<IpAddr>().expect("test address"))
    }

    #[test]
    fn a_source_holds_at_most_max_and_slots_come_back_on_drop() {
        let limit = SourceLimit::new(2);
        let (a, b) = (key("10.0.0.1"), key("10.0.0.2"));
        let first = limit.try_admit(a).expect("first");
        let second = limit.try_admit(a).expect("second");
        assert!(limit.try_admit(a).is_none(), "a third is refused");
        assert!(
            limit.try_admit(b).is_some(),
            "another source is not held up"
        );
        assert_eq!(limit.held(a), 2);
        drop(first);
        assert_eq!(limit.held(a), 1);
        let third = limit.try_admit(a).expect("a slot came free");
        drop((second, third));
        assert_eq!(limit.held(a), 0);
        assert_eq!(limit.sources(), 0, "no entry left behind");
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let limit = SourceLimit::new(3);
        let held: Vec<_> = (1..=10u16)
            .filter_map(|i| limit.try_admit(key(&format!("2001:db8:1:2::{i:x}"))))
            .collect();
        assert_eq!(held.len(), 3, "rotating the interface id gains nothing");
        assert!(limit.try_admit(key("2001:db8:1:3::1")).is_some());
    }

    #[test]
    fn zero_is_no_limit() {
        let limit = SourceLimit::new(0);
        let held: Vec<_> = (0..1000)
            .filter_map(|_| limit.try_admit(key("10.0.0.1")))
            .collect();
        assert_eq!(held.len(), 1000);
    }

    #[test]
    fn one_log_line_per_episode_of_refusals() {
        let episodes = RefusalEpisodes::<&'static str>::default();
        let t0 = Instant::now();
        assert_eq!(episodes.record_at("cap", t0), Some(None), "the first logs");
        for i in 1..100 {
            let at = t0 + Duration::from_millis(i * 50);
            assert_eq!(episodes.record_at("cap", at), None, "the rest are counted");
        }
        assert_eq!(
            episodes.record_at("other", t0),
            Some(None),
            "each kind has its own episodes"
        );
        let later = t0 + Duration::from_millis(99 * 50) + EPISODE_QUIET;
        assert_eq!(
            episodes.record_at("cap", later),
            Some(Some(100)),
            "after a quiet spell a new episode logs, with the last one's count"
        );
        assert_eq!(episodes.record_at("cap", later), None);
    }
}
