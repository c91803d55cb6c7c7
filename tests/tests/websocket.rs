//! MQTT over WebSocket (`BROKER_WS_LISTEN`, `BROKER_WSS_LISTEN`) with
//! clients we did not write: MQTT.js under Node over `ws://` and `wss://`,
//! MQTT 3.1.1 and 5, a JWT device getting a handler's reply; a raw
//! WebSocket client (tokio-tungstenite's client side) splitting one packet
//! over several messages and putting several packets in one; and the hostile
//! cases: a wrong path (404), no `mqtt` subprotocol (400), a text frame, an
//! oversized frame, a slow upgrade, an upgrade request too long, a thousand
//! idle upgrades from one address, and `X-Forwarded-For` believed only from
//! a trusted proxy.
//!
//! Debian's `mosquitto_pub`/`mosquitto_sub` (2.0.11) have no WebSocket
//! transport (`mosquitto_pub --help` lists none), so they are not used here.

use broker::config::Limits;
use e2e::haproxy::connect_from;
use e2e::{TestBroker, TestOptions};
use futures::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::QoS;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(10);

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Installs MQTT.js from the lockfile when `.ci/run` has not (bounded).
async fn ensure_mqtt_js() {
    if js_dir().join("node_modules/mqtt/package.json").exists() {
        return;
    }
    let install = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(js_dir())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(300), install)
        .await
        .expect("npm ci within 5 minutes")
        .expect("npm runs (node and npm installed)");
    assert!(status.success(), "npm ci in tests/js failed");
}

/// `broker_sockets_dropped_total{reason}`.
async fn dropped(broker: &TestBroker, reason: &str) -> f64 {
    broker
        .metric(&format!(
            "broker_sockets_dropped_total{{reason=\"{reason}\"}}"
        ))
        .await
}

/// Answers the next `get_contact_list` command on `<uid>_contact_list`,
/// for the uid the broker stamped on it.
async fn answer_one(handler: &mut e2e::V5Client) -> String {
    let command = handler.publish_received().await;
    assert_eq!(command.topic, "get_contact_list");
    let uid = e2e::clients::user_property(&command, "user_id")
        .first()
        .expect("user_id stamped")
        .to_string();
    handler
        .client
        .publish(
            format!("{uid}_contact_list"),
            QoS::AtLeastOnce,
            false,
            "[\"carol\"]",
        )
        .await
        .expect("queue reply");
    uid
}

#[tokio::test]
async fn mqtt_js_over_ws_and_wss_with_mqtt_311_and_5_gets_a_handlers_reply() {
    ensure_mqtt_js().await;
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("ws-handler").await;
    handler
        .subscribe("get_contact_list", QoS::AtLeastOnce)
        .await;
    let ca = broker.ca_file.display().to_string();
    for (scheme, addr) in [("ws", broker.ws_addr), ("wss", broker.wss_addr)] {
        for version in ["4", "5"] {
            let uid = format!("{scheme}{version}");
            let url = format!("{scheme}://127.0.0.1:{}/mqtt", addr.port());
            let mut node = tokio::process::Command::new("node");
            node.arg(js_dir().join("mqtt_client.mjs"))
                .args([&url, version, &uid, &broker.token(&uid)])
                .kill_on_drop(true);
            if scheme == "wss" {
                node.arg(&ca);
            }
            let run = tokio::spawn(node.output());
            let answered = tokio::time::timeout(WAIT, answer_one(&mut handler)).await;
            let output = tokio::time::timeout(WAIT * 2, run)
                .await
                .expect("MQTT.js finishes")
                .unwrap()
                .expect("node runs");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{url} v{version}: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(answered.expect("the handler got the command"), uid);
            let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            assert_eq!(reply["topic"], format!("{uid}_contact_list"));
            assert_eq!(reply["payload"], "[\"carol\"]");
        }
    }
    broker.shutdown().await;
}

/// A raw client: the upgrade offering `protocols`.
async fn ws_client(addr: SocketAddr, protocols: &str) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("ws://127.0.0.1:{}/mqtt", addr.port())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(protocols).unwrap(),
    );
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "mqtt",
        "the broker answers with the protocol offered"
    );
    ws
}

/// Reads binary messages until `want` says the bytes so far are enough.
async fn read_until(
    ws: &mut WebSocketStream<TcpStream>,
    got: &mut Vec<u8>,
    want: impl Fn(&[u8]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want(got) {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("waited for more; have {got:?}"))
            .expect("stream open")
            .expect("message");
        if let Message::Binary(bytes) = message {
            got.extend_from_slice(&bytes);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn packets_split_across_messages_and_coalesced_in_one() {
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("split-handler").await;
    handler
        .subscribe("get_contact_list", QoS::AtLeastOnce)
        .await;
    let mut ws = ws_client(broker.ws_addr, "mqtt").await;

    // CONNECT in three messages: its first byte, four more, the rest.
    let connect = e2e::raw::connect(4, "bob-raw", 30, &broker.token("bob"));
    for piece in [&connect[..1], &connect[1..5], &connect[5..]] {
        ws.send(Message::Binary(piece.to_vec().into()))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, |b| b.len() >= 4).await;
    assert_eq!(&got[..4], &[0x20, 2, 0, 0], "CONNACK, accepted");
    got.drain(..4);

    // SUBSCRIBE and PUBLISH (QoS 0) in one message.
    let mut both = e2e::raw::subscribe(
        4,
        1,
        &["bob_contact_list"],
        mqtt_router::protocol::QoS::AtMostOnce,
    );
    let topic = b"get_contact_list";
    let mut publish = vec![0x30, (2 + topic.len() + 2) as u8, 0, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(b"{}");
    both.extend_from_slice(&publish);
    ws.send(Message::Binary(both.into())).await.unwrap();
    read_until(&mut ws, &mut got, |b| b.len() >= 5).await;
    assert_eq!(&got[..5], &[0x90, 3, 0, 1, 0], "SUBACK");
    got.drain(..5);
    assert_eq!(answer_one(&mut handler).await, "bob");
    read_until(&mut ws, &mut got, |b| contains(b, b"[\"carol\"]")).await;
    assert!(contains(&got, b"bob_contact_list"), "{got:?}");

    // A ping is answered with its pong.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(data))) => return data,
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("pong in time");
    assert_eq!(&pong[..], b"are you there");
    broker.shutdown().await;
}

fn upgrade_request(path: &str, protocols: Option<&str>, extra: &str) -> String {
    let protocols = protocols
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocols}{extra}\r\n"
    )
}

/// The broker's HTTP answer head to `request` (empty if it closed first).
async fn http_answer(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !contains(&got, b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer in time; have {got:?}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn the_upgrade_checks_path_subprotocol_size_and_time() {
    let deadline = Duration::from_secs(1);
    let broker = TestBroker::start_with(TestOptions {
        limits: Limits {
            tls_handshake_timeout: deadline,
            ..TestOptions::default().limits
        },
        ..TestOptions::default()
    })
    .await;
    let addr = broker.ws_addr;

    let mut s = TcpStream::connect(addr).await.unwrap();
    let answer = http_answer(&mut s, &upgrade_request("/other", Some("mqtt"), "")).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let mut s = TcpStream::connect(addr).await.unwrap();
    let answer = http_answer(&mut s, &upgrade_request("/mqtt", None, "")).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let answer = http_answer(&mut s, &upgrade_request("/mqtt", Some("wamp, chat"), "")).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // The one offered, the client's first choice among ours.
    for (offer, answered) in [
        ("mqttv3.1", "mqttv3.1"),
        ("chat, mqtt", "mqtt"),
        ("mqttv3.1, mqtt", "mqttv3.1"),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let answer = http_answer(&mut s, &upgrade_request("/mqtt", Some(offer), "")).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("sec-websocket-protocol: {answered}\r\n")),
            "{answer}"
        );
    }

    // A request head over 8 KiB: closed without waiting for the deadline.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let padding = format!("X-Padding: {}\r\n", "p".repeat(9000));
    let _ = s
        .write_all(upgrade_request("/mqtt", Some("mqtt"), &padding).as_bytes())
        .await;
    assert!(closed_within(&mut s, deadline / 2).await, "too long a head");

    // A slow upgrade: closed at the deadline.
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut s, deadline * 4).await);
    assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());

    assert_eq!(dropped(&broker, "ws_not_found").await, 1.0);
    assert_eq!(dropped(&broker, "ws_no_subprotocol").await, 2.0);
    assert!(dropped(&broker, "ws_handshake").await >= 2.0);
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn text_and_oversized_frames_close_the_connection() {
    let broker = TestBroker::start_with(TestOptions {
        limits: Limits {
            max_packet_size: 4096,
            ..TestOptions::default().limits
        },
        ..TestOptions::default()
    })
    .await;
    for hostile in [
        Message::Text("CONNECT".into()),
        Message::Binary(vec![0x10; 10_000].into()),
    ] {
        let mut ws = ws_client(broker.ws_addr, "mqtt").await;
        let connect = e2e::raw::connect(5, "eve", 30, &broker.token("eve"));
        ws.send(Message::Binary(connect.into())).await.unwrap();
        let mut got = Vec::new();
        read_until(&mut ws, &mut got, |b| b.len() >= 2).await;
        assert_eq!(got[0], 0x20, "CONNACK");
        let _ = ws.send(hostile).await;
        let ended = tokio::time::timeout(WAIT, async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the broker closed the connection");
    }
    broker.assert_still_serving().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_thousand_idle_upgrades_from_one_address_are_bounded_by_admission() {
    const CAP: usize = 50;
    let deadline = Duration::from_secs(3);
    let broker = TestBroker::start_with(TestOptions {
        limits: Limits {
            tls_handshake_timeout: deadline,
            max_pending_per_addr: CAP,
            ..TestOptions::default().limits
        },
        ..TestOptions::default()
    })
    .await;
    let source = [127, 0, 0, 7];
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut s = connect_from(source, broker.ws_addr).await;
        let _ = s.write_all(b"GET /mqtt HTTP/1.1\r\n").await;
        idle.push(s);
    }
    let refused = dropped(&broker, "too_many_pending").await;
    assert!(
        refused >= (1000 - CAP) as f64 - 1.0,
        "{refused} refused at accept"
    );
    // Another address is not held up, over WebSocket or TLS.
    let mut ws = ws_client(broker.ws_addr, "mqtt").await;
    ws.send(Message::Binary(
        e2e::raw::connect(4, "dave", 30, &broker.token("dave")).into(),
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, |b| b.len() >= 4).await;
    assert_eq!(&got[..4], &[0x20, 2, 0, 0]);
    broker.assert_still_serving().await;
    // Every idle one is closed by the deadline.
    for s in &mut idle {
        assert!(closed_within(s, deadline * 3).await);
    }
    assert!(dropped(&broker, "ws_handshake").await >= CAP as f64);
    broker.shutdown().await;
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let broker = TestBroker::start_with(TestOptions {
        limits: Limits {
            trusted_proxies: "127.0.0.5/32".parse().unwrap(),
            conn_rate_per_sec: 0.001,
            conn_burst: 2,
            ..Limits::default()
        },
        ..TestOptions::default()
    })
    .await;
    let proxy = [127, 0, 0, 5];
    let stranger = [127, 0, 0, 6];
    // From the trusted proxy: the last untrusted hop is the client (the
    // leftmost, written by the client, is not believed).
    let forwarded = |client: &str| format!("X-Forwarded-For: 10.9.9.9, {client}, 127.0.0.5\r\n");
    for _ in 0..2 {
        let mut s = connect_from(proxy, broker.ws_addr).await;
        let answer = http_answer(
            &mut s,
            &upgrade_request("/mqtt", Some("mqtt"), &forwarded("203.0.113.7")),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    }
    let mut s = connect_from(proxy, broker.ws_addr).await;
    let answer = http_answer(
        &mut s,
        &upgrade_request("/mqtt", Some("mqtt"), &forwarded("203.0.113.7")),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "203.0.113.7 spent its burst: {answer}"
    );
    assert_eq!(dropped(&broker, "rate_limited").await, 1.0);
    let mut s = connect_from(proxy, broker.ws_addr).await;
    let answer = http_answer(
        &mut s,
        &upgrade_request("/mqtt", Some("mqtt"), &forwarded("203.0.113.8")),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 101"),
        "another client: {answer}"
    );
    let mut s = connect_from(proxy, broker.ws_addr).await;
    let answer = http_answer(
        &mut s,
        &upgrade_request("/mqtt", Some("mqtt"), "X-Forwarded-For: not-an-address\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // From a stranger the header is ignored: its own address is limited.
    for i in 0..3 {
        let mut s = connect_from(stranger, broker.ws_addr).await;
        let answer = http_answer(
            &mut s,
            &upgrade_request(
                "/mqtt",
                Some("mqtt"),
                &forwarded(&format!("198.51.100.{i}")),
            ),
        )
        .await;
        if i < 2 {
            assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        } else {
            assert!(answer.is_empty(), "closed at accept: {answer}");
        }
    }
    assert_eq!(dropped(&broker, "rate_limited").await, 2.0);
    broker.shutdown().await;
}
