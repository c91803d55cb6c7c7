//! MQTT 3.1.1 and 5 as the specifications say (issue 10), against the real
//! broker over TLS: delivered QoS, sessions, keep-alive and wills.

use e2e::clients::V4Client;
use e2e::TestBroker;
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

/// MQTT 5 and 3.1.1 §3.8.4: a message is delivered at the lower of its
/// publish QoS and the subscription's granted QoS, on both roles' paths.
#[tokio::test]
async fn delivered_qos_is_the_minimum_of_publish_and_subscription() {
    let broker = TestBroker::start().await;
    // A handler (router path) subscribed at QoS 2 to a command topic.
    let mut handler = broker.handler("qos-handler").await;
    assert_eq!(
        handler
            .subscribe("get_contact_list", QoS::ExactlyOnce)
            .await,
        SubscribeReasonCode::Success(QoS::ExactlyOnce)
    );
    // A persistent-free MQTT 3.1.1 device subscribed at QoS 1 to its reply
    // topic (the router serves QoS 1 subscriptions).
    let mut device = V4Client::connect(
        broker.tls_target(),
        "phone",
        "JWT",
        &broker.token("q1"),
        |_| {},
    );
    device.connected().await;
    device
        .client
        .subscribe("q1_r", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    device.suback().await;
    let sender = broker.device("q0", "phone").await;

    for (publish_qos, to_handler, to_device) in [
        (QoS::AtMostOnce, QoS::AtMostOnce, rumqttc::QoS::AtMostOnce),
        (
            QoS::AtLeastOnce,
            QoS::AtLeastOnce,
            rumqttc::QoS::AtLeastOnce,
        ),
        (
            QoS::ExactlyOnce,
            QoS::ExactlyOnce,
            rumqttc::QoS::AtLeastOnce,
        ),
    ] {
        sender
            .client
            .publish("get_contact_list", publish_qos, false, "{}")
            .await
            .expect("publish");
        let command = handler.publish_received().await;
        assert_eq!(
            command.qos, to_handler,
            "command published at {publish_qos:?}"
        );
        handler
            .client
            .publish("q1_r", publish_qos, false, "[]")
            .await
            .expect("reply");
        let reply = device.publish_received().await;
        assert_eq!(reply.qos, to_device, "reply published at {publish_qos:?}");
    }
    handler.assert_no_publish(Duration::from_millis(300)).await;
}

/// MQTT 5 3.2.2.1.2: CONNACK's Session Present is 1 when a persistent
/// session is resumed, 0 when there was none; QoS 1 messages published
/// while it was away are delivered on resumption (a device's session).
#[tokio::test]
async fn a_resumed_session_is_present_and_gets_what_was_published_while_away() {
    let broker = TestBroker::start().await;
    let token = broker.token("sp");
    let connect = |broker: &TestBroker| {
        e2e::clients::V5Client::connect(broker.tls_target(), "keeper", "JWT", &token, |o| {
            o.set_clean_start(false);
            let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
            props.session_expiry_interval = Some(600);
            o.set_connect_properties(props);
        })
    };
    let mut first = connect(&broker);
    assert!(
        !first.connected().await.session_present,
        "no session before"
    );
    first.subscribe("sp_r", QoS::AtLeastOnce).await;
    first.client.disconnect().await.expect("disconnect");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = connect(&broker);
    assert!(
        second.connected().await.session_present,
        "the session was resumed"
    );
}

/// MQTT 5 §3.1.2.4 and §3.1.2.11.2: Clean Start only says whether to begin
/// afresh; the Session Expiry Interval alone says whether the session
/// outlives the connection. A session begun with Clean Start 1 and an expiry
/// keeps its subscriptions and queues QoS 1 messages after a normal
/// DISCONNECT; one resumed with an expiry of 0 ends with its connection.
#[tokio::test]
async fn clean_start_and_session_expiry_are_independent() {
    let broker = TestBroker::start().await;
    let token = broker.token("cs");
    let connect = |clean_start: bool, expiry: u32| {
        e2e::clients::V5Client::connect(broker.tls_target(), "cs-phone", "JWT", &token, |o| {
            o.set_clean_start(clean_start);
            let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
            props.session_expiry_interval = Some(expiry);
            o.set_connect_properties(props);
        })
    };
    let mut handler = broker.handler("cs-handler").await;

    // Clean Start 1 with an expiry: a new persistent session.
    let mut first = connect(true, 600);
    assert!(!first.connected().await.session_present);
    first.subscribe("cs_r", QoS::AtLeastOnce).await;
    first.client.disconnect().await.expect("disconnect");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    handler
        .client
        .publish("cs_r", QoS::AtLeastOnce, false, "while-away")
        .await
        .expect("publish");
    handler.puback().await;

    // Clean Start 0 with expiry 0: resumed (present, queued message
    // delivered), but it ends with this connection.
    let mut second = connect(false, 0);
    assert!(
        second.connected().await.session_present,
        "a session begun with Clean Start 1 and an expiry was kept"
    );
    let queued = second.publish_received().await;
    assert_eq!(&queued.payload[..], b"while-away");
    second.client.disconnect().await.expect("disconnect");
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut third = connect(false, 600);
    assert!(
        !third.connected().await.session_present,
        "a session with expiry 0 ended with its connection"
    );
    third.assert_no_publish(Duration::from_millis(300)).await;

    // Clean Start 1 discards a stored session even when it keeps the new one.
    third.subscribe("cs_r", QoS::AtLeastOnce).await;
    third.client.disconnect().await.expect("disconnect");
    drop(third);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fourth = connect(true, 600);
    assert!(
        !fourth.connected().await.session_present,
        "Clean Start 1 begins afresh"
    );
    handler
        .client
        .publish("cs_r", QoS::AtLeastOnce, false, "after-clean-start")
        .await
        .expect("publish");
    handler.puback().await;
    fourth.assert_no_publish(Duration::from_millis(500)).await;
}

/// MQTT 3.1.1 and 5 §3.1.2.10: a client silent for 1.5 × its keep-alive is
/// disconnected, and its will is published (both protocol versions).
#[tokio::test]
async fn a_silent_client_is_cut_after_one_and_a_half_keep_alives_and_its_will_fires() {
    use mqtt_router::protocol::{Connect, LastWill, Login, Packet};
    use tokio::io::AsyncWriteExt;
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("will-watcher").await;
    handler
        .subscribe("get_contact_list", QoS::AtLeastOnce)
        .await;
    for version in [4u8, 5] {
        let will = format!("silent v{version}");
        let connect = Packet::Connect(
            Connect {
                keep_alive: 1,
                client_id: format!("silent-{version}"),
                clean_session: true,
            },
            None,
            Some(LastWill {
                topic: bytes::Bytes::from_static(b"get_contact_list"),
                message: bytes::Bytes::from(will.clone()),
                qos: mqtt_router::protocol::QoS::AtMostOnce,
                retain: false,
            }),
            None,
            Some(Login {
                username: "JWT".into(),
                password: broker.token("quiet"),
            }),
        );
        let mut stream = tokio::net::TcpStream::connect(broker.tcp_addr)
            .await
            .expect("connect");
        stream
            .write_all(&e2e::raw::encode(version, connect))
            .await
            .expect("write");
        // Then nothing: no PINGREQ.
        let received = handler.publish_received().await;
        assert_eq!(&received.payload[..], will.as_bytes(), "v{version}");
        drop(stream);
    }
}
