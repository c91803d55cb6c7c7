//! Owns the throwaway Redis Cluster that tests run against: six Debian
//! `redis-server` processes (three masters, three replicas) on free loopback
//! ports, in their own temporary directory, without persistence, joined by
//! `redis-cli --cluster create`, and the operations tests need to shake it
//! (kill -9 a node, fail a replica over, move a slot). Everything is killed
//! and the directory removed on drop.
//!
//! Every call blocks (with a deadline); from an async test, call it through
//! `tokio::task::spawn_blocking` on an `Arc<RedisCluster>` when the test's
//! own Redis traffic must keep running meanwhile.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Masters, then one replica each.
const MASTERS: usize = 3;
const NODES: usize = MASTERS * 2;

/// `cluster-node-timeout` in milliseconds: a dead master is failed over by
/// its replica a little after this (Redis's default is 15 s).
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// How long the whole cluster may take to come up, or to settle after an
/// operation.
const SETTLE: Duration = Duration::from_secs(30);

/// Where Debian installs the binaries; tried before `PATH`.
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// One node's ports and process.
struct Node {
    /// Client port.
    port: u16,
    /// Cluster bus port (`cluster-port`).
    bus: u16,
    child: Option<Child>,
}

/// A Redis Cluster of three masters and three replicas on `127.0.0.1`.
///
/// Nodes are numbered 0..6 in start order; which of them are masters changes
/// with failovers, so ask [`RedisCluster::masters`] or
/// [`RedisCluster::master_of_key`].
pub struct RedisCluster {
    nodes: Vec<Mutex<Node>>,
    server: PathBuf,
    cli: PathBuf,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster, and waits until every node
    /// reports `cluster_state:ok` and agrees on the slot map.
    ///
    /// # Panics
    /// When `redis-server` or `redis-cli` is missing, or the cluster is not
    /// ready within 30 s.
    pub fn start() -> RedisCluster {
        let server = find_binary(REDIS_SERVER, "redis-server");
        let cli = find_binary(REDIS_CLI, "redis-cli");
        let dir = tempfile::Builder::new()
            .prefix("redis-cluster-")
            .tempdir()
            .expect("a temporary directory for the cluster");
        let ports = free_ports(NODES * 2);
        let nodes = ports
            .chunks(2)
            .map(|pair| {
                Mutex::new(Node {
                    port: pair[0],
                    bus: pair[1],
                    child: None,
                })
            })
            .collect();
        let cluster = RedisCluster {
            nodes,
            server,
            cli,
            dir,
        };
        for index in 0..NODES {
            cluster.spawn(index);
        }
        let deadline = Instant::now() + SETTLE;
        for index in 0..NODES {
            cluster.wait_until(deadline, &format!("node {index} answers"), |c| {
                c.query(index, &["PING"]).is_ok()
            });
        }
        let addresses: Vec<String> = (0..NODES)
            .map(|i| format!("127.0.0.1:{}", cluster.port(i)))
            .collect();
        let output = Command::new(&cluster.cli)
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_settled();
        // A replica still in its first full sync has nothing yet: a
        // failover then would lose every write. Linked first.
        cluster.wait_until(
            Instant::now() + SETTLE,
            "every replica is linked to its master",
            |c| {
                (0..NODES).all(|i| {
                    c.query_text(i, &["INFO", "replication"])
                        .map(|info| {
                            info.contains("role:master") || info.contains("master_link_status:up")
                        })
                        .unwrap_or(false)
                })
            },
        );
        cluster
    }

    /// The client port of node `index`.
    pub fn port(&self, index: usize) -> u16 {
        self.nodes[index].lock().unwrap().port
    }

    /// `redis://127.0.0.1:<port>` of every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        (0..NODES)
            .map(|i| format!("redis://127.0.0.1:{}", self.port(i)))
            .collect()
    }

    /// The `REDIS_URL` that selects this cluster: every node URL, comma-separated.
    pub fn redis_url(&self) -> String {
        self.urls().join(",")
    }

    /// The number of nodes (6).
    pub fn len(&self) -> usize {
        NODES
    }

    /// Never empty; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The temporary directory holding the nodes' `nodes-<port>.conf` and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether node `index` is running (not killed).
    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].lock().unwrap().child.is_some()
    }

    /// Runs a command on node `index` (a plain connection to that node, no
    /// redirection) and returns its reply.
    pub fn query(&self, index: usize, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port(index)))?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(1))?;
        con.set_read_timeout(Some(Duration::from_secs(5)))?;
        con.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut con)
    }

    /// Like [`RedisCluster::query`], for a reply that is text.
    pub fn query_text(&self, index: usize, args: &[&str]) -> redis::RedisResult<String> {
        let value = self.query(index, args)?;
        redis::from_owned_redis_value(value)
    }

    /// The indices of the running masters that own slots, in node order.
    pub fn masters(&self) -> Vec<usize> {
        let view = self.view().expect("a running node answers CLUSTER NODES");
        let mut masters: Vec<usize> = view
            .values()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .filter_map(|n| self.index_of_port(n.port))
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The index of the master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        let view = self.view().expect("a running node answers CLUSTER NODES");
        view.values()
            .find(|n| n.master && !n.failed && n.slots.contains(&slot))
            .and_then(|n| self.index_of_port(n.port))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The hash slot of `key` (hash tags included).
    pub fn slot_of(&self, key: &str) -> u16 {
        let index = self.any_running();
        let slot: i64 = redis::from_owned_redis_value(
            self.query(index, &["CLUSTER", "KEYSLOT", key])
                .expect("CLUSTER KEYSLOT"),
        )
        .expect("an integer slot");
        u16::try_from(slot).expect("a slot fits u16")
    }

    /// The index of the master serving `key`.
    pub fn master_of_key(&self, key: &str) -> usize {
        self.master_of_slot(self.slot_of(key))
    }

    /// The index of a running replica of master `master`, waiting (30 s at
    /// most) until the cluster shows one: right after a failover the old
    /// master takes a moment to be listed as the new one's replica.
    pub fn replica_of(&self, master: usize) -> usize {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(replica) = self.running_replica_of(master) {
                return replica;
            }
            assert!(
                Instant::now() < deadline,
                "master {master} has no running replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (30 s at most) until the running replica of `master` has
    /// applied every write the master had made when this was called (its
    /// `slave_repl_offset` reaches the master's `master_repl_offset`, both
    /// from `INFO replication`), and returns it. A `WAIT 1` sent from a
    /// connection of its own proves nothing: that connection wrote nothing,
    /// so Redis counts a replica that is merely online, whatever it has
    /// not applied yet (right after [`RedisCluster::start`], writes
    /// buffered during its first full sync).
    pub fn wait_replicated(&self, master: usize) -> usize {
        let replica = self.replica_of(master);
        let target = self
            .repl_offset(master, "master_repl_offset")
            .expect("the master's INFO replication");
        self.wait_until(
            Instant::now() + SETTLE,
            &format!("replica {replica} applies master {master}'s writes up to offset {target}"),
            |c| {
                c.repl_offset(replica, "slave_repl_offset")
                    .is_some_and(|applied| applied >= target)
            },
        );
        replica
    }

    /// A field of node `index`'s `INFO replication` that is an offset.
    fn repl_offset(&self, index: usize, field: &str) -> Option<u64> {
        let info = self.query_text(index, &["INFO", "replication"]).ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse().ok())
    }

    fn running_replica_of(&self, master: usize) -> Option<usize> {
        let view = self.view().ok()?;
        let master_id = view
            .iter()
            .find(|(_, n)| n.port == self.port(master))
            .map(|(id, _)| id.clone())?;
        view.values()
            .filter(|n| n.replica_of.as_deref() == Some(master_id.as_str()) && !n.failed)
            .filter_map(|n| self.index_of_port(n.port))
            .find(|&i| self.is_running(i))
    }

    /// `kill -9` node `index` (it stays dead until [`RedisCluster::restart`]).
    pub fn kill(&self, index: usize) {
        let mut node = self.nodes[index].lock().unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `index` again with its old identity (its `nodes.conf`):
    /// it rejoins the cluster, as a replica if it was failed over meanwhile.
    /// Waits until every running node reports `cluster_state:ok`.
    pub fn restart(&self, index: usize) {
        self.kill(index);
        self.spawn(index);
        self.wait_settled();
    }

    /// `CLUSTER FAILOVER` on `replica` (a coordinated, lossless promotion
    /// while its master is up), then waits until it is a master and the
    /// cluster is settled.
    pub fn failover(&self, replica: usize) {
        self.failover_with(replica, None);
    }

    /// `CLUSTER FAILOVER FORCE` (or `TAKEOVER`) on `replica`: for a master that
    /// is down or must not be asked.
    pub fn failover_forced(&self, replica: usize, mode: &str) {
        self.failover_with(replica, Some(mode));
    }

    fn failover_with(&self, replica: usize, mode: Option<&str>) {
        let mut args = vec!["CLUSTER", "FAILOVER"];
        args.extend(mode);
        let reply = self.query_text(replica, &args).expect("CLUSTER FAILOVER");
        assert_eq!(reply, "OK", "CLUSTER FAILOVER on node {replica}");
        self.wait_master(replica);
    }

    /// Waits (30 s at most) until node `index` is a master and the cluster
    /// is settled: after [`RedisCluster::kill`] of its master, the replica
    /// is promoted a little after [`NODE_TIMEOUT_MS`].
    pub fn wait_master(&self, index: usize) {
        let deadline = Instant::now() + SETTLE;
        self.wait_until(deadline, &format!("node {index} becomes a master"), |c| {
            c.role(index) == Some("master")
        });
        // The promoted node knows first; the others learn it by gossip. Until
        // every running node lists it as a master serving slots, a view taken
        // from one of them still names the old master.
        let port = self.port(index);
        self.wait_until(
            deadline,
            &format!("every running node sees node {index} serve slots"),
            |c| {
                (0..NODES).filter(|&i| c.is_running(i)).all(|i| {
                    c.view_from(i)
                        .map(|view| {
                            view.values().any(|n| {
                                n.port == port && n.master && !n.failed && !n.slots.is_empty()
                            })
                        })
                        .unwrap_or(false)
                })
            },
        );
        self.wait_settled();
    }

    /// `master`, `slave`, or `None` when the node does not answer.
    pub fn role(&self, index: usize) -> Option<&'static str> {
        let value = self.query(index, &["ROLE"]).ok()?;
        let redis::Value::Array(items) = value else {
            return None;
        };
        let first: String = redis::from_owned_redis_value(items.into_iter().next()?).ok()?;
        match first.as_str() {
            "master" => Some("master"),
            "slave" => Some("slave"),
            _ => None,
        }
    }

    /// Moves the slot of `key` from its master to master `to` with its keys
    /// (`SETSLOT IMPORTING` / `MIGRATING`, `MIGRATE` in batches, then
    /// `SETSLOT NODE` on every master), and waits until every node agrees.
    /// Returns the slot.
    pub fn move_slot_of(&self, key: &str, to: usize) -> u16 {
        let slot = self.slot_of(key);
        self.move_slot(slot, to);
        slot
    }

    /// Moves `slot` to master `to` (see [`RedisCluster::move_slot_of`]).
    pub fn move_slot(&self, slot: u16, to: usize) {
        let from = self.master_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let from_id = self.node_id(from);
        let to_id = self.node_id(to);
        let slot_text = slot.to_string();
        let ok = |index: usize, args: &[&str]| {
            let reply = self
                .query_text(index, args)
                .unwrap_or_else(|e| panic!("{args:?} on node {index}: {e}"));
            assert_eq!(reply, "OK", "{args:?} on node {index}");
        };
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
        );
        let to_port = self.port(to).to_string();
        let deadline = Instant::now() + SETTLE;
        loop {
            assert!(Instant::now() < deadline, "slot {slot} did not empty");
            let keys: Vec<String> = redis::from_owned_redis_value(
                self.query(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"])
                    .expect("CLUSTER GETKEYSINSLOT"),
            )
            .expect("a list of keys");
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            ok(from, &args);
        }
        // The target first, then the source, then the others (the order
        // `redis-cli --cluster reshard` uses).
        ok(to, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
        for other in self.masters() {
            if other != from && other != to {
                ok(other, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
            }
        }
        self.wait_until(
            deadline,
            &format!("every node sees slot {slot} on node {to}"),
            |c| {
                (0..NODES).filter(|&i| c.is_running(i)).all(|i| {
                    c.view_from(i)
                        .ok()
                        .and_then(|view| {
                            view.values()
                                .find(|n| n.slots.contains(&slot))
                                .map(|n| n.port == c.port(to))
                        })
                        .unwrap_or(false)
                })
            },
        );
    }

    /// Waits (30 s at most) until every running node reports
    /// `cluster_state:ok` and sees every slot served by a master that is up.
    pub fn wait_settled(&self) {
        let deadline = Instant::now() + SETTLE;
        self.wait_until(
            deadline,
            "every running node reports cluster_state:ok",
            |c| {
                (0..NODES).filter(|&i| c.is_running(i)).all(|i| {
                    let ok = c
                        .query_text(i, &["CLUSTER", "INFO"])
                        .map(|info| info.contains("cluster_state:ok"))
                        .unwrap_or(false);
                    ok && c
                        .view_from(i)
                        .map(|view| {
                            let covered: usize = view
                                .values()
                                .filter(|n| n.master && !n.failed)
                                .map(|n| n.slots.len())
                                .sum();
                            covered == 16384
                        })
                        .unwrap_or(false)
                })
            },
        );
    }

    fn node_id(&self, index: usize) -> String {
        self.query_text(index, &["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        (0..NODES).find(|&i| self.port(i) == port)
    }

    fn any_running(&self) -> usize {
        (0..NODES)
            .find(|&i| self.is_running(i))
            .expect("a running node")
    }

    /// The cluster as the first running node that answers sees it.
    fn view(&self) -> redis::RedisResult<HashMap<String, NodeView>> {
        let mut last = None;
        for index in (0..NODES).filter(|&i| self.is_running(i)) {
            match self.view_from(index) {
                Ok(view) => return Ok(view),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::IoError, "no node is running"))
        }))
    }

    /// `CLUSTER NODES` of node `index`, by node id.
    fn view_from(&self, index: usize) -> redis::RedisResult<HashMap<String, NodeView>> {
        let text = self.query_text(index, &["CLUSTER", "NODES"])?;
        Ok(text.lines().filter_map(NodeView::parse).collect())
    }

    fn spawn(&self, index: usize) {
        let mut node = self.nodes[index].lock().unwrap();
        let (port, bus) = (node.port.to_string(), node.bus.to_string());
        let log = self.dir.path().join(format!("node-{port}.log"));
        let child = Command::new(&self.server)
            .args(["--port", &port, "--cluster-port", &bus])
            .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(self.dir.path().join(format!("nodes-{port}.conf")))
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.server.display()));
        node.child = Some(child);
    }

    fn wait_until(&self, deadline: Instant, what: &str, done: impl Fn(&Self) -> bool) {
        while Instant::now() < deadline {
            if done(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("Redis Cluster: timed out waiting until {what}");
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for index in 0..NODES {
            if let Ok(mut node) = self.nodes[index].lock() {
                if let Some(mut child) = node.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

/// One line of `CLUSTER NODES`.
struct NodeView {
    port: u16,
    master: bool,
    failed: bool,
    replica_of: Option<String>,
    slots: Vec<u16>,
}

impl NodeView {
    /// `<id> <ip:port@bus> <flags> <master|-> <ping> <pong> <epoch> <link> <slot>...`
    fn parse(line: &str) -> Option<(String, NodeView)> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let id = fields.first()?.to_string();
        let port = fields
            .get(1)?
            .split('@')
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()?;
        let flags = fields.get(2)?;
        let master = flags.split(',').any(|f| f == "master");
        let failed = flags.split(',').any(|f| f == "fail" || f == "noaddr");
        let replica_of = fields.get(3).filter(|m| **m != "-").map(|m| m.to_string());
        let mut slots = Vec::new();
        for range in fields.iter().skip(8) {
            // Importing/migrating markers look like `[slot->-id]`.
            if range.starts_with('[') {
                continue;
            }
            let (start, end): (u16, u16) = match range.split_once('-') {
                Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
                None => {
                    let slot = range.parse().ok()?;
                    (slot, slot)
                }
            };
            slots.extend(start..=end);
        }
        Some((
            id,
            NodeView {
                port,
                master,
                failed,
                replica_of,
                slots,
            },
        ))
    }
}

/// `count` distinct free loopback ports (each held until all are chosen).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// `preferred` if it is a file, else the first `name` on `PATH`.
fn find_binary(preferred: &str, name: &str) -> PathBuf {
    let debian = Path::new(preferred);
    if debian.is_file() {
        return debian.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} not found: install Debian's redis-server and redis-tools")
        })
}
