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
//! appended to Redis: `delivery::ack`), every QoS 1 and QoS 2
//! acknowledgement (PUBACK, PUBREC: MQTT-4.6.0-2/3) joins one queue in the
//! order of the publishes ([`Owed`]), each answered when it is first and
//! nothing it waits for (the router's PUBACK or PUBREC, the delivery's
//! outcome) is missing; the queue is let go once empty.
//!
//! QoS 2 exactly once (MQTT-4.3.3) has one owner per path: the router for
//! every QoS 2 publish it gets (it holds it by packet id until the PUBREL,
//! answers PUBCOMP, `0x92` for an id it does not hold); the gate for those
//! it does not hand the router: refused ones, and those a delivery stores
//! elsewhere that nobody in the router wants (a command appended to
//! Redis). Either way the gate remembers the packet id until the PUBREL,
//! so a retransmission is answered PUBREC again and routed (stored) once.

use crate::acl::Denial;
use crate::codec::Version;
use crate::delivery::ack::{Outcome, Pending};
use crate::router::protocol::{PubCompReason, PubRecReason, QoS};
use std::collections::{HashMap, HashSet, VecDeque};

#[path = "inbound_owed.rs"]
mod owed;
use owed::Owed;

/// What to do with a PUBLISH before anything else looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A new publish (or QoS 0): decide it.
    New,
    /// A retransmission of a QoS 2 publish already acknowledged (PUBREC)
    /// and not yet released: answer PUBREC again, deliver nothing (MQTT 5
    /// 4.3.3).
    Retransmitted,
    /// A retransmission of a QoS 2 publish whose PUBREC is still owed (its
    /// store has not answered): nothing now, its PUBREC comes in turn.
    AwaitingStore,
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
    /// Nothing now: its PUBACK (PUBREC) waits its turn among those owed
    /// (the delivery answers it later, or one before it is still due).
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
    /// Nothing now: the denial waits its turn among the acknowledgements
    /// owed.
    Owed,
}

/// What a PUBACK (or PUBREC) from the router becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterAck {
    /// Sent to the client now: the router's own, or (`Some`) the denial of a
    /// refused publish sent through the router.
    Now(Option<Denial>),
    /// It answered an acknowledgement owed in order: see [`InboundFlows::pop_owed`].
    Owed,
}

/// What the client's PUBACK (PUBREC) for an owed acknowledgement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Success,
    /// The router's PUBREC said this (not `Success`: `0x10`, say).
    Router(PubRecReason),
    Denied(Denial),
    /// The delivery did not store it (or did not say so by its deadline).
    NotStored(Outcome),
}

/// Which acknowledgement is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// QoS 1.
    PubAck,
    /// QoS 2.
    PubRec,
}

/// An owed acknowledgement whose turn came ([`InboundFlows::pop_owed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub pkid: u16,
    pub kind: AckKind,
    pub answer: Answer,
    /// A QoS 2 publish the router holds was not stored, and the client is
    /// told (MQTT 5 PUBREC `0x80`): the gate sends the router its PUBREL
    /// (the client will not), and drops the router's PUBCOMP.
    pub release_in_router: bool,
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
    /// Completed by the gate: refused publishes of MQTT 3.1.1 clients, and
    /// publishes a delivery stored that the router never had.
    here: HashSet<u16>,
}

impl HeldQos2 {
    pub fn is_empty(&self) -> bool {
        self.in_router.is_empty() && self.here.is_empty()
    }

    /// How many publishes it holds.
    pub fn len(&self) -> usize {
        self.in_router.len() + self.here.len()
    }

    /// Adds what `other` holds: two connections of one session both left
    /// state (a takeover that did not wait for its predecessor); the
    /// router may hold either's.
    pub fn absorb(&mut self, other: HeldQos2) {
        self.in_router.extend(other.in_router);
        self.here.extend(other.here);
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
    /// QoS 2 publishes handed to the router whose PUBREC has not come back
    /// (they come first when a queue of owed acknowledgements begins).
    router_recs_pending: u16,
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
    /// QoS 2 publishes the gate completes (PUBREL answered here):
    /// refused ones of MQTT 3.1.1 clients (which cannot be told with a
    /// reason code, so they send PUBREL), and those a delivery stores that
    /// the router never gets.
    qos2_here: HashSet<u16>,
    /// QoS 2 publishes the router holds until their PUBREL.
    awaiting_release: HashSet<u16>,
    /// QoS 1/2 acknowledgements owed in order while a delivery owes one.
    owed: VecDeque<Owed>,
    /// Packet ids the gate released in the router (a QoS 2 publish not
    /// stored, refused to the client): the router's PUBCOMP is dropped.
    /// Rare and short-lived (until the router answers): a list, which
    /// costs nothing to make with the others on every QoS 2 flow.
    released_in_router: Vec<u16>,
}

impl FlowIds {
    fn is_empty(&self) -> bool {
        self.denied_qos1.is_empty()
            && self.qos2_here.is_empty()
            && self.awaiting_release.is_empty()
            && self.owed.is_empty()
            && self.released_in_router.is_empty()
    }

    /// Whether the PUBREC of QoS 2 publish `pkid` is still owed.
    fn pubrec_owed(&self, pkid: u16) -> bool {
        self.owed
            .iter()
            .any(|owed| owed.kind == AckKind::PubRec && owed.pkid == pkid)
    }
}

impl InboundFlows {
    pub fn new(version: Version, receive_maximum: u16) -> Self {
        InboundFlows {
            version,
            receive_maximum: usize::from(receive_maximum),
            router_acks_pending: 0,
            router_recs_pending: 0,
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
                qos2_here: held.here,
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
    /// and PUBRECs due now, which come first.
    fn owed_mut(&mut self) -> &mut VecDeque<Owed> {
        let acks = self.router_acks_pending;
        let recs = usize::from(self.router_recs_pending);
        let owed = &mut self.ids_mut().owed;
        if owed.is_empty() {
            let due = |kind| Owed {
                pkid: 0,
                kind,
                router: true,
                delivery: None,
                answer: Answer::Success,
            };
            owed.extend((0..acks).map(|_| due(AckKind::PubAck)));
            owed.extend((0..recs).map(|_| due(AckKind::PubRec)));
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
    /// sends them again, as new flows). One whose PUBREC was still owed
    /// and not known stored is not kept: the client sends it again, and it
    /// is stored again (the router, if it holds it, acknowledges it
    /// without delivering it again).
    pub fn take_held(&mut self) -> HeldQos2 {
        self.collect_owed(None);
        let Some(mut ids) = self.ids.take() else {
            return HeldQos2::default();
        };
        for owed in &ids.owed {
            let stored = owed.delivery.is_none()
                && !owed.router
                && matches!(owed.answer, Answer::Success | Answer::Router(_));
            if owed.kind == AckKind::PubRec && !stored {
                ids.awaiting_release.remove(&owed.pkid);
                ids.qos2_here.remove(&owed.pkid);
            }
        }
        HeldQos2 {
            in_router: ids.awaiting_release,
            here: ids.qos2_here,
        }
    }

    /// QoS 1/2 publishes not yet acknowledged or released: what the
    /// Receive Maximum bounds (and with it, every map here).
    pub fn unacknowledged(&self) -> usize {
        // An owed PUBACK waiting for the router is counted there; an owed
        // PUBREC by its packet id, held by the router or the gate (a
        // refusal's, MQTT 5, by itself).
        let held = self.ids.as_ref().map_or(0, |ids| {
            ids.awaiting_release.len()
                + ids.qos2_here.len()
                + ids
                    .owed
                    .iter()
                    .filter(|owed| {
                        !owed.router
                            && (owed.kind == AckKind::PubAck
                                || !(ids.awaiting_release.contains(&owed.pkid)
                                    || ids.qos2_here.contains(&owed.pkid)))
                    })
                    .count()
        });
        self.router_acks_pending + held
    }

    /// A PUBLISH arrived.
    pub fn arrival(&self, qos: QoS, pkid: u16) -> Arrival {
        match qos {
            QoS::AtMostOnce => Arrival::New,
            QoS::ExactlyOnce => match self.ids.as_deref() {
                Some(ids)
                    if ids.awaiting_release.contains(&pkid) || ids.qos2_here.contains(&pkid) =>
                {
                    if ids.pubrec_owed(pkid) {
                        Arrival::AwaitingStore
                    } else {
                        Arrival::Retransmitted
                    }
                }
                _ if self.unacknowledged() >= self.receive_maximum => Arrival::OverReceiveMaximum,
                _ => Arrival::New,
            },
            _ if self.unacknowledged() >= self.receive_maximum => Arrival::OverReceiveMaximum,
            _ => Arrival::New,
        }
    }

    /// An allowed publish; `needs_router` when someone in the router may
    /// want it or it is retained; `later` when the delivery acknowledges it
    /// later (QoS 0 owes nothing: a `later` for it is let go). A QoS 2
    /// publish goes to the router (which owns its exactly once) unless a
    /// delivery stores it and nobody in the router wants it: then the gate
    /// owns it.
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
                    kind: AckKind::PubAck,
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
            QoS::ExactlyOnce if later.is_none() && !self.owing() => {
                self.ids_mut().awaiting_release.insert(pkid);
                self.router_recs_pending = self.router_recs_pending.saturating_add(1);
                Allowed::ToRouter
            }
            QoS::ExactlyOnce => {
                let to_router = needs_router || later.is_none();
                self.owed_mut().push_back(Owed {
                    pkid,
                    kind: AckKind::PubRec,
                    router: to_router,
                    delivery: later,
                    answer: Answer::Success,
                });
                if to_router {
                    self.ids_mut().awaiting_release.insert(pkid);
                    self.router_recs_pending = self.router_recs_pending.saturating_add(1);
                    Allowed::ToRouter
                } else {
                    self.ids_mut().qos2_here.insert(pkid);
                    Allowed::Owed
                }
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
                    kind: AckKind::PubAck,
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
                    self.ids_mut().qos2_here.insert(pkid);
                }
                if !self.owing() {
                    return Refused::PubRecHere;
                }
                self.owed_mut().push_back(Owed {
                    pkid,
                    kind: AckKind::PubRec,
                    router: false,
                    delivery: None,
                    answer: Answer::Denied(denial),
                });
                Refused::Owed
            }
        }
    }

    /// A PUBREL from the client. The router owns what it holds, a resumed
    /// session's included, and answers a PUBREL for nothing with 0x92
    /// (MQTT 5 4.3.3); only the gate's own (refused, or stored by a
    /// delivery without the router) are completed here.
    pub fn release(&mut self, pkid: u16) -> Release {
        let Some(ids) = self.ids.as_mut() else {
            return Release::ToRouter;
        };
        if ids.pubrec_owed(pkid) {
            // Released before its PUBREC (the client may not): nothing
            // was received under that id yet, as far as it may know.
            return Release::CompleteHere(PubCompReason::PacketIdentifierNotFound);
        }
        let release = if ids.qos2_here.remove(&pkid) {
            Release::CompleteHere(PubCompReason::Success)
        } else {
            ids.awaiting_release.remove(&pkid);
            Release::ToRouter
        };
        self.release_ids_if_idle();
        release
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
