//! Tests of the router's state machine, driven synchronously through
//! `Router::events` and `Router::consume` (patched: ours, not upstream's).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use super::*;
use crate::protocol::{Filter as SubFilter, RetainForwardRule, Subscribe, Unsubscribe};
use crate::router::{Ack, Connection};
use crate::segments::Storage;
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::Arc;

pub(super) fn config() -> RouterConfig {
    RouterConfig {
        max_segment_size: 1024 * 1024,
        max_connections: 100,
        max_segment_count: 10,
        max_outgoing_packet_count: 200,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::RoundRobin,
    }
}

/// One client of the router under test: what a link would hold.
pub(super) struct Client {
    pub id: ConnectionId,
    incoming: Arc<Mutex<VecDeque<Packet>>>,
    outgoing: Arc<Mutex<VecDeque<Notification>>>,
    // Keeps the router's wake-up channel open.
    _wake: flume::Receiver<()>,
}

pub(super) fn connect(router: &mut Router, client_id: &str, clean: bool) -> Client {
    let connection = Connection::new(client_id.to_owned(), clean, false);
    let incoming = Incoming::new(client_id.to_owned());
    let (outgoing, wake) = Outgoing::new(client_id.to_owned());
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

/// Runs the router until it has nothing left to do.
pub(super) fn settle(router: &mut Router) {
    for _ in 0..1000 {
        if router.consume().is_none() {
            return;
        }
    }
    panic!("router did not settle");
}

impl Client {
    /// Queues `packet` without telling the router (see `Router::events`).
    pub fn queue(&self, packet: Packet) {
        self.incoming.lock().push_back(packet);
    }

    pub fn send(&self, router: &mut Router, packet: Packet) {
        self.incoming.lock().push_back(packet);
        router.events(self.id, Event::DeviceData);
        settle(router);
    }

    pub fn subscribe(&self, router: &mut Router, filter: &str, qos: QoS) {
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![SubFilter {
                path: filter.to_owned(),
                qos,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            }],
        };
        self.send(router, Packet::Subscribe(subscribe, None));
    }

    pub fn unsubscribe(&self, router: &mut Router, filter: &str) {
        let unsubscribe = Unsubscribe {
            pkid: 2,
            filters: vec![filter.to_owned()],
        };
        self.send(router, Packet::Unsubscribe(unsubscribe, None));
    }

    pub fn publish(&self, router: &mut Router, topic: &str, payload: &str, qos: QoS, pkid: u16) {
        self.publish_with(router, topic, payload, qos, pkid, false, false);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn publish_with(
        &self,
        router: &mut Router,
        topic: &str,
        payload: &str,
        qos: QoS,
        pkid: u16,
        retain: bool,
        dup: bool,
    ) {
        let publish = Publish {
            dup,
            qos,
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        };
        self.send(router, Packet::Publish(publish, None));
    }

    pub fn disconnect(&self, router: &mut Router) {
        router.events(self.id, Event::Disconnect);
        settle(router);
    }

    /// Everything the router sent this client since the last call.
    pub fn take(&self) -> Vec<Notification> {
        self.outgoing.lock().drain(..).collect()
    }

    /// The payloads of the publishes among `take()`.
    pub fn publishes(&self) -> Vec<String> {
        self.take()
            .into_iter()
            .filter_map(|n| match n {
                Notification::Forward(f) => {
                    Some(String::from_utf8_lossy(&f.publish.payload).into_owned())
                }
                _ => None,
            })
            .collect()
    }

    /// The acks among `take()`.
    pub fn acks(&self) -> Vec<Ack> {
        self.take()
            .into_iter()
            .filter_map(|n| match n {
                Notification::DeviceAck(ack) => Some(ack),
                _ => None,
            })
            .collect()
    }
}

fn router() -> Router {
    Router::new(0, config())
}

/// Crash A: the only member of a shared group, with a persistent session,
/// goes away while a QoS 1 delivery to it is unacknowledged. Upstream
/// `expect`ed the group (already dropped as empty) and the router panicked.
#[test]
fn persistent_sole_shared_member_leaves_with_unacked_delivery() {
    let mut router = router();
    let handler = connect(&mut router, "handler", false);
    handler.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    handler.take();
    let device = connect(&mut router, "device", true);
    device.publish(&mut router, "cmd", "one", QoS::AtLeastOnce, 1);
    assert_eq!(handler.publishes(), vec!["one".to_owned()]);

    // No PUBACK: the delivery is in flight when the session goes.
    handler.disconnect(&mut router);
    assert!(router.shared_subscriptions.is_empty(), "empty group freed");

    // The router still serves everyone, and the session's shared
    // subscription survived: on reconnect the unacknowledged message is
    // delivered again, and so are the ones published meanwhile.
    device.publish(&mut router, "cmd", "two", QoS::AtLeastOnce, 2);
    let handler = connect(&mut router, "handler", false);
    let got = handler.publishes();
    assert_eq!(got, vec!["one".to_owned(), "two".to_owned()]);
    assert!(router.shared_subscriptions["g/cmd"].contains("handler"));
}

/// A persistent member of a group with other members: its unacknowledged
/// delivery goes back to the group, and the router survives.
#[test]
fn persistent_shared_member_leaves_group_with_others() {
    let mut router = router();
    let a = connect(&mut router, "a", false);
    let b = connect(&mut router, "b", true);
    a.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    b.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    let device = connect(&mut router, "device", true);
    device.publish(&mut router, "cmd", "one", QoS::AtLeastOnce, 1);
    let first = a.publishes();
    assert_eq!(first.len(), 1);
    a.disconnect(&mut router);
    device.publish(&mut router, "cmd", "two", QoS::AtLeastOnce, 2);
    let got = b.publishes();
    assert!(got.contains(&"two".to_owned()), "{got:?}");
}

/// Crash B: a retained message on a topic whose first character is
/// multi-byte meets a wildcard filter (upstream sliced `topic[..1]`).
#[test]
fn multibyte_first_character_meets_wildcards() {
    let mut router = router();
    let publisher = connect(&mut router, "publisher", true);
    let early = connect(&mut router, "early", true);
    early.subscribe(&mut router, "+/x", QoS::AtMostOnce);
    early.take();
    publisher.publish_with(
        &mut router,
        "é/x",
        "retained",
        QoS::AtMostOnce,
        0,
        true,
        false,
    );
    assert_eq!(early.publishes().len(), 1);

    let late = connect(&mut router, "late", true);
    late.subscribe(&mut router, "#", QoS::AtMostOnce);
    assert_eq!(late.publishes(), vec!["retained".to_owned()]);
    assert!(protocol::matches("é/x", "+/x"));
    assert!(!protocol::matches("$é/x", "#"));
}

fn pubrel(pkid: u16) -> Packet {
    Packet::PubRel(
        PubRel {
            pkid,
            reason: PubRelReason::Success,
        },
        None,
    )
}

/// A retransmitted (DUP) QoS 2 publish whose pkid awaits PUBREL is
/// acknowledged again but stored once: one delivery, and the next message
/// is not lost (upstream stored it twice and released by queue order).
#[test]
fn qos2_retransmission_is_delivered_once() {
    let mut router = router();
    let sub = connect(&mut router, "sub", true);
    sub.subscribe(&mut router, "t", QoS::AtMostOnce);
    sub.take();
    let publisher = connect(&mut router, "pub", true);
    publisher.take();

    publisher.publish_with(&mut router, "t", "one", QoS::ExactlyOnce, 7, false, false);
    publisher.publish_with(&mut router, "t", "one", QoS::ExactlyOnce, 7, false, true);
    let recs = publisher.acks();
    assert_eq!(recs.len(), 2, "each copy gets its PUBREC: {recs:?}");
    assert!(recs
        .iter()
        .all(|a| matches!(a, Ack::PubRec(r) if r.pkid == 7)));
    assert_eq!(router.ackslog[publisher.id].awaiting_pubrel(), 1);
    assert!(sub.publishes().is_empty(), "nothing before PUBREL");

    publisher.send(&mut router, pubrel(7));
    publisher.publish_with(&mut router, "t", "two", QoS::ExactlyOnce, 8, false, false);
    publisher.send(&mut router, pubrel(8));
    let got = sub.publishes();
    assert_eq!(got, vec!["one".to_owned(), "two".to_owned()]);
    assert_eq!(router.ackslog[publisher.id].awaiting_pubrel(), 0);
}

/// PUBRELs release the publish of their own pkid, in PUBREL order.
#[test]
fn qos2_pubrel_releases_its_own_pkid() {
    let mut router = router();
    let sub = connect(&mut router, "sub", true);
    sub.subscribe(&mut router, "t", QoS::AtMostOnce);
    let publisher = connect(&mut router, "pub", true);
    publisher.publish(&mut router, "t", "a", QoS::ExactlyOnce, 1);
    publisher.publish(&mut router, "t", "b", QoS::ExactlyOnce, 2);
    sub.take();
    publisher.send(&mut router, pubrel(2));
    assert_eq!(sub.publishes(), vec!["b".to_owned()]);
    publisher.send(&mut router, pubrel(1));
    assert_eq!(sub.publishes(), vec!["a".to_owned()]);
}

/// A PUBREL for a pkid with nothing recorded, and a PUBREL with
/// properties, are both answered with PUBCOMP and keep the connection.
#[test]
fn qos2_unknown_pubrel_gets_pubcomp() {
    let mut router = router();
    let publisher = connect(&mut router, "pub", true);
    publisher.take();
    publisher.send(&mut router, pubrel(42));
    let acks = publisher.acks();
    assert!(
        matches!(
            acks.as_slice(),
            [Ack::PubComp(PubComp {
                pkid: 42,
                reason: PubCompReason::PacketIdentifierNotFound
            })]
        ),
        "{acks:?}"
    );
    assert!(router.connection_map.contains_key("pub"), "still connected");

    let sub = connect(&mut router, "sub", true);
    sub.subscribe(&mut router, "t", QoS::AtMostOnce);
    sub.take();
    publisher.publish(&mut router, "t", "p", QoS::ExactlyOnce, 3);
    let with_props = Packet::PubRel(
        PubRel {
            pkid: 3,
            reason: PubRelReason::Success,
        },
        Some(crate::protocol::PubRelProperties {
            reason_string: Some("why".to_owned()),
            user_properties: vec![],
        }),
    );
    publisher.send(&mut router, with_props);
    assert_eq!(sub.publishes(), vec!["p".to_owned()]);
    assert!(publisher.acks().iter().any(|a| matches!(
        a,
        Ack::PubComp(PubComp {
            pkid: 3,
            reason: PubCompReason::Success
        })
    )));
}

/// The router's QoS 2 state per connection is capped: past the cap the
/// connection is closed with 0x93 and its state freed.
#[test]
fn qos2_awaiting_pubrel_is_capped() {
    let mut router = router();
    let publisher = connect(&mut router, "pub", true);
    for pkid in 1..=(super::super::logs::MAX_AWAITING_PUBREL as u16) {
        let publish = Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: Bytes::from_static(b"t"),
            pkid,
            payload: Bytes::from_static(b"x"),
        };
        publisher
            .incoming
            .lock()
            .push_back(Packet::Publish(publish, None));
    }
    router.events(publisher.id, Event::DeviceData);
    settle(&mut router);
    assert_eq!(
        router.ackslog[publisher.id].awaiting_pubrel(),
        super::super::logs::MAX_AWAITING_PUBREL
    );
    publisher.publish(&mut router, "t", "one too many", QoS::ExactlyOnce, 60000);
    assert!(!router.connection_map.contains_key("pub"), "disconnected");
    let last = publisher.take().into_iter().last();
    assert!(
        matches!(
            last,
            Some(Notification::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::ReceiveMaximumExceeded
                },
                _
            ))
        ),
        "{last:?}"
    );
}

fn assert_all_freed(router: &Router) {
    assert_eq!(
        router.datalog.filter_count(),
        (0, 0, 0, 0),
        "logs and indexes"
    );
    assert!(router.subscription_map.is_empty(), "subscription map");
    assert!(router.shared_subscriptions.is_empty(), "shared groups");
    assert!(router.filter_readers.is_empty(), "reader counts");
    assert!(router.persistent_readers.is_empty(), "persistent readers");
}

/// Unsubscribing the last subscriber of a filter frees its log and every
/// entry pointing to it: the maps shrink back to empty.
#[test]
fn unsubscribe_frees_filters() {
    let mut router = router();
    let sub = connect(&mut router, "sub", false);
    let publisher = connect(&mut router, "pub", true);
    let filters: Vec<String> = (0..50).map(|i| format!("user{i}_reply")).collect();
    for f in &filters {
        sub.subscribe(&mut router, f, QoS::AtLeastOnce);
    }
    sub.subscribe(&mut router, "+/wild", QoS::AtMostOnce);
    sub.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    for f in &filters {
        publisher.publish(&mut router, f, "x", QoS::AtMostOnce, 0);
    }
    publisher.publish(&mut router, "a/wild", "w", QoS::AtMostOnce, 0);
    publisher.publish(&mut router, "cmd", "c", QoS::AtMostOnce, 0);
    assert_eq!(router.datalog.filter_count().0, 52);
    assert_eq!(sub.publishes().len(), 52);

    for f in &filters {
        sub.unsubscribe(&mut router, f);
    }
    sub.unsubscribe(&mut router, "+/wild");
    sub.unsubscribe(&mut router, "$share/g/cmd");
    assert_all_freed(&router);

    // Freed slots are reused without crossing wires.
    sub.subscribe(&mut router, "again", QoS::AtMostOnce);
    sub.take();
    publisher.publish(&mut router, "user0_reply", "lost", QoS::AtMostOnce, 0);
    publisher.publish(&mut router, "again", "found", QoS::AtMostOnce, 0);
    assert_eq!(sub.publishes(), vec!["found".to_owned()]);
}

/// A clean session's disconnect frees its filters; a persistent session's
/// keeps them (it comes back to read them) until a clean start ends it.
/// Retained messages are not in the filters' logs and survive.
#[test]
fn disconnect_frees_filters_of_clean_sessions_only() {
    let mut router = router();
    let publisher = connect(&mut router, "pub", true);
    let clean = connect(&mut router, "clean", true);
    clean.subscribe(&mut router, "t/+", QoS::AtMostOnce);
    clean.subscribe(&mut router, "$share/g/t/1", QoS::AtMostOnce);
    publisher.publish_with(&mut router, "t/1", "kept", QoS::AtMostOnce, 0, true, false);
    clean.disconnect(&mut router);
    assert_all_freed(&router);

    let persistent = connect(&mut router, "persistent", false);
    persistent.subscribe(&mut router, "t/+", QoS::AtLeastOnce);
    assert_eq!(
        persistent.publishes(),
        vec!["kept".to_owned()],
        "retained survived"
    );
    persistent.disconnect(&mut router);
    assert_eq!(
        router.datalog.filter_count().0,
        1,
        "kept for the offline session"
    );
    publisher.publish(&mut router, "t/2", "while away", QoS::AtMostOnce, 0);
    let back = connect(&mut router, "persistent", false);
    assert_eq!(back.publishes(), vec!["while away".to_owned()]);
    back.disconnect(&mut router);

    // The session's expiry: a clean start under its client id ends it.
    let ended = connect(&mut router, "persistent", true);
    ended.disconnect(&mut router);
    assert_all_freed(&router);
}

// ---- One test per change from upstream (DESIGN.md), each failing without it ----

/// Patch 1: literal filters are found by lookup; only wildcards are kept
/// for scanning, and `$` topics match no wildcard.
#[test]
fn patch1_literal_filters_are_not_scanned() {
    let mut router = router();
    let sub = connect(&mut router, "sub", true);
    sub.subscribe(&mut router, "a/b", QoS::AtMostOnce);
    sub.subscribe(&mut router, "a/+", QoS::AtMostOnce);
    sub.subscribe(&mut router, "#", QoS::AtMostOnce);
    assert_eq!(router.datalog.filter_count().3, 2, "only wildcards scanned");
    assert_eq!(router.datalog.matches("a/b").map(|v| v.len()), Some(3));
    assert_eq!(router.datalog.matches("$SYS/a").map(|v| v.len()), Some(0));
}

/// Patch 4: one group over two filters delivers on both, and unsubscribing
/// one filter leaves only that filter's group.
#[test]
fn patch4_groups_are_keyed_by_group_and_filter() {
    let mut router = router();
    let handler = connect(&mut router, "h", true);
    handler.subscribe(
        &mut router,
        "$share/contacts/request_contact",
        QoS::AtMostOnce,
    );
    handler.subscribe(
        &mut router,
        "$share/contacts/accept_contact",
        QoS::AtMostOnce,
    );
    let device = connect(&mut router, "d", true);
    handler.take();
    device.publish(&mut router, "request_contact", "r", QoS::AtMostOnce, 0);
    device.publish(&mut router, "accept_contact", "a", QoS::AtMostOnce, 0);
    assert_eq!(handler.publishes(), vec!["r".to_owned(), "a".to_owned()]);

    handler.unsubscribe(&mut router, "$share/contacts/request_contact");
    device.publish(&mut router, "accept_contact", "a2", QoS::AtMostOnce, 0);
    assert_eq!(handler.publishes(), vec!["a2".to_owned()]);
    assert!(router
        .shared_subscriptions
        .contains_key("contacts/accept_contact"));
    assert!(!router
        .shared_subscriptions
        .contains_key("contacts/request_contact"));
}

/// Patch 7: a clean session leaves no record behind.
#[test]
fn patch7_clean_session_leaves_no_graveyard_record() {
    let mut router = router();
    let c = connect(&mut router, "c", true);
    c.disconnect(&mut router);
    assert!(router.graveyard.retrieve("c").is_none());
}

/// Patch 7b: a shared subscriber whose outgoing buffer fills gets each
/// message once (the group's cursor moves before the buffer-full return).
#[test]
fn patch7b_full_buffer_does_not_duplicate_shared_deliveries() {
    let mut router = router();
    let handler = connect(&mut router, "h", true);
    handler.subscribe(&mut router, "$share/g/echo", QoS::AtMostOnce);
    handler.take();
    let device = connect(&mut router, "d", true);
    let count = MAX_CHANNEL_CAPACITY * 2;
    for i in 0..count {
        device.incoming.lock().push_back(Packet::Publish(
            Publish::new(
                Bytes::from_static(b"echo"),
                Bytes::from(i.to_string()),
                false,
            ),
            None,
        ));
    }
    router.events(device.id, Event::DeviceData);
    settle(&mut router);
    let mut got = Vec::new();
    for _ in 0..(count * 2) {
        let batch = handler.publishes();
        if batch.is_empty() && got.len() >= count {
            break;
        }
        got.extend(batch);
        router.events(handler.id, Event::Ready);
        settle(&mut router);
    }
    let expected: Vec<String> = (0..count).map(|i| i.to_string()).collect();
    assert_eq!(got, expected);
}

/// Patch 11: a log read to its end by its only reader is emptied; not
/// while an offline persistent session still holds the filter.
#[test]
fn patch11_sole_reader_empties_the_log() {
    let mut router = router();
    let sub = connect(&mut router, "sub", true);
    sub.subscribe(&mut router, "reply", QoS::AtMostOnce);
    let publisher = connect(&mut router, "pub", true);
    publisher.publish(&mut router, "reply", "x", QoS::AtMostOnce, 0);
    assert_eq!(sub.publishes(), vec!["x".to_owned()]);
    let idx = router.datalog.matches("reply").unwrap()[0];
    assert_eq!(router.datalog.native[idx].log.size(), 0, "emptied");

    let offline = connect(&mut router, "offline", false);
    offline.subscribe(&mut router, "reply", QoS::AtLeastOnce);
    offline.disconnect(&mut router);
    publisher.publish(&mut router, "reply", "y", QoS::AtMostOnce, 0);
    assert_eq!(sub.publishes(), vec!["y".to_owned()]);
    assert!(
        router.datalog.native[idx].log.size() > 0,
        "kept for the offline session"
    );
    let back = connect(&mut router, "offline", false);
    assert_eq!(back.publishes(), vec!["y".to_owned()]);
}

/// Patches 8, 9 and 13: the router as a task on the caller's runtime,
/// links built without blocking, sends queued before their future, and
/// `LinkRx::next` waiting with one registered waiter across polls.
#[test]
fn patch8_router_runs_on_the_callers_runtime() {
    use crate::local::LinkBuilder;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (router_tx, task) = Router::new(0, config()).spawn_on_runtime();
        let (mut sub_tx, mut sub_rx, _) = LinkBuilder::new("sub", router_tx.clone())
            .build_async()
            .await
            .unwrap();
        let (mut pub_tx, _pub_rx, _) = LinkBuilder::new("pub", router_tx.clone())
            .build_async()
            .await
            .unwrap();
        sub_tx.subscribe("t").unwrap();
        // Drain the SUBACK.
        let deadline = std::time::Duration::from_secs(5);
        let _ = tokio::time::timeout(deadline, sub_rx.next()).await.unwrap();
        let publish = Publish::new("t", "hello", false);
        pub_tx.send(Packet::Publish(publish, None)).await.unwrap();
        let got = loop {
            match tokio::time::timeout(deadline, sub_rx.next())
                .await
                .unwrap()
                .unwrap()
            {
                Some(Notification::Forward(f)) => break f.publish.payload,
                _ => continue,
            }
        };
        assert_eq!(&got[..], b"hello");
        assert!(!task.is_finished(), "the router task runs on");
    });
}

/// A plain subscriber and a shared group on the same filter read one log:
/// the plain subscriber, caught up, must not empty it under the group (the
/// sole-reader check counted subscriptions by path, `x` and `$share/g/x`).
#[test]
fn sole_reader_check_counts_shared_readers_of_the_same_log() {
    let mut router = router();
    let plain = connect(&mut router, "plain", true);
    plain.subscribe(&mut router, "x", QoS::AtMostOnce);
    let offline = connect(&mut router, "offline", false);
    offline.subscribe(&mut router, "$share/g/x", QoS::AtLeastOnce);
    offline.disconnect(&mut router);
    let publisher = connect(&mut router, "pub", true);
    publisher.publish(&mut router, "x", "m", QoS::AtMostOnce, 0);
    assert_eq!(plain.publishes(), vec!["m".to_owned()]);
    let back = connect(&mut router, "offline", false);
    assert_eq!(
        back.publishes(),
        vec!["m".to_owned()],
        "the group's member still gets it"
    );
}

/// Incoming QoS 2 state is part of a persistent session: a publish that
/// awaited PUBREL when the connection dropped is released by the PUBREL the
/// client sends after reconnecting (upstream dropped it: message lost).
#[test]
fn qos2_awaiting_pubrel_survives_a_persistent_reconnect() {
    let mut router = router();
    let sub = connect(&mut router, "sub", true);
    sub.subscribe(&mut router, "t", QoS::AtMostOnce);
    sub.take();
    let publisher = connect(&mut router, "pub", false);
    publisher.publish(&mut router, "t", "kept", QoS::ExactlyOnce, 9);
    publisher.disconnect(&mut router);
    let back = connect(&mut router, "pub", false);
    back.take();
    back.send(&mut router, pubrel(9));
    assert_eq!(sub.publishes(), vec!["kept".to_owned()]);
    assert!(back.acks().iter().any(|a| matches!(
        a,
        Ack::PubComp(PubComp {
            pkid: 9,
            reason: PubCompReason::Success
        })
    )));
}

/// One client subscribed to a filter both plainly and through a shared
/// group reads one log through two requests: it gets the message on both,
/// and its disconnect frees the log (two readers, both released).
#[test]
fn plain_and_shared_subscription_to_one_filter() {
    let mut router = router();
    let handler = connect(&mut router, "h", true);
    handler.subscribe(&mut router, "x", QoS::AtMostOnce);
    handler.subscribe(&mut router, "$share/g/x", QoS::AtMostOnce);
    handler.take();
    let publisher = connect(&mut router, "p", true);
    publisher.publish(&mut router, "x", "m", QoS::AtMostOnce, 0);
    assert_eq!(handler.publishes(), vec!["m".to_owned(), "m".to_owned()]);
    handler.disconnect(&mut router);
    assert_all_freed(&router);
}

/// A publish with an empty payload and `props` bytes of user properties.
fn heavy_publish(topic: &str, props: usize) -> Packet {
    let properties = PublishProperties {
        user_properties: vec![("k".to_owned(), "v".repeat(props))],
        correlation_data: Some(Bytes::from(vec![7u8; 16])),
        ..Default::default()
    };
    Packet::Publish(
        Publish::new(topic.to_owned(), String::new(), false),
        Some(properties),
    )
}

/// How many publishes the log of `filter` holds.
fn stored_count(router: &Router, filter: &str) -> usize {
    let idx = *router
        .datalog
        .filter_indexes_for_tests()
        .get(filter)
        .unwrap();
    let mut out = Vec::new();
    router.datalog.native[idx]
        .log
        .readv((0, 0), u64::MAX / 2, &mut out)
        .unwrap();
    out.len()
}

fn stored_bytes(router: &Router) -> u64 {
    router
        .stored_bytes()
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Patch 30: a stored publish counts its properties (upstream: topic and
/// payload only), so a log's byte budget evicts publishes by what they hold.
#[test]
fn patch30_stored_size_counts_properties_and_the_budget_evicts_by_it() {
    let Packet::Publish(publish, properties) = heavy_publish("cmd", 10_000) else {
        unreachable!()
    };
    let data = PublishData::new(publish, properties, None);
    assert!(data.size() > 10_000, "properties counted: {}", data.size());

    // Segments of 1 KiB, 2 of them, and an offline persistent reader: 100
    // publishes of 10 KB of properties each keep only the last few.
    let mut router = Router::new(
        0,
        RouterConfig {
            max_segment_size: 1024,
            max_segment_count: 2,
            ..config()
        },
    );
    let offline = connect(&mut router, "offline", false);
    offline.subscribe(&mut router, "cmd", QoS::AtLeastOnce);
    offline.disconnect(&mut router);
    let device = connect(&mut router, "device", true);
    for _ in 0..100 {
        device.send(&mut router, heavy_publish("cmd", 10_000));
    }
    let kept = stored_count(&router, "cmd");
    assert!(kept <= 3, "{kept} publishes of 10 KB kept in a 2 KiB log");
    let held = stored_bytes(&router);
    assert!(
        held <= 3 * 11_000 && held >= 10_000,
        "the count follows evictions: {held}"
    );
}

/// Patch 30: a stored publish no longer borrows the buffer it was decoded
/// from (a connection's read buffer, kept alive whole by one slice).
#[test]
fn patch30_stored_publish_owns_its_bytes() {
    let read_buffer = Bytes::from(vec![b'x'; 1 << 20]);
    let mut publish = Publish::new("t", "", false);
    publish.topic = read_buffer.slice(0..1);
    publish.payload = read_buffer.slice(1..11);
    let properties = PublishProperties {
        correlation_data: Some(read_buffer.slice(11..20)),
        ..Default::default()
    };
    let data = PublishData::new(publish, Some(properties), None);
    assert!(read_buffer.is_unique(), "the read buffer is not kept alive");
    assert_eq!(&data.publish.topic[..], b"x");
    assert_eq!(data.publish.payload.len(), 10);
    let correlation = data.properties.and_then(|p| p.correlation_data);
    assert_eq!(correlation.map(|c| c.len()), Some(9));
}

/// Patch 31: a log read to its end through a `$share` group that is its
/// only reader is emptied (upstream and patch 11: never), and the router's
/// count of stored bytes returns to zero. The group goes on reading new
/// publishes from the new segment.
#[test]
fn patch31_a_shared_group_that_read_everything_empties_the_log() {
    let mut router = router();
    let a = connect(&mut router, "a", true);
    let b = connect(&mut router, "b", true);
    a.subscribe(&mut router, "$share/g/cmd", QoS::AtMostOnce);
    b.subscribe(&mut router, "$share/g/cmd", QoS::AtLeastOnce);
    a.take();
    b.take();
    let device = connect(&mut router, "device", true);
    for _ in 0..20 {
        device.send(&mut router, heavy_publish("cmd", 50_000));
    }
    let delivered = a.publishes().len() + b.publishes().len();
    assert_eq!(delivered, 20, "each delivered once");
    assert_eq!(stored_count(&router, "cmd"), 0, "emptied");
    assert_eq!(stored_bytes(&router), 0, "nothing held");

    device.publish(&mut router, "cmd", "after", QoS::AtMostOnce, 0);
    let mut got = a.publishes();
    got.extend(b.publishes());
    assert_eq!(got, vec!["after".to_owned()], "cursor valid after emptying");
    assert_eq!(stored_bytes(&router), 0);

    // Unsubscribed: the log goes, and so do its bytes.
    a.unsubscribe(&mut router, "$share/g/cmd");
    b.unsubscribe(&mut router, "$share/g/cmd");
    assert_eq!(stored_bytes(&router), 0);
}

/// Patch 31: not emptied while someone else reads the log: an offline
/// persistent session holding the plain filter gets every publish.
#[test]
fn patch31_a_group_does_not_empty_a_log_others_still_read() {
    let mut router = router();
    let offline = connect(&mut router, "offline", false);
    offline.subscribe(&mut router, "cmd", QoS::AtLeastOnce);
    offline.disconnect(&mut router);
    let handler = connect(&mut router, "h", true);
    handler.subscribe(&mut router, "$share/g/cmd", QoS::AtMostOnce);
    handler.take();
    let device = connect(&mut router, "device", true);
    device.publish(&mut router, "cmd", "one", QoS::AtMostOnce, 0);
    device.publish(&mut router, "cmd", "two", QoS::AtMostOnce, 0);
    assert_eq!(
        handler.publishes(),
        vec!["one".to_owned(), "two".to_owned()]
    );
    assert_eq!(
        stored_count(&router, "cmd"),
        2,
        "kept for the offline session"
    );
    assert!(stored_bytes(&router) > 0);
    let back = connect(&mut router, "offline", false);
    assert_eq!(back.publishes(), vec!["one".to_owned(), "two".to_owned()]);
}

// patched: MQTT 5 delivery semantics (issue 10, patches 25-29).
#[path = "delivery_tests.rs"]
mod delivery;

/// Measurement, not a test (run with `--ignored --nocapture` in release):
/// router CPU per publish->forward, 90 subscribers on their own topics,
/// QoS 0 and QoS 1 (acknowledged), with MQTT 5 properties on the publish.
#[test]
#[ignore]
fn measure_forwarding_cost() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let mut router = Router::new(0, config());
        let publisher = connect(&mut router, "publisher", true);
        let subs: Vec<Client> = (0..90)
            .map(|i| {
                let c = connect(&mut router, &format!("s{i}"), true);
                c.subscribe(&mut router, &format!("u{i}_r"), qos);
                c.take();
                c
            })
            .collect();
        let topics: Vec<String> = (0..90).map(|i| format!("u{i}_r")).collect();
        let n = 100_000usize;
        let start = std::time::Instant::now();
        let mut got = 0usize;
        for k in 0..n {
            let i = k % 90;
            let publish = Publish {
                dup: false,
                qos,
                retain: false,
                topic: Bytes::copy_from_slice(topics[i].as_bytes()),
                pkid: if qos == QoS::AtMostOnce {
                    0
                } else {
                    (k % 60000 + 1) as u16
                },
                payload: Bytes::from_static(b"{\"ok\":true}"),
            };
            let props = PublishProperties {
                content_type: Some("application/json".into()),
                ..Default::default()
            };
            publisher.send(&mut router, Packet::Publish(publish, Some(props)));
            publisher.take();
            for n in subs[i].take() {
                if let Notification::Forward(f) = n {
                    got += 1;
                    if qos != QoS::AtMostOnce {
                        subs[i].send(
                            &mut router,
                            Packet::PubAck(
                                crate::protocol::PubAck {
                                    pkid: f.publish.pkid,
                                    reason: PubAckReason::Success,
                                },
                                None,
                            ),
                        );
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(got, n);
        println!(
            "MEASURE {qos:?}: {n} publish->forward in {elapsed:?}, {:.2} us each",
            elapsed.as_secs_f64() * 1e6 / n as f64
        );
    }
}

// The changes from upstream that had no test in the crate before it became
// ours: QoS on delivery, span levels, buffers, link futures, meters.
#[path = "behaviour_tests.rs"]
mod behaviour_tests;

/// A link built against the router holds no outgoing buffer once its
/// CONNACK is taken: the buffer the CONNACK grew stayed allocated (~1 KiB
/// per connection) for a link the router then had nothing more for.
#[test]
fn a_built_link_keeps_no_buffer_from_its_connack() {
    use crate::local::LinkBuilder;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (router_tx, task) = Router::new(0, config()).spawn_on_runtime();
        let (_tx, rx, _) = LinkBuilder::new("fresh", router_tx.clone())
            .build_async()
            .await
            .unwrap();
        assert_eq!(rx.router_buffer_capacity(), 0);
        drop(router_tx);
        task.abort();
    });
}
