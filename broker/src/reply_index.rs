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

use bytes::Bytes;
use futures::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};
use rumqttd::protocol::{Publish, PublishProperties, QoS};
use shared::topics::{effective_filter, is_wildcard, matches};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll};

/// Payload and topic bytes one session's inbox holds for a device that reads
/// slower than its replies arrive; the oldest are dropped beyond it (QoS 0),
/// as the router's reply logs drop their oldest segment.
pub const INBOX_LIMIT_BYTES: usize = 64 * 1024;

/// One publish on its way to a device.
pub struct Delivery {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
}

impl Delivery {
    fn size(&self) -> usize {
        self.publish.topic.len() + self.publish.payload.len()
    }
}

/// The replies waiting for one device session's task.
#[derive(Default)]
pub struct ReplyInbox {
    queue: Mutex<Queued>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Queued {
    deliveries: VecDeque<Delivery>,
    bytes: usize,
}

impl ReplyInbox {
    /// Queues `delivery` and wakes the session; returns how many older ones
    /// were dropped to stay within `INBOX_LIMIT_BYTES`.
    fn push(&self, delivery: Delivery) -> u64 {
        let mut dropped = 0;
        {
            let mut queued = self.queue.lock();
            queued.bytes += delivery.size();
            queued.deliveries.push_back(delivery);
            while queued.bytes > INBOX_LIMIT_BYTES && queued.deliveries.len() > 1 {
                if let Some(oldest) = queued.deliveries.pop_front() {
                    queued.bytes -= oldest.size();
                    dropped += 1;
                }
            }
        }
        self.waker.wake();
        dropped
    }

    /// Ready when something is queued; registers the session's task otherwise.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.queue.lock().deliveries.is_empty() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A push between the check and the registration woke nobody.
        if self.queue.lock().deliveries.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Hands every queued delivery to `each`, oldest first; returns how many.
    pub fn drain(&self, mut each: impl FnMut(Delivery)) -> u64 {
        let mut queued = self.queue.lock();
        if queued.deliveries.is_empty() {
            return 0;
        }
        let count = queued.deliveries.len() as u64;
        queued.bytes = 0;
        for delivery in queued.deliveries.drain(..) {
            each(delivery);
        }
        // Released, not kept: most sessions are idle most of the time.
        if queued.deliveries.capacity() > 16 {
            queued.deliveries = VecDeque::new();
        }
        count
    }
}

/// What the index did with one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Sessions the gate delivered it to.
    pub delivered: u64,
    /// Older replies dropped from slow sessions' inboxes to make room.
    pub dropped: u64,
    /// Whether the router must see it too: someone it serves may want it,
    /// or it is retained.
    pub needs_router: bool,
}

/// The gate's delivery index, shared by all sessions.
#[derive(Default)]
pub struct ReplyIndex {
    routes: RwLock<Routes>,
}

#[derive(Default)]
struct Routes {
    /// Topic → inboxes of the sessions the gate serves it to.
    direct: HashMap<Bytes, Vec<Arc<ReplyInbox>>>,
    /// Literal topics some device subscribed to through the router (QoS 1/2,
    /// a persistent session, a retained topic). Never shrinks: a persistent
    /// session keeps its subscriptions in the router after its connection.
    router_topics: HashSet<Bytes>,
    /// Topics a retained publish was sent to (possibly cleared since).
    retained: HashSet<Bytes>,
    /// Handler filters in the router (`$share/g/` removed), with counts.
    handler_literal: HashMap<String, usize>,
    handler_wildcard: HashMap<String, usize>,
}

impl Routes {
    fn handler_counts(&mut self, filter: &str) -> &mut HashMap<String, usize> {
        if is_wildcard(filter) {
            &mut self.handler_wildcard
        } else {
            &mut self.handler_literal
        }
    }

    fn router_wants(&self, topic: &str) -> bool {
        self.router_topics.contains(topic.as_bytes())
            || self.handler_literal.contains_key(topic)
            || self
                .handler_wildcard
                .keys()
                .any(|filter| matches(topic, filter))
    }
}

impl ReplyIndex {
    /// Serves `topic` to `inbox` from now on, unless the topic has (or had)
    /// a retained message, which only the router can give a new subscriber:
    /// then returns false and the subscription goes to the router.
    pub fn subscribe(&self, topic: &str, inbox: &Arc<ReplyInbox>) -> bool {
        let mut routes = self.routes.write();
        if routes.retained.contains(topic.as_bytes()) {
            return false;
        }
        let inboxes = routes
            .direct
            .entry(Bytes::copy_from_slice(topic.as_bytes()))
            .or_default();
        if !inboxes.iter().any(|i| Arc::ptr_eq(i, inbox)) {
            inboxes.push(inbox.clone());
        }
        true
    }

    /// Stops serving `topic` to `inbox`.
    pub fn unsubscribe(&self, topic: &str, inbox: &Arc<ReplyInbox>) {
        let mut routes = self.routes.write();
        if let Some(inboxes) = routes.direct.get_mut(topic.as_bytes()) {
            inboxes.retain(|i| !Arc::ptr_eq(i, inbox));
            if inboxes.is_empty() {
                routes.direct.remove(topic.as_bytes());
            }
        }
    }

    /// A device subscribed to `topic` through the router.
    pub fn device_subscribed_in_router(&self, topic: &str) {
        let mut routes = self.routes.write();
        if !routes.router_topics.contains(topic.as_bytes()) {
            routes
                .router_topics
                .insert(Bytes::copy_from_slice(topic.as_bytes()));
        }
    }

    /// A handler subscribed to `filter` (shared or not) through the router.
    pub fn handler_subscribed(&self, filter: &str) {
        let inner = effective_filter(filter);
        let mut routes = self.routes.write();
        *routes
            .handler_counts(inner)
            .entry(inner.to_owned())
            .or_default() += 1;
    }

    /// A handler's subscription to `filter` ended.
    pub fn handler_unsubscribed(&self, filter: &str) {
        let inner = effective_filter(filter);
        let mut routes = self.routes.write();
        let counts = routes.handler_counts(inner);
        if let Some(count) = counts.get_mut(inner) {
            *count -= 1;
            if *count == 0 {
                counts.remove(inner);
            }
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
            let mut routes = self.routes.write();
            if !routes.retained.contains(topic.as_bytes()) {
                routes.retained.insert(publish.topic.clone());
            }
        }
        let routes = self.routes.read();
        let mut routed = Routed {
            delivered: 0,
            dropped: 0,
            needs_router: publish.retain || routes.router_wants(topic),
        };
        if let Some(inboxes) = routes.direct.get(topic.as_bytes()) {
            for inbox in inboxes {
                // Delivered at the subscription's QoS 0: no packet id, and
                // (MQTT 3.3.1.3) no retain flag on a live delivery.
                let copy = Publish::with_qos(
                    publish.topic.clone(),
                    publish.payload.clone(),
                    false,
                    QoS::AtMostOnce,
                    0,
                );
                routed.dropped += inbox.push(Delivery {
                    publish: copy,
                    properties: properties.clone(),
                });
                routed.delivered += 1;
            }
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
        assert!(index.subscribe("42_sync", &inbox));
        assert!(index.subscribe("42_sync", &inbox), "resubscribe is a no-op");

        let routed = index.route("42_sync", &publish("42_sync", "a", false), &None);
        assert_eq!(
            routed,
            Routed {
                delivered: 1,
                dropped: 0,
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
        let routed = index.route("42_sync", &publish("42_sync", "e", false), &None);
        assert_eq!(routed.delivered, 0);
        assert!(drained(&inbox).is_empty());
    }

    #[test]
    fn retained_topics_stay_with_the_router() {
        let index = ReplyIndex::default();
        let early = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("9_profile", &early));
        let routed = index.route("9_profile", &publish("9_profile", "p", true), &None);
        assert!(routed.needs_router, "the router keeps the retained message");
        assert_eq!(routed.delivered, 1);
        let mut live = Vec::new();
        early.drain(|d| live.push(d.publish.retain));
        assert_eq!(live, vec![false], "a live delivery carries no retain flag");
        let late = Arc::new(ReplyInbox::default());
        assert!(!index.subscribe("9_profile", &late));
    }

    #[test]
    fn a_slow_session_loses_its_oldest_replies_first() {
        let index = ReplyIndex::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("1_x", &inbox));
        let body = Bytes::from(vec![b'x'; 1000]);
        let mut dropped = 0;
        for i in 0..100u8 {
            let mut p = Publish::with_qos(
                Bytes::from_static(b"1_x"),
                body.clone(),
                false,
                QoS::AtMostOnce,
                0,
            );
            p.payload = Bytes::from([&[i][..], &body[1..]].concat());
            dropped += index.route("1_x", &p, &None).dropped;
        }
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
