//! Owns when a user's subscription counts as confirmed: the node it is on
//! serves the user's slot, seen on the subscription's own connection by
//! the replay after the cursor (see [`Listener::confirm`]).

use super::{Listener, NodeAddr};
use crate::entry::reply_key;
use crate::replies::{replay_on, Replay};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info};

impl Listener {
    /// The server confirmed `uid`'s subscription on connection `shard`.
    /// It counts once that node is seen to serve the user's slot, on the
    /// same connection: the replay after the cursor is read there (or,
    /// with nothing to replay, `EXISTS` of the stream). A replica accepts
    /// `SSUBSCRIBE` for its master's slots, but hears a newly promoted
    /// master's wake-ups only once that master counts it as its replica:
    /// after a coordinated failover the slot map read on the old master's
    /// `sunsubscribe` may still name it, and a subscription there, replayed
    /// from elsewhere, missed what the new master announced meanwhile,
    /// then moved the cursor past it on the first wake-up it heard. Read on
    /// the subscribed node itself (which answers `MOVED` unless it serves
    /// the slot), every entry is in what the replay read or announced to
    /// the subscription after it. Refused (`MOVED`, or the read failed),
    /// the subscription is asked for again, where the `MOVED` said.
    pub(super) async fn confirm(&mut self, uid: String, shard: u64) {
        let Some(listening) = self.users.get(&uid) else {
            return;
        };
        if listening.confirmed || listening.asked.is_none_or(|(id, _)| id != shard) {
            debug!(uid, shard, asked = ?listening.asked.map(|(s, _)| s), "a subscription confirmed that is not (or no longer) the one asked for");
            return;
        }
        let Some(mut conn) = self
            .shards
            .values()
            .find(|s| s.id == shard)
            .map(|s| s.conn.clone())
        else {
            // The connection was lost meanwhile: asked again.
            return;
        };
        let mut cursor = listening.cursor;
        // A resuming session's replay reads the stream (in order, for it;
        // a lapsed hold reads it too): only whether the node serves the
        // slot is asked here.
        let from = cursor.last();
        let served = if from.is_some() && !self.holding.contains_key(&uid) {
            let tagged = self.node.persistent.holds_user(&uid);
            let what = Replay {
                uid: &uid,
                cursor: &mut cursor,
                tagged,
                aim: None,
            };
            replay_on(&mut conn, &self.node, &mut self.link, what).await
        } else {
            redis::cmd("EXISTS")
                .arg(reply_key(&uid))
                .query_async::<redis::Value>(&mut conn)
                .await
                .map(drop)
        };
        let Some(listening) = self.users.get_mut(&uid) else {
            return;
        };
        // What the replay delivered, it delivered in order: the cursor
        // moves past it even when a later page failed.
        listening.cursor = cursor;
        match served {
            Ok(()) => {
                listening.confirmed = true;
                debug!(uid, shard, from = ?from, to = ?cursor.last(), "subscription confirmed; replayed on its connection");
            }
            Err(e) => {
                let redirect = redirect_of(&e);
                info!(
                    uid,
                    shard,
                    error = %e,
                    redirect = ?redirect,
                    "a subscription is on a node that does not serve the user's slot (a replica, a stale slot map): subscribing again"
                );
                listening.asked = None;
                listening.redirect = redirect;
                self.pending = true;
                // Its wake-ups are not delivered (`Listening::hears`): the
                // node stops sending them. (Its `sunsubscribe` names a
                // connection the user is no longer asked on: ignored.)
                let _ = redis::cmd("SUNSUBSCRIBE")
                    .arg(reply_key(&uid))
                    .query_async::<redis::Value>(&mut conn)
                    .await;
                let now = Instant::now();
                self.retry_at = Some(self.retry_at.map_or(now, |at| at.max(now)) + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                let _ = self.node.redis.refresh().await;
            }
        }
    }
}

/// The node a `MOVED` (or `ASK`) names, `host:port`.
pub(super) fn redirect_of(error: &redis::RedisError) -> Option<NodeAddr> {
    error
        .redirect_node()
        .map(|(addr, _)| NodeAddr::from(addr))
        .filter(|addr| addr.contains(':'))
}
