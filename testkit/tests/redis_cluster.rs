//! The Redis Cluster fixture itself: it comes up with three masters and
//! three replicas, and each fault it injects (a slot moved, a coordinated
//! failover, a master killed, a node restarted) leaves a cluster that
//! serves every key, as a cluster client sees it. Dropped, it leaves no
//! process behind.

use redis::Commands;
use std::net::TcpStream;
use testkit::RedisCluster;

fn client(cluster: &RedisCluster) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_connection()
        .unwrap()
}

#[test]
fn cluster_comes_up_and_survives_its_faults() {
    let cluster = RedisCluster::start();
    assert_eq!(cluster.len(), 6);
    assert_eq!(cluster.masters().len(), 3, "three masters");
    assert_eq!(cluster.redis_url().split(',').count(), 6);
    let mut con = client(&cluster);
    let key = "{user-1}:probe";
    let _: () = con.set(key, "v1").unwrap();

    // A slot moved with its keys: the value follows, the client follows MOVED.
    let from = cluster.master_of_key(key);
    let to = *cluster.masters().iter().find(|&&m| m != from).unwrap();
    let slot = cluster.move_slot_of(key, to);
    assert_eq!(cluster.master_of_key(key), to);
    assert_eq!(cluster.master_of_slot(slot), to);
    let direct: Option<String> =
        redis::from_owned_redis_value(cluster.query(to, &["GET", key]).unwrap()).unwrap();
    assert_eq!(direct.as_deref(), Some("v1"), "the key moved with its slot");
    let got: String = con.get(key).unwrap();
    assert_eq!(got, "v1");

    // A coordinated failover: the replica is the master now, nothing lost.
    let master = cluster.master_of_key(key);
    let replica = cluster.replica_of(master);
    cluster.failover(replica);
    assert_eq!(cluster.role(replica), Some("master"));
    assert_eq!(cluster.master_of_key(key), replica);
    let got: String = con.get(key).unwrap();
    assert_eq!(got, "v1");

    // kill -9 of a master: its replica takes over after the node timeout;
    // a write acknowledged by a replica (WAIT 1) survives.
    let _: () = con.set(key, "v2").unwrap();
    let master = cluster.master_of_key(key);
    let replica = cluster.replica_of(master);
    let acked: i64 =
        redis::from_owned_redis_value(cluster.query(master, &["WAIT", "1", "2000"]).unwrap())
            .unwrap();
    assert_eq!(acked, 1);
    cluster.kill(master);
    assert!(!cluster.is_running(master));
    cluster.wait_master(replica);
    assert_eq!(cluster.master_of_key(key), replica);
    let mut con = client(&cluster);
    let got: String = con.get(key).unwrap();
    assert_eq!(got, "v2");

    // The dead node comes back as a replica of its successor.
    cluster.restart(master);
    assert!(cluster.is_running(master));
    assert_eq!(cluster.role(master), Some("slave"));
    assert_eq!(cluster.masters().len(), 3);

    let ports: Vec<u16> = (0..cluster.len()).map(|i| cluster.port(i)).collect();
    drop(cluster);
    for port in ports {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "node on port {port} still runs after drop"
        );
    }
}
