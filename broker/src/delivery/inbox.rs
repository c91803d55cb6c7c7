//! Owns each device session's bounded inbox of replies the gate delivers
//! itself (beside the router), and what one reply carries on its way.
//!
//! The device sees the protocol it would see from the router: properties as
//! published, in order; the Message Expiry Interval counted down while a
//! reply waits in the inbox (an expired one is not delivered); its
//! subscription's identifier on each delivery; the retain flag only under
//! Retain As Published.

use crate::router::protocol::{Publish, PublishProperties};
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Bytes one session's inbox holds for a device that reads slower than its
/// replies arrive, counted as the router counts a stored publish (record,
/// topic, payload and properties: `Reply::size`); the oldest are dropped
/// beyond it (QoS 0), as the router's reply logs drop their oldest segment.
pub const INBOX_LIMIT_BYTES: usize = 64 * 1024;

/// One publish on its way to a device. The properties are boxed: most
/// replies have none, and a queue keeps its slots' room.
pub struct Reply {
    pub publish: Publish,
    pub properties: Option<Box<PublishProperties>>,
    /// When the gate received it, if it carries a Message Expiry Interval.
    pub(super) received: Option<Instant>,
}

impl Reply {
    /// The delivery as it leaves at `now`: its Message Expiry Interval less
    /// the whole seconds it waited, or `None` once expired (MQTT 5
    /// §3.3.2.3.3: not delivered).
    pub(super) fn at(mut self, now: Instant) -> Option<Reply> {
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

impl Reply {
    /// What it keeps alive while it waits: its record, topic, payload and
    /// properties (user properties, correlation data, content type,
    /// response topic, subscription identifiers). Counting topic and payload
    /// only let one subscriber that stopped reading hold 122 MB of replies
    /// whose properties (correlation data echoed by the SDK) the inbox did
    /// not see.
    pub(super) fn size(&self) -> usize {
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
    deliveries: VecDeque<Reply>,
    bytes: usize,
    /// Dropping since the session last drained (one log line per episode).
    overflowing: bool,
}

impl ReplyInbox {
    /// Queues `delivery` and wakes the session; returns how many older ones
    /// were dropped to stay within `INBOX_LIMIT_BYTES`, and whether this
    /// session just started dropping.
    pub(super) fn push(&self, delivery: Reply) -> (u64, bool) {
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

    /// Bytes the queue holds now (tests of the budget).
    #[cfg(test)]
    pub(super) fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
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
    pub fn drain(&self, mut each: impl FnMut(Reply)) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::protocol::QoS;
    use bytes::Bytes;

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
        let delivery = |properties| Reply {
            publish: Publish::with_qos(
                Bytes::from_static(b"1_e"),
                Bytes::from_static(b"x"),
                false,
                QoS::AtMostOnce,
                0,
            ),
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
    }
}
