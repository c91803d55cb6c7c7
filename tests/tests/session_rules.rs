//! Caps that must not reset when a client reconnects, and MQTT 5 rules on
//! CONNECT, SUBSCRIBE and DISCONNECT values, against the real broker with
//! raw packets (no client library sends these):
//! - the Receive Maximum counts a persistent session's unreleased QoS 2
//!   publishes across its connections (DISCONNECT 0x93 past it), and a held
//!   publish retransmitted after a reconnect is answered, not stored twice;
//! - a DISCONNECT that gives a session with expiry 0 an expiry is a
//!   protocol error (0x82) and its will is published at once, never parked;
//! - CONNECT with Receive Maximum 0, Maximum Packet Size 0, a property
//!   twice (0x82) or an Authentication Method (0x8C) is refused; SUBSCRIBE
//!   with two Subscription Identifiers (0x82) or reserved option bits set
//!   (0x81) ends the session; the broker serves others throughout.

use bytes::{BufMut, Bytes, BytesMut};
use e2e::{raw, TestBroker, TestOptions};
use mqtt_router::protocol::{
    self as rp, Connect, ConnectProperties, Disconnect, DisconnectProperties, LastWill,
    LastWillProperties, Login, Packet, PubRel, PubRelReason, Publish,
};
use rumqttc::v5::mqttbytes::v5::{
    self as p5, ConnectReturnCode, DisconnectReasonCode, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hand-driven client over plain TCP that reads what the broker sends
/// with rumqttc's MQTT 5 decoder (a client-side codec).
struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    pending: std::collections::VecDeque<p5::Packet>,
}

impl RawClient {
    async fn open(broker: &TestBroker) -> RawClient {
        RawClient {
            stream: TcpStream::connect(broker.tcp_addr).await.expect("connect"),
            buf: BytesMut::new(),
            pending: Default::default(),
        }
    }

    /// Sends a CONNECT and returns the broker's answer (`None`: it closed).
    async fn connect(broker: &TestBroker, connect: Vec<u8>) -> (RawClient, Option<p5::Packet>) {
        let mut client = RawClient::open(broker).await;
        client.send(connect).await;
        let answer = client.next().await;
        (client, answer)
    }

    async fn send(&mut self, bytes: Vec<u8>) {
        self.stream.write_all(&bytes).await.expect("write");
    }

    async fn send_packet(&mut self, packet: Packet) {
        self.send(raw::encode(5, packet)).await;
    }

    /// The next packet; `None` once the broker closed the socket. Fails
    /// the test after 10 s of silence.
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

    /// Expects a server DISCONNECT with `reason`, then the close.
    async fn expect_disconnect(&mut self, reason: DisconnectReasonCode) {
        match self.next().await {
            Some(p5::Packet::Disconnect(d)) => assert_eq!(d.reason_code, reason),
            other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
        }
        assert_eq!(self.next().await, None, "then the socket closes");
    }
}

fn connack_code(answer: Option<p5::Packet>) -> (ConnectReturnCode, bool) {
    match answer {
        Some(p5::Packet::ConnAck(ack)) => (ack.code, ack.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A device CONNECT (MQTT 5) with these properties and will.
fn device_connect(
    client_id: &str,
    token: &str,
    clean_start: bool,
    properties: Option<ConnectProperties>,
    will: Option<(LastWill, LastWillProperties)>,
) -> Vec<u8> {
    let (will, will_properties) = match will {
        Some((will, properties)) => (Some(will), Some(properties)),
        None => (None, None),
    };
    raw::encode(
        5,
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: client_id.into(),
                clean_session: clean_start,
            },
            properties,
            will,
            will_properties,
            Some(Login {
                username: "JWT".into(),
                password: token.into(),
            }),
        ),
    )
}

fn properties() -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

/// A packet from its first byte and body (the remaining length between).
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(first);
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out.to_vec()
}

fn mqtt_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A device CONNECT (MQTT 5, clean start) whose property block is `raw`
/// bytes, for what the encoder would not write (a property twice).
fn connect_with_raw_properties(client_id: &str, token: &str, raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, "MQTT");
    body.extend_from_slice(&[5, 0b1100_0010, 0, 30, raw.len() as u8]);
    body.extend_from_slice(raw);
    mqtt_string(&mut body, client_id);
    mqtt_string(&mut body, "JWT");
    mqtt_string(&mut body, token);
    frame(0x10, &body)
}

/// An MQTT 5 SUBSCRIBE of `filter` with raw property bytes and options.
fn subscribe_raw(pkid: u16, properties: &[u8], filter: &str, options: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(properties.len() as u8);
    body.extend_from_slice(properties);
    mqtt_string(&mut body, filter);
    body.push(options);
    frame(0x82, &body)
}

/// A QoS 2 PUBLISH; `dup` sets the DUP flag of a retransmission.
fn qos2_publish(topic: &str, payload: &str, pkid: u16, dup: bool) -> Vec<u8> {
    let publish = Publish::with_qos(
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::copy_from_slice(payload.as_bytes()),
        false,
        rp::QoS::ExactlyOnce,
        pkid,
    );
    let mut bytes = raw::encode(5, Packet::Publish(publish, None));
    if dup {
        bytes[0] |= 0x08;
    }
    bytes
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

fn disconnect(reason_code: rp::DisconnectReasonCode, expiry: Option<u32>) -> Packet {
    Packet::Disconnect(
        Disconnect { reason_code },
        expiry.map(|secs| DisconnectProperties {
            session_expiry_interval: Some(secs),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        }),
    )
}

/// QoS 2 publishes `pkids`, each answered with PUBREC and never released.
async fn hold(client: &mut RawClient, pkids: impl IntoIterator<Item = u16>) {
    for pkid in pkids {
        client
            .send(qos2_publish(
                "get_contact_list",
                &pkid.to_string(),
                pkid,
                false,
            ))
            .await;
        match client.next().await {
            Some(p5::Packet::PubRec(rec)) => {
                assert_eq!(rec.pkid, pkid);
                assert_eq!(rec.reason, p5::PubRecReason::Success);
            }
            other => panic!("expected PUBREC {pkid}, got {other:?}"),
        }
    }
}

/// Finding 1: a persistent session held 380 unreleased QoS 2 publishes
/// against a Receive Maximum of 100 by reconnecting (the count was the
/// connection's). Now the session's: past it, DISCONNECT 0x93, however many
/// connections it took; a held publish sent again after a reconnect gets
/// PUBREC and is delivered once, and its PUBREL gets PUBCOMP 0x00.
#[tokio::test]
async fn the_receive_maximum_counts_a_sessions_qos2_publishes_across_reconnects() {
    let mut options = TestOptions::default();
    options.limits.receive_maximum = 10;
    let broker = TestBroker::start_with(options).await;
    let mut handler = broker.handler("hoard-handler").await;
    assert_eq!(
        handler.subscribe("get_contact_list", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    let token = broker.token("hoarder");
    let persistent = || {
        let mut p = properties();
        p.session_expiry_interval = Some(600);
        device_connect("hoard", &token, false, Some(p), None)
    };

    // First connection: 4 held, then it leaves.
    let (mut first, answer) = RawClient::connect(&broker, persistent()).await;
    assert_eq!(connack_code(answer).0, ConnectReturnCode::Success);
    hold(&mut first, 1..=4).await;
    first
        .send_packet(disconnect(
            rp::DisconnectReasonCode::NormalDisconnection,
            None,
        ))
        .await;
    assert_eq!(first.next().await, None);

    // Second: the session is resumed with its 4. Publish 1 again (DUP):
    // PUBREC, no second copy; its PUBREL completes it. Then 4 more.
    let (mut second, answer) = RawClient::connect(&broker, persistent()).await;
    assert_eq!(connack_code(answer), (ConnectReturnCode::Success, true));
    second
        .send(qos2_publish("get_contact_list", "1", 1, true))
        .await;
    match second.next().await {
        Some(p5::Packet::PubRec(rec)) => assert_eq!(rec.pkid, 1),
        other => panic!("expected PUBREC 1 for the retransmission, got {other:?}"),
    }
    second.send_packet(pubrel(1)).await;
    match second.next().await {
        Some(p5::Packet::PubComp(comp)) => {
            assert_eq!(comp.pkid, 1);
            assert_eq!(comp.reason, p5::PubCompReason::Success);
        }
        other => panic!("expected PUBCOMP 1 (0x00), got {other:?}"),
    }
    hold(&mut second, 11..=14).await;
    drop(second); // no DISCONNECT: the connection is just lost

    // Third: 2, 3, 4 and 11..=14 still held (7 of 10): three more fit...
    let (mut third, answer) = RawClient::connect(&broker, persistent()).await;
    assert_eq!(connack_code(answer), (ConnectReturnCode::Success, true));
    hold(&mut third, 21..=23).await;
    // ... and the eleventh unreleased publish of the session is one too many.
    third
        .send(qos2_publish("get_contact_list", "24", 24, false))
        .await;
    third
        .expect_disconnect(DisconnectReasonCode::ReceiveMaximumExceeded)
        .await;

    // The handler got publish 1 once (released once, and never stored twice).
    let first_delivery = handler.publish_received().await;
    assert_eq!(&first_delivery.payload[..], b"1");
    handler.assert_no_publish(Duration::from_millis(500)).await;

    // A clean start drops what the session held: a full quota again.
    let (mut clean, answer) =
        RawClient::connect(&broker, device_connect("hoard", &token, true, None, None)).await;
    assert_eq!(connack_code(answer), (ConnectReturnCode::Success, false));
    hold(&mut clean, 1..=10).await;
    clean
        .send_packet(disconnect(
            rp::DisconnectReasonCode::NormalDisconnection,
            None,
        ))
        .await;
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

/// Finding 2: a session that connected with Session Expiry 0 and sets one
/// at DISCONNECT (MQTT-3.14.2-2) is told 0x82, keeps expiry 0, and its will
/// (with a Will Delay of an hour) is published at once instead of parked
/// for the session's would-be expiry. Whether it asked for the will
/// (0x04) or not (0x00): a protocol error is not a normal disconnect.
#[tokio::test]
async fn a_disconnect_may_not_give_a_clean_session_an_expiry() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("will-handler").await;
    handler.subscribe("get_contact_list", QoS::AtMostOnce).await;
    let token = broker.token("leaver");
    for (client_id, reason) in [
        (
            "with-will",
            rp::DisconnectReasonCode::DisconnectWithWillMessage,
        ),
        ("normal", rp::DisconnectReasonCode::NormalDisconnection),
    ] {
        let will = LastWill {
            topic: Bytes::from_static(b"get_contact_list"),
            message: Bytes::copy_from_slice(client_id.as_bytes()),
            qos: rp::QoS::AtMostOnce,
            retain: false,
        };
        let will_properties = LastWillProperties {
            delay_interval: Some(3600),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        let connect = device_connect(client_id, &token, true, None, Some((will, will_properties)));
        let (mut client, answer) = RawClient::connect(&broker, connect).await;
        assert_eq!(connack_code(answer).0, ConnectReturnCode::Success);
        client
            .send_packet(disconnect(reason, Some(7 * 24 * 3600)))
            .await;
        client
            .expect_disconnect(DisconnectReasonCode::ProtocolError)
            .await;
        let will = tokio::time::timeout(Duration::from_secs(5), handler.publish_received())
            .await
            .unwrap_or_else(|_| panic!("{client_id}: the will is published at once"));
        assert_eq!(&will.payload[..], client_id.as_bytes());
    }
    // A session that connected with an expiry may still change it.
    let mut p = properties();
    p.session_expiry_interval = Some(60);
    let (mut persistent, answer) = RawClient::connect(
        &broker,
        device_connect("keeps", &token, true, Some(p), None),
    )
    .await;
    assert_eq!(connack_code(answer).0, ConnectReturnCode::Success);
    persistent
        .send_packet(disconnect(
            rp::DisconnectReasonCode::NormalDisconnection,
            Some(120),
        ))
        .await;
    assert_eq!(persistent.next().await, None, "closed without a DISCONNECT");
    assert_eq!(
        broker
            .metric("broker_sessions_ended_total{reason=\"protocol error\"}")
            .await,
        2.0
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

/// Finding 3, CONNECT: values MQTT 5 forbids get CONNACK 0x82, an
/// Authentication Method 0x8C (the broker offers none); each before any
/// session exists. MQTT 3.1.1 clients (no properties) are unaffected.
#[tokio::test]
async fn connect_values_mqtt5_forbids_are_refused() {
    let broker = TestBroker::start().await;
    let token = broker.token("values");
    let with = |change: fn(&mut ConnectProperties)| {
        let mut p = properties();
        change(&mut p);
        device_connect("values", &token, true, Some(p), None)
    };
    let cases = [
        (
            "receive maximum 0",
            with(|p| p.receive_maximum = Some(0)),
            ConnectReturnCode::ProtocolError,
        ),
        (
            "maximum packet size 0",
            with(|p| p.max_packet_size = Some(0)),
            ConnectReturnCode::ProtocolError,
        ),
        (
            "request problem information 2",
            with(|p| p.request_problem_info = Some(2)),
            ConnectReturnCode::ProtocolError,
        ),
        (
            "authentication method",
            with(|p| p.authentication_method = Some("SCRAM-SHA-256".into())),
            ConnectReturnCode::BadAuthenticationMethod,
        ),
        (
            "receive maximum twice",
            connect_with_raw_properties("values", &token, &[0x21, 0, 10, 0x21, 0, 20]),
            ConnectReturnCode::ProtocolError,
        ),
        (
            "session expiry twice",
            connect_with_raw_properties("values", &token, &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]),
            ConnectReturnCode::ProtocolError,
        ),
    ];
    for (what, connect, expected) in cases {
        let (mut client, answer) = RawClient::connect(&broker, connect).await;
        assert_eq!(connack_code(answer).0, expected, "{what}");
        assert_eq!(client.next().await, None, "{what}: then the socket closes");
    }
    // The same CONNECTs with allowed values connect.
    for connect in [
        with(|p| {
            p.receive_maximum = Some(1);
            p.max_packet_size = Some(1024);
            p.request_problem_info = Some(1);
        }),
        connect_with_raw_properties("values", &token, &[0x21, 0, 10, 0x11, 0, 0, 0, 0]),
    ] {
        let (_client, answer) = RawClient::connect(&broker, connect).await;
        assert_eq!(connack_code(answer).0, ConnectReturnCode::Success);
    }
    // MQTT 3.1.1 keeps working.
    let mut v4 = broker.device_v4("values-v4", "old-phone").await;
    v4.client
        .subscribe("values-v4_contact_list", rumqttc::QoS::AtMostOnce)
        .await
        .expect("queue subscribe");
    let ack = v4.suback().await;
    assert_eq!(
        ack.return_codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtMostOnce
        )]
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

/// Finding 3, SUBSCRIBE (and any packet): a property MQTT 5 allows once,
/// twice, is a protocol error (DISCONNECT 0x82); reserved subscription
/// option bits are a malformed packet (0x81; MQTT 3.1.1: the socket is
/// closed). The broker serves others throughout.
#[tokio::test]
async fn subscribe_with_two_identifiers_or_reserved_bits_ends_the_session() {
    let broker = TestBroker::start().await;
    let token = broker.token("subs");
    let cases = [
        (
            "two subscription identifiers",
            subscribe_raw(1, &[0x0B, 1, 0x0B, 2], "subs_contact_list", 0),
            DisconnectReasonCode::ProtocolError,
        ),
        (
            "reserved bit 6",
            subscribe_raw(1, &[], "subs_contact_list", 0x40),
            DisconnectReasonCode::MalformedPacket,
        ),
        (
            "reserved bit 7",
            subscribe_raw(1, &[], "subs_contact_list", 0x81),
            DisconnectReasonCode::MalformedPacket,
        ),
        (
            "publish with two message expiry intervals",
            frame(
                0x30,
                &[
                    0, 16, b'g', b'e', b't', b'_', b'c', b'o', b'n', b't', b'a', b'c', b't', b'_',
                    b'l', b'i', b's', b't', 10, 0x02, 0, 0, 0, 5, 0x02, 0, 0, 0, 6, b'{', b'}',
                ],
            ),
            DisconnectReasonCode::ProtocolError,
        ),
    ];
    for (what, packet, expected) in cases {
        let (mut client, answer) =
            RawClient::connect(&broker, device_connect("subs", &token, true, None, None)).await;
        assert_eq!(connack_code(answer).0, ConnectReturnCode::Success, "{what}");
        client.send(packet).await;
        match client.next().await {
            Some(p5::Packet::Disconnect(d)) => assert_eq!(d.reason_code, expected, "{what}"),
            other => panic!("{what}: expected DISCONNECT {expected:?}, got {other:?}"),
        }
        assert_eq!(client.next().await, None, "{what}: then the socket closes");
    }
    // Every defined option bit, and one identifier: subscribed.
    let (mut client, _) =
        RawClient::connect(&broker, device_connect("subs", &token, true, None, None)).await;
    client
        .send(subscribe_raw(
            2,
            &[0x0B, 9],
            "subs_contact_list",
            0b0010_1101,
        ))
        .await;
    match client.next().await {
        Some(p5::Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 2);
            assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // MQTT 3.1.1: reserved bits close the connection (no DISCONNECT there).
    let mut v4 = TcpStream::connect(broker.tcp_addr).await.expect("connect");
    v4.write_all(&raw::connect(4, "subs-v4", 30, &token))
        .await
        .expect("write");
    let mut connack = [0u8; 4];
    v4.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let mut body = vec![0, 1];
    mqtt_string(&mut body, "subs_contact_list");
    body.push(0x04);
    v4.write_all(&frame(0x82, &body)).await.expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), v4.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s");
    assert!(
        read.is_ok() && rest.is_empty(),
        "closed, no SUBACK: {rest:?}"
    );

    broker.assert_still_serving().await;
    broker.shutdown().await;
}
