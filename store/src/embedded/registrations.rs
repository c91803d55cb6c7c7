//! Owns the [`crate::Registrations`] domain in the redb file (key schema: `SCHEMA.md`).

use super::*;

impl Registrations for EmbeddedStore {
    fn put_registration<'a>(&'a self, uid: &'a UserId, registered_at: u64) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.write(move |txn| {
            txn.open_table(REGISTRATIONS)
                .map_err(db_err)?
                .insert(uid.as_str(), registered_at)
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn registration<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<u64>> {
        let uid = uid.as_str().to_owned();
        self.read(move |txn| {
            let table = txn.open_table(REGISTRATIONS).map_err(db_err)?;
            let at = table.get(uid.as_str()).map_err(db_err)?;
            Ok(at.map(|v| v.value()))
        })
    }
}
