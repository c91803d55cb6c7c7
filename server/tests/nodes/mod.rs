//! What the multi-node tests share: broker nodes and built-in handlers as
//! child processes of the built binaries (killed on drop, or with `kill
//! -9` mid-run), devices on them, and asking a command until a handler on
//! another node answers.

#![allow(dead_code)]

use e2e::clients::{Seen, Target, V5Client};
use protocol::claims::DeviceClaims;
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, Publish, RetainForwardRule, SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "cluster-test-secret-0123456789abcdef0123456789";
pub const HANDLER_KEY: &str = "cluster-test-handler-key-0123456789";
pub const COMMANDS: &str = "sync,publish,request_contact,accept_contact,get_contact_list,store_token,list_tokens,revoke_token,delete_account";
/// How long one node may take to start (a debug build, the handlers' RSA key).
pub const START_WITHIN: Duration = Duration::from_secs(30);
/// How long one answer across nodes may take.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A child process with its log, killed on drop.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no goodbye, nothing flushed.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A broker node: the `broker` binary.
pub struct Node {
    pub process: Process,
    pub name: String,
    pub tcp: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `broker` as node `name` on `redis`, with the built-in
    /// handlers in its process when `handlers`, forwarding `publish` to
    /// `platform`.
    pub fn start(name: &str, redis: &str, handlers: bool, platform: &str) -> Node {
        Node::launch(name, Some(redis), handlers, Some(platform))
    }

    /// Starts `broker` as one node without Redis (no `REDIS_URL`: the
    /// router alone, the embedded store in its data directory), without
    /// the built-in handlers.
    pub fn start_alone(name: &str) -> Node {
        Node::launch(name, None, false, None)
    }

    /// Starts the `broker` binary and waits until it says where it listens.
    fn launch(name: &str, redis: Option<&str>, handlers: bool, platform: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // NODE_RUST_LOG (e.g. `info,cluster::listener=debug`) logs a
            // node's decisions for a run being investigated; info otherwise.
            .env(
                "RUST_LOG",
                std::env::var("NODE_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
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
            .env("BROKER_SHUTDOWN_GRACE_SECS", "1")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        if let Some(redis) = redis {
            command.env("REDIS_URL", redis);
        }
        if let Some(platform) = platform {
            command
                .env("PLATFORMS", format!("mail={platform}"))
                .env("PLATFORM_MAIL_TOKEN", "optional");
        }
        let child = command.spawn().expect("spawn the broker binary");
        let mut process = Process { child, log };
        let deadline = Instant::now() + START_WITHIN;
        loop {
            let text = process.log_text();
            let found = text
                .lines()
                .find_map(|line| line.trim().strip_prefix("plain TCP on "))
                .and_then(|addr| addr.trim().parse().ok());
            if let Some(tcp) = found {
                return Node {
                    process,
                    name: name.to_owned(),
                    tcp,
                    _dir: dir,
                };
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("node {name} exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "node {name} did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn target(&self) -> Target<'static> {
        Target {
            addr: self.tcp,
            ca_file: None,
        }
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// A built-in handler binary (`sync-handler`, ...), built beside `broker`
/// (`cargo test --workspace` builds every package's binaries; alone:
/// `cargo build -p handlers --bins`).
pub fn handler_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_broker")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build -p handlers --bins` first",
        path.display()
    );
    path
}

/// A built-in handler as its own process, connected to `node`, on `redis`;
/// `data` holds the server key (handlers of one deployment share it).
pub fn start_handler(
    binary: &str,
    node: &Node,
    redis: &str,
    data: &Path,
    platform: &str,
) -> Process {
    let log = data.join(format!(
        "{binary}-{}-{}.log",
        node.name,
        rand::random::<u32>()
    ));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(handler_binary(binary))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("REDIS_URL", redis)
        .env("DATA_DIR", data)
        .env("BROKER_URL", format!("mqtt://{}", node.tcp))
        .env("HANDLER_KEY", HANDLER_KEY)
        .env("TOKENS_MASTER_KEY", "5e".repeat(32))
        .env("PLATFORMS", format!("mail={platform}"))
        .env("PLATFORM_MAIL_TOKEN", "optional")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
    Process { child, log }
}

pub fn token(uid: &str) -> String {
    DeviceClaims::new(uid, 3600)
        .sign_hs256(SECRET.as_bytes())
        .unwrap()
}

/// A device of `uid` on `node`, subscribed at QoS 1 to its replies `names`.
pub async fn device(node: &Node, uid: &str, names: &[&str]) -> V5Client {
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
pub async fn next_publish(client: &mut V5Client, within: Duration) -> Option<(String, Vec<u8>)> {
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

pub async fn send(client: &V5Client, topic: &str, body: Value) {
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
pub async fn ask_until_served(
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
pub async fn ask(client: &mut V5Client, uid: &str, topic: &str, body: Value, reply: &str) -> Value {
    send(client, topic, body).await;
    let (got, payload) = next_publish(client, ANSWER_WITHIN)
        .await
        .unwrap_or_else(|| panic!("no answer to {topic} within {ANSWER_WITHIN:?}"));
    assert_eq!(got, format!("{uid}_{reply}"));
    serde_json::from_slice(&payload).unwrap()
}

pub fn device_key() -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap()
}

/// Runs each built-in command from `phone` (user `uid`) until a handler on
/// another node answers: contacts and tokens (empty), sync (the key exchange
/// verified by the device), and a publish sealed with the synced key, opened
/// by the publish handler and forwarded to `platform` carrying `text`.
pub async fn serve_every_builtin_command(
    phone: &mut V5Client,
    uid: &str,
    platform: &testkit::Platform,
    text: &str,
) {
    let contacts = ask_until_served(
        phone,
        uid,
        "get_contact_list",
        serde_json::json!({}),
        "contact_list",
    )
    .await;
    assert_eq!(contacts, serde_json::json!({"contacts": []}));
    let tokens = ask_until_served(
        phone,
        uid,
        "list_tokens",
        serde_json::json!({}),
        "list_tokens",
    )
    .await;
    assert_eq!(tokens, serde_json::json!({"status": 200, "platforms": []}));

    let key = device_key();
    let public_key = envelope::device::public_key_b64(&key).unwrap();
    let synced = ask_until_served(
        phone,
        uid,
        "sync",
        serde_json::json!({"public_key": public_key}),
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

    let (nonce, ciphertext) = envelope::device::seal_message(&aes, uid, text).unwrap();
    let body = serde_json::json!(
        {"platform": "mail", "key_id": key_id, "nonce": nonce, "ciphertext": ciphertext}
    );
    let published = ask_until_served(phone, uid, "publish", body, "publish").await;
    assert_eq!(published["status"], 200, "{published}");
    let received = platform.received();
    assert!(
        received.iter().any(|r| r.body.to_string().contains(text)),
        "the platform got the message: {received:?}"
    );
}

/// A device of `uid` with client id `client` on `node`, its session
/// persistent (`expiry` seconds) unless `clean_start` alone is asked.
pub fn persistent_phone(
    node: &Node,
    uid: &str,
    client: &str,
    clean_start: bool,
    expiry: u32,
) -> V5Client {
    V5Client::connect(node.target(), client, "JWT", &token(uid), |options| {
        options.set_clean_start(clean_start);
        options.set_session_expiry_interval(Some(expiry));
    })
}

pub fn handler(node: &Node, name: &str) -> V5Client {
    V5Client::connect(node.target(), name, "handler", HANDLER_KEY, |_| {})
}

/// The next PUBLISH within `within`.
pub async fn next(client: &mut V5Client, within: Duration) -> Option<Publish> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match client
            .next_within(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(Seen::Packet(Packet::Publish(p))) => return Some(p),
            Some(Seen::Packet(_)) => {}
            Some(Seen::Error(e)) => panic!("connection failed: {e}"),
            None => return None,
        }
    }
    None
}

pub async fn reply(handler: &V5Client, topic: &str, payload: String) {
    handler
        .client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
}

/// Publishes probes until one reaches `phone` (its node listens on the
/// user's shard), then drains what else arrives.
pub async fn probe(phone: &mut V5Client, handler: &V5Client, topic: &str) {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        reply(handler, topic, "probe".into()).await;
        if next(phone, Duration::from_millis(500)).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the phone's node never listened");
    }
    while next(phone, Duration::from_millis(300)).await.is_some() {}
}

/// Subscribes `phone` to `topic` at QoS 1 with subscription identifier
/// `id` and Retain As Published.
pub async fn subscribe_with_id(phone: &mut V5Client, topic: &str, id: usize) {
    let filter = Filter {
        path: topic.to_owned(),
        qos: QoS::AtLeastOnce,
        nolocal: true,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::Never,
    };
    let properties = SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    };
    phone
        .client
        .subscribe_many_with_properties([filter], properties)
        .await
        .unwrap();
}
