//! Owns registrations: when a user registered with the identity service,
//! the [`Registrations`] domain.

use crate::StoreFuture;
use protocol::uid::UserId;

/// When each user registered.
pub trait Registrations: Send + Sync + 'static {
    /// Records that the user registered at `registered_at` (Unix seconds),
    /// replacing an earlier registration.
    fn put_registration<'a>(&'a self, uid: &'a UserId, registered_at: u64) -> StoreFuture<'a, ()>;

    /// When the user registered, if they are registered.
    fn registration<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<u64>>;
}
