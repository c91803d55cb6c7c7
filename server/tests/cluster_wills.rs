//! Wills of devices whose node died, on a real Redis Cluster (3 masters, 3
//! replicas on loopback, `testkit::RedisCluster`) with three broker nodes
//! as processes of their own and real MQTT clients:
//! - `kill -9` of the node holding devices with wills: a handler on another
//!   node receives each will once (one node of the two left publishes it),
//!   within the stated bound (liveness TTL + sweep period); a delayed will
//!   after its delay, not before; a revoked user's will never; a device
//!   that reconnects to another node once its node is known dead has its
//!   will published now (Clean Start) or dropped (resumed session);
//! - a normal DISCONNECT, and a will published by its own node, leave no
//!   will record behind in Redis; nor does a clean shutdown (`SIGTERM`),
//!   which ends its sessions without their wills, as one node does;
//! - a node killed and restarted under the same `BROKER_NODE_ID`: its
//!   previous run's will is published at once, once.

mod nodes;

use e2e::clients::V5Client;
use nodes::{next_publish, send, Node, HANDLER_KEY, START_WITHIN};
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, LastWill, LastWillProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use testkit::RedisCluster;

/// A will of a dead node is published within the liveness TTL (10 s) plus
/// the sweep period (2 s) of the node's last refresh
/// (`cluster::{liveness, wills}`); with room for a loaded machine.
const PUBLISHED_WITHIN: Duration = Duration::from_secs(10 + 2 + 10);
/// The command topic wills are published to (devices may only will to
/// command topics: `acl::may_publish`).
const WILL_TOPIC: &str = "request_contact";

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A device of `uid` on `node` as client `client_id`, with a will
/// (`payload` to [`WILL_TOPIC`], QoS 1) after `delay` seconds, its session
/// outliving the connection by `expiry` seconds; `clean_start` false
/// resumes.
fn device_with_will(
    node: &Node,
    uid: &str,
    client_id: &str,
    will: Option<(&str, u32)>,
    expiry: u32,
    clean_start: bool,
) -> V5Client {
    V5Client::connect(node.target(), client_id, "JWT", &nodes::token(uid), |o| {
        o.set_clean_start(clean_start);
        let mut properties = ConnectProperties::new();
        properties.session_expiry_interval = Some(expiry);
        o.set_connect_properties(properties);
        if let Some((payload, delay)) = will {
            let will_properties = LastWillProperties {
                delay_interval: Some(delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            };
            o.set_last_will(LastWill::new(
                WILL_TOPIC,
                payload,
                QoS::AtLeastOnce,
                false,
                Some(will_properties),
            ));
        }
    })
}

/// A handler on `node` reading [`WILL_TOPIC`] as shared group `w`.
async fn will_reader(node: &Node) -> V5Client {
    let mut handler =
        V5Client::connect(node.target(), "will-reader", "handler", HANDLER_KEY, |_| {});
    handler.connected().await;
    assert_eq!(
        handler
            .subscribe(&format!("$share/w/{WILL_TOPIC}"), QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    handler
}

/// Sends probes from `device` until `reader` gets one: the consumer group
/// of the device's partition reads (a command appended before its group
/// exists is read by no one). Later probes are drained.
async fn until_read(device: &V5Client, reader: &mut V5Client, uid: &str) {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        send(device, WILL_TOPIC, json!({"probe": uid})).await;
        if let Some((_, payload)) = next_publish(reader, Duration::from_millis(700)).await {
            assert!(
                String::from_utf8_lossy(&payload).contains("probe"),
                "{payload:?}"
            );
            while next_publish(reader, Duration::from_millis(300))
                .await
                .is_some()
            {}
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the will reader never read {uid}'s partition"
        );
    }
}

/// Whether `key` exists (asked of the master holding it).
fn exists(cluster: &RedisCluster, key: &str) -> bool {
    let value = cluster
        .query(cluster.master_of_key(key), &["EXISTS", key])
        .expect("EXISTS");
    redis::from_owned_redis_value::<i64>(value).expect("an integer") == 1
}

/// Whether session `member` is in set `key`.
fn is_member(cluster: &RedisCluster, key: &str, member: &str) -> bool {
    let value = cluster
        .query(cluster.master_of_key(key), &["SISMEMBER", key, member])
        .expect("SISMEMBER");
    redis::from_owned_redis_value::<i64>(value).expect("an integer") == 1
}

/// Waits (bounded) until `check` holds.
async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !blocking(&mut check) {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines of `log` with `text` and `uid=<uid>`.
fn logged(log: &str, text: &str, uid: &str) -> usize {
    log.lines()
        .filter(|line| line.contains(text) && line.contains(&format!("uid={uid}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wills_of_a_killed_node_are_published_once_by_another() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let mut node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let node_c = Node::start("node-c", &url, false, none);
    let mut reader = will_reader(&node_b).await;

    // (uid, client, payload, will delay, session expiry)
    let devices = [
        ("9501", "now", "gone-now", 0, 0),
        ("9502", "later", "gone-later", 25, 120),
        ("9503", "revoked", "gone-revoked", 0, 0),
        ("9504", "clean", "gone-clean", 60, 120),
        ("9505", "resumed", "gone-resumed", 60, 120),
        ("9506", "early", "gone-early", 20, 120),
    ];
    let mut held = Vec::new();
    for (uid, client, payload, delay, expiry) in devices {
        let mut device =
            device_with_will(&node_a, uid, client, Some((payload, delay)), expiry, true);
        device.connected().await;
        until_read(&device, &mut reader, uid).await;
        let key = format!("will:{{{uid}}}:{client}");
        until(
            "the will record is written",
            Duration::from_secs(10),
            || {
                exists(&cluster, &key)
                    && is_member(&cluster, "wills:{node-a}", &format!("D:{uid}:{client}"))
            },
        )
        .await;
        held.push(device);
    }

    node_a.process.kill9();
    let killed = Instant::now();
    // Everything the reader gets, timed as it arrives, until the delayed
    // will and a while after (a duplicate would come within a few sweeps).
    let collector = tokio::spawn(async move {
        let mut received: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
        let mut settle_until = killed + Duration::from_secs(25) + PUBLISHED_WITHIN;
        while Instant::now() < settle_until {
            let left = settle_until.saturating_duration_since(Instant::now());
            let Some((topic, payload)) = next_publish(&mut reader, left).await else {
                break;
            };
            assert_eq!(topic, WILL_TOPIC);
            let payload = String::from_utf8_lossy(&payload).into_owned();
            received
                .entry(payload.clone())
                .or_default()
                .push(killed.elapsed());
            if payload == "gone-later" {
                settle_until = Instant::now() + Duration::from_secs(6);
            }
        }
        received
    });
    // The user of 9503 is revoked after its node died, before its will is due.
    let data = tempfile::tempdir().unwrap();
    let store = store::open(Some(&url), data.path()).await.unwrap();
    store
        .revoke_user(
            &protocol::UserId::parse("9503").unwrap(),
            store::Revocation::All,
        )
        .await
        .unwrap();

    // 9506 resumes on node C at once, while node A still looks alive: node
    // C looks again once A's liveness lapsed, and drops its will.
    let mut early = device_with_will(&node_c, "9506", "early", None, 120, false);
    early.connected().await;

    // Once node A is known dead, 9504 starts clean on node C (its will is
    // published now, long before its 60 s delay) and 9505 resumes there
    // (its will is dropped).
    until("node A's liveness lapses", PUBLISHED_WITHIN, || {
        !exists(&cluster, "node:{node-a}")
    })
    .await;
    let mut clean = device_with_will(&node_c, "9504", "clean", None, 0, true);
    clean.connected().await;
    let mut resumed = device_with_will(&node_c, "9505", "resumed", None, 120, false);
    resumed.connected().await;
    until(
        "the resumed session's will record is claimed",
        Duration::from_secs(10),
        || !exists(&cluster, "will:{9505}:resumed"),
    )
    .await;

    let received = collector.await.expect("the reader's collector");
    println!("wills received after the kill of node A: {received:?}");
    let arrivals = |payload: &str| received.get(payload).cloned().unwrap_or_default();
    let logs = format!("{}\n{}", node_b.log_text(), node_c.log_text());

    let now = arrivals("gone-now");
    assert_eq!(
        now.len(),
        1,
        "the will without delay, once: {received:?}\n{logs}"
    );
    assert!(now[0] <= PUBLISHED_WITHIN, "within the bound: {now:?}");
    // Its delay (25 s) counts from node A's last refresh, at most 3 s before the kill.
    let later = arrivals("gone-later");
    assert_eq!(
        later.len(),
        1,
        "the delayed will, once: {received:?}\n{logs}"
    );
    assert!(
        later[0] >= Duration::from_secs(25 - 3),
        "not before its delay: {later:?}"
    );
    assert!(
        arrivals("gone-revoked").is_empty(),
        "a revoked user's will: {received:?}"
    );
    assert_eq!(
        arrivals("gone-clean").len(),
        1,
        "a clean start publishes it: {received:?}"
    );
    assert!(
        arrivals("gone-early").is_empty(),
        "resumed before node A was seen dead, dropped: {received:?}\n{logs}"
    );
    assert!(
        arrivals("gone-resumed").is_empty(),
        "a resumed session drops it: {received:?}"
    );
    assert!(
        received.keys().all(|payload| payload.starts_with("gone-")),
        "nothing else: {received:?}"
    );

    // One node claimed each will of node A's, the other none.
    for uid in ["9501", "9502", "9503"] {
        let claimed = |node: &Node| {
            logged(
                &node.log_text(),
                "publishing the will of a device whose node died",
                uid,
            )
        };
        assert_eq!(
            claimed(&node_b) + claimed(&node_c),
            1,
            "one node claimed {uid}'s will:\n{logs}"
        );
    }
    assert!(
        logs.contains("the will's user was revoked: the will is dropped"),
        "{logs}"
    );
    assert!(
        node_c
            .log_text()
            .contains("a session whose node died resumes here: its will is not published"),
        "{logs}"
    );
    // Nothing of node A is left once its wills are handled.
    until("node A leaves `nodes`", Duration::from_secs(10), || {
        let value = cluster
            .query(
                cluster.master_of_key("nodes"),
                &["ZRANGE", "nodes", "0", "-1"],
            )
            .expect("ZRANGE");
        let members: Vec<String> = redis::from_owned_redis_value(value).expect("members");
        members.iter().all(|member| !member.starts_with("node-a/"))
    })
    .await;
    assert!(!exists(&cluster, "wills:{node-a}"));
    drop((clean, resumed, early, held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_disconnect_or_a_published_will_leaves_no_record() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let mut reader = will_reader(&node_b).await;

    // A normal DISCONNECT: the will is not published, its record goes.
    let mut quiet = device_with_will(&node_a, "9601", "quiet", Some(("gone-quiet", 0)), 0, true);
    quiet.connected().await;
    until_read(&quiet, &mut reader, "9601").await;
    until(
        "the will record is written",
        Duration::from_secs(10),
        || exists(&cluster, "will:{9601}:quiet"),
    )
    .await;
    quiet.client.disconnect().await.unwrap();
    until(
        "the record goes with the DISCONNECT",
        Duration::from_secs(10),
        || {
            !exists(&cluster, "will:{9601}:quiet")
                && !is_member(&cluster, "wills:{node-a}", "D:9601:quiet")
        },
    )
    .await;

    // A lost connection: node A publishes the will itself, and its record goes.
    let mut lost = device_with_will(&node_a, "9602", "lost", Some(("gone-lost", 0)), 0, true);
    lost.connected().await;
    until_read(&lost, &mut reader, "9602").await;
    until(
        "the will record is written",
        Duration::from_secs(10),
        || exists(&cluster, "will:{9602}:lost"),
    )
    .await;
    drop(lost);
    let (topic, payload) = next_publish(&mut reader, Duration::from_secs(10))
        .await
        .expect("the lost connection's will");
    assert_eq!(
        (topic.as_str(), &payload[..]),
        (WILL_TOPIC, &b"gone-lost"[..])
    );
    until(
        "the record goes with the published will",
        Duration::from_secs(10),
        || {
            !exists(&cluster, "will:{9602}:lost")
                && !is_member(&cluster, "wills:{node-a}", "D:9602:lost")
        },
    )
    .await;
    assert!(
        next_publish(&mut reader, Duration::from_secs(1))
            .await
            .is_none(),
        "the quiet one's will was never published, the lost one's once"
    );

    // A clean shutdown ends its sessions without their wills, as one node
    // does: it removes its records and its liveness, so no node publishes them.
    let mut node_c = Node::start("node-c", &url, false, none);
    let mut stopped = device_with_will(
        &node_c,
        "9603",
        "stopped",
        Some(("gone-stopped", 0)),
        0,
        true,
    );
    stopped.connected().await;
    until_read(&stopped, &mut reader, "9603").await;
    until(
        "the will record is written",
        Duration::from_secs(10),
        || exists(&cluster, "will:{9603}:stopped"),
    )
    .await;
    node_c.process.signal("TERM");
    until("node C stops", Duration::from_secs(20), || {
        matches!(node_c.process.child.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(
        !exists(&cluster, "will:{9603}:stopped"),
        "{}",
        node_c.log_text()
    );
    assert!(!exists(&cluster, "node:{node-c}"));

    // A node killed and restarted under the same name: the wills of its
    // previous run are a dead node's at once (its new run wrote another
    // incarnation), published once, by it or by node B.
    let mut node_d = Node::start("node-d", &url, false, none);
    let mut restarted = device_with_will(
        &node_d,
        "9604",
        "restarted",
        Some(("gone-restarted", 0)),
        0,
        true,
    );
    restarted.connected().await;
    until_read(&restarted, &mut reader, "9604").await;
    until(
        "the will record is written",
        Duration::from_secs(10),
        || exists(&cluster, "will:{9604}:restarted"),
    )
    .await;
    node_d.process.kill9();
    let node_d = Node::start("node-d", &url, false, none);
    let mut wills = Vec::new();
    while let Some((_, payload)) = next_publish(&mut reader, Duration::from_secs(8)).await {
        wills.push(String::from_utf8_lossy(&payload).into_owned());
    }
    assert_eq!(
        wills,
        vec!["gone-restarted".to_owned()],
        "the restarted node's old will, once; never the stopped node's:\n{}",
        node_d.log_text()
    );
    drop((stopped, restarted));
}
