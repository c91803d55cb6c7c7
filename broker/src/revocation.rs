//! Owns the question "does this user's revocation refuse this token?": a
//! token the store's revocation of its user refuses (every token for `All`;
//! one issued before the cut-off for `IssuedBefore`, a token without `iat`
//! counting as issued at 0) is refused at CONNECT, and every will is checked
//! again before it is published. Ending the live sessions and dropping the
//! delayed wills of a revoked user is `revocation_watch`.
//!
//! Re-registration rule: deleting an account (`delete_account`,
//! `/unregister`) records `IssuedBefore(now + 1)` before deleting anything,
//! so the identity provider issues a working token again to a re-registered
//! user by giving it an `iat` at or after that second (a token minted in the
//! same second as the deletion is refused: wait for the next second).

use crate::auth::DeviceIdentity;
use protocol::UserId;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use store::Revocation;
use tracing::warn;

/// Revocation checks against a store.
pub struct Revocations {
    pub(crate) store: Arc<dyn store::Revocations>,
    /// The fallback sweep of `revocation_watch` (zero: none).
    pub(crate) poll_interval: Duration,
}

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocations")
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl Revocations {
    /// Checks against `store`; `poll_interval` is the fallback sweep (zero:
    /// none, only CONNECT checks and events).
    pub fn new(store: Arc<dyn store::Revocations>, poll_interval: Duration) -> Self {
        Revocations {
            store,
            poll_interval,
        }
    }

    /// The user's revocation. A store that does not answer lets the user in
    /// (and says so in the log): an outage must not lock every user out.
    pub(crate) async fn revocation_of(&self, uid: &UserId) -> Option<Revocation> {
        match self.store.revocation(uid).await {
            Ok(revocation) => revocation,
            Err(e) => {
                warn!(%uid, error = %e, "revocation check failed; allowing");
                None
            }
        }
    }

    /// Whether the device's token is refused by its user's revocation.
    pub async fn refuses(&self, device: &DeviceIdentity) -> bool {
        self.revocation_of(device.uid())
            .await
            .is_some_and(|r| r.refuses(device.issued_at()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::testing::device_issued;
    use store::EmbeddedStore;

    pub(crate) async fn store() -> (tempfile::TempDir, Arc<dyn store::Revocations>) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"))
            .await
            .unwrap();
        (dir, Arc::new(store))
    }

    #[tokio::test]
    async fn connect_check_compares_iat_with_the_cutoff() {
        let (_dir, store) = store().await;
        let revocations = Revocations::new(store.clone(), Duration::ZERO);
        let uid = UserId::parse("u1").unwrap();
        let old = device_issued("u1", Some(99));
        let new = device_issued("u1", Some(100));
        let none = device_issued("u1", None);
        assert!(!revocations.refuses(&old).await);
        store
            .revoke_user(&uid, Revocation::IssuedBefore(100))
            .await
            .unwrap();
        assert!(revocations.refuses(&old).await);
        assert!(revocations.refuses(&none).await);
        assert!(!revocations.refuses(&new).await);
        assert!(!revocations.refuses(&device_issued("u2", Some(1))).await);
        store.revoke_user(&uid, Revocation::All).await.unwrap();
        assert!(revocations.refuses(&new).await);
        store.restore_user(&uid).await.unwrap();
        assert!(!revocations.refuses(&old).await);
    }
}
