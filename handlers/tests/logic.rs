//! The handlers' logic with a real store and a real HTTP platform, without
//! MQTT: each handler fn is called with a `Command` as the SDK would build it.
//! The full path through the broker is in `tests/tests/handlers_*.rs`.

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use envelope::{self, device, AesKey, ServerKey};
use handlers::{contacts, publish, sync, Settings, Shared};
use protocol::UserId;
use rsa::RsaPrivateKey;
use sdk::{Command, HandlerError, Recipient, Reply};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use store::{EmbeddedStore, RedisStore, Store};
use testkit::{Mode, Platform, RedisServer};

fn device_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap())
}

fn server_key() -> &'static ServerKey {
    static KEY: OnceLock<ServerKey> = OnceLock::new();
    KEY.get_or_init(|| ServerKey::generate().unwrap())
}

fn cmd<T>(uid: &str, request_id: Option<&str>, body: T) -> Command<T> {
    Command {
        user_id: UserId::parse(uid).unwrap(),
        client_id: None,
        token_iat: None,
        topic: "t".into(),
        request_id: request_id.map(str::to_owned),
        body,
        correlation_data: None,
    }
}

fn settings(platform_url: &str) -> Settings {
    let mut s = Settings::from_lookup(|var| match var {
        "PLATFORMS" => Some(format!("sms={platform_url}")),
        "PLATFORM_SMS_HEADERS" => Some("Authorization: Bearer t0k".into()),
        // These tests forward without a user token (see tests/tokens.rs).
        "PLATFORM_SMS_TOKEN" => Some("optional".into()),
        "GATEWAYS" => Some("+237600000000".into()),
        _ => None,
    })
    .unwrap();
    s.publish_timeout = Duration::from_millis(300);
    s.publish_retries = 2;
    // Not the development key file: that would be written under ./data.
    s.tokens_master_key = Some(handlers::tokens::MasterKey::generate().0);
    s
}

fn only(reply: Reply) -> (Recipient, String, Value) {
    assert_eq!(reply.messages.len(), 1, "{reply:?}");
    let m = reply.messages.into_iter().next().unwrap();
    (m.to, m.name, m.body)
}

/// Syncs as the device; returns (key id, AES key).
async fn do_sync(shared: &Shared, uid: &str) -> (String, AesKey) {
    let public_key = device::public_key_b64(device_key()).unwrap();
    let reply = sync::handle(
        shared,
        server_key(),
        cmd(uid, None, sync::SyncIn { public_key }),
    )
    .await
    .unwrap();
    let (to, name, body) = only(reply);
    assert_eq!((to, name.as_str()), (Recipient::Sender, "sync"));
    assert_eq!(body["status"], 200);
    assert_eq!(body["platforms"], json!(["sms"]));
    assert_eq!(body["gateways"], json!(["+237600000000"]));
    assert_eq!(body["server_public_key"], server_key().public_b64());
    time::OffsetDateTime::parse(
        body["issued_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let key = device::open_sync_reply(
        device_key(),
        body["server_public_key"].as_str().unwrap(),
        body["encrypted_key"].as_str().unwrap(),
        body["signature"].as_str().unwrap(),
    )
    .unwrap();
    (body["key_id"].as_str().unwrap().to_owned(), key)
}

fn sealed(key_id: &str, key: &AesKey, uid: &str, text: &str) -> publish::PublishIn {
    let (nonce, ciphertext) = device::seal_message(key, uid, text).unwrap();
    publish::PublishIn {
        platform: "sms".into(),
        key_id: key_id.into(),
        nonce,
        ciphertext,
    }
}

async fn publish(
    shared: &Shared,
    uid: &str,
    body: publish::PublishIn,
) -> Result<Value, HandlerError> {
    let reply = publish::handle(shared, cmd(uid, Some("req-1"), body)).await?;
    let (to, name, body) = only(reply);
    assert_eq!((to, name.as_str()), (Recipient::Sender, "publish"));
    Ok(body)
}

async fn embedded() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb"))
        .await
        .unwrap();
    (dir, Arc::new(store))
}

async fn sync_and_publish(store: Arc<dyn Store>) {
    let platform = Platform::start().await;
    let shared = Shared::new(settings(&platform.url("/in")), store).unwrap();
    let (key_id, key) = do_sync(&shared, "68946").await;
    let body = publish(
        &shared,
        "68946",
        sealed(&key_id, &key, "68946", "héllo world"),
    )
    .await
    .unwrap();
    assert_eq!(body, json!({"status": 200, "request_id": "req-1"}));
    let got = platform.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].body,
        json!({"request_id": "req-1", "user_id": "68946", "platform": "sms", "message": "héllo world"})
    );
    assert_eq!(got[0].idempotency_key.as_deref(), Some("req-1"));
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer t0k"));
}

#[tokio::test]
async fn sync_then_publish_on_the_embedded_store() {
    let (_dir, store) = embedded().await;
    sync_and_publish(store).await;
}

#[tokio::test]
async fn sync_then_publish_on_redis() {
    let redis = RedisServer::start();
    sync_and_publish(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

#[tokio::test]
async fn sync_refuses_bad_keys() {
    let (_dir, store) = embedded().await;
    let shared = Shared::new(settings("http://127.0.0.1:9/"), store).unwrap();
    let small = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    for (key, needle) in [
        ("%%%not base64".to_string(), "base64"),
        (envelope::b64_encode(b"not a key"), "RSA public key"),
        (device::public_key_b64(&small).unwrap(), "1024 bits"),
    ] {
        let err = sync::handle(
            &shared,
            server_key(),
            cmd("1", None, sync::SyncIn { public_key: key }),
        )
        .await
        .unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.contains(needle), "{err}");
    }
}

#[tokio::test]
async fn publish_refuses_bad_input() {
    let (_dir, store) = embedded().await;
    let platform = Platform::start().await;
    let shared = Shared::new(settings(&platform.url("/in")), store).unwrap();
    let uid = "23412";

    // Before any sync.
    let key = AesKey::generate();
    let err = publish(&shared, uid, sealed("k", &key, uid, "x"))
        .await
        .unwrap_err();
    assert_eq!(err.status, 409);

    let (old_id, old_key) = do_sync(&shared, uid).await;
    let (key_id, key) = do_sync(&shared, uid).await;
    assert_ne!(old_id, key_id);

    let mut unknown = sealed(&key_id, &key, uid, "x");
    unknown.platform = "fax".into();
    assert_eq!(
        publish(&shared, uid, unknown).await.unwrap_err().status,
        404
    );

    let mut bad = sealed(&key_id, &key, uid, "x");
    bad.nonce = "***".into();
    assert_eq!(publish(&shared, uid, bad).await.unwrap_err().status, 400);
    let mut bad = sealed(&key_id, &key, uid, "x");
    bad.nonce = envelope::b64_encode(&[0u8; 8]);
    assert_eq!(publish(&shared, uid, bad).await.unwrap_err().status, 400);
    let mut bad = sealed(&key_id, &key, uid, "x");
    bad.ciphertext = "@@".into();
    assert_eq!(publish(&shared, uid, bad).await.unwrap_err().status, 400);

    // Tampered ciphertext; a message sealed for another user.
    let mut tampered = sealed(&key_id, &key, uid, "hello");
    let mut raw = envelope::b64_decode(&tampered.ciphertext).unwrap();
    raw[0] ^= 1;
    tampered.ciphertext = envelope::b64_encode(&raw);
    assert_eq!(
        publish(&shared, uid, tampered).await.unwrap_err().status,
        400
    );
    let other_user = sealed(&key_id, &key, "68946", "hello");
    assert_eq!(
        publish(&shared, uid, other_user).await.unwrap_err().status,
        400
    );

    // The old key id, even with a correct encryption under the old key.
    let err = publish(&shared, uid, sealed(&old_id, &old_key, uid, "x"))
        .await
        .unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("stale"), "{err}");

    // A replayed nonce.
    let good = sealed(&key_id, &key, uid, "once");
    let replay = publish::PublishIn {
        platform: good.platform.clone(),
        key_id: good.key_id.clone(),
        nonce: good.nonce.clone(),
        ciphertext: good.ciphertext.clone(),
    };
    assert_eq!(publish(&shared, uid, good).await.unwrap()["status"], 200);
    let err = publish(&shared, uid, replay).await.unwrap_err();
    assert_eq!((err.status, err.message.as_str()), (409, "replayed nonce"));

    // Nothing but the one good message reached the platform.
    assert_eq!(platform.received().len(), 1);
}

#[tokio::test]
async fn platform_failures_are_retried_then_502() {
    let (_dir, store) = embedded().await;
    let platform = Platform::start().await;
    let shared = Shared::new(settings(&platform.url("/in")), store).unwrap();
    let uid = "5";
    let (key_id, key) = do_sync(&shared, uid).await;

    platform.set_mode(Mode::Status(500));
    let body = publish(&shared, uid, sealed(&key_id, &key, uid, "a"))
        .await
        .unwrap();
    assert_eq!(body["status"], 502);
    assert_eq!(body["request_id"], "req-1");
    let got = platform.received();
    assert_eq!(got.len(), 3, "1 attempt + 2 retries");
    assert!(got
        .iter()
        .all(|r| r.idempotency_key.as_deref() == Some("req-1")));

    platform.set_mode(Mode::Status(400));
    let body = publish(&shared, uid, sealed(&key_id, &key, uid, "b"))
        .await
        .unwrap();
    assert_eq!(body["status"], 502);
    assert_eq!(platform.received().len(), 4, "a 4xx is not retried");

    platform.set_mode(Mode::Hang);
    let started = std::time::Instant::now();
    let body = publish(&shared, uid, sealed(&key_id, &key, uid, "c"))
        .await
        .unwrap();
    assert_eq!(body["status"], 502);
    assert!(
        body["error"].as_str().unwrap().contains("timed out"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    platform.set_mode(Mode::Ok);
    let body = publish(&shared, uid, sealed(&key_id, &key, uid, "d"))
        .await
        .unwrap();
    assert_eq!(body["status"], 200);
}

async fn contact_scenarios(store: Arc<dyn Store>) {
    let shared = Shared::new(settings("http://127.0.0.1:9/"), store).unwrap();
    let rc = |from: &str, to: &str| {
        cmd(
            from,
            None,
            contacts::RequestContact {
                contact_id: to.into(),
            },
        )
    };
    let ac = |from: &str, req: &str| {
        cmd(
            from,
            None,
            contacts::AcceptContact {
                requester_id: req.into(),
            },
        )
    };

    // Scenario "Add a contact".
    let (to, name, body) = only(
        contacts::request(&shared, rc("68946", "23412"))
            .await
            .unwrap(),
    );
    assert_eq!(to, Recipient::User(UserId::parse("23412").unwrap()));
    assert_eq!(name, "contact_requested");
    assert_eq!(body, json!({"requester_id": "68946"}));
    let (to, name, body) = only(
        contacts::accept(&shared, ac("23412", "68946"))
            .await
            .unwrap(),
    );
    assert_eq!(to, Recipient::User(UserId::parse("68946").unwrap()));
    assert_eq!(name, "contact_approved");
    assert_eq!(body, json!({"contact_id": "23412"}));

    // Scenario "Get list of contacts".
    let list = |uid: &str| cmd(uid, None, contacts::GetContactList {});
    let (to, name, body) = only(contacts::list(&shared, list("68946")).await.unwrap());
    assert_eq!((to, name.as_str()), (Recipient::Sender, "contact_list"));
    assert_eq!(body, json!({"contacts": ["23412"]}));
    let (_, _, body) = only(contacts::list(&shared, list("23412")).await.unwrap());
    assert_eq!(body, json!({"contacts": ["68946"]}));

    // Refusals.
    let err = contacts::accept(&shared, ac("23412", "68946"))
        .await
        .unwrap_err();
    assert_eq!(err.status, 404);
    let err = contacts::accept(&shared, ac("1", "2")).await.unwrap_err();
    assert_eq!(err.status, 404);
    assert_eq!(
        contacts::request(&shared, rc("1", "1"))
            .await
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(
        contacts::request(&shared, rc("1", "a_b"))
            .await
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(
        contacts::accept(&shared, ac("1", ""))
            .await
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(
        contacts::request(&shared, rc("68946", "23412"))
            .await
            .unwrap_err()
            .status,
        409
    );
}

#[tokio::test]
async fn contacts_on_the_embedded_store() {
    let (_dir, store) = embedded().await;
    contact_scenarios(store).await;
}

#[tokio::test]
async fn contacts_on_redis() {
    let redis = RedisServer::start();
    contact_scenarios(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

#[tokio::test]
async fn redis_outage_is_503_then_recovers() {
    let mut redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let platform = Platform::start().await;
    let shared = Shared::new(settings(&platform.url("/in")), store).unwrap();
    do_sync(&shared, "8").await;
    redis.stop();
    let public_key = device::public_key_b64(device_key()).unwrap();
    let err = sync::handle(
        &shared,
        server_key(),
        cmd("8", None, sync::SyncIn { public_key }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status, 503);
    let err = contacts::list(&shared, cmd("8", None, contacts::GetContactList {}))
        .await
        .unwrap_err();
    assert_eq!(err.status, 503);
    redis.restart();
    let mut ok = false;
    for _ in 0..50 {
        if contacts::list(&shared, cmd("8", None, contacts::GetContactList {}))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "service did not resume");
    let (key_id, key) = do_sync(&shared, "8").await;
    let body = publish(&shared, "8", sealed(&key_id, &key, "8", "back"))
        .await
        .unwrap();
    assert_eq!(body["status"], 200);
}
