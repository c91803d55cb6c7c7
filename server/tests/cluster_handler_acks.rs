//! Commands are acknowledged in Redis (`XACK`) only once a handler
//! acknowledged them, on a real Redis Cluster (3 masters, 3 replicas) with
//! every node and handler a process of its own: a handler that takes
//! commands and never acknowledges them (a paho-mqtt client with manual
//! acknowledgements) is killed (`kill -9`) while its node lives on; the
//! commands stay pending in the group, and a handler of the same `$share`
//! group on another node answers every one once they are idle
//! (`XAUTOCLAIM`), after which nothing is pending.

mod nodes;

use nodes::{device, next_publish, send, start_handler, Node, Process, HANDLER_KEY};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::RedisCluster;

/// Taken over after 15 s idle, looked for every 5 s
/// (`cluster::commands::{CLAIM_IDLE, CLAIM_EVERY}`), then answered across
/// two nodes.
const RECLAIMED_WITHIN: Duration = Duration::from_secs(15 + 5 + 10);

/// A handler that subscribes to a filter at QoS 1 and prints every
/// command it gets, never acknowledging one (paho-mqtt 2, manual acks).
const STUCK_HANDLER: &str = r#"
import sys
import paho.mqtt.client as mqtt
host, port, key, filt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(filt, qos=1)
def on_subscribe(client, userdata, mid, reasons, properties):
    print("subscribed", [int(r.value) for r in reasons], flush=True)
def on_message(client, userdata, message):
    print("got", message.topic, message.payload.decode(errors="replace"), flush=True)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stuck-handler",
                     protocol=mqtt.MQTTv5, manual_ack=True)
client.username_pw_set("handler", key)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, port)
client.loop_forever()
"#;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn stuck_handler(node: &Node, filter: &str, dir: &std::path::Path) -> Process {
    let log = dir.join("stuck-handler.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("python3")
        .args(["-c", STUCK_HANDLER])
        .arg(node.tcp.ip().to_string())
        .arg(node.tcp.port().to_string())
        .arg(HANDLER_KEY)
        .arg(filter)
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Entries read and not acknowledged in the group, over every partition.
fn pending(cluster: &RedisCluster, topic: &str, group: &str) -> i64 {
    (0..4)
        .map(|p| {
            let key = format!("c:{{{topic}:{p}}}");
            let master = cluster.master_of_key(&key);
            match cluster.query(master, &["XPENDING", &key, group]) {
                Ok(redis::Value::Array(parts)) => match parts.first() {
                    Some(redis::Value::Int(n)) => *n,
                    _ => 0,
                },
                _ => 0,
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_a_killed_handler_never_acknowledged_are_answered_by_its_group() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let node_c = Node::start("node-c", &url, false, none);
    let data = tempfile::tempdir().unwrap();

    let stuck = stuck_handler(&node_b, "$share/contacts/get_contact_list", data.path());
    wait_for(
        &stuck,
        "the stuck handler subscribed",
        nodes::START_WITHIN,
        |log| log.contains("subscribed [1]"),
    )
    .await;

    // Once node B's readers are in the group (asynchronously after the
    // SUBSCRIBE; a command appended before is read by no group), a probe
    // reaches the stuck handler.
    let uids: Vec<String> = (0..12).map(|n| format!("92{n:02}")).collect();
    let mut phones = Vec::new();
    for uid in &uids {
        phones.push(device(&node_a, uid, &["contact_list"]).await);
    }
    let deadline = Instant::now() + nodes::START_WITHIN;
    while !stuck.log_text().contains("\"warmup\"") {
        assert!(
            Instant::now() < deadline,
            "no command reached the stuck handler:\n{}",
            node_b.log_text()
        );
        send(&phones[0], "get_contact_list", json!({"warmup": 1})).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let warmups = stuck.log_text().matches("\"warmup\"").count();

    // Each device sends one command; the stuck handler gets every one
    // (users spread over the partitions) and acknowledges none.
    for (uid, phone) in uids.iter().zip(&phones) {
        send(phone, "get_contact_list", json!({"probe": uid})).await;
    }
    wait_for(
        &stuck,
        "the stuck handler got every command",
        Duration::from_secs(15),
        |log| {
            uids.iter()
                .all(|uid| log.contains(&format!("\"probe\":\"{uid}\"")))
        },
    )
    .await;
    // Node B's router took them and wrote them to the handler: they stay
    // pending in Redis (before, they were acknowledged at that point and
    // lost with the handler).
    let held = pending(&cluster, "get_contact_list", "s:contacts");
    assert!(
        held >= uids.len() as i64,
        "{held} pending for {} commands the handler never acknowledged",
        uids.len()
    );

    // The handler dies; node B lives on. A handler of the same group on
    // node C answers every command once it is idle long enough.
    let mut stuck = stuck;
    stuck.kill9();
    let killed = Instant::now();
    let _contacts = start_handler("contacts-handler", &node_c, &url, data.path(), none);
    let mut answered = 0;
    for (uid, phone) in uids.iter().zip(phones.iter_mut()) {
        let left = RECLAIMED_WITHIN.saturating_sub(killed.elapsed());
        let got = next_publish(phone, left).await;
        let (topic, payload) = got.unwrap_or_else(|| {
            panic!(
                "{uid} got no answer within {RECLAIMED_WITHIN:?} of the kill ({answered} did):\n{}",
                node_c.log_text()
            )
        });
        assert_eq!(topic, format!("{uid}_contact_list"));
        let body: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(body, json!({"contacts": []}));
        answered += 1;
    }
    println!(
        "{answered} commands (and {warmups} warm-up probes) a killed handler held were answered {:?} after the kill",
        killed.elapsed()
    );
    assert!(node_c
        .log_text()
        .contains("took over commands another consumer left unacknowledged"));

    // The answering handler's PUBACKs acknowledged them: nothing pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = pending(&cluster, "get_contact_list", "s:contacts");
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} still pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(node_b);
}
