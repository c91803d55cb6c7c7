//! Owns a persistent device session's cursor as pure state: the end of
//! the contiguous prefix of the replies injected for it that are done
//! (acknowledged by its client, or never going to be written to it), so
//! that a resume elsewhere, which replays the user's stream after the
//! cursor, never skips a reply the device did not acknowledge. Bounded:
//! at most [`MAX_TRACKED`] ids per session; past them the cursor stops
//! short of the first id not tracked, and a resync (a replay aimed at the
//! session alone, every id tracked again) catches up.

use crate::entry::StreamId;
use std::collections::VecDeque;

/// Ids one session tracks at most (injected for it and not yet passed).
/// The router holds at most 100 of a session's publishes in flight and
/// about 250 small ones in the log of a topic before it drops a segment,
/// so a reading client stays far under it; a client away for long, or a
/// burst the router jumped over, reaches it.
pub const MAX_TRACKED: usize = 512;
/// A first id left unacknowledged this long while its client acknowledged
/// later ones (it reads, and the router may have dropped or never sent
/// this one) makes the session resync.
pub const STALL_MS: u64 = 30_000;

/// When a tracked id is passed.
const WAITS: u64 = u64::MAX;
const DONE: u64 = 0;

/// One reply injected for the session.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: StreamId,
    /// [`DONE`] (acknowledged or skipped), [`WAITS`] (until acknowledged),
    /// or the time (ms) its Message Expiry passes it.
    passed_from: u64,
    injected_ms: u64,
}

/// A session's cursor and the replies injected for it after it.
#[derive(Debug, Clone)]
pub struct Window {
    cursor: StreamId,
    /// Ascending ids after `cursor`; the first one is not passed.
    slots: VecDeque<Slot>,
    /// The first id injected and not tracked (the window was full): the
    /// cursor stays before it until a resync.
    untracked: Option<StreamId>,
    /// A resync was asked for: the cursor stays until [`Window::resynced`].
    resyncing: bool,
    /// A later id than the first was acknowledged since that one was
    /// injected (its client reads).
    later_acked: bool,
}

impl Window {
    pub fn new(cursor: StreamId) -> Self {
        Window {
            cursor,
            slots: VecDeque::new(),
            untracked: None,
            resyncing: false,
            later_acked: false,
        }
    }

    /// The end of the contiguous prefix of what is done.
    pub fn cursor(&self) -> StreamId {
        self.cursor
    }

    /// Ids tracked (for tests and the resident size).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.slots.len()
    }

    /// Reply `id` was injected for the session at `now_ms`; `expires_ms`:
    /// when its Message Expiry Interval ends (the router drops it then).
    pub fn injected(&mut self, id: StreamId, now_ms: u64, expires_ms: Option<u64>) {
        if id <= self.cursor {
            return;
        }
        if let Some(first) = self.untracked.as_mut() {
            *first = (*first).min(id);
            return;
        }
        let at = match self.slots.binary_search_by(|slot| slot.id.cmp(&id)) {
            Ok(_) => return,
            Err(at) => at,
        };
        if self.slots.len() >= MAX_TRACKED {
            self.untracked = Some(id);
            return;
        }
        if at == 0 {
            self.later_acked = false;
        }
        self.slots.insert(
            at,
            Slot {
                id,
                passed_from: expires_ms.unwrap_or(WAITS),
                injected_ms: now_ms,
            },
        );
    }

    /// The client acknowledged reply `id`: true when the cursor moved.
    pub fn acked(&mut self, id: StreamId, now_ms: u64) -> bool {
        self.pass(id, now_ms, true)
    }

    /// Reply `id` will not be written to the client (too large for it):
    /// as good as acknowledged. True when the cursor moved.
    pub fn skipped(&mut self, id: StreamId, now_ms: u64) -> bool {
        self.pass(id, now_ms, false)
    }

    fn pass(&mut self, id: StreamId, now_ms: u64, acked: bool) -> bool {
        if let Ok(at) = self.slots.binary_search_by(|slot| slot.id.cmp(&id)) {
            if let Some(slot) = self.slots.get_mut(at) {
                slot.passed_from = DONE;
            }
            if at > 0 && acked {
                self.later_acked = true;
            }
        }
        self.advance(now_ms)
    }

    /// Moves the cursor over the ids passed at `now_ms` (acknowledged,
    /// skipped, expired), never to or past an untracked one nor during a
    /// resync: true when it moved.
    pub fn advance(&mut self, now_ms: u64) -> bool {
        if self.resyncing {
            return false;
        }
        let mut moved = false;
        while let Some(first) = self.slots.front() {
            let passed = first.passed_from == DONE || first.passed_from <= now_ms;
            if !passed || self.untracked.is_some_and(|u| first.id >= u) {
                break;
            }
            self.cursor = first.id;
            self.slots.pop_front();
            self.later_acked = false;
            moved = true;
        }
        if self.slots.is_empty() && self.slots.capacity() > 16 {
            self.slots = VecDeque::new();
        }
        moved
    }

    /// Whether the session, its client connected (`live`), must resync at
    /// `now_ms`: everything tracked is passed but ids went untracked, or
    /// the first id waits [`STALL_MS`] while later ones were acknowledged.
    /// Returns the cursor to replay after; until [`Window::resynced`],
    /// the cursor stays (what the replay injects is tracked afresh).
    pub fn resync(&mut self, now_ms: u64, live: bool) -> Option<StreamId> {
        if !live || self.resyncing {
            return None;
        }
        let stalled = self.slots.front().is_some_and(|first| {
            self.later_acked && now_ms.saturating_sub(first.injected_ms) >= STALL_MS
        });
        // Everything tracked before the first untracked id is passed.
        let caught_up = self
            .untracked
            .is_some_and(|untracked| self.slots.front().is_none_or(|first| first.id >= untracked));
        if !(stalled || caught_up) {
            return None;
        }
        self.slots = VecDeque::new();
        self.untracked = None;
        self.later_acked = false;
        self.resyncing = true;
        Some(self.cursor)
    }

    /// The resync's replay was injected: what it injected is tracked.
    pub fn resynced(&mut self, now_ms: u64) -> bool {
        self.resyncing = false;
        self.advance(now_ms)
    }

    /// A replay for the session (a resync, or its resume here) was not
    /// asked for or not read whole: nothing after the cursor is known to
    /// be tracked, so the cursor stays and the next check resyncs.
    pub fn resync_lost(&mut self) {
        self.resyncing = false;
        self.slots = VecDeque::new();
        self.later_acked = false;
        let next = match self.cursor.seq.checked_add(1) {
            Some(seq) => StreamId {
                ms: self.cursor.ms,
                seq,
            },
            None => StreamId {
                ms: self.cursor.ms.saturating_add(1),
                seq: 0,
            },
        };
        self.untracked = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> StreamId {
        StreamId { ms, seq: 0 }
    }

    /// One step of a table: what happens, at which time.
    #[derive(Clone, Copy)]
    enum Step {
        Inject(u64),
        InjectExpiring(u64, u64),
        Ack(u64),
        Skip(u64),
        Tick,
    }

    fn run(steps: &[(u64, Step)]) -> (u64, usize) {
        let mut w = Window::new(id(10));
        for (now, step) in steps.iter().copied() {
            match step {
                Step::Inject(n) => w.injected(id(n), now, None),
                Step::InjectExpiring(n, until) => w.injected(id(n), now, Some(until)),
                Step::Ack(n) => {
                    w.acked(id(n), now);
                }
                Step::Skip(n) => {
                    w.skipped(id(n), now);
                }
                Step::Tick => {
                    w.advance(now);
                }
            }
        }
        (w.cursor().ms, w.tracked())
    }

    #[test]
    fn the_cursor_is_the_end_of_the_acknowledged_prefix() {
        use Step::*;
        // (steps at time 0 unless said) -> (cursor, ids still tracked)
        type Steps = Vec<(u64, Step)>;
        let table: Vec<(Steps, (u64, usize))> = vec![
            (vec![], (10, 0)),
            (vec![(0, Inject(11)), (0, Ack(11))], (11, 0)),
            // Out of order: 12 acknowledged, 11 not: the cursor stays.
            (
                vec![(0, Inject(11)), (0, Inject(12)), (0, Ack(12))],
                (10, 2),
            ),
            (
                vec![(0, Inject(11)), (0, Inject(12)), (0, Ack(12)), (0, Ack(11))],
                (12, 0),
            ),
            // A QoS 0 reply written (acknowledged) while an earlier QoS 1
            // one is in flight.
            (
                vec![
                    (0, Inject(11)),
                    (0, Inject(12)),
                    (0, Inject(13)),
                    (0, Ack(13)),
                ],
                (10, 3),
            ),
            // An acknowledgement of an id never tracked moves nothing.
            (vec![(0, Inject(11)), (0, Ack(15))], (10, 1)),
            // Ids at or before the cursor are not tracked.
            (vec![(0, Inject(9)), (0, Inject(10))], (10, 0)),
            // Injected twice: tracked once.
            (
                vec![(0, Inject(11)), (0, Inject(11)), (0, Ack(11))],
                (11, 0),
            ),
            // Injected out of order (a replay before live ids): sorted.
            (
                vec![(0, Inject(13)), (0, Inject(11)), (0, Ack(13))],
                (10, 2),
            ),
            (
                vec![(0, Inject(13)), (0, Inject(11)), (0, Ack(13)), (0, Ack(11))],
                (13, 0),
            ),
            // Too large for the client: passed, not waited for.
            (
                vec![
                    (0, Inject(11)),
                    (0, Inject(12)),
                    (0, Skip(11)),
                    (0, Ack(12)),
                ],
                (12, 0),
            ),
            // Expired (the router drops it): passed once its time came.
            (
                vec![(0, InjectExpiring(11, 500)), (0, Inject(12)), (0, Ack(12))],
                (10, 2),
            ),
            (
                vec![
                    (0, InjectExpiring(11, 500)),
                    (0, Inject(12)),
                    (0, Ack(12)),
                    (500, Tick),
                ],
                (12, 0),
            ),
        ];
        for (steps, expected) in table {
            let got = run(&steps);
            let shown: Vec<String> = steps
                .iter()
                .map(|(t, s)| {
                    let s = match s {
                        Inject(n) => format!("inject {n}"),
                        InjectExpiring(n, u) => format!("inject {n} until {u}"),
                        Ack(n) => format!("ack {n}"),
                        Skip(n) => format!("skip {n}"),
                        Tick => "tick".to_owned(),
                    };
                    format!("{s} @{t}")
                })
                .collect();
            assert_eq!(got, expected, "{shown:?}");
        }
    }

    #[test]
    fn a_full_window_stops_short_of_the_first_untracked_id_until_a_resync() {
        let mut w = Window::new(id(0));
        for n in 1..=MAX_TRACKED as u64 + 3 {
            w.injected(id(n), 0, None);
        }
        assert_eq!(w.tracked(), MAX_TRACKED);
        // Every id acknowledged, in order: the cursor stops before the
        // first one not tracked.
        for n in 1..=MAX_TRACKED as u64 + 3 {
            w.acked(id(n), 0);
        }
        assert_eq!(w.cursor(), id(MAX_TRACKED as u64));
        // Not while the client is away; then a resync from there.
        assert_eq!(w.resync(0, false), None);
        assert_eq!(w.resync(0, true), Some(id(MAX_TRACKED as u64)));
        assert_eq!(w.resync(0, true), None, "one resync at a time");
        // The replay tracks what it injects; acknowledgements meanwhile
        // do not move the cursor before the replay is done.
        let last = MAX_TRACKED as u64 + 3;
        for n in MAX_TRACKED as u64 + 1..=last {
            w.injected(id(n), 1, None);
        }
        assert!(!w.acked(id(MAX_TRACKED as u64 + 1), 1));
        assert!(w.resynced(1));
        assert_eq!(w.cursor(), id(MAX_TRACKED as u64 + 1));
        w.acked(id(last - 1), 1);
        w.acked(id(last), 1);
        assert_eq!((w.cursor(), w.tracked()), (id(last), 0));
    }

    #[test]
    fn a_full_window_resyncs_once_what_precedes_the_untracked_id_passed() {
        let mut w = Window::new(id(0));
        // Injected out of order into a full window: 1 is not tracked, the
        // later ones are.
        for n in 2..=MAX_TRACKED as u64 + 1 {
            w.injected(id(n), 0, None);
        }
        w.injected(id(1), 0, None);
        for n in 2..=MAX_TRACKED as u64 + 1 {
            w.acked(id(n), 0);
        }
        assert_eq!(w.cursor(), id(0), "1 was never tracked");
        assert_eq!(w.resync(0, true), Some(id(0)));
    }

    #[test]
    fn a_stalled_first_id_resyncs_only_when_later_ones_were_acknowledged() {
        let mut w = Window::new(id(0));
        w.injected(id(1), 0, None);
        w.injected(id(2), 0, None);
        // Nothing acknowledged: a slow or away client, no resync.
        assert_eq!(w.resync(STALL_MS * 2, true), None);
        w.acked(id(2), 10);
        // Acknowledged later, but not yet long enough.
        assert_eq!(w.resync(STALL_MS - 1, true), None);
        assert_eq!(w.resync(STALL_MS, false), None);
        assert_eq!(w.resync(STALL_MS, true), Some(id(0)));
        // The replay injects 1 and 2 again; the cursor never passed 1.
        w.injected(id(1), STALL_MS, None);
        w.injected(id(2), STALL_MS, None);
        w.resynced(STALL_MS);
        assert_eq!(w.cursor(), id(0));
        w.acked(id(1), STALL_MS + 1);
        w.acked(id(2), STALL_MS + 1);
        assert_eq!(w.cursor(), id(2));
        // A replay that failed: the cursor stays whatever is acknowledged
        // meanwhile, and the next check asks again.
        w.injected(id(3), STALL_MS + 2, None);
        w.resync_lost();
        w.injected(id(4), STALL_MS + 2, None);
        w.acked(id(4), STALL_MS + 2);
        assert_eq!(w.cursor(), id(2));
        assert_eq!(w.resync(STALL_MS + 3, true), Some(id(2)));
    }
}
