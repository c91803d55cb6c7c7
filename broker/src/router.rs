//! Owns the embedded rumqttd router: its configuration, running it as a task
//! on the broker's runtime, and opening links (the router's view of one client
//! session). The only module that touches rumqttd's router types.

use crate::config::Limits;
use mqtt_router::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use mqtt_router::protocol::Packet;
use mqtt_router::{Router, RouterConfig};
use std::collections::HashMap;
use std::sync::Arc;

pub use mqtt_router::local::{LinkRx as RouterRx, LinkTx as RouterTx};

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
    pub tx: LinkTx,
    pub rx: LinkRx,
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
    /// Starts the router as a task on the current tokio runtime; `metrics`
    /// reports the bytes its logs hold.
    pub fn start(
        limits: &Limits,
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
            max_connections: limits.max_connections + 64,
            max_outgoing_packet_count: 200,
            max_segment_size: REPLY_SEGMENT_BYTES,
            max_segment_count: REPLY_SEGMENT_COUNT,
            custom_segment: Some(custom_segment),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        // On the broker's runtime, not a thread of its own: see
        // `Router::spawn_on_runtime` (vendor/rumqttd/PATCHES.md).
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
        let (tx, rx, ack) = (self.start_link)(&router_client_id)
            .clean_session(clean_session)
            .receive_maximum(receive_maximum)
            .build_async()
            .await
            .map_err(|e: LinkError| RouterError::Link(e.to_string()))?;
        let session_present = match Option::<Packet>::from(ack) {
            Some(Packet::ConnAck(ack, _)) => ack.session_present,
            _ => return Err(RouterError::NoConnAck),
        };
        Ok(RouterLink {
            tx,
            rx,
            session_present,
        })
    }
}
