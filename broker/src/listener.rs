//! Owns accepting sockets: the per-address rate limit and the connection cap
//! before any work, then one task per connection that does the TLS handshake
//! under its deadline (never in the accept loop) and hands the stream to
//! `connection::serve`. Accept errors back off instead of spinning.

use crate::connection;
use crate::gate::Gate;
use crate::rate_limit::ConnectionRateLimit;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Per-listener: how its sockets are wrapped.
#[derive(Clone)]
pub enum Transport {
    Tls(TlsAcceptor),
    Plain,
}

/// Everything an accept loop needs.
pub struct AcceptLoop {
    pub listener: TcpListener,
    pub transport: Transport,
    pub gate: Arc<Gate>,
    pub rate_limit: Arc<ConnectionRateLimit>,
    pub connection_slots: Arc<Semaphore>,
    pub tasks: TaskTracker,
}

impl AcceptLoop {
    /// Accepts until shutdown.
    pub async fn run(self) {
        let shutdown = self.gate.shutdown.clone();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            if !self.rate_limit.allow(peer.ip()) {
                debug!(%peer, "connection rate limit");
                self.gate.metrics.socket_dropped("rate_limited");
                continue;
            }
            let Ok(slot) = self.connection_slots.clone().try_acquire_owned() else {
                info!(%peer, "connection limit reached");
                self.gate.metrics.socket_dropped("too_many_connections");
                continue;
            };
            let _ = socket.set_nodelay(true);
            let gate = self.gate.clone();
            let transport = self.transport.clone();
            self.tasks.spawn(async move {
                serve_socket(socket, peer, transport, gate).await;
                drop(slot);
            });
        }
    }
}

async fn serve_socket(
    socket: TcpStream,
    peer: std::net::SocketAddr,
    transport: Transport,
    gate: Arc<Gate>,
) {
    match transport {
        Transport::Plain => connection::serve(socket, peer, gate).await,
        Transport::Tls(acceptor) => {
            // Boxed: the handshake, and the TLS stream before the session
            // splits it, are needed only until the session starts; inline they
            // would stay in every connection's resident future.
            let session = Box::pin(async {
                let handshake = tokio::select! {
                    _ = gate.shutdown.cancelled() => return None,
                    h = crate::tls::handshake(&acceptor, socket, gate.limits.tls_handshake_timeout) => h,
                };
                match handshake {
                    Ok(stream) => Some(connection::serve(stream, peer, gate.clone())),
                    Err(e) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        gate.metrics.socket_dropped("tls_handshake");
                        None
                    }
                }
            })
            .await;
            if let Some(session) = session {
                session.await;
            }
        }
    }
}
