//! Owns the limits and deadlines a running broker enforces, with their
//! defaults; `BrokerArgs::resolve` fills them from the validated
//! configuration.

use super::{DEFAULT_CONN_BURST, DEFAULT_CONN_RATE, DEFAULT_MAX_PENDING_PER_ADDR};
use std::time::Duration;

/// Limits and deadlines of a running broker.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub conn_rate_per_sec: f64,
    pub conn_burst: u32,
    /// Most connections per source between accept and CONNACK (0 = no limit).
    pub max_pending_per_addr: usize,
    /// Peers that may (and must) open with a PROXY header naming the
    /// client (`BROKER_TRUSTED_PROXIES`).
    pub trusted_proxies: crate::proxy::TrustedProxies,
    pub tls_handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    pub max_keep_alive_secs: u16,
    pub refusal_cache_ttl: Duration,
    pub shutdown_grace: Duration,
    pub revocation_poll: Duration,
    pub max_session_expiry: Duration,
    /// How long one write to a client may take (see `BROKER_WRITE_TIMEOUT_SECS`).
    pub write_timeout: Duration,
    /// Unacknowledged QoS 1/2 publishes a client may have (`BROKER_RECEIVE_MAXIMUM`).
    pub receive_maximum: u16,
    /// Longest client id accepted, in bytes.
    pub max_client_id_bytes: usize,
    /// Topic and filter size caps, by kind of client.
    pub topics: crate::acl::TopicLimits,
    /// Most subscriptions a device session may hold.
    pub device_max_subscriptions: usize,
    /// Most subscriptions a handler session may hold.
    pub handler_max_subscriptions: usize,
    /// Most persistent sessions one user's devices may hold.
    pub max_persistent_sessions_per_user: usize,
    /// Caps on the user properties and correlation data a device sends.
    pub device_properties: crate::property_caps::PropertyCaps,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            conn_rate_per_sec: DEFAULT_CONN_RATE,
            conn_burst: DEFAULT_CONN_BURST,
            max_pending_per_addr: DEFAULT_MAX_PENDING_PER_ADDR,
            trusted_proxies: crate::proxy::TrustedProxies::none(),
            tls_handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            max_keep_alive_secs: 1200,
            refusal_cache_ttl: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            revocation_poll: Duration::from_secs(5),
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            write_timeout: Duration::from_secs(10),
            receive_maximum: 100,
            max_client_id_bytes: 128,
            topics: crate::acl::TopicLimits::default(),
            device_max_subscriptions: 100,
            handler_max_subscriptions: 10_000,
            max_persistent_sessions_per_user: 8,
            device_properties: crate::property_caps::PropertyCaps::default(),
        }
    }
}
