//! Owns the [`crate::Pairings`] domain in Redis: a session is the hash
//! `mqgate:pair:<session>` and the user's current session the string
//! `mqgate:pairuser:<uid>`, both with the session's TTL. Every transition
//! is a Lua script on the session's one key (so it stays atomic, and fits
//! Redis Cluster: no script touches two keys). Key schema: `SCHEMA.md`.

use super::*;
use crate::pairings::{millis, Claim, PairingOutcome, PairingRecord, PairingState, Rotation};
use crate::Pairings;
use std::collections::HashMap;

/// Replaces the live code while the session is in `code` at generation
/// `ARGV[1]`.
pub(super) const ROTATE: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'gen')
if s[1] == 'code' and s[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'code', ARGV[2], 'code_exp', ARGV[3], 'gen', string.format('%.0f', tonumber(ARGV[1]) + 1))
  return 1
end
return 0
";

/// Claims the session with code hash `ARGV[1]` at `ARGV[3]` (ms): once.
pub(super) const CLAIM: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'code', 'code_exp', 'pause_ms')
if s[1] == 'code' and s[2] == ARGV[1] and s[2] ~= '' and tonumber(ARGV[3]) < tonumber(s[3]) then
  local deadline = string.format('%.0f', tonumber(ARGV[3]) + tonumber(s[4]))
  redis.call('HSET', KEYS[1], 'state', 'paused', 'code', '', 'pk', ARGV[2], 'deadline', deadline)
  return redis.call('HGETALL', KEYS[1])
end
return {}
";

/// The decision `ARGV[2]` of user `ARGV[1]` at `ARGV[3]` (ms), while paused.
pub(super) const DECIDE: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'uid', 'deadline')
if s[1] == 'paused' and s[2] == ARGV[1] and tonumber(ARGV[3]) <= tonumber(s[3]) then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  return redis.call('HGETALL', KEYS[1])
end
return {}
";

/// `ARGV[1]` -> `ARGV[2]`, setting field `ARGV[3]` to `ARGV[4]` if named.
pub(super) const TRANSITION: &str = r"
if redis.call('HGET', KEYS[1], 'state') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
  return 1
end
return 0
";

/// Ends a session a newer one of its user replaces (its code dies).
pub(super) const REPLACE: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'code' or st == 'paused' then
  redis.call('HSET', KEYS[1], 'state', 'replaced', 'code', '')
  return 1
end
return 0
";

/// Deletes the user's pointer only while it names session `ARGV[1]`.
pub(super) const DEL_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

// Each command and script touches one of these keys alone, so they need no
// hash tag on a Redis Cluster and keep one name on either layout.
fn session_key(session: &str) -> String {
    format!("{KEY_PREFIX}pair:{session}")
}

fn user_key(uid: &str) -> String {
    format!("{KEY_PREFIX}pairuser:{uid}")
}

/// A record from `HGETALL`'s flat reply; `None` for an empty one.
fn record_of(session: &str, flat: Vec<String>) -> Result<Option<PairingRecord>, StoreError> {
    if flat.is_empty() {
        return Ok(None);
    }
    let mut fields = HashMap::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        fields.insert(k, v);
    }
    PairingRecord::from_fields(session, &fields).map(Some)
}

impl Pairings for RedisStore {
    fn open_pairing<'a>(
        &'a self,
        record: &'a PairingRecord,
        lifetime: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let ttl = millis(lifetime).max(1);
            let session = session_key(&record.session);
            let fields = record.to_fields();
            self.run(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .hset_multiple(&session, &fields)
                    .ignore()
                    .pexpire(&session, i64::try_from(ttl).unwrap_or(i64::MAX))
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
            let pointer = user_key(record.uid.as_str());
            let previous: Option<String> = self
                .run(|mut c| async move {
                    redis::cmd("SET")
                        .arg(&pointer)
                        .arg(&record.session)
                        .arg("PX")
                        .arg(ttl)
                        .arg("GET")
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if let Some(old) = previous.filter(|old| *old != record.session) {
                self.run(|mut c| async move {
                    self.pair_replace
                        .key(session_key(&old))
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await?;
            }
            Ok(())
        })
    }

    fn pairing<'a>(&'a self, session: &'a str) -> StoreFuture<'a, Option<PairingRecord>> {
        Box::pin(async move {
            let flat: Vec<String> = self
                .run(|mut c| async move { c.hgetall(session_key(session)).await })
                .await?;
            record_of(session, flat)
        })
    }

    fn rotate_pairing_code<'a>(&'a self, rotation: Rotation<'a>) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let expires = crate::pairings::now_millis().saturating_add(millis(rotation.code_life));
            let done: i64 = self
                .run(|mut c| async move {
                    self.pair_rotate
                        .key(session_key(rotation.session))
                        .arg(rotation.generation.to_string())
                        .arg(rotation.code.hash())
                        .arg(expires.to_string())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(done == 1)
        })
    }

    fn claim_pairing<'a>(&'a self, claim: Claim<'a>) -> StoreFuture<'a, Option<PairingRecord>> {
        Box::pin(async move {
            let session = claim.code.session.as_str();
            let flat: Vec<String> = self
                .run(|mut c| async move {
                    self.pair_claim
                        .key(session_key(session))
                        .arg(claim.code.hash())
                        .arg(claim.public_key)
                        .arg(claim.now_ms.to_string())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            record_of(session, flat)
        })
    }

    fn decide_pairing<'a>(
        &'a self,
        uid: &'a UserId,
        accept: bool,
        now_ms: u64,
    ) -> StoreFuture<'a, Option<PairingRecord>> {
        Box::pin(async move {
            let session: Option<String> = self
                .run(|mut c| async move { c.get(user_key(uid.as_str())).await })
                .await?;
            let Some(session) = session else {
                return Ok(None);
            };
            let to = if accept {
                PairingState::Accepted
            } else {
                PairingState::Declined
            };
            let key = session_key(&session);
            let flat: Vec<String> = self
                .run(|mut c| async move {
                    self.pair_decide
                        .key(key)
                        .arg(uid.as_str())
                        .arg(to.as_str())
                        .arg(now_ms.to_string())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            record_of(&session, flat)
        })
    }

    fn transition_pairing<'a>(
        &'a self,
        session: &'a str,
        from: PairingState,
        to: PairingState,
        outcome: PairingOutcome<'a>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let (field, value) = match outcome {
                PairingOutcome::Nothing => ("", String::new()),
                PairingOutcome::Result(json) => ("result", json.to_owned()),
                PairingOutcome::Status(status) => ("status", status.to_string()),
            };
            let done: i64 = self
                .run(|mut c| async move {
                    self.pair_transition
                        .key(session_key(session))
                        .arg(from.as_str())
                        .arg(to.as_str())
                        .arg(field)
                        .arg(value)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(done == 1)
        })
    }

    fn delete_pairing<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let uid: Option<String> = self
                .run(|mut c| async move { c.hget(session_key(session), "uid").await })
                .await?;
            self.run(|mut c| async move { c.del::<_, ()>(session_key(session)).await })
                .await?;
            if let Some(uid) = uid {
                self.run(|mut c| async move {
                    self.pair_del_if
                        .key(user_key(&uid))
                        .arg(session)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await?;
            }
            Ok(())
        })
    }
}
