//! Owns the [`crate::Pairings`] domain in the redb file: a session's fields
//! as JSON under its id, with the instant it expires, and the user's
//! current session; every transition is one write transaction (key schema:
//! `SCHEMA.md`). Expired records read as absent and are swept every
//! [`SWEEP_PAIRINGS_EVERY`] opens.

use super::*;
use crate::pairings::{millis, Claim, PairingOutcome, PairingRecord, PairingState, Rotation};
use crate::Pairings;
use std::collections::HashMap;
use std::time::Duration;

/// session id -> JSON object of the record's fields plus `exp` (ms).
pub(super) const PAIRINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("pairings");
/// uid -> the user's current session id.
pub(super) const PAIRING_USERS: TableDefinition<&str, &str> = TableDefinition::new("pairing_users");

/// A stored record and when it expires (ms since the epoch).
struct Stored {
    record: PairingRecord,
    expires_ms: u64,
}

fn encode(record: &PairingRecord, expires_ms: u64) -> Vec<u8> {
    let mut fields: HashMap<&str, String> = record.to_fields().into_iter().collect();
    fields.insert("exp", expires_ms.to_string());
    serde_json::to_vec(&fields).unwrap_or_default()
}

/// The live record of `session`, read inside any transaction's table.
fn load(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    session: &str,
    now: u64,
) -> Result<Option<Stored>, StoreError> {
    let Some(raw) = table.get(session).map_err(db_err)? else {
        return Ok(None);
    };
    let fields: HashMap<String, String> = serde_json::from_slice(raw.value())
        .map_err(|e| StoreError::Corrupt(format!("pairing record: {e}")))?;
    let expires_ms = fields
        .get("exp")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if expires_ms <= now {
        return Ok(None);
    }
    Ok(Some(Stored {
        record: PairingRecord::from_fields(session, &fields)?,
        expires_ms,
    }))
}

/// Changes the live record of `session` with `change` (which returns
/// whether it changed anything) and writes it back: the one shape of
/// every transition. Returns the record after the change, or `None`.
fn update(
    txn: &redb::WriteTransaction,
    session: &str,
    change: impl FnOnce(&mut PairingRecord) -> bool,
) -> Result<Option<PairingRecord>, StoreError> {
    let mut table = txn.open_table(PAIRINGS).map_err(db_err)?;
    let Some(mut stored) = load(&table, session, now_millis())? else {
        return Ok(None);
    };
    if !change(&mut stored.record) {
        return Ok(None);
    }
    table
        .insert(
            session,
            encode(&stored.record, stored.expires_ms).as_slice(),
        )
        .map_err(db_err)?;
    Ok(Some(stored.record))
}

impl Pairings for EmbeddedStore {
    fn open_pairing<'a>(
        &'a self,
        record: &'a PairingRecord,
        lifetime: Duration,
    ) -> StoreFuture<'a, ()> {
        let record = record.clone();
        let sweep =
            self.pairing_opens.fetch_add(1, Ordering::Relaxed) & (SWEEP_PAIRINGS_EVERY - 1) == 0;
        self.write(move |txn| {
            let now = now_millis();
            let expires = now.saturating_add(millis(lifetime));
            let previous = {
                let mut users = txn.open_table(PAIRING_USERS).map_err(db_err)?;
                let previous = users
                    .insert(record.uid.as_str(), record.session.as_str())
                    .map_err(db_err)?
                    .map(|old| old.value().to_owned());
                previous
            };
            if let Some(old) = previous.filter(|old| *old != record.session) {
                update(txn, &old, |r| {
                    let live = matches!(r.state, PairingState::Code | PairingState::Paused);
                    if live {
                        r.state = PairingState::Replaced;
                        r.code_hash = None;
                    }
                    live
                })?;
            }
            let mut table = txn.open_table(PAIRINGS).map_err(db_err)?;
            if sweep {
                let live = |raw: &[u8]| {
                    serde_json::from_slice::<HashMap<String, String>>(raw)
                        .ok()
                        .and_then(|f| f.get("exp").and_then(|v| v.parse::<u64>().ok()))
                        .is_some_and(|exp| exp > now)
                };
                table.retain(|_, raw| live(raw)).map_err(db_err)?;
                let mut users = txn.open_table(PAIRING_USERS).map_err(db_err)?;
                let mut gone = Vec::new();
                for entry in users.iter().map_err(db_err)? {
                    let (uid, session) = entry.map_err(db_err)?;
                    if table.get(session.value()).map_err(db_err)?.is_none()
                        && session.value() != record.session
                    {
                        gone.push(uid.value().to_owned());
                    }
                }
                for uid in gone {
                    users.remove(uid.as_str()).map_err(db_err)?;
                }
            }
            table
                .insert(record.session.as_str(), encode(&record, expires).as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn pairing<'a>(&'a self, session: &'a str) -> StoreFuture<'a, Option<PairingRecord>> {
        let session = session.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(PAIRINGS).map_err(db_err)?;
            Ok(load(&table, &session, now_millis())?.map(|s| s.record))
        })
    }

    fn rotate_pairing_code<'a>(&'a self, rotation: Rotation<'a>) -> StoreFuture<'a, bool> {
        let session = rotation.session.to_owned();
        let (hash, generation) = (rotation.code.hash(), rotation.generation);
        let expires = now_millis().saturating_add(millis(rotation.code_life));
        self.write(move |txn| {
            let changed = update(txn, &session, |r| {
                let current = r.state == PairingState::Code && r.generation == generation;
                if current {
                    r.code_hash = Some(hash);
                    r.code_expires_ms = expires;
                    r.generation = generation.saturating_add(1);
                }
                current
            })?;
            Ok(changed.is_some())
        })
    }

    fn claim_pairing<'a>(&'a self, claim: Claim<'a>) -> StoreFuture<'a, Option<PairingRecord>> {
        let code = claim.code.clone();
        let (public_key, now) = (claim.public_key.to_owned(), claim.now_ms);
        self.write(move |txn| {
            update(txn, &code.session, |r| {
                if !r.shows(&code, now) {
                    return false;
                }
                r.state = PairingState::Paused;
                r.code_hash = None;
                r.public_key = Some(public_key);
                r.deadline_ms = now.saturating_add(r.pause_ms);
                true
            })
        })
    }

    fn decide_pairing<'a>(
        &'a self,
        uid: &'a UserId,
        accept: bool,
        now_ms: u64,
    ) -> StoreFuture<'a, Option<PairingRecord>> {
        let uid = uid.clone();
        self.write(move |txn| {
            let session = txn
                .open_table(PAIRING_USERS)
                .map_err(db_err)?
                .get(uid.as_str())
                .map_err(db_err)?
                .map(|s| s.value().to_owned());
            let Some(session) = session else {
                return Ok(None);
            };
            update(txn, &session, |r| {
                let waiting =
                    r.state == PairingState::Paused && r.uid == uid && now_ms <= r.deadline_ms;
                if waiting {
                    r.state = if accept {
                        PairingState::Accepted
                    } else {
                        PairingState::Declined
                    };
                }
                waiting
            })
        })
    }

    fn transition_pairing<'a>(
        &'a self,
        session: &'a str,
        from: PairingState,
        to: PairingState,
        outcome: PairingOutcome<'a>,
    ) -> StoreFuture<'a, bool> {
        let session = session.to_owned();
        let (result, status) = match outcome {
            PairingOutcome::Nothing => (None, None),
            PairingOutcome::Result(json) => (Some(json.to_owned()), None),
            PairingOutcome::Status(status) => (None, Some(status)),
        };
        self.write(move |txn| {
            let changed = update(txn, &session, |r| {
                if r.state != from {
                    return false;
                }
                r.state = to;
                if result.is_some() {
                    r.result = result;
                }
                if status.is_some() {
                    r.status = status;
                }
                true
            })?;
            Ok(changed.is_some())
        })
    }

    fn delete_pairing<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        let session = session.to_owned();
        self.write(move |txn| {
            let removed = txn
                .open_table(PAIRINGS)
                .map_err(db_err)?
                .remove(session.as_str())
                .map_err(db_err)?
                .map(|raw| raw.value().to_vec());
            let uid = removed
                .and_then(|raw| serde_json::from_slice::<HashMap<String, String>>(&raw).ok())
                .and_then(|fields| fields.get("uid").cloned());
            if let Some(uid) = uid {
                let mut users = txn.open_table(PAIRING_USERS).map_err(db_err)?;
                let points_here = users
                    .get(uid.as_str())
                    .map_err(db_err)?
                    .is_some_and(|s| s.value() == session);
                if points_here {
                    users.remove(uid.as_str()).map_err(db_err)?;
                }
            }
            Ok(())
        })
    }
}
