//! Owns the [`crate::Keys`] domain: the sync key and replay nonces in Redis (key schema: `SCHEMA.md`).

use super::*;
use crate::NonceUse;

impl Keys for RedisStore {
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            c.set::<_, _, ()>(self.key("key", uid), record.encode())
                .await
        }))
    }

    fn put_key_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        record: &'a KeyRecord,
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.run(move |mut c| async move {
            self.guarded_set
                .key(self.key("revoked", uid))
                .key(self.key("key", uid))
                .arg(iat.to_string())
                .arg(record.encode())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|written| written == 1)
        }))
    }

    fn get_key<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(async move {
            let raw: Option<Vec<u8>> = self
                .run(move |mut c| async move { c.get(self.key("key", uid)).await })
                .await?;
            raw.map(|bytes| KeyRecord::decode(&bytes)).transpose()
        })
    }

    fn remember_nonce<'a>(&'a self, used: NonceUse<'a>) -> StoreFuture<'a, bool> {
        let (uid, key_id, nonce, ttl) = (used.uid, used.key_id, used.nonce, used.ttl);
        Box::pin(async move {
            let name = format!("{}:{key_id}:{}", self.key("nonce", uid), b64_encode(nonce));
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let set: Option<String> = self
                .run(move |mut c| async move {
                    redis::cmd("SET")
                        .arg(name)
                        .arg(1)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            Ok(set.is_some())
        })
    }
}
