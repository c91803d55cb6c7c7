//! Owns the baseline: the vendored rumqttd `Broker` with its own plain TCP
//! listeners and no gate (no authentication, no TLS), configured in code with
//! the router values of rumqttd's shipped `rumqttd.toml` unless overridden.

use crate::LoadError;
use mqtt_router::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Listeners and router values of the bare router.
#[derive(Debug, Clone)]
pub struct BareRouterConfig {
    /// MQTT 3.1.1 listener.
    pub v4_listen: Option<SocketAddr>,
    /// MQTT 5 listener.
    pub v5_listen: Option<SocketAddr>,
    pub max_connections: usize,
    pub max_outgoing_packet_count: u64,
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub max_inflight_count: usize,
    pub max_payload_size: usize,
}

impl Default for BareRouterConfig {
    /// rumqttd.toml's values (0.20), with room for 20,000 connections.
    fn default() -> Self {
        BareRouterConfig {
            v4_listen: None,
            v5_listen: None,
            max_connections: 20_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            max_inflight_count: 100,
            max_payload_size: 20_480,
        }
    }
}

impl BareRouterConfig {
    /// The rumqttd configuration for these values.
    pub fn to_rumqttd(&self) -> Config {
        let server = |name: &str, listen: SocketAddr| ServerSettings {
            name: name.to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: self.max_payload_size,
                max_inflight_count: self.max_inflight_count,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let one = |name: &str, listen: Option<SocketAddr>| {
            listen.map(|l| HashMap::from([(name.to_owned(), server(name, l))]))
        };
        Config {
            id: 0,
            router: RouterConfig {
                max_connections: self.max_connections,
                max_outgoing_packet_count: self.max_outgoing_packet_count,
                max_segment_size: self.max_segment_size,
                max_segment_count: self.max_segment_count,
                ..Default::default()
            },
            v4: one("v4-1", self.v4_listen),
            v5: one("v5-1", self.v5_listen),
        }
    }
}

/// Runs the bare router; blocks for as long as its listeners run.
pub fn run(cfg: &BareRouterConfig) -> Result<(), LoadError> {
    if cfg.v4_listen.is_none() && cfg.v5_listen.is_none() {
        return Err(LoadError::Config(
            "bare router needs a v4 or v5 listen address".into(),
        ));
    }
    if cfg.max_segment_size < 1024 || cfg.max_segment_count == 0 || cfg.max_connections == 0 {
        // The router thread panics on these (see rumqttd-0.20 facts).
        return Err(LoadError::Config(
            "max_segment_size ≥ 1024, max_segment_count ≥ 1 and max_connections ≥ 1 are required"
                .into(),
        ));
    }
    let mut broker = mqtt_router::Broker::new(cfg.to_rumqttd());
    broker
        .start()
        .map_err(|e| LoadError::Setup(format!("bare router: {e}")))
}
