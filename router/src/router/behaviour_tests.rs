//! Tests of the changes from upstream that had none in the crate
//! (DESIGN.md lists which change each covers): QoS downgrade on delivery,
//! the router's span levels, buffers reserved on demand, link futures that
//! hold no packet, and per-link meters that keep totals only. Each fails on
//! rumqttd 0.20's behaviour, as its comment says.

use super::*;
use crate::link::local::{LinkRx, LinkTx};
use crate::protocol::PingReq;
use std::sync::atomic::{AtomicUsize, Ordering};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event as TraceEvent, Level, Metadata, Subscriber};

/// The forwards among `take()`: payload, QoS and packet id.
fn forwards(client: &Client) -> Vec<(String, QoS, u16)> {
    client
        .take()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Forward(f) => Some((
                String::from_utf8_lossy(&f.publish.payload).into_owned(),
                f.publish.qos,
                f.publish.pkid,
            )),
            _ => None,
        })
        .collect()
}

/// MQTT 3.1.1 and 5, 3.8.4: a message is delivered at the lower of its
/// publish QoS and the subscription's. Upstream delivered at the
/// subscription's QoS: a QoS 0 publish reached a QoS 2 subscriber as QoS 2,
/// with a packet id and an acknowledgement to wait for.
#[test]
fn delivered_qos_is_the_minimum_of_publish_and_subscription() {
    let mut router = router();
    let subscriber = connect(&mut router, "s", true);
    subscriber.subscribe(&mut router, "t", QoS::ExactlyOnce);
    subscriber.take();
    let low = connect(&mut router, "low", true);
    low.subscribe(&mut router, "t", QoS::AtMostOnce);
    low.take();
    let publisher = connect(&mut router, "p", true);

    publisher.publish(&mut router, "t", "zero", QoS::AtMostOnce, 0);
    publisher.publish(&mut router, "t", "one", QoS::AtLeastOnce, 1);

    let got = forwards(&subscriber);
    assert_eq!(got.len(), 2, "{got:?}");
    // A QoS 0 delivery has no packet id and takes no in-flight slot.
    assert_eq!(got[0], ("zero".to_owned(), QoS::AtMostOnce, 0));
    assert_eq!((got[1].0.as_str(), got[1].1), ("one", QoS::AtLeastOnce));
    assert_ne!(got[1].2, 0, "a QoS 1 delivery has a packet id");
    // A QoS 0 subscription gets QoS 1 publishes at QoS 0 (the encoder
    // writes no packet id for QoS 0).
    let low: Vec<(String, QoS)> = forwards(&low).into_iter().map(|(p, q, _)| (p, q)).collect();
    assert_eq!(
        low,
        vec![
            ("zero".to_owned(), QoS::AtMostOnce),
            ("one".to_owned(), QoS::AtMostOnce)
        ]
    );
}

/// Counts the spans of this crate that a subscriber enabling only ERROR
/// sees created.
struct ErrorSpans(AtomicUsize);

impl Subscriber for ErrorSpans {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // Ask every time: other tests run with other subscribers.
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() == Level::ERROR
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        if span.metadata().target().starts_with("mqtt_router") {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &TraceEvent<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// The router's per-batch and per-publish spans are at trace level.
/// Upstream had three at *error* level (`[>] incoming`, `incoming_payload`,
/// `publish`), enabled whatever the log level, so the subscriber formatted
/// their fields (the topic by `Debug`) on the router's path for every
/// message.
#[test]
fn routing_a_publish_creates_no_span_at_error_level() {
    let mut router = router();
    let subscriber = connect(&mut router, "s", true);
    subscriber.subscribe(&mut router, "t", QoS::AtMostOnce);
    subscriber.take();
    let publisher = connect(&mut router, "p", true);

    let spans = Arc::new(ErrorSpans(AtomicUsize::new(0)));
    tracing::subscriber::with_default(spans.clone(), || {
        // The counter sees error-level spans of this crate.
        drop(tracing::error_span!("probe"));
        publisher.publish(&mut router, "t", "m", QoS::AtMostOnce, 0);
    });
    assert_eq!(subscriber.publishes(), vec!["m".to_owned()]);
    assert_eq!(spans.0.load(Ordering::SeqCst), 1, "only the probe");
}

/// A link's buffers start unallocated and the router takes the packets a
/// link queued instead of swapping a buffer of its own in. Upstream
/// reserved 200 packets (~78 KB) per link's incoming buffer, 200
/// notifications per outgoing buffer and 100 in-flight entries, and its
/// swap handed every link a buffer another link had grown.
#[test]
fn link_buffers_start_empty_and_an_idle_link_holds_none() {
    let (outgoing, _wake) = Outgoing::new("fresh".to_owned());
    assert_eq!(outgoing.data_buffer.lock().capacity(), 0);
    assert_eq!(outgoing.unacked_pubrels.capacity(), 0);
    assert_eq!(
        Incoming::new("fresh".to_owned()).buffer.lock().capacity(),
        0
    );

    let mut router = router();
    let busy = connect(&mut router, "busy", true);
    let idle = connect(&mut router, "idle", true);
    assert_eq!(idle.incoming.lock().capacity(), 0);
    // A busy link's batches: each one is taken whole, and its link is left
    // with an unallocated buffer.
    for batch in 0..3 {
        {
            let mut queue = busy.incoming.lock();
            for _ in 0..50 {
                queue.push_back(Packet::PingReq(PingReq));
            }
        }
        router.events(busy.id, Event::DeviceData);
        settle(&mut router);
        assert_eq!(busy.incoming.lock().capacity(), 0, "batch {batch}");
    }
    // The other link's next batch does not inherit the busy link's buffer.
    idle.publish(&mut router, "t", "m", QoS::AtMostOnce, 0);
    assert_eq!(idle.incoming.lock().capacity(), 0);
}

/// Sending on a link queues the packet before the future exists, so the
/// future holds neither the packet nor the router event inline. Upstream's
/// `async fn send(&mut self, data: Packet)` held the packet (and, while
/// waiting, the event and an error of ~800 bytes) in every session future
/// that could send.
#[test]
fn link_send_futures_hold_no_packet() {
    let (router_tx, _router_rx) = flume::bounded(10);
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let mut tx = LinkTx::new(0, router_tx, queue.clone());
    let send = tx.send(Packet::PingReq(PingReq));
    let size = std::mem::size_of_val(&send);
    assert!(
        size < std::mem::size_of::<Packet>(),
        "send future {size} bytes, a packet {}",
        std::mem::size_of::<Packet>()
    );
    drop(send);
    // Queued already, although the future was never polled.
    assert_eq!(queue.lock().len(), 1);
    let (_wake_tx, wake_rx) = flume::bounded(1);
    let (router_tx, _router_rx) = flume::bounded(10);
    let rx = LinkRx::new(0, router_tx, wake_rx, Arc::new(Mutex::new(VecDeque::new())));
    let wake = std::mem::size_of_val(&rx.wake());
    assert!(
        wake < std::mem::size_of::<(ConnectionId, Event)>(),
        "wake future {wake} bytes"
    );
}

/// A link's meter keeps totals only. Upstream kept, per link, a map of
/// every topic it published to (a `String` per publish, never freed: one
/// entry per user for a handler replying on per-user topics) and a set of
/// its filters.
#[test]
fn incoming_meter_keeps_totals_only() {
    assert_eq!(
        std::mem::size_of::<IncomingMeter>(),
        2 * std::mem::size_of::<usize>()
    );
    let mut router = router();
    let handler = connect(&mut router, "h", true);
    for user in 0..100 {
        handler.publish(
            &mut router,
            &format!("u{user}_reply"),
            "r",
            QoS::AtMostOnce,
            0,
        );
    }
    assert_eq!(router.ibufs[handler.id].meter.get_total_count(), 100);
}
