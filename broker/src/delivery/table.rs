//! Owns the one subscription table every session shares: for each literal
//! topic, who wants it (the inboxes the gate serves it to, how many device
//! sessions and handler subscriptions the router serves it to, whether a
//! handler declared it a command, whether it holds a retained message), the
//! handlers' wildcard filters, and the command topics the operator
//! configured. A session's own row (its filters and the path of each) is
//! [`super::Subscriptions`]; what this table counts is what the rows hold,
//! changed only by [`super::LocalDelivery`].
//!
//! A reply-shaped topic (`<uid>_<name>`, see `protocol::uid::is_reply_shaped`)
//! is never declared a command: a handler reading some user's reply topic
//! must not open it to every device's publishes. Underscored commands
//! (`request_contact`) are commands because the operator configured them.

use super::inbox::{ReplyInbox, Served};
use crate::acl::CommandTopics;
use bytes::Bytes;
use parking_lot::{RwLock, RwLockWriteGuard};
use prometheus_client::metrics::gauge::Gauge;
use protocol::topics::{effective_filter, is_wildcard, matches};
use protocol::uid::is_reply_shaped;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The subscription table, shared by all sessions of one node.
#[derive(Default)]
pub struct Table {
    /// Command topics the operator configured (fixed while running).
    configured: HashSet<String>,
    pub(super) routes: RwLock<Routes>,
    /// How many topics `routes` holds, for `/metrics` (set on every change).
    pub(super) topics_gauge: Gauge,
}

/// Keyed hashing, faster than the default for the short topic names looked
/// up on every publish (and still seeded per process).
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Default)]
pub(super) struct Routes {
    /// Literal topic → who wants it: one lookup per publish.
    pub(super) topics: FastMap<Bytes, TopicRoutes>,
    /// Handler wildcard filters in the router (`$share/g/` removed); few
    /// (monitoring subscriptions, wildcard commands), scanned per publish.
    pub(super) wildcards: HashMap<String, Counts>,
}

/// How many handler subscriptions name a filter, and how many of them
/// declared it a command topic.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) handlers: usize,
    pub(super) declared: usize,
}

impl Counts {
    fn is_empty(&self) -> bool {
        self.handlers == 0 && self.declared == 0
    }
}

#[derive(Default)]
pub(super) struct TopicRoutes {
    /// Inboxes of the sessions the gate serves this topic to, and how.
    pub(super) inboxes: Vec<(Arc<ReplyInbox>, Served)>,
    /// Device sessions subscribed to it through the router (QoS 1/2, a
    /// persistent session, a retained topic). A clean session counts until
    /// its connection ends; a persistent one until the session expires or a
    /// clean connection replaces it (its subscriptions stay in the router
    /// meanwhile).
    pub(super) router_devices: usize,
    /// It holds a retained message (set by a retained publish, cleared by
    /// an empty one, which deletes it in the router).
    pub(super) retained: bool,
    /// Live handler subscriptions naming this topic literally, and the
    /// command declarations among them.
    pub(super) handlers: Counts,
}

impl TopicRoutes {
    fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
            && self.router_devices == 0
            && !self.retained
            && self.handlers.is_empty()
    }
}

impl Routes {
    /// The routes of `topic`, created if new. Off the hot path (subscribe,
    /// retained publishes), so the key copy per call does not matter.
    pub(super) fn entry(&mut self, topic: &str) -> &mut TopicRoutes {
        self.topics
            .entry(Bytes::copy_from_slice(topic.as_bytes()))
            .or_default()
    }

    pub(super) fn forget_if_empty(&mut self, topic: &str) {
        if self
            .topics
            .get(topic.as_bytes())
            .is_some_and(TopicRoutes::is_empty)
        {
            self.topics.remove(topic.as_bytes());
        }
    }

    /// The handler counts of `inner` (a filter without `$share/g/`).
    fn handler_counts(&mut self, inner: &str) -> &mut Counts {
        if is_wildcard(inner) {
            self.wildcards.entry(inner.to_owned()).or_default()
        } else {
            &mut self.entry(inner).handlers
        }
    }

    /// Lowers one of `inner`'s handler counts, freeing what nobody names.
    fn lower_handler_count(&mut self, inner: &str, which: fn(&mut Counts) -> &mut usize) {
        if is_wildcard(inner) {
            if let Some(counts) = self.wildcards.get_mut(inner) {
                let count = which(counts);
                *count = count.saturating_sub(1);
                if counts.is_empty() {
                    self.wildcards.remove(inner);
                }
            }
        } else if let Some(found) = self.topics.get_mut(inner.as_bytes()) {
            let count = which(&mut found.handlers);
            *count = count.saturating_sub(1);
            self.forget_if_empty(inner);
        }
    }
}

/// The write lock on the routes; on release, the gauge shows their size.
pub(super) struct Writing<'a> {
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

impl Table {
    /// A table with the operator's command topics that keeps its size in
    /// `gauge` (a `/metrics` series).
    pub fn new(configured: impl IntoIterator<Item = String>, gauge: Gauge) -> Self {
        Table {
            configured: configured.into_iter().collect(),
            routes: RwLock::default(),
            topics_gauge: gauge,
        }
    }

    pub(super) fn write(&self) -> Writing<'_> {
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

    /// A device session that subscribed to `topic` through the router ended
    /// (the router dropped its subscriptions with it).
    pub fn device_left_router(&self, topic: &str) {
        let mut routes = self.write();
        if let Some(found) = routes.topics.get_mut(topic.as_bytes()) {
            found.router_devices = found.router_devices.saturating_sub(1);
            routes.forget_if_empty(topic);
        }
    }

    /// Topics the table holds entries for (each costs memory until freed).
    pub fn topics(&self) -> usize {
        self.routes.read().topics.len()
    }

    /// A handler subscribed to `filter` (shared or not) through the router.
    pub fn handler_subscribed(&self, filter: &str) {
        let inner = effective_filter(filter);
        self.write().handler_counts(inner).handlers += 1;
    }

    /// A handler's subscription to `filter` ended.
    pub fn handler_unsubscribed(&self, filter: &str) {
        let inner = effective_filter(filter);
        self.write()
            .lower_handler_count(inner, |counts| &mut counts.handlers);
    }

    /// The filter a handler subscription declares as a command topic, if any.
    /// Filters that begin with a wildcard or `$` (monitoring subscriptions
    /// such as `#`) declare nothing: they would open every topic to devices.
    /// Nor do reply-shaped ones: the first level of a declarable filter is
    /// literal, so no topic it matches is reply-shaped when its first level
    /// is not.
    fn declarable(filter: &str) -> Option<&str> {
        let inner = effective_filter(filter);
        let first_level = inner.split('/').next().unwrap_or_default();
        if inner.starts_with('$') || is_wildcard(first_level) || is_reply_shaped(first_level) {
            return None;
        }
        Some(inner)
    }

    /// A handler's subscription to `filter` declares it a command topic.
    pub fn declare(&self, filter: &str) {
        let Some(inner) = Self::declarable(filter) else {
            return;
        };
        self.write().handler_counts(inner).declared += 1;
    }

    /// A handler's subscription to `filter` no longer declares it.
    pub fn withdraw(&self, filter: &str) {
        let Some(inner) = Self::declarable(filter) else {
            return;
        };
        self.write()
            .lower_handler_count(inner, |counts| &mut counts.declared);
    }
}

impl CommandTopics for Table {
    /// Whether `topic` is currently a command topic: configured, or
    /// declared by a live (or kept) handler subscription.
    fn is_command(&self, topic: &str) -> bool {
        if self.configured.contains(topic) {
            return true;
        }
        let routes = self.routes.read();
        routes
            .topics
            .get(topic.as_bytes())
            .is_some_and(|found| found.handlers.declared > 0)
            || routes
                .wildcards
                .iter()
                .any(|(filter, counts)| counts.declared > 0 && matches(topic, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_and_declared_topics() {
        let topics = Table::new(["sync".to_owned()], Gauge::default());
        assert!(topics.is_command("sync"));
        assert!(!topics.is_command("publish"));

        topics.declare("$share/publish/publish");
        topics.declare("publish");
        assert!(topics.is_command("publish"));
        topics.withdraw("publish");
        assert!(topics.is_command("publish"), "still one subscription");
        topics.withdraw("$share/publish/publish");
        assert!(!topics.is_command("publish"));

        topics.declare("jobs/+");
        assert!(topics.is_command("jobs/resize"));
        assert!(!topics.is_command("jobs/a/b"));
    }

    #[test]
    fn monitoring_filters_declare_nothing() {
        let topics = Table::new([], Gauge::default());
        for filter in ["#", "+", "+/x", "$share/g/#", "$SYS/#"] {
            topics.declare(filter);
        }
        assert!(!topics.is_command("anything"));
        assert!(!topics.is_command("42_sync"));
        topics.withdraw("#");
    }

    #[test]
    fn reply_topics_never_become_commands() {
        let topics = Table::new(["request_contact".to_owned()], Gauge::default());
        for filter in [
            "alice_x",
            "$share/g/alice_x",
            "alice_x/+",
            "alice_x/#",
            "request_contact_list",
            "12_3_contact_list",
        ] {
            topics.declare(filter);
            assert!(!topics.is_command(effective_filter(filter)), "{filter:?}");
        }
        assert!(!topics.is_command("alice_x/y"));
        // Withdrawing what was never declared changes nothing.
        topics.withdraw("alice_x");
        // Configured underscored commands stay commands; plain ones still declare.
        assert!(topics.is_command("request_contact"));
        topics.declare("jobs");
        assert!(topics.is_command("jobs"));
    }

    #[test]
    fn declarations_and_handler_subscriptions_share_one_entry() {
        let table = Table::new([], Gauge::default());
        table.handler_subscribed("$share/g/jobs");
        table.declare("$share/g/jobs");
        table.handler_subscribed("$share/g/work/+");
        table.declare("$share/g/work/+");
        assert_eq!(table.topics(), 1, "one entry for jobs, whatever counts it");
        assert!(table.is_command("jobs") && table.is_command("work/x"));
        table.withdraw("$share/g/jobs");
        table.withdraw("$share/g/work/+");
        assert!(!table.is_command("jobs") && !table.is_command("work/x"));
        assert_eq!(table.topics(), 1, "the handler still subscribes");
        table.handler_unsubscribed("$share/g/jobs");
        table.handler_unsubscribed("$share/g/work/+");
        assert_eq!(table.topics(), 0);
        assert!(table.routes.read().wildcards.is_empty());
    }
}
