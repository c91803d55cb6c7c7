//! Owns when the appender sets a user's reply stream's time to live: not
//! on every reply (a `PEXPIRE` per reply was a quarter of the device
//! plane's Redis calls), but at most once per [`REFRESH_EVERY`] per user
//! and node, to [`REPLY_STREAM_TTL`] + [`REFRESH_EVERY`], so the stream
//! still lives at least [`REPLY_STREAM_TTL`] after its last reply and at
//! most [`REFRESH_EVERY`] longer.
//!
//! Why that holds: a node asks the script to set the expiry when its own
//! last confirmed setting for the user (the batch's start, before Redis ran
//! it) is older than [`REFRESH_EVERY`], or unknown. So after a reply
//! appended at `t`, that node set it at some `s >= t - REFRESH_EVERY`, to at
//! least `s + TTL + REFRESH_EVERY >= t + TTL`. Every node sets the same
//! length from Redis's clock at the time, so a setting only moves the expiry
//! later. A stream that is gone (expired, deleted) is created again only by
//! the script, which then always sets the expiry (`XADD NOMKSTREAM` first when
//! not asked: it adds nothing to a missing stream). A failed batch forgets
//! every setting of this node (a failover may have lost a write the batch
//! made before). The map is capped ([`TRACKED`]): a user it does not hold
//! is asked for, which only costs a `PEXPIRE`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A user's stream lives at least this long after its last reply (then a
/// persistent session's owed replies are lost, counted at its replay).
pub const REPLY_STREAM_TTL: Duration = Duration::from_secs(24 * 3600);
/// A node sets a user's stream's expiry at most once per this long (a
/// 24th of the TTL); the stream may live this much past the TTL.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3600);
/// The expiry the script sets: [`REPLY_STREAM_TTL`] + [`REFRESH_EVERY`].
pub const EXPIRY_SET: Duration = REPLY_STREAM_TTL.saturating_add(REFRESH_EVERY);
// A refresh more often than the TTL, or a reply could outlive its expiry.
const _: () = assert!(REFRESH_EVERY.as_secs() < REPLY_STREAM_TTL.as_secs());
/// Users whose last setting a node remembers.
pub const TRACKED: usize = 64 * 1024;

/// When this node last set each user's stream's expiry (confirmed).
#[derive(Debug, Default)]
pub struct Expiries {
    set: HashMap<String, Instant>,
}

impl Expiries {
    /// Whether an append of `uid`'s at `now` must set the expiry.
    pub fn due(&self, uid: &str, now: Instant) -> bool {
        due(self.set.get(uid).copied(), now)
    }

    /// The script set `uid`'s expiry in a batch that started at `at`
    /// (its pipeline returned without error). Full: settings older than
    /// [`REFRESH_EVERY`] are forgotten (they are due anyway); if that
    /// frees less than a quarter, all are (each user then pays one more
    /// `PEXPIRE`): amortized O(1) per call.
    pub fn set(&mut self, uid: &str, at: Instant) {
        if let Some(last) = self.set.get_mut(uid) {
            *last = (*last).max(at);
            return;
        }
        if self.set.len() >= TRACKED {
            self.set.retain(|_, last| !due(Some(*last), at));
            if self.set.len() > TRACKED - TRACKED / 4 {
                self.set.clear();
            }
        }
        self.set.insert(uid.to_owned(), at);
    }

    /// A batch failed: nothing this node set is trusted any more.
    pub fn forget_all(&mut self) {
        self.set.clear();
    }

    /// Users remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.set.len()
    }
}

/// The decision: set the expiry unless this node set it less than
/// [`REFRESH_EVERY`] before `now`. A `last` after `now` (another batch's
/// start, recorded late) counts as recent.
pub fn due(last: Option<Instant>, now: Instant) -> bool {
    match last {
        None => true,
        Some(last) => now.saturating_duration_since(last) >= REFRESH_EVERY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_refresh() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // (last set, seconds after t0 now) -> due
        let table = [
            (None, 0, true),
            (Some(t0), 0, false),
            (Some(t0), 1, false),
            (Some(t0), 3599, false),
            (Some(t0), 3600, true),
            (Some(t0), 90_000, true),
            (Some(t0 + s(10)), 5, false),
        ];
        for (last, after, expected) in table {
            assert_eq!(due(last, t0 + s(after)), expected, "{last:?} {after}");
        }
    }

    #[test]
    fn remembers_per_user_and_forgets() {
        let t0 = Instant::now();
        let mut expiries = Expiries::default();
        assert!(expiries.due("alice", t0));
        expiries.set("alice", t0);
        assert!(!expiries.due("alice", t0 + Duration::from_secs(60)));
        assert!(expiries.due("bob", t0 + Duration::from_secs(60)));
        assert!(expiries.due("alice", t0 + REFRESH_EVERY));
        // An older batch's confirmation does not move it back.
        expiries.set("alice", t0 + Duration::from_secs(100));
        expiries.set("alice", t0);
        assert!(!expiries.due("alice", t0 + REFRESH_EVERY));
        assert!(expiries.due("alice", t0 + REFRESH_EVERY + Duration::from_secs(100)));
        expiries.forget_all();
        assert!(expiries.due("alice", t0 + Duration::from_secs(101)));
    }

    #[test]
    fn capped() {
        let t0 = Instant::now();
        let mut expiries = Expiries::default();
        // Full of old settings: they go, the new one stays.
        for i in 0..TRACKED {
            expiries.set(&format!("u{i}"), t0);
        }
        assert_eq!(expiries.len(), TRACKED);
        let later = t0 + REFRESH_EVERY;
        expiries.set("fresh", later);
        assert_eq!(expiries.len(), 1);
        assert!(!expiries.due("fresh", later));
        // Full of recent settings: all go (each is asked for again).
        for i in 1..TRACKED {
            expiries.set(&format!("v{i}"), later);
        }
        assert_eq!(expiries.len(), TRACKED);
        expiries.set("new", later);
        assert_eq!(expiries.len(), 1);
        assert!(expiries.due("fresh", later));
        assert!(!expiries.due("new", later));
    }
}
