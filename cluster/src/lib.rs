//! Many broker nodes serving as one through Redis: [`ClusterDelivery`]
//! implements the broker's delivery seam (`broker::delivery::Delivery`)
//! around the node's own [`LocalDelivery`], which keeps deciding everything
//! local (rows, paths, inboxes). The session never learns about other
//! nodes; `broker` does not depend on Redis (the `broker` binary composes
//! this crate when a Redis store is configured).
//!
//! The map:
//! - `lib.rs` (this file): the node's settings, its name, and starting its
//!   tasks on a running broker ([`Cluster`]);
//! - `delivery.rs`: [`ClusterDelivery`], the seam's methods: each keeps the
//!   local decision and queues what Redis must learn;
//! - `entry.rs`: keys, partitions, consumer groups, the bytes of an entry,
//!   stream ids and a user's cursor (pure, table-tested);
//! - `replies.rs`: the device plane (per-user streams, their appends
//!   and delivery here; takeover announcements); `replay.rs`: reading a
//!   user's stream after a cursor into this node;
//! - `listener.rs`: its sharded pub/sub subscriptions, per master, and
//!   the replay of a user's stream for a session that moved here;
//! - `pacing.rs`: a burst of one user's replies (a replay, many wake-ups
//!   at once) injected no faster than the user's sessions take them;
//! - `record.rs`: a persistent device session's record in Redis (pure);
//! - `cursor.rs`: its cursor, the end of the replies its client
//!   acknowledged without a gap (pure);
//! - `sessions.rs`: the persistent device sessions held here, their
//!   records written to Redis and read back at CONNECT on another node;
//! - `commands.rs`: the handler plane (per-topic partitioned streams,
//!   consumer groups, reclaim);
//! - `acks.rs`: a command's delivery tag, and its `XACK` once a handler
//!   acknowledged it;
//! - `declarations.rs`: command topics handlers declared, shared by nodes;
//! - `retained.rs`: retained messages, stored in Redis and followed by
//!   every node's router;
//! - `liveness.rs`, `wills.rs`, `will_record.rs`: each node's liveness,
//!   its devices' wills kept in Redis, and the sweeper that publishes the
//!   wills of a node that died;
//! - `redis_conn.rs`: the connections (the store's shared one, routed by
//!   slot on a cluster; the slot map; batched appends, one pipeline per
//!   master, blocking reads and sharded pub/sub on connections of their
//!   own to the master holding the slot).
//!
//! The path of a reply received on node A for a user whose device is on
//! node B: A's gate decides and stamps it, [`ClusterDelivery::route`]
//! delivers it to A's own subscribers and queues it; A's appender runs the
//! append script (stream + announcement); B, subscribed to the user's
//! channel while it holds a session of the user, gets the announcement and
//! delivers the entry through its local inboxes and router
//! (`broker::inject`). A command takes the other plane: appended to its
//! topic's stream, read by the consumer groups of the handlers that
//! declared it, on whichever nodes they are.

mod acks;
mod command_groups;
mod commands;
mod cursor;
mod declarations;
mod delivery;
pub mod entry;
mod holds;
mod listener;
mod liveness;
mod pacing;
pub mod record;
mod redis_conn;
mod replay;
mod replies;
mod retained;
mod sessions;
mod stream_ttl;
pub mod will_record;
mod wills;

pub(crate) use delivery::device_uid;
pub use delivery::ClusterDelivery;
pub(crate) use entry::stream_entries;
pub use redis_conn::RedisError;

use broker::acl::{CommandTopics, Denial};
use broker::delivery::ack::{self, Outcome, Ticket};
use broker::delivery::{
    Delivery, Kind, LocalDelivery, Opening, Path, Request, ResumeFuture, Routed,
    SessionSubscription, Subscriptions,
};
use broker::inject::Injector;
use broker::metrics::Metrics;
use broker::router::protocol::{Publish, PublishProperties, QoS};
use broker::wills::{ReadyWill, WillClock};
use bytes::Bytes;
use command_groups::Groups;
use declarations::Declared;
use entry::{command_key, partition, Entry};
use listener::Resume;
use parking_lot::Mutex;
use redis_conn::Redis;
use replies::Interest;
use sessions::Persistent;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest `BROKER_NODE_ID` (it names Redis consumers and entries).
pub const MAX_NODE_ID_BYTES: usize = 64;

/// This crate's settings (with `REDIS_URL` set).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// Replicas each batch of appends waits for (`WAIT n 100` after each
    /// per-master pipeline): a batch counts as appended once n replicas
    /// acknowledged it or 100 ms passed (logged at warn, not dropped).
    /// 0 = off (default). 0 to 5.
    #[arg(
        long,
        env = "BROKER_CLUSTER_WAIT_REPLICAS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u8).range(0..=5)
    )]
    pub wait_replicas: u8,
}

/// Why the cluster cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(
        "BROKER_NODE_ID {0:?} is not a node name: use 1 to 64 letters, digits, '.', '-' or '_'"
    )]
    BadNodeId(String),
}

/// The node's name: `BROKER_NODE_ID`, or one unique to this process.
pub fn node_id(configured: Option<&str>) -> Result<String, ClusterError> {
    match configured {
        Some(id) => {
            let valid = !id.is_empty()
                && id.len() <= MAX_NODE_ID_BYTES
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if valid {
                Ok(id.to_owned())
            } else {
                Err(ClusterError::BadNodeId(id.to_owned()))
            }
        }
        None => Ok(format!(
            "node-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )),
    }
}

/// What every task of this node's cross-node delivery shares.
pub(crate) struct Node {
    pub(crate) id: Arc<str>,
    pub(crate) redis: Redis,
    pub(crate) shutdown: CancellationToken,
    local: Arc<LocalDelivery>,
    metrics: Arc<Metrics>,
    injector: Injector,
    links: AtomicU64,
    /// Acknowledgements of replies a paced burst of a user waits for.
    pub(crate) paced: Arc<pacing::Acks>,
    /// The persistent device sessions held here (their cursors track the
    /// replies injected for them).
    pub(crate) persistent: Arc<Persistent>,
    /// The commands handlers here are working on (kept from looking idle).
    pub(crate) holds: Arc<Mutex<holds::Holds>>,
}

impl Node {
    pub(crate) fn local(&self) -> &LocalDelivery {
        &self.local
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn injector(&self) -> &Injector {
        &self.injector
    }

    /// A fresh router link name (router client ids must be unique).
    pub(crate) fn next_link_name(&self) -> String {
        format!("cluster-{}", self.links.fetch_add(1, Ordering::Relaxed))
    }
}

/// Milliseconds of a monotonic clock (the cursors' expiries and stalls,
/// how long a handler here has held a command).
pub(crate) fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// An announcement waiting: (user id, session id).
type Queued = (String, Bytes);
/// Where announcements wait (bounded: a full queue drops and counts).
type Queue = mpsc::Sender<Queued>;

/// How long a session waits for the append of a QoS 1 publish before it
/// answers it as not stored: the appender's retry window
/// ([`redis_conn::APPEND_RETRY_FOR`]) and a margin for the batch in front.
pub const ACK_WITHIN: Duration = Duration::from_secs(15);

/// A reply or command waiting to be appended.
pub(crate) struct Append {
    /// The user id (a reply) or the stream key (a command).
    pub(crate) key: String,
    pub(crate) entry: Bytes,
    /// A QoS 1 publish's: the session's PUBACK waits for it.
    pub(crate) ticket: Option<Ticket>,
}

impl Append {
    /// Answers the session waiting for this append, if one is.
    pub(crate) fn settle(ticket: Option<Ticket>, appended: bool) {
        if let Some(ticket) = ticket {
            ticket.settle(if appended {
                Outcome::Stored
            } else {
                Outcome::Failed
            });
        }
    }
}

/// Where appends wait (bounded: a full queue drops, counts, and answers
/// the waiting session `Outcome::QueueFull`).
type Appends = mpsc::Sender<Append>;

/// A node's cross-node delivery, connected, before the broker starts.
pub struct Cluster {
    id: Arc<str>,
    redis: Redis,
    interest: Arc<Interest>,
    groups: Arc<Groups>,
    declared: Arc<Declared>,
    replies: (Appends, mpsc::Receiver<Append>),
    commands: (Appends, mpsc::Receiver<Append>),
    takeovers: (Queue, mpsc::Receiver<Queued>),
    acks: (acks::AckQueue, mpsc::Receiver<acks::CommandTag>),
    retained: (retained::StoreQueue, mpsc::Receiver<Append>),
    /// What this node's router holds retained (by digest).
    held: Arc<retained::Held>,
    persistent: Arc<Persistent>,
    paced: Arc<pacing::Acks>,
    holds: Arc<Mutex<holds::Holds>>,
    resumes: (mpsc::Sender<Resume>, mpsc::Receiver<Resume>),
    /// This run of the node (`liveness`), and its will record changes.
    incarnation: Arc<str>,
    will_ops: (mpsc::Sender<wills::Op>, mpsc::Receiver<wills::Op>),
    /// The local delivery and metrics, once the broker built them.
    built: Arc<OnceLock<(Arc<LocalDelivery>, Arc<Metrics>)>>,
}

impl Cluster {
    /// Connects to `redis_url` as node `id` (see [`node_id`]).
    pub async fn connect(
        redis_url: &str,
        id: String,
        args: &ClusterArgs,
    ) -> Result<Cluster, ClusterError> {
        let redis = Redis::connect(redis_url, args.wait_replicas).await?;
        Ok(Cluster {
            id: id.into(),
            redis,
            interest: Arc::default(),
            groups: Arc::default(),
            declared: Arc::default(),
            replies: mpsc::channel(replies::APPEND_QUEUE),
            commands: mpsc::channel(commands::APPEND_QUEUE),
            takeovers: mpsc::channel(replies::APPEND_QUEUE),
            acks: mpsc::channel(acks::ACK_QUEUE),
            retained: mpsc::channel(retained::STORE_QUEUE),
            held: Arc::default(),
            persistent: Arc::default(),
            paced: Arc::default(),
            holds: Arc::default(),
            resumes: mpsc::channel(listener::RESUME_QUEUE),
            incarnation: liveness::new_incarnation().into(),
            will_ops: mpsc::channel(wills::QUEUE),
            built: Arc::default(),
        })
    }

    /// This node's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The wrapper `broker::Broker::start_with` builds the delivery with.
    pub fn wrap(&self) -> broker::WrapDelivery {
        let (id, interest, groups, declared, built) = (
            self.id.clone(),
            self.interest.clone(),
            self.groups.clone(),
            self.declared.clone(),
            self.built.clone(),
        );
        let (replies, commands, takeovers, acks) = (
            self.replies.0.clone(),
            self.commands.0.clone(),
            self.takeovers.0.clone(),
            self.acks.0.clone(),
        );
        let (retained, held) = (self.retained.0.clone(), self.held.clone());
        let (persistent, resumes, redis) = (
            self.persistent.clone(),
            self.resumes.0.clone(),
            self.redis.clone(),
        );
        let (incarnation, will_ops) = (self.incarnation.clone(), self.will_ops.0.clone());
        let (paced, holds) = (self.paced.clone(), self.holds.clone());
        Box::new(move |local, metrics| {
            let local = Arc::new(local);
            let _ = built.set((local.clone(), metrics.clone()));
            let wills = wills::Copies::new(id.clone(), incarnation, will_ops, metrics.clone());
            Box::new(ClusterDelivery {
                wills,
                local,
                id,
                interest,
                groups,
                declared,
                replies,
                commands,
                takeovers,
                acks,
                retained,
                retained_held: held,
                metrics: metrics.clone(),
                held: Mutex::default(),
                persistent,
                paced,
                holds,
                resumes,
                redis,
            })
        })
    }

    /// Starts the node's tasks on the running broker (after
    /// `Broker::start_with(.., self.wrap())`); they end when `shutdown` is
    /// cancelled. `None` if the broker was not built with [`Cluster::wrap`].
    pub fn run(self, injector: Injector, shutdown: CancellationToken) -> Option<Running> {
        let (local, metrics) = self.built.get()?.clone();
        let node = Arc::new(Node {
            id: self.id,
            redis: self.redis,
            shutdown,
            local,
            metrics,
            injector,
            links: AtomicU64::new(0),
            paced: self.paced,
            persistent: self.persistent,
            holds: self.holds,
        });
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(replies::append(node.clone(), self.replies.1));
        tasks.spawn(commands::append(node.clone(), self.commands.1));
        tasks.spawn(replies::announce_takeovers(node.clone(), self.takeovers.1));
        tasks.spawn(acks::acknowledge(node.clone(), self.acks.1));
        tasks.spawn(retained::store(node.clone(), self.retained.1));
        tasks.spawn(retained::follow(node.clone(), self.held));
        tasks.spawn(listener::listen(
            node.clone(),
            self.interest,
            self.resumes.1,
        ));
        tasks.spawn(sessions::write(node.clone(), self.resumes.0.clone()));
        tasks.spawn(declarations::share(
            node.clone(),
            self.groups.clone(),
            self.declared,
        ));
        tasks.spawn(wills::keep(
            node.clone(),
            self.incarnation.clone(),
            self.will_ops.1,
        ));
        tasks.spawn(wills::sweep(node.clone(), self.incarnation));
        tasks.spawn(commands::supervise(node, self.groups));
        tasks.close();
        Some(Running(tasks))
    }
}

/// The node's cross-node tasks.
pub struct Running(tokio_util::task::TaskTracker);

impl Running {
    /// Waits for the tasks to end (after shutdown).
    pub async fn wait(self) {
        self.0.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        // (BROKER_NODE_ID) -> accepted
        let long = "n".repeat(MAX_NODE_ID_BYTES + 1);
        let table = [
            (Some("node-a"), true),
            (Some("eu-1.broker_3"), true),
            (Some(""), false),
            (Some("a b"), false),
            (Some("a:b"), false),
            (Some(long.as_str()), false),
            (None, true),
        ];
        for (configured, ok) in table {
            assert_eq!(node_id(configured).is_ok(), ok, "{configured:?}");
        }
        assert_ne!(
            node_id(None).unwrap(),
            node_id(None).unwrap(),
            "unique per call"
        );
    }

    #[test]
    fn wait_replicas_is_0_to_5() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            cluster: ClusterArgs,
        }
        use clap::Parser;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("broker").chain(args.iter().copied()))
                .map(|cli| cli.cluster.wait_replicas)
        };
        assert_eq!(parse(&[]).unwrap(), 0);
        assert_eq!(parse(&["--wait-replicas", "1"]).unwrap(), 1);
        assert_eq!(parse(&["--wait-replicas", "5"]).unwrap(), 5);
        let refused = parse(&["--wait-replicas", "6"]).unwrap_err().to_string();
        assert!(refused.contains("0..=5"), "{refused}");
        assert!(parse(&["--wait-replicas", "x"]).is_err());
    }
}
