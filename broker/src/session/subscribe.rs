//! Owns what happens to a SUBSCRIBE and an UNSUBSCRIBE in a session: the
//! ACL and the cap per filter, which path serves each allowed filter (the
//! gate's reply index or the router), and the SUBACK that merges the
//! router's codes with the gate's denials in the client's order.

use super::state::{Actions, SessionState};
use crate::acl::{self, Denial};
use crate::answers;
use crate::auth::Principal;
use crate::reply_index::Served;
use crate::router::protocol::{
    Filter, Packet, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};
use std::collections::HashMap;
use tracing::info;

/// A SUBACK waiting for the router's answer to the allowed filters.
struct PendingSubAck {
    /// One code per filter in the client's order; `None` = the router's.
    codes: Vec<Option<SubscribeReasonCode>>,
    /// Filters sent to the router (handlers declare them as command topics).
    forwarded: Vec<String>,
}

/// SUBACKs waiting for the router, by packet id; allocated only while one
/// waits (most sessions subscribe once, at the start).
// Boxed on purpose: an empty map is 48 bytes inline in every connection's
// resident state; the box is 8, allocated only while one waits.
#[allow(clippy::box_collection)]
#[derive(Default)]
pub struct PendingSubAcks(Option<Box<HashMap<u16, PendingSubAck>>>);

impl PendingSubAcks {
    fn insert(&mut self, pkid: u16, pending: PendingSubAck) {
        self.0
            .get_or_insert_with(Default::default)
            .insert(pkid, pending);
    }

    fn remove(&mut self, pkid: u16) -> Option<PendingSubAck> {
        let map = self.0.as_mut()?;
        let pending = map.remove(&pkid);
        if map.is_empty() {
            self.0 = None;
        }
        pending
    }
}

impl SessionState {
    pub(super) fn client_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
        out: &mut impl Actions,
    ) {
        let subscription_id = properties.as_ref().and_then(|p| p.id);
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::with_capacity(subscribe.filters.len());
        let mut over_quota = 0usize;
        for filter in subscribe.filters.drain(..) {
            let (commands, limits) = (self.gate.commands(), &self.gate.limits().topics);
            let verdict = acl::may_subscribe(&self.who.principal, &filter.path, commands, limits)
                .and_then(|()| self.subs.admit(&filter.path));
            match verdict {
                Ok(()) if self.serve_directly(&filter, subscription_id) => {
                    codes.push(Some(SubscribeReasonCode::QoS0));
                }
                Ok(()) => {
                    self.subscribing_in_router(&filter.path);
                    codes.push(None);
                    allowed.push(filter);
                }
                Err(denial) => {
                    self.gate.metrics().denied("subscribe", denial.label());
                    // One line per SUBSCRIBE for the quota, however many filters.
                    if denial == Denial::QuotaExceeded {
                        over_quota += 1;
                    } else {
                        info!(filter = %filter.path, reason = denial.label(), "subscription denied");
                    }
                    codes.push(Some(answers::suback_denial(self.who.version, denial)));
                }
            }
        }
        if over_quota > 0 {
            info!(
                filters = over_quota,
                held = self.subs.held(),
                "subscriptions denied: quota exceeded"
            );
        }
        let pkid = subscribe.pkid;
        if allowed.is_empty() {
            let return_codes = codes.into_iter().flatten().collect();
            out.to_client(Packet::SubAck(SubAck { pkid, return_codes }, None));
            return;
        }
        let forwarded = allowed.iter().map(|f| f.path.clone()).collect();
        self.pending_subacks
            .insert(pkid, PendingSubAck { codes, forwarded });
        subscribe.filters = allowed;
        // The router carries the subscription identifier on what it delivers.
        out.to_router(Packet::Subscribe(subscribe, properties));
    }

    /// The router answers only filters it knew (and not at all after a
    /// session resumes), so the gate answers every UNSUBSCRIBE.
    pub(super) fn client_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        properties: Option<UnsubscribeProperties>,
        out: &mut impl Actions,
    ) {
        let count = unsubscribe.filters.len();
        for filter in &unsubscribe.filters {
            self.stop_serving(filter);
        }
        if matches!(self.who.principal, Principal::Handler(_)) {
            for filter in &unsubscribe.filters {
                if self.subs.undeclare(filter) {
                    self.gate.commands().withdraw(filter);
                }
                if self.subs.remove_via_router(filter) {
                    self.gate.replies().handler_unsubscribed(filter);
                }
            }
        }
        for filter in &unsubscribe.filters {
            self.subs.release(filter);
        }
        let pkid = unsubscribe.pkid;
        out.to_router(Packet::Unsubscribe(unsubscribe, properties));
        let reasons = vec![UnsubAckReason::Success; count];
        out.to_client(Packet::UnsubAck(UnsubAck { pkid, reasons }, None));
    }

    /// Takes `filter` into the reply index if the gate can serve it (see
    /// `reply_index`): a QoS 0 subscription of a clean device session that
    /// this connection has not already made through the router.
    ///
    /// A subscription keeps its path for as long as it exists: moving it
    /// while messages are on their way would lose or repeat some (MQTT
    /// 3.8.4: a resubscription must not interrupt the flow). So a QoS 1/2
    /// resubscription of a topic the gate serves stays with the gate, at
    /// granted QoS 0 (a server may grant less than asked); unsubscribing
    /// first gets the higher QoS from the router. The exception: a topic
    /// that has held a retained message since, which a resubscription must
    /// send (Retain Handling 0) and only the router has; it moves there.
    fn serve_directly(&mut self, filter: &Filter, subscription_id: Option<usize>) -> bool {
        let Some(inbox) = self.inbox.clone() else {
            return false;
        };
        let served = Served {
            subscription_id,
            retain_as_published: filter.preserve_retain,
        };
        if self.subs.is_direct(&filter.path) {
            let resend_retained = filter.retain_forward_rule == RetainForwardRule::OnEverySubscribe
                && self.gate.replies().is_retained(&filter.path);
            if resend_retained {
                self.stop_serving(&filter.path);
                return false;
            }
            return self.gate.replies().subscribe(&filter.path, &inbox, served);
        }
        if filter.qos != QoS::AtMostOnce || self.subs.is_via_router(&filter.path) {
            return false;
        }
        if !self.gate.replies().subscribe(&filter.path, &inbox, served) {
            return false;
        }
        self.subs.add_direct(&filter.path);
        true
    }

    /// `filter` is about to be subscribed in the router: the reply index
    /// learns that the router serves it, before any publish can miss it.
    fn subscribing_in_router(&mut self, filter: &str) {
        if !self.subs.add_via_router(filter) {
            return;
        }
        match self.who.principal {
            Principal::Device(_) => self.gate.replies().device_subscribed_in_router(filter),
            Principal::Handler(_) => self.gate.replies().handler_subscribed(filter),
        }
    }

    /// The gate stops serving `topic` to this session, if it did.
    fn stop_serving(&mut self, topic: &str) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        if self.subs.remove_direct(topic) {
            self.gate.replies().unsubscribe(topic, inbox);
        }
    }

    /// Puts the router's codes for the forwarded filters back among the
    /// gate's denials, in the order the client sent them.
    pub(super) fn merge_suback(&mut self, suback: SubAck) -> SubAck {
        let Some(pending) = self.pending_subacks.remove(suback.pkid) else {
            return suback;
        };
        let mut from_router = suback.return_codes.into_iter();
        let return_codes = pending
            .codes
            .into_iter()
            .map(|code| {
                code.unwrap_or_else(|| {
                    from_router
                        .next()
                        .unwrap_or(SubscribeReasonCode::Unspecified)
                })
            })
            .collect::<Vec<_>>();
        if matches!(self.who.principal, Principal::Handler(_)) {
            for filter in pending.forwarded {
                if self.subs.declare(&filter) {
                    self.gate.commands().declare(&filter);
                }
            }
        }
        SubAck {
            pkid: suback.pkid,
            return_codes,
        }
    }
}
