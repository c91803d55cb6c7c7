//! Owns the [`crate::Contacts`] domain: contact requests and contacts in the redb file (key schema: `SCHEMA.md`).

use super::*;

impl Contacts for EmbeddedStore {
    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()> {
        let (requester, target) = (requester.as_str().to_owned(), target.as_str().to_owned());
        self.write(move |txn| {
            txn.open_multimap_table(REQUESTS_IN)
                .map_err(db_err)?
                .insert(target.as_str(), requester.as_str())
                .map_err(db_err)?;
            txn.open_multimap_table(REQUESTS_OUT)
                .map_err(db_err)?
                .insert(requester.as_str(), target.as_str())
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        let target = target.as_str().to_owned();
        self.read(move |txn| {
            let table = txn.open_multimap_table(REQUESTS_IN).map_err(db_err)?;
            sorted_values(&table, &target)
        })
    }

    fn accept_contact<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, bool> {
        let (requester, target) = (requester.as_str().to_owned(), target.as_str().to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            let had = txn
                .open_multimap_table(REQUESTS_IN)
                .map_err(db_err)?
                .remove(target.as_str(), requester.as_str())
                .map_err(db_err)?;
            if !had {
                txn.abort().map_err(db_err)?;
                return Ok(false);
            }
            txn.open_multimap_table(REQUESTS_OUT)
                .map_err(db_err)?
                .remove(requester.as_str(), target.as_str())
                .map_err(db_err)?;
            {
                let mut contacts = txn.open_multimap_table(CONTACTS).map_err(db_err)?;
                contacts
                    .insert(requester.as_str(), target.as_str())
                    .map_err(db_err)?;
                contacts
                    .insert(target.as_str(), requester.as_str())
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(true)
        })
    }

    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>> {
        let uid = uid.as_str().to_owned();
        self.read(move |txn| {
            let table = txn.open_multimap_table(CONTACTS).map_err(db_err)?;
            sorted_values(&table, &uid)
        })
    }
}
