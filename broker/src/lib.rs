//! An MQTT broker for mobile back-ends: a gate that owns the sockets and
//! decides every CONNECT, SUBSCRIBE and PUBLISH, in front of an embedded
//! rumqttd router that does the MQTT routing.
//!
//! The path of a connection, one module per step:
//! 1. [`listener`]: accept, admission per source address ([`rate_limit`]:
//!    new connections per second, connections not yet answered), connection cap;
//! 2. [`proxy`]: from a load balancer in `BROKER_TRUSTED_PROXIES`, the PROXY
//!    header (v1, v2) that names the client, who is then admitted; a PROXY
//!    header from anyone else is refused;
//!    [`tls`]: handshake under a deadline, in the connection's own task;
//!    [`websocket`]: the HTTP upgrade and the WebSocket as a byte stream
//!    (`BROKER_WS_LISTEN`, `BROKER_WSS_LISTEN`); [`opening`] runs these
//!    steps in order, under one deadline;
//! 3. [`session`]: one task per connection. `session/connect.rs`: CONNECT
//!    deadline, protocol version ([`codec`]), the MQTT 5 rules on CONNECT and
//!    DISCONNECT values ([`validate`]), admission, takeover, the router link;
//!    [`session::state`]: the session as a value that takes one event and
//!    performs its actions, no I/O (the publish decision in
//!    `session/publish.rs`, SUBSCRIBE in `session/subscribe.rs`); `session/mod.rs`:
//!    the loop that only moves bytes; `session/ending.rs`: goodbye, will,
//!    persistent hand-off, expiry;
//! 4. [`auth`]: device JWT ([`auth::jwt`], [`auth::jwks`]) or handler key,
//!    giving a verified [`auth::Principal`]; refusals cached ([`auth::refusals`]);
//! 5. [`sessions`]: client ids namespaced per user and takeover, client id
//!    length and persistent sessions per user;
//! 6. [`acl`]: who may publish and subscribe where, topic size caps;
//!    revoked users are refused ([`revocation`]) and disconnected
//!    ([`revocation_watch`]);
//!    [`delivery`]: the one owner of delivery behind the [`delivery::Delivery`]
//!    trait (the seam for more nodes): one subscription table, each
//!    session's row of it and its cap, which path serves each subscription
//!    (the session's inbox or the router), where each publish goes, which
//!    topics are commands;
//! 7. [`identity`]: `user_id`/`client_id` stamped on device publishes;
//! 8. [`router`]: the embedded rumqttd router, which routes and delivers; the
//!    only module of the session's path that names rumqttd (the session sees
//!    [`router::RouterTx`], [`router::RouterRx`], [`router::RouterEvent`]);
//! 9. [`answers`]: every refusal and denial as the right packet per version;
//!    [`translate`]: MQTT 5 packets in the form a 3.1.1 client can receive;
//! 10. [`inbound`]: the client's QoS 1/2 flows as pure state (packet ids,
//!     who acknowledges, QoS 2 exactly once, Receive Maximum), owned by the
//!     session's state;
//! 11. [`wills`]: wills waiting for their MQTT 5 Will Delay Interval, kept
//!     past their connection; [`will_publisher`] publishes a will now, or
//!     the delayed ones through a router link of their own;
//! 12. [`inject`]: what another node received, published into this node's
//!     router through links of their own ([`Broker::start_with`] wraps the
//!     delivery; the `cluster` crate is such a wrapper).
//!
//! Around it: [`config`] (environment and flags, development defaults from
//! [`config::dev_certs`]), [`metrics`] and [`http`] (`/metrics`, `/healthz`), and
//! [`Broker::start`] / [`RunningBroker::shutdown`] for the whole lifecycle.

pub mod acl;
pub mod answers;
pub mod auth;
pub mod codec;
pub mod config;
pub mod delivery;

pub mod gate;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod inject;
pub mod listener;
pub mod metrics;
pub mod opening;
pub mod property_caps;
pub mod proxy;
pub mod rate_limit;
pub mod revocation;
pub mod revocation_watch;
pub mod router;
pub mod session;
pub mod sessions;
pub mod tls;
pub mod translate;
pub mod validate;
pub mod websocket;
pub mod will_publisher;
pub mod wills;

use auth::jwt::{JwtConfigError, JwtVerifier};
use auth::Authenticator;
use config::Config;
use delivery::{Delivery, LocalDelivery};
use gate::{Gate, GateParts};
use listener::{AcceptLoop, Transport};
use metrics::Metrics;
use rate_limit::Admission;
use router::EmbeddedRouter;
use sessions::SessionRegistry;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wills::Wills;

/// Bound listeners handed to the broker (tests bind port 0 and read the address back).
#[derive(Default)]
pub struct Listeners {
    /// MQTT over TLS.
    pub tls: Option<(TcpListener, TlsAcceptor)>,
    /// Plain MQTT (loopback use, load tests).
    pub tcp: Vec<TcpListener>,
    /// MQTT over WebSocket, plain (loopback, or behind a TLS-terminating proxy).
    pub ws: Option<TcpListener>,
    /// MQTT over WebSocket over TLS.
    pub wss: Option<(TcpListener, TlsAcceptor)>,
    /// Plain MQTT for the in-process handlers only: must be bound to a
    /// loopback address. Its admission is its own (see [`INTERNAL_ADMISSION`]).
    pub internal: Option<TcpListener>,
    /// `/metrics` and `/healthz`.
    pub metrics: Option<TcpListener>,
}

/// Admission of the internal listener. The in-process handlers open one
/// connection per worker (three) and reconnect after a broker hiccup; these
/// bound what any other loopback process reaching that port can do there,
/// and are apart from the public listeners' allowance and connection cap.
pub const INTERNAL_ADMISSION: InternalAdmission = InternalAdmission {
    rate_per_sec: 50.0,
    burst: 64,
    max_pending: 32,
    // Within the 64 connections the router makes room for beyond the public cap.
    max_connections: 32,
};

/// Limits of the internal listener (see [`INTERNAL_ADMISSION`]).
#[derive(Debug, Clone, Copy)]
pub struct InternalAdmission {
    pub rate_per_sec: f64,
    pub burst: u32,
    pub max_pending: usize,
    pub max_connections: usize,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("token verification: {0}")]
    Jwt(#[from] JwtConfigError),
    #[error("the internal handler listener is on {0}, not a loopback address: bind it to 127.0.0.1 (its admission is not the public one)")]
    InternalNotLoopback(SocketAddr),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Starting point of the broker's lifecycle.
pub struct Broker;

/// Wraps this node's [`LocalDelivery`] in another [`Delivery`] (the seam:
/// a delivery of several nodes, see `delivery/mod.rs`), given the broker's
/// metrics. [`Broker::start`] uses the local one as it is.
pub type WrapDelivery = Box<dyn FnOnce(LocalDelivery, &Arc<Metrics>) -> Box<dyn Delivery> + Send>;

/// A broker that is serving.
pub struct RunningBroker {
    pub tls_addr: Option<SocketAddr>,
    pub tcp_addrs: Vec<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    /// Where the in-process handlers connect, if there is such a listener.
    pub internal_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    grace: Duration,
    /// Why the router stopped, if it did (it runs until the process ends).
    router_stopped: Arc<OnceLock<String>>,
    /// Publishes into this node from outside any session (`inject`).
    injector: inject::Injector,
}

/// The broker stopped because its embedded router did.
#[derive(Debug, thiserror::Error)]
#[error("the embedded router stopped: {0}")]
pub struct RouterStopped(pub String);

impl Broker {
    /// Starts the router, the accept loops and the metrics endpoint.
    pub async fn start(config: Config, listeners: Listeners) -> Result<RunningBroker, StartError> {
        Self::start_with(config, listeners, Box::new(|local, _| Box::new(local))).await
    }

    /// As [`Broker::start`], with delivery wrapped by `wrap` (several nodes).
    pub async fn start_with(
        config: Config,
        listeners: Listeners,
        wrap: WrapDelivery,
    ) -> Result<RunningBroker, StartError> {
        // Only processes on this host reach a loopback port: the internal
        // listener's separate allowance is never offered to the network.
        if let Some(internal) = &listeners.internal {
            let addr = internal.local_addr()?;
            if !addr.ip().is_loopback() {
                return Err(StartError::InternalNotLoopback(addr));
            }
        }
        let limits = config.limits.clone();
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let (gate, router_task, will_queue) =
            build_gate(config, metrics.clone(), shutdown.clone(), wrap)?;
        let router_stopped = Arc::new(OnceLock::new());
        {
            // Without its router the broker cannot serve anyone: stop, so that
            // a supervisor restarts it, instead of accepting dead sessions.
            let (shutdown, router_stopped) = (shutdown.clone(), router_stopped.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    reason = router_task.ended() => {
                        tracing::error!(%reason, "the embedded router stopped; shutting the broker down");
                        let _ = router_stopped.set(reason);
                        shutdown.cancel();
                    }
                }
            });
        }
        // The public listeners share one admission; the internal one has its own.
        let admission = Arc::new(
            Admission::new(
                "public",
                limits.conn_rate_per_sec,
                limits.conn_burst,
                limits.max_pending_per_addr,
            )
            .with_trusted_proxies(limits.trusted_proxies.clone()),
        );
        let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
        let tasks = TaskTracker::new();
        tasks.spawn(gate.sessions().clone().end_all_at_shutdown());
        tasks.spawn(will_publisher::publish_delayed(gate.clone(), will_queue));
        if let Some(revocations) = gate.revocations() {
            tasks.spawn(revocations.watch(
                gate.sessions().clone(),
                gate.wills().clone(),
                shutdown.clone(),
            ));
        }

        let mut running = RunningBroker {
            tls_addr: None,
            tcp_addrs: Vec::new(),
            ws_addr: None,
            wss_addr: None,
            internal_addr: None,
            metrics_addr: None,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            grace: limits.shutdown_grace,
            router_stopped,
            injector: inject::Injector::new(gate.clone()),
        };
        let mut loops = Vec::new();
        if let Some((listener, acceptor)) = listeners.tls {
            running.tls_addr = Some(listener.local_addr()?);
            loops.push((
                listener,
                Transport::Tls(acceptor),
                &admission,
                &connection_slots,
            ));
        }
        for listener in listeners.tcp {
            running.tcp_addrs.push(listener.local_addr()?);
            loops.push((listener, Transport::Plain, &admission, &connection_slots));
        }
        if let Some(listener) = listeners.ws {
            running.ws_addr = Some(listener.local_addr()?);
            loops.push((
                listener,
                Transport::WebSocket,
                &admission,
                &connection_slots,
            ));
        }
        if let Some((listener, acceptor)) = listeners.wss {
            running.wss_addr = Some(listener.local_addr()?);
            loops.push((
                listener,
                Transport::SecureWebSocket(acceptor),
                &admission,
                &connection_slots,
            ));
        }
        let internal = INTERNAL_ADMISSION;
        let internal_admission = Arc::new(Admission::new(
            "internal",
            internal.rate_per_sec,
            internal.burst,
            internal.max_pending,
        ));
        let internal_slots = Arc::new(Semaphore::new(internal.max_connections));
        if let Some(listener) = listeners.internal {
            running.internal_addr = Some(listener.local_addr()?);
            loops.push((
                listener,
                Transport::InternalHandlers,
                &internal_admission,
                &internal_slots,
            ));
        }
        for (listener, transport, admission, slots) in loops {
            let accept_loop = AcceptLoop {
                listener,
                transport,
                gate: gate.clone(),
                admission: admission.clone(),
                connection_slots: slots.clone(),
                tasks: tasks.clone(),
            };
            tasks.spawn(accept_loop.run());
        }
        if let Some(listener) = listeners.metrics {
            running.metrics_addr = Some(listener.local_addr()?);
            let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Err(e) = http::serve(listener, metrics, shutdown).await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        }
        tracing::info!(
            tls = ?running.tls_addr,
            tcp = ?running.tcp_addrs,
            ws = ?running.ws_addr,
            wss = ?running.wss_addr,
            internal = ?running.internal_addr,
            metrics = ?running.metrics_addr,
            "broker listening"
        );
        Ok(running)
    }
}

impl RunningBroker {
    /// Opens router links that publish into this node from outside any
    /// session (what other nodes received, for this node's subscribers).
    pub fn injector(&self) -> inject::Injector {
        self.injector.clone()
    }

    /// A token that, when cancelled, shuts the broker down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, tells every session (MQTT 5 clients get DISCONNECT
    /// 0x8B), and waits for them up to the grace period.
    pub async fn shutdown(self) -> Result<(), RouterStopped> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the broker has been shut down (by the token, or because
    /// its router stopped) and drained.
    pub async fn wait(self) -> Result<(), RouterStopped> {
        self.shutdown.cancelled().await;
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "some sessions did not close within the grace period");
        }
        match self.router_stopped.get() {
            Some(reason) => Err(RouterStopped(reason.clone())),
            None => Ok(()),
        }
    }
}

/// The shared [`Gate`] with its router running, built as [`Broker::start`]
/// builds it but without listeners, TLS, metrics endpoint or revocation
/// watcher: for protocol tests and fuzzing that drive [`session::serve`]
/// over in-memory streams (`tokio::io::duplex`). Call inside a tokio runtime.
/// Cancelling `shutdown` ends the sessions as a broker shutdown does.
/// Keep in step with `Broker::start`.
#[doc(hidden)]
pub fn gate_for_tests(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Arc<Gate>, StartError> {
    gate_for_tests_with(config, shutdown, Box::new(|local, _| Box::new(local)))
}

/// [`gate_for_tests`] with the delivery `wrap` builds (as
/// `Broker::start_with`).
#[doc(hidden)]
pub fn gate_for_tests_with(
    config: Config,
    shutdown: CancellationToken,
    wrap: WrapDelivery,
) -> Result<Arc<Gate>, StartError> {
    let (gate, _router_task, will_queue) =
        build_gate(config, Arc::new(Metrics::new()), shutdown, wrap)?;
    tokio::spawn(gate.sessions().clone().end_all_at_shutdown());
    tokio::spawn(will_publisher::publish_delayed(gate.clone(), will_queue));
    Ok(gate)
}

/// The gate and its running router, as `Broker::start` and the protocol
/// tests both build them.
fn build_gate(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    wrap: WrapDelivery,
) -> Result<(Arc<Gate>, router::RouterTask, wills::WillQueue), StartError> {
    let leeway_secs = config.jwt.leeway_secs;
    let jwt = JwtVerifier::new(config.jwt)?;
    let limits = config.limits;
    let (router, router_task) =
        EmbeddedRouter::start(limits.max_connections, &config.command_topics, &metrics);
    // One pending will per session at most; as many as connections allowed.
    let (wills, will_queue) = Wills::new(limits.max_connections, wills::MAX_PENDING_BYTES);
    let gate = Arc::new(Gate::new(GateParts {
        auth: Authenticator::new(
            jwt,
            config.handler_keys,
            limits.refusal_cache_ttl,
            metrics.clone(),
        ),
        router,
        sessions: Arc::new(SessionRegistry::new(shutdown.clone())),
        delivery: wrap(
            LocalDelivery::new(config.command_topics, metrics.reply_index_topics()),
            &metrics,
        ),
        wills,
        revocations: config.revocations.map(Arc::new),
        metrics,
        leeway_secs,
        limits,
        shutdown,
    }));
    Ok((gate, router_task, will_queue))
}
