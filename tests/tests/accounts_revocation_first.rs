//! Deleted accounts stay deleted (issue 15): the revocation comes first and
//! is checked on every path that acts for a user, so nothing the user's old
//! sessions or tokens send after the deletion is acted on. Over real HTTP
//! and real MQTT over TLS, with one real `redis-server` shared by the
//! identity service, the broker's revocations and the built-in handlers:
//!
//! - a revoked device token (and the verified sign-up session of the same
//!   registration) cannot `/unregister` the account registered since;
//! - a second session's will (`store_token`) does not replant a platform
//!   token after `delete_account`, neither an immediate will (its session is
//!   cut by the revocation) nor a delayed one (Will Delay Interval,
//!   persistent session, connection already gone);
//! - a `store_token` sent right after `delete_account`'s answer, before the
//!   session is cut, is refused (`401 token revoked`) and not stored.
//!
//! The broker's revocation poll is a minute: every cut comes from the
//! revocation events.

mod handlers_common;
mod idp_common;

use e2e::clients::{Target, V5Client};
use e2e::TestBroker;
use handlers_common::Device;
use idp_common::Idp;
use protocol::UserId;
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, LastWill, LastWillProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use store::{RedisStore, Store};
use testkit::{Platform, RedisServer};
use tokio_util::sync::CancellationToken;

/// How long a revoked user's live session may last.
const CUT_WITHIN: Duration = Duration::from_secs(2);

/// The identity service, a broker trusting it and checking revocations
/// against the shared Redis, and the built-in handlers on the same Redis,
/// with two platforms (`mail`, `chat`) that need a stored user token.
struct Env {
    store: Arc<dyn Store>,
    idp: Idp,
    broker: TestBroker,
    shutdown: CancellationToken,
    handlers: Option<tokio::task::JoinHandle<()>>,
    _stop_handlers: tokio_util::sync::DropGuard,
    _platform: Platform,
    _dir: tempfile::TempDir,
    _redis: RedisServer,
}

impl Env {
    async fn start() -> Env {
        e2e::init_logging();
        let redis = RedisServer::start();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
        let idp = Idp::start(store.clone(), &redis.url(), |_| {}).await;
        let mut options = idp_common::options(&idp, store.clone());
        options.limits.revocation_poll = Duration::from_secs(60);
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
        let dir = tempfile::tempdir().unwrap();
        let mut settings = handlers::Settings::from_lookup(|var| match var {
            "PLATFORMS" => Some(format!(
                "mail={},chat={}",
                platform.url("/mail"),
                platform.url("/chat")
            )),
            _ => None,
        })
        .unwrap();
        settings.broker_url = format!("mqtts://127.0.0.1:{}", broker.tls_addr.port());
        settings.broker_ca = Some(broker.ca_file.clone());
        settings.handler_key = e2e::TEST_HANDLER_KEY.into();
        settings.data_dir = dir.path().to_owned();
        settings.redis_url = Some(redis.url().into());
        settings.tokens_master_key = Some(handlers::tokens::MasterKey::generate().0);
        let shutdown = CancellationToken::new();
        let handlers =
            handlers::spawn_builtin_with_store(settings, store.clone(), shutdown.clone()).unwrap();
        Env {
            store,
            idp,
            broker,
            shutdown: shutdown.clone(),
            handlers: Some(handlers),
            _stop_handlers: shutdown.drop_guard(),
            _platform: platform,
            _dir: dir,
            _redis: redis,
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            addr: self.broker.tls_addr,
            ca_file: Some(&self.broker.ca_file),
        }
    }

    /// A device of `uid` logged in with `token`, subscribed to the replies
    /// of the accounts commands, with the handlers answering.
    async fn device(&self, uid: &str, token: &str) -> Device {
        let id = format!("phone-{}", rand::random::<u32>());
        let mut client = V5Client::connect(self.target(), &id, "JWT", token, |_| {});
        client.connected().await;
        let mut dev = Device {
            uid: uid.to_owned(),
            client,
        };
        dev.subscribe(&["store_token", "list_tokens", "delete_account"])
            .await;
        dev.wait_for("list_tokens", "list_tokens").await;
        dev
    }

    /// The platforms the user holds a token for, as `list_tokens` tells a
    /// device logged in with `token`.
    async fn listed(&self, uid: &str, token: &str) -> Value {
        let mut dev = self.device(uid, token).await;
        let listed = ask(&mut dev, "list_tokens", json!({}), "list_tokens").await;
        assert_eq!(listed["status"], 200, "{listed}");
        listed["platforms"].clone()
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

/// Sends `topic` with `body` and returns the reply on `<uid>_<reply>`.
async fn ask(dev: &mut Device, topic: &str, body: Value, reply: &str) -> Value {
    dev.send(topic, body).await;
    dev.reply_on(reply).await
}

/// Waits until `client`'s connection ends, at most `within`; what ended it.
async fn closed_within(client: &mut V5Client, within: Duration) -> String {
    tokio::time::timeout(within, client.closed())
        .await
        .unwrap_or_else(|_| panic!("the session was not cut within {within:?}"))
}

/// A second session of the user, logged in with `token`, whose will stores
/// a platform token for `platform`: at once (`delay` 0, clean session) or
/// `delay` seconds after its connection is gone (persistent session).
async fn session_with_store_token_will(
    env: &Env,
    token: &str,
    client_id: &str,
    platform: &str,
    delay: u32,
) -> V5Client {
    let will = json!({"platform": platform, "token": {"access_token": "replanted"}});
    let mut client = V5Client::connect(env.target(), client_id, "JWT", token, |o| {
        if delay > 0 {
            o.set_clean_start(false);
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(600);
            o.set_connect_properties(props);
        }
        o.set_last_will(LastWill::new(
            "store_token",
            will.to_string(),
            QoS::AtLeastOnce,
            false,
            Some(LastWillProperties {
                delay_interval: Some(delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            }),
        ));
    });
    client.connected().await;
    client
}

#[tokio::test]
async fn a_revoked_token_cannot_unregister_the_account_registered_since() {
    let env = Env::start().await;
    let number = "+15550100001";
    let (old_session, old_token, uid) = env.idp.sign_up_session(number).await;
    let user = UserId::parse(&uid).unwrap();
    // Unregistered with the device token: the sign-up session stays
    // verified (until it expires).
    let (status, body) = env.idp.post("/unregister", Some(&old_token), None).await;
    assert_eq!(status, 200, "{body}");

    // Registered again (the same second, even): a new account with data.
    let (new_token, again) = env.idp.sign_up(number).await;
    assert_eq!(again, uid);
    let mut dev = env.device(&uid, &new_token).await;
    let stored = ask(
        &mut dev,
        "store_token",
        json!({"platform": "mail", "token": {"access_token": "new-account"}}),
        "store_token",
    )
    .await;
    assert_eq!(stored["status"], 200, "{stored}");
    let registered = env.store.registration(&user).await.unwrap();
    assert!(registered.is_some());

    // The old credentials are refused, with a clear error, and delete nothing.
    for (credential, what) in [
        (old_token.as_str(), "device token"),
        (&old_session, "session"),
    ] {
        let (status, body) = env.idp.post("/unregister", Some(credential), None).await;
        assert_eq!(status, 401, "the old {what}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("revoked"), "the old {what}: {error:?}");
    }
    assert_eq!(env.store.registration(&user).await.unwrap(), registered);
    assert_eq!(
        env.store.platforms_with_tokens(&user).await.unwrap(),
        vec!["mail"]
    );
    // The new session is not cut, and its token still works.
    dev.client
        .assert_no_publish(Duration::from_millis(500))
        .await;
    assert_eq!(
        ask(&mut dev, "list_tokens", json!({}), "list_tokens").await["platforms"],
        json!(["mail"])
    );
    assert!(idp_common::connect(&env.broker, &new_token).await.1.is_ok());
    env.stop().await;
}

#[tokio::test]
async fn wills_do_not_replant_data_after_delete_account() {
    let env = Env::start().await;
    let number = "+15550100002";
    let (token, uid) = env.idp.sign_up(number).await;
    let user = UserId::parse(&uid).unwrap();
    let mut phone = env.device(&uid, &token).await;
    // A tablet of the same user, live, whose will stores a `mail` token at
    // once; and a watch whose will stores a `chat` token 2 s after its
    // connection is gone (the connection is already gone: the will waits).
    let mut tablet = session_with_store_token_will(&env, &token, "tablet", "mail", 0).await;
    let watch = session_with_store_token_will(&env, &token, "watch", "chat", 2).await;
    drop(watch);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let deleted = ask(&mut phone, "delete_account", json!({}), "delete_account").await;
    assert_eq!(deleted, json!({"status": 200}));
    closed_within(&mut phone.client, CUT_WITHIN).await;
    let ended = closed_within(&mut tablet, CUT_WITHIN).await;
    assert!(ended.contains("AdministrativeAction"), "{ended}");

    // Past the watch's will delay, and time for the handlers to act.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.store.platforms_with_tokens(&user).await.unwrap(),
        Vec::<String>::new(),
        "a will replanted a platform token into the deleted account"
    );
    // The account registered again starts empty.
    let (new_token, again) = env.idp.sign_up(number).await;
    assert_eq!(again, uid);
    assert_eq!(env.listed(&uid, &new_token).await, json!([]));
    env.stop().await;
}

#[tokio::test]
async fn a_command_sent_right_after_delete_account_is_not_acted_on() {
    let env = Env::start().await;
    let number = "+15550100003";
    let (token, uid) = env.idp.sign_up(number).await;
    let user = UserId::parse(&uid).unwrap();
    let mut phone = env.device(&uid, &token).await;

    let deleted = ask(&mut phone, "delete_account", json!({}), "delete_account").await;
    assert_eq!(deleted, json!({"status": 200}));
    // At once, before the session is cut: refused, not stored.
    let refused = ask(
        &mut phone,
        "store_token",
        json!({"platform": "mail", "token": {"access_token": "too-late"}, "request_id": "late"}),
        "store_token",
    )
    .await;
    assert_eq!(
        refused,
        json!({"status": 401, "error": "token revoked", "request_id": "late"})
    );
    closed_within(&mut phone.client, CUT_WITHIN).await;
    assert!(env
        .store
        .platforms_with_tokens(&user)
        .await
        .unwrap()
        .is_empty());
    let (new_token, _) = env.idp.sign_up(number).await;
    assert_eq!(env.listed(&uid, &new_token).await, json!([]));
    env.stop().await;
}
