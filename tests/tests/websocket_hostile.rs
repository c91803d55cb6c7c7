//! MQTT over WebSocket, the hostile cases, each answered and bounded: a
//! wrong path (404), no `mqtt` subprotocol (400), an upgrade request too
//! long, a slow upgrade (the handshake deadline), a text frame, a frame
//! over the maximum packet size (sent, or only declared), a thousand idle
//! upgrades from one address (per-source admission), and `X-Forwarded-For`
//! believed only from a trusted proxy.

use broker::config::Limits;
use e2e::haproxy::connect_from;
use e2e::ws::{
    closed_within, dropped, frame_header, http_answer, raw_upgrade, read_frame, read_until,
    upgrade_request, ws_client, OP_BINARY, OP_CLOSE, WAIT,
};
use e2e::{TestBroker, TestOptions};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

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

    // One that was offered: `mqtt` whenever it was (MQTT-6.0.0-4).
    for (offer, answered) in [
        ("mqttv3.1", "mqttv3.1"),
        ("chat, mqtt", "mqtt"),
        ("mqttv3.1, mqtt", "mqtt"),
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

/// A frame header declaring far more than the maximum packet size is
/// refused at the header (close 1009 or the socket closed), before any of
/// its payload is awaited or buffered.
#[tokio::test]
async fn a_frame_declaring_a_huge_length_is_refused_at_its_header() {
    let broker = TestBroker::start_with(TestOptions {
        limits: Limits {
            max_packet_size: 4096,
            ..TestOptions::default().limits
        },
        ..TestOptions::default()
    })
    .await;
    for declared in [4096 + 64, 1 << 40] {
        let mut s = raw_upgrade(broker.ws_addr).await;
        s.write_all(&frame_header(true, OP_BINARY, declared))
            .await
            .unwrap();
        s.write_all(&[0u8; 16]).await.unwrap();
        match read_frame(&mut s).await {
            None => {}
            Some((op, _)) => assert_eq!(op, OP_CLOSE, "declared {declared}"),
        }
        assert!(closed_within(&mut s, WAIT).await, "declared {declared}");
    }
    broker.assert_still_serving().await;
    broker.shutdown().await;
}
