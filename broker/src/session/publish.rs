//! Owns what happens to a PUBLISH in a session: one from the client
//! ([`SessionState::client_publish`], the whole decision in one function),
//! one the router forwards to the client, and the acknowledgements that
//! close their flows.

use super::state::{Actions, End, SessionState};
use super::tags;
use crate::acl::{self, Denial};
use crate::answers::{self, ServerDisconnect};
use crate::delivery::ack::Outcome;
use crate::identity;
use crate::inbound::{AckKind, Allowed, Answer, Arrival, Refused, RouterAck};
use crate::property_caps;
use crate::router::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel,
    PubRelReason, Publish, PublishProperties, QoS,
};
use bytes::Bytes;
use std::collections::HashSet;
use tracing::info;

/// Where a refused QoS 1 publish goes so that the router acknowledges it in
/// order: a `$` topic no client may subscribe to, which the router drops.
pub const DENIED_SINK_TOPIC: &[u8] = b"$gate/denied";

/// QoS 2 forwards too large for the client, settled with the router as if
/// delivered: their PUBREL is answered by the gate. Bounded by the router's
/// in-flight window; allocated only when one happens.
// Boxed on purpose: an empty set is 48 bytes inline in every connection's
// resident state; the box is 8, allocated only while one waits.
#[allow(clippy::box_collection)]
#[derive(Default)]
pub struct UndeliverableQos2(Option<Box<HashSet<u16>>>);

impl UndeliverableQos2 {
    fn insert(&mut self, pkid: u16) {
        self.0.get_or_insert_with(Default::default).insert(pkid);
    }

    /// The PUBCOMP for the router if `pkid` was one of them.
    pub fn release(&mut self, pkid: u16) -> Option<Packet> {
        let set = self.0.as_mut()?;
        if !set.remove(&pkid) {
            return None;
        }
        if set.is_empty() {
            self.0 = None;
        }
        let comp = PubComp {
            pkid,
            reason: PubCompReason::Success,
        };
        Some(Packet::PubComp(comp, None))
    }
}

impl SessionState {
    /// Decides one PUBLISH from the client, in this order: the protocol
    /// rules on its properties, its QoS flow (retransmission, Receive
    /// Maximum), the ACL and the caps (a refusal is answered per QoS and
    /// version), the identity stamp, then the path: the gate's own
    /// subscribers get it at once, and the router gets it when it has
    /// someone for it, must keep it, or must acknowledge it (PUBACKs stay
    /// in the order of the publishes). `Some` ends the session.
    pub(super) fn client_publish(
        &mut self,
        mut publish: Publish,
        properties: Option<PublishProperties>,
        out: &mut impl Actions,
    ) -> Option<End> {
        if properties
            .as_ref()
            .is_some_and(|p| !p.subscription_identifiers.is_empty())
        {
            // MQTT 5 3.3.4-6: only a server sets them, per subscription.
            info!("subscription identifier on a client's publish");
            return Some(End::Server(ServerDisconnect::ProtocolError));
        }
        if properties.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
            // CONNACK advertises no Topic Alias Maximum (0): any alias is a
            // protocol error (MQTT 5 3.3.2.3.4), and an empty topic with an
            // alias never set must not be read as a topic.
            info!("topic alias from a client (none allowed)");
            return Some(End::Server(ServerDisconnect::ProtocolError));
        }
        let pkid = publish.pkid();
        match self.flows.arrival(publish.qos(), pkid) {
            Arrival::New => {}
            Arrival::Retransmitted => {
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                out.to_client(Packet::PubRec(rec, None));
                return None;
            }
            // Its PUBREC comes once it is stored; nothing is stored twice.
            Arrival::AwaitingStore => return None,
            Arrival::OverReceiveMaximum => {
                info!(
                    receive_maximum = self.gate.limits().receive_maximum,
                    "more unacknowledged QoS 1/2 publishes than the broker's Receive Maximum"
                );
                return Some(End::Server(ServerDisconnect::ReceiveMaximumExceeded));
            }
        }
        // A handle on the topic (not a copy) so that it can be read while
        // `publish` changes.
        let topic_bytes = publish.topic.clone();
        let principal = &self.who.principal;
        let verdict = std::str::from_utf8(&topic_bytes)
            .map_err(|_| Denial::Invalid)
            .and_then(|topic| {
                let limits = &self.gate.limits().topics;
                acl::may_publish(principal, topic, self.gate.delivery(), limits).map(|()| topic)
            })
            .and_then(|topic| {
                let caps = &self.gate.limits().device_properties;
                property_caps::allow_publish(principal, caps, properties.as_ref()).map(|()| topic)
            });
        #[cfg(feature = "fault-injection")]
        inject_fault(principal, verdict);
        let topic = match verdict {
            Ok(topic) => topic,
            Err(denial) => {
                self.refuse_publish(&publish, denial, out);
                return None;
            }
        };
        // A delivery tag is the gate's own: never a client's.
        let properties = tags::strip_forged_from(properties);
        let properties = match principal {
            crate::auth::Principal::Device(device) => {
                // Devices never set retained messages; their identity is stamped.
                publish.retain = false;
                Some(identity::stamp(properties, device, &self.who.client_id))
            }
            crate::auth::Principal::Handler(_) => properties,
        };
        self.gate.metrics().message_in();
        let mut routed = self.gate.delivery().route(topic, &publish, &properties);
        routed.record(self.gate.metrics(), topic);
        let later = routed.later.take();
        match self
            .flows
            .allowed(publish.qos(), pkid, routed.needs_router, later)
        {
            // Served by the gate alone (or wanted by nobody), or its PUBACK
            // (PUBREC) waits its turn (the delivery stores it first).
            Allowed::Done | Allowed::Owed => {}
            Allowed::AckHere => {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                out.to_client(Packet::PubAck(ack, None));
            }
            Allowed::ToRouter => out.to_router(Packet::Publish(publish, properties)),
        }
        None
    }

    /// Answers a refused publish on the client's channel for its QoS.
    fn refuse_publish(&mut self, publish: &Publish, denial: Denial, out: &mut impl Actions) {
        self.gate.metrics().denied("publish", denial.label());
        info!(topic = %String::from_utf8_lossy(&publish.topic), reason = denial.label(), "publish denied");
        let pkid = publish.pkid();
        let version = self.who.version;
        match self.flows.refused(publish.qos(), pkid, denial) {
            Refused::Silent | Refused::Owed => {}
            Refused::PubAckHere => {
                out.to_client(answers::puback_denial(version, pkid, denial));
            }
            Refused::PubAckThroughRouter => {
                // An earlier PUBACK is due from the router: this one goes
                // through it too, so PUBACKs keep the order of the publishes
                // (MQTT 4.6). The router drops a publish to the sink topic
                // and its PUBACK is rewritten (`router_puback`).
                let sink = Publish::with_qos(
                    Bytes::from_static(DENIED_SINK_TOPIC),
                    Bytes::new(),
                    false,
                    QoS::AtLeastOnce,
                    pkid,
                );
                out.to_router(Packet::Publish(sink, None));
            }
            Refused::PubRecHere => {
                out.to_client(answers::pubrec_denial(version, pkid, denial));
            }
        }
    }

    /// A PUBREC from the router for the client's QoS 2 publish: sent now,
    /// or it answered one of the acknowledgements owed in order. `Some`
    /// ends the session.
    pub(super) fn router_pubrec(
        &mut self,
        rec: PubRec,
        properties: Option<crate::router::protocol::PubRecProperties>,
        out: &mut impl Actions,
    ) -> Option<End> {
        match self.flows.router_pubrec(rec.pkid, rec.reason) {
            RouterAck::Owed => return self.answer_owed(out),
            RouterAck::Now(_) => {
                out.to_client(Packet::PubRec(rec, properties));
            }
        }
        None
    }

    /// A PUBACK from the router: the client's publish's, or a refused one's
    /// sent through the router to keep the order, which becomes the denial;
    /// or one of the acknowledgements owed in order. `Some` ends the session.
    pub(super) fn router_puback(
        &mut self,
        ack: PubAck,
        properties: Option<crate::router::protocol::PubAckProperties>,
        out: &mut impl Actions,
    ) -> Option<End> {
        match self.flows.router_puback(ack.pkid) {
            RouterAck::Now(Some(denial)) => {
                out.to_client(answers::puback_denial(self.who.version, ack.pkid, denial));
            }
            RouterAck::Now(None) => {
                out.to_client(Packet::PubAck(ack, properties));
            }
            RouterAck::Owed => return self.answer_owed(out),
        }
        None
    }

    /// Sends the owed PUBACKs and PUBRECs that can go now, in the order of
    /// the publishes. A publish the delivery did not store is answered
    /// `0x80` (`0x97` when its queue was full) to an MQTT 5 client; an MQTT
    /// 3.1.1 client cannot be told, so its connection ends without that
    /// PUBACK or PUBREC (`Some`), and it sends the publish again (DUP) when
    /// it reconnects.
    pub(super) fn answer_owed(&mut self, out: &mut impl Actions) -> Option<End> {
        let version = self.who.version;
        while let Some(due) = self.flows.pop_owed() {
            let pkid = due.pkid;
            let packet = match (due.kind, due.answer) {
                (AckKind::PubAck, Answer::Success | Answer::Router(_)) => Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ),
                (AckKind::PubRec, Answer::Success) => Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ),
                (AckKind::PubRec, Answer::Router(reason)) => {
                    Packet::PubRec(PubRec { pkid, reason }, None)
                }
                (AckKind::PubAck, Answer::Denied(denial)) => {
                    answers::puback_denial(version, pkid, denial)
                }
                (AckKind::PubRec, Answer::Denied(denial)) => {
                    answers::pubrec_denial(version, pkid, denial)
                }
                (kind, Answer::NotStored(outcome)) => {
                    self.gate
                        .metrics()
                        .denied("publish", not_stored_label(outcome));
                    info!(
                        pkid,
                        ?kind,
                        ?outcome,
                        "a publish was not stored for delivery"
                    );
                    let answer = match kind {
                        AckKind::PubAck => answers::puback_not_stored(version, pkid, outcome),
                        AckKind::PubRec => answers::pubrec_not_stored(version, pkid, outcome),
                    };
                    let Some(packet) = answer else {
                        return Some(End::Server(ServerDisconnect::NotStored));
                    };
                    if due.release_in_router {
                        // The client ends the exchange on this PUBREC: the
                        // router must not keep the packet id held.
                        let release = PubRel {
                            pkid,
                            reason: PubRelReason::Success,
                        };
                        out.to_router(Packet::PubRel(release, None));
                    }
                    packet
                }
            };
            out.to_client(packet);
        }
        None
    }

    /// A publish the router forwards to the client, without its delivery
    /// tag: reported once written (QoS 0) or kept until the client's
    /// acknowledgement (`client_acknowledged`).
    pub(super) fn router_publish(
        &mut self,
        publish: Publish,
        mut properties: Option<PublishProperties>,
        out: &mut impl Actions,
    ) {
        // Replies the gate queued first are written first.
        self.drain_inbox(out);
        let (qos, pkid) = (publish.qos(), publish.pkid());
        let tag = properties.as_mut().and_then(tags::take);
        if tag.is_some()
            && properties
                .as_mut()
                .is_some_and(|p| tags::aimed_elsewhere(p, self.claim.id()))
        {
            // Another session's (a replay for the session that resumed
            // here): settled with the router, not written.
            self.settle_undeliverable(qos, pkid, out);
            return;
        }
        if out.to_client(Packet::Publish(publish, properties)) {
            self.gate.metrics().messages_out(1);
            if let Some(tag) = tag {
                match qos {
                    QoS::AtMostOnce => self.gate.delivery().delivered(self.claim.id(), &tag),
                    QoS::AtLeastOnce | QoS::ExactlyOnce => self.tags.insert(pkid, tag),
                }
            }
        } else {
            // Too large for this client: not sent, and settled with the
            // router as if delivered, so its flow goes on.
            if let Some(tag) = tag {
                self.gate.delivery().skipped(self.claim.id(), &tag);
            }
            self.settle_undeliverable(qos, pkid, out);
        }
    }

    /// Acknowledges to the router a forward the client was not sent.
    fn settle_undeliverable(&mut self, qos: QoS, pkid: u16, out: &mut impl Actions) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                out.to_router(Packet::PubAck(ack, None));
            }
            QoS::ExactlyOnce => {
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                out.to_router(Packet::PubRec(rec, None));
                // Its PUBREL is answered here too (`router_packet`).
                self.undeliverable_qos2.insert(pkid);
            }
        }
    }
}

/// The metric label of a publish the delivery did not store.
fn not_stored_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::QueueFull => "not_stored_queue_full",
        Outcome::Failed | Outcome::Stored => "not_stored",
    }
}

/// Test-only (feature `fault-injection`): a handler's publish to
/// `$fault/panic` panics, as a bug in the session would.
#[cfg(feature = "fault-injection")]
#[allow(clippy::panic)]
fn inject_fault(principal: &crate::auth::Principal, verdict: Result<&str, Denial>) {
    if matches!(principal, crate::auth::Principal::Handler(_)) && verdict == Ok("$fault/panic") {
        panic!("fault injected: $fault/panic");
    }
}
