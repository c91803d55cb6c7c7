//! Authentication and admission hardening against the real broker over TLS:
//! tokens with enormous `exp`, tokens with a `crit` header, a short
//! `JWT_SECRET` at start-up, the cap on unanswered connections per source,
//! and the in-process handlers' own admission on their internal listener
//! while the loopback address's public allowance is exhausted.

use e2e::clients::{Seen, V4Client, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY, TEST_SECRET};
use jsonwebtoken::{Algorithm, EncodingKey};
use protocol::claims::DeviceClaims;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A handler round trip to a connected MQTT 5 device `uid`: the handler
/// receives the device's command and the device receives the reply.
async fn round_trip_v5(broker: &TestBroker, device: &mut V5Client, uid: &str, handler_id: &str) {
    let mut handler = broker.handler(handler_id).await;
    handler.subscribe("get_contact_list", QoS::AtMostOnce).await;
    let reply_topic = format!("{uid}_contact_list");
    device.subscribe(&reply_topic, QoS::AtMostOnce).await;
    device
        .client
        .publish("get_contact_list", QoS::AtMostOnce, false, "{}")
        .await
        .expect("queue publish");
    let command = handler.publish_received().await;
    assert_eq!(command.topic, "get_contact_list");
    handler
        .client
        .publish(reply_topic.as_str(), QoS::AtMostOnce, false, "[]")
        .await
        .expect("queue reply");
    assert_eq!(device.publish_received().await.topic, reply_topic);
}

/// Enormous `exp` values overflowed the session's deadline arithmetic (10^19:
/// a panic in the session) or wrapped into "expired" (u64::MAX). Each such
/// device now connects over MQTT 5 and 3.1.1, is served, stays connected,
/// and the broker goes on serving everyone else.
#[tokio::test]
async fn devices_with_enormous_exp_connect_and_are_served() {
    let broker = TestBroker::start().await;
    let enormous = [10_000_000_000_000_000_000, u64::MAX, i64::MAX as u64];
    for (i, exp) in enormous.into_iter().enumerate() {
        let uid = format!("far{i}");
        let token = broker.token_with(&DeviceClaims {
            sub: uid.clone(),
            exp: Some(exp),
            ..Default::default()
        });

        let mut v5 = V5Client::connect(broker.tls_target(), &uid, "JWT", &token, |_| {});
        v5.connected().await;
        round_trip_v5(&broker, &mut v5, &uid, &format!("h5-{i}")).await;

        let mut v4 = V4Client::connect(
            broker.tls_target(),
            &format!("{uid}-v4"),
            "JWT",
            &token,
            |_| {},
        );
        v4.connected().await;
        let reply_topic = format!("{uid}_v4reply");
        v4.client
            .subscribe(reply_topic.as_str(), rumqttc::QoS::AtMostOnce)
            .await
            .expect("queue subscribe");
        v4.suback().await;
        let handler = broker.handler(&format!("h4-{i}")).await;
        handler
            .client
            .publish(reply_topic.as_str(), QoS::AtMostOnce, false, "[]")
            .await
            .expect("queue reply");
        assert_eq!(v4.publish_received().await.topic, reply_topic);

        // Not disconnected as expired a moment later (the wrap-around gave
        // a deadline already past), and the MQTT 5 session still answers.
        match v5.next_within(Duration::from_millis(1500)).await {
            None => {}
            Some(Seen::Packet(packet)) => {
                assert!(
                    !matches!(packet, rumqttc::v5::mqttbytes::v5::Packet::Disconnect(_)),
                    "exp {exp}: {packet:?}"
                )
            }
            Some(Seen::Error(e)) => panic!("exp {exp}: the device was cut off: {e}"),
        }
        v5.client
            .publish("get_contact_list", QoS::AtLeastOnce, false, "{}")
            .await
            .expect("queue publish");
        v5.puback().await;
    }
    // Sessions never panicked: ordinary clients are served, and the broker
    // shuts down cleanly (its router never stopped).
    let mut fresh = broker.device("after", "after").await;
    round_trip_v5(&broker, &mut fresh, "after", "h-after").await;
    broker.shutdown().await;
}

/// A compact JWS signed with the test secret whose header is `header`.
fn sign_with_header(header: &serde_json::Value, claims: &DeviceClaims) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(&serde_json::to_vec(claims).expect("claims"))
    );
    let signature = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .expect("sign");
    format!("{input}.{signature}")
}

/// RFC 7515 §4.1.11: a validly signed token whose header has `crit` naming
/// an extension the broker does not understand is refused: CONNACK 0x86
/// (3.1.1: code 4), counted under its reason. The same claims and signature
/// scheme without `crit` connect.
#[tokio::test]
async fn tokens_with_a_crit_header_are_refused() {
    let broker = TestBroker::start().await;
    let claims = DeviceClaims::new("crit1", 600);
    let plain = sign_with_header(&json!({"alg": "HS256", "typ": "JWT"}), &claims);
    let mut ok = V5Client::connect(broker.tls_target(), "ok", "JWT", &plain, |_| {});
    ok.connected().await;

    for header in [
        json!({"alg": "HS256", "typ": "JWT", "crit": ["urn:example:must-understand"], "urn:example:must-understand": true}),
        json!({"alg": "HS256", "crit": ["exp"]}),
        json!({"alg": "HS256", "crit": []}),
    ] {
        let token = sign_with_header(&header, &claims);
        let mut v5 = V5Client::connect(broker.tls_target(), "c5", "JWT", &token, |_| {});
        let refused = v5.connack().await.expect_err("crit must be refused");
        assert!(
            refused.contains("BadUserNamePassword"),
            "{header}: {refused}"
        );
        let mut v4 = V4Client::connect(broker.tls_target(), "c4", "JWT", &token, |_| {});
        let refused = v4.connack().await.expect_err("crit must be refused");
        assert!(
            refused.contains("BadUserNamePassword"),
            "{header}: {refused}"
        );
    }
    let metrics = broker.metrics_text().await;
    assert!(
        metrics.contains(
            "broker_connects_refused_total{reason=\"token header has unsupported crit extensions\"}"
        ),
        "{metrics}"
    );
    broker.shutdown().await;
}

/// A `JWT_SECRET` shorter than 32 bytes stops the broker at start-up, with
/// the way to make a good one; 32 bytes start; the development default is
/// long enough, and a short one left in an old `dev.env` is replaced.
#[test]
fn short_jwt_secret_is_refused_at_start_up() {
    use broker::config::BrokerArgs;
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = format!("--dev-dir={}", dir.path().display());
    let resolve = |secret: &str| {
        BrokerArgs::try_from_argv(["broker", &format!("--jwt-secret={secret}"), &dev])
            .expect("flags parse")
            .resolve()
    };
    for short in ["x", "change-me", &"a".repeat(31)] {
        let message = resolve(short)
            .expect_err("a short secret must be refused")
            .to_string();
        assert!(message.contains("JWT_SECRET"), "{message}");
        assert!(message.contains("openssl rand -hex 32"), "{message}");
        assert!(message.contains("32 bytes"), "{message}");
        assert!(
            !message.contains(short) || short.len() < 2,
            "never echoes the secret: {message}"
        );
    }
    let (config, ..) = resolve(&"a".repeat(32)).expect("32 bytes is enough");
    assert_eq!(config.jwt.hmac_secret.map(|s| s.len()), Some(32));

    // The development default, including over an old short one.
    std::fs::write(
        dir.path().join("dev.env"),
        "JWT_SECRET=short\nHANDLER_KEY=0123456789abcdef0123\n",
    )
    .expect("write dev.env");
    let (config, _, made) = BrokerArgs::try_from_argv(["broker", &dev])
        .expect("flags parse")
        .resolve()
        .expect("development defaults start");
    let secret = config.jwt.hmac_secret.expect("a development secret");
    assert!(secret.len() >= 32, "{} bytes", secret.len());
    assert!(made.jwt_secret.is_some());
}

// ---- Admission: a broker with the built-in handlers on an internal listener ----

/// The real broker as `main` runs it: a public TLS listener and an internal
/// loopback listener for the in-process built-in handlers.
struct WithHandlers {
    tls_addr: SocketAddr,
    internal_addr: SocketAddr,
    metrics_addr: SocketAddr,
    ca_file: PathBuf,
    running: Option<broker::RunningBroker>,
    settings: handlers::Settings,
    store: std::sync::Arc<dyn store::Store>,
    handlers_stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl WithHandlers {
    async fn start(limits: broker::config::Limits) -> Self {
        e2e::init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = broker::config::dev_certs::make_certificate_files(dir.path())
            .expect("test certificate");
        let acceptor =
            broker::tls::acceptor_from_files(&certs.cert_file, &certs.key_file).expect("acceptor");
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        let bind = || async { TcpListener::bind(localhost).await.expect("bind") };
        let (tls, internal, metrics) = (bind().await, bind().await, bind().await);
        let internal_addr = internal.local_addr().expect("internal addr");
        let store = store::open(None, dir.path()).await.expect("embedded store");
        let config = broker::config::Config {
            jwt: broker::auth::jwt::JwtSettings {
                hmac_secret: Some(protocol::Secret::from(TEST_SECRET)),
                ..Default::default()
            },
            handler_keys: vec![protocol::Secret::new(TEST_HANDLER_KEY)],
            command_topics: vec!["get_contact_list".into()],
            limits,
            revocations: None,
        };
        let running = broker::Broker::start(
            config,
            broker::Listeners {
                tls: Some((tls, acceptor)),
                tcp: Vec::new(),
                internal: Some(internal),
                metrics: Some(metrics),
                ..Default::default()
            },
        )
        .await
        .expect("broker starts");
        assert_eq!(running.internal_addr, Some(internal_addr));

        let mut settings = handlers::Settings::from_lookup(|_| None).expect("handler settings");
        settings.broker_url = format!("mqtt://{internal_addr}");
        settings.broker_ca = None;
        settings.handler_key = TEST_HANDLER_KEY.into();
        settings.data_dir = dir.path().to_owned();
        // The sync handler's RSA key, made now (slow in debug builds) so that
        // starting the handlers later is only their connections.
        let key_settings = settings.clone();
        tokio::task::spawn_blocking(move || handlers::load_server_key(&key_settings))
            .await
            .expect("key task")
            .expect("server key");
        WithHandlers {
            tls_addr: running.tls_addr.expect("tls addr"),
            internal_addr,
            metrics_addr: running.metrics_addr.expect("metrics addr"),
            ca_file: certs.ca_file,
            running: Some(running),
            settings,
            store,
            handlers_stop: CancellationToken::new(),
            _dir: dir,
        }
    }

    /// Starts sync, publish and contacts in this process, as `main` does.
    fn start_handlers(&self) {
        handlers::spawn_builtin_with_store(
            self.settings.clone(),
            self.store.clone(),
            self.handlers_stop.clone(),
        )
        .expect("built-in handlers start");
    }

    fn target(&self) -> e2e::clients::Target<'_> {
        e2e::clients::Target {
            addr: self.tls_addr,
            ca_file: Some(&self.ca_file),
        }
    }

    fn token(uid: &str) -> String {
        DeviceClaims::new(uid, 3600)
            .sign_hs256(TEST_SECRET.as_bytes())
            .expect("sign")
    }

    async fn device(&self, uid: &str) -> V5Client {
        let mut device = V5Client::connect(self.target(), uid, "JWT", &Self::token(uid), |_| {});
        device.connected().await;
        let reply_topic = format!("{uid}_contact_list");
        device.subscribe(&reply_topic, QoS::AtMostOnce).await;
        device
    }

    async fn metrics_text(&self) -> String {
        e2e::fetch_metrics(self.metrics_addr).await
    }

    async fn shutdown(mut self) {
        self.handlers_stop.cancel();
        if let Some(running) = self.running.take() {
            running.shutdown().await.expect("router kept running");
        }
    }
}

impl Drop for WithHandlers {
    fn drop(&mut self) {
        self.handlers_stop.cancel();
        if let Some(running) = &self.running {
            running.shutdown_token().cancel();
        }
    }
}

/// Sends `get_contact_list` until the built-in contacts handler answers on
/// `<uid>_contact_list` (handlers subscribe a moment after connecting).
async fn contacts_answer(device: &mut V5Client, uid: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply_topic = format!("{uid}_contact_list");
    while Instant::now() < deadline {
        device
            .client
            .publish("get_contact_list", QoS::AtMostOnce, false, "{}")
            .await
            .expect("queue publish");
        let wait = Instant::now() + Duration::from_millis(500);
        while let Ok(Some(event)) = tokio::time::timeout_at(wait, device.events.recv()).await {
            match event {
                Seen::Packet(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) => {
                    assert_eq!(p.topic, reply_topic.as_bytes());
                    let body: serde_json::Value =
                        serde_json::from_slice(&p.payload).expect("JSON reply");
                    assert!(body.get("contacts").is_some(), "{body}");
                    return;
                }
                Seen::Packet(_) => {}
                Seen::Error(e) => panic!("the device lost its connection: {e}"),
            }
        }
    }
    panic!("the built-in contacts handler never answered");
}

/// Whether the broker closes a fresh socket at once (admission refused it
/// before TLS: nothing is ever sent back), rather than holding it open.
async fn closed_at_once(addr: SocketAddr) -> bool {
    let mut socket = TcpStream::connect(addr).await.expect("tcp connect");
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("a refused socket got {n} bytes"),
        Err(_) => false,
    }
}

/// The counter `broker_sockets_dropped_total{reason="<reason>"}`.
fn dropped(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("broker_sockets_dropped_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.trim().parse().expect("counter value"))
}

/// Sockets that never speak hold at most `BROKER_MAX_PENDING_PER_ADDR` of a
/// source's slots: more are closed before TLS, a real client from the same
/// address is refused meanwhile, the idle ones are closed at the handshake
/// deadline, and then clients connect again. The in-process handlers start
/// and answer while the public slots are full.
#[tokio::test]
async fn unanswered_connections_per_source_are_capped() {
    const CAP: usize = 3;
    // Long enough for the handlers to start and answer under a loaded machine.
    let handshake_deadline = Duration::from_secs(12);
    let limits = broker::config::Limits {
        conn_rate_per_sec: 0.0,
        max_pending_per_addr: CAP,
        tls_handshake_timeout: handshake_deadline,
        ..Default::default()
    };
    let broker = WithHandlers::start(limits).await;
    // Connected (answered) clients hold no pending slot.
    let mut alice = broker.device("alice").await;

    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(TcpStream::connect(broker.tls_addr).await.expect("connect"));
    }
    let filled = Instant::now();
    assert!(
        closed_at_once(broker.tls_addr).await,
        "one more than the cap is closed at once"
    );
    let mut refused = V5Client::connect(
        broker.target(),
        "bob",
        "JWT",
        &WithHandlers::token("bob"),
        |_| {},
    );
    let outcome = refused.connack().await;
    assert!(
        outcome.is_err(),
        "a real client from the full source is refused: {outcome:?}"
    );

    // The handlers connect on their own listener and answer meanwhile.
    broker.start_handlers();
    contacts_answer(&mut alice, "alice").await;
    assert!(
        closed_at_once(broker.tls_addr).await,
        "the public slots were still full while the handlers connected"
    );
    assert!(
        filled.elapsed() < handshake_deadline,
        "the idle sockets were still pending throughout"
    );

    // At the handshake deadline the broker closes the idle sockets.
    for mut socket in idle {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(
            handshake_deadline + Duration::from_secs(5),
            socket.read(&mut buf),
        )
        .await
        .expect("idle socket closed by the broker at its handshake deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let mut carol = broker.device("carol").await;
    contacts_answer(&mut carol, "carol").await;

    let metrics = broker.metrics_text().await;
    assert!(dropped(&metrics, "too_many_pending") >= 3, "{metrics}");
    assert!(
        dropped(&metrics, "tls_handshake") >= CAP as u64,
        "{metrics}"
    );
    broker.shutdown().await;
}

/// The loopback address's public allowance exhausted (burst spent, no
/// refill): outside clients from it are closed before TLS, while the
/// in-process handlers, on the internal listener with its own admission,
/// still connect and answer. None of their connects is refused.
#[tokio::test]
async fn handlers_answer_while_the_loopback_bucket_is_exhausted() {
    const BURST: u32 = 4;
    let limits = broker::config::Limits {
        // One new token every ~3 hours: the burst is all the test gets.
        conn_rate_per_sec: 0.0001,
        conn_burst: BURST,
        ..Default::default()
    };
    let broker = WithHandlers::start(limits).await;
    let mut alice = broker.device("alice").await;

    // Spend the rest of the burst on sockets, then see the next ones closed.
    let mut spent = Vec::new();
    for _ in 1..BURST {
        spent.push(TcpStream::connect(broker.tls_addr).await.expect("connect"));
    }
    let mut public_refusals = 0;
    for _ in 0..3 {
        assert!(closed_at_once(broker.tls_addr).await, "the bucket is empty");
        public_refusals += 1;
    }
    let mut refused = V5Client::connect(
        broker.target(),
        "bob",
        "JWT",
        &WithHandlers::token("bob"),
        |_| {},
    );
    assert!(
        refused.connack().await.is_err(),
        "a real client is refused too"
    );
    public_refusals += 1;
    drop(spent);

    // The handlers (three workers, their own connections) connect and answer.
    broker.start_handlers();
    contacts_answer(&mut alice, "alice").await;
    assert!(closed_at_once(broker.tls_addr).await, "still exhausted");
    public_refusals += 1;
    // The internal listener admits from the same loopback address.
    assert!(
        !closed_at_once(broker.internal_addr).await,
        "the internal listener does not share the public bucket"
    );
    // ... but only handlers: a device cannot use its allowance.
    let mut sneaky = V5Client::connect(
        e2e::clients::Target {
            addr: broker.internal_addr,
            ca_file: None,
        },
        "sneaky",
        "JWT",
        &WithHandlers::token("sneaky"),
        |_| {},
    );
    let refusal = sneaky.connack().await;
    assert!(
        matches!(&refusal, Err(e) if e.contains("NotAuthorized")),
        "a device on the internal listener is refused: {refusal:?}"
    );

    let metrics = broker.metrics_text().await;
    assert_eq!(
        dropped(&metrics, "rate_limited"),
        public_refusals,
        "only the public clients were refused: {metrics}"
    );
    assert!(
        metrics.contains("broker_connections{kind=\"handler\"}"),
        "{metrics}"
    );
    broker.shutdown().await;
}

/// The internal listener's own allowance is offered on loopback only: a
/// broker given a non-loopback internal listener refuses to start.
#[tokio::test]
async fn the_internal_listener_must_be_loopback() {
    let Ok(exposed) = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await else {
        panic!("cannot bind 0.0.0.0:0 for the test");
    };
    let config = broker::config::Config {
        jwt: broker::auth::jwt::JwtSettings {
            hmac_secret: Some(protocol::Secret::from(TEST_SECRET)),
            ..Default::default()
        },
        handler_keys: vec![protocol::Secret::new(TEST_HANDLER_KEY)],
        command_topics: Vec::new(),
        limits: broker::config::Limits::default(),
        revocations: None,
    };
    let started = broker::Broker::start(
        config,
        broker::Listeners {
            internal: Some(exposed),
            ..Default::default()
        },
    )
    .await;
    match started {
        Err(broker::StartError::InternalNotLoopback(addr)) => {
            assert!(!addr.ip().is_loopback(), "{addr}")
        }
        Err(other) => panic!("wrong refusal: {other}"),
        Ok(_) => panic!("a non-loopback internal listener must be refused"),
    }
}
