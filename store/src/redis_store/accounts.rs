//! Owns the [`crate::Accounts`] domain: deleting a user across domains in
//! Redis (key schema: `SCHEMA.md`), as ordered steps that each touch one
//! user's slot, so that it runs on a cluster too.

use super::*;

impl Accounts for RedisStore {
    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        // First the user's traces in other users' sets (read from the
        // user's own sets, which stay until the end), then the user's keys:
        // a failure midway leaves the lists in place, and deleting again
        // finishes the work.
        Box::pin(async move {
            let (contacts, incoming, outgoing): (Vec<String>, Vec<String>, Vec<String>) = self
                .run(move |mut c| async move {
                    redis::pipe()
                        .smembers(self.key("contacts", uid))
                        .smembers(self.key("requests:in", uid))
                        .smembers(self.key("requests:out", uid))
                        .query_async(&mut c)
                        .await
                })
                .await?;
            // The other user's set that names this user, for each entry.
            let traces = contacts
                .iter()
                .map(|other| ("contacts", other))
                .chain(incoming.iter().map(|other| ("requests:out", other)))
                .chain(outgoing.iter().map(|other| ("requests:in", other)))
                .filter_map(|(kind, other)| {
                    UserId::parse(other)
                        .ok()
                        .map(|other| self.key(kind, &other))
                });
            for set in traces {
                self.run(move |mut c| async move { c.srem::<_, _, ()>(set, uid.as_str()).await })
                    .await?;
            }
            self.run(move |mut c| async move {
                c.del::<_, ()>(
                    [
                        "key",
                        "contacts",
                        "requests:in",
                        "requests:out",
                        "reg",
                        "tokens",
                    ]
                    .map(|kind| self.key(kind, uid))
                    .to_vec(),
                )
                .await
            })
            .await
        })
    }
}
