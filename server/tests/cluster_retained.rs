//! Retained messages across nodes on a real Redis Cluster (3 masters, 3
//! replicas), every node a process of its own: a retained message a
//! handler publishes on node A reaches, with the retain flag, a device
//! subscribing on node B afterwards, and on node C started after the
//! publish; an empty retained publish on node B deletes it on node A; a
//! live subscriber gets a retained message once; past the cluster's cap a
//! retained topic is refused (logged), and a node started later loads the
//! 10,000 stored; a failover of the `{retained}` master keeps what its
//! replica had applied, and a node whose last applied change the log no
//! longer holds (lost by a failover) loads everything again.

mod nodes;

use e2e::clients::{Seen, V5Client};
use nodes::{token, Node, HANDLER_KEY, START_WITHIN};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::time::{Duration, Instant};
use testkit::RedisCluster;

/// How long a retained change may take to reach another node (the store's
/// round trip, then the other node's blocking read of the log).
const SPREAD_WITHIN: Duration = Duration::from_secs(10);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn handler(node: &Node) -> V5Client {
    let id = format!("retainer-{}", rand::random::<u32>());
    let mut client = V5Client::connect(node.target(), &id, "handler", HANDLER_KEY, |_| {});
    client.connected().await;
    client
}

/// Publishes a retained message and waits for its PUBACK: `Success` once
/// the cluster stored it.
async fn retain(handler: &mut V5Client, topic: &str, payload: &[u8]) {
    handler
        .client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .await
        .unwrap();
    assert_eq!(handler.puback().await.reason, PubAckReason::Success);
}

/// A device of `uid` on `node`, connected, subscribed to nothing.
async fn device(node: &Node, uid: &str) -> V5Client {
    let id = format!("phone-{}", rand::random::<u32>());
    let mut client = V5Client::connect(node.target(), &id, "JWT", &token(uid), |_| {});
    client.connected().await;
    client
}

/// The publishes `client` receives until one on `until` (within `within`).
async fn publishes_until(
    client: &mut V5Client,
    until: &str,
    within: Duration,
) -> Option<Vec<Publish>> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match client.next_within(left).await {
            Some(Seen::Packet(Packet::Publish(p))) => {
                let last = p.topic == until.as_bytes();
                got.push(p);
                if last {
                    return Some(got);
                }
            }
            Some(Seen::Packet(_)) => {}
            Some(Seen::Error(e)) => panic!("connection failed: {e}"),
            None => return None,
        }
    }
    None
}

/// Subscribes `client` to `filters` in one SUBSCRIBE (the router sends
/// each filter's retained message after the one SUBACK, none skipped
/// while waiting for it).
async fn subscribe_all(client: &mut V5Client, filters: &[&str]) {
    let filters = filters
        .iter()
        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(*f, QoS::AtLeastOnce));
    client.client.subscribe_many(filters).await.unwrap();
    let ack = client.suback().await;
    assert!(ack
        .return_codes
        .iter()
        .all(|c| *c == SubscribeReasonCode::Success(QoS::AtLeastOnce)));
}

/// Subscribes fresh devices of `uid` on `node` to `topic` until one is
/// sent its retained message (it reaches the node asynchronously); that
/// message.
async fn retained_on(node: &Node, uid: &str, topic: &str) -> Publish {
    retained_within(node, uid, topic, SPREAD_WITHIN).await
}

async fn retained_within(node: &Node, uid: &str, topic: &str, within: Duration) -> Publish {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut phone = device(node, uid).await;
        assert_eq!(
            phone.subscribe(topic, QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
        // A live delivery (it reached the node while this one subscribed)
        // has no retain flag: a later subscriber gets the retained one.
        let got = publishes_until(&mut phone, topic, Duration::from_millis(500)).await;
        if let Some(retained) = got.into_iter().flatten().find(|p| p.retain) {
            return retained;
        }
    }
    panic!(
        "no retained message on {topic} reached node {} within {within:?}:\n{}",
        node.name,
        node.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_shared_by_every_node() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7301";
    let status = format!("{uid}_status");
    let marker = format!("{uid}_marker");

    // Published retained by a handler on node A, subscribed to afterwards
    // on node B: sent with the retain flag.
    let mut handler_a = handler(&node_a).await;
    retain(&mut handler_a, &status, b"on").await;
    let got = retained_on(&node_b, uid, &status).await;
    assert!(got.retain, "sent as a retained message");
    assert_eq!(&got.payload[..], b"on");

    // A node started after the publish loads it.
    let node_c = Node::start("node-c", &url, false, none);
    let got = retained_on(&node_c, uid, &status).await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"on");

    // A live subscriber on node B gets a change made on node A once: the
    // retained path only, never the user's reply stream as well.
    let mut live = device(&node_b, uid).await;
    subscribe_all(&mut live, &[&status, &marker]).await;
    publishes_until(&mut live, &status, SPREAD_WITHIN)
        .await
        .expect("the retained status on subscribe");
    let changed = Instant::now();
    retain(&mut handler_a, &status, b"off").await;
    retain(&mut handler_a, &marker, b"1").await;
    let seen = publishes_until(&mut live, &marker, SPREAD_WITHIN)
        .await
        .expect("the change and the marker reach node B");
    println!(
        "two retained changes on node A reached a live subscriber on node B {:?} after the first was sent",
        changed.elapsed()
    );
    let statuses: Vec<&[u8]> = seen
        .iter()
        .filter(|p| p.topic == status.as_bytes())
        .map(|p| &p.payload[..])
        .collect();
    assert_eq!(
        statuses,
        [&b"off"[..]],
        "the change, once, before the marker"
    );
    live.assert_no_publish(Duration::from_secs(1)).await;

    // Deleted on node B (an empty retained publish): gone on node A. The
    // log is applied in order, so once a later change (the marker's) is
    // on node A, a subscriber there gets no retained status: the router
    // sends the retained message of each filter right after its SUBACK.
    let mut handler_b = handler(&node_b).await;
    retain(&mut handler_b, &status, b"").await;
    retain(&mut handler_b, &marker, b"2").await;
    let deadline = Instant::now() + SPREAD_WITHIN;
    loop {
        let mut phone = device(&node_a, uid).await;
        subscribe_all(&mut phone, &[&status, &marker]).await;
        let mut seen = publishes_until(&mut phone, &marker, Duration::from_secs(2))
            .await
            .expect("the marker is retained");
        if seen.last().is_some_and(|p| &p.payload[..] == b"2") {
            // Whatever else the SUBSCRIBE brought.
            while let Some(Seen::Packet(Packet::Publish(p))) =
                phone.next_within(Duration::from_millis(500)).await
            {
                seen.push(p);
            }
            assert_eq!(
                seen.len(),
                1,
                "no retained status after its deletion: {seen:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deletion never reached node A"
        );
    }
    let master = cluster.master_of_key("{retained}:topics");
    let stored = cluster
        .query(master, &["HEXISTS", "{retained}:topics", &status])
        .unwrap();
    assert_eq!(stored, redis::Value::Int(0), "deleted in Redis too");
    assert!(START_WITHIN > SPREAD_WITHIN);
    drop(node_c);
}

/// The cluster's cap on retained topics (`cluster::retained::MAX_TOPICS`):
/// one more is refused (its PUBACK says so) with a log line saying which
/// cap; a node started afterwards loads every stored one. Prints how long
/// storing and loading took, and the hash's memory in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_a_retained_topic_is_refused_and_a_new_node_loads_the_rest() {
    const MAX_TOPICS: usize = 10_000;
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let mut loader = handler(&node_a).await;
    let started = Instant::now();
    // Pipelined: the client keeps up to 100 in flight, and each PUBACK
    // waits for the store, so the node's queue in front of Redis never
    // overflows (a full one is answered `Quota exceeded`).
    for i in 0..=MAX_TOPICS {
        loader
            .client
            .publish(format!("load/{i}"), QoS::AtLeastOnce, true, vec![b'x'; 64])
            .await
            .unwrap();
    }
    let mut reasons = Vec::with_capacity(MAX_TOPICS + 1);
    for _ in 0..=MAX_TOPICS {
        reasons.push(loader.puback().await.reason);
    }
    // Answered in the order of the publishes: the last one is refused.
    let refused = reasons.pop();
    assert!(
        reasons.iter().all(|r| *r == PubAckReason::Success),
        "{} of {MAX_TOPICS} stored",
        reasons
            .iter()
            .filter(|r| **r == PubAckReason::Success)
            .count()
    );
    assert_eq!(refused, Some(PubAckReason::UnspecifiedError));
    let master = cluster.master_of_key("{retained}:topics");
    let stored = cluster
        .query(master, &["HLEN", "{retained}:topics"])
        .unwrap();
    assert_eq!(stored, redis::Value::Int(MAX_TOPICS as i64));
    assert!(
        node_a.log_text().contains("cap on retained topics"),
        "the refusal is logged:\n{}",
        node_a.log_text()
    );
    let stored_in = started.elapsed();
    let memory = cluster
        .query_text(master, &["MEMORY", "USAGE", "{retained}:topics"])
        .unwrap();

    let spawned = Instant::now();
    let node_b = Node::start("node-b", &url, false, none);
    let loaded = format!("retained messages loaded from Redis topics={MAX_TOPICS}");
    while !node_b.log_text().contains(&loaded) {
        assert!(
            spawned.elapsed() < Duration::from_secs(120),
            "node B did not load them:\n{}",
            node_b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{} retained publishes of 64 bytes stored in {stored_in:?} (one refused by the cap), the hash takes {} bytes in Redis; a node started afterwards had loaded all {MAX_TOPICS} {:?} after its process was spawned",
        MAX_TOPICS + 1,
        memory.trim(),
        spawned.elapsed()
    );
    // (A handler: devices subscribe to their own topics only.)
    let mut reader = handler(&node_b).await;
    assert_eq!(
        reader.subscribe("load/9999", QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let got = publishes_until(&mut reader, "load/9999", SPREAD_WITHIN)
        .await
        .expect("the retained message")
        .pop()
        .unwrap();
    assert!(got.retain);
    assert_eq!(&got.payload[..], &[b'x'; 64][..]);
}

/// `kill -9` of the master holding the `{retained}` slot, its replica
/// promoted: the nodes store to and follow the promoted one (the store
/// retries, the followers reconnect), so a retained message published
/// after the kill still reaches another node; one stored before it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_follow_a_failover_of_their_master() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7303";
    let (before, after) = (format!("{uid}_before"), format!("{uid}_after"));
    let mut handler_a = handler(&node_a).await;
    retain(&mut handler_a, &before, b"1").await;
    retained_on(&node_b, uid, &before).await;

    let master = cluster.master_of_key("{retained}:topics");
    // Replication is asynchronous: a write the master dies before copying
    // is lost (ARCHITECTURE.md, "What a failover can lose"), and a node
    // following the promoted replica then deletes it too. Applied by the
    // replica first (its replication offset, not a `WAIT` from the test's
    // own connection, which wrote nothing and so proves nothing).
    let replica = blocking(|| cluster.wait_replicated(master));
    cluster.kill(master);
    let killed = Instant::now();
    // Its PUBACK waits for the store, which retries for 10 s: meanwhile,
    // unless its peers promoted it already, the replica is promoted by
    // hand, as an operator would.
    handler_a
        .client
        .publish(&after, QoS::AtLeastOnce, true, b"2".to_vec())
        .await
        .unwrap();
    if cluster.role(replica) != Some("master") {
        blocking(|| cluster.failover_forced(replica, "TAKEOVER"));
    }
    assert_eq!(
        handler_a.puback().await.reason,
        PubAckReason::Success,
        "stored by the promoted master:\n{}",
        node_a.log_text()
    );
    println!(
        "its PUBACK came {:?} after the kill (stored on the promoted master)",
        killed.elapsed()
    );
    // The store retries for 10 s; a follower reconnects within 5 s of
    // backoff once the slot map names the new master.
    let got = retained_within(&node_b, uid, &after, Duration::from_secs(30)).await;
    assert_eq!(&got.payload[..], b"2");
    println!(
        "a retained message published right after kill -9 of the {{retained}} master reached node B {:?} after the kill",
        killed.elapsed()
    );
    let got = retained_on(&node_b, uid, &before).await;
    assert_eq!(&got.payload[..], b"1");
    // A node started after the failover loads both from the promoted master.
    let node_c = Node::start("node-c", &url, false, none);
    for (topic, payload) in [(&before, b"1"), (&after, b"2")] {
        let got = retained_on(&node_c, uid, topic).await;
        assert_eq!(&got.payload[..], payload);
    }
}

/// What the promoted replica of a failover may hold: a log rewound below
/// the last change a node applied (the replica never copied it) whose new
/// changes Redis numbered after the replica's own newest (its clock
/// behind the dead master's). Made by hand on the `{retained}` master,
/// the node's connections then cut as a `kill -9` cuts them: the node
/// loads the hash again (the lost change deleted, the new one retained)
/// instead of reading on after its own last id, which would skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reloads_a_log_rewound_below_its_last_change() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let uid = "7304";
    let (lost, new) = (format!("{uid}_lost"), format!("{uid}_new"));
    let mut handler_a = handler(&node_a).await;
    retain(&mut handler_a, &lost, b"1").await;
    assert_eq!(&retained_on(&node_b, uid, &lost).await.payload[..], b"1");

    let master = cluster.master_of_key("{retained}:topics");
    let entry = cluster::entry::Entry::encode(
        "node-x",
        &broker::router::protocol::Publish::new(new.as_bytes().to_vec(), b"2".to_vec(), true),
        &None,
    )
    .unwrap();
    let stored_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut value = stored_ms.to_be_bytes().to_vec();
    value.extend_from_slice(&entry);
    // (Binary values: a connection of the test's own to that master.)
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.port(master)))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("DEL").arg("{retained}:log");
    pipe.cmd("HDEL").arg("{retained}:topics").arg(&lost);
    pipe.cmd("HSET")
        .arg("{retained}:topics")
        .arg(&new)
        .arg(&value);
    pipe.cmd("XADD")
        .arg("{retained}:log")
        .arg("1-1")
        .arg("t")
        .arg(&new)
        .arg("v")
        .arg(&value);
    pipe.cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal");
    pipe.query::<()>(&mut conn).unwrap();

    let got = retained_on(&node_b, uid, &new).await;
    assert_eq!(&got.payload[..], b"2");
    assert!(
        node_b
            .log_text()
            .contains("the retained log no longer holds the last change applied here"),
        "{}",
        node_b.log_text()
    );
    // The reload deleted the lost change before it applied the new one.
    let mut phone = device(&node_b, uid).await;
    assert_eq!(
        phone.subscribe(&lost, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    phone.assert_no_publish(Duration::from_millis(500)).await;
}
