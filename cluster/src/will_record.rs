//! Owns what a node keeps in Redis of its devices' wills, as pure
//! functions: the keys (`will:{<uid>}:<client>` per device session,
//! `wills:{<node>}` the index of a node's), the owner of a record (node,
//! incarnation, connection), the record's bytes, and the decisions a node
//! takes on a record it finds: whether its owner is dead, and when its
//! will falls due (table-tested).

use crate::entry::{Entry, EntryError};
use broker::router::protocol::{Publish, PublishProperties};
use bytes::{BufMut, Bytes, BytesMut};
use std::time::Duration;

/// Layout version of a record's body (after its owner line).
const LAYOUT: u8 = 1;

/// The record of device session `session_id` (`D:<uid>:<client>`), in its
/// user's slot; `None` for a session id that is not a device's.
pub fn record_key(session_id: &str) -> Option<String> {
    let (uid, client) = session_id.strip_prefix("D:")?.split_once(':')?;
    (!uid.is_empty()).then(|| format!("will:{{{uid}}}:{client}"))
}

/// The set of session ids with a will record armed on `node`.
pub fn index_key(node: &str) -> String {
    format!("wills:{{{node}}}")
}

/// Who armed a record: node, incarnation (one run of the node's process)
/// and connection (its claim serial there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub incarnation: String,
    pub connection: u64,
}

impl Owner {
    /// The record's first line, `<node>/<incarnation>/<connection>\n`: the
    /// claim script compares a prefix of it.
    pub fn line(&self) -> String {
        format!(
            "{}{}\n",
            incarnation_prefix(&self.node, &self.incarnation),
            self.connection
        )
    }
}

/// The prefix every record armed by one incarnation starts with.
pub fn incarnation_prefix(node: &str, incarnation: &str) -> String {
    format!("{node}/{incarnation}/")
}

/// When a recorded will falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Its connection was open: this long after its node was last alive.
    AfterEnd(Duration),
    /// Its connection ended: at this time (Unix ms).
    DueAt(u64),
}

/// One device session's will as kept in Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub owner: Owner,
    /// The user whose will it is, and the `iat` of its token (checked
    /// against the user's revocation before it is published).
    pub uid: String,
    pub issued_at: Option<u64>,
    pub clock: Clock,
    /// The will as it is published (stamped, with its properties).
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
}

/// Why bytes read back are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no owner line")]
    Owner,
    #[error("empty or unknown layout")]
    Layout,
    #[error("truncated")]
    Truncated,
    #[error(transparent)]
    Entry(#[from] EntryError),
}

/// The owner of a record, from its first line (all a node needs to decide
/// whether to claim it).
pub fn owner_of(bytes: &[u8]) -> Result<Owner, RecordError> {
    let end = bytes
        .iter()
        .take(256)
        .position(|&b| b == b'\n')
        .ok_or(RecordError::Owner)?;
    let line = bytes
        .get(..end)
        .and_then(|line| std::str::from_utf8(line).ok())
        .ok_or(RecordError::Owner)?;
    let mut parts = line.split('/');
    let (Some(node), Some(incarnation), Some(connection), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RecordError::Owner);
    };
    if node.is_empty() || incarnation.is_empty() {
        return Err(RecordError::Owner);
    }
    Ok(Owner {
        node: node.to_owned(),
        incarnation: incarnation.to_owned(),
        connection: connection.parse().map_err(|_| RecordError::Owner)?,
    })
}

impl Record {
    /// Its bytes: the owner line, then layout, uid (length-prefixed), iat
    /// (flag and value), clock (kind and ms), then the will as an entry.
    pub fn encode(&self) -> Result<Bytes, RecordError> {
        let uid_len = u8::try_from(self.uid.len()).map_err(|_| RecordError::Layout)?;
        let entry = Entry::encode(&self.owner.node, &self.publish, &self.properties)?;
        let line = self.owner.line();
        let mut out = BytesMut::with_capacity(line.len() + 20 + self.uid.len() + entry.len());
        out.put_slice(line.as_bytes());
        out.put_u8(LAYOUT);
        out.put_u8(uid_len);
        out.put_slice(self.uid.as_bytes());
        out.put_u8(u8::from(self.issued_at.is_some()));
        out.put_u64(self.issued_at.unwrap_or(0));
        let (kind, ms) = match self.clock {
            Clock::AfterEnd(delay) => (0, u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            Clock::DueAt(ms) => (1, ms),
        };
        out.put_u8(kind);
        out.put_u64(ms);
        out.put_slice(&entry);
        Ok(out.freeze())
    }

    /// Reads back what [`Record::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        let owner = owner_of(bytes)?;
        let rest = bytes
            .get(owner.line().len()..)
            .ok_or(RecordError::Truncated)?;
        let mut reader = Reader(rest);
        if reader.u8()? != LAYOUT {
            return Err(RecordError::Layout);
        }
        let uid_len = usize::from(reader.u8()?);
        let uid = std::str::from_utf8(reader.take(uid_len)?)
            .map_err(|_| RecordError::Layout)?
            .to_owned();
        let has_iat = reader.u8()? != 0;
        let iat = reader.u64()?;
        let kind = reader.u8()?;
        let ms = reader.u64()?;
        let clock = match kind {
            0 => Clock::AfterEnd(Duration::from_millis(ms)),
            1 => Clock::DueAt(ms),
            _ => return Err(RecordError::Layout),
        };
        let entry = Entry::decode(reader.0)?;
        Ok(Record {
            owner,
            uid,
            issued_at: has_iat.then_some(iat),
            clock,
            publish: entry.publish,
            properties: entry.properties,
        })
    }
}

/// Reads a record's fields in order, never past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let (head, tail) = self.0.split_at_checked(n).ok_or(RecordError::Truncated)?;
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        let (&byte, tail) = self.0.split_first().ok_or(RecordError::Truncated)?;
        self.0 = tail;
        Ok(byte)
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        let bytes = self.take(8)?;
        Ok(u64::from_be_bytes(
            bytes.try_into().map_err(|_| RecordError::Truncated)?,
        ))
    }
}

/// What a sweeping node does with a record of an incarnation it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Its owner is alive (or it is this node's own): not ours to touch.
    Leave,
    /// Its owner is dead; its will falls due at this time (Unix ms).
    Wait(u64),
    /// Its owner is dead and its will is due: claim and publish it.
    Claim,
}

/// The decision on a record armed by `owner`, found while `live` holds the
/// incarnation the owner's node is alive as (`None`: its liveness lapsed);
/// `last_alive_ms` is when the owner's incarnation last said it was alive
/// (`None`: unknown, taken as now).
pub fn sweep(
    owner: &Owner,
    live: Option<&str>,
    last_alive_ms: Option<u64>,
    clock: Clock,
    now_ms: u64,
) -> Sweep {
    if live == Some(owner.incarnation.as_str()) {
        return Sweep::Leave;
    }
    let last_alive = last_alive_ms.unwrap_or(now_ms).min(now_ms);
    let due = match clock {
        Clock::AfterEnd(delay) => {
            last_alive.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
        }
        Clock::DueAt(ms) => ms,
    };
    if due <= now_ms {
        Sweep::Claim
    } else {
        Sweep::Wait(due)
    }
}

/// What a node opening a connection of a session does with the record it
/// finds for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// Armed by this very incarnation: its own wills handle it.
    Ours,
    /// Its owner is alive: the takeover announcement makes it end it.
    OwnerAlive,
    /// Its owner is dead: claim it, then publish it now (Clean Start) or
    /// drop it (a resumed session, MQTT-3.1.3-9).
    Claim { publish: bool },
}

/// The decision on the record `owner` armed, found by incarnation
/// `me_incarnation` of node `me` opening a connection with `clean_start`.
pub fn reopen(
    owner: &Owner,
    me: &str,
    me_incarnation: &str,
    live: Option<&str>,
    clean_start: bool,
) -> Reopen {
    if owner.node == me && owner.incarnation == me_incarnation {
        Reopen::Ours
    } else if live == Some(owner.incarnation.as_str()) {
        Reopen::OwnerAlive
    } else {
        Reopen::Claim {
            publish: clean_start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::router::protocol::QoS;

    fn owner(node: &str, incarnation: &str, connection: u64) -> Owner {
        Owner {
            node: node.into(),
            incarnation: incarnation.into(),
            connection,
        }
    }

    fn record(
        clock: Clock,
        issued_at: Option<u64>,
        properties: Option<PublishProperties>,
    ) -> Record {
        Record {
            owner: owner("node-a", "00ff", 42),
            uid: "8101".into(),
            issued_at,
            clock,
            publish: Publish::with_qos(
                Bytes::from_static(b"request_contact"),
                Bytes::from_static(b"gone"),
                false,
                QoS::AtLeastOnce,
                // What an entry reads back for QoS 1 (any non-zero).
                1,
            ),
            properties,
        }
    }

    #[test]
    fn keys_of_session_ids() {
        let table = [
            ("D:8101:phone", Some("will:{8101}:phone")),
            ("D:alice:a%3Ab", Some("will:{alice}:a%3Ab")),
            ("D::x", None),
            ("D:nocolon", None),
            ("H:sync-1", None),
        ];
        for (id, key) in table {
            assert_eq!(record_key(id).as_deref(), key, "{id}");
        }
        assert_eq!(index_key("node-a"), "wills:{node-a}");
    }

    #[test]
    fn records_read_back_as_written() {
        let properties = PublishProperties {
            user_properties: vec![("user_id".into(), "8101".into())],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let table = [
            record(Clock::AfterEnd(Duration::ZERO), Some(1_700_000_000), None),
            record(
                Clock::AfterEnd(Duration::from_secs(30)),
                None,
                Some(properties.clone()),
            ),
            record(Clock::DueAt(1_800_000_000_123), Some(0), Some(properties)),
        ];
        for written in table {
            let bytes = written.encode().unwrap();
            assert!(bytes.starts_with(b"node-a/00ff/42\n"), "{bytes:?}");
            assert_eq!(Record::decode(&bytes).unwrap(), written);
            assert_eq!(owner_of(&bytes).unwrap(), written.owner);
        }
    }

    #[test]
    fn broken_records_are_refused() {
        let good = record(Clock::DueAt(5), None, None).encode().unwrap();
        let mut unknown = good.to_vec();
        unknown["node-a/00ff/42\n".len()] = 9;
        let table: Vec<(Vec<u8>, RecordError)> = vec![
            (b"".to_vec(), RecordError::Owner),
            (b"no newline".to_vec(), RecordError::Owner),
            (b"a/b\n".to_vec(), RecordError::Owner),
            (b"a/b/c/d\n".to_vec(), RecordError::Owner),
            (b"a/b/x\n".to_vec(), RecordError::Owner),
            (b"/b/1\n".to_vec(), RecordError::Owner),
            (b"a/b/1\n".to_vec(), RecordError::Truncated),
            (unknown, RecordError::Layout),
            (
                good[..good.len() - 3].to_vec(),
                RecordError::Entry(EntryError::Truncated),
            ),
        ];
        for (bytes, error) in table {
            assert_eq!(Record::decode(&bytes).unwrap_err(), error, "{bytes:?}");
        }
    }

    #[test]
    fn the_sweep_decision() {
        let a = owner("node-a", "inc1", 1);
        let after = |secs| Clock::AfterEnd(Duration::from_secs(secs));
        // (live incarnation, last alive, clock, now) -> decision
        let table = [
            (Some("inc1"), Some(1_000), after(0), 50_000, Sweep::Leave),
            (None, Some(1_000), after(0), 50_000, Sweep::Claim),
            (Some("inc2"), Some(1_000), after(0), 50_000, Sweep::Claim),
            (None, Some(1_000), after(30), 20_000, Sweep::Wait(31_000)),
            (None, Some(1_000), after(30), 31_000, Sweep::Claim),
            (None, None, after(30), 20_000, Sweep::Wait(50_000)),
            (None, Some(90_000), after(5), 20_000, Sweep::Wait(25_000)),
            (
                None,
                Some(1_000),
                Clock::DueAt(7_000),
                6_999,
                Sweep::Wait(7_000),
            ),
            (None, Some(1_000), Clock::DueAt(7_000), 7_000, Sweep::Claim),
            (
                Some("inc1"),
                Some(1_000),
                Clock::DueAt(7_000),
                9_000,
                Sweep::Leave,
            ),
        ];
        for (live, last_alive, clock, now, decision) in table {
            assert_eq!(
                sweep(&a, live, last_alive, clock, now),
                decision,
                "{live:?} {last_alive:?} {clock:?} {now}"
            );
        }
    }

    #[test]
    fn the_reopen_decision() {
        let a = owner("node-a", "inc1", 1);
        // (me, my incarnation, owner's live incarnation, clean start) -> decision
        let table = [
            ("node-a", "inc1", Some("inc1"), true, Reopen::Ours),
            ("node-c", "inc9", Some("inc1"), true, Reopen::OwnerAlive),
            ("node-c", "inc9", Some("inc1"), false, Reopen::OwnerAlive),
            (
                "node-c",
                "inc9",
                None,
                true,
                Reopen::Claim { publish: true },
            ),
            (
                "node-c",
                "inc9",
                None,
                false,
                Reopen::Claim { publish: false },
            ),
            (
                "node-a",
                "inc2",
                Some("inc2"),
                true,
                Reopen::Claim { publish: true },
            ),
            (
                "node-a",
                "inc2",
                Some("inc2"),
                false,
                Reopen::Claim { publish: false },
            ),
        ];
        for (me, inc, live, clean, decision) in table {
            assert_eq!(
                reopen(&a, me, inc, live, clean),
                decision,
                "{me} {inc} {live:?} {clean}"
            );
        }
    }
}
