//! Owns the [`crate::Contacts`] domain: contact requests and contacts in Redis (key schema: `SCHEMA.md`).

use super::*;

impl Contacts for RedisStore {
    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            redis::pipe()
                .atomic()
                .sadd(key("requests:in", target.as_str()), requester.as_str())
                .ignore()
                .sadd(key("requests:out", requester.as_str()), target.as_str())
                .ignore()
                .query_async::<()>(&mut c)
                .await
        }))
    }

    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> =
                self.run(move |mut c| async move {
                    c.smembers(key("requests:in", target.as_str())).await
                })
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
        Box::pin(async move {
            let done: i64 = self
                .run(move |mut c| async move {
                    self.accept
                        .key(key("requests:in", target.as_str()))
                        .key(key("requests:out", requester.as_str()))
                        .key(key("contacts", requester.as_str()))
                        .key(key("contacts", target.as_str()))
                        .arg(requester.as_str())
                        .arg(target.as_str())
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(done == 1)
        })
    }

    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut list: Vec<String> = self
                .run(move |mut c| async move { c.smembers(key("contacts", uid.as_str())).await })
                .await?;
            list.sort();
            Ok(list)
        })
    }
}
