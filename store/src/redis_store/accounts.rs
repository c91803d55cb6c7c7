//! Owns the [`crate::Accounts`] domain: deleting a user across domains in Redis (key schema: `SCHEMA.md`).

use super::*;

impl Accounts for RedisStore {
    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        Box::pin(self.run(move |mut c| async move {
            self.delete
                .arg(KEY_PREFIX)
                .arg(uid.as_str())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
        }))
    }
}
