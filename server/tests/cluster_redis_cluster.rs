//! Broker nodes on a real Redis Cluster (3 masters, 3 replicas on loopback,
//! `testkit::RedisCluster`), every node and every built-in handler a
//! process of its own:
//! - a device on node A served by handlers on nodes B and C (sync,
//!   publish to a platform, contacts, tokens), its replies and commands
//!   spread over the cluster's shards;
//! - `kill -9` of a handler and its node while it holds commands it read
//!   and never acknowledged: a handler of the same group on another node
//!   takes them over (`XAUTOCLAIM`) and every one is answered;
//! - the slot of a user's replies moved to another master, then that
//!   master failed over, while replies stream: subscriptions follow
//!   (`sunsubscribe`, lost connections), nothing stalls and nothing is
//!   lost (duplicates are allowed, counted and printed).

mod nodes;

use e2e::clients::{Seen, V5Client};
use nodes::{
    ask, ask_until_served, device, next_publish, send, serve_every_builtin_command, start_handler,
    Node, Process, ANSWER_WITHIN, HANDLER_KEY, START_WITHIN,
};
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use testkit::{Platform, RedisCluster};

/// A command a dead consumer held is taken over after 15 s idle, looked for
/// every 5 s (`cluster::commands::{CLAIM_IDLE, CLAIM_EVERY}`); the answer
/// then crosses two nodes.
const RECLAIMED_WITHIN: Duration = Duration::from_secs(15 + 5 + 10);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Calls of `command` on every running master (INFO commandstats).
fn calls(cluster: &RedisCluster, command: &str) -> Vec<u64> {
    cluster
        .masters()
        .into_iter()
        .map(|m| {
            let text = cluster
                .query_text(m, &["INFO", "commandstats"])
                .unwrap_or_default();
            text.lines()
                .find_map(|line| {
                    line.strip_prefix(&format!("cmdstat_{command}:calls="))?
                        .split(',')
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        })
        .collect()
}

/// Waits until `log` of `process` shows `text`.
async fn wait_log(process: &Process, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !process.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "{text:?} never logged:\n{}",
            process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_node_a_is_served_by_handlers_on_nodes_b_and_c() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let platform = Platform::start().await;
    let mail = platform.url("/mail");
    let node_a = Node::start("node-a", &url, false, &mail);
    let node_b = Node::start("node-b", &url, false, &mail);
    let node_c = Node::start("node-c", &url, false, &mail);
    let data = tempfile::tempdir().unwrap();
    let _sync = start_handler("sync-handler", &node_b, &url, data.path(), &mail);
    let _publish = start_handler("publish-handler", &node_b, &url, data.path(), &mail);
    let _contacts = start_handler("contacts-handler", &node_c, &url, data.path(), &mail);
    let _tokens = start_handler("tokens-handler", &node_c, &url, data.path(), &mail);

    let uid = "8001";
    let mut phone = device(
        &node_a,
        uid,
        &["sync", "publish", "contact_list", "list_tokens"],
    )
    .await;

    // Contacts and tokens answered by node C's handlers; sync and publish
    // (sealed on the device on node A, opened by node B's handler with the
    // key node B's sync stored in the cluster) by node B's.
    serve_every_builtin_command(&mut phone, uid, &platform, "hello across the cluster").await;

    // A second user, whose replies live on another shard than the first's
    // (the test picks one), also served across nodes.
    let first = cluster.master_of_key("r:{8001}");
    let other = (8002..9000)
        .map(|n| n.to_string())
        .find(|uid| cluster.master_of_key(&format!("r:{{{uid}}}")) != first)
        .unwrap();
    let mut second = device(&node_a, &other, &["contact_list"]).await;
    let contacts = ask(
        &mut second,
        &other,
        "get_contact_list",
        json!({}),
        "contact_list",
    )
    .await;
    assert_eq!(contacts, json!({"contacts": []}));

    // Replies were announced with SPUBLISH on two shards; commands were
    // appended on the shards of their partitions and read back there.
    let spublish = calls(&cluster, "spublish");
    assert!(
        spublish.iter().filter(|n| **n > 0).count() >= 2,
        "{spublish:?}"
    );
    let xreadgroup = calls(&cluster, "xreadgroup");
    assert!(
        xreadgroup.iter().filter(|n| **n > 0).count() >= 2,
        "{xreadgroup:?}"
    );
    assert!(node_a
        .log_text()
        .contains("pub/sub connection to a Redis master open"));
    drop(node_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_a_killed_handler_node_held_are_reclaimed_and_answered() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let mut node_b = Node::start("node-b", &url, false, none);
    let node_c = Node::start("node-c", &url, false, none);
    let data = tempfile::tempdir().unwrap();
    let mut handler_b = start_handler("contacts-handler", &node_b, &url, data.path(), none);

    // Devices of users spread over the command partitions, all on node A,
    // served once by node B's handler (its readers are in the group).
    let uids: Vec<String> = (0..12).map(|n| format!("91{n:02}")).collect();
    let mut phones = Vec::new();
    for uid in &uids {
        let mut phone = device(&node_a, uid, &["contact_list"]).await;
        let contacts = ask_until_served(
            &mut phone,
            uid,
            "get_contact_list",
            json!({}),
            "contact_list",
        )
        .await;
        assert_eq!(contacts, json!({"contacts": []}));
        phones.push(phone);
    }

    // Node B and its handler freeze: node B's blocked reads still take
    // the next commands of their partitions (Redis answers the read), and
    // nothing acknowledges them.
    handler_b.signal("STOP");
    node_b.process.signal("STOP");
    for (uid, phone) in uids.iter().zip(&phones) {
        send(phone, "get_contact_list", json!({"probe": uid})).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let held = loop {
        let held: i64 = (0..4)
            .map(|p| {
                let key = format!("c:{{get_contact_list:{p}}}");
                let master = cluster.master_of_key(&key);
                match cluster.query(master, &["XPENDING", &key, "s:contacts"]) {
                    Ok(redis::Value::Array(parts)) => match parts.first() {
                        Some(redis::Value::Int(n)) => *n,
                        _ => 0,
                    },
                    _ => 0,
                }
            })
            .sum();
        if held > 0 || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        held > 0,
        "node B read none of the commands before it died:\n{}",
        node_b.log_text()
    );

    // kill -9 both; a handler of the same group starts on node C.
    handler_b.kill9();
    node_b.process.kill9();
    let handler_c = start_handler("contacts-handler", &node_c, &url, data.path(), none);

    // Every device gets its answer: unread commands by node C's readers
    // at once, the ones node B held once they are idle long enough.
    for (uid, phone) in uids.iter().zip(phones.iter_mut()) {
        let got = next_publish(phone, RECLAIMED_WITHIN).await;
        let (topic, payload) = got.unwrap_or_else(|| {
            panic!(
                "{uid} got no answer ({held} held by the dead node):\n{}",
                node_c.log_text()
            )
        });
        assert_eq!(topic, format!("{uid}_contact_list"));
        let body: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(body, json!({"contacts": []}));
    }
    wait_log(
        &node_c.process,
        "took over commands another consumer left unacknowledged",
        Duration::from_secs(1),
    )
    .await;
    drop(handler_c);
}

/// A device of `uid` on node A listening (QoS 1) to `<uid>_note`, and a
/// handler client on node B, once a probe crossed.
async fn listening_pair(node_a: &Node, node_b: &Node, uid: &str) -> (V5Client, V5Client) {
    let mut phone = V5Client::connect(node_a.target(), "phone", "JWT", &nodes::token(uid), |_| {});
    phone.connected().await;
    assert_eq!(
        phone
            .subscribe(&format!("{uid}_note"), QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut handler =
        V5Client::connect(node_b.target(), "worker-b", "handler", HANDLER_KEY, |_| {});
    handler.connected().await;
    // Until node A listens on the user's shard, replies are missed: probe.
    let deadline = Instant::now() + START_WITHIN;
    loop {
        handler
            .client
            .publish(format!("{uid}_note"), QoS::AtLeastOnce, false, "probe")
            .await
            .unwrap();
        if next_publish(&mut phone, Duration::from_millis(500))
            .await
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "node A never listened");
    }
    while next_publish(&mut phone, Duration::from_millis(300))
        .await
        .is_some()
    {}
    (phone, handler)
}

/// The reply number a payload starts with.
fn number(payload: &[u8]) -> u32 {
    let text = String::from_utf8_lossy(payload);
    text.split(' ').next().unwrap_or_default().parse().unwrap()
}

/// Publishes replies `0..total` (each padded to `pad` bytes more) from the
/// handler, 5 ms apart (from `rush_from` on, as fast as the handler's
/// in-flight window allows),
/// calling `at(i)` before each (where the cluster is changed), and returns
/// what the phone received, in arrival order, once the last one arrived or
/// the answer deadline passed.
async fn stream_replies(
    phone: &mut V5Client,
    handler: &V5Client,
    uid: &str,
    (total, rush_from, pad): (u32, u32, u32),
    mut at: impl FnMut(u32),
) -> Vec<u32> {
    let mut received = Vec::new();
    for i in 0..total {
        at(i);
        handler
            .client
            .publish(
                format!("{uid}_note"),
                QoS::AtLeastOnce,
                false,
                format!("{i} {:pad$}", "", pad = pad as usize),
            )
            .await
            .unwrap();
        if i < rush_from {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while let Some(Seen::Packet(Packet::Publish(p))) =
            phone.next_within(Duration::from_millis(1)).await
        {
            received.push(number(&p.payload));
        }
    }
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !received.contains(&(total - 1)) && Instant::now() < deadline {
        if let Some((_, payload)) = next_publish(phone, Duration::from_millis(200)).await {
            received.push(number(&payload));
        }
    }
    while let Some((_, payload)) = next_publish(phone, Duration::from_millis(500)).await {
        received.push(number(&payload));
    }
    received
}

/// Lost replies by phase, duplicates; asserts the order of first arrivals.
fn account(
    received: &[u32],
    total: u32,
    phase: impl Fn(u32) -> &'static str,
) -> (BTreeMap<&'static str, u32>, usize) {
    let got: HashSet<u32> = received.iter().copied().collect();
    let mut lost = BTreeMap::new();
    for i in 0..total {
        if !got.contains(&i) {
            *lost.entry(phase(i)).or_insert(0u32) += 1;
        }
    }
    let mut seen = HashSet::new();
    let first: Vec<u32> = received
        .iter()
        .copied()
        .filter(|i| seen.insert(*i))
        .collect();
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "replies out of order: {first:?}"
    );
    (lost, received.len() - got.len())
}

/// The replies of `0..total` missing from `received`, as ranges.
fn lost_ranges(received: &[u32], total: u32) -> Vec<std::ops::RangeInclusive<u32>> {
    let got: HashSet<u32> = received.iter().copied().collect();
    let mut ranges: Vec<std::ops::RangeInclusive<u32>> = Vec::new();
    for i in (0..total).filter(|i| !got.contains(i)) {
        match ranges.last_mut() {
            Some(r) if *r.end() + 1 == i => *r = *r.start()..=i,
            _ => ranges.push(i..=i),
        }
    }
    ranges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_follow_a_moved_slot_and_a_failover() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "9301";
    let key = format!("r:{{{uid}}}");
    let (mut phone, handler) = listening_pair(&node_a, &node_b, uid).await;

    // Replies stream from node B while the slot moves, then while its new
    // master fails over to its replica (coordinated: CLUSTER FAILOVER).
    let total = 600u32;
    let mut moves = BTreeMap::new();
    let received = stream_replies(&mut phone, &handler, uid, (total, total, 0), |i| {
        if i == 200 {
            let from = cluster.master_of_key(&key);
            let to = cluster.masters().into_iter().find(|m| *m != from).unwrap();
            blocking(|| cluster.move_slot_of(&key, to));
            moves.insert("moved", (from, to));
        }
        if i == 400 {
            let master = cluster.master_of_key(&key);
            let replica = cluster.replica_of(master);
            blocking(|| cluster.failover(replica));
            moves.insert("failed over", (master, replica));
        }
    })
    .await;
    let (lost, duplicates) = account(&received, total, |i| match i {
        i if i < 200 => "before",
        i if i < 400 => "moved",
        _ => "failed over",
    });
    // How often node A's subscription landed on a node that did not serve
    // the slot (the promoted master's old master, named by a stale map).
    let refused = node_a
        .log_text()
        .matches("a subscription is on a node that does not serve")
        .count();
    println!(
        "replies across a slot move and a coordinated failover: {total} sent, {} received, lost by phase {lost:?}, {duplicates} duplicates; moves {moves:?}; node A subscribed again after a refused confirmation {refused} times",
        received.len() - duplicates
    );
    assert!(
        received.contains(&(total - 1)),
        "replies stalled after the moves: lost {lost:?}\n{}",
        node_a.log_text()
    );
    assert!(
        node_a.log_text().contains("subscribing again"),
        "node A never followed the slot:\n{}",
        node_a.log_text()
    );
    // The replay after each move is paced against what the device took:
    // the router's log of the topic never dropped a segment under the
    // device's reader. After the coordinated failover the old master's
    // `sunsubscribe` may come while the slot map still names it (now a
    // replica, which accepts `SSUBSCRIBE` but hears the promoted master's
    // wake-ups only once that master counts it as its replica): node A's
    // subscription counts only once the replay read on its own connection
    // succeeded, which a replica refuses (`MOVED`), so it subscribes on the
    // promoted master instead and nothing is skipped (before, 1 to 44
    // replies after the failover were lost in about 1 run of 6).
    let jumped = jumped_over(&node_a.log_text(), &format!("{uid}_note"));
    if !lost.is_empty() {
        println!(
            "lost {lost:?} (replies {:?}), none jumped over by the router ({jumped}); node A:\n{}\nnode B:\n{}",
            lost_ranges(&received, total),
            node_a
                .log_text()
                .lines()
                .filter(|l| l.contains("cluster"))
                .collect::<Vec<_>>()
                .join("\n"),
            node_b
                .log_text()
                .lines()
                .filter(|l| !l.contains(" INFO "))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(
        jumped,
        0,
        "the router jumped over {jumped} replies:\n{}",
        node_a.log_text()
    );
    // At least once: duplicates are allowed (counted and printed above),
    // a lost reply is not, in any phase.
    assert!(
        lost.is_empty(),
        "replies lost: {lost:?} (replies {:?})",
        lost_ranges(&received, total)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_resume_after_their_master_is_killed() {
    let cluster = std::sync::Arc::new(blocking(RedisCluster::start));
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "9302";
    let key = format!("r:{{{uid}}}");
    let (mut phone, handler) = listening_pair(&node_a, &node_b, uid).await;

    // kill -9 of the master holding the user's stream mid-stream: its
    // replica is promoted after the cluster's node timeout, while replies
    // keep coming. The handler's PUBACK waits for each reply's append, so
    // the handler stalls (its in-flight window full) while no master holds
    // the slot: the promotion is watched apart from the stream. From the
    // kill on, the handler sends as fast as its window allows, each reply
    // padded to 1 KB: what the outage held back (the handler's window,
    // what node A missed until it subscribed again on the promoted master)
    // arrives in one burst of more than the router's log of the topic
    // holds (2 x 32 KiB).
    let total = 1000u32;
    let master = cluster.master_of_key(&key);
    let replica = cluster.replica_of(master);
    let mut watch = None;
    let received = stream_replies(&mut phone, &handler, uid, (total, 200, 1000), |i| {
        if i == 200 {
            cluster.kill(master);
            let cluster = cluster.clone();
            watch = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                if cluster.role(replica) == Some("master") {
                    return "by the cluster";
                }
                // Not promoted by its peers yet (a loaded machine):
                // promoted by hand, as an operator would.
                cluster.failover_forced(replica, "TAKEOVER");
                "by TAKEOVER"
            }));
        }
    })
    .await;
    let promoted = watch
        .map(|watch| watch.join().expect("the promotion watch"))
        .unwrap_or("never");
    let (lost, duplicates) = account(&received, total, |i| {
        if i < 200 {
            "before"
        } else {
            "after the kill"
        }
    });
    let jumped = jumped_over(&node_a.log_text(), &format!("{uid}_note"));
    let paced = node_a
        .log_text()
        .matches("a burst of replies was paced")
        .count();
    println!(
        "replies across kill -9 of their master (replica promoted {promoted}): {total} sent, {} received, lost by phase {lost:?} (replies {:?}), {duplicates} duplicates; node A's router log of the topic overflowed by {jumped} in the burst after the outage; {paced} bursts paced",
        received.len() - duplicates,
        lost_ranges(&received, total)
    );
    // Node B's appender retried across the outage, then appended on the
    // promoted replica (which has never seen the script: `EVAL`, not
    // `EVALSHA`): nothing dropped. (Before, the first batch after the kill
    // was dropped on `NOSCRIPT` every run, and a batch of up to 256 when
    // its first attempt failed otherwise.)
    assert!(
        !node_b
            .log_text()
            .contains("replies not appended to Redis: dropped"),
        "node B dropped replies:\n{}",
        node_b.log_text()
    );
    assert!(
        received.contains(&(total - 1)),
        "replies stalled after the master died: lost {lost:?}\n{}",
        node_a.log_text()
    );
    assert!(
        !lost.contains_key("before"),
        "lost before the kill: {lost:?}"
    );
    // What the outage held back arrives in one burst (the appender's
    // queue flushed on the promoted master, or node A's replay after it
    // subscribed again); node A injects it into its router no faster than
    // the device takes it (a burst is paced on the replies' delivery
    // tags), so the router's reply log of the topic (2 x 32 KiB, oldest
    // segment dropped first) never drops a segment the device's reader is
    // in: nothing lost, nothing jumped over.
    assert!(
        lost.is_empty() && jumped == 0,
        "lost {lost:?} (replies {:?}), the router jumped over {jumped}:\n{}",
        lost_ranges(&received, total),
        node_a.log_text()
    );
}

/// Entries of `topic` the router of a node skipped for a reader whose
/// log's oldest segment was dropped under it (its warning, `Read cursor
/// start jumped from (segment, offset) to (segment, offset) on <topic>`).
fn jumped_over(log: &str, topic: &str) -> u64 {
    let offset = |part: &str| -> Option<u64> {
        part.trim()
            .trim_start_matches('(')
            .split(',')
            .nth(1)?
            .trim()
            .trim_end_matches(')')
            .parse()
            .ok()
    };
    log.lines()
        .filter_map(|line| {
            let rest = line.split("Read cursor start jumped from ").nth(1)?;
            let (span, on) = rest.split_once(" on ")?;
            if on.trim_end_matches('"').trim() != topic {
                return None;
            }
            let (from, to) = span.split_once(" to ")?;
            Some(offset(to)?.saturating_sub(offset(from)?))
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_on_node_c_takes_over_the_same_session_on_node_a() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_c = Node::start("node-c", &url, false, none);
    let uid = "9401";

    let mut first = V5Client::connect(node_a.target(), "tablet", "JWT", &nodes::token(uid), |_| {});
    first.connected().await;
    // Node A listens on the user's channel once its subscription is
    // confirmed: a reply from node C reaching the first session shows it.
    assert_eq!(
        first
            .subscribe(&format!("{uid}_note"), QoS::AtMostOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    let mut handler =
        V5Client::connect(node_c.target(), "worker-c", "handler", HANDLER_KEY, |_| {});
    handler.connected().await;
    let deadline = Instant::now() + START_WITHIN;
    loop {
        handler
            .client
            .publish(format!("{uid}_note"), QoS::AtLeastOnce, false, "ready?")
            .await
            .unwrap();
        if next_publish(&mut first, Duration::from_millis(500))
            .await
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "node A never listened");
    }

    // The same session (user and client id) connects to node C.
    let mut second =
        V5Client::connect(node_c.target(), "tablet", "JWT", &nodes::token(uid), |_| {});
    second.connected().await;
    let ended = first.closed().await;
    assert!(
        ended.contains("SessionTakenOver"),
        "the session on node A ended with {ended}:\n{}",
        node_a.log_text()
    );
    assert!(node_a
        .log_text()
        .contains("a session here was taken over on another node"));
    // The new one stays, and is served.
    assert_eq!(
        second
            .subscribe(&format!("{uid}_note"), QoS::AtMostOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
}
