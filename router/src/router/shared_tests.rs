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
