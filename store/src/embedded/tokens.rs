//! Owns the [`crate::PlatformTokens`] domain: sealed platform tokens in the redb file (key schema: `SCHEMA.md`).

use super::*;
use crate::SealedToken;

impl PlatformTokens for EmbeddedStore {
    fn put_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
    ) -> StoreFuture<'a, ()> {
        if let Err(e) = check_platform(platform) {
            return Box::pin(async move { Err(e) });
        }
        let name = token_key(uid.as_str(), platform);
        let sealed = sealed.to_vec();
        self.write(move |txn| {
            txn.open_table(TOKENS)
                .map_err(db_err)?
                .insert(name.as_str(), sealed.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn put_platform_token_unless_revoked<'a>(
        &'a self,
        token: SealedToken<'a>,
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        let (uid, platform, sealed) = (token.uid, token.platform, token.sealed);
        if let Err(e) = check_platform(platform) {
            return Box::pin(async move { Err(e) });
        }
        let uid = uid.as_str().to_owned();
        let name = token_key(&uid, platform);
        let sealed = sealed.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            if refused_in(&txn, &uid, iat)? {
                return Ok(false);
            }
            txn.open_table(TOKENS)
                .map_err(db_err)?
                .insert(name.as_str(), sealed.as_slice())
                .map_err(db_err)?;
            txn.commit().map_err(db_err)?;
            Ok(true)
        })
    }

    fn platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        if check_platform(platform).is_err() {
            return Box::pin(async { Ok(None) });
        }
        let name = token_key(uid.as_str(), platform);
        self.read(move |txn| {
            let table = txn.open_table(TOKENS).map_err(db_err)?;
            let sealed = table.get(name.as_str()).map_err(db_err)?;
            Ok(sealed.map(|v| v.value().to_vec()))
        })
    }

    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        let uid = uid.as_str().to_owned();
        self.read(move |txn| {
            let table = txn.open_table(TOKENS).map_err(db_err)?;
            let (from, to) = token_range(&uid);
            let mut out = Vec::new();
            for entry in table.range(from.as_str()..to.as_str()).map_err(db_err)? {
                let (key, _) = entry.map_err(db_err)?;
                if let Some((_, platform)) = key.value().split_once('\x1f') {
                    out.push(platform.to_owned());
                }
            }
            // Keys are sorted by platform already; sort anyway for the contract.
            out.sort();
            Ok(out)
        })
    }

    fn delete_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, bool> {
        if check_platform(platform).is_err() {
            return Box::pin(async { Ok(false) });
        }
        let name = token_key(uid.as_str(), platform);
        self.write(move |txn| {
            let had = txn
                .open_table(TOKENS)
                .map_err(db_err)?
                .remove(name.as_str())
                .map_err(db_err)?
                .is_some();
            Ok(had)
        })
    }

    fn replace_platform_token<'a>(
        &'a self,
        old: SealedToken<'a>,
        new: &'a [u8],
    ) -> StoreFuture<'a, bool> {
        let (uid, platform, old) = (old.uid, old.platform, old.sealed);
        if check_platform(platform).is_err() {
            return Box::pin(async { Ok(false) });
        }
        let name = token_key(uid.as_str(), platform);
        let (old, new) = (old.to_vec(), new.to_vec());
        self.write(move |txn| {
            let replaced = {
                let mut table = txn.open_table(TOKENS).map_err(db_err)?;
                let current = table
                    .get(name.as_str())
                    .map_err(db_err)?
                    .map(|v| v.value().to_vec());
                if current.as_deref() == Some(old.as_slice()) {
                    table
                        .insert(name.as_str(), new.as_slice())
                        .map_err(db_err)?;
                    true
                } else {
                    false
                }
            };
            Ok(replaced)
        })
    }

    fn platform_tokens_page<'a>(&'a self, cursor: Option<&'a str>) -> StoreFuture<'a, TokenPage> {
        let cursor = cursor.map(str::to_owned);
        self.read(move |txn| {
            let table = txn.open_table(TOKENS).map_err(db_err)?;
            let start = match cursor.as_deref() {
                Some(after) => Bound::Excluded(after),
                None => Bound::Unbounded,
            };
            let mut page = TokenPage::default();
            let mut last = None;
            for entry in table
                .range::<&str>((start, Bound::Unbounded))
                .map_err(db_err)?
                .take(TOKEN_PAGE)
            {
                let (key, sealed) = entry.map_err(db_err)?;
                let key = key.value();
                let (uid, platform) = key
                    .split_once('\x1f')
                    .ok_or_else(|| StoreError::Corrupt("token key without separator".into()))?;
                let uid = UserId::parse(uid)
                    .map_err(|e| StoreError::Corrupt(format!("token key uid: {e}")))?;
                page.tokens.push(StoredToken {
                    uid,
                    platform: platform.to_owned(),
                    sealed: sealed.value().to_vec(),
                });
                last = Some(key.to_owned());
            }
            if page.tokens.len() == TOKEN_PAGE {
                page.next = last;
            }
            Ok(page)
        })
    }
}
