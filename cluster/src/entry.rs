//! Owns what the nodes write to Redis and read back, as pure functions: the
//! keys and channels (hash-tagged so a user's stream and channel, or one
//! command partition, live in one slot), the partition of a command, the
//! bytes of one entry (the publish as the gate decided and stamped it, and
//! the node that received it), the wake-up message, and stream ids with
//! their order (the cursor of a user's replies).

use broker::codec::{Codec, Version};
use broker::router::protocol::{Packet, Publish, PublishProperties, QoS};
use bytes::{BufMut, Bytes, BytesMut};
use protocol::topics::USER_ID_PROPERTY;
use std::cmp::Ordering;

/// How many streams each command topic is spread over. Every node of a
/// deployment must use the same number (it is part of the key).
pub const PARTITIONS: u32 = 4;

/// Largest entry read back (an MQTT packet within the broker's own cap,
/// with room for the header); larger ones are refused as undecodable.
const MAX_ENTRY_BYTES: usize = 16 * 1024 * 1024;

/// Layout version of an entry: the first byte, so a later layout can be
/// read beside this one during a rolling upgrade. Layout 2 added the flags
/// byte; layout 1 (no flags) is still read.
const LAYOUT: u8 = 2;
const LAYOUT_WITHOUT_FLAGS: u8 = 1;

/// Flag: the origin's router did not get the publish when the gate
/// received it ([`Entry::left_to_stream`]).
const FLAG_LEFT_TO_STREAM: u8 = 0b1;

/// The stream of `uid`'s replies, and the channel that announces them
/// (keys and channels are separate namespaces; one slot for both).
pub fn reply_key(uid: &str) -> String {
    format!("r:{{{uid}}}")
}

/// The user id a reply channel names (`r:{<uid>}`), if it is one.
pub fn uid_of_channel(channel: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(channel).ok()?;
    text.strip_prefix("r:{")?.strip_suffix('}')
}

/// The stream of one partition of a command topic.
pub fn command_key(topic: &str, partition: u32) -> String {
    format!("c:{{{topic}:{partition}}}")
}

/// The partition of a command: a hash of the user it comes from (its
/// stamped `user_id`), so one user's commands stay in one stream, in
/// order; partition 0 for a publish without one (a handler's).
pub fn partition(properties: &Option<PublishProperties>) -> u32 {
    let uid = properties.as_ref().and_then(|p| {
        p.user_properties
            .iter()
            .find(|(name, _)| name == USER_ID_PROPERTY)
            .map(|(_, value)| value.as_str())
    });
    match uid {
        // FNV-1a: stable across processes and versions (std's hasher is not).
        Some(uid) => {
            let hash = uid.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
                (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
            });
            hash % PARTITIONS
        }
        None => 0,
    }
}

/// The consumer group a handler filter reads a command topic with:
/// `$share/<group>/<topic>` reads as group `s:<group>` (one delivery per
/// group across all nodes); a plain subscription as this node's own group
/// `n:<node>` (every node with one gets every command, as every plain
/// subscriber does). `None` for a filter that names no literal topic.
pub fn consumer_group(filter: &str, node: &str) -> Option<(String, String)> {
    let (group, topic) = match protocol::topics::split_shared(filter) {
        Some((group, topic)) => (format!("s:{group}"), topic),
        None => (format!("n:{node}"), filter),
    };
    if topic.is_empty() || protocol::topics::is_wildcard(topic) {
        return None;
    }
    Some((topic.to_owned(), group))
}

/// Why bytes read back are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("empty or unknown layout")]
    Layout,
    #[error("truncated")]
    Truncated,
    #[error("not a publish: {0}")]
    Packet(String),
}

/// One publish on its way between nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The node whose gate received it (it delivered it locally itself).
    pub origin: String,
    /// The origin's gate left the router's delivery of this reply to the
    /// stream (a persistent session of its user was held there), so the
    /// origin delivers it from the stream like any other node. Recorded
    /// with the entry, not decided again when it comes back: the session
    /// may have come or gone in between, and then a reply would reach the
    /// router twice or never (`replies::deliver`).
    pub left_to_stream: bool,
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
}

impl Entry {
    /// Its bytes: layout, flags, origin (length-prefixed), then the
    /// publish as an MQTT 5 packet (every property kept, the identity
    /// stamps included).
    pub fn encode(
        origin: &str,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Result<Bytes, EntryError> {
        Self::encode_with(origin, false, publish, properties)
    }

    /// [`Entry::encode`], saying whether the origin's gate left the
    /// router's delivery of this reply to the stream
    /// ([`Entry::left_to_stream`]).
    pub fn encode_with(
        origin: &str,
        left_to_stream: bool,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Result<Bytes, EntryError> {
        let flags = if left_to_stream {
            FLAG_LEFT_TO_STREAM
        } else {
            0
        };
        let origin_len = u8::try_from(origin.len()).map_err(|_| EntryError::Layout)?;
        let qos = publish.qos();
        // A packet id is only a wire detail of one connection: any non-zero.
        let pkid = u16::from(qos != QoS::AtMostOnce);
        let packet = Publish::with_qos(
            publish.topic.clone(),
            publish.payload.clone(),
            publish.retain,
            qos,
            pkid,
        );
        let mut out = BytesMut::with_capacity(
            3 + origin.len() + publish.topic.len() + publish.payload.len() + 16,
        );
        out.put_u8(LAYOUT);
        out.put_u8(flags);
        out.put_u8(origin_len);
        out.put_slice(origin.as_bytes());
        Codec::new(Version::V5, MAX_ENTRY_BYTES)
            .encode(Packet::Publish(packet, properties.clone()), &mut out)
            .map_err(|e| EntryError::Packet(e.to_string()))?;
        Ok(out.freeze())
    }

    /// Reads back what [`Entry::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        let (&layout, rest) = bytes.split_first().ok_or(EntryError::Layout)?;
        let (flags, rest) = match layout {
            LAYOUT => {
                let (&flags, rest) = rest.split_first().ok_or(EntryError::Truncated)?;
                (flags, rest)
            }
            LAYOUT_WITHOUT_FLAGS => (0, rest),
            _ => return Err(EntryError::Layout),
        };
        let (&origin_len, rest) = rest.split_first().ok_or(EntryError::Truncated)?;
        let origin_len = usize::from(origin_len);
        if rest.len() < origin_len {
            return Err(EntryError::Truncated);
        }
        let (origin, packet) = rest.split_at(origin_len);
        let origin = std::str::from_utf8(origin)
            .map_err(|_| EntryError::Layout)?
            .to_owned();
        let mut buffer = BytesMut::from(packet);
        match Codec::new(Version::V5, MAX_ENTRY_BYTES).decode(&mut buffer) {
            Ok(Some(Packet::Publish(publish, properties))) if buffer.is_empty() => Ok(Entry {
                origin,
                left_to_stream: flags & FLAG_LEFT_TO_STREAM != 0,
                publish,
                properties,
            }),
            Ok(Some(_)) => Err(EntryError::Packet("another packet".into())),
            Ok(None) => Err(EntryError::Truncated),
            Err(e) => Err(EntryError::Packet(e.to_string())),
        }
    }
}

/// A wake-up message: the entry's stream id, a space, the entry.
pub fn split_wakeup(message: &[u8]) -> Option<(StreamId, &[u8])> {
    let space = message.iter().position(|&b| b == b' ')?;
    let (id, rest) = message.split_at(space);
    let id = StreamId::parse(std::str::from_utf8(id).ok()?)?;
    Some((id, rest.get(1..)?))
}

/// A stream entry id, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(text: &str) -> Option<StreamId> {
        let (ms, seq) = text.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// `(<ms>-<seq>`: XRANGE's exclusive start, after this id.
    pub fn after(self) -> String {
        format!("({}-{}", self.ms, self.seq)
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// What a node knows of one user's stream: the last entry it delivered (or
/// skipped as its own), so that an entry seen twice (a wake-up and a
/// replay) is delivered once, and a replay starts after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor(Option<StreamId>);

/// What to do with an entry given the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// New: deliver it (the cursor moved to it).
    New,
    /// At or before the cursor: already delivered.
    Again,
}

impl Cursor {
    /// Where a replay starts: after the last entry seen; `None` when this
    /// node has seen nothing of the stream yet (a fresh session is owed
    /// nothing from before it subscribed).
    pub fn replay_from(self) -> Option<String> {
        self.0.map(StreamId::after)
    }

    /// The last entry seen.
    pub fn last(self) -> Option<StreamId> {
        self.0
    }

    /// Records `id` if it is past the cursor.
    pub fn see(&mut self, id: StreamId) -> Seen {
        match self.0.map(|last| id.cmp(&last)) {
            Some(Ordering::Less | Ordering::Equal) => Seen::Again,
            _ => {
                self.0 = Some(id);
                Seen::New
            }
        }
    }
}

/// The entries of a stream reply (`XRANGE`, `XREADGROUP`, `XAUTOCLAIM`):
/// each id with its `e` field, `None` for an entry trimmed since it was
/// read (a pending entry whose data is gone).
pub(crate) fn stream_entries(value: &redis::Value) -> Vec<(StreamId, Option<Vec<u8>>)> {
    let redis::Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let redis::Value::Array(parts) = entry else {
                return None;
            };
            let id = match parts.first()? {
                redis::Value::BulkString(id) => StreamId::parse(std::str::from_utf8(id).ok()?)?,
                _ => return None,
            };
            let data = match parts.get(1) {
                Some(redis::Value::Array(fields)) => fields
                    .chunks(2)
                    .find(|pair| matches!(pair.first(), Some(redis::Value::BulkString(n)) if n == b"e"))
                    .and_then(|pair| match pair.get(1) {
                        Some(redis::Value::BulkString(bytes)) => Some(bytes.clone()),
                        _ => None,
                    }),
                _ => None,
            };
            Some((id, data))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(user_id: Option<&str>) -> Option<PublishProperties> {
        user_id.map(|uid| PublishProperties {
            user_properties: vec![(USER_ID_PROPERTY.to_owned(), uid.to_owned())],
            ..Default::default()
        })
    }

    #[test]
    fn keys_share_a_slot_per_user_and_per_partition() {
        // (what, key) -> the hash tag Redis Cluster hashes
        let table = [
            (reply_key("42"), "42"),
            (reply_key("alice"), "alice"),
            (command_key("sync", 3), "sync:3"),
            (command_key("jobs/resize", 0), "jobs/resize:0"),
        ];
        for (key, tag) in table {
            let start = key.find('{').unwrap() + 1;
            let end = start + key[start..].find('}').unwrap();
            assert_eq!(&key[start..end], tag, "{key}");
        }
        assert_eq!(uid_of_channel(b"r:{42}"), Some("42"));
        assert_eq!(uid_of_channel(b"c:{sync:1}"), None);
        assert_eq!(uid_of_channel(b"r:{42"), None);
    }

    #[test]
    fn one_user_one_partition_and_users_spread() {
        // (user_id stamp) -> partition, stable across runs and versions
        let table = [
            (None, 0),
            (Some("1"), 1),
            (Some("2"), 2),
            (Some("alice"), 3),
        ];
        for (uid, expected) in table {
            let got = partition(&props(uid));
            assert!(got < PARTITIONS);
            assert_eq!(got, partition(&props(uid)), "{uid:?} is stable");
            if uid.is_none() {
                assert_eq!(got, expected, "a handler's publish");
            }
        }
        let mut used = [0u32; PARTITIONS as usize];
        for uid in 0..1000 {
            let p = partition(&props(Some(&uid.to_string())));
            used[p as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 150), "spread: {used:?}");
    }

    #[test]
    fn consumer_groups_of_handler_filters() {
        // (filter) -> (topic, group) for node "n1"
        let table = [
            ("$share/sync/sync", Some(("sync", "s:sync"))),
            ("sync", Some(("sync", "n:n1"))),
            ("$share/g/jobs/resize", Some(("jobs/resize", "s:g"))),
            ("jobs/+", None),
            ("$share/g/#", None),
        ];
        for (filter, expected) in table {
            let got = consumer_group(filter, "n1");
            let got = got.as_ref().map(|(t, g)| (t.as_str(), g.as_str()));
            assert_eq!(got, expected, "{filter}");
        }
    }

    #[test]
    fn entries_keep_everything_the_gate_decided() {
        let mut stamped = props(Some("42")).unwrap();
        stamped
            .user_properties
            .push(("client_id".into(), "phone".into()));
        stamped.correlation_data = Some(Bytes::from_static(b"c"));
        stamped.message_expiry_interval = Some(30);
        let table = [
            (QoS::AtMostOnce, false, None),
            (QoS::AtLeastOnce, false, Some(stamped.clone())),
            (QoS::ExactlyOnce, true, Some(stamped)),
        ];
        for (qos, retain, properties) in table {
            let publish = Publish::with_qos(
                Bytes::from_static(b"42_sync"),
                Bytes::from_static(b"{\"x\":1}"),
                retain,
                qos,
                if qos == QoS::AtMostOnce { 0 } else { 77 },
            );
            let bytes = Entry::encode("node-a", &publish, &properties).unwrap();
            let entry = Entry::decode(&bytes).unwrap();
            assert_eq!(entry.origin, "node-a");
            assert_eq!(entry.publish.topic, publish.topic);
            assert_eq!(entry.publish.payload, publish.payload);
            assert_eq!((entry.publish.qos(), entry.publish.retain), (qos, retain));
            assert_eq!(entry.properties, properties, "{qos:?}");
        }
    }

    #[test]
    fn whether_the_origin_left_a_reply_to_the_stream_travels_with_it() {
        let publish = Publish::with_qos(
            Bytes::from_static(b"42_sync"),
            Bytes::from_static(b"p"),
            false,
            QoS::ExactlyOnce,
            9,
        );
        let left = Entry::encode_with("node-a", true, &publish, &None).unwrap();
        let routed = Entry::encode("node-a", &publish, &None).unwrap();
        assert!(Entry::decode(&left).unwrap().left_to_stream);
        assert!(!Entry::decode(&routed).unwrap().left_to_stream);
        // Layout 1 (before the flags byte) still reads, as routed.
        let mut layout1 = vec![1];
        layout1.extend_from_slice(&routed[2..]);
        let old = Entry::decode(&layout1).unwrap();
        assert_eq!((old.origin.as_str(), old.left_to_stream), ("node-a", false));
        assert_eq!(old.publish.payload, publish.payload);
    }

    #[test]
    fn damaged_entries_are_refused() {
        let publish = Publish::with_qos(
            Bytes::from_static(b"t"),
            Bytes::from_static(b"p"),
            false,
            QoS::AtMostOnce,
            0,
        );
        let good = Entry::encode("n", &publish, &None).unwrap();
        let table: [(&[u8], EntryError); 6] = [
            (b"", EntryError::Layout),
            (b"\x03\x00\x01n", EntryError::Layout),
            (b"\x02", EntryError::Truncated),
            (b"\x02\x00\x09n", EntryError::Truncated),
            (b"\x01\x09n", EntryError::Truncated),
            (&good[..good.len() - 1], EntryError::Truncated),
        ];
        for (bytes, expected) in table {
            assert_eq!(Entry::decode(bytes), Err(expected), "{bytes:?}");
        }
        let mut extra = good.to_vec();
        extra.push(0);
        assert!(Entry::decode(&extra).is_err(), "trailing bytes");
    }

    #[test]
    fn wakeups_and_stream_ids() {
        let (id, rest) = split_wakeup(b"1700000000000-3 \x01entry").unwrap();
        assert_eq!(
            id,
            StreamId {
                ms: 1_700_000_000_000,
                seq: 3
            }
        );
        assert_eq!(rest, b"\x01entry");
        assert_eq!(split_wakeup(b"nospace"), None);
        assert_eq!(split_wakeup(b"12 x"), None, "an id has a sequence");
        assert_eq!(id.after(), "(1700000000000-3");
        assert!(StreamId::parse("5-10").unwrap() > StreamId::parse("5-9").unwrap());
        assert!(StreamId::parse("6-0").unwrap() > StreamId::parse("5-99").unwrap());
    }

    #[test]
    fn the_cursor_delivers_each_entry_once() {
        let id = |text| StreamId::parse(text).unwrap();
        let mut cursor = Cursor::default();
        assert_eq!(
            cursor.replay_from(),
            None,
            "a fresh session is owed nothing"
        );
        // (entry seen, by wake-up or replay, in arrival order) -> verdict
        let table = [
            ("10-0", Seen::New),
            ("10-0", Seen::Again),
            ("10-1", Seen::New),
            ("9-5", Seen::Again),
            ("12-0", Seen::New),
            ("11-0", Seen::Again),
        ];
        for (text, verdict) in table {
            assert_eq!(cursor.see(id(text)), verdict, "{text}");
        }
        assert_eq!(cursor.replay_from().as_deref(), Some("(12-0"));
    }

    #[test]
    fn stream_entries_with_and_without_data() {
        use redis::Value::{Array, BulkString, Nil};
        let reply = Array(vec![
            Array(vec![
                BulkString(b"1-0".to_vec()),
                Array(vec![BulkString(b"e".to_vec()), BulkString(b"x".to_vec())]),
            ]),
            Array(vec![BulkString(b"2-0".to_vec()), Nil]),
            Array(vec![BulkString(b"bad".to_vec()), Nil]),
        ]);
        let got = stream_entries(&reply);
        assert_eq!(
            got,
            vec![
                (StreamId { ms: 1, seq: 0 }, Some(b"x".to_vec())),
                (StreamId { ms: 2, seq: 0 }, None),
            ]
        );
        assert!(stream_entries(&Nil).is_empty());
    }
}
