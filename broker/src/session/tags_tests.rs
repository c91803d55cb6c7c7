//! Owns the table tests of delivery tags (`tags`) on the session as pure
//! state: a tag never reaches a client, its delivery is reported once per
//! acknowledgement at each QoS and never for a publish not written (one
//! too large is reported skipped), a publish aimed at another session
//! (`DELIVERY_TARGET`) is settled unwritten, and a client cannot forge a
//! tag or a target. The gate is the broker's, with its delivery
//! wrapped (as a cluster wraps it) to record what is reported.

use super::state::{Accepted, Actions, Deadlines, Event, SessionState, Who};
use super::tests::hooked::Hooked;
use crate::auth::testing::{device, handler};
use crate::auth::{jwt::JwtSettings, Principal};
use crate::codec::Version;
use crate::config::{Config, Limits};
use crate::delivery::{Kind, Opening, DELIVERY_TAG, DELIVERY_TARGET};
use crate::gate::Gate;
use crate::inbound::InboundFlows;
use crate::router::protocol::{
    Filter, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish,
    PublishProperties, QoS, RetainForwardRule, Subscribe,
};
use crate::sessions::{device_session_id, handler_session_id};
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SERVED: &str = "echo";

/// What delivery was told: (session id, tag), in order; a skipped tag as
/// `skipped <tag>`.
type Reported = Arc<Mutex<Vec<(String, String)>>>;

fn recording_gate() -> (Arc<Gate>, Reported) {
    let config = Config {
        jwt: JwtSettings {
            hmac_secret: Some(protocol::Secret::new("session-tag-tests-secret-0123456789")),
            ..JwtSettings::default()
        },
        handler_keys: Vec::new(),
        command_topics: vec![SERVED.to_owned()],
        limits: Limits::default(),
        revocations: None,
    };
    let reported = Reported::default();
    let kept = reported.clone();
    let gate = crate::gate_for_tests_wrapped(
        config,
        CancellationToken::new(),
        Box::new(move |local, _| {
            let skipped = reported.clone();
            Box::new(
                Hooked::new(local)
                    .on_delivered(move |session_id, tag| {
                        reported
                            .lock()
                            .push((session_id.to_owned(), tag.to_owned()));
                    })
                    .on_skipped(move |session_id, tag| {
                        skipped
                            .lock()
                            .push((session_id.to_owned(), format!("skipped {tag}")));
                    }),
            )
        }),
    )
    .expect("gate");
    (gate, kept)
}

async fn open(gate: &Arc<Gate>, principal: Principal, version: Version) -> SessionState {
    let client_id = format!("c{}", rand::random::<u32>());
    let (session_id, dev) = match &principal {
        Principal::Device(d) => (device_session_id(d.uid(), &client_id), Some(d)),
        Principal::Handler(_) => (handler_session_id(&client_id), None),
    };
    let claim = gate.sessions().claim(session_id, dev).await;
    let kind = match principal {
        Principal::Device(_) => Kind::Device,
        Principal::Handler(_) => Kind::Handler,
    };
    let opening = Opening {
        kind,
        persistent: false,
        clean_start: true,
        cap: 100,
    };
    let subs = gate.delivery().open(claim.id(), opening);
    SessionState::new(
        gate.clone(),
        Accepted {
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
        },
    )
}

/// Keeps every packet; publishes with a payload over `max_payload` are not
/// written (as the wire refuses one over the client's Maximum Packet Size).
#[derive(Default)]
struct Keep {
    client: Vec<Packet>,
    router: Vec<Packet>,
    max_payload: Option<usize>,
}

impl Actions for Keep {
    fn to_client(&mut self, packet: Packet) -> bool {
        if let (Packet::Publish(p, _), Some(max)) = (&packet, self.max_payload) {
            if p.payload.len() > max {
                return false;
            }
        }
        self.client.push(packet);
        true
    }
    fn to_router(&mut self, packet: Packet) {
        self.router.push(packet);
    }
}

fn feed(session: &mut SessionState, event: Event) -> Keep {
    let mut out = Keep::default();
    assert_eq!(session.handle(event, &mut out), None);
    out
}

/// Properties with `extra` user properties and, if any, a delivery tag.
fn properties(tag: Option<&str>, extra: &[(&str, &str)]) -> PublishProperties {
    let mut user: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let Some(tag) = tag {
        user.push((DELIVERY_TAG.to_owned(), tag.to_owned()));
    }
    PublishProperties {
        user_properties: user,
        ..Default::default()
    }
}

fn tagged(topic: &str, qos: QoS, pkid: u16, payload: usize, tag: Option<&str>) -> Packet {
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    let publish = Publish::with_qos(
        Bytes::from(topic.to_owned()),
        Bytes::from(vec![b'x'; payload]),
        false,
        qos,
        pkid,
    );
    Packet::Publish(publish, Some(properties(tag, &[("trace", "t")])))
}

/// Every user property of every publish in `packets`.
fn user_properties(packets: &[Packet]) -> Vec<(String, String)> {
    packets
        .iter()
        .filter_map(|packet| match packet {
            Packet::Publish(_, Some(p)) => Some(p.user_properties.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn has_tag_name(packets: &[Packet]) -> bool {
    user_properties(packets).iter().any(|(name, _)| {
        let name = name.trim();
        name.eq_ignore_ascii_case(DELIVERY_TAG) || name.eq_ignore_ascii_case(DELIVERY_TARGET)
    })
}

fn puback(pkid: u16) -> Event {
    Event::Client(Packet::PubAck(
        PubAck {
            pkid,
            reason: PubAckReason::Success,
        },
        None,
    ))
}

fn pubrec(pkid: u16, reason: PubRecReason) -> Event {
    Event::Client(Packet::PubRec(PubRec { pkid, reason }, None))
}

fn pubcomp(pkid: u16) -> Event {
    Event::Client(Packet::PubComp(
        PubComp {
            pkid,
            reason: PubCompReason::Success,
        },
        None,
    ))
}

#[tokio::test]
async fn router_publishes_lose_the_tag_and_report_it_once_per_acknowledgement() {
    for version in [Version::V4, Version::V5] {
        for receiver in [device("u1"), handler()] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                let case = format!("{version:?} {receiver:?} {qos:?}");
                let (gate, reported) = recording_gate();
                let mut session = open(&gate, receiver.clone(), version).await;
                let id = session.claim.id().to_owned();
                let written = feed(
                    &mut session,
                    Event::Router(tagged("u1_reply", qos, 7, 4, Some("s|g|1-0"))),
                );
                assert_eq!(written.client.len(), 1, "{case}");
                assert!(
                    !has_tag_name(&written.client),
                    "{case}: the tag was written"
                );
                // The other user properties are kept.
                assert_eq!(
                    user_properties(&written.client),
                    vec![("trace".to_owned(), "t".to_owned())],
                    "{case}"
                );
                let once = vec![(id.clone(), "s|g|1-0".to_owned())];
                match qos {
                    QoS::AtMostOnce => assert_eq!(*reported.lock(), once, "{case}"),
                    QoS::AtLeastOnce => {
                        assert!(reported.lock().is_empty(), "{case}: before the PUBACK");
                        let out = feed(&mut session, puback(7));
                        assert_eq!(out.router.len(), 1, "{case}: the PUBACK goes on");
                        assert_eq!(*reported.lock(), once, "{case}");
                        // A second PUBACK of the same id reports nothing.
                        feed(&mut session, puback(7));
                        assert_eq!(*reported.lock(), once, "{case}");
                    }
                    QoS::ExactlyOnce => {
                        feed(&mut session, pubrec(7, PubRecReason::Success));
                        assert!(reported.lock().is_empty(), "{case}: at the PUBREC");
                        feed(&mut session, pubcomp(7));
                        assert_eq!(*reported.lock(), once, "{case}");
                        feed(&mut session, pubcomp(7));
                        assert_eq!(*reported.lock(), once, "{case}");
                    }
                }
                assert_eq!(session.tags.len(), 0, "{case}: nothing kept");
            }
        }
    }
}

#[tokio::test]
async fn untagged_unwritten_and_refused_publishes() {
    let (gate, reported) = recording_gate();
    let mut session = open(&gate, device("u1"), Version::V5).await;
    let id = session.claim.id().to_owned();

    // No tag: nothing to report, nothing kept.
    feed(
        &mut session,
        Event::Router(tagged("u1_a", QoS::AtLeastOnce, 1, 4, None)),
    );
    feed(&mut session, puback(1));
    assert!(reported.lock().is_empty());

    // Too large for the client: not written, settled with the router, not
    // reported delivered (a command's owner delivers it again later), but
    // reported skipped (a reply's cursor does not wait for it).
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut out = Keep {
            max_payload: Some(10),
            ..Keep::default()
        };
        session.handle(
            Event::Router(tagged("u1_big", qos, 2, 100, Some("big"))),
            &mut out,
        );
        assert!(out.client.is_empty(), "{qos:?}");
        feed(&mut session, puback(2));
        feed(&mut session, pubcomp(2));
        assert_eq!(
            std::mem::take(&mut *reported.lock()),
            vec![(id.clone(), "skipped big".to_owned())],
            "{qos:?}"
        );
    }
    assert_eq!(session.tags.len(), 0);

    // Several in flight: each reported at its own acknowledgement, in the
    // order the client acknowledges.
    for pkid in 3..6u16 {
        let tag = format!("t{pkid}");
        feed(
            &mut session,
            Event::Router(tagged("u1_a", QoS::AtLeastOnce, pkid, 4, Some(&tag))),
        );
    }
    assert_eq!(session.tags.len(), 3);
    for pkid in [5u16, 3, 4] {
        feed(&mut session, puback(pkid));
    }
    let tags: Vec<String> = reported.lock().iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(tags, ["t5", "t3", "t4"]);
    assert!(reported.lock().iter().all(|(s, _)| *s == id));

    // A PUBREC refusing a QoS 2 publish ends its flow: reported then, once.
    reported.lock().clear();
    feed(
        &mut session,
        Event::Router(tagged("u1_a", QoS::ExactlyOnce, 9, 4, Some("refused"))),
    );
    feed(&mut session, pubrec(9, PubRecReason::UnspecifiedError));
    assert_eq!(*reported.lock(), vec![(id.clone(), "refused".to_owned())]);
    feed(&mut session, pubcomp(9));
    assert_eq!(reported.lock().len(), 1);
}

#[tokio::test]
async fn inbox_replies_lose_the_tag_and_report_it_once_written() {
    let (gate, reported) = recording_gate();
    let mut receiver = open(&gate, device("u2"), Version::V5).await;
    let id = receiver.claim.id().to_owned();
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![Filter {
            path: "u2_reply".to_owned(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }],
    };
    let out = feed(
        &mut receiver,
        Event::Client(Packet::Subscribe(subscribe, None)),
    );
    assert!(out.router.is_empty(), "served from the gate's inbox");
    // As the cluster injects a reply from another node: the local decision
    // puts it in the inbox.
    let Packet::Publish(publish, properties) =
        tagged("u2_reply", QoS::AtMostOnce, 0, 4, Some("r:{u2}|5-0"))
    else {
        panic!("a publish");
    };
    let routed = gate.delivery().route("u2_reply", &publish, &properties);
    assert!(!routed.needs_router);
    assert!(reported.lock().is_empty(), "not before it is written");
    let out = feed(&mut receiver, Event::InboxReady);
    assert_eq!(out.client.len(), 1);
    assert!(!has_tag_name(&out.client));
    assert_eq!(*reported.lock(), vec![(id, "r:{u2}|5-0".to_owned())]);
}

#[tokio::test]
async fn a_publish_aimed_at_another_session_is_settled_unwritten() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let (gate, reported) = recording_gate();
        let mut session = open(&gate, device("u3"), Version::V5).await;
        let id = session.claim.id().to_owned();
        // (target, packet id) -> written to this client
        for (target, pkid, written) in [("D:u3:other", 4, false), (id.as_str(), 5, true)] {
            let Packet::Publish(publish, Some(mut props)) =
                tagged("u3_reply", qos, pkid, 4, Some("r 7-0"))
            else {
                panic!("a publish");
            };
            props
                .user_properties
                .push((DELIVERY_TARGET.to_owned(), target.to_owned()));
            let out = feed(
                &mut session,
                Event::Router(Packet::Publish(publish, Some(props))),
            );
            let case = format!("{qos:?} aimed at {target}");
            assert_eq!(out.client.len(), usize::from(written), "{case}");
            assert!(
                user_properties(&out.client)
                    .iter()
                    .all(|(n, _)| n != DELIVERY_TARGET && n != DELIVERY_TAG),
                "{case}: nothing gate-internal written"
            );
            if written {
                feed(&mut session, puback(pkid));
                feed(&mut session, pubcomp(pkid));
                assert_eq!(
                    std::mem::take(&mut *reported.lock()),
                    vec![(id.clone(), "r 7-0".to_owned())],
                    "{case}"
                );
            } else {
                // Settled with the router as the client would have.
                let settled = match qos {
                    QoS::AtMostOnce => 0,
                    QoS::AtLeastOnce | QoS::ExactlyOnce => 1,
                };
                assert_eq!(out.router.len(), settled, "{case}");
                assert!(reported.lock().is_empty(), "{case}: nothing reported");
            }
        }
        assert_eq!(session.tags.len(), 0, "{qos:?}");
    }
}

#[tokio::test]
async fn a_clients_forged_tag_is_removed() {
    let forged = [
        (DELIVERY_TAG, "c:{sync:0}|g|1-0"),
        ("X-Gate-Tag", "f"),
        (" x-gate-tag ", "f"),
        (" X-Gate-For", "D:u1:other"),
        ("x-gate-tags", "kept"),
    ];
    for sender in [device("u1"), handler()] {
        for version in [Version::V4, Version::V5] {
            let (gate, reported) = recording_gate();
            let mut session = open(&gate, sender.clone(), version).await;
            let topic = match sender {
                Principal::Device(_) => SERVED,
                Principal::Handler(_) => "u1_reply",
            };
            let publish = Publish::with_qos(
                Bytes::from_static(topic.as_bytes()),
                Bytes::from_static(b"{}"),
                false,
                QoS::ExactlyOnce,
                3,
            );
            let packet = Packet::Publish(publish, Some(properties(None, &forged)));
            let out = feed(&mut session, Event::Client(packet));
            assert_eq!(out.router.len(), 1, "{sender:?} {version:?}");
            assert!(!has_tag_name(&out.router), "{sender:?} {version:?}");
            assert!(user_properties(&out.router).contains(&("x-gate-tags".into(), "kept".into())));
            assert!(reported.lock().is_empty());
        }
    }
}
