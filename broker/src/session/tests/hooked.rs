//! Owns the test delivery the session's table tests wrap around the
//! one-node [`LocalDelivery`]: every method forwards to it, and a test
//! hooks only what it watches (`route`'s answer, `delivered`, `skipped`), instead of
//! each test forwarding the whole trait by hand.

use crate::acl::{CommandTopics, Denial};
use crate::delivery::{Delivery, LocalDelivery, Opening, Path, Request, Routed, Subscriptions};
use crate::router::protocol::{Publish, PublishProperties};

/// What a test may change of `route`'s answer: (topic, publish, answer).
type RouteHook = Box<dyn Fn(&str, &Publish, &mut Routed) + Send + Sync>;
/// What a test hears of `delivered`: (session id, tag).
type DeliveredHook = Box<dyn Fn(&str, &str) + Send + Sync>;

/// [`LocalDelivery`] with a test's hooks.
pub(crate) struct Hooked {
    local: LocalDelivery,
    route: Option<RouteHook>,
    delivered: Option<DeliveredHook>,
    skipped: Option<DeliveredHook>,
}

impl Hooked {
    pub(crate) fn new(local: LocalDelivery) -> Self {
        Hooked {
            local,
            route: None,
            delivered: None,
            skipped: None,
        }
    }

    /// `hook` hears every `skipped`.
    pub(crate) fn on_skipped(mut self, hook: impl Fn(&str, &str) + Send + Sync + 'static) -> Self {
        self.skipped = Some(Box::new(hook));
        self
    }

    /// `hook` sees (and may change) every `route` answer.
    pub(crate) fn on_route(
        mut self,
        hook: impl Fn(&str, &Publish, &mut Routed) + Send + Sync + 'static,
    ) -> Self {
        self.route = Some(Box::new(hook));
        self
    }

    /// `hook` hears every `delivered`.
    pub(crate) fn on_delivered(
        mut self,
        hook: impl Fn(&str, &str) + Send + Sync + 'static,
    ) -> Self {
        self.delivered = Some(Box::new(hook));
        self
    }
}

impl CommandTopics for Hooked {
    fn is_command(&self, topic: &str) -> bool {
        self.local.is_command(topic)
    }
}

impl Delivery for Hooked {
    fn open(&self, id: &str, opening: Opening) -> Subscriptions {
        self.local.open(id, opening)
    }
    fn subscribe(&self, row: &mut Subscriptions, request: &Request<'_>) -> Result<Path, Denial> {
        self.local.subscribe(row, request)
    }
    fn granted(&self, row: &mut Subscriptions, filter: &str) {
        self.local.granted(row, filter);
    }
    fn unsubscribe(&self, row: &mut Subscriptions, filter: &str) {
        self.local.unsubscribe(row, filter);
    }
    fn route(
        &self,
        topic: &str,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Routed {
        let mut routed = self.local.route(topic, publish, properties);
        if let Some(hook) = &self.route {
            hook(topic, publish, &mut routed);
        }
        routed
    }
    fn close(&self, id: &str, row: &mut Subscriptions) {
        self.local.close(id, row);
    }
    fn expire(&self, id: &str) {
        self.local.expire(id);
    }
    fn delivered(&self, session_id: &str, tag: &str) {
        if let Some(hook) = &self.delivered {
            hook(session_id, tag);
        }
    }
    fn skipped(&self, session_id: &str, tag: &str) {
        if let Some(hook) = &self.skipped {
            hook(session_id, tag);
        }
    }
}
