//! The `idp` binary: `idp rotate-keys` on a keys directory makes a new
//! signing key and retires the old one (both stay in the directory, the old
//! one until its tokens have expired); an absurd setting is refused with a
//! message that says how to fix it.

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::Command;

fn kids(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut metas: Vec<serde_json::Value> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    metas.sort_by_key(|m| m["kid"].as_str().unwrap().to_owned());
    metas
}

#[test]
fn rotate_keys_makes_a_new_key_and_retires_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_idp"))
            .arg("rotate-keys")
            .env("IDP_KEYS_DIR", &keys)
            .env("DATA_DIR", dir.path())
            .env_remove("REDIS_URL")
            .output()
            .unwrap()
    };
    // The first run makes the first key, then rotates it.
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("new signing key k"), "{text}");
    let metas = kids(&keys);
    assert_eq!(metas.len(), 2, "{metas:?}");
    let active: Vec<_> = metas.iter().filter(|m| m["retired_at"].is_null()).collect();
    assert_eq!(active.len(), 1);
    assert!(text.contains(active[0]["kid"].as_str().unwrap()));
    for meta in &metas {
        let pem = keys.join(format!("{}.key.pem", meta["kid"].as_str().unwrap()));
        assert!(std::fs::read_to_string(pem)
            .unwrap()
            .contains("BEGIN PRIVATE KEY"));
    }
    assert!(run().status.success());
    assert_eq!(
        kids(&keys)
            .iter()
            .filter(|m| m["retired_at"].is_null())
            .count(),
        1
    );
    assert_eq!(kids(&keys).len(), 3);
}

#[test]
fn absurd_settings_are_refused_with_a_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_idp"))
        .arg("rotate-keys")
        .env("IDP_TOKEN_TTL", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IDP_TOKEN_TTL=0 is out of range"), "{err}");
}
