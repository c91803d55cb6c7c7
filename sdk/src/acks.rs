//! Owns when and in which order a worker acknowledges the commands it
//! receives. The worker connects with manual acknowledgements
//! (`MqttOptions::set_manual_acks`): the broker gets a command's PUBACK
//! only once its handling ended (its reply or error reply handed to the
//! client, or the SDK's own checks refused or dropped it), so a handler
//! process that dies mid-command leaves the command unacknowledged: with
//! Redis (the command streams), it stays pending and another handler of
//! the group gets it after `XAUTOCLAIM`. (One node without Redis: the
//! router re-delivers what a dead connection held only for persistent
//! sessions, and the worker's are clean, so there it is still lost.)
//!
//! Order: MQTT 5 (4.6, [MQTT-4.6.0-2]) says a client MUST send its PUBACKs
//! in the order it received the PUBLISH packets, and the broker's router
//! holds a connection's in-flight publishes in one queue and disconnects a
//! client whose PUBACK is not for the oldest one ("out of order ack").
//! rumqttc's `ack` only queues a PUBACK for the publish's packet id; it
//! keeps no order. So [`Acks`] keeps the connection's unacknowledged
//! commands in arrival order and sends an acknowledgement only when every
//! earlier command's handling ended too: a command that finishes early
//! waits for a slower earlier one (it still replied at once; only its
//! PUBACK waits).
//!
//! Connections: packet ids belong to one connection. When the connection
//! drops (or a new CONNACK arrives), everything not yet acknowledged is
//! forgotten (a new epoch): with Redis those commands stay pending and are
//! taken over (a handling that was still running when the connection
//! dropped gives a duplicate, never a loss). A PUBACK is never sent on a later
//! connection: rumqttc drops the acknowledgements still in its request
//! channel when a connection fails, and [`Acks`] queues none of an earlier
//! epoch.
//!
//! Only the poll loop owns an [`Acks`] (it never waits on anything here):
//! a command's task reports its end through an [`AckOnDrop`], a message on
//! an unbounded channel that holds at most one message per command the
//! broker let us hold unacknowledged (its in-flight window, at most 65,535
//! packet ids).

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::collections::VecDeque;
use tokio::sync::mpsc;

/// The end of one command's handling, as its task reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    epoch: u64,
    seq: u64,
}

/// Reports its command's end when dropped, exactly once.
#[derive(Debug)]
pub(crate) struct AckOnDrop {
    done: Done,
    tx: mpsc::UnboundedSender<Done>,
}

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        // Closed: the worker stopped; nothing to acknowledge any more.
        let _ = self.tx.send(self.done);
    }
}

/// One received command not yet acknowledged.
#[derive(Debug)]
struct Held {
    seq: u64,
    qos: QoS,
    pkid: u16,
    finished: bool,
}

/// What became of a call to [`Acks::send_ready`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Every finished command at the head of the queue was acknowledged.
    All,
    /// The client's request channel was full: try again after a poll.
    ChannelFull,
}

/// The connection's unacknowledged commands, in the order received.
#[derive(Debug)]
pub(crate) struct Acks {
    epoch: u64,
    next_seq: u64,
    held: VecDeque<Held>,
    tx: mpsc::UnboundedSender<Done>,
    rx: mpsc::UnboundedReceiver<Done>,
}

impl Acks {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Acks {
            epoch: 0,
            next_seq: 0,
            held: VecDeque::new(),
            tx,
            rx,
        }
    }

    /// A command arrived on the current connection: the guard its handling
    /// carries (`None` for QoS 0: nothing to acknowledge).
    pub(crate) fn received(&mut self, publish: &Publish) -> Option<AckOnDrop> {
        if publish.qos == QoS::AtMostOnce {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.held.push_back(Held {
            seq,
            qos: publish.qos,
            pkid: publish.pkid,
            finished: false,
        });
        Some(AckOnDrop {
            done: Done {
                epoch: self.epoch,
                seq,
            },
            tx: self.tx.clone(),
        })
    }

    /// The connection dropped, or a new one was acknowledged: what was held
    /// is the broker's to deliver again; acknowledgements of it are dropped.
    pub(crate) fn new_connection(&mut self) {
        if !self.held.is_empty() {
            tracing::info!(
                unacknowledged = self.held.len(),
                "connection changed: commands not yet acknowledged will be delivered again"
            );
        }
        self.epoch += 1;
        self.held.clear();
    }

    /// The next command whose handling ended (for the poll loop's select).
    pub(crate) async fn next_done(&mut self) -> Done {
        match self.rx.recv().await {
            Some(done) => done,
            // `self.tx` lives as long as `self`: never closed.
            None => std::future::pending().await,
        }
    }

    /// Marks `done`'s command finished (ignored when it was received on an
    /// earlier connection).
    pub(crate) fn finished(&mut self, done: Done) {
        if done.epoch != self.epoch {
            return;
        }
        if let Ok(i) = self.held.binary_search_by_key(&done.seq, |h| h.seq) {
            if let Some(held) = self.held.get_mut(i) {
                held.finished = true;
            }
        }
    }

    /// Takes in every end already reported, without waiting.
    pub(crate) fn collect_finished(&mut self) {
        while let Ok(done) = self.rx.try_recv() {
            self.finished(done);
        }
    }

    /// Hands `client` the PUBACK of each finished command at the head of
    /// the queue, in order, stopping at the first one still running.
    /// Never waits: a full request channel leaves the rest for later.
    pub(crate) fn send_ready(&mut self, client: &AsyncClient) -> Sent {
        self.send_ready_with(|qos, pkid| {
            let mut ack = Publish::new("", qos, Vec::new(), None);
            ack.pkid = pkid;
            // The only error: the request channel is full (or the event
            // loop is gone, when the worker ends anyway).
            client.try_ack(&ack).is_ok()
        })
    }

    /// [`Acks::send_ready`] through `ack`, which says whether it took the
    /// acknowledgement of (QoS, packet id).
    fn send_ready_with(&mut self, mut ack: impl FnMut(QoS, u16) -> bool) -> Sent {
        while let Some(head) = self.held.front() {
            if !head.finished {
                break;
            }
            if !ack(head.qos, head.pkid) {
                return Sent::ChannelFull;
            }
            self.held.pop_front();
        }
        Sent::All
    }

    /// Whether a finished command waits at the head of the queue.
    #[cfg(test)]
    pub(crate) fn has_ready(&self) -> bool {
        self.held.front().is_some_and(|h| h.finished)
    }

    /// Commands received on this connection and not yet acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: QoS, pkid: u16) -> Publish {
        let mut p = Publish::new("t", qos, Vec::new(), None);
        p.pkid = pkid;
        p
    }

    /// Sends what is ready; the packet ids acknowledged, in order.
    fn send(acks: &mut Acks) -> Vec<u16> {
        let mut sent = Vec::new();
        acks.collect_finished();
        acks.send_ready_with(|qos, pkid| {
            assert_eq!(qos, QoS::AtLeastOnce);
            sent.push(pkid);
            true
        });
        sent
    }

    #[test]
    fn acknowledged_once_each_in_the_order_received() {
        let mut acks = Acks::new();
        let first = acks.received(&publish(QoS::AtLeastOnce, 7)).unwrap();
        assert!(acks.received(&publish(QoS::AtMostOnce, 0)).is_none());
        let second = acks.received(&publish(QoS::AtLeastOnce, 3)).unwrap();
        let third = acks.received(&publish(QoS::AtLeastOnce, 9)).unwrap();
        assert_eq!(acks.len(), 3);

        // The later ones end first: nothing goes out before the first.
        drop(third);
        drop(second);
        assert!(send(&mut acks).is_empty());
        assert!(!acks.has_ready());
        assert_eq!(acks.len(), 3);

        drop(first);
        assert_eq!(send(&mut acks), vec![7, 3, 9]);
        assert_eq!(acks.len(), 0);
        assert!(send(&mut acks).is_empty(), "never twice");
    }

    #[test]
    fn nothing_of_an_earlier_connection_is_acknowledged_on_a_later_one() {
        let mut acks = Acks::new();
        let old = acks.received(&publish(QoS::AtLeastOnce, 1)).unwrap();
        acks.new_connection();
        assert_eq!(acks.len(), 0);
        let new = acks.received(&publish(QoS::AtLeastOnce, 1)).unwrap();
        drop(old);
        assert!(send(&mut acks).is_empty(), "the old command's end");
        assert_eq!(acks.len(), 1);
        drop(new);
        assert_eq!(send(&mut acks), vec![1]);
    }

    #[test]
    fn a_full_request_channel_keeps_the_acknowledgement_for_later() {
        let mut acks = Acks::new();
        let a = acks.received(&publish(QoS::AtLeastOnce, 1)).unwrap();
        let b = acks.received(&publish(QoS::AtLeastOnce, 2)).unwrap();
        drop(a);
        drop(b);
        acks.collect_finished();
        let room = std::cell::Cell::new(1);
        let sent = std::cell::RefCell::new(Vec::new());
        let take = |_: QoS, pkid: u16| {
            if room.get() == 0 {
                return false;
            }
            room.set(room.get() - 1);
            sent.borrow_mut().push(pkid);
            true
        };
        assert_eq!(acks.send_ready_with(take), Sent::ChannelFull);
        assert!(acks.has_ready());
        room.set(1);
        assert_eq!(acks.send_ready_with(take), Sent::All);
        assert_eq!(*sent.borrow(), vec![1, 2]);
        assert_eq!(acks.len(), 0);
    }
}
