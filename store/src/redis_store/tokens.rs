//! Owns the [`crate::PlatformTokens`] domain: sealed platform tokens in Redis (key schema: `SCHEMA.md`).

use super::*;
use crate::SealedToken;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

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
                c.hset::<_, _, _, ()>(self.key("tokens", uid), platform, sealed)
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
                    .key(self.key("revoked", uid))
                    .key(self.key("tokens", uid))
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
            self.run(move |mut c| async move { c.hget(self.key("tokens", uid), platform).await }),
        )
    }

    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.hkeys(self.key("tokens", uid)).await })
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
                .run(move |mut c| async move { c.hdel(self.key("tokens", uid), platform).await })
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
                        .key(self.key("tokens", uid))
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
            let cursor = match cursor {
                None => ScanCursor::default(),
                Some(text) => ScanCursor::parse(text)
                    .ok_or_else(|| StoreError::Invalid("not a token listing cursor".into()))?,
            };
            let (next, keys) = self.scan_tokens(cursor).await?;
            let mut page = TokenPage {
                tokens: Vec::new(),
                next: next.map(|n| n.to_string()),
            };
            let tokens_prefix = format!("{KEY_PREFIX}tokens:");
            for name in keys {
                let Some(uid) = self
                    .layout
                    .uid_in(&name, &tokens_prefix)
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

/// Where a token listing stands: on a cluster, which master (named by the
/// lowest slot it serves) and that master's `SCAN` cursor; on one Redis,
/// only the `SCAN` cursor (slot 0). Written `<slot>:<cursor>`, or
/// `<cursor>` for slot 0 (the form a single Redis has always used).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ScanCursor {
    slot: u16,
    cursor: u64,
}

impl ScanCursor {
    fn parse(text: &str) -> Option<ScanCursor> {
        match text.split_once(':') {
            None => Some(ScanCursor {
                slot: 0,
                cursor: text.parse().ok()?,
            }),
            Some((slot, cursor)) => Some(ScanCursor {
                slot: slot.parse().ok().filter(|s| *s < SLOTS)?,
                cursor: cursor.parse().ok()?,
            }),
        }
    }
}

impl std::fmt::Display for ScanCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.slot == 0 {
            write!(f, "{}", self.cursor)
        } else {
            write!(f, "{}:{}", self.slot, self.cursor)
        }
    }
}

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

impl RedisStore {
    /// One `SCAN` step over the tokens keys: the keys found and where to go
    /// on (`None`: done). On a cluster, each master is scanned in turn (a
    /// `SCAN` only sees its own node); a slot that moves during a listing
    /// may make it repeat or miss that slot's keys, which the master-key
    /// rotation tolerates (it is re-run until nothing is left to re-seal).
    async fn scan_tokens(
        &self,
        at: ScanCursor,
    ) -> Result<(Option<ScanCursor>, Vec<String>), StoreError> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(at.cursor)
            .arg("MATCH")
            .arg(format!("{KEY_PREFIX}tokens:*"))
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<String>) = self
            .run(|c| async move {
                match c {
                    RedisConn::Single(mut c) => scan.query_async(&mut c).await,
                    RedisConn::Cluster(mut c) => {
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                            Route::new(at.slot, SlotAddr::Master),
                        ));
                        let reply = c.route_command(&scan, route).await?;
                        Ok(redis::from_owned_redis_value(reply)?)
                    }
                }
            })
            .await?;
        if next != 0 {
            return Ok((Some(ScanCursor { cursor: next, ..at }), keys));
        }
        if !self.is_cluster() {
            return Ok((None, keys));
        }
        // This master is done: on to the master with the next lowest slot.
        let masters = self.master_first_slots().await?;
        let following = masters.into_iter().find(|&slot| slot > at.slot);
        Ok((following.map(|slot| ScanCursor { slot, cursor: 0 }), keys))
    }

    /// The lowest slot each cluster master serves, ascending.
    async fn master_first_slots(&self) -> Result<Vec<u16>, StoreError> {
        let ranges: Vec<redis::Value> = self
            .run(
                |mut c| async move { redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await },
            )
            .await?;
        let mut first: std::collections::HashMap<Vec<u8>, u16> = std::collections::HashMap::new();
        for range in ranges {
            // [start, end, [host, port, id, ...], replicas...]
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let mut fields = fields.into_iter();
            let (Some(start), Some(_end), Some(redis::Value::Array(master))) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(start) = redis::from_owned_redis_value::<u16>(start) else {
                continue;
            };
            let id = match master.into_iter().nth(2) {
                Some(redis::Value::BulkString(id)) => id,
                _ => continue,
            };
            let entry = first.entry(id).or_insert(start);
            *entry = (*entry).min(start);
        }
        let mut slots: Vec<u16> = first.into_values().collect();
        slots.sort_unstable();
        Ok(slots)
    }
}
