//! Owns the pacing of a burst of one user's replies into this node's
//! router (a replay after an outage, or many wake-ups of one user in one
//! batch of pushes): the router's log of a topic holds 2 segments of
//! 32 KiB and drops its oldest one while a reader is still in it, so a
//! burst injected faster than the router writes it to the device lost its
//! oldest replies. Each reply of a paced burst carries its delivery tag
//! (`r <stream id>`), and the user's sessions report when their client
//! took one ([`Acks::delivered`]); the burst keeps at most [`WINDOW`]
//! replies ([`BUDGET`] bytes, counted as the router counts a stored
//! message) injected and not yet taken, and waits before injecting more.
//! A wait with no acknowledgement for [`STALL`] ends the pacing of that
//! burst (a dead device, or a topic no session reads, never holds the
//! listener, and so the other users, longer than that).
//!
//! [`Pacer`] is the pure state (inject now / wait); [`Acks`] the shared
//! table of acknowledgements, read only while a burst of that user is
//! paced; [`Burst`] joins them for the listener.

use crate::entry::StreamId;
use crate::record::tagged_id;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Most replies of one burst injected and not yet taken by a client.
pub const WINDOW: usize = 64;
/// Most bytes of one burst injected and not yet taken, as the router
/// counts them ([`cost`]): under one of the two 32 KiB segments of the
/// topic's log, so when the log drops its oldest segment (a third one
/// began) every reader is past it: the router's reader of the device's
/// connection is ahead of what the client acknowledged.
pub const BUDGET: usize = 24 * 1024;
/// What the router adds to each stored message (its record).
const RECORD: usize = 260;
/// A paced burst with no acknowledgement for this long is no longer paced.
pub const STALL: Duration = Duration::from_secs(2);
/// Users whose bursts are paced at once (the listener paces one at a time).
const USERS: usize = 1024;

/// What a reply of `topic` with `payload` and `properties` bytes of
/// properties costs in the router's log.
pub fn cost(topic: usize, payload: usize, properties: usize) -> usize {
    RECORD + topic + payload + properties
}

/// Whether the next reply of a burst goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Inject,
    Wait,
}

/// One burst's replies injected and not yet acknowledged, in stream order.
/// An acknowledgement of a reply acknowledges every earlier one too: a
/// session takes one user's replies in order, and an earlier one nobody
/// took (its topic read by no session) is past the router's reader.
#[derive(Debug, Default)]
pub struct Pacer {
    in_flight: VecDeque<(StreamId, usize)>,
    bytes: usize,
    acked: Option<StreamId>,
}

impl Pacer {
    /// Whether a reply costing `cost` can be injected now: always when
    /// nothing is in flight (a reply larger than the budget goes alone).
    pub fn step(&self, cost: usize) -> Step {
        if self.in_flight.is_empty()
            || (self.in_flight.len() < WINDOW && self.bytes + cost <= BUDGET)
        {
            Step::Inject
        } else {
            Step::Wait
        }
    }

    /// Reply `id` costing `cost` was injected.
    pub fn injected(&mut self, id: StreamId, cost: usize) {
        if self.acked.is_some_and(|acked| id <= acked) {
            return;
        }
        self.in_flight.push_back((id, cost));
        self.bytes += cost;
    }

    /// A client took reply `id`: it and every earlier one are no longer in
    /// flight. True when that freed something.
    pub fn acknowledged(&mut self, id: StreamId) -> bool {
        if self.acked.is_some_and(|acked| id <= acked) {
            return false;
        }
        self.acked = Some(id);
        let before = self.in_flight.len();
        while let Some(&(front, cost)) = self.in_flight.front() {
            if front > id {
                break;
            }
            self.in_flight.pop_front();
            self.bytes -= cost;
        }
        self.in_flight.len() != before
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The latest reply each paced user's sessions acknowledged; only users
/// being paced are kept, so an acknowledgement costs one atomic load when
/// no burst is paced.
#[derive(Default)]
pub struct Acks {
    /// Per user: the latest acknowledged, and how many bursts watch it.
    users: Mutex<HashMap<String, (Option<StreamId>, usize)>>,
    watched: AtomicUsize,
    changed: Notify,
}

impl Acks {
    /// Session `session_id` (a device's: `D:<uid>:...`) took the reply
    /// `tag` names.
    pub fn delivered(&self, session_id: &str, tag: &str) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let (Some(uid), Some(id)) = (crate::delivery::device_uid(session_id), tagged_id(tag))
        else {
            return;
        };
        let mut users = self.users.lock();
        if let Some((acked, _)) = users.get_mut(uid) {
            if acked.is_none_or(|acked| id > acked) {
                *acked = Some(id);
                drop(users);
                self.changed.notify_one();
            }
        }
    }

    /// Starts keeping `uid`'s acknowledgements; false when too many users
    /// are paced already (that burst goes unpaced).
    fn watch(&self, uid: &str) -> bool {
        let mut users = self.users.lock();
        if users.len() >= USERS && !users.contains_key(uid) {
            return false;
        }
        let (_, bursts) = users.entry(uid.to_owned()).or_insert_with(|| {
            self.watched.fetch_add(1, Ordering::Relaxed);
            (None, 0)
        });
        *bursts += 1;
        true
    }

    fn unwatch(&self, uid: &str) {
        let mut users = self.users.lock();
        if let Some((_, bursts)) = users.get_mut(uid) {
            *bursts -= 1;
            if *bursts == 0 {
                users.remove(uid);
                self.watched.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn acked(&self, uid: &str) -> Option<StreamId> {
        self.users.lock().get(uid).and_then(|(acked, _)| *acked)
    }
}

/// One user's burst being paced; its acknowledgements are kept until it
/// is dropped.
pub struct Burst {
    acks: Arc<Acks>,
    uid: String,
    pacer: Pacer,
    /// Still paced (no stall yet).
    pacing: bool,
    /// Replies injected, and how many of them waited for their turn.
    injected: usize,
    waited: usize,
}

impl Burst {
    /// A burst of `uid`'s replies; `None` when too many bursts are paced.
    pub fn new(acks: Arc<Acks>, uid: &str) -> Option<Burst> {
        acks.watch(uid).then(|| Burst {
            acks,
            uid: uid.to_owned(),
            pacer: Pacer::default(),
            pacing: true,
            injected: 0,
            waited: 0,
        })
    }

    /// Waits until a reply costing `cost` may be injected: at once while
    /// the window has room, else until the user's sessions took enough;
    /// [`STALL`] without an acknowledgement (or the node shutting down)
    /// ends the pacing of this burst. False when it ended here.
    pub async fn before(&mut self, cost: usize, shutdown: &CancellationToken) -> bool {
        let mut waiting = false;
        // Moved on by this user's acknowledgements only (another user's
        // wake the wait too).
        let mut deadline = tokio::time::Instant::now() + STALL;
        while self.pacing {
            let acked = self.acks.acked(&self.uid);
            if acked.is_some_and(|acked| self.pacer.acknowledged(acked)) {
                deadline = tokio::time::Instant::now() + STALL;
            }
            if self.pacer.step(cost) == Step::Inject {
                return true;
            }
            if !waiting {
                waiting = true;
                self.waited += 1;
            }
            let changed = self.acks.changed.notified();
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        uid = %self.uid,
                        in_flight = self.pacer.in_flight(),
                        "a burst of replies stalled (no acknowledgement): no longer paced"
                    );
                    self.pacing = false;
                }
                () = shutdown.cancelled() => self.pacing = false,
            }
        }
        false
    }

    /// Reply `id` costing `cost` was injected.
    pub fn injected(&mut self, id: StreamId, cost: usize) {
        self.injected += 1;
        if self.pacing {
            self.pacer.injected(id, cost);
        }
    }

    /// Whether this burst is still paced.
    pub fn pacing(&self) -> bool {
        self.pacing
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        if self.waited > 0 {
            tracing::info!(
                uid = %self.uid,
                replies = self.injected,
                waited = self.waited,
                "a burst of replies was paced"
            );
        }
        self.acks.unwatch(&self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> StreamId {
        StreamId::parse(&format!("{ms}-0")).unwrap()
    }

    #[test]
    fn a_window_of_replies_in_flight() {
        let mut pacer = Pacer::default();
        let small = cost(8, 4, 0);
        for i in 0..WINDOW as u64 {
            assert_eq!(pacer.step(small), Step::Inject, "reply {i}");
            pacer.injected(id(i + 1), small);
        }
        assert_eq!(pacer.in_flight(), WINDOW);
        assert_eq!(pacer.step(small), Step::Wait);
        // An acknowledgement of reply 10 frees 1..=10.
        assert!(pacer.acknowledged(id(10)));
        assert_eq!(pacer.in_flight(), WINDOW - 10);
        assert_eq!(pacer.step(small), Step::Inject);
        // An older or repeated acknowledgement frees nothing.
        assert!(!pacer.acknowledged(id(10)));
        assert!(!pacer.acknowledged(id(3)));
        // The last one frees all.
        assert!(pacer.acknowledged(id(WINDOW as u64)));
        assert_eq!(pacer.in_flight(), 0);
    }

    #[test]
    fn steps_by_count_and_bytes() {
        // (in flight: count of replies of cost each, next reply's cost) -> step
        let table = [
            (0, 0, BUDGET * 4, Step::Inject),
            (1, BUDGET, 1, Step::Wait),
            (1, BUDGET - 400, 400, Step::Inject),
            (1, BUDGET - 400, 401, Step::Wait),
            (WINDOW - 1, RECORD, RECORD, Step::Inject),
            (WINDOW, RECORD, RECORD, Step::Wait),
            (WINDOW, 1, 1, Step::Wait),
        ];
        for (count, each, next, step) in table {
            let mut pacer = Pacer::default();
            for i in 0..count as u64 {
                pacer.injected(id(i + 1), each);
            }
            assert_eq!(pacer.step(next), step, "{count} x {each}, next {next}");
        }
    }

    #[test]
    fn replies_acknowledged_before_they_were_counted_are_not_in_flight() {
        let mut pacer = Pacer::default();
        pacer.acknowledged(id(5));
        pacer.injected(id(4), 300);
        pacer.injected(id(5), 300);
        assert_eq!(pacer.in_flight(), 0);
        pacer.injected(id(6), 300);
        assert_eq!(pacer.in_flight(), 1);
    }

    #[test]
    fn acknowledgements_are_kept_only_for_watched_users() {
        let acks = Arc::new(Acks::default());
        acks.delivered("D:7:phone", "r 3-0");
        assert_eq!(acks.acked("7"), None);
        let burst = Burst::new(acks.clone(), "7").unwrap();
        // (session, tag) -> latest acknowledged of user 7
        let table = [
            ("D:7:phone", "r 3-0", Some(id(3))),
            ("D:7:tablet", "r 2-0", Some(id(3))),
            ("D:8:phone", "r 9-0", Some(id(3))),
            ("D:7:phone", "c:{t:0}|g|9-0", Some(id(3))),
            ("H:7:worker", "r 9-0", Some(id(3))),
            ("D:7:tablet", "r 4-0", Some(id(4))),
        ];
        for (session, tag, acked) in table {
            acks.delivered(session, tag);
            assert_eq!(acks.acked("7"), acked, "{session} {tag}");
        }
        // Two bursts of one user (a replay during a batch's burst): kept
        // until both ended.
        let replay = Burst::new(acks.clone(), "7").unwrap();
        drop(burst);
        assert_eq!(acks.acked("7"), Some(id(4)));
        drop(replay);
        assert_eq!(acks.watched.load(Ordering::Relaxed), 0);
        assert!(acks.users.lock().is_empty());
    }

    #[tokio::test]
    async fn a_burst_waits_for_acknowledgements() {
        let acks = Arc::new(Acks::default());
        let shutdown = CancellationToken::new();
        let mut burst = Burst::new(acks.clone(), "7").unwrap();
        for i in 0..WINDOW as u64 {
            assert!(burst.before(RECORD, &shutdown).await);
            burst.injected(id(i + 1), RECORD);
        }
        // The window is full: the next waits until a client took one.
        let acker = acks.clone();
        let took = tokio::spawn(async move {
            tokio::task::yield_now().await;
            acker.delivered("D:7:phone", "r 1-0");
        });
        assert!(burst.before(RECORD, &shutdown).await);
        assert!(burst.pacing());
        assert_eq!(burst.waited, 1);
        took.await.unwrap();
        assert_eq!(burst.pacer.in_flight(), WINDOW - 1);
        // Shutting down ends the pacing.
        burst.injected(id(WINDOW as u64 + 1), RECORD);
        shutdown.cancel();
        assert!(!burst.before(RECORD, &shutdown).await);
        assert!(!burst.pacing());
    }
}
