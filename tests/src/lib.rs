//! Test harness for end-to-end tests: starts the real broker in-process on
//! port 0 with a fresh certificate authority, TLS and plain listeners, mints
//! device tokens, and opens real rumqttc clients (MQTT 5 and 3.1.1) that hand
//! their events to the test through a channel.

pub mod clients;
pub mod haproxy;
pub mod raw;

use broker::auth::jwt::JwtSettings;
use broker::config::{Config, Limits};
use broker::{Broker, Listeners, RunningBroker};
use protocol::claims::DeviceClaims;
use protocol::Secret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;
use tokio::net::TcpListener;

pub use clients::{V4Client, V5Client};

/// The HMAC secret test brokers verify device tokens with.
pub const TEST_SECRET: &str = "test-secret-for-e2e-only";
/// The handler key test brokers accept.
pub const TEST_HANDLER_KEY: &str = "test-handler-key-0123456789";

/// Knobs a test may turn before starting a broker.
pub struct TestOptions {
    pub command_topics: Vec<String>,
    pub limits: Limits,
    pub jwt: JwtSettings,
    pub metrics: bool,
    /// A store whose revocation flags the broker checks (poll interval from `limits`).
    pub revocation_store: Option<std::sync::Arc<dyn store::Store>>,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            command_topics: vec![
                "sync".into(),
                "sync_session".into(),
                "sync_session_confirm".into(),
                "publish".into(),
                "request_contact".into(),
                "accept_contact".into(),
                "get_contact_list".into(),
                "store_token".into(),
                "list_tokens".into(),
                "revoke_token".into(),
                "delete_account".into(),
            ],
            limits: Limits {
                // Tests open many connections from one address.
                conn_rate_per_sec: 0.0,
                ..Limits::default()
            },
            jwt: JwtSettings {
                hmac_secret: Some(Secret::from(TEST_SECRET)),
                ..JwtSettings::default()
            },
            metrics: true,
            revocation_store: None,
        }
    }
}

/// A broker running inside the test process.
pub struct TestBroker {
    pub tls_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub ca_file: PathBuf,
    running: Option<RunningBroker>,
    shutdown: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
}

/// Logs to the test output once per process, at `RUST_LOG` (default warn).
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(TestOptions::default()).await
    }

    pub async fn start_with(options: TestOptions) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = broker::config::dev_certs::make_certificate_files(dir.path())
            .expect("test certificate");
        let acceptor =
            broker::tls::acceptor_from_files(&certs.cert_file, &certs.key_file).expect("acceptor");
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        let tls = TcpListener::bind(localhost).await.expect("bind tls");
        let tcp = TcpListener::bind(localhost).await.expect("bind tcp");
        let metrics = if options.metrics {
            Some(TcpListener::bind(localhost).await.expect("bind metrics"))
        } else {
            None
        };
        let revocations = options.revocation_store.map(|store| {
            broker::revocation::Revocations::new(store, options.limits.revocation_poll)
        });
        let config = Config {
            revocations,
            jwt: options.jwt,
            handler_keys: vec![Secret::new(TEST_HANDLER_KEY)],
            command_topics: options.command_topics,
            limits: options.limits,
        };
        let running = Broker::start(
            config,
            Listeners {
                tls: Some((tls, acceptor)),
                tcp: vec![tcp],
                metrics,
                internal: None,
            },
        )
        .await
        .expect("broker starts");
        TestBroker {
            tls_addr: running.tls_addr.expect("tls addr"),
            tcp_addr: running.tcp_addrs[0],
            metrics_addr: running.metrics_addr,
            ca_file: certs.ca_file,
            shutdown: running.shutdown_token(),
            running: Some(running),
            _dir: dir,
        }
    }

    /// Where clients reach the TLS listener (trusting the test CA).
    pub fn tls_target(&self) -> clients::Target<'_> {
        clients::Target {
            addr: self.tls_addr,
            ca_file: Some(&self.ca_file),
        }
    }

    /// Where clients reach the plain TCP listener.
    pub fn plain_target(&self) -> clients::Target<'_> {
        clients::Target {
            addr: self.tcp_addr,
            ca_file: None,
        }
    }

    /// A handler (MQTT 5, TLS) with the test key, connected.
    pub async fn handler(&self, client_id: &str) -> clients::V5Client {
        let mut handler = clients::V5Client::connect(
            self.tls_target(),
            client_id,
            "handler",
            TEST_HANDLER_KEY,
            |_| {},
        );
        handler.connected().await;
        handler
    }

    /// Device `uid` (MQTT 5, TLS) with a valid token, connected.
    pub async fn device(&self, uid: &str, client_id: &str) -> clients::V5Client {
        let mut device = clients::V5Client::connect(
            self.tls_target(),
            client_id,
            "JWT",
            &self.token(uid),
            |_| {},
        );
        device.connected().await;
        device
    }

    /// Device `uid` over MQTT 3.1.1 and TLS with a valid token, connected.
    pub async fn device_v4(&self, uid: &str, client_id: &str) -> clients::V4Client {
        let mut device = clients::V4Client::connect(
            self.tls_target(),
            client_id,
            "JWT",
            &self.token(uid),
            |_| {},
        );
        device.connected().await;
        device
    }

    /// A valid one-hour token for `uid`.
    pub fn token(&self, uid: &str) -> String {
        DeviceClaims::new(uid, 3600)
            .sign_hs256(TEST_SECRET.as_bytes())
            .expect("sign")
    }

    /// A token with the given claims, signed with the test secret.
    pub fn token_with(&self, claims: &DeviceClaims) -> String {
        claims.sign_hs256(TEST_SECRET.as_bytes()).expect("sign")
    }

    /// `/metrics` text from the operations endpoint.
    pub async fn metrics_text(&self) -> String {
        fetch_metrics(self.metrics_addr.expect("metrics enabled")).await
    }

    /// Asserts a healthy device round trip through a handler: the broker
    /// (and its router) still serves.
    pub async fn assert_still_serving(&self) {
        use rumqttc::v5::mqttbytes::QoS;
        let mut handler = self.handler("probe-handler").await;
        handler.subscribe("get_contact_list", QoS::AtMostOnce).await;
        let mut device = self.device("probe", "probe").await;
        device
            .subscribe("probe_contact_list", QoS::AtMostOnce)
            .await;
        device
            .client
            .publish("get_contact_list", QoS::AtMostOnce, false, "{}")
            .await
            .expect("publish a command");
        assert_eq!(handler.publish_received().await.topic, "get_contact_list");
        handler
            .client
            .publish("probe_contact_list", QoS::AtMostOnce, false, "[]")
            .await
            .expect("publish a reply");
        assert_eq!(device.publish_received().await.topic, "probe_contact_list");
    }

    /// The value of one series in `/metrics` (0 when absent), e.g.
    /// `broker_session_panics_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Shuts the broker down and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            if let Err(stopped) = running.shutdown().await {
                panic!("the broker stopped on its own before the test ended: {stopped}");
            }
        }
    }

    /// Cancels the broker without waiting (for tests that watch clients react).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `/metrics` text from a broker's operations endpoint at `addr`.
pub async fn fetch_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}
