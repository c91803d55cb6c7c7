//! Several broker nodes as separate processes of the built `broker` binary,
//! sharing one real `redis-server`: a device on node A served by the
//! built-in handlers running on node B (sync, publish to a platform,
//! contacts, tokens), a reply published on node B reaching the user's
//! sessions on node A (through the gate's inbox at QoS 0, through the
//! router at QoS 1), and a command topic declared by a handler on node B
//! opened to devices on node A, their commands arriving with the identity
//! stamps node A's gate set (a forged `user_id` replaced); and a
//! persistent session whose node is killed resumed on the node its
//! replies come from (they go through the stream there too, so the
//! device's acknowledgements move its cursor), every reply in order.

mod nodes;

use e2e::clients::{user_property, Seen, V5Client};
use nodes::{
    device, handler, next, next_publish, persistent_phone, probe, reply,
    serve_every_builtin_command, subscribe_with_id, token, Node, ANSWER_WITHIN, HANDLER_KEY,
    START_WITHIN,
};
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::{Platform, RedisServer};

/// What `redis-cli` prints for `args`.
fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Redis commands executed so far, by name (INFO commandstats).
fn commandstats(redis: &RedisServer) -> std::collections::HashMap<String, u64> {
    redis_cli(redis, &["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_on_node_b_serve_a_device_on_node_a() {
    let redis = RedisServer::start();
    let platform = Platform::start().await;
    let mail = platform.url("/mail");
    let node_b = Node::start("node-b", &redis.url(), true, &mail);
    let node_a = Node::start("node-a", &redis.url(), false, &mail);
    let uid = "7001";
    let mut phone = device(
        &node_a,
        uid,
        &["sync", "publish", "contact_list", "list_tokens"],
    )
    .await;

    // Contacts, tokens, sync and publish: answered by node B's handlers.
    serve_every_builtin_command(&mut phone, uid, &platform, "hello across nodes").await;

    // Each command crossed through Redis, not a local path: node A runs no
    // handler, and node B's log shows its readers.
    assert!(node_b
        .log_text()
        .contains("reading a command topic from Redis"));
    let stats = commandstats(&redis);
    assert!(stats.get("xadd").copied().unwrap_or(0) >= 4, "{stats:?}");
    assert!(stats.get("xack").copied().unwrap_or(0) >= 4, "{stats:?}");
    assert!(
        stats.get("spublish").copied().unwrap_or(0) >= 4,
        "{stats:?}"
    );
    drop(node_a);
    drop(node_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_commands_cross_nodes_with_their_stamps() {
    let redis = RedisServer::start();
    let node_a = Node::start("node-a", &redis.url(), false, "http://127.0.0.1:9/none");
    let node_b = Node::start("node-b", &redis.url(), false, "http://127.0.0.1:9/none");
    let uid = "7002";

    // Two sessions of the user on node A: QoS 0 (the gate's inbox) and QoS
    // 1 (the router).
    let mut inbox = V5Client::connect(node_a.target(), "inbox", "JWT", &token(uid), |_| {});
    inbox.connected().await;
    assert_eq!(
        inbox
            .subscribe(&format!("{uid}_note"), QoS::AtMostOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    let mut routed = device(&node_a, uid, &["note"]).await;

    // A handler on node B, in group `jobs`, declaring the command topic
    // `resize`, which no node configured.
    let mut handler =
        V5Client::connect(node_b.target(), "worker-b", "handler", HANDLER_KEY, |_| {});
    handler.connected().await;
    assert_eq!(
        handler
            .subscribe("$share/jobs/resize", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    // Node B announces the declaration in Redis; node A reads it within
    // its sharing period (until then a device's publish there is refused).
    let deadline = Instant::now() + START_WITHIN;
    while !redis_cli(&redis, &["HKEYS", "decl"]).contains("resize") {
        assert!(Instant::now() < deadline, "node B never announced `resize`");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // A device command on node A reaches the handler on node B with the
    // identity node A's gate stamped (the forged one dropped).
    let deadline = Instant::now() + START_WITHIN;
    let command = loop {
        let forged = rumqttc::v5::mqttbytes::v5::PublishProperties {
            user_properties: vec![("user_id".into(), "someone-else".into())],
            ..Default::default()
        };
        routed
            .client
            .publish_with_properties("resize", QoS::AtLeastOnce, false, "img-1", forged)
            .await
            .unwrap();
        if let Some(Seen::Packet(Packet::Publish(p))) =
            handler.next_within(Duration::from_millis(700)).await
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the command never reached node B:\n{}\n{}",
            node_a.log_text(),
            node_b.log_text()
        );
    };
    assert_eq!(&command.payload[..], b"img-1");
    assert_eq!(user_property(&command, "user_id"), vec![uid]);
    assert_eq!(user_property(&command, "client_id").len(), 1);
    assert_eq!(user_property(&command, "token_iat").len(), 1);

    // The handler's reply on node B reaches both sessions on node A, in
    // order.
    for i in 0..20 {
        handler
            .client
            .publish(
                format!("{uid}_note"),
                QoS::AtLeastOnce,
                false,
                format!("r{i}"),
            )
            .await
            .unwrap();
    }
    for client in [&mut inbox, &mut routed] {
        let mut got = Vec::new();
        while got.len() < 20 {
            match next_publish(client, ANSWER_WITHIN).await {
                Some((topic, payload)) if topic == format!("{uid}_note") => {
                    got.push(String::from_utf8(payload).unwrap())
                }
                Some(_) => {}
                None => panic!("replies missing across nodes: {got:?}"),
            }
        }
        let expected: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        assert_eq!(got, expected);
    }
    assert!(
        node_a
            .log_text()
            .contains("cross-node delivery over Redis is on"),
        "{}",
        node_a.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_resumes_on_the_node_its_replies_come_from() {
    let redis = RedisServer::start();
    let none = "http://127.0.0.1:9/none";
    let mut node_a = Node::start("node-a", &redis.url(), false, none);
    let node_b = Node::start("node-b", &redis.url(), false, none);
    let uid = "7301";
    let topic = format!("{uid}_note");
    let mut on_a = persistent_phone(&node_a, uid, "phone-7301", false, 600);
    assert!(!on_a.connected().await.session_present);
    subscribe_with_id(&mut on_a, &topic, 3).await;
    on_a.suback().await;
    let worker = handler(&node_b, "worker-b");
    probe(&mut on_a, &worker, &topic).await;

    // 60 replies; node A dies after the first 30 were sent, and the
    // device resumes on node B, where the replies are published.
    let mut received = Vec::new();
    let take = |p: rumqttc::v5::mqttbytes::v5::Publish, received: &mut Vec<u32>| {
        let ids = p.properties.map(|p| p.subscription_identifiers);
        assert_eq!(ids, Some(vec![3]), "the subscription identifier");
        if let Ok(n) = String::from_utf8_lossy(&p.payload).parse::<u32>() {
            received.push(n);
        }
    };
    for i in 0..30 {
        reply(&worker, &topic, i.to_string()).await;
    }
    while let Some(p) = next(&mut on_a, Duration::from_millis(300)).await {
        take(p, &mut received);
    }
    node_a.process.kill9();
    let mut on_b = persistent_phone(&node_b, uid, "phone-7301", false, 600);
    assert!(
        on_b.connected().await.session_present,
        "{}",
        node_b.log_text()
    );
    for i in 30..60 {
        reply(&worker, &topic, i.to_string()).await;
    }
    while let Some(p) = next(&mut on_b, ANSWER_WITHIN).await {
        take(p, &mut received);
        if received.contains(&59) {
            break;
        }
    }
    while let Some(p) = next(&mut on_b, Duration::from_millis(500)).await {
        take(p, &mut received);
    }
    let mut first = Vec::new();
    for n in &received {
        if !first.contains(n) {
            first.push(*n);
        }
    }
    println!(
        "one Redis, resumed on the replies' node: {} received, {} duplicates",
        received.len(),
        received.len() - first.len()
    );
    assert_eq!(
        first,
        (0..60).collect::<Vec<u32>>(),
        "{}",
        node_b.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_is_refused_while_redis_cannot_say_where_it_lives() {
    let mut redis = RedisServer::start();
    let none = "http://127.0.0.1:9/none";
    let node_a = Node::start("node-a", &redis.url(), false, none);
    redis.stop();
    // Whether the session lives on another node cannot be read: Server
    // unavailable, not a session resumed empty, and not a hang.
    let mut phone = persistent_phone(&node_a, "7401", "phone-7401", false, 600);
    let refused = phone.connack().await.expect_err("refused");
    assert!(refused.contains("ServerUnavailable"), "{refused}");
    // A clean start reads nothing: admitted.
    let mut clean = persistent_phone(&node_a, "7401", "phone-7402", true, 0);
    clean.connected().await;
}
