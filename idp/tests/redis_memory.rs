//! The identity service on Redis (sessions, codes and counters in `idp:*`
//! with TTLs; registrations in the shared store), and what a registered
//! user costs there: `MEMORY USAGE` summed over every key left once the
//! sign-up session has expired, divided by the users. Mozilla's gateway
//! needed 1,216 bytes per user; the aim is under 400. Prints the figure:
//!
//! `cargo test -p idp --test redis_memory -- --nocapture`

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use common::TestIdp;
use redis::AsyncCommands;
use std::sync::Arc;
use std::time::Duration;
use testkit::RedisServer;

const USERS: usize = 50;

#[tokio::test]
async fn a_registered_user_costs_under_400_bytes_in_redis() {
    let server = RedisServer::start();
    let url = server.url();
    let store: Arc<dyn store::Store> = Arc::new(store::RedisStore::connect(&url).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let idp = TestIdp::start_with(dir, store, |s| {
        s.redis_url = Some(url.clone().into());
        s.session_ttl = Duration::from_secs(2);
        s.rate_per_addr = 100_000;
    })
    .await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    // While signing up, the session lives in Redis with a TTL.
    let session = idp.register("+15550000001").await;
    let keys: Vec<String> = conn.keys("idp:s:*").await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(
        !keys[0].contains(&session),
        "stored under a hash of the token"
    );
    let ttl: i64 = conn.pttl(&keys[0]).await.unwrap();
    assert!(ttl > 0 && ttl <= 2000, "{ttl}");
    let (status, _) = idp
        .post("/sms/verify", Some(&session), serde_json::Value::Null)
        .await;
    assert_eq!(status, 200);
    let session_bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(keys[0].as_str())
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    println!("redis bytes of a sign-up session with its code: {session_bytes}");
    let fields: std::collections::HashMap<String, String> = conn.hgetall(&keys[0]).await.unwrap();
    assert!(!fields.values().any(|v| v.contains(&session)));

    let mut uids = Vec::new();
    for i in 0..USERS {
        let (_, uid) = idp.sign_up(&format!("+1555{:07}", 1000 + i)).await;
        uids.push(uid);
    }
    // Rate counters carry a TTL too.
    let counters: Vec<String> = conn.keys("idp:r:*").await.unwrap();
    assert!(!counters.is_empty());
    for key in &counters {
        let ttl: i64 = conn.pttl(key).await.unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{key}: {ttl}");
    }

    // Once the sessions have expired, what stays is what registered users
    // cost (the per-minute counters go within a minute, and are left out).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(conn
        .keys::<_, Vec<String>>("idp:s:*")
        .await
        .unwrap()
        .is_empty());
    let all: Vec<String> = conn.keys("*").await.unwrap();
    let lasting: Vec<&String> = all.iter().filter(|k| !k.starts_with("idp:r:")).collect();
    assert_eq!(
        lasting.len(),
        USERS,
        "one key per registered user: {lasting:?}"
    );
    let mut bytes = 0u64;
    for key in &lasting {
        assert!(uids.iter().any(|u| key.contains(u.as_str())), "{key}");
        let used: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key.as_str())
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
        bytes += used;
    }
    let per_user = bytes / USERS as u64;
    println!(
        "redis bytes per registered user: {per_user} (MEMORY USAGE over {} keys, {USERS} users)",
        lasting.len()
    );
    assert!(per_user < 400, "{per_user} bytes per user");
}
