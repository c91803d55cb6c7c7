//! Owns the table tests of PUBRECs a delivery owes later (`delivery::ack`):
//! a delivery that stores QoS 2 publishes elsewhere (as the `cluster`
//! crate appends a command to Redis, which the router never gets, or a
//! reply the router here also delivers) answers each later through its
//! ticket; the session's PUBREC waits for it, in the order of the
//! publishes, exactly once by packet id (a retransmission is not stored
//! again), with the reason codes per version and the deadline.

use super::hooked::Hooked;
use super::*;
use crate::delivery::ack::{self, Outcome, Ticket};
use crate::router::protocol::{PubComp, PubRec};
use parking_lot::Mutex;

/// A command topic the delivery stores and the router never gets (as the
/// cluster does with every command).
const STORED: &str = "stored";
/// How long the session waits for the store.
const WAIT: Duration = Duration::from_secs(15);

/// A gate whose delivery stores every QoS 1/2 publish to [`STORED`] (kept
/// from the router) and every QoS 2 publish to [`SERVED`] (which the
/// router still delivers to its handler); the tickets it hands out, in
/// the order of the publishes.
fn storing_gate() -> (Arc<Gate>, Arc<Mutex<Vec<Ticket>>>) {
    let mut config = test_config();
    config.command_topics.push(STORED.to_owned());
    let tickets = Arc::new(Mutex::new(Vec::new()));
    let held = tickets.clone();
    let gate = crate::gate_for_tests_wrapped(
        config,
        CancellationToken::new(),
        Box::new(move |local, _| {
            Box::new(Hooked::new(local).on_route(move |topic, publish, routed| {
                let stored = match publish.qos() {
                    QoS::AtMostOnce => false,
                    QoS::AtLeastOnce => topic == STORED,
                    QoS::ExactlyOnce => topic == STORED || topic == SERVED,
                };
                if stored {
                    let (ticket, pending) = ack::ticket(Instant::now() + WAIT);
                    tickets.lock().push(ticket);
                    routed.later = Some(pending);
                    if topic == STORED {
                        routed.needs_router = false;
                    }
                }
            }))
        }),
    )
    .expect("gate");
    (gate, held)
}

/// Settles the `n`th ticket handed out (each once).
fn settle(tickets: &Mutex<Vec<Ticket>>, n: usize, outcome: Option<Outcome>) {
    let mut tickets = tickets.lock();
    let (spare, _) = ack::ticket(Instant::now());
    let ticket = std::mem::replace(&mut tickets[n], spare);
    match outcome {
        Some(outcome) => ticket.settle(outcome),
        None => drop(ticket),
    }
}

fn pubrel(pkid: u16) -> Packet {
    let release = PubRel {
        pkid,
        reason: PubRelReason::Success,
    };
    Packet::PubRel(release, None)
}

fn router_pubrec(pkid: u16) -> Packet {
    let rec = PubRec {
        pkid,
        reason: PubRecReason::Success,
    };
    Packet::PubRec(rec, None)
}

fn router_pubcomp(pkid: u16) -> Packet {
    let comp = PubComp {
        pkid,
        reason: PubCompReason::Success,
    };
    Packet::PubComp(comp, None)
}

#[tokio::test]
async fn a_pubrec_waits_for_the_store_and_a_retransmission_is_not_stored_again() {
    use Did::*;
    for version in [Version::V4, Version::V5] {
        let (gate, tickets) = storing_gate();
        let mut dev = open(&gate, device("u1"), version).await;
        // Nothing now: not to the client, not to the router (the gate owns
        // this one's exactly once).
        let (did, end) = step(
            &mut dev,
            Event::Client(publish(STORED, QoS::ExactlyOnce, 1)),
        );
        assert_eq!((did, end), (vec![], None), "{version:?}");
        // Sent again before the store answered (a retransmission: the
        // gate goes by packet id, DUP or not): nothing, and not stored
        // again.
        let (did, end) = step(
            &mut dev,
            Event::Client(publish(STORED, QoS::ExactlyOnce, 1)),
        );
        assert_eq!((did, end), (vec![], None), "{version:?}");
        assert_eq!(tickets.lock().len(), 1, "{version:?}: stored once");
        assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
        settle(&tickets, 0, Some(Outcome::Stored));
        let (did, _) = step(&mut dev, Event::Acknowledged);
        assert_eq!(did, vec![ClientPubRec(1, PubRecReason::Success)]);
        // Sent again after its PUBREC, before the PUBREL: PUBREC again,
        // still stored once.
        let (did, _) = step(
            &mut dev,
            Event::Client(publish(STORED, QoS::ExactlyOnce, 1)),
        );
        assert_eq!(did, vec![ClientPubRec(1, PubRecReason::Success)]);
        assert_eq!(tickets.lock().len(), 1, "{version:?}: stored once");
        // Its PUBREL is completed here (the router never had it); one for
        // an id nobody holds goes to the router, which answers 0x92.
        let (did, _) = step(&mut dev, Event::Client(pubrel(1)));
        assert_eq!(did, vec![ClientPubComp(1, PubCompReason::Success)]);
        let (did, _) = step(&mut dev, Event::Client(pubrel(1)));
        assert_eq!(did, vec![RouterPubRel(1)]);
        // Released: the id is new again, and stored.
        let (did, _) = step(
            &mut dev,
            Event::Client(publish(STORED, QoS::ExactlyOnce, 1)),
        );
        assert!(did.is_empty());
        assert_eq!(tickets.lock().len(), 2, "{version:?}");
        assert_eq!(dev.flows.unacknowledged(), 1);
    }
}

#[tokio::test]
async fn a_qos2_publish_not_stored_is_answered_per_version() {
    use Did::*;
    // (outcome settled; None: the ticket dropped) -> MQTT 5 reason, code
    let table = [
        (Some(Outcome::Failed), PubRecReason::UnspecifiedError, 0x80),
        (Some(Outcome::QueueFull), PubRecReason::QuotaExceeded, 0x97),
        (None, PubRecReason::UnspecifiedError, 0x80),
    ];
    for (outcome, v5_reason, code) in table {
        for version in [Version::V4, Version::V5] {
            let (gate, tickets) = storing_gate();
            let mut dev = open(&gate, device("u1"), version).await;
            for pkid in [1, 2] {
                step(
                    &mut dev,
                    Event::Client(publish(STORED, QoS::ExactlyOnce, pkid)),
                );
            }
            // 2 is stored before 1 fails: the order holds.
            settle(&tickets, 1, Some(Outcome::Stored));
            settle(&tickets, 0, outcome);
            let (did, end) = step(&mut dev, Event::Acknowledged);
            match version {
                Version::V5 => {
                    assert_eq!(
                        (did, end),
                        (
                            vec![
                                ClientPubRec(1, v5_reason),
                                ClientPubRec(2, PubRecReason::Success)
                            ],
                            None
                        ),
                        "{outcome:?}"
                    );
                    let outcome = outcome.unwrap_or(Outcome::Failed);
                    let packet = answers::pubrec_not_stored(version, 1, outcome).expect("MQTT 5");
                    assert_eq!(wire_code(version, packet), code);
                    // The exchange ended: the id is free, and a publish with
                    // it is stored (again).
                    let (did, _) = step(
                        &mut dev,
                        Event::Client(publish(STORED, QoS::ExactlyOnce, 1)),
                    );
                    assert!(did.is_empty());
                    assert_eq!(tickets.lock().len(), 3, "{outcome:?}");
                }
                // MQTT 3.1.1 cannot be told: the connection ends without
                // that PUBREC, and what it would keep for the session does
                // not hold the id (its retransmission is stored again).
                Version::V4 => {
                    assert_eq!(
                        (did, end),
                        (vec![], Some(End::Server(ServerDisconnect::NotStored))),
                        "{outcome:?}"
                    );
                    assert_eq!(dev.flows.take_held().len(), 1, "only 2 is kept");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_pubrec_the_router_also_owes_waits_for_both() {
    use Did::*;
    for version in [Version::V4, Version::V5] {
        let (gate, tickets) = storing_gate();
        let _handler = serving_handler(&gate).await;
        let mut dev = open(&gate, device("u1"), version).await;
        // The router delivers it too (and owns its exactly once): its
        // PUBREC waits for the store, and the other way round.
        let (did, _) = step(
            &mut dev,
            Event::Client(publish(SERVED, QoS::ExactlyOnce, 1)),
        );
        assert_eq!(did, vec![RouterPublish(SERVED.into(), QoS::ExactlyOnce, 1)]);
        assert!(step(&mut dev, Event::Router(router_pubrec(1))).0.is_empty());
        settle(&tickets, 0, Some(Outcome::Stored));
        let (did, _) = step(&mut dev, Event::Acknowledged);
        assert_eq!(did, vec![ClientPubRec(1, PubRecReason::Success)]);
        step(
            &mut dev,
            Event::Client(publish(SERVED, QoS::ExactlyOnce, 2)),
        );
        settle(&tickets, 1, Some(Outcome::Stored));
        assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
        let (did, _) = step(&mut dev, Event::Router(router_pubrec(2)));
        assert_eq!(did, vec![ClientPubRec(2, PubRecReason::Success)]);
        // Its PUBREL is the router's to complete.
        let (did, _) = step(&mut dev, Event::Client(pubrel(1)));
        assert_eq!(did, vec![RouterPubRel(1)]);
        let (did, _) = step(&mut dev, Event::Router(router_pubcomp(1)));
        assert_eq!(did, vec![ClientPubComp(1, PubCompReason::Success)]);

        // Not stored: MQTT 5 is told, and the gate releases it in the
        // router (the client will not), whose PUBCOMP it drops.
        step(
            &mut dev,
            Event::Client(publish(SERVED, QoS::ExactlyOnce, 3)),
        );
        step(&mut dev, Event::Router(router_pubrec(3)));
        settle(&tickets, 2, Some(Outcome::Failed));
        let (did, end) = step(&mut dev, Event::Acknowledged);
        match version {
            Version::V5 => {
                assert_eq!(
                    (did, end),
                    (
                        vec![
                            RouterPubRel(3),
                            ClientPubRec(3, PubRecReason::UnspecifiedError)
                        ],
                        None
                    )
                );
                assert!(step(&mut dev, Event::Router(router_pubcomp(3)))
                    .0
                    .is_empty());
                // A later PUBCOMP for the id is the client's again.
                let (did, _) = step(&mut dev, Event::Router(router_pubcomp(3)));
                assert_eq!(did, vec![ClientPubComp(3, PubCompReason::Success)]);
            }
            // The router keeps it for the session: the client's
            // retransmission is stored again, and the router acknowledges
            // it without delivering it again.
            Version::V4 => {
                assert_eq!(
                    (did, end),
                    (vec![], Some(End::Server(ServerDisconnect::NotStored)))
                );
                // 2 is held (by the router, until its PUBREL), 3 is not.
                assert_eq!(dev.flows.take_held().len(), 1);
            }
        }
    }
}

#[tokio::test]
async fn pubrecs_and_pubacks_keep_the_order_of_the_publishes() {
    use Did::*;
    for version in [Version::V4, Version::V5] {
        let (gate, tickets) = storing_gate();
        let mut dev = open(&gate, device("u1"), version).await;
        // 1 stored later (QoS 1), 2 to the router (QoS 2 nobody stores),
        // 3 stored later (QoS 2), 4 refused (QoS 2): Receive Maximum 4.
        let mut did = Vec::new();
        for packet in [
            publish(STORED, QoS::AtLeastOnce, 1),
            publish(UNSERVED, QoS::ExactlyOnce, 2),
            publish(STORED, QoS::ExactlyOnce, 3),
            publish("u9_x", QoS::ExactlyOnce, 4),
        ] {
            let (done, end) = step(&mut dev, Event::Client(packet));
            assert_eq!(end, None, "{version:?}");
            did.extend(done);
        }
        assert_eq!(
            did,
            vec![RouterPublish(UNSERVED.into(), QoS::ExactlyOnce, 2)],
            "{version:?}"
        );
        assert!(step(&mut dev, Event::Router(router_pubrec(2))).0.is_empty());
        settle(&tickets, 1, Some(Outcome::Stored));
        assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
        settle(&tickets, 0, Some(Outcome::Stored));
        let (did, _) = step(&mut dev, Event::Acknowledged);
        let denied = match version {
            Version::V4 => PubRecReason::Success,
            Version::V5 => PubRecReason::NotAuthorized,
        };
        assert_eq!(
            did,
            vec![
                ClientPubAck(1, PubAckReason::Success),
                ClientPubRec(2, PubRecReason::Success),
                ClientPubRec(3, PubRecReason::Success),
                ClientPubRec(4, denied),
            ],
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn a_router_pubrec_due_before_the_queue_began_goes_first() {
    use Did::*;
    let (gate, tickets) = storing_gate();
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    // 1 goes to the router before anything is owed; 2 is stored later and
    // stored before the router answered 1.
    let (did, _) = step(
        &mut dev,
        Event::Client(publish(UNSERVED, QoS::ExactlyOnce, 1)),
    );
    assert_eq!(
        did,
        vec![RouterPublish(UNSERVED.into(), QoS::ExactlyOnce, 1)]
    );
    step(
        &mut dev,
        Event::Client(publish(STORED, QoS::ExactlyOnce, 2)),
    );
    settle(&tickets, 0, Some(Outcome::Stored));
    assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
    let (did, _) = step(&mut dev, Event::Router(router_pubrec(1)));
    assert_eq!(
        did,
        vec![
            ClientPubRec(1, PubRecReason::Success),
            ClientPubRec(2, PubRecReason::Success),
        ]
    );
    // Nothing owed any more: the router's PUBREC goes straight through.
    step(
        &mut dev,
        Event::Client(publish(UNSERVED, QoS::ExactlyOnce, 3)),
    );
    let (did, _) = step(&mut dev, Event::Router(router_pubrec(3)));
    assert_eq!(did, vec![ClientPubRec(3, PubRecReason::Success)]);
}

#[tokio::test]
async fn an_owed_pubrec_has_a_deadline() {
    use Did::*;
    let (gate, tickets) = storing_gate();
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    let before = Instant::now();
    step(
        &mut dev,
        Event::Client(publish(STORED, QoS::ExactlyOnce, 1)),
    );
    let deadline = dev.next_deadline();
    assert!(deadline >= before + WAIT && deadline <= Instant::now() + WAIT);
    let (did, end) = step(&mut dev, Event::Tick(deadline - Duration::from_millis(1)));
    assert_eq!((did, end), (vec![], None), "not yet");
    let (did, end) = step(&mut dev, Event::Tick(deadline));
    assert_eq!(
        (did, end),
        (vec![ClientPubRec(1, PubRecReason::UnspecifiedError)], None)
    );
    // A late answer is nothing; the id is free.
    settle(&tickets, 0, Some(Outcome::Stored));
    assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
    assert_eq!(dev.flows.unacknowledged(), 0);
}

#[tokio::test]
async fn what_waits_for_a_pubrec_counts_against_the_receive_maximum() {
    use Did::*;
    let (gate, tickets) = storing_gate();
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    // Receive Maximum 4 (`test_config`): one stored later, one to the
    // router, two refused while they wait (MQTT 5: nothing kept for them
    // but their place in the queue).
    for packet in [
        publish(STORED, QoS::ExactlyOnce, 1),
        publish(UNSERVED, QoS::ExactlyOnce, 2),
        publish("u9_x", QoS::ExactlyOnce, 3),
        publish("u9_x", QoS::ExactlyOnce, 4),
    ] {
        assert_eq!(step(&mut dev, Event::Client(packet)).1, None);
    }
    assert_eq!(dev.flows.unacknowledged(), 4);
    // A PUBREL before its PUBREC frees nothing: 0x92, still held.
    let (did, _) = step(&mut dev, Event::Client(pubrel(1)));
    assert_eq!(
        did,
        vec![ClientPubComp(1, PubCompReason::PacketIdentifierNotFound)]
    );
    let (_, end) = step(
        &mut dev,
        Event::Client(publish(STORED, QoS::ExactlyOnce, 5)),
    );
    assert_eq!(
        end,
        Some(End::Server(ServerDisconnect::ReceiveMaximumExceeded))
    );
    assert_eq!(tickets.lock().len(), 1, "5 was not stored");
}
