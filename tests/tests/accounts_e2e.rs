//! Accounts end to end (issue 11), over real HTTP and real MQTT over TLS,
//! with one real `redis-server` shared by the identity service, the broker's
//! revocations and the built-in handlers:
//!
//! 1. a number is registered and its code read from a local HTTP server
//!    standing in for the SMS provider, then verified;
//! 2. the device connects with the issued JWT, verified through the
//!    service's JWKS URL;
//! 3. it syncs, stores a platform token, publishes, and the platform gets
//!    the request with that token;
//! 4. the account is deleted: the live session is cut within 2 s and the old
//!    token is refused;
//! 5. the number registers again and works again.
//!
//! And key rotation: a token signed before a rotation is accepted until it
//! expires; a token signed with the retired key is refused once the key has
//! left the JWKS.

mod handlers_common;

use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TestOptions};
use handlers_common::Device;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use shared::envelope::device;
use shared::store::Store;
use shared::testing::{Platform, RedisServer};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "e2e-admin-token-0123456789";
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn device_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa key"))
}

/// The identity service on 127.0.0.1:0, its SMS provider a local fake.
struct Idp {
    base: String,
    service: Arc<idp::Idp>,
    sms: Platform,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Idp {
    async fn start(
        store: Arc<dyn Store>,
        redis_url: &str,
        adjust: impl FnOnce(&mut idp::config::Settings),
    ) -> Idp {
        let dir = tempfile::tempdir().unwrap();
        let sms = Platform::start().await;
        let mut settings = idp::config::Settings::for_tests(dir.path().join("keys"));
        settings.sms.provider_url = Some(sms.url("/sms"));
        settings.redis_url = Some(redis_url.to_owned());
        settings.admin_token = Some(idp::config::Secret(ADMIN.into()));
        adjust(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        settings.public_url = base.clone();
        let service = idp::Idp::start(settings, store).await.unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(idp::serve(listener, service.clone(), shutdown.clone()));
        Idp {
            base,
            service,
            sms,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            _dir: dir,
            shutdown,
        }
    }

    fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base)
    }

    async fn post(&self, path: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Steps 1: register, have the code sent, read it from the SMS
    /// provider's request, verify it. (token, uid)
    async fn sign_up(&self, msisdn: &str) -> (String, String) {
        let (status, body) = self
            .post("/register", None, Some(json!({ "msisdn": msisdn })))
            .await;
        assert_eq!(status, 200, "{body}");
        let session = body["session_token"].as_str().unwrap().to_owned();
        let sent_before = self.sms.received().len();
        let (status, body) = self.post("/sms/verify", Some(&session), None).await;
        assert_eq!(status, 200, "{body}");
        let sent = self.sms.received();
        assert_eq!(sent.len(), sent_before + 1);
        let sms = sent.last().unwrap();
        assert_eq!(sms.body["to"], msisdn);
        let message = sms.body["message"].as_str().unwrap();
        let code: String = message
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .expect("a 6-digit code in the SMS")
            .to_owned();
        let (status, body) = self
            .post(
                "/sms/verify_code",
                Some(&session),
                Some(json!({ "code": code })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["token"].as_str().unwrap().to_owned(),
            body["user_id"].as_str().unwrap().to_owned(),
        )
    }
}

fn options(idp: &Idp, store: Arc<dyn Store>) -> TestOptions {
    let mut options = TestOptions::default();
    // The idp's JWKS beside the test HMAC secret: several verifiers at once.
    options.jwt.jwks_url = Some(idp.jwks_url());
    options.revocation_store = Some(store);
    options
}

/// A device connection with `token`: the CONNACK's outcome.
async fn connect(broker: &TestBroker, token: &str) -> (V5Client, Result<(), String>) {
    let target = Target {
        addr: broker.tls_addr,
        ca_file: Some(&broker.ca_file),
    };
    let id = format!("phone-{}", rand::random::<u32>());
    let mut client = V5Client::connect(target, &id, "JWT", token, |_| {});
    let outcome = match client.connack().await {
        Ok(ack) if ack.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success => Ok(()),
        Ok(ack) => Err(format!("{:?}", ack.code)),
        Err(e) => Err(e),
    };
    (client, outcome)
}

async fn device(broker: &TestBroker, uid: &str, token: &str) -> Device {
    let (client, outcome) = connect(broker, token).await;
    outcome.expect("the issued token is accepted");
    Device {
        uid: uid.to_owned(),
        client,
    }
}

/// Syncs: the device's AES key (id, key).
async fn sync(dev: &mut Device) -> (String, shared::envelope::AesKey) {
    let public_key = device::public_key_b64(device_key()).unwrap();
    dev.send(
        "sync",
        json!({"public_key": public_key, "request_id": "s1"}),
    )
    .await;
    let body = dev.reply_on("sync").await;
    assert_eq!(body["status"], 200, "{body}");
    let key = device::open_sync_reply(
        device_key(),
        body["server_public_key"].as_str().unwrap(),
        body["encrypted_key"].as_str().unwrap(),
        body["signature"].as_str().unwrap(),
    )
    .expect("the device decrypts its key");
    (body["key_id"].as_str().unwrap().to_owned(), key)
}

/// Handler settings on the shared Redis, the platform `sms` at `platform`.
fn handler_settings(
    broker: &TestBroker,
    dir: &std::path::Path,
    redis: &str,
    platform: &Platform,
) -> handlers::Settings {
    let mut settings =
        handlers_common::settings(broker, dir, Some(redis.to_owned()), &platform.url("/in"));
    settings.tokens_master_key = Some(handlers::tokens::MasterKey::parse(MASTER_KEY).unwrap());
    settings
}

#[tokio::test]
async fn sign_up_use_delete_and_sign_up_again() {
    e2e::init_logging();
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(
        shared::store::RedisStore::connect(&redis.url())
            .await
            .unwrap(),
    );
    let idp = Idp::start(store.clone(), &redis.url(), |_| {}).await;
    let broker = TestBroker::start_with(options(&idp, store.clone())).await;
    let platform = Platform::start().await;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let handlers_task = handlers::spawn_builtin(
        handler_settings(&broker, dir.path(), &redis.url(), &platform),
        shutdown.clone(),
    )
    .expect("handlers start");

    // 1-2. Sign up; connect with the JWT (verified through the JWKS URL).
    let (token, uid) = idp.sign_up("+15551234567").await;
    let mut dev = device(&broker, &uid, &token).await;
    dev.wait_for_handlers().await;
    dev.subscribe(&["store_token"]).await;

    // 3. Sync, store a platform token, publish: the platform gets it.
    let (key_id, key) = sync(&mut dev).await;
    dev.send(
        "store_token",
        json!({"platform": "sms", "token": {"access_token": "at-123", "refresh_token": "rt-456"}}),
    )
    .await;
    let stored = dev.reply_on("store_token").await;
    assert_eq!(stored["status"], 200, "{stored}");
    let (nonce, ciphertext) = device::seal_message(&key, &uid, "hello, world").unwrap();
    dev.send(
        "publish",
        json!({"platform": "sms", "key_id": key_id, "nonce": nonce, "ciphertext": ciphertext, "request_id": "p1"}),
    )
    .await;
    assert_eq!(
        dev.reply_on("publish").await,
        json!({"status": 200, "request_id": "p1"})
    );
    let got = platform.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer at-123"));
    assert_eq!(got[0].body["message"], "hello, world");
    assert_eq!(got[0].body["user_id"], uid.as_str());
    assert_eq!(got[0].body["token"]["access_token"], "at-123");

    // 4. Delete the account (HTTP, with the device token): the live
    // session is cut within 2 s, the old token is refused.
    let user = shared::UserId::parse(&uid).unwrap();
    assert!(store.get_key(&user).await.unwrap().is_some());
    let asked = Instant::now();
    let (status, body) = idp.post("/unregister", Some(&token), None).await;
    assert_eq!(status, 200, "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(2), dev.client.closed())
        .await
        .expect("the live session is cut within 2 s");
    assert!(asked.elapsed() < Duration::from_secs(2), "{ended}");
    let (_, refused) = connect(&broker, &token).await;
    assert!(refused.is_err(), "the old token is refused");
    assert!(
        store.get_key(&user).await.unwrap().is_none(),
        "sync key deleted"
    );
    assert_eq!(
        store.registration(&user).await.unwrap(),
        None,
        "registration deleted"
    );
    assert!(store.contacts(&user).await.unwrap().is_empty());

    // 5. Register again (within the same second, even): a new token works,
    // and the account starts empty.
    let (new_token, again) = idp.sign_up("+15551234567").await;
    assert_eq!(again, uid, "the same number keeps its uid");
    let mut dev = device(&broker, &uid, &new_token).await;
    dev.subscribe(&["sync", "publish", "list_tokens"]).await;
    let (key_id, key) = sync(&mut dev).await;
    dev.send("list_tokens", json!({})).await;
    let listed = dev.reply_on("list_tokens").await;
    assert_eq!(listed["platforms"], json!([]), "{listed}");
    // No stored token any more: publishing says so, nothing is forwarded.
    let (nonce, ciphertext) = device::seal_message(&key, &uid, "again").unwrap();
    dev.send(
        "publish",
        json!({"platform": "sms", "key_id": key_id, "nonce": nonce, "ciphertext": ciphertext, "request_id": "p2"}),
    )
    .await;
    let answer = dev.reply_on("publish").await;
    assert_eq!(answer["status"], 424, "{answer}");
    assert_eq!(platform.received().len(), 1);
    // Still the old token is refused.
    assert!(connect(&broker, &token).await.1.is_err());

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), handlers_task).await;
    broker.shutdown().await;
}

/// Key rotation seen by the broker: the token signed before the rotation
/// works until it expires; a token signed with the retired key (long-lived,
/// made from its private key) works while the key is published and is
/// refused once it has left the JWKS, without anything else happening.
#[tokio::test]
async fn rotated_keys_are_honoured_until_their_tokens_expire_then_refused() {
    e2e::init_logging();
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(
        shared::store::RedisStore::connect(&redis.url())
            .await
            .unwrap(),
    );
    let idp = Idp::start(store.clone(), &redis.url(), |s| {
        s.token_ttl = Duration::from_secs(3);
        s.key_retire_leeway = Duration::from_secs(1);
        s.jwks_max_age = Duration::ZERO;
    })
    .await;
    let mut options = options(&idp, store.clone());
    options.jwt.leeway_secs = 1;
    let broker = TestBroker::start_with(options).await;

    let (before, uid) = idp.sign_up("+15551234567").await;
    let fetched = Instant::now();
    let (_client, outcome) = connect(&broker, &before).await;
    outcome.expect("token of the first key accepted");
    let old_kid = idp.service.keys.active_meta().unwrap().kid;
    let old_pem = idp::keys::private_key_pem(&idp.service.settings.keys_dir, &old_kid).unwrap();
    let forged_by_old_key = shared::claims::DeviceClaims::new(uid.clone(), 3600)
        .sign_pem(
            jsonwebtoken::Algorithm::RS256,
            old_pem.as_bytes(),
            Some(&old_kid),
        )
        .unwrap();

    let (status, body) = idp.post("/admin/keys/rotate", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    let rotated = Instant::now();
    // Signed before the rotation: still accepted.
    assert!(
        connect(&broker, &before).await.1.is_ok(),
        "pre-rotation token accepted after rotation"
    );
    assert!(
        connect(&broker, &forged_by_old_key).await.1.is_ok(),
        "the retired key is still published"
    );

    // Past its expiry (3 s + 1 s leeway) and, counted in whole seconds, past
    // the retired key's publication (retired_at + 3 s + 1 s).
    tokio::time::sleep(Duration::from_millis(5500).saturating_sub(rotated.elapsed())).await;
    let refused = connect(&broker, &before).await.1;
    assert!(refused.is_err(), "expired pre-rotation token refused");

    // The retired key leaves the JWKS at retired_at + 3 s + 1 s; the broker
    // refetches once the set's max-age has passed (at least its 10 s
    // refresh interval after the first fetch).
    let jwks: Value = idp
        .http
        .get(idp.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(!kids.contains(&old_kid.as_str()), "{kids:?}");
    let wait = Duration::from_secs(11).saturating_sub(fetched.elapsed());
    tokio::time::sleep(wait).await;
    let outcome = connect(&broker, &forged_by_old_key).await.1;
    assert!(outcome.is_err(), "a token of the removed key is refused");

    // Tokens of the new key work.
    let (after, _) = idp.sign_up("+15551234567").await;
    assert!(
        connect(&broker, &after).await.1.is_ok(),
        "token of the new key accepted"
    );
    broker.shutdown().await;
}
