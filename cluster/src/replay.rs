//! Owns replays of a user's reply stream into this node: reading the
//! stream after a cursor, page by page, on a given connection (the
//! listener reads on its subscription's own, `listener_confirm.rs`), paced
//! like a burst, and aimed at one resuming session where the user's other
//! sessions here had the replies already ([`Aim`]); and whether a stream
//! was trimmed past a cursor.

use crate::entry::{reply_key, Cursor, Seen, StreamId};
use crate::pacing::Burst;
use crate::replies::{deliver, How};
use crate::Node;
use broker::inject::InjectLink;
use tracing::{debug, warn};

/// Most entries one replay reads (a user's stream holds about
/// [`crate::replies::REPLY_STREAM_MAXLEN`]).
const REPLAY_PAGE: usize = 500;
const REPLAY_PAGES: usize = 4;

/// A replay for one session (it resumed here, or its cursor resyncs):
/// what this node delivered already to the user's other sessions here
/// (up to `live`, the user's cursor here, and before `held_from`, the
/// first live wake-up held back for the replay) goes to it alone; the
/// rest is new for every session of the user.
pub(crate) struct Aim<'a> {
    pub session: &'a str,
    pub live: Cursor,
    pub held_from: Option<StreamId>,
}

impl Aim<'_> {
    /// The session entry `id` is aimed at (None: every session), the
    /// user's cursor here moved past what goes to everyone.
    fn target(&mut self, id: StreamId) -> Option<&str> {
        let seen = self.live.last().is_some_and(|last| id <= last);
        let held = self.held_from.is_some_and(|first| id >= first);
        if seen && !held {
            return Some(self.session);
        }
        if self.live.last().is_some() || held {
            self.live.see(id);
            None
        } else {
            // The node saw nothing of the stream: no other session here
            // was owed it.
            Some(self.session)
        }
    }
}

/// One replay: `uid`'s stream after what `cursor` has seen (nothing to
/// replay while it has seen nothing); `tagged`: a persistent session of the user is
/// held here, so every entry goes with its delivery tag; `aim`: a replay
/// for one session ([`Aim`]).
pub(crate) struct Replay<'r, 's> {
    pub uid: &'r str,
    pub cursor: &'r mut Cursor,
    pub tagged: bool,
    pub aim: Option<&'r mut Aim<'s>>,
}

/// Reads the stream `what` names and delivers each entry its cursor has
/// not seen ([`deliver`] decides what becomes of this node's own), paced
/// ([`Burst`]). Returns false when Redis could not be read.
pub(crate) async fn replay(
    node: &Node,
    link: &mut Option<InjectLink>,
    what: Replay<'_, '_>,
) -> bool {
    let mut conn = node.redis.shared();
    let uid = what.uid;
    match replay_on(&mut conn, node, link, what).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, uid, "replay of a user's replies failed; they wait for the next one");
            false
        }
    }
}

/// [`replay`], reading on `conn`: the listener reads on the connection
/// its subscription was confirmed on, so that every entry is either in
/// what it read or announced to it afterwards (`listener.rs`). An error
/// (`MOVED`: that node does not serve the slot) ends it; `cursor` is past
/// what was delivered before.
pub(crate) async fn replay_on(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    node: &Node,
    link: &mut Option<InjectLink>,
    what: Replay<'_, '_>,
) -> redis::RedisResult<()> {
    let Replay {
        uid,
        cursor,
        tagged,
        mut aim,
    } = what;
    let Some(mut start) = cursor.replay_from() else {
        return Ok(());
    };
    let key = reply_key(uid);
    // Injected no faster than the user's sessions take the replies; not
    // paced when no client of the user is connected here (a persistent
    // session whose client is away acknowledges nothing: pacing it would
    // only stall the listener, 2 s per burst, for every other user).
    let mut burst = if node.injector().device_connected(uid) {
        Burst::new(node.paced.clone(), uid)
    } else {
        None
    };
    for _ in 0..REPLAY_PAGES {
        let page: redis::RedisResult<redis::Value> = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(REPLAY_PAGE)
            .query_async(conn)
            .await;
        let entries = crate::stream_entries(&page?);
        let count = entries.len();
        if let Some((last, _)) = entries.last() {
            start = last.after();
        }
        for (id, entry) in entries {
            if cursor.see(id) == Seen::New {
                let target = aim.as_mut().and_then(|aim| aim.target(id));
                if let Some(entry) = entry {
                    let how = How {
                        id,
                        tagged,
                        burst: burst.as_mut(),
                        target,
                    };
                    deliver(node, link, &entry, "replayed", how).await;
                }
            }
        }
        if count < REPLAY_PAGE {
            return Ok(());
        }
    }
    debug!(uid, "replay stopped after its page limit");
    Ok(())
}

/// Whether `uid`'s stream lost entries after `cursor` to its trimming
/// (`MAXLEN`): Redis 7 names the latest entry it deleted. `None` when
/// Redis could not tell.
pub(crate) async fn trimmed_after(node: &Node, uid: &str, cursor: StreamId) -> Option<bool> {
    let mut conn = node.redis.shared();
    let info: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(reply_key(uid))
        .query_async(&mut conn)
        .await
        .ok()?;
    let pairs: Vec<(&redis::Value, &redis::Value)> = match &info {
        redis::Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| Some((pair.first()?, pair.get(1)?)))
            .collect(),
        _ => return None,
    };
    let deleted = pairs
        .into_iter()
        .find_map(|(name, value)| match (name, value) {
            (redis::Value::BulkString(name), redis::Value::BulkString(id))
                if name == b"max-deleted-entry-id" =>
            {
                StreamId::parse(std::str::from_utf8(id).ok()?)
            }
            _ => None,
        })?;
    Some(deleted > cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_aims_at_its_session_what_the_others_had() {
        let id = |ms| StreamId { ms, seq: 0 };
        let cursor = |last: Option<u64>| {
            let mut c = Cursor::default();
            if let Some(ms) = last {
                c.see(id(ms));
            }
            c
        };
        // (the user's cursor here, first wake-up held back, ids replayed)
        // -> aimed at the session (true) or for everyone, per id
        type Row<'a> = (Option<u64>, Option<u64>, &'a [u64], &'a [bool]);
        let table: [Row; 5] = [
            (Some(5), None, &[3, 5, 6, 7], &[true, true, false, false]),
            (Some(5), Some(6), &[4, 6, 7], &[true, false, false]),
            // The node saw nothing of the stream: no other session was
            // owed any of it, unless it came while held back.
            (None, None, &[1, 2], &[true, true]),
            (None, Some(2), &[1, 2, 3], &[true, false, false]),
            (Some(9), None, &[], &[]),
        ];
        for (live, held_from, ids, aimed) in table {
            let mut aim = Aim {
                session: "D:1:a",
                live: cursor(live),
                held_from: held_from.map(id),
            };
            let got: Vec<bool> = ids
                .iter()
                .map(|ms| aim.target(id(*ms)) == Some("D:1:a"))
                .collect();
            assert_eq!(got, aimed, "{live:?} {held_from:?} {ids:?}");
        }
    }
}
