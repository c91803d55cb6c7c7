//! Owns client identity in the router: the namespaced router client id of
//! each session (devices keyed by user, handlers apart, so no client can
//! reach another's session), and session takeover: a second connection with
//! the same id tells the first to end (MQTT 5 DISCONNECT 0x8E) and waits for it.

use parking_lot::Mutex;
use shared::UserId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

struct Entry {
    serial: u64,
    /// The user of a device session (handlers have none).
    uid: Option<UserId>,
    kick: CancellationToken,
    revoke: CancellationToken,
    closed: oneshot::Receiver<()>,
}

/// Live sessions by router client id.
#[derive(Default)]
pub struct SessionRegistry {
    next_serial: AtomicU64,
    live: Mutex<HashMap<String, Entry>>,
    /// Persistent sessions whose client is away, with the serial of the
    /// connection that left them: only that one's expiry may end them.
    away: Mutex<HashMap<String, u64>>,
}

/// Held by a live connection; dropping it releases the id and tells a
/// waiting successor that this session is gone.
pub struct SessionClaim {
    registry: Arc<SessionRegistry>,
    id: String,
    serial: u64,
    /// Cancelled when another connection takes this session over.
    pub taken_over: CancellationToken,
    /// Cancelled when the session's user is revoked.
    pub revoked: CancellationToken,
    _closed: oneshot::Sender<()>,
}

impl SessionRegistry {
    /// Claims `id` (for `uid`'s device, or a handler when `None`), ending
    /// the connection that holds it first (if any).
    pub async fn claim(self: &Arc<Self>, id: String, uid: Option<&UserId>) -> SessionClaim {
        self.away.lock().remove(&id);
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        let revoke = CancellationToken::new();
        let (closed_tx, closed_rx) = oneshot::channel();
        let previous = self.live.lock().insert(
            id.clone(),
            Entry {
                serial,
                uid: uid.cloned(),
                kick: kick.clone(),
                revoke: revoke.clone(),
                closed: closed_rx,
            },
        );
        if let Some(previous) = previous {
            previous.kick.cancel();
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
            taken_over: kick,
            revoked: revoke,
            _closed: closed_tx,
        }
    }

    /// Records that `claim`'s client left a persistent session behind.
    pub fn left_away(&self, claim: &SessionClaim) {
        self.away.lock().insert(claim.id.clone(), claim.serial);
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
        let own_serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (closed_tx, closed_rx) = oneshot::channel();
        let kick = CancellationToken::new();
        let revoke = CancellationToken::new();
        live.insert(
            id.to_owned(),
            Entry {
                serial: own_serial,
                uid: None,
                kick: kick.clone(),
                revoke: revoke.clone(),
                closed: closed_rx,
            },
        );
        Some(SessionClaim {
            registry: self.clone(),
            id: id.to_owned(),
            serial: own_serial,
            taken_over: kick,
            revoked: revoke,
            _closed: closed_tx,
        })
    }

    /// Live device sessions grouped by user, with the tokens that end them.
    pub fn device_sessions(&self) -> Vec<(UserId, Vec<CancellationToken>)> {
        let mut by_user: HashMap<UserId, Vec<CancellationToken>> = HashMap::new();
        for entry in self.live.lock().values() {
            if let Some(uid) = &entry.uid {
                by_user
                    .entry(uid.clone())
                    .or_default()
                    .push(entry.revoke.clone());
            }
        }
        by_user.into_iter().collect()
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
            live.remove(&self.id);
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

    #[tokio::test]
    async fn second_claim_kicks_the_first_and_waits() {
        let registry = Arc::new(SessionRegistry::default());
        let uid = UserId::parse("1").unwrap();
        let first = registry.claim("D:1:c".into(), Some(&uid)).await;
        let kicked = first.taken_over.clone();
        let waiter = tokio::spawn({
            let registry = registry.clone();
            let uid = uid.clone();
            async move { registry.claim("D:1:c".into(), Some(&uid)).await }
        });
        kicked.cancelled().await;
        drop(first);
        let second = waiter.await.unwrap();
        assert!(!second.taken_over.is_cancelled());
        assert_eq!(registry.len(), 1);
        let devices = registry.device_sessions();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].0.as_str(), "1");
        registry.left_away(&second);
        let serial = second.serial();
        drop(second);
        assert!(registry.is_empty());

        // The session left behind can be expired once, by that serial only.
        assert!(registry.claim_to_expire("D:1:c", serial + 1).is_none());
        let expiring = registry.claim_to_expire("D:1:c", serial).expect("idle");
        assert!(registry.claim_to_expire("D:1:c", serial).is_none());
        drop(expiring);

        // A client coming back cancels a pending expiry.
        let back = registry.claim("D:1:c".into(), Some(&uid)).await;
        registry.left_away(&back);
        let serial = back.serial();
        drop(back);
        let again = registry.claim("D:1:c".into(), Some(&uid)).await;
        drop(again);
        assert!(registry.claim_to_expire("D:1:c", serial).is_none());
    }
}
