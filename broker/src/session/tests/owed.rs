//! Owns the table tests of PUBACKs a delivery owes later (`delivery::ack`):
//! a delivery that stores QoS 1 publishes to one command topic elsewhere
//! (as the `cluster` crate appends commands to Redis) answers each later
//! through its ticket; the session's PUBACK waits for it, in the order of
//! the publishes among the router's and the gate's own, with the reason
//! codes per version, the deadline, and the Receive Maximum.

use super::hooked::Hooked;
use super::*;
use crate::delivery::ack::{self, Outcome, Ticket};
use parking_lot::Mutex;

/// The command topic the delivery below stores before acknowledging.
const STORED: &str = "stored";
/// How long the session waits for the store.
const WAIT: Duration = Duration::from_secs(15);

/// A gate whose delivery stores [`STORED`]; the tickets it hands out, in
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
            // A QoS 1 publish to [`STORED`] is acknowledged later, through
            // a ticket the test settles.
            Box::new(Hooked::new(local).on_route(move |topic, publish, routed| {
                if topic == STORED && publish.qos() == QoS::AtLeastOnce {
                    let (ticket, pending) = ack::ticket(Instant::now() + WAIT);
                    tickets.lock().push(ticket);
                    routed.later = Some(pending);
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
    // Replaced by a ticket nobody waits for, so the indexes stay.
    let (spare, _) = ack::ticket(Instant::now());
    let ticket = std::mem::replace(&mut tickets[n], spare);
    match outcome {
        Some(outcome) => ticket.settle(outcome),
        None => drop(ticket),
    }
}

#[tokio::test]
async fn a_puback_waits_for_the_delivery_to_store_the_publish() {
    use Did::*;
    for version in [Version::V4, Version::V5] {
        let (gate, tickets) = storing_gate();
        let mut dev = open(&gate, device("u1"), version).await;
        // Nothing now: not to the client, not to the router.
        let (did, end) = step(
            &mut dev,
            Event::Client(publish(STORED, QoS::AtLeastOnce, 1)),
        );
        assert_eq!((did, end), (vec![], None), "{version:?}");
        // Woken before the store answered: still nothing.
        let (did, _) = step(&mut dev, Event::Acknowledged);
        assert!(did.is_empty(), "{version:?}");
        settle(&tickets, 0, Some(Outcome::Stored));
        let (did, _) = step(&mut dev, Event::Acknowledged);
        assert_eq!(did, vec![ClientPubAck(1, PubAckReason::Success)]);
        // QoS 0 owes nothing: fire and forget.
        let (did, _) = step(&mut dev, Event::Client(publish(STORED, QoS::AtMostOnce, 0)));
        assert!(did.is_empty());
        assert_eq!(tickets.lock().len(), 1, "no ticket for QoS 0");
        // Nothing owed any more: the gate answers at once again.
        let (did, _) = step(
            &mut dev,
            Event::Client(publish(UNSERVED, QoS::AtLeastOnce, 2)),
        );
        assert_eq!(did, vec![ClientPubAck(2, PubAckReason::Success)]);
    }
}

#[tokio::test]
async fn owed_pubacks_keep_the_order_of_the_publishes_with_the_routers() {
    use Did::*;
    for version in [Version::V4, Version::V5] {
        let (gate, tickets) = storing_gate();
        let _handler = serving_handler(&gate).await;
        let mut dev = open(&gate, device("u1"), version).await;
        // 1 to the router, 2 stored later, 3 nobody wants (the gate's), 4
        // refused (Receive Maximum 4).
        let mut did = Vec::new();
        for packet in [
            publish(SERVED, QoS::AtLeastOnce, 1),
            publish(STORED, QoS::AtLeastOnce, 2),
            publish(UNSERVED, QoS::AtLeastOnce, 3),
            publish("u9_x", QoS::AtLeastOnce, 4),
        ] {
            let (done, end) = step(&mut dev, Event::Client(packet));
            assert_eq!(end, None);
            did.extend(done);
        }
        assert_eq!(
            did,
            vec![RouterPublish(SERVED.into(), QoS::AtLeastOnce, 1)],
            "{version:?}: only the router's goes anywhere now"
        );
        // The store answers first: 2 waits behind 1.
        settle(&tickets, 0, Some(Outcome::Stored));
        assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
        let denied = match version {
            Version::V4 => PubAckReason::Success,
            Version::V5 => PubAckReason::NotAuthorized,
        };
        let (did, _) = step(&mut dev, Event::Router(router_puback(1)));
        assert_eq!(
            did,
            vec![
                ClientPubAck(1, PubAckReason::Success),
                ClientPubAck(2, PubAckReason::Success),
                ClientPubAck(3, PubAckReason::Success),
                ClientPubAck(4, denied),
            ],
            "{version:?}"
        );

        // The other way round: the router's PUBACK first, then the store.
        let mut did = Vec::new();
        for packet in [
            publish(STORED, QoS::AtLeastOnce, 6),
            publish(SERVED, QoS::AtLeastOnce, 7),
        ] {
            did.extend(step(&mut dev, Event::Client(packet)).0);
        }
        did.extend(step(&mut dev, Event::Router(router_puback(7))).0);
        assert_eq!(did, vec![RouterPublish(SERVED.into(), QoS::AtLeastOnce, 7)]);
        settle(&tickets, 1, Some(Outcome::Stored));
        let (did, _) = step(&mut dev, Event::Acknowledged);
        assert_eq!(
            did,
            vec![
                ClientPubAck(6, PubAckReason::Success),
                ClientPubAck(7, PubAckReason::Success),
            ]
        );
    }
}

#[tokio::test]
async fn a_publish_not_stored_is_answered_per_version() {
    use Did::*;
    // (outcome settled; None: the ticket dropped) -> MQTT 5 reason
    let table = [
        (Some(Outcome::Failed), PubAckReason::UnspecifiedError),
        (Some(Outcome::QueueFull), PubAckReason::QuotaExceeded),
        (None, PubAckReason::UnspecifiedError),
    ];
    for (outcome, v5_reason) in table {
        for version in [Version::V4, Version::V5] {
            let (gate, tickets) = storing_gate();
            let mut dev = open(&gate, device("u1"), version).await;
            for pkid in [1, 2] {
                step(
                    &mut dev,
                    Event::Client(publish(STORED, QoS::AtLeastOnce, pkid)),
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
                                ClientPubAck(1, v5_reason),
                                ClientPubAck(2, PubAckReason::Success)
                            ],
                            None
                        ),
                        "{outcome:?}"
                    );
                    assert_eq!(wire_code(version, answer_of(version, v5_reason)), {
                        match v5_reason {
                            PubAckReason::QuotaExceeded => 0x97,
                            _ => 0x80,
                        }
                    });
                }
                // MQTT 3.1.1 cannot be told: the connection ends without
                // that PUBACK (the client sends it again when it reconnects).
                Version::V4 => assert_eq!(
                    (did, end),
                    (vec![], Some(End::Server(ServerDisconnect::NotStored))),
                    "{outcome:?}"
                ),
            }
        }
    }
}

/// The PUBACK a client is written for `reason`, to read its wire code.
fn answer_of(version: Version, reason: PubAckReason) -> Packet {
    let outcome = match reason {
        PubAckReason::QuotaExceeded => Outcome::QueueFull,
        _ => Outcome::Failed,
    };
    answers::puback_not_stored(version, 1, outcome).expect("MQTT 5 has a PUBACK for it")
}

#[tokio::test]
async fn an_owed_puback_has_a_deadline() {
    use Did::*;
    let (gate, tickets) = storing_gate();
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    let before = Instant::now();
    step(
        &mut dev,
        Event::Client(publish(STORED, QoS::AtLeastOnce, 1)),
    );
    // The session's timer is set to the wait's deadline (sooner than the
    // keep-alive's 90 s here).
    let deadline = dev.next_deadline();
    assert!(deadline >= before + WAIT && deadline <= Instant::now() + WAIT);
    let (did, end) = step(&mut dev, Event::Tick(deadline - Duration::from_millis(1)));
    assert_eq!((did, end), (vec![], None), "not yet");
    let (did, end) = step(&mut dev, Event::Tick(deadline));
    assert_eq!(
        (did, end),
        (vec![ClientPubAck(1, PubAckReason::UnspecifiedError)], None)
    );
    // A late answer is nothing.
    settle(&tickets, 0, Some(Outcome::Stored));
    assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
    assert!(dev.next_deadline() > deadline, "back to the keep-alive");
}

#[tokio::test]
async fn owed_pubacks_count_against_the_receive_maximum() {
    use Did::*;
    let (gate, tickets) = storing_gate();
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    // Receive Maximum 4 (`test_config`): 3 waiting for the store and one
    // ready behind them.
    for pkid in 1..=3 {
        step(
            &mut dev,
            Event::Client(publish(STORED, QoS::AtLeastOnce, pkid)),
        );
    }
    let (did, end) = step(
        &mut dev,
        Event::Client(publish(UNSERVED, QoS::AtLeastOnce, 4)),
    );
    assert_eq!((did, end), (vec![], None));
    let (_, end) = step(
        &mut dev,
        Event::Client(publish(STORED, QoS::AtLeastOnce, 5)),
    );
    assert_eq!(
        end,
        Some(End::Server(ServerDisconnect::ReceiveMaximumExceeded))
    );

    let (gate, tickets2) = storing_gate();
    drop(tickets);
    let mut dev = open(&gate, device("u2"), Version::V5).await;
    for pkid in 1..=4 {
        step(
            &mut dev,
            Event::Client(publish(STORED, QoS::AtLeastOnce, pkid)),
        );
    }
    settle(&tickets2, 0, Some(Outcome::Stored));
    let (did, _) = step(&mut dev, Event::Acknowledged);
    assert_eq!(did, vec![ClientPubAck(1, PubAckReason::Success)]);
    // One answered: one more fits.
    let (_, end) = step(
        &mut dev,
        Event::Client(publish(STORED, QoS::AtLeastOnce, 5)),
    );
    assert_eq!(end, None);
}

#[tokio::test]
async fn router_pubacks_due_before_an_owed_one_go_first_denials_included() {
    use Did::*;
    let (gate, tickets) = storing_gate();
    let _handler = serving_handler(&gate).await;
    let mut dev = open(&gate, device("u1"), Version::V5).await;
    // 1 to the router, 2 refused while 1 is due (sent through the router
    // to the sink), then 3 is owed by the delivery: the queue begins with
    // the two the router owes.
    let mut did = Vec::new();
    for packet in [
        publish(SERVED, QoS::AtLeastOnce, 1),
        publish("u9_x", QoS::AtLeastOnce, 2),
        publish(STORED, QoS::AtLeastOnce, 3),
    ] {
        did.extend(step(&mut dev, Event::Client(packet)).0);
    }
    assert_eq!(
        did,
        vec![
            RouterPublish(SERVED.into(), QoS::AtLeastOnce, 1),
            RouterPublish("$gate/denied".into(), QoS::AtLeastOnce, 2),
        ]
    );
    settle(&tickets, 0, Some(Outcome::Stored));
    assert!(step(&mut dev, Event::Acknowledged).0.is_empty());
    let (did, _) = step(&mut dev, Event::Router(router_puback(1)));
    assert_eq!(did, vec![ClientPubAck(1, PubAckReason::Success)]);
    let (did, _) = step(&mut dev, Event::Router(router_puback(2)));
    assert_eq!(
        did,
        vec![
            ClientPubAck(2, PubAckReason::NotAuthorized),
            ClientPubAck(3, PubAckReason::Success),
        ]
    );
}
