//! A persistent session's cursor and replays across nodes, on a real Redis
//! Cluster (3 masters, 3 replicas on loopback), every node a process of
//! its own, real MQTT 5 clients:
//! - out of order: a paho-mqtt device (manual acknowledgements) on node A
//!   acknowledges reply 2 and not reply 1; node A is killed (`kill -9`);
//!   the device resumes on node B and gets reply 1 again (the cursor is
//!   the end of what it acknowledged without a gap, never the largest id);
//! - no duplicates for the others: a user with two devices on node B (one
//!   persistent, served by the router; one clean, served by the gate's
//!   inbox) while a third device of the user resumes on node B from node
//!   A: the replay is for the resuming session alone, the other two get
//!   each reply once;
//! - a reply too large for the device's Maximum Packet Size is not
//!   written and does not hold its cursor back;
//! - a QoS 2 reply from a handler on the device's own node is tracked
//!   like any other: never completed (no PUBCOMP) while a later reply was
//!   written, it is owed on node B after node A is killed.

mod nodes;

use e2e::clients::V5Client;
use nodes::{
    handler, next, persistent_phone as phone, probe, reply, token, Node, Process, ANSWER_WITHIN,
};
use rumqttc::v5::mqttbytes::v5::{Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::RedisCluster;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A persistent MQTT 5 device (paho-mqtt 2, manual acknowledgements):
/// subscribes to its topic at QoS `qos`, prints each publish it gets, and
/// acknowledges only the payloads listed in `ack` (QoS 2: paho sends the
/// PUBREC itself, and the PUBCOMP only when acknowledged). Clean Start on its
/// first connection only (paho's default): the router closes a connection
/// whose PUBACK is not for its oldest publish in flight, and paho
/// reconnects to the session.
const CHOOSY_DEVICE: &str = r#"
import sys
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
host, port, client_id, token, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ack = set(sys.argv[6].split(","))
qos = int(sys.argv[7])
def on_connect(client, userdata, flags, reason, properties):
    print("connected", int(reason.value), flush=True)
    client.subscribe(topic, qos=qos)
def on_subscribe(client, userdata, mid, reasons, properties):
    print("subscribed", [int(r.value) for r in reasons], flush=True)
def on_message(client, userdata, message):
    payload = message.payload.decode(errors="replace")
    print("got", payload, flush=True)
    if payload in ack:
        client.ack(message.mid, message.qos)
        print("acked", payload, flush=True)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                     protocol=mqtt.MQTTv5, manual_ack=True)
client.username_pw_set("JWT", token)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
connect = Properties(PacketTypes.CONNECT)
connect.SessionExpiryInterval = 600
client.connect(host, port, properties=connect)
client.loop_forever()
"#;

fn choosy_device(
    node: &Node,
    dir: &std::path::Path,
    client: &str,
    uid: &str,
    topic: &str,
    ack: &str,
    qos: u8,
) -> Process {
    let log = dir.join(format!("{client}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("python3")
        .args(["-c", CHOOSY_DEVICE])
        .arg(node.tcp.ip().to_string())
        .arg(node.tcp.port().to_string())
        .arg(client)
        .arg(token(uid))
        .arg(topic)
        .arg(ack)
        .arg(qos.to_string())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("python3 with paho-mqtt 2.x (.ci/run installs it)");
    Process { child, log }
}

/// Waits until `process`'s log satisfies `done`.
async fn wait_for(process: &Process, what: &str, within: Duration, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let text = process.log_text();
        if done(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}; its log:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until node A listens on the user's shard: `worker` sends probes until
/// the device acknowledged one.
async fn probe_until_acknowledged(device: &Process, worker: &V5Client, topic: &str) {
    let deadline = Instant::now() + ANSWER_WITHIN * 3;
    while !device.log_text().contains("acked probe") {
        assert!(
            Instant::now() < deadline,
            "no probe arrived:\n{}",
            device.log_text()
        );
        reply(worker, topic, "probe".into()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Device session `client` of `uid` resumes on `node` (Session Present
/// 1): the payloads it gets until reply `1` (or the deadline).
async fn resume_until_reply_1(node: &Node, uid: &str, client: &str) -> Vec<String> {
    let mut resumed = phone(node, uid, client, false, 600);
    let ack = resumed.connected().await;
    assert!(
        ack.session_present,
        "Session Present 1:\n{}",
        node.log_text()
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !got.iter().any(|p: &String| p == "1") && Instant::now() < deadline {
        if let Some(p) = next(&mut resumed, Duration::from_millis(200)).await {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_acknowledged_out_of_order_is_owed_after_the_node_dies() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let mut node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7301";
    let topic = format!("{uid}_note");
    let dir = tempfile::tempdir().unwrap();

    let device = choosy_device(&node_a, dir.path(), "phone-7301", uid, &topic, "probe,2", 1);
    wait_for(&device, "the device subscribed", ANSWER_WITHIN, |log| {
        log.contains("subscribed [1]")
    })
    .await;
    let worker = handler(&node_b, "worker-b");
    probe_until_acknowledged(&device, &worker, &topic).await;

    reply(&worker, &topic, "1".into()).await;
    reply(&worker, &topic, "2".into()).await;
    wait_for(&device, "reply 2 acknowledged", ANSWER_WITHIN, |log| {
        log.contains("got 1") && log.contains("acked 2")
    })
    .await;
    // Node A writes a session's record within 50 ms of a change: give the
    // acknowledgement of 2 time to reach the record before the kill.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    node_a.process.kill9();
    drop(device);

    let got = resume_until_reply_1(&node_b, uid, "phone-7301").await;
    println!("resumed on node B after reply 2 alone was acknowledged on node A: got {got:?}");
    assert!(
        got.iter().any(|p| p == "1"),
        "reply 1, never acknowledged, is owed: got {got:?}\nnode B:\n{}",
        node_b.log_text()
    );
    assert!(
        !got.iter().any(|p| p == "probe"),
        "the probe was acknowledged: {got:?}"
    );
}

/// Per device, how many times each payload arrived.
type Counts = HashMap<&'static str, HashMap<String, u32>>;

/// Counts `p` for device `name`: false when nothing came.
fn count(counts: &mut Counts, name: &'static str, p: Option<Publish>) -> bool {
    let Some(p) = p else {
        return false;
    };
    *counts
        .entry(name)
        .or_default()
        .entry(String::from_utf8_lossy(&p.payload).into_owned())
        .or_default() += 1;
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reaches_the_resuming_session_alone() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7302";
    let topic = format!("{uid}_note");
    let worker = handler(&node_b, "worker-b");

    // The other devices of the user on node B: a persistent one (the
    // router serves it) and a clean one (the gate's inbox serves it).
    let mut tablet = phone(&node_b, uid, "tablet-7302", false, 600);
    tablet.connected().await;
    let mut watch = phone(&node_b, uid, "watch-7302", true, 0);
    watch.connected().await;
    let mut on_a = phone(&node_a, uid, "phone-7302", false, 600);
    on_a.connected().await;
    for client in [&mut tablet, &mut watch, &mut on_a] {
        assert_eq!(
            client.subscribe(&topic, QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
    }
    probe(&mut on_a, &worker, &topic).await;
    while next(&mut tablet, Duration::from_millis(300))
        .await
        .is_some()
    {}
    while next(&mut watch, Duration::from_millis(300)).await.is_some() {}

    // Replies 0..5 reach all three; the phone leaves; 5..10 reach the
    // tablet and the watch; the phone resumes on node B, where its replay
    // (5..10) is for it alone; 10..15 reach all three.
    let mut counts: Counts = HashMap::new();
    for i in 0..5 {
        reply(&worker, &topic, i.to_string()).await;
    }
    while count(
        &mut counts,
        "phone",
        next(&mut on_a, Duration::from_millis(500)).await,
    ) {}
    on_a.client.disconnect().await.unwrap();
    on_a.closed().await;
    for i in 5..10 {
        reply(&worker, &topic, i.to_string()).await;
    }
    while count(
        &mut counts,
        "tablet",
        next(&mut tablet, Duration::from_millis(500)).await,
    ) {}
    while count(
        &mut counts,
        "watch",
        next(&mut watch, Duration::from_millis(500)).await,
    ) {}

    let mut on_b = phone(&node_b, uid, "phone-7302", false, 600);
    let ack = on_b.connected().await;
    assert!(
        ack.session_present,
        "Session Present 1:\n{}",
        node_b.log_text()
    );
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !counts.get("phone").is_some_and(|c| c.contains_key("9")) && Instant::now() < deadline {
        count(
            &mut counts,
            "phone",
            next(&mut on_b, Duration::from_millis(200)).await,
        );
    }
    for i in 10..15 {
        reply(&worker, &topic, i.to_string()).await;
    }
    while count(
        &mut counts,
        "phone",
        next(&mut on_b, Duration::from_millis(700)).await,
    ) {}
    while count(
        &mut counts,
        "tablet",
        next(&mut tablet, Duration::from_millis(500)).await,
    ) {}
    while count(
        &mut counts,
        "watch",
        next(&mut watch, Duration::from_millis(500)).await,
    ) {}

    println!("replies received per device (payload -> times): {counts:?}");
    for name in ["phone", "tablet", "watch"] {
        let got = counts.get(name).cloned().unwrap_or_default();
        for i in 0..15 {
            let n = got.get(&i.to_string()).copied().unwrap_or(0);
            if name == "phone" {
                assert!(n >= 1, "the phone missed reply {i}: {got:?}");
            } else {
                assert_eq!(
                    n,
                    1,
                    "{name} got reply {i} {n} times: {got:?}\nnode B:\n{}",
                    node_b.log_text()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_large_for_the_device_does_not_hold_its_cursor() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7303";
    let topic = format!("{uid}_note");
    let worker = handler(&node_b, "worker-b");

    // A persistent device that takes no packet over 512 bytes.
    let mut on_a = V5Client::connect(node_a.target(), "phone-7303", "JWT", &token(uid), |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
        o.set_max_packet_size(Some(512));
    });
    on_a.connected().await;
    assert_eq!(
        on_a.subscribe(&topic, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    probe(&mut on_a, &worker, &topic).await;
    reply(&worker, &topic, "x".repeat(2000)).await;
    reply(&worker, &topic, "after".into()).await;
    let got = next(&mut on_a, ANSWER_WITHIN).await.expect("a reply");
    assert_eq!(&got.payload[..], b"after", "the large one is not written");

    // The record's cursor reaches the last reply: the one not written
    // (reported skipped) does not hold it back.
    let stream = format!("r:{{{uid}}}");
    let record = format!("p:{{{uid}}}:phone-7303");
    let master = cluster.master_of_key(&stream);
    let last = match cluster.query(master, &["XREVRANGE", &stream, "+", "-", "COUNT", "1"]) {
        Ok(redis::Value::Array(entries)) => match entries.first() {
            Some(redis::Value::Array(entry)) => match entry.first() {
                Some(redis::Value::BulkString(id)) => String::from_utf8_lossy(id).into_owned(),
                other => panic!("an entry id: {other:?}"),
            },
            other => panic!("an entry: {other:?}"),
        },
        other => panic!("the user's stream: {other:?}"),
    };
    let deadline = Instant::now() + ANSWER_WITHIN;
    loop {
        let cursor = cluster
            .query_text(master, &["HGET", &record, "cursor"])
            .unwrap_or_default();
        if cursor == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record's cursor {cursor} never reached the last reply {last}\nnode A:\n{}",
            node_a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A QoS 2 reply from a handler on the device's own node goes through the
/// stream like a QoS 1 one, so the device's cursor waits for its PUBCOMP:
/// reply 1 (QoS 2) never completed, reply 2 (QoS 0) written, node A
/// killed; the device resumes on node B and gets reply 1. Before, the
/// router had the QoS 2 reply from its sender untracked, and the cursor
/// passed it when reply 2 was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_node_qos2_reply_never_completed_is_owed_after_the_node_dies() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let mut node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7304";
    let topic = format!("{uid}_note");
    let dir = tempfile::tempdir().unwrap();

    let device = choosy_device(&node_a, dir.path(), "phone-7304", uid, &topic, "probe", 2);
    wait_for(&device, "the device subscribed", ANSWER_WITHIN, |log| {
        log.contains("subscribed [2]")
    })
    .await;
    // On the device's own node.
    let worker = handler(&node_a, "worker-a");
    probe_until_acknowledged(&device, &worker, &topic).await;

    worker
        .client
        .publish(&topic, QoS::ExactlyOnce, false, "1")
        .await
        .unwrap();
    wait_for(&device, "reply 1 released", ANSWER_WITHIN, |log| {
        log.contains("got 1")
    })
    .await;
    // A QoS 0 reply is done once written, while reply 1 waits for its
    // PUBCOMP (a QoS 1 PUBACK would be out of order: the router closes
    // the connection).
    worker
        .client
        .publish(&topic, QoS::AtMostOnce, false, "2")
        .await
        .unwrap();
    wait_for(&device, "reply 2 written", ANSWER_WITHIN, |log| {
        log.contains("got 2")
    })
    .await;
    // Node A writes a session's record within 50 ms of a change.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    node_a.process.kill9();
    drop(device);

    let got = resume_until_reply_1(&node_b, uid, "phone-7304").await;
    println!(
        "resumed on node B after the QoS 2 reply 1 was never completed on node A: got {got:?}"
    );
    assert!(
        got.iter().any(|p| p == "1"),
        "reply 1, never completed, is owed: got {got:?}\nnode B:\n{}",
        node_b.log_text()
    );
    assert!(
        !got.iter().any(|p| p == "probe"),
        "the probe was acknowledged: {got:?}"
    );
}
