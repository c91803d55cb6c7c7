//! Accounts end to end over MQTT and TLS: the `tokens` handler (store, list,
//! revoke a platform token), `publish` forwarding with the stored token to a
//! local HTTP server standing in for the platform (and refusing without
//! one), `delete_account` (data deleted, the live session cut within 2 s,
//! the old token refused at CONNECT, a token issued later accepted), and a
//! revocation recorded by another store instance sharing the Redis cutting a
//! session within 2 s. The broker's revocation poll is set to a minute, so
//! every cut within 2 s comes from the revocation events.

mod handlers_common;

use e2e::clients::{Target, V4Client, V5Client};
use e2e::TestBroker;
use envelope::device;
use handlers_common::Device;
use protocol::claims::{now_secs, DeviceClaims};
use protocol::UserId;
use rsa::RsaPrivateKey;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use store::{RedisStore, Revocation, Revocations, Store};
use testkit::{Platform, RedisServer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a revoked user's live session may last.
const CUT_WITHIN: Duration = Duration::from_secs(2);

fn device_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa key"))
}

/// A broker checking revocations against `store` (poll: one minute), the
/// built-in handlers on the same store, and a fake platform `mail` (token
/// required, the default).
struct Env {
    broker: TestBroker,
    store: Arc<dyn Store>,
    platform: Platform,
    shutdown: CancellationToken,
    handlers: Option<tokio::task::JoinHandle<()>>,
    /// Stops the handlers when a failed test drops the environment.
    _stop_handlers: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(store: Option<Arc<dyn Store>>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = match store {
            Some(store) => store,
            None => store::open(None, dir.path()).await.unwrap(),
        };
        let mut options = e2e::TestOptions::default();
        options.limits.revocation_poll = Duration::from_secs(60);
        options.revocation_store = Some(store.clone());
        for topic in [
            "store_token",
            "list_tokens",
            "revoke_token",
            "delete_account",
        ] {
            if !options.command_topics.iter().any(|t| t == topic) {
                options.command_topics.push(topic.into());
            }
        }
        let broker = TestBroker::start_with(options).await;
        let platform = Platform::start().await;
        let mut settings = handlers::Settings::from_lookup(|var| match var {
            "PLATFORMS" => Some(format!("mail={}", platform.url("/mail"))),
            "PLATFORM_MAIL_HEADERS" => Some("X-Operator: 1".into()),
            _ => None,
        })
        .unwrap();
        settings.broker_url = format!("mqtts://127.0.0.1:{}", broker.tls_addr.port());
        settings.broker_ca = Some(broker.ca_file.clone());
        settings.handler_key = e2e::TEST_HANDLER_KEY.into();
        settings.data_dir = dir.path().to_owned();
        settings.tokens_master_key = Some(handlers::tokens::MasterKey::generate().0);
        settings.publish_timeout = Duration::from_millis(500);
        settings.publish_retries = 0;
        let shutdown = CancellationToken::new();
        let handlers =
            handlers::spawn_builtin_with_store(settings, store.clone(), shutdown.clone()).unwrap();
        Env {
            broker,
            store,
            platform,
            shutdown: shutdown.clone(),
            handlers: Some(handlers),
            _stop_handlers: shutdown.clone().drop_guard(),
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handlers) = self.handlers.take() {
            tokio::time::timeout(Duration::from_secs(15), handlers)
                .await
                .expect("handlers drain in time")
                .expect("handlers task");
        }
        self.broker.shutdown().await;
    }
}

/// A device of `uid` connected over TLS with `token`, subscribed to its
/// replies of the accounts commands, with the handlers answering.
async fn device_with(env: &Env, uid: &str, token: &str) -> Device {
    let target = Target {
        addr: env.broker.tls_addr,
        ca_file: Some(&env.broker.ca_file),
    };
    let id = format!("phone-{uid}-{}", rand::random::<u32>());
    let mut client = V5Client::connect(target, &id, "JWT", token, |_| {});
    client.connected().await;
    let mut dev = Device {
        uid: uid.to_owned(),
        client,
    };
    dev.subscribe(&[
        "sync",
        "publish",
        "store_token",
        "list_tokens",
        "revoke_token",
        "delete_account",
    ])
    .await;
    dev.wait_for("list_tokens", "list_tokens").await;
    dev
}

/// Sends `topic` with `body` and returns the reply on `<uid>_<reply>`.
async fn ask(dev: &mut Device, topic: &str, body: Value, reply: &str) -> Value {
    dev.send(topic, body).await;
    dev.reply_on(reply).await
}

/// Syncs; returns (key id, key).
async fn sync(dev: &mut Device) -> (String, envelope::AesKey) {
    let public_key = device::public_key_b64(device_key()).unwrap();
    let body = ask(dev, "sync", json!({"public_key": public_key}), "sync").await;
    assert_eq!(body["status"], 200, "{body}");
    let key = device::open_sync_reply(
        device_key(),
        body["server_public_key"].as_str().unwrap(),
        body["encrypted_key"].as_str().unwrap(),
        body["signature"].as_str().unwrap(),
    )
    .unwrap();
    (body["key_id"].as_str().unwrap().to_owned(), key)
}

async fn publish(dev: &mut Device, key: &(String, envelope::AesKey), text: &str) -> Value {
    let (nonce, ciphertext) = device::seal_message(&key.1, &dev.uid, text).unwrap();
    let body =
        json!({"platform": "mail", "key_id": key.0, "nonce": nonce, "ciphertext": ciphertext});
    ask(dev, "publish", body, "publish").await
}

/// A token for `uid` issued at `iat`, valid for an hour.
fn token_issued_at(broker: &TestBroker, uid: &str, iat: u64) -> String {
    let mut claims = DeviceClaims::new(uid, 3600);
    claims.iat = Some(iat);
    broker.token_with(&claims)
}

/// The CONNACK refusal for `token`, MQTT 5 and 3.1.1 (the error texts).
async fn refusals(broker: &TestBroker, token: &str) -> (String, String) {
    let mut v5 = V5Client::connect(broker.tls_target(), "again5", "JWT", token, |_| {});
    let v5 = v5.connack().await.expect_err("MQTT 5 refused");
    let mut v4 = V4Client::connect(broker.tls_target(), "again4", "JWT", token, |_| {});
    let v4 = v4.connack().await.expect_err("MQTT 3.1.1 refused");
    (v5, v4)
}

/// Waits until `client`'s connection ends, at most `within`; what ended it.
async fn closed_within(client: &mut V5Client, within: Duration) -> String {
    tokio::time::timeout(within, client.closed())
        .await
        .unwrap_or_else(|_| panic!("the session was not cut within {within:?}"))
}

#[tokio::test]
async fn tokens_are_stored_listed_revoked_and_used_by_publish() {
    let env = Env::start(None).await;
    let mut dev = device_with(&env, "68946", &env.broker.token("68946")).await;

    assert_eq!(
        ask(&mut dev, "list_tokens", json!({}), "list_tokens").await,
        json!({"status": 200, "platforms": []})
    );
    let token = json!({"access_token": "user-at-1", "refresh_token": "rt-1"});
    let stored = ask(
        &mut dev,
        "store_token",
        json!({"platform": "mail", "token": token, "request_id": "st1"}),
        "store_token",
    )
    .await;
    assert_eq!(
        stored,
        json!({"status": 200, "platform": "mail", "request_id": "st1"})
    );
    let listed = ask(&mut dev, "list_tokens", json!({}), "list_tokens").await;
    assert_eq!(listed, json!({"status": 200, "platforms": ["mail"]}));
    assert!(!listed.to_string().contains("user-at-1"));
    // Sealed at rest.
    let uid = UserId::parse("68946").unwrap();
    let sealed = env
        .store
        .platform_token(&uid, "mail")
        .await
        .unwrap()
        .unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains("user-at-1"));

    // Unknown platform, not an object: clear errors on the same reply topic.
    let err = ask(
        &mut dev,
        "store_token",
        json!({"platform": "nope", "token": {"a": 1}}),
        "store_token",
    )
    .await;
    assert_eq!(
        err,
        json!({"status": 404, "error": "unknown platform \"nope\""})
    );
    let err = ask(
        &mut dev,
        "store_token",
        json!({"platform": "mail", "token": "x"}),
        "store_token",
    )
    .await;
    assert_eq!(err["status"], 400, "{err}");

    // Publish forwards with the stored token.
    let key = sync(&mut dev).await;
    let body = publish(&mut dev, &key, "hello").await;
    assert_eq!(body["status"], 200, "{body}");
    let got = env.platform.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/mail");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer user-at-1"));
    assert_eq!(got[0].body["token"], token);
    assert_eq!(got[0].body["message"], "hello");
    assert_eq!(got[0].body["user_id"], "68946");

    // Revoked: gone from the list, and publish gets the clear error.
    assert_eq!(
        ask(
            &mut dev,
            "revoke_token",
            json!({"platform": "mail"}),
            "revoke_token"
        )
        .await,
        json!({"status": 200, "platform": "mail"})
    );
    let again = ask(
        &mut dev,
        "revoke_token",
        json!({"platform": "mail"}),
        "revoke_token",
    )
    .await;
    assert_eq!(again["status"], 404, "{again}");
    assert_eq!(
        ask(&mut dev, "list_tokens", json!({}), "list_tokens").await["platforms"],
        json!([])
    );
    let refused = publish(&mut dev, &key, "no token").await;
    assert_eq!(
        refused,
        json!({"status": 424, "error": "no stored token for platform mail: send store_token first"})
    );
    assert_eq!(env.platform.received().len(), 1, "nothing forwarded");
    env.stop().await;
}

/// `delete_account` on `store`: answered, data gone, session cut within
/// 2 s, the old token refused, a token issued after the cut-off accepted.
async fn delete_account(store: Option<Arc<dyn Store>>) {
    let env = Env::start(store).await;
    let uid = UserId::parse("4242").unwrap();
    // Issued a few seconds ago, like a token in use for a while.
    let old_token = token_issued_at(&env.broker, "4242", now_secs() - 5);
    let mut dev = device_with(&env, "4242", &old_token).await;
    let mut friend = device_with(&env, "777", &env.broker.token("777")).await;
    ask(
        &mut dev,
        "store_token",
        json!({"platform": "mail", "token": {"access_token": "a"}}),
        "store_token",
    )
    .await;
    sync(&mut dev).await;
    env.store
        .add_contact_request(&uid, &UserId::parse("777").unwrap())
        .await
        .unwrap();
    env.store.put_registration(&uid, now_secs()).await.unwrap();

    let asked = Instant::now();
    let body = ask(
        &mut dev,
        "delete_account",
        json!({"request_id": "d1"}),
        "delete_account",
    )
    .await;
    assert_eq!(body, json!({"status": 200, "request_id": "d1"}));
    let ended = closed_within(&mut dev.client, CUT_WITHIN.saturating_sub(asked.elapsed())).await;
    assert!(ended.contains("AdministrativeAction"), "{ended}");

    // Everything is gone; the revocation stays.
    assert_eq!(env.store.get_key(&uid).await.unwrap(), None);
    assert!(env
        .store
        .platforms_with_tokens(&uid)
        .await
        .unwrap()
        .is_empty());
    assert!(env
        .store
        .pending_requests(&UserId::parse("777").unwrap())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.store.registration(&uid).await.unwrap(), None);
    let Some(Revocation::IssuedBefore(cutoff)) = env.store.revocation(&uid).await.unwrap() else {
        panic!("expected a revocation by time");
    };

    let (v5, v4) = refusals(&env.broker, &old_token).await;
    assert!(v5.contains("NotAuthorized"), "{v5}");
    assert!(v4.contains("NotAuthorized"), "{v4}");
    // Issued the second before the cut-off: refused too.
    let (v5, _) = refusals(
        &env.broker,
        &token_issued_at(&env.broker, "4242", cutoff - 1),
    )
    .await;
    assert!(v5.contains("NotAuthorized"), "{v5}");

    // A new registration's token (iat at or after the cut-off) works again,
    // with a fresh, empty account.
    let new_token = token_issued_at(&env.broker, "4242", cutoff);
    let mut back = device_with(&env, "4242", &new_token).await;
    assert_eq!(
        ask(&mut back, "list_tokens", json!({}), "list_tokens").await,
        json!({"status": 200, "platforms": []})
    );
    sync(&mut back).await;
    // Other users were not touched.
    assert_eq!(
        ask(&mut friend, "list_tokens", json!({}), "list_tokens").await["status"],
        200
    );
    env.stop().await;
}

#[tokio::test]
async fn delete_account_on_the_embedded_store() {
    delete_account(None).await;
}

#[tokio::test]
async fn delete_account_on_redis() {
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    delete_account(Some(store)).await;
}

/// Another process sharing the Redis (a second store instance with its own
/// connections, then `redis-cli`) revokes: the broker hears it on the pub/sub
/// channel and cuts the session within 2 s; an operator's `All` revocation
/// refuses even new tokens until the user is restored.
#[tokio::test]
async fn revocation_by_another_process_sharing_redis_cuts_within_2s() {
    let redis = RedisServer::start();
    let broker_store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let mut options = e2e::TestOptions::default();
    options.limits.revocation_poll = Duration::from_secs(60);
    options.revocation_store = Some(broker_store);
    let broker = TestBroker::start_with(options).await;
    let other = RedisStore::connect(&redis.url()).await.unwrap();

    // The broker subscribes in the background: wait until a warm-up
    // revocation reaches it.
    let warm = UserId::parse("warm-up").unwrap();
    let mut warm_dev = broker.device("warm-up", "w").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        other
            .revoke_user(&warm, Revocation::IssuedBefore(now_secs() + 1))
            .await
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(500), warm_dev.closed())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker never heard a revocation"
        );
    }

    let uid = UserId::parse("555").unwrap();
    let old_token = token_issued_at(&broker, "555", now_secs() - 5);
    let mut dev = V5Client::connect(broker.tls_target(), "p555", "JWT", &old_token, |_| {});
    dev.connected().await;
    let mut bystander = broker.device("556", "p556").await;

    let cutoff = now_secs() + 1;
    other
        .revoke_user(&uid, Revocation::IssuedBefore(cutoff))
        .await
        .unwrap();
    let ended = closed_within(&mut dev, CUT_WITHIN).await;
    assert!(ended.contains("AdministrativeAction"), "{ended}");
    let (v5, v4) = refusals(&broker, &old_token).await;
    assert!(v5.contains("NotAuthorized"), "{v5}");
    assert!(v4.contains("NotAuthorized"), "{v4}");
    bystander
        .assert_no_publish(Duration::from_millis(100))
        .await;
    assert_eq!(
        bystander.subscribe("556_x", QoS::AtMostOnce).await,
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(QoS::AtMostOnce)
    );

    // A later token works; then an operator revokes everything by hand, as
    // store/SCHEMA.md documents it, from a separate process
    // (redis-cli): the record, then the announcement.
    let new_token = token_issued_at(&broker, "555", cutoff);
    let mut back = V5Client::connect(broker.tls_target(), "p555", "JWT", &new_token, |_| {});
    back.connected().await;
    let port = redis.port.to_string();
    for args in [
        ["SET", "mqgate:revoked:555", "all"],
        ["PUBLISH", "mqgate:revocations", "555 all"],
    ] {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), out)
            .await
            .expect("redis-cli answers")
            .expect("redis-cli runs (Debian package redis-tools)");
        assert!(out.status.success(), "{out:?}");
    }
    let ended = closed_within(&mut back, CUT_WITHIN).await;
    assert!(ended.contains("AdministrativeAction"), "{ended}");
    let (v5, _) = refusals(&broker, &new_token).await;
    assert!(v5.contains("NotAuthorized"), "{v5}");
    assert_eq!(other.revocation(&uid).await.unwrap(), Some(Revocation::All));
    other.restore_user(&uid).await.unwrap();
    let mut restored = V5Client::connect(broker.tls_target(), "p555", "JWT", &old_token, |_| {});
    restored.connected().await;
    broker.shutdown().await;
}
