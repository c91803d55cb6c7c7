//! Owns the [`crate::Accounts`] domain: deleting a user across domains in the redb file (key schema: `SCHEMA.md`).

use super::*;

impl Accounts for EmbeddedStore {
    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()> {
        let uid = uid.as_str().to_owned();
        self.write(move |txn| {
            txn.open_table(KEYS)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            {
                let mut contacts = txn.open_multimap_table(CONTACTS).map_err(db_err)?;
                for other in sorted_values(&contacts, &uid)? {
                    contacts
                        .remove(other.as_str(), uid.as_str())
                        .map_err(db_err)?;
                }
                contacts.remove_all(uid.as_str()).map_err(db_err)?;
                let mut incoming = txn.open_multimap_table(REQUESTS_IN).map_err(db_err)?;
                let mut outgoing = txn.open_multimap_table(REQUESTS_OUT).map_err(db_err)?;
                for requester in sorted_values(&incoming, &uid)? {
                    outgoing
                        .remove(requester.as_str(), uid.as_str())
                        .map_err(db_err)?;
                }
                for target in sorted_values(&outgoing, &uid)? {
                    incoming
                        .remove(target.as_str(), uid.as_str())
                        .map_err(db_err)?;
                }
                incoming.remove_all(uid.as_str()).map_err(db_err)?;
                outgoing.remove_all(uid.as_str()).map_err(db_err)?;
            }
            txn.open_table(REGISTRATIONS)
                .map_err(db_err)?
                .remove(uid.as_str())
                .map_err(db_err)?;
            {
                let (from, to) = token_range(&uid);
                txn.open_table(TOKENS)
                    .map_err(db_err)?
                    .retain_in(from.as_str()..to.as_str(), |_, _| false)
                    .map_err(db_err)?;
            }
            Ok(())
        })
    }
}
