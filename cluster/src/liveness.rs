//! Owns this node's liveness in Redis: `node:{<node>}` holds this run's
//! incarnation (a random id per process) for [`TTL`], refreshed every
//! [`REFRESH_EVERY`]; the sorted set `nodes` holds `<node>/<incarnation>`
//! scored by when it last refreshed (Unix ms). An incarnation is dead once
//! its node's key is gone or names another one (the node restarted under
//! the same `BROKER_NODE_ID`). The sweeper (`wills`) reads them; a clean
//! shutdown removes both after the node's will records (`leave`).

use crate::Node;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// The sorted set of incarnations, by last refresh.
pub const NODES_KEY: &str = "nodes";
/// How long a node's liveness holds without being refreshed.
pub const TTL: Duration = Duration::from_secs(10);
/// How often a node refreshes it.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);

/// The key saying `node` is alive, and as which incarnation.
pub fn liveness_key(node: &str) -> String {
    format!("node:{{{node}}}")
}

/// The member of `nodes` for one incarnation of `node`.
pub fn member(node: &str, incarnation: &str) -> String {
    format!("{node}/{incarnation}")
}

/// The node and incarnation of a member of `nodes` (node ids hold no `/`).
pub fn split_member(member: &str) -> Option<(&str, &str)> {
    let (node, incarnation) = member.split_once('/')?;
    (!node.is_empty() && !incarnation.is_empty() && !incarnation.contains('/'))
        .then_some((node, incarnation))
}

/// A fresh incarnation id for this process.
pub fn new_incarnation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Says this incarnation is alive: the key first, then `nodes` (a sweeper
/// that finds the member finds the key).
pub async fn refresh(node: &Node, incarnation: &str) -> redis::RedisResult<()> {
    let mut conn = node.redis.shared();
    let ttl_ms = u64::try_from(TTL.as_millis()).unwrap_or(u64::MAX);
    redis::cmd("SET")
        .arg(liveness_key(&node.id))
        .arg(incarnation)
        .arg("PX")
        .arg(ttl_ms)
        .query_async::<()>(&mut conn)
        .await?;
    redis::cmd("ZADD")
        .arg(NODES_KEY)
        .arg(now_ms())
        .arg(member(&node.id, incarnation))
        .query_async::<()>(&mut conn)
        .await
}

/// Keeps this incarnation alive until the node shuts down (`leave` then
/// ends it, after the will records).
pub async fn keep_alive(node: Arc<Node>, incarnation: Arc<str>) {
    let mut ticker = tokio::time::interval(REFRESH_EVERY);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(e) = refresh(&node, &incarnation).await {
            warn!(error = %e, "node liveness not refreshed in Redis this round");
        }
    }
}

/// This incarnation stops: its key (if still its own) and member go.
pub async fn leave(node: &Node, incarnation: &str) -> redis::RedisResult<()> {
    let mut conn = node.redis.shared();
    let _: Option<Vec<u8>> =
        crate::wills::claim(&mut conn, &liveness_key(&node.id), incarnation).await?;
    redis::cmd("ZREM")
        .arg(NODES_KEY)
        .arg(member(&node.id, incarnation))
        .query_async(&mut conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_keys() {
        assert_eq!(liveness_key("node-a"), "node:{node-a}");
        assert_eq!(member("node-a", "00ff"), "node-a/00ff");
        let table = [
            ("node-a/00ff", Some(("node-a", "00ff"))),
            ("node-a", None),
            ("/00ff", None),
            ("node-a/", None),
            ("a/b/c", None),
        ];
        for (text, split) in table {
            assert_eq!(split_member(text), split, "{text}");
        }
        assert_ne!(new_incarnation(), new_incarnation());
        assert_eq!(new_incarnation().len(), 16);
    }
}
