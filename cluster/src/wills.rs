//! Owns the wills of devices whose node died. Each device session with a
//! will has its record in Redis (`will_record`), written when the session
//! opens and when its will starts waiting for its delay, removed when this
//! node publishes or drops it; all of this queued by the delivery seam
//! ([`Copies`]) and applied in order by one task ([`keep`]), never awaited
//! by a session. A sweeper on every node ([`sweep`]) finds the incarnations
//! whose liveness lapsed (`liveness`), claims each of their records whose
//! will is due with one script (exactly one node gets it), and publishes
//! it through this node's will publisher (revocation checked first, then
//! delivery and the router: `broker::inject::Injector::publish_will`). A
//! node opening a session whose record a dead node armed claims it at
//! once: published for a Clean Start, dropped for a resumed session.

use crate::liveness::{self, liveness_key, member, split_member, NODES_KEY};
use crate::will_record::{self, index_key, record_key, Clock, Owner, Record, Reopen, Sweep};
use crate::Node;
use broker::metrics::Metrics;
use broker::wills::{ReadyWill, WillClock};
use bytes::Bytes;
use protocol::UserId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Record changes waiting to be applied (a full queue drops and counts).
pub const QUEUE: usize = 65_536;
/// When a reconnected session's record, whose owner was alive, is looked
/// at again: by then a dead owner's liveness has lapsed.
const RECHECK_AFTER: Duration = Duration::from_secs(liveness::TTL.as_secs() + 1);
/// Most record changes applied at once (each session's in order).
const BATCH: usize = 256;
/// How often every node looks for dead incarnations' wills that are due.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Most incarnations read from `nodes` per sweep.
const MAX_NODES: isize = 1_000;
/// Session ids read from a dead node's index per round trip.
const SCAN_BATCH: usize = 100;
/// How long a clean shutdown may spend removing this node's records.
const LEAVE_WITHIN: Duration = Duration::from_secs(4);

/// Deletes `KEYS[1]` and returns its value if the value starts with
/// `ARGV[1]`: one node claims a record (or ends its own arming) and no
/// other can get it.
const CLAIM_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return v
end
return false
";

/// Runs [`CLAIM_SCRIPT`] on `key` with `prefix`.
pub(crate) async fn claim(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    prefix: &str,
) -> redis::RedisResult<Option<Vec<u8>>> {
    redis::Script::new(CLAIM_SCRIPT)
        .key(key)
        .arg(prefix)
        .invoke_async(conn)
        .await
}

/// One change of this node's records, in the order the sessions made them.
pub(crate) enum Op {
    Armed { id: String, record: Bytes },
    Done { id: String, owner_line: String },
    Reconnected { id: String, clean_start: bool },
}

impl Op {
    fn id(&self) -> &str {
        match self {
            Op::Armed { id, .. } | Op::Done { id, .. } | Op::Reconnected { id, .. } => id,
        }
    }
}

/// The delivery seam's side: queues record changes for [`keep`].
pub(crate) struct Copies {
    node: Arc<str>,
    incarnation: Arc<str>,
    queue: mpsc::Sender<Op>,
    metrics: Arc<Metrics>,
}

impl Copies {
    pub(crate) fn new(
        node: Arc<str>,
        incarnation: Arc<str>,
        queue: mpsc::Sender<Op>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Copies {
            node,
            incarnation,
            queue,
            metrics,
        }
    }

    fn owner(&self, connection: u64) -> Owner {
        Owner {
            node: self.node.to_string(),
            incarnation: self.incarnation.to_string(),
            connection,
        }
    }

    fn send(&self, op: Op) {
        if self.queue.try_send(op).is_err() {
            self.metrics.cluster_dropped("queue_full", 1);
        }
    }

    pub(crate) fn armed(&self, id: &str, connection: u64, will: &ReadyWill, clock: WillClock) {
        let (Some(_), Some(device)) = (record_key(id), will.owner.as_ref()) else {
            return;
        };
        let clock = match clock {
            WillClock::AfterEnd(delay) => Clock::AfterEnd(delay),
            WillClock::DueIn(after) => Clock::DueAt(
                liveness::now_ms()
                    .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
            ),
        };
        let record = Record {
            owner: self.owner(connection),
            uid: device.uid().as_str().to_owned(),
            issued_at: device.issued_at(),
            clock,
            publish: will.publish.clone(),
            properties: will.properties.clone(),
        };
        match record.encode() {
            Ok(record) => self.send(Op::Armed {
                id: id.to_owned(),
                record,
            }),
            Err(_) => self.metrics.cluster_dropped("unencodable", 1),
        }
    }

    pub(crate) fn done(&self, id: &str, connection: u64) {
        if record_key(id).is_some() {
            self.send(Op::Done {
                id: id.to_owned(),
                owner_line: self.owner(connection).line(),
            });
        }
    }

    pub(crate) fn reconnected(&self, id: &str, clean_start: bool) {
        if record_key(id).is_some() {
            self.send(Op::Reconnected {
                id: id.to_owned(),
                clean_start,
            });
        }
    }
}

/// Applies this node's record changes in order until shutdown; then
/// removes every record this incarnation armed (a clean shutdown drops the
/// wills of the sessions it ends, as one node does) and its liveness.
pub(crate) async fn keep(node: Arc<Node>, incarnation: Arc<str>, mut ops: mpsc::Receiver<Op>) {
    // Listed in `nodes` before any record of this incarnation is written:
    // a sweeper finds the records of the incarnations it lists.
    if let Err(e) = liveness::refresh(&node, &incarnation).await {
        warn!(error = %e, "node liveness not written to Redis");
    }
    loop {
        let op = tokio::select! {
            biased;
            _ = node.shutdown.cancelled() => break,
            op = ops.recv() => op,
        };
        let Some(op) = op else { break };
        let mut batch = vec![op];
        while batch.len() < BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Each session's changes in order; sessions side by side.
        let runs = by_session(batch).into_iter().map(|run| {
            let (node, incarnation) = (&node, &incarnation);
            async move {
                for op in run {
                    if let Err(e) = apply(node, incarnation, op).await {
                        node.metrics().cluster_dropped("redis_error", 1);
                        warn!(error = %e, "a will record change not applied in Redis");
                    }
                }
            }
        });
        futures::future::join_all(runs).await;
    }
    let left = tokio::time::timeout(LEAVE_WITHIN, leave(&node, &incarnation)).await;
    match left {
        Ok(Ok(removed)) => debug!(removed, "will records of this node removed"),
        Ok(Err(e)) => warn!(error = %e, "will records of this node not removed"),
        Err(_) => warn!("will records of this node not all removed in time"),
    }
}

/// `ops` split by session, each session's in the order they came.
fn by_session(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut runs: Vec<Vec<Op>> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for op in ops {
        match index.get(op.id()) {
            Some(&at) => {
                if let Some(run) = runs.get_mut(at) {
                    run.push(op);
                }
            }
            None => {
                index.insert(op.id().to_owned(), runs.len());
                runs.push(vec![op]);
            }
        }
    }
    runs
}

async fn apply(node: &Arc<Node>, incarnation: &Arc<str>, op: Op) -> redis::RedisResult<()> {
    let mut conn = node.redis.shared();
    match op {
        Op::Armed { id, record } => {
            let Some(key) = record_key(&id) else {
                return Ok(());
            };
            redis::cmd("SET")
                .arg(&key)
                .arg(&record[..])
                .query_async::<()>(&mut conn)
                .await?;
            redis::cmd("SADD")
                .arg(index_key(&node.id))
                .arg(&id)
                .query_async::<()>(&mut conn)
                .await
        }
        Op::Done { id, owner_line } => {
            let Some(key) = record_key(&id) else {
                return Ok(());
            };
            if claim(&mut conn, &key, &owner_line).await?.is_some() {
                redis::cmd("SREM")
                    .arg(index_key(&node.id))
                    .arg(&id)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(())
        }
        Op::Reconnected { id, clean_start } => {
            if reopen(node, incarnation, &id, clean_start).await? {
                recheck(node.clone(), incarnation.clone(), id, clean_start);
            }
            Ok(())
        }
    }
}

/// Looks again at session `id`'s record once [`RECHECK_AFTER`] has passed:
/// its owner, alive when the session opened here, may have been dead
/// already with its liveness not yet lapsed (a device reconnects faster
/// than the TTL); a live owner has ended or released the session by then.
fn recheck(node: Arc<Node>, incarnation: Arc<str>, id: String, clean_start: bool) {
    tokio::spawn(async move {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tokio::time::sleep(RECHECK_AFTER) => {}
        }
        if let Err(e) = reopen(&node, &incarnation, &id, clean_start).await {
            warn!(error = %e, "a will record of a reconnected session not checked again");
        }
    });
}

/// A connection of session `id` opens here: a record a dead incarnation
/// armed for it is claimed, then published or dropped. True when the
/// record's owner is another node that is still alive.
async fn reopen(
    node: &Node,
    incarnation: &str,
    id: &str,
    clean_start: bool,
) -> redis::RedisResult<bool> {
    let Some(key) = record_key(id) else {
        return Ok(false);
    };
    let mut conn = node.redis.shared();
    let found: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
    let Some(owner) = found.and_then(|bytes| will_record::owner_of(&bytes).ok()) else {
        return Ok(false);
    };
    let live: Option<String> = redis::cmd("GET")
        .arg(liveness_key(&owner.node))
        .query_async(&mut conn)
        .await?;
    let decision = will_record::reopen(&owner, &node.id, incarnation, live.as_deref(), clean_start);
    let publish = match decision {
        Reopen::Ours => return Ok(false),
        Reopen::OwnerAlive => return Ok(true),
        Reopen::Claim { publish } => publish,
    };
    let Some(record) = claim_record(node, &owner, id, &key).await? else {
        return Ok(false);
    };
    if publish {
        info!(owner = %owner.node, "a clean start on this node ends a session whose node died: its will is published");
        publish_will(node, record);
    } else {
        info!(owner = %owner.node, "a session whose node died resumes here: its will is not published");
    }
    Ok(false)
}

/// Claims the record at `key` armed by `owner`'s incarnation; removes it
/// from that node's index. `None`: another node got it first.
async fn claim_record(
    node: &Node,
    owner: &Owner,
    id: &str,
    key: &str,
) -> redis::RedisResult<Option<Record>> {
    let mut conn = node.redis.shared();
    let prefix = will_record::incarnation_prefix(&owner.node, &owner.incarnation);
    let Some(bytes) = claim(&mut conn, key, &prefix).await? else {
        return Ok(None);
    };
    redis::cmd("SREM")
        .arg(index_key(&owner.node))
        .arg(id)
        .query_async::<()>(&mut conn)
        .await?;
    match Record::decode(&bytes) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            warn!(error = %e, "a claimed will record is unreadable: dropped");
            Ok(None)
        }
    }
}

/// Publishes a claimed will through this node's will publisher (which
/// checks the user's revocation first).
fn publish_will(node: &Node, record: Record) {
    node.metrics().cluster_moved("will_of_dead_node", 1);
    let Ok(uid) = UserId::parse(&record.uid) else {
        warn!("a claimed will names no user: dropped");
        return;
    };
    node.injector()
        .publish_will(record.publish, record.properties, uid, record.issued_at);
}

/// Removes every record this incarnation armed, then its liveness.
async fn leave(node: &Node, incarnation: &str) -> redis::RedisResult<usize> {
    let prefix = will_record::incarnation_prefix(&node.id, incarnation);
    let mut conn = node.redis.shared();
    let index = index_key(&node.id);
    let mut removed = 0;
    for id in members(node, &index).await? {
        let Some(key) = record_key(&id) else { continue };
        if claim(&mut conn, &key, &prefix).await?.is_some() {
            removed += 1;
            redis::cmd("SREM")
                .arg(&index)
                .arg(&id)
                .query_async::<()>(&mut conn)
                .await?;
        }
    }
    liveness::leave(node, incarnation).await?;
    Ok(removed)
}

/// Every member of the set `key` (`SSCAN`, in batches).
async fn members(node: &Node, key: &str) -> redis::RedisResult<Vec<String>> {
    let mut conn = node.redis.shared();
    let mut cursor: u64 = 0;
    let mut all = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .query_async(&mut conn)
            .await?;
        all.extend(batch);
        if next == 0 {
            all.sort_unstable();
            all.dedup();
            return Ok(all);
        }
        cursor = next;
    }
}

/// Keeps this incarnation alive and sweeps dead ones' wills until the node
/// shuts down. The first sweep runs at once: a node restarted under the
/// same name publishes its previous run's wills first.
pub(crate) async fn sweep(node: Arc<Node>, incarnation: Arc<str>) {
    // This run's incarnation first, so the previous run's is seen dead.
    if let Err(e) = liveness::refresh(&node, &incarnation).await {
        warn!(error = %e, "node liveness not written to Redis");
    }
    tokio::spawn(liveness::keep_alive(node.clone(), incarnation.clone()));
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(e) = sweep_once(&node, &incarnation).await {
            warn!(error = %e, "wills of dead nodes not swept this round");
        }
    }
}

/// One sweep: every dead incarnation's due wills, claimed and published.
async fn sweep_once(node: &Node, incarnation: &str) -> redis::RedisResult<()> {
    let mut conn = node.redis.shared();
    let listed: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(NODES_KEY)
        .arg(0)
        .arg(MAX_NODES - 1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let mine = member(&node.id, incarnation);
    for (listed_member, last_alive) in listed {
        if listed_member == mine {
            continue;
        }
        let Some((dead_node, dead_incarnation)) = split_member(&listed_member) else {
            continue;
        };
        let live: Option<String> = redis::cmd("GET")
            .arg(liveness_key(dead_node))
            .query_async(&mut conn)
            .await?;
        if live.as_deref() == Some(dead_incarnation) {
            continue;
        }
        let waiting = sweep_incarnation(
            node,
            dead_node,
            dead_incarnation,
            live.as_deref(),
            last_alive,
        )
        .await?;
        if waiting == 0 {
            // Nothing of it is left: it leaves `nodes`.
            redis::cmd("ZREM")
                .arg(NODES_KEY)
                .arg(&listed_member)
                .query_async::<()>(&mut conn)
                .await?;
            info!(node = dead_node, "a dead node's wills are all handled");
        }
    }
    Ok(())
}

/// Claims and publishes the due wills of one dead incarnation; returns
/// how many of its records still wait for their delay.
async fn sweep_incarnation(
    node: &Node,
    dead_node: &str,
    dead_incarnation: &str,
    live: Option<&str>,
    last_alive: u64,
) -> redis::RedisResult<usize> {
    let index = index_key(dead_node);
    let mut conn = node.redis.shared();
    let mut waiting = 0;
    for id in members(node, &index).await? {
        let Some(key) = record_key(&id) else {
            redis::cmd("SREM")
                .arg(&index)
                .arg(&id)
                .query_async::<()>(&mut conn)
                .await?;
            continue;
        };
        let found: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        let record = found.as_deref().map(Record::decode);
        let record = match record {
            // Gone, or armed since by another node: not this node's index.
            None => None,
            Some(Ok(record)) if record.owner.node != dead_node => None,
            Some(Ok(record)) => Some(record),
            Some(Err(e)) => {
                warn!(error = %e, "an unreadable will record is dropped");
                let prefix = will_record::incarnation_prefix(dead_node, dead_incarnation);
                claim(&mut conn, &key, &prefix).await?;
                None
            }
        };
        let Some(record) = record else {
            redis::cmd("SREM")
                .arg(&index)
                .arg(&id)
                .query_async::<()>(&mut conn)
                .await?;
            continue;
        };
        // Another incarnation of the same node: its own sweep decides.
        if record.owner.incarnation != dead_incarnation {
            continue;
        }
        let now = liveness::now_ms();
        match will_record::sweep(&record.owner, live, Some(last_alive), record.clock, now) {
            Sweep::Leave => {}
            Sweep::Wait(_) => waiting += 1,
            Sweep::Claim => {
                if let Some(record) = claim_record(node, &record.owner, &id, &key).await? {
                    info!(owner = dead_node, uid = %record.uid, "publishing the will of a device whose node died");
                    publish_will(node, record);
                }
            }
        }
    }
    Ok(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: &str, connection: u64) -> Op {
        Op::Done {
            id: id.into(),
            owner_line: format!("n/i/{connection}\n"),
        }
    }

    #[test]
    fn each_sessions_changes_stay_in_order() {
        let ops = vec![
            Op::Reconnected {
                id: "D:1:a".into(),
                clean_start: true,
            },
            done("D:1:b", 1),
            Op::Armed {
                id: "D:1:a".into(),
                record: Bytes::from_static(b"r"),
            },
            done("D:1:a", 2),
            done("D:1:b", 3),
        ];
        let runs: Vec<Vec<String>> = by_session(ops)
            .iter()
            .map(|run| {
                run.iter()
                    .map(|op| match op {
                        Op::Reconnected { id, .. } => format!("reconnected {id}"),
                        Op::Armed { id, .. } => format!("armed {id}"),
                        Op::Done { id, owner_line } => format!("done {id} {}", owner_line.trim()),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            runs,
            vec![
                vec!["reconnected D:1:a", "armed D:1:a", "done D:1:a n/i/2"],
                vec!["done D:1:b n/i/1", "done D:1:b n/i/3"],
            ]
        );
    }
}
