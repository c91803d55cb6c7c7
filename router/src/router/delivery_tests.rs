//! Tests of MQTT 5 delivery semantics in the router (patches 25-30, issue
//! 10): subscription options, subscription identifiers, overlapping
//! subscriptions, message expiry, the client's Receive Maximum, properties.
//! Driven synchronously like the tests of the parent module.

use super::*;
use crate::protocol::{PubAck, PubComp, PubRec, SubscribeProperties};

/// A client whose CONNECT carried `receive_maximum`.
fn connect_with(router: &mut Router, client_id: &str, clean: bool, receive_maximum: u16) -> Client {
    let connection = Connection::new(client_id.to_owned(), clean, false);
    let incoming = Incoming::new(client_id.to_owned());
    let (mut outgoing, wake) = Outgoing::new(client_id.to_owned());
    outgoing.set_receive_maximum(receive_maximum);
    let (inb, outb) = (incoming.buffer(), outgoing.buffer());
    router.events(
        0,
        Event::Connect {
            connection,
            incoming,
            outgoing,
        },
    );
    let id = *router.connection_map.get(client_id).expect("connected");
    let client = Client {
        id,
        incoming: inb,
        outgoing: outb,
        _wake: wake,
    };
    settle(router);
    client
}

/// Subscription options of one filter.
struct Options {
    qos: QoS,
    nolocal: bool,
    preserve_retain: bool,
    rule: RetainForwardRule,
    id: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            rule: RetainForwardRule::OnEverySubscribe,
            id: None,
        }
    }
}

impl Client {
    fn subscribe_with(&self, router: &mut Router, filter: &str, options: Options) {
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![SubFilter {
                path: filter.to_owned(),
                qos: options.qos,
                nolocal: options.nolocal,
                preserve_retain: options.preserve_retain,
                retain_forward_rule: options.rule,
            }],
        };
        let properties = options.id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        self.send(router, Packet::Subscribe(subscribe, properties));
    }

    fn publish_props(
        &self,
        router: &mut Router,
        topic: &str,
        payload: &str,
        (qos, pkid, retain): (QoS, u16, bool),
        properties: Option<PublishProperties>,
    ) {
        let publish = Publish {
            dup: false,
            qos,
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        };
        self.send(router, Packet::Publish(publish, properties));
    }

    /// The forwards among `take()`.
    fn forwards(&self) -> Vec<Forward> {
        self.take()
            .into_iter()
            .filter_map(|n| match n {
                Notification::Forward(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    fn puback(&self, router: &mut Router, pkid: u16) {
        self.send(
            router,
            Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
        );
    }
}

fn payload(forward: &Forward) -> String {
    String::from_utf8_lossy(&forward.publish.payload).into_owned()
}

fn ids(forward: &Forward) -> Vec<usize> {
    forward
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default()
}

fn router() -> Router {
    Router::new(0, config())
}

/// Patch 25, No Local (MQTT 5 3.8.3.1, MQTT-3.8.3-3): a client never gets
/// its own publishes on a No Local subscription, also after resuming its
/// session; others' arrive, and a plain subscription still gets its own.
#[test]
fn patch25_no_local_subscription_skips_own_publishes() {
    let mut router = router();
    let me = connect(&mut router, "me", false);
    let other = connect(&mut router, "other", true);
    let nolocal = Options {
        nolocal: true,
        ..Options::default()
    };
    me.subscribe_with(&mut router, "t", nolocal);
    me.subscribe(&mut router, "plain", QoS::AtMostOnce);
    me.take();
    me.publish(&mut router, "t", "mine", QoS::AtMostOnce, 0);
    other.publish(&mut router, "t", "theirs", QoS::AtMostOnce, 0);
    me.publish(&mut router, "plain", "mine too", QoS::AtMostOnce, 0);
    assert_eq!(me.publishes(), vec!["theirs", "mine too"]);

    // Retained messages too, and across a reconnect of the session.
    me.publish_with(&mut router, "t", "kept", QoS::AtMostOnce, 0, true, false);
    me.disconnect(&mut router);
    let me = connect(&mut router, "me", false);
    me.take();
    me.subscribe_with(
        &mut router,
        "t",
        Options {
            nolocal: true,
            ..Options::default()
        },
    );
    assert!(me.publishes().is_empty());

    // No Local on a shared subscription is a protocol error.
    me.subscribe_with(
        &mut router,
        "$share/g/t",
        Options {
            nolocal: true,
            ..Options::default()
        },
    );
    assert!(!router.connection_map.contains_key("me"));
}

/// Patch 26, Retain As Published and the retain flag of forwards (MQTT 5
/// 3.3.1.3): a live forward keeps the flag only for a Retain As Published
/// subscription; a retained message sent because of a subscription has it.
/// A zero-byte publish without the flag leaves the retained message.
#[test]
fn patch26_retain_as_published() {
    let mut router = router();
    let keeps = connect(&mut router, "keeps", true);
    let clears = connect(&mut router, "clears", true);
    let publisher = connect(&mut router, "publisher", true);
    keeps.subscribe_with(
        &mut router,
        "t",
        Options {
            preserve_retain: true,
            ..Options::default()
        },
    );
    clears.subscribe(&mut router, "t", QoS::AtMostOnce);
    publisher.publish_with(&mut router, "t", "r", QoS::AtMostOnce, 0, true, false);
    publisher.publish(&mut router, "t", "", QoS::AtMostOnce, 0);
    let kept: Vec<bool> = keeps.forwards().iter().map(|f| f.publish.retain).collect();
    let cleared: Vec<bool> = clears.forwards().iter().map(|f| f.publish.retain).collect();
    assert_eq!(kept, vec![true, false]);
    assert_eq!(cleared, vec![false, false]);

    let late = connect(&mut router, "late", true);
    late.subscribe(&mut router, "t", QoS::AtMostOnce);
    let got = late.forwards();
    assert_eq!(got.len(), 1, "the retained message survived");
    assert!(got[0].publish.retain);
    assert_eq!(payload(&got[0]), "r");
}

/// Patch 26, Retain Handling (MQTT 5 3.8.3.1): 0 sends retained messages
/// at every subscribe, 1 only when the subscription is new, 2 never.
#[test]
fn patch26_retain_handling() {
    let mut router = router();
    let publisher = connect(&mut router, "publisher", true);
    publisher.publish_with(&mut router, "t", "r", QoS::AtMostOnce, 0, true, false);
    let rule = |rule| Options {
        rule,
        ..Options::default()
    };

    let every = connect(&mut router, "every", true);
    every.subscribe_with(&mut router, "t", rule(RetainForwardRule::OnEverySubscribe));
    assert_eq!(every.publishes(), vec!["r"]);
    every.subscribe_with(&mut router, "t", rule(RetainForwardRule::OnEverySubscribe));
    assert_eq!(every.publishes(), vec!["r"], "again on resubscribe");

    let new = connect(&mut router, "new", true);
    new.subscribe_with(&mut router, "t", rule(RetainForwardRule::OnNewSubscribe));
    assert_eq!(new.publishes(), vec!["r"]);
    new.subscribe_with(&mut router, "t", rule(RetainForwardRule::OnNewSubscribe));
    assert!(new.publishes().is_empty(), "not on resubscribe");

    let never = connect(&mut router, "never", true);
    never.subscribe_with(&mut router, "t", rule(RetainForwardRule::Never));
    assert!(never.publishes().is_empty());

    // A resubscription replaces the options: live messages keep flowing,
    // once each.
    publisher.publish(&mut router, "t", "live", QoS::AtMostOnce, 0);
    assert_eq!(every.publishes(), vec!["live"]);
    assert_eq!(new.publishes(), vec!["live"]);
    assert_eq!(never.publishes(), vec!["live"]);
}

/// Patch 27, subscription identifiers (MQTT 5 3.3.2.3.8, MQTT-3.3.4-5):
/// overlapping subscriptions of one client get one copy each, each with
/// its own identifier and at its own QoS (so one at the highest granted QoS,
/// MQTT-3.3.4-2); a resubscription without an identifier drops it; the
/// identifier survives a resumed session.
#[test]
fn patch27_subscription_identifiers_per_subscription() {
    let mut router = router();
    let sub = connect(&mut router, "sub", false);
    let publisher = connect(&mut router, "publisher", true);
    sub.subscribe_with(
        &mut router,
        "a/+",
        Options {
            id: Some(7),
            ..Options::default()
        },
    );
    sub.subscribe_with(
        &mut router,
        "a/b",
        Options {
            qos: QoS::AtLeastOnce,
            id: Some(9),
            ..Options::default()
        },
    );
    sub.take();
    publisher.publish(&mut router, "a/b", "m", QoS::AtLeastOnce, 1);
    let mut got: Vec<(Vec<usize>, QoS)> = sub
        .forwards()
        .iter()
        .map(|f| (ids(f), f.publish.qos))
        .collect();
    got.sort_by_key(|(ids, _)| ids.clone());
    assert_eq!(
        got,
        vec![(vec![7], QoS::AtMostOnce), (vec![9], QoS::AtLeastOnce)]
    );
    sub.puback(&mut router, 1);

    // Resumed: the identifier is still there.
    sub.disconnect(&mut router);
    let sub = connect(&mut router, "sub", false);
    sub.take();
    publisher.publish(&mut router, "a/c", "n", QoS::AtMostOnce, 0);
    let got = sub.forwards();
    assert_eq!(got.iter().map(ids).collect::<Vec<_>>(), vec![vec![7]]);

    // Resubscribed without one: gone.
    sub.subscribe_with(&mut router, "a/+", Options::default());
    sub.take();
    publisher.publish(&mut router, "a/c", "o", QoS::AtMostOnce, 0);
    let got = sub.forwards();
    assert_eq!(got.len(), 1);
    assert!(ids(&got[0]).is_empty());
}

/// Patch 28, Message Expiry Interval (MQTT 5 3.3.2.3.3): a message queued
/// for an offline session or retained is not delivered once expired; one
/// still alive carries what is left of its interval, however many
/// subscribers read it (upstream aged the stored retained message again on
/// every read).
#[test]
fn patch28_message_expiry() {
    let mut router = router();
    let publisher = connect(&mut router, "publisher", true);
    let away = connect(&mut router, "away", false);
    away.subscribe(&mut router, "q", QoS::AtLeastOnce);
    away.disconnect(&mut router);
    let expiring = |secs| {
        Some(PublishProperties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        })
    };
    publisher.publish_props(
        &mut router,
        "q",
        "short",
        (QoS::AtLeastOnce, 1, false),
        expiring(1),
    );
    publisher.publish_props(
        &mut router,
        "q",
        "long",
        (QoS::AtLeastOnce, 2, false),
        expiring(100),
    );
    publisher.publish_props(
        &mut router,
        "r/short",
        "short",
        (QoS::AtMostOnce, 0, true),
        expiring(1),
    );
    publisher.publish_props(
        &mut router,
        "r/long",
        "long",
        (QoS::AtMostOnce, 0, true),
        expiring(3),
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let away = connect(&mut router, "away", false);
    let got = away.forwards();
    assert_eq!(got.iter().map(payload).collect::<Vec<_>>(), vec!["long"]);
    let left = got[0].properties.as_ref().unwrap().message_expiry_interval;
    assert_eq!(left, Some(99));

    for reader in ["first", "second", "third"] {
        let client = connect(&mut router, reader, true);
        client.subscribe(&mut router, "r/+", QoS::AtMostOnce);
        let got = client.forwards();
        assert_eq!(got.iter().map(payload).collect::<Vec<_>>(), vec!["long"]);
        let left = got[0].properties.as_ref().unwrap().message_expiry_interval;
        assert_eq!(left, Some(2), "{reader}");
    }
}

/// Patch 29, the client's Receive Maximum (MQTT 5 3.3.4, MQTT-3.3.4-9): no
/// more QoS 1 deliveries unacknowledged than it allows; the others wait,
/// in order, and none is lost, retained messages included (upstream sent
/// up to 100 and dropped retained messages beyond its free slots).
#[test]
fn patch29_receive_maximum_holds_back_deliveries() {
    let mut router = router();
    let publisher = connect(&mut router, "publisher", true);
    for i in 0..5 {
        publisher.publish_with(
            &mut router,
            &format!("r/{i}"),
            "retained",
            QoS::AtLeastOnce,
            i + 1,
            true,
            false,
        );
    }
    let sub = connect_with(&mut router, "sub", true, 2);
    sub.subscribe(&mut router, "r/#", QoS::AtLeastOnce);
    sub.subscribe(&mut router, "live", QoS::AtLeastOnce);
    // The retained ones wait for slots; more arrive live.
    for i in 0..5 {
        publisher.publish(
            &mut router,
            "live",
            &format!("{i}"),
            QoS::AtLeastOnce,
            i + 10,
        );
    }
    let mut got = Vec::new();
    for _ in 0..20 {
        let forwards = sub.forwards();
        if forwards.is_empty() {
            break;
        }
        assert!(forwards.len() <= 2, "window of 2, got {}", forwards.len());
        for f in forwards {
            got.push(payload(&f));
            sub.puback(&mut router, f.publish.pkid);
        }
    }
    assert_eq!(
        got.iter().filter(|p| *p == "retained").count(),
        5,
        "{got:?}"
    );
    let live: Vec<&String> = got.iter().filter(|p| *p != "retained").collect();
    assert_eq!(live, vec!["0", "1", "2", "3", "4"]);
}

/// Patch 29: a QoS 2 delivery holds its slot until PUBCOMP (the send quota
/// comes back on PUBACK or PUBCOMP, MQTT 5 4.9).
#[test]
fn patch29_qos2_holds_a_slot_until_pubcomp() {
    let mut router = router();
    let publisher = connect(&mut router, "publisher", true);
    let sub = connect_with(&mut router, "sub", true, 1);
    sub.subscribe(&mut router, "t", QoS::ExactlyOnce);
    sub.take();
    publisher.publish(&mut router, "t", "one", QoS::ExactlyOnce, 1);
    publisher.send(&mut router, super::pubrel(1));
    publisher.publish(&mut router, "t", "two", QoS::ExactlyOnce, 2);
    publisher.send(&mut router, super::pubrel(2));
    let first = sub.forwards();
    assert_eq!(first.iter().map(payload).collect::<Vec<_>>(), vec!["one"]);
    let pkid = first[0].publish.pkid;
    sub.send(
        &mut router,
        Packet::PubRec(
            PubRec {
                pkid,
                reason: PubRecReason::Success,
            },
            None,
        ),
    );
    assert!(
        sub.forwards().is_empty(),
        "PUBREL pending: the slot is held"
    );
    sub.send(
        &mut router,
        Packet::PubComp(
            PubComp {
                pkid,
                reason: PubCompReason::Success,
            },
            None,
        ),
    );
    assert_eq!(
        sub.forwards().iter().map(payload).collect::<Vec<_>>(),
        vec!["two"]
    );
}

/// Properties (MQTT 5 3.3.2.3): forwarded unaltered and in order, live,
/// queued for an offline session and retained.
#[test]
fn patch28_properties_are_forwarded_unaltered() {
    let mut router = router();
    let publisher = connect(&mut router, "publisher", true);
    let live = connect(&mut router, "live", true);
    live.subscribe(&mut router, "p", QoS::AtLeastOnce);
    let away = connect(&mut router, "away", false);
    away.subscribe(&mut router, "p", QoS::AtLeastOnce);
    away.disconnect(&mut router);
    live.take();
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "1".into()),
        ],
        ..Default::default()
    };
    publisher.publish_props(
        &mut router,
        "p",
        "x",
        (QoS::AtLeastOnce, 1, true),
        Some(properties.clone()),
    );
    let late = connect(&mut router, "late", true);
    late.subscribe(&mut router, "p", QoS::AtLeastOnce);
    let away = connect(&mut router, "away", false);
    for (who, client) in [("live", &live), ("retained", &late), ("queued", &away)] {
        let got = client.forwards();
        assert_eq!(got.len(), 1, "{who}");
        assert_eq!(got[0].properties.as_ref(), Some(&properties), "{who}");
    }
}
