//! MQTT 5 delivery semantics that the embedded router owns (issue 10,
//! vendor patches 25-29), against the real broker over TLS with rumqttc v5:
//! subscription options (No Local, Retain As Published, Retain Handling),
//! subscription identifiers, overlapping subscriptions, message expiry, the
//! client's Receive Maximum, and properties forwarded unaltered. Each area is
//! checked for a handler (full rights) and, where its rules let it express
//! the case, for a device (literal `<uid>_...` subscriptions, commands only).

use bytes::Bytes;
use e2e::clients::{Seen, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY};
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Filter, Packet, Publish, PublishProperties, RetainForwardRule,
    SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

fn with_options(
    path: &str,
    qos: QoS,
    nolocal: bool,
    preserve_retain: bool,
    rule: RetainForwardRule,
) -> Filter {
    Filter {
        path: path.into(),
        qos,
        nolocal,
        preserve_retain,
        retain_forward_rule: rule,
    }
}

/// Subscribes to `filters` (with subscription identifier `id`) and returns
/// the SUBACK's codes.
async fn subscribe(
    client: &mut V5Client,
    filters: Vec<Filter>,
    id: Option<usize>,
) -> Vec<SubscribeReasonCode> {
    let queued = match id {
        Some(id) => {
            let properties = SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            };
            client
                .client
                .subscribe_many_with_properties(filters, properties)
                .await
        }
        None => client.client.subscribe_many(filters).await,
    };
    queued.expect("queue subscribe");
    client.suback().await.return_codes
}

/// Every PUBLISH that arrives until nothing has for `QUIET`.
async fn drain(client: &mut V5Client) -> Vec<Publish> {
    let mut got = Vec::new();
    while let Some(event) = client.next_within(QUIET).await {
        match event {
            Seen::Packet(Packet::Publish(publish)) => got.push(publish),
            Seen::Packet(_) => {}
            Seen::Error(e) => panic!("connection error: {e}"),
        }
    }
    got
}

fn payloads(publishes: &[Publish]) -> Vec<String> {
    publishes
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn ids(publish: &Publish) -> Vec<usize> {
    publish
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default()
}

fn expiry(publish: &Publish) -> Option<u32> {
    publish
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
}

/// A handler with a persistent session (Session Expiry 600 s).
fn persistent_handler(broker: &TestBroker, client_id: &str) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        "handler",
        TEST_HANDLER_KEY,
        |o| {
            o.set_clean_start(false);
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(600);
            o.set_connect_properties(props);
        },
    )
}

/// A device `uid` with a persistent session (Session Expiry 600 s).
fn persistent_device(broker: &TestBroker, uid: &str, client_id: &str) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        "JWT",
        &broker.token(uid),
        |o| {
            o.set_clean_start(false);
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(600);
            o.set_connect_properties(props);
        },
    )
}

async fn publish(
    client: &V5Client,
    topic: &str,
    qos: QoS,
    retain: bool,
    payload: &str,
    properties: Option<PublishProperties>,
) {
    let payload = Bytes::copy_from_slice(payload.as_bytes());
    match properties {
        Some(props) => client
            .client
            .publish_with_properties(topic, qos, retain, payload, props)
            .await
            .expect("publish"),
        None => client
            .client
            .publish(topic, qos, retain, payload)
            .await
            .expect("publish"),
    }
}

/// MQTT 5 3.8.3.1 (MQTT-3.8.3-3): a No Local subscription never gets its
/// own client's publishes, live or retained; others' arrive. For a device,
/// which can only publish commands and subscribe to its own topics, No Local
/// is accepted and hides nothing published by others.
#[tokio::test]
async fn no_local_subscription_never_gets_its_own_publishes() {
    let broker = TestBroker::start().await;
    let mut me = broker.handler("nl-me").await;
    let mut other = broker.handler("nl-other").await;
    let nolocal = |qos| with_options("nl/t", qos, true, false, RetainForwardRule::Never);
    assert_eq!(
        subscribe(&mut me, vec![nolocal(QoS::AtLeastOnce)], None).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    subscribe(&mut other, vec![filter("nl/t", QoS::AtLeastOnce)], None).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        publish(&me, "nl/t", qos, false, "mine", None).await;
        publish(&other, "nl/t", qos, false, "theirs", None).await;
    }
    assert_eq!(payloads(&drain(&mut me).await), vec!["theirs", "theirs"]);
    assert_eq!(
        payloads(&drain(&mut other).await),
        vec!["mine", "theirs", "mine", "theirs"]
    );

    // Its own retained message is not sent when it subscribes again.
    publish(&me, "nl/r", QoS::AtLeastOnce, true, "mine", None).await;
    subscribe(
        &mut me,
        vec![with_options(
            "nl/r",
            QoS::AtLeastOnce,
            true,
            false,
            RetainForwardRule::OnEverySubscribe,
        )],
        None,
    )
    .await;
    assert!(drain(&mut me).await.is_empty());

    // A device: No Local on its own topic, a handler's messages arrive.
    let mut device = broker.device("nld", "phone").await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let topic = format!("nld_{}", qos as u8);
        subscribe(
            &mut device,
            vec![with_options(
                &topic,
                qos,
                true,
                false,
                RetainForwardRule::Never,
            )],
            None,
        )
        .await;
        publish(&other, &topic, qos, false, "to device", None).await;
        assert_eq!(payloads(&drain(&mut device).await), vec!["to device"]);
    }
}

/// MQTT 5 3.3.1.3 and 3.8.3.1: a forwarded message keeps its retain flag
/// only for a Retain As Published subscription; a retained message sent
/// because of a subscription has it set. A zero-byte publish without the
/// retain flag does not remove the retained message.
#[tokio::test]
async fn retain_as_published_keeps_the_flag_and_others_clear_it() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("rap-publisher").await;
    let mut keeps = broker.handler("rap-keeps").await;
    let mut clears = broker.handler("rap-clears").await;
    let mut device_keeps = broker.device("rapd", "phone").await;
    let mut device_clears = broker.device("rapd", "tablet").await;
    let rap =
        |path: &str, on| with_options(path, QoS::AtLeastOnce, false, on, RetainForwardRule::Never);
    subscribe(&mut keeps, vec![rap("rap/t", true)], None).await;
    subscribe(&mut clears, vec![rap("rap/t", false)], None).await;
    subscribe(&mut device_keeps, vec![rap("rapd_t", true)], None).await;
    subscribe(&mut device_clears, vec![rap("rapd_t", false)], None).await;
    for topic in ["rap/t", "rapd_t"] {
        publish(&publisher, topic, QoS::AtLeastOnce, true, "retained", None).await;
        publish(&publisher, topic, QoS::AtLeastOnce, false, "", None).await;
    }
    for (who, client, flags) in [
        ("handler, RAP", &mut keeps, vec![true, false]),
        ("handler", &mut clears, vec![false, false]),
        ("device, RAP", &mut device_keeps, vec![true, false]),
        ("device", &mut device_clears, vec![false, false]),
    ] {
        let got = drain(client).await;
        assert_eq!(
            got.iter().map(|p| p.retain).collect::<Vec<_>>(),
            flags,
            "{who}"
        );
    }

    // Sent because of a new subscription: flag set, and still there after
    // the zero-byte publish without the retain flag.
    let mut late = broker.handler("rap-late").await;
    subscribe(&mut late, vec![filter("rap/t", QoS::AtLeastOnce)], None).await;
    let got = drain(&mut late).await;
    assert_eq!(payloads(&got), vec!["retained"]);
    assert!(got[0].retain);
    let mut late_device = broker.device("rapd", "watch").await;
    subscribe(
        &mut late_device,
        vec![filter("rapd_t", QoS::AtLeastOnce)],
        None,
    )
    .await;
    let got = drain(&mut late_device).await;
    assert_eq!(payloads(&got), vec!["retained"]);
    assert!(got[0].retain);
}

/// MQTT 5 3.8.3.1: Retain Handling 0 sends retained messages at every
/// subscribe, 1 only when the subscription is new, 2 never; live messages
/// keep flowing once each across resubscriptions (3.8.4).
#[tokio::test]
async fn retain_handling_0_1_2() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("rh-publisher").await;
    publish(&publisher, "rh/t", QoS::AtLeastOnce, true, "r", None).await;
    publish(&publisher, "rhd_t", QoS::AtLeastOnce, true, "r", None).await;
    let handler = broker.handler("rh-handler").await;
    let device = broker.device("rhd", "phone").await;
    for (mut client, topic) in [(handler, "rh/t"), (device, "rhd_t")] {
        let sub = |rule| with_options(topic, QoS::AtLeastOnce, false, false, rule);
        subscribe(&mut client, vec![sub(RetainForwardRule::Never)], None).await;
        assert!(drain(&mut client).await.is_empty(), "2: never ({topic})");
        subscribe(
            &mut client,
            vec![sub(RetainForwardRule::OnNewSubscribe)],
            None,
        )
        .await;
        assert!(
            drain(&mut client).await.is_empty(),
            "1: not on an existing subscription ({topic})"
        );
        for _ in 0..2 {
            subscribe(
                &mut client,
                vec![sub(RetainForwardRule::OnEverySubscribe)],
                None,
            )
            .await;
            assert_eq!(
                payloads(&drain(&mut client).await),
                vec!["r"],
                "0: at every subscribe ({topic})"
            );
        }
        client.client.unsubscribe(topic).await.expect("unsubscribe");
        subscribe(
            &mut client,
            vec![sub(RetainForwardRule::OnNewSubscribe)],
            None,
        )
        .await;
        assert_eq!(
            payloads(&drain(&mut client).await),
            vec!["r"],
            "1: on a new subscription ({topic})"
        );
        publish(&publisher, topic, QoS::AtLeastOnce, false, "live", None).await;
        assert_eq!(payloads(&drain(&mut client).await), vec!["live"], "{topic}");
    }
}

/// MQTT 5 3.2.2.3.12, 3.3.2.3.8 and 3.3.4: CONNACK says subscription
/// identifiers are available; each forwarded message carries the identifier
/// of its subscription. Overlapping subscriptions of one client get one copy
/// per subscription (MQTT-3.3.4-5: each with its own identifier), each at
/// that subscription's QoS, so one at the highest granted (MQTT-3.3.4-2).
#[tokio::test]
async fn subscription_identifiers_and_overlapping_subscriptions() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("si-publisher").await;
    let mut handler = V5Client::connect(
        broker.tls_target(),
        "si-handler",
        "handler",
        TEST_HANDLER_KEY,
        |_| {},
    );
    let ack = handler.connected().await;
    let available = ack
        .properties
        .as_ref()
        .and_then(|p| p.subscription_identifiers_available);
    assert_ne!(available, Some(0), "handler CONNACK");
    subscribe(&mut handler, vec![filter("si/+", QoS::AtMostOnce)], Some(5)).await;
    subscribe(
        &mut handler,
        vec![filter("si/a", QoS::ExactlyOnce)],
        Some(6),
    )
    .await;
    subscribe(&mut handler, vec![filter("si/#", QoS::AtLeastOnce)], None).await;
    publish(&publisher, "si/a", QoS::ExactlyOnce, false, "m", None).await;
    let mut got: Vec<(Vec<usize>, QoS)> = drain(&mut handler)
        .await
        .iter()
        .map(|p| (ids(p), p.qos))
        .collect();
    got.sort_by_key(|(ids, _)| ids.clone());
    assert_eq!(
        got,
        vec![
            (vec![], QoS::AtLeastOnce),
            (vec![5], QoS::AtMostOnce),
            (vec![6], QoS::ExactlyOnce)
        ]
    );

    // A device: QoS 0 and 1 subscriptions with identifiers.
    let mut device = V5Client::connect(
        broker.tls_target(),
        "phone",
        "JWT",
        &broker.token("sid"),
        |_| {},
    );
    let ack = device.connected().await;
    let available = ack
        .properties
        .as_ref()
        .and_then(|p| p.subscription_identifiers_available);
    assert_ne!(available, Some(0), "device CONNACK");
    subscribe(
        &mut device,
        vec![filter("sid_0", QoS::AtMostOnce)],
        Some(11),
    )
    .await;
    subscribe(
        &mut device,
        vec![filter("sid_1", QoS::AtLeastOnce)],
        Some(12),
    )
    .await;
    publish(&publisher, "sid_0", QoS::AtLeastOnce, false, "zero", None).await;
    publish(&publisher, "sid_1", QoS::AtLeastOnce, false, "one", None).await;
    let got = drain(&mut device).await;
    assert_eq!(payloads(&got), vec!["zero", "one"]);
    assert_eq!(
        got.iter().map(ids).collect::<Vec<_>>(),
        vec![vec![11], vec![12]]
    );
}

/// MQTT 5 3.3.2.3.3: a message queued for an offline session, or retained,
/// is not delivered once its Message Expiry Interval has passed; one still
/// alive is delivered with what is left of its interval.
#[tokio::test]
async fn expired_messages_are_not_delivered_and_others_carry_the_remaining_interval() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("me-publisher").await;
    let mut away = persistent_handler(&broker, "me-away");
    away.connected().await;
    subscribe(&mut away, vec![filter("me/q", QoS::AtLeastOnce)], None).await;
    let mut away_device = persistent_device(&broker, "med", "phone");
    away_device.connected().await;
    subscribe(
        &mut away_device,
        vec![filter("med_q", QoS::AtLeastOnce)],
        None,
    )
    .await;
    away.client.disconnect().await.expect("disconnect");
    away_device.client.disconnect().await.expect("disconnect");
    drop((away, away_device));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    for topic in ["me/q", "med_q"] {
        publish(
            &publisher,
            topic,
            QoS::AtLeastOnce,
            false,
            "short",
            Some(expiring(1)),
        )
        .await;
        publish(
            &publisher,
            topic,
            QoS::AtLeastOnce,
            false,
            "long",
            Some(expiring(100)),
        )
        .await;
    }
    for topic in ["me/r", "med_r"] {
        publish(
            &publisher,
            topic,
            QoS::AtLeastOnce,
            true,
            "short",
            Some(expiring(1)),
        )
        .await;
    }
    for topic in ["me/r2", "med_r2"] {
        publish(
            &publisher,
            topic,
            QoS::AtLeastOnce,
            true,
            "long",
            Some(expiring(100)),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut away = persistent_handler(&broker, "me-away");
    away.connected().await;
    let mut away_device = persistent_device(&broker, "med", "phone");
    away_device.connected().await;
    for (who, client) in [("handler", &mut away), ("device", &mut away_device)] {
        let got = drain(client).await;
        assert_eq!(payloads(&got), vec!["long"], "queued, {who}");
        let left = expiry(&got[0]).expect("interval forwarded");
        assert!((90..100).contains(&left), "{who}: {left} s left");
    }

    // Other subscriptions come and go meanwhile (each new subscription
    // reads the retained store: that must not age what is stored).
    let mut busy = broker.handler("me-busy").await;
    for i in 0..12 {
        subscribe(
            &mut busy,
            vec![filter(&format!("elsewhere/{i}"), QoS::AtMostOnce)],
            None,
        )
        .await;
    }
    let mut late = broker.handler("me-late").await;
    subscribe(&mut late, vec![filter("me/+", QoS::AtLeastOnce)], None).await;
    let mut late_device = broker.device("med", "tablet").await;
    subscribe(
        &mut late_device,
        vec![
            filter("med_r", QoS::AtLeastOnce),
            filter("med_r2", QoS::AtLeastOnce),
        ],
        None,
    )
    .await;
    for (who, client) in [("handler", &mut late), ("device", &mut late_device)] {
        let got = drain(client).await;
        assert_eq!(payloads(&got), vec!["long"], "retained, {who}");
        let left = expiry(&got[0]).expect("interval forwarded");
        assert!((90..100).contains(&left), "{who}: {left} s left");
    }

    // Live: the interval is forwarded as sent.
    publish(
        &publisher,
        "me/live",
        QoS::AtLeastOnce,
        false,
        "now",
        Some(expiring(30)),
    )
    .await;
    let got = drain(&mut late).await;
    assert_eq!(got.iter().map(expiry).collect::<Vec<_>>(), vec![Some(30)]);
}

/// A client connected with Receive Maximum `max` and manual acknowledgements.
fn with_receive_maximum(
    broker: &TestBroker,
    client_id: &str,
    credentials: (&str, &str),
    max: u16,
) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        credentials.0,
        credentials.1,
        |o| {
            o.set_manual_acks(true);
            let mut props = ConnectProperties::new();
            props.receive_maximum = Some(max);
            o.set_connect_properties(props);
        },
    )
}

/// Reads `count` publishes, never more than `max` unacknowledged at once
/// (acknowledging only when nothing more comes), and returns their payloads
/// in order.
async fn read_within_window(client: &mut V5Client, count: usize, max: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < count {
        let batch = drain(client).await;
        assert!(!batch.is_empty(), "stalled after {got:?}");
        assert!(
            batch.len() <= max,
            "{} in flight, allowed {max}",
            batch.len()
        );
        for publish in &batch {
            client.client.ack(publish).await.expect("ack");
        }
        got.extend(payloads(&batch));
    }
    got
}

/// MQTT 5 3.3.4 (MQTT-3.3.4-9): the server sends no more unacknowledged
/// QoS 1/2 publishes than the client's Receive Maximum; the others wait, in
/// order, none lost (handler and device).
#[tokio::test]
async fn the_clients_receive_maximum_bounds_unacknowledged_deliveries() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("rm-publisher").await;
    let mut handler = with_receive_maximum(&broker, "rm-handler", ("handler", TEST_HANDLER_KEY), 2);
    handler.connected().await;
    subscribe(&mut handler, vec![filter("rm/t", QoS::AtLeastOnce)], None).await;
    let token = broker.token("rmd");
    let mut device = with_receive_maximum(&broker, "phone", ("JWT", &token), 1);
    device.connected().await;
    subscribe(&mut device, vec![filter("rmd_t", QoS::ExactlyOnce)], None).await;
    let expected: Vec<String> = (0..6).map(|i| i.to_string()).collect();
    for payload in &expected {
        publish(&publisher, "rm/t", QoS::AtLeastOnce, false, payload, None).await;
        publish(&publisher, "rmd_t", QoS::ExactlyOnce, false, payload, None).await;
    }
    assert_eq!(read_within_window(&mut handler, 6, 2).await, expected);
    assert_eq!(read_within_window(&mut device, 6, 1).await, expected);
}

/// The properties a test publishes and expects forwarded unaltered.
fn application_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("pf/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "1".into()),
        ],
        ..Default::default()
    }
}

/// The forwarded properties without those the server adds or may change.
fn application_part(publish: &Publish) -> Option<PublishProperties> {
    publish.properties.clone().map(|mut p| {
        p.subscription_identifiers.clear();
        p.topic_alias = None;
        p.message_expiry_interval = None;
        p
    })
}

/// MQTT 5 3.3.2.3: Payload Format Indicator, Content Type, Response Topic,
/// Correlation Data and User Properties (in order) are forwarded unaltered,
/// at QoS 0 and 1, live, queued for an offline session and retained; to a
/// device, and from a device's command to a handler (the gate's identity
/// stamps come after the device's own properties).
#[tokio::test]
async fn properties_are_forwarded_unaltered_and_in_order() {
    let broker = TestBroker::start().await;
    let publisher = broker.handler("pf-publisher").await;
    let mut live = broker.handler("pf-live").await;
    subscribe(&mut live, vec![filter("pf/+", QoS::AtLeastOnce)], None).await;
    let mut device = broker.device("pfd", "phone").await;
    subscribe(&mut device, vec![filter("pfd_0", QoS::AtMostOnce)], None).await;
    subscribe(&mut device, vec![filter("pfd_1", QoS::AtLeastOnce)], None).await;
    let mut away = persistent_handler(&broker, "pf-away");
    away.connected().await;
    subscribe(&mut away, vec![filter("pf/+", QoS::AtLeastOnce)], None).await;
    away.client.disconnect().await.expect("disconnect");
    drop(away);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let expected = application_properties();
    publish(
        &publisher,
        "pf/0",
        QoS::AtMostOnce,
        false,
        "0",
        Some(expected.clone()),
    )
    .await;
    publish(
        &publisher,
        "pf/1",
        QoS::AtLeastOnce,
        true,
        "1",
        Some(expected.clone()),
    )
    .await;
    publish(
        &publisher,
        "pfd_0",
        QoS::AtMostOnce,
        false,
        "0",
        Some(expected.clone()),
    )
    .await;
    publish(
        &publisher,
        "pfd_1",
        QoS::AtLeastOnce,
        false,
        "1",
        Some(expected.clone()),
    )
    .await;
    let mut away = persistent_handler(&broker, "pf-away");
    away.connected().await;
    let mut late = broker.handler("pf-late").await;
    subscribe(&mut late, vec![filter("pf/1", QoS::AtLeastOnce)], None).await;
    // The offline session may or may not get the QoS 0 message (a server
    // may queue it, MQTT 5 3.1.2.5); it must get the QoS 1 one.
    for (who, client, must) in [
        ("live", &mut live, vec!["0", "1"]),
        ("device", &mut device, vec!["0", "1"]),
        ("queued", &mut away, vec!["1"]),
        ("retained", &mut late, vec!["1"]),
    ] {
        let got = drain(client).await;
        let seen = payloads(&got);
        assert!(
            must.iter().all(|m| seen.iter().any(|s| s == m)),
            "{who}: {seen:?}"
        );
        for publish in &got {
            assert_eq!(application_part(publish), Some(expected.clone()), "{who}");
        }
    }

    // A device's command reaches a handler with its properties first, in
    // order, then the gate's stamps.
    subscribe(&mut live, vec![filter("sync", QoS::AtLeastOnce)], None).await;
    publish(
        &device,
        "sync",
        QoS::AtLeastOnce,
        false,
        "{}",
        Some(expected.clone()),
    )
    .await;
    let got = drain(&mut live).await;
    assert_eq!(got.len(), 1);
    let mut forwarded = application_part(&got[0]).expect("properties");
    let stamps = forwarded
        .user_properties
        .split_off(expected.user_properties.len());
    assert_eq!(forwarded, expected);
    assert_eq!(
        stamps.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        vec![
            protocol::topics::USER_ID_PROPERTY,
            protocol::topics::CLIENT_ID_PROPERTY,
            protocol::topics::TOKEN_IAT_PROPERTY
        ]
    );
}
