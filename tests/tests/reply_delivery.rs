//! The gate delivers QoS 0 replies of clean device sessions itself, beside
//! the router (broker/src/delivery/). These tests hold it to the MQTT
//! behaviour the router gives: every subscriber of a topic, whichever path
//! serves it, gets each reply once and in order; retained messages reach new
//! subscribers; a resubscription does not interrupt the flow; QoS 1
//! publishes are acknowledged in order; wills reach devices.

use e2e::clients::{V4Client, V5Client};
use e2e::TestBroker;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

fn persistent(o: &mut rumqttc::v5::MqttOptions) {
    o.set_clean_start(false);
    o.set_connect_properties(p5::ConnectProperties {
        session_expiry_interval: Some(3600),
        ..p5::ConnectProperties::new()
    });
}

/// Reads `count` publishes and returns their payloads as text.
async fn payloads(client: &mut V5Client, count: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let p = client.publish_received().await;
        out.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    out
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn every_subscriber_of_a_reply_topic_gets_each_reply_once_in_order() {
    let broker = TestBroker::start().await;
    let h = broker.handler("replier").await;
    // Served by the gate: a clean session at QoS 0 (MQTT 5 and 3.1.1).
    let mut phone = broker.device("500", "phone").await;
    assert_eq!(
        phone.subscribe("500_inbox", QoS::AtMostOnce).await,
        p5::SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    let mut old = broker.device_v4("500", "old").await;
    old.client
        .subscribe("500_inbox", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let ack = old.suback().await;
    assert_eq!(
        ack.return_codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtMostOnce
        )]
    );
    // Served by the router: a persistent session, a QoS 1 subscription, and
    // a monitoring handler's wildcard.
    let mut tablet = V5Client::connect(
        broker.tls_target(),
        "tablet",
        "JWT",
        &broker.token("500"),
        persistent,
    );
    tablet.connected().await;
    tablet.subscribe("500_inbox", QoS::AtMostOnce).await;
    let mut watch = broker.device("500", "watch").await;
    assert_eq!(
        watch.subscribe("500_inbox", QoS::AtLeastOnce).await,
        p5::SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut audit = broker.handler("audit").await;
    audit.subscribe("$share/audit/#", QoS::AtMostOnce).await;

    for i in 0..40 {
        let qos = if i % 4 == 3 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        h.client
            .publish("500_inbox", qos, false, format!("r{i}"))
            .await
            .unwrap();
    }
    let expected = numbered("r", 0..40);
    assert_eq!(payloads(&mut phone, 40).await, expected, "phone");
    assert_eq!(payloads(&mut tablet, 40).await, expected, "tablet");
    assert_eq!(payloads(&mut watch, 40).await, expected, "watch");
    assert_eq!(payloads(&mut audit, 40).await, expected, "audit handler");
    let mut from_old = Vec::new();
    for _ in 0..40 {
        let p = old.publish_received().await;
        assert_eq!(p.qos, rumqttc::QoS::AtMostOnce);
        from_old.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(from_old, expected, "3.1.1 client");
    for client in [&mut phone, &mut tablet, &mut watch, &mut audit] {
        client.assert_no_publish(Duration::from_millis(200)).await;
    }

    // Another user's topic reaches none of them.
    h.client
        .publish("501_inbox", QoS::AtMostOnce, false, "not yours")
        .await
        .unwrap();
    assert_eq!(payloads(&mut audit, 1).await, vec!["not yours"]);
    phone.assert_no_publish(Duration::from_millis(200)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_resubscription_does_not_interrupt_the_flow_and_unsubscribe_stops_it() {
    let broker = TestBroker::start().await;
    let h = broker.handler("replier").await;
    let mut d = broker.device("510", "d").await;
    d.subscribe("510_inbox", QoS::AtMostOnce).await;

    // A QoS 1 resubscription while replies stream: none lost, none twice,
    // in order; the gate keeps serving it and grants QoS 0.
    let stream = {
        let client = h.client.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                client
                    .publish("510_inbox", QoS::AtMostOnce, false, format!("s{i}"))
                    .await
                    .unwrap();
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    d.client
        .subscribe("510_inbox", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut granted = None;
    while got.len() < 200 {
        let seen = d
            .wait_for("PUBLISH or SUBACK", |p| match p {
                p5::Packet::Publish(p) => Some(Ok(p.clone())),
                p5::Packet::SubAck(ack) => Some(Err(ack.return_codes[0])),
                _ => None,
            })
            .await;
        match seen {
            Ok(p) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            Err(code) => granted = Some(code),
        }
    }
    stream.await.unwrap();
    assert_eq!(got, numbered("s", 0..200));
    let granted = match granted {
        Some(code) => code,
        None => d.suback().await.return_codes[0],
    };
    assert_eq!(granted, p5::SubscribeReasonCode::Success(QoS::AtMostOnce));

    // Unsubscribed: nothing more. Subscribed again at QoS 1 after that: the
    // router serves it, at QoS 1.
    d.client.unsubscribe("510_inbox").await.unwrap();
    d.wait_for("UNSUBACK", |p| {
        matches!(p, p5::Packet::UnsubAck(_)).then_some(())
    })
    .await;
    h.client
        .publish("510_inbox", QoS::AtMostOnce, false, "gone")
        .await
        .unwrap();
    d.assert_no_publish(Duration::from_millis(300)).await;
    assert_eq!(
        d.subscribe("510_inbox", QoS::AtLeastOnce).await,
        p5::SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    h.client
        .publish("510_inbox", QoS::AtLeastOnce, false, "back")
        .await
        .unwrap();
    let p = d.publish_received().await;
    assert_eq!((&p.payload[..], p.qos), (&b"back"[..], QoS::AtLeastOnce));
    broker.shutdown().await;
}

#[tokio::test]
async fn retained_replies_reach_later_qos0_subscribers() {
    let broker = TestBroker::start().await;
    let h = broker.handler("profile").await;
    // A live subscriber gets the retained publish as it happens, without
    // the retain flag (it is not stored state to this subscriber).
    let mut live = broker.device("520", "live").await;
    live.subscribe("520_profile", QoS::AtMostOnce).await;
    h.client
        .publish("520_profile", QoS::AtLeastOnce, true, "v1")
        .await
        .unwrap();
    let p = live.publish_received().await;
    assert_eq!((&p.payload[..], p.retain), (&b"v1"[..], false));

    // A later clean QoS 0 subscriber gets the stored message, flagged.
    let mut late = broker.device("520", "late").await;
    late.subscribe("520_profile", QoS::AtMostOnce).await;
    let p = late.publish_received().await;
    assert_eq!((&p.payload[..], p.retain), (&b"v1"[..], true));

    // Both keep getting updates, once each.
    h.client
        .publish("520_profile", QoS::AtMostOnce, false, "v2")
        .await
        .unwrap();
    assert_eq!(payloads(&mut live, 1).await, vec!["v2"]);
    assert_eq!(payloads(&mut late, 1).await, vec!["v2"]);
    live.assert_no_publish(Duration::from_millis(200)).await;
    late.assert_no_publish(Duration::from_millis(200)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn qos1_publishes_are_acknowledged_in_order_on_both_paths() {
    let broker = TestBroker::start().await;
    let mut h = broker.handler("replier").await;
    // 530's topic only the gate serves; 531's the router serves too.
    let mut gate_served = broker.device("530", "d").await;
    gate_served.subscribe("530_x", QoS::AtMostOnce).await;
    let mut router_served = broker.device("531", "d").await;
    router_served.subscribe("531_y", QoS::AtLeastOnce).await;

    let topics = [
        "530_x", "531_y", "530_x", "530_x", "531_y", "$SYS/x", "530_x",
    ];
    for (i, topic) in topics.iter().enumerate() {
        h.client
            .publish(*topic, QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut acks = Vec::new();
    for _ in 0..topics.len() {
        let ack = h.puback().await;
        acks.push((ack.pkid, ack.reason));
    }
    use p5::PubAckReason::{NotAuthorized, Success};
    assert_eq!(
        acks,
        vec![
            (1, Success),
            (2, Success),
            (3, Success),
            (4, Success),
            (5, Success),
            (6, NotAuthorized),
            (7, Success)
        ]
    );
    assert_eq!(
        payloads(&mut gate_served, 4).await,
        vec!["0", "2", "3", "6"]
    );
    assert_eq!(payloads(&mut router_served, 2).await, vec!["1", "4"]);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_handlers_will_reaches_devices_the_gate_serves() {
    let broker = TestBroker::start().await;
    let mut d = broker.device("540", "d").await;
    d.subscribe("540_status", QoS::AtMostOnce).await;
    let mut h = V4Client::connect(
        broker.tls_target(),
        "mortal",
        "handler",
        e2e::TEST_HANDLER_KEY,
        |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "540_status",
                "handler gone",
                rumqttc::QoS::AtLeastOnce,
                false,
            ));
        },
    );
    h.connected().await;
    drop(h);
    let p = d.publish_received().await;
    assert_eq!(
        (&p.payload[..], p.qos),
        (&b"handler gone"[..], QoS::AtMostOnce)
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_device_that_stops_reading_loses_only_its_own_oldest_replies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start().await;
    let h = broker.handler("replier").await;

    // A raw MQTT 3.1.1 device: connects, subscribes at QoS 0, never reads again.
    let mut stalled = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    let token = broker.token("550");
    stalled
        .write_all(&e2e::raw::connect(4, "stalled", 60, &token))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    stalled.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let qos0 = mqtt_router::protocol::QoS::AtMostOnce;
    stalled
        .write_all(&e2e::raw::subscribe(4, 1, &["550_feed"], qos0))
        .await
        .unwrap();
    let mut suback = [0u8; 5];
    stalled.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);

    // Its replies pile up (far more than socket buffers and its inbox
    // hold) while another user's replies flow.
    let mut reader = broker.device("551", "reader").await;
    reader.subscribe("551_feed", QoS::AtMostOnce).await;
    let big = vec![b'x'; 8 * 1024];
    for i in 0..4000 {
        h.client
            .publish("550_feed", QoS::AtMostOnce, false, big.clone())
            .await
            .unwrap();
        if i % 40 == 0 {
            h.client
                .publish("551_feed", QoS::AtMostOnce, false, format!("f{}", i / 40))
                .await
                .unwrap();
        }
    }
    assert_eq!(payloads(&mut reader, 100).await, numbered("f", 0..100));

    // The gate dropped the stalled device's oldest replies, and says so.
    let dropped = loop {
        let text = broker.metrics_text().await;
        let dropped: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("broker_replies_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if dropped > 0 {
            break dropped;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(dropped < 4000, "{dropped}");

    // The stalled device, reading again, gets the newest reply last.
    let last_marker = b"last one";
    h.client
        .publish("550_feed", QoS::AtMostOnce, false, &last_marker[..])
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = stalled.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the broker closed the stalled device");
            seen.extend_from_slice(&chunk[..n]);
            if seen.ends_with(last_marker) {
                return;
            }
            // Keep only a tail: the marker can straddle reads.
            if seen.len() > 64 {
                seen.drain(..seen.len() - 64);
            }
        }
    })
    .await;
    assert!(found.is_ok(), "the newest reply never arrived");
    broker.shutdown().await;
}
