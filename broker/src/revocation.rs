//! Owns user revocation: a revoked user (the store's revocation flag, set by
//! operators or `Store::set_revoked`) is refused at CONNECT and its live
//! sessions are ended within one poll interval.

use crate::sessions::{EndRequest, SessionRegistry};
use futures::StreamExt;
use shared::store::Store;
use shared::UserId;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
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
    pub fn new(store: Arc<dyn Store>, poll_interval: Duration) -> Self {
        Revocations {
            store,
            poll_interval,
        }
    }

    /// Whether `uid` is revoked. A store that does not answer lets the user
    /// in (and says so in the log): an outage must not lock every user out.
    pub async fn is_revoked(&self, uid: &UserId) -> bool {
        match self.store.is_revoked(uid).await {
            Ok(revoked) => revoked,
            Err(e) => {
                warn!(%uid, error = %e, "revocation check failed; allowing");
                false
            }
        }
    }

    /// Every poll interval, ends the sessions of users revoked since.
    pub async fn watch(
        self: Arc<Self>,
        sessions: Arc<SessionRegistry>,
        shutdown: CancellationToken,
    ) {
        if self.poll_interval.is_zero() {
            return;
        }
        let mut ticks = tokio::time::interval(self.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let live = sessions.device_sessions();
            let revoked: Vec<_> = futures::stream::iter(live)
                .map(|(uid, sessions)| {
                    let this = self.clone();
                    async move { this.is_revoked(&uid).await.then_some((uid, sessions)) }
                })
                .buffer_unordered(SWEEP_CONCURRENCY)
                .filter_map(|found| async move { found })
                .collect()
                .await;
            for (uid, sessions) in revoked {
                info!(%uid, sessions = sessions.len(), "user revoked: ending sessions");
                for session in sessions {
                    session.request(EndRequest::Revoked);
                }
            }
        }
    }
}
