//! Commands are acknowledged in Redis (`XACK`) only once a handler
//! acknowledged them, on a real Redis Cluster (3 masters, 3 replicas) with
//! every node and handler a process of its own: a handler that takes
//! commands and never acknowledges them (a paho-mqtt client with manual
//! acknowledgements) is killed (`kill -9`) while its node lives on; the
//! commands stay pending in the group, and a handler of the same `$share`
//! group on another node answers every one once they are idle
//! (`XAUTOCLAIM`), after which nothing is pending.
//!
//! The same with a handler built on the SDK (`sdk::Worker`), which
//! acknowledges a command only once its handler code returned: a slow
//! SDK handler (this test binary run again as a child process, see
//! [`slow_sdk_handler_process`]) first answers commands that end out of
//! order (its PUBACKs still go in order: its node keeps the connection and
//! nothing stays pending), then is killed with `kill -9` while its handler
//! code runs 12 commands; the built-in contacts handler on another node
//! answers every one.
//!
//! And a handler whose code runs longer than the take-over idle time (15
//! s) while its node lives: its node keeps the command from looking idle,
//! so a handler of the same group on another node never gets it too.

mod nodes;

use nodes::{device, next_publish, send, start_handler, Node, Process, ANSWER_WITHIN, HANDLER_KEY};
use sdk::{Command as SdkCommand, Reply, SdkConfig, Worker};
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

/// A 3+3 Redis Cluster and three broker nodes on it, without built-in
/// handlers; `none`: a platform URL nothing answers; `data`: the handlers'
/// shared directory.
struct Nodes {
    cluster: RedisCluster,
    url: String,
    none: &'static str,
    node_a: Node,
    node_b: Node,
    node_c: Node,
    data: tempfile::TempDir,
}

fn three_nodes() -> Nodes {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    Nodes {
        node_a: Node::start("node-a", &url, false, none),
        node_b: Node::start("node-b", &url, false, none),
        node_c: Node::start("node-c", &url, false, none),
        data: tempfile::tempdir().unwrap(),
        cluster,
        url,
        none,
    }
}

/// Once node B's readers are in the group (asynchronously after the
/// SUBSCRIBE), a warm-up command from `phone` reaches the `slow` handler;
/// its replies drained, nothing left pending.
async fn warm_up(
    slow: &Process,
    phone: &mut e2e::clients::V5Client,
    node_b: &Node,
    cluster: &RedisCluster,
) {
    let deadline = Instant::now() + nodes::START_WITHIN;
    while !slow.log_text().contains("answered warmup") {
        assert!(
            Instant::now() < deadline,
            "no command reached the slow handler:\n{}\n{}",
            slow.log_text(),
            node_b.log_text()
        );
        send(phone, "get_contact_list", json!({"probe": "warmup"})).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    while next_publish(phone, Duration::from_millis(500))
        .await
        .is_some()
    {}
    nothing_pending(cluster, ANSWER_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_a_killed_handler_never_acknowledged_are_answered_by_its_group() {
    let Nodes {
        cluster,
        url,
        none,
        node_a,
        node_b,
        node_c,
        data,
    } = three_nodes();

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

/// Not a test of its own: the slow SDK handler process that
/// [`commands_a_killed_sdk_handler_was_running_are_answered_by_its_group`]
/// runs as a child (this binary with `--ignored --exact`), configured by
/// `SLOW_HANDLER_BROKER_URL`: a `sdk::Worker` of the `contacts` group
/// serving `get_contact_list`, which prints `started <probe>`, works
/// `sleep_ms`, prints `answered <probe>` and replies
/// `{"contacts": [], "by": "slow"}`. Test-only: no shipped handler sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of another test; runs only under SLOW_HANDLER_BROKER_URL"]
async fn slow_sdk_handler_process() {
    let Ok(url) = std::env::var("SLOW_HANDLER_BROKER_URL") else {
        return;
    };
    Worker::new("contacts")
        .on_with_errors_to(
            "get_contact_list",
            "contact_list",
            |cmd: SdkCommand<serde_json::Value>| async move {
                let probe = cmd.body["probe"].as_str().unwrap_or_default().to_owned();
                let sleep_ms = cmd.body["sleep_ms"].as_u64().unwrap_or(0);
                println!("started {probe}");
                tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                println!("answered {probe}");
                Ok(Reply::json(
                    "contact_list",
                    json!({"contacts": [], "by": "slow"}),
                ))
            },
        )
        .run(SdkConfig::new(url, HANDLER_KEY), sdk::shutdown_on_signals())
        .await
        .expect("the slow handler ran");
}

/// Runs [`slow_sdk_handler_process`] as a child process on `node`.
fn slow_sdk_handler(node: &Node, dir: &std::path::Path) -> Process {
    let log = dir.join("slow-sdk-handler.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "slow_sdk_handler_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLOW_HANDLER_BROKER_URL", format!("mqtt://{}", node.tcp))
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("run this test binary again");
    Process { child, log }
}

/// The next reply `phone` gets on `<uid>_contact_list`, parsed.
async fn contact_list_reply(
    phone: &mut e2e::clients::V5Client,
    uid: &str,
    within: Duration,
) -> serde_json::Value {
    let (topic, payload) = next_publish(phone, within)
        .await
        .unwrap_or_else(|| panic!("{uid} got no answer within {within:?}"));
    assert_eq!(topic, format!("{uid}_contact_list"));
    serde_json::from_slice(&payload).unwrap()
}

/// Waits until nothing is pending in the `contacts` group of `get_contact_list`.
async fn nothing_pending(cluster: &RedisCluster, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = pending(cluster, "get_contact_list", "s:contacts");
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} still pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_a_killed_sdk_handler_was_running_are_answered_by_its_group() {
    let Nodes {
        cluster,
        url,
        none,
        node_a,
        node_b,
        node_c,
        data,
    } = three_nodes();
    let mut slow = slow_sdk_handler(&node_b, data.path());

    // Once node B's readers are in the group, a probe reaches the handler.
    let uids: Vec<String> = (0..12).map(|n| format!("93{n:02}")).collect();
    let mut phones = Vec::new();
    for uid in &uids {
        phones.push(device(&node_a, uid, &["contact_list"]).await);
    }
    warm_up(&slow, &mut phones[0], &node_b, &cluster).await;

    // Commands that end in the reverse order they came in: each is
    // answered as it ends, its PUBACK waits for the earlier ones (the
    // router closes a connection that acknowledges out of order), and
    // every one is acknowledged in Redis; none is delivered twice.
    let phone = &mut phones[1];
    for (n, sleep_ms) in [1200u64, 900, 600, 300].into_iter().enumerate() {
        send(
            phone,
            "get_contact_list",
            json!({"probe": format!("order{n}"), "sleep_ms": sleep_ms}),
        )
        .await;
    }
    for _ in 0..4 {
        let body = contact_list_reply(phone, &uids[1], ANSWER_WITHIN).await;
        assert_eq!(body, json!({"contacts": [], "by": "slow"}));
    }
    nothing_pending(&cluster, ANSWER_WITHIN).await;
    let log = slow.log_text();
    let mut started: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("started order"))
        .collect();
    started.sort_unstable();
    assert_eq!(started, ["0", "1", "2", "3"], "each once:\n{log}");
    let (first, last) = (
        log.find("answered order0").unwrap(),
        log.find("answered order3").unwrap(),
    );
    assert!(last < first, "the last one ended first:\n{log}");
    assert!(
        !node_b.log_text().contains("out of order ack"),
        "{}",
        node_b.log_text()
    );

    // Each device sends one command the handler works on for ten minutes:
    // it starts every one, acknowledges none, and they stay pending.
    for (uid, phone) in uids.iter().zip(&phones) {
        send(
            phone,
            "get_contact_list",
            json!({"probe": uid, "sleep_ms": 600_000}),
        )
        .await;
    }
    wait_for(
        &slow,
        "the slow handler started every command",
        Duration::from_secs(15),
        |log| {
            uids.iter()
                .all(|uid| log.contains(&format!("started {uid}")))
        },
    )
    .await;
    let held = pending(&cluster, "get_contact_list", "s:contacts");
    assert!(
        held >= uids.len() as i64,
        "{held} pending for {} commands the handler is still running",
        uids.len()
    );

    // The handler process dies mid-command; its node lives on. The
    // built-in contacts handler (same group) on node C answers every one.
    slow.kill9();
    let killed = Instant::now();
    let _contacts = start_handler("contacts-handler", &node_c, &url, data.path(), none);
    for (uid, phone) in uids.iter().zip(phones.iter_mut()) {
        let left = RECLAIMED_WITHIN.saturating_sub(killed.elapsed());
        let body = contact_list_reply(phone, uid, left).await;
        assert_eq!(
            body,
            json!({"contacts": []}),
            "answered by the contacts handler"
        );
    }
    println!(
        "{} commands a killed SDK handler was running were answered {:?} after the kill",
        uids.len(),
        killed.elapsed()
    );
    nothing_pending(&cluster, ANSWER_WITHIN).await;
    drop(node_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_a_live_handler_runs_longer_than_the_idle_time_is_not_taken_over() {
    let Nodes {
        cluster,
        url,
        none,
        node_a,
        node_b,
        node_c,
        data,
    } = three_nodes();
    let slow = slow_sdk_handler(&node_b, data.path());

    let uid = "9400";
    let mut phone = device(&node_a, uid, &["contact_list"]).await;
    warm_up(&slow, &mut phone, &node_b, &cluster).await;

    // 22 s of work: past the 15 s idle time, within the SDK's 30 s
    // deadline. Another handler of the group joins on node C meanwhile.
    send(
        &phone,
        "get_contact_list",
        json!({"probe": "long", "sleep_ms": 22_000}),
    )
    .await;
    wait_for(&slow, "the slow handler started", ANSWER_WITHIN, |log| {
        log.contains("started long")
    })
    .await;
    let started = Instant::now();
    let _contacts = start_handler("contacts-handler", &node_c, &url, data.path(), none);

    let mut replies = Vec::new();
    while started.elapsed() < Duration::from_secs(32) {
        let left = Duration::from_secs(32).saturating_sub(started.elapsed());
        if let Some((topic, payload)) = next_publish(&mut phone, left).await {
            assert_eq!(topic, format!("{uid}_contact_list"));
            replies.push(serde_json::from_slice::<serde_json::Value>(&payload).unwrap());
        }
    }
    let log = slow.log_text();
    println!("one 22 s command, node C's handler in its group: replies {replies:?}");
    assert_eq!(
        replies,
        vec![json!({"contacts": [], "by": "slow"})],
        "answered once, by the handler running it\nslow handler:\n{log}\nnode C:\n{}",
        node_c.log_text()
    );
    assert_eq!(log.matches("started long").count(), 1, "{log}");
    assert!(
        !node_c
            .log_text()
            .contains("took over commands another consumer left unacknowledged"),
        "{}",
        node_c.log_text()
    );
    nothing_pending(&cluster, ANSWER_WITHIN).await;
    drop(node_a);
}
