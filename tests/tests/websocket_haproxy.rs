//! MQTT over WebSocket behind a real HTTP proxy: Debian's HAProxy in
//! `mode http` with `option forwardfor`, configured with the README's block
//! (read from README.md, only its two addresses changed), in front of the
//! broker's plain WebSocket listener. The broker trusts HAProxy's address
//! (127.0.0.1, from which it connects to the broker); WebSocket MQTT
//! clients from 127.0.0.2 and 127.0.0.3 connect through it, and the
//! per-source admission applies to the address in `X-Forwarded-For`.

use broker::config::Limits;
use e2e::haproxy::{self, connect_from, HaProxy};
use e2e::ws::{dropped, read_until};
use e2e::{TestBroker, TestOptions};
use futures::SinkExt;
use std::net::SocketAddr;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error, Message};

const README: &str = include_str!("../../README.md");

/// The README's HAProxy `mode http` block for MQTT over WebSocket, with its
/// frontend bound to `frontend` and its server at `broker`.
fn readme_config(frontend: SocketAddr, broker: SocketAddr) -> String {
    let start = README
        .find("```\nfrontend mqtt_ws\n")
        .expect("README.md has the HAProxy mode http block")
        + "```\n".len();
    let len = README[start..].find("```").expect("the block ends");
    let block = &README[start..start + len];
    for original in ["  bind :80\n", "  server broker 10.0.0.11:8083\n"] {
        assert_eq!(
            block.matches(original).count(),
            1,
            "{original:?} in {block}"
        );
    }
    block
        .replace("  bind :80\n", &format!("  bind {frontend}\n"))
        .replace(
            "  server broker 10.0.0.11:8083\n",
            &format!("  server broker {broker}\n"),
        )
}

/// A WebSocket MQTT client from `source` through HAProxy at `proxy`: the
/// upgrade, then an MQTT 3.1.1 CONNECT as `uid` with its JWT. `Ok` with the CONNACK's
/// first four bytes, or the HTTP status the upgrade was refused with.
async fn mqtt_over_ws_from(
    source: [u8; 4],
    proxy: SocketAddr,
    broker: &TestBroker,
    uid: &str,
) -> Result<Vec<u8>, u16> {
    let stream = connect_from(source, proxy).await;
    let mut request = format!("ws://127.0.0.1:{}/mqtt", proxy.port())
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let upgrade = tokio::time::timeout(
        e2e::ws::WAIT,
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("the upgrade is answered in time");
    let mut ws = match upgrade {
        Ok((ws, _)) => ws,
        Err(Error::Http(response)) => return Err(response.status().as_u16()),
        Err(e) => panic!("upgrade through haproxy from {source:?}: {e}"),
    };
    ws.send(Message::Binary(
        e2e::raw::connect(4, uid, 30, &broker.token(uid)).into(),
    ))
    .await
    .expect("send CONNECT");
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, |b| b.len() >= 4).await;
    Ok(got[..4].to_vec())
}

/// A burst of 2 per source: two clients from 127.0.0.2 through HAProxy are
/// served; a third from 127.0.0.2 is refused by the broker (HTTP 503,
/// counted `rate_limited`), while 127.0.0.3 through the same HAProxy is
/// served. Without the forwarded address all four would be HAProxy's
/// (127.0.0.1) and the fourth refused too.
#[tokio::test]
async fn haproxy_mode_http_forwards_the_client_address_to_admission() {
    if haproxy::binary().is_none() {
        panic!("haproxy is not installed: apt-get install -y haproxy");
    }
    let broker = TestBroker::start_with(TestOptions {
        limits: Limits {
            trusted_proxies: "127.0.0.1/32".parse().expect("CIDR"),
            conn_rate_per_sec: 0.001,
            conn_burst: 2,
            ..Limits::default()
        },
        ..TestOptions::default()
    })
    .await;
    let frontend = SocketAddr::from(([127, 0, 0, 1], haproxy::free_port()));
    let config = readme_config(frontend, broker.ws_addr);
    let _haproxy = HaProxy::start(&config, &[frontend]).await;

    let accepted = vec![0x20, 2, 0, 0];
    for i in 0..2 {
        assert_eq!(
            mqtt_over_ws_from([127, 0, 0, 2], frontend, &broker, &format!("two{i}")).await,
            Ok(accepted.clone()),
            "connection {i} from 127.0.0.2"
        );
    }
    assert_eq!(dropped(&broker, "rate_limited").await, 0.0);
    assert_eq!(
        mqtt_over_ws_from([127, 0, 0, 2], frontend, &broker, "two2").await,
        Err(503),
        "127.0.0.2 spent its burst"
    );
    assert_eq!(
        dropped(&broker, "rate_limited").await,
        1.0,
        "the 503 is the broker's admission, not HAProxy's"
    );
    assert_eq!(
        mqtt_over_ws_from([127, 0, 0, 3], frontend, &broker, "three").await,
        Ok(accepted),
        "127.0.0.3 has its own allowance behind the same HAProxy"
    );
    assert_eq!(dropped(&broker, "rate_limited").await, 1.0);
    assert_eq!(dropped(&broker, "ws_bad_forwarded_for").await, 0.0);
    broker.shutdown().await;
}
