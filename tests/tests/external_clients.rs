//! The real broker driven by real external clients over TLS: Debian's
//! `mosquitto_sub`/`mosquitto_pub` (mosquitto-clients) and paho-mqtt 2.x
//! from Python (`tests/python/paho_device.py`), run as subprocesses.
//!
//! Every subprocess runs under a timeout and is killed when dropped. Missing
//! tools fail the test with a message saying what to install (`.ci/run`
//! installs them); nothing is skipped.
//!
//! Synchronization: a subscriber must hold its subscription before the
//! publish it waits for is sent. `mosquitto_sub -d` prints "received SUBACK"
//! (run under `stdbuf -oL` so its stdout reaches us line by line, not at
//! exit), and the paho script prints a `suback` JSON line; the tests wait for
//! those lines, never for a fixed time.

use e2e::clients::user_property;
use e2e::clients::V5Client;
use e2e::{TestBroker, TEST_HANDLER_KEY};
use protocol::claims::DeviceClaims;
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a subprocess may take to print an expected line.
const STEP: Duration = Duration::from_secs(15);
/// How long a subprocess may take to exit once it has no more to do.
const EXIT: Duration = Duration::from_secs(20);

const PAHO_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/paho_device.py");

// ---------------------------------------------------------------------------
// Subprocess helpers
// ---------------------------------------------------------------------------

fn install_hint(program: &str) -> &'static str {
    match program {
        "mosquitto_sub" | "mosquitto_pub" => "install Debian's mosquitto-clients (apt-get install -y mosquitto-clients; .ci/run does it)",
        "stdbuf" => "install coreutils",
        "python3" => "install python3 and paho-mqtt 2.x (apt-get install -y python3-pip && python3 -m pip install paho-mqtt; .ci/run does it)",
        _ => "install it",
    }
}

/// The program a command runs, for messages.
fn program_of(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut words = vec![std.get_program().to_string_lossy().into_owned()];
    words.extend(std.get_args().map(|a| a.to_string_lossy().into_owned()));
    // Under `stdbuf -oL` the interesting program is the third word.
    if words[0] == "stdbuf" && words.len() > 2 {
        words[2].clone()
    } else {
        words[0].clone()
    }
}

/// What a finished subprocess left behind.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Finished {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs a command to its end under a timeout (the child is killed if it
/// overruns) and returns its exit status and output.
async fn run(mut cmd: Command) -> Finished {
    let program = program_of(&cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = match tokio::time::timeout(EXIT, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {program}: {e}; {}", install_hint(&program)),
        Err(_) => panic!("{program} did not exit within {EXIT:?} (killed)"),
    };
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A subprocess whose stdout the test reads line by line while it runs.
struct Running {
    program: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    stderr: JoinHandle<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let program = program_of(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => panic!("cannot start {program}: {e}; {}", install_hint(&program)),
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Running {
            program,
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for a stdout line matching `pick` and returns it.
    async fn wait_line(&mut self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if pick(&line) {
                        return line;
                    }
                }
                Ok(None) => {
                    let status = self.child.wait().await;
                    let stderr = (&mut self.stderr).await.unwrap_or_default();
                    panic!(
                        "{}: exited ({status:?}) before printing {what}; stdout: {:#?}; stderr: {stderr}",
                        self.program, self.seen
                    );
                }
                Err(_) => panic!(
                    "{}: no {what} within {STEP:?}; stdout so far: {:#?}",
                    self.program, self.seen
                ),
            }
        }
    }

    /// Waits (bounded) for the process to exit; returns every stdout line.
    async fn finish(mut self) -> Finished {
        let status = match tokio::time::timeout(EXIT, self.child.wait()).await {
            Ok(status) => status.expect("wait for child"),
            Err(_) => panic!(
                "{} did not exit within {EXIT:?} (killed); stdout: {:#?}",
                self.program, self.seen
            ),
        };
        let deadline = tokio::time::Instant::now() + EXIT;
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            self.seen.push(line);
        }
        let stderr = tokio::time::timeout(EXIT, &mut self.stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Finished {
            status,
            stdout: self.seen,
            stderr,
        }
    }
}

// ---------------------------------------------------------------------------
// mosquitto-clients
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mqtt {
    V311,
    V5,
}

impl Mqtt {
    fn mosquitto(self) -> &'static str {
        match self {
            Mqtt::V311 => "mqttv311",
            Mqtt::V5 => "mqttv5",
        }
    }

    fn paho(self) -> &'static str {
        match self {
            Mqtt::V311 => "311",
            Mqtt::V5 => "5",
        }
    }
}

/// `mosquitto_sub`/`mosquitto_pub` connecting over TLS to the test broker.
fn mosquitto(
    program: &str,
    broker: &TestBroker,
    host: &str,
    version: Mqtt,
    username: &str,
    password: &str,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("--cafile")
        .arg(&broker.ca_file)
        .args(["-h", host, "-p", &broker.tls_addr.port().to_string()])
        .args(["-V", version.mosquitto()])
        .args(["-u", username, "-P", password]);
    cmd
}

/// `mosquitto_sub -d` under `stdbuf -oL`, so "received SUBACK" can be
/// waited for while it runs.
fn mosquitto_sub_debug(
    broker: &TestBroker,
    host: &str,
    version: Mqtt,
    username: &str,
    password: &str,
) -> Command {
    let sub = mosquitto("mosquitto_sub", broker, host, version, username, password);
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "mosquitto_sub", "-d"]);
    cmd.args(sub.as_std().get_args());
    cmd
}

/// The lines of `mosquitto_sub -d` output that are messages, not debug.
fn message_lines(stdout: &[String]) -> Vec<&str> {
    stdout
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid"))
        .collect()
}

async fn handler_on(broker: &TestBroker, client_id: &str, filter: &str) -> V5Client {
    let mut handler = V5Client::connect(
        broker.tls_target(),
        client_id,
        "handler",
        TEST_HANDLER_KEY,
        |_| {},
    );
    handler.connected().await;
    assert_eq!(
        handler.subscribe(filter, QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    handler
}

fn expired_token(broker: &TestBroker, uid: &str) -> String {
    let mut claims = DeviceClaims::new(uid, 1);
    claims.exp = claims.exp.map(|exp| exp - 600);
    broker.token_with(&claims)
}

/// A device (`mosquitto_pub`) sends `get_contact_list`; a handler receives it
/// with the verified identity and replies on the device's reply topic, which
/// the device's `mosquitto_sub` prints, exactly once, and nothing else.
async fn mosquitto_device_gets_its_reply(version: Mqtt, host: &str, sub_format: &[&str]) {
    let broker = TestBroker::start().await;
    let mut handler = handler_on(&broker, "contacts", "get_contact_list").await;
    // Another user on its own reply topic must see nothing.
    let mut bystander = broker.device("23412", "phone").await;
    bystander
        .subscribe("23412_contact_list", QoS::AtLeastOnce)
        .await;

    let token = broker.token("68946");
    let mut sub = mosquitto_sub_debug(&broker, host, version, "JWT", &token);
    sub.args([
        "-i",
        "phone-sub",
        "-t",
        "68946_contact_list",
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        "10",
    ])
    .args(sub_format);
    let mut sub = Running::spawn(sub);
    sub.wait_line("received SUBACK", |l| l.contains("received SUBACK"))
        .await;
    let granted = sub
        .wait_line("Subscribed line", |l| l.starts_with("Subscribed (mid"))
        .await;
    assert!(
        granted.ends_with(": 1"),
        "QoS 1 granted on the own reply topic: {granted}"
    );

    let mut publish = mosquitto("mosquitto_pub", &broker, host, version, "JWT", &token);
    publish.args([
        "-i",
        "phone-pub",
        "-t",
        "get_contact_list",
        "-q",
        "1",
        "-m",
        r#"{"request_id":"r-1"}"#,
    ]);
    let published = run(publish).await;
    assert_eq!(published.code(), Some(0), "mosquitto_pub: {published:?}");
    assert_eq!(published.stderr, "", "mosquitto_pub printed an error");

    let command = handler.publish_received().await;
    assert_eq!(command.topic, "get_contact_list");
    assert_eq!(&command.payload[..], br#"{"request_id":"r-1"}"#);
    assert_eq!(user_property(&command, "user_id"), vec!["68946"]);
    assert_eq!(user_property(&command, "client_id"), vec!["phone-pub"]);

    let reply = r#"{"contacts":["23412"],"request_id":"r-1"}"#;
    handler
        .client
        .publish("68946_contact_list", QoS::AtLeastOnce, false, reply)
        .await
        .unwrap();

    let done = sub.finish().await;
    assert_eq!(
        done.code(),
        Some(0),
        "mosquitto_sub -C 1 exits 0 after the reply: {done:?}"
    );
    assert_eq!(
        message_lines(&done.stdout),
        vec![format!("68946_contact_list {reply}")],
        "the device printed exactly its reply; stderr: {}",
        done.stderr
    );
    bystander
        .assert_no_publish(Duration::from_millis(300))
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mosquitto_v311_device_over_tls_gets_the_handler_reply() {
    mosquitto_device_gets_its_reply(Mqtt::V311, "localhost", &["-v"]).await;
}

#[tokio::test]
async fn mosquitto_v5_device_over_tls_gets_the_handler_reply() {
    mosquitto_device_gets_its_reply(Mqtt::V5, "127.0.0.1", &["-F", "%t %p"]).await;
}

/// A handler's `mosquitto_sub -V mqttv5 -F '%t|%P|%p'` prints the user
/// properties the broker stamped: `user_id` and `client_id` of the real
/// device, with the device's forged `user_id 999` / `client_id evil` dropped;
/// an MQTT 3.1.1 device's publish is stamped too.
#[tokio::test]
async fn mosquitto_handler_sees_stamped_identity_and_forged_user_id_is_replaced() {
    let broker = TestBroker::start().await;
    let mut sub = mosquitto_sub_debug(&broker, "127.0.0.1", Mqtt::V5, "handler", TEST_HANDLER_KEY);
    sub.args([
        "-i",
        "publish-handler",
        "-t",
        "publish",
        "-t",
        "sync",
        "-q",
        "1",
    ])
    .args(["-C", "2", "-W", "10", "-F", "%t|%P|%p"]);
    let mut sub = Running::spawn(sub);
    sub.wait_line("received SUBACK", |l| l.contains("received SUBACK"))
        .await;
    let granted = sub
        .wait_line("Subscribed line", |l| l.starts_with("Subscribed (mid"))
        .await;
    assert!(
        granted.ends_with(": 1, 1"),
        "handler granted both filters: {granted}"
    );

    let mut forged = mosquitto(
        "mosquitto_pub",
        &broker,
        "127.0.0.1",
        Mqtt::V5,
        "JWT",
        &broker.token("68946"),
    );
    forged
        .args(["-i", "forger", "-t", "publish", "-q", "1", "-m", "forged"])
        .args(["-D", "publish", "user-property", "user_id", "999"])
        .args(["-D", "publish", "user-property", "client_id", "evil"]);
    let forged = run(forged).await;
    assert_eq!(forged.code(), Some(0), "{forged:?}");

    let mut old = mosquitto(
        "mosquitto_pub",
        &broker,
        "localhost",
        Mqtt::V311,
        "JWT",
        &broker.token("23412"),
    );
    old.args([
        "-i",
        "old-phone",
        "-t",
        "sync",
        "-q",
        "1",
        "-m",
        "from-v311",
    ]);
    let old = run(old).await;
    assert_eq!(old.code(), Some(0), "{old:?}");

    let done = sub.finish().await;
    assert_eq!(done.code(), Some(0), "{done:?}");
    let mut printed: Vec<(String, Vec<String>, String)> = message_lines(&done.stdout)
        .into_iter()
        .map(|line| {
            let mut parts = line.splitn(3, '|');
            let topic = parts.next().unwrap_or_default().to_owned();
            let mut props: Vec<String> = parts
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            // The token's `iat` (a moment of this run): once, a number.
            let iat: Vec<&String> = props
                .iter()
                .filter(|p| p.starts_with("token_iat:"))
                .collect();
            assert_eq!(iat.len(), 1, "{props:?}");
            assert!(
                iat[0]["token_iat:".len()..].parse::<u64>().is_ok(),
                "{props:?}"
            );
            props.retain(|p| !p.starts_with("token_iat:"));
            props.sort();
            let payload = parts.next().unwrap_or_default().to_owned();
            (topic, props, payload)
        })
        .collect();
    printed.sort();
    assert_eq!(
        printed,
        vec![
            (
                "publish".to_owned(),
                vec!["client_id:forger".to_owned(), "user_id:68946".to_owned()],
                "forged".to_owned()
            ),
            (
                "sync".to_owned(),
                vec!["client_id:old-phone".to_owned(), "user_id:23412".to_owned()],
                "from-v311".to_owned()
            ),
        ],
        "handler output: {:#?}",
        done.stdout
    );
    broker.shutdown().await;
}

/// Refused connects: `mosquitto_sub`/`mosquitto_pub` print the CONNACK
/// refusal on stderr and exit with the CONNACK code; the broker keeps serving.
#[tokio::test]
async fn mosquitto_refusals_print_the_connack_reason() {
    let broker = TestBroker::start().await;
    let expired = expired_token(&broker, "111");
    let cases: Vec<(Mqtt, &str, &str, &str, i32, &str)> = vec![
        // (version, program, username, password, exit code, stderr line)
        (
            Mqtt::V311,
            "mosquitto_sub",
            "JWT",
            "garbage",
            4,
            "Connection error: Connection Refused: bad user name or password.",
        ),
        (
            Mqtt::V311,
            "mosquitto_sub",
            "JWT",
            expired.as_str(),
            5,
            "Connection error: Connection Refused: not authorised.",
        ),
        (
            Mqtt::V311,
            "mosquitto_sub",
            "handler",
            "wrong-key",
            4,
            "Connection error: Connection Refused: bad user name or password.",
        ),
        (
            Mqtt::V311,
            "mosquitto_pub",
            "JWT",
            "garbage",
            4,
            "Connection error: Connection Refused: bad user name or password.",
        ),
        (
            Mqtt::V5,
            "mosquitto_sub",
            "JWT",
            "garbage",
            134,
            "Connection error: Bad User Name or Password",
        ),
        (
            Mqtt::V5,
            "mosquitto_sub",
            "JWT",
            expired.as_str(),
            135,
            "Connection error: Not authorized",
        ),
        (
            Mqtt::V5,
            "mosquitto_sub",
            "handler",
            "wrong-key",
            134,
            "Connection error: Bad User Name or Password",
        ),
        (
            Mqtt::V5,
            "mosquitto_pub",
            "JWT",
            "garbage",
            134,
            "Connection error: Bad User Name or Password",
        ),
    ];
    for (version, program, username, password, code, message) in cases {
        let mut cmd = mosquitto(program, &broker, "127.0.0.1", version, username, password);
        if program == "mosquitto_sub" {
            cmd.args(["-t", "111_contact_list", "-C", "1", "-W", "10"]);
        } else {
            cmd.args(["-t", "sync", "-q", "1", "-m", "{}"]);
        }
        let done = run(cmd).await;
        let case = format!("{program} {version:?} {username}/{password}");
        assert_eq!(done.code(), Some(code), "{case}: {done:?}");
        assert!(
            done.stderr.lines().any(|l| l == message),
            "{case}: expected {message:?} on stderr, got {:?}",
            done.stderr
        );
        assert!(done.stdout.is_empty(), "{case}: printed {:?}", done.stdout);
    }

    // Still serving: a good device subscribes (-E: exit once acknowledged).
    let mut good = mosquitto(
        "mosquitto_sub",
        &broker,
        "127.0.0.1",
        Mqtt::V5,
        "JWT",
        &broker.token("68946"),
    );
    good.args(["-t", "68946_contact_list", "-E"]);
    let good = run(good).await;
    assert_eq!(good.code(), Some(0), "{good:?}");
    assert_eq!(good.stderr, "");
    broker.shutdown().await;
}

/// A device subscribing outside its own prefix is refused in the SUBACK:
/// mosquitto_sub prints "All subscription requests were denied." and exits at
/// once (mosquitto-clients 2.0.11 exits 0 here; we only require that it did
/// not sit waiting for messages); a mixed SUBSCRIBE gets one SUBACK with the
/// codes in order. A denied MQTT 5 QoS 1 publish gets PUBACK 0x87.
#[tokio::test]
async fn mosquitto_device_is_refused_foreign_subscriptions_and_publishes() {
    let broker = TestBroker::start().await;
    let token = broker.token("68946");
    // Whoever owns the target topic must see nothing of the denied publish.
    let mut victim = broker.device("23412", "victim").await;
    victim
        .subscribe("23412_contact_list", QoS::AtLeastOnce)
        .await;

    for version in [Mqtt::V311, Mqtt::V5] {
        for filter in [
            "#",
            "+",
            "$SYS/#",
            "23412_contact_list",
            "68946_contact_list/#",
        ] {
            let mut cmd = mosquitto(
                "mosquitto_sub",
                &broker,
                "127.0.0.1",
                version,
                "JWT",
                &token,
            );
            cmd.args(["-t", filter, "-C", "1", "-W", "10"]);
            let started = tokio::time::Instant::now();
            let done = run(cmd).await;
            let case = format!("{version:?} subscribe {filter}");
            assert!(
                done.stderr
                    .lines()
                    .any(|l| l == "All subscription requests were denied."),
                "{case}: stderr {:?}",
                done.stderr
            );
            assert_ne!(
                done.code(),
                Some(27),
                "{case}: waited for messages instead of stopping"
            );
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "{case}: did not stop at once"
            );
            assert!(done.stdout.is_empty(), "{case}: printed {:?}", done.stdout);
        }

        let mut mixed = mosquitto_sub_debug(&broker, "127.0.0.1", version, "JWT", &token);
        mixed.args([
            "-t",
            "68946_contact_list",
            "-t",
            "#",
            "-t",
            "23412_contact_list",
            "-q",
            "1",
            "-E",
        ]);
        let done = run(mixed).await;
        assert_eq!(done.code(), Some(0), "{version:?} mixed: {done:?}");
        let denied = if version == Mqtt::V5 { 135 } else { 128 };
        assert!(
            done.stdout
                .iter()
                .any(|l| *l == format!("Subscribed (mid: 1): 1, {denied}, {denied}")),
            "{version:?} mixed SUBACK in order: {:#?}",
            done.stdout
        );
    }

    let mut denied = mosquitto(
        "mosquitto_pub",
        &broker,
        "127.0.0.1",
        Mqtt::V5,
        "JWT",
        &token,
    );
    denied.args(["-t", "23412_contact_list", "-q", "1", "-m", "intrusion"]);
    let denied = run(denied).await;
    assert!(
        denied
            .stderr
            .lines()
            .any(|l| l == "Warning: Publish 1 failed: Not authorized."),
        "v5 denied publish: {denied:?}"
    );

    let mut denied = mosquitto(
        "mosquitto_pub",
        &broker,
        "127.0.0.1",
        Mqtt::V311,
        "JWT",
        &token,
    );
    denied.args([
        "-d",
        "-t",
        "23412_contact_list",
        "-q",
        "1",
        "-m",
        "intrusion",
    ]);
    let denied = run(denied).await;
    assert_eq!(
        denied.code(),
        Some(0),
        "v3.1.1 denied publish is acknowledged: {denied:?}"
    );
    assert!(
        denied
            .stdout
            .iter()
            .any(|l| l.contains("received PUBACK (Mid: 1, RC:0)")),
        "v3.1.1 denied publish is acknowledged and dropped: {:#?}",
        denied.stdout
    );
    victim.assert_no_publish(Duration::from_millis(300)).await;
    broker.shutdown().await;
}

// ---------------------------------------------------------------------------
// paho-mqtt (Python)
// ---------------------------------------------------------------------------

/// Fails (never skips) when python3 or paho-mqtt 2.x is missing.
async fn require_paho() {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import paho.mqtt, sys; v = paho.mqtt.__version__; print(v); sys.exit(0 if int(v.split('.')[0]) >= 2 else 1)",
    ]);
    let done = run(cmd).await;
    assert_eq!(
        done.code(),
        Some(0),
        "python3 with paho-mqtt 2.x is required for these tests ({}); python3 said: {:?} {}",
        install_hint("python3"),
        done.stdout,
        done.stderr
    );
}

fn paho(broker: &TestBroker, version: Mqtt, username: &str, password: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONUNBUFFERED", "1")
        .arg(PAHO_SCRIPT)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &broker.tls_addr.port().to_string(),
        ])
        .arg("--cafile")
        .arg(&broker.ca_file)
        .args(["--username", username, "--password", password])
        .args(["--protocol", version.paho()]);
    cmd
}

fn json_lines(stdout: &[String]) -> Vec<Value> {
    stdout
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("paho script printed non-JSON {l:?}: {e}"))
        })
        .collect()
}

fn event<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|v| v["event"] == name).collect()
}

async fn paho_refused(
    broker: &TestBroker,
    version: Mqtt,
    password: &str,
    v5_code: u64,
    v311_rc: u64,
) {
    let done = run(paho(broker, version, "JWT", password)).await;
    let case = format!("paho {version:?} refused");
    assert_eq!(done.code(), Some(1), "{case}: {done:?}");
    let lines = json_lines(&done.stdout);
    let connack = event(&lines, "connack");
    assert_eq!(connack.len(), 1, "{case}: one CONNACK: {lines:?}");
    match version {
        Mqtt::V5 => {
            assert_eq!(connack[0]["reason_code"], v5_code, "{case}: {lines:?}");
            let reason = connack[0]["reason_string"].as_str().unwrap_or_default();
            assert!(
                !reason.is_empty(),
                "{case}: MQTT 5 refusal carries a reason string: {lines:?}"
            );
        }
        Mqtt::V311 => assert_eq!(connack[0]["raw_rc"], v311_rc, "{case}: {lines:?}"),
    }
}

/// paho as a device: TLS connect, refusals with their codes, a mixed
/// SUBSCRIBE answered in order, a command that reaches the handler with the
/// real identity (a forged MQTT 5 `user_id` dropped), the handler's reply
/// received, and a denied publish.
async fn paho_device_scenarios(version: Mqtt) {
    require_paho().await;
    let broker = TestBroker::start().await;

    paho_refused(&broker, version, "garbage", 0x86, 4).await;
    paho_refused(&broker, version, &expired_token(&broker, "111"), 0x87, 5).await;

    let mut handler = handler_on(&broker, "contacts", "get_contact_list").await;
    let mut device = paho(&broker, version, "JWT", &broker.token("68946"));
    device
        .args(["--client-id", "paho-phone", "--qos", "1"])
        .args(["--topics", "68946_contact_list", "#", "23412_contact_list"])
        .args(["--publish", "get_contact_list", r#"{"request_id":"p-1"}"#])
        .args(["--user-property", "user_id", "999"])
        .args(["--expect", "1", "--timeout", "10"]);
    let mut device = Running::spawn(device);
    let connack: Value = serde_json::from_str(
        &device
            .wait_line("connack", |l| l.contains(r#""connack""#))
            .await,
    )
    .unwrap();
    assert_eq!(connack["reason_code"], 0, "connected over TLS: {connack}");
    let suback: Value = serde_json::from_str(
        &device
            .wait_line("suback", |l| l.contains(r#""suback""#))
            .await,
    )
    .unwrap();
    let denied = if version == Mqtt::V5 { 135 } else { 128 };
    assert_eq!(
        suback["reason_codes"],
        serde_json::json!([1, denied, denied]),
        "{suback}"
    );
    let puback: Value = serde_json::from_str(
        &device
            .wait_line("puback", |l| l.contains(r#""puback""#))
            .await,
    )
    .unwrap();
    assert_eq!(puback["reason_code"], 0, "{puback}");

    let command = handler.publish_received().await;
    assert_eq!(command.topic, "get_contact_list");
    assert_eq!(&command.payload[..], br#"{"request_id":"p-1"}"#);
    assert_eq!(user_property(&command, "user_id"), vec!["68946"]);
    assert_eq!(user_property(&command, "client_id"), vec!["paho-phone"]);
    let reply = r#"{"contacts":[],"request_id":"p-1"}"#;
    handler
        .client
        .publish("68946_contact_list", QoS::AtLeastOnce, false, reply)
        .await
        .unwrap();

    let done = device.finish().await;
    assert_eq!(done.code(), Some(0), "paho device: {done:?}");
    let lines = json_lines(&done.stdout);
    let messages = event(&lines, "message");
    assert_eq!(messages.len(), 1, "exactly the reply: {lines:#?}");
    assert_eq!(messages[0]["topic"], "68946_contact_list");
    assert_eq!(messages[0]["payload"], reply);
    assert_eq!(event(&lines, "done").len(), 1, "{lines:#?}");

    // Publishing to another user's reply topic.
    let mut intruder = paho(&broker, version, "JWT", &broker.token("68946"));
    intruder.args(["--publish", "23412_contact_list", "intrusion", "--qos", "1"]);
    let done = run(intruder).await;
    assert_eq!(done.code(), Some(0), "{done:?}");
    let lines = json_lines(&done.stdout);
    let puback = event(&lines, "puback");
    // MQTT 5: PUBACK 0x87; MQTT 3.1.1: acknowledged and dropped.
    let expected = if version == Mqtt::V5 { 0x87 } else { 0 };
    assert_eq!(puback.len(), 1, "{lines:?}");
    assert_eq!(puback[0]["reason_code"], expected, "{lines:?}");
    handler.assert_no_publish(Duration::from_millis(300)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn paho_v311_device_over_tls() {
    paho_device_scenarios(Mqtt::V311).await;
}

#[tokio::test]
async fn paho_v5_device_over_tls() {
    paho_device_scenarios(Mqtt::V5).await;
}

/// paho as an MQTT 5 handler: a device's publish (an MQTT 3.1.1 rumqttc
/// device and a paho MQTT 5 device with a forged `user_id`) arrives with the
/// broker-stamped `user_id` and `client_id` user properties.
#[tokio::test]
async fn paho_v5_handler_receives_device_identity() {
    require_paho().await;
    let broker = TestBroker::start().await;
    let mut handler = paho(&broker, Mqtt::V5, "handler", TEST_HANDLER_KEY);
    handler.args([
        "--client-id",
        "paho-sync-handler",
        "--topics",
        "$share/sync/sync",
        "--expect",
        "2",
    ]);
    let mut handler = Running::spawn(handler);
    let suback: Value = serde_json::from_str(
        &handler
            .wait_line("suback", |l| l.contains(r#""suback""#))
            .await,
    )
    .unwrap();
    assert_eq!(suback["reason_codes"], serde_json::json!([1]), "{suback}");

    let mut v311 = e2e::V4Client::connect(
        broker.tls_target(),
        "rust-phone",
        "JWT",
        &broker.token("23412"),
        |_| {},
    );
    v311.connected().await;
    v311.client
        .publish("sync", rumqttc::QoS::AtLeastOnce, false, "from-rumqttc")
        .await
        .unwrap();
    v311.wait_for("PUBACK", |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;

    let mut device = paho(&broker, Mqtt::V5, "JWT", &broker.token("68946"));
    device
        .args([
            "--client-id",
            "paho-phone",
            "--publish",
            "sync",
            "from-paho",
        ])
        .args([
            "--user-property",
            "user_id",
            "999",
            "--user-property",
            "client_id",
            "evil",
        ]);
    let device = run(device).await;
    assert_eq!(device.code(), Some(0), "{device:?}");

    let done = handler.finish().await;
    assert_eq!(done.code(), Some(0), "paho handler: {done:?}");
    let lines = json_lines(&done.stdout);
    let mut seen: Vec<(String, Vec<Value>)> = event(&lines, "message")
        .into_iter()
        .map(|m| {
            let mut props = m["user_properties"].as_array().cloned().unwrap_or_default();
            // The token's `iat` (a moment of this run): once, a number.
            let iat: Vec<Value> = props
                .iter()
                .filter(|p| p[0] == "token_iat")
                .cloned()
                .collect();
            assert_eq!(iat.len(), 1, "{props:?}");
            assert!(iat[0][1].as_str().is_some_and(|v| v.parse::<u64>().is_ok()));
            props.retain(|p| p[0] != "token_iat");
            props.sort_by_key(|p| p.to_string());
            (m["payload"].as_str().unwrap_or_default().to_owned(), props)
        })
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            (
                "from-paho".to_owned(),
                vec![
                    serde_json::json!(["client_id", "paho-phone"]),
                    serde_json::json!(["user_id", "68946"])
                ]
            ),
            (
                "from-rumqttc".to_owned(),
                vec![
                    serde_json::json!(["client_id", "rust-phone"]),
                    serde_json::json!(["user_id", "23412"])
                ]
            ),
        ],
        "{lines:#?}"
    );
    broker.shutdown().await;
}
