//! Owns the state every connection shares: the authenticator, the embedded
//! router, live sessions, delivery (subscriptions, replies, command topics),
//! metrics, limits
//! and the shutdown signal. Built once at start-up by `lib::Broker::start`;
//! its fields are private, and its methods say what a connection may do
//! with each.

use crate::auth::{Authenticator, DeviceIdentity, Principal, Refusal};
use crate::config::Limits;
use crate::delivery::Delivery;
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::router::{EmbeddedRouter, RouterError, RouterLink};
use crate::sessions::SessionRegistry;
use crate::wills::Wills;
use std::sync::Arc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// What a gate is made of (see `Gate::new`).
pub struct GateParts {
    pub auth: Authenticator,
    pub router: EmbeddedRouter,
    pub sessions: Arc<SessionRegistry>,
    pub delivery: Box<dyn Delivery>,
    pub wills: Wills,
    pub revocations: Option<Arc<Revocations>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub leeway_secs: u64,
    pub shutdown: CancellationToken,
}

/// Shared by all connections of one broker.
pub struct Gate {
    auth: Authenticator,
    router: EmbeddedRouter,
    sessions: Arc<SessionRegistry>,
    /// Which path serves each subscription, where each publish goes, which
    /// topics are commands: the one owner of delivery.
    delivery: Box<dyn Delivery>,
    /// Wills waiting for their delay (MQTT 5 Will Delay Interval).
    wills: Wills,
    /// Revocation checks, when a store is configured.
    revocations: Option<Arc<Revocations>>,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// Clock leeway for the token-expiry disconnect (same as at connect).
    leeway_secs: u64,
    /// Cancelled on SIGTERM/SIGINT (or by tests): sessions say goodbye and end.
    shutdown: CancellationToken,
}

impl Gate {
    pub fn new(parts: GateParts) -> Self {
        Gate {
            auth: parts.auth,
            router: parts.router,
            sessions: parts.sessions,
            delivery: parts.delivery,
            wills: parts.wills,
            revocations: parts.revocations,
            metrics: parts.metrics,
            limits: parts.limits,
            leeway_secs: parts.leeway_secs,
            shutdown: parts.shutdown,
        }
    }

    /// Who a CONNECT's credentials name: the only way to a `Principal`.
    pub async fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        self.auth.authenticate(username, password).await
    }

    /// Whether the device's token is refused by its user's revocation
    /// (never, without a revocation store).
    pub async fn is_revoked(&self, device: &DeviceIdentity) -> bool {
        match &self.revocations {
            Some(revocations) => revocations.refuses(device).await,
            None => false,
        }
    }

    /// The revocation store's watcher, if one is configured (start-up only).
    pub fn revocations(&self) -> Option<Arc<Revocations>> {
        self.revocations.clone()
    }

    /// Opens the router's session for `router_client_id` (namespaced by
    /// `sessions`).
    pub async fn open_router_session(
        &self,
        router_client_id: String,
        clean_session: bool,
        receive_maximum: u16,
    ) -> Result<RouterLink, RouterError> {
        self.router
            .connect(router_client_id, clean_session, receive_maximum)
            .await
    }

    /// A clean router session of the broker's own whose publishes reach
    /// only `audience`'s subscriptions (`inject.rs`).
    pub async fn open_injection_session(
        &self,
        router_client_id: String,
        audience: crate::router::Audience,
    ) -> Result<RouterLink, RouterError> {
        self.router
            .connect_for(router_client_id, true, u16::MAX, audience)
            .await
    }

    /// Live and persistent sessions: claims, takeover, caps.
    pub fn sessions(&self) -> &Arc<SessionRegistry> {
        &self.sessions
    }

    /// Delivery: subscriptions and their paths, publish routing, command
    /// topics (`delivery`).
    pub fn delivery(&self) -> &dyn Delivery {
        &*self.delivery
    }

    /// Wills whose publication is delayed.
    pub fn wills(&self) -> &Wills {
        &self.wills
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The configured limits (read-only: they do not change while running).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Clock leeway for token expiry, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Resolves when the broker shuts down. Only `Broker` can start that.
    pub fn shutting_down(&self) -> WaitForCancellationFuture<'_> {
        self.shutdown.cancelled()
    }
}
