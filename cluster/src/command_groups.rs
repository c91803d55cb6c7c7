//! Owns which command topics handlers on this node read, and for which
//! consumer group: each (topic, group) pair with how many live handler
//! subscriptions want it, capped at [`MAX_GROUPS`]; `commands::supervise`
//! starts and stops the readers as pairs come and go.

use crate::entry::consumer_group;
use parking_lot::Mutex;
use std::collections::HashMap;
use tokio::sync::Notify;
use tracing::warn;

/// Most (topic, group) pairs one node reads (each is [`crate::entry::PARTITIONS`]
/// readers, each with a connection of its own).
pub const MAX_GROUPS: usize = 64;

/// The (topic, consumer group) pairs this node reads, with how many live
/// handler subscriptions want each.
#[derive(Default)]
pub struct Groups {
    wanted: Mutex<HashMap<(String, String), usize>>,
    pub(crate) changed: Notify,
}

impl Groups {
    /// A handler here declared `filter`.
    pub fn add(&self, filter: &str, node: &str) {
        let Some(pair) = consumer_group(filter, node) else {
            return;
        };
        let mut wanted = self.wanted.lock();
        if wanted.len() >= MAX_GROUPS && !wanted.contains_key(&pair) {
            // Each pair costs PARTITIONS connections to Redis.
            warn!(topic = %pair.0, group = %pair.1, max = MAX_GROUPS, "too many command topics read on this node: this one is not");
            return;
        }
        let count = wanted.entry(pair).or_default();
        *count += 1;
        if *count == 1 {
            self.changed.notify_one();
        }
    }

    /// A handler here withdrew `filter`.
    pub fn remove(&self, filter: &str, node: &str) {
        let Some(pair) = consumer_group(filter, node) else {
            return;
        };
        let mut wanted = self.wanted.lock();
        if let Some(count) = wanted.get_mut(&pair) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                wanted.remove(&pair);
                self.changed.notify_one();
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<(String, String)> {
        self.wanted.lock().keys().cloned().collect()
    }

    /// The topics read here (each once).
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.wanted.lock().keys().map(|(t, _)| t.clone()).collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }
}
