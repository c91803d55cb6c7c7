//! Owns wills whose publication is delayed (MQTT 5 Will Delay Interval,
//! §3.1.3.2.2): the capped set of pending wills, keyed by router session id;
//! their timers; cancelling one when its session is resumed before the delay
//! elapses (MQTT-3.1.3-9). `will_publisher` publishes them, through the
//! gate's own router link, once their connection (and its link) is gone.
//!
//! A will whose delay is 0, or whose session ends with its connection
//! (Session Expiry Interval 0, or MQTT 3.1.1), is still published by the
//! closing session itself on its own link (`session::ending`).
//!
//! Every will a device session arms, and its end (published, cancelled,
//! dropped), is told to delivery (`Delivery::will_armed`, `will_done`):
//! with several nodes, a copy kept in Redis lets another node publish it
//! if this one dies (ARCHITECTURE.md, "Many nodes").
//!
//! A revoked or deleted user's will is dropped, immediate or delayed: a
//! device's will carries its owner (uid and token `iat`), and is checked
//! against the store's revocation when it falls due (and at the shutdown
//! flush); a revocation event drops the user's refused pending wills at
//! once. A will is a command acting for its user, so once the user is
//! revoked it must not write anything (a `store_token` will would replant
//! data into a deleted account).

use crate::auth::DeviceIdentity;
use crate::router::protocol::{LastWill, LastWillProperties, Publish, PublishProperties};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use protocol::UserId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::Revocation;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

/// Bytes (topic, payload, properties) all pending wills may hold together;
/// a will beyond it (or beyond the count cap) is published at once instead
/// of being dropped: publishing early is the lesser deviation.
pub const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// The connection of a device session that armed a will (its claim
/// serial): what `Delivery::will_done` names once the will is published or
/// dropped, so that a later connection's will is never taken for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Armed {
    pub session_id: String,
    pub connection: u64,
}

/// When an armed will falls due, for `Delivery::will_armed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillClock {
    /// The connection is open: due this long after it ends (zero: at once).
    AfterEnd(Duration),
    /// The connection ended: due this long from now (`Wills::schedule`).
    DueIn(Duration),
}

/// What leaves the pending set for the publisher task: a will to publish
/// (and the arming it ends, if any), or an arming that ends unpublished.
pub(crate) enum Leaving {
    Publish(Box<ReadyWill>, Option<Armed>),
    Forget(Armed),
}

/// A will ready to publish: stamped, with its properties.
#[derive(Debug, Clone)]
pub struct ReadyWill {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    /// The device whose will it is (`None`: a handler's), checked against
    /// its user's revocation before it is published.
    pub owner: Option<DeviceIdentity>,
}

impl ReadyWill {
    /// What it keeps alive, for the byte cap: its record, topic, payload and
    /// properties, counted as the router counts a stored publish (its bytes
    /// are its own: see `owned_will`, `publish_properties`).
    fn size(&self) -> usize {
        crate::router::message_size(&self.publish, self.properties.as_ref())
    }
}

/// `will` with bytes of its own, in one allocation. Decoded, its topic and
/// message are slices of the connection's read buffer, and a will is kept
/// for the whole connection and then for its delay: it kept the CONNECT's
/// whole buffer alive (about 1.8 times the bytes counted for it).
pub fn owned_will(will: LastWill) -> LastWill {
    let mut owned = BytesMut::with_capacity(will.topic.len() + will.message.len());
    owned.extend_from_slice(&will.topic);
    owned.extend_from_slice(&will.message);
    let mut owned = owned.freeze();
    LastWill {
        topic: owned.split_to(will.topic.len()),
        message: owned,
        ..will
    }
}

/// The publish properties of a will: everything its CONNECT gave it except
/// the Will Delay Interval, which is the broker's business (MQTT 5
/// §3.1.3.2: the others are sent with the will as they were received).
pub fn publish_properties(will: Option<&LastWillProperties>) -> Option<PublishProperties> {
    let will = will?;
    let properties = PublishProperties {
        payload_format_indicator: will.payload_format_indicator,
        message_expiry_interval: will.message_expiry_interval,
        topic_alias: None,
        response_topic: will.response_topic.clone(),
        // A copy, not a slice of the CONNECT's buffer (see `owned_will`).
        correlation_data: will.correlation_data.as_deref().map(Bytes::copy_from_slice),
        user_properties: will.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: will.content_type.clone(),
    };
    (properties != PublishProperties::default()).then_some(properties)
}

/// When a will is due after its connection ends: at the Will Delay Interval
/// or when the session ends, whichever comes first (§3.1.3.2.2). `None`:
/// now.
pub fn delay(will_delay_secs: Option<u32>, session_expiry: Duration) -> Option<Duration> {
    let delay = Duration::from_secs(u64::from(will_delay_secs?)).min(session_expiry);
    (!delay.is_zero()).then_some(delay)
}

/// Pending wills, shared by every session (held by the `Gate`; a clone is
/// another handle to the same set, for the revocation watcher).
#[derive(Clone)]
pub struct Wills {
    inner: Arc<Inner>,
}

struct Inner {
    pending: Mutex<Pending>,
    max_pending: usize,
    max_bytes: usize,
    serial: AtomicU64,
    to_publisher: mpsc::UnboundedSender<Leaving>,
}

#[derive(Default)]
struct Pending {
    by_session: HashMap<String, Waiting>,
    bytes: usize,
}

struct Waiting {
    serial: u64,
    /// The connection that armed it (`Armed`).
    connection: u64,
    will: ReadyWill,
    timer: AbortHandle,
}

impl Pending {
    fn take(&mut self, session_id: &str) -> Option<Waiting> {
        let waiting = self.by_session.remove(session_id)?;
        self.bytes = self.bytes.saturating_sub(waiting.will.size());
        waiting.timer.abort();
        Some(waiting)
    }
}

/// What `Wills::new` hands to the publisher task (`publish_delayed`).
pub struct WillQueue(pub(crate) mpsc::UnboundedReceiver<Leaving>);

impl Wills {
    /// At most `max_pending` wills (and `max_bytes`) wait at once.
    pub fn new(max_pending: usize, max_bytes: usize) -> (Self, WillQueue) {
        // Unbounded in type only: what it carries came out of the capped map.
        let (to_publisher, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            max_pending,
            max_bytes,
            serial: AtomicU64::new(0),
            to_publisher,
        });
        (Wills { inner }, WillQueue(queue))
    }

    /// Publishes `will` of session `session_id`, armed by its connection
    /// `connection`, after `after`, unless the session is resumed first
    /// (`session_reconnected`). Call inside a tokio runtime.
    pub fn schedule(&self, session_id: &str, connection: u64, will: ReadyWill, after: Duration) {
        let armed = Armed {
            session_id: session_id.to_owned(),
            connection,
        };
        let mut pending = self.inner.pending.lock();
        // A will left by an earlier connection of this session was cancelled
        // or published when this one connected; one still here is published.
        if let Some(earlier) = pending.take(session_id) {
            let earlier_armed = Armed {
                session_id: session_id.to_owned(),
                connection: earlier.connection,
            };
            self.inner.publish(earlier.will, Some(earlier_armed));
        }
        let size = will.size();
        if pending.by_session.len() >= self.inner.max_pending
            || pending.bytes.saturating_add(size) > self.inner.max_bytes
        {
            drop(pending);
            warn!(
                max_pending = self.inner.max_pending,
                "too many delayed wills pending: this one is published now"
            );
            self.inner.publish(will, Some(armed));
            return;
        }
        let serial = self.inner.serial.fetch_add(1, Ordering::Relaxed);
        let (inner, id) = (self.inner.clone(), session_id.to_owned());
        let timer = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            inner.due(&id, serial);
        })
        .abort_handle();
        pending.bytes += size;
        pending.by_session.insert(
            session_id.to_owned(),
            Waiting {
                serial,
                connection,
                will,
                timer,
            },
        );
        debug!(after_secs = after.as_secs(), "will delayed");
    }

    /// A new connection to session `session_id` was made. Resuming it
    /// (`clean_start` false) cancels its pending will (MQTT-3.1.3-9);
    /// starting clean ends the old session, so its will is published now.
    pub fn session_reconnected(&self, session_id: &str, clean_start: bool) {
        let Some(waiting) = self.inner.pending.lock().take(session_id) else {
            return;
        };
        let armed = Armed {
            session_id: session_id.to_owned(),
            connection: waiting.connection,
        };
        if clean_start {
            info!("a new clean session ended the old one: its delayed will is published");
            self.inner.publish(waiting.will, Some(armed));
        } else {
            info!("session resumed before its will delay elapsed: the will is not published");
            self.inner.forget(armed);
        }
    }

    /// `uid` was revoked: drops its pending wills that `revocation` refuses
    /// (they would be refused when due anyway; dropping them now frees their
    /// memory and their place under the caps). Returns how many.
    pub fn drop_revoked(&self, uid: &UserId, revocation: Revocation) -> usize {
        let mut pending = self.inner.pending.lock();
        let refused: Vec<String> = pending
            .by_session
            .iter()
            .filter(|(_, waiting)| {
                waiting.will.owner.as_ref().is_some_and(|owner| {
                    owner.uid() == uid && revocation.refuses(owner.issued_at())
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &refused {
            if let Some(waiting) = pending.take(id) {
                self.inner.forget(Armed {
                    session_id: id.clone(),
                    connection: waiting.connection,
                });
            }
        }
        if !refused.is_empty() {
            info!(%uid, wills = refused.len(), "user revoked: pending wills dropped");
        }
        refused.len()
    }

    /// Publishes `will` now through the publisher task (its revocation
    /// checked first): a will another node armed and can no longer publish
    /// (`crate::inject`).
    pub(crate) fn publish_now(&self, will: ReadyWill) {
        self.inner.publish(will, None);
    }

    /// How many wills are waiting.
    pub fn pending(&self) -> usize {
        self.inner.pending.lock().by_session.len()
    }

    /// Publishes every pending will now (the broker is stopping: their
    /// sessions end with it).
    pub(crate) fn flush(&self) -> Vec<ReadyWill> {
        let mut pending = self.inner.pending.lock();
        pending.bytes = 0;
        pending
            .by_session
            .drain()
            .map(|(_, waiting)| {
                waiting.timer.abort();
                waiting.will
            })
            .collect()
    }
}

impl Inner {
    /// The timer of `session_id`'s will `serial` fired.
    fn due(&self, session_id: &str, serial: u64) {
        let mut pending = self.pending.lock();
        if pending
            .by_session
            .get(session_id)
            .is_some_and(|w| w.serial == serial)
        {
            if let Some(waiting) = pending.take(session_id) {
                drop(pending);
                info!("will delay elapsed: publishing the will");
                let armed = Armed {
                    session_id: session_id.to_owned(),
                    connection: waiting.connection,
                };
                self.publish(waiting.will, Some(armed));
            }
        }
    }

    fn publish(&self, will: ReadyWill, armed: Option<Armed>) {
        if self
            .to_publisher
            .send(Leaving::Publish(Box::new(will), armed))
            .is_err()
        {
            warn!("the will publisher has stopped: a delayed will is lost");
        }
    }

    fn forget(&self, armed: Armed) {
        // Only at shutdown is nobody listening: then nothing is owed.
        let _ = self.to_publisher.send(Leaving::Forget(armed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::protocol::QoS;

    fn will(payload: &'static str) -> ReadyWill {
        ReadyWill {
            publish: Publish::with_qos(
                Bytes::from_static(b"t"),
                Bytes::from_static(payload.as_bytes()),
                false,
                QoS::AtMostOnce,
                0,
            ),
            properties: None,
            owner: None,
        }
    }

    fn received(queue: &mut WillQueue) -> Vec<Bytes> {
        leaving(queue).0
    }

    /// What left the pending set: the wills published, and the armings
    /// that ended unpublished.
    fn leaving(queue: &mut WillQueue) -> (Vec<Bytes>, Vec<Armed>) {
        let (mut published, mut forgotten) = (Vec::new(), Vec::new());
        while let Ok(left) = queue.0.try_recv() {
            match left {
                Leaving::Publish(will, _) => published.push(will.publish.payload),
                Leaving::Forget(armed) => forgotten.push(armed),
            }
        }
        (published, forgotten)
    }

    #[test]
    fn the_delay_is_the_lesser_of_will_delay_and_session_expiry() {
        let minute = Duration::from_secs(60);
        assert_eq!(delay(None, minute), None);
        assert_eq!(delay(Some(0), minute), None);
        assert_eq!(delay(Some(5), Duration::ZERO), None, "session ends now");
        assert_eq!(delay(Some(5), minute), Some(Duration::from_secs(5)));
        assert_eq!(delay(Some(600), minute), Some(minute));
    }

    #[test]
    fn will_properties_are_forwarded_without_the_delay() {
        assert_eq!(publish_properties(None), None);
        let only_delay = LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        assert_eq!(publish_properties(Some(&only_delay)), None);
        let full = LastWillProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(30),
            content_type: Some("text/plain".into()),
            response_topic: Some("r".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            ..only_delay
        };
        let forwarded = publish_properties(Some(&full)).unwrap();
        assert_eq!(forwarded.payload_format_indicator, Some(1));
        assert_eq!(forwarded.message_expiry_interval, Some(30));
        assert_eq!(forwarded.content_type.as_deref(), Some("text/plain"));
        assert_eq!(forwarded.response_topic.as_deref(), Some("r"));
        assert_eq!(forwarded.correlation_data.as_deref(), Some(&b"c"[..]));
        assert_eq!(forwarded.user_properties, full.user_properties);
    }

    #[test]
    fn a_will_counts_its_properties_and_owns_its_bytes() {
        let connect_buffer = Bytes::from(vec![b'c'; 1 << 20]);
        let will = owned_will(LastWill {
            topic: connect_buffer.slice(0..4),
            message: connect_buffer.slice(4..14),
            qos: QoS::AtLeastOnce,
            retain: false,
        });
        let will_properties = LastWillProperties {
            delay_interval: Some(60),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: Some(connect_buffer.slice(14..270)),
            user_properties: vec![("k".into(), "v".repeat(4000))],
        };
        let properties = publish_properties(Some(&will_properties));
        drop(will_properties);
        assert!(
            connect_buffer.is_unique(),
            "the will keeps no slice of the CONNECT's buffer"
        );
        assert_eq!(&will.topic[..], b"cccc");
        assert_eq!(will.message.len(), 10);
        let ready = ReadyWill {
            publish: Publish::with_qos(will.topic, will.message, false, will.qos, 0),
            properties,
            owner: None,
        };
        // Record, topic, payload, content type, correlation data, user
        // properties: all counted.
        let size = ready.size();
        assert!(size >= 4 + 10 + 10 + 256 + 4001, "{size}");
        let (wills, _queue) = Wills::new(10, 1 << 20);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            wills.schedule("D:1:w", 1, ready, Duration::from_secs(3600));
        });
        assert_eq!(wills.inner.pending.lock().bytes, size);
    }

    #[tokio::test]
    async fn a_will_is_published_when_due_unless_its_session_is_resumed() {
        let hour = Duration::from_secs(3600);
        let (wills, mut queue) = Wills::new(10, 1 << 20);
        wills.schedule("D:1:a", 7, will("a"), hour);
        wills.schedule("D:1:b", 8, will("b"), hour);
        wills.schedule("D:1:c", 9, will("c"), hour);
        assert_eq!(wills.pending(), 3);
        assert!(received(&mut queue).is_empty(), "not before the delay");
        wills.session_reconnected("D:1:a", false);
        wills.session_reconnected("D:1:b", true);
        let (published, forgotten) = leaving(&mut queue);
        assert_eq!(published, vec!["b"], "a clean start ends it");
        let resumed = Armed {
            session_id: "D:1:a".into(),
            connection: 7,
        };
        assert_eq!(forgotten, vec![resumed], "the resumed one's arming ends");
        let serial = wills.inner.pending.lock().by_session["D:1:c"].serial;
        wills.inner.due("D:1:c", serial + 1);
        assert!(
            received(&mut queue).is_empty(),
            "a stale timer does nothing"
        );
        wills.inner.due("D:1:c", serial);
        assert_eq!(received(&mut queue), vec!["c"]);
        assert_eq!(wills.pending(), 0);
        assert_eq!(wills.inner.pending.lock().bytes, 0);
        wills.session_reconnected("D:1:a", true);
        assert!(received(&mut queue).is_empty(), "the resumed one never");

        // The timer itself (a bounded wait, not a measurement).
        wills.schedule("D:1:d", 10, will("d"), Duration::from_millis(20));
        let fired = tokio::time::timeout(Duration::from_secs(10), queue.0.recv()).await;
        let Ok(Some(Leaving::Publish(fired, Some(armed)))) = fired else {
            panic!("the timer published nothing");
        };
        assert_eq!(&fired.publish.payload[..], b"d");
        assert_eq!(armed.connection, 10, "and names its arming");
        assert_eq!(wills.pending(), 0);
    }

    #[tokio::test]
    async fn a_revocation_drops_the_refused_pending_wills_of_its_user() {
        use crate::auth::testing::device_issued;
        let hour = Duration::from_secs(3600);
        let (wills, mut queue) = Wills::new(10, 1 << 20);
        let owned = |payload: &'static str, uid: &str, iat: Option<u64>| ReadyWill {
            owner: Some(device_issued(uid, iat)),
            ..will(payload)
        };
        wills.schedule("D:u1:old", 1, owned("old", "u1", Some(10)), hour);
        wills.schedule("D:u1:none", 2, owned("none", "u1", None), hour);
        wills.schedule("D:u1:new", 3, owned("new", "u1", Some(500)), hour);
        wills.schedule("D:u2:old", 4, owned("other", "u2", Some(10)), hour);
        wills.schedule("H:h", 5, will("handler"), hour);
        let uid = UserId::parse("u1").unwrap();
        assert_eq!(wills.drop_revoked(&uid, Revocation::IssuedBefore(100)), 2);
        assert_eq!(wills.pending(), 3);
        let (published, mut forgotten) = leaving(&mut queue);
        assert!(published.is_empty(), "dropped, not published");
        forgotten.sort_by_key(|armed| armed.connection);
        let ended: Vec<u64> = forgotten.iter().map(|armed| armed.connection).collect();
        assert_eq!(ended, vec![1, 2], "their armings end");
        let mut left: Vec<Bytes> = wills
            .flush()
            .into_iter()
            .map(|w| w.publish.payload)
            .collect();
        left.sort();
        assert_eq!(left, vec!["handler", "new", "other"]);
        wills.schedule("D:u1:new", 6, owned("new", "u1", Some(500)), hour);
        assert_eq!(wills.drop_revoked(&uid, Revocation::All), 1);
        assert_eq!(wills.pending(), 0);
        assert_eq!(wills.inner.pending.lock().bytes, 0);
    }

    #[tokio::test]
    async fn beyond_the_caps_a_will_is_published_at_once() {
        let hour = Duration::from_secs(3600);
        let (wills, mut queue) = Wills::new(2, 1 << 20);
        for (n, id) in ["1", "2", "3"].into_iter().enumerate() {
            wills.schedule(id, n as u64, will(id.to_owned().leak()), hour);
        }
        assert_eq!(received(&mut queue), vec!["3"]);
        assert_eq!(wills.pending(), 2);
        // Room for one will's bytes (record included), not two.
        let (small, mut small_queue) = Wills::new(10, will("ab").size() + 1);
        small.schedule("x", 1, will("ab"), hour);
        small.schedule("y", 2, will("cd"), hour);
        assert_eq!(received(&mut small_queue), vec!["cd"], "over the bytes");
        let mut flushed: Vec<Bytes> = wills
            .flush()
            .into_iter()
            .map(|w| w.publish.payload)
            .collect();
        flushed.sort();
        assert_eq!(flushed, vec!["1", "2"]);
        assert_eq!(wills.pending(), 0);
    }
}
