//! Owns the device plane: replies addressed to one user (`<uid>_<name>`).
//!
//! - Out: the node whose gate received a reply appends it to the user's
//!   stream and announces it on the user's channel, in one script (one
//!   round trip; key and channel share the `{uid}` slot). Appends queue in
//!   a bounded queue, pipelined per batch; a full queue or a failed batch
//!   is counted (`broker_cluster_dropped_total`) and never waits a session.
//! - In: while this node holds a session of a user (or keeps a persistent
//!   one), it is `SSUBSCRIBE`d to the user's channel ([`Interest`]); each
//!   wake-up carries the entry and its stream id, and the entry goes to the
//!   local inboxes and router as a local publish would. Entries this node
//!   appended itself are skipped: it delivered them when it received them.
//! - The stream is the truth: after a reconnection or a server-side
//!   `sunsubscribe` (its slot moved), a user's stream is read from the last
//!   id this node saw ([`Cursor`]), so what was announced meanwhile is
//!   delivered once.

use crate::entry::{reply_key, split_wakeup, uid_of_channel, Cursor, Entry, Seen};
use crate::resp::{PubSubConn, Push};
use crate::Node;
use broker::delivery::Delivery;
use broker::inject::InjectLink;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

/// Entries kept per user's stream (approximately: `MAXLEN ~`), for a
/// replay after a reconnection.
pub const REPLY_STREAM_MAXLEN: usize = 1000;
/// A user's stream expires this long after its last reply.
pub const REPLY_STREAM_TTL: Duration = Duration::from_secs(24 * 3600);
/// Replies waiting to be appended; beyond it they are dropped and counted.
pub const APPEND_QUEUE: usize = 16 * 1024;
/// Appends pipelined in one round trip.
const BATCH: usize = 256;
/// Most entries one replay reads (a user's stream holds about
/// [`REPLY_STREAM_MAXLEN`]).
const REPLAY_PAGE: usize = 500;
const REPLAY_PAGES: usize = 4;

/// Appends to the stream, trims it, keeps it for its age, and announces
/// the entry with its id, atomically and in one command.
const APPEND_SCRIPT: &str = "\
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SPUBLISH', KEYS[1], id .. ' ' .. ARGV[2])
return id";

/// The users this node listens for, with how many sessions each has here.
#[derive(Default)]
pub struct Interest {
    users: Mutex<HashMap<String, usize>>,
    changed: Notify,
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

    fn wants(&self, uid: &str) -> bool {
        self.users.lock().contains_key(uid)
    }

    fn snapshot(&self) -> Vec<String> {
        self.users.lock().keys().cloned().collect()
    }
}

/// Appends what is queued, one pipelined batch at a time, until the queue
/// closes or the node shuts down.
pub async fn append(node: Arc<Node>, mut queue: mpsc::Receiver<(String, Bytes)>) {
    let script = redis::Script::new(APPEND_SCRIPT);
    let mut conn = node.redis.shared();
    let mut batch = Vec::with_capacity(BATCH);
    let ttl_ms = REPLY_STREAM_TTL.as_millis().to_string();
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        let mut pipe = redis::pipe();
        for (uid, entry) in &batch {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(1)
                .arg(reply_key(uid))
                .arg(REPLY_STREAM_MAXLEN)
                .arg(&entry[..])
                .arg(&ttl_ms)
                .ignore();
        }
        let n = batch.len() as u64;
        let mut sent = pipe.query_async::<()>(&mut conn).await;
        if matches!(&sent, Err(e) if e.kind() == redis::ErrorKind::NoScriptError) {
            // A new or failed-over server: load the script, send again
            // (none of the batch ran).
            let loaded = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(APPEND_SCRIPT)
                .query_async::<String>(&mut conn)
                .await;
            sent = match loaded {
                Ok(_) => pipe.query_async::<()>(&mut conn).await,
                Err(e) => Err(e),
            };
        }
        match sent {
            Ok(()) => node.metrics().cluster_moved("reply_out", n),
            Err(e) => {
                node.metrics().cluster_dropped("redis_error", n);
                warn!(error = %e, replies = n, "replies not appended to Redis: dropped");
            }
        }
        batch.clear();
    }
}

/// One user this node listens for.
#[derive(Default)]
struct Listening {
    cursor: Cursor,
    /// The server confirmed the subscription on the current connection.
    confirmed: bool,
}

/// Listens for the replies of the users in `interest` and delivers them
/// here, reconnecting with backoff, until the node shuts down.
pub async fn listen(node: Arc<Node>, interest: Arc<Interest>) {
    let mut users: HashMap<String, Listening> = HashMap::new();
    let mut link: Option<InjectLink> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let (addr, auth) = node.redis.pubsub_target();
        let connected = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            connected = PubSubConn::connect(addr, auth) => connected,
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "no pub/sub connection to Redis");
                tokio::select! {
                    _ = node.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Everything wanted is (re)subscribed; the cursors stay, so each
        // confirmation replays what was missed.
        users.retain(|uid, _| interest.wants(uid));
        for listening in users.values_mut() {
            listening.confirmed = false;
        }
        let ended = serve(&node, &interest, &mut users, &mut link, &mut conn).await;
        match ended {
            Ok(()) => return,
            Err(why) => {
                info!(%why, "pub/sub connection to Redis lost: reconnecting, then replaying from each user's cursor")
            }
        }
    }
}

/// Serves one pub/sub connection; `Ok` at shutdown, `Err` when it is lost.
async fn serve(
    node: &Node,
    interest: &Interest,
    users: &mut HashMap<String, Listening>,
    link: &mut Option<InjectLink>,
    conn: &mut PubSubConn,
) -> Result<(), String> {
    // Subscribes what is wanted and not subscribed; unsubscribes the rest.
    let mut reconcile = true;
    loop {
        if reconcile {
            reconcile = false;
            let wanted = interest.snapshot();
            let mut subscribe = Vec::new();
            for uid in &wanted {
                let listening = users.entry(uid.clone()).or_default();
                if !listening.confirmed {
                    subscribe.push(reply_key(uid));
                }
            }
            let unsubscribe: Vec<String> = users
                .keys()
                .filter(|uid| !interest.wants(uid))
                .map(|uid| reply_key(uid))
                .collect();
            users.retain(|uid, _| interest.wants(uid));
            for chunk in subscribe.chunks(100) {
                conn.send("SSUBSCRIBE", chunk)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            for chunk in unsubscribe.chunks(100) {
                conn.send("SUNSUBSCRIBE", chunk)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let value = tokio::select! {
            _ = node.shutdown.cancelled() => return Ok(()),
            () = interest.changed.notified() => {
                reconcile = true;
                continue;
            }
            value = conn.read() => value.map_err(|e| e.to_string())?,
        };
        match Push::from_value(value) {
            Push::Message { channel, payload } => {
                let Some(uid) = uid_of_channel(&channel) else {
                    continue;
                };
                let Some(listening) = users.get_mut(uid) else {
                    continue;
                };
                let Some((id, entry)) = split_wakeup(&payload) else {
                    node.metrics().cluster_dropped("undecodable", 1);
                    continue;
                };
                if listening.cursor.see(id) == Seen::New {
                    deliver(node, link, entry, "reply_in").await;
                }
            }
            Push::Subscribed(channel) => {
                let Some(uid) = uid_of_channel(&channel).map(str::to_owned) else {
                    continue;
                };
                if let Some(listening) = users.get_mut(&uid) {
                    listening.confirmed = true;
                    if let Some(from) = listening.cursor.replay_from() {
                        replay(node, link, &uid, from, &mut listening.cursor).await;
                    }
                }
            }
            Push::Unsubscribed(channel) => {
                // Asked for (the user left), or the server's doing: the
                // slot moved. Still wanted: subscribe again and replay.
                if let Some(uid) = uid_of_channel(&channel) {
                    if let Some(listening) = users.get_mut(uid) {
                        if listening.confirmed {
                            info!(
                                uid,
                                "the server ended a subscription (slot moved?): subscribing again"
                            );
                            listening.confirmed = false;
                            reconcile = true;
                        }
                    }
                }
            }
            Push::Error(text) => {
                // MOVED: the slot lives elsewhere now; a new connection
                // (to the server that owns it) subscribes again.
                return Err(format!("Redis refused a subscription: {text}"));
            }
            Push::Other => {}
        }
    }
}

/// Reads `uid`'s stream after `from` and delivers what the cursor has not
/// seen (entries of this node's own are only counted as seen).
async fn replay(
    node: &Node,
    link: &mut Option<InjectLink>,
    uid: &str,
    from: String,
    cursor: &mut Cursor,
) {
    let mut conn = node.redis.shared();
    let key = reply_key(uid);
    let mut start = from;
    for _ in 0..REPLAY_PAGES {
        let page: redis::RedisResult<redis::Value> = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(REPLAY_PAGE)
            .query_async(&mut conn)
            .await;
        let entries = match page {
            Ok(page) => crate::stream_entries(&page),
            Err(e) => {
                warn!(error = %e, uid, "replay of a user's replies failed; they wait for the next one");
                return;
            }
        };
        let count = entries.len();
        for (id, entry) in entries {
            start = id.after();
            if cursor.see(id) == Seen::New {
                if let Some(entry) = entry {
                    deliver(node, link, &entry, "replayed").await;
                }
            }
        }
        if count < REPLAY_PAGE {
            return;
        }
    }
    debug!(uid, "replay stopped after its page limit");
}

/// Delivers one entry here (unless this node received it itself): to the
/// local inboxes, and to the router when the local decision needs it.
pub async fn deliver(node: &Node, link: &mut Option<InjectLink>, bytes: &[u8], what: &'static str) {
    let entry = match Entry::decode(bytes) {
        Ok(entry) => entry,
        Err(e) => {
            node.metrics().cluster_dropped("undecodable", 1);
            warn!(error = %e, "an entry from Redis is not readable: dropped");
            return;
        }
    };
    if *entry.origin == *node.id {
        return;
    }
    let Ok(topic) = std::str::from_utf8(&entry.publish.topic) else {
        node.metrics().cluster_dropped("undecodable", 1);
        return;
    };
    let routed = node.local().route(topic, &entry.publish, &entry.properties);
    routed.record(node.metrics(), topic);
    node.metrics().cluster_moved(what, 1);
    if routed.needs_router {
        inject(node, link, entry).await;
    }
}

/// Hands `entry` to the router through `link`, opened (again) if needed;
/// false when the router did not take it.
pub async fn inject(node: &Node, link: &mut Option<InjectLink>, entry: Entry) -> bool {
    for _ in 0..2 {
        if link.is_none() {
            match node.injector().link(&node.next_link_name()).await {
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
