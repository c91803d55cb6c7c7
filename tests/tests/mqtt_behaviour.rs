//! MQTT itself through the gate, as the 3.1.1 and 5 specifications say:
//! QoS 0/1/2 delivery, retained messages, wildcards and shared subscriptions
//! for handlers, persistent sessions across reconnects, wills on abnormal
//! close (not on a clean DISCONNECT), keep-alive enforcement, and the
//! operations endpoint.

use e2e::clients::{V4Client, V5Client};
use e2e::{TestBroker, TestOptions};
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn qos_levels_are_delivered() {
    let broker = TestBroker::start().await;
    let mut h = broker.handler("qos").await;
    h.subscribe("sync", QoS::ExactlyOnce).await;
    let mut d = broker.device("7", "d").await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        d.client
            .publish("sync", qos, false, format!("m{i}"))
            .await
            .unwrap();
        let got = h.publish_received().await;
        assert_eq!(&got.payload[..], format!("m{i}").as_bytes());
    }
    // The QoS 2 exchange completes for the device (PUBREC then PUBCOMP).
    d.wait_for("PUBCOMP", |p| {
        matches!(p, p5::Packet::PubComp(_)).then_some(())
    })
    .await;
    // A denied QoS 2 publish from a 3.1.1 device completes its exchange too.
    let mut old = broker.device_v4("8", "o").await;
    old.client
        .publish("9_inbox", rumqttc::QoS::ExactlyOnce, false, "x")
        .await
        .unwrap();
    old.wait_for("PUBCOMP", |p| {
        matches!(p, rumqttc::Packet::PubComp(_)).then_some(())
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn handlers_use_retain_wildcards_and_shared_subscriptions() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("pub").await;
    publisher
        .client
        .publish("config/limits", QoS::AtLeastOnce, true, "v1")
        .await
        .unwrap();

    // Retained message reaches a later wildcard subscriber.
    let mut late = broker.handler("late").await;
    late.subscribe("config/+", QoS::AtLeastOnce).await;
    let retained = late.publish_received().await;
    assert_eq!(&retained.payload[..], b"v1");
    assert!(retained.retain);

    // A device may reply-subscribe to its topics and receive retained state there too.
    publisher
        .client
        .publish("55_profile", QoS::AtLeastOnce, true, "p")
        .await
        .unwrap();
    let mut d = broker.device("55", "d").await;
    d.subscribe("55_profile", QoS::AtLeastOnce).await;
    assert_eq!(&d.publish_received().await.payload[..], b"p");

    // Shared subscription: two members split ten commands, none twice.
    let mut a = broker.handler("worker-a").await;
    let mut b = broker.handler("worker-b").await;
    a.subscribe("$share/workers/jobs/run", QoS::AtLeastOnce)
        .await;
    b.subscribe("$share/workers/jobs/run", QoS::AtLeastOnce)
        .await;
    for i in 0..10 {
        d.client
            .publish("jobs/run", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut per_member = [0, 0];
    while seen.len() < 10 {
        tokio::select! {
            p = a.publish_received() => { per_member[0] += 1; seen.push(p.payload.to_vec()); }
            p = b.publish_received() => { per_member[1] += 1; seen.push(p.payload.to_vec()); }
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10, "each command exactly once");
    assert!(per_member[0] > 0 && per_member[1] > 0, "{per_member:?}");

    // One group over two filters: each filter's messages all arrive.
    let mut c = broker.handler("worker-c").await;
    c.subscribe("$share/pair/jobs/a", QoS::AtLeastOnce).await;
    c.subscribe("$share/pair/jobs/b", QoS::AtLeastOnce).await;
    for topic in ["jobs/a", "jobs/b", "jobs/a", "jobs/b"] {
        d.client
            .publish(topic, QoS::AtLeastOnce, false, topic)
            .await
            .unwrap();
    }
    let mut topics = Vec::new();
    for _ in 0..4 {
        topics.push(c.publish_received().await.topic.to_vec());
    }
    topics.sort();
    assert_eq!(
        topics,
        vec![
            b"jobs/a".to_vec(),
            b"jobs/a".to_vec(),
            b"jobs/b".to_vec(),
            b"jobs/b".to_vec()
        ]
    );
    // Unsubscribing one filter keeps the other.
    c.client.unsubscribe("$share/pair/jobs/a").await.unwrap();
    c.wait_for("UNSUBACK", |p| {
        matches!(p, p5::Packet::UnsubAck(_)).then_some(())
    })
    .await;
    d.client
        .publish("jobs/b", QoS::AtLeastOnce, false, "still")
        .await
        .unwrap();
    assert_eq!(&c.publish_received().await.payload[..], b"still");
    broker.shutdown().await;
}

#[tokio::test]
async fn persistent_device_session_keeps_subscriptions_and_queued_messages() {
    let broker = TestBroker::start().await;
    let h = broker.handler("replier").await;
    let token = broker.token("4242");
    let mut d = V5Client::connect(broker.tls_target(), "phone", "JWT", &token, |o| {
        o.set_clean_start(false);
        o.set_connect_properties(p5::ConnectProperties {
            session_expiry_interval: Some(3600),
            ..p5::ConnectProperties::new()
        });
    });
    let ack = d.connected().await;
    assert!(!ack.session_present);
    d.subscribe("4242_inbox", QoS::AtLeastOnce).await;
    d.client.disconnect().await.unwrap();
    d.closed().await;
    drop(d);

    h.client
        .publish("4242_inbox", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut back = V5Client::connect(broker.tls_target(), "phone", "JWT", &token, |o| {
        o.set_clean_start(false);
        o.set_connect_properties(p5::ConnectProperties {
            session_expiry_interval: Some(3600),
            ..p5::ConnectProperties::new()
        });
    });
    let ack = back.connected().await;
    assert!(ack.session_present);
    let queued = back.publish_received().await;
    assert_eq!(&queued.payload[..], b"while away");
    broker.shutdown().await;
}

#[tokio::test]
async fn wills_fire_on_abnormal_close_only() {
    let broker = TestBroker::start().await;
    let mut h = broker.handler("presence").await;
    h.subscribe("presence", QoS::AtLeastOnce).await;

    // Clean DISCONNECT: no will.
    let mut polite = V5Client::connect(
        broker.tls_target(),
        "polite",
        "JWT",
        &broker.token("1"),
        |o| {
            o.set_last_will(p5::LastWill::new(
                "presence",
                "polite-gone",
                QoS::AtLeastOnce,
                false,
                None,
            ));
        },
    );
    polite.connected().await;
    polite.client.disconnect().await.unwrap();
    polite.closed().await;
    h.assert_no_publish(Duration::from_millis(300)).await;

    // Socket dropped without DISCONNECT: the will fires, stamped with the uid.
    let mut rude = V4Client::connect(
        broker.tls_target(),
        "rude",
        "JWT",
        &broker.token("2"),
        |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "presence",
                "rude-gone",
                rumqttc::QoS::AtLeastOnce,
                false,
            ));
        },
    );
    rude.connected().await;
    drop(rude);
    let will = h.publish_received().await;
    assert_eq!(&will.payload[..], b"rude-gone");
    let props = will.properties.expect("stamped").user_properties;
    assert!(
        props.contains(&("user_id".to_owned(), "2".to_owned())),
        "{props:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn keep_alive_is_enforced() {
    let broker = TestBroker::start().await;
    // A raw 3.1.1 client asking for a 1 s keep-alive, then silent.
    let mut s = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    let connect = e2e::raw::connect(4, "k", 1, &broker.token("3"));
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "closed after 1.5 keep-alive periods");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn operations_endpoint_reports_metrics_and_health() {
    let broker = TestBroker::start().await;
    let mut h = broker.handler("m").await;
    h.subscribe("sync", QoS::AtMostOnce).await;
    let d = broker.device("1", "d").await;
    d.client
        .publish("sync", QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    h.publish_received().await;
    let text = broker.metrics_text().await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        text.contains("broker_connections{kind=\"device\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("broker_connections{kind=\"handler\"} 1"),
        "{text}"
    );
    assert!(text.contains("broker_messages_in_total 1"), "{text}");
    assert!(text.contains("broker_messages_out_total 1"), "{text}");

    let mut s = tokio::net::TcpStream::connect(broker.metrics_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
    let mut health = String::new();
    s.read_to_string(&mut health).await.unwrap();
    assert!(health.ends_with("ok\n"), "{health}");
    broker.shutdown().await;
}

#[tokio::test]
async fn connect_storms_are_rate_limited_per_address_and_refusals_are_cached() {
    let mut options = TestOptions::default();
    // One new token every 10 s: the six attempts below all fall in the burst window.
    options.limits.conn_rate_per_sec = 0.1;
    options.limits.conn_burst = 3;
    let broker = TestBroker::start_with(options).await;
    let mut outcomes = Vec::new();
    for i in 0..6 {
        let mut c = V5Client::connect(
            broker.tls_target(),
            &format!("s{i}"),
            "JWT",
            "bad-token",
            |_| {},
        );
        outcomes.push(c.connack().await.unwrap_err());
    }
    let refused = outcomes
        .iter()
        .filter(|o| o.contains("BadUserNamePassword"))
        .count();
    assert_eq!(
        refused, 3,
        "the burst gets answers, the rest is dropped: {outcomes:?}"
    );
    let text = broker.metrics_text().await;
    assert!(
        text.contains("broker_sockets_dropped_total{reason=\"rate_limited\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("broker_connects_refused_total{reason=\"malformed token\"} 3"),
        "{text}"
    );
    // The same bad token was verified once; the retries were answered from the cache.
    assert!(text.contains("broker_refusal_cache_hits_total 2"), "{text}");
    broker.shutdown().await;
}

#[tokio::test]
async fn pubacks_keep_the_order_of_publishes_even_when_some_are_denied() {
    let broker = TestBroker::start().await;
    let mut d = broker.device("12", "d").await;
    for topic in ["sync", "13_inbox", "sync", "not_a_command", "sync"] {
        d.client
            .publish(topic, QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
    }
    let mut acks = Vec::new();
    for _ in 0..5 {
        let ack = d.puback().await;
        acks.push((ack.pkid, ack.reason));
    }
    use p5::PubAckReason::{NotAuthorized, Success};
    assert_eq!(
        acks,
        vec![
            (1, Success),
            (2, NotAuthorized),
            (3, Success),
            (4, NotAuthorized),
            (5, Success)
        ]
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn persistent_sessions_end_at_their_expiry() {
    let broker = TestBroker::start().await;
    let token = broker.token("77");
    let persistent = |expiry: Option<u32>| {
        move |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false);
            o.set_connect_properties(p5::ConnectProperties {
                session_expiry_interval: expiry,
                ..p5::ConnectProperties::new()
            });
        }
    };
    // Expiry 1 s: still there right away, gone after it.
    for (wait, present) in [(Duration::ZERO, true), (Duration::from_millis(1500), false)] {
        let mut d = V5Client::connect(broker.tls_target(), "p", "JWT", &token, persistent(Some(1)));
        d.connected().await;
        d.subscribe("77_inbox", QoS::AtLeastOnce).await;
        d.client.disconnect().await.unwrap();
        d.closed().await;
        drop(d);
        tokio::time::sleep(wait).await;
        let mut back =
            V5Client::connect(broker.tls_target(), "p", "JWT", &token, persistent(Some(1)));
        assert_eq!(
            back.connected().await.session_present,
            present,
            "after {wait:?}"
        );
        back.client.disconnect().await.unwrap();
        back.closed().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // No expiry interval (MQTT 5 default 0): the session ends with the connection.
    let mut d = V5Client::connect(broker.tls_target(), "q", "JWT", &token, persistent(None));
    d.connected().await;
    d.subscribe("77_inbox", QoS::AtLeastOnce).await;
    d.client.disconnect().await.unwrap();
    d.closed().await;
    drop(d);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = V5Client::connect(broker.tls_target(), "q", "JWT", &token, persistent(None));
    assert!(!back.connected().await.session_present);
    broker.shutdown().await;
}

/// The router empties a reply topic's log once its only reader has read it
/// (router/DESIGN.md): that must never cost a message to a second
/// reader, online or away with a persistent session, nor reorder anything.
#[tokio::test]
async fn emptied_reply_logs_lose_nothing_for_other_readers() {
    let broker = TestBroker::start().await;
    let h = broker.handler("replier").await;
    let token = broker.token("777");
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_connect_properties(p5::ConnectProperties {
            session_expiry_interval: Some(3600),
            ..p5::ConnectProperties::new()
        });
    };
    // The tablet subscribes and goes away; its session keeps a cursor.
    let mut tablet = V5Client::connect(broker.tls_target(), "tablet", "JWT", &token, persistent);
    tablet.connected().await;
    tablet.subscribe("777_inbox", QoS::AtLeastOnce).await;
    tablet.client.disconnect().await.unwrap();
    tablet.closed().await;
    drop(tablet);

    // The phone, same user, reads everything as it comes.
    let mut phone = broker.device("777", "phone").await;
    phone.subscribe("777_inbox", QoS::AtMostOnce).await;
    for i in 0..5 {
        let body = format!("first {i}");
        h.client
            .publish("777_inbox", QoS::AtLeastOnce, false, body.clone())
            .await
            .unwrap();
        let got = phone.publish_received().await;
        assert_eq!(&got.payload[..], body.as_bytes());
    }

    // The tablet comes back to all five, in order.
    let mut tablet = V5Client::connect(broker.tls_target(), "tablet", "JWT", &token, persistent);
    assert!(tablet.connected().await.session_present);
    for i in 0..5 {
        let got = tablet.publish_received().await;
        assert_eq!(&got.payload[..], format!("first {i}").as_bytes());
    }

    // Alone again on its topic, each reader keeps getting everything in order
    // while its log is emptied behind it. (At QoS 1, so that the router, not
    // the gate's own reply delivery, serves it.)
    let mut solo = broker.device("778", "solo").await;
    solo.subscribe("778_inbox", QoS::AtLeastOnce).await;
    for i in 0..50 {
        h.client
            .publish("778_inbox", QoS::AtMostOnce, false, format!("n{i}"))
            .await
            .unwrap();
    }
    for i in 0..50 {
        let got = solo.publish_received().await;
        assert_eq!(&got.payload[..], format!("n{i}").as_bytes());
    }
    drop(phone);
    for i in 0..3 {
        h.client
            .publish("777_inbox", QoS::AtLeastOnce, false, format!("later {i}"))
            .await
            .unwrap();
        let got = tablet.publish_received().await;
        assert_eq!(&got.payload[..], format!("later {i}").as_bytes());
    }
    broker.shutdown().await;
}
