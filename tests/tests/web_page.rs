//! The sign-up page (`idp/web/`, served by the identity service at `/app/`)
//! in a real headless Chromium, driven over WebDriver (`browser_common`):
//! a person types a phone number and the one-time code the service wrote to
//! its log (development mode: no SMS provider), and the page takes it from
//! there: MQTT.js over `wss://` to the broker with the issued token, the
//! contact list and a sync over the built-in handlers, then a pairing
//! session whose QR code rotates, claimed by a simulated phone (an HTTP
//! client with its own RSA key) and confirmed on the page; the phone's
//! token then works on MQTT. The broker, the identity service and the
//! built-in handlers share one embedded store, as in the `broker` binary.

mod browser_common;
mod handlers_common;
mod idp_common;

use browser_common::Browser;
use e2e::{TestBroker, TestOptions};
use handlers_common::Device;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::Store;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

const PHONE: &str = "+15551230001";
/// A second number for the WebSocket test (each test its own user).
const PHONE_WSS: &str = "+15551230002";

/// The uid the identity service's test settings derive for `phone`.
fn uid_of(phone: &str) -> protocol::UserId {
    let secret = idp::config::Settings::for_tests(std::path::PathBuf::new())
        .uid_secret
        .unwrap();
    idp::msisdn::Msisdn::parse(phone)
        .unwrap()
        .uid(secret.expose().as_bytes())
        .unwrap()
}

/// The one-time codes the identity service logged (its `code` field), in
/// order, each with the masked number it went to (its `to` field, e.g.
/// `+*********01`): tests run at once in one process, each with its own
/// number, and each reads only its own codes.
#[derive(Clone, Default)]
struct LoggedCodes(Arc<Mutex<Vec<(String, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LoggedCodes {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Code {
            to: Option<String>,
            code: Option<String>,
        }
        impl tracing::field::Visit for Code {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "code" => self.code = Some(format!("{value:?}")),
                    "to" => self.to = Some(format!("{value:?}")),
                    _ => {}
                }
            }
        }
        let mut code = Code::default();
        event.record(&mut code);
        if let (Some(to), Some(code)) = (code.to, code.code) {
            self.0.lock().unwrap().push((to, code));
        }
    }
}

impl LoggedCodes {
    /// Installs the log (once per test process) beside the usual test output.
    fn install() -> LoggedCodes {
        static CODES: std::sync::OnceLock<LoggedCodes> = std::sync::OnceLock::new();
        CODES
            .get_or_init(|| {
                let codes = LoggedCodes::default();
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
                let output = tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter);
                let _ = tracing_subscriber::registry()
                    .with(codes.clone())
                    .with(output)
                    .try_init();
                codes
            })
            .clone()
    }

    /// The codes sent to `phone` so far (matched by the two digits the
    /// masked number keeps).
    fn sent_to(&self, phone: &str) -> Vec<String> {
        let suffix = &phone[phone.len() - 2..];
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(to, _)| to.trim_matches('"').ends_with(suffix))
            .map(|(_, code)| code.clone())
            .collect()
    }

    /// The next code sent to `phone` after `seen` codes to it, within 10 s.
    async fn next(&self, phone: &str, seen: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(code) = self.sent_to(phone).get(seen) {
                return code.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no one-time code to {phone} was logged within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn count(&self, phone: &str) -> usize {
        self.sent_to(phone).len()
    }
}

/// The identity service in development mode (codes logged, not sent) on
/// `listener`, over `store`, its page pointed at `mqtt_url`.
async fn identity(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    keys: &std::path::Path,
    mqtt_url: Option<String>,
) -> (String, Arc<idp::Idp>, CancellationToken) {
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut settings = idp::config::Settings::for_tests(keys.to_owned());
    settings.public_url = base.clone();
    settings.web_mqtt_url = mqtt_url;
    let service = idp::Idp::start(settings, store).await.unwrap();
    assert!(service.is_development(), "codes are logged, not sent");
    let shutdown = CancellationToken::new();
    tokio::spawn(idp::serve(listener, service.clone(), shutdown.clone()));
    (base, service, shutdown)
}

/// Signs up on the page with `phone` and the code read from the log;
/// returns the uid the page shows.
async fn sign_up(browser: &Browser, codes: &LoggedCodes, phone: &str) -> String {
    browser
        .wait_shown("number-form", Duration::from_secs(10))
        .await;
    let seen = codes.count(phone);
    browser.type_into("msisdn", phone).await;
    browser.click("send-code").await;
    browser
        .wait_shown("code-form", Duration::from_secs(10))
        .await;
    let code = codes.next(phone, seen).await;
    browser.type_into("code", &code).await;
    browser.click("verify").await;
    browser.wait_shown("account", Duration::from_secs(10)).await;
    browser
        .wait_text("user-id", Duration::from_secs(5), "the uid", |t| {
            !t.is_empty()
        })
        .await
}

/// Without a broker URL the page still signs a person up, then says
/// plainly why it cannot go further; a wrong code is refused with the
/// service's reason.
#[tokio::test]
async fn without_a_broker_url_the_page_signs_up_and_says_what_is_missing() {
    let codes = LoggedCodes::install();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        store::EmbeddedStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (base, _service, shutdown) =
        identity(listener, store, &dir.path().join("keys"), None).await;
    let browser = Browser::start(None).await;
    browser.open(&format!("{base}/")).await;

    // A wrong code first: the service's reason is on the page.
    browser
        .wait_shown("number-form", Duration::from_secs(10))
        .await;
    let seen = codes.count(PHONE);
    browser.type_into("msisdn", PHONE).await;
    browser.click("send-code").await;
    browser
        .wait_shown("code-form", Duration::from_secs(10))
        .await;
    let code = codes.next(PHONE, seen).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    browser.type_into("code", wrong).await;
    browser.click("verify").await;
    let error = browser
        .wait_text("error", Duration::from_secs(10), "the refusal", |t| {
            !t.is_empty()
        })
        .await;
    assert!(error.contains("wrong code"), "{error}");
    // Then the logged one.
    browser.type_into("code", &code).await;
    browser.click("verify").await;
    browser.wait_shown("account", Duration::from_secs(10)).await;
    let uid = browser.text("user-id").await;
    assert_eq!(uid, uid_of(PHONE).as_str());
    let error = browser
        .wait_text(
            "error",
            Duration::from_secs(5),
            "why MQTT is out of reach",
            |t| t.contains("IDP_WEB_MQTT_URL"),
        )
        .await;
    assert!(error.contains("cannot reach MQTT"), "{error}");
    assert_eq!(browser.text("mqtt-status").await, "no broker URL");
    // Chromium logs the deliberate wrong code's 400 as a failed load;
    // anything else severe is a script error, a refused load or a CSP
    // violation.
    let console = browser.console_log().await;
    let unexpected: Vec<_> = console
        .iter()
        .filter(|m| m["level"] == "SEVERE")
        .filter(|m| {
            !(m["source"] == "network"
                && m["message"]
                    .as_str()
                    .is_some_and(|t| t.contains("/sms/verify_code") && t.contains("status of 400")))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "no script error, refused load or CSP violation: {unexpected:?}"
    );

    browser.close().await;
    shutdown.cancel();
}

/// The whole page over a real broker: sign-up, contacts and sync over
/// `wss://`, pairing a phone through a rotating QR code, pause and confirm.
#[tokio::test]
async fn a_person_signs_up_sees_contacts_over_wss_and_pairs_a_phone() {
    let codes = LoggedCodes::install();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        store::EmbeddedStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap(),
    );
    // The identity service's address first: the broker verifies its tokens
    // through its JWKS, and its page needs the broker's WebSocket URL.
    let idp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_addr = idp_listener.local_addr().unwrap();
    let mut options = TestOptions::default();
    options.jwt.jwks_url = Some(format!("http://{idp_addr}/.well-known/jwks.json"));
    options.revocation_store = Some(store.clone());
    let broker = TestBroker::start_with(options).await;
    let mqtt_url = format!("wss://localhost:{}/mqtt", broker.wss_addr.port());
    let (base, _service, idp_shutdown) = identity(
        idp_listener,
        store.clone(),
        &dir.path().join("keys"),
        Some(mqtt_url),
    )
    .await;

    // The built-in handlers, with codes that rotate every 2 s.
    let mut settings =
        handlers_common::settings(&broker, dir.path(), None, "http://127.0.0.1:9/in");
    settings.pairing = handlers::PairingSettings {
        rotate: Duration::from_secs(2),
        changes: 3,
        paused: Duration::from_secs(30),
        pair_url: format!("{base}/sync/pair"),
    };
    let shutdown = CancellationToken::new();
    let handlers = handlers::spawn_builtin_with_store(settings, store.clone(), shutdown.clone())
        .expect("handlers start");
    // Handlers subscribe after they connect: a command sent before that
    // reaches no one, so the page starts once they answer.
    let mut probe = Device::connect(&broker, "probe").await;
    probe.wait_for_handlers().await;

    // The person already has a contact, so that the list has something to show.
    let uid = uid_of(PHONE_WSS);
    let alice = protocol::UserId::parse("alice").unwrap();
    store.add_contact_request(&alice, &uid).await.unwrap();
    assert!(store.accept_contact(&alice, &uid).await.unwrap());

    // The browser trusts the test broker's certificate, and nothing else.
    let key_pem = std::fs::read_to_string(broker.ca_file.with_file_name("server-key.pem")).unwrap();
    let browser = Browser::start(Some(&browser_common::spki_hash_of_key(&key_pem))).await;
    browser.open(&format!("{base}/")).await;

    // 1. Sign up with the logged code; the page connects over wss://.
    let shown = sign_up(&browser, &codes, PHONE_WSS).await;
    assert_eq!(shown, uid.as_str());
    browser
        .wait_text("mqtt-status", Duration::from_secs(20), "connected", |t| {
            t == "connected"
        })
        .await;

    // 2. The contact list arrives over the WebSocket.
    browser
        .wait_text("contacts", Duration::from_secs(10), "alice", |t| {
            t == "alice"
        })
        .await;
    assert_eq!(browser.text("contacts-status").await, "1 contact:");

    // 3. Sync: the page makes an RSA key, checks the server's signature,
    // decrypts the shared key, and shows the key the store holds.
    browser.click("sync").await;
    let key_id = browser
        .wait_text("sync-key-id", Duration::from_secs(20), "a key id", |t| {
            !t.is_empty()
        })
        .await;
    let stored = store.get_key(&uid).await.unwrap().expect("a sync key");
    assert_eq!(key_id, stored.key_id);
    assert!(
        browser
            .text("sync-status")
            .await
            .contains("signature verified"),
        "{}",
        browser.text("sync-status").await
    );
    assert_eq!(browser.text("sync-platforms").await, "sms");

    // 4. A pairing session: the QR code shows, then changes.
    browser.click("pair-start").await;
    browser.wait_shown("pair-qr", Duration::from_secs(10)).await;
    let first_url = browser.attribute("qr", "data-url").await.unwrap();
    let first_image = browser.attribute("qr", "src").await.unwrap();
    assert!(
        first_url.starts_with(&format!("{base}/sync/pair?code=")),
        "{first_url}"
    );
    assert_eq!(
        browser_common::read_qr(&first_image),
        first_url,
        "the QR code carries the pairing URL"
    );
    browser
        .wait_until("the QR code to change", Duration::from_secs(10), || async {
            browser.attribute("qr", "data-url").await.as_deref() != Some(first_url.as_str())
        })
        .await;
    // The phone reads the URL from the image, as a camera would.
    let image = browser.attribute("qr", "src").await.unwrap();
    let url = browser_common::read_qr(&image);
    assert_ne!(url, first_url, "a new code is a new image");
    assert_eq!(
        browser.attribute("qr", "data-url").await.as_deref(),
        Some(url.as_str())
    );
    let code_of = |url: &str| url.split_once("?code=").unwrap().1.to_owned();

    // 5. A phone (no token, an HTTP client) scanned it: the replaced code is
    // dead, the shown one is held open until the person decides.
    let phone_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let public_key = phone_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    let replaced = http
        .post(format!("{base}/sync/pair"))
        .json(&json!({"code": code_of(&first_url), "public_key": public_key}))
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status(), 410, "a replaced code is dead");
    let phone = tokio::spawn({
        let request = http
            .post(format!("{base}/sync/pair"))
            .json(&json!({"code": code_of(&url), "public_key": public_key}));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    });

    // 6. The page asks the person (pause); they confirm; the page says ack.
    browser
        .wait_shown("pair-confirm", Duration::from_secs(10))
        .await;
    assert!(
        !browser.shown("pair-qr").await,
        "the QR code is gone while asking"
    );
    assert!(!phone.is_finished(), "the phone's request is held open");
    browser.click("pair-accept").await;
    browser
        .wait_text("pair-status", Duration::from_secs(10), "paired", |t| {
            t.starts_with("Paired")
        })
        .await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), phone)
        .await
        .expect("the phone is answered after the confirm")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], uid.as_str());
    envelope::device::open_sync_reply(
        &phone_key,
        body["server_public_key"].as_str().unwrap(),
        body["encrypted_key"].as_str().unwrap(),
        body["signature"].as_str().unwrap(),
    )
    .expect("the phone decrypts its shared key");

    // 7. The phone's token works on MQTT, as the same person.
    let token = body["token"].as_str().unwrap();
    let (client, outcome) = idp_common::connect(&broker, token).await;
    outcome.expect("the paired phone's token is accepted");
    let mut phone_device = Device {
        uid: uid.as_str().to_owned(),
        client,
    };
    phone_device.subscribe(&["contact_list"]).await;
    phone_device.send("get_contact_list", json!({})).await;
    let contacts = phone_device.reply_on("contact_list").await;
    assert_eq!(contacts["contacts"], json!(["alice"]), "{contacts}");

    // 8. The used code is spent; a second session, refused on the page:
    // the other phone gets 403 and no token.
    let reused = http
        .post(format!("{base}/sync/pair"))
        .json(&json!({"code": code_of(&url), "public_key": public_key}))
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 410, "a used code is dead");
    browser.click("pair-start").await;
    browser
        .wait_until("a new pairing code", Duration::from_secs(10), || async {
            browser.shown("pair-qr").await
                && browser.attribute("qr", "data-url").await.as_deref() != Some(url.as_str())
        })
        .await;
    let second = browser_common::read_qr(&browser.attribute("qr", "src").await.unwrap());
    let intruder = tokio::spawn({
        let request = http
            .post(format!("{base}/sync/pair"))
            .json(&json!({"code": code_of(&second), "public_key": public_key}));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    });
    browser
        .wait_shown("pair-confirm", Duration::from_secs(10))
        .await;
    browser.click("pair-decline").await;
    browser
        .wait_text("pair-status", Duration::from_secs(10), "refused", |t| {
            t.starts_with("Pairing refused")
        })
        .await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), intruder)
        .await
        .expect("the refused phone is answered")
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.get("token").is_none(), "{body}");

    // 9. A session nobody claims: the code changes, then the session ends
    // and the page says so, its QR code gone.
    browser.click("pair-start").await;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if browser.text("pair-status").await.contains("expired") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session did not expire; the page says {:?}",
            browser.text("pair-status").await
        );
        if browser.shown("pair-qr").await {
            if let Some(url) = browser.attribute("qr", "data-url").await {
                seen.insert(url);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!browser.shown("pair-qr").await, "no code after the end");
    assert!(!seen.contains(&second), "{seen:?}");
    assert!(
        seen.len() >= 2,
        "the code changed before expiring: {seen:?}"
    );

    let console = browser.console_log().await;
    assert!(
        console.iter().all(|m| m["level"] != "SEVERE"),
        "no script error, refused connection or CSP violation: {console:?}"
    );
    assert_eq!(browser.page_error().await, None);

    browser.close().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), handlers).await;
    broker.shutdown().await;
    idp_shutdown.cancel();
}
