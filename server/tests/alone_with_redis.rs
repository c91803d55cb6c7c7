//! The broker alone (`BROKER_HANDLERS=none`) with Redis, as an operator
//! starts it in front of handler processes: it asks only for what it uses,
//! so it starts without `TOKENS_MASTER_KEY` (a key only the handlers that
//! seal platform tokens use), listens, and logs without colour codes.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn starts_without_the_tokens_master_key_and_listens() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .current_dir(dir.path())
        .env_clear()
        .env("BROKER_HANDLERS", "none")
        .env("REDIS_URL", redis.url())
        .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
        .env("BROKER_DEV_DIR", dir.path().join("dev"))
        .env("DATA_DIR", dir.path().join("data"))
        .env("IDP_LISTEN", "127.0.0.1:0")
        .env("IDP_KEYS_DIR", dir.path().join("keys"))
        .env("BROKER_WORKER_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let mut stderr = child.stderr.take().unwrap();
    let mut child = Kill(child);

    // The banner names the bound TLS address once the broker listens.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("MQTT broker listening: TLS on ") {
                    break addr.trim().to_owned();
                }
            }
            Err(_) => {
                let status = child.0.try_wait().unwrap();
                let mut log = String::new();
                if status.is_some() {
                    stderr.read_to_string(&mut log).unwrap();
                }
                panic!("the broker did not listen (exit: {status:?}); log:\n{log}");
            }
        }
    };
    TcpStream::connect(&addr).expect("the TLS listener accepts");
    assert!(child.0.try_wait().unwrap().is_none(), "still running");
    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(!log.contains("TOKENS_MASTER_KEY"), "{log}");
    assert!(!log.contains("\x1b["), "colour codes in a pipe: {log:?}");
}
