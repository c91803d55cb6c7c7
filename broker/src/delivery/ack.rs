//! Owns the acknowledgement a delivery may owe a publish later: when
//! `route` only queued the publish somewhere it must still be stored (the
//! `cluster` crate's append to a Redis stream), its [`Routed`] carries a
//! [`Pending`] and the delivery keeps the matching [`Ticket`], which it
//! settles with the [`Outcome`] once it knows. The session waits for it
//! (its loop wakes on it), as it waits for the router's PUBACK (PUBREC),
//! and answers the client's PUBACK (QoS 1) or PUBREC (QoS 2) in the order
//! of the publishes (`inbound`).
//!
//! A `Pending` has a deadline the delivery chose: past it, the session
//! answers as if the store had failed, so it never waits forever. A ticket
//! dropped without an outcome (the delivery's task ended) is a failure.
//!
//! [`Routed`]: super::Routed

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How a publish the delivery owed an acknowledgement for went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored where it must be (appended, and replicated when asked).
    Stored,
    /// Not stored: refused, or the retries ran out (or the deadline passed).
    Failed,
    /// Not stored: the queue in front of the store was full.
    QueueFull,
}

/// The delivery's side: settled once the outcome is known.
#[derive(Debug)]
pub struct Ticket(oneshot::Sender<Outcome>);

impl Ticket {
    /// Tells the waiting session how it went (nothing if it is gone).
    pub fn settle(self, outcome: Outcome) {
        let _ = self.0.send(outcome);
    }
}

/// The session's side: the outcome to wait for, until `deadline`.
#[derive(Debug)]
pub struct Pending {
    outcome: oneshot::Receiver<Outcome>,
    deadline: Instant,
}

/// A ticket for the delivery and the pending acknowledgement the session
/// waits for until `deadline`.
pub fn ticket(deadline: Instant) -> (Ticket, Pending) {
    let (tx, rx) = oneshot::channel();
    (
        Ticket(tx),
        Pending {
            outcome: rx,
            deadline,
        },
    )
}

impl Pending {
    /// When the session stops waiting and answers as failed.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The outcome, once settled (a dropped ticket is a failure).
    pub fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|settled| settled.unwrap_or(Outcome::Failed))
    }

    /// The outcome if it was settled already.
    pub fn try_outcome(&mut self) -> Option<Outcome> {
        match self.outcome.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Outcome::Failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn a_pending_acknowledgement_gets_what_its_ticket_settles() {
        let deadline = Instant::now();
        // (settled with) -> outcome seen
        let table = [
            (Some(Outcome::Stored), Some(Outcome::Stored)),
            (Some(Outcome::QueueFull), Some(Outcome::QueueFull)),
            (Some(Outcome::Failed), Some(Outcome::Failed)),
            // A ticket dropped unsettled: failed.
            (None, Some(Outcome::Failed)),
        ];
        for (settled, seen) in table {
            let (ticket, mut pending) = super::ticket(deadline);
            assert_eq!(pending.try_outcome(), None, "not settled yet");
            assert_eq!(pending.deadline(), deadline);
            match settled {
                Some(outcome) => ticket.settle(outcome),
                None => drop(ticket),
            }
            assert_eq!(pending.try_outcome(), seen, "{settled:?}");
        }
        let (ticket, mut pending) = super::ticket(deadline);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(pending.poll_outcome(&mut cx).is_pending());
        ticket.settle(Outcome::Stored);
        assert_eq!(pending.poll_outcome(&mut cx), Poll::Ready(Outcome::Stored));
        // Settling for a session that is gone is nothing.
        let (ticket, pending) = super::ticket(deadline);
        drop(pending);
        ticket.settle(Outcome::Stored);
    }
}
