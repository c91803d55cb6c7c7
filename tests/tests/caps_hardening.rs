//! Caps and authorization details of the gate, against the real broker over
//! TLS with real clients (rumqttc MQTT 5 and 3.1.1, raw packets where no
//! library would send them): look-alike identity properties, reply topics
//! that must never become command topics, client id length, topic length
//! and depth, subscriptions per session (and that a huge SUBSCRIBE does not
//! stall other clients), persistent sessions per user, and the reply index
//! freeing its entries. `mosquitto_pub`/`mosquitto_sub` (mosquitto-clients)
//! check the answers from a second client library.

mod handlers_common;

use e2e::clients::{V4Client, V5Client};
use e2e::{TestBroker, TestOptions};
use handlers_common::Device;
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet as P5, PubAckReason, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A device (MQTT 5, TLS) with options of its own; not yet waited for.
fn device_with(
    broker: &TestBroker,
    uid: &str,
    client_id: &str,
    configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> V5Client {
    V5Client::connect(
        broker.tls_target(),
        client_id,
        "JWT",
        &broker.token(uid),
        configure,
    )
}

/// Publishes at QoS 1 and returns the PUBACK's reason.
async fn publish_qos1(client: &mut V5Client, topic: &str) -> PubAckReason {
    client
        .client
        .publish(topic, QoS::AtLeastOnce, false, "{}")
        .await
        .expect("queue publish");
    client.puback().await.reason
}

/// Subscribes to several filters in one SUBSCRIBE and returns the codes.
async fn subscribe_many(
    client: &mut V5Client,
    filters: impl IntoIterator<Item = String>,
    qos: QoS,
) -> Vec<SubscribeReasonCode> {
    let filters: Vec<Filter> = filters.into_iter().map(|f| Filter::new(f, qos)).collect();
    client
        .client
        .subscribe_many(filters)
        .await
        .expect("queue subscribe");
    client.suback().await.return_codes
}

/// Reads until the server closes; returns everything it sent.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server did not close the connection within {within:?}"),
        }
    }
}

/// The value of one Prometheus series, 0 when absent.
fn series(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn look_alike_identity_properties_never_reach_handlers() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("audit").await;
    assert_eq!(
        handler.subscribe("sync", QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut bob = broker.device("bob", "bob-phone").await;
    let forged = PublishProperties {
        user_properties: [
            ("USER_ID", "alice"),
            (" User_Id ", "alice"),
            ("user_id", "alice"),
            ("Client_ID", "alice-phone"),
            ("client_id  ", "alice-phone"),
            ("trace", "t1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    };
    bob.client
        .publish_with_properties("sync", QoS::AtLeastOnce, false, "{}", forged)
        .await
        .unwrap();
    assert_eq!(bob.puback().await.reason, PubAckReason::Success);

    let command = handler.publish_received().await;
    let properties = command.properties.expect("stamped properties");
    let identity: Vec<(String, String)> = properties
        .user_properties
        .iter()
        .filter(|(name, _)| {
            let name = name.trim().to_ascii_lowercase();
            name == "user_id" || name == "client_id"
        })
        .cloned()
        .collect();
    assert_eq!(
        identity,
        vec![
            ("user_id".to_owned(), "bob".to_owned()),
            ("client_id".to_owned(), "bob-phone".to_owned()),
        ],
        "exactly one user_id and one client_id, the broker's"
    );
    assert!(properties
        .user_properties
        .contains(&("trace".to_owned(), "t1".to_owned())));
    broker.shutdown().await;
}

#[tokio::test]
async fn a_reply_topic_never_becomes_a_command_topic() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("reader").await;
    for filter in ["alice_x", "$share/g/alice_y", "alice_z/#", "jobs"] {
        assert_eq!(
            handler.subscribe(filter, QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{filter}"
        );
    }
    let mut alice = broker.device("alice", "alice-phone").await;
    assert_eq!(
        alice.subscribe("alice_x", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    let mut bob = broker.device("bob", "bob-phone").await;
    for topic in ["alice_x", "alice_y", "alice_z/a"] {
        assert_eq!(
            publish_qos1(&mut bob, topic).await,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
    }
    // A plain topic a handler subscribes to is still a command.
    assert_eq!(publish_qos1(&mut bob, "jobs").await, PubAckReason::Success);
    assert_eq!(handler.publish_received().await.topic, "jobs");
    alice.assert_no_publish(Duration::from_millis(300)).await;
    let metrics = broker.metrics_text().await;
    assert!(
        series(
            &metrics,
            "broker_denials_total{kind=\"publish\",reason=\"not_authorized\"}"
        ) >= 3,
        "{metrics}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn long_client_ids_are_refused() {
    let broker = TestBroker::start().await;
    let longest = "c".repeat(128);
    device_with(&broker, "cid", &longest, |_| {})
        .connected()
        .await;

    let too_long = "c".repeat(129);
    let v5 = device_with(&broker, "cid", &too_long, |_| {})
        .connack()
        .await
        .expect_err("refused");
    assert!(v5.contains("ClientIdentifierNotValid"), "{v5}");
    let v4 = V4Client::connect(
        broker.tls_target(),
        &too_long,
        "JWT",
        &broker.token("cid"),
        |_| {},
    )
    .connack()
    .await
    .expect_err("refused");
    assert!(v4.contains("BadClientId"), "{v4}");

    // 65,000 bytes, as no library sends: CONNACK 0x85 (3.1.1: 2), then closed.
    let huge = "h".repeat(65_000);
    for (version, code) in [(5u8, 0x85u8), (4, 2)] {
        let mut stream = TcpStream::connect(broker.tcp_addr).await.unwrap();
        stream
            .write_all(&e2e::raw::connect(version, &huge, 30, &broker.token("cid")))
            .await
            .unwrap();
        let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(answer.first(), Some(&0x20), "a CONNACK: {answer:?}");
        assert_eq!(answer.get(3), Some(&code), "v{version}: {answer:?}");
    }
    let metrics = broker.metrics_text().await;
    assert_eq!(
        series(
            &metrics,
            "broker_connects_refused_total{reason=\"client id too long\"}"
        ),
        4,
        "{metrics}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn topics_over_the_caps_are_refused() {
    let broker = TestBroker::start().await;
    let mut bob = broker.device("bob", "bob-phone").await;
    let long = format!("sync{}", "x".repeat(300));
    let deep = (0..17)
        .map(|i| format!("l{i}"))
        .collect::<Vec<_>>()
        .join("/");
    assert_eq!(
        publish_qos1(&mut bob, &long).await,
        PubAckReason::TopicNameInvalid
    );
    assert_eq!(
        publish_qos1(&mut bob, &deep).await,
        PubAckReason::TopicNameInvalid
    );
    // QoS 0 over the cap: dropped (counted), the session goes on.
    bob.client
        .publish(long.as_str(), QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    assert_eq!(publish_qos1(&mut bob, "sync").await, PubAckReason::Success);

    let long_filter = format!("bob_{}", "x".repeat(300));
    let deep_filter = format!("bob_{deep}");
    let within = format!("bob_{}", "x".repeat(250));
    assert_eq!(
        subscribe_many(
            &mut bob,
            [long_filter, deep_filter, within],
            QoS::AtMostOnce
        )
        .await,
        vec![
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ]
    );

    // Handlers get more room, not unlimited room.
    let mut handler = broker.handler("h").await;
    let handler_long = format!("jobs/{}", "x".repeat(1000));
    let handler_too_long = format!("jobs/{}", "x".repeat(5000));
    let handler_too_deep = (0..65).map(|_| "l").collect::<Vec<_>>().join("/");
    assert_eq!(
        subscribe_many(
            &mut handler,
            [handler_long.clone(), handler_too_long, handler_too_deep],
            QoS::AtLeastOnce
        )
        .await,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::TopicFilterInvalid,
        ]
    );
    assert_eq!(
        publish_qos1(&mut handler, &handler_long).await,
        PubAckReason::Success
    );

    let metrics = broker.metrics_text().await;
    for (series_name, want) in [
        (
            "broker_denials_total{kind=\"publish\",reason=\"topic_too_long\"}",
            2,
        ),
        (
            "broker_denials_total{kind=\"publish\",reason=\"topic_too_many_levels\"}",
            1,
        ),
        (
            "broker_denials_total{kind=\"subscribe\",reason=\"topic_too_long\"}",
            2,
        ),
        (
            "broker_denials_total{kind=\"subscribe\",reason=\"topic_too_many_levels\"}",
            2,
        ),
    ] {
        assert_eq!(series(&metrics, series_name), want, "{series_name}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn subscriptions_per_session_are_capped() {
    let mut options = TestOptions::default();
    options.limits.device_max_subscriptions = 5;
    let broker = TestBroker::start_with(options).await;
    let mut bob = broker.device("bob", "bob-phone").await;
    let five = (0..5).map(|i| format!("bob_{i}"));
    assert!(subscribe_many(&mut bob, five, QoS::AtMostOnce)
        .await
        .iter()
        .all(|c| *c == SubscribeReasonCode::Success(QoS::AtMostOnce)));
    assert_eq!(
        subscribe_many(
            &mut bob,
            ["bob_5".into(), "bob_0".into(), "alice_x".into()],
            QoS::AtMostOnce
        )
        .await,
        vec![
            SubscribeReasonCode::QuotaExceeded,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::NotAuthorized,
        ],
        "over the cap, a resubscription, a denial"
    );
    // Unsubscribing frees a place.
    bob.client.unsubscribe("bob_0").await.unwrap();
    assert_eq!(
        bob.subscribe("bob_5", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );

    // A topic the router served stays counted for the connection, so a
    // subscribe/unsubscribe loop cannot grow the session's memory.
    let mut carol = broker.device("carol", "carol-phone").await;
    for i in 0..5 {
        let topic = format!("carol_q{i}");
        assert_eq!(
            carol.subscribe(&topic, QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
        carol.client.unsubscribe(topic).await.unwrap();
    }
    assert_eq!(
        carol.subscribe("carol_q5", QoS::AtLeastOnce).await,
        SubscribeReasonCode::QuotaExceeded
    );

    // MQTT 3.1.1 has no quota code: 0x80.
    let mut dave = broker.device_v4("dave", "dave-phone").await;
    let filters = (0..6)
        .map(|i| rumqttc::SubscribeFilter::new(format!("dave_{i}"), rumqttc::QoS::AtMostOnce));
    dave.client.subscribe_many(filters).await.unwrap();
    let codes = dave.suback().await.return_codes;
    assert_eq!(codes.len(), 6);
    assert!(codes[..5]
        .iter()
        .all(|c| *c == rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce)));
    assert_eq!(codes[5], rumqttc::SubscribeReasonCode::Failure);

    let metrics = broker.metrics_text().await;
    assert_eq!(
        series(
            &metrics,
            "broker_denials_total{kind=\"subscribe\",reason=\"quota_exceeded\"}"
        ),
        3,
        "{metrics}"
    );
    broker.shutdown().await;
}

/// A device sends 3 SUBSCRIBEs of 10,000 filters each while another does
/// round trips through the built-in contacts handler: every round trip is
/// answered within 2 s, and the big subscriber gets `cap` places and 0x97
/// for the rest.
async fn huge_subscribes_do_not_stall(cap: usize) {
    let mut options = TestOptions::default();
    options.limits.device_max_subscriptions = cap;
    let broker = TestBroker::start_with(options).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = handlers_common::settings(&broker, dir.path(), None, "http://127.0.0.1:9/");
    let sdk = settings.sdk_config().unwrap();
    let shared = handlers::Shared::open(settings).unwrap();
    let contacts = handlers::worker(handlers::Kind::Contacts, shared, None).unwrap();
    let shutdown = CancellationToken::new();
    let contacts = tokio::spawn(contacts.run(sdk, shutdown.clone()));

    let mut rt = Device::connect(&broker, "rt").await;
    rt.subscribe(&["contact_list"]).await;
    rt.wait_for("get_contact_list", "contact_list").await;

    // The big subscriber is a client of its own (as a device would be): its
    // thread and runtime, so that what is measured is the broker's stall,
    // not the test client's work encoding 30,000 filters.
    let (addr, ca_file, token) = (broker.tls_addr, broker.ca_file.clone(), broker.token("big"));
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let target = e2e::clients::Target {
                addr,
                ca_file: Some(&ca_file),
            };
            let mut big = V5Client::connect(target, "big-phone", "JWT", &token, |o| {
                o.set_max_packet_size(Some(1 << 20));
            });
            big.connected().await;
            let batches: Vec<Vec<Filter>> = (0..3)
                .map(|batch| {
                    (0..10_000)
                        .map(|i| Filter::new(format!("big_t{batch}_{i}"), QoS::AtMostOnce))
                        .collect()
                })
                .collect();
            let _ = connected_tx.send(());
            for filters in batches {
                big.client.subscribe_many(filters).await.unwrap();
            }
            let (mut granted, mut over_quota) = (0, 0);
            for _ in 0..3 {
                let ack = big
                    .wait_for("SUBACK", |p| match p {
                        P5::SubAck(ack) => Some(ack.clone()),
                        _ => None,
                    })
                    .await;
                assert_eq!(ack.return_codes.len(), 10_000);
                for code in ack.return_codes {
                    match code {
                        SubscribeReasonCode::Success(_) => granted += 1,
                        SubscribeReasonCode::QuotaExceeded => over_quota += 1,
                        other => panic!("unexpected code {other:?}"),
                    }
                }
            }
            let _ = done_tx.send((granted, over_quota));
        });
    });
    connected_rx.await.expect("the big subscriber connects");

    let round_trips = async {
        for i in 0..40 {
            let started = std::time::Instant::now();
            rt.send("get_contact_list", json!({"request_id": format!("r{i}")}))
                .await;
            let body = tokio::time::timeout(Duration::from_secs(2), rt.reply_on("contact_list"))
                .await
                .unwrap_or_else(|_| panic!("round trip {i} not answered within 2 s"));
            assert_eq!(body["request_id"], format!("r{i}"));
            if i % 10 == 0 {
                eprintln!("round trip {i}: {:?}", started.elapsed());
            }
        }
    };
    let subscribing = async {
        tokio::time::timeout(Duration::from_secs(30), done_rx)
            .await
            .expect("SUBACKs within 30 s")
            .expect("the big subscriber's thread panicked")
    };
    let started = std::time::Instant::now();
    let ((), (granted, over_quota)) = tokio::join!(round_trips, subscribing);
    eprintln!(
        "cap {cap}: 40 round trips and 30,000 filters in {:?}",
        started.elapsed()
    );
    assert_eq!(granted, cap.min(30_000));
    assert_eq!(over_quota, 30_000 - cap.min(30_000));
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), contacts).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn huge_subscribes_are_capped_and_do_not_stall_others() {
    huge_subscribes_do_not_stall(100).await;
}

#[tokio::test]
async fn admitted_subscriptions_cost_constant_time() {
    // Every filter admitted: the bookkeeping itself must not stall anyone.
    huge_subscribes_do_not_stall(50_000).await;
}

#[tokio::test]
async fn persistent_sessions_per_user_are_capped() {
    let mut options = TestOptions::default();
    options.limits.max_persistent_sessions_per_user = 2;
    let broker = TestBroker::start_with(options).await;
    let persistent = |cid: &str, expiry: u32| {
        device_with(&broker, "alice", cid, move |o| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(expiry));
        })
    };
    let mut p1 = persistent("p1", 1);
    p1.connected().await;
    let mut p2 = persistent("p2", 3600);
    p2.connected().await;

    let v5 = persistent("p3", 3600).connack().await.expect_err("refused");
    assert!(v5.contains("QuotaExceeded"), "{v5}");
    let v4 = V4Client::connect(
        broker.tls_target(),
        "p3",
        "JWT",
        &broker.token("alice"),
        |o| {
            o.set_clean_session(false);
        },
    )
    .connack()
    .await
    .expect_err("refused");
    assert!(v4.contains("ServiceUnavailable"), "{v4}");

    // Clean sessions, another user, and resuming one of alice's are fine.
    device_with(&broker, "alice", "p3", |_| {})
        .connected()
        .await;
    device_with(&broker, "bob", "p3", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
    })
    .connected()
    .await;
    let mut p2_again = persistent("p2", 3600);
    p2_again.connected().await;

    // p1 leaves and its session expires after 1 s: its place is free again.
    p1.client.disconnect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut p4 = persistent("p4", 3600);
        if p4.connack().await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired session never freed its place"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let metrics = broker.metrics_text().await;
    assert!(
        series(
            &metrics,
            "broker_connects_refused_total{reason=\"too many persistent sessions for this user\"}"
        ) >= 2,
        "{metrics}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn reply_index_entries_are_freed_when_subscribers_leave() {
    const GAUGE: &str = "broker_reply_index_topics ";
    let broker = TestBroker::start().await;
    let baseline = series(&broker.metrics_text().await, GAUGE);

    // Served by the gate (QoS 0, clean session) and by the router (QoS 1).
    let mut erin = broker.device("erin", "erin-phone").await;
    let direct = (0..50).map(|i| format!("erin_d{i}"));
    assert!(subscribe_many(&mut erin, direct, QoS::AtMostOnce)
        .await
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
    let routed = (0..20).map(|i| format!("erin_r{i}"));
    assert!(subscribe_many(&mut erin, routed, QoS::AtLeastOnce)
        .await
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
    let mut frank = broker.device("frank", "frank-phone").await;
    assert!(matches!(
        frank.subscribe("frank_d0", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(series(&broker.metrics_text().await, GAUGE), baseline + 71);

    // Unsubscribing frees the gate's entries at once.
    for i in 0..50 {
        erin.client.unsubscribe(format!("erin_d{i}")).await.unwrap();
    }
    for _ in 0..50 {
        erin.wait_for("UNSUBACK", |p| matches!(p, P5::UnsubAck(_)).then_some(()))
            .await;
    }
    assert_eq!(series(&broker.metrics_text().await, GAUGE), baseline + 21);

    // Disconnecting frees the rest (the router's too: a clean session).
    erin.client.disconnect().await.unwrap();
    frank.client.disconnect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = series(&broker.metrics_text().await, GAUGE);
        if now == baseline {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} topics left, {baseline} expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn persistent_sessions_keep_their_count_and_free_it_at_expiry() {
    const GAUGE: &str = "broker_reply_index_topics ";
    let mut options = TestOptions::default();
    options.limits.device_max_subscriptions = 5;
    let broker = TestBroker::start_with(options).await;
    let baseline = series(&broker.metrics_text().await, GAUGE);
    let persistent = |expiry: u32| {
        device_with(&broker, "gina", "gina-phone", move |o| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(expiry));
        })
    };
    let mut first = persistent(3600);
    first.connected().await;
    let five = (0..5).map(|i| format!("gina_{i}"));
    assert!(subscribe_many(&mut first, five, QoS::AtLeastOnce)
        .await
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
    assert_eq!(series(&broker.metrics_text().await, GAUGE), baseline + 5);
    first.client.disconnect().await.unwrap();
    drop(first);

    // The session is resumed with its subscriptions, which still count.
    let mut second = persistent(1);
    assert!(second.connected().await.session_present);
    assert_eq!(
        second.subscribe("gina_5", QoS::AtLeastOnce).await,
        SubscribeReasonCode::QuotaExceeded
    );
    assert_eq!(series(&broker.metrics_text().await, GAUGE), baseline + 5);

    // It leaves, and its session expires after 1 s: the entries are freed.
    second.client.disconnect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = series(&broker.metrics_text().await, GAUGE);
        if now == baseline {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} topics left after the expiry, {baseline} expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.shutdown().await;
}

/// Runs a mosquitto client against `broker` over TLS as device `uid`, and
/// returns its exit status with stdout and stderr together.
async fn mosquitto(
    program: &str,
    broker: &TestBroker,
    version: &str,
    uid: &str,
    args: &[&str],
) -> (std::process::ExitStatus, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg("--cafile")
        .arg(&broker.ca_file)
        .args(["-h", "localhost", "-p", &broker.tls_addr.port().to_string()])
        .args(["-V", version, "-u", "JWT", "-P", &broker.token(uid)])
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish"))
        .unwrap_or_else(|e| panic!("{program} (install mosquitto-clients): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

#[tokio::test]
async fn mosquitto_clients_meet_the_caps() {
    let broker = TestBroker::start().await;
    let too_long = "m".repeat(129);
    for version in ["mqttv311", "mqttv5"] {
        let (status, out) = mosquitto(
            "mosquitto_pub",
            &broker,
            version,
            "mo",
            &["-i", &too_long, "-t", "sync", "-m", "{}", "-q", "1"],
        )
        .await;
        assert!(!status.success(), "{version}: {out}");
        assert!(
            out.to_lowercase().contains("identifier"),
            "{version}: {out}"
        );
    }

    let long_topic = format!("sync{}", "x".repeat(300));
    let (_, out) = mosquitto(
        "mosquitto_pub",
        &broker,
        "mqttv5",
        "mo",
        &[
            "-i",
            "mo-pub",
            "-t",
            &long_topic,
            "-m",
            "{}",
            "-q",
            "1",
            "-d",
        ],
    )
    .await;
    // PUBACK 0x90 (144): Topic Name invalid.
    assert!(out.contains("RC:144"), "{out}");
    assert!(out.to_lowercase().contains("topic name invalid"), "{out}");

    let long_filter = format!("mo_{}", "x".repeat(300));
    let (_, out) = mosquitto(
        "mosquitto_sub",
        &broker,
        "mqttv5",
        "mo",
        &[
            "-i",
            "mo-sub",
            "-t",
            &long_filter,
            "-C",
            "1",
            "-W",
            "3",
            "-d",
        ],
    )
    .await;
    // SUBACK 0x8F (143): Topic Filter invalid.
    assert!(out.contains("Subscribed (mid: 1): 143"), "{out}");
    assert!(
        out.contains("All subscription requests were denied"),
        "{out}"
    );
    broker.shutdown().await;
}
