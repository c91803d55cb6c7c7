//! Owns the table tests of the session as pure state: events in, actions out, no
//! sockets. The gate (router, delivery, ACL, caps) is the one the broker
//! builds; the session's actions are recorded instead of performed.

use super::state::{Accepted, Actions, Deadlines, End, Event, SessionState, Who};
use crate::acl::Denial;
use crate::answers::{self, ServerDisconnect};
use crate::auth::testing::{device, handler};
use crate::auth::{jwt::JwtSettings, Principal};
use crate::codec::{CodecError, Version};
use crate::config::{Config, Limits};
use crate::delivery::{Kind, Opening};
use crate::gate::Gate;
use crate::inbound::InboundFlows;
use crate::router::protocol::{
    Disconnect, DisconnectProperties, DisconnectReasonCode, Error as ProtocolError, Filter, Packet,
    PingReq, PubAck, PubAckReason, PubCompReason, PubRecReason, PubRel, PubRelReason, Publish,
    PublishProperties, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, Unsubscribe,
};
use crate::sessions::{device_session_id, handler_session_id, EndRequest};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) mod hooked;
mod owed;
mod owed_qos2;

/// A command topic a handler serves through the router, and one nobody serves.
const SERVED: &str = "echo";
const UNSERVED: &str = "quiet";

/// What a session did, in a form a table can spell.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Did {
    ClientPublish(String, QoS),
    ClientPubAck(u16, PubAckReason),
    ClientPubRec(u16, PubRecReason),
    ClientPubComp(u16, PubCompReason),
    ClientPubRel(u16),
    ClientSubAck(u16, Vec<SubscribeReasonCode>),
    ClientUnsubAck(u16),
    ClientPingResp,
    RouterPublish(String, QoS, u16),
    RouterPubAck(u16),
    RouterPubRec(u16),
    RouterPubRel(u16),
    RouterPubComp(u16),
    RouterSubscribe(Vec<String>),
    RouterUnsubscribe(Vec<String>),
    Other(String),
}

/// Records actions; `client_max_publish` refuses larger publishes as the
/// wire does for a client's Maximum Packet Size.
#[derive(Default)]
struct Recorder {
    did: Vec<Did>,
    client_max_publish: Option<usize>,
}

impl Actions for Recorder {
    fn to_client(&mut self, packet: Packet) -> bool {
        let did = match packet {
            Packet::Publish(p, _) => {
                if self
                    .client_max_publish
                    .is_some_and(|max| p.payload.len() > max)
                {
                    return false;
                }
                Did::ClientPublish(String::from_utf8_lossy(&p.topic).into_owned(), p.qos())
            }
            Packet::PubAck(a, _) => Did::ClientPubAck(a.pkid, a.reason),
            Packet::PubRec(r, _) => Did::ClientPubRec(r.pkid, r.reason),
            Packet::PubComp(c, _) => Did::ClientPubComp(c.pkid, c.reason),
            Packet::PubRel(r, _) => Did::ClientPubRel(r.pkid),
            Packet::SubAck(s, _) => Did::ClientSubAck(s.pkid, s.return_codes),
            Packet::UnsubAck(u, _) => Did::ClientUnsubAck(u.pkid),
            Packet::PingResp(_) => Did::ClientPingResp,
            other => Did::Other(format!("client {other:?}")),
        };
        self.did.push(did);
        true
    }

    fn to_router(&mut self, packet: Packet) {
        self.did.push(match packet {
            Packet::Publish(p, _) => Did::RouterPublish(
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.qos(),
                p.pkid(),
            ),
            Packet::PubAck(a, _) => Did::RouterPubAck(a.pkid),
            Packet::PubRec(r, _) => Did::RouterPubRec(r.pkid),
            Packet::PubRel(r, _) => Did::RouterPubRel(r.pkid),
            Packet::PubComp(c, _) => Did::RouterPubComp(c.pkid),
            Packet::Subscribe(s, _) => {
                Did::RouterSubscribe(s.filters.into_iter().map(|f| f.path).collect())
            }
            Packet::Unsubscribe(u, _) => Did::RouterUnsubscribe(u.filters),
            other => Did::Other(format!("router {other:?}")),
        });
    }
}

fn test_gate() -> Arc<Gate> {
    crate::gate_for_tests(test_config(), CancellationToken::new()).expect("gate")
}

/// The configuration of [`test_gate`].
fn test_config() -> Config {
    Config {
        jwt: JwtSettings {
            hmac_secret: Some(protocol::Secret::new(
                "session-state-tests-secret-0123456789",
            )),
            ..JwtSettings::default()
        },
        handler_keys: Vec::new(),
        command_topics: vec![SERVED.to_owned(), UNSERVED.to_owned()],
        limits: Limits {
            receive_maximum: 4,
            ..Limits::default()
        },
        revocations: None,
    }
}

/// A session as `connect` would open it, for `principal` speaking `version`.
async fn open(gate: &Arc<Gate>, principal: Principal, version: Version) -> SessionState {
    open_with(gate, principal, version, 100).await
}

async fn open_with(
    gate: &Arc<Gate>,
    principal: Principal,
    version: Version,
    max_subscriptions: usize,
) -> SessionState {
    let client_id = format!("c{}", rand::random::<u32>());
    let (session_id, device) = match &principal {
        Principal::Device(d) => (device_session_id(d.uid(), &client_id), Some(d)),
        Principal::Handler(_) => (handler_session_id(&client_id), None),
    };
    let claim = gate.sessions().claim(session_id, device).await;
    let kind = match principal {
        Principal::Device(_) => Kind::Device,
        Principal::Handler(_) => Kind::Handler,
    };
    let opening = Opening {
        kind,
        persistent: false,
        clean_start: true,
        cap: max_subscriptions,
    };
    let subs = gate.delivery().open(claim.id(), opening);
    let accepted = Accepted {
        who: Who {
            principal,
            client_id,
            version,
            clean_session: true,
            connect_expiry_zero: version == Version::V5,
        },
        claim,
        subs,
        flows: InboundFlows::new(version, gate.limits().receive_maximum),
        deadlines: Deadlines {
            token: None,
            silence_limit: Duration::from_secs(90),
            last_heard: Instant::now(),
        },
        session_expiry: Duration::ZERO,
        will: None,
    };
    SessionState::new(gate.clone(), accepted)
}

fn publish(topic: &str, qos: QoS, pkid: u16) -> Packet {
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    let publish = Publish::with_qos(
        Bytes::from(topic.to_owned()),
        Bytes::from_static(b"{}"),
        false,
        qos,
        pkid,
    );
    Packet::Publish(publish, None)
}

fn publish_with(topic: &str, qos: QoS, pkid: u16, properties: PublishProperties) -> Packet {
    match publish(topic, qos, pkid) {
        Packet::Publish(p, _) => Packet::Publish(p, Some(properties)),
        other => other,
    }
}

fn subscribe(pkid: u16, filters: &[(&str, QoS)]) -> Packet {
    let filters = filters
        .iter()
        .map(|(path, qos)| Filter {
            path: (*path).to_owned(),
            qos: *qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        })
        .collect();
    Packet::Subscribe(Subscribe { pkid, filters }, None)
}

fn router_puback(pkid: u16) -> Packet {
    Packet::PubAck(
        PubAck {
            pkid,
            reason: PubAckReason::Success,
        },
        None,
    )
}

/// Feeds `event`; what the session did, and whether it ended.
fn step(session: &mut SessionState, event: Event) -> (Vec<Did>, Option<End>) {
    let mut out = Recorder::default();
    let end = session.handle(event, &mut out);
    (out.did, end)
}

/// A handler session subscribed to the served command topic in the router.
async fn serving_handler(gate: &Arc<Gate>) -> SessionState {
    let mut handler = open(gate, handler(), Version::V5).await;
    let (did, _) = step(
        &mut handler,
        Event::Client(subscribe(1, &[(SERVED, QoS::AtLeastOnce)])),
    );
    assert_eq!(did, vec![Did::RouterSubscribe(vec![SERVED.to_owned()])]);
    handler
}

/// The path a publish takes.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// A device's command that a handler in the router serves.
    ToRouter,
    /// A device's command nobody serves.
    Nobody,
    /// A handler's reply to a device the gate serves (its reply inbox).
    ToInbox,
    /// Refused by the ACL, the topic rules or the caps.
    Refused(Denial),
}

#[tokio::test]
async fn one_publish_table_qos_by_path_by_version() {
    use Did::*;
    let ok = PubAckReason::Success;
    let rec_ok = PubRecReason::Success;
    let paths = [
        Path::ToRouter,
        Path::Nobody,
        Path::ToInbox,
        Path::Refused(Denial::NotAuthorized),
        Path::Refused(Denial::Invalid),
        Path::Refused(Denial::PropertiesTooLarge),
    ];
    for version in [Version::V4, Version::V5] {
        for path in paths {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                if matches!(path, Path::Refused(Denial::PropertiesTooLarge))
                    && version == Version::V4
                {
                    continue; // MQTT 3.1.1 carries no properties to cap.
                }
                let gate = test_gate();
                let _handler = serving_handler(&gate).await;
                let mut sender = match path {
                    Path::ToInbox => open(&gate, handler(), version).await,
                    _ => open(&gate, device("u1"), version).await,
                };
                // The device the reply is for, served by the gate.
                let mut receiver = open(&gate, device("u2"), Version::V5).await;
                let (did, _) = step(
                    &mut receiver,
                    Event::Client(subscribe(1, &[("u2_reply", QoS::AtMostOnce)])),
                );
                assert_eq!(did, vec![ClientSubAck(1, vec![SubscribeReasonCode::QoS0])]);

                let packet = match path {
                    Path::ToRouter => publish(SERVED, qos, 9),
                    Path::Nobody => publish(UNSERVED, qos, 9),
                    Path::ToInbox => publish("u2_reply", qos, 9),
                    Path::Refused(Denial::NotAuthorized) => publish("u2_reply", qos, 9),
                    Path::Refused(Denial::Invalid) => publish("echo/+", qos, 9),
                    Path::Refused(_) => {
                        let properties = PublishProperties {
                            correlation_data: Some(Bytes::from(vec![0u8; 100_000])),
                            ..PublishProperties::default()
                        };
                        publish_with(SERVED, qos, 9, properties)
                    }
                };
                let (did, end) = step(&mut sender, Event::Client(packet));
                assert_eq!(end, None);

                let v5 = version == Version::V5;
                let denied = |reason_v5: PubAckReason| if v5 { reason_v5 } else { ok };
                let denied_rec = |reason_v5: PubRecReason| if v5 { reason_v5 } else { rec_ok };
                let expected: Vec<Did> = match (path, qos) {
                    (Path::ToRouter, _) => vec![RouterPublish(SERVED.into(), qos, pkid(qos))],
                    (Path::Nobody | Path::ToInbox, QoS::AtMostOnce) => vec![],
                    (Path::Nobody | Path::ToInbox, QoS::AtLeastOnce) => vec![ClientPubAck(9, ok)],
                    // QoS 2 is the router's to hold until its PUBREL.
                    (Path::Nobody, QoS::ExactlyOnce) => {
                        vec![RouterPublish(UNSERVED.into(), qos, 9)]
                    }
                    (Path::ToInbox, QoS::ExactlyOnce) => {
                        vec![RouterPublish("u2_reply".into(), qos, 9)]
                    }
                    (Path::Refused(_), QoS::AtMostOnce) => vec![],
                    (Path::Refused(denial), QoS::AtLeastOnce) => {
                        vec![ClientPubAck(9, denied(puback_reason(denial)))]
                    }
                    (Path::Refused(denial), QoS::ExactlyOnce) => {
                        vec![ClientPubRec(9, denied_rec(pubrec_reason(denial)))]
                    }
                };
                assert_eq!(did, expected, "{version:?} {path:?} {qos:?}");

                // The gate's own subscriber got the reply at once.
                let (did, _) = step(&mut receiver, Event::InboxReady);
                let delivered = matches!(path, Path::ToInbox);
                assert_eq!(
                    did,
                    if delivered {
                        vec![ClientPublish("u2_reply".into(), QoS::AtMostOnce)]
                    } else {
                        vec![]
                    },
                    "{version:?} {path:?} {qos:?} delivery"
                );
            }
        }
    }
}

fn pkid(qos: QoS) -> u16 {
    if qos == QoS::AtMostOnce {
        0
    } else {
        9
    }
}

/// README: PUBACK/PUBREC `0x87` not authorized, `0x90` invalid topic name,
/// `0x83` over a property cap (`0x97` quota has no publish path).
fn puback_reason(denial: Denial) -> PubAckReason {
    match denial {
        Denial::NotAuthorized => PubAckReason::NotAuthorized,
        Denial::Invalid => PubAckReason::TopicNameInvalid,
        _ => PubAckReason::ImplementationSpecificError,
    }
}

fn pubrec_reason(denial: Denial) -> PubRecReason {
    match denial {
        Denial::NotAuthorized => PubRecReason::NotAuthorized,
        Denial::Invalid => PubRecReason::TopicNameInvalid,
        _ => PubRecReason::ImplementationSpecificError,
    }
}

/// The reason code `packet` carries on the wire (MQTT 5 PUBACK, PUBREC
/// and DISCONNECT: the byte after the fixed header and packet id; SUBACK:
/// its last byte, for one filter).
fn wire_code(version: Version, packet: Packet) -> u8 {
    let offset = match &packet {
        Packet::PubAck(..) | Packet::PubRec(..) => Some(4),
        Packet::Disconnect(..) => Some(2),
        _ => None,
    };
    let mut bytes = bytes::BytesMut::new();
    crate::codec::Codec::new(version, 1 << 16)
        .encode(packet, &mut bytes)
        .expect("encodes");
    assert!(bytes.len() < 128, "one byte of remaining length");
    match offset {
        Some(at) => bytes[at],
        None => *bytes.last().expect("bytes"),
    }
}

#[test]
fn the_reason_codes_are_the_ones_the_readme_lists() {
    use PubAckReason as Ack;
    use PubRecReason as Rec;
    use SubscribeReasonCode as Sub;
    let ack = |reason| Packet::PubAck(PubAck { pkid: 1, reason }, None);
    let rec = |reason| Packet::PubRec(crate::router::protocol::PubRec { pkid: 1, reason }, None);
    let suback = |code| {
        Packet::SubAck(
            SubAck {
                pkid: 1,
                return_codes: vec![code],
            },
            None,
        )
    };
    let table = [
        (Version::V5, ack(Ack::NotAuthorized), 0x87),
        (Version::V5, ack(Ack::TopicNameInvalid), 0x90),
        (Version::V5, ack(Ack::ImplementationSpecificError), 0x83),
        // Not stored for delivery (Redis), and its queue full.
        (Version::V5, ack(Ack::UnspecifiedError), 0x80),
        (Version::V5, ack(Ack::QuotaExceeded), 0x97),
        (Version::V5, rec(Rec::NotAuthorized), 0x87),
        (Version::V5, rec(Rec::TopicNameInvalid), 0x90),
        (Version::V5, rec(Rec::ImplementationSpecificError), 0x83),
        (Version::V5, suback(Sub::NotAuthorized), 0x87),
        (Version::V5, suback(Sub::TopicFilterInvalid), 0x8F),
        (Version::V5, suback(Sub::QuotaExceeded), 0x97),
        (Version::V4, suback(Sub::Failure), 0x80),
    ];
    for (version, packet, readme) in table {
        let name = format!("{packet:?}");
        assert_eq!(wire_code(version, packet), readme, "{name}");
    }
}

#[tokio::test]
async fn pubacks_keep_the_order_of_the_publishes_across_paths() {
    use Did::*;
    for version in [Version::V4, Version::V5] {
        let gate = test_gate();
        let _handler = serving_handler(&gate).await;
        let mut dev = open(&gate, device("u1"), version).await;
        // 1 goes to the router; 2 (nobody wants it) and 3 (refused) would be
        // answered by the gate at once, but must wait behind 1's PUBACK.
        let mut did = Vec::new();
        for packet in [
            publish(SERVED, QoS::AtLeastOnce, 1),
            publish(UNSERVED, QoS::AtLeastOnce, 2),
            publish("u9_x", QoS::AtLeastOnce, 3),
        ] {
            did.extend(step(&mut dev, Event::Client(packet)).0);
        }
        assert_eq!(
            did,
            vec![
                RouterPublish(SERVED.into(), QoS::AtLeastOnce, 1),
                RouterPublish(UNSERVED.into(), QoS::AtLeastOnce, 2),
                RouterPublish("$gate/denied".into(), QoS::AtLeastOnce, 3),
            ],
            "{version:?}"
        );
        // The router answers in order; the sink's PUBACK becomes the denial.
        let mut did = Vec::new();
        for pkid in [1, 2, 3] {
            did.extend(step(&mut dev, Event::Router(router_puback(pkid))).0);
        }
        let denied = match version {
            Version::V4 => PubAckReason::Success,
            Version::V5 => PubAckReason::NotAuthorized,
        };
        assert_eq!(
            did,
            vec![
                ClientPubAck(1, PubAckReason::Success),
                ClientPubAck(2, PubAckReason::Success),
                ClientPubAck(3, denied),
            ],
            "{version:?}"
        );
        // Nothing due from the router any more: the gate answers at once.
        let (did, _) = step(
            &mut dev,
            Event::Client(publish(UNSERVED, QoS::AtLeastOnce, 4)),
        );
        assert_eq!(did, vec![ClientPubAck(4, PubAckReason::Success)]);
    }
}

#[tokio::test]
async fn subscribe_table_merges_router_codes_with_denials_in_order() {
    use SubscribeReasonCode as Code;
    for (version, not_authorized, invalid, quota) in [
        (Version::V4, Code::Failure, Code::Failure, Code::Failure),
        (
            Version::V5,
            Code::NotAuthorized,
            Code::TopicFilterInvalid,
            Code::QuotaExceeded,
        ),
    ] {
        let gate = test_gate();
        let mut dev = open_with(&gate, device("u1"), version, 2).await;
        let filters = [
            ("u1_a", QoS::AtMostOnce),   // served by the gate
            ("u2_b", QoS::AtMostOnce),   // another user's
            ("u1_#/x", QoS::AtMostOnce), // not a filter
            ("u1_q", QoS::AtLeastOnce),  // QoS 1: the router's
            ("u1_c", QoS::AtMostOnce),   // a third held filter: over the cap of 2
            (SERVED, QoS::AtMostOnce),   // a command topic
        ];
        let (did, end) = step(&mut dev, Event::Client(subscribe(7, &filters)));
        assert_eq!(end, None);
        assert_eq!(did, vec![Did::RouterSubscribe(vec!["u1_q".into()])]);
        let suback = Packet::SubAck(
            SubAck {
                pkid: 7,
                return_codes: vec![Code::QoS1],
            },
            None,
        );
        let (did, _) = step(&mut dev, Event::Router(suback));
        let merged = vec![
            Code::QoS0,
            not_authorized,
            invalid,
            Code::QoS1,
            quota,
            not_authorized,
        ];
        assert_eq!(did, vec![Did::ClientSubAck(7, merged)], "{version:?}");

        // All denied: the gate answers alone.
        let (did, _) = step(
            &mut dev,
            Event::Client(subscribe(8, &[("u3_z", QoS::AtMostOnce)])),
        );
        assert_eq!(did, vec![Did::ClientSubAck(8, vec![not_authorized])]);

        // UNSUBSCRIBE is answered by the gate and passed on to the router.
        let unsubscribe = Packet::Unsubscribe(
            Unsubscribe {
                pkid: 9,
                filters: vec!["u1_a".into()],
            },
            None,
        );
        let (did, _) = step(&mut dev, Event::Client(unsubscribe));
        assert_eq!(
            did,
            vec![
                Did::RouterUnsubscribe(vec!["u1_a".into()]),
                Did::ClientUnsubAck(9)
            ]
        );
    }
}

#[tokio::test]
async fn qos2_exactly_once_by_packet_id() {
    use Did::*;
    let gate = test_gate();
    let _handler = serving_handler(&gate).await;
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    let (did, _) = step(
        &mut dev,
        Event::Client(publish(SERVED, QoS::ExactlyOnce, 5)),
    );
    assert_eq!(did, vec![RouterPublish(SERVED.into(), QoS::ExactlyOnce, 5)]);
    // A retransmission is answered PUBREC again and not stored again.
    let (did, _) = step(
        &mut dev,
        Event::Client(publish(SERVED, QoS::ExactlyOnce, 5)),
    );
    assert_eq!(did, vec![ClientPubRec(5, PubRecReason::Success)]);
    let pubrel = |pkid| {
        Packet::PubRel(
            PubRel {
                pkid,
                reason: PubRelReason::Success,
            },
            None,
        )
    };
    // The router releases it (and answers a PUBREL for nothing itself).
    let (did, _) = step(&mut dev, Event::Client(pubrel(5)));
    assert_eq!(did, vec![RouterPubRel(5)]);

    // A refused QoS 2 publish of MQTT 3.1.1 is completed by the gate.
    let mut old = open(&gate, device("u3"), Version::V4).await;
    let (did, _) = step(
        &mut old,
        Event::Client(publish("u9_x", QoS::ExactlyOnce, 6)),
    );
    assert_eq!(did, vec![ClientPubRec(6, PubRecReason::Success)]);
    let (did, _) = step(&mut old, Event::Client(pubrel(6)));
    assert_eq!(did, vec![ClientPubComp(6, PubCompReason::Success)]);

    // A forward too large for the client is settled with the router as if
    // delivered, and its PUBREL is answered by the gate.
    let mut out = Recorder {
        client_max_publish: Some(1),
        ..Recorder::default()
    };
    dev.handle(
        Event::Router(publish("u1_r", QoS::ExactlyOnce, 11)),
        &mut out,
    );
    dev.handle(
        Event::Router(publish("u1_r", QoS::AtLeastOnce, 12)),
        &mut out,
    );
    dev.handle(Event::Router(pubrel(11)), &mut out);
    assert_eq!(
        out.did,
        vec![RouterPubRec(11), RouterPubAck(12), RouterPubComp(11)]
    );
    // Other PUBRELs from the router go to the client.
    let (did, _) = step(&mut dev, Event::Router(pubrel(13)));
    assert_eq!(did, vec![ClientPubRel(13)]);
}

#[tokio::test]
async fn what_ends_a_session_and_its_disconnect_reason_code() {
    let gate = test_gate();
    let now = Instant::now();
    let with_properties =
        |properties: PublishProperties| publish_with(SERVED, QoS::AtMostOnce, 0, properties);
    let disconnect = |reason_code, expiry: Option<u32>| {
        Packet::Disconnect(
            Disconnect { reason_code },
            expiry.map(|secs| DisconnectProperties {
                session_expiry_interval: Some(secs),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            }),
        )
    };
    let subscription_id_zero = Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: Vec::new(),
        },
        Some(SubscribeProperties {
            id: Some(0),
            user_properties: Vec::new(),
        }),
    );
    use ServerDisconnect as Why;
    let server = |why| Some(End::Server(why));
    let table: Vec<(&str, Event, Option<End>, Option<u8>)> = vec![
        ("ping", Event::Client(Packet::PingReq(PingReq)), None, None),
        (
            "normal DISCONNECT",
            Event::Client(disconnect(DisconnectReasonCode::NormalDisconnection, None)),
            Some(End::ClientDisconnect { with_will: false }),
            None,
        ),
        (
            "DISCONNECT with will (0x04)",
            Event::Client(disconnect(
                DisconnectReasonCode::DisconnectWithWillMessage,
                None,
            )),
            Some(End::ClientDisconnect { with_will: true }),
            None,
        ),
        (
            "DISCONNECT sets an expiry CONNECT did not have",
            Event::Client(disconnect(
                DisconnectReasonCode::NormalDisconnection,
                Some(60),
            )),
            server(Why::ProtocolError),
            Some(0x82),
        ),
        (
            "topic alias",
            Event::Client(with_properties(PublishProperties {
                topic_alias: Some(1),
                ..PublishProperties::default()
            })),
            server(Why::ProtocolError),
            Some(0x82),
        ),
        (
            "subscription identifier on a publish",
            Event::Client(with_properties(PublishProperties {
                subscription_identifiers: vec![1],
                ..PublishProperties::default()
            })),
            server(Why::ProtocolError),
            Some(0x82),
        ),
        (
            "subscription identifier 0",
            Event::Client(subscription_id_zero),
            server(Why::ProtocolError),
            Some(0x82),
        ),
        (
            "a server's packet from the client",
            Event::Client(Packet::PingResp(crate::router::protocol::PingResp)),
            server(Why::ProtocolError),
            Some(0x82),
        ),
        (
            "packet too large",
            Event::Undecodable(CodecError::TooLarge(10)),
            server(Why::PacketTooLarge),
            Some(0x95),
        ),
        (
            "repeated property",
            Event::Undecodable(CodecError::ProtocolViolation(
                ProtocolError::DuplicateProperty(1),
            )),
            server(Why::ProtocolError),
            Some(0x82),
        ),
        (
            "malformed",
            Event::Undecodable(CodecError::Malformed(ProtocolError::MalformedPacket)),
            server(Why::Malformed),
            Some(0x81),
        ),
        ("tick before any deadline", Event::Tick(now), None, None),
        (
            "silence beyond 1.5 keep-alives",
            Event::Tick(now + Duration::from_secs(91)),
            server(Why::KeepAliveTimeout),
            Some(0x8D),
        ),
        (
            "takeover",
            Event::EndRequested(EndRequest::TakenOver),
            server(Why::TakenOver),
            Some(0x8E),
        ),
        (
            "revocation",
            Event::EndRequested(EndRequest::Revoked),
            server(Why::Revoked),
            Some(0x98),
        ),
        (
            "shutdown",
            Event::EndRequested(EndRequest::ShuttingDown),
            server(Why::ShuttingDown),
            Some(0x8B),
        ),
        (
            "router ends the session",
            Event::Router(disconnect(DisconnectReasonCode::NormalDisconnection, None)),
            Some(End::Abnormal("router ended the session")),
            None,
        ),
    ];
    for (name, event, expected, code) in table {
        let mut dev = open(&gate, device("u1"), Version::V5).await;
        let (_, end) = step(&mut dev, event);
        assert_eq!(end, expected, "{name}");
        assert_eq!(disconnect_code(end), code, "{name}");
        // MQTT 3.1.1 has no server DISCONNECT.
        if let Some(End::Server(why)) = end {
            assert!(answers::server_disconnect(Version::V4, why).is_none());
        }
    }
}

/// The DISCONNECT reason code `ending` sends an MQTT 5 client for `end`.
fn disconnect_code(end: Option<End>) -> Option<u8> {
    match end? {
        End::Server(why) => match answers::server_disconnect(Version::V5, why)? {
            packet @ Packet::Disconnect(..) => Some(wire_code(Version::V5, packet)),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn token_expiry_and_keep_alive_come_in_through_ticks() {
    let gate = test_gate();
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    let start = dev.deadlines.last_heard;
    dev.deadlines.token = Some(start + Duration::from_secs(30));
    assert_eq!(dev.next_deadline(), start + Duration::from_secs(30));
    let (_, end) = step(&mut dev, Event::Tick(start + Duration::from_secs(30)));
    assert_eq!(end, Some(End::Server(ServerDisconnect::TokenExpired)));
    assert_eq!(disconnect_code(end), Some(0x87));

    // Bytes heard move the keep-alive deadline.
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    let heard = start + Duration::from_secs(60);
    step(&mut dev, Event::Heard(heard));
    assert_eq!(dev.next_deadline(), heard + Duration::from_secs(90));
    let (_, end) = step(&mut dev, Event::Tick(start + Duration::from_secs(100)));
    assert_eq!(end, None);
}

#[tokio::test]
async fn one_more_than_the_receive_maximum_ends_the_session() {
    let gate = test_gate();
    let _handler = serving_handler(&gate).await;
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    let receive_maximum = gate.limits().receive_maximum;
    for pkid in 1..=receive_maximum {
        let (_, end) = step(
            &mut dev,
            Event::Client(publish(SERVED, QoS::AtLeastOnce, pkid)),
        );
        assert_eq!(end, None);
    }
    let over = publish(SERVED, QoS::AtLeastOnce, receive_maximum + 1);
    let (_, end) = step(&mut dev, Event::Client(over));
    assert_eq!(
        end,
        Some(End::Server(ServerDisconnect::ReceiveMaximumExceeded))
    );
    assert_eq!(disconnect_code(end), Some(0x93));
}

#[tokio::test]
async fn a_device_publish_is_stamped_and_never_retained() {
    let gate = test_gate();
    let _handler = serving_handler(&gate).await;
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    struct Keep(Vec<Packet>);
    impl Actions for Keep {
        fn to_client(&mut self, packet: Packet) -> bool {
            self.0.push(packet);
            true
        }
        fn to_router(&mut self, packet: Packet) {
            self.0.push(packet);
        }
    }
    let mut retained = Publish::with_qos(
        Bytes::from_static(SERVED.as_bytes()),
        Bytes::from_static(b"x"),
        true,
        QoS::AtMostOnce,
        0,
    );
    retained.retain = true;
    let mut out = Keep(Vec::new());
    dev.handle(Event::Client(Packet::Publish(retained, None)), &mut out);
    let [Packet::Publish(sent, Some(properties))] = out.0.as_slice() else {
        panic!("one stamped publish to the router, got {:?}", out.0);
    };
    assert!(!sent.retain);
    assert!(properties
        .user_properties
        .iter()
        .any(|(k, v)| k == "user_id" && v == "u1"));
}

/// What every connection keeps for its whole life: the spawned task's future
/// (`serve`: two pointers and the span), the boxed loop (`run`, which holds
/// the `Session`, the socket halves and the relay's state) and the state.
/// The bounds are this build's sizes (a debug build on 64 bits, which the
/// tests run as; a release build is no larger) plus about 10%: they fail
/// when a change grows what each connection keeps, which is most of the
/// broker's memory per connection before the kernel's socket buffers and
/// the router's per-link state. Before issue 16 the same parts were 912
/// bytes (`Session`), 1,512 (the relay), 2,776 (the boxed session future,
/// debug) and ~2.4 KiB of task future holding the session's moved-from
/// copies, plus an outbox of packets that kept its grown capacity (1.4 KB).
#[tokio::test]
async fn resident_sizes_per_connection_stay_small() {
    let gate = test_gate();
    let (stream, _client) = tokio::io::duplex(64);
    let serve = super::serve(
        stream,
        "127.0.0.1:1".parse().expect("addr"),
        gate.clone(),
        super::Admits::Everyone,
    );
    let serve_size = std::mem::size_of_val(&serve);

    let (stream, _client) = tokio::io::duplex(64);
    let codec = crate::codec::Codec::new(Version::V5, 1 << 16);
    let mut wire = super::wire::Wire::new(stream, Duration::from_secs(1), codec);
    let state = open(&gate, device("u1"), Version::V5).await;
    let link = gate
        .open_router_session("D:u1:sizes".to_owned(), true, 10)
        .await
        .expect("link");
    let mut session = super::Session {
        state,
        tx: link.tx,
        rx: link.rx,
        write_stalled: false,
        finished: true,
    };
    let relay_size = std::mem::size_of_val(&session.relay(&mut wire));
    let run = super::run(session, wire);
    let run_size = std::mem::size_of_val(&run);
    drop(run);

    let state_size = std::mem::size_of::<SessionState>();
    let session_size = std::mem::size_of::<super::Session>();
    println!(
        "resident per connection: serve (task) future {serve_size} B, \
         Session::run (boxed) future {run_size} B, relay future {relay_size} B, \
         Session {session_size} B, SessionState {state_size} B"
    );
    assert!(serve_size <= 96, "serve future {serve_size} B");
    assert!(session_size <= 576, "Session {session_size} B");
    assert!(relay_size <= 432, "relay future {relay_size} B");
    assert!(run_size <= 1152, "run future {run_size} B");
}
