//! Owns the [`crate::Registrations`] domain in Redis (key schema: `SCHEMA.md`).

use super::*;

impl Registrations for RedisStore {
    fn put_registration<'a>(&'a self, uid: &'a UserId, registered_at: u64) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            c.set::<_, _, ()>(self.key("reg", uid), registered_at).await
        }))
    }

    fn registration<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<u64>> {
        Box::pin(self.run(move |mut c| async move { c.get(self.key("reg", uid)).await }))
    }
}
