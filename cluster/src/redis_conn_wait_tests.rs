//! `BROKER_CLUSTER_WAIT_REPLICAS` on a real Redis Cluster: each
//! per-master pipeline of [`Redis::send_grouped`] ends with `WAIT`.

use super::*;
use testkit::RedisCluster;

fn waits_on(cluster: &RedisCluster, index: usize) -> u64 {
    let info = cluster
        .query_text(index, &["INFO", "commandstats"])
        .expect("INFO commandstats");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_wait:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_wait_for_replicas_and_are_appended() {
    let cluster = RedisCluster::start();
    let redis = Redis::connect(&cluster.redis_url(), 1)
        .await
        .expect("connects");
    let keys: Vec<String> = (0..30).map(|i| format!("{{user{i}}}:wait")).collect();
    let pipe = |group: &[&String], _full: bool| {
        let mut pipe = redis::pipe();
        for key in group {
            pipe.cmd("XADD")
                .arg(key.as_str())
                .arg("*")
                .arg("f")
                .arg("v")
                .ignore();
        }
        pipe
    };
    let sent = redis
        .send_grouped(&keys, |k| k, pipe, Replication::Awaited)
        .await;
    let total: u64 = sent.iter().map(|(n, _)| n).sum();
    assert_eq!(total, 30);
    assert!(sent.iter().all(|(_, r)| r.is_ok()), "{sent:?}");
    for key in &keys {
        let master = cluster.master_of_key(key);
        let len = cluster.query_text(master, &["XLEN", key]).expect("XLEN");
        assert_eq!(len, "1", "{key}");
    }
    let waits: u64 = cluster
        .masters()
        .into_iter()
        .map(|m| waits_on(&cluster, m))
        .sum();
    // One WAIT per master that got a group (30 keys reach all three).
    assert_eq!(waits, 3);

    // What a failover may lose at the cost of a duplicate (a handler's
    // XACK) is sent without one.
    let sent = redis
        .send_grouped(&keys, |k| k, pipe, Replication::Unawaited)
        .await;
    assert!(sent.iter().all(|(_, r)| r.is_ok()), "{sent:?}");
    for key in &keys {
        let master = cluster.master_of_key(key);
        let len = cluster.query_text(master, &["XLEN", key]).expect("XLEN");
        assert_eq!(len, "2", "{key}");
    }
    let after: u64 = cluster
        .masters()
        .into_iter()
        .map(|m| waits_on(&cluster, m))
        .sum();
    assert_eq!(after, waits, "no WAIT for an unawaited batch");
}
