//! MQTT over WebSocket (`BROKER_WS_LISTEN`, `BROKER_WSS_LISTEN`) with
//! clients we did not write: MQTT.js under Node and paho-mqtt (Python,
//! `transport="websockets"`) over `ws://` and `wss://`, MQTT 3.1.1 and 5, a
//! JWT device getting a handler's reply; tokio-tungstenite's client
//! splitting one packet over several messages and putting several packets
//! in one; a raw client fragmenting one message into frames with a ping
//! between them. The hostile cases are in `websocket_hostile.rs`.
//!
//! Debian's `mosquitto_pub`/`mosquitto_sub` (2.0.11) are built without
//! WebSocket support (`mosquitto_sub --help` lists no websockets
//! transport), so paho-mqtt is the second foreign client.

use e2e::ws::{
    contains, frame, raw_upgrade, read_frame, read_until, ws_client, OP_BINARY, OP_CONTINUATION,
    OP_PING, OP_PONG, WAIT,
};
use e2e::TestBroker;
use futures::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::QoS;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

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

#[tokio::test]
async fn paho_over_ws_and_wss_with_mqtt_311_and_5_gets_a_handlers_reply() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/paho_device.py");
    let broker = TestBroker::start().await;
    let mut handler = broker.handler("paho-ws-handler").await;
    handler
        .subscribe("get_contact_list", QoS::AtLeastOnce)
        .await;
    for (tls, addr) in [(false, broker.ws_addr), (true, broker.wss_addr)] {
        for version in ["311", "5"] {
            let uid = format!("paho{}{version}", if tls { "wss" } else { "ws" });
            let mut paho = tokio::process::Command::new("python3");
            paho.env("PYTHONUNBUFFERED", "1")
                .arg(&script)
                .args(["--transport", "websockets", "--ws-path", "/mqtt"])
                .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
                .args(["--username", "JWT", "--password", &broker.token(&uid)])
                .args(["--client-id", &format!("{uid}-paho")])
                .args(["--protocol", version])
                .args(["--topics", &format!("{uid}_contact_list")])
                .args(["--publish", "get_contact_list", "{}"])
                .args(["--expect", "1"])
                .kill_on_drop(true);
            if tls {
                paho.arg("--cafile").arg(&broker.ca_file);
            } else {
                paho.arg("--no-tls");
            }
            let run = tokio::spawn(paho.output());
            let answered = tokio::time::timeout(WAIT, answer_one(&mut handler)).await;
            let output = tokio::time::timeout(WAIT * 2, run)
                .await
                .expect("paho finishes")
                .unwrap()
                .expect("python3 runs");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let case = format!("paho tls={tls} v{version}");
            assert!(
                output.status.success(),
                "{case}: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(answered.expect("the handler got the command"), uid);
            let lines: Vec<serde_json::Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let message = lines
                .iter()
                .find(|l| l["event"] == "message")
                .unwrap_or_else(|| panic!("{case}: no message: {stdout}"));
            assert_eq!(message["topic"], format!("{uid}_contact_list"), "{case}");
            assert_eq!(message["payload"], "[\"carol\"]", "{case}");
            assert!(
                lines.iter().any(|l| l["event"] == "done"),
                "{case}: {stdout}"
            );
        }
    }
    broker.shutdown().await;
}

/// One message in several frames (RFC 6455 fragmentation: a binary frame
/// without FIN, then continuation frames), with a ping between fragments
/// (control frames may come between them): the CONNECT is read whole and
/// the ping is answered with its pong; then two PINGREQs in one frame get
/// two PINGRESPs.
#[tokio::test]
async fn one_packet_in_fragments_with_a_ping_between_them() {
    let broker = TestBroker::start().await;
    let mut s = raw_upgrade(broker.ws_addr).await;
    let connect = e2e::raw::connect(5, "frag", 30, &broker.token("frag"));
    let mut bytes = frame(false, OP_BINARY, &connect[..3]);
    bytes.extend(frame(true, OP_PING, b"mid-message"));
    bytes.extend(frame(false, OP_CONTINUATION, &connect[3..10]));
    // The last fragment a byte at a time over TCP as well.
    s.write_all(&bytes).await.unwrap();
    for byte in frame(true, OP_CONTINUATION, &connect[10..]) {
        s.write_all(&[byte]).await.unwrap();
        s.flush().await.unwrap();
    }
    let mut pong = None;
    let mut mqtt = Vec::new();
    while pong.is_none() || mqtt.len() < 2 {
        match read_frame(&mut s).await.expect("the broker answers") {
            (OP_PONG, data) => pong = Some(data),
            (OP_BINARY, data) => mqtt.extend(data),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(pong.as_deref(), Some(&b"mid-message"[..]));
    assert_eq!(mqtt[0], 0x20, "CONNACK: {mqtt:?}");
    let connack_len = 2 + usize::from(mqtt[1]);
    while mqtt.len() < connack_len {
        let (op, data) = read_frame(&mut s).await.expect("the rest of the CONNACK");
        assert_eq!(op, OP_BINARY);
        mqtt.extend(data);
    }
    assert_eq!(mqtt[3], 0, "accepted: {mqtt:?}");
    mqtt.drain(..connack_len);

    s.write_all(&frame(true, OP_BINARY, &[0xC0, 0, 0xC0, 0]))
        .await
        .unwrap();
    while mqtt.len() < 4 {
        let (op, data) = read_frame(&mut s).await.expect("PINGRESPs");
        assert_eq!(op, OP_BINARY);
        mqtt.extend(data);
    }
    assert_eq!(mqtt, [0xD0, 0, 0xD0, 0], "two PINGRESPs");
    broker.shutdown().await;
}
