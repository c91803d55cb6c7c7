//! SDK tests against a real MQTT 5 broker (Mosquitto on a free loopback
//! port, skipped when it is not installed). Mosquitto does not stamp
//! identity, so the test "device" sets the `user_id` property itself, as the
//! project's broker would.

use super::*;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::process::{Child, Command as Proc, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

struct Mosquitto {
    port: u16,
    /// More lines for its configuration.
    extra: &'static str,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    fn start() -> Self {
        Self::start_with("")
    }

    fn start_with(extra: &'static str) -> Self {
        assert!(
            std::path::Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} not found: install Debian's mosquitto (`.ci/run` does)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut m = Mosquitto {
            port,
            extra,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        self.stop();
        let conf = self.dir.path().join("m.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n{}",
                self.port, self.extra
            ),
        )
        .unwrap();
        let child = Proc::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mosquitto did not start");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn config(&self) -> SdkConfig {
        let mut c = SdkConfig::new(format!("mqtt://127.0.0.1:{}", self.port), "k");
        c.drain_timeout = Duration::from_secs(5);
        c
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test device: publishes commands with a `user_id` property and collects
/// what arrives on its subscriptions.
struct Device {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Value, Option<bytes::Bytes>)>,
}

impl Device {
    async fn connect(port: u16, subscribe: &[&str]) -> Device {
        let id = format!("dev-{}", rand::random::<u32>());
        let opts = MqttOptions::new(id, "127.0.0.1", port);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        for topic in subscribe {
            client.subscribe(*topic, QoS::AtLeastOnce).await.unwrap();
        }
        let wanted = subscribe.len();
        tokio::spawn(async move {
            let mut acks = 0;
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => {
                        acks += 1;
                        if acks == wanted {
                            let _ = ready_tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let corr = p.properties.and_then(|p| p.correlation_data);
                        let _ = tx.send((topic, body, corr));
                    }
                    _ => {}
                }
            }
        });
        if wanted > 0 {
            tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
                .await
                .unwrap();
        }
        Device { client, rx }
    }

    async fn send(&self, topic: &str, uid: Option<&str>, payload: &[u8], corr: Option<&[u8]>) {
        let props = PublishProperties {
            user_properties: uid
                .map(|u| vec![("user_id".to_string(), u.to_string())])
                .unwrap_or_default(),
            correlation_data: corr.map(bytes::Bytes::copy_from_slice),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), props)
            .await
            .unwrap();
    }

    /// Publishes `payload` on `topic` with exactly these user properties
    /// (the stamps the project's broker would set).
    async fn send_stamped(&self, topic: &str, stamps: &[(&str, &str)], payload: &[u8]) {
        let props = PublishProperties {
            user_properties: stamps
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), props)
            .await
            .unwrap();
    }

    async fn next(&mut self) -> (String, Value, Option<bytes::Bytes>) {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("no reply in time")
            .unwrap()
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(Some(m)) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("unexpected message {m:?}");
        }
    }
}

#[derive(serde::Deserialize)]
struct EchoIn {
    text: String,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    panic: bool,
}

fn echo_worker(name: &str, seen: Arc<AtomicUsize>) -> Worker {
    Worker::new(name).on("echo", move |cmd: Command<EchoIn>| {
        let seen = Arc::clone(&seen);
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            if cmd.body.sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(cmd.body.sleep_ms)).await;
            }
            if cmd.body.panic {
                panic!("handler bug");
            }
            if cmd.body.text == "fail" {
                return Err(HandlerError::bad_gateway("upstream said no"));
            }
            Ok(Reply::json(
                "echo",
                json!({"status": 200, "text": cmd.body.text, "uid": cmd.user_id.as_str()}),
            ))
        }
    })
}

/// Waits until the worker's subscription is live by probing it.
async fn wait_ready(dev: &mut Device, uid: &str) {
    for _ in 0..100 {
        dev.send("echo", Some(uid), br#"{"text":"probe"}"#, None)
            .await;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), dev.rx.recv()).await {
            // Drain stragglers from earlier probes.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), dev.rx.recv()).await
            {}
            return;
        }
    }
    panic!("worker never became ready");
}

#[tokio::test]
async fn replies_errors_identity_and_shutdown() {
    let broker = Mosquitto::start();
    let shutdown = CancellationToken::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let worker =
        tokio::spawn(echo_worker("echo", seen.clone()).run(broker.config(), shutdown.clone()));
    let mut dev = Device::connect(broker.port, &["42_echo"]).await;
    wait_ready(&mut dev, "42").await;

    // A good command: request_id and correlation data echoed, uid from the property.
    dev.send(
        "echo",
        Some("42"),
        br#"{"text":"hi","request_id":"r1","user_id":"666"}"#,
        Some(b"corr"),
    )
    .await;
    let (topic, body, corr) = dev.next().await;
    assert_eq!(topic, "42_echo");
    assert_eq!(
        body,
        json!({"status": 200, "text": "hi", "uid": "42", "request_id": "r1"})
    );
    assert_eq!(corr.as_deref(), Some(&b"corr"[..]));

    // Bad input: malformed JSON, wrong shape, not an object.
    dev.send("echo", Some("42"), b"{nope", None).await;
    let (_, body, _) = dev.next().await;
    assert_eq!(body["status"], 400);
    assert!(body["error"].as_str().unwrap().contains("malformed JSON"));
    dev.send("echo", Some("42"), br#"{"txt":1,"request_id":5}"#, None)
        .await;
    let (_, body, _) = dev.next().await;
    assert_eq!(body["status"], 400);
    assert_eq!(body["request_id"], "5");
    dev.send("echo", Some("42"), b"[1,2]", None).await;
    assert_eq!(dev.next().await.1["status"], 400);

    // A failed job and a panic are answered; the worker keeps serving.
    dev.send("echo", Some("42"), br#"{"text":"fail"}"#, None)
        .await;
    assert_eq!(
        dev.next().await.1,
        json!({"status": 502, "error": "upstream said no"})
    );
    dev.send("echo", Some("42"), br#"{"text":"x","panic":true}"#, None)
        .await;
    assert_eq!(dev.next().await.1["status"], 500);

    // No user_id property, or an invalid one: dropped, no reply anywhere.
    dev.send("echo", None, br#"{"text":"anon"}"#, None).await;
    dev.send("echo", Some("4_2"), br#"{"text":"bad"}"#, None)
        .await;
    dev.nothing_for(Duration::from_millis(500)).await;

    dev.send("echo", Some("42"), br#"{"text":"still"}"#, None)
        .await;
    assert_eq!(dev.next().await.1["text"], "still");

    // Graceful shutdown finishes the command in flight and sends its reply.
    dev.send(
        "echo",
        Some("42"),
        br#"{"text":"slow","sleep_ms":800}"#,
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    let (_, body, _) = dev.next().await;
    assert_eq!(body["text"], "slow");
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn two_instances_share_the_load() {
    let broker = Mosquitto::start();
    let shutdown = CancellationToken::new();
    let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let wa = tokio::spawn(echo_worker("echo", a.clone()).run(broker.config(), shutdown.clone()));
    let wb = tokio::spawn(echo_worker("echo", b.clone()).run(broker.config(), shutdown.clone()));
    let mut dev = Device::connect(broker.port, &["7_echo"]).await;
    // Both must be subscribed: probe until each has served something.
    for _ in 0..100 {
        if a.load(Ordering::SeqCst) > 0 && b.load(Ordering::SeqCst) > 0 {
            break;
        }
        dev.send("echo", Some("7"), br#"{"text":"probe"}"#, None)
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), dev.rx.recv()).await {}
    let (a0, b0) = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
    assert!(a0 > 0 && b0 > 0, "both instances must be subscribed");

    let n = 100;
    for i in 0..n {
        dev.send(
            "echo",
            Some("7"),
            format!(r#"{{"text":"{i}"}}"#).as_bytes(),
            None,
        )
        .await;
    }
    let mut got = std::collections::HashSet::new();
    for _ in 0..n {
        let (_, body, _) = dev.next().await;
        assert!(
            got.insert(body["text"].as_str().unwrap().to_owned()),
            "duplicate"
        );
    }
    dev.nothing_for(Duration::from_millis(300)).await;
    let (da, db) = (a.load(Ordering::SeqCst) - a0, b.load(Ordering::SeqCst) - b0);
    assert_eq!(da + db, n);
    assert!(da > 0 && db > 0, "load not shared: {da} / {db}");
    shutdown.cancel();
    wa.await.unwrap().unwrap();
    wb.await.unwrap().unwrap();
}

#[tokio::test]
async fn reconnects_and_resubscribes() {
    let mut broker = Mosquitto::start();
    let shutdown = CancellationToken::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let worker = tokio::spawn(echo_worker("echo", seen).run(broker.config(), shutdown.clone()));
    let mut dev = Device::connect(broker.port, &["9_echo"]).await;
    wait_ready(&mut dev, "9").await;
    broker.restart();
    let mut dev = Device::connect(broker.port, &["9_echo"]).await;
    wait_ready(&mut dev, "9").await;
    dev.send("echo", Some("9"), br#"{"text":"back"}"#, None)
        .await;
    assert_eq!(dev.next().await.1["text"], "back");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn refuses_to_run_without_routes_or_with_bad_config() {
    let shutdown = CancellationToken::new();
    let err = Worker::new("x")
        .run(SdkConfig::new("mqtt://127.0.0.1:1", "k"), shutdown.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, SdkError::NoRoutes(_)));
    let err = echo_worker("x", Arc::default())
        .run(SdkConfig::new("mqtts://127.0.0.1:1", "k"), shutdown.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("BROKER_CA"), "{err}");
    let err = echo_worker("a/b", Arc::default())
        .run(SdkConfig::new("mqtt://127.0.0.1:1", "k"), shutdown)
        .await
        .unwrap_err();
    assert!(matches!(err, SdkError::Config(_)));
}

#[tokio::test]
async fn shutdown_while_never_connected_returns() {
    let shutdown = CancellationToken::new();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = tokio::spawn(echo_worker("x", Arc::default()).run(
        SdkConfig::new(format!("mqtt://127.0.0.1:{port}"), "k"),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// With a revocation source, a device command whose `token_iat` stamp the
/// user's revocation refuses is answered `401 token revoked` and never
/// reaches the handler code; a fresh token, other users and commands a
/// handler published for a user (no device stamps) still run.
#[tokio::test]
async fn revoked_senders_are_refused_before_the_handler_runs() {
    use store::{EmbeddedStore, Revocation, Revocations};
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Revocations> = Arc::new(
        EmbeddedStore::open(&dir.path().join("s.redb"))
            .await
            .unwrap(),
    );
    let shutdown = CancellationToken::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let worker = tokio::spawn(
        echo_worker("echo", seen.clone())
            .checking_revocations(store.clone())
            .run(broker.config(), shutdown.clone()),
    );
    let mut dev = Device::connect(broker.port, &["42_echo", "43_echo"]).await;
    wait_ready(&mut dev, "42").await;
    let uid = protocol::UserId::parse("42").unwrap();
    store
        .record_revocation(&uid, Revocation::IssuedBefore(1000))
        .await
        .unwrap();
    let before = seen.load(Ordering::SeqCst);
    let device = |iat: &'static str| {
        [
            ("user_id", "42"),
            ("client_id", "phone"),
            ("token_iat", iat),
        ]
    };

    // Revoked: an old token, a missing or forged-looking stamp.
    for stamps in [
        &device("999")[..],
        &device("abc")[..],
        &[("user_id", "42"), ("client_id", "phone")][..],
    ] {
        dev.send_stamped("echo", stamps, br#"{"text":"old","request_id":"r"}"#)
            .await;
        let (topic, body, _) = dev.next().await;
        assert_eq!(topic, "42_echo");
        assert_eq!(
            body,
            json!({"status": 401, "error": "token revoked", "request_id": "r"}),
            "{stamps:?}"
        );
    }
    assert_eq!(seen.load(Ordering::SeqCst), before, "the handler never ran");

    // A token issued at or after the cut-off, another user, and a handler's
    // own command for the user (no device stamps) are served.
    dev.send_stamped("echo", &device("1000"), br#"{"text":"new"}"#)
        .await;
    assert_eq!(dev.next().await.1["text"], "new");
    dev.send_stamped(
        "echo",
        &[("user_id", "43"), ("client_id", "p"), ("token_iat", "5")],
        br#"{"text":"other"}"#,
    )
    .await;
    assert_eq!(dev.next().await.1["text"], "other");
    dev.send("echo", Some("42"), br#"{"text":"from a handler"}"#, None)
        .await;
    assert_eq!(dev.next().await.1["text"], "from a handler");
    assert_eq!(seen.load(Ordering::SeqCst), before + 3);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

mod acknowledgements;
