//! Several broker nodes as separate processes of the built `broker` binary,
//! sharing one real `redis-server`: a device on node A served by the
//! built-in handlers running on node B (sync, publish to a platform,
//! contacts, tokens), a reply published on node B reaching the user's
//! sessions on node A (through the gate's inbox at QoS 0, through the
//! router at QoS 1), and a command topic declared by a handler on node B
//! opened to devices on node A, their commands arriving with the identity
//! stamps node A's gate set (a forged `user_id` replaced).

use e2e::clients::{user_property, Seen, Target, V5Client};
use protocol::claims::DeviceClaims;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{Platform, RedisServer};

const SECRET: &str = "cluster-test-secret-0123456789abcdef0123456789";
const HANDLER_KEY: &str = "cluster-test-handler-key-0123456789";
const COMMANDS: &str = "sync,publish,request_contact,accept_contact,get_contact_list,store_token,list_tokens,revoke_token,delete_account";
/// How long one node may take to start (a debug build, the handlers' RSA key).
const START_WITHIN: Duration = Duration::from_secs(20);
/// How long one answer across nodes may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A broker node: a child process, killed on drop.
struct Node {
    child: Child,
    tcp: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `broker` as node `name` on `redis`, with the built-in
    /// handlers when `handlers`, forwarding `publish` to `platform`.
    fn start(name: &str, redis: &str, handlers: bool, platform: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("REDIS_URL", redis)
            .env("BROKER_NODE_ID", name)
            .env("BROKER_HANDLERS", if handlers { "all" } else { "none" })
            .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
            .env("BROKER_TCP_LISTEN", "127.0.0.1:0")
            .env("BROKER_DEV_DIR", dir.path().join("dev"))
            .env("DATA_DIR", dir.path().join("data"))
            .env("JWT_SECRET", SECRET)
            .env("HANDLER_KEYS", HANDLER_KEY)
            .env("COMMAND_TOPICS", COMMANDS)
            .env("IDP_IN_PROCESS", "false")
            .env("TOKENS_MASTER_KEY", "5e".repeat(32))
            .env("PLATFORMS", format!("mail={platform}"))
            .env("PLATFORM_MAIL_TOKEN", "optional")
            .env("BROKER_SHUTDOWN_GRACE_SECS", "1")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn the broker binary");
        let mut node = Node {
            child,
            tcp: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_WITHIN;
        loop {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let found = text
                .lines()
                .find_map(|line| line.trim().strip_prefix("plain TCP on "))
                .and_then(|addr| addr.trim().parse().ok());
            if let Some(addr) = found {
                node.tcp = addr;
                return node;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("node {name} exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "node {name} did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn target(&self) -> Target<'static> {
        Target {
            addr: self.tcp,
            ca_file: None,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(uid: &str) -> String {
    DeviceClaims::new(uid, 3600)
        .sign_hs256(SECRET.as_bytes())
        .unwrap()
}

/// A device of `uid` on `node`, subscribed at QoS 1 to its replies `names`.
async fn device(node: &Node, uid: &str, names: &[&str]) -> V5Client {
    let id = format!("phone-{}", rand::random::<u32>());
    let mut client = V5Client::connect(node.target(), &id, "JWT", &token(uid), |_| {});
    client.connected().await;
    for name in names {
        assert_eq!(
            client
                .subscribe(&format!("{uid}_{name}"), QoS::AtLeastOnce)
                .await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
    }
    client
}

/// The next publish within `within`: (topic, payload).
async fn next_publish(client: &mut V5Client, within: Duration) -> Option<(String, Vec<u8>)> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_within(left).await {
            Some(Seen::Packet(Packet::Publish(p))) => {
                return Some((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                ))
            }
            Some(Seen::Packet(_)) => {}
            Some(Seen::Error(e)) => panic!("connection failed: {e}"),
            None => return None,
        }
    }
    None
}

async fn send(client: &V5Client, topic: &str, body: Value) {
    client
        .client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
}

/// Sends `body` to `topic` until a reply comes on `<uid>_<reply>` (the
/// handlers on the other node subscribe, and their readers join the
/// consumer groups, asynchronously after it starts; a command appended
/// before its group exists is read by no one); returns that reply.
async fn ask_until_served(
    client: &mut V5Client,
    uid: &str,
    topic: &str,
    body: Value,
    reply: &str,
) -> Value {
    let deadline = Instant::now() + START_WITHIN;
    let expected = format!("{uid}_{reply}");
    while Instant::now() < deadline {
        send(client, topic, body.clone()).await;
        if let Some((got, payload)) = next_publish(client, Duration::from_millis(700)).await {
            assert_eq!(got, expected, "reply to {topic}");
            // Late answers to earlier probes.
            while next_publish(client, Duration::from_millis(300))
                .await
                .is_some()
            {}
            return serde_json::from_slice(&payload).unwrap();
        }
    }
    panic!("no handler answered {topic} across nodes");
}

/// Sends `body` to `topic` and returns the reply on `<uid>_<reply>`.
async fn ask(client: &mut V5Client, uid: &str, topic: &str, body: Value, reply: &str) -> Value {
    send(client, topic, body).await;
    let (got, payload) = next_publish(client, ANSWER_WITHIN)
        .await
        .unwrap_or_else(|| panic!("no answer to {topic} within {ANSWER_WITHIN:?}"));
    assert_eq!(got, format!("{uid}_{reply}"));
    serde_json::from_slice(&payload).unwrap()
}

fn device_key() -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap()
}

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

    // Contacts and tokens: answered by node B's handlers.
    let contacts = ask_until_served(
        &mut phone,
        uid,
        "get_contact_list",
        json!({}),
        "contact_list",
    )
    .await;
    assert_eq!(contacts, json!({"contacts": []}));
    let tokens = ask_until_served(&mut phone, uid, "list_tokens", json!({}), "list_tokens").await;
    assert_eq!(tokens, json!({"status": 200, "platforms": []}));

    // Sync: the key exchange, verified by the device.
    let key = device_key();
    let public_key = envelope::device::public_key_b64(&key).unwrap();
    let synced = ask_until_served(
        &mut phone,
        uid,
        "sync",
        json!({"public_key": public_key}),
        "sync",
    )
    .await;
    assert_eq!(synced["status"], 200, "{synced}");
    let aes = envelope::device::open_sync_reply(
        &key,
        synced["server_public_key"].as_str().unwrap(),
        synced["encrypted_key"].as_str().unwrap(),
        synced["signature"].as_str().unwrap(),
    )
    .unwrap();
    let key_id = synced["key_id"].as_str().unwrap();

    // Publish: sealed on node A's device, opened by node B's handler (with
    // the key sync stored), forwarded to the platform.
    let (nonce, ciphertext) =
        envelope::device::seal_message(&aes, uid, "hello across nodes").unwrap();
    let body =
        json!({"platform": "mail", "key_id": key_id, "nonce": nonce, "ciphertext": ciphertext});
    let published = ask(&mut phone, uid, "publish", body, "publish").await;
    assert_eq!(published["status"], 200, "{published}");
    let received = platform.received();
    assert!(
        received
            .iter()
            .any(|r| r.body.to_string().contains("hello across nodes")),
        "the platform got the message: {received:?}"
    );

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
