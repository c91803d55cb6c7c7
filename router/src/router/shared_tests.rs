//! Tests of shared subscriptions' deliveries (patched: ours): publishes
//! meant for one audience (`Audience`), and what a clean member that leaves
//! with unacknowledged deliveries held.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use super::tests::{config, connect, settle, Client};
use super::*;
use crate::protocol::{PubAck, PubAckReason};
use crate::router::shared_subs::Audience;

fn router() -> Router {
    Router::new(0, config())
}

/// A link the embedding program opens for itself, publishing to `audience`
/// only (as `LinkBuilder::audience` makes it).
fn connect_for(router: &mut Router, client_id: &str, audience: Audience) -> Client {
    let client = connect(router, client_id, true);
    let connection = router.connections.get_mut(client.id).expect("connected");
    if let Some(origin) = audience.origin() {
        connection.origin = origin;
    }
    client
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Two groups and plain subscribers of one topic: a publish meant for one
/// group's subscription reaches that group only, one meant for plain
/// subscriptions reaches those only (a wildcard one too), and a client's
/// publish reaches every subscription, as MQTT says.
#[test]
fn a_publish_for_one_audience_reaches_only_it() {
    let mut router = router();
    let a = connect(&mut router, "a", true);
    let b = connect(&mut router, "b", true);
    let plain = connect(&mut router, "plain", true);
    let wild = connect(&mut router, "wild", true);
    a.subscribe(&mut router, "$share/a/sync", QoS::AtMostOnce);
    b.subscribe(&mut router, "$share/b/sync", QoS::AtMostOnce);
    plain.subscribe(&mut router, "sync", QoS::AtMostOnce);
    wild.subscribe(&mut router, "#", QoS::AtMostOnce);
    for client in [&a, &b, &plain, &wild] {
        client.take();
    }

    let for_a = connect_for(
        &mut router,
        "X:for-a",
        Audience::shared_subscription("a", "sync"),
    );
    let for_b = connect_for(
        &mut router,
        "X:for-b",
        Audience::shared_subscription("b", "sync"),
    );
    let for_plain = connect_for(&mut router, "X:plain", Audience::plain_subscriptions());
    let device = connect(&mut router, "device", true);

    for_a.publish(&mut router, "sync", "to-a", QoS::AtMostOnce, 0);
    for_b.publish(&mut router, "sync", "to-b", QoS::AtMostOnce, 0);
    for_plain.publish(&mut router, "sync", "to-plain", QoS::AtMostOnce, 0);
    device.publish(&mut router, "sync", "to-all", QoS::AtMostOnce, 0);

    assert_eq!(a.publishes(), vec!["to-a", "to-all"]);
    assert_eq!(b.publishes(), vec!["to-b", "to-all"]);
    assert_eq!(plain.publishes(), vec!["to-plain", "to-all"]);
    assert_eq!(wild.publishes(), vec!["to-plain", "to-all"]);
}

/// Round robin reads one publish at a time: a group whose log interleaves
/// publishes for another group skips them and goes on at once (no stall
/// until the next publish), each of its publishes delivered once.
#[test]
fn a_group_reads_past_publishes_for_another_group() {
    let mut router = router();
    let a1 = connect(&mut router, "a1", true);
    let a2 = connect(&mut router, "a2", true);
    let b1 = connect(&mut router, "b1", true);
    a1.subscribe(&mut router, "$share/a/sync", QoS::AtLeastOnce);
    a2.subscribe(&mut router, "$share/a/sync", QoS::AtLeastOnce);
    b1.subscribe(&mut router, "$share/b/sync", QoS::AtLeastOnce);
    for client in [&a1, &a2, &b1] {
        client.take();
    }
    let for_a = connect_for(
        &mut router,
        "X:for-a",
        Audience::shared_subscription("a", "sync"),
    );
    let for_b = connect_for(
        &mut router,
        "X:for-b",
        Audience::shared_subscription("b", "sync"),
    );
    // Several publishes queued before the router runs: one batch.
    for i in 0..10u16 {
        let publish = |topic: &str, payload: String| {
            Packet::Publish(
                Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: bytes::Bytes::copy_from_slice(topic.as_bytes()),
                    pkid: i + 1,
                    payload: bytes::Bytes::from(payload),
                },
                None,
            )
        };
        for_b.queue(publish("sync", format!("b{i}")));
        for_a.queue(publish("sync", format!("a{i}")));
    }
    router.events(for_b.id, Event::DeviceData);
    router.events(for_a.id, Event::DeviceData);
    settle(&mut router);

    let mut group_a = a1.publishes();
    let from_a2 = a2.publishes();
    assert!(!group_a.is_empty() && !from_a2.is_empty(), "both members");
    group_a.extend(from_a2);
    let expected_a: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    assert_eq!(sorted(group_a), sorted(expected_a));
    let expected_b: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    assert_eq!(b1.publishes(), expected_b);
}

/// The publishes among `client.take()`: (payload, packet id).
fn forwards(client: &Client) -> Vec<(String, u16)> {
    client
        .take()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Forward(f) => Some((
                String::from_utf8_lossy(&f.publish.payload).into_owned(),
                f.publish.pkid,
            )),
            _ => None,
        })
        .collect()
}

fn puback(client: &Client, router: &mut Router, pkid: u16) {
    let ack = PubAck {
        pkid,
        reason: PubAckReason::Success,
    };
    client.send(router, Packet::PubAck(ack, None));
}

/// A clean member of a group leaves with QoS 1 deliveries unacknowledged
/// (the log was emptied under them meanwhile: the group read it all): the
/// other member gets them. Upstream dropped them with the clean session.
#[test]
fn a_clean_member_leaving_gives_its_unacked_publishes_to_the_group() {
    let mut router = router();
    let a = connect(&mut router, "a", true);
    let b = connect(&mut router, "b", true);
    a.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    b.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    a.take();
    b.take();
    let device = connect(&mut router, "device", true);
    for i in 0..6u16 {
        device.publish(
            &mut router,
            "cmd",
            &format!("c{i}"),
            QoS::AtLeastOnce,
            i + 1,
        );
    }
    let held_by_a: Vec<String> = forwards(&a).into_iter().map(|(p, _)| p).collect();
    let mut got_b = Vec::new();
    for (payload, pkid) in forwards(&b) {
        got_b.push(payload);
        puback(&b, &mut router, pkid);
    }
    assert!(!held_by_a.is_empty() && !got_b.is_empty(), "both members");
    // The log was emptied; what was in flight then was kept apart (what
    // `b` acknowledged since goes at the next emptying).
    assert_eq!(
        stored(&router, "cmd"),
        0,
        "the group read its log to the end"
    );
    let held: Vec<String> = router.shared_subscriptions["g/cmd"]
        .held
        .iter()
        .map(|(p, _)| String::from_utf8_lossy(&p.publish.payload).into_owned())
        .collect();
    assert!(held_by_a.iter().all(|p| held.contains(p)), "{held:?}");

    a.disconnect(&mut router);
    let again: Vec<String> = forwards(&b).into_iter().map(|(p, _)| p).collect();
    assert_eq!(again, held_by_a, "b gets what a left unacknowledged");
    got_b.extend(again);
    let every: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    assert_eq!(sorted(got_b), every);
}

/// The only member leaves with QoS 1 deliveries unacknowledged: the group
/// is kept, holding its log, and the next member gets them, then what was
/// published meanwhile. Once it acknowledged everything and left, nothing
/// is kept.
#[test]
fn a_sole_clean_member_leaving_keeps_its_unacked_for_the_next_member() {
    let mut router = router();
    let a = connect(&mut router, "a", true);
    a.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    a.take();
    let device = connect(&mut router, "device", true);
    for i in 0..3u16 {
        device.publish(
            &mut router,
            "cmd",
            &format!("c{i}"),
            QoS::AtLeastOnce,
            i + 1,
        );
    }
    assert_eq!(forwards(&a).len(), 3);
    a.disconnect(&mut router);
    assert!(router.shared_subscriptions["g/cmd"].kept);
    device.publish(&mut router, "cmd", "c3", QoS::AtLeastOnce, 4);

    let c = connect(&mut router, "c", true);
    c.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    let got = forwards(&c);
    let payloads: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(payloads, vec!["c0", "c1", "c2", "c3"]);
    assert!(!router.shared_subscriptions["g/cmd"].kept);
    for (_, pkid) in got {
        puback(&c, &mut router, pkid);
    }
    c.disconnect(&mut router);
    assert!(router.shared_subscriptions.is_empty());
    assert!(router.datalog.filter_index("cmd").is_none(), "log freed");
}

/// What a clean member left goes back to its own group only: a second
/// group and a plain subscriber of the same topic get nothing again.
#[test]
fn unacked_publishes_go_back_to_their_group_only() {
    let mut router = router();
    let a = connect(&mut router, "a", true);
    let b = connect(&mut router, "b", true);
    let other = connect(&mut router, "other", true);
    let plain = connect(&mut router, "plain", true);
    a.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    b.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    other.subscribe(&mut router, "$share/h/cmd", QoS::AtLeastOnce);
    plain.subscribe(&mut router, "cmd", QoS::AtMostOnce);
    for client in [&a, &b, &other, &plain] {
        client.take();
    }
    let device = connect(&mut router, "device", true);
    device.publish(&mut router, "cmd", "one", QoS::AtLeastOnce, 1);
    device.publish(&mut router, "cmd", "two", QoS::AtLeastOnce, 2);
    let held_by_a: Vec<String> = forwards(&a).into_iter().map(|(p, _)| p).collect();
    assert_eq!(held_by_a.len(), 1);
    for (_, pkid) in forwards(&b) {
        puback(&b, &mut router, pkid);
    }
    assert_eq!(forwards(&other).len(), 2);
    assert_eq!(plain.publishes().len(), 2);

    a.disconnect(&mut router);
    let again: Vec<String> = forwards(&b).into_iter().map(|(p, _)| p).collect();
    assert_eq!(again, held_by_a);
    assert!(forwards(&other).is_empty());
    assert!(plain.publishes().is_empty());
}

/// Publishes stored in the log of `filter`.
fn stored(router: &Router, filter: &str) -> usize {
    let idx = router.datalog.filter_index(filter).expect("a log");
    let mut out = Vec::new();
    router.datalog.native[idx]
        .log
        .readv((0, 0), u64::MAX / 2, &mut out)
        .unwrap();
    out.len()
}

/// What a group holds apart for its clean members is at most what they
/// have in flight: what they acknowledged goes at the next emptying.
#[test]
fn held_publishes_are_only_those_still_in_flight() {
    let mut router = router();
    let a = connect(&mut router, "a", true);
    let b = connect(&mut router, "b", true);
    a.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    b.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    a.take();
    b.take();
    let device = connect(&mut router, "device", true);
    for i in 0..8u16 {
        device.publish(
            &mut router,
            "cmd",
            &format!("c{i}"),
            QoS::AtLeastOnce,
            i + 1,
        );
    }
    assert!(!router.shared_subscriptions["g/cmd"].held.is_empty());
    for client in [&a, &b] {
        for (_, pkid) in forwards(client) {
            puback(client, &mut router, pkid);
        }
    }
    device.publish(&mut router, "cmd", "last", QoS::AtLeastOnce, 9);
    let held: Vec<String> = router.shared_subscriptions["g/cmd"]
        .held
        .iter()
        .map(|(p, _)| String::from_utf8_lossy(&p.publish.payload).into_owned())
        .collect();
    assert_eq!(held, vec!["last"]);
    assert_eq!(stored(&router, "cmd"), 0);
}
