//! Owns the command topics handlers declared on any node: each node
//! announces the literal command topics its handlers read (one field per
//! node and topic in the hash `decl`, its value the time it lapses), and
//! reads everyone's, so a device on one node may publish to a command a
//! handler on another declared. A declaration shows on other nodes within
//! [`SHARE_EVERY`], and lapses [`LAPSE_AFTER`] after its node stopped
//! announcing it (a node that died, a handler that left).

use crate::command_groups::Groups;
use crate::Node;
use parking_lot::RwLock;
use protocol::uid::is_reply_shaped;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// The hash every node announces in.
pub const KEY: &str = "decl";
/// How often a node announces its topics and reads the others'.
pub const SHARE_EVERY: Duration = Duration::from_secs(2);
/// How long an announcement holds without being renewed.
pub const LAPSE_AFTER: Duration = Duration::from_secs(10);
/// Most topics kept from other nodes (more are ignored, and logged).
pub const MAX_TOPICS: usize = 10_000;

/// The command topics other nodes' handlers declared.
#[derive(Default)]
pub struct Declared(RwLock<HashSet<String>>);

impl Declared {
    pub fn contains(&self, topic: &str) -> bool {
        self.0.read().contains(topic)
    }
}

/// The field of `topic` as announced by `node`.
fn field(node: &str, topic: &str) -> String {
    format!("{node}\n{topic}")
}

/// The topic of a field, and whether it still holds at `now_ms`.
fn live_topic(field: &str, lapses_ms: u64, now_ms: u64) -> Option<&str> {
    let (_, topic) = field.split_once('\n')?;
    (lapses_ms > now_ms && !is_reply_shaped(topic)).then_some(topic)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Announces and reads declarations until the node shuts down.
pub async fn share(node: Arc<Node>, groups: Arc<Groups>, declared: Arc<Declared>) {
    let mut conn = node.redis.shared();
    let mut ticker = tokio::time::interval(SHARE_EVERY);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        let lapses = now + u64::try_from(LAPSE_AFTER.as_millis()).unwrap_or(u64::MAX);
        let ours: HashSet<String> = groups.topics().into_iter().collect();
        let mut pipe = redis::pipe();
        for topic in &ours {
            pipe.cmd("HSET")
                .arg(KEY)
                .arg(field(&node.id, topic))
                .arg(lapses)
                .ignore();
        }
        pipe.cmd("HGETALL").arg(KEY);
        let all: redis::RedisResult<(std::collections::HashMap<String, u64>,)> =
            pipe.query_async(&mut conn).await;
        let all = match all {
            Ok((all,)) => all,
            Err(e) => {
                warn!(error = %e, "command declarations not shared with Redis this round");
                continue;
            }
        };
        let mut live = HashSet::new();
        let mut lapsed = Vec::new();
        for (field, lapses_ms) in &all {
            match live_topic(field, *lapses_ms, now) {
                Some(topic) if live.len() < MAX_TOPICS => {
                    live.insert(topic.to_owned());
                }
                Some(_) => {}
                None => lapsed.push(field.clone()),
            }
        }
        if live.len() >= MAX_TOPICS {
            warn!(max = MAX_TOPICS, "more declared command topics than kept");
        }
        *declared.0.write() = live;
        if !lapsed.is_empty() {
            let removed: redis::RedisResult<()> = redis::cmd("HDEL")
                .arg(KEY)
                .arg(&lapsed)
                .query_async(&mut conn)
                .await;
            if let Err(e) = removed {
                warn!(error = %e, "lapsed command declarations not removed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_hold_until_they_lapse() {
        // (field, lapses at, now) -> the live topic
        let table = [
            (field("n1", "resize"), 2000, 1000, Some("resize")),
            (field("n1", "resize"), 1000, 1000, None),
            (field("n1", "jobs/a"), 5000, 1000, Some("jobs/a")),
            (field("n1", "42_x"), 5000, 1000, None),
            ("no-separator".to_owned(), 5000, 1000, None),
        ];
        for (field, lapses, now, topic) in table {
            assert_eq!(live_topic(&field, lapses, now), topic, "{field:?}");
        }
    }
}
