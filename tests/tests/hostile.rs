//! Hostile clients, each answered as the README says ("What it is",
//! "Threats and what bounds them"), with the broker still serving others
//! afterwards: bad tokens of every kind, bad subjects, client
//! id collisions, forbidden subscriptions and publishes, forged identity,
//! malformed and oversized packets, silent sockets, expiring tokens.

use base64::Engine;
use e2e::clients::{Seen, V4Client, V5Client};
use e2e::{TestBroker, TestOptions};
use protocol::claims::{now_secs, DeviceClaims};
use rumqttc::v5::mqttbytes::v5::{self as p5, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unsigned_token(sub: &str) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = serde_json::json!({"sub": sub, "exp": now_secs() + 3600});
    format!("{header}.{}.", b64url(claims.to_string().as_bytes()))
}

async fn v5_refusal(broker: &TestBroker, password: &str) -> String {
    let mut client = V5Client::connect(broker.tls_target(), "c", "JWT", password, |_| {});
    client
        .connack()
        .await
        .expect_err("connection must be refused")
}

async fn v4_refusal(broker: &TestBroker, password: &str) -> String {
    let mut client = V4Client::connect(broker.tls_target(), "c", "JWT", password, |_| {});
    client
        .connack()
        .await
        .expect_err("connection must be refused")
}

#[tokio::test]
async fn bad_tokens_are_refused_with_reason_codes() {
    let broker = TestBroker::start().await;
    let now = now_secs();
    let expired = broker.token_with(&DeviceClaims {
        sub: "1".into(),
        exp: Some(now - 60),
        ..Default::default()
    });
    let not_yet = broker.token_with(&DeviceClaims {
        sub: "1".into(),
        exp: Some(now + 3600),
        nbf: Some(now + 600),
        ..Default::default()
    });
    let no_exp = broker.token_with(&DeviceClaims {
        sub: "1".into(),
        ..Default::default()
    });
    let wrong_secret = DeviceClaims::new("1", 60)
        .sign_hs256(b"another secret")
        .unwrap();
    let mut tampered = broker.token("1");
    // A different last signature character (pushing a fixed 'A' left the
    // token valid whenever it already ended in 'A': a 1-in-64 flake).
    let last = tampered.pop();
    tampered.push(if last == Some('A') { 'B' } else { 'A' });

    // 0x86 bad user name or password: nothing is proven.
    for bad in [
        unsigned_token("1"),
        wrong_secret,
        "garbage".into(),
        String::new(),
        "a.b.c".into(),
    ] {
        let v5 = v5_refusal(&broker, &bad).await;
        assert!(v5.contains("BadUserNamePassword"), "{bad:?}: {v5}");
        let v4 = v4_refusal(&broker, &bad).await;
        assert!(v4.contains("BadUserNamePassword"), "{bad:?}: {v4}");
    }
    // A tampered signature is bad credentials too (or malformed base64).
    let v5 = v5_refusal(&broker, &tampered).await;
    assert!(v5.contains("BadUserNamePassword"), "{v5}");

    // 0x87 not authorized: signed, but not valid now.
    for bad in [expired, not_yet, no_exp] {
        let v5 = v5_refusal(&broker, &bad).await;
        assert!(v5.contains("NotAuthorized"), "{v5}");
        let v4 = v4_refusal(&broker, &bad).await;
        assert!(v4.contains("NotAuthorized"), "{v4}");
    }

    // Subjects that are not user ids.
    for sub in ["12_3", "a/b", "#", "a\0b", "", "+"] {
        let token = broker.token_with(&DeviceClaims::new(sub, 60));
        let v5 = v5_refusal(&broker, &token).await;
        assert!(v5.contains("NotAuthorized"), "sub {sub:?}: {v5}");
    }

    // Unknown usernames and wrong handler keys.
    let mut stranger = V5Client::connect(broker.tls_target(), "x", "admin", "admin", |_| {});
    assert!(stranger
        .connack()
        .await
        .unwrap_err()
        .contains("BadUserNamePassword"));
    let mut fake_handler = V5Client::connect(
        broker.tls_target(),
        "x",
        "handler",
        "not-the-key-at-all",
        |_| {},
    );
    assert!(fake_handler
        .connack()
        .await
        .unwrap_err()
        .contains("BadUserNamePassword"));
    let mut fake_handler = V4Client::connect(broker.tls_target(), "x", "handler", "", |_| {});
    assert!(fake_handler
        .connack()
        .await
        .unwrap_err()
        .contains("BadUserNamePassword"));

    let metrics = broker.metrics_text().await;
    assert!(
        metrics.contains("broker_connects_refused_total{reason="),
        "{metrics}"
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn issuer_audience_and_key_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let private_pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public_file = dir.path().join("idp.pem");
    std::fs::write(&public_file, &public_pem).unwrap();

    let mut options = TestOptions::default();
    options.jwt.public_key_files = vec![public_file];
    options.jwt.issuer = Some("https://idp.example".into());
    options.jwt.audience = Some("broker".into());
    let broker = TestBroker::start_with(options).await;

    let claims = |iss: &str, aud: &str| DeviceClaims {
        iss: Some(iss.into()),
        aud: Some(aud.into()),
        ..DeviceClaims::new("42", 600)
    };
    let good = claims("https://idp.example", "broker")
        .sign_pem(jsonwebtoken::Algorithm::RS256, private_pem.as_bytes(), None)
        .unwrap();
    let mut ok = V5Client::connect(broker.tls_target(), "ok", "JWT", &good, |_| {});
    ok.connected().await;

    for (iss, aud) in [
        ("https://evil.example", "broker"),
        ("https://idp.example", "other"),
    ] {
        let token = claims(iss, aud)
            .sign_pem(jsonwebtoken::Algorithm::RS256, private_pem.as_bytes(), None)
            .unwrap();
        assert!(
            v5_refusal(&broker, &token).await.contains("NotAuthorized"),
            "{iss} {aud}"
        );
    }
    // HS256 "signed" with the public key's PEM text as the HMAC secret.
    let confused = claims("https://idp.example", "broker")
        .sign_pem(jsonwebtoken::Algorithm::HS256, public_pem.as_bytes(), None)
        .unwrap();
    assert!(v5_refusal(&broker, &confused)
        .await
        .contains("BadUserNamePassword"));
    assert!(v4_refusal(&broker, &confused)
        .await
        .contains("BadUserNamePassword"));
    // The first device was never disturbed, and the good token still connects.
    assert_eq!(
        ok.subscribe("42_inbox", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    let mut again = V4Client::connect(broker.tls_target(), "again", "JWT", &good, |_| {});
    again.connected().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn client_ids_are_per_user_and_takeover_stays_within_a_user() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("shared-id").await;
    let mut alice = broker.device("alice", "shared-id").await;
    let mut bob = broker.device("bob", "shared-id").await;

    // None of them was disconnected: each still completes a subscription.
    assert_eq!(
        alice.subscribe("alice_x", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    assert_eq!(
        bob.subscribe("bob_x", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    assert_eq!(
        handler.subscribe("anything", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );

    // Alice's second connection with the same id replaces her first.
    let _alice_again = broker.device("alice", "shared-id").await;
    let ended = alice.closed().await;
    assert!(ended.contains("SessionTakenOver"), "{ended}");
    assert_eq!(
        bob.subscribe("bob_y", QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );

    // Empty client id: an assigned one with a clean session, refused without.
    let mut anonymous = V5Client::connect(
        broker.tls_target(),
        "",
        "JWT",
        &broker.token("carol"),
        |_| {},
    );
    let ack = anonymous.connected().await;
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier);
    assert!(assigned.is_some_and(|id| !id.is_empty()));
    let mut persistent = V5Client::connect(
        broker.tls_target(),
        "",
        "JWT",
        &broker.token("carol"),
        |o| {
            o.set_clean_start(false);
        },
    );
    let refused = persistent.connack().await.unwrap_err();
    assert!(refused.contains("ClientIdentifierNotValid"), "{refused}");
    broker.shutdown().await;
}

#[tokio::test]
async fn forbidden_subscriptions_get_ordered_suback_codes() {
    let broker = TestBroker::start().await;
    let mut device = broker.device("68946", "p").await;
    let filters = [
        "68946_contact_list",
        "#",
        "+",
        "$SYS/#",
        "23412_contact_requested",
        "68946_contact_approved",
        "sync",
    ];
    let subscriptions = filters
        .iter()
        .map(|f| p5::Filter::new(*f, QoS::AtLeastOnce))
        .collect::<Vec<_>>();
    device.client.subscribe_many(subscriptions).await.unwrap();
    let ack = device.suback().await;
    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    let no = SubscribeReasonCode::NotAuthorized;
    assert_eq!(ack.return_codes, vec![ok, no, no, no, no, ok, no]);

    let mut old = broker.device_v4("23412", "p").await;
    old.client
        .subscribe_many(
            [
                "#",
                "23412_contact_requested",
                "68946_contact_list",
                "23412",
            ]
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), rumqttc::QoS::AtLeastOnce)),
        )
        .await
        .unwrap();
    let ack = old.suback().await;
    use rumqttc::SubscribeReasonCode as V4Code;
    assert_eq!(
        ack.return_codes,
        vec![
            V4Code::Failure,
            V4Code::Success(rumqttc::QoS::AtLeastOnce),
            V4Code::Failure,
            V4Code::Failure
        ]
    );
    // Filters client libraries refuse to send (`U_#`, `U_+`), sent raw.
    for version in [4u8, 5] {
        let mut s = TcpStream::connect(broker.tcp_addr).await.unwrap();
        s.write_all(&raw_connect_version(version, &broker.token("23412")))
            .await
            .unwrap();
        let mut header = [0u8; 2];
        s.read_exact(&mut header).await.unwrap();
        assert_eq!(header[0], 0x20);
        let mut rest = vec![0u8; usize::from(header[1])];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest[1], 0, "connected");
        s.write_all(&raw_subscribe(version, &["23412_#", "23412_+", "23412_ok"]))
            .await
            .unwrap();
        let mut suback = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut suback))
            .await
            .unwrap()
            .unwrap();
        let codes = &suback[n - 3..n];
        if version == 4 {
            assert_eq!(codes, [0x80, 0x80, 0x01], "MQTT 3.1.1 SUBACK");
        } else {
            assert_eq!(
                codes,
                [0x8F, 0x8F, 0x01],
                "MQTT 5 SUBACK: topic filter invalid"
            );
        }
    }

    let metrics = broker.metrics_text().await;
    assert!(
        metrics.contains("broker_denials_total{kind=\"subscribe\""),
        "{metrics}"
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn forbidden_publishes_are_answered_and_dropped_and_identity_cannot_be_forged() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("watch").await;
    handler.subscribe("#", QoS::AtLeastOnce).await;
    let mut victim = broker.device("23412", "v").await;
    victim
        .subscribe("23412_contact_requested", QoS::AtLeastOnce)
        .await;

    let mut device = broker.device("68946", "p").await;
    for topic in [
        "23412_contact_requested",
        "undeclared_topic",
        "68946_contact_list",
        "$SYS/x",
    ] {
        device
            .client
            .publish(topic, QoS::AtLeastOnce, false, "spoof")
            .await
            .unwrap();
        assert_eq!(
            device.puback().await.reason,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
    }
    victim.assert_no_publish(Duration::from_millis(300)).await;

    // MQTT 3.1.1: acknowledged and dropped.
    let mut old = broker.device_v4("777", "o").await;
    old.client
        .publish(
            "23412_contact_requested",
            rumqttc::QoS::AtLeastOnce,
            false,
            "spoof",
        )
        .await
        .unwrap();
    old.wait_for("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    victim.assert_no_publish(Duration::from_millis(300)).await;

    // Forged identity properties are replaced; retain is cleared.
    let forged = p5::PublishProperties {
        user_properties: vec![
            ("user_id".into(), "23412".into()),
            ("client_id".into(), "v".into()),
            ("note".into(), "kept".into()),
        ],
        ..Default::default()
    };
    device
        .client
        .publish_with_properties("sync", QoS::AtLeastOnce, true, "{}", forged)
        .await
        .unwrap();
    assert_eq!(device.puback().await.reason, PubAckReason::Success);
    let seen = handler
        .wait_for("the sync command", |p| match p {
            p5::Packet::Publish(publish) if publish.topic == "sync" => Some(publish.clone()),
            _ => None,
        })
        .await;
    assert!(!seen.retain, "device publishes never set retained messages");
    let properties = seen.properties.expect("properties").user_properties;
    assert_eq!(
        e2e::clients::without_token_iat(&properties),
        vec![
            ("note".to_owned(), "kept".to_owned()),
            ("user_id".to_owned(), "68946".to_owned()),
            ("client_id".to_owned(), "p".to_owned()),
        ]
    );
    // Nothing retained on `sync`: a new subscriber gets nothing.
    let mut late = broker.handler("late").await;
    late.subscribe("sync", QoS::AtLeastOnce).await;
    late.assert_no_publish(Duration::from_millis(300)).await;
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

fn raw_connect_version(version: u8, token: &str) -> Vec<u8> {
    e2e::raw::connect(version, "raw", 30, token)
}

fn raw_subscribe(version: u8, filters: &[&str]) -> Vec<u8> {
    e2e::raw::subscribe(version, 7, filters, mqtt_router::protocol::QoS::AtLeastOnce)
}

fn raw_connect(token: &str) -> Vec<u8> {
    raw_connect_version(5, token)
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

#[tokio::test]
async fn malformed_oversized_and_silent_sockets_are_closed() {
    let mut options = TestOptions::default();
    options.limits.connect_timeout = Duration::from_millis(500);
    options.limits.tls_handshake_timeout = Duration::from_millis(500);
    options.limits.max_packet_size = 4096;
    let broker = TestBroker::start_with(options).await;

    // Garbage instead of CONNECT.
    let mut s = TcpStream::connect(broker.tcp_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    read_until_closed(&mut s, Duration::from_secs(5)).await;

    // A socket that never sends CONNECT, on both listeners.
    for addr in [broker.tcp_addr, broker.tls_addr] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    // Connected, then a malformed packet: closed with DISCONNECT 0x81.
    let mut s = TcpStream::connect(broker.tcp_addr).await.unwrap();
    s.write_all(&raw_connect(&broker.token("5"))).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack[0], 0x20);
    s.write_all(&[0x82, 0x03, 0x00, 0x01, 0x00]).await.unwrap(); // SUBSCRIBE with no filter
    let rest = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let disconnect = rest.iter().position(|b| *b == 0xE0).expect("a DISCONNECT");
    assert_eq!(rest[disconnect + 2], 0x81, "malformed packet");

    // Connected, then a packet over the size limit: DISCONNECT 0x95.
    let mut s = TcpStream::connect(broker.tcp_addr).await.unwrap();
    s.write_all(&raw_connect(&broker.token("6"))).await.unwrap();
    s.read_exact(&mut connack).await.unwrap();
    let mut huge = vec![0x30, 0x80, 0x80, 0x01]; // PUBLISH, remaining length 16384
    huge.extend(std::iter::repeat_n(b'x', 64));
    s.write_all(&huge).await.unwrap();
    let rest = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let disconnect = rest.iter().position(|b| *b == 0xE0).expect("a DISCONNECT");
    assert_eq!(rest[disconnect + 2], 0x95, "packet too large");

    // An unsupported protocol level gets CONNACK code 1.
    let mut s = TcpStream::connect(broker.tcp_addr).await.unwrap();
    s.write_all(&[
        0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 3, 0x02, 0, 60, 0, 1, b'c',
    ])
    .await
    .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(answer, vec![0x20, 2, 0, 1]);

    let metrics = broker.metrics_text().await;
    assert!(
        metrics.contains("broker_sockets_dropped_total{reason=\"connect_timeout\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("broker_sockets_dropped_total{reason=\"tls_handshake\"}"),
        "{metrics}"
    );
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn expiring_token_disconnects_and_fires_the_will() {
    let mut options = TestOptions::default();
    options.jwt.leeway_secs = 0;
    let broker = TestBroker::start_with(options).await;
    let mut handler = broker.handler("wills").await;
    handler.subscribe("presence", QoS::AtLeastOnce).await;

    let token = broker.token_with(&DeviceClaims {
        sub: "31337".into(),
        exp: Some(now_secs() + 3),
        ..Default::default()
    });
    // `presence` becomes a command topic because the handler subscribed to it.
    let mut device = V5Client::connect(broker.tls_target(), "short", "JWT", &token, |o| {
        o.set_last_will(p5::LastWill::new(
            "presence",
            "gone",
            QoS::AtLeastOnce,
            false,
            None,
        ));
    });
    device.connected().await;
    let ended = device.closed().await;
    assert!(ended.contains("NotAuthorized"), "{ended}");
    let will = handler.publish_received().await;
    assert_eq!(will.topic, "presence");
    assert_eq!(&will.payload[..], b"gone");
    let uid = will
        .properties
        .unwrap()
        .user_properties
        .into_iter()
        .find(|(k, _)| k == "user_id");
    assert_eq!(uid, Some(("user_id".to_owned(), "31337".to_owned())));
    broker.shutdown().await;
}

#[tokio::test]
async fn will_to_a_forbidden_topic_is_refused_at_connect() {
    let broker = TestBroker::start().await;
    let mut device = V5Client::connect(broker.tls_target(), "w", "JWT", &broker.token("9"), |o| {
        o.set_last_will(p5::LastWill::new(
            "10_inbox",
            "spoof",
            QoS::AtMostOnce,
            false,
            None,
        ));
    });
    assert!(device
        .connack()
        .await
        .unwrap_err()
        .contains("NotAuthorized"));
    broker.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_tells_mqtt5_clients() {
    let broker = TestBroker::start().await;
    let mut device = broker.device("1", "d").await;
    let mut old = V4Client::connect(
        broker.plain_target(),
        "d",
        "JWT",
        &broker.token("2"),
        |_| {},
    );
    old.connected().await;
    broker.begin_shutdown();
    let ended = device.closed().await;
    assert!(ended.contains("ServerShuttingDown"), "{ended}");
    // MQTT 3.1.1 has no server DISCONNECT: the socket just closes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, old.events.recv()).await {
            Ok(Some(Seen::Error(_))) | Ok(None) => break,
            Ok(Some(Seen::Packet(_))) => {}
            Err(_) => panic!("3.1.1 client not disconnected"),
        }
    }
    broker.shutdown().await;
}
