//! Owns the [`crate::Revocations`] domain: revocation records and their events in Redis (key schema: `SCHEMA.md`).

use super::*;

impl Revocations for RedisStore {
    fn revoke_user<'a>(&'a self, uid: &'a UserId, revocation: Revocation) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.merge_revocation(uid, revocation, REVOCATION_CHANNEL)
                .await
                .map(|_| ())
        })
    }

    fn record_revocation<'a>(
        &'a self,
        uid: &'a UserId,
        revocation: Revocation,
    ) -> StoreFuture<'a, Revocation> {
        Box::pin(self.merge_revocation(uid, revocation, ""))
    }

    fn restore_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        Box::pin(
            self.run(move |mut c| async move { c.del::<_, ()>(self.key("revoked", uid)).await }),
        )
    }

    fn revocation<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<Revocation>> {
        Box::pin(async move {
            let raw: Option<String> = self
                .run(move |mut c| async move { c.get(self.key("revoked", uid)).await })
                .await?;
            Ok(raw.as_deref().map(Revocation::decode))
        })
    }

    fn revocations<'a>(&'a self, uids: &'a [UserId]) -> StoreFuture<'a, Vec<Option<Revocation>>> {
        Box::pin(async move {
            if uids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = uids.iter().map(|uid| self.key("revoked", uid)).collect();
            let raw: Vec<Option<String>> = self
                .run(move |mut c| async move { c.mget(keys).await })
                .await?;
            Ok(raw
                .iter()
                .map(|raw| raw.as_deref().map(Revocation::decode))
                .collect())
        })
    }

    fn revocation_events(&self) -> broadcast::Receiver<RevocationEvent> {
        let receiver = self.events.subscribe();
        self.subscriber.call_once(|| {
            let nodes = match self.redis.target().node_clients() {
                Ok(nodes) => nodes,
                Err(error) => {
                    tracing::warn!(%error, "cannot make a client for the revocation channel; only the periodic poll will see revocations");
                    return;
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(relay_revocations(
                        nodes,
                        self.events.clone(),
                        self.stop.clone(),
                    ));
                }
                Err(_) => tracing::warn!(
                    "revocation events need a Tokio runtime; only the periodic poll will see revocations"
                ),
            }
        });
        receiver
    }
}
