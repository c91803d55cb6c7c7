//! Owns the [`crate::SignUps`] domain in Redis: a session is the hash
//! `idp:s:<id>` and a rate counter the string `idp:r:<key>`, each with a TTL,
//! over the store's one connection (key schema: `SCHEMA.md`).

use super::*;
use crate::{SignUpSession, SignUps, SIGN_UP_KEY_PREFIX};
use std::collections::HashMap;

/// `HSET` only on a session that still exists (an expired one must not come
/// back without a TTL).
pub(super) const HSET_IF_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
";

/// `HINCRBY` only on a session that still exists; -1 otherwise.
pub(super) const INCR_IF_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return -1
";

/// A fixed-window counter: the first hit of a window sets its expiry.
pub(super) const HIT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

fn session_key(id: &str) -> String {
    format!("{SIGN_UP_KEY_PREFIX}s:{id}")
}

impl RedisStore {
    /// Sets `pairs` in the session's hash if the session still exists.
    async fn hset_if_exists(&self, id: &str, pairs: &[(&str, &str)]) -> Result<bool, StoreError> {
        let key = session_key(id);
        let mut invocation = self.hset_if_exists.key(&key);
        for (field, value) in pairs {
            invocation.arg(*field).arg(*value);
        }
        let done: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(done == 1)
    }

    /// Adds one to the session's `field`; the new count (`None`: gone).
    async fn increment(&self, id: &str, field: &str) -> Result<Option<u32>, StoreError> {
        let key = session_key(id);
        let count: i64 = self
            .run(|mut c| async move {
                self.incr_if_exists
                    .key(&key)
                    .arg(field)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(u32::try_from(count).ok())
    }
}

impl SignUps for RedisStore {
    fn create_session<'a>(
        &'a self,
        id: &'a str,
        msisdn: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        let key = session_key(id);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Box::pin(self.run(move |mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(&key)
                .arg("msisdn")
                .arg(msisdn)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ms)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        }))
    }

    fn session<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<SignUpSession>> {
        let key = session_key(id);
        Box::pin(async move {
            let fields: HashMap<String, String> =
                self.run(|mut c| async move {
                    redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
                })
                .await?;
            let Some(msisdn) = fields.get("msisdn") else {
                return Ok(None);
            };
            let number = |name: &str| {
                fields
                    .get(name)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Ok(Some(SignUpSession {
                msisdn: msisdn.clone(),
                code: fields.get("code").cloned(),
                code_expires: number("code_expires"),
                attempts: u32::try_from(number("attempts")).unwrap_or(u32::MAX),
                resends: u32::try_from(number("resends")).unwrap_or(u32::MAX),
                uid: fields.get("uid").cloned(),
                verified_at: number("verified_at"),
            }))
        })
    }

    fn set_code<'a>(&'a self, id: &'a str, code: &'a str, expires: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let expires = expires.to_string();
            self.hset_if_exists(id, &[("code", code), ("code_expires", expires.as_str())])
                .await
        })
    }

    fn add_attempt<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u32>> {
        Box::pin(self.increment(id, "attempts"))
    }

    fn add_resend<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u32>> {
        Box::pin(self.increment(id, "resends"))
    }

    fn take_code<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let key = session_key(id);
        Box::pin(async move {
            let removed: i64 = self
                .run(|mut c| async move {
                    redis::cmd("HDEL")
                        .arg(&key)
                        .arg("code")
                        .query_async(&mut c)
                        .await
                })
                .await?;
            Ok(removed == 1)
        })
    }

    fn mark_verified<'a>(&'a self, id: &'a str, uid: &'a str, iat: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let iat = iat.to_string();
            self.hset_if_exists(id, &[("uid", uid), ("verified_at", iat.as_str())])
                .await
        })
    }

    fn delete_session<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        let key = session_key(id);
        Box::pin(self.run(|mut c| async move {
            redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await
        }))
    }

    fn hit<'a>(&'a self, key: &'a str, window: Duration) -> StoreFuture<'a, u32> {
        let key = format!("{SIGN_UP_KEY_PREFIX}r:{key}");
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        Box::pin(async move {
            let count: i64 = self
                .run(|mut c| async move { self.hit.key(&key).arg(ms).invoke_async(&mut c).await })
                .await?;
            Ok(u32::try_from(count).unwrap_or(u32::MAX))
        })
    }
}
