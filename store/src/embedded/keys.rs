//! Owns the [`crate::Keys`] domain: the sync key and replay nonces in the redb file (key schema: `SCHEMA.md`).

use super::*;
use crate::NonceUse;

impl Keys for EmbeddedStore {
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        let bytes = record.encode();
        self.write(move |txn| {
            txn.open_table(KEYS)
                .map_err(db_err)?
                .insert(uid.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn put_key_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        record: &'a KeyRecord,
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        let uid = uid.as_str().to_owned();
        let bytes = record.encode();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            if refused_in(&txn, &uid, iat)? {
                return Ok(false);
            }
            txn.open_table(KEYS)
                .map_err(db_err)?
                .insert(uid.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)?;
            Ok(true)
        })
    }

    fn get_key<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<KeyRecord>> {
        let uid = uid.as_str().to_owned();
        self.read(move |txn| {
            let table = txn.open_table(KEYS).map_err(db_err)?;
            let raw = table.get(uid.as_str()).map_err(db_err)?;
            raw.map(|v| KeyRecord::decode(v.value())).transpose()
        })
    }

    fn remember_nonce<'a>(&'a self, used: NonceUse<'a>) -> StoreFuture<'a, bool> {
        let (uid, key_id, nonce, ttl) = (used.uid, used.key_id, used.nonce, used.ttl);
        let name = format!("{}\x1f{key_id}\x1f{}", uid.as_str(), b64_encode(nonce));
        let sweep = self.nonce_calls.fetch_add(1, Ordering::Relaxed) & (SWEEP_EVERY - 1) == 0;
        self.blocking(move |db| {
            let now = now_millis();
            let expires = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
            let txn = db.begin_write().map_err(db_err)?;
            let fresh = {
                let mut table = txn.open_table(NONCES).map_err(db_err)?;
                if sweep {
                    table.retain(|_, exp| exp > now).map_err(db_err)?;
                }
                let seen = table
                    .get(name.as_str())
                    .map_err(db_err)?
                    .is_some_and(|exp| exp.value() > now);
                if !seen {
                    table.insert(name.as_str(), expires).map_err(db_err)?;
                }
                !seen
            };
            txn.commit().map_err(db_err)?;
            Ok(fresh)
        })
    }
}
