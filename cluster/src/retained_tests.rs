//! The retained store's pure parts (values, log entries, expiry), and
//! `BROKER_CLUSTER_WAIT_REPLICAS` on a real Redis Cluster: a batch of
//! retained stores ends with `WAIT` on the `{retained}` master.

use super::*;
use broker::router::protocol::{Publish, PublishProperties, QoS};

fn entry(expiry: Option<u32>) -> Entry {
    Entry {
        origin: "node-a".into(),
        left_to_stream: false,
        publish: Publish::with_qos(
            Bytes::from_static(b"42_status"),
            Bytes::from_static(b"on"),
            true,
            QoS::AtLeastOnce,
            1,
        ),
        properties: Some(PublishProperties {
            message_expiry_interval: expiry,
            ..Default::default()
        }),
    }
}

#[test]
fn values_read_back_with_their_time() {
    let stored = value(1_700_000_000_123, b"entry");
    assert_eq!(
        split_value(&stored),
        Some((1_700_000_000_123, &b"entry"[..]))
    );
    assert_eq!(split_value(b"short"), None);
}

#[test]
fn expiry_counts_the_time_since_it_was_stored() {
    // (interval, seconds since stored) -> interval handed over
    let table = [
        (None, 10_000, Some(None)),
        (Some(60), 0, Some(Some(60))),
        (Some(60), 59, Some(Some(1))),
        (Some(60), 60, None),
        (Some(60), 61, None),
    ];
    for (interval, waited, expected) in table {
        let got = as_of(entry(interval), 1_000_000, 1_000_000 + waited * 1000)
            .map(|e| e.properties.and_then(|p| p.message_expiry_interval));
        assert_eq!(got, expected, "{interval:?} after {waited} s");
    }
}

#[test]
fn a_router_gets_each_retained_message_once() {
    let held = Held::default();
    held.received("t", b"v1", false);
    assert!(!held.set("t", b"v1", false), "its own change comes back");
    assert!(held.set("t", b"v2", false));
    assert!(!held.set("t", b"v2", false));
    assert!(held.set("t", b"", true), "deleted");
    assert!(!held.set("t", b"", true), "nothing left to delete");
    assert!(held.set("t", b"v1", false));
}

#[test]
fn log_entries_of_xread_and_xrange_answers() {
    use redis::Value::{Array, BulkString, Nil};
    let entry = |id: &str, topic: &str| {
        Array(vec![
            BulkString(id.as_bytes().to_vec()),
            Array(vec![
                BulkString(b"t".to_vec()),
                BulkString(topic.as_bytes().to_vec()),
                BulkString(b"v".to_vec()),
                BulkString(b"x".to_vec()),
            ]),
        ])
    };
    let range = Array(vec![entry("1-0", "a"), entry("2-1", "b")]);
    let read = Array(vec![Array(vec![
        BulkString(LOG_KEY.as_bytes().to_vec()),
        range.clone(),
    ])]);
    for got in [log_entries(&range), log_entries(xread_entries(&read))] {
        assert_eq!(
            got,
            vec![
                (StreamId { ms: 1, seq: 0 }, "a".to_owned(), b"x".to_vec()),
                (StreamId { ms: 2, seq: 1 }, "b".to_owned(), b"x".to_vec()),
            ]
        );
    }
    assert!(log_entries(&Nil).is_empty());
    assert!(log_entries(xread_entries(&Nil)).is_empty());
    assert!(log_entries(&Array(vec![])).is_empty());
}

fn waits_on(cluster: &testkit::RedisCluster, index: usize) -> u64 {
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
async fn retained_stores_wait_for_replicas() {
    let cluster = testkit::RedisCluster::start();
    let master = cluster.master_of_key(TOPICS_KEY);
    let replica = cluster.replica_of(master);
    // The replica past its first sync (a cluster just started may still be
    // in it, and every WAIT would then run out its 100 ms): one write on
    // the master, and a WAIT long enough for a loaded machine.
    let synced: (String, i64) = {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.port(master)))
            .expect("the master's address");
        let mut conn = client.get_connection().expect("connects to the master");
        redis::pipe()
            .cmd("SET")
            .arg("{retained}:sync")
            .arg(1)
            .cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query(&mut conn)
            .expect("SET and WAIT on the {retained} master")
    };
    assert_eq!(synced.1, 1, "the replica acknowledged a write");
    // (replicas waited for) -> WAITs the {retained} master ran
    for replicas in [0u8, 1] {
        let redis = Redis::connect(&cluster.redis_url(), replicas)
            .await
            .expect("connects");
        let before = waits_on(&cluster, master);
        let topic = format!("status/wait-{replicas}");
        let stored = Entry::encode("node-a", &entry(None).publish, &None).expect("encodes");
        let items = [(topic.as_str(), &stored), ("status/other", &stored)];
        let pipe = store_pipe(items.iter().map(|(t, e)| (*t, *e)), now_ms());
        let answers = store_batch(&redis, pipe, items.len())
            .await
            .expect("stored");
        assert_eq!(answers, vec!["ok", "ok"], "replicas {replicas}");
        assert_eq!(
            waits_on(&cluster, master) - before,
            u64::from(replicas),
            "replicas {replicas}"
        );
        if replicas > 0 {
            // WAIT 1 returned: the one replica has the batch already.
            let client =
                redis::Client::open(format!("redis://127.0.0.1:{}", cluster.port(replica)))
                    .expect("the replica's address");
            let mut conn = client.get_connection().expect("connects to the replica");
            let _: () = redis::cmd("READONLY").query(&mut conn).expect("READONLY");
            let held: bool = redis::cmd("HEXISTS")
                .arg(TOPICS_KEY)
                .arg(&topic)
                .query(&mut conn)
                .expect("HEXISTS on the replica");
            assert!(held, "the replica has {topic}");
        }
    }
}
