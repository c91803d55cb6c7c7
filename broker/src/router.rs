//! Owns the embedded rumqttd router: its configuration, and opening a link
//! (the router's view of one client session) off the async runtime, since
//! rumqttd's `LinkBuilder::build` blocks on a channel until the router answers.
//! The only module that touches rumqttd's router types.

use crate::config::Limits;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use rumqttd::{Notification, Router, RouterConfig};
use std::collections::HashMap;
use std::sync::Arc;

pub use rumqttd::local::{LinkRx as RouterRx, LinkTx as RouterTx};

/// Why a router session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// rumqttd's `LinkError` is ~800 bytes; keep its text, not the value.
    #[error("router refused the session: {0}")]
    Link(String),
    #[error("router answered without a CONNACK")]
    NoConnAck,
    #[error("router link task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

type LinkResult = Result<(LinkTx, LinkRx, Notification), RouterError>;
/// Opens a link; hides the router sender, whose element type rumqttd keeps private.
type LinkFactory = Arc<dyn Fn(&str, bool) -> LinkResult + Send + Sync>;

/// A handle on the router thread.
#[derive(Clone)]
pub struct EmbeddedRouter {
    open_link: LinkFactory,
}

/// One open router session.
pub struct RouterLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
    pub session_present: bool,
}

/// Per-filter log sizes. Reply topics carry a handful of messages, so their
/// logs stay small (up to 64 KiB of payload kept for a device that is away;
/// older messages are dropped first); command topics get room for bursts that
/// handlers drain.
const REPLY_SEGMENT_BYTES: usize = 32 * 1024;
const REPLY_SEGMENT_COUNT: usize = 2;
const COMMAND_SEGMENT_BYTES: usize = 4 * 1024 * 1024;
const COMMAND_SEGMENT_COUNT: usize = 4;

impl EmbeddedRouter {
    /// Starts the router thread.
    pub fn start(limits: &Limits, command_topics: &[String]) -> Self {
        let custom_segment: HashMap<String, rumqttd::SegmentConfig> = command_topics
            .iter()
            .map(|topic| {
                (
                    topic.clone(),
                    rumqttd::SegmentConfig {
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
        let router_tx = Router::new(0, config).spawn();
        let open_link: LinkFactory = Arc::new(move |client_id: &str, clean_session: bool| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean_session)
                .build()
                .map_err(|e: LinkError| RouterError::Link(e.to_string()))
        });
        EmbeddedRouter { open_link }
    }

    /// Opens a session for `router_client_id` (already namespaced and free of
    /// `+ $ # /`). Runs the blocking build on the blocking pool.
    pub async fn connect(
        &self,
        router_client_id: String,
        clean_session: bool,
    ) -> Result<RouterLink, RouterError> {
        let open_link = self.open_link.clone();
        let (tx, rx, ack) =
            tokio::task::spawn_blocking(move || open_link(&router_client_id, clean_session))
                .await??;
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
