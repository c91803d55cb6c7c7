//! Owns a connected session's protocol state as a value with no I/O: it takes
//! one [`Event`] at a time (a client packet, a router packet, replies ready in
//! its inbox, a timer tick with `now`, an end request) and performs what
//! follows through [`Actions`] (packets to the client, packets to the router),
//! returning the [`End`] when the session must end. No `await`, no clock read
//! (time comes in the events). The loop in `session/mod.rs` moves the bytes.
//!
//! The decisions themselves stay with their owners, called from here: the
//! ACL (`acl`), the caps (`property_caps`), the QoS flows (`inbound`), the
//! path of each subscription and of each publish (`delivery`), and the packet
//! each decision becomes per protocol version (`answers`). What happens to one
//! client PUBLISH is [`SessionState::client_publish`] (`publish.rs`); to one
//! SUBSCRIBE, `subscribe.rs`.

use super::publish::UndeliverableQos2;
use super::subscribe::PendingSubAcks;
use super::tags::{self, Tags};
use crate::answers::ServerDisconnect;
use crate::auth::Principal;
use crate::codec::{CodecError, Version};
use crate::delivery::Subscriptions;
use crate::gate::Gate;
use crate::inbound::{InboundFlows, Release};
use crate::router::protocol::{
    DisconnectReasonCode, LastWill, Packet, PingResp, PubComp, PubRecReason, PublishProperties,
    SubscribeProperties,
};
use crate::sessions::{EndRequest, SessionClaim};
use crate::validate;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::info;

/// One thing that happened to a session.
#[derive(Debug)]
pub enum Event {
    /// Bytes arrived from the client at this instant (keep-alive).
    Heard(Instant),
    /// A packet decoded from the client.
    Client(Packet),
    /// Bytes from the client that do not frame as a packet.
    Undecodable(CodecError),
    /// A packet the router has for this client.
    Router(Packet),
    /// Replies the gate delivers itself wait in the session's inbox.
    InboxReady,
    /// A delivery settled an acknowledgement it owed (see
    /// [`SessionState::poll_acknowledged`]).
    Acknowledged,
    /// The session's timer fired (see [`SessionState::next_deadline`]).
    Tick(Instant),
    /// Takeover, revocation or shutdown asks the session to end.
    EndRequested(EndRequest),
}

/// What a session does, performed by whoever drives it (the loop, or a test).
pub trait Actions {
    /// Queues `packet` for the client; `false` when it is not sent (larger
    /// than the client's Maximum Packet Size, or not encodable for it).
    fn to_client(&mut self, packet: Packet) -> bool;
    /// Hands `packet` to the router.
    fn to_router(&mut self, packet: Packet);
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent DISCONNECT; `with_will` for MQTT 5 reason 0x04.
    ClientDisconnect { with_will: bool },
    /// The socket closed or failed without DISCONNECT (or the router link).
    Abnormal(&'static str),
    /// The server ends the session.
    Server(ServerDisconnect),
}

/// Who the session is, fixed at CONNECT.
pub struct Who {
    pub principal: Principal,
    pub client_id: String,
    pub version: Version,
    /// Nothing of the session outlives the connection.
    pub clean_session: bool,
    /// MQTT 5 CONNECT had a Session Expiry Interval of 0 (or none): its
    /// DISCONNECT may not set one (`validate`).
    pub connect_expiry_zero: bool,
}

/// The will, published on an abnormal end (`ending`).
pub struct Will {
    pub will: LastWill,
    /// Its MQTT 5 Will Delay Interval, in seconds.
    pub delay_secs: Option<u32>,
    /// Its MQTT 5 properties, sent with it.
    pub properties: Option<PublishProperties>,
}

/// The session's deadlines: the token's expiry and MQTT's keep-alive (the
/// server may close after 1.5 periods of silence).
pub struct Deadlines {
    pub token: Option<Instant>,
    pub silence_limit: Duration,
    pub last_heard: Instant,
}

/// What a connected session knows and decides. Everything rarely used is
/// boxed and allocated only when used: the will, pending SUBACK merges,
/// undeliverable QoS 2 forwards and the delivery tags awaiting the client's
/// acknowledgement.
pub struct SessionState {
    pub(super) gate: Arc<Gate>,
    pub(super) who: Box<Who>,
    pub(super) claim: SessionClaim,
    /// Its row of the subscription table (filters, the path serving each,
    /// its inbox), held for `delivery`, which alone changes it.
    pub(super) subs: Subscriptions,
    /// The client's QoS 1/2 publishes in flight (`inbound`).
    pub(super) flows: InboundFlows,
    pub(super) deadlines: Deadlines,
    /// How long a persistent session outlives this connection.
    pub(super) session_expiry: Duration,
    pub(super) will: Option<Box<Will>>,
    pub(super) pending_subacks: PendingSubAcks,
    pub(super) undeliverable_qos2: UndeliverableQos2,
    /// Delivery tags of publishes written to the client, by packet id,
    /// until it acknowledges them (`tags`).
    pub(super) tags: Tags,
}

/// What a CONNECT decided, for [`SessionState::new`].
pub struct Accepted {
    pub who: Who,
    pub claim: SessionClaim,
    pub subs: Subscriptions,
    pub flows: InboundFlows,
    pub deadlines: Deadlines,
    pub session_expiry: Duration,
    pub will: Option<Will>,
}

impl SessionState {
    pub fn new(gate: Arc<Gate>, accepted: Accepted) -> Self {
        SessionState {
            gate,
            who: Box::new(accepted.who),
            claim: accepted.claim,
            subs: accepted.subs,
            flows: accepted.flows,
            deadlines: accepted.deadlines,
            session_expiry: accepted.session_expiry,
            will: accepted.will.map(Box::new),
            pending_subacks: PendingSubAcks::default(),
            undeliverable_qos2: UndeliverableQos2::default(),
            tags: Tags::default(),
        }
    }

    /// The single entry point: handles `event`, performing what follows
    /// through `out`; `Some` ends the session (what was queued before still
    /// goes out).
    pub fn handle(&mut self, event: Event, out: &mut impl Actions) -> Option<End> {
        match event {
            Event::Heard(now) => {
                self.deadlines.last_heard = now;
                None
            }
            Event::Client(packet) => self.client_packet(packet, out),
            Event::Undecodable(error) => Some(End::Server(undecodable(&error))),
            Event::Router(packet) => self.router_packet(packet, out),
            Event::InboxReady => {
                self.drain_inbox(out);
                None
            }
            Event::Acknowledged => {
                self.flows.collect_owed(None);
                self.answer_owed(out)
            }
            Event::Tick(now) => {
                if let Some(end) = self.tick(now) {
                    return Some(end);
                }
                // An acknowledgement a delivery owes past its deadline is
                // answered as failed.
                self.flows.collect_owed(Some(now));
                self.answer_owed(out)
            }
            Event::EndRequested(why) => Some(End::Server(server_end(why))),
        }
    }

    /// When the session's timer must fire next: the token's expiry, the
    /// end of the keep-alive's allowance of silence, or the deadline of an
    /// acknowledgement a delivery owes, whichever comes first.
    pub fn next_deadline(&self) -> Instant {
        let silence = self.deadlines.last_heard + self.deadlines.silence_limit;
        [self.deadlines.token, self.flows.owed_deadline()]
            .into_iter()
            .flatten()
            .fold(silence, Instant::min)
    }

    /// Waits for an acknowledgement a delivery owes (`Ready`: hand the
    /// state [`Event::Acknowledged`]). Polled by the loop with the router's
    /// events (both change the state as they are polled).
    pub fn poll_acknowledged(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.flows.poll_owed(cx)
    }

    /// When the session's token expires, if it does.
    pub fn token_deadline(&self) -> Option<Instant> {
        self.deadlines.token
    }

    /// Whether the end was asked for by a takeover: the successor owns the
    /// client id in the router now.
    pub fn taken_over(&self) -> bool {
        self.claim.end.requested() == Some(EndRequest::TakenOver)
    }

    /// The signal that asks this session to end.
    pub fn end_signal(&self) -> &crate::sessions::EndSignal {
        &self.claim.end
    }

    pub fn version(&self) -> Version {
        self.who.version
    }

    fn tick(&mut self, now: Instant) -> Option<End> {
        if self.deadlines.token.is_some_and(|token| now >= token) {
            return Some(End::Server(ServerDisconnect::TokenExpired));
        }
        if now >= self.deadlines.last_heard + self.deadlines.silence_limit {
            return Some(End::Server(ServerDisconnect::KeepAliveTimeout));
        }
        None
    }

    fn client_packet(&mut self, packet: Packet, out: &mut impl Actions) -> Option<End> {
        match packet {
            Packet::Publish(publish, properties) => self.client_publish(publish, properties, out),
            Packet::Subscribe(_, Some(SubscribeProperties { id: Some(0), .. })) => {
                // MQTT 5 3.8.2.1.2: identifiers start at 1.
                info!("subscription identifier 0");
                Some(End::Server(ServerDisconnect::ProtocolError))
            }
            Packet::Subscribe(subscribe, properties) => {
                self.client_subscribe(subscribe, properties, out);
                None
            }
            Packet::Unsubscribe(unsubscribe, properties) => {
                self.client_unsubscribe(unsubscribe, properties, out);
                None
            }
            Packet::PubRel(pubrel, properties) => {
                let pkid = pubrel.pkid;
                match self.flows.release(pkid) {
                    Release::CompleteHere(reason) => {
                        out.to_client(Packet::PubComp(PubComp { pkid, reason }, None));
                    }
                    Release::ToRouter => out.to_router(Packet::PubRel(pubrel, properties)),
                }
                None
            }
            packet @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                self.client_acknowledged(&packet);
                out.to_router(packet);
                None
            }
            Packet::PingReq(_) => {
                out.to_client(Packet::PingResp(PingResp));
                None
            }
            Packet::Disconnect(disconnect, properties) => {
                // MQTT 5: DISCONNECT may shorten (or lengthen) the expiry.
                if let Some(secs) = properties.and_then(|p| p.session_expiry_interval) {
                    if validate::disconnect_expiry_is_protocol_error(
                        self.who.connect_expiry_zero,
                        secs,
                    ) {
                        // The expiry stays 0: the will goes out now, and
                        // nothing of the session outlives it.
                        info!(
                            secs,
                            "DISCONNECT sets a session expiry its CONNECT did not have"
                        );
                        return Some(End::Server(ServerDisconnect::ProtocolError));
                    }
                    self.session_expiry = session_expiry(
                        self.who.version,
                        Some(secs),
                        self.gate.limits().max_session_expiry,
                    );
                }
                Some(End::ClientDisconnect {
                    with_will: disconnect.reason_code
                        == DisconnectReasonCode::DisconnectWithWillMessage,
                })
            }
            Packet::Connect(..) => {
                info!("second CONNECT on one connection");
                Some(End::Server(ServerDisconnect::ProtocolError))
            }
            other => {
                info!(packet = ?std::mem::discriminant(&other), "packet a client may not send");
                Some(End::Server(ServerDisconnect::ProtocolError))
            }
        }
    }

    fn router_packet(&mut self, packet: Packet, out: &mut impl Actions) -> Option<End> {
        match packet {
            Packet::SubAck(suback, _) => {
                let merged = self.merge_suback(suback);
                out.to_client(Packet::SubAck(merged, None));
            }
            // Answered by the gate itself (see `client_unsubscribe`).
            Packet::UnsubAck(..) => {}
            Packet::Disconnect(..) => return Some(End::Abnormal("router ended the session")),
            Packet::Publish(publish, properties) => self.router_publish(publish, properties, out),
            Packet::PubRel(release, properties) => {
                if let Some(comp) = self.undeliverable_qos2.release(release.pkid) {
                    out.to_router(comp);
                } else {
                    out.to_client(Packet::PubRel(release, properties));
                }
            }
            Packet::PubAck(ack, properties) => return self.router_puback(ack, properties, out),
            Packet::PubRec(rec, properties) => return self.router_pubrec(rec, properties, out),
            Packet::PubComp(comp, properties) => {
                // Not the one answering a PUBREL the gate sent itself.
                if self.flows.router_pubcomp(comp.pkid) {
                    out.to_client(Packet::PubComp(comp, properties));
                }
            }
            packet => {
                out.to_client(packet);
            }
        }
        None
    }

    /// The client acknowledged a publish written to it: the end of its
    /// flow (PUBACK, PUBCOMP, or a PUBREC refusing it) reports its delivery
    /// tag, if it carried one.
    fn client_acknowledged(&mut self, packet: &Packet) {
        let pkid = match packet {
            Packet::PubAck(ack, _) => ack.pkid,
            Packet::PubComp(comp, _) => comp.pkid,
            Packet::PubRec(rec, _)
                if !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) =>
            {
                rec.pkid
            }
            _ => return,
        };
        if let Some(tag) = self.tags.take(pkid) {
            self.gate.delivery().delivered(self.claim.id(), &tag);
        }
    }

    /// Queues every reply the gate has for this session (QoS 0: a delivery
    /// tag is reported once the reply is written).
    pub(super) fn drain_inbox(&self, out: &mut impl Actions) {
        let Some(inbox) = self.subs.inbox() else {
            return;
        };
        let delivered = inbox.drain(|delivery| {
            let mut properties = delivery.properties.map(|p| *p);
            let tag = properties.as_mut().and_then(tags::take);
            let written = out.to_client(Packet::Publish(delivery.publish, properties));
            if let (true, Some(tag)) = (written, tag) {
                self.gate.delivery().delivered(self.claim.id(), &tag);
            }
        });
        if delivered > 0 {
            self.gate.metrics().messages_out(delivered);
        }
    }
}

impl Drop for SessionState {
    /// Delivery lets go of this connection however it ended (even a task
    /// cancelled at shutdown): a clean session's row is forgotten, a
    /// persistent one's kept. Before the claim is released (a field, dropped
    /// after this), so a successor finds the row kept.
    fn drop(&mut self) {
        self.gate.delivery().close(self.claim.id(), &mut self.subs);
    }
}

/// Why bytes that do not frame end the session.
fn undecodable(error: &CodecError) -> ServerDisconnect {
    match error {
        CodecError::TooLarge(limit) => {
            info!(limit, "packet too large");
            ServerDisconnect::PacketTooLarge
        }
        CodecError::ProtocolViolation(_) => {
            info!(%error, "protocol error");
            ServerDisconnect::ProtocolError
        }
        _ => {
            info!(%error, "malformed packet");
            ServerDisconnect::Malformed
        }
    }
}

/// The server's reason for ending a session on request.
pub fn server_end(why: EndRequest) -> ServerDisconnect {
    match why {
        EndRequest::TakenOver => ServerDisconnect::TakenOver,
        EndRequest::Revoked => ServerDisconnect::Revoked,
        EndRequest::ShuttingDown => ServerDisconnect::ShuttingDown,
    }
}

/// How long a persistent session outlives its connection: MQTT 5 says so in
/// CONNECT (absent = 0, ended with the connection); MQTT 3.1.1 sessions have
/// no expiry of their own. Either way at most the configured maximum.
pub fn session_expiry(version: Version, asked_secs: Option<u32>, max: Duration) -> Duration {
    match version {
        Version::V4 => max,
        Version::V5 => Duration::from_secs(u64::from(asked_secs.unwrap_or(0))).min(max),
    }
}
