//! Owns the queue of acknowledgements owed in order ([`Owed`]) once a
//! delivery owes one later (see `inbound`'s doc): the router's PUBACKs and
//! PUBRECs that answer an entry, the delivery outcomes waited for and
//! their deadlines, and each entry let go in turn ([`InboundFlows::pop_owed`]).

use super::{AckKind, Answer, Due, InboundFlows, RouterAck, Version};
use crate::delivery::ack::{Outcome, Pending};
use crate::router::protocol::PubRecReason;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// One QoS 1 or QoS 2 acknowledgement owed to the client, in the order of
/// the publishes.
#[derive(Debug)]
pub(super) struct Owed {
    pub(super) pkid: u16,
    pub(super) kind: AckKind,
    /// Waits for the router's PUBACK (PUBREC), which names the packet id
    /// of one due before the queue began.
    pub(super) router: bool,
    /// Waits for the delivery's outcome.
    pub(super) delivery: Option<Pending>,
    pub(super) answer: Answer,
}

impl Owed {
    pub(super) fn ready(&self) -> bool {
        !self.router && self.delivery.is_none()
    }

    pub(super) fn settle(&mut self, outcome: Outcome) {
        self.delivery = None;
        if outcome != Outcome::Stored {
            self.answer = Answer::NotStored(outcome);
        }
    }
}

impl InboundFlows {
    /// A PUBACK from the router: sent now (as the denial of a refused
    /// publish sent through the router, if it was one), or it answered the
    /// first owed acknowledgement waiting for the router.
    pub fn router_puback(&mut self, pkid: u16) -> RouterAck {
        self.router_acks_pending = self.router_acks_pending.saturating_sub(1);
        let Some(ids) = self.ids.as_mut() else {
            return RouterAck::Now(None);
        };
        let denial = ids.denied_qos1.remove(&pkid);
        // The router answers in the order it was sent publishes.
        let Some(owed) = ids
            .owed
            .iter_mut()
            .find(|owed| owed.router && owed.kind == AckKind::PubAck)
        else {
            self.release_ids_if_idle();
            return RouterAck::Now(denial);
        };
        owed.router = false;
        owed.pkid = pkid;
        if let Some(denial) = denial {
            owed.answer = Answer::Denied(denial);
        }
        RouterAck::Owed
    }

    /// A PUBREC from the router: sent now, or it answered the first owed
    /// PUBREC waiting for the router.
    pub fn router_pubrec(&mut self, pkid: u16, reason: PubRecReason) -> RouterAck {
        self.router_recs_pending = self.router_recs_pending.saturating_sub(1);
        let Some(owed) = self.ids.as_mut().and_then(|ids| {
            ids.owed
                .iter_mut()
                .find(|owed| owed.router && owed.kind == AckKind::PubRec)
        }) else {
            return RouterAck::Now(None);
        };
        owed.router = false;
        owed.pkid = pkid;
        if reason != PubRecReason::Success && owed.answer == Answer::Success {
            owed.answer = Answer::Router(reason);
        }
        RouterAck::Owed
    }

    /// A PUBCOMP from the router: `false` when it answers a PUBREL the gate
    /// sent (`Due::release_in_router`), which the client must not see.
    pub fn router_pubcomp(&mut self, pkid: u16) -> bool {
        let Some(ids) = self.ids.as_mut() else {
            return true;
        };
        let Some(at) = ids.released_in_router.iter().position(|&id| id == pkid) else {
            return true;
        };
        // The router answers in order: the first with this id is the one.
        ids.released_in_router.remove(at);
        self.release_ids_if_idle();
        false
    }

    /// Waits for the first delivery outcome still missing (the only one
    /// that can let an acknowledgement go): `Ready` once it came (then
    /// [`InboundFlows::collect_owed`] and [`InboundFlows::pop_owed`]).
    pub fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(ids) = self.ids.as_mut() else {
            return Poll::Pending;
        };
        let Some(owed) = ids.owed.iter_mut().find(|owed| owed.delivery.is_some()) else {
            return Poll::Pending;
        };
        let Some(pending) = owed.delivery.as_mut() else {
            return Poll::Pending;
        };
        let outcome = std::task::ready!(pending.poll_outcome(cx));
        owed.settle(outcome);
        Poll::Ready(())
    }

    /// Takes every delivery outcome already settled, and answers as failed
    /// those past their deadline at `now` (the session never waits forever).
    pub fn collect_owed(&mut self, now: Option<Instant>) {
        let Some(ids) = self.ids.as_mut() else {
            return;
        };
        for owed in ids.owed.iter_mut() {
            let Some(pending) = owed.delivery.as_mut() else {
                continue;
            };
            if let Some(outcome) = pending.try_outcome() {
                owed.settle(outcome);
            } else if now.is_some_and(|now| now >= pending.deadline()) {
                owed.settle(Outcome::Failed);
            }
        }
    }

    /// The next owed acknowledgement that can be answered now, in order.
    /// A QoS 2 publish not stored is forgotten (its packet id is free: the
    /// client may send it again, and it is stored again).
    pub fn pop_owed(&mut self) -> Option<Due> {
        let ids = self.ids.as_mut()?;
        if !ids.owed.front()?.ready() {
            return None;
        }
        let owed = ids.owed.pop_front()?;
        let mut release_in_router = false;
        if let (AckKind::PubRec, Answer::NotStored(_)) = (owed.kind, owed.answer) {
            ids.qos2_here.remove(&owed.pkid);
            // MQTT 3.1.1 ends the connection instead: the router keeps it,
            // and acknowledges the client's retransmission without
            // delivering it again.
            if ids.awaiting_release.remove(&owed.pkid) && self.version == Version::V5 {
                ids.released_in_router.push(owed.pkid);
                release_in_router = true;
            }
        }
        self.release_ids_if_idle();
        Some(Due {
            pkid: owed.pkid,
            kind: owed.kind,
            answer: owed.answer,
            release_in_router,
        })
    }

    /// The earliest deadline of a delivery outcome still missing.
    pub fn owed_deadline(&self) -> Option<Instant> {
        self.ids
            .as_ref()?
            .owed
            .iter()
            .filter_map(|owed| owed.delivery.as_ref())
            .map(Pending::deadline)
            .min()
    }
}
