//! Owns acting on revocations in a running broker: the live sessions a
//! user's revocation refuses are ended as the store announces it (and once
//! more a second later, for a connection whose CONNECT check ran just before
//! the revocation was written), with a periodic sweep as the fallback for
//! events lost in an outage; an event also drops the user's refused delayed
//! wills. Apart from `revocation`, which only answers whether a token is
//! refused, so that the configuration can hold a checker without reaching
//! the sessions.

use crate::revocation::Revocations;
use crate::sessions::{EndRequest, LiveDevice, SessionRegistry};
use crate::wills::Wills;
use futures::StreamExt;
use protocol::UserId;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use store::{Revocation, RevocationEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Users whose revocations one read of a sweep fetches.
const SWEEP_BATCH: usize = 500;

/// How many of a sweep's reads run at once.
const SWEEP_CONCURRENCY: usize = 4;

/// After an event, the user's sessions are checked once more this much
/// later: a connection that passed its CONNECT check just before the
/// revocation was written may register its session just after the event.
const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// Most pending re-checks; beyond this the oldest are dropped (the periodic
/// sweep still covers them).
const MAX_RECHECKS: usize = 10_000;

impl Revocations {
    /// Ends the sessions of `uid` that `revocation` refuses; returns how many.
    fn end_refused(uid: &UserId, revocation: Revocation, sessions: &[LiveDevice]) -> usize {
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

    /// Re-checks every live device session against the store, a batch of
    /// users per read (one `MGET` on Redis, not one `GET` per user: at
    /// 45,000 users and a 5 s poll that was 9,000 commands a second).
    async fn sweep(&self, sessions: &SessionRegistry) {
        let mut live = sessions.device_sessions();
        let mut batches = Vec::with_capacity(live.len().div_ceil(SWEEP_BATCH));
        while !live.is_empty() {
            let rest = live.split_off(live.len().min(SWEEP_BATCH));
            batches.push(std::mem::replace(&mut live, rest));
        }
        futures::stream::iter(batches)
            .map(|batch| self.check_batch(batch))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .collect::<()>()
            .await;
    }

    /// One read of a sweep: ends the sessions of `batch` their users'
    /// revocations refuse.
    async fn check_batch(&self, batch: Vec<(UserId, Vec<LiveDevice>)>) {
        let uids: Vec<UserId> = batch.iter().map(|(uid, _)| uid.clone()).collect();
        match self.store.revocations(&uids).await {
            Ok(found) => {
                for ((uid, devices), revocation) in batch.iter().zip(found) {
                    if let Some(revocation) = revocation {
                        Self::end_refused(uid, revocation, devices);
                    }
                }
            }
            Err(e) => warn!(
                users = uids.len(),
                error = %e,
                "revocation sweep failed for a batch; the next sweep retries"
            ),
        }
    }

    /// Ends refused sessions as revocation events arrive, and sweeps every
    /// poll interval (and whenever events may have been missed) until
    /// `shutdown`.
    pub async fn watch(
        self: Arc<Self>,
        sessions: Arc<SessionRegistry>,
        wills: Wills,
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
        let mut rechecks: VecDeque<(Instant, UserId, Revocation)> = VecDeque::new();
        loop {
            let event = async {
                match events.as_mut() {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            };
            let next_recheck = rechecks.front().map(|(at, _, _)| *at);
            let recheck_due = async {
                match next_recheck {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = recheck_due => {
                    if let Some((_, uid, revocation)) = rechecks.pop_front() {
                        Self::end_refused(&uid, revocation, &sessions.sessions_of(&uid));
                    }
                }
                _ = ticks.tick() => {
                    if !self.poll_interval.is_zero() {
                        self.sweep(&sessions).await;
                    }
                }
                received = event => match received {
                    Ok(RevocationEvent::Revoked { uid, revocation }) => {
                        Self::end_refused(&uid, revocation, &sessions.sessions_of(&uid));
                        // Checked again when due; dropped now to free them.
                        wills.drop_revoked(&uid, revocation);
                        if rechecks.len() >= MAX_RECHECKS {
                            rechecks.pop_front();
                        }
                        rechecks.push_back((Instant::now() + RECHECK_AFTER, uid, revocation));
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
    use crate::revocation::tests::store;

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
        let (wills, _queue) = Wills::new(10, 1 << 20);
        let watcher = tokio::spawn(revocations.watch(registry.clone(), wills, shutdown.clone()));
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

        // A session that registers just after the event (its CONNECT check
        // ran before the revocation was written) is caught by the re-check.
        let late = registry
            .claim("D:u1:c".into(), Some(&device_issued("u1", Some(20))))
            .await;
        let ended = tokio::time::timeout(
            Duration::from_secs(3),
            std::future::poll_fn(|cx| late.end.poll_requested(cx)),
        )
        .await
        .expect("re-checked within 3 s");
        assert_eq!(ended, EndRequest::Revoked);
        assert_eq!(fresh.end.requested(), None);
        shutdown.cancel();
        watcher.await.unwrap();
    }

    #[tokio::test]
    async fn the_sweep_reads_users_in_batches_and_ends_only_the_refused() {
        let (_dir, store) = store().await;
        let revocations = Arc::new(Revocations::new(store.clone(), Duration::from_millis(50)));
        let shutdown = CancellationToken::new();
        let registry = Arc::new(SessionRegistry::new(shutdown.clone()));
        // More users than one batch holds, so the sweep reads several.
        let users = SWEEP_BATCH * 2 + 7;
        let mut claims = Vec::with_capacity(users);
        for n in 0..users {
            let id = format!("D:sweep{n}:a");
            let device = device_issued(&format!("sweep{n}"), Some(10));
            claims.push(registry.claim(id, Some(&device)).await);
        }
        // Recorded without an announcement: only the sweep can find them.
        let refused = [3, SWEEP_BATCH + 1, users - 1];
        for n in refused {
            let uid = UserId::parse(&format!("sweep{n}")).unwrap();
            store
                .record_revocation(&uid, Revocation::IssuedBefore(100))
                .await
                .unwrap();
        }
        let (wills, _queue) = Wills::new(10, 1 << 20);
        let watcher = tokio::spawn(revocations.watch(registry.clone(), wills, shutdown.clone()));
        for n in refused {
            let ended = tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| claims[n].end.poll_requested(cx)),
            )
            .await
            .expect("the sweep ends a refused session");
            assert_eq!(ended, EndRequest::Revoked);
        }
        let ended = claims
            .iter()
            .filter(|c| c.end.requested().is_some())
            .count();
        assert_eq!(ended, refused.len(), "only the refused sessions end");
        shutdown.cancel();
        watcher.await.unwrap();
    }
}
