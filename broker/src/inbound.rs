//! Owns the protocol state of a client's QoS 1/2 publishes, as pure code (no
//! I/O): which packet ids are in flight, who acknowledges each publish (the
//! gate, the router, or the delivery later) so that PUBACKs keep the order
//! of the publishes, QoS 2 exactly once by packet id, the Receive Maximum,
//! and the packet ids of wills. The session loop (`connection`) asks it what
//! to do and does it.
//!
//! PUBACK order (MQTT-4.6.0-2): while only the gate and the router answer,
//! the gate answers none itself while the router owes one (it sends those
//! through the router instead). Once a delivery owes one later (a command
//! appended to Redis: `delivery::ack`), every QoS 1 acknowledgement joins
//! one queue in the order of the publishes ([`Owed`]), each answered when
//! it is first and nothing it waits for (the router's PUBACK, the
//! delivery's outcome) is missing; the queue is let go once empty.

use crate::acl::Denial;
use crate::codec::Version;
use crate::delivery::ack::{Outcome, Pending};
use crate::router::protocol::{PubCompReason, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll};
use tokio::time::Instant;

/// What to do with a PUBLISH before anything else looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A new publish (or QoS 0): decide it.
    New,
    /// A retransmission of a QoS 2 publish the router holds: answer PUBREC
    /// again, deliver nothing (MQTT 5 4.3.3).
    Retransmitted,
    /// One more unacknowledged QoS 1/2 publish than the Receive Maximum:
    /// end the session (MQTT 5 DISCONNECT 0x93).
    OverReceiveMaximum,
}

/// Who answers an allowed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Nothing to answer, nothing to forward (QoS 0 nobody in the router wants).
    Done,
    /// The gate answers PUBACK now (QoS 1 nobody in the router wants, and no
    /// earlier PUBACK is due from the router).
    AckHere,
    /// The router gets it and answers (PUBACK, PUBREC) in order.
    ToRouter,
    /// Nothing now: its PUBACK waits its turn among those owed (the
    /// delivery answers it later, or one before it is still due).
    Owed,
}

/// How a refused publish is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// QoS 0: nothing to answer.
    Silent,
    /// PUBACK with the denial now.
    PubAckHere,
    /// Through the router to a sink topic: its PUBACK, which keeps the order
    /// of earlier PUBACKs, is rewritten to the denial (`router_puback`).
    PubAckThroughRouter,
    /// PUBREC with the denial now.
    PubRecHere,
    /// Nothing now: the denial waits its turn among the PUBACKs owed.
    Owed,
}

/// What a PUBACK from the router becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterAck {
    /// Sent to the client now: the router's own, or (`Some`) the denial of a
    /// refused publish sent through the router.
    Now(Option<Denial>),
    /// It answered an acknowledgement owed in order: see [`InboundFlows::pop_owed`].
    Owed,
}

/// What the client's PUBACK for an owed acknowledgement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Success,
    Denied(Denial),
    /// The delivery did not store it (or did not say so by its deadline).
    NotStored(Outcome),
}

/// One QoS 1 acknowledgement owed to the client, in the order of the
/// publishes.
#[derive(Debug)]
struct Owed {
    pkid: u16,
    /// Waits for the router's PUBACK (which names the packet id of one due
    /// before the queue began).
    router: bool,
    /// Waits for the delivery's outcome.
    delivery: Option<Pending>,
    answer: Answer,
}

impl Owed {
    fn ready(&self) -> bool {
        !self.router && self.delivery.is_none()
    }

    fn settle(&mut self, outcome: Outcome) {
        self.delivery = None;
        if outcome != Outcome::Stored {
            self.answer = Answer::NotStored(outcome);
        }
    }
}

/// How a PUBREL is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The router releases the publish and answers PUBCOMP.
    ToRouter,
    /// The gate answers PUBCOMP with this reason.
    CompleteHere(PubCompReason),
}

/// The unreleased QoS 2 publishes of a persistent session whose connection
/// ended: the router keeps those it holds with the session (vendor patch
/// 21) and the PUBRELs of the next connection release them, so they stay
/// counted against the Receive Maximum (MQTT 5 4.9: the quota is the
/// session's). Kept by `sessions` between connections.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeldQos2 {
    /// Held by the router until their PUBREL.
    in_router: HashSet<u16>,
    /// Refused publishes of MQTT 3.1.1 clients, completed by the gate.
    refused: HashSet<u16>,
}

impl HeldQos2 {
    pub fn is_empty(&self) -> bool {
        self.in_router.is_empty() && self.refused.is_empty()
    }

    /// How many publishes it holds.
    pub fn len(&self) -> usize {
        self.in_router.len() + self.refused.len()
    }

    /// Adds what `other` holds: two connections of one session both left
    /// state (a takeover that did not wait for its predecessor); the
    /// router may hold either's.
    pub fn absorb(&mut self, other: HeldQos2) {
        self.in_router.extend(other.in_router);
        self.refused.extend(other.refused);
    }
}

/// The QoS 1/2 publishes of one connection (and the QoS 2 ones its session
/// held before it, `HeldQos2`).
#[derive(Debug)]
pub struct InboundFlows {
    version: Version,
    receive_maximum: usize,
    /// QoS 1 publishes handed to the router whose PUBACK has not come back:
    /// while there are any, the gate acknowledges none itself.
    router_acks_pending: usize,
    /// Packet ids of the flows that need one: allocated with the first,
    /// let go with the last (most sessions publish QoS 0 or nothing the
    /// router acknowledges out of turn, and this is resident per connection).
    ids: Option<Box<FlowIds>>,
    next_will_pkid: u16,
}

/// The packet ids [`InboundFlows`] keeps while such flows are open.
#[derive(Debug, Default)]
struct FlowIds {
    /// Refused QoS 1 publishes sent through the router: their PUBACK becomes
    /// the denial.
    denied_qos1: HashMap<u16, Denial>,
    /// Refused QoS 2 publishes of MQTT 3.1.1 clients (which cannot be told
    /// with a reason code, so they send PUBREL): answered here.
    denied_qos2: HashSet<u16>,
    /// QoS 2 publishes the router holds until their PUBREL.
    awaiting_release: HashSet<u16>,
    /// QoS 1 acknowledgements owed in order while a delivery owes one.
    owed: VecDeque<Owed>,
}

impl FlowIds {
    fn is_empty(&self) -> bool {
        self.denied_qos1.is_empty()
            && self.denied_qos2.is_empty()
            && self.awaiting_release.is_empty()
            && self.owed.is_empty()
    }
}

impl InboundFlows {
    pub fn new(version: Version, receive_maximum: u16) -> Self {
        InboundFlows {
            version,
            receive_maximum: usize::from(receive_maximum),
            router_acks_pending: 0,
            ids: None,
            next_will_pkid: 1,
        }
    }

    /// A connection resuming a persistent session that left `held`: its
    /// retransmissions get PUBREC again, its PUBRELs release them, and they
    /// count against the Receive Maximum until then.
    pub fn resumed(version: Version, receive_maximum: u16, held: HeldQos2) -> Self {
        let mut flows = InboundFlows::new(version, receive_maximum);
        if !held.is_empty() {
            flows.ids = Some(Box::new(FlowIds {
                awaiting_release: held.in_router,
                denied_qos2: held.refused,
                ..FlowIds::default()
            }));
        }
        flows
    }

    /// The ids, allocated if they were not.
    fn ids_mut(&mut self) -> &mut FlowIds {
        self.ids.get_or_insert_with(Default::default)
    }

    /// Lets the ids go once no flow needs them.
    fn release_ids_if_idle(&mut self) {
        if self.ids.as_ref().is_some_and(|ids| ids.is_empty()) {
            self.ids = None;
        }
    }

    /// Whether acknowledgements are owed in order (see the module's doc).
    fn owing(&self) -> bool {
        self.ids.as_ref().is_some_and(|ids| !ids.owed.is_empty())
    }

    /// The queue of owed acknowledgements; begun with the router's PUBACKs
    /// due now, which come first.
    fn owed_mut(&mut self) -> &mut VecDeque<Owed> {
        let due = self.router_acks_pending;
        let owed = &mut self.ids_mut().owed;
        if owed.is_empty() {
            owed.extend((0..due).map(|_| Owed {
                pkid: 0,
                router: true,
                delivery: None,
                answer: Answer::Success,
            }));
        }
        owed
    }

    fn awaiting_release(&self, pkid: u16) -> bool {
        self.ids
            .as_ref()
            .is_some_and(|ids| ids.awaiting_release.contains(&pkid))
    }

    /// The unreleased QoS 2 publishes, for the session to keep when its
    /// connection ends (QoS 1 flows end with the connection: the client
    /// sends them again, as new flows).
    pub fn take_held(&mut self) -> HeldQos2 {
        match self.ids.take() {
            Some(ids) => HeldQos2 {
                in_router: ids.awaiting_release,
                refused: ids.denied_qos2,
            },
            None => HeldQos2::default(),
        }
    }

    /// QoS 1/2 publishes not yet acknowledged or released: what the
    /// Receive Maximum bounds (and with it, every map here).
    pub fn unacknowledged(&self) -> usize {
        // An owed acknowledgement waiting for the router is counted there.
        let held = self.ids.as_ref().map_or(0, |ids| {
            ids.awaiting_release.len()
                + ids.denied_qos2.len()
                + ids.owed.iter().filter(|owed| !owed.router).count()
        });
        self.router_acks_pending + held
    }

    /// A PUBLISH arrived.
    pub fn arrival(&self, qos: QoS, pkid: u16) -> Arrival {
        match qos {
            QoS::AtMostOnce => Arrival::New,
            QoS::ExactlyOnce if self.awaiting_release(pkid) => Arrival::Retransmitted,
            _ if self.unacknowledged() >= self.receive_maximum => Arrival::OverReceiveMaximum,
            _ => Arrival::New,
        }
    }

    /// An allowed publish; `needs_router` when the router must see it
    /// (someone there wants it, it is retained, or it is QoS 2); `later`
    /// when the delivery acknowledges it later (QoS 1 only: QoS 0 owes
    /// nothing, and QoS 2 is acknowledged by the router's PUBREC, so a
    /// `later` for them is let go).
    pub fn allowed(
        &mut self,
        qos: QoS,
        pkid: u16,
        needs_router: bool,
        later: Option<Pending>,
    ) -> Allowed {
        match qos {
            QoS::AtMostOnce if !needs_router => Allowed::Done,
            QoS::AtMostOnce => Allowed::ToRouter,
            QoS::AtLeastOnce if later.is_some() || self.owing() => {
                self.owed_mut().push_back(Owed {
                    pkid,
                    router: needs_router,
                    delivery: later,
                    answer: Answer::Success,
                });
                if needs_router {
                    self.router_acks_pending += 1;
                    Allowed::ToRouter
                } else {
                    Allowed::Owed
                }
            }
            // PUBACKs keep the order of the publishes (MQTT 4.6).
            QoS::AtLeastOnce if !needs_router && self.router_acks_pending == 0 => Allowed::AckHere,
            QoS::AtLeastOnce => {
                self.router_acks_pending += 1;
                Allowed::ToRouter
            }
            QoS::ExactlyOnce => {
                self.ids_mut().awaiting_release.insert(pkid);
                Allowed::ToRouter
            }
        }
    }

    /// A refused publish.
    pub fn refused(&mut self, qos: QoS, pkid: u16, denial: Denial) -> Refused {
        match qos {
            QoS::AtMostOnce => Refused::Silent,
            QoS::AtLeastOnce if self.owing() => {
                self.owed_mut().push_back(Owed {
                    pkid,
                    router: false,
                    delivery: None,
                    answer: Answer::Denied(denial),
                });
                Refused::Owed
            }
            QoS::AtLeastOnce if self.router_acks_pending == 0 => Refused::PubAckHere,
            QoS::AtLeastOnce => {
                self.ids_mut().denied_qos1.insert(pkid, denial);
                self.router_acks_pending += 1;
                Refused::PubAckThroughRouter
            }
            QoS::ExactlyOnce => {
                // MQTT 5: a PUBREC reason >= 0x80 ends the exchange.
                if self.version == Version::V4 {
                    self.ids_mut().denied_qos2.insert(pkid);
                }
                Refused::PubRecHere
            }
        }
    }

    /// A PUBREL from the client. The router owns what it holds, a resumed
    /// session's included, and answers a PUBREL for nothing with 0x92
    /// (MQTT 5 4.3.3); only the gate's own refusals are completed here.
    pub fn release(&mut self, pkid: u16) -> Release {
        let Some(ids) = self.ids.as_mut() else {
            return Release::ToRouter;
        };
        let release = if ids.denied_qos2.remove(&pkid) {
            Release::CompleteHere(PubCompReason::Success)
        } else {
            ids.awaiting_release.remove(&pkid);
            Release::ToRouter
        };
        self.release_ids_if_idle();
        release
    }

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
        let Some(owed) = ids.owed.iter_mut().find(|owed| owed.router) else {
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
    pub fn pop_owed(&mut self) -> Option<(u16, Answer)> {
        let ids = self.ids.as_mut()?;
        if !ids.owed.front()?.ready() {
            return None;
        }
        let owed = ids.owed.pop_front()?;
        self.release_ids_if_idle();
        Some((owed.pkid, owed.answer))
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

    /// A packet id for a QoS 1/2 will that no QoS 2 publish of this client
    /// holds in the router.
    pub fn will_pkid(&mut self) -> u16 {
        // At most Receive Maximum ids are held, so this ends.
        while self.awaiting_release(self.next_will_pkid) {
            self.next_will_pkid = self.next_will_pkid.wrapping_add(1).max(1);
        }
        let pkid = self.next_will_pkid;
        self.next_will_pkid = self.next_will_pkid.wrapping_add(1).max(1);
        pkid
    }
}

#[cfg(test)]
#[path = "inbound_tests.rs"]
mod tests;
