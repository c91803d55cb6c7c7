//! Owns what happens to a SUBSCRIBE and an UNSUBSCRIBE in a session: the
//! ACL per filter, then `delivery` for the cap and the path serving each
//! allowed filter (the session's inbox or the router), and the SUBACK that
//! merges the router's codes with the gate's denials in the client's order.

use super::state::{Actions, SessionState};
use crate::acl::{self, Denial};
use crate::answers;
use crate::auth::Principal;
use crate::delivery::{Path, Request, Served, SessionSubscription};
use crate::router::protocol::{
    Packet, RetainForwardRule, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
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
            let (delivery, limits) = (self.gate.delivery(), &self.gate.limits().topics);
            let request = Request {
                filter: &filter.path,
                qos: filter.qos,
                resend_retained: filter.retain_forward_rule == RetainForwardRule::OnEverySubscribe,
                served: Served {
                    subscription_id,
                    retain_as_published: filter.preserve_retain,
                },
            };
            let verdict = acl::may_subscribe(&self.who.principal, &filter.path, delivery, limits)
                .and_then(|()| delivery.subscribe(&mut self.subs, &request));
            match verdict {
                Ok(Path::Inbox) => {
                    codes.push(Some(SubscribeReasonCode::QoS0));
                }
                Ok(Path::Router) => {
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
        if self.carries_subscriptions() {
            let kept: Vec<SessionSubscription> = allowed
                .iter()
                .map(|filter| SessionSubscription::of(filter, subscription_id))
                .collect();
            self.gate.delivery().subscribed(self.claim.id(), &kept);
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
            self.gate.delivery().unsubscribe(&mut self.subs, filter);
        }
        if self.carries_subscriptions() {
            let delivery = self.gate.delivery();
            delivery.unsubscribed(self.claim.id(), &unsubscribe.filters);
        }
        let pkid = unsubscribe.pkid;
        out.to_router(Packet::Unsubscribe(unsubscribe, properties));
        let reasons = vec![UnsubAckReason::Success; count];
        out.to_client(Packet::UnsubAck(UnsubAck { pkid, reasons }, None));
    }

    /// A persistent device session: delivery keeps its subscriptions with
    /// their options (they follow it to another node).
    fn carries_subscriptions(&self) -> bool {
        !self.who.clean_session && matches!(self.who.principal, Principal::Device(_))
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
        for filter in pending.forwarded {
            self.gate.delivery().granted(&mut self.subs, &filter);
        }
        SubAck {
            pkid: suback.pkid,
            return_codes,
        }
    }
}
