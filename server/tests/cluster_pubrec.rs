//! A device's QoS 2 command on a node with `REDIS_URL` (the built `broker`
//! binary and a real `redis-server`), sent by a raw MQTT 5 client that
//! drives the exchange itself: its PUBREC comes only once the command is in
//! its topic's stream; a retransmission (DUP, same packet id) before the
//! PUBREL, whether its PUBREC came or not, is answered PUBREC and appended
//! once; the PUBREL gets PUBCOMP, and one for an id nobody holds `0x92`; a
//! handler gets the command once, and its own QoS 2 reply is PUBREC'd once
//! in the user's stream. Redis frozen: no PUBREC until it thaws. Redis
//! killed: PUBREC `0x80` for MQTT 5, an MQTT 3.1.1 connection closed
//! without a PUBREC. An MQTT 3.1.1 persistent session's QoS 2 command
//! PUBREC'd before its connection dropped is sent again (DUP) on the next
//! connection: PUBREC, not appended again.

mod nodes;

use bytes::BytesMut;
use e2e::clients::{Seen, V4Client, V5Client};
use nodes::{token, Node, ANSWER_WITHIN, HANDLER_KEY};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{
    Packet, PubCompReason, PubRecReason, PubRel, PubRelReason, Publish,
};
use rumqttc::v5::mqttbytes::QoS;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What `redis-cli` prints for `args`.
fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `sync` command topic's partitions.
fn sync_keys() -> Vec<String> {
    (0..4).map(|p| format!("c:{{sync:{p}}}")).collect()
}

/// How many entries of the `sync` streams carry `body`.
fn in_sync_streams(redis: &RedisServer, body: &str) -> usize {
    sync_keys()
        .iter()
        .map(|key| {
            redis_cli(redis, &["XRANGE", key, "-", "+"])
                .lines()
                .filter(|line| line.contains(body))
                .count()
        })
        .sum()
}

/// Every `sync` entry, counted by `XLEN`.
fn sync_len(redis: &RedisServer) -> usize {
    sync_keys()
        .iter()
        .map(|key| {
            redis_cli(redis, &["XLEN", key])
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum()
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

/// An MQTT 5 device that writes its packets itself (no library would send
/// a retransmission on a live connection, or hold back its PUBREL).
struct RawDevice {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawDevice {
    async fn connect(node: &Node, uid: &str) -> RawDevice {
        let stream = TcpStream::connect(node.tcp).await.expect("connect");
        let mut device = RawDevice {
            stream,
            buf: BytesMut::new(),
        };
        let id = format!("raw-{}", rand::random::<u32>());
        device
            .stream
            .write_all(&e2e::raw::connect(5, &id, 60, &token(uid)))
            .await
            .expect("CONNECT");
        match device.next_within(Duration::from_secs(10)).await {
            Some(Packet::ConnAck(_)) => device,
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).expect("encodes");
        self.stream.write_all(&out).await.expect("write");
    }

    /// A QoS 2 command `body` to `sync` with `pkid`; `dup` for a
    /// retransmission.
    async fn command(&mut self, body: &str, pkid: u16, dup: bool) {
        let mut publish = Publish::new("sync", QoS::ExactlyOnce, body.to_owned(), None);
        publish.pkid = pkid;
        publish.dup = dup;
        self.send(Packet::Publish(publish)).await;
    }

    async fn release(&mut self, pkid: u16) {
        let release = PubRel {
            pkid,
            reason: PubRelReason::Success,
            properties: None,
        };
        self.send(Packet::PubRel(release)).await;
    }

    /// The next packet within `within`; `None` when none came or the
    /// broker closed the connection.
    async fn next_within(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Packet::read(&mut self.buf, None) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("the broker sent a malformed packet: {e:?}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next PUBREC within `within` (other packets skipped).
    async fn pubrec_within(&mut self, within: Duration) -> Option<(u16, PubRecReason)> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next_within(left).await? {
                Packet::PubRec(rec) => return Some((rec.pkid, rec.reason)),
                _ => continue,
            }
        }
    }

    /// The next PUBCOMP within `within` (other packets skipped).
    async fn pubcomp_within(&mut self, within: Duration) -> Option<(u16, PubCompReason)> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next_within(left).await? {
                Packet::PubComp(comp) => return Some((comp.pkid, comp.reason)),
                _ => continue,
            }
        }
    }
}

/// Waits until this node's readers created the handlers' consumer group
/// on every `sync` partition (created at the stream's end: a command
/// appended before would not be read).
async fn groups_ready(redis: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sync_keys()
        .iter()
        .all(|key| redis_cli(redis, &["XINFO", "GROUPS", key]).contains("name"))
    {
        assert!(
            Instant::now() < deadline,
            "the handler's groups were not created"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `sync` commands (payloads) the handler got within `within`, its
/// QoS 2 flows completed by its client library.
async fn commands_within(handler: &mut V5Client, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match handler.next_within(left).await {
            Some(Seen::Packet(rumqttc::v5::mqttbytes::v5::Packet::Publish(p))) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Some(Seen::Packet(_)) => {}
            Some(Seen::Error(e)) => panic!("the handler's connection failed: {e}"),
            None => break,
        }
    }
    got
}

/// The handler's QoS 2 reply `body`: its PUBREC (success) once it is in
/// `stream`, once, then its PUBCOMP.
async fn handler_pubrec_once_stored(
    handler: &mut V5Client,
    redis: &RedisServer,
    stream: &str,
    body: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recs = 0;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("the handler's PUBREC and PUBCOMP");
        match handler.next_within(left).await {
            Some(Seen::Packet(rumqttc::v5::mqttbytes::v5::Packet::PubRec(rec))) => {
                assert_eq!(rec.reason, PubRecReason::Success);
                let replies = redis_cli(redis, &["XRANGE", stream, "-", "+"]);
                assert_eq!(
                    replies.matches(body).count(),
                    1,
                    "{body} at its PUBREC: {replies}"
                );
                recs += 1;
            }
            Some(Seen::Packet(rumqttc::v5::mqttbytes::v5::Packet::PubComp(comp))) => {
                assert_eq!(comp.reason, PubCompReason::Success);
                break;
            }
            Some(Seen::Packet(_)) => {}
            Some(Seen::Error(e)) => panic!("the handler's connection failed: {e}"),
            None => panic!("no PUBCOMP for the handler's reply {body}"),
        }
    }
    assert_eq!(recs, 1, "one PUBREC for {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_commands_pubrec_comes_after_its_append_once_per_packet_id() {
    let mut redis = RedisServer::start();
    let node = Node::start("node-a", &redis.url(), false, "http://127.0.0.1:9/none");
    let uid = "7201";
    let mut handler = V5Client::connect(node.target(), "worker", "handler", HANDLER_KEY, |_| {});
    handler.connected().await;
    assert_eq!(
        handler.subscribe("sync", QoS::ExactlyOnce).await,
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(QoS::ExactlyOnce)
    );
    groups_ready(&redis).await;
    let mut phone = RawDevice::connect(&node, uid).await;

    // Each PUBREC comes once the command is in the stream; the same packet
    // id sent again before the PUBREL is answered PUBREC again, not
    // appended again.
    for pkid in 1..=5u16 {
        let body = format!("q2-cmd-{pkid}-");
        phone.command(&body, pkid, false).await;
        let rec = phone.pubrec_within(Duration::from_secs(10)).await;
        assert_eq!(rec, Some((pkid, PubRecReason::Success)));
        assert_eq!(in_sync_streams(&redis, &body), 1, "{body} at its PUBREC");
        phone.command(&body, pkid, true).await;
        let rec = phone.pubrec_within(Duration::from_secs(10)).await;
        assert_eq!(rec, Some((pkid, PubRecReason::Success)), "again");
        phone.release(pkid).await;
        let comp = phone.pubcomp_within(Duration::from_secs(10)).await;
        assert_eq!(comp, Some((pkid, PubCompReason::Success)));
        assert_eq!(in_sync_streams(&redis, &body), 1, "{body} appended once");
    }
    assert_eq!(sync_len(&redis), 5, "XLEN: one entry per command");
    // A PUBREL for an id nobody holds: PUBCOMP 0x92.
    phone.release(77).await;
    let comp = phone.pubcomp_within(Duration::from_secs(10)).await;
    assert_eq!(comp, Some((77, PubCompReason::PacketIdentifierNotFound)));

    // The handler gets each command once (not also from the router).
    let mut got = commands_within(&mut handler, ANSWER_WITHIN).await;
    got.sort();
    let expected: Vec<String> = (1..=5).map(|pkid| format!("q2-cmd-{pkid}-")).collect();
    assert_eq!(got, expected, "each command once");

    // The handler's QoS 2 reply: PUBREC once it is in the user's stream,
    // and once only.
    handler
        .client
        .publish(format!("{uid}_note"), QoS::ExactlyOnce, false, "q2-reply")
        .await
        .unwrap();
    let user_stream = format!("r:{{{uid}}}");
    handler_pubrec_once_stored(&mut handler, &redis, &user_stream, "q2-reply").await;

    // A QoS 2 reply a device here reads through the router (a QoS 1
    // subscription): the router delivers it and owns its exactly once;
    // its PUBREC still waits for the append, and the device gets it once.
    let mut reader = nodes::device(&node, uid, &["note2"]).await;
    handler
        .client
        .publish(format!("{uid}_note2"), QoS::ExactlyOnce, false, "q2-routed")
        .await
        .unwrap();
    handler_pubrec_once_stored(&mut handler, &redis, &user_stream, "q2-routed").await;
    let mut delivered = 0;
    while let Some((topic, payload)) =
        nodes::next_publish(&mut reader, Duration::from_secs(2)).await
    {
        assert_eq!(topic, format!("{uid}_note2"));
        assert_eq!(payload, b"q2-routed");
        delivered += 1;
    }
    assert_eq!(delivered, 1, "the routed QoS 2 reply delivered once");

    // Redis frozen: the append cannot finish, so no PUBREC, and the
    // retransmission meanwhile is not appended again; thawed, one PUBREC,
    // one entry.
    let pid = redis_pid(&redis);
    signal(&pid, "STOP");
    phone.command("while-frozen", 6, false).await;
    let early = phone.pubrec_within(Duration::from_millis(1000)).await;
    phone.command("while-frozen", 6, true).await;
    let early_again = phone.pubrec_within(Duration::from_millis(300)).await;
    signal(&pid, "CONT");
    assert_eq!(early, None, "a PUBREC before Redis could append");
    assert_eq!(early_again, None, "a PUBREC before Redis could append");
    let rec = phone.pubrec_within(Duration::from_secs(20)).await;
    assert_eq!(rec, Some((6, PubRecReason::Success)));
    assert_eq!(in_sync_streams(&redis, "while-frozen"), 1);
    phone.release(6).await;
    let comp = phone.pubcomp_within(Duration::from_secs(10)).await;
    assert_eq!(comp, Some((6, PubCompReason::Success)));
    assert_eq!(
        phone.pubrec_within(Duration::from_millis(300)).await,
        None,
        "one PUBREC for the two sends"
    );
    assert_eq!(in_sync_streams(&redis, "while-frozen"), 1, "appended once");

    // Redis gone: MQTT 5 is told 0x80 within the wait's deadline (15 s);
    // MQTT 3.1.1 cannot be told, so its connection ends without a PUBREC.
    let mut old = V4Client::connect(node.target(), "old-phone", "JWT", &token(uid), |_| {});
    old.connected().await;
    redis.stop();
    let sent = Instant::now();
    phone.command("redis-gone", 7, false).await;
    old.client
        .publish("sync", rumqttc::QoS::ExactlyOnce, false, "redis-gone-v4")
        .await
        .unwrap();
    let rec = phone.pubrec_within(Duration::from_secs(30)).await;
    assert_eq!(rec, Some((7, PubRecReason::UnspecifiedError)));
    println!("PUBREC 0x80 {:?} after the publish", sent.elapsed());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match old.next_within(left).await {
            Some(Seen::Packet(rumqttc::Packet::PubRec(rec))) => {
                panic!("MQTT 3.1.1 PUBREC for a command not stored: {rec:?}")
            }
            Some(Seen::Packet(_)) => {}
            // The connection ended (the event loop reports it).
            Some(Seen::Error(_)) => break,
            None => panic!("the 3.1.1 connection stayed up"),
        }
    }
    // The MQTT 5 connection serves on: the id is free again.
    phone.release(7).await;
    let comp = phone.pubcomp_within(Duration::from_secs(10)).await;
    assert_eq!(comp, Some((7, PubCompReason::PacketIdentifierNotFound)));
    let mut node = node;
    assert!(
        node.process.child.try_wait().unwrap().is_none(),
        "node exited"
    );
}

/// An MQTT 3.1.1 device that writes its packets itself, with a persistent
/// session (Clean Session 0).
struct RawV4 {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawV4 {
    async fn connect(node: &Node, client_id: &str, uid: &str) -> RawV4 {
        let stream = TcpStream::connect(node.tcp).await.expect("connect");
        let mut device = RawV4 {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = v4::Connect::new(client_id);
        connect.keep_alive = 60;
        connect.clean_session = false;
        connect.set_login("JWT", token(uid));
        device.send(v4::Packet::Connect(connect)).await;
        match device.next_within(Duration::from_secs(10)).await {
            Some(v4::Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, v4::ConnectReturnCode::Success);
                device
            }
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: v4::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, 1 << 20).expect("encodes");
        self.stream.write_all(&out).await.expect("write");
    }

    async fn command(&mut self, body: &str, pkid: u16, dup: bool) {
        let mut publish = v4::Publish::new("sync", rumqttc::QoS::ExactlyOnce, body);
        publish.pkid = pkid;
        publish.dup = dup;
        self.send(v4::Packet::Publish(publish)).await;
    }

    async fn next_within(&mut self, within: Duration) -> Option<v4::Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("the broker sent a malformed packet: {e:?}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The packet id of the next PUBREC (or PUBCOMP: `comp`) within 10 s.
    async fn next_ack(&mut self, comp: bool) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next_within(left).await? {
                v4::Packet::PubRec(rec) if !comp => return Some(rec.pkid),
                v4::Packet::PubComp(done) if comp => return Some(done.pkid),
                _ => continue,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_persistent_sessions_qos2_command_is_appended_once_across_a_reconnect() {
    let redis = RedisServer::start();
    let node = Node::start("node-a", &redis.url(), false, "http://127.0.0.1:9/none");
    let (uid, id) = ("7202", "v4-persistent");

    // PUBREC'd once in the stream; the connection drops before the PUBREL.
    let mut old = RawV4::connect(&node, id, uid).await;
    old.command("v4-held", 1, false).await;
    assert_eq!(old.next_ack(false).await, Some(1));
    assert_eq!(in_sync_streams(&redis, "v4-held"), 1);
    drop(old);

    // The next connection of the session sends it again (DUP): PUBREC,
    // not appended again; its PUBREL completes it.
    let mut again = RawV4::connect(&node, id, uid).await;
    again.command("v4-held", 1, true).await;
    assert_eq!(again.next_ack(false).await, Some(1));
    let release = v4::Packet::PubRel(v4::PubRel { pkid: 1 });
    again.send(release).await;
    assert_eq!(again.next_ack(true).await, Some(1));
    assert_eq!(in_sync_streams(&redis, "v4-held"), 1, "appended once");

    // One whose append had not finished when the connection dropped
    // (Redis frozen) is not held: sent again, it is appended again (at
    // least once) and PUBREC'd once it is in the stream.
    let pid = redis_pid(&redis);
    signal(&pid, "STOP");
    again.command("v4-frozen", 2, false).await;
    drop(again);
    signal(&pid, "CONT");
    let mut third = RawV4::connect(&node, id, uid).await;
    third.command("v4-frozen", 2, true).await;
    assert_eq!(third.next_ack(false).await, Some(2));
    assert!(in_sync_streams(&redis, "v4-frozen") >= 1);
    third.send(v4::Packet::PubRel(v4::PubRel { pkid: 2 })).await;
    assert_eq!(third.next_ack(true).await, Some(2));
}
