//! Owns the record of a persistent device session in Redis, as pure
//! functions: its key (`p:{uid}:<client>`, in the slot of the user's reply
//! stream), its fields (owner node, Session Expiry, subscriptions with
//! their options and identifiers, cursor), their bytes and bounds, the
//! delivery tag that carries a reply's stream id to the client and back
//! (how acknowledgements move the cursor is `cursor.rs`).

use crate::entry::StreamId;
use broker::delivery::SessionSubscription;
use broker::router::protocol::QoS;
use std::time::Duration;

/// Most subscriptions a record holds (the subscription cap is lower).
pub const MAX_SUBSCRIPTIONS: usize = 4096;
/// Longest filter a record holds (bytes, before escaping).
pub const MAX_FILTER_BYTES: usize = 65_535;
/// While its session is live here, a record outlives its Session Expiry by
/// this lease, refreshed by its node: a node that dies lets it lapse.
pub const LEASE: Duration = Duration::from_secs(30);
/// What a record kept for a client that is away outlives its expiry by
/// (clocks of the node and Redis differ a little).
const AWAY_MARGIN: Duration = Duration::from_secs(5);

/// The record's key of device session `session_id` (`D:<uid>:<client>`,
/// the client id already escaped): `p:{<uid>}:<client>`.
pub fn record_key(session_id: &str) -> Option<String> {
    let (uid, client) = session_id.strip_prefix("D:")?.split_once(':')?;
    Some(format!("p:{{{uid}}}:{client}"))
}

/// The delivery tag of reply stream entry `id`: `r <id>`.
pub fn reply_tag(id: StreamId) -> String {
    format!("r {id}")
}

/// The stream id a delivery tag carries, if it is a reply's.
pub fn tagged_id(tag: &str) -> Option<StreamId> {
    StreamId::parse(tag.strip_prefix("r ")?)
}

/// How far before a new session's start (by the node's clock) its cursor
/// starts: stream ids are Redis's clock, and a node's may run ahead.
pub const CLOCK_MARGIN_MS: u64 = 1000;

/// The cursor of a session new at `now_ms` (Unix milliseconds, the node's
/// clock): entries appended from then on (less [`CLOCK_MARGIN_MS`]) are
/// owed to it.
pub fn fresh_cursor(now_ms: u64) -> StreamId {
    StreamId {
        ms: now_ms.saturating_sub(CLOCK_MARGIN_MS + 1),
        seq: u64::MAX,
    }
}

/// How long the record lives in Redis: while live here, the expiry plus
/// the lease the node refreshes; once the client left, the expiry.
pub fn ttl(live: bool, expiry: Duration) -> Duration {
    if live {
        expiry.saturating_add(LEASE)
    } else {
        expiry.saturating_add(AWAY_MARGIN)
    }
}

/// A persistent device session's record, as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The node holding the session.
    pub node: String,
    /// Its Session Expiry Interval, in seconds.
    pub expiry_secs: u64,
    pub subscriptions: Vec<SessionSubscription>,
    /// The last reply stream entry the device acknowledged (or the
    /// session's start).
    pub cursor: StreamId,
}

/// Why a record read back is refused.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("the record lacks its {0} field")]
    Missing(&'static str),
    #[error("the record's {0} field is malformed")]
    Malformed(&'static str),
    #[error("the record holds more than {MAX_SUBSCRIPTIONS} subscriptions")]
    TooMany,
}

impl Record {
    /// The fields an `HSET` writes: (name, value).
    pub fn fields(&self) -> [(&'static str, String); 4] {
        [
            ("node", self.node.clone()),
            ("expiry", self.expiry_secs.to_string()),
            ("subs", encode_subscriptions(&self.subscriptions)),
            ("cursor", self.cursor.to_string()),
        ]
    }

    /// A record from the (name, value) pairs of an `HGETALL`; `Ok(None)`
    /// when there are none (no record).
    pub fn from_fields(pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<Option<Record>, RecordError> {
        if pairs.is_empty() {
            return Ok(None);
        }
        let field = |name: &'static str| -> Result<&str, RecordError> {
            let (_, value) = pairs
                .iter()
                .find(|(n, _)| n == name.as_bytes())
                .ok_or(RecordError::Missing(name))?;
            std::str::from_utf8(value).map_err(|_| RecordError::Malformed(name))
        };
        Ok(Some(Record {
            node: field("node")?.to_owned(),
            expiry_secs: field("expiry")?
                .parse()
                .map_err(|_| RecordError::Malformed("expiry"))?,
            subscriptions: decode_subscriptions(field("subs")?)?,
            cursor: StreamId::parse(field("cursor")?).ok_or(RecordError::Malformed("cursor"))?,
        }))
    }
}

/// One line per subscription: `<qos><no local><retain as published>
/// <retain handling> <identifier or -> <filter>`, the filter escaped
/// (`%`, CR and LF as `%25`, `%0D`, `%0A`).
pub fn encode_subscriptions(subscriptions: &[SessionSubscription]) -> String {
    let mut out = String::new();
    for s in subscriptions {
        if !out.is_empty() {
            out.push('\n');
        }
        let id = s
            .subscription_id
            .map_or_else(|| "-".to_owned(), |id| id.to_string());
        out.push_str(&format!(
            "{}{}{}{} {id} ",
            s.qos as u8,
            u8::from(s.no_local),
            u8::from(s.retain_as_published),
            s.retain_handling
        ));
        for c in s.filter.chars() {
            match c {
                '%' => out.push_str("%25"),
                '\r' => out.push_str("%0D"),
                '\n' => out.push_str("%0A"),
                c => out.push(c),
            }
        }
    }
    out
}

/// The subscriptions [`encode_subscriptions`] wrote; bounded in count and
/// filter length.
pub fn decode_subscriptions(text: &str) -> Result<Vec<SessionSubscription>, RecordError> {
    let bad = RecordError::Malformed("subs");
    let mut subscriptions = Vec::new();
    if text.is_empty() {
        return Ok(subscriptions);
    }
    for line in text.split('\n') {
        if subscriptions.len() == MAX_SUBSCRIPTIONS {
            return Err(RecordError::TooMany);
        }
        let mut parts = line.splitn(3, ' ');
        let flags = parts.next().ok_or(bad)?.as_bytes();
        let id = parts.next().ok_or(bad)?;
        let filter = unescape(parts.next().ok_or(bad)?).ok_or(bad)?;
        let [qos, no_local, rap, rh] = flags else {
            return Err(bad);
        };
        let qos = match qos {
            b'0' => QoS::AtMostOnce,
            b'1' => QoS::AtLeastOnce,
            b'2' => QoS::ExactlyOnce,
            _ => return Err(bad),
        };
        let flag = |b: &u8| match b {
            b'0' => Ok(false),
            b'1' => Ok(true),
            _ => Err(RecordError::Malformed("subs")),
        };
        let retain_handling = match rh {
            b'0'..=b'2' => rh - b'0',
            _ => return Err(bad),
        };
        let subscription_id = match id {
            "-" => None,
            id => Some(id.parse().map_err(|_| bad)?),
        };
        if filter.is_empty() || filter.len() > MAX_FILTER_BYTES {
            return Err(bad);
        }
        subscriptions.push(SessionSubscription {
            filter,
            qos,
            no_local: flag(no_local)?,
            retain_as_published: flag(rap)?,
            retain_handling,
            subscription_id,
        });
    }
    Ok(subscriptions)
}

fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        out.push(match code {
            "25" => '%',
            "0D" => '\r',
            "0A" => '\n',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(filter: &str, qos: QoS, id: Option<usize>) -> SessionSubscription {
        SessionSubscription {
            filter: filter.to_owned(),
            qos,
            no_local: true,
            retain_as_published: false,
            retain_handling: 2,
            subscription_id: id,
        }
    }

    #[test]
    fn record_keys_share_the_users_slot() {
        // (session id) -> key
        let table = [
            ("D:42:phone", Some("p:{42}:phone")),
            ("D:alice:a%3Ab", Some("p:{alice}:a%3Ab")),
            ("H:sync-1", None),
            ("D:nocolon", None),
        ];
        for (id, key) in table {
            assert_eq!(record_key(id).as_deref(), key, "{id}");
        }
    }

    #[test]
    fn records_round_trip_with_options_and_identifiers() {
        let record = Record {
            node: "node-a".into(),
            expiry_secs: 3600,
            subscriptions: vec![
                sub("42_sync", QoS::AtLeastOnce, Some(7)),
                sub("42_a b%\n\rc", QoS::ExactlyOnce, None),
                SessionSubscription {
                    filter: "42_x".into(),
                    qos: QoS::AtMostOnce,
                    no_local: false,
                    retain_as_published: true,
                    retain_handling: 0,
                    subscription_id: Some(268_435_455),
                },
            ],
            cursor: StreamId { ms: 17, seq: 3 },
        };
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = record
            .fields()
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(Record::from_fields(&pairs), Ok(Some(record.clone())));
        assert_eq!(Record::from_fields(&[]), Ok(None));
        let empty = Record {
            subscriptions: Vec::new(),
            ..record
        };
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = empty
            .fields()
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(Record::from_fields(&pairs), Ok(Some(empty)));
    }

    #[test]
    fn malformed_records_are_refused() {
        let pairs = |subs: &str, cursor: &str| {
            vec![
                (b"node".to_vec(), b"a".to_vec()),
                (b"expiry".to_vec(), b"10".to_vec()),
                (b"subs".to_vec(), subs.as_bytes().to_vec()),
                (b"cursor".to_vec(), cursor.as_bytes().to_vec()),
            ]
        };
        // (subs, cursor) -> accepted
        let table = [
            ("1002 - 42_t", "1-0", true),
            ("3002 - 42_t", "1-0", false),
            ("1003 - 42_t", "1-0", false),
            ("102 - 42_t", "1-0", false),
            ("1002 x 42_t", "1-0", false),
            ("1002 - ", "1-0", false),
            ("1002 - 42%zz", "1-0", false),
            ("1002 - 42_t", "1", false),
            ("1002 -", "1-0", false),
        ];
        for (subs, cursor, ok) in table {
            let got = Record::from_fields(&pairs(subs, cursor));
            assert_eq!(got.is_ok(), ok, "{subs:?} {cursor:?}: {got:?}");
        }
        let missing = vec![(b"node".to_vec(), b"a".to_vec())];
        assert_eq!(
            Record::from_fields(&missing),
            Err(RecordError::Missing("expiry"))
        );
        let many = vec!["1002 - 42_t"; MAX_SUBSCRIPTIONS + 1].join("\n");
        assert_eq!(decode_subscriptions(&many), Err(RecordError::TooMany));
    }

    #[test]
    fn reply_tags_carry_their_stream_id() {
        // (tag) -> id
        let table = [
            ("r 10-2", Some(StreamId { ms: 10, seq: 2 })),
            ("x 12-0", None),
            ("r nonsense", None),
            ("", None),
        ];
        for (tag, id) in table {
            assert_eq!(tagged_id(tag), id, "{tag}");
        }
        let id = StreamId { ms: 5, seq: 7 };
        assert_eq!(tagged_id(&reply_tag(id)), Some(id));
    }

    #[test]
    fn a_fresh_cursor_precedes_what_is_appended_from_then_on() {
        let now = 5_000;
        let cursor = fresh_cursor(now);
        let start = now - CLOCK_MARGIN_MS;
        assert!(cursor < StreamId { ms: start, seq: 0 });
        assert!(
            cursor
                > StreamId {
                    ms: start - 1,
                    seq: 5
                }
        );
        assert_eq!(
            fresh_cursor(0),
            StreamId {
                ms: 0,
                seq: u64::MAX
            }
        );
    }

    #[test]
    fn lifetimes_in_redis() {
        let hour = Duration::from_secs(3600);
        assert_eq!(ttl(true, hour), hour + LEASE);
        assert_eq!(ttl(false, hour), hour + AWAY_MARGIN);
        assert_eq!(ttl(true, Duration::MAX), Duration::MAX);
    }
}
