//! Owns which commands a handler on this node is still working on: each
//! command injected here until a handler acknowledges it, so that its
//! reader keeps it from looking idle in its consumer group (`XCLAIM ...
//! JUSTID`, `commands.rs`) and no other node takes it over while its
//! handler's code runs. Pure state, table-tested; the reader sends.
//!
//! Without it a command whose handler code ran longer than the take-over
//! idle time (`commands::CLAIM_IDLE`, 15 s) was delivered again, to
//! another node's handler, while the first still ran it: the SDK's own
//! deadline for a command is 30 s. What a dead node held is not kept
//! (nobody refreshes it), nor what no handler here reads any more (its
//! reader stops and forgets), nor a command held past [`HOLD_MAX`] (a
//! handler that never acknowledges, a publish the router dropped).

use crate::acks::CommandTag;
use crate::entry::StreamId;
use std::collections::{BTreeMap, HashMap};

/// Longest a command is kept from looking idle: past the SDK's command
/// deadline (30 s) and a queue in front of it, then another node may take
/// it over.
pub const HOLD_MAX_MS: u64 = 90_000;
/// Refreshed once it has gone this long since its delivery or its last
/// refresh: a third of the take-over idle time, so the reader's check
/// every 5 s (`commands::CLAIM_EVERY`) refreshes it well before 15 s.
pub const REFRESH_AFTER_MS: u64 = 5_000;
/// Commands held at once on a node; beyond it a command is not kept (it
/// is taken over once idle, as before): the router's own caps bound what
/// handlers here hold long before that.
pub const MAX_HELD: usize = 64 * 1024;

/// When a command held here was delivered, and last refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    since_ms: u64,
    refreshed_ms: u64,
}

/// The commands injected here and not yet acknowledged, per stream, then
/// per consumer group (looked up by `&str`: no allocation per command once
/// a (stream, group) pair is known).
#[derive(Debug, Default)]
pub struct Holds {
    streams: HashMap<String, HashMap<String, BTreeMap<StreamId, Held>>>,
    count: usize,
}

impl Holds {
    /// Command `tag` was handed to a handler here at `now_ms`.
    pub fn injected(&mut self, tag: &CommandTag, now_ms: u64) {
        if self.count >= MAX_HELD {
            return;
        }
        let held = Held {
            since_ms: now_ms,
            refreshed_ms: now_ms,
        };
        if !self.streams.contains_key(&tag.key) {
            self.streams.insert(tag.key.clone(), HashMap::new());
        }
        let Some(groups) = self.streams.get_mut(&tag.key) else {
            return;
        };
        if !groups.contains_key(&tag.group) {
            groups.insert(tag.group.clone(), BTreeMap::new());
        }
        let Some(ids) = groups.get_mut(&tag.group) else {
            return;
        };
        if ids.insert(tag.id, held).is_none() {
            self.count += 1;
        }
    }

    /// Command `tag` is done here: acknowledged by its handler, or a
    /// handler here will not take it (another node's may).
    pub fn released(&mut self, tag: &CommandTag) {
        let Some(groups) = self.streams.get_mut(&tag.key) else {
            return;
        };
        let Some(ids) = groups.get_mut(&tag.group) else {
            return;
        };
        if ids.remove(&tag.id).is_some() {
            self.count -= 1;
        }
        if ids.is_empty() {
            groups.remove(&tag.group);
            if groups.is_empty() {
                self.streams.remove(&tag.key);
            }
        }
    }

    /// The commands of `key` read by `group` to refresh at `now_ms` (each
    /// then counts as refreshed); those held past [`HOLD_MAX_MS`] are let
    /// go.
    pub fn due(&mut self, key: &str, group: &str, now_ms: u64) -> Vec<StreamId> {
        let Some(groups) = self.streams.get_mut(key) else {
            return Vec::new();
        };
        let Some(ids) = groups.get_mut(group) else {
            return Vec::new();
        };
        let before = ids.len();
        ids.retain(|_, held| now_ms.saturating_sub(held.since_ms) < HOLD_MAX_MS);
        self.count -= before - ids.len();
        let mut due = Vec::new();
        for (id, held) in ids.iter_mut() {
            if now_ms.saturating_sub(held.refreshed_ms) >= REFRESH_AFTER_MS {
                held.refreshed_ms = now_ms;
                due.push(*id);
            }
        }
        if ids.is_empty() {
            groups.remove(group);
            if groups.is_empty() {
                self.streams.remove(key);
            }
        }
        due
    }

    /// No handler here reads `key` for `group` any more: nothing of it is
    /// kept.
    pub fn forget(&mut self, key: &str, group: &str) {
        let Some(groups) = self.streams.get_mut(key) else {
            return;
        };
        if let Some(ids) = groups.remove(group) {
            self.count -= ids.len();
        }
        if groups.is_empty() {
            self.streams.remove(key);
        }
    }

    /// Commands held here.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: &str, group: &str, ms: u64) -> CommandTag {
        CommandTag {
            key: key.to_owned(),
            group: group.to_owned(),
            id: StreamId { ms, seq: 0 },
        }
    }

    fn ids(ms: &[u64]) -> Vec<StreamId> {
        ms.iter().map(|&ms| StreamId { ms, seq: 0 }).collect()
    }

    #[test]
    fn a_command_is_refreshed_while_held_and_let_go_after_the_bound() {
        let mut holds = Holds::default();
        holds.injected(&tag("c:{sync:0}", "s:g", 1), 0);
        // (now, refreshed then)
        let table: [(u64, &[u64]); 7] = [
            (1_000, &[]),
            (4_999, &[]),
            (5_000, &[1]),
            (9_000, &[]),
            (10_000, &[1]),
            (89_999, &[1]),
            // Held for 90 s: let go, taken over once idle.
            (90_000, &[]),
        ];
        for (now, expected) in table {
            assert_eq!(
                holds.due("c:{sync:0}", "s:g", now),
                ids(expected),
                "at {now}"
            );
        }
        assert!(holds.is_empty());
    }

    #[test]
    fn only_what_is_unacknowledged_in_that_stream_and_group_is_refreshed() {
        let mut holds = Holds::default();
        holds.injected(&tag("c:{sync:0}", "s:g", 1), 0);
        holds.injected(&tag("c:{sync:0}", "s:g", 2), 0);
        holds.injected(&tag("c:{sync:0}", "s:h", 3), 0);
        holds.injected(&tag("c:{sync:1}", "s:g", 4), 0);
        holds.injected(&tag("c:{sync:0}", "s:g", 5), 4_000);
        assert_eq!(holds.len(), 5);
        holds.released(&tag("c:{sync:0}", "s:g", 2));
        // Released twice, or never held: nothing changes.
        holds.released(&tag("c:{sync:0}", "s:g", 2));
        holds.released(&tag("c:{other:0}", "s:g", 2));
        assert_eq!(holds.len(), 4);
        assert_eq!(holds.due("c:{sync:0}", "s:g", 5_000), ids(&[1]));
        assert_eq!(holds.due("c:{sync:0}", "s:g", 9_000), ids(&[5]));
        assert_eq!(holds.due("c:{sync:0}", "s:h", 9_000), ids(&[3]));
        holds.forget("c:{sync:0}", "s:g");
        assert_eq!(holds.due("c:{sync:0}", "s:g", 20_000), ids(&[]));
        assert_eq!(holds.len(), 2);
        assert_eq!(holds.due("c:{sync:1}", "s:g", 20_000), ids(&[4]));
    }

    #[test]
    fn past_the_cap_a_command_is_not_kept() {
        let mut holds = Holds::default();
        for ms in 0..MAX_HELD as u64 {
            holds.injected(&tag("c:{sync:0}", "s:g", ms), 0);
        }
        holds.injected(&tag("c:{sync:1}", "s:g", 1), 0);
        assert_eq!(holds.len(), MAX_HELD);
        assert!(holds.due("c:{sync:1}", "s:g", 5_000).is_empty());
        holds.released(&tag("c:{sync:0}", "s:g", 0));
        holds.injected(&tag("c:{sync:1}", "s:g", 1), 0);
        assert_eq!(holds.due("c:{sync:1}", "s:g", 5_000), ids(&[1]));
    }
}
