//! Owns the routing decision for one publish: which inboxes the gate
//! delivers it to now (at QoS 0, with each subscription's options), and
//! whether the router still needs it (someone it serves may want it, or it
//! is retained, which only the router keeps).
//!
//! Why the gate delivers some itself: every reply through the router costs
//! a hop (two task wake-ups, a commit-log append and a per-topic log);
//! replies are most of the traffic. Which subscriptions the gate serves is
//! decided in `local.rs` so that MQTT behaviour is unchanged.

use super::inbox::Reply;
use super::table::Table;
use crate::router::protocol::{Publish, PublishProperties, QoS};
use protocol::topics::matches;
use tokio::time::Instant;

/// What the index did with one publish.
#[derive(Debug)]
pub struct Routed {
    /// Older replies dropped from slow sessions' inboxes to make room.
    pub dropped: u64,
    /// Sessions that started dropping with this publish (worth a log line).
    pub newly_slow: u64,
    /// Whether the router must see it too: someone it serves may want it,
    /// or it is retained.
    pub needs_router: bool,
    /// The delivery acknowledges this publish later (it queued it to be
    /// stored elsewhere): the client's PUBACK (QoS 1) or PUBREC (QoS 2)
    /// waits for it. Never from the local table.
    pub later: Option<super::ack::Pending>,
}

impl Routed {
    /// Counts the replies dropped for slow sessions, and says which topic
    /// made a session start dropping.
    pub fn record(&self, metrics: &crate::metrics::Metrics, topic: &str) {
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

impl Table {
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
            later: None,
            dropped: 0,
            newly_slow: 0,
            needs_router: publish.retain
                || found.is_some_and(|f| f.router_devices > 0 || f.handlers.handlers > 0)
                || routes
                    .wildcards
                    .iter()
                    .any(|(filter, counts)| counts.handlers > 0 && matches(topic, filter)),
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
            let (dropped, started_dropping) = inbox.push(Reply {
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
    use crate::delivery::inbox::{ReplyInbox, Served, INBOX_LIMIT_BYTES};
    use bytes::Bytes;
    use futures::task::noop_waker_ref;
    use std::sync::Arc;
    use std::task::Context;

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
        let index = Table::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("42_sync", &inbox, Served::default()));
        assert!(
            index.subscribe("42_sync", &inbox, Served::default()),
            "resubscribe is a no-op"
        );

        let routed = index.route("42_sync", &publish("42_sync", "a", false), &None);
        assert_eq!(
            (routed.dropped, routed.newly_slow, routed.needs_router),
            (0, 0, false)
        );
        assert!(routed.later.is_none(), "the local table owes nothing later");
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
        let index = Table::default();
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
        let index = Table::default();
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
        assert!(index.routes.read().wildcards.is_empty());
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
    fn only_replies_that_can_expire_read_the_clock() {
        let expiring = |secs| {
            Some(PublishProperties {
                message_expiry_interval: Some(secs),
                content_type: Some("text/plain".into()),
                ..Default::default()
            })
        };
        // Through the index: only replies with an expiry read the clock.
        let index = Table::default();
        let inbox = Arc::new(ReplyInbox::default());
        assert!(index.subscribe("1_e", &inbox, Served::default()));
        index.route("1_e", &publish("1_e", "a", false), &expiring(60));
        index.route("1_e", &publish("1_e", "b", false), &None);
        let mut got = Vec::new();
        inbox.drain(|d| got.push((d.received.is_some(), d.properties.is_some())));
        assert_eq!(got, vec![(true, true), (false, false)]);
    }

    #[test]
    fn each_delivery_carries_its_subscriptions_identifier_and_retain_as_published() {
        let index = Table::default();
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
        let index = Table::default();
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
        let delivery = Reply {
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
        let bytes = inbox.queued_bytes();
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
        let index = Table::default();
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
