//! Owns the [`crate::Contacts`] domain: contact requests and contacts in Redis (key schema: `SCHEMA.md`).

use super::*;

impl Contacts for RedisStore {
    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()> {
        // Two steps, each in one user's slot. The requester's index first:
        // if the second step never runs, the index only holds a name that
        // deleting the requester removes from nowhere.
        Box::pin(async move {
            self.run(move |mut c| async move {
                c.sadd::<_, _, ()>(self.key("requests:out", requester), target.as_str())
                    .await
            })
            .await?;
            self.run(move |mut c| async move {
                c.sadd::<_, _, ()>(self.key("requests:in", target), requester.as_str())
                    .await
            })
            .await
        })
    }

    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.smembers(self.key("requests:in", target)).await })
                .await?;
            list.sort();
            Ok(list)
        })
    }

    fn accept_contact<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, bool> {
        // Two steps, each in one user's slot: the target's side (the
        // request goes, the contact comes, atomically), then the
        // requester's. A failure between them leaves a one-way contact that
        // accepting again completes (the script answers 2).
        Box::pin(async move {
            let done: i64 = self
                .run(move |mut c| async move {
                    self.accept
                        .key(self.key("requests:in", target))
                        .key(self.key("contacts", target))
                        .arg(requester.as_str())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            if done == 0 {
                return Ok(false);
            }
            self.run(move |mut c| async move {
                redis::pipe()
                    .atomic()
                    .srem(self.key("requests:out", requester), target.as_str())
                    .ignore()
                    .sadd(self.key("contacts", requester), target.as_str())
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
            Ok(done == 1)
        })
    }

    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.smembers(self.key("contacts", uid)).await })
                .await?;
            list.sort();
            Ok(list)
        })
    }
}
