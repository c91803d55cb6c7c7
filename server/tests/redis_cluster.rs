//! The `broker` binary on a Redis Cluster, as an operator starts it: with
//! `REDIS_URL` listing the six nodes of a cluster (3 masters, 3 replicas,
//! started by the test), node 1 runs the built-in handlers and the identity
//! service; a device signs up by hand (curl, as the banner prints it), gets
//! its reply from the handlers, and its state is in the cluster under
//! hash-tagged keys; node 2 (no handlers, no identity service, the same
//! cluster) admits the same device. A malformed list is refused at start
//! with the fix, without quoting it (it may carry a password).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use testkit::RedisCluster;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A broker with nothing configured but loopback ports 0, `dir`, and `env`.
fn broker(dir: &Path, name: &str, env: &[(&str, String)]) -> (Kill, Receiver<String>) {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let log = std::fs::File::create(data.join("broker.log")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
        .env("BROKER_DEV_DIR", dir.join("dev"))
        .env("DATA_DIR", data.join("data"))
        .env("BROKER_NODE_ID", name)
        .env("BROKER_WORKER_THREADS", "1")
        .env("RUST_LOG", "info,mqtt_router=warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Kill(child), rx)
}

/// Reads banner lines until `until` matches one (60 s at most).
fn banner_until(rx: &Receiver<String>, log: &Path, until: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "no `{until}` in the banner; got:\n{}\nlog:\n{}",
                lines.join("\n"),
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        let done = line.starts_with(until);
        lines.push(line);
        if done {
            return lines;
        }
    }
}

fn value_after<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{}", lines.join("\n")))
        .split_whitespace()
        .next()
        .unwrap()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn a_device_signs_up_and_is_served_on_a_redis_cluster() {
    for tool in ["bash", "curl", "mosquitto_sub", "mosquitto_pub"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is needed (apt-get install -y curl mosquitto-clients; .ci/run does it)"
        );
    }
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let redis_url = cluster.redis_url();
    assert_eq!(redis_url.split(',').count(), 6);

    // Node 1: the built-in handlers and the identity service, on the cluster.
    let (_node1, rx1) = broker(
        dir.path(),
        "node-1",
        &[
            ("REDIS_URL", redis_url.clone()),
            ("TOKENS_MASTER_KEY", "ab".repeat(32)),
            ("IDP_LISTEN", "127.0.0.1:0".into()),
            (
                "IDP_KEYS_DIR",
                dir.path().join("idp-keys").display().to_string(),
            ),
        ],
    );
    let log1 = dir.path().join("node-1/broker.log");
    let banner = banner_until(&rx1, &log1, "# the subscriber prints");
    let text = banner.join("\n");
    assert!(
        text.contains("built-in handlers: sync, publish, contacts, tokens"),
        "{text}"
    );
    let idp = value_after(&banner, "identity service (in-process): ").to_owned();

    // Node 2: no handlers, no identity service; it verifies the identity
    // service's tokens through node 1's JWKS and checks revocations in the
    // cluster.
    let (_node2, rx2) = broker(
        dir.path(),
        "node-2",
        &[
            ("REDIS_URL", redis_url.clone()),
            ("BROKER_HANDLERS", "none".into()),
            ("IDP_IN_PROCESS", "false".into()),
            ("JWT_JWKS_URL", format!("{idp}/.well-known/jwks.json")),
        ],
    );
    let log2 = dir.path().join("node-2/broker.log");
    let banner2 = banner_until(&rx2, &log2, "MQTT broker listening: TLS on ");
    let node2 = port_of(value_after(&banner2, "MQTT broker listening: TLS on "));

    // The banner's sign-up commands, as a human runs them (the code read
    // from node 1's log), then the same token on node 2.
    let start = banner
        .iter()
        .position(|l| l.starts_with("sign up by hand"))
        .expect("sign-up section");
    let ca = dir.path().join("dev/ca.pem");
    let mut script = String::from("set -u\n");
    for line in &banner[start + 1..] {
        let command = line.trim();
        if command.starts_with('#') {
            continue;
        }
        if command.starts_with("CODE=") {
            script.push_str(&format!(
                "CODE=$(grep -o 'code=[0-9]\\{{6\\}}' '{}' | tail -1 | cut -d= -f2)\n",
                log1.display()
            ));
            continue;
        }
        script.push_str(command);
        script.push('\n');
    }
    script.push_str("sleep 3; kill %1 2>/dev/null; wait; echo \"uid=$U\"\n");
    script.push_str(&format!(
        "mosquitto_pub -h localhost -p {node2} --cafile '{}' -V mqttv5 -u JWT -P \"$T\" -t get_contact_list -m '{{}}' && echo node2=admitted\n",
        ca.display()
    ));
    let output = Command::new("timeout")
        .arg("90")
        .arg("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    let uid = out
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .unwrap_or_default()
        .to_owned();
    assert!(
        !uid.is_empty(),
        "no user id; script:\n{script}\nstdout:\n{out}\nstderr:\n{err}\nlog:\n{}",
        std::fs::read_to_string(&log1).unwrap_or_default()
    );
    assert!(
        out.contains(&format!("{uid}_contact_list {{\"contacts\":[]}}")),
        "the handlers did not answer; script:\n{script}\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        out.contains("node2=admitted"),
        "node 2 refused the device; stdout:\n{out}\nstderr:\n{err}\nlog:\n{}",
        std::fs::read_to_string(&log2).unwrap_or_default()
    );

    // The registration is in the cluster, under the user's hash tag, on
    // the master serving the user's slot.
    let key = format!("mqgate:reg:{{{uid}}}");
    let master = cluster.master_of_key(&key);
    let registered = cluster.query(master, &["EXISTS", &key]).unwrap();
    assert_eq!(registered, redis::Value::Int(1), "{key} on node {master}");
    assert_eq!(
        cluster.slot_of(&key),
        cluster.slot_of(&format!("mqgate:key:{{{uid}}}")),
        "a user's keys share a slot"
    );
}

#[test]
fn a_malformed_redis_url_list_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    for (url, fix) in [
        (
            "redis://:hunter2@127.0.0.1:7000,,redis://:hunter2@127.0.0.1:7001",
            "REDIS_URL entry 2 is empty: remove the extra comma",
        ),
        (
            "redis://127.0.0.1:7000,127.0.0.1:7001",
            "REDIS_URL entry 2 is not a Redis URL",
        ),
        (
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001/2",
            "Redis Cluster has only database 0",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_broker"))
            .current_dir(dir.path())
            .env_clear()
            .env("REDIS_URL", url)
            .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
            .env("BROKER_DEV_DIR", dir.path().join("dev"))
            .env("DATA_DIR", dir.path().join("data"))
            .env("IDP_LISTEN", "127.0.0.1:0")
            .env("BROKER_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(fix), "{url}: {err}");
        assert!(!err.contains("hunter2"), "the password in a refusal: {err}");
    }
}
