//! Owns the embedded rumqttd router: its configuration, running it as a task
//! on the broker's runtime, and opening links (the router's view of one client
//! session). The only module of the session's path that names rumqttd: the
//! session sees [`RouterTx`], [`RouterRx`] and [`RouterEvent`], and the MQTT
//! packet types through [`protocol`].

use futures::FutureExt;
use mqtt_router::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use mqtt_router::{Router, RouterConfig};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The MQTT packet types and codecs (the router's, which the gate frames with).
pub use mqtt_router::protocol;
use mqtt_router::protocol::Packet;
/// Which subscriptions an injection link's publishes reach (`inject.rs`).
pub use mqtt_router::Audience;

/// Copies a publish out of the read buffer it borrows, so keeping it does
/// not keep the whole buffer alive.
pub use mqtt_router::detach;
/// The bytes a stored publish keeps alive in the router's logs (record,
/// topic, payload and properties): what the delayed wills' cap counts.
pub use mqtt_router::message_size;

/// The router closed a link (it ended the session, or it stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the router closed the link")]
pub struct LinkClosed;

/// What a session sends to the router.
pub struct RouterTx(LinkTx);

impl RouterTx {
    /// Queues `packet` without waking the router: the next [`RouterTx::send`]
    /// wakes it once for everything queued (one router event per read).
    pub fn queue(&self, packet: Packet) {
        self.0.buffer().push_back(packet);
    }

    /// Queues `packet` at once (before the future is first polled) and wakes
    /// the router; the future only waits for room in the router's channel
    /// and holds no packet, so a session's state machine stays small (a
    /// combinator, not an `async` block: that would hold the inner future
    /// twice).
    pub fn send(&mut self, packet: Packet) -> impl Future<Output = Result<(), LinkClosed>> + '_ {
        self.0
            .send(packet)
            .map(|sent| sent.map(|_| ()).map_err(|_| LinkClosed))
    }
}

/// One thing the router has for a session.
// Transient: handed to the session as it is read, never kept; boxing the
// packet would allocate once per message.
#[allow(clippy::large_enum_variant)]
pub enum RouterEvent {
    /// A packet for the client (or an acknowledgement of the session's own).
    Packet(Packet),
    /// The router paused the link after a burst: ask again with
    /// [`RouterRx::wake`] (no packet is held meanwhile).
    Paused,
}

impl RouterEvent {
    fn from_notification(notification: mqtt_router::Notification) -> Self {
        match Option::<Packet>::from(notification) {
            Some(packet) => RouterEvent::Packet(packet),
            None => RouterEvent::Paused,
        }
    }
}

/// What the router has for a session.
pub struct RouterRx(LinkRx);

impl RouterRx {
    /// Ready with the next event (`None`: woken with nothing new), keeping
    /// one lasting wait registered between calls.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<RouterEvent>, LinkClosed>> {
        self.0.poll_next(cx).map(|next| match next {
            Ok(next) => Ok(next.map(RouterEvent::from_notification)),
            Err(_) => Err(LinkClosed),
        })
    }

    /// The next event if the router has one ready, without waiting:
    /// `Ok(None)` when it has nothing.
    pub fn try_next(&mut self) -> Result<Option<RouterEvent>, LinkClosed> {
        loop {
            match self.0.try_next() {
                Ok(Some(Some(next))) => return Ok(Some(RouterEvent::from_notification(next))),
                // Woken with nothing new: look again.
                Ok(Some(None)) => continue,
                Ok(None) => return Ok(None),
                Err(_) => return Err(LinkClosed),
            }
        }
    }

    /// The next event, waiting for it.
    pub async fn next(&mut self) -> Result<Option<RouterEvent>, LinkClosed> {
        match self.0.next().await {
            Ok(next) => Ok(next.map(RouterEvent::from_notification)),
            Err(_) => Err(LinkClosed),
        }
    }

    /// Asks the router for more after [`RouterEvent::Paused`].
    pub fn wake(&self) -> impl Future<Output = Result<(), LinkClosed>> + '_ {
        self.0.wake().map(|woken| woken.map_err(|_| LinkClosed))
    }
}

/// Why a router session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// rumqttd's `LinkError` is ~800 bytes; keep its text, not the value.
    #[error("router refused the session: {0}")]
    Link(String),
    #[error("router answered without a CONNACK")]
    NoConnAck,
}

/// Starts a link to the router; hides the router's inbox, whose element type
/// rumqttd keeps private.
type LinkStarter = Arc<dyn for<'a> Fn(&'a str) -> LinkBuilder<'a> + Send + Sync>;

/// A handle on the router task.
#[derive(Clone)]
pub struct EmbeddedRouter {
    start_link: LinkStarter,
}

/// The router's task. It only ends if the router fails: every session
/// depends on it, so the broker stops then (see `Broker::start`).
pub struct RouterTask(tokio::task::JoinHandle<String>);

impl RouterTask {
    /// Waits for the router to end, and says why.
    pub async fn ended(self) -> String {
        match self.0.await {
            Ok(reason) => reason,
            Err(e) => format!("router task failed: {e}"),
        }
    }
}

/// One open router session.
pub struct RouterLink {
    pub tx: RouterTx,
    pub rx: RouterRx,
    pub session_present: bool,
}

/// Per-filter log sizes, in the bytes each stored message keeps alive: its
/// record (~260 bytes), topic, payload and properties (vendor patch 30;
/// before, topic and payload only, and 48 MB of user properties fitted in a
/// 4 MiB command log). Reply topics keep up to 64 KiB for a device that is
/// away, older messages dropped first; a log read to its end by all its
/// readers (one subscriber, or one `$share` group) is emptied at once
/// (vendor patches 11 and 31). Command topics get room for bursts that
/// handlers drain: 4 MiB (plus one message) per topic.
const REPLY_SEGMENT_BYTES: usize = 32 * 1024;
const REPLY_SEGMENT_COUNT: usize = 2;
const COMMAND_SEGMENT_BYTES: usize = 1024 * 1024;
const COMMAND_SEGMENT_COUNT: usize = 4;

impl EmbeddedRouter {
    /// Starts the router as a task on the current tokio runtime, for at
    /// most `max_connections` clients; `metrics` reports the bytes its logs
    /// hold.
    pub fn start(
        max_connections: usize,
        command_topics: &[String],
        metrics: &crate::metrics::Metrics,
    ) -> (Self, RouterTask) {
        let custom_segment: HashMap<String, mqtt_router::SegmentConfig> = command_topics
            .iter()
            .map(|topic| {
                (
                    topic.clone(),
                    mqtt_router::SegmentConfig {
                        max_segment_size: COMMAND_SEGMENT_BYTES,
                        max_segment_count: COMMAND_SEGMENT_COUNT,
                    },
                )
            })
            .collect();
        let config = RouterConfig {
            // Every client holds one link; in-process handlers add a few.
            max_connections: max_connections + 64,
            max_outgoing_packet_count: 200,
            max_segment_size: REPLY_SEGMENT_BYTES,
            max_segment_count: REPLY_SEGMENT_COUNT,
            custom_segment: Some(custom_segment),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        // On the broker's runtime, not a thread of its own: see
        // `Router::spawn_on_runtime` (router/DESIGN.md).
        let router = Router::new(0, config);
        metrics.watch_router_log_bytes(router.stored_bytes());
        let (router_tx, task) = router.spawn_on_runtime();
        let start_link: LinkStarter =
            Arc::new(move |client_id: &str| LinkBuilder::new(client_id, router_tx.clone()));
        (EmbeddedRouter { start_link }, RouterTask(task))
    }

    /// Opens a session for `router_client_id` (already namespaced and free of
    /// `+ $ # /`). The router keeps at most `receive_maximum` (the client's
    /// CONNECT value; 65,535 when it sent none) QoS 1/2 deliveries
    /// unacknowledged, never more than its own limit of 100.
    pub async fn connect(
        &self,
        router_client_id: String,
        clean_session: bool,
        receive_maximum: u16,
    ) -> Result<RouterLink, RouterError> {
        self.connect_for(
            router_client_id,
            clean_session,
            receive_maximum,
            Audience::everyone(),
        )
        .await
    }

    /// [`EmbeddedRouter::connect`] for a link of the broker's own whose
    /// publishes reach only `audience`'s subscriptions (never a client's
    /// link: a client's publish reaches every matching subscription).
    pub async fn connect_for(
        &self,
        router_client_id: String,
        clean_session: bool,
        receive_maximum: u16,
        audience: Audience,
    ) -> Result<RouterLink, RouterError> {
        let (tx, rx, ack) = (self.start_link)(&router_client_id)
            .clean_session(clean_session)
            .receive_maximum(receive_maximum)
            .audience(audience)
            .build_async()
            .await
            .map_err(|e: LinkError| RouterError::Link(e.to_string()))?;
        let session_present = match Option::<Packet>::from(ack) {
            Some(Packet::ConnAck(ack, _)) => ack.session_present,
            _ => return Err(RouterError::NoConnAck),
        };
        Ok(RouterLink {
            tx: RouterTx(tx),
            rx: RouterRx(rx),
            session_present,
        })
    }
}
