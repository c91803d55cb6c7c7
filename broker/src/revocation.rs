//! Owns user revocation: a token the store's revocation of its user refuses
//! (every token for `All`; one issued before the cut-off for `IssuedBefore`,
//! a token without `iat` counting as issued at 0) is refused at CONNECT, and
//! the live sessions it opened are ended within moments of the revocation:
//! the store's revocation events (Redis pub/sub across processes, an
//! in-process broadcast for the embedded store) end them at once, and a
//! periodic sweep is the fallback for events lost in an outage.
//!
//! Re-registration rule: deleting an account (`delete_account`,
//! `/unregister`) records `IssuedBefore(now + 1)`, so the identity provider
//! issues a working token again to a re-registered user by giving it an
//! `iat` at or after that second (a token minted in the same second as the
//! deletion is refused: wait for the next second).

use crate::auth::DeviceIdentity;
use crate::sessions::{EndRequest, LiveDevice, SessionRegistry};
use futures::StreamExt;
use shared::store::{Revocation, RevocationEvent, Store};
use shared::UserId;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How many revocation look-ups run at once during a sweep.
const SWEEP_CONCURRENCY: usize = 32;

/// Revocation checks against a store.
pub struct Revocations {
    store: Arc<dyn Store>,
    poll_interval: Duration,
}

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocations")
            .field("store", &self.store.kind())
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl Revocations {
    /// Checks against `store`; `poll_interval` is the fallback sweep (zero:
    /// none, only CONNECT checks and events).
    pub fn new(store: Arc<dyn Store>, poll_interval: Duration) -> Self {
        Revocations {
            store,
            poll_interval,
        }
    }

    /// The user's revocation. A store that does not answer lets the user in
    /// (and says so in the log): an outage must not lock every user out.
    async fn revocation_of(&self, uid: &UserId) -> Option<Revocation> {
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

    /// Ends the sessions of `uid` that `revocation` refuses; returns how many.
    fn end_refused(uid: &UserId, revocation: Revocation, sessions: Vec<LiveDevice>) -> usize {
        let mut ended = 0;
        for session in sessions {
            if revocation.refuses(session.issued_at) {
                session.end.request(EndRequest::Revoked);
                ended += 1;
            }
        }
        if ended > 0 {
            info!(%uid, sessions = ended, "user revoked: ending sessions");
        }
        ended
    }

    /// Re-checks every live device session against the store.
    async fn sweep(&self, sessions: &SessionRegistry) {
        let live = sessions.device_sessions();
        let found: Vec<_> = futures::stream::iter(live)
            .map(|(uid, devices)| async move {
                self.revocation_of(&uid)
                    .await
                    .map(|revocation| (uid, revocation, devices))
            })
            .buffer_unordered(SWEEP_CONCURRENCY)
            .filter_map(|found| async move { found })
            .collect()
            .await;
        for (uid, revocation, devices) in found {
            Self::end_refused(&uid, revocation, devices);
        }
    }

    /// Ends refused sessions as revocation events arrive, and sweeps every
    /// poll interval (and whenever events may have been missed) until
    /// `shutdown`.
    pub async fn watch(
        self: Arc<Self>,
        sessions: Arc<SessionRegistry>,
        shutdown: CancellationToken,
    ) {
        let mut events = Some(self.store.revocation_events());
        // A zero interval disables the sweep; the tick then never fires.
        let poll = if self.poll_interval.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            self.poll_interval
        };
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: skip it (CONNECT checks every newcomer).
        ticks.tick().await;
        loop {
            let event = async {
                match events.as_mut() {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    if !self.poll_interval.is_zero() {
                        self.sweep(&sessions).await;
                    }
                }
                received = event => match received {
                    Ok(RevocationEvent::Revoked { uid, revocation }) => {
                        Self::end_refused(&uid, revocation, sessions.sessions_of(&uid));
                    }
                    Ok(RevocationEvent::Resync) | Err(RecvError::Lagged(_)) => {
                        info!("revocation events may have been missed; checking every session");
                        self.sweep(&sessions).await;
                    }
                    Err(RecvError::Closed) => {
                        warn!("revocation events ended; relying on the periodic check");
                        events = None;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::device_issued;
    use shared::store::EmbeddedStore;

    async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
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

    #[tokio::test]
    async fn events_end_only_the_refused_sessions_at_once() {
        let (_dir, store) = store().await;
        // No sweep: only the event can end the session.
        let revocations = Arc::new(Revocations::new(store.clone(), Duration::ZERO));
        let shutdown = CancellationToken::new();
        let registry = Arc::new(SessionRegistry::new(shutdown.clone()));
        let old = registry
            .claim("D:u1:a".into(), Some(&device_issued("u1", Some(10))))
            .await;
        let fresh = registry
            .claim("D:u1:b".into(), Some(&device_issued("u1", Some(500))))
            .await;
        let other = registry
            .claim("D:u2:a".into(), Some(&device_issued("u2", Some(10))))
            .await;
        let watcher = tokio::spawn(revocations.watch(registry.clone(), shutdown.clone()));
        // Let the watcher subscribe before revoking.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let uid = UserId::parse("u1").unwrap();
        store
            .revoke_user(&uid, Revocation::IssuedBefore(100))
            .await
            .unwrap();
        let ended = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| old.end.poll_requested(cx)),
        )
        .await
        .expect("ended within 2 s");
        assert_eq!(ended, EndRequest::Revoked);
        assert_eq!(fresh.end.requested(), None);
        assert_eq!(other.end.requested(), None);
        shutdown.cancel();
        watcher.await.unwrap();
    }
}
