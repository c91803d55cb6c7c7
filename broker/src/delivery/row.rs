//! Owns one session's row of the subscription table: which filters it
//! holds, which path serves each (its inbox or the router), which a handler
//! declared as command topics, and the cap on how many it may hold. A live
//! connection carries its row (so a subscribe needs no lookup by session
//! id); a persistent session's row waits in [`super::LocalDelivery`] while
//! its client is away. Only `delivery` changes a row: the session holds it
//! and hands it back.
//!
//! Why hash sets: this runs on the runtime worker the router shares, once per
//! filter of every SUBSCRIBE and UNSUBSCRIBE. With per-session lists, a
//! SUBSCRIBE of 10,000 filters cost 10,000 scans of a growing list and
//! stalled every other client for seconds; here each filter costs O(1).

use super::inbox::ReplyInbox;
use crate::acl::Denial;
use std::collections::HashSet;
use std::sync::Arc;

/// Whose row it is: the path rules and what the table counts differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Device,
    Handler,
}

/// The filters of one session, and the path serving each.
pub struct Subscriptions {
    pub(super) kind: Kind,
    /// Its subscriptions outlive the connection: kept at the end, never
    /// served from an inbox.
    pub(super) persistent: bool,
    /// Replies the gate delivers itself (clean device sessions only).
    pub(super) inbox: Option<Arc<ReplyInbox>>,
    /// Most filters the session may hold at once. A `u32` (no cap is
    /// larger), so that it and the two flags above fit in one word: the
    /// row lives in every connection's resident state.
    cap: u32,
    /// Filters the session holds, whichever path serves them: what the cap
    /// counts. A device topic once served by the router stays counted after
    /// an unsubscribe for as long as `via_router` remembers it, so a
    /// subscribe/unsubscribe loop cannot grow that memory past the cap.
    held: HashSet<String>,
    /// Topics the gate serves to this session, not the router.
    direct: HashSet<String>,
    /// Device topics subscribed through the router in this connection (they
    /// stay there, even after an unsubscribe, so that nothing the router
    /// still has on its way arrives after newer replies from the gate), or
    /// handler filters registered with the table.
    via_router: HashSet<String>,
    /// Handler filters declared as command topics, withdrawn at the end.
    declared: HashSet<String>,
}

impl Subscriptions {
    /// The row of a session of `kind` that may hold at most `cap` filters;
    /// a clean device session's gets an inbox.
    pub(super) fn new(kind: Kind, persistent: bool, cap: usize) -> Self {
        Subscriptions {
            kind,
            persistent,
            inbox: (kind == Kind::Device && !persistent).then(|| Arc::new(ReplyInbox::default())),
            cap: u32::try_from(cap).unwrap_or(u32::MAX),
            held: HashSet::new(),
            direct: HashSet::new(),
            via_router: HashSet::new(),
            declared: HashSet::new(),
        }
    }

    /// Admits `filter` (already authorized) as held: a filter already held
    /// is a resubscription and always admitted; a new one only under the cap.
    pub(super) fn admit(&mut self, filter: &str) -> Result<(), Denial> {
        if self.held.contains(filter) {
            return Ok(());
        }
        if u32::try_from(self.held.len()).unwrap_or(u32::MAX) >= self.cap {
            return Err(Denial::QuotaExceeded);
        }
        self.held.insert(filter.to_owned());
        Ok(())
    }

    /// The session unsubscribed `filter`: it stops counting, unless the
    /// router path is still remembered for it (see `held`).
    pub(super) fn release(&mut self, filter: &str) {
        if !self.via_router.contains(filter) {
            self.held.remove(filter);
        }
    }

    /// Where the gate queues this session's replies, if it serves any.
    pub fn inbox(&self) -> Option<&Arc<ReplyInbox>> {
        self.inbox.as_ref()
    }

    /// How many filters the cap counts now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether the gate serves `topic` to this session.
    pub(super) fn is_direct(&self, topic: &str) -> bool {
        self.direct.contains(topic)
    }

    /// The gate serves `topic` to this session from now on.
    pub(super) fn add_direct(&mut self, topic: &str) {
        if !self.direct.contains(topic) {
            self.direct.insert(topic.to_owned());
        }
    }

    /// The gate stops serving `topic`; true if it did.
    pub(super) fn remove_direct(&mut self, topic: &str) -> bool {
        self.direct.remove(topic)
    }

    /// Topics the gate serves to this session.
    pub(super) fn direct(&self) -> impl Iterator<Item = &str> {
        self.direct.iter().map(String::as_str)
    }

    /// Whether `filter` went through the router in this connection.
    pub(super) fn is_via_router(&self, filter: &str) -> bool {
        self.via_router.contains(filter)
    }

    /// `filter` goes through the router; true if it is new to it.
    pub(super) fn add_via_router(&mut self, filter: &str) -> bool {
        if self.via_router.contains(filter) {
            return false;
        }
        self.via_router.insert(filter.to_owned());
        true
    }

    /// Forgets that `filter` went through the router; true if it had.
    pub(super) fn remove_via_router(&mut self, filter: &str) -> bool {
        self.via_router.remove(filter)
    }

    /// Filters that went through the router in this connection.
    pub(super) fn via_router(&self) -> impl Iterator<Item = &str> {
        self.via_router.iter().map(String::as_str)
    }

    /// A handler's `filter` is declared as a command topic; true if it is
    /// new (then, and only then, the command topics count it once more).
    pub(super) fn declare(&mut self, filter: &str) -> bool {
        if self.declared.contains(filter) {
            return false;
        }
        self.declared.insert(filter.to_owned());
        true
    }

    /// A handler's `filter` is no longer declared; true if it was.
    pub(super) fn undeclare(&mut self, filter: &str) -> bool {
        self.declared.remove(filter)
    }

    /// Whether this session is a device's or a handler's.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether its subscriptions outlive the connection.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Whether `filter` declares a command topic for this row.
    pub fn is_declared(&self, filter: &str) -> bool {
        self.declared.contains(filter)
    }

    /// The handler filters this row declared as command topics.
    pub fn declared(&self) -> impl Iterator<Item = &str> {
        self.declared.iter().map(String::as_str)
    }

    /// Hands everything over (a persistent session's connection ends, and
    /// its subscriptions stay in the router), leaving this empty.
    pub(super) fn take(&mut self) -> Subscriptions {
        use std::mem::take;
        Subscriptions {
            kind: self.kind,
            persistent: self.persistent,
            inbox: self.inbox.take(),
            cap: self.cap,
            held: take(&mut self.held),
            direct: take(&mut self.direct),
            via_router: take(&mut self.via_router),
            declared: take(&mut self.declared),
        }
    }

    /// Takes in what another connection of the same session left. Returns
    /// the router filters and declarations both held: each was counted once
    /// per connection, and is kept once here, so the caller uncounts them.
    pub(super) fn absorb(&mut self, other: Subscriptions) -> Doubled {
        let mut doubled = Doubled::default();
        self.held.extend(other.held);
        self.direct.extend(other.direct);
        for filter in other.via_router {
            if self.via_router.contains(&filter) {
                doubled.via_router.push(filter);
            } else {
                self.via_router.insert(filter);
            }
        }
        for filter in other.declared {
            if self.declared.contains(&filter) {
                doubled.declared.push(filter);
            } else {
                self.declared.insert(filter);
            }
        }
        doubled
    }
}

/// Filters two connections of one session both counted (see `absorb`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Doubled {
    pub(super) via_router: Vec<String>,
    pub(super) declared: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_distinct_held_filters() {
        let mut subs = Subscriptions::new(Kind::Device, false, 2);
        assert_eq!(subs.admit("1_a"), Ok(()));
        assert_eq!(subs.admit("1_a"), Ok(()), "a resubscription is free");
        assert_eq!(subs.admit("1_b"), Ok(()));
        assert_eq!(subs.admit("1_c"), Err(Denial::QuotaExceeded));
        assert_eq!(subs.admit("1_a"), Ok(()), "held filters stay admitted");
        subs.release("1_a");
        assert_eq!(subs.held(), 1);
        assert_eq!(subs.admit("1_c"), Ok(()));
        subs.release("never-held");
        assert_eq!(subs.held(), 2);
    }

    #[test]
    fn router_topics_stay_counted_after_unsubscribe() {
        let mut subs = Subscriptions::new(Kind::Device, false, 2);
        assert_eq!(subs.admit("1_q1"), Ok(()));
        assert!(subs.add_via_router("1_q1"));
        assert!(!subs.add_via_router("1_q1"));
        subs.release("1_q1");
        assert_eq!(subs.held(), 1, "the router path is still remembered");
        assert!(subs.is_via_router("1_q1"));
        // A handler's unsubscribe forgets the path first, then releases.
        assert!(subs.remove_via_router("1_q1"));
        subs.release("1_q1");
        assert_eq!(subs.held(), 0);
        assert!(!subs.remove_via_router("1_q1"));
    }

    #[test]
    fn paths_and_declarations_are_sets() {
        let mut subs = Subscriptions::new(Kind::Device, false, 10);
        subs.add_direct("1_x");
        subs.add_direct("1_x");
        assert!(subs.is_direct("1_x"));
        assert_eq!(subs.direct().count(), 1);
        assert!(subs.remove_direct("1_x"));
        assert!(!subs.remove_direct("1_x"));
        assert!(!subs.is_direct("1_x"));

        assert!(subs.declare("sync"));
        assert!(
            !subs.declare("sync"),
            "declared once however often subscribed"
        );
        assert_eq!(subs.declared().collect::<Vec<_>>(), vec!["sync"]);
        assert!(subs.undeclare("sync"));
        assert!(!subs.undeclare("sync"));
        assert_eq!(subs.via_router().count(), 0);
    }

    #[test]
    fn a_persistent_session_hands_its_filters_over() {
        let mut first = Subscriptions::new(Kind::Device, false, 3);
        assert_eq!(first.admit("1_a"), Ok(()));
        first.add_via_router("1_a");
        first.declare("jobs");
        let kept = first.take();
        assert_eq!(first.held(), 0);
        assert_eq!(first.via_router().count(), 0);

        let mut second = Subscriptions::new(Kind::Device, false, 3);
        assert_eq!(second.admit("1_b"), Ok(()));
        second.add_via_router("1_b");
        second.add_via_router("1_a");
        let doubled = second.absorb(kept);
        assert_eq!(
            doubled,
            Doubled {
                via_router: vec!["1_a".to_owned()],
                declared: Vec::new(),
            }
        );
        assert_eq!(second.held(), 2);
        assert!(second.is_via_router("1_a") && second.is_via_router("1_b"));
        assert_eq!(second.declared().collect::<Vec<_>>(), vec!["jobs"]);
        assert_eq!(second.admit("1_c"), Ok(()));
        assert_eq!(second.admit("1_d"), Err(Denial::QuotaExceeded));
    }

    #[test]
    fn many_filters_stay_cheap() {
        // 30,000 filters, each admitted and looked up: O(1) each, so this
        // finishes at once (a list would need ~450 million comparisons).
        let mut subs = Subscriptions::new(Kind::Device, false, 100_000);
        for i in 0..30_000 {
            let topic = format!("1_t{i}");
            assert_eq!(subs.admit(&topic), Ok(()));
            subs.add_direct(&topic);
            assert!(subs.is_direct(&topic));
        }
        assert_eq!(subs.held(), 30_000);
    }
}
