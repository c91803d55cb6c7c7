//! Owns deleting a user's data, the one operation that spans every domain
//! ([`Accounts`]; account deletion and `/unregister`).

use crate::StoreFuture;
use protocol::uid::UserId;

/// Deleting a user's data across domains.
pub trait Accounts: Send + Sync + 'static {
    /// Deletes the user's key, contacts (both directions), contact requests
    /// (both directions), platform tokens and registration. Revocations are
    /// kept: deleting data must not un-revoke anyone. Nonces expire on their
    /// own.
    fn delete_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()>;
}
