//! How the router's `$share` groups get commands, end to end with the
//! built `broker` binary, real MQTT clients and, with Redis, a real
//! `redis-server`:
//!
//! - Two handler groups of one command topic on ONE node (each group reads
//!   its own Redis consumer group, and the node injects each entry for that
//!   group's subscription alone, `mqtt_router::Audience`): each group
//!   receives each command exactly once (before, each also got the other
//!   group's copy). The same with the groups on two nodes.
//! - One node without Redis: a paho-mqtt handler (clean session, manual
//!   acknowledgements) takes QoS 1 commands, never acknowledges them, and is
//!   killed with `kill -9`; an rumqttc handler of the same group gets every
//!   one, whether it joins after the kill (the group was kept for it) or
//!   was a member all along (before, the router dropped them with the clean
//!   session).

mod nodes;

use e2e::clients::V5Client;
use nodes::{device, handler, next, send, Node, Process, HANDLER_KEY, START_WITHIN};
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::RedisServer;

/// Commands each test sends.
const N: usize = 20;

/// A handler in group `group` of command `sync` on `node` (QoS 1; rumqttc
/// acknowledges each command as it arrives).
async fn group_handler(node: &Node, name: &str, group: &str) -> V5Client {
    let mut client = handler(node, name);
    client.connected().await;
    assert_eq!(
        client
            .subscribe(&format!("$share/{group}/sync"), QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    client
}

/// The payloads of the publishes `client` gets until none comes for `quiet`.
async fn drain(client: &mut V5Client, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(publish) = next(client, quiet).await {
        got.push(String::from_utf8_lossy(&publish.payload).into_owned());
    }
    got
}

/// How many times each payload was received.
fn counts(payloads: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for p in payloads {
        *counts.entry(p.clone()).or_default() += 1;
    }
    counts
}

/// The command bodies the tests send: `{"n": i}`, as the handler sees them.
fn body(i: usize) -> String {
    json!({ "n": i }).to_string()
}

/// Probes `sync` from `phone` until every handler got one (each group's
/// readers join their consumer group asynchronously after the SUBSCRIBE; a
/// command appended before is read by no group), then lets stray probes
/// arrive and drops them.
async fn warm_up(phone: &V5Client, handlers: &mut [&mut V5Client]) {
    let deadline = Instant::now() + START_WITHIN;
    let mut reached = vec![false; handlers.len()];
    while reached.iter().any(|r| !r) {
        assert!(
            Instant::now() < deadline,
            "the groups never got a probe: {reached:?}"
        );
        send(phone, "sync", json!({"warmup": 1})).await;
        for (i, h) in handlers.iter_mut().enumerate() {
            if next(h, Duration::from_millis(300)).await.is_some() {
                reached[i] = true;
            }
        }
    }
    for h in handlers.iter_mut() {
        drain(h, Duration::from_millis(1500)).await;
    }
}

/// Sends the `N` commands and checks that each handler (one per group)
/// receives each exactly once.
async fn each_group_gets_each_command_once(phone: &V5Client, groups: &mut [&mut V5Client]) {
    for i in 0..N {
        send(phone, "sync", json!({ "n": i })).await;
    }
    let expected: BTreeMap<String, usize> = (0..N).map(|i| (body(i), 1)).collect();
    for (g, h) in groups.iter_mut().enumerate() {
        // Every command, then a quiet period in which a duplicate would
        // show.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while counts(&got).len() < N && Instant::now() < deadline {
            got.extend(drain(h, Duration::from_millis(500)).await);
        }
        got.extend(drain(h, Duration::from_secs(2)).await);
        assert_eq!(counts(&got), expected, "group {g}: {} received", got.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_one_node_each_get_each_command_once() {
    let redis = RedisServer::start();
    let node = Node::start("node-a", &redis.url(), false, "http://127.0.0.1:9/none");
    let mut a = group_handler(&node, "worker-a", "ga").await;
    let mut b = group_handler(&node, "worker-b", "gb").await;
    let phone = device(&node, "7301", &[]).await;
    warm_up(&phone, &mut [&mut a, &mut b]).await;
    each_group_gets_each_command_once(&phone, &mut [&mut a, &mut b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_two_nodes_each_get_each_command_once() {
    let redis = RedisServer::start();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &redis.url(), false, none);
    let node_b = Node::start("node-b", &redis.url(), false, none);
    let mut a = group_handler(&node_a, "worker-a", "ga").await;
    let mut b = group_handler(&node_b, "worker-b", "gb").await;
    let phone = device(&node_a, "7302", &[]).await;
    warm_up(&phone, &mut [&mut a, &mut b]).await;
    each_group_gets_each_command_once(&phone, &mut [&mut a, &mut b]).await;
}

/// A handler that subscribes to a filter at QoS 1 and prints every
/// command it gets, never acknowledging one (paho-mqtt 2, MQTT 5 with a
/// clean start and no session expiry: a clean session; manual acks).
const STUCK_HANDLER: &str = r#"
import sys
import paho.mqtt.client as mqtt
host, port, key, filt, cid = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(filt, qos=1)
def on_subscribe(client, userdata, mid, reasons, properties):
    print("subscribed", [int(r.value) for r in reasons], flush=True)
def on_message(client, userdata, message):
    print("got", message.topic, message.payload.decode(errors="replace"), flush=True)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                     protocol=mqtt.MQTTv5, manual_ack=True)
client.username_pw_set("handler", key)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, port, clean_start=True)
client.loop_forever()
"#;

fn stuck_handler(node: &Node, client_id: &str, dir: &std::path::Path) -> Process {
    let log = dir.join(format!("{client_id}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("python3")
        .args(["-c", STUCK_HANDLER])
        .arg(node.tcp.ip().to_string())
        .arg(node.tcp.port().to_string())
        .arg(HANDLER_KEY)
        .arg("$share/g/sync")
        .arg(client_id)
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("python3 with paho-mqtt 2.x (.ci/run installs it)");
    Process { child, log }
}

/// The command bodies in a stuck handler's log.
fn stuck_got(process: &Process) -> Vec<String> {
    process
        .log_text()
        .lines()
        .filter_map(|line| line.strip_prefix("got sync "))
        .map(str::to_owned)
        .collect()
}

async fn wait_for(process: &Process, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        let text = process.log_text();
        if done(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}; its log:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_a_killed_clean_handler_held_reach_its_group_on_one_node() {
    let node = Node::start_alone("alone");
    let data = tempfile::tempdir().unwrap();
    let phone = device(&node, "7303", &[]).await;

    // The only member takes N commands and acknowledges none; it dies.
    let mut stuck = stuck_handler(&node, "stuck-1", data.path());
    wait_for(&stuck, "the stuck handler subscribed", |log| {
        log.contains("subscribed [1]")
    })
    .await;
    for i in 0..N {
        send(&phone, "sync", json!({ "n": i })).await;
    }
    wait_for(&stuck, "the stuck handler got every command", |_| {
        stuck_got(&stuck).len() >= N
    })
    .await;
    stuck.kill9();

    // A handler that joins the group afterwards gets every one, once.
    let mut late = group_handler(&node, "worker-late", "g").await;
    let got = drain(&mut late, Duration::from_secs(3)).await;
    let expected: BTreeMap<String, usize> = (0..N).map(|i| (body(i), 1)).collect();
    assert_eq!(counts(&got), expected, "{}", node.log_text());

    // Two members: the stuck one takes its share of 2N commands (round
    // robin), the other acknowledges its own. The stuck one dies: the
    // other gets what it held.
    let mut stuck = stuck_handler(&node, "stuck-2", data.path());
    wait_for(&stuck, "the second stuck handler subscribed", |log| {
        log.contains("subscribed [1]")
    })
    .await;
    let total = 2 * N;
    for i in N..N + total {
        send(&phone, "sync", json!({ "n": i })).await;
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while got.len() + stuck_got(&stuck).len() < total {
        assert!(
            Instant::now() < deadline,
            "{} + {} of {total}",
            got.len(),
            stuck_got(&stuck).len()
        );
        got.extend(drain(&mut late, Duration::from_millis(300)).await);
    }
    let held = stuck_got(&stuck);
    assert!(
        !held.is_empty() && !got.is_empty(),
        "round robin: both got some"
    );
    stuck.kill9();
    let again = drain(&mut late, Duration::from_secs(3)).await;
    assert_eq!(
        counts(&again),
        counts(&held),
        "what the killed handler held"
    );
    got.extend(again);
    let expected: BTreeMap<String, usize> = (N..N + total).map(|i| (body(i), 1)).collect();
    assert_eq!(counts(&got), expected);
}
