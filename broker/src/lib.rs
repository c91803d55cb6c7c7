//! An MQTT broker for mobile back-ends: a gate that owns the sockets and
//! decides every CONNECT, SUBSCRIBE and PUBLISH, in front of an embedded
//! rumqttd router that does the MQTT routing.
//!
//! The path of a connection, one module per step:
//! 1. [`listener`]: accept, per-address [`rate_limit`], connection cap;
//! 2. [`tls`]: handshake under a deadline, in the connection's own task;
//! 3. [`connection`]: CONNECT deadline, protocol version ([`codec`]);
//! 4. [`auth`]: device JWT ([`auth::jwt`], [`auth::jwks`]) or handler key,
//!    giving a verified [`auth::Principal`]; refusals cached ([`auth::refusals`]);
//! 5. [`sessions`]: client ids namespaced per user and takeover;
//! 6. [`acl`]: who may publish and subscribe where ([`command_topics`]);
//!    revoked users are refused and disconnected ([`revocation`]);
//! 7. [`identity`]: `user_id`/`client_id` stamped on device publishes;
//! 8. [`router`]: the embedded rumqttd router, which routes and delivers;
//! 9. [`answers`]: every refusal and denial as the right packet per version.
//!
//! Around it: [`config`] (environment and flags, development defaults from
//! [`dev_certs`]), [`metrics`] and [`http`] (`/metrics`, `/healthz`), and
//! [`Broker::start`] / [`RunningBroker::shutdown`] for the whole lifecycle.

pub mod acl;
pub mod answers;
pub mod auth;
pub mod codec;
pub mod command_topics;
pub mod config;
pub mod connection;
pub mod dev_certs;
pub mod gate;
pub mod http;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod rate_limit;
pub mod reply_index;
pub mod revocation;
pub mod router;
pub mod secret;
pub mod sessions;
pub mod tls;

use auth::jwt::{JwtConfigError, JwtVerifier};
use auth::Authenticator;
use command_topics::CommandTopics;
use config::Config;
use gate::Gate;
use listener::{AcceptLoop, Transport};
use metrics::Metrics;
use rate_limit::ConnectionRateLimit;
use reply_index::ReplyIndex;
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

/// Bound listeners handed to the broker (tests bind port 0 and read the address back).
#[derive(Default)]
pub struct Listeners {
    /// MQTT over TLS.
    pub tls: Option<(TcpListener, TlsAcceptor)>,
    /// Plain MQTT (loopback use, in-process handlers, load tests).
    pub tcp: Vec<TcpListener>,
    /// `/metrics` and `/healthz`.
    pub metrics: Option<TcpListener>,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("token verification: {0}")]
    Jwt(#[from] JwtConfigError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Starting point of the broker's lifecycle.
pub struct Broker;

/// A broker that is serving.
pub struct RunningBroker {
    pub tls_addr: Option<SocketAddr>,
    pub tcp_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    grace: Duration,
    /// Why the router stopped, if it did (it runs until the process ends).
    router_stopped: Arc<OnceLock<String>>,
}

/// The broker stopped because its embedded router did.
#[derive(Debug, thiserror::Error)]
#[error("the embedded router stopped: {0}")]
pub struct RouterStopped(pub String);

impl Broker {
    /// Starts the router, the accept loops and the metrics endpoint.
    pub async fn start(config: Config, listeners: Listeners) -> Result<RunningBroker, StartError> {
        let leeway_secs = config.jwt.leeway_secs;
        let jwt = JwtVerifier::new(config.jwt)?;
        let limits = config.limits;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let (router, router_task) = EmbeddedRouter::start(&limits, &config.command_topics);
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
        let gate = Arc::new(Gate {
            auth: Authenticator::new(
                jwt,
                config.handler_keys,
                limits.refusal_cache_ttl,
                metrics.clone(),
            ),
            router,
            sessions: Arc::new(SessionRegistry::new(shutdown.clone())),
            commands: CommandTopics::new(config.command_topics),
            replies: ReplyIndex::default(),
            revocations: config.revocations.map(Arc::new),
            metrics: metrics.clone(),
            leeway_secs,
            limits: limits.clone(),
            shutdown: shutdown.clone(),
        });
        let rate_limit = Arc::new(ConnectionRateLimit::new(
            limits.conn_rate_per_sec,
            limits.conn_burst,
        ));
        let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
        let tasks = TaskTracker::new();
        tasks.spawn(gate.sessions.clone().end_all_at_shutdown());
        if let Some(revocations) = gate.revocations.clone() {
            tasks.spawn(revocations.watch(gate.sessions.clone(), shutdown.clone()));
        }

        let mut running = RunningBroker {
            tls_addr: None,
            tcp_addrs: Vec::new(),
            metrics_addr: None,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            grace: limits.shutdown_grace,
            router_stopped,
        };
        let mut loops = Vec::new();
        if let Some((listener, acceptor)) = listeners.tls {
            running.tls_addr = Some(listener.local_addr()?);
            loops.push((listener, Transport::Tls(acceptor)));
        }
        for listener in listeners.tcp {
            running.tcp_addrs.push(listener.local_addr()?);
            loops.push((listener, Transport::Plain));
        }
        for (listener, transport) in loops {
            let accept_loop = AcceptLoop {
                listener,
                transport,
                gate: gate.clone(),
                rate_limit: rate_limit.clone(),
                connection_slots: connection_slots.clone(),
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
            metrics = ?running.metrics_addr,
            "broker listening"
        );
        Ok(running)
    }
}

impl RunningBroker {
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
/// watcher: for protocol tests and fuzzing that drive [`connection::serve`]
/// over in-memory streams (`tokio::io::duplex`). Call inside a tokio runtime.
/// Cancelling `shutdown` ends the sessions as a broker shutdown does.
/// Keep in step with `Broker::start`.
#[doc(hidden)]
pub fn gate_for_tests(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Arc<Gate>, StartError> {
    let leeway_secs = config.jwt.leeway_secs;
    let jwt = JwtVerifier::new(config.jwt)?;
    let limits = config.limits;
    let metrics = Arc::new(Metrics::new());
    let (router, _router_task) = EmbeddedRouter::start(&limits, &config.command_topics);
    let gate = Arc::new(Gate {
        auth: Authenticator::new(
            jwt,
            config.handler_keys,
            limits.refusal_cache_ttl,
            metrics.clone(),
        ),
        router,
        sessions: Arc::new(SessionRegistry::new(shutdown.clone())),
        commands: CommandTopics::new(config.command_topics),
        replies: ReplyIndex::default(),
        revocations: config.revocations.map(Arc::new),
        metrics,
        leeway_secs,
        limits: limits.clone(),
        shutdown,
    });
    tokio::spawn(gate.sessions.clone().end_all_at_shutdown());
    Ok(gate)
}
