//! MQTT 5 semantics the gate owns (issue 10), against the real broker over
//! TLS with rumqttc v5 and paho-mqtt 2.x: the Will Delay Interval and will
//! properties; the gate's own delivery path (reply index) showing a device
//! the protocol the router path shows (properties, message expiry,
//! subscription identifiers, Retain As Published, retained messages on
//! resubscription, Maximum Packet Size); properties of device publishes
//! forwarded unaltered with the identity stamps after them; Server Keep
//! Alive; and what a client may not put in a PUBLISH.
//!
//! Timing: a will "not yet published" is checked over a window well inside
//! its delay (at least one second of margin either side), never to the
//! millisecond.

use bytes::Bytes;
use e2e::clients::{user_property, V5Client};
use e2e::TestBroker;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Filter, LastWill, LastWillProperties, PublishProperties, RetainForwardRule,
    SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

/// A device's MQTT 5 connection with a will on `will_topic`, the given will
/// properties and Session Expiry Interval (clean start unless `resume`).
fn device_with_will(
    broker: &TestBroker,
    uid: &str,
    client_id: &str,
    will: Option<(&str, LastWillProperties)>,
    session_expiry: u32,
    resume: bool,
) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        "JWT",
        &broker.token(uid),
        |o| {
            o.set_clean_start(!resume);
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(session_expiry);
            o.set_connect_properties(props);
            if let Some((topic, properties)) = will {
                o.set_last_will(LastWill::new(
                    topic,
                    "gone",
                    QoS::AtLeastOnce,
                    false,
                    Some(properties),
                ));
            }
        },
    )
}

fn will_properties(delay: u32) -> LastWillProperties {
    LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }
}

/// A handler subscribed to `filter` (QoS 1), ready.
async fn watcher(broker: &TestBroker, client_id: &str, filter: &str) -> V5Client {
    let mut handler = broker.handler(client_id).await;
    assert_eq!(
        handler.subscribe(filter, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    handler
}

/// MQTT 5 §3.1.3.2.2 and §3.1.3.2.3-8: a will with a delay is published
/// when the delay elapses (not at once), with the properties its CONNECT
/// gave it, unaltered and in order; a device's will carries the identity
/// stamps after them (a forged `user_id` is dropped).
#[tokio::test]
async fn a_delayed_will_is_published_after_its_delay_with_its_properties() {
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "will-watcher", "get_contact_list").await;
    let properties = LastWillProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(300),
        content_type: Some("text/plain".into()),
        response_topic: Some("wd_r".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![
            ("z".into(), "first".into()),
            ("user_id".into(), "forged".into()),
            ("a".into(), "second".into()),
            ("z".into(), "third".into()),
        ],
        ..will_properties(2)
    };
    let mut device = device_with_will(
        &broker,
        "wd",
        "phone",
        Some(("get_contact_list", properties)),
        60,
        false,
    );
    device.connected().await;
    drop(device); // the socket closes without DISCONNECT
    handler.assert_no_publish(Duration::from_millis(1000)).await;
    let will = handler.publish_received().await;
    assert_eq!(&will.payload[..], b"gone");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    let got = will.properties.expect("will properties");
    assert_eq!(got.payload_format_indicator, Some(1));
    let expiry = got.message_expiry_interval.expect("message expiry");
    assert!(
        (298..=300).contains(&expiry),
        "expiry counts from publication: {expiry}"
    );
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(got.response_topic.as_deref(), Some("wd_r"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(
        e2e::clients::without_token_iat(&got.user_properties),
        vec![
            ("z".to_owned(), "first".to_owned()),
            ("a".to_owned(), "second".to_owned()),
            ("z".to_owned(), "third".to_owned()),
            ("user_id".to_owned(), "wd".to_owned()),
            ("client_id".to_owned(), "phone".to_owned()),
        ]
    );
    handler.assert_no_publish(Duration::from_millis(300)).await;
    broker.shutdown().await;
}

/// MQTT-3.1.3-9: a session resumed before the will delay elapses does not
/// get its will published, not even later.
#[tokio::test]
async fn a_session_resumed_before_the_delay_elapses_cancels_its_will() {
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "will-watcher", "get_contact_list").await;
    let will = Some(("get_contact_list", will_properties(2)));
    let mut first = device_with_will(&broker, "wr", "phone", will.clone(), 60, false);
    first.connected().await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = device_with_will(&broker, "wr", "phone", None, 60, true);
    second.connected().await;
    handler.assert_no_publish(Duration::from_millis(3500)).await;
    // The resumed session's own will (none here) is all there is: a normal
    // DISCONNECT ends it without one.
    second.client.disconnect().await.expect("disconnect");
    handler.assert_no_publish(Duration::from_millis(300)).await;
    broker.shutdown().await;
}

/// MQTT 5 §3.1.4 and MQTT-3.1.3-9 on takeover: the replaced connection's
/// delayed will is not published when the new connection resumes the
/// session, and is published at once when it starts clean.
#[tokio::test]
async fn a_takeover_resuming_the_session_cancels_the_delayed_will() {
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "will-watcher", "get_contact_list").await;
    let will = Some(("get_contact_list", will_properties(2)));
    let mut old = device_with_will(&broker, "wt", "phone", will.clone(), 60, false);
    old.connected().await;
    let mut resumed = device_with_will(&broker, "wt", "phone", None, 60, true);
    resumed.connected().await;
    let ended = old.closed().await;
    assert!(ended.contains("SessionTakenOver"), "old: {ended}");
    handler.assert_no_publish(Duration::from_millis(3500)).await;

    // A delay of 600 s: only publication at the takeover arrives in time.
    let will = Some(("get_contact_list", will_properties(600)));
    let mut old = device_with_will(&broker, "wt2", "phone", will, 600, false);
    old.connected().await;
    let mut clean = device_with_will(&broker, "wt2", "phone", None, 0, false);
    clean.connected().await;
    let published = handler.publish_received().await;
    assert_eq!(user_property(&published, "user_id"), vec!["wt2"]);
    drop(old);
    broker.shutdown().await;
}

/// MQTT 5 §3.1.3.2.2: "or the Session ends, whichever happens first": a
/// session expiring before the will delay publishes the will then; a new
/// clean connection ends the old session at once, and with it publishes
/// the will.
#[tokio::test]
async fn a_will_is_published_when_its_session_ends_before_the_delay() {
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "will-watcher", "get_contact_list").await;

    // Session Expiry 2 s, will delay 600 s: published after about 2 s.
    let will = Some(("get_contact_list", will_properties(600)));
    let mut expiring = device_with_will(&broker, "we", "phone", will.clone(), 2, false);
    expiring.connected().await;
    drop(expiring);
    handler.assert_no_publish(Duration::from_millis(1000)).await;
    let published = handler.publish_received().await;
    assert_eq!(user_property(&published, "user_id"), vec!["we"]);

    // Will delay 600 s, session 600 s: a clean start ends that session.
    let mut left = device_with_will(&broker, "wc", "phone", will, 600, false);
    left.connected().await;
    drop(left);
    handler.assert_no_publish(Duration::from_millis(1000)).await;
    let mut clean = device_with_will(&broker, "wc", "phone", None, 0, false);
    clean.connected().await;
    let published = handler.publish_received().await;
    assert_eq!(user_property(&published, "user_id"), vec!["wc"]);
    broker.shutdown().await;
}

/// Handler role: a QoS 2 will with a delay is delivered once, after the
/// delay, with its properties as given (no identity stamps), and a
/// retained will is kept.
#[tokio::test]
async fn a_handlers_delayed_qos2_retained_will_arrives_once_and_is_kept() {
    let broker = TestBroker::start().await;
    let mut watcher = broker.handler("will-watcher").await;
    assert_eq!(
        watcher.subscribe("status/worker", QoS::ExactlyOnce).await,
        SubscribeReasonCode::Success(QoS::ExactlyOnce)
    );
    let mut worker = V5Client::connect(
        broker.tls_target(),
        "worker",
        "handler",
        e2e::TEST_HANDLER_KEY,
        |o| {
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(60);
            o.set_connect_properties(props);
            o.set_last_will(LastWill::new(
                "status/worker",
                "offline",
                QoS::ExactlyOnce,
                true,
                Some(LastWillProperties {
                    content_type: Some("text/plain".into()),
                    user_properties: vec![("b".into(), "1".into()), ("a".into(), "2".into())],
                    ..will_properties(2)
                }),
            ));
        },
    );
    worker.connected().await;
    drop(worker);
    watcher.assert_no_publish(Duration::from_millis(1000)).await;
    let will = watcher.publish_received().await;
    assert_eq!(&will.payload[..], b"offline");
    assert_eq!(will.qos, QoS::ExactlyOnce);
    let properties = will.properties.expect("properties");
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        properties.user_properties,
        vec![
            ("b".to_owned(), "1".to_owned()),
            ("a".to_owned(), "2".to_owned())
        ]
    );
    watcher.assert_no_publish(Duration::from_millis(500)).await;
    // Retained: a later subscriber gets it.
    let mut late = broker.handler("late-watcher").await;
    late.subscribe("status/worker", QoS::AtMostOnce).await;
    let kept = late.publish_received().await;
    assert_eq!(&kept.payload[..], b"offline");
    broker.shutdown().await;
}

/// paho-mqtt 2.x (MQTT 5) as the device: its will with a Will Delay
/// Interval of 2 s is published after the delay, not when its socket
/// closes, with its content type and user property.
#[tokio::test]
async fn paho_will_delay_is_honoured() {
    const SCRIPT: &str = r#"
import os, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
host, port, ca, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-will", protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca)
c.username_pw_set("JWT", token)
will = Properties(PacketTypes.WILLMESSAGE)
will.WillDelayInterval = 2
will.ContentType = "text/plain"
will.UserProperty = ("k", "v")
c.will_set("get_contact_list", b"paho gone", qos=1, properties=will)
connect = Properties(PacketTypes.CONNECT)
connect.SessionExpiryInterval = 60
done = threading.Event()
def on_connect(client, userdata, flags, reason_code, properties):
    print("connack", reason_code.value, flush=True)
    done.set()
c.on_connect = on_connect
c.connect(host, port, keepalive=30, clean_start=True, properties=connect)
c.loop_start()
if not done.wait(10):
    sys.exit(2)
# Gone without DISCONNECT: the process ends, the OS closes the socket.
os._exit(0)
"#;
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "will-watcher", "get_contact_list").await;
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg("127.0.0.1")
            .arg(broker.tls_addr.port().to_string())
            .arg(&broker.ca_file)
            .arg(broker.token("pw"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 finishes in time")
    .expect("python3 with paho-mqtt 2.x is required (python3 -m pip install paho-mqtt)");
    assert!(
        output.status.success(),
        "paho client: {:?} {} {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "connack 0");
    handler.assert_no_publish(Duration::from_millis(1000)).await;
    let will = handler.publish_received().await;
    assert_eq!(&will.payload[..], b"paho gone");
    let properties = will.properties.clone().expect("properties");
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(user_property(&will, "k"), vec!["v"]);
    assert_eq!(user_property(&will, "user_id"), vec!["pw"]);
    broker.shutdown().await;
}

/// The reply index (a clean device session's QoS 0 subscription to its own
/// reply topic) delivers what the router would: every property unaltered
/// and in order, the expiry counted down (not up), the device's
/// Subscription Identifier (MQTT 5 §3.3.2.3.8), which CONNACK says are
/// available; a device may subscribe with options and an identifier.
#[tokio::test]
async fn the_gate_path_carries_properties_and_the_subscription_identifier() {
    let broker = TestBroker::start().await;
    let mut device = V5Client::connect(
        broker.tls_target(),
        "phone",
        "JWT",
        &broker.token("ri"),
        |_| {},
    );
    let connack = device.connected().await;
    let available = connack
        .properties
        .and_then(|p| p.subscription_identifiers_available);
    assert_ne!(
        available,
        Some(0),
        "CONNACK offers subscription identifiers"
    );
    device
        .client
        .subscribe_many_with_properties(
            [Filter {
                path: "ri_r".into(),
                qos: QoS::AtMostOnce,
                nolocal: true,
                preserve_retain: true,
                retain_forward_rule: RetainForwardRule::OnNewSubscribe,
            }],
            SubscribeProperties {
                id: Some(42),
                user_properties: Vec::new(),
            },
        )
        .await
        .expect("subscribe");
    let suback = device.suback().await;
    assert_eq!(
        suback.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    let handler = broker.handler("replier").await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(120),
        topic_alias: None,
        response_topic: Some("get_contact_list".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("z".into(), "1".into()),
            ("a".into(), "2".into()),
            ("z".into(), "3".into()),
        ],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    };
    handler
        .client
        .publish_with_properties("ri_r", QoS::AtMostOnce, false, "[]", sent.clone())
        .await
        .expect("reply");
    let reply = device.publish_received().await;
    let got = reply.properties.expect("properties");
    let expiry = got.message_expiry_interval.expect("expiry forwarded");
    assert!((118..=120).contains(&expiry), "remaining time: {expiry}");
    assert_eq!(
        got,
        PublishProperties {
            message_expiry_interval: Some(expiry),
            subscription_identifiers: vec![42],
            ..sent
        }
    );
    // A reply without properties gets the identifier alone.
    handler
        .client
        .publish("ri_r", QoS::AtMostOnce, false, "{}")
        .await
        .expect("reply");
    let reply = device.publish_received().await;
    assert_eq!(
        reply.properties.map(|p| p.subscription_identifiers),
        Some(vec![42])
    );
    broker.shutdown().await;
}

/// MQTT 5 §3.3.1.3 and §3.8.3.1 on the gate path: a live delivery keeps the
/// retain flag only under Retain As Published; and once the topic holds a
/// retained message, resubscribing (Retain Handling 0) sends it, as the
/// router does for its subscriptions (MQTT 5 §3.8.4).
#[tokio::test]
async fn the_gate_path_honours_retain_as_published_and_resends_retained_on_resubscribe() {
    let broker = TestBroker::start().await;
    let subscribe = |device: &V5Client, rap: bool| {
        let client = device.client.clone();
        async move {
            client
                .subscribe_many([Filter {
                    path: "rr_r".into(),
                    qos: QoS::AtMostOnce,
                    nolocal: false,
                    preserve_retain: rap,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                }])
                .await
                .expect("subscribe");
        }
    };
    let mut keeps = broker.device("rr", "keeps").await;
    subscribe(&keeps, true).await;
    keeps.suback().await;
    let mut plain = broker.device("rr", "plain").await;
    subscribe(&plain, false).await;
    plain.suback().await;
    let handler = broker.handler("replier").await;
    handler
        .client
        .publish("rr_r", QoS::AtMostOnce, true, "profile")
        .await
        .expect("retained reply");
    let live = keeps.publish_received().await;
    assert_eq!(&live.payload[..], b"profile");
    assert!(live.retain, "Retain As Published keeps the flag");
    let live = plain.publish_received().await;
    assert!(!live.retain, "no Retain As Published: no flag");

    // Resubscribing sends the retained message (flagged: it is retained).
    subscribe(&plain, false).await;
    plain.suback().await;
    let resent = plain.publish_received().await;
    assert_eq!(&resent.payload[..], b"profile");
    assert!(
        resent.retain,
        "a retained message sent on subscribe is flagged"
    );
    // And the subscription goes on serving live replies, once each.
    handler
        .client
        .publish("rr_r", QoS::AtMostOnce, false, "next")
        .await
        .expect("reply");
    assert_eq!(&plain.publish_received().await.payload[..], b"next");
    assert_eq!(&keeps.publish_received().await.payload[..], b"next");
    plain.assert_no_publish(Duration::from_millis(300)).await;
    broker.shutdown().await;
}

/// MQTT 5 §3.1.2.11.4 on the gate path: a reply larger than the device's
/// Maximum Packet Size is not sent to it; smaller ones still are.
#[tokio::test]
async fn the_gate_path_honours_the_clients_maximum_packet_size() {
    let broker = TestBroker::start().await;
    let mut device = V5Client::connect(
        broker.tls_target(),
        "phone",
        "JWT",
        &broker.token("mp"),
        |o| {
            let mut props = ConnectProperties::new();
            props.max_packet_size = Some(256);
            o.set_connect_properties(props);
        },
    );
    device.connected().await;
    device.subscribe("mp_r", QoS::AtMostOnce).await;
    let handler = broker.handler("replier").await;
    handler
        .client
        .publish("mp_r", QoS::AtMostOnce, false, vec![b'x'; 1000])
        .await
        .expect("large reply");
    handler
        .client
        .publish("mp_r", QoS::AtMostOnce, false, "small")
        .await
        .expect("small reply");
    assert_eq!(&device.publish_received().await.payload[..], b"small");
    broker.shutdown().await;
}

/// Issue 10 "Properties forwarded": a device's publish reaches the handler
/// with every property unaltered and in order (user properties included),
/// forged identity properties dropped and the stamps after the others.
#[tokio::test]
async fn a_devices_publish_reaches_the_handler_with_its_properties_in_order() {
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "command-handler", "get_contact_list").await;
    let device = broker.device("pf", "phone").await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(90),
        topic_alias: None,
        response_topic: Some("pf_r".into()),
        correlation_data: Some(Bytes::from_static(b"c-9")),
        user_properties: vec![
            ("trace".into(), "t1".into()),
            ("client_id".into(), "forged".into()),
            ("b".into(), "x".into()),
            ("trace".into(), "t2".into()),
        ],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    };
    device
        .client
        .publish_with_properties(
            "get_contact_list",
            QoS::AtLeastOnce,
            false,
            "{}",
            sent.clone(),
        )
        .await
        .expect("publish");
    let command = handler.publish_received().await;
    let mut got = command.properties.expect("properties");
    got.user_properties = e2e::clients::without_token_iat(&got.user_properties);
    let expiry = got.message_expiry_interval.expect("expiry");
    assert!((88..=90).contains(&expiry), "remaining time: {expiry}");
    assert_eq!(
        got,
        PublishProperties {
            message_expiry_interval: Some(expiry),
            user_properties: vec![
                ("trace".into(), "t1".into()),
                ("b".into(), "x".into()),
                ("trace".into(), "t2".into()),
                ("user_id".into(), "pf".into()),
                ("client_id".into(), "phone".into()),
            ],
            ..sent
        }
    );
    broker.shutdown().await;
}

/// MQTT 5 §3.3.4 (MQTT-3.3.4-6): a PUBLISH from a client must not carry a
/// Subscription Identifier: the connection ends with DISCONNECT 0x82 and
/// the publish is not delivered (both roles); nor may a SUBSCRIBE carry the
/// identifier 0.
#[tokio::test]
async fn a_subscription_identifier_in_a_clients_publish_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut handler = watcher(&broker, "command-handler", "get_contact_list").await;
    let forged = PublishProperties {
        subscription_identifiers: vec![7],
        ..Default::default()
    };
    let mut device = broker.device("si", "phone").await;
    device
        .client
        .publish_with_properties(
            "get_contact_list",
            QoS::AtMostOnce,
            false,
            "{}",
            forged.clone(),
        )
        .await
        .expect("publish");
    let ended = device.closed().await;
    assert!(ended.contains("ProtocolError"), "device: {ended}");
    let mut other = broker.handler("other-handler").await;
    other
        .client
        .publish_with_properties("get_contact_list", QoS::AtMostOnce, false, "{}", forged)
        .await
        .expect("publish");
    let ended = other.closed().await;
    assert!(ended.contains("ProtocolError"), "handler: {ended}");
    handler.assert_no_publish(Duration::from_millis(300)).await;

    // MQTT 5 §3.8.2.1.2: a Subscription Identifier of 0 is a protocol error.
    let mut zero = broker.device("si", "zero").await;
    zero.client
        .subscribe_with_properties(
            "si_r",
            QoS::AtMostOnce,
            SubscribeProperties {
                id: Some(0),
                user_properties: Vec::new(),
            },
        )
        .await
        .expect("subscribe");
    let ended = zero.closed().await;
    assert!(ended.contains("ProtocolError"), "identifier 0: {ended}");
    broker.shutdown().await;
}

/// MQTT 5 §3.2.2.3.14: when the broker applies a keep-alive other than the
/// client's (a keep-alive of 0 raised to the maximum, or one above it
/// capped), CONNACK carries the Server Keep Alive; a keep-alive within the
/// maximum is not overridden.
#[tokio::test]
async fn connack_carries_the_server_keep_alive_it_applies() {
    use mqtt_router::protocol::{Packet, Protocol};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut options = e2e::TestOptions::default();
    options.limits.max_keep_alive_secs = 60;
    let broker = TestBroker::start_with(options).await;
    for (asked, applied) in [(0u16, Some(60u16)), (600, Some(60)), (30, None)] {
        let mut stream = tokio::net::TcpStream::connect(broker.tcp_addr)
            .await
            .expect("connect");
        let connect = e2e::raw::connect(5, &format!("ka-{asked}"), asked, &broker.token("ka"));
        stream.write_all(&connect).await.expect("write");
        let mut buf = bytes::BytesMut::new();
        let packet = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(packet) = mqtt_router::protocol::v5::V5.read_mut(&mut buf, 1 << 16) {
                    return packet;
                }
                assert!(stream.read_buf(&mut buf).await.expect("read") > 0, "closed");
            }
        })
        .await
        .expect("CONNACK in time");
        let Packet::ConnAck(ack, properties) = packet else {
            panic!("expected CONNACK, got {packet:?}");
        };
        assert_eq!(ack.code, mqtt_router::protocol::ConnectReturnCode::Success);
        assert_eq!(
            properties.and_then(|p| p.server_keep_alive),
            applied,
            "keep-alive {asked}"
        );
    }
    broker.shutdown().await;
}

/// MQTT 5 §3.3.2.3.3 on the gate path: a reply that waited in the gate
/// longer than its Message Expiry Interval is not delivered, and one that
/// did not expire is forwarded with its remaining time. The device stops
/// reading (a small receive buffer, then replies until its socket is full),
/// so the replies wait in its inbox; it reads again 2.5 s later.
#[tokio::test]
async fn the_gate_path_does_not_deliver_a_reply_that_expired_while_waiting() {
    use mqtt_router::protocol::{Packet, Protocol};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut options = e2e::TestOptions::default();
    // The stalled write must not end the session first.
    options.limits.write_timeout = Duration::from_secs(60);
    let broker = TestBroker::start_with(options).await;
    let handler = broker.handler("flooder").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(broker.tcp_addr).await.expect("connect");
    stream
        .write_all(&e2e::raw::connect(5, "sleepy", 30, &broker.token("mx")))
        .await
        .expect("connect");
    // QoS 0, a clean device session: the gate serves it.
    stream
        .write_all(&e2e::raw::subscribe(
            5,
            1,
            &["mx_r"],
            mqtt_router::protocol::QoS::AtMostOnce,
        ))
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Paced replies until the socket is full: then the session's write
    // waits and its inbox drops nearly every new reply (counted; while it
    // writes, paced replies get through). What comes next waits in the inbox.
    let filler = vec![b'x'; 16 * 1024];
    let (mut stalled, mut dropped_before) = (false, 0.0);
    for sent in 1..=3000u32 {
        handler
            .client
            .publish("mx_r", QoS::AtMostOnce, false, filler.clone())
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(1)).await;
        if sent % 20 == 0 {
            let dropped = broker.metric("broker_replies_dropped_total").await;
            if sent > 100 && dropped - dropped_before >= 19.0 {
                stalled = true;
                break;
            }
            dropped_before = dropped;
        }
    }
    assert!(stalled, "the device's socket never filled");
    let expiring = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    handler
        .client
        .publish_with_properties("mx_r", QoS::AtMostOnce, false, "expiring", expiring)
        .await
        .expect("publish");
    let lasting = PublishProperties {
        message_expiry_interval: Some(600),
        ..Default::default()
    };
    handler
        .client
        .publish_with_properties("mx_r", QoS::AtMostOnce, false, "lasting", lasting)
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    handler
        .client
        .publish("mx_r", QoS::AtMostOnce, false, "marker")
        .await
        .expect("publish");
    // Read everything up to the marker.
    let mut small = Vec::new();
    let mut buf = bytes::BytesMut::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match mqtt_router::protocol::v5::V5.read_mut(&mut buf, 1 << 20) {
                Ok(Packet::Publish(publish, properties)) => {
                    if publish.payload.len() < 100 {
                        let left = properties.and_then(|p| p.message_expiry_interval);
                        small.push((publish.payload.clone(), left));
                        if &publish.payload[..] == b"marker" {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let read = stream.read_buf(&mut buf).await.expect("read");
                    assert!(read > 0, "the session ended: {small:?}");
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the marker did not arrive: {small:?}"));
    assert_eq!(small.len(), 2, "{small:?}");
    assert_eq!(&small[0].0[..], b"lasting");
    let left = small[0].1.expect("expiry forwarded");
    assert!((596..=598).contains(&left), "remaining time: {left}");
    assert_eq!(&small[1].0[..], b"marker");
    broker.shutdown().await;
}
