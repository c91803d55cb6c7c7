//! Owns the [`crate::Revocations`] domain: revocation records and their events in the redb file (key schema: `SCHEMA.md`).

use super::*;

impl Revocations for EmbeddedStore {
    fn revoke_user<'a>(&'a self, uid: &'a UserId, revocation: Revocation) -> StoreFuture<'a, ()> {
        let write = self.record_revocation(uid, revocation);
        let uid = uid.clone();
        let events = self.events.clone();
        Box::pin(async move {
            let revocation = write.await?;
            // No subscriber is fine: nobody is listening yet.
            let _ = events.send(RevocationEvent::Revoked { uid, revocation });
            Ok(())
        })
    }

    fn record_revocation<'a>(
        &'a self,
        uid: &'a UserId,
        revocation: Revocation,
    ) -> StoreFuture<'a, Revocation> {
        let name = uid.as_str().to_owned();
        self.write(move |txn| {
            let merged = {
                let mut all = txn.open_table(REVOKED).map_err(db_err)?;
                let mut before = txn.open_table(REVOKED_BEFORE).map_err(db_err)?;
                let merged = match read_revocation(&all, &before, &name)? {
                    Some(old) => old.merge(revocation),
                    None => revocation,
                };
                match merged {
                    Revocation::All => {
                        all.insert(name.as_str(), protocol::claims::now_secs())
                            .map_err(db_err)?;
                        before.remove(name.as_str()).map_err(db_err)?;
                    }
                    Revocation::IssuedBefore(cutoff) => {
                        before.insert(name.as_str(), cutoff).map_err(db_err)?;
                    }
                }
                merged
            };
            Ok(merged)
        })
    }

    fn restore_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.write(move |txn| {
            txn.open_table(REVOKED)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            txn.open_table(REVOKED_BEFORE)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn revocation<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<Revocation>> {
        let uid = uid.as_str().to_owned();
        self.read(move |txn| {
            let all = txn.open_table(REVOKED).map_err(db_err)?;
            let before = txn.open_table(REVOKED_BEFORE).map_err(db_err)?;
            read_revocation(&all, &before, &uid)
        })
    }

    fn revocation_events(&self) -> broadcast::Receiver<RevocationEvent> {
        self.events.subscribe()
    }
}
