//! Proves the load generator counts right through the real broker: a known
//! number of messages, none lost, every counter exact (TLS with MQTT 5, and
//! TCP with MQTT 3.1.1 devices answered by an MQTT 5 handler, and MQTT over
//! WebSocket over TLS).

use e2e::{TestBroker, TestOptions, TEST_HANDLER_KEY, TEST_SECRET};
use loadgen::driver::{run_in_process, DriveOptions};
use loadgen::{DeviceAuth, Echo, EchoConfig, Endpoint, JwtKey, MqttVersion, RunConfig};
use std::time::Duration;

async fn broker() -> TestBroker {
    TestBroker::start_with(TestOptions {
        command_topics: vec!["echo".into()],
        ..TestOptions::default()
    })
    .await
}

fn devices(endpoint: Endpoint, version: MqttVersion, prefix: &str) -> RunConfig {
    let mut cfg = RunConfig::new(endpoint);
    cfg.version = version;
    cfg.auth = DeviceAuth::Jwt {
        key: JwtKey::Secret(TEST_SECRET.as_bytes().to_vec()),
        ttl_secs: 600,
    };
    cfg.uid_prefix = prefix.into();
    cfg.devices = 20;
    cfg.subs = 2;
    cfg.rate = 400.0;
    cfg.messages = Some(200);
    cfg.duration = Duration::from_millis(1500);
    cfg.drain = Duration::from_secs(10);
    cfg.connect_rate = 0.0;
    cfg
}

async fn echo(endpoint: Endpoint) -> Echo {
    let mut e = EchoConfig::new(endpoint);
    e.password = Some(TEST_HANDLER_KEY.into());
    Echo::start(e).await.expect("echo handler connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_over_tls_mqtt5_with_new_users() {
    let broker = broker().await;
    let ep = Endpoint::tls(broker.tls_addr, &broker.ca_file, "localhost").expect("tls");
    let handler = echo(ep.clone()).await;
    let mut cfg = devices(ep, MqttVersion::V5, "lgt");
    cfg.new_users = 4;
    let report = run_in_process(cfg, &DriveOptions::default())
        .await
        .expect("run");
    let stats = handler.stop().await;

    assert_eq!(report.devices_ready, 20, "{}", report.table());
    assert_eq!(report.connect_failures, 0);
    assert_eq!(report.new_users_joined, 4);
    assert_eq!(report.subscriptions_requested, 48);
    assert_eq!(report.subscriptions_acked, 48);
    assert_eq!(report.subscriptions_refused, 0);
    // 200 paced publishes plus each new user's first command.
    assert_eq!(report.sent, 204, "{}", report.table());
    assert_eq!(report.received, 204);
    assert_eq!(report.lost, 0);
    assert_eq!(report.duplicated, 0);
    assert_eq!(report.unexpected, 0);
    assert_eq!(report.new_users_first_reply, 4);
    assert_eq!(report.latency.count, 204);
    assert!(report.clean());
    // The handler saw exactly those commands, each stamped with its sender's uid.
    assert_eq!(stats.received, 204);
    assert_eq!(stats.replied, 204);
    assert_eq!(stats.no_uid, 0);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_over_tcp_mqtt311() {
    let broker = broker().await;
    let ep = Endpoint::tcp(broker.tcp_addr);
    let handler = echo(ep.clone()).await;
    let cfg = devices(ep, MqttVersion::V4, "lgp");
    let report = run_in_process(cfg, &DriveOptions::default())
        .await
        .expect("run");
    let stats = handler.stop().await;

    assert_eq!(report.devices_ready, 20, "{}", report.table());
    assert_eq!(report.subscriptions_acked, 40);
    assert_eq!(report.sent, 200, "{}", report.table());
    assert_eq!(report.received, 200);
    assert_eq!(report.lost + report.duplicated + report.unexpected, 0);
    assert!(report.clean());
    assert_eq!((stats.received, stats.replied, stats.no_uid), (200, 200, 0));
    broker.shutdown().await;
}

/// `--ws`: devices and handler over MQTT over WebSocket over TLS (wss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_over_wss_mqtt5() {
    let broker = broker().await;
    let mut ep = Endpoint::tls(broker.wss_addr, &broker.ca_file, "localhost").expect("tls");
    ep.ws = true;
    let handler = echo(ep.clone()).await;
    let cfg = devices(ep, MqttVersion::V5, "lgw");
    let report = run_in_process(cfg, &DriveOptions::default())
        .await
        .expect("run");
    let stats = handler.stop().await;

    assert_eq!(report.devices_ready, 20, "{}", report.table());
    assert_eq!(report.subscriptions_acked, 40);
    assert_eq!(report.sent, 200, "{}", report.table());
    assert_eq!(report.received, 200);
    assert_eq!(report.lost + report.duplicated + report.unexpected, 0);
    assert!(report.clean());
    assert_eq!((stats.received, stats.replied, stats.no_uid), (200, 200, 0));
    broker.shutdown().await;
}
