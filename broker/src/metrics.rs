//! Owns the broker's counters and gauges and their Prometheus text form:
//! connections by kind, refused connects by reason, denials by kind, and
//! messages in and out, and what cross-node delivery moved and dropped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabel {
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabel {
    kind: &'static str,
    reason: &'static str,
}

/// All broker metrics; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    connections: Family<KindLabel, Gauge>,
    refused: Family<ReasonLabel, Counter>,
    denials: Family<DenialLabel, Counter>,
    messages_in: Counter,
    messages_out: Counter,
    replies_dropped: Counter,
    dropped_sockets: Family<ReasonLabel, Counter>,
    refusal_cache_hits: Counter,
    session_panics: Counter,
    sessions_ended: Family<ReasonLabel, Counter>,
    reply_index_topics: Gauge,
    router_log_bytes: Gauge,
    /// Cross-node delivery (a Redis delivery wrapping the local one): what
    /// it moved, by plane and direction, and what it dropped, by reason.
    cluster_messages: Family<WhatLabel, Counter>,
    cluster_dropped: Family<ReasonLabel, Counter>,
    /// The router's own count, read into `router_log_bytes` at each render.
    router_log_source: OnceLock<Arc<AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("broker");
        let connections = Family::<KindLabel, Gauge>::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        let denials = Family::<DenialLabel, Counter>::default();
        let messages_in = Counter::default();
        let messages_out = Counter::default();
        let replies_dropped = Counter::default();
        let dropped_sockets = Family::<ReasonLabel, Counter>::default();
        let refusal_cache_hits = Counter::default();
        let session_panics = Counter::default();
        let sessions_ended = Family::<ReasonLabel, Counter>::default();
        let cluster_messages = Family::<WhatLabel, Counter>::default();
        let cluster_dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "cluster_messages",
            "Messages moved through the cluster store (Redis), by what (reply_out, reply_in, command_out, command_in, replayed, reclaimed, command_acked, command_kept, retained_out, retained_in, retained_loaded)",
            cluster_messages.clone(),
        );
        registry.register(
            "cluster_dropped",
            "Messages the cross-node delivery dropped, by reason (a bounded queue full, Redis unreachable, an undecodable entry, a command delivered too often, a lost acknowledgement, the retained cap)",
            cluster_dropped.clone(),
        );
        registry.register(
            "session_panics",
            "Sessions ended by a bug (a panic in their task): each one contained, its will fired and its router link closed",
            session_panics.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions the server ended, by reason (keep alive timeout, token expired, write timeout, receive maximum exceeded, ...)",
            sessions_ended.clone(),
        );
        let reply_index_topics = Gauge::default();
        registry.register(
            "reply_index_topics",
            "Topics the gate's reply index holds entries for (freed when their last subscriber leaves)",
            reply_index_topics.clone(),
        );
        let router_log_bytes = Gauge::default();
        registry.register(
            "router_log_bytes",
            "Bytes the router's per-filter logs hold (each stored message counted with its topic, payload and properties); back near zero once every reader has read its log",
            router_log_bytes.clone(),
        );
        registry.register(
            "connections",
            "Authenticated MQTT connections by kind (device, handler)",
            connections.clone(),
        );
        registry.register(
            "connects_refused",
            "CONNECTs refused, by reason",
            refused.clone(),
        );
        registry.register(
            "denials",
            "Publishes and subscriptions refused by authorization, by kind (publish, subscribe)",
            denials.clone(),
        );
        registry.register(
            "messages_in",
            "PUBLISH packets accepted from clients",
            messages_in.clone(),
        );
        registry.register(
            "messages_out",
            "PUBLISH packets delivered to clients",
            messages_out.clone(),
        );
        registry.register(
            "replies_dropped",
            "QoS 0 replies dropped, oldest first, because a device read slower than its replies came",
            replies_dropped.clone(),
        );
        registry.register(
            "sockets_dropped",
            "Sockets closed before CONNECT, by reason (rate_limited, too_many_pending, too_many_connections, tls_handshake, connect_timeout, not_mqtt)",
            dropped_sockets.clone(),
        );
        registry.register(
            "refusal_cache_hits",
            "CONNECTs refused from the short cache of refused credentials, without verifying again",
            refusal_cache_hits.clone(),
        );
        Metrics {
            refusal_cache_hits,
            session_panics,
            sessions_ended,
            reply_index_topics,
            router_log_bytes,
            router_log_source: OnceLock::new(),
            cluster_messages,
            cluster_dropped,
            registry,
            connections,
            refused,
            denials,
            messages_in,
            messages_out,
            replies_dropped,
            dropped_sockets,
        }
    }

    pub fn session_panicked(&self) {
        self.session_panics.inc();
    }

    pub fn session_ended(&self, reason: &'static str) {
        self.sessions_ended
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The gauge the reply index keeps its size in.
    pub fn reply_index_topics(&self) -> Gauge {
        self.reply_index_topics.clone()
    }

    pub fn connection_opened(&self, kind: &'static str) {
        self.connections.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn connection_closed(&self, kind: &'static str) {
        self.connections.get_or_create(&KindLabel { kind }).dec();
    }

    pub fn connect_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn denied(&self, kind: &'static str, reason: &'static str) {
        self.denials
            .get_or_create(&DenialLabel { kind, reason })
            .inc();
    }

    pub fn message_in(&self) {
        self.messages_in.inc();
    }

    pub fn messages_out(&self, n: u64) {
        self.messages_out.inc_by(n);
    }

    pub fn replies_dropped(&self, n: u64) {
        self.replies_dropped.inc_by(n);
    }

    /// `n` messages moved through the cluster store (`what`: see the help).
    pub fn cluster_moved(&self, what: &'static str, n: u64) {
        self.cluster_messages
            .get_or_create(&WhatLabel { what })
            .inc_by(n);
    }

    /// `n` messages the cross-node delivery dropped, and why.
    pub fn cluster_dropped(&self, reason: &'static str, n: u64) {
        self.cluster_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc_by(n);
    }

    pub fn refusal_cache_hit(&self) {
        self.refusal_cache_hits.inc();
    }

    pub fn socket_dropped(&self, reason: &'static str) {
        self.dropped_sockets
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Reports `source` (the router's count of stored bytes) as
    /// `broker_router_log_bytes`; the first source given stays.
    pub fn watch_router_log_bytes(&self, source: Arc<AtomicU64>) {
        let _ = self.router_log_source.set(source);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(source) = self.router_log_source.get() {
            let bytes = source.load(Ordering::Relaxed);
            self.router_log_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series() {
        let m = Metrics::new();
        m.connection_opened("device");
        m.connect_refused("token expired");
        m.denied("subscribe", "not_authorized");
        m.message_in();
        m.messages_out(3);
        let text = m.render();
        assert!(
            text.contains("broker_connections{kind=\"device\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("broker_connects_refused_total{reason=\"token expired\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("broker_denials_total{kind=\"subscribe\",reason=\"not_authorized\"} 1"),
            "{text}"
        );
        assert!(text.contains("broker_messages_out_total 3"), "{text}");
    }
}
