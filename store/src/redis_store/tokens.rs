//! Owns the [`crate::PlatformTokens`] domain: sealed platform tokens in Redis (key schema: `SCHEMA.md`).

use super::*;
use crate::SealedToken;

impl PlatformTokens for RedisStore {
    fn put_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            check_platform(platform)?;
            self.run(move |mut c| async move {
                c.hset::<_, _, _, ()>(key("tokens", uid.as_str()), platform, sealed)
                    .await
            })
            .await
        })
    }

    fn put_platform_token_unless_revoked<'a>(
        &'a self,
        token: SealedToken<'a>,
        iat: u64,
    ) -> StoreFuture<'a, bool> {
        let (uid, platform, sealed) = (token.uid, token.platform, token.sealed);
        Box::pin(async move {
            check_platform(platform)?;
            self.run(move |mut c| async move {
                self.guarded_hset
                    .key(key("revoked", uid.as_str()))
                    .key(key("tokens", uid.as_str()))
                    .arg(iat.to_string())
                    .arg(platform)
                    .arg(sealed)
                    .invoke_async::<i64>(&mut c)
                    .await
                    .map(|written| written == 1)
            })
            .await
        })
    }

    fn platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(
            self.run(
                move |mut c| async move { c.hget(key("tokens", uid.as_str()), platform).await },
            ),
        )
    }

    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.hkeys(key("tokens", uid.as_str())).await })
                .await?;
            list.sort();
            Ok(list)
        })
    }

    fn delete_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed: i64 = self
                .run(
                    move |mut c| async move { c.hdel(key("tokens", uid.as_str()), platform).await },
                )
                .await?;
            Ok(removed > 0)
        })
    }

    fn replace_platform_token<'a>(
        &'a self,
        old: SealedToken<'a>,
        new: &'a [u8],
    ) -> StoreFuture<'a, bool> {
        let (uid, platform, old) = (old.uid, old.platform, old.sealed);
        Box::pin(async move {
            let done: i64 = self
                .run(move |mut c| async move {
                    self.replace
                        .key(key("tokens", uid.as_str()))
                        .arg(platform)
                        .arg(old)
                        .arg(new)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(done == 1)
        })
    }

    fn platform_tokens_page<'a>(&'a self, cursor: Option<&'a str>) -> StoreFuture<'a, TokenPage> {
        Box::pin(async move {
            let cursor: u64 = match cursor {
                None => 0,
                Some(text) => text
                    .parse()
                    .map_err(|_| StoreError::Invalid("not a token listing cursor".into()))?,
            };
            let pattern = format!("{KEY_PREFIX}tokens:*");
            let (next, keys): (u64, Vec<String>) = self
                .run(move |mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let mut page = TokenPage {
                tokens: Vec::new(),
                next: (next != 0).then(|| next.to_string()),
            };
            let tokens_prefix = format!("{KEY_PREFIX}tokens:");
            for name in keys {
                let Some(uid) = name
                    .strip_prefix(tokens_prefix.as_str())
                    .and_then(|u| UserId::parse(u).ok())
                else {
                    continue;
                };
                let fields: std::collections::HashMap<String, Vec<u8>> = self
                    .run(move |mut c| async move { c.hgetall(name).await })
                    .await?;
                for (platform, sealed) in fields {
                    page.tokens.push(StoredToken {
                        uid: uid.clone(),
                        platform,
                        sealed,
                    });
                }
            }
            Ok(page)
        })
    }
}
