//! Owns the acknowledgement of commands once a handler acknowledged them:
//! the delivery tag (`broker::delivery::DELIVERY_TAG`) a command carries
//! into the local router, naming its stream, consumer group and entry
//! ([`CommandTag`], pure and table-tested), and the task that sends the
//! `XACK`s the handlers' sessions reported (`Delivery::delivered`): queued
//! without waiting (bounded), batched per stream and group, one pipeline
//! per master.
//!
//! What no handler acknowledges (it died holding it, the router dropped
//! it, an acknowledgement was lost here) stays pending in its group and is
//! taken over by a reader of the group once idle (`commands.rs`, `XAUTOCLAIM`),
//! at most [`MAX_DELIVERIES`] times.

use crate::entry::StreamId;
use crate::redis_conn::Replication;
use crate::Node;
use broker::delivery::DELIVERY_TAG_MAX;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// Acknowledgements waiting to be sent; beyond it they are dropped (the
/// command is delivered again after its idle time: a duplicate).
pub const ACK_QUEUE: usize = 16 * 1024;
/// Acknowledgements sent in one batch.
const BATCH: usize = 1024;
/// How long a batch gathers acknowledgements after its first: one `XACK`
/// per stream and group then carries what arrived meanwhile (at 2,000
/// commands/s, about 5 per stream instead of 1). Nothing waits for an
/// `XACK`: it only keeps the command from being delivered again once idle
/// (`commands.rs`, after 15 s).
const GATHER: Duration = Duration::from_millis(10);
/// Deliveries of one entry (its first read and each take-over) before it
/// is acknowledged and dropped unanswered: a command that ends every
/// handler that takes it cannot go round for ever.
pub const MAX_DELIVERIES: u64 = 5;

/// The first bytes of a command's tag (the version of its layout). Other
/// tags (the device plane's) start otherwise.
const PREFIX: &str = "c1 ";

/// Which entry of which consumer group a command injected here is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTag {
    /// Its stream (`c:{<topic>:<p>}`).
    pub key: String,
    /// The consumer group that read it (`s:<group>` or `n:<node>`).
    pub group: String,
    pub id: StreamId,
}

impl CommandTag {
    /// Its text: `c1 <id> <length of group> <group><key>` (a group or a
    /// topic may hold spaces: the length says where the group ends).
    /// `None` when longer than the session keeps
    /// (`DELIVERY_TAG_MAX`, a very long topic or group): such a command is
    /// acknowledged once the router took it, as before tags.
    pub fn encode(&self) -> Option<String> {
        let tag = format!(
            "{PREFIX}{} {} {}{}",
            self.id,
            self.group.len(),
            self.group,
            self.key
        );
        (tag.len() <= DELIVERY_TAG_MAX).then_some(tag)
    }

    /// Reads back what [`CommandTag::encode`] wrote; `None` for any other
    /// text.
    pub fn parse(tag: &str) -> Option<CommandTag> {
        let rest = tag.strip_prefix(PREFIX)?;
        let (id, rest) = rest.split_once(' ')?;
        let (group_len, rest) = rest.split_once(' ')?;
        let group_len: usize = group_len.parse().ok()?;
        let group = rest.get(..group_len)?;
        let key = rest.get(group_len..)?;
        if group.is_empty() || key.is_empty() {
            return None;
        }
        Some(CommandTag {
            key: key.to_owned(),
            group: group.to_owned(),
            id: StreamId::parse(id)?,
        })
    }
}

/// Where the handlers' acknowledgements wait for [`acknowledge`].
pub type AckQueue = mpsc::Sender<CommandTag>;

/// Sends the queued acknowledgements, one `XACK` per stream and group per
/// batch (gathered for up to [`GATHER`]; pipelined, one pipeline per
/// master), until the queue closes or the node shuts down. A failed batch is logged and counted: those
/// commands are delivered again once idle.
pub async fn acknowledge(node: Arc<Node>, mut queue: mpsc::Receiver<CommandTag>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        let until = tokio::time::Instant::now() + GATHER;
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                _ = node.shutdown.cancelled() => break,
                () = tokio::time::sleep_until(until) => break,
                n = queue.recv_many(&mut batch, room) => if n == 0 { break },
            }
        }
        let grouped = by_stream(&batch);
        let pipe = |group: &[&((String, String), Vec<String>)], _full: bool| {
            let mut pipe = redis::pipe();
            for ((key, group), ids) in group {
                pipe.cmd("XACK").arg(key).arg(group).arg(ids).ignore();
            }
            pipe
        };
        let sent = node
            .redis
            .send_grouped(&grouped, |((key, _), _)| key, pipe, Replication::Unawaited)
            .await;
        for (streams, sent) in sent {
            if let Err(e) = sent {
                node.metrics().cluster_dropped("ack_failed", streams);
                warn!(error = %e, streams, "handlers' acknowledgements not sent to Redis: those commands are delivered again once idle");
            }
        }
        node.metrics()
            .cluster_moved("command_acked", batch.len() as u64);
        batch.clear();
    }
}

/// The ids of `batch` by (stream, group), each once.
fn by_stream(batch: &[CommandTag]) -> Vec<((String, String), Vec<String>)> {
    let mut grouped: HashMap<(String, String), Vec<String>> = HashMap::new();
    for tag in batch {
        let ids = grouped
            .entry((tag.key.clone(), tag.group.clone()))
            .or_default();
        let id = tag.id.to_string();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    grouped.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: &str, group: &str, ms: u64, seq: u64) -> CommandTag {
        CommandTag {
            key: key.to_owned(),
            group: group.to_owned(),
            id: StreamId { ms, seq },
        }
    }

    #[test]
    fn tags_read_back_as_written() {
        let table = [
            tag("c:{sync:0}", "s:sync", 1_700_000_000_000, 0),
            tag("c:{get_contact_list:3}", "n:node-a", 1, 42),
            // A group or a topic with spaces, digits, braces.
            tag("c:{a b 7:2}", "s:g 1 2", 5, 5),
            tag("c:{x:0}", "s:c1 9-9 3 ", 0, 0),
            tag("c:{ü:1}", "s:ü", 9, 1),
        ];
        for original in table {
            let text = original.encode().expect("fits");
            assert!(text.starts_with("c1 "), "{text}");
            assert_eq!(CommandTag::parse(&text), Some(original), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_command_tag() {
        let table = [
            "",
            "c1 ",
            "c1 1-0",
            "c1 1-0 3",
            "c1 1-0 3 s:g",     // no key after the group
            "c1 1-0 0 c:{x:0}", // empty group
            "c1 1-0 99 s:gc:{x:0}",
            "c1 x-0 3 s:gc:{x:0}",
            "c1 1-0 -3 s:gc:{x:0}",
            "c2 1-0 3 s:gc:{x:0}",
            "r:{42}|5-0",
            // A length that cuts a character in two.
            "c1 1-0 3 s:ü c:{x:0}",
        ];
        for text in table {
            assert_eq!(CommandTag::parse(text), None, "{text:?}");
        }
        assert!(CommandTag::parse("c1 1-0 3 s:gc:{x:0}").is_some());
    }

    #[test]
    fn a_tag_past_the_sessions_cap_is_not_made() {
        let long_topic = "t".repeat(DELIVERY_TAG_MAX);
        assert_eq!(tag(&long_topic, "s:g", 1, 0).encode(), None);
        let fits = "t".repeat(DELIVERY_TAG_MAX - 40);
        let text = tag(&fits, "s:g", 1, 0).encode().expect("fits");
        assert!(text.len() <= DELIVERY_TAG_MAX);
    }

    #[test]
    fn acknowledgements_are_grouped_per_stream_and_group_once_each() {
        let batch = [
            tag("c:{a:0}", "s:g", 1, 0),
            tag("c:{a:0}", "s:g", 2, 0),
            tag("c:{a:0}", "s:g", 1, 0),
            tag("c:{a:0}", "s:h", 1, 0),
            tag("c:{a:1}", "s:g", 3, 0),
        ];
        let mut grouped = by_stream(&batch);
        grouped.sort();
        assert_eq!(
            grouped,
            vec![
                (
                    ("c:{a:0}".to_owned(), "s:g".to_owned()),
                    vec!["1-0".to_owned(), "2-0".to_owned()]
                ),
                (
                    ("c:{a:0}".to_owned(), "s:h".to_owned()),
                    vec!["1-0".to_owned()]
                ),
                (
                    ("c:{a:1}".to_owned(), "s:g".to_owned()),
                    vec!["3-0".to_owned()]
                ),
            ]
        );
    }
}
