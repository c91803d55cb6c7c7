//! Persistent device sessions follow the device to any node, on a real
//! Redis Cluster (3 masters, 3 replicas on loopback) with every node a
//! process of its own and real MQTT 5 clients (rumqttc, which acknowledges
//! each QoS 1 publish itself):
//! - `kill -9` of the device's node while a handler on another node sends
//!   it numbered QoS 1 replies: the device reconnects to a third node with
//!   Clean Start 0, gets Session Present 1 and every reply, in order (the
//!   first arrival of each), duplicates counted and printed;
//! - a move between two live nodes keeps the subscription, its options
//!   and its identifier (no SUBSCRIBE by the client), and what was
//!   published while the device was away; the old node releases the
//!   session;
//! - Clean Start 1 on another node: Session Present 0, nothing from before;
//! - an expired session is not resumed.

mod nodes;

use e2e::clients::Seen;
use nodes::{
    handler, next, persistent_phone as phone, probe, reply, subscribe_with_id, Node, ANSWER_WITHIN,
};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use testkit::RedisCluster;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_node_is_killed_gets_every_reply_it_was_owed_on_another_node() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let mut node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let node_c = Node::start("node-c", &url, false, none);
    let uid = "7101";
    let topic = format!("{uid}_note");

    let mut on_a = phone(&node_a, uid, "phone-7101", false, 600);
    assert!(!on_a.connected().await.session_present);
    assert_eq!(
        on_a.subscribe(&topic, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let worker = handler(&node_b, "worker-b");
    probe(&mut on_a, &worker, &topic).await;

    // Numbered replies from node B, 5 ms apart; node A dies at reply 150,
    // and the device reconnects to node C 100 replies later: they are
    // owed, with whatever node A had not had acknowledged.
    let total = 400u32;
    let kill_at = 150u32;
    let back_at = 250u32;
    let mut received = Vec::new();
    let mut on_c = None;
    let take = |p: Publish, received: &mut Vec<u32>| {
        if let Ok(n) = String::from_utf8_lossy(&p.payload).parse::<u32>() {
            received.push(n);
        }
    };
    for i in 0..total {
        if i == kill_at {
            while let Some(Seen::Packet(Packet::Publish(p))) =
                on_a.next_within(Duration::from_millis(1)).await
            {
                take(p, &mut received);
            }
            node_a.process.kill9();
        }
        if i == back_at {
            let mut moved = phone(&node_c, uid, "phone-7101", false, 600);
            let ack = moved.connected().await;
            assert!(
                ack.session_present,
                "Session Present 1 on node C:\n{}",
                node_c.log_text()
            );
            on_c = Some(moved);
        }
        reply(&worker, &topic, i.to_string()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        if i < kill_at || i >= back_at {
            let client = on_c.as_mut().unwrap_or(&mut on_a);
            while let Some(Seen::Packet(Packet::Publish(p))) =
                client.next_within(Duration::from_millis(1)).await
            {
                take(p, &mut received);
            }
        }
    }
    let on_c = on_c.as_mut().unwrap();
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !received.contains(&(total - 1)) && Instant::now() < deadline {
        if let Some(p) = next(on_c, Duration::from_millis(200)).await {
            take(p, &mut received);
        }
    }
    while let Some(p) = next(on_c, Duration::from_millis(500)).await {
        take(p, &mut received);
    }

    let got: HashSet<u32> = received.iter().copied().collect();
    let missing: Vec<u32> = (0..total).filter(|n| !got.contains(n)).collect();
    let duplicates = received.len() - got.len();
    let mut seen = HashSet::new();
    let first: Vec<u32> = received
        .iter()
        .copied()
        .filter(|n| seen.insert(*n))
        .collect();
    println!(
        "kill -9 of the device's node at reply {kill_at} of {total}, back on another node at {back_at}: {} received, {} missing, {duplicates} duplicates",
        got.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "replies missing: {missing:?}\nnode C:\n{}",
        node_c.log_text()
    );
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "replies out of order: {first:?}"
    );
    assert!(node_c
        .log_text()
        .contains("persistent session resumed from another node"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_move_between_live_nodes_with_their_subscriptions() {
    let cluster = blocking(RedisCluster::start);
    let url = cluster.redis_url();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &url, false, none);
    let node_b = Node::start("node-b", &url, false, none);
    let node_c = Node::start("node-c", &url, false, none);
    let worker = handler(&node_b, "worker-b");

    // A move between live nodes: the subscription, its options and its
    // identifier follow; what was published while away arrives.
    let uid = "7201";
    let topic = format!("{uid}_note");
    let mut on_a = phone(&node_a, uid, "phone-7201", false, 600);
    assert!(!on_a.connected().await.session_present);
    subscribe_with_id(&mut on_a, &topic, 7).await;
    let suback = on_a.suback().await;
    assert_eq!(
        suback.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    probe(&mut on_a, &worker, &topic).await;
    on_a.client.disconnect().await.unwrap();
    on_a.closed().await;
    reply(&worker, &topic, "while away".into()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut on_c = phone(&node_c, uid, "phone-7201", false, 600);
    let ack = on_c.connected().await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(ack.session_present, "{}", node_c.log_text());
    let owed = next(&mut on_c, ANSWER_WITHIN)
        .await
        .unwrap_or_else(|| panic!("nothing owed arrived:\n{}", node_c.log_text()));
    assert_eq!(&owed.payload[..], b"while away");
    let ids = |p: &Publish| {
        p.properties
            .as_ref()
            .map(|p| p.subscription_identifiers.clone())
    };
    assert_eq!(ids(&owed), Some(vec![7]));
    reply(&worker, &topic, "after the move".into()).await;
    let live = next(&mut on_c, ANSWER_WITHIN).await.expect("a live reply");
    assert_eq!(&live.payload[..], b"after the move");
    assert_eq!(ids(&live), Some(vec![7]));
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !node_a
        .log_text()
        .contains("a session kept here reconnected on another node: released")
    {
        assert!(
            Instant::now() < deadline,
            "node A kept the session:\n{}",
            node_a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A live session taken over from another node: the old connection
    // ends (0x8E), the new one resumes the session.
    let uid = "7204";
    let topic = format!("{uid}_note");
    let mut on_a = phone(&node_a, uid, "phone-7204", false, 600);
    on_a.connected().await;
    subscribe_with_id(&mut on_a, &topic, 9).await;
    on_a.suback().await;
    probe(&mut on_a, &worker, &topic).await;
    let mut on_c = phone(&node_c, uid, "phone-7204", false, 600);
    assert!(on_c.connected().await.session_present);
    let ended = on_a.closed().await;
    assert!(ended.contains("SessionTakenOver"), "{ended}");
    reply(&worker, &topic, "taken over".into()).await;
    let live = next(&mut on_c, ANSWER_WITHIN).await.expect("a reply");
    assert_eq!(&live.payload[..], b"taken over");
    assert_eq!(ids(&live), Some(vec![9]));
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !node_a
        .log_text()
        .contains("a session taken over on another node: released here")
    {
        assert!(Instant::now() < deadline, "{}", node_a.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Clean Start 1 on another node: nothing from before.
    let uid = "7202";
    let topic = format!("{uid}_note");
    let mut on_a = phone(&node_a, uid, "phone-7202", false, 600);
    on_a.connected().await;
    assert_eq!(
        on_a.subscribe(&topic, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    probe(&mut on_a, &worker, &topic).await;
    on_a.client.disconnect().await.unwrap();
    on_a.closed().await;
    reply(&worker, &topic, "before the clean start".into()).await;
    let mut on_c = phone(&node_c, uid, "phone-7202", true, 600);
    assert!(!on_c.connected().await.session_present);
    reply(&worker, &topic, "unsubscribed".into()).await;
    on_c.assert_no_publish(Duration::from_secs(2)).await;

    // An expired session is not resumed: its record is gone.
    let uid = "7203";
    let topic = format!("{uid}_note");
    let mut on_a = phone(&node_a, uid, "phone-7203", false, 1);
    on_a.connected().await;
    assert_eq!(
        on_a.subscribe(&topic, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let key = "p:{7203}:phone-7203";
    let master = cluster.master_of_key(key);
    let exists = |cluster: &RedisCluster| {
        matches!(
            cluster.query(master, &["EXISTS", key]),
            Ok(redis::Value::Int(1))
        )
    };
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !exists(&cluster) {
        assert!(Instant::now() < deadline, "no record written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    on_a.client.disconnect().await.unwrap();
    on_a.closed().await;
    while exists(&cluster) {
        assert!(
            Instant::now() < deadline,
            "the expired record is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reply(&worker, &topic, "after the expiry".into()).await;
    let mut on_c = phone(&node_c, uid, "phone-7203", false, 600);
    assert!(!on_c.connected().await.session_present);
    on_c.assert_no_publish(Duration::from_secs(2)).await;
}
