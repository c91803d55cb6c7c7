//! Hardening of the session itself, against the real broker: MQTT 3.1.1
//! clients get MQTT 5 publishes translated (built-in handler replies,
//! mosquitto_sub), QoS 2 is exactly once by packet id (retransmissions,
//! PUBREL with properties, unknown PUBREL, QoS 2 wills), the Receive Maximum
//! is advertised and enforced, a client that stops reading cannot pin its
//! session past its token's expiry or a takeover, and a panic in one session
//! is contained (counted, will fired, router link closed).

mod handlers_common;

use bytes::{Bytes, BytesMut};
use e2e::clients::{user_property, V4Client, V5Client};
use e2e::{raw, TestBroker, TestOptions, TEST_HANDLER_KEY};
use handlers_common::{settings, Device};
use mqtt_router::protocol::{self as rp, Packet, PubRel, PubRelProperties, PubRelReason, Publish};
use protocol::claims::{now_secs, DeviceClaims};
use rumqttc::v5::mqttbytes::v5::{self as p5, LastWill, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A hand-driven MQTT 5 device over plain TCP, for what no client library
/// would send (retransmissions, PUBREL with properties, ignoring limits).
struct RawDevice {
    stream: TcpStream,
    buf: BytesMut,
    pending: std::collections::VecDeque<p5::Packet>,
}

impl RawDevice {
    async fn connect(broker: &TestBroker, client_id: &str, token: &str) -> (RawDevice, p5::Packet) {
        let stream = TcpStream::connect(broker.tcp_addr).await.expect("connect");
        let mut device = RawDevice {
            stream,
            buf: BytesMut::new(),
            pending: Default::default(),
        };
        device.send(raw::connect(5, client_id, 30, token)).await;
        let connack = device.next().await.expect("CONNACK");
        (device, connack)
    }

    async fn send(&mut self, bytes: Vec<u8>) {
        self.stream.write_all(&bytes).await.expect("write");
    }

    async fn send_packet(&mut self, packet: Packet) {
        self.send(raw::encode(5, packet)).await;
    }

    /// The next packet from the broker (decoded by rumqttc, a client-side
    /// codec); `None` once it closed the socket.
    async fn next(&mut self) -> Option<p5::Packet> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(packet) = self.pending.pop_front() {
                return Some(packet);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a packet or a close within 10 s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => loop {
                    match p5::Packet::read(&mut self.buf, None) {
                        Ok(packet) => self.pending.push_back(packet),
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => panic!("the broker sent a malformed packet: {e:?}"),
                    }
                },
            }
        }
    }
}

/// A QoS 2 PUBLISH on the wire; `dup` sets the DUP flag of a retransmission.
fn qos2_publish(topic: &str, payload: &'static [u8], pkid: u16, dup: bool) -> Vec<u8> {
    let publish = Publish::with_qos(
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::from_static(payload),
        false,
        rp::QoS::ExactlyOnce,
        pkid,
    );
    let mut bytes = raw::encode(5, Packet::Publish(publish, None));
    if dup {
        // Fixed header: 0011 DUP QoS(2) RETAIN.
        if let Some(first) = bytes.first_mut() {
            *first |= 0x08;
        }
    }
    bytes
}

fn pubrel(pkid: u16, with_properties: bool) -> Packet {
    let properties = with_properties.then(|| PubRelProperties {
        reason_string: Some("releasing".into()),
        user_properties: vec![("trace".into(), "42".into())],
    });
    Packet::PubRel(
        PubRel {
            pkid,
            reason: PubRelReason::Success,
        },
        properties,
    )
}

async fn handler_on(broker: &TestBroker, client_id: &str, filter: &str, qos: QoS) -> V5Client {
    let mut handler = broker.handler(client_id).await;
    assert_eq!(
        handler.subscribe(filter, qos).await,
        SubscribeReasonCode::Success(qos)
    );
    handler
}

#[tokio::test]
async fn a_3_1_1_device_gets_every_built_in_handlers_replies() {
    let broker = TestBroker::start().await;
    let data = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let handlers_task = handlers::spawn_builtin(
        settings(&broker, data.path(), None, "http://127.0.0.1:9/unused"),
        shutdown.clone(),
    )
    .expect("handlers start");
    // An MQTT 5 device waits until the handlers answer.
    let mut probe = Device::connect(&broker, "500").await;
    probe.wait_for_handlers().await;

    let uid = "311";
    let mut device: V4Client = broker.device_v4(uid, "old-phone").await;
    for name in ["sync", "publish", "contact_list"] {
        let topic = format!("{uid}_{name}");
        device
            .client
            .subscribe(&topic, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        device.suback().await;
    }
    // Every SDK reply carries MQTT 5 properties (content type); a 3.1.1
    // device gets them without, and stays connected.
    for (command, reply) in [
        ("sync", "sync"),
        ("publish", "publish"),
        ("get_contact_list", "contact_list"),
    ] {
        device
            .client
            .publish(command, rumqttc::QoS::AtLeastOnce, false, "{}")
            .await
            .expect("publish");
        let publish = device.publish_received().await;
        assert_eq!(publish.topic, format!("{uid}_{reply}"));
        let body: serde_json::Value = serde_json::from_slice(&publish.payload).expect("json");
        assert!(
            body.get("status").is_some() || body.get("contacts").is_some(),
            "{body}"
        );
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), handlers_task).await;
}

#[tokio::test]
async fn mosquitto_sub_3_1_1_gets_a_reply_that_carries_properties() {
    let broker = TestBroker::start().await;
    let handler = broker.handler("replier").await;
    // Retained, so that the subscriber gets it whenever it subscribes.
    let properties = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("request_id".into(), "7".into())],
        ..Default::default()
    };
    handler
        .client
        .publish_with_properties(
            "demo_contact_list",
            QoS::AtLeastOnce,
            true,
            r#"{"contacts":[]}"#,
            properties,
        )
        .await
        .expect("publish");
    let token = broker.token("demo");
    let port = broker.tls_addr.port().to_string();
    let ca = broker.ca_file.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("mosquitto_sub")
            .arg("--cafile")
            .arg(&ca)
            .args(["-h", "localhost", "-p", &port, "-V", "mqttv311"])
            .args(["-u", "JWT", "-P", &token, "-t", "demo_contact_list"])
            .args(["-C", "1", "-W", "10", "-v"])
            .output()
    })
    .await
    .expect("join")
    .expect("mosquitto_sub runs (apt-get install mosquitto-clients)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim(), r#"demo_contact_list {"contacts":[]}"#);
    assert!(output.status.success(), "{output:?}");
}

/// MQTT 3.1.1 has no properties: a 3.1.1 handler gets each device command
/// wrapped with the identity the gate stamped, and a forged one is not it.
#[tokio::test]
async fn a_3_1_1_handler_receives_stamped_commands() {
    use base64::Engine;
    let broker = TestBroker::start().await;
    let mut handler = V4Client::connect(
        broker.tls_target(),
        "v311-handler",
        "handler",
        TEST_HANDLER_KEY,
        |_| {},
    );
    handler.connected().await;
    handler
        .client
        .subscribe("get_contact_list", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    handler.suback().await;
    let device = broker.device("8080", "phone").await;
    for i in 0..3 {
        let forged = PublishProperties {
            user_properties: vec![("user_id".into(), "23412".into())],
            ..Default::default()
        };
        device
            .client
            .publish_with_properties(
                "get_contact_list",
                QoS::AtLeastOnce,
                false,
                format!("{{\"n\":{i}}}"),
                forged,
            )
            .await
            .expect("publish");
        let command = handler.publish_received().await;
        assert_eq!(command.topic, "get_contact_list");
        let envelope: serde_json::Value = serde_json::from_slice(&command.payload).expect("json");
        assert_eq!(envelope["user_id"], "8080");
        assert_eq!(envelope["client_id"], "phone");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(envelope["payload"].as_str().expect("payload"))
            .expect("base64");
        assert_eq!(payload, format!("{{\"n\":{i}}}").into_bytes());
    }
    // The handler replies over 3.1.1 like any handler.
    let mut phone = broker.device("8081", "phone").await;
    phone.subscribe("8081_contact_list", QoS::AtMostOnce).await;
    handler
        .client
        .publish("8081_contact_list", rumqttc::QoS::AtLeastOnce, false, "[]")
        .await
        .expect("reply");
    assert_eq!(&phone.publish_received().await.payload[..], b"[]");
}

#[tokio::test]
async fn qos2_is_exactly_once_by_packet_id() {
    let broker = TestBroker::start().await;
    let mut handler = handler_on(
        &broker,
        "qos2-handler",
        "get_contact_list",
        QoS::ExactlyOnce,
    )
    .await;
    let (mut device, connack) = RawDevice::connect(&broker, "qos2", &broker.token("q2")).await;
    assert!(matches!(connack, p5::Packet::ConnAck(..)), "{connack:?}");

    // The first publish, then its retransmission before the PUBREL.
    device
        .send(qos2_publish("get_contact_list", b"a", 1, false))
        .await;
    device
        .send(qos2_publish("get_contact_list", b"a", 1, true))
        .await;
    for _ in 0..2 {
        match device.next().await {
            Some(p5::Packet::PubRec(rec)) => assert_eq!(rec.pkid, 1),
            other => panic!("expected PUBREC 1, got {other:?}"),
        }
    }
    // A PUBREL that carries properties releases it all the same.
    device.send_packet(pubrel(1, true)).await;
    match device.next().await {
        Some(p5::Packet::PubComp(comp)) => {
            assert_eq!(comp.pkid, 1);
            assert_eq!(comp.reason, p5::PubCompReason::Success);
        }
        other => panic!("expected PUBCOMP 1, got {other:?}"),
    }
    // The next message is not lost.
    device
        .send(qos2_publish("get_contact_list", b"b", 2, false))
        .await;
    assert!(matches!(device.next().await, Some(p5::Packet::PubRec(..))));
    device.send_packet(pubrel(2, false)).await;
    assert!(matches!(device.next().await, Some(p5::Packet::PubComp(..))));

    let first = handler.publish_received().await;
    assert_eq!(&first.payload[..], b"a");
    assert_eq!(user_property(&first, "user_id"), vec!["q2"]);
    let second = handler.publish_received().await;
    assert_eq!(&second.payload[..], b"b");
    handler.assert_no_publish(Duration::from_millis(500)).await;

    // A PUBREL for nothing is answered 0x92; the session goes on.
    device.send_packet(pubrel(77, false)).await;
    match device.next().await {
        Some(p5::Packet::PubComp(comp)) => {
            assert_eq!(comp.pkid, 77);
            assert_eq!(comp.reason, p5::PubCompReason::PacketIdentifierNotFound);
        }
        other => panic!("expected PUBCOMP 0x92, got {other:?}"),
    }
    device.send(vec![0xC0, 0x00]).await; // PINGREQ
    assert!(matches!(device.next().await, Some(p5::Packet::PingResp(_))));
}

#[tokio::test]
async fn a_qos2_will_is_delivered_once() {
    let broker = TestBroker::start().await;
    let mut handler = handler_on(
        &broker,
        "will-handler",
        "get_contact_list",
        QoS::ExactlyOnce,
    )
    .await;
    {
        let will = LastWill::new("get_contact_list", "gone", QoS::ExactlyOnce, false, None);
        let mut device = V5Client::connect(
            broker.tls_target(),
            "will-phone",
            "JWT",
            &broker.token("w2"),
            |o| {
                o.set_last_will(will);
            },
        );
        device.connected().await;
        // Dropped without DISCONNECT: the socket just closes.
    }
    let will = handler.publish_received().await;
    assert_eq!(&will.payload[..], b"gone");
    assert_eq!(will.qos, QoS::ExactlyOnce);
    assert_eq!(user_property(&will, "user_id"), vec!["w2"]);
    handler.assert_no_publish(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn the_receive_maximum_is_advertised_and_enforced() {
    let mut options = TestOptions::default();
    options.limits.receive_maximum = 5;
    let broker = TestBroker::start_with(options).await;
    let _handler = handler_on(&broker, "rm-handler", "get_contact_list", QoS::ExactlyOnce).await;
    let (mut device, connack) = RawDevice::connect(&broker, "greedy", &broker.token("rm")).await;
    match connack {
        p5::Packet::ConnAck(ack) => {
            let properties = ack.properties.expect("CONNACK properties");
            assert_eq!(properties.receive_max, Some(5));
        }
        other => panic!("expected a CONNACK with properties, got {other:?}"),
    }
    // Five unreleased QoS 2 publishes are allowed...
    for pkid in 1..=5 {
        device
            .send(qos2_publish("get_contact_list", b"x", pkid, false))
            .await;
        match device.next().await {
            Some(p5::Packet::PubRec(rec)) => assert_eq!(rec.pkid, pkid),
            other => panic!("expected PUBREC {pkid}, got {other:?}"),
        }
    }
    // ... the sixth is one too many.
    device
        .send(qos2_publish("get_contact_list", b"x", 6, false))
        .await;
    let end = device.next().await;
    match end {
        Some(p5::Packet::Disconnect(d)) => {
            assert_eq!(
                d.reason_code,
                p5::DisconnectReasonCode::ReceiveMaximumExceeded
            )
        }
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    assert_eq!(device.next().await, None, "then the socket closes");
    assert_eq!(
        broker
            .metric("broker_sessions_ended_total{reason=\"receive maximum exceeded\"}")
            .await,
        1.0
    );
}

/// A device that subscribes and then never reads; the handler fills its
/// socket. Returns the device's socket (kept open, unread).
async fn device_that_stops_reading(
    broker: &TestBroker,
    handler: &V5Client,
    uid: &str,
    token: &str,
) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive buffer fills quickly.
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(broker.tcp_addr).await.expect("connect");
    stream
        .write_all(&raw::connect(5, "sleepy", 30, token))
        .await
        .expect("connect");
    let topic = format!("{uid}_flood");
    stream
        .write_all(&raw::subscribe(5, 1, &[&topic], rp::QoS::AtLeastOnce))
        .await
        .expect("subscribe");
    // Let the CONNACK and SUBACK arrive; then read nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let payload = vec![b'x'; 16 * 1024];
    for _ in 0..400 {
        handler
            .client
            .publish(&topic, QoS::AtMostOnce, false, payload.clone())
            .await
            .expect("publish");
    }
    stream
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_at_its_tokens_expiry() {
    let mut options = TestOptions::default();
    // Only the token's expiry can end it here.
    options.limits.write_timeout = Duration::from_secs(600);
    options.jwt.leeway_secs = 0;
    let broker = TestBroker::start_with(options).await;
    let handler = broker.handler("flooder").await;
    let token = broker.token_with(&DeviceClaims {
        sub: "sleepy".into(),
        exp: Some(now_secs() + 4),
        ..Default::default()
    });
    let _stream = device_that_stops_reading(&broker, &handler, "sleepy", &token).await;
    let series = "broker_sessions_ended_total{reason=\"token expired\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while broker.metric(series).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a device that stopped reading was still connected 10 s after its token expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Everyone else was served meanwhile.
    let mut device = broker.device("awake", "phone").await;
    device.subscribe("awake_r", QoS::AtMostOnce).await;
    handler
        .client
        .publish("awake_r", QoS::AtMostOnce, false, "hi")
        .await
        .expect("publish");
    assert_eq!(&device.publish_received().await.payload[..], b"hi");
}

#[tokio::test]
async fn a_takeover_ends_a_session_that_stopped_reading_at_once() {
    let mut options = TestOptions::default();
    options.limits.write_timeout = Duration::from_secs(600);
    let broker = TestBroker::start_with(options).await;
    let handler = broker.handler("flooder").await;
    let token = broker.token("sleepy2");
    let mut old = device_that_stops_reading(&broker, &handler, "sleepy2", &token).await;
    // The same user and client id again: CONNACK well before the 5 s the
    // registry would wait for a session that does not end.
    let started = tokio::time::Instant::now();
    let mut new = V5Client::connect(broker.tls_target(), "sleepy", "JWT", &token, |_| {});
    new.connected().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "takeover took {:?}",
        started.elapsed()
    );
    // The old socket is closed: reading drains what was buffered, then EOF.
    let mut sink = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match old.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the replaced session's socket stayed open");
}

#[tokio::test]
async fn a_panicking_session_is_contained() {
    let mut options = TestOptions::default();
    // Few router links: a leak per panic would exhaust them.
    options.limits.max_connections = 4;
    let broker = TestBroker::start_with(options).await;
    let mut watcher = broker.device("watch", "phone").await;
    watcher.subscribe("watch_will", QoS::AtMostOnce).await;

    let panics = 80;
    for i in 0..panics {
        let will = LastWill::new("watch_will", format!("{i}"), QoS::AtMostOnce, false, None);
        let mut doomed = V5Client::connect(
            broker.tls_target(),
            "doomed",
            "handler",
            TEST_HANDLER_KEY,
            |o| {
                o.set_last_will(will);
            },
        );
        doomed.connected().await;
        doomed
            .client
            .publish("$fault/panic", QoS::AtMostOnce, false, "")
            .await
            .expect("publish");
        // The session ends with DISCONNECT 0x83, its will fires.
        let closed = doomed.closed().await;
        assert!(closed.contains("ImplementationSpecificError"), "{closed}");
        let will = watcher.publish_received().await;
        assert_eq!(&will.payload[..], format!("{i}").as_bytes());
    }
    assert_eq!(
        broker.metric("broker_session_panics_total").await,
        f64::from(panics)
    );
    // No router link leaked: handlers and devices still connect and flow.
    let mut handler = handler_on(&broker, "after", "get_contact_list", QoS::AtLeastOnce).await;
    let device = broker.device("later", "phone").await;
    device
        .client
        .publish("get_contact_list", QoS::AtLeastOnce, false, "{}")
        .await
        .expect("publish");
    assert_eq!(
        user_property(&handler.publish_received().await, "user_id"),
        vec!["later"]
    );
    broker.shutdown().await;
}

/// Packets only a server sends (CONNACK, SUBACK, UNSUBACK) from a client
/// end that client's session with DISCONNECT 0x82, and nothing else.
#[tokio::test]
async fn server_only_packets_from_a_client_are_a_protocol_error() {
    let broker = TestBroker::start().await;
    let server_only: [(&str, Vec<u8>); 3] = [
        ("CONNACK", vec![0x20, 0x03, 0x00, 0x00, 0x00]),
        ("SUBACK", vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00]),
        ("UNSUBACK", vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x00]),
    ];
    for (name, bytes) in server_only {
        let (mut device, _) = RawDevice::connect(&broker, "confused", &broker.token("srv")).await;
        device.send(bytes).await;
        match device.next().await {
            Some(p5::Packet::Disconnect(d)) => assert_eq!(
                d.reason_code,
                p5::DisconnectReasonCode::ProtocolError,
                "{name}"
            ),
            other => panic!("{name}: expected DISCONNECT 0x82, got {other:?}"),
        }
        assert_eq!(device.next().await, None, "{name}: then the socket closes");
    }
    assert_eq!(broker.metric("broker_session_panics_total").await, 0.0);
    broker.assert_still_serving().await;
}

/// The broker allows no topic aliases (CONNACK has no Topic Alias Maximum):
/// a publish with one, set or not, is a protocol error (MQTT 5 3.3.2.3.4).
#[tokio::test]
async fn a_topic_alias_from_a_client_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let (mut device, _) = RawDevice::connect(&broker, "aliased", &broker.token("al")).await;
    let publish = Publish::with_qos(
        Bytes::new(),
        Bytes::from_static(b"{}"),
        false,
        rp::QoS::AtLeastOnce,
        1,
    );
    let properties = rp::PublishProperties {
        topic_alias: Some(3),
        ..Default::default()
    };
    device
        .send_packet(Packet::Publish(publish, Some(properties)))
        .await;
    match device.next().await {
        Some(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert_eq!(device.next().await, None, "then the socket closes");
}

/// MQTT 5 3.1.2.11.4: the broker never sends a packet larger than the
/// client's Maximum Packet Size. Such a publish is not sent, and it is
/// settled with the router so that the client's later QoS 1/2 deliveries
/// flow in order.
#[tokio::test]
async fn publishes_larger_than_the_clients_maximum_packet_size_are_not_sent() {
    use mqtt_router::protocol::{Connect, ConnectProperties, Login};
    let broker = TestBroker::start().await;
    let handler = broker.handler("big-replier").await;
    let stream = TcpStream::connect(broker.tcp_addr).await.expect("connect");
    let mut device = RawDevice {
        stream,
        buf: BytesMut::new(),
        pending: Default::default(),
    };
    let connect = Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: "small".into(),
            clean_session: true,
        },
        Some(ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: Some(256),
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }),
        None,
        None,
        Some(Login {
            username: "JWT".into(),
            password: broker.token("mp"),
        }),
    );
    device.send_packet(connect).await;
    assert!(matches!(device.next().await, Some(p5::Packet::ConnAck(..))));
    device
        .send(raw::subscribe(5, 1, &["mp_r"], rp::QoS::ExactlyOnce))
        .await;
    assert!(matches!(device.next().await, Some(p5::Packet::SubAck(..))));

    let big = vec![b'x'; 1000];
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for payload in [big.clone(), b"small".to_vec()] {
            handler
                .client
                .publish("mp_r", qos, false, payload)
                .await
                .expect("publish");
        }
        // Only the small one arrives; the client answers it and nothing
        // complains about the one it never saw.
        let publish = match device.next().await {
            Some(p5::Packet::Publish(p)) => p,
            Some(other) => panic!("{qos:?}: expected the small publish, got {other:?}"),
            None => panic!("{qos:?}: the broker closed the connection"),
        };
        assert_eq!(&publish.payload[..], b"small", "{qos:?}");
        let pkid = publish.pkid;
        if qos == QoS::AtLeastOnce {
            device
                .send_packet(Packet::PubAck(
                    rp::PubAck {
                        pkid,
                        reason: rp::PubAckReason::Success,
                    },
                    None,
                ))
                .await;
        } else {
            device
                .send_packet(Packet::PubRec(
                    rp::PubRec {
                        pkid,
                        reason: rp::PubRecReason::Success,
                    },
                    None,
                ))
                .await;
            match device.next().await {
                Some(p5::Packet::PubRel(rel)) => assert_eq!(rel.pkid, pkid),
                other => panic!("expected PUBREL {pkid}, got {other:?}"),
            }
            device.send_packet(pubrel_comp(pkid)).await;
        }
    }
    device.send(vec![0xC0, 0x00]).await; // PINGREQ: still connected
    assert!(matches!(device.next().await, Some(p5::Packet::PingResp(_))));
}

fn pubrel_comp(pkid: u16) -> Packet {
    Packet::PubComp(
        rp::PubComp {
            pkid,
            reason: rp::PubCompReason::Success,
        },
        None,
    )
}
