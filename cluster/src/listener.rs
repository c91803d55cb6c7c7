//! Owns the listening half of the device plane: which users' channels
//! this node is `SSUBSCRIBE`d to, on which master, and what the server
//! pushes back. One RESP3 connection per master (the `redis` crate's
//! multiplexed connection with a push sender); every push, tagged with its
//! connection, goes through one bounded queue to one task, which delivers
//! wake-ups (`replies::deliver`), ends sessions taken over on another node,
//! and subscribes again, where the slot map now says, after a
//! `sunsubscribe` from the server (the slot moved), a lost connection or a
//! subscription left unconfirmed; each confirmation replays the user's
//! stream after its cursor on the subscription's own connection, and
//! counts only once that node served the read (`listener_confirm.rs`);
//! only the confirmed connection's wake-ups are delivered. A replay, and
//! a user's live replies while they come in a burst, are paced
//! (`pacing.rs`).

use crate::entry::{reply_key, split_wakeup, uid_of_channel, Cursor, Seen, StreamId};
use crate::pacing::Burst;
use crate::redis_conn::NodeAddr;
use crate::replies::{deliver, replay, split_takeover, trimmed_after, Aim, How, Interest, Replay};
use crate::Node;
use broker::inject::InjectLink;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Pushes waiting for the listener (each tagged with its connection);
/// beyond it the listener starts over (every subscription again, each
/// user replayed from its cursor).
const PUSH_QUEUE: usize = 16 * 1024;
/// A subscription not confirmed this long after it was asked for is asked
/// for again (on the master the slot map now names).
const CONFIRM_WITHIN: Duration = Duration::from_secs(3);
/// How often the listener looks for subscriptions to retry.
const TICK: Duration = Duration::from_millis(500);
/// Subscriptions asked for at once.
const SUBSCRIBE_CHUNK: usize = 256;
/// How long a user's live replies wait for the replay of a session that
/// is resuming here (the CONNECT's own deadlines are shorter).
const HOLD_FOR: Duration = Duration::from_secs(5);
/// Resumes waiting for the listener.
pub const RESUME_QUEUE: usize = 4096;
/// Live wake-ups of one user within one [`TICK`] that make it a burst:
/// its replies are injected paced (`pacing.rs`) until a tick counts fewer.
const BURST: u32 = 32;

/// A persistent session moving to this node, for its user's replies.
#[derive(Debug)]
pub enum Resume {
    /// Its record was read: hold the user's live replies (they are in the
    /// stream) until its replay, so it gets everything in order.
    Hold(String),
    /// Its router session holds its subscriptions again (or its cursor
    /// must resync, `cursor.rs`): replay the user's stream after the
    /// session's cursor, to that session alone where the user's other
    /// sessions here had the replies already.
    Replay {
        uid: String,
        from: StreamId,
        session: String,
    },
}

/// One user this node listens for.
#[derive(Default)]
struct Listening {
    cursor: Cursor,
    /// The shard connection the subscription was asked on, and when.
    asked: Option<(u64, Instant)>,
    /// The server confirmed the subscription on that connection, and that
    /// node was seen to serve the user's slot ([`Listener::confirm`]).
    confirmed: bool,
    /// Where the node a subscription was asked on said the slot is
    /// (`MOVED`): the next subscription goes there, whatever the slot map.
    redirect: Option<NodeAddr>,
    /// Live wake-ups delivered since the last [`TICK`].
    recent: u32,
}

impl Listening {
    /// Whether a wake-up that came on connection `shard` is this user's to
    /// deliver: only on the connection its subscription was asked and
    /// confirmed on. Any other (a subscription left on a node that no
    /// longer serves the slot, or not confirmed yet) may hear wake-ups
    /// out of turn; the entries are in the stream, read by the replay
    /// that confirms the subscription.
    fn hears(&self, shard: u64) -> bool {
        self.confirmed && self.asked.is_some_and(|(id, _)| id == shard)
    }
}

/// One connection to one master, for the users whose slots it holds.
struct Shard {
    id: u64,
    conn: MultiplexedConnection,
}

/// The listener's state: the users, the shard connections, the pushes.
struct Listener {
    node: Arc<Node>,
    interest: Arc<Interest>,
    users: HashMap<String, Listening>,
    shards: HashMap<NodeAddr, Shard>,
    next_shard: u64,
    pushes: mpsc::Sender<(u64, PushInfo)>,
    /// A push did not fit in the queue.
    overflowed: Arc<AtomicBool>,
    link: Option<InjectLink>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Some wanted user is not (yet) confirmed: look again on each tick.
    pending: bool,
    /// Users whose live replies wait for a resuming session's replay,
    /// until when, and the first wake-up held back.
    holding: HashMap<String, (Instant, Option<StreamId>)>,
    /// Users with [`BURST`] live wake-ups or more since the last tick:
    /// paced, until a tick counts fewer.
    bursts: HashMap<String, Burst>,
}

/// Listens for the replies of the users in `interest` and delivers them
/// here until the node shuts down: each user's channel is `SSUBSCRIBE`d on
/// the master holding its slot (one RESP3 connection per master); a
/// `sunsubscribe` the server sends (the slot moved), a lost connection or
/// an unconfirmed subscription make it subscribe again where the slot map
/// now says, and each confirmation replays the stream after the cursor.
pub async fn listen(node: Arc<Node>, interest: Arc<Interest>, mut resumes: mpsc::Receiver<Resume>) {
    let (tx, mut rx) = mpsc::channel(PUSH_QUEUE);
    let mut listener = Listener {
        node: node.clone(),
        interest: interest.clone(),
        users: HashMap::new(),
        shards: HashMap::new(),
        next_shard: 0,
        pushes: tx,
        overflowed: Arc::default(),
        link: None,
        backoff: Duration::from_millis(100),
        retry_at: None,
        pending: false,
        holding: HashMap::new(),
        bursts: HashMap::new(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(256);
    let mut changed = true;
    loop {
        if changed || listener.pending {
            listener.reconcile().await;
        }
        changed = false;
        tokio::select! {
            biased;
            _ = node.shutdown.cancelled() => return,
            Some(resume) = resumes.recv() => {
                listener.resume(resume).await;
                continue;
            }
            () = interest.changed.notified() => changed = true,
            _ = tick.tick() => {
                listener.release_holds().await;
                listener.release_bursts();
            }
            n = rx.recv_many(&mut batch, 256) => if n == 0 { return },
        }
        for (shard, push) in batch.drain(..) {
            // A resume asked meanwhile goes first: its hold must be in
            // place before the user's next live reply.
            while let Ok(resume) = resumes.try_recv() {
                listener.resume(resume).await;
            }
            listener.push(shard, push).await;
        }
        if listener.overflowed.swap(false, Ordering::Relaxed) {
            warn!(
                "pub/sub pushes overflowed: subscribing again, then replaying each user's stream"
            );
            listener.start_over();
        }
    }
}

impl Listener {
    async fn resume(&mut self, resume: Resume) {
        match resume {
            Resume::Hold(uid) => {
                if self.holding.len() < RESUME_QUEUE {
                    self.holding.insert(uid, (Instant::now() + HOLD_FOR, None));
                }
            }
            Resume::Replay { uid, from, session } => {
                let held_from = self.holding.remove(&uid).and_then(|(_, first)| first);
                if trimmed_after(&self.node, &uid, from).await == Some(true) {
                    self.node.metrics().cluster_dropped("replay_trimmed", 1);
                    warn!(
                        uid,
                        "a resumed session was owed replies its stream no longer holds: lost"
                    );
                }
                // Everything after the session's cursor, whatever this
                // node delivered already (its router did not have the
                // session's subscriptions then): what the user's other
                // sessions here had already, to this session alone.
                let mut cursor = Cursor::default();
                cursor.see(from);
                let mut aim = Aim {
                    session: &session,
                    live: self.users.get(&uid).map(|l| l.cursor).unwrap_or_default(),
                    held_from,
                };
                let what = Replay {
                    uid: &uid,
                    cursor: &mut cursor,
                    tagged: true,
                    aim: Some(&mut aim),
                };
                let read = replay(&self.node, &mut self.link, what).await;
                self.node.persistent.replayed(&session, read);
                if !read {
                    self.node.metrics().cluster_dropped("replay_failed", 1);
                }
                // What the replay read is seen here (the user's other
                // sessions had it, or were owed nothing from before they
                // subscribed).
                let listening = self.users.entry(uid).or_default();
                if let Some(last) = cursor.last() {
                    listening.cursor.see(last);
                }
            }
        }
    }

    /// Users no longer in a burst (fewer than [`BURST`] wake-ups since the
    /// last tick) are no longer paced; the count starts again.
    fn release_bursts(&mut self) {
        let users = &self.users;
        self.bursts.retain(|uid, _| {
            users
                .get(uid)
                .is_some_and(|listening| listening.recent >= BURST)
        });
        for listening in self.users.values_mut() {
            listening.recent = 0;
        }
    }

    /// Holds that lapsed (the session never opened): what they held back
    /// is read from the stream.
    async fn release_holds(&mut self) {
        let now = Instant::now();
        let lapsed: Vec<String> = self
            .holding
            .iter()
            .filter(|(_, (until, _))| *until <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in lapsed {
            self.holding.remove(&uid);
            let Some(listening) = self.users.get(&uid) else {
                continue;
            };
            if listening.cursor.last().is_some() {
                let mut cursor = listening.cursor;
                let tagged = self.node.persistent.holds_user(&uid);
                let what = Replay {
                    uid: &uid,
                    cursor: &mut cursor,
                    tagged,
                    aim: None,
                };
                replay(&self.node, &mut self.link, what).await;
                if let Some(listening) = self.users.get_mut(&uid) {
                    listening.cursor = cursor;
                }
            }
        }
    }

    /// Subscribes what is wanted and not (or no longer) subscribed;
    /// unsubscribes who is no longer wanted.
    async fn reconcile(&mut self) {
        let wanted = self.interest.snapshot();
        let now = Instant::now();
        let mut subscribe = Vec::new();
        for uid in &wanted {
            let listening = self.users.entry(uid.clone()).or_default();
            let due = match listening.asked {
                None => true,
                Some((_, at)) => !listening.confirmed && now.duration_since(at) >= CONFIRM_WITHIN,
            };
            if due {
                subscribe.push(uid.clone());
            }
        }
        let gone: Vec<String> = self
            .users
            .keys()
            .filter(|uid| !self.interest.wants(uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(Listening {
                asked: Some((id, _)),
                ..
            }) = self.users.remove(&uid)
            {
                if let Some(shard) = self.shards.values_mut().find(|s| s.id == id) {
                    // The answer does not matter: a lost connection
                    // unsubscribes too.
                    let _ = redis::cmd("SUNSUBSCRIBE")
                        .arg(reply_key(&uid))
                        .query_async::<redis::Value>(&mut shard.conn)
                        .await;
                }
            }
        }
        self.pending = wanted
            .iter()
            .any(|uid| self.users.get(uid).is_some_and(|l| !l.confirmed));
        if subscribe.is_empty() || self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        if subscribe
            .iter()
            .any(|uid| self.users.get(uid).is_some_and(|l| l.asked.is_some()))
        {
            // Something was not confirmed: the slot map may be stale.
            let _ = self.node.redis.refresh().await;
        }
        let mut failed = false;
        for chunk in subscribe.chunks(SUBSCRIBE_CHUNK) {
            let mut asks = Vec::with_capacity(chunk.len());
            for uid in chunk {
                let key = reply_key(uid);
                let redirect = self.users.get_mut(uid).and_then(|l| l.redirect.take());
                let Some(addr) = redirect.or_else(|| self.node.redis.master_of(&key)) else {
                    let _ = self.node.redis.refresh().await;
                    failed = true;
                    continue;
                };
                let Some((shard, mut conn)) =
                    self.shard(&addr).await.map(|s| (s.id, s.conn.clone()))
                else {
                    failed = true;
                    continue;
                };
                if let Some(listening) = self.users.get_mut(uid) {
                    listening.asked = Some((shard, now));
                    listening.confirmed = false;
                }
                debug!(uid, %addr, shard, "asking for a subscription");
                asks.push(async move {
                    redis::cmd("SSUBSCRIBE")
                        .arg(key)
                        .query_async::<redis::Value>(&mut conn)
                        .await
                });
            }
            // The confirmations arrive as pushes; an error (MOVED: the map
            // was stale) leaves the subscription unconfirmed, asked again
            // after CONFIRM_WITHIN.
            for asked in futures::future::join_all(asks).await {
                if let Err(e) = asked {
                    debug!(error = %e, "a subscription was refused");
                    failed = true;
                }
            }
        }
        if failed {
            self.retry_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        } else {
            self.retry_at = None;
            self.backoff = Duration::from_millis(100);
        }
    }

    /// The connection to `addr`, opened if needed.
    async fn shard(&mut self, addr: &NodeAddr) -> Option<&Shard> {
        if !self.shards.contains_key(addr) {
            let id = self.next_shard;
            self.next_shard += 1;
            let (tx, overflowed) = (self.pushes.clone(), self.overflowed.clone());
            let push = move |info: PushInfo| -> Result<(), ()> {
                if tx.try_send((id, info)).is_err() {
                    overflowed.store(true, Ordering::Relaxed);
                }
                Ok(())
            };
            let opened = tokio::select! {
                _ = self.node.shutdown.cancelled() => return None,
                opened = self.node.redis.subscriber(addr, push) => opened,
            };
            match opened {
                Ok(conn) => {
                    info!(%addr, shard = id, "pub/sub connection to a Redis master open");
                    self.shards.insert(addr.clone(), Shard { id, conn });
                }
                Err(e) => {
                    warn!(error = %e, %addr, "no pub/sub connection to a Redis master");
                    let _ = self.node.redis.refresh().await;
                    return None;
                }
            }
        }
        self.shards.get(addr)
    }

    /// Everything again: every connection dropped, every user subscribed
    /// anew and replayed from its cursor when confirmed.
    fn start_over(&mut self) {
        self.shards.clear();
        for listening in self.users.values_mut() {
            listening.asked = None;
            listening.confirmed = false;
        }
        self.pending = true;
    }

    async fn push(&mut self, shard: u64, push: PushInfo) {
        let channel = match push.data.first() {
            Some(redis::Value::BulkString(channel)) => Some(channel.as_slice()),
            _ => None,
        };
        let uid = channel.and_then(uid_of_channel);
        match push.kind {
            PushKind::SMessage => {
                let (Some(uid), Some(redis::Value::BulkString(payload))) = (uid, push.data.get(1))
                else {
                    return;
                };
                if let Some(taken) = split_takeover(payload) {
                    if taken.node == &*self.node.id {
                        return;
                    }
                    // The session lives there now: its record is that
                    // node's to write.
                    self.node.persistent.moved(taken.session);
                    if self.node.injector().take_over_and_release(taken.session) {
                        info!(
                            session = taken.session,
                            node = taken.node,
                            "a session here was taken over on another node: ended"
                        );
                    } else if self
                        .node
                        .injector()
                        .release(taken.session, taken.clean_start)
                        .await
                    {
                        info!(
                            session = taken.session,
                            node = taken.node,
                            "a session kept here reconnected on another node: released"
                        );
                    }
                    return;
                }
                if let Some((until, first)) = self.holding.get_mut(uid) {
                    if Instant::now() < *until {
                        // A session resuming here replays the stream
                        // first; from this one on (new here), for every
                        // session.
                        let seen = self.users.get(uid).and_then(|l| l.cursor.last());
                        if let Some((id, _)) = split_wakeup(payload) {
                            if seen.is_none_or(|seen| id > seen) {
                                *first = Some(first.map_or(id, |first| first.min(id)));
                            }
                        }
                        return;
                    }
                }
                let tagged = self.node.persistent.holds_user(uid);
                let Some(listening) = self.users.get_mut(uid) else {
                    return;
                };
                let Some((id, entry)) = split_wakeup(payload) else {
                    self.node.metrics().cluster_dropped("undecodable", 1);
                    return;
                };
                if !listening.hears(shard) {
                    debug!(
                        uid,
                        shard,
                        %id,
                        asked = ?listening.asked.map(|(s, _)| s),
                        confirmed = listening.confirmed,
                        "a wake-up on a connection the subscription is not confirmed on: left to the replay"
                    );
                    return;
                }
                let seen = listening.cursor.see(id);
                debug!(uid, shard, %id, new = (seen == Seen::New), "wake-up");
                if seen == Seen::New {
                    listening.recent = listening.recent.saturating_add(1);
                    if listening.recent >= BURST
                        && !self.bursts.contains_key(uid)
                        && self.node.injector().device_connected(uid)
                    {
                        if let Some(burst) = Burst::new(self.node.paced.clone(), uid) {
                            self.bursts.insert(uid.to_owned(), burst);
                        }
                    }
                    let how = How {
                        id,
                        tagged,
                        burst: self.bursts.get_mut(uid),
                        target: None,
                    };
                    deliver(&self.node, &mut self.link, entry, "reply_in", how).await;
                }
            }
            PushKind::SSubscribe => {
                if let Some(uid) = uid.map(str::to_owned) {
                    self.confirm(uid, shard).await;
                }
            }
            PushKind::SUnsubscribe => {
                // Asked for (the user left: no longer listed), or the
                // server's doing: the slot moved. Still wanted: subscribe
                // again where the slot map now says, then replay.
                let Some(listening) = uid.and_then(|uid| self.users.get_mut(uid)) else {
                    return;
                };
                if listening.asked.is_some_and(|(id, _)| id == shard) {
                    info!(
                        uid,
                        shard, "the server ended a subscription (slot moved?): subscribing again"
                    );
                    listening.asked = None;
                    listening.confirmed = false;
                    self.pending = true;
                    let _ = self.node.redis.refresh().await;
                    debug!(
                        uid,
                        shard,
                        now = ?uid.and_then(|uid| self.node.redis.master_of(&reply_key(uid))),
                        "the slot map after the server ended a subscription"
                    );
                }
            }
            PushKind::Disconnection => {
                let before = self.shards.len();
                self.shards.retain(|_, s| s.id != shard);
                if self.shards.len() != before {
                    info!("pub/sub connection to a Redis master lost: subscribing again, then replaying from each user's cursor");
                }
                for listening in self.users.values_mut() {
                    if listening.asked.is_some_and(|(id, _)| id == shard) {
                        listening.asked = None;
                        listening.confirmed = false;
                        self.pending = true;
                    }
                }
                let _ = self.node.redis.refresh().await;
            }
            _ => {}
        }
    }
}

#[path = "listener_confirm.rs"]
mod confirm;

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
