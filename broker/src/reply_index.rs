//! Owns the gate's own delivery of replies to devices, beside the router: an
//! index from topic to the device subscriptions the gate serves itself, each
//! session's bounded inbox, and the answer to "does this publish still need
//! the router?" (does anyone the router serves want it, or must it be kept).
//!
//! Why: every reply through the router costs a hop (two task wake-ups, a
//! commit-log append and a per-topic log); replies are most of the traffic.
//! Which subscriptions the gate serves is chosen so that MQTT behaviour is
//! unchanged: only QoS 0 subscriptions of clean sessions (nothing to keep
//! after the connection, nothing to acknowledge) to topics that have never
//! held a retained message (a new subscriber must get it, and the router
//! holds it). Everything else stays in the router. A session gets each topic
//! from one path only, so the order of messages per topic is kept.
//!
//! The device sees the protocol it would see from the router: properties as
//! published, in order; the Message Expiry Interval counted down while a
//! reply waits in the inbox (an expired one is not delivered); its
//! subscription's identifier on each delivery; the retain flag only under
//! Retain As Published.

use crate::router::protocol::{Publish, PublishProperties, QoS};
use bytes::Bytes;
use futures::task::AtomicWaker;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use prometheus_client::metrics::gauge::Gauge;
use protocol::topics::{effective_filter, is_wildcard, matches};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Bytes one session's inbox holds for a device that reads slower than its
/// replies arrive, counted as the router counts a stored publish (record,
/// topic, payload and properties: `Delivery::size`); the oldest are dropped
/// beyond it (QoS 0), as the router's reply logs drop their oldest segment.
pub const INBOX_LIMIT_BYTES: usize = 64 * 1024;

/// One publish on its way to a device. The properties are boxed: most
/// replies have none, and a queue keeps its slots' room.
pub struct Delivery {
    pub publish: Publish,
    pub properties: Option<Box<PublishProperties>>,
    /// When the gate received it, if it carries a Message Expiry Interval.
    received: Option<Instant>,
}

impl Delivery {
    /// The delivery as it leaves at `now`: its Message Expiry Interval less
    /// the whole seconds it waited, or `None` once expired (MQTT 5
    /// §3.3.2.3.3: not delivered).
    fn at(mut self, now: Instant) -> Option<Delivery> {
        let (Some(received), Some(properties)) = (self.received, self.properties.as_mut()) else {
            return Some(self);
        };
        let Some(interval) = properties.message_expiry_interval else {
            return Some(self);
        };
        let waited = now.saturating_duration_since(received).as_secs();
        let left = u64::from(interval)
            .checked_sub(waited)
            .filter(|&left| left > 0)?;
        properties.message_expiry_interval = Some(u32::try_from(left).unwrap_or(interval));
        Some(self)
    }
}

/// How the gate serves one topic to one session: its subscription's options
/// (MQTT 5 §3.8.3.1, §3.8.2.1.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Subscription Identifier of the subscription, sent with each delivery.
    pub subscription_id: Option<usize>,
    /// Retain As Published: a live delivery keeps the publish's retain flag.
    pub retain_as_published: bool,
}

impl Delivery {
    /// What it keeps alive while it waits: its record, topic, payload and
    /// properties (user properties, correlation data, content type,
    /// response topic, subscription identifiers). Counting topic and payload
    /// only let one subscriber that stopped reading hold 122 MB of replies
    /// whose properties (correlation data echoed by the SDK) the inbox did
    /// not see.
    fn size(&self) -> usize {
        crate::router::message_size(&self.publish, self.properties.as_deref())
    }
}

/// The replies waiting for one device session's task.
#[derive(Default)]
pub struct ReplyInbox {
    queue: Mutex<Queued>,
    /// Whether `queue` holds anything, readable without its lock: the
    /// session checks on every turn of its loop.
    filled: AtomicBool,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Queued {
    deliveries: VecDeque<Delivery>,
    bytes: usize,
    /// Dropping since the session last drained (one log line per episode).
    overflowing: bool,
}

impl ReplyInbox {
    /// Queues `delivery` and wakes the session; returns how many older ones
    /// were dropped to stay within `INBOX_LIMIT_BYTES`, and whether this
    /// session just started dropping.
    fn push(&self, delivery: Delivery) -> (u64, bool) {
        let mut dropped = 0;
        let started_dropping;
        {
            let mut queued = self.queue.lock();
            queued.bytes += delivery.size();
            queued.deliveries.push_back(delivery);
            self.filled.store(true, Ordering::Release);
            while queued.bytes > INBOX_LIMIT_BYTES && queued.deliveries.len() > 1 {
                if let Some(oldest) = queued.deliveries.pop_front() {
                    queued.bytes -= oldest.size();
                    dropped += 1;
                }
            }
            started_dropping = dropped > 0 && !queued.overflowing;
            queued.overflowing |= dropped > 0;
        }
        self.waker.wake();
        (dropped, started_dropping)
    }

    /// Ready when something is queued; registers the session's task otherwise.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.filled.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A push between the check and the registration woke nobody.
        if self.filled.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Hands every queued delivery to `each`, oldest first (expired ones
    /// are dropped, the others' expiry counted down); returns how many.
    pub fn drain(&self, mut each: impl FnMut(Delivery)) -> u64 {
        if !self.filled.load(Ordering::Acquire) {
            return 0;
        }
        let mut queued = self.queue.lock();
        if queued.deliveries.is_empty() {
            return 0;
        }
        let mut count = 0;
        queued.bytes = 0;
        queued.overflowing = false;
        self.filled.store(false, Ordering::Release);
        // The clock is read only for replies that can expire.
        let mut now = None;
        for delivery in queued.deliveries.drain(..) {
            let delivery = match delivery.received {
                None => delivery,
                Some(_) => match delivery.at(*now.get_or_insert_with(Instant::now)) {
                    Some(live) => live,
                    None => continue,
                },
            };
            count += 1;
            each(delivery);
        }
        // Room for a few kept (a busy session would allocate it again for
        // every reply); more is released: most sessions are idle.
        if queued.deliveries.capacity() > 8 {
            queued.deliveries = VecDeque::new();
        }
        count
    }
}

/// What the index did with one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Older replies dropped from slow sessions' inboxes to make room.
    pub dropped: u64,
    /// Sessions that started dropping with this publish (worth a log line).
    pub newly_slow: u64,
    /// Whether the router must see it too: someone it serves may want it,
    /// or it is retained.
    pub needs_router: bool,
}

impl Routed {
    /// Counts the replies dropped for slow sessions, and says which topic
    /// made a session start dropping.
    pub fn record(self, metrics: &crate::metrics::Metrics, topic: &str) {
        if self.dropped > 0 {
            metrics.replies_dropped(self.dropped);
        }
        if self.newly_slow > 0 {
            tracing::info!(
                topic,
                subscribers = self.newly_slow,
                "a subscriber reads slower than its replies arrive: its oldest QoS 0 replies are dropped"
            );
        }
    }
}

/// The gate's delivery index, shared by all sessions.
#[derive(Default)]
pub struct ReplyIndex {
    routes: RwLock<Routes>,
    /// How many topics `routes` holds, for `/metrics` (set on every change).
    topics_gauge: Gauge,
}

/// Keyed hashing, faster than the default for the short topic names looked
/// up on every publish (and still seeded per process).
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Default)]
struct Routes {
    /// Literal topic → who wants it: one lookup per publish.
    topics: FastMap<Bytes, TopicRoutes>,
    /// Handler wildcard filters in the router (`$share/g/` removed), with
    /// counts; few (monitoring subscriptions), scanned per publish.
    handler_wildcards: HashMap<String, usize>,
}

#[derive(Default)]
struct TopicRoutes {
    /// Inboxes of the sessions the gate serves this topic to, and how.
    inboxes: Vec<(Arc<ReplyInbox>, Served)>,
    /// Device sessions subscribed to it through the router (QoS 1/2, a
    /// persistent session, a retained topic). A clean session counts until
    /// its connection ends; a persistent one until the session expires or a
    /// clean connection replaces it (its subscriptions stay in the router
    /// meanwhile).
    router_devices: usize,
    /// It holds a retained message (set by a retained publish, cleared by
    /// an empty one, which deletes it in the router).
    retained: bool,
    /// Live handler subscriptions naming this topic literally.
    handlers: usize,
}

impl TopicRoutes {
    fn is_empty(&self) -> bool {
        self.inboxes.is_empty() && self.router_devices == 0 && !self.retained && self.handlers == 0
    }
}

impl Routes {
    /// The routes of `topic`, created if new. Off the hot path (subscribe,
    /// retained publishes), so the key copy per call does not matter.
    fn entry(&mut self, topic: &str) -> &mut TopicRoutes {
        self.topics
            .entry(Bytes::copy_from_slice(topic.as_bytes()))
            .or_default()
    }

    fn forget_if_empty(&mut self, topic: &str) {
        if self
            .topics
            .get(topic.as_bytes())
            .is_some_and(TopicRoutes::is_empty)
        {
            self.topics.remove(topic.as_bytes());
        }
    }
}

/// The write lock on the routes; on release, the gauge shows their size.
struct Writing<'a> {
    routes: RwLockWriteGuard<'a, Routes>,
    gauge: &'a Gauge,
}

impl std::ops::Deref for Writing<'_> {
    type Target = Routes;
    fn deref(&self) -> &Routes {
        &self.routes
    }
}

impl std::ops::DerefMut for Writing<'_> {
    fn deref_mut(&mut self) -> &mut Routes {
        &mut self.routes
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.gauge
            .set(i64::try_from(self.routes.topics.len()).unwrap_or(i64::MAX));
    }
}

impl ReplyIndex {
    /// An index that keeps its size in `gauge` (a `/metrics` series).
    pub fn with_gauge(gauge: Gauge) -> Self {
        ReplyIndex {
            routes: RwLock::default(),
            topics_gauge: gauge,
        }
    }

    fn write(&self) -> Writing<'_> {
        Writing {
            routes: self.routes.write(),
            gauge: &self.topics_gauge,
        }
    }

    /// Serves `topic` to `inbox` from now on, unless the topic has (or had)
    /// a retained message, which only the router can give a new subscriber:
    /// then returns false and the subscription goes to the router. A
    /// resubscription keeps its path and takes the new options (MQTT 5
    /// §3.8.4).
    pub fn subscribe(&self, topic: &str, inbox: &Arc<ReplyInbox>, served: Served) -> bool {
        let mut routes = self.write();
        let routes = routes.entry(topic);
        if let Some((_, options)) = routes
            .inboxes
            .iter_mut()
            .find(|(i, _)| Arc::ptr_eq(i, inbox))
        {
            *options = served;
            return true;
        }
        if routes.retained {
            return false;
        }
        routes.inboxes.push((inbox.clone(), served));
        true
    }

    /// Whether `topic` holds (or held) a retained message: only the router
    /// can send it to a subscriber.
    pub fn is_retained(&self, topic: &str) -> bool {
        self.routes
            .read()
            .topics
            .get(topic.as_bytes())
            .is_some_and(|f| f.retained)
    }

    /// Stops serving `topic` to `inbox`.
    pub fn unsubscribe(&self, topic: &str, inbox: &Arc<ReplyInbox>) {
        let mut routes = self.write();
        if let Some(found) = routes.topics.get_mut(topic.as_bytes()) {
            found.inboxes.retain(|(i, _)| !Arc::ptr_eq(i, inbox));
            routes.forget_if_empty(topic);
        }
    }

    /// A device session subscribed to `topic` through the router (once per
    /// session and topic).
    pub fn device_subscribed_in_router(&self, topic: &str) {
        self.write().entry(topic).router_devices += 1;
    }

    /// A clean device session that subscribed to `topic` through the router
    /// ended (the router dropped its subscriptions with it).
    pub fn device_left_router(&self, topic: &str) {
        let mut routes = self.write();
        if let Some(found) = routes.topics.get_mut(topic.as_bytes()) {
            found.router_devices = found.router_devices.saturating_sub(1);
            routes.forget_if_empty(topic);
        }
    }

    /// Topics the index holds entries for (each costs memory until freed).
    pub fn topics(&self) -> usize {
        self.routes.read().topics.len()
    }

    /// A handler subscribed to `filter` (shared or not) through the router.
    pub fn handler_subscribed(&self, filter: &str) {
        let inner = effective_filter(filter);
        let mut routes = self.write();
        if is_wildcard(inner) {
            *routes
                .handler_wildcards
                .entry(inner.to_owned())
                .or_default() += 1;
        } else {
            routes.entry(inner).handlers += 1;
        }
    }

    /// A handler's subscription to `filter` ended.
    pub fn handler_unsubscribed(&self, filter: &str) {
        let inner = effective_filter(filter);
        let mut routes = self.write();
        if is_wildcard(inner) {
            if let Some(count) = routes.handler_wildcards.get_mut(inner) {
                *count -= 1;
                if *count == 0 {
                    routes.handler_wildcards.remove(inner);
                }
            }
        } else if let Some(found) = routes.topics.get_mut(inner.as_bytes()) {
            found.handlers = found.handlers.saturating_sub(1);
            routes.forget_if_empty(inner);
        }
    }

    /// Delivers `publish` (already authorized) to the sessions the gate
    /// serves its topic to, at QoS 0, and says whether the router needs it.
    pub fn route(
        &self,
        topic: &str,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Routed {
        if publish.retain {
            let mut routes = self.write();
            if publish.payload.is_empty() {
                // An empty retained publish deletes the retained message in
                // the router: later subscribers may be served by the gate.
                if let Some(found) = routes.topics.get_mut(topic.as_bytes()) {
                    found.retained = false;
                    routes.forget_if_empty(topic);
                }
            } else {
                routes.entry(topic).retained = true;
            }
        }
        let routes = self.routes.read();
        let found = routes.topics.get(topic.as_bytes());
        let mut routed = Routed {
            dropped: 0,
            newly_slow: 0,
            needs_router: publish.retain
                || found.is_some_and(|f| f.router_devices > 0 || f.handlers > 0)
                || routes
                    .handler_wildcards
                    .keys()
                    .any(|filter| matches(topic, filter)),
        };
        let inboxes = found.map(|f| f.inboxes.as_slice()).unwrap_or_default();
        if inboxes.is_empty() {
            return routed;
        }
        // One copy of the bytes, shared by every inbox: the publish's are
        // slices of its sender's read buffer, which a reply waiting in a
        // slow subscriber's inbox would keep alive whole, uncounted.
        let (mut publish, mut properties) = (publish.clone(), properties.clone());
        crate::router::detach(&mut publish, properties.as_mut());
        let (publish, properties) = (&publish, &properties);
        // The clock is read only for publishes that can expire.
        let received = match (inboxes, properties) {
            ([_, ..], Some(p)) if p.message_expiry_interval.is_some() => Some(Instant::now()),
            _ => None,
        };
        for (inbox, served) in inboxes {
            // Delivered at the subscription's QoS 0: no packet id, and
            // (MQTT 3.3.1.3) no retain flag on a live delivery unless the
            // subscription asked for Retain As Published (MQTT 5 3.3.1.3).
            let copy = Publish::with_qos(
                publish.topic.clone(),
                publish.payload.clone(),
                publish.retain && served.retain_as_published,
                QoS::AtMostOnce,
                0,
            );
            let properties = match served.subscription_id {
                None => properties.clone().map(Box::new),
                Some(id) => {
                    let mut with_id = properties.clone().unwrap_or_default();
                    with_id.subscription_identifiers = vec![id];
                    Some(Box::new(with_id))
                }
            };
            let (dropped, started_dropping) = inbox.push(Delivery {
                publish: copy,
                properties,
                received,
            });
            routed.dropped += dropped;
            routed.newly_slow += u64::from(started_dropping);
        }
        routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn publish(topic: &'static str, payload: &'static str, retain: bool) -> Publish {
        Publish::with_qos(
            Bytes::from_static(topic.as_bytes()),
            Bytes::from_static(payload.as_bytes()),
            retain,
            QoS::AtLeastOnce,
            7,
        )
    }

    fn drained(inbox: &ReplyInbox) -> Vec<Bytes> {
        let mut out = Vec::new();
        inbox.drain(|d| out.push(d.publish.payload));
        out
    }

    #[test]
    fn serves_subscribed_topics_and_says_when_the_router_needs_a_publish() {
        let index = ReplyIndex::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("42_sync", &inbox, Served::default()));
        assert!(
            index.subscribe("42_sync", &inbox, Served::default()),
            "resubscribe is a no-op"
        );

        let routed = index.route("42_sync", &publish("42_sync", "a", false), &None);
        assert_eq!(
            routed,
            Routed {
                dropped: 0,
                newly_slow: 0,
                needs_router: false
            }
        );
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(inbox.poll_ready(&mut cx).is_ready());
        let mut got = Vec::new();
        inbox.drain(|d| got.push(d));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].publish.qos(), QoS::AtMostOnce);
        assert_eq!(got[0].publish.pkid(), 0);
        assert!(inbox.poll_ready(&mut cx).is_pending());

        // Someone the router serves: a device through the router, a handler.
        index.device_subscribed_in_router("42_inbox");
        assert!(
            index
                .route("42_inbox", &publish("42_inbox", "b", false), &None)
                .needs_router
        );
        index.handler_subscribed("$share/audit/#");
        assert!(
            index
                .route("42_sync", &publish("42_sync", "c", false), &None)
                .needs_router
        );
        index.handler_unsubscribed("$share/audit/#");
        assert!(
            !index
                .route("42_sync", &publish("42_sync", "d", false), &None)
                .needs_router
        );
        assert_eq!(drained(&inbox), vec!["c", "d"]);

        index.unsubscribe("42_sync", &inbox);
        index.route("42_sync", &publish("42_sync", "e", false), &None);
        assert!(drained(&inbox).is_empty());
    }

    #[test]
    fn retained_topics_stay_with_the_router() {
        let index = ReplyIndex::default();
        let early = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("9_profile", &early, Served::default()));
        let routed = index.route("9_profile", &publish("9_profile", "p", true), &None);
        assert!(routed.needs_router, "the router keeps the retained message");
        let mut live = Vec::new();
        early.drain(|d| live.push(d.publish.retain));
        assert_eq!(live, vec![false], "a live delivery carries no retain flag");
        let late = Arc::new(ReplyInbox::default());
        assert!(!index.subscribe("9_profile", &late, Served::default()));
    }

    #[test]
    fn entries_are_freed_when_the_last_subscriber_leaves() {
        let index = ReplyIndex::default();
        let (a, b) = (
            Arc::new(ReplyInbox::default()),
            Arc::new(ReplyInbox::default()),
        );
        for i in 0..1000 {
            let topic = format!("1_t{i}");
            assert!(index.subscribe(&topic, &a, Served::default()));
            assert!(index.subscribe(&topic, &b, Served::default()));
        }
        index.device_subscribed_in_router("2_q");
        index.device_subscribed_in_router("2_q");
        index.handler_subscribed("sync");
        index.handler_subscribed("$share/g/sync");
        index.handler_subscribed("audit/#");
        assert_eq!(index.topics(), 1002);
        assert_eq!(index.topics_gauge.get(), 1002);

        for i in 0..1000 {
            let topic = format!("1_t{i}");
            index.unsubscribe(&topic, &a);
            assert_eq!(index.topics(), 1002 - i, "b still holds {topic}");
            index.unsubscribe(&topic, &b);
        }
        index.device_left_router("2_q");
        assert!(
            index
                .route("2_q", &publish("2_q", "x", false), &None)
                .needs_router
        );
        index.device_left_router("2_q");
        assert!(
            !index
                .route("2_q", &publish("2_q", "x", false), &None)
                .needs_router
        );
        index.handler_unsubscribed("sync");
        index.handler_unsubscribed("$share/g/sync");
        index.handler_unsubscribed("audit/#");
        assert_eq!(index.topics(), 0);
        assert_eq!(index.topics_gauge.get(), 0);
        assert!(index.routes.read().handler_wildcards.is_empty());
        // Leaving twice, or what was never joined, changes nothing.
        index.device_left_router("2_q");
        index.unsubscribe("1_t0", &a);
        index.handler_unsubscribed("never");
        assert_eq!(index.topics(), 0);

        // A retained message keeps its topic with the router until an
        // empty retained publish deletes it.
        index.route("9_p", &publish("9_p", "p", true), &None);
        assert!(!index.subscribe("9_p", &a, Served::default()));
        index.route("9_p", &publish("9_p", "", true), &None);
        assert_eq!(index.topics(), 0, "nothing retained, nobody subscribed");
        assert!(
            index.subscribe("9_p", &a, Served::default()),
            "served by the gate again"
        );
        index.unsubscribe("9_p", &a);
        assert_eq!(index.topics(), 0);
    }

    #[test]
    fn a_waiting_reply_counts_its_expiry_down_and_is_dropped_once_expired() {
        let expiring = |secs| {
            Some(Box::new(PublishProperties {
                message_expiry_interval: Some(secs),
                content_type: Some("text/plain".into()),
                ..Default::default()
            }))
        };
        let received = Instant::now();
        let delivery = |properties| Delivery {
            publish: publish("1_e", "x", false),
            properties,
            received: Some(received),
        };
        let later = received + std::time::Duration::from_millis(2500);
        assert!(delivery(expiring(2)).at(later).is_none(), "expired");
        let left = delivery(expiring(10)).at(later).and_then(|d| d.properties);
        assert_eq!(left.and_then(|p| p.message_expiry_interval), Some(8));
        let fresh = delivery(expiring(10))
            .at(received)
            .and_then(|d| d.properties);
        assert_eq!(fresh.and_then(|p| p.message_expiry_interval), Some(10));
        assert!(delivery(None).at(later).is_some(), "nothing to expire");

        // Through the index: only replies with an expiry read the clock.
        let index = ReplyIndex::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("1_e", &inbox, Served::default()));
        index.route(
            "1_e",
            &publish("1_e", "a", false),
            &expiring(60).map(|p| *p),
        );
        index.route("1_e", &publish("1_e", "b", false), &None);
        let mut got = Vec::new();
        inbox.drain(|d| got.push((d.received.is_some(), d.properties.is_some())));
        assert_eq!(got, vec![(true, true), (false, false)]);
    }

    #[test]
    fn each_delivery_carries_its_subscriptions_identifier_and_retain_as_published() {
        let index = ReplyIndex::default();
        let (plain, tagged) = (
            Arc::new(ReplyInbox::default()),
            Arc::new(ReplyInbox::default()),
        );
        assert!(index.subscribe("1_s", &plain, Served::default()));
        let options = Served {
            subscription_id: Some(7),
            retain_as_published: true,
        };
        assert!(index.subscribe("1_s", &tagged, options));
        let properties = Some(PublishProperties {
            user_properties: vec![("z".into(), "1".into()), ("a".into(), "2".into())],
            ..Default::default()
        });
        index.route("1_s", &publish("1_s", "x", true), &properties);
        index.route("1_s", &publish("1_s", "y", false), &None);
        let mut got = Vec::new();
        plain.drain(|d| got.push((d.publish.retain, d.properties.map(|p| *p))));
        assert_eq!(got, vec![(false, properties.clone()), (false, None)]);
        let mut got = Vec::new();
        tagged.drain(|d| got.push((d.publish.retain, d.properties.map(|p| *p))));
        let with_id = |p: Option<PublishProperties>| {
            let mut p = p.unwrap_or_default();
            p.subscription_identifiers = vec![7];
            Some(p)
        };
        assert_eq!(
            got,
            vec![(true, with_id(properties.clone())), (false, with_id(None))]
        );
        // A resubscription replaces the options.
        assert!(index.subscribe("1_s", &tagged, Served::default()));
        index.route("1_s", &publish("1_s", "z", true), &None);
        let mut got = Vec::new();
        tagged.drain(|d| got.push((d.publish.retain, d.properties.is_some())));
        assert_eq!(got, vec![(false, false)]);
    }

    #[test]
    fn the_inbox_counts_properties_and_holds_no_senders_buffer() {
        let index = ReplyIndex::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("1_p", &inbox, Served::default()));
        // A reply with a tiny payload and 10 KB of properties, its bytes
        // slices of one large "read buffer" as a decoded publish's are.
        let read_buffer = Bytes::from(vec![b'r'; 1 << 20]);
        let mut reply = publish("1_p", "", false);
        reply.topic = read_buffer.slice(0..3);
        reply.payload = read_buffer.slice(3..5);
        let properties = Some(PublishProperties {
            user_properties: vec![("k".into(), "v".repeat(5000))],
            correlation_data: Some(read_buffer.slice(5..5005)),
            ..Default::default()
        });
        let delivery = Delivery {
            publish: reply.clone(),
            properties: properties.clone().map(Box::new),
            received: None,
        };
        assert!(delivery.size() > 10_000, "{}", delivery.size());
        drop(delivery);
        let mut dropped = 0;
        for _ in 0..100 {
            dropped += index.route("1_p", &reply, &properties).dropped;
        }
        drop(reply);
        drop(properties);
        assert!(read_buffer.is_unique(), "no delivery borrows the buffer");
        let bytes = inbox.queue.lock().bytes;
        assert!(bytes <= INBOX_LIMIT_BYTES, "{bytes} bytes held");
        let mut kept = 0u64;
        inbox.drain(|d| {
            assert_eq!(&d.publish.payload[..], b"rr");
            kept += 1;
        });
        assert!(kept <= 7, "{kept} replies of 10 KB kept in 64 KiB");
        assert_eq!(kept + dropped, 100);
    }

    #[test]
    fn a_slow_session_loses_its_oldest_replies_first() {
        let index = ReplyIndex::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("1_x", &inbox, Served::default()));
        let body = Bytes::from(vec![b'x'; 1000]);
        let (mut dropped, mut newly_slow) = (0, 0);
        for i in 0..100u8 {
            let mut p = Publish::with_qos(
                Bytes::from_static(b"1_x"),
                body.clone(),
                false,
                QoS::AtMostOnce,
                0,
            );
            p.payload = Bytes::from([&[i][..], &body[1..]].concat());
            let routed = index.route("1_x", &p, &None);
            dropped += routed.dropped;
            newly_slow += routed.newly_slow;
        }
        assert_eq!(newly_slow, 1, "one episode, one log line");
        let kept: Vec<u8> = {
            let mut v = Vec::new();
            inbox.drain(|d| v.push(d.publish.payload[0]));
            v
        };
        assert_eq!(kept.len() as u64 + dropped, 100);
        assert!(kept.len() * 1003 <= INBOX_LIMIT_BYTES);
        assert_eq!(*kept.last().unwrap(), 99, "the newest is kept");
        assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "in order");
    }
}
