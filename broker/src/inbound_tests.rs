//! Owns the table tests of `inbound` (who acknowledges, refusals, QoS 2,
//! the Receive Maximum, held state across connections, will packet ids).

use super::*;

fn flows() -> InboundFlows {
    InboundFlows::new(Version::V5, 3)
}

#[test]
fn who_acknowledges_an_allowed_publish() {
    // (qos, needs_router, router PUBACKs already due) -> answer
    let table = [
        (QoS::AtMostOnce, false, 0, Allowed::Done),
        (QoS::AtMostOnce, true, 0, Allowed::ToRouter),
        (QoS::AtLeastOnce, false, 0, Allowed::AckHere),
        (QoS::AtLeastOnce, true, 0, Allowed::ToRouter),
        // An earlier PUBACK is due from the router: this one waits its turn.
        (QoS::AtLeastOnce, false, 1, Allowed::ToRouter),
        (QoS::ExactlyOnce, false, 0, Allowed::ToRouter),
    ];
    for (qos, needs_router, due, expected) in table {
        let mut f = flows();
        for pkid in 0..due {
            f.allowed(QoS::AtLeastOnce, 100 + pkid, true, None);
        }
        assert_eq!(
            f.allowed(qos, 1, needs_router, None),
            expected,
            "{qos:?} {needs_router} {due}"
        );
    }
}

#[test]
fn how_a_refusal_is_answered() {
    let table = [
        (Version::V5, QoS::AtMostOnce, 0, Refused::Silent),
        (Version::V5, QoS::AtLeastOnce, 0, Refused::PubAckHere),
        (
            Version::V5,
            QoS::AtLeastOnce,
            1,
            Refused::PubAckThroughRouter,
        ),
        (Version::V5, QoS::ExactlyOnce, 0, Refused::PubRecHere),
        (Version::V4, QoS::ExactlyOnce, 0, Refused::PubRecHere),
    ];
    for (version, qos, due, expected) in table {
        let mut f = InboundFlows::new(version, 10);
        for pkid in 0..due {
            f.allowed(QoS::AtLeastOnce, 100 + pkid, true, None);
        }
        assert_eq!(f.refused(qos, 1, Denial::NotAuthorized), expected);
    }
}

#[test]
fn a_denial_through_the_router_rewrites_its_puback_in_order() {
    let mut f = flows();
    assert_eq!(
        f.allowed(QoS::AtLeastOnce, 1, true, None),
        Allowed::ToRouter
    );
    assert_eq!(
        f.refused(QoS::AtLeastOnce, 2, Denial::NotAuthorized),
        Refused::PubAckThroughRouter
    );
    assert_eq!(f.router_puback(1), RouterAck::Now(None));
    assert_eq!(
        f.router_puback(2),
        RouterAck::Now(Some(Denial::NotAuthorized))
    );
    // Nothing due any more: the gate answers again itself.
    assert_eq!(
        f.allowed(QoS::AtLeastOnce, 3, false, None),
        Allowed::AckHere
    );
}

#[test]
fn qos2_is_exactly_once_by_packet_id() {
    let mut f = flows();
    assert_eq!(f.arrival(QoS::ExactlyOnce, 7), Arrival::New);
    assert_eq!(
        f.allowed(QoS::ExactlyOnce, 7, true, None),
        Allowed::ToRouter
    );
    // The retransmission before PUBREL is not delivered again.
    assert_eq!(f.arrival(QoS::ExactlyOnce, 7), Arrival::Retransmitted);
    assert_eq!(f.release(7), Release::ToRouter);
    // After the release, the id is free for a new message.
    assert_eq!(f.arrival(QoS::ExactlyOnce, 7), Arrival::New);
    // A PUBREL for nothing (or for a resumed session's publish) is the
    // router's to answer.
    assert_eq!(f.release(8), Release::ToRouter);
}

#[test]
fn a_refused_3_1_1_qos2_publish_is_completed_here() {
    let mut f = InboundFlows::new(Version::V4, 3);
    f.refused(QoS::ExactlyOnce, 5, Denial::NotAuthorized);
    assert_eq!(f.release(5), Release::CompleteHere(PubCompReason::Success));
    // MQTT 5: the refusal ended the exchange; a stray PUBREL goes to
    // the router, which answers 0x92.
    let mut f = flows();
    f.refused(QoS::ExactlyOnce, 5, Denial::NotAuthorized);
    assert_eq!(f.release(5), Release::ToRouter);
}

#[test]
fn the_receive_maximum_counts_every_unfinished_flow() {
    let mut f = flows(); // Receive Maximum 3
    f.allowed(QoS::AtLeastOnce, 1, true, None);
    f.allowed(QoS::ExactlyOnce, 2, true, None);
    assert_eq!(f.arrival(QoS::AtLeastOnce, 3), Arrival::New);
    f.refused(QoS::AtLeastOnce, 3, Denial::NotAuthorized);
    assert_eq!(f.unacknowledged(), 3);
    assert_eq!(f.arrival(QoS::AtLeastOnce, 4), Arrival::OverReceiveMaximum);
    assert_eq!(f.arrival(QoS::ExactlyOnce, 4), Arrival::OverReceiveMaximum);
    // QoS 0 is never limited; a retransmission is not a new flow.
    assert_eq!(f.arrival(QoS::AtMostOnce, 0), Arrival::New);
    assert_eq!(f.arrival(QoS::ExactlyOnce, 2), Arrival::Retransmitted);
    f.router_puback(1);
    assert_eq!(f.arrival(QoS::AtLeastOnce, 4), Arrival::New);
}

#[test]
fn a_resumed_session_counts_what_its_earlier_connections_held() {
    // Three connections of one session, Receive Maximum 3: the first
    // holds 1 and 2 in the router, the second (3.1.1) also one refused.
    let mut first = InboundFlows::new(Version::V4, 3);
    first.allowed(QoS::ExactlyOnce, 1, true, None);
    first.allowed(QoS::ExactlyOnce, 2, true, None);
    // A QoS 1 flow in progress ends with its connection.
    first.allowed(QoS::AtLeastOnce, 9, true, None);
    let held = first.take_held();
    assert_eq!(held.len(), 2);
    assert_eq!(first.unacknowledged(), 1, "only the QoS 1 flow is left");

    let mut second = InboundFlows::resumed(Version::V4, 3, held);
    // (arrival, packet id) -> what the resumed connection does
    let table = [
        // A retransmission of a held publish: PUBREC again, not stored again.
        (QoS::ExactlyOnce, 1, Arrival::Retransmitted),
        (QoS::ExactlyOnce, 2, Arrival::Retransmitted),
        // New flows: one more fits, then the session is over its quota.
        (QoS::ExactlyOnce, 3, Arrival::New),
        (QoS::AtLeastOnce, 4, Arrival::New),
    ];
    for (qos, pkid, expected) in table {
        assert_eq!(second.arrival(qos, pkid), expected, "{qos:?} {pkid}");
    }
    assert_eq!(
        second.refused(QoS::ExactlyOnce, 3, Denial::NotAuthorized),
        Refused::PubRecHere
    );
    assert_eq!(second.unacknowledged(), 3);
    assert_eq!(
        second.arrival(QoS::ExactlyOnce, 5),
        Arrival::OverReceiveMaximum
    );
    assert_eq!(
        second.arrival(QoS::AtLeastOnce, 5),
        Arrival::OverReceiveMaximum
    );

    let mut third = InboundFlows::resumed(Version::V4, 3, second.take_held());
    assert_eq!(third.unacknowledged(), 3);
    assert_eq!(
        third.arrival(QoS::ExactlyOnce, 6),
        Arrival::OverReceiveMaximum
    );
    // The PUBRELs release them: the router's to the router, the gate's here.
    assert_eq!(third.release(1), Release::ToRouter);
    assert_eq!(
        third.release(3),
        Release::CompleteHere(PubCompReason::Success)
    );
    assert_eq!(third.arrival(QoS::ExactlyOnce, 1), Arrival::New, "released");
    assert_eq!(third.unacknowledged(), 1);
    // A will's packet id avoids what the router still holds.
    assert_eq!(third.will_pkid(), 1);
    assert_eq!(third.will_pkid(), 3);

    // A clean start (or an expiry) keeps nothing: a fresh count.
    let fresh = InboundFlows::resumed(Version::V5, 3, HeldQos2::default());
    assert_eq!(fresh.unacknowledged(), 0);
}

#[test]
fn held_state_of_two_connections_is_merged() {
    let mut a = InboundFlows::new(Version::V5, 10);
    a.allowed(QoS::ExactlyOnce, 1, true, None);
    let mut b = InboundFlows::new(Version::V5, 10);
    b.allowed(QoS::ExactlyOnce, 1, true, None);
    b.allowed(QoS::ExactlyOnce, 2, true, None);
    let mut held = a.take_held();
    held.absorb(b.take_held());
    assert_eq!(held.len(), 2, "one packet id is one flow");
    assert!(!held.is_empty());
    assert!(a.take_held().is_empty());
}

#[test]
fn will_packet_ids_avoid_held_qos2_ids_and_never_are_zero() {
    let mut f = flows();
    f.allowed(QoS::ExactlyOnce, 1, true, None);
    f.allowed(QoS::ExactlyOnce, 2, true, None);
    assert_eq!(f.will_pkid(), 3);
    f.next_will_pkid = u16::MAX;
    assert_eq!(f.will_pkid(), u16::MAX);
    assert_eq!(f.will_pkid(), 3, "wraps past 0 and the held ids");
}

#[test]
fn a_stored_qos2_publish_is_kept_for_the_session_only_once_stored() {
    use crate::delivery::ack::{self, Outcome};
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    // (outcome before the connection ends) -> kept for the next one
    let table = [
        (None, false),
        (Some(Outcome::Failed), false),
        (Some(Outcome::Stored), true),
    ];
    for (outcome, kept) in table {
        let mut f = flows();
        let (ticket, pending) = ack::ticket(deadline);
        // Stored, and nobody in the router wants it: the gate's.
        assert_eq!(
            f.allowed(QoS::ExactlyOnce, 1, false, Some(pending)),
            Allowed::Owed
        );
        assert_eq!(f.arrival(QoS::ExactlyOnce, 1), Arrival::AwaitingStore);
        if let Some(outcome) = outcome {
            ticket.settle(outcome);
        }
        let held = f.take_held();
        assert_eq!(held.len(), usize::from(kept), "{outcome:?}");
        let mut next = InboundFlows::resumed(Version::V5, 3, held);
        if kept {
            // Sent again after a reconnect: PUBREC again, not stored again;
            // its PUBREL is completed by the gate.
            assert_eq!(next.arrival(QoS::ExactlyOnce, 1), Arrival::Retransmitted);
            assert_eq!(
                next.release(1),
                Release::CompleteHere(PubCompReason::Success)
            );
        }
        assert_eq!(next.arrival(QoS::ExactlyOnce, 1), Arrival::New);
        assert_eq!(next.unacknowledged(), 0);
    }
}
