//! The embedded router must never die of one client's input (issue 9): the
//! two inputs that used to panic it (and so end the broker), and QoS 2
//! exactly-once through it, against the real broker over TLS (raw packets
//! over the plain listener where no library would send them).

use bytes::{Bytes, BytesMut};
use e2e::clients::{Seen, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY};
use mqtt_router::protocol::{self as rp, Protocol};
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A handler with a persistent MQTT 5 session (clean start off, an expiry)
/// that acknowledges nothing by itself.
fn persistent_handler(broker: &TestBroker, client_id: &str, manual_acks: bool) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        "handler",
        TEST_HANDLER_KEY,
        |o| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(300));
            o.set_manual_acks(manual_acks);
        },
    )
}

/// Crash A: the only member of a `$share` group, with a persistent session,
/// disconnects while a QoS 1 delivery to it is unacknowledged. The router
/// used to panic (and the broker to shut down). Now the broker keeps
/// serving, and the session gets the message again when it comes back.
#[tokio::test]
async fn persistent_sole_shared_member_leaving_unacked_keeps_the_broker() {
    let broker = TestBroker::start().await;
    let mut handler = persistent_handler(&broker, "solo-handler", true);
    handler.connected().await;
    handler
        .subscribe("$share/solo/request_contact", QoS::AtLeastOnce)
        .await;

    let mut device = broker.device("68946", "d1").await;
    device
        .client
        .publish(
            "request_contact",
            QoS::AtLeastOnce,
            false,
            r#"{"contact_id":"1"}"#,
        )
        .await
        .unwrap();
    device.puback().await;
    let first = handler.publish_received().await;
    assert_eq!(first.qos, QoS::AtLeastOnce);
    // Gone without PUBACK: the delivery is unacknowledged.
    drop(handler);

    // Published while the session is offline: kept for it.
    device
        .client
        .publish(
            "request_contact",
            QoS::AtLeastOnce,
            false,
            r#"{"contact_id":"2"}"#,
        )
        .await
        .unwrap();
    device.puback().await;

    broker.assert_still_serving().await;

    // MQTT 4.4: the unacknowledged message is sent again on reconnect, and
    // the session's shared subscription still delivers.
    let mut back = persistent_handler(&broker, "solo-handler", false);
    let ack = back.connected().await;
    assert!(ack.session_present, "the persistent session survived");
    let mut payloads = Vec::new();
    for _ in 0..2 {
        let publish = back.publish_received().await;
        assert_eq!(publish.topic, "request_contact");
        payloads.push(String::from_utf8_lossy(&publish.payload).into_owned());
    }
    assert_eq!(
        payloads,
        vec![r#"{"contact_id":"1"}"#, r#"{"contact_id":"2"}"#],
        "the unacknowledged message, then the one published meanwhile"
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

/// Crash B: a retained message on a topic whose first character is
/// multi-byte meets wildcard filters (the router sliced `topic[..1]`).
#[tokio::test]
async fn multibyte_first_character_topic_meets_wildcards() {
    let broker = TestBroker::start().await;
    let mut early = broker.handler("early").await;
    early.subscribe("+/x", QoS::AtMostOnce).await;

    let publisher = broker.handler("publisher").await;
    publisher
        .client
        .publish("é/x", QoS::AtLeastOnce, true, "retained")
        .await
        .unwrap();
    let live = early.publish_received().await;
    assert_eq!(live.topic, "é/x");

    // A later subscriber to `#` gets the retained message.
    let mut late = broker.handler("late").await;
    late.subscribe("#", QoS::AtMostOnce).await;
    let retained = late.publish_received().await;
    assert_eq!(retained.topic, "é/x");
    assert_eq!(&retained.payload[..], b"retained");
    assert!(retained.retain, "delivered as retained");

    broker.assert_still_serving().await;
    broker.shutdown().await;
}

fn encode_v5(packet: rp::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    rp::v5::V5
        .write(packet, &mut out)
        .expect("a test packet encodes");
    out.to_vec()
}

fn qos2_publish(pkid: u16, payload: &'static str, dup: bool) -> Vec<u8> {
    let publish = rp::Publish::with_qos(
        Bytes::from_static(b"get_contact_list"),
        Bytes::from_static(payload.as_bytes()),
        false,
        rp::QoS::ExactlyOnce,
        pkid,
    );
    let mut bytes = encode_v5(rp::Packet::Publish(publish, None));
    if dup {
        // The DUP flag: bit 3 of the fixed header.
        if let Some(first) = bytes.first_mut() {
            *first |= 0x08;
        }
    }
    bytes
}

fn pubrel(pkid: u16) -> Vec<u8> {
    encode_v5(rp::Packet::PubRel(
        rp::PubRel {
            pkid,
            reason: rp::PubRelReason::Success,
        },
        None,
    ))
}

/// A packet from the broker, as far as these tests read it: its type
/// (the high nibble of the fixed header) and its variable header and payload.
struct Incoming {
    kind: u8,
    body: Vec<u8>,
}

impl Incoming {
    /// The packet id of a PUBREC/PUBCOMP (the first two bytes).
    fn pkid(&self) -> Option<u16> {
        Some(u16::from_be_bytes([
            *self.body.first()?,
            *self.body.get(1)?,
        ]))
    }
}

const CONNACK: u8 = 2;
const PUBREC: u8 = 5;
const PUBCOMP: u8 = 7;

/// A raw MQTT 5 connection: writes bytes, reads whole packets (parsed by
/// hand: the codecs read only what a server receives).
struct Raw {
    stream: TcpStream,
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn byte(&mut self) -> u8 {
        let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read_u8()).await;
        read.expect("a packet within the deadline").expect("read")
    }

    async fn next(&mut self) -> Incoming {
        let first = self.byte().await;
        let mut len = 0usize;
        for shift in [0, 7, 14, 21] {
            let b = self.byte().await;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut body))
            .await
            .expect("a packet within the deadline")
            .expect("read");
        Incoming {
            kind: first >> 4,
            body,
        }
    }

    /// Next packet, which must be of `kind` (with `pkid`, if given).
    async fn expect(&mut self, kind: u8, pkid: Option<u16>) -> Incoming {
        let packet = self.next().await;
        assert_eq!(packet.kind, kind, "packet type");
        if pkid.is_some() {
            assert_eq!(packet.pkid(), pkid, "packet id");
        }
        packet
    }
}

/// A retransmitted (DUP) QoS 2 publish with the packet id of one that
/// awaits PUBREL is acknowledged again but delivered once, and the next
/// message is not lost (the router used to store it twice and release by
/// queue order). A PUBREL for an unknown packet id gets a PUBCOMP.
#[tokio::test]
async fn qos2_retransmission_is_delivered_exactly_once() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("qos2-handler").await;
    handler
        .subscribe("get_contact_list", QoS::AtLeastOnce)
        .await;

    let stream = TcpStream::connect(broker.tcp_addr).await.expect("connect");
    let mut raw = Raw { stream };
    raw.send(&e2e::raw::connect(
        5,
        "qos2-device",
        30,
        &broker.token("550"),
    ))
    .await;
    let connack = raw.expect(CONNACK, None).await;
    assert_eq!(connack.body.get(1), Some(&0), "connected");

    raw.send(&qos2_publish(5, "one", false)).await;
    raw.send(&qos2_publish(5, "one", true)).await;
    // Each copy is answered with PUBREC.
    raw.expect(PUBREC, Some(5)).await;
    raw.expect(PUBREC, Some(5)).await;
    raw.send(&pubrel(5)).await;
    raw.expect(PUBCOMP, Some(5)).await;

    raw.send(&qos2_publish(6, "two", false)).await;
    raw.expect(PUBREC, Some(6)).await;
    raw.send(&pubrel(6)).await;
    raw.expect(PUBCOMP, Some(6)).await;

    // A PUBREL nobody awaits (already released) still gets its PUBCOMP,
    // reason 0x92 (packet identifier not found).
    raw.send(&pubrel(6)).await;
    let comp = raw.expect(PUBCOMP, Some(6)).await;
    assert_eq!(comp.body.get(2), Some(&0x92), "{:?}", comp.body);

    let first = handler.publish_received().await;
    assert_eq!(&first.payload[..], b"one");
    let second = handler.publish_received().await;
    assert_eq!(&second.payload[..], b"two", "the next message is not lost");
    // And no second copy of either.
    while let Some(event) = handler.next_within(Duration::from_millis(500)).await {
        if let Seen::Packet(p5::Packet::Publish(p)) = event {
            panic!("delivered again: {:?}", p.payload);
        }
    }
    broker.assert_still_serving().await;
    broker.shutdown().await;
}
