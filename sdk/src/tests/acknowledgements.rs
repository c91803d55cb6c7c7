//! When the worker acknowledges a command, against Mosquitto configured to
//! let a client hold one unacknowledged QoS 1 message: the next command
//! reaches the worker only after the previous one's PUBACK.

use super::*;

/// A worker whose `echo` handler reports each command it starts on
/// `started` and, for `{"text": "hold"}`, waits for `release` before
/// replying `{"text": ...}`.
fn holding_worker(
    started: mpsc::UnboundedSender<String>,
    release: Arc<tokio::sync::Notify>,
) -> Worker {
    Worker::new("hold").on("echo", move |cmd: Command<EchoIn>| {
        let (started, release) = (started.clone(), Arc::clone(&release));
        async move {
            let _ = started.send(cmd.body.text.clone());
            if cmd.body.text == "hold" {
                release.notified().await;
            }
            if cmd.body.panic {
                panic!("handler bug");
            }
            if cmd.body.text == "fail" {
                return Err(HandlerError::bad_gateway("upstream said no"));
            }
            Ok(Reply::json("echo", json!({"text": cmd.body.text})))
        }
    })
}

/// The worker acknowledges a command only once its handling ended. Mosquitto
/// configured to let a client hold one unacknowledged QoS 1 message
/// (`max_inflight_messages 1`) gives the worker the next command only after
/// the PUBACK of the previous one: while a handler waits, the next command
/// stays in the broker; once it returns, its reply comes, then the next
/// command is handled.
#[tokio::test]
async fn a_command_is_acknowledged_only_once_its_handler_returned() {
    let broker = Mosquitto::start_with("max_inflight_messages 1\n");
    let shutdown = CancellationToken::new();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = tokio::spawn(
        holding_worker(started_tx, Arc::clone(&release)).run(broker.config(), shutdown.clone()),
    );
    let mut dev = Device::connect(broker.port, &["42_echo"]).await;
    wait_ready(&mut dev, "42").await;
    while started.try_recv().is_ok() {}

    dev.send("echo", Some("42"), br#"{"text":"hold"}"#, None)
        .await;
    assert_eq!(started.recv().await.unwrap(), "hold");
    dev.send("echo", Some("42"), br#"{"text":"next"}"#, None)
        .await;
    // Mosquitto took "next" (the device has its PUBACK) and holds it: the
    // worker has not acknowledged "hold", whose handler still waits.
    dev.nothing_for(Duration::from_millis(500)).await;
    assert!(started.try_recv().is_err(), "\"next\" reached the handler");

    release.notify_one();
    assert_eq!(dev.next().await.1, json!({"text": "hold"}));
    assert_eq!(started.recv().await.unwrap(), "next");
    assert_eq!(dev.next().await.1, json!({"text": "next"}));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Every command is acknowledged once, whatever became of it: with one
/// unacknowledged message allowed (as above), each of these would block
/// every later command if its PUBACK were never sent: a handler error, a
/// panic, malformed JSON, a command without the `user_id` stamp or with an
/// invalid one (dropped, no reply), a topic no route serves. The last
/// command is still answered.
#[tokio::test]
async fn every_outcome_is_acknowledged() {
    let broker = Mosquitto::start_with("max_inflight_messages 1\n");
    let shutdown = CancellationToken::new();
    let (started_tx, _started) = mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let worker =
        tokio::spawn(holding_worker(started_tx, release).run(broker.config(), shutdown.clone()));
    let mut dev = Device::connect(broker.port, &["42_echo"]).await;
    wait_ready(&mut dev, "42").await;

    dev.send("echo", Some("42"), br#"{"text":"fail"}"#, None)
        .await;
    dev.send("echo", Some("42"), br#"{"text":"x","panic":true}"#, None)
        .await;
    dev.send("echo", Some("42"), b"{nope", None).await;
    dev.send("echo", None, br#"{"text":"anon"}"#, None).await;
    dev.send("echo", Some("4_2"), br#"{"text":"bad uid"}"#, None)
        .await;
    dev.send("echo", Some("42"), br#"{"text":"last"}"#, None)
        .await;
    assert_eq!(dev.next().await.1["status"], 502);
    assert_eq!(dev.next().await.1["status"], 500);
    assert_eq!(dev.next().await.1["status"], 400);
    assert_eq!(dev.next().await.1, json!({"text": "last"}));
    dev.nothing_for(Duration::from_millis(300)).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A command still running when the connection drops is never acknowledged
/// on the next connection (its packet id belonged to the old one), and
/// does not hold back the new connection's PUBACKs: with one
/// unacknowledged message allowed, commands on the new connection are
/// served one after another while the old one still runs; its reply, once
/// it ends, goes out on the new connection.
#[tokio::test]
async fn a_new_connection_forgets_what_the_old_one_held() {
    let mut broker = Mosquitto::start_with("max_inflight_messages 1\n");
    let shutdown = CancellationToken::new();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = tokio::spawn(
        holding_worker(started_tx, Arc::clone(&release)).run(broker.config(), shutdown.clone()),
    );
    let mut dev = Device::connect(broker.port, &["42_echo"]).await;
    wait_ready(&mut dev, "42").await;
    while started.try_recv().is_ok() {}
    dev.send("echo", Some("42"), br#"{"text":"hold"}"#, None)
        .await;
    assert_eq!(started.recv().await.unwrap(), "hold");

    broker.restart();
    let mut dev = Device::connect(broker.port, &["42_echo"]).await;
    wait_ready(&mut dev, "42").await;
    for text in ["one", "two", "three"] {
        dev.send(
            "echo",
            Some("42"),
            format!(r#"{{"text":"{text}"}}"#).as_bytes(),
            None,
        )
        .await;
    }
    for text in ["one", "two", "three"] {
        assert_eq!(dev.next().await.1, json!({ "text": text }));
    }
    release.notify_one();
    assert_eq!(dev.next().await.1, json!({"text": "hold"}));
    dev.send("echo", Some("42"), br#"{"text":"after"}"#, None)
        .await;
    assert_eq!(dev.next().await.1, json!({"text": "after"}));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
