//! The handler binaries as an operator starts them: a sync-only process with
//! Redis starts without `TOKENS_MASTER_KEY` (it seals nothing), `publish`
//! refuses to start without it and says how to fix it, and the log written
//! to a pipe carries no colour codes.

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn handler(binary: &str, data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("REDIS_URL", "redis://127.0.0.1:1/0")
        .env("DATA_DIR", data_dir)
        // Nothing listens there: the handler keeps retrying, which is running.
        .env("BROKER_URL", "mqtt://127.0.0.1:1")
        .env("HANDLER_KEY", "handler-key-0123456789")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

#[test]
fn a_sync_only_handler_starts_without_the_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = handler(env!("CARGO_BIN_EXE_sync-handler"), dir.path())
        .spawn()
        .unwrap();
    // Long enough to read the configuration, open the store and make the
    // server key; a refused configuration exits at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert!(
            child.try_wait().unwrap().is_none(),
            "sync-handler exited: {}",
            {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                err
            }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("starting"), "{log}");
    assert!(!log.contains("TOKENS_MASTER_KEY"), "{log}");
    assert!(!log.contains("\x1b["), "colour codes in a pipe: {log:?}");
}

#[test]
fn publish_refuses_to_start_without_the_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = handler(env!("CARGO_BIN_EXE_publish-handler"), dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TOKENS_MASTER_KEY") && err.contains("openssl rand -hex 32"),
        "{err}"
    );
}

#[test]
fn help_lists_each_variable_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_tokens-handler"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "BROKER_URL",
        "BROKER_CA",
        "HANDLER_KEY",
        "REDIS_URL",
        "DATA_DIR",
        "PLATFORMS",
        "TOKENS_MASTER_KEY]",
        "RUST_LOG",
    ] {
        assert_eq!(
            help.matches(&format!("env: {var}")).count(),
            1,
            "{var}: {help}"
        );
    }
    assert!(help.contains("rotate-master-key"), "{help}");
}
