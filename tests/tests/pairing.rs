//! Device pairing end to end (issue 18, SWOB sync sessions): a signed-in
//! browser (a real MQTT 5 client over TLS with an identity-service token)
//! opens a session with `sync_session` and watches its codes rotate on
//! `<uid>_sync_session`; a phone with no token (a real HTTP client) claims
//! a code at the identity service's `POST /sync/pair`; the browser is told
//! `pause` and confirms or declines with `sync_session_confirm`. The
//! identity service, the built-in handlers and the broker share a real
//! `redis-server` (or, as in the `broker` binary, one embedded store).

mod handlers_common;
mod idp_common;

use e2e::TestBroker;
use envelope::device;
use handlers_common::Device;
use idp_common::{connect, options, Idp, ADMIN};
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use store::Store;
use testkit::RedisServer;
use tokio_util::sync::CancellationToken;

fn phone_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa key"))
}

fn phone_pem() -> String {
    phone_key()
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

/// The identity service, the broker and the built-in handlers on one store.
struct Rig {
    idp: Idp,
    broker: TestBroker,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    handlers: tokio::task::JoinHandle<()>,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// `rotate` and `paused` as the handler's settings; `embedded`: one
    /// redb store shared in-process (the `broker` binary's default).
    async fn start(rotate: Duration, changes: u32, paused: Duration, embedded: bool) -> Rig {
        Rig::start_with(rotate, changes, paused, embedded, |_| {}).await
    }

    /// As [`Rig::start`], with the identity service's settings adjusted.
    async fn start_with(
        rotate: Duration,
        changes: u32,
        paused: Duration,
        embedded: bool,
        adjust_idp: impl FnOnce(&mut idp::config::Settings),
    ) -> Rig {
        e2e::init_logging();
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = if embedded {
            Arc::new(
                store::EmbeddedStore::open(&dir.path().join("store.redb"))
                    .await
                    .unwrap(),
            )
        } else {
            Arc::new(store::RedisStore::connect(&redis.url()).await.unwrap())
        };
        let idp = Idp::start(store.clone(), &redis.url(), adjust_idp).await;
        let broker = TestBroker::start_with(options(&idp, store.clone())).await;
        let redis_url = (!embedded).then(|| redis.url());
        let mut settings =
            handlers_common::settings(&broker, dir.path(), redis_url, "http://127.0.0.1:9/in");
        settings.pairing = handlers::PairingSettings {
            rotate,
            changes,
            paused,
            pair_url: format!("{}/sync/pair", idp.base),
        };
        let shutdown = CancellationToken::new();
        let handlers =
            handlers::spawn_builtin_with_store(settings, store.clone(), shutdown.clone())
                .expect("handlers start");
        Rig {
            idp,
            broker,
            store,
            shutdown,
            handlers,
            _redis: redis,
            _dir: dir,
        }
    }

    /// A signed-in browser: signed up at the identity service, connected
    /// with its token, subscribed to its pairing messages, and the sync
    /// worker answering.
    async fn browser(&self, msisdn: &str) -> Device {
        let (token, uid) = self.idp.sign_up(msisdn).await;
        let (client, outcome) = connect(&self.broker, &token).await;
        outcome.expect("the browser's token is accepted");
        let mut dev = Device { uid, client };
        dev.subscribe(&["sync_session"]).await;
        // A confirm with nothing waiting is answered (409) once the worker is up.
        dev.wait_for("sync_session_confirm", "sync_session").await;
        dev
    }

    /// `POST /sync/pair` as a phone: (status, body).
    async fn pair(&self, code: &str) -> (u16, Value) {
        let body = json!({"code": code, "public_key": phone_pem()});
        self.idp.post("/sync/pair", None, Some(body)).await
    }

    /// The same, held open on a task of its own.
    fn pair_later(&self, code: &str) -> tokio::task::JoinHandle<(u16, Value)> {
        let url = format!("{}/sync/pair", self.idp.base);
        let body = json!({"code": code, "public_key": phone_pem()});
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handlers).await;
        self.broker.shutdown().await;
    }
}

/// Opens a session with `request_id` = `rid`; its first message.
async fn open(dev: &mut Device, rid: &str) -> Value {
    dev.send("sync_session", json!({"request_id": rid})).await;
    let first = message(dev, rid).await;
    assert_eq!(first["state"], "code", "{first}");
    first
}

/// The next message on `<uid>_sync_session` carrying `request_id` = `rid`
/// (messages of earlier sessions and probes are skipped).
async fn message(dev: &mut Device, rid: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no message for {rid}");
        let body = dev.reply_on("sync_session").await;
        if body["request_id"] == rid {
            return body;
        }
    }
}

fn code_of(message: &Value) -> String {
    message["code"].as_str().unwrap().to_owned()
}

/// Asserts that `body` is the full pairing answer for `uid` and returns
/// the phone's token after checking it decrypts to the user's stored key.
async fn check_paired(rig: &Rig, uid: &str, status: u16, body: &Value) -> String {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], uid, "{body}");
    let key = device::open_sync_reply(
        phone_key(),
        body["server_public_key"].as_str().unwrap(),
        body["encrypted_key"].as_str().unwrap(),
        body["signature"].as_str().unwrap(),
    )
    .expect("the phone decrypts its key with its private key");
    let user = protocol::UserId::parse(uid).unwrap();
    let stored = rig.store.get_key(&user).await.unwrap().unwrap();
    assert_eq!(stored.key, key, "the shared key is the user's current key");
    assert_eq!(body["key_id"], stored.key_id.as_str());
    assert_eq!(body["platforms"], json!(["sms"]));
    assert_eq!(body["gateways"], json!(["+237600000000", "+15550000000"]));
    body["token"].as_str().unwrap().to_owned()
}

/// The whole flow: a code, its replacement (the replaced code is dead at
/// once), a phone's claim (201 pause), the confirm (200 ack), and the
/// phone's token and key, which work; then no step can be replayed.
async fn full_flow(embedded: bool) {
    let rig = Rig::start(Duration::from_secs(1), 3, Duration::from_secs(20), embedded).await;
    let mut browser = rig.browser("+15551230001").await;
    let uid = browser.uid.clone();

    let first = open(&mut browser, "open-1").await;
    assert_eq!(first["status"], 200);
    assert_eq!(first["expires_in"], 1);
    let code1 = code_of(&first);
    assert_eq!(code1.len(), 45, "two 128-bit halves in base64url");
    assert_eq!(
        first["url"],
        format!("{}/sync/pair?code={code1}", rig.idp.base)
    );

    // The code is replaced within its life (plus a poll); the old one is dead.
    let second = message(&mut browser, "open-1").await;
    assert_eq!(second["state"], "code", "{second}");
    let code2 = code_of(&second);
    assert_ne!(code1, code2);
    let (status, body) = rig.pair(&code1).await;
    assert_eq!(status, 410, "a replaced code: {body}");

    // The phone claims the live code; the browser is told to ask the person.
    let asked = Instant::now();
    let phone = rig.pair_later(&code2);
    let pause = message(&mut browser, "open-1").await;
    assert_eq!(
        pause,
        json!({"status": 201, "state": "pause", "request_id": "open-1"})
    );
    assert!(!phone.is_finished(), "the phone's request is held open");
    // Codes no longer rotate while paused.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), browser.reply())
            .await
            .is_err(),
        "nothing more until the person decides"
    );

    browser
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "confirm-1"}),
        )
        .await;
    let ack = message(&mut browser, "confirm-1").await;
    assert_eq!(
        ack,
        json!({"status": 200, "state": "ack", "request_id": "confirm-1"})
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), phone)
        .await
        .expect("the phone is answered soon after the confirm")
        .unwrap();
    let token = check_paired(&rig, &uid, status, &body).await;
    println!("pairing: claim to answer {:?}", asked.elapsed());

    // The phone's token works on MQTT, as the same user.
    let (client, outcome) = connect(&rig.broker, &token).await;
    outcome.expect("the paired phone's token is accepted");
    let mut phone_dev = Device {
        uid: uid.clone(),
        client,
    };
    phone_dev.subscribe(&["contact_list"]).await;
    phone_dev
        .send("get_contact_list", json!({"request_id": "phone-1"}))
        .await;
    let contacts = phone_dev.reply_on("contact_list").await;
    assert_eq!(contacts["contacts"], json!([]), "{contacts}");

    // No replay: the used code, and a second confirm.
    let (status, body) = rig.pair(&code2).await;
    assert_eq!(status, 410, "a used code: {body}");
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "confirm-2"}),
        )
        .await;
    let again = message(&mut browser, "confirm-2").await;
    assert_eq!(again["status"], 409, "{again}");
    rig.stop().await;
}

#[tokio::test]
async fn pairs_a_phone_on_redis() {
    full_flow(false).await;
}

#[tokio::test]
async fn pairs_a_phone_on_the_embedded_store() {
    full_flow(true).await;
}

/// Declined: 403 and no token; nobody decides: 408 for the phone and
/// `expired` for the browser; a late confirm changes nothing.
#[tokio::test]
async fn declined_or_undecided_phones_get_nothing() {
    let rig = Rig::start(Duration::from_secs(5), 3, Duration::from_secs(2), false).await;
    let mut browser = rig.browser("+15551230002").await;

    let code = code_of(&open(&mut browser, "open-d").await);
    let phone = rig.pair_later(&code);
    assert_eq!(message(&mut browser, "open-d").await["status"], 201);
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": false, "request_id": "no"}),
        )
        .await;
    let declined = message(&mut browser, "no").await;
    assert_eq!(
        declined,
        json!({"status": 200, "state": "declined", "request_id": "no"})
    );
    let (status, body) = phone.await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.get("token").is_none(), "{body}");
    let user = protocol::UserId::parse(&browser.uid).unwrap();
    assert!(
        rig.store.get_key(&user).await.unwrap().is_none(),
        "no key made"
    );

    let code = code_of(&open(&mut browser, "open-t").await);
    let started = Instant::now();
    let phone = rig.pair_later(&code);
    assert_eq!(message(&mut browser, "open-t").await["status"], 201);
    let (status, body) = phone.await.unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.get("token").is_none(), "{body}");
    let waited = started.elapsed();
    // Held for the pause, and answered once it has passed (the bound is
    // generous: CI machines are loaded; a request held forever fails it).
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "held for the pause: {waited:?}"
    );
    let expired = message(&mut browser, "open-t").await;
    assert_eq!(
        expired,
        json!({"status": 408, "state": "expired", "request_id": "open-t"})
    );
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "late"}),
        )
        .await;
    assert_eq!(message(&mut browser, "late").await["status"], 409);
    assert!(
        rig.store.get_key(&user).await.unwrap().is_none(),
        "no key made"
    );
    rig.stop().await;
}

/// After `SYNC_SESSION_CHANGES` replacements the session ends: `expired`,
/// and its last code is dead.
#[tokio::test]
async fn a_session_expires_after_its_changes() {
    let rig = Rig::start(Duration::from_secs(1), 2, Duration::from_secs(5), false).await;
    let mut browser = rig.browser("+15551230003").await;
    let opened = Instant::now();
    let mut codes = vec![code_of(&open(&mut browser, "open-e").await)];
    loop {
        let next = message(&mut browser, "open-e").await;
        if next["state"] == "code" {
            codes.push(code_of(&next));
            continue;
        }
        assert_eq!(
            next,
            json!({"status": 408, "state": "expired", "request_id": "open-e"})
        );
        break;
    }
    assert_eq!(codes.len(), 3, "the first code and two replacements");
    let lasted = opened.elapsed();
    // Three codes of a second each (then a poll): not ended early, and not
    // left running (the upper bound is generous for loaded machines).
    assert!(
        lasted >= Duration::from_millis(2900) && lasted < Duration::from_secs(15),
        "{lasted:?}"
    );
    for code in &codes {
        let (status, body) = rig.pair(code).await;
        assert_eq!(status, 410, "{body}");
    }
    rig.stop().await;
}

/// Phones racing one code: exactly one is held for the decision, the
/// others get 410; the confirm pairs that one.
#[tokio::test]
async fn phones_racing_one_code_pair_once() {
    let rig = Rig::start(Duration::from_secs(10), 1, Duration::from_secs(10), false).await;
    let mut browser = rig.browser("+15551230004").await;
    let code = code_of(&open(&mut browser, "open-r").await);
    let phones: Vec<_> = (0..6).map(|_| rig.pair_later(&code)).collect();
    assert_eq!(message(&mut browser, "open-r").await["status"], 201);
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "yes"}),
        )
        .await;
    assert_eq!(message(&mut browser, "yes").await["state"], "ack");
    let mut paired = 0;
    for phone in phones {
        let (status, body) = phone.await.unwrap();
        match status {
            200 => {
                check_paired(&rig, &browser.uid, status, &body).await;
                paired += 1;
            }
            410 => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(paired, 1);
    rig.stop().await;
}

/// Another user's confirm reaches only their own (absent) session; the
/// owner's confirm still works.
#[tokio::test]
async fn another_users_confirm_cannot_confirm() {
    let rig = Rig::start(Duration::from_secs(10), 1, Duration::from_secs(10), false).await;
    let mut alice = rig.browser("+15551230005").await;
    let mut mallory = rig.browser("+15551230006").await;
    let code = code_of(&open(&mut alice, "open-a").await);
    let phone = rig.pair_later(&code);
    assert_eq!(message(&mut alice, "open-a").await["status"], 201);
    mallory
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "forged"}),
        )
        .await;
    let refused = message(&mut mallory, "forged").await;
    assert_eq!(refused["status"], 409, "{refused}");
    // The 409 comes after the store refused the decision: alice's session
    // is still waiting for her, and her phone is still held.
    let session = code.split('.').next().unwrap();
    let record = rig.store.pairing(session).await.unwrap().unwrap();
    assert_eq!(record.state, store::PairingState::Paused);
    assert_eq!(record.uid.as_str(), alice.uid);
    assert!(!phone.is_finished(), "nothing decided by another user");
    // A forged confirm in Mallory's own open session reaches only hers:
    // she opens one, and her confirm finds nothing waiting there either.
    let own = code_of(&open(&mut mallory, "open-m").await);
    mallory
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "forged-2"}),
        )
        .await;
    assert_eq!(message(&mut mallory, "forged-2").await["status"], 409);
    let record = rig.store.pairing(session).await.unwrap().unwrap();
    assert_eq!(
        record.state,
        store::PairingState::Paused,
        "alice's untouched"
    );
    let mine = own.split('.').next().unwrap();
    let record = rig.store.pairing(mine).await.unwrap().unwrap();
    assert_eq!(
        record.state,
        store::PairingState::Code,
        "mallory's unclaimed"
    );
    alice
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "mine"}),
        )
        .await;
    assert_eq!(message(&mut alice, "mine").await["state"], "ack");
    let (status, body) = phone.await.unwrap();
    check_paired(&rig, &alice.uid, status, &body).await;
    rig.stop().await;
}

/// A user an operator revoked cannot pair: the claim is refused before
/// the code is used, and no token is issued.
#[tokio::test]
async fn a_revoked_user_cannot_pair() {
    let rig = Rig::start(Duration::from_secs(10), 1, Duration::from_secs(10), false).await;
    let mut browser = rig.browser("+15551230007").await;
    let code = code_of(&open(&mut browser, "open-v").await);
    let path = format!("/admin/users/{}/revoke", browser.uid);
    let (status, body) = rig.idp.post(&path, Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = rig.pair(&code).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.get("token").is_none());
    // The refusal came before the claim: the code was not used.
    let session = code.split('.').next().unwrap();
    let record = rig.store.pairing(session).await.unwrap().unwrap();
    assert_eq!(record.state, store::PairingState::Code);
    rig.stop().await;
}

/// Malformed bodies, codes and keys: each a clear 4xx, none uses a live
/// code; malformed confirms are answered on `<uid>_sync_session`; and
/// afterwards the service still pairs.
#[tokio::test]
async fn garbage_is_refused_and_pairing_still_works() {
    let rig = Rig::start(Duration::from_secs(10), 1, Duration::from_secs(10), false).await;
    let mut browser = rig.browser("+15551230008").await;
    let code = code_of(&open(&mut browser, "open-g").await);
    let session = code.split('.').next().unwrap().to_owned();
    let pem = phone_pem();
    let cases: Vec<(Option<Vec<u8>>, u16)> = vec![
        (None, 400),
        (Some(b"not json".to_vec()), 400),
        (Some(b"{}".to_vec()), 400),
        (Some(b"[1,2]".to_vec()), 400),
        (Some(json!({"code": 5, "public_key": pem}).to_string().into_bytes()), 400),
        (Some(json!({"code": "", "public_key": pem}).to_string().into_bytes()), 410),
        (Some(json!({"code": "garbage", "public_key": pem}).to_string().into_bytes()), 410),
        (
            Some(json!({"code": format!("{session}.{}", "x".repeat(22)), "public_key": pem}).to_string().into_bytes()),
            410,
        ),
        (
            Some(json!({"code": format!("{}.{}", "y".repeat(22), "x".repeat(22)), "public_key": pem}).to_string().into_bytes()),
            410,
        ),
        (Some(json!({"code": code, "public_key": "not a key"}).to_string().into_bytes()), 400),
        (Some(json!({"code": code, "public_key": ""}).to_string().into_bytes()), 400),
        (Some(vec![b'{'; 5000]), 413),
        (Some("{\"code\":\"\u{0}\u{ffff}\"}".as_bytes().to_vec()), 400),
    ];
    for (body, want) in cases {
        let shown = body
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned());
        let (status, answer) = rig.idp.post_raw("/sync/pair", None, body).await;
        assert_eq!(status, want, "{shown:?}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let get = reqwest::get(format!("{}/sync/pair?code={code}", rig.idp.base))
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405);

    for payload in [&b"{\"accept\": \"yes\"}"[..], b"{}", b"not json", b"[true]"] {
        browser
            .send_raw("sync_session_confirm", payload.to_vec())
            .await;
        let (name, answer) = browser.reply().await;
        assert_eq!(name, "sync_session");
        assert_eq!(answer["status"], 400, "{answer}");
    }

    // The live code was never used by the refusals.
    let phone = rig.pair_later(&code);
    assert_eq!(message(&mut browser, "open-g").await["status"], 201);
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "ok"}),
        )
        .await;
    assert_eq!(message(&mut browser, "ok").await["state"], "ack");
    let (status, body) = phone.await.unwrap();
    check_paired(&rig, &browser.uid, status, &body).await;
    rig.stop().await;
}

/// `POST /sync/pair` with the phone's key: (status, body), failing the test
/// if the answer takes longer than `within` (a dead code is answered at
/// once, never held for the pause).
async fn pair_within(rig: &Rig, code: &str, within: Duration) -> (u16, Value) {
    let body = json!({"code": code, "public_key": phone_pem()});
    let response = reqwest::Client::new()
        .post(format!("{}/sync/pair", rig.idp.base))
        .json(&body)
        .timeout(within)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer within {within:?} (held?): {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Dead codes are answered 410 at once, not held for the pause (a minute
/// here): an unknown one, one of a session the user replaced by opening a
/// new one, a declined session's, a used one replayed while its phone is
/// still held, and a timed-out session's. None of them is ever claimed.
#[tokio::test]
async fn dead_codes_are_gone_at_once() {
    let rig = Rig::start(Duration::from_secs(60), 1, Duration::from_secs(60), false).await;
    let mut browser = rig.browser("+15551230009").await;
    let at_once = Duration::from_secs(8);

    // Well-formed but unknown: a random session and secret.
    let unknown = store::PairingCode::generate(&store::new_session_id()).expose();
    let (status, body) = pair_within(&rig, &unknown, at_once).await;
    assert_eq!(status, 410, "{body}");
    assert!(body["error"].is_string(), "{body}");

    // A new session replaces the user's previous one: its code dies at once.
    let old = code_of(&open(&mut browser, "open-1").await);
    let new = code_of(&open(&mut browser, "open-2").await);
    let (status, body) = pair_within(&rig, &old, at_once).await;
    assert_eq!(status, 410, "the replaced session's code: {body}");
    let old_session = old.split('.').next().unwrap();
    let record = rig.store.pairing(old_session).await.unwrap().unwrap();
    assert_eq!(record.state, store::PairingState::Replaced);

    // The live code is claimed once; replayed while its phone is held: 410.
    let phone = rig.pair_later(&new);
    assert_eq!(message(&mut browser, "open-2").await["status"], 201);
    let (status, body) = pair_within(&rig, &new, at_once).await;
    assert_eq!(status, 410, "a replayed claim: {body}");
    assert!(!phone.is_finished(), "the first claim is still held");
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": false, "request_id": "no"}),
        )
        .await;
    assert_eq!(message(&mut browser, "no").await["state"], "declined");
    assert_eq!(phone.await.unwrap().0, 403);
    // A declined session's code, replayed: 410 (not 403: it is simply gone).
    let (status, body) = pair_within(&rig, &new, at_once).await;
    assert_eq!(status, 410, "a declined session's code: {body}");

    // No token was ever issued: the user has no key either.
    let user = protocol::UserId::parse(&browser.uid).unwrap();
    assert!(rig.store.get_key(&user).await.unwrap().is_none());
    rig.stop().await;
}

/// A timed-out session's code cannot be replayed to try again: 410; and a
/// confirm after the pause changes nothing.
#[tokio::test]
async fn a_timed_out_code_cannot_be_replayed() {
    let rig = Rig::start(Duration::from_secs(30), 1, Duration::from_secs(2), false).await;
    let mut browser = rig.browser("+15551230010").await;
    let code = code_of(&open(&mut browser, "open-t").await);
    let (status, body) = rig.pair(&code).await;
    assert_eq!(status, 408, "{body}");
    assert!(body.get("token").is_none(), "{body}");
    // `pause` (unless the driver's poll came only after the timeout), then `expired`.
    loop {
        let next = message(&mut browser, "open-t").await;
        if next["state"] == "expired" {
            assert_eq!(next["status"], 408, "{next}");
            break;
        }
        assert_eq!(next["state"], "pause", "{next}");
    }
    let (status, body) = pair_within(&rig, &code, Duration::from_secs(8)).await;
    assert_eq!(status, 410, "{body}");
    browser
        .send(
            "sync_session_confirm",
            json!({"accept": true, "request_id": "late"}),
        )
        .await;
    assert_eq!(message(&mut browser, "late").await["status"], 409);
    let user = protocol::UserId::parse(&browser.uid).unwrap();
    assert!(rig.store.get_key(&user).await.unwrap().is_none());
    rig.stop().await;
}

/// Codes are rate-limited per source address (`IDP_PAIR_RATE_PER_ADDR`): a
/// guesser gets 429 with `Retry-After` after a handful of tries, before
/// any code is looked at, so even the live code is not claimed then.
#[tokio::test]
async fn guessing_codes_is_rate_limited_per_address() {
    let rig = Rig::start_with(
        Duration::from_secs(60),
        1,
        Duration::from_secs(10),
        false,
        |s| s.pair_rate_per_addr = 4,
    )
    .await;
    let mut browser = rig.browser("+15551230011").await;
    let code = code_of(&open(&mut browser, "open-g").await);
    let session = code.split('.').next().unwrap().to_owned();
    // Guesses: the right session with a wrong secret, and random codes.
    for guess in 0..4 {
        let text = if guess % 2 == 0 {
            store::PairingCode::generate(&session).expose()
        } else {
            store::PairingCode::generate(&store::new_session_id()).expose()
        };
        let (status, body) = rig.pair(&text).await;
        assert_eq!(status, 410, "guess {guess}: {body}");
    }
    let response = reqwest::Client::new()
        .post(format!("{}/sync/pair", rig.idp.base))
        .json(&json!({"code": code, "public_key": phone_pem()}))
        .timeout(Duration::from_secs(8))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "60");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("pairing attempts"),
        "{body}"
    );
    let record = rig.store.pairing(&session).await.unwrap().unwrap();
    assert_eq!(
        record.state,
        store::PairingState::Code,
        "the refused request claimed nothing"
    );
    // The other endpoints keep their own budget: sign-up still works from here.
    let (status, body) = rig
        .idp
        .post("/register", None, Some(json!({"msisdn": "+15551230012"})))
        .await;
    assert_eq!(status, 200, "{body}");
    rig.stop().await;
}

/// A user who deleted their account (the revocation "tokens issued before
/// now") cannot pair a phone from the session opened before: the claim is
/// refused (403) and the code is not used.
#[tokio::test]
async fn a_deleted_account_cannot_pair() {
    let rig = Rig::start(Duration::from_secs(60), 1, Duration::from_secs(10), false).await;
    let mut browser = rig.browser("+15551230013").await;
    browser.subscribe(&["delete_account"]).await;
    let code = code_of(&open(&mut browser, "open-x").await);
    browser
        .send("delete_account", json!({"request_id": "bye"}))
        .await;
    let deleted = browser.reply_on("delete_account").await;
    assert_eq!(deleted["status"], 200, "{deleted}");
    let (status, body) = rig.pair(&code).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.get("token").is_none(), "{body}");
    let session = code.split('.').next().unwrap();
    let record = rig.store.pairing(session).await.unwrap().unwrap();
    assert_eq!(record.state, store::PairingState::Code, "not claimed");
    rig.stop().await;
}
