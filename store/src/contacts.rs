//! Owns contact requests and contacts: the [`Contacts`] domain (the
//! contacts handler).

use crate::StoreFuture;
use protocol::uid::UserId;

/// Contact requests and the contact pairs they become.
pub trait Contacts: Send + Sync + 'static {
    /// (idempotent).
    fn add_contact_request<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, ()>;

    /// Who is waiting for `target` to accept them, sorted.
    fn pending_requests<'a>(&'a self, target: &'a UserId) -> StoreFuture<'a, Vec<String>>;

    /// If `requester` has a pending request to `target`, removes it and makes
    /// them contacts of each other, atomically, and returns `true`; otherwise
    /// changes nothing and returns `false`.
    fn accept_contact<'a>(
        &'a self,
        requester: &'a UserId,
        target: &'a UserId,
    ) -> StoreFuture<'a, bool>;

    /// The user's contacts, sorted.
    fn contacts<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>>;
}
