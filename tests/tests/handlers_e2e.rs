//! The built-in handlers end to end: the real broker in-process over TLS, the
//! handlers connected to it as in the default run, devices played by the test
//! (their own RSA keys, decrypting the AES key, encrypting messages), a local
//! HTTP server as the platform, and the store on Redis (a real
//! `redis-server` on a free port) or embedded (redb in a temp dir).

mod handlers_common;

use e2e::TestBroker;
use envelope::{self, device, AesKey};
use handlers_common::{settings, Device};
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;
use testkit::{Mode, Platform, RedisCluster, RedisServer};
use tokio_util::sync::CancellationToken;

fn device_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa key"))
}

/// The built-in handlers, running until dropped or stopped.
struct Handlers {
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Handlers {
    fn start(settings: handlers::Settings) -> Handlers {
        let shutdown = CancellationToken::new();
        let handle = handlers::spawn_builtin(settings, shutdown.clone()).expect("handlers start");
        Handlers {
            shutdown,
            handle: Some(handle),
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .expect("handlers drain in time")
                .expect("handlers task");
        }
    }
}

impl Drop for Handlers {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Syncs as the device: checks the reply, verifies the signature and
/// decrypts the key. Returns (key id, key, server public key).
async fn sync(dev: &mut Device) -> (String, AesKey, String) {
    let public_key = device::public_key_b64(device_key()).unwrap();
    dev.send(
        "sync",
        json!({"public_key": public_key, "request_id": "s1"}),
    )
    .await;
    let body = dev.reply_on("sync").await;
    assert_eq!(body["status"], 200, "{body}");
    assert_eq!(body["request_id"], "s1");
    assert_eq!(body["platforms"], json!(["sms"]));
    assert_eq!(body["gateways"], json!(["+237600000000", "+15550000000"]));
    assert!(body["issued_at"].as_str().unwrap().contains('T'));
    let key = device::open_sync_reply(
        device_key(),
        body["server_public_key"].as_str().unwrap(),
        body["encrypted_key"].as_str().unwrap(),
        body["signature"].as_str().unwrap(),
    )
    .expect("the device decrypts its key");
    (
        body["key_id"].as_str().unwrap().to_owned(),
        key,
        body["server_public_key"].as_str().unwrap().to_owned(),
    )
}

fn sealed(uid: &str, key_id: &str, key: &AesKey, text: &str, request_id: &str) -> Value {
    let (nonce, ciphertext) = device::seal_message(key, uid, text).unwrap();
    json!({"platform": "sms", "key_id": key_id, "nonce": nonce, "ciphertext": ciphertext, "request_id": request_id})
}

async fn sync_encrypt_publish(redis_url: Option<String>) {
    let broker = TestBroker::start().await;
    let platform = Platform::start().await;
    let dir = tempfile::tempdir().unwrap();
    let handlers = Handlers::start(settings(
        &broker,
        dir.path(),
        redis_url,
        &platform.url("/in"),
    ));
    let mut dev = Device::connect(&broker, "68946").await;
    dev.wait_for_handlers().await;

    let (key_id, key, _) = sync(&mut dev).await;
    dev.send(
        "publish",
        sealed("68946", &key_id, &key, "hello, world", "p1"),
    )
    .await;
    assert_eq!(
        dev.reply_on("publish").await,
        json!({"status": 200, "request_id": "p1"})
    );
    // The platform got the plaintext exactly once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = platform.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].body,
        json!({"request_id": "p1", "user_id": "68946", "platform": "sms", "message": "hello, world"})
    );
    assert_eq!(got[0].idempotency_key.as_deref(), Some("p1"));
    handlers.stop().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn sync_encrypt_publish_on_the_embedded_store() {
    sync_encrypt_publish(None).await;
}

#[tokio::test]
async fn sync_encrypt_publish_on_redis() {
    let redis = RedisServer::start();
    sync_encrypt_publish(Some(redis.url())).await;
}

#[tokio::test]
async fn sync_encrypt_publish_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    sync_encrypt_publish(Some(cluster.redis_url())).await;
}

async fn contact_scenarios(redis_url: Option<String>) {
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let handlers = Handlers::start(settings(
        &broker,
        dir.path(),
        redis_url,
        "http://127.0.0.1:9/",
    ));
    let mut one = Device::connect(&broker, "68946").await;
    let mut two = Device::connect(&broker, "23412").await;
    one.wait_for_handlers().await;

    // "Add a contact", step by step.
    one.subscribe(&["contact_approved"]).await;
    two.subscribe(&["contact_requested", "accept_contact"])
        .await;
    one.send("request_contact", json!({"contact_id": "23412"}))
        .await;
    assert_eq!(
        two.reply_on("contact_requested").await,
        json!({"requester_id": "68946"})
    );
    two.send("accept_contact", json!({"requester_id": "68946"}))
        .await;
    assert_eq!(
        one.reply_on("contact_approved").await,
        json!({"contact_id": "23412"})
    );

    // "Get list of contacts".
    one.send("get_contact_list", json!({})).await;
    assert_eq!(
        one.reply_on("contact_list").await,
        json!({"contacts": ["23412"]})
    );
    two.subscribe(&["contact_list"]).await;
    two.send("get_contact_list", json!({"request_id": "l2"}))
        .await;
    assert_eq!(
        two.reply_on("contact_list").await,
        json!({"contacts": ["68946"], "request_id": "l2"})
    );

    // Accepting without a pending request is an error reply.
    two.send("accept_contact", json!({"requester_id": "68946"}))
        .await;
    assert_eq!(two.reply_on("accept_contact").await["status"], 404);
    one.client
        .assert_no_publish(Duration::from_millis(300))
        .await;
    handlers.stop().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn contact_scenarios_on_the_embedded_store() {
    contact_scenarios(None).await;
}

#[tokio::test]
async fn contact_scenarios_on_redis() {
    let redis = RedisServer::start();
    contact_scenarios(Some(redis.url())).await;
}

/// The handlers on a Redis Cluster (`REDIS_URL` = its six nodes): a contact
/// pair spans two users' slots, which the store writes in single-slot steps.
#[tokio::test]
async fn contact_scenarios_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    contact_scenarios(Some(cluster.redis_url())).await;
}

#[tokio::test]
async fn bad_input_gets_error_replies_and_the_handlers_keep_serving() {
    let broker = TestBroker::start().await;
    let platform = Platform::start().await;
    let dir = tempfile::tempdir().unwrap();
    let handlers = Handlers::start(settings(&broker, dir.path(), None, &platform.url("/in")));
    let uid = "4242";
    let mut dev = Device::connect(&broker, uid).await;
    dev.wait_for_handlers().await;

    // sync: malformed JSON, bad base64, a key that is too small.
    dev.send_raw("sync", b"{not json".to_vec()).await;
    assert_eq!(dev.reply_on("sync").await["status"], 400);
    dev.send("sync", json!({"public_key": "!!!not base64!!!"}))
        .await;
    assert_eq!(dev.reply_on("sync").await["status"], 400);
    let small = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    dev.send(
        "sync",
        json!({"public_key": device::public_key_b64(&small).unwrap()}),
    )
    .await;
    let body = dev.reply_on("sync").await;
    assert_eq!(body["status"], 400);
    assert!(body["error"].as_str().unwrap().contains("1024"), "{body}");

    let (old_id, old_key, _) = sync(&mut dev).await;
    let (key_id, key, _) = sync(&mut dev).await;

    // publish: tampered ciphertext, replayed nonce, old key id, unknown platform.
    let mut tampered = sealed(uid, &key_id, &key, "x", "t1");
    let mut raw = envelope::b64_decode(tampered["ciphertext"].as_str().unwrap()).unwrap();
    raw[3] ^= 0x40;
    tampered["ciphertext"] = json!(envelope::b64_encode(&raw));
    dev.send("publish", tampered).await;
    assert_eq!(
        dev.reply_on("publish").await,
        json!({"status": 400, "error": "decryption failed", "request_id": "t1"})
    );
    let once = sealed(uid, &key_id, &key, "once", "r1");
    dev.send("publish", once.clone()).await;
    assert_eq!(dev.reply_on("publish").await["status"], 200);
    dev.send("publish", once).await;
    let body = dev.reply_on("publish").await;
    assert_eq!(
        (body["status"].as_u64(), body["error"].as_str()),
        (Some(409), Some("replayed nonce"))
    );
    dev.send("publish", sealed(uid, &old_id, &old_key, "old", "o1"))
        .await;
    assert_eq!(dev.reply_on("publish").await["status"], 409);
    let mut unknown = sealed(uid, &key_id, &key, "x", "u1");
    unknown["platform"] = json!("fax");
    dev.send("publish", unknown).await;
    assert_eq!(dev.reply_on("publish").await["status"], 404);

    // The platform answers 500, then hangs: 502 after bounded retries.
    platform.set_mode(Mode::Status(500));
    dev.send("publish", sealed(uid, &key_id, &key, "a", "e1"))
        .await;
    assert_eq!(
        dev.reply_on("publish").await,
        json!({"status": 502, "request_id": "e1", "error": "platform answered HTTP 500"})
    );
    platform.set_mode(Mode::Hang);
    dev.send("publish", sealed(uid, &key_id, &key, "b", "h1"))
        .await;
    let body = dev.reply_on("publish").await;
    assert_eq!(body["status"], 502);
    assert_eq!(body["request_id"], "h1");

    // Still serving.
    platform.set_mode(Mode::Ok);
    dev.send("publish", sealed(uid, &key_id, &key, "fine", "f1"))
        .await;
    assert_eq!(dev.reply_on("publish").await["status"], 200);
    let delivered: Vec<String> = platform
        .received()
        .iter()
        .filter(|r| r.body["message"] == "fine" || r.body["message"] == "once")
        .map(|r| r.body["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, vec!["once", "fine"]);
    handlers.stop().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn two_publish_handler_instances_share_the_load() {
    let broker = TestBroker::start().await;
    let platform = Platform::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = settings(&broker, dir.path(), None, &platform.url("/a"));
    let store = handlers::open_store(&base).unwrap();
    let shutdown = CancellationToken::new();

    // The default run (sync, publish, contacts) is instance "a"; instance "b"
    // is a second publish worker over the same store posting to /b.
    let all =
        handlers::spawn_builtin_with_store(base.clone(), store.clone(), shutdown.clone()).unwrap();
    let mut other = base.clone();
    other.platforms = handlers::Settings::from_lookup(|v| match v {
        "PLATFORMS" => Some(format!("sms={}", platform.url("/b"))),
        "PLATFORM_SMS_TOKEN" => Some("optional".into()),
        _ => None,
    })
    .unwrap()
    .platforms;
    let sdk = other.sdk_config().unwrap();
    let shared_b = handlers::Shared::new(other, store).unwrap();
    let b = handlers::worker(handlers::Kind::Publish, shared_b, None).unwrap();
    let b = tokio::spawn(b.run(sdk, shutdown.clone()));

    let uid = "777";
    let mut dev = Device::connect(&broker, uid).await;
    dev.wait_for_handlers().await;
    let (key_id, key, _) = sync(&mut dev).await;

    // Until both instances have served one, probe.
    let mut probes = 0;
    loop {
        let got = platform.received();
        if got.iter().any(|r| r.path == "/a") && got.iter().any(|r| r.path == "/b") {
            break;
        }
        assert!(probes < 200, "the second instance never got a command");
        probes += 1;
        dev.send(
            "publish",
            sealed(uid, &key_id, &key, "probe", &format!("probe{probes}")),
        )
        .await;
        dev.reply_on("publish").await;
    }
    let before = platform.received().len();

    let n = 60;
    for i in 0..n {
        dev.send(
            "publish",
            sealed(uid, &key_id, &key, &format!("m{i}"), &format!("id{i}")),
        )
        .await;
    }
    let mut replies = HashSet::new();
    for _ in 0..n {
        let body = dev.reply_on("publish").await;
        assert_eq!(body["status"], 200, "{body}");
        assert!(replies.insert(body["request_id"].as_str().unwrap().to_owned()));
    }
    let got = &platform.received()[before..];
    let messages: HashSet<&str> = got
        .iter()
        .map(|r| r.body["message"].as_str().unwrap())
        .collect();
    assert_eq!(got.len(), n, "none twice");
    assert_eq!(messages.len(), n, "together all");
    let on_a = got.iter().filter(|r| r.path == "/a").count();
    let on_b = got.iter().filter(|r| r.path == "/b").count();
    assert!(on_a > 0 && on_b > 0, "each gets some: a={on_a} b={on_b}");

    shutdown.cancel();
    all.await.unwrap();
    b.await.unwrap().unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn redis_outage_gives_errors_and_service_resumes() {
    let mut redis = RedisServer::start();
    let broker = TestBroker::start().await;
    let platform = Platform::start().await;
    let dir = tempfile::tempdir().unwrap();
    let handlers = Handlers::start(settings(
        &broker,
        dir.path(),
        Some(redis.url()),
        &platform.url("/in"),
    ));
    let uid = "31337";
    let mut dev = Device::connect(&broker, uid).await;
    dev.wait_for_handlers().await;
    let (key_id, key, _) = sync(&mut dev).await;

    redis.stop();
    dev.send("publish", sealed(uid, &key_id, &key, "during", "d1"))
        .await;
    let body = dev.reply_on("publish").await;
    assert_eq!(body["status"], 503, "{body}");
    dev.send("get_contact_list", json!({})).await;
    assert_eq!(dev.reply_on("contact_list").await["status"], 503);

    redis.restart();
    let mut resumed = false;
    for _ in 0..50 {
        dev.send("get_contact_list", json!({})).await;
        if dev.reply_on("contact_list").await.get("contacts").is_some() {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(resumed, "service did not resume");
    // The restarted Redis is empty: sync again, then publish works.
    let (key_id, key, _) = sync(&mut dev).await;
    dev.send("publish", sealed(uid, &key_id, &key, "after", "a1"))
        .await;
    assert_eq!(dev.reply_on("publish").await["status"], 200);
    handlers.stop().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_synced_key_survives_a_restart_of_the_default_run() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start().await;
    let uid = "1001";

    let (key_id, key, server_key) = {
        let broker = TestBroker::start().await;
        let handlers = Handlers::start(settings(&broker, dir.path(), None, &platform.url("/in")));
        let mut dev = Device::connect(&broker, uid).await;
        dev.wait_for_handlers().await;
        let synced = sync(&mut dev).await;
        handlers.stop().await;
        broker.shutdown().await;
        synced
    };

    // A new broker and new handlers over the same DATA_DIR.
    let broker = TestBroker::start().await;
    let handlers = Handlers::start(settings(&broker, dir.path(), None, &platform.url("/in")));
    let mut dev = Device::connect(&broker, uid).await;
    dev.wait_for_handlers().await;
    dev.send("publish", sealed(uid, &key_id, &key, "after restart", "r1"))
        .await;
    assert_eq!(
        dev.reply_on("publish").await,
        json!({"status": 200, "request_id": "r1"})
    );
    assert_eq!(
        platform.received().last().unwrap().body["message"],
        "after restart"
    );
    // The server key persisted too.
    let (_, _, again) = sync(&mut dev).await;
    assert_eq!(again, server_key);
    handlers.stop().await;
    broker.shutdown().await;
}
