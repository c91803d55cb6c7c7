//! Owns the device plane: replies addressed to one user (`<uid>_<name>`).
//!
//! - Out: the node whose gate received a reply appends it to the user's
//!   stream and announces it on the user's channel, in one script (one
//!   round trip; key and channel share the `{uid}` slot). Appends queue in
//!   a bounded queue, pipelined per batch (per master on a cluster); a full queue or a failed batch
//!   is counted (`broker_cluster_dropped_total`) and never waits a session.
//!   The stream's expiry is set by the same script only when due
//!   (`stream_ttl.rs`: at least 24 h after the user's last reply).
//! - In: while this node holds a session of a user (or keeps a persistent
//!   one), it is `SSUBSCRIBE`d to the user's channel ([`Interest`];
//!   the subscriptions are `listener.rs`'s); each
//!   wake-up carries the entry and its stream id, and the entry goes to the
//!   local inboxes and router as a local publish would. Entries this node
//!   appended itself are skipped: it delivered them when it received them.
//! - The stream is the truth: after a reconnection or a server-side
//!   `sunsubscribe` (its slot moved), a user's stream is read from the last
//!   id this node saw ([`Cursor`]), so what was announced meanwhile is
//!   delivered once.

use crate::entry::{reply_key, Entry, StreamId};
use crate::pacing::{self, Burst};
use crate::record::reply_tag;
use crate::redis_conn::{Redis, Replication};
pub(crate) use crate::replay::{replay, replay_on, trimmed_after, Aim, Replay};
use crate::stream_ttl::{Expiries, EXPIRY_SET};
use crate::{Append, Node};
use broker::delivery::{Delivery, DELIVERY_TAG, DELIVERY_TARGET};
use broker::inject::InjectLink;
use broker::router::Audience;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tracing::warn;

/// Entries kept per user's stream (approximately: `MAXLEN ~`), for a
/// replay after a reconnection.
pub const REPLY_STREAM_MAXLEN: usize = 1000;
/// Replies waiting to be appended; beyond it they are dropped and counted.
pub const APPEND_QUEUE: usize = 16 * 1024;
/// Appends pipelined in one round trip.
const BATCH: usize = 256;

/// Appends to the stream, trims it, and announces the entry with its id,
/// atomically and in one command. `ARGV[3]` `1`: also set the stream's
/// expiry to `ARGV[4]` ms ([`crate::stream_ttl`] says when). Otherwise
/// `NOMKSTREAM` first: a stream that is gone is made again with its expiry
/// set (so every stream has one), at the cost of that one more `XADD`.
const APPEND_SCRIPT: &str = "\
local id = false
if ARGV[3] ~= '1' then
  id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
end
if not id then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
redis.call('SPUBLISH', KEYS[1], id .. ' ' .. ARGV[2])
return id";

/// The users this node listens for, with how many sessions each has here.
#[derive(Default)]
pub struct Interest {
    users: Mutex<HashMap<String, usize>>,
    pub(crate) changed: Notify,
}

impl Interest {
    /// A session of `uid` is held here.
    pub fn add(&self, uid: &str) {
        let mut users = self.users.lock();
        let count = users.entry(uid.to_owned()).or_default();
        *count += 1;
        if *count == 1 {
            self.changed.notify_one();
        }
    }

    /// One of `uid`'s sessions here is gone.
    pub fn remove(&self, uid: &str) {
        let mut users = self.users.lock();
        if let Some(count) = users.get_mut(uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                users.remove(uid);
                self.changed.notify_one();
            }
        }
    }

    pub(crate) fn wants(&self, uid: &str) -> bool {
        self.users.lock().contains_key(uid)
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.users.lock().keys().cloned().collect()
    }
}

/// Appends what is queued, one pipelined batch at a time (one pipeline
/// per master on a cluster, sent together), until the queue closes or the
/// node shuts down; a handler's QoS 1 reply's session is told how its
/// append went once its pipeline returned.
pub(crate) async fn append(node: Arc<Node>, mut queue: mpsc::Receiver<Append>) {
    let script = redis::Script::new(APPEND_SCRIPT);
    let mut expiries = Expiries::default();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        let mut tickets: Vec<_> = batch.iter_mut().map(|a| a.ticket.take()).collect();
        let replies: Vec<(&str, &[u8])> = batch
            .iter()
            .map(|append| (append.key.as_str(), &append.entry[..]))
            .collect();
        let sent = append_batch(
            &node.redis,
            &script,
            &mut expiries,
            &replies,
            Instant::now(),
        )
        .await;
        for (group, sent) in sent {
            let n = group.len() as u64;
            for i in group {
                Append::settle(tickets.get_mut(i).and_then(Option::take), sent.is_ok());
            }
            match sent {
                Ok(()) => node.metrics().cluster_moved("reply_out", n),
                Err(e) => {
                    node.metrics().cluster_dropped("redis_error", n);
                    warn!(error = %e, replies = n, "replies not appended to Redis: dropped");
                }
            }
        }
        batch.clear();
    }
}

/// One reply of a batch, as the pipeline sends it.
struct Item<'a> {
    index: usize,
    uid: &'a str,
    key: String,
    entry: &'a [u8],
    /// Set the stream's expiry ([`Expiries::due`]).
    expire: bool,
}

/// Appends one batch of replies (user id, entry) that started at `now`:
/// the first reply of each user in it sets the stream's expiry when
/// `expiries` says it is due. Returns which replies (their indexes) each
/// pipeline held, with its result; `expiries` learns what was set, or
/// forgets everything when a pipeline failed.
pub(crate) async fn append_batch(
    redis: &Redis,
    script: &redis::Script,
    expiries: &mut Expiries,
    replies: &[(&str, &[u8])],
    now: Instant,
) -> Vec<(Vec<usize>, redis::RedisResult<()>)> {
    let mut asked = HashSet::new();
    let items: Vec<Item> = replies
        .iter()
        .enumerate()
        .map(|(index, (uid, entry))| Item {
            index,
            uid,
            key: reply_key(uid),
            entry,
            expire: expiries.due(uid, now) && asked.insert(*uid),
        })
        .collect();
    let expiry_ms = EXPIRY_SET.as_millis().to_string();
    let pipe = |group: &[&Item], full: bool| {
        let mut pipe = redis::pipe();
        for item in group {
            if full {
                // The server has not seen the script (new, or failed
                // over: Redis replicates a script's effects, not the
                // script): EVAL loads it there.
                pipe.cmd("EVAL").arg(APPEND_SCRIPT);
            } else {
                pipe.cmd("EVALSHA").arg(script.get_hash());
            }
            pipe.arg(1)
                .arg(&item.key)
                .arg(REPLY_STREAM_MAXLEN)
                .arg(item.entry)
                .arg(if item.expire { "1" } else { "0" })
                .arg(&expiry_ms)
                .ignore();
        }
        pipe
    };
    let sent = redis
        .send_grouped_items(&items, |item| &item.key, pipe, Replication::Awaited)
        .await;
    if sent.iter().any(|(_, sent)| sent.is_err()) {
        expiries.forget_all();
    } else {
        for item in items.iter().filter(|item| item.expire) {
            expiries.set(item.uid, now);
        }
    }
    sent.into_iter()
        .map(|(group, sent)| (group.iter().map(|item| item.index).collect(), sent))
        .collect()
}

/// Announces each device session opened here on its user's channel
/// (`T <node> <0|1> <session id>`, 1 for a clean start; no stream entry): a
/// node holding a live session of that id ends it (takeover across nodes),
/// one keeping it for a client that is away releases it. A batch per
/// master, sent together; a failure is counted and the old session lives
/// on. Each queued item is (uid, `<0|1> <session id>`).
pub async fn announce_takeovers(node: Arc<Node>, mut queue: mpsc::Receiver<(String, Bytes)>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        let keyed: Vec<(String, Vec<u8>)> = batch
            .iter()
            .map(|(uid, opened)| (reply_key(uid), takeover_message(&node.id, opened)))
            .collect();
        let pipe = |group: &[&(String, Vec<u8>)], _full: bool| {
            let mut pipe = redis::pipe();
            for (key, message) in group {
                pipe.cmd("SPUBLISH").arg(key).arg(message).ignore();
            }
            pipe
        };
        for (n, sent) in node
            .redis
            .send_grouped(&keyed, |(key, _)| key, pipe, Replication::Unawaited)
            .await
        {
            if let Err(e) = sent {
                node.metrics().cluster_dropped("redis_error", n);
                warn!(error = %e, sessions = n, "session openings not announced to other nodes");
            }
        }
        batch.clear();
    }
}

/// What [`announce_takeovers`] queues for a session opened here.
pub fn opened(session: &str, clean_start: bool) -> Bytes {
    Bytes::from(format!("{} {session}", u8::from(clean_start)))
}

/// `T <node> <0|1> <session id>` from the queued `<0|1> <session id>`.
fn takeover_message(node: &str, opened: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(3 + node.len() + opened.len());
    message.extend_from_slice(b"T ");
    message.extend_from_slice(node.as_bytes());
    message.push(b' ');
    message.extend_from_slice(opened);
    message
}

/// A takeover announcement, read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Takeover<'a> {
    pub node: &'a str,
    pub clean_start: bool,
    pub session: &'a str,
}

/// The takeover a message announces, if it is one.
pub(crate) fn split_takeover(message: &[u8]) -> Option<Takeover<'_>> {
    let rest = std::str::from_utf8(message.strip_prefix(b"T ")?).ok()?;
    let (node, rest) = rest.split_once(' ')?;
    let (flag, session) = rest.split_once(' ')?;
    let clean_start = match flag {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    Some(Takeover {
        node,
        clean_start,
        session,
    })
}

/// How one entry is delivered: its stream id; `tagged`: a persistent
/// session of the user is held here; `burst`: it is one of a paced burst;
/// `target`: the one session it is for (a replay, [`Aim`]).
pub(crate) struct How<'a> {
    pub id: StreamId,
    pub tagged: bool,
    pub burst: Option<&'a mut Burst>,
    pub target: Option<&'a str>,
}

/// Delivers one entry here: to the local inboxes, and to the router when
/// the local decision needs it. An entry this node received itself goes
/// to the router only when its gate left it to the stream then
/// ([`Entry::left_to_stream`]; its inboxes had it), or aimed at a resuming
/// session; otherwise it is skipped (the router had it then). Tagged with
/// its stream id (a persistent session of the user is held here), it goes
/// to the router with the delivery tag, so the session's acknowledgement
/// moves its cursor. One of a paced burst carries the tag too, and
/// waits for its turn ([`Burst::before`]). One aimed at a session
/// (`how.target`) goes to the router only, with the target: that session
/// alone writes it. Each persistent session held here that the router
/// serves a tagged entry to waits for its acknowledgement (`cursor.rs`).
/// Tracked before it is injected: a QoS 0 one may be written (and
/// acknowledged) before the injection returns.
pub(crate) async fn deliver(
    node: &Node,
    link: &mut Option<InjectLink>,
    bytes: &[u8],
    what: &'static str,
    how: How<'_>,
) {
    let entry = match Entry::decode(bytes) {
        Ok(entry) => entry,
        Err(e) => {
            node.metrics().cluster_dropped("undecodable", 1);
            warn!(error = %e, "an entry from Redis is not readable: dropped");
            return;
        }
    };
    let own = *entry.origin == *node.id;
    match own_entry(own, entry.left_to_stream, how.target.is_some(), how.tagged) {
        OwnEntry::Deliver => hand_over(node, link, entry, what, own, how).await,
        OwnEntry::Skip => {}
        OwnEntry::ToLateSessions => {
            let uid = std::str::from_utf8(&entry.publish.topic)
                .ok()
                .and_then(|topic| topic.split_once('_'))
                .map(|(uid, _)| uid);
            let sessions = uid.map(|uid| node.persistent.sessions_of(uid));
            for session in sessions.unwrap_or_default() {
                let how = How {
                    id: how.id,
                    tagged: true,
                    burst: None,
                    target: Some(&session),
                };
                hand_over(node, link, entry.clone(), what, own, how).await;
            }
        }
    }
}

/// What becomes of an entry read back from the stream, by whether this
/// node received it (`own`), whether its gate then left the router's
/// delivery to the stream, whether it is aimed at one session, and
/// whether a persistent session of its user is held here now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnEntry {
    /// Delivered here (another node's entry; or one the gate left to the
    /// stream; or one aimed at a session that resumed here since).
    Deliver,
    /// The router here had it when it was received.
    Skip,
    /// The router had it when no persistent session of the user was held
    /// here; the ones held now came since, so each gets it aimed at it
    /// alone (the other sessions had it).
    ToLateSessions,
}

fn own_entry(own: bool, left_to_stream: bool, targeted: bool, tagged: bool) -> OwnEntry {
    match (own, left_to_stream, targeted, tagged) {
        (false, ..) | (true, true, ..) | (true, false, true, _) => OwnEntry::Deliver,
        (true, false, false, true) => OwnEntry::ToLateSessions,
        (true, false, false, false) => OwnEntry::Skip,
    }
}

/// [`deliver`] of an entry that is delivered here.
async fn hand_over(
    node: &Node,
    link: &mut Option<InjectLink>,
    mut entry: Entry,
    what: &'static str,
    own: bool,
    how: How<'_>,
) {
    let Ok(topic) = std::str::from_utf8(&entry.publish.topic) else {
        node.metrics().cluster_dropped("undecodable", 1);
        return;
    };
    let needs_router = if own || how.target.is_some() {
        true
    } else {
        let routed = node.local().route(topic, &entry.publish, &entry.properties);
        routed.record(node.metrics(), topic);
        routed.needs_router
    };
    node.metrics().cluster_moved(what, 1);
    if !needs_router {
        return;
    }
    let mut burst = how.burst.filter(|burst| burst.pacing());
    if how.tagged || burst.is_some() || how.target.is_some() {
        let properties = entry.properties.get_or_insert_with(Default::default);
        properties
            .user_properties
            .push((DELIVERY_TAG.to_owned(), reply_tag(how.id)));
        if let Some(target) = how.target {
            properties
                .user_properties
                .push((DELIVERY_TARGET.to_owned(), target.to_owned()));
        }
    }
    if how.tagged {
        if let Some((uid, _)) = topic.split_once('_') {
            let expiry = entry
                .properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval)
                .map(|secs| Duration::from_secs(u64::from(secs)));
            node.persistent
                .injected(uid, topic, how.id, expiry, how.target);
        }
    }
    let Some(burst) = burst.as_mut() else {
        inject(node, link, entry).await;
        return;
    };
    let properties = entry.properties.as_ref().map_or(0, |p| {
        p.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
            + p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, |d| d.len())
            + 16
    });
    let cost = pacing::cost(topic.len(), entry.publish.payload.len(), properties);
    burst.before(cost, &node.shutdown).await;
    if inject(node, link, entry).await {
        burst.injected(how.id, cost);
    }
}

/// Hands `entry` to the router through `link`, opened (again) if needed;
/// false when the router did not take it.
pub async fn inject(node: &Node, link: &mut Option<InjectLink>, entry: Entry) -> bool {
    inject_for(node, link, entry, &Audience::everyone()).await
}

/// [`inject`] through a link whose publishes reach only `audience`'s
/// subscriptions here (a command read by one consumer group: `commands.rs`).
pub async fn inject_for(
    node: &Node,
    link: &mut Option<InjectLink>,
    entry: Entry,
    audience: &Audience,
) -> bool {
    for _ in 0..2 {
        if link.is_none() {
            match node
                .injector()
                .link_for(&node.next_link_name(), audience.clone())
                .await
            {
                Ok(opened) => *link = Some(opened),
                Err(e) => {
                    warn!(error = %e, "no router link to deliver what other nodes sent");
                    break;
                }
            }
        }
        if let Some(open) = link.as_mut() {
            match open
                .publish(entry.publish.clone(), entry.properties.clone())
                .await
            {
                Ok(()) => return true,
                Err(_) => *link = None,
            }
        }
    }
    node.metrics().cluster_dropped("router_link", 1);
    false
}

#[cfg(test)]
#[path = "replies_append_tests.rs"]
mod append_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_announcements() {
        // (queued for the session opened, clean start) -> message
        let table = [
            (false, b"T node-a 0 D:42:phone".as_slice()),
            (true, b"T node-a 1 D:42:phone".as_slice()),
        ];
        for (clean_start, expected) in table {
            let message = takeover_message("node-a", &opened("D:42:phone", clean_start));
            assert_eq!(message, expected);
            assert_eq!(
                split_takeover(&message),
                Some(Takeover {
                    node: "node-a",
                    clean_start,
                    session: "D:42:phone"
                })
            );
            assert!(crate::entry::split_wakeup(&message).is_none());
        }
        // A wake-up starts with a stream id, never `T `; the old form
        // (no flag) and a bad flag are not takeovers.
        assert_eq!(split_takeover(b"1-0 entry"), None);
        assert_eq!(split_takeover(b"T node-a D:42:phone"), None);
        assert_eq!(split_takeover(b"T node-a 2 D:42:phone"), None);
    }

    #[test]
    fn what_becomes_of_an_entry_read_back() {
        use OwnEntry::{Deliver, Skip, ToLateSessions};
        // (own, left to the stream, aimed at a session, a persistent
        // session of the user held here now) -> what happens
        let table = [
            ((false, false, false, false), Deliver),
            ((false, true, false, true), Deliver),
            ((false, false, true, true), Deliver),
            // The gate left it to the stream: the router here never had
            // it, whether the persistent session is still here or not.
            ((true, true, false, true), Deliver),
            ((true, true, false, false), Deliver),
            // The router had it; a replay aimed at a session that resumed
            // here since is that session's.
            ((true, false, false, false), Skip),
            ((true, false, true, true), Deliver),
            // The router had it before any persistent session of the user
            // was here: the ones here now came since.
            ((true, false, false, true), ToLateSessions),
        ];
        for ((own, left, targeted, tagged), expected) in table {
            assert_eq!(
                own_entry(own, left, targeted, tagged),
                expected,
                "own {own}, left {left}, targeted {targeted}, tagged {tagged}"
            );
        }
    }
}
