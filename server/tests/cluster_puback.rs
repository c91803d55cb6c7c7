//! A device's QoS 1 command on a node with `REDIS_URL` (the built `broker`
//! binary and a real `redis-server`): its PUBACK comes only once the
//! command is in its topic's stream (a handler's QoS 1 reply's once it is in
//! the user's stream; Redis frozen: no PUBACK; thawed: the
//! PUBACK, and the entry is there); with Redis killed, an MQTT 5 device
//! gets PUBACK `0x80` within the wait's deadline, an MQTT 3.1.1 device's
//! connection ends without a PUBACK, and the node keeps serving.

mod nodes;

use e2e::clients::{Seen, V4Client, V5Client};
use nodes::{device, token, Node, HANDLER_KEY};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::RedisServer;

/// What `redis-cli` prints for `args`.
fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every entry of the `sync` command topic's partitions, as printed.
fn sync_streams(redis: &RedisServer) -> String {
    (0..4)
        .map(|p| redis_cli(redis, &["XRANGE", &format!("c:{{sync:{p}}}"), "-", "+"]))
        .collect()
}

/// The next PUBACK within `within`, skipping other packets.
async fn puback_within(client: &mut V5Client, within: Duration) -> Option<(u16, PubAckReason)> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match client.next_within(left).await? {
            Seen::Packet(Packet::PubAck(ack)) => return Some((ack.pkid, ack.reason)),
            Seen::Packet(_) => {}
            Seen::Error(e) => panic!("connection failed: {e}"),
        }
    }
}

/// The pid of the running `redis-server`.
fn redis_pid(redis: &RedisServer) -> String {
    redis_cli(redis, &["INFO", "server"])
        .lines()
        .find_map(|line| line.trim().strip_prefix("process_id:").map(str::to_owned))
        .expect("redis process_id")
}

fn signal(pid: &str, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid)
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_puback_comes_after_its_append_and_says_when_redis_failed() {
    let mut redis = RedisServer::start();
    let node = Node::start("node-a", &redis.url(), false, "http://127.0.0.1:9/none");
    let uid = "7101";
    let mut phone = device(&node, uid, &[]).await;

    // Each PUBACK comes once the command is in the stream.
    for i in 0..20 {
        let body = format!("cmd-{i}");
        phone
            .client
            .publish("sync", QoS::AtLeastOnce, false, body.clone())
            .await
            .unwrap();
        let (_, reason) = puback_within(&mut phone, Duration::from_secs(10))
            .await
            .expect("a PUBACK");
        assert_eq!(reason, PubAckReason::Success);
        assert!(
            sync_streams(&redis).contains(&body),
            "{body} acknowledged but not in the stream"
        );
    }

    // A handler's QoS 1 reply too: acknowledged once in the user's stream.
    let mut handler = V5Client::connect(node.target(), "worker", "handler", HANDLER_KEY, |_| {});
    handler.connected().await;
    handler
        .client
        .publish(format!("{uid}_note"), QoS::AtLeastOnce, false, "reply-1")
        .await
        .unwrap();
    let (_, reason) = puback_within(&mut handler, Duration::from_secs(10))
        .await
        .expect("the handler's PUBACK");
    assert_eq!(reason, PubAckReason::Success);
    let replies = redis_cli(&redis, &["XRANGE", &format!("r:{{{uid}}}"), "-", "+"]);
    assert!(replies.contains("reply-1"), "{replies}");
    // Its first reply gave the user's stream its expiry: 24 h + 1 h
    // (`cluster/src/stream_ttl.rs`), so more than 24 h are left.
    let pttl = redis_cli(&redis, &["PTTL", &format!("r:{{{uid}}}")]);
    let pttl: i64 = pttl.trim().parse().expect("PTTL is a number");
    assert!(pttl > 24 * 3_600_000 && pttl <= 25 * 3_600_000, "{pttl}");

    // Redis frozen: the append cannot finish, so no PUBACK; thawed, the
    // PUBACK comes and the entry is there.
    let pid = redis_pid(&redis);
    signal(&pid, "STOP");
    phone
        .client
        .publish("sync", QoS::AtLeastOnce, false, "while-frozen")
        .await
        .unwrap();
    let early = puback_within(&mut phone, Duration::from_millis(1000)).await;
    signal(&pid, "CONT");
    assert_eq!(early, None, "a PUBACK before Redis could append");
    let (_, reason) = puback_within(&mut phone, Duration::from_secs(20))
        .await
        .expect("the PUBACK once Redis answered");
    assert_eq!(reason, PubAckReason::Success);
    assert!(sync_streams(&redis).contains("while-frozen"));

    // Redis gone: MQTT 5 is told 0x80 within the wait's deadline (15 s);
    // MQTT 3.1.1 cannot be told, so its connection ends without a PUBACK.
    let mut old = V4Client::connect(node.target(), "old-phone", "JWT", &token(uid), |_| {});
    old.connected().await;
    redis.stop();
    let sent = Instant::now();
    phone
        .client
        .publish("sync", QoS::AtLeastOnce, false, "redis-gone")
        .await
        .unwrap();
    old.client
        .publish("sync", rumqttc::QoS::AtLeastOnce, false, "redis-gone-v4")
        .await
        .unwrap();
    let (_, reason) = puback_within(&mut phone, Duration::from_secs(30))
        .await
        .expect("a PUBACK saying it failed");
    assert_eq!(reason, PubAckReason::UnspecifiedError);
    println!("PUBACK 0x80 {:?} after the publish", sent.elapsed());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match old.next_within(left).await {
            Some(Seen::Packet(rumqttc::Packet::PubAck(ack))) => {
                panic!("MQTT 3.1.1 PUBACK for a command not stored: {ack:?}")
            }
            Some(Seen::Packet(_)) => {}
            // The connection ended (the event loop reports it).
            Some(Seen::Error(_)) => break,
            None => panic!("the 3.1.1 connection stayed up"),
        }
    }

    // The node keeps running and serving its MQTT 5 device.
    let mut node = node;
    assert!(
        node.process.child.try_wait().unwrap().is_none(),
        "node exited"
    );
    phone
        .client
        .publish("sync", QoS::AtMostOnce, false, "still-here")
        .await
        .unwrap();
    while let Some(seen) = phone.next_within(Duration::from_millis(500)).await {
        assert!(
            matches!(seen, Seen::Packet(_)),
            "the MQTT 5 connection ended"
        );
    }
    let log = node.log_text();
    assert!(log.contains("commands not appended to Redis"), "{log}");
}
