//! The reply appender's script on a real `redis-server`: every user's
//! stream gets its expiry, set again only when due (`stream_ttl.rs`), and a
//! stream that is gone is made again with one.

use super::*;
use crate::stream_ttl::{REFRESH_EVERY, REPLY_STREAM_TTL};
use std::time::Duration;
use testkit::RedisServer;

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client.get_connection().expect("connection");
    redis::cmd("PTTL").arg(key).query(&mut conn).expect("PTTL")
}

fn run(server: &RedisServer, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client.get_connection().expect("connection");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn).expect(args[0])
}

fn calls(server: &RedisServer, command: &str) -> u64 {
    let redis::Value::BulkString(info) = run(server, &["INFO", "commandstats"]) else {
        panic!("INFO is a bulk string");
    };
    let prefix = format!("cmdstat_{command}:calls=");
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn xlen(server: &RedisServer, key: &str) -> i64 {
    match run(server, &["XLEN", key]) {
        redis::Value::Int(n) => n,
        other => panic!("XLEN: {other:?}"),
    }
}

#[tokio::test]
async fn streams_get_their_expiry_refreshed_when_due() {
    let server = RedisServer::start();
    let redis = Redis::connect(&server.url(), 0).await.expect("connects");
    let script = redis::Script::new(APPEND_SCRIPT);
    let mut expiries = Expiries::default();
    let set_ms = i64::try_from(EXPIRY_SET.as_millis()).unwrap();
    let ttl_ms = i64::try_from(REPLY_STREAM_TTL.as_millis()).unwrap();
    let t0 = Instant::now();
    let ok = |sent: &[(Vec<usize>, redis::RedisResult<()>)], n: usize| {
        assert!(sent.iter().all(|(_, r)| r.is_ok()), "{sent:?}");
        let mut all: Vec<usize> = sent.iter().flat_map(|(g, _)| g.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    };

    // First replies of two users (alice twice in the batch): both streams
    // made, each with its expiry, one PEXPIRE each.
    let batch: [(&str, &[u8]); 3] = [("alice", b"a1"), ("bob", b"b1"), ("alice", b"a2")];
    let sent = append_batch(&redis, &script, &mut expiries, &batch, t0).await;
    ok(&sent, 3);
    assert_eq!(xlen(&server, "r:{alice}"), 2);
    assert_eq!(xlen(&server, "r:{bob}"), 1);
    for key in ["r:{alice}", "r:{bob}"] {
        let ttl = pttl(&server, key);
        assert!(ttl > ttl_ms && ttl <= set_ms, "{key}: {ttl}");
    }
    assert_eq!(calls(&server, "pexpire"), 2);

    // Stands for time passing on Redis's side: alice's stream has 60 s
    // left. A reply 10 minutes (by the node's clock) after the setting
    // does not set it again: one XADD, no PEXPIRE.
    run(&server, &["PEXPIRE", "r:{alice}", "60000"]);
    let ten_min = t0 + Duration::from_secs(600);
    let sent = append_batch(&redis, &script, &mut expiries, &[("alice", b"a3")], ten_min).await;
    ok(&sent, 1);
    assert_eq!(xlen(&server, "r:{alice}"), 3);
    let ttl = pttl(&server, "r:{alice}");
    assert!(ttl > 0 && ttl <= 60_000, "not refreshed yet: {ttl}");
    assert_eq!(calls(&server, "pexpire"), 3, "only the test's own");

    // The user stays active: once the refresh is due, the next reply sets
    // the expiry again, to TTL + refresh from now.
    let due = t0 + REFRESH_EVERY;
    let sent = append_batch(&redis, &script, &mut expiries, &[("alice", b"a4")], due).await;
    ok(&sent, 1);
    let ttl = pttl(&server, "r:{alice}");
    assert!(ttl > ttl_ms && ttl <= set_ms, "refreshed: {ttl}");
    assert_eq!(calls(&server, "pexpire"), 4);

    // A stream that is gone (expired, deleted) while this node thinks its
    // expiry recent is made again with an expiry.
    run(&server, &["DEL", "r:{bob}"]);
    let sent = append_batch(&redis, &script, &mut expiries, &[("bob", b"b2")], ten_min).await;
    ok(&sent, 1);
    assert_eq!(xlen(&server, "r:{bob}"), 1);
    let ttl = pttl(&server, "r:{bob}");
    assert!(
        ttl > ttl_ms && ttl <= set_ms,
        "made again with an expiry: {ttl}"
    );

    // Each reply was announced once, with its stream id.
    assert_eq!(calls(&server, "spublish"), 6);
}
