//! The default run's banner: the real `broker` binary with nothing
//! configured (ports 0, a temporary directory) prints how to sign up by hand
//! with the in-process identity service, and those commands, run by bash as
//! printed (curl, then mosquitto_sub/pub with the issued token), work. The
//! one line a human fills in, the code, is read from the broker's log as
//! the banner says. With `BROKER_WS_LISTEN` set, the banner names the
//! sign-up page and the page is told this broker's WebSocket URL.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_printed_signup_commands_work_as_printed() {
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
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("broker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
        .env("BROKER_DEV_DIR", dir.path().join("dev"))
        .env("DATA_DIR", dir.path().join("data"))
        .env("IDP_LISTEN", "127.0.0.1:0")
        .env("BROKER_WS_LISTEN", "127.0.0.1:0")
        .env("IDP_KEYS_DIR", dir.path().join("keys"))
        .env("BROKER_WORKER_THREADS", "1")
        .env("RUST_LOG", "info,mqtt_router=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _child = Kill(child);

    // The banner, up to its last line (bounded: the reader thread ends with the process).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut banner = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "no complete banner; got:\n{}\nlog:\n{}",
                banner.join("\n"),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
        let done = line.starts_with("sign-up page");
        banner.push(line);
        if done {
            break;
        }
    }
    let text = banner.join("\n");
    assert!(
        text.contains("DEVELOPMENT: SMS_PROVIDER_URL is unset"),
        "{text}"
    );
    // The page: its URL, and the broker's own ws:// listener as its MQTT URL.
    let ws_url = banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("MQTT over WebSocket on "))
        .expect("the ws:// listener in the banner")
        .to_owned();
    let page_line = banner.last().unwrap();
    let page = page_line
        .split_whitespace()
        .find(|w| w.starts_with("http://") && w.ends_with("/app/"))
        .unwrap_or_else(|| panic!("no page URL in {page_line:?}"));
    assert!(page_line.contains(&ws_url), "{page_line}");
    let curl = |url: &str| {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", url])
            .output()
            .unwrap();
        assert!(output.status.success(), "curl {url}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert!(
        curl(page).contains("vendor/mqtt.min.js"),
        "the page at {page}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&curl(&format!("{page}config.json"))).unwrap();
    assert_eq!(config["mqtt_url"], ws_url.as_str(), "{config}");

    let start = banner
        .iter()
        .position(|l| l.starts_with("sign up by hand"))
        .expect("sign-up section");
    let end = banner
        .iter()
        .position(|l| l.starts_with("# the subscriber prints"))
        .expect("the end of the sign-up section");
    let mut script = String::from("set -u\n");
    for line in &banner[start + 1..end] {
        let command = line.trim();
        if command.starts_with('#') {
            continue;
        }
        if command.starts_with("CODE=") {
            // What the banner tells a human to do: the 6 digits after
            // `code=` in the log (colours stripped).
            script.push_str(&format!(
                "CODE=$(sed 's/\\x1b\\[[0-9;]*m//g' '{}' | grep -o 'code=[0-9]\\{{6\\}}' | tail -1 | cut -d= -f2)\n",
                log_path.display()
            ));
            continue;
        }
        script.push_str(command);
        script.push('\n');
    }
    // The subscriber runs in the background as printed; give it time, then stop it.
    script.push_str("sleep 3; kill %1 2>/dev/null; wait; echo \"uid=$U\"\n");
    let output = Command::new("timeout")
        .arg("60")
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
        "no user id; script:\n{script}\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        out.contains(&format!("{uid}_contact_list {{\"contacts\":[]}}")),
        "the subscriber did not print the reply; script:\n{script}\nstdout:\n{out}\nstderr:\n{err}"
    );
    // The log never carries the full number.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("15551234567"), "full number in the log");
}
