//! Memory counted by what a message really holds (issue 15), against the real
//! broker over the wire: the router's command logs count properties, are
//! bounded by their byte budget, and are emptied once a `$share` handler has
//! read them (`broker_router_log_bytes`); a device's reply inbox is bounded
//! by bytes including properties (`broker_replies_dropped_total`); and a
//! device's user properties and correlation data are capped (PUBACK/PUBREC
//! `0x83`, QoS 0 dropped and counted, a will over the cap refused with
//! CONNACK `0x83`).

use broker::config::Limits;
use bytes::Bytes;
use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TestOptions};
use rumqttc::v5::mqttbytes::v5::{
    LastWill, LastWillProperties, Packet as P5, PubAckReason, PubRecReason, PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A broker whose clients may stall for a minute without being cut off.
async fn patient_broker() -> TestBroker {
    TestBroker::start_with(TestOptions {
        limits: Limits {
            conn_rate_per_sec: 0.0,
            write_timeout: Duration::from_secs(60),
            ..Limits::default()
        },
        ..TestOptions::default()
    })
    .await
}

/// The value of one Prometheus series, `None` when absent.
fn series(metrics: &str, name_and_labels: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn log_bytes(broker: &TestBroker) -> u64 {
    let text = broker.metrics_text().await;
    series(&text, "broker_router_log_bytes").expect("broker_router_log_bytes is exported")
}

/// Waits until `broker_messages_in_total` reaches `count`.
async fn wait_for_messages_in(broker: &TestBroker, count: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = broker.metrics_text().await;
        if series(&text, "broker_messages_in_total").unwrap_or(0) >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not take {count} publishes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` bytes of user properties (one pair: name "p", value `n - 1` bytes;
/// none for 0).
fn user_properties(n: usize) -> Vec<(String, String)> {
    match n {
        0 => Vec::new(),
        n => vec![("p".to_owned(), "v".repeat(n - 1))],
    }
}

/// A raw MQTT 5 client on plain TCP: CONNECTs with `username`/`password`
/// (clean start), subscribes to `filter` at QoS 0, and is then left unread.
async fn raw_v5_subscriber(
    broker: &TestBroker,
    client_id: &str,
    username: &str,
    password: &str,
    filter: &str,
) -> TcpStream {
    use mqtt_router::protocol::{Connect, Login, Packet};
    let mut stream = TcpStream::connect(broker.tcp_addr).await.unwrap();
    let connect = e2e::raw::encode(
        5,
        Packet::Connect(
            Connect {
                keep_alive: 600,
                client_id: client_id.into(),
                clean_session: true,
            },
            None,
            None,
            None,
            Some(Login {
                username: username.into(),
                password: password.into(),
            }),
        ),
    );
    stream.write_all(&connect).await.unwrap();
    let ack = read_packet(&mut stream).await;
    assert_eq!(ack[0], 0x20, "CONNACK");
    assert_eq!(ack[3], 0, "accepted: {ack:?}");
    let qos0 = mqtt_router::protocol::QoS::AtMostOnce;
    stream
        .write_all(&e2e::raw::subscribe(5, 1, &[filter], qos0))
        .await
        .unwrap();
    let suback = read_packet(&mut stream).await;
    assert_eq!(suback[0], 0x90, "SUBACK");
    assert_eq!(*suback.last().unwrap(), 0, "granted QoS 0: {suback:?}");
    stream
}

/// Reads one whole packet (fixed header included).
async fn read_packet(stream: &mut TcpStream) -> Vec<u8> {
    let mut packet = vec![0u8; 1];
    stream.read_exact(&mut packet).await.unwrap();
    let (mut length, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        packet.push(byte[0]);
        length |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let start = packet.len();
    packet.resize(start + length, 0);
    stream.read_exact(&mut packet[start..]).await.unwrap();
    packet
}

fn plain(broker: &TestBroker) -> Target<'_> {
    broker.plain_target()
}

/// (a) Property-heavy QoS 0 commands for a `$share` handler: while the
/// handler does not read, the command log holds them counted with their
/// properties and within its byte budget (4 MiB per command topic; before,
/// topic + payload were counted and 48 MB of properties stayed); once the
/// handler has read them all, the log is emptied (before, a log read
/// through a group was never emptied).
#[tokio::test]
async fn a_shared_handler_that_read_every_command_leaves_the_log_empty() {
    let broker = patient_broker().await;
    let mut handler = raw_v5_subscriber(
        &broker,
        "stalling-handler",
        "handler",
        e2e::TEST_HANDLER_KEY,
        "$share/workers/sync",
    )
    .await;
    assert_eq!(log_bytes(&broker).await, 0, "nothing stored yet");

    let mut device = V5Client::connect(plain(&broker), "heavy", "JWT", &broker.token("42"), |_| {});
    device.connected().await;
    // 8,000 commands with empty payloads and 3.5 KB of user properties
    // each (under the device cap): 28 MB, far more than socket buffers and
    // the router's per-link buffer take from a handler that does not read.
    const COMMANDS: u64 = 8000;
    let properties = PublishProperties {
        user_properties: user_properties(3500),
        ..Default::default()
    };
    for _ in 0..COMMANDS {
        device
            .client
            .publish_with_properties(
                "sync",
                QoS::AtMostOnce,
                false,
                Vec::new(),
                properties.clone(),
            )
            .await
            .unwrap();
    }
    wait_for_messages_in(&broker, COMMANDS).await;
    // Let the router append what the gate handed it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = log_bytes(&broker).await;
    assert!(
        held >= 3 * 1024 * 1024,
        "the log counts the properties it holds: {held} bytes"
    );
    assert!(
        held <= 4 * 1024 * 1024 + 64 * 1024,
        "the 4 MiB budget of a command log evicts by real size: {held} bytes"
    );

    // The handler reads everything: the log is emptied.
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = handler.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held = log_bytes(&broker).await;
        if held == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command log still holds {held} bytes after its only reader read it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // And it stays empty as more commands are read as they come.
    for _ in 0..100 {
        device
            .client
            .publish_with_properties(
                "sync",
                QoS::AtMostOnce,
                false,
                Vec::new(),
                properties.clone(),
            )
            .await
            .unwrap();
    }
    wait_for_messages_in(&broker, COMMANDS + 100).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        log_bytes(&broker).await,
        0,
        "read as they come, freed as read"
    );
    reader.abort();
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

/// (b) A QoS 0 subscriber that stops reading: its inbox is bounded by the
/// bytes its replies hold, properties included (before, topic + payload
/// only: replies with 10 KB of properties and empty payloads were never
/// dropped, 122 MB held by one subscriber).
#[tokio::test]
async fn a_stalled_subscribers_inbox_counts_reply_properties() {
    let broker = patient_broker().await;
    let token = broker.token("550");
    let _stalled = raw_v5_subscriber(&broker, "stalled", "JWT", &token, "550_feed").await;

    let mut replier = V5Client::connect(
        plain(&broker),
        "replier",
        "handler",
        e2e::TEST_HANDLER_KEY,
        |o| {
            o.set_max_packet_size(Some(1 << 20));
        },
    );
    replier.connected().await;
    // 4,000 replies of 10 KB of properties each, as a handler echoing a
    // large correlation data would send: 40 MB, against a 64 KiB inbox.
    const REPLIES: u64 = 4000;
    let properties = PublishProperties {
        user_properties: user_properties(6000),
        correlation_data: Some(Bytes::from(vec![7u8; 4000])),
        ..Default::default()
    };
    for _ in 0..REPLIES {
        replier
            .client
            .publish_with_properties(
                "550_feed",
                QoS::AtMostOnce,
                false,
                Vec::new(),
                properties.clone(),
            )
            .await
            .unwrap();
    }
    wait_for_messages_in(&broker, REPLIES).await;
    let text = broker.metrics_text().await;
    let dropped = series(&text, "broker_replies_dropped_total").unwrap_or(0);
    // Socket buffers take at most a few MB (a few hundred replies); the
    // inbox about six; the rest is dropped.
    assert!(
        dropped >= REPLIES / 4,
        "only {dropped} of {REPLIES} replies of 10 KB dropped: the inbox holds more than 64 KiB"
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

/// A device (MQTT 5, TLS) with a will; not waited for.
fn device_with_will(broker: &TestBroker, client_id: &str, will: LastWill) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        "JWT",
        &broker.token("77"),
        |o| {
            o.set_last_will(will);
        },
    )
}

fn will_with(user_bytes: usize, correlation_bytes: usize) -> LastWill {
    LastWill::new(
        "sync",
        "gone",
        QoS::AtMostOnce,
        false,
        Some(LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: Some(Bytes::from(vec![1u8; correlation_bytes])),
            user_properties: user_properties(user_bytes),
        }),
    )
}

/// (c) The caps on what a device sends: user properties (4 KiB, names and
/// values) and correlation data (256 bytes). At the cap: accepted. Over:
/// PUBACK / PUBREC 0x83, QoS 0 dropped and counted, a will refused with
/// CONNACK 0x83.
#[tokio::test]
async fn device_properties_over_the_caps_are_refused() {
    let broker = patient_broker().await;
    let mut handler = broker.handler("caps-handler").await;
    handler.subscribe("$share/h/sync", QoS::AtMostOnce).await;
    let mut device = broker.device("77", "77-phone").await;

    let with = |user: usize, correlation: usize| PublishProperties {
        user_properties: if user == 0 {
            Vec::new()
        } else {
            user_properties(user)
        },
        correlation_data: (correlation > 0).then(|| Bytes::from(vec![2u8; correlation])),
        ..Default::default()
    };
    for (user, correlation, expected) in [
        (4096, 256, PubAckReason::Success),
        (4097, 0, PubAckReason::ImplementationSpecificError),
        (0, 257, PubAckReason::ImplementationSpecificError),
        (100, 0, PubAckReason::Success),
    ] {
        device
            .client
            .publish_with_properties(
                "sync",
                QoS::AtLeastOnce,
                false,
                "{}",
                with(user, correlation),
            )
            .await
            .unwrap();
        assert_eq!(
            device.puback().await.reason,
            expected,
            "{user} bytes of user properties, {correlation} of correlation data"
        );
    }
    // QoS 2 over the cap: PUBREC 0x83.
    device
        .client
        .publish_with_properties("sync", QoS::ExactlyOnce, false, "{}", with(5000, 0))
        .await
        .unwrap();
    let pubrec = device
        .wait_for("PUBREC", |p| match p {
            P5::PubRec(rec) => Some(rec.reason),
            _ => None,
        })
        .await;
    assert_eq!(pubrec, PubRecReason::ImplementationSpecificError);
    // QoS 0 over the cap: dropped (the handler never sees it), counted.
    device
        .client
        .publish_with_properties("sync", QoS::AtMostOnce, false, "over", with(0, 300))
        .await
        .unwrap();
    device
        .client
        .publish_with_properties("sync", QoS::AtMostOnce, false, "under", with(0, 30))
        .await
        .unwrap();
    let mut payloads = Vec::new();
    while payloads.last().map(|p: &Bytes| &p[..]) != Some(&b"under"[..]) {
        payloads.push(handler.publish_received().await.payload);
    }
    assert_eq!(
        payloads.len(),
        3,
        "two accepted QoS 1 commands and the QoS 0 under the cap"
    );
    assert!(payloads.iter().all(|p| &p[..] != b"over"));
    let text = broker.metrics_text().await;
    assert_eq!(
        series(
            &text,
            "broker_denials_total{kind=\"publish\",reason=\"properties_too_large\"}"
        ),
        Some(4),
        "QoS 1 x2, QoS 2, QoS 0"
    );

    // A will over either cap: CONNACK 0x83; at the caps: accepted.
    for (user, correlation) in [(4097, 0), (0, 257)] {
        let mut refused = device_with_will(&broker, "77-will", will_with(user, correlation));
        let ack = refused.connack().await.expect_err("refused");
        assert!(ack.contains("ImplementationSpecificError"), "{ack}");
    }
    let mut accepted = device_with_will(&broker, "77-will", will_with(4096, 256));
    accepted.connected().await;
    let text = broker.metrics_text().await;
    assert!(
        text.contains("reason=\"user properties over the cap\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("reason=\"correlation data over the cap\"} 1"),
        "{text}"
    );
    broker.shutdown().await;
}
