//! Owns MQTT routing for the broker: which session gets which publish, with
//! MQTT's session, QoS and retain rules. Derived from rumqttd 0.20
//! (bytebeamio/rumqtt, Apache-2.0; see `NOTICE` and `DESIGN.md`, which lists
//! every change from upstream with its test).
//!
//! Map of the crate:
//! - [`protocol`]: MQTT 3.1.1 (`v4`) and 5 (`v5`) packet types and codecs; the
//!   broker frames its sockets with them.
//! - `router/`: the [`Router`], one event loop that owns every session's
//!   state (subscriptions, in-flight QoS 1/2, persistent sessions) and one
//!   log per filter (`segments/`) that subscribers read with cursors.
//! - [`local`]: a link, the router's view of one client session. The broker
//!   opens one per client connection (`LinkBuilder`), sends the client's
//!   packets through `LinkTx` and reads deliveries from `LinkRx`.
//! - [`Broker`] (`server/`, `link/remote.rs`, `link/network.rs`): plain TCP
//!   listeners in front of the router with no gate, kept only as the
//!   baseline `loadgen bare-router` measures the broker against.
//!
//! The path of one publish: the broker's session decodes it, sends it on its
//! link; the router appends it to the log of every filter it matches and
//! wakes the links whose subscriptions read that log; each link's `LinkRx`
//! yields a `Notification::Forward` that the broker writes to its client.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable
    )
)]
// Upstream's code is kept as it was where we did not change it (a small diff
// against rumqttd keeps its fixes easy to compare and to offer upstream), so
// its compiler and clippy style warnings are not applied to it.
#![allow(warnings)]
#![allow(clippy::all)]

use std::collections::HashMap;
use std::fmt;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

pub use link::local;
pub use router::{
    detach, message_size, properties_size, Forward, IncomingMeter, Notification, OutgoingMeter,
    Router,
};
pub use server::Broker;

pub use self::router::shared_subs::{Audience, Strategy};

mod link;
// The codecs are hardened (and linted) on their own, in protocol/.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable
)]
pub mod protocol;
mod router;
mod segments;
// The baseline's plain TCP listeners: started only by `loadgen bare-router`,
// never by the broker, and not reached by the broker's clients.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable
)]
mod server;

pub type ConnectionId = usize;
pub type RouterId = usize;
pub type NodeId = usize;
pub type Topic = String;
pub type Filter = String;
pub type TopicId = usize;
pub type Offset = (u64, u64);
pub type Cursor = (u64, u64);

pub type ClientId = String;
pub type AuthUser = String;
pub type AuthPass = String;
pub type AuthHandler = Arc<
    dyn Fn(ClientId, AuthUser, AuthPass) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// What [`Broker`] starts: the router and its plain TCP listeners.
#[derive(Debug, Default, Clone)]
pub struct Config {
    pub id: usize,
    pub router: RouterConfig,
    pub v4: Option<HashMap<String, ServerSettings>>,
    pub v5: Option<HashMap<String, ServerSettings>>,
}

/// TLS for [`Broker`]'s listeners, which has none: the product's broker owns
/// TLS. This type has no value, so `ServerSettings::tls` can only be `None`;
/// the field stays so that existing configurations keep compiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTls {}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<NoTls>,
    pub next_connection_delay_ms: u64,
    pub connections: ConnectionSettings,
}

impl ServerSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.connections.set_auth_handler(auth_fn)
    }
}

#[derive(Clone)]
pub struct ConnectionSettings {
    pub connection_timeout_ms: u16,
    pub max_payload_size: usize,
    pub max_inflight_count: usize,
    pub auth: Option<HashMap<String, String>>,
    pub external_auth: Option<AuthHandler>,
    pub dynamic_filters: bool,
}

impl ConnectionSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.external_auth = Some(Arc::new(move |client_id, username, password| {
            let auth = auth_fn(client_id, username, password).into_future();
            Box::pin(auth)
        }));
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_inflight_count", &self.max_inflight_count)
            .field("auth", &self.auth.as_ref().map(|users| users.len()))
            .field("external_auth", &self.external_auth.is_some())
            .field("dynamic_filters", &self.dynamic_filters)
            .finish()
    }
}

#[derive(Debug, Default, Clone)]
pub struct RouterConfig {
    pub max_connections: usize,
    pub max_outgoing_packet_count: u64,
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub custom_segment: Option<HashMap<String, SegmentConfig>>,
    pub initialized_filters: Option<Vec<Filter>>,
    /// Round robin unless set.
    pub shared_subscriptions_strategy: Strategy,
}

#[derive(Debug, Default, Clone)]
pub struct SegmentConfig {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
}
