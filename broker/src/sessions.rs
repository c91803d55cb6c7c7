//! Owns client identity in the router: the namespaced router client id of
//! each session (devices keyed by user, handlers apart, so no client can
//! reach another's session), and session takeover: a second connection with
//! the same id tells the first to end (MQTT 5 DISCONNECT 0x8E) and waits for it;
//! and the one signal that tells a live session to end, and why. Also the
//! CONNECT-time caps on identity: client id length, and persistent sessions
//! per user (counted from their first connection until they expire).

use crate::answers::ConnectRefusal;
use crate::auth::{DeviceIdentity, Principal};
use crate::config::Limits;
use crate::inbound::HeldQos2;
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use protocol::UserId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long a new connection waits for the session it replaces to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// The router client id of a device session: `D:<uid>:<escaped client id>`.
pub fn device_session_id(uid: &UserId, client_id: &str) -> String {
    format!("D:{}:{}", uid.as_str(), escape(client_id))
}

/// The router client id of a handler session: `H:<escaped client id>`.
pub fn handler_session_id(client_id: &str) -> String {
    format!("H:{}", escape(client_id))
}

/// Whether router session `id` is a handler's (see `handler_session_id`).
pub fn is_handler_session_id(id: &str) -> bool {
    id.starts_with("H:")
}

/// Percent-escapes the characters the router refuses in client ids
/// (`+ $ # /`) and `%` itself, so distinct ids stay distinct.
fn escape(client_id: &str) -> String {
    let mut out = String::with_capacity(client_id.len());
    for c in client_id.chars() {
        match c {
            '%' | '+' | '$' | '#' | '/' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Refuses a client id longer than the configured cap (MQTT 5 0x85, 3.1.1
/// code 2): ids are kept as router session names, possibly for days.
pub fn check_client_id(client_id: &str, limits: &Limits) -> Result<(), ConnectRefusal> {
    if client_id.len() > limits.max_client_id_bytes {
        return Err(ConnectRefusal::ClientIdNotValid("client id too long"));
    }
    Ok(())
}

/// Persistent device sessions the router keeps, by id and counted per user.
#[derive(Default)]
struct Persistent {
    owner: HashMap<String, UserId>,
    per_user: HashMap<UserId, usize>,
}

impl Persistent {
    fn forget(&mut self, id: &str) {
        let Some(uid) = self.owner.remove(id) else {
            return;
        };
        if let Some(count) = self.per_user.get_mut(&uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_user.remove(&uid);
            }
        }
    }
}

/// Why a live session is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndRequest {
    /// Another connection took its client id.
    TakenOver,
    /// Its user was revoked.
    Revoked,
    /// The broker is shutting down.
    ShuttingDown,
}

const NO_REASON: u8 = 0;
const TAKEN_OVER: u8 = 1;
const REVOKED: u8 = 2;
const SHUTTING_DOWN: u8 = 3;

/// Tells a live session to end, and why; the first reason given wins.
/// An atomic and a waker, not a cancellation token: the session polls it
/// on every turn of its loop, and a token's check takes a lock.
#[derive(Clone, Default)]
pub struct EndSignal(Arc<EndState>);

#[derive(Default)]
struct EndState {
    reason: AtomicU8,
    waker: AtomicWaker,
}

impl EndSignal {
    /// Asks the session to end for `why`.
    pub fn request(&self, why: EndRequest) {
        let code = match why {
            EndRequest::TakenOver => TAKEN_OVER,
            EndRequest::Revoked => REVOKED,
            EndRequest::ShuttingDown => SHUTTING_DOWN,
        };
        let first = self
            .0
            .reason
            .compare_exchange(NO_REASON, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.0.waker.wake();
        }
    }

    /// Why the session was asked to end, if it was.
    pub fn requested(&self) -> Option<EndRequest> {
        match self.0.reason.load(Ordering::Acquire) {
            TAKEN_OVER => Some(EndRequest::TakenOver),
            REVOKED => Some(EndRequest::Revoked),
            SHUTTING_DOWN => Some(EndRequest::ShuttingDown),
            _ => None,
        }
    }

    /// Ready with the reason once the session is asked to end.
    pub fn poll_requested(&self, cx: &mut Context<'_>) -> Poll<EndRequest> {
        if let Some(why) = self.requested() {
            return Poll::Ready(why);
        }
        self.0.waker.register(cx.waker());
        // A request between the check and the registration woke nobody.
        match self.requested() {
            Some(why) => Poll::Ready(why),
            None => Poll::Pending,
        }
    }
}

struct Entry {
    serial: u64,
    /// The user of a device session (handlers have none).
    uid: Option<UserId>,
    /// The `iat` of the device's token (revocations by time compare it).
    issued_at: Option<u64>,
    end: EndSignal,
    closed: oneshot::Receiver<()>,
}

/// A live device session, as revocation checks see it.
#[derive(Clone)]
pub struct LiveDevice {
    /// The `iat` of the token it connected with.
    pub issued_at: Option<u64>,
    /// Ends it.
    pub end: EndSignal,
}

/// Live sessions by router client id.
pub struct SessionRegistry {
    /// The broker's shutdown: every live session is asked to end then.
    shutdown: CancellationToken,
    next_serial: AtomicU64,
    live: Mutex<HashMap<String, Entry>>,
    /// How many of `live` are devices of each user (changed under the
    /// `live` lock): whether a user is connected here, without a scan.
    live_devices: Mutex<HashMap<UserId, usize>>,
    /// Persistent sessions whose client is away, with the serial of the
    /// connection that left them: only that one's expiry may end them.
    away: Mutex<HashMap<String, u64>>,
    /// Persistent device sessions, connected or away, until they expire.
    persistent: Mutex<Persistent>,
    /// The unreleased QoS 2 publishes persistent sessions left (only those
    /// that left any): the Receive Maximum counts them on the next
    /// connection, until an expiry or a clean session drops them. At most
    /// Receive Maximum packet ids per session.
    kept_qos2: Mutex<HashMap<String, HeldQos2>>,
}

/// Held by a live connection; dropping it releases the id and tells a
/// waiting successor that this session is gone.
pub struct SessionClaim {
    registry: Arc<SessionRegistry>,
    id: String,
    serial: u64,
    /// Asks this session to end: takeover, revocation, shutdown.
    pub end: EndSignal,
    _closed: oneshot::Sender<()>,
}

impl SessionRegistry {
    /// A registry whose sessions all end when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        SessionRegistry {
            shutdown,
            next_serial: AtomicU64::new(0),
            live: Mutex::default(),
            live_devices: Mutex::default(),
            away: Mutex::default(),
            persistent: Mutex::default(),
            kept_qos2: Mutex::default(),
        }
    }

    /// Keeps the unreleased QoS 2 publishes of persistent session `id`,
    /// whose connection ended.
    pub fn keep_qos2(&self, id: &str, held: HeldQos2) {
        if held.is_empty() {
            return;
        }
        let mut kept = self.kept_qos2.lock();
        match kept.get_mut(id) {
            Some(earlier) => earlier.absorb(held),
            None => {
                kept.insert(id.to_owned(), held);
            }
        }
    }

    /// What a new connection of session `id` takes over: the QoS 2
    /// publishes its persistent session left, or nothing when it starts
    /// clean (which ends that session in the router, and its publishes).
    pub fn resume_qos2(&self, id: &str, clean_start: bool) -> HeldQos2 {
        let kept = self.kept_qos2.lock().remove(id);
        match kept {
            Some(held) if !clean_start => held,
            _ => HeldQos2::default(),
        }
    }

    /// Session `id` expired: its QoS 2 publishes are dropped with it.
    pub fn release_qos2(&self, id: &str) {
        self.kept_qos2.lock().remove(id);
    }

    /// Admits a device's session `id` under the persistent-sessions-per-user
    /// cap: resuming a persistent session the user holds is always allowed, a
    /// new one only under the cap. A clean session replaces (and so ends) a
    /// persistent one of the same id in the router, which stops counting.
    /// Handlers are not capped here.
    pub fn admit(
        &self,
        id: &str,
        principal: &Principal,
        clean_session: bool,
        limits: &Limits,
    ) -> Result<(), ConnectRefusal> {
        let Principal::Device(device) = principal else {
            return Ok(());
        };
        let mut persistent = self.persistent.lock();
        if clean_session {
            persistent.forget(id);
            return Ok(());
        }
        if persistent.owner.contains_key(id) {
            return Ok(());
        }
        let uid = device.uid();
        let held = persistent.per_user.get(uid).copied().unwrap_or(0);
        if held >= limits.max_persistent_sessions_per_user {
            return Err(ConnectRefusal::QuotaExceeded(
                "too many persistent sessions for this user",
            ));
        }
        persistent.owner.insert(id.to_owned(), uid.clone());
        *persistent.per_user.entry(uid.clone()).or_default() += 1;
        Ok(())
    }

    /// Persistent device sessions counted for `uid`.
    pub fn persistent_sessions(&self, uid: &UserId) -> usize {
        self.persistent
            .lock()
            .per_user
            .get(uid)
            .copied()
            .unwrap_or(0)
    }

    /// Claims `id` (for `device`, or a handler when `None`), ending
    /// the connection that holds it first (if any).
    pub async fn claim(
        self: &Arc<Self>,
        id: String,
        device: Option<&DeviceIdentity>,
    ) -> SessionClaim {
        self.away.lock().remove(&id);
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let end = EndSignal::default();
        let (closed_tx, closed_rx) = oneshot::channel();
        let uid = device.map(|d| d.uid().clone());
        let previous = {
            let mut live = self.live.lock();
            if let Some(uid) = &uid {
                self.count_device(uid, true);
            }
            let previous = live.insert(
                id.clone(),
                Entry {
                    serial,
                    uid,
                    issued_at: device.and_then(DeviceIdentity::issued_at),
                    end: end.clone(),
                    closed: closed_rx,
                },
            );
            if let Some(uid) = previous.as_ref().and_then(|p| p.uid.as_ref()) {
                self.count_device(uid, false);
            }
            previous
        };
        // After the insert: either `end_all_at_shutdown` saw this session,
        // or this sees the shutdown.
        if self.shutdown.is_cancelled() {
            end.request(EndRequest::ShuttingDown);
        }
        if let Some(previous) = previous {
            previous.end.request(EndRequest::TakenOver);
            // Err means the sender was dropped: the old session is gone.
            if tokio::time::timeout(TAKEOVER_WAIT, previous.closed)
                .await
                .is_err()
            {
                tracing::warn!(session = %id, "replaced session did not close in time");
            }
        }
        SessionClaim {
            registry: self.clone(),
            id,
            serial,
            end,
            _closed: closed_tx,
        }
    }

    /// Records that `claim`'s client left a persistent session behind.
    pub fn left_away(&self, claim: &SessionClaim) {
        self.away.lock().insert(claim.id.clone(), claim.serial);
    }

    /// Whether a connection of session `id` is live here, or a client of
    /// it is away (a persistent session kept).
    pub fn is_held(&self, id: &str) -> bool {
        self.live.lock().contains_key(id) || self.away.lock().contains_key(id)
    }

    /// The serial of the connection that left persistent session `id`
    /// behind, while its client is away.
    pub fn away_serial(&self, id: &str) -> Option<u64> {
        self.away.lock().get(id).copied()
    }

    /// Takes `id` to end its session, if it is still the one `serial` left
    /// behind and no client has come back for it.
    pub fn claim_to_expire(self: &Arc<Self>, id: &str, serial: u64) -> Option<SessionClaim> {
        let mut live = self.live.lock();
        let mut away = self.away.lock();
        if live.contains_key(id) || away.get(id) != Some(&serial) {
            return None;
        }
        away.remove(id);
        // The session ends now: it no longer counts against its user.
        self.persistent.lock().forget(id);
        let own_serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (closed_tx, closed_rx) = oneshot::channel();
        let end = EndSignal::default();
        live.insert(
            id.to_owned(),
            Entry {
                serial: own_serial,
                uid: None,
                issued_at: None,
                end: end.clone(),
                closed: closed_rx,
            },
        );
        Some(SessionClaim {
            registry: self.clone(),
            id: id.to_owned(),
            serial: own_serial,
            end,
            _closed: closed_tx,
        })
    }

    /// Live device sessions grouped by user, with the signals that end them.
    pub fn device_sessions(&self) -> Vec<(UserId, Vec<LiveDevice>)> {
        let mut by_user: HashMap<UserId, Vec<LiveDevice>> = HashMap::new();
        for entry in self.live.lock().values() {
            if let Some(uid) = &entry.uid {
                by_user.entry(uid.clone()).or_default().push(LiveDevice {
                    issued_at: entry.issued_at,
                    end: entry.end.clone(),
                });
            }
        }
        by_user.into_iter().collect()
    }

    /// Whether a device of `uid` is connected here now (a persistent
    /// session whose client is away is not).
    pub fn has_live_device(&self, uid: &UserId) -> bool {
        self.live_devices.lock().contains_key(uid)
    }

    /// One more (or one less) live device session of `uid`; called with
    /// the `live` lock held.
    fn count_device(&self, uid: &UserId, added: bool) {
        let mut counts = self.live_devices.lock();
        if added {
            *counts.entry(uid.clone()).or_default() += 1;
        } else if let Some(count) = counts.get_mut(uid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(uid);
            }
        }
    }

    /// The live device sessions of one user.
    pub fn sessions_of(&self, uid: &UserId) -> Vec<LiveDevice> {
        self.live
            .lock()
            .values()
            .filter(|entry| entry.uid.as_ref() == Some(uid))
            .map(|entry| LiveDevice {
                issued_at: entry.issued_at,
                end: entry.end.clone(),
            })
            .collect()
    }

    /// Asks the live session `id` to end because a connection elsewhere
    /// (another node) took it over; false when it is not live here.
    pub fn end_taken_over(&self, id: &str) -> bool {
        match self.live.lock().get(id) {
            Some(entry) => {
                entry.end.request(EndRequest::TakenOver);
                true
            }
            None => false,
        }
    }

    /// Asks every live session to end once the broker shuts down.
    pub async fn end_all_at_shutdown(self: Arc<Self>) {
        self.shutdown.cancelled().await;
        for entry in self.live.lock().values() {
            entry.end.request(EndRequest::ShuttingDown);
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionClaim {
    /// The router client id this claim holds.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which connection holds it (increasing over the registry's life).
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

impl Drop for SessionClaim {
    fn drop(&mut self) {
        let mut live = self.registry.live.lock();
        if live.get(&self.id).is_some_and(|e| e.serial == self.serial) {
            if let Some(uid) = live.remove(&self.id).and_then(|entry| entry.uid) {
                self.registry.count_device(&uid, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_namespaced_and_escaped() {
        let u12 = UserId::parse("12").unwrap();
        let u1 = UserId::parse("1").unwrap();
        assert_eq!(device_session_id(&u12, "phone"), "D:12:phone");
        assert_ne!(
            device_session_id(&u12, "phone"),
            device_session_id(&u1, "2:phone")
        );
        assert_eq!(handler_session_id("h/1+#$%"), "H:h%2F1%2B%23%24%25");
        assert!(!device_session_id(&u12, "a/b#").contains(['/', '#', '+', '$']));
        assert_ne!(handler_session_id("a%2F"), handler_session_id("a/"));
    }

    #[test]
    fn client_ids_are_capped() {
        let limits = Limits {
            max_client_id_bytes: 4,
            ..Limits::default()
        };
        assert_eq!(check_client_id("abcd", &limits), Ok(()));
        assert_eq!(
            check_client_id("abcde", &limits),
            Err(ConnectRefusal::ClientIdNotValid("client id too long"))
        );
        // Bytes, not characters.
        assert!(check_client_id("ééé", &limits).is_err());
    }

    #[tokio::test]
    async fn persistent_sessions_are_capped_per_user_until_they_expire() {
        use crate::auth::testing::{device, handler};
        let registry = Arc::new(SessionRegistry::new(CancellationToken::new()));
        let limits = Limits {
            max_persistent_sessions_per_user: 2,
            ..Limits::default()
        };
        let (alice, bob) = (device("alice"), device("bob"));
        let uid = UserId::parse("alice").unwrap();
        assert_eq!(registry.admit("D:alice:a", &alice, false, &limits), Ok(()));
        assert_eq!(registry.admit("D:alice:b", &alice, false, &limits), Ok(()));
        let over = registry.admit("D:alice:c", &alice, false, &limits);
        assert!(matches!(over, Err(ConnectRefusal::QuotaExceeded(_))));
        // Resuming one it holds, a clean session, another user, a handler: fine.
        assert_eq!(registry.admit("D:alice:a", &alice, false, &limits), Ok(()));
        assert_eq!(registry.admit("D:alice:c", &alice, true, &limits), Ok(()));
        assert_eq!(registry.admit("D:bob:a", &bob, false, &limits), Ok(()));
        assert_eq!(registry.admit("H:h", &handler(), false, &limits), Ok(()));
        assert_eq!(registry.persistent_sessions(&uid), 2);

        // A clean session with a persistent id ends that one in the router.
        assert_eq!(registry.admit("D:alice:b", &alice, true, &limits), Ok(()));
        assert_eq!(registry.persistent_sessions(&uid), 1);
        assert_eq!(registry.admit("D:alice:c", &alice, false, &limits), Ok(()));

        // An expiry frees its slot (and the map shrinks back).
        let alice_device = crate::auth::testing::device_issued("alice", None);
        let claim = registry
            .claim("D:alice:a".into(), Some(&alice_device))
            .await;
        registry.left_away(&claim);
        let serial = claim.serial();
        drop(claim);
        let expiring = registry.claim_to_expire("D:alice:a", serial);
        assert!(expiring.is_some());
        assert_eq!(registry.persistent_sessions(&uid), 1);
        assert_eq!(registry.admit("D:alice:c", &alice, true, &limits), Ok(()));
        assert_eq!(registry.persistent_sessions(&uid), 0);
        assert!(registry.persistent.lock().per_user.len() == 1, "only bob's");
    }

    #[test]
    fn handler_ids_are_told_apart() {
        assert!(is_handler_session_id(&handler_session_id("x")));
        let uid = UserId::parse("1").unwrap();
        assert!(!is_handler_session_id(&device_session_id(&uid, "H:x")));
    }

    #[test]
    fn kept_qos2_state_follows_the_session() {
        use crate::codec::Version;
        use crate::inbound::{Arrival, InboundFlows};
        use crate::router::protocol::QoS;
        let registry = SessionRegistry::new(CancellationToken::new());
        let held = |pkids: &[u16]| {
            let mut flows = InboundFlows::new(Version::V5, 100);
            for &pkid in pkids {
                flows.allowed(QoS::ExactlyOnce, pkid, true, None);
            }
            flows.take_held()
        };
        // (what is kept, how the next connection starts) -> held ids it gets
        let table: [(&[u16], bool, usize); 4] = [
            (&[1, 2, 3], false, 3),
            (&[1, 2, 3], true, 0),
            (&[], false, 0),
            (&[7], false, 1),
        ];
        for (kept, clean_start, expected) in table {
            registry.keep_qos2("D:1:c", held(kept));
            let resumed = registry.resume_qos2("D:1:c", clean_start);
            assert_eq!(resumed.len(), expected, "{kept:?} {clean_start}");
            // Handed back once.
            assert!(registry.resume_qos2("D:1:c", false).is_empty());
            let flows = InboundFlows::resumed(Version::V5, 100, resumed);
            assert_eq!(flows.unacknowledged(), expected);
            if let Some(&pkid) = kept.first().filter(|_| !clean_start) {
                assert_eq!(
                    flows.arrival(QoS::ExactlyOnce, pkid),
                    Arrival::Retransmitted
                );
            }
        }
        // Two connections' leftovers add up; an expiry drops them.
        registry.keep_qos2("D:1:c", held(&[1]));
        registry.keep_qos2("D:1:c", held(&[1, 2]));
        registry.release_qos2("D:1:c");
        assert!(registry.resume_qos2("D:1:c", false).is_empty());
        registry.keep_qos2("D:1:c", held(&[1]));
        registry.keep_qos2("D:1:c", held(&[1, 2]));
        assert_eq!(registry.resume_qos2("D:1:c", false).len(), 2);
        assert!(registry.kept_qos2.lock().is_empty());
    }

    #[tokio::test]
    async fn second_claim_kicks_the_first_and_waits() {
        let shutdown = CancellationToken::new();
        let registry = Arc::new(SessionRegistry::new(shutdown.clone()));
        let uid = crate::auth::testing::device_issued("1", Some(42));
        let first = registry.claim("D:1:c".into(), Some(&uid)).await;
        assert!(registry.has_live_device(uid.uid()));
        let kicked = first.end.clone();
        let waiter = tokio::spawn({
            let registry = registry.clone();
            let uid = uid.clone();
            async move { registry.claim("D:1:c".into(), Some(&uid)).await }
        });
        let why = std::future::poll_fn(|cx| kicked.poll_requested(cx)).await;
        assert_eq!(why, EndRequest::TakenOver);
        drop(first);
        let second = waiter.await.unwrap();
        assert_eq!(second.end.requested(), None);
        // The takeover replaced one live device by another: still one.
        assert!(registry.has_live_device(uid.uid()));
        assert!(!registry.has_live_device(&UserId::parse("2").unwrap()));
        // Revoked after that: the first reason stays.
        let devices = registry.device_sessions();
        assert_eq!(devices[0].1[0].issued_at, Some(42));
        devices[0].1[0].end.request(EndRequest::Revoked);
        devices[0].1[0].end.request(EndRequest::TakenOver);
        assert_eq!(registry.sessions_of(uid.uid()).len(), 1);
        assert!(registry
            .sessions_of(&UserId::parse("2").unwrap())
            .is_empty());
        assert_eq!(second.end.requested(), Some(EndRequest::Revoked));
        assert_eq!(registry.len(), 1);
        let devices = registry.device_sessions();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].0.as_str(), "1");
        registry.left_away(&second);
        let serial = second.serial();
        drop(second);
        assert!(registry.is_empty());
        assert!(
            !registry.has_live_device(uid.uid()),
            "away is not connected"
        );

        // The session left behind can be expired once, by that serial only.
        assert!(registry.claim_to_expire("D:1:c", serial + 1).is_none());
        let expiring = registry.claim_to_expire("D:1:c", serial).expect("idle");
        assert!(registry.claim_to_expire("D:1:c", serial).is_none());
        assert!(
            !registry.has_live_device(uid.uid()),
            "an expiry is no device"
        );
        drop(expiring);

        // A client coming back cancels a pending expiry.
        let back = registry.claim("D:1:c".into(), Some(&uid)).await;
        assert!(registry.has_live_device(uid.uid()));
        registry.left_away(&back);
        let serial = back.serial();
        drop(back);
        let again = registry.claim("D:1:c".into(), Some(&uid)).await;
        assert!(registry.claim_to_expire("D:1:c", serial).is_none());

        // Shutdown reaches every live session, and any claimed after it.
        let ending = tokio::spawn(registry.clone().end_all_at_shutdown());
        shutdown.cancel();
        ending.await.unwrap();
        assert_eq!(again.end.requested(), Some(EndRequest::ShuttingDown));
        drop(again);
        let late = registry.claim("D:1:d".into(), Some(&uid)).await;
        assert_eq!(late.end.requested(), Some(EndRequest::ShuttingDown));
    }
}
