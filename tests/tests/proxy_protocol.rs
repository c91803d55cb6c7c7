//! The PROXY protocol behind a real load balancer (Debian's HAProxy with
//! `send-proxy` and `send-proxy-v2`), with real MQTT clients
//! (`mosquitto_pub`, rumqttc over TLS) through it: per-source admission
//! applies to the client's address from the header, not to the proxy's.
//! Then the hostile openings, from raw sockets on chosen loopback addresses:
//! a PROXY header from an untrusted peer, a trusted peer without one, a
//! malformed header, one that never ends, one too long.
//!
//! Loopback addresses stand for machines: HAProxy connects to the broker
//! from 127.0.0.5 (the only trusted proxy), clients come from 127.0.0.2 and
//! 127.0.0.3, strangers from 127.0.0.6.

use broker::config::Limits;
use e2e::haproxy::{self, connect_from, HaProxy};
use e2e::{TestBroker, TestOptions};
use rumqttc::v5::mqttbytes::QoS;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROXY: [u8; 4] = [127, 0, 0, 5];
const STRANGER: [u8; 4] = [127, 0, 0, 6];

fn trusting_the_proxy(limits: Limits) -> TestOptions {
    TestOptions {
        limits: Limits {
            trusted_proxies: "127.0.0.5/32".parse().expect("CIDR"),
            ..limits
        },
        ..TestOptions::default()
    }
}

/// `broker_sockets_dropped_total{reason}`.
async fn dropped(broker: &TestBroker, reason: &str) -> f64 {
    broker
        .metric(&format!(
            "broker_sockets_dropped_total{{reason=\"{reason}\"}}"
        ))
        .await
}

/// Publishes one QoS 1 command with `mosquitto_pub` as device `uid`
/// through `port`, its socket bound to `source`; whether it succeeded.
async fn mosquitto_pub(broker: &TestBroker, port: u16, source: &str, uid: &str) -> bool {
    let run = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-A", source])
        .args([
            "-V",
            "mqttv5",
            "-i",
            uid,
            "-u",
            "JWT",
            "-P",
            &broker.token(uid),
        ])
        .args(["-t", "get_contact_list", "-m", "{}", "-q", "1"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("mosquitto_pub finishes within 15 s")
        .expect("mosquitto_pub runs (mosquitto-clients installed)");
    output.status.success()
}

fn backend(name: &str, frontend: u16, server: SocketAddr, send: &str) -> String {
    format!(
        "frontend {name}\n  bind 127.0.0.1:{frontend}\n  default_backend {name}_broker\n\
         backend {name}_broker\n  server broker {server} {send} source 127.0.0.5\n\n"
    )
}

/// Three connections from 127.0.0.2 through `send-proxy` (v1) use up that
/// address's burst; a fourth through `send-proxy-v2` is refused as
/// rate-limited, while 127.0.0.3 through the same proxy is admitted: the
/// broker limits the client the header names, not the proxy, which opened
/// all of them. A rumqttc device through `send-proxy-v2` in front of the TLS
/// listener gets a handler's reply.
#[tokio::test]
async fn haproxy_v1_and_v2_carry_the_client_address_to_admission() {
    if haproxy::binary().is_none() {
        panic!("haproxy is not installed: apt-get install -y haproxy");
    }
    let broker = TestBroker::start_with(trusting_the_proxy(Limits {
        // A burst of 3 per source and (almost) no refill.
        conn_rate_per_sec: 0.001,
        conn_burst: 3,
        ..Limits::default()
    }))
    .await;
    let (v1, v2, tls_v2) = (
        haproxy::free_port(),
        haproxy::free_port(),
        haproxy::free_port(),
    );
    let sections = [
        backend("v1", v1, broker.tcp_addr, "send-proxy"),
        backend("v2", v2, broker.tcp_addr, "send-proxy-v2"),
        backend("tls_v2", tls_v2, broker.tls_addr, "send-proxy-v2"),
    ]
    .concat();
    let frontends: Vec<SocketAddr> = [v1, v2, tls_v2]
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let _haproxy = HaProxy::start(&sections, &frontends).await;

    for i in 0..3 {
        assert!(
            mosquitto_pub(&broker, v1, "127.0.0.2", &format!("two{i}")).await,
            "connection {i} from 127.0.0.2 through send-proxy"
        );
    }
    assert_eq!(dropped(&broker, "rate_limited").await, 0.0);
    assert!(
        !mosquitto_pub(&broker, v2, "127.0.0.2", "two3").await,
        "127.0.0.2 spent its burst: refused, though through the other frontend"
    );
    assert_eq!(dropped(&broker, "rate_limited").await, 1.0);
    assert!(
        mosquitto_pub(&broker, v2, "127.0.0.3", "three").await,
        "127.0.0.3 has its own allowance behind the same proxy"
    );
    assert_eq!(dropped(&broker, "rate_limited").await, 1.0);

    // A JWT device over TLS through send-proxy-v2, served by a handler.
    let mut handler = broker.handler("proxied-handler").await;
    handler.subscribe("get_contact_list", QoS::AtMostOnce).await;
    let target = e2e::clients::Target {
        addr: frontends[2],
        ca_file: Some(&broker.ca_file),
    };
    let mut device =
        e2e::V5Client::connect(target, "alice-phone", "JWT", &broker.token("alice"), |_| {});
    device.connected().await;
    device
        .subscribe("alice_contact_list", QoS::AtMostOnce)
        .await;
    device
        .client
        .publish("get_contact_list", QoS::AtMostOnce, false, "{}")
        .await
        .expect("queue publish");
    let command = handler.publish_received().await;
    assert_eq!(command.topic, "get_contact_list");
    handler
        .client
        .publish("alice_contact_list", QoS::AtMostOnce, false, "[]")
        .await
        .expect("queue reply");
    assert_eq!(device.publish_received().await.topic, "alice_contact_list");

    for reason in [
        "proxy_header_missing",
        "proxy_header_malformed",
        "proxy_header_untrusted",
        "proxy_header_timeout",
    ] {
        assert_eq!(dropped(&broker, reason).await, 0.0, "{reason}");
    }
    broker.shutdown().await;
}

/// Reads until the broker closes `stream` (at most `within`): what it sent.
async fn answer_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the broker did not close within {within:?}");
    got
}

fn v2_header(command: u8, source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&1883u16.to_be_bytes());
    h
}

#[tokio::test]
async fn hostile_openings_are_refused_counted_and_bounded() {
    let handshake_deadline = Duration::from_secs(1);
    let broker = TestBroker::start_with(trusting_the_proxy(Limits {
        tls_handshake_timeout: handshake_deadline,
        ..TestOptions::default().limits
    }))
    .await;
    let connect = e2e::raw::connect(4, "c", 30, &broker.token("mallory"));
    let quick = Duration::from_secs(3);

    // A stranger choosing its own address, on the plain and TLS listeners.
    for (addr, header) in [
        (
            broker.tcp_addr,
            b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 1883\r\n".to_vec(),
        ),
        (broker.tls_addr, v2_header(1, [203, 0, 113, 9], 4000)),
    ] {
        let mut s = connect_from(STRANGER, addr).await;
        s.write_all(&header).await.unwrap();
        s.write_all(&connect).await.unwrap();
        assert!(answer_until_closed(&mut s, quick).await.is_empty());
    }
    assert_eq!(dropped(&broker, "proxy_header_untrusted").await, 2.0);

    // The trusted proxy without a header: a client's CONNECT straight away.
    let mut s = connect_from(PROXY, broker.tcp_addr).await;
    s.write_all(&connect).await.unwrap();
    assert!(answer_until_closed(&mut s, quick).await.is_empty());
    assert_eq!(dropped(&broker, "proxy_header_missing").await, 1.0);

    // Malformed: a port out of range (v1), a UDP family (v2).
    let mut udp = v2_header(1, [203, 0, 113, 9], 4000);
    udp[13] = 0x12;
    for header in [
        b"PROXY TCP4 203.0.113.9 127.0.0.1 99999 1883\r\n".to_vec(),
        udp,
    ] {
        let mut s = connect_from(PROXY, broker.tcp_addr).await;
        s.write_all(&header).await.unwrap();
        s.write_all(&connect).await.unwrap();
        assert!(answer_until_closed(&mut s, quick).await.is_empty());
    }
    assert_eq!(dropped(&broker, "proxy_header_malformed").await, 2.0);

    // Too long: a v2 length of 65,535 is refused from its first 16 bytes;
    // a v1 line with no end, at its 107th byte.
    let mut huge_v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    huge_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let mut endless_v1 = b"PROXY UNKNOWN ".to_vec();
    endless_v1.extend(std::iter::repeat_n(b'x', 200));
    for header in [huge_v2, endless_v1] {
        let mut s = connect_from(PROXY, broker.tls_addr).await;
        s.write_all(&header).await.unwrap();
        assert!(answer_until_closed(&mut s, quick).await.is_empty());
    }
    assert_eq!(dropped(&broker, "proxy_header_too_long").await, 2.0);

    // A header that never ends: closed at the handshake deadline.
    let started = tokio::time::Instant::now();
    let mut s = connect_from(PROXY, broker.tls_addr).await;
    s.write_all(b"PROXY TCP4 203.0.113.9 ").await.unwrap();
    assert!(answer_until_closed(&mut s, handshake_deadline * 4)
        .await
        .is_empty());
    let took = started.elapsed();
    assert!(
        took >= handshake_deadline && took < handshake_deadline * 4,
        "{took:?}"
    );
    assert_eq!(dropped(&broker, "proxy_header_timeout").await, 1.0);

    // The proxy's well-formed headers are served: a client's (v1, the
    // CONNECT in the same segment), and a v2 LOCAL (a health check) as
    // the proxy's own connection.
    for header in [
        b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 1883\r\n".to_vec(),
        v2_header(0, [0; 4], 0),
    ] {
        let mut s = connect_from(PROXY, broker.tcp_addr).await;
        let mut opening = header;
        opening.extend_from_slice(&connect);
        s.write_all(&opening).await.unwrap();
        let mut connack = [0u8; 4];
        tokio::time::timeout(quick, s.read_exact(&mut connack))
            .await
            .expect("CONNACK in time")
            .unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
    }

    broker.assert_still_serving().await;
    broker.shutdown().await;
}
