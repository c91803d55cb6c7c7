//! Owns accepting sockets: admission per source address (rate and pending
//! connections, see `rate_limit`) and the connection cap before any work,
//! then one task per connection that reads its opening under the handshake
//! deadline (never in the accept loop) and hands the stream to
//! `session::serve`. Accept errors back off instead of spinning.
//!
//! The opening, on the public listeners: from a peer in
//! `BROKER_TRUSTED_PROXIES`, the PROXY header that names the client (then
//! the client is admitted as if it had connected directly); from anyone
//! else, a look at the first bytes, and a PROXY header there is refused.
//! Then the TLS handshake (TLS listener). The PROXY header, which a proxy
//! sends before the client's first byte, and the TLS handshake share one
//! deadline (`BROKER_TLS_HANDSHAKE_TIMEOUT_SECS`).
//!
//! Each accept loop has its own [`Admission`]: the internal listener of the
//! in-process handlers never shares buckets with the public listeners, so
//! clients exhausting the loopback address's allowance cannot lock the
//! handlers out, and nothing reaching a public listener can use theirs.

use crate::gate::Gate;
use crate::proxy::{self, Header};
use crate::rate_limit::{
    Admission, AdmissionRefusal, Admitted, PendingGuard, UNTRUSTED_PROXY_HEADER,
};
use crate::session;
use crate::session::Admits;
use futures::future::{Either, OptionFuture};
use futures::FutureExt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Per-listener: how its sockets are wrapped.
#[derive(Clone)]
pub enum Transport {
    Tls(TlsAcceptor),
    Plain,
    /// Plain, for the in-process handlers only: a device is refused here
    /// (this listener's admission is not the public one).
    InternalHandlers,
}

/// Everything an accept loop needs.
pub struct AcceptLoop {
    pub listener: TcpListener,
    pub transport: Transport,
    pub gate: Arc<Gate>,
    /// This listener's admission (shared by the public listeners).
    pub admission: Arc<Admission>,
    pub connection_slots: Arc<Semaphore>,
    pub tasks: TaskTracker,
}

impl AcceptLoop {
    /// Accepts until shutdown.
    pub async fn run(self) {
        let gate = self.gate.clone();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = gate.shutting_down() => return,
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
            // Refused sockets are dropped (closed) here, before any TLS work.
            let admitted = self
                .admission
                .admit_accepted(peer.ip())
                .and_then(|admitted| {
                    self.connection_slots
                        .clone()
                        .try_acquire_owned()
                        .map(|slot| (admitted, slot))
                        .map_err(|_| AdmissionRefusal::TooManyConnections)
                });
            let (admitted, slot) = match admitted {
                Ok(admitted) => admitted,
                Err(why) => {
                    self.gate.metrics().socket_dropped(why.reason());
                    self.admission.log_refusal(peer.ip(), why);
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let connection = serve_socket(
                socket,
                peer,
                &self.transport,
                self.gate.clone(),
                admitted,
                &self.admission,
            );
            self.tasks.spawn(async move {
                connection.await;
                drop(slot);
            });
        }
    }
}

/// The connection's task. Not an `async fn`: its arguments would be stored
/// twice in a future that is resident for the connection's whole life. The
/// resident part is the session's own future (two pointers and a span);
/// the opening (PROXY header, TLS handshake) is boxed apart until it is done.
fn serve_socket(
    socket: TcpStream,
    peer: std::net::SocketAddr,
    transport: &Transport,
    gate: Arc<Gate>,
    admitted: Admitted,
    admission: &Arc<Admission>,
) -> impl std::future::Future<Output = ()> + Send {
    let admission = admission.clone();
    match transport {
        Transport::InternalHandlers => {
            let pending = match admitted {
                Admitted::Direct(pending) | Admitted::ViaProxy(pending) => pending,
            };
            Either::Left(session::serve(
                Answered::new(socket, pending),
                peer,
                gate,
                Admits::HandlersOnly,
            ))
        }
        Transport::Plain => {
            let opening_gate = gate.clone();
            let opening = async move {
                let gate = opening_gate;
                let mut socket = socket;
                let deadline = Instant::now() + gate.limits().tls_handshake_timeout;
                let opened = tokio::select! {
                    _ = gate.shutting_down() => None,
                    opened = client_of(&mut socket, peer, admitted, &admission, &gate, deadline, "connect_timeout") => opened,
                };
                opened.map(|(client, pending)| (socket, client, pending))
            };
            Either::Right(Either::Left(open_then_serve(opening, gate)))
        }
        Transport::Tls(acceptor) => {
            let acceptor = acceptor.clone();
            let opening_gate = gate.clone();
            let opening = async move {
                let gate = opening_gate;
                let mut socket = socket;
                let deadline = Instant::now() + gate.limits().tls_handshake_timeout;
                let (client, pending) = tokio::select! {
                    _ = gate.shutting_down() => None,
                    opened = client_of(&mut socket, peer, admitted, &admission, &gate, deadline, "tls_handshake") => opened,
                }?;
                let left = deadline.saturating_duration_since(Instant::now());
                let handshake = tokio::select! {
                    _ = gate.shutting_down() => return None,
                    h = crate::tls::handshake(&acceptor, socket, left) => h,
                };
                match handshake {
                    Ok(stream) => Some((stream, client, pending)),
                    Err(e) => {
                        debug!(peer = %client, error = %e, "TLS handshake failed");
                        gate.metrics().socket_dropped("tls_handshake");
                        None
                    }
                }
            };
            Either::Right(Either::Right(open_then_serve(opening, gate)))
        }
    }
}

/// The opening, boxed (it and the stream before the session takes it are
/// needed only until the session starts; inline they would stay in every
/// connection's resident future), then the session in its place (a
/// combinator: an `async` block would keep the session's future twice).
fn open_then_serve<S, F>(
    opening: F,
    gate: Arc<Gate>,
) -> impl std::future::Future<Output = ()> + Send
where
    F: std::future::Future<Output = Option<(S, std::net::SocketAddr, PendingGuard)>>
        + Send
        + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(opening)
        .map(move |opened| {
            opened.map(|(stream, client, pending)| {
                session::serve(
                    Answered::new(stream, pending),
                    client,
                    gate,
                    Admits::Everyone,
                )
            })
        })
        .map(OptionFuture::from)
        .flatten()
        .map(|_: Option<()>| ())
}

/// Who the connection is from, once its opening says so: the client's
/// address and its pending slot, or `None` when it was refused (counted in
/// `broker_sockets_dropped_total`, and logged once per episode).
///
/// A trusted proxy must open with a PROXY header: it is configured to send
/// one on every connection, so a connection without one is a proxy
/// misconfigured (every client behind it would be admitted, limited and
/// logged as the proxy) or another process on the proxy's host. A v2
/// `LOCAL` header (health checks) or a v1 `UNKNOWN` is served as the
/// proxy's own connection, admitted under the proxy's address.
/// Anyone else must not open with one: it would be a client trying to
/// choose its own address. `silent` is the reason counted when nothing at
/// all arrives in time (as without this step).
async fn client_of(
    socket: &mut TcpStream,
    peer: std::net::SocketAddr,
    admitted: Admitted,
    admission: &Admission,
    gate: &Gate,
    deadline: Instant,
    silent: &'static str,
) -> Option<(std::net::SocketAddr, PendingGuard)> {
    let refuse = |reason: &'static str, why: &dyn std::fmt::Display| {
        gate.metrics().socket_dropped(reason);
        admission.log_opening_refusal(peer, reason, why);
        None
    };
    match admitted {
        Admitted::Direct(pending) => {
            match tokio::time::timeout_at(deadline, proxy::opens_with_header(socket)).await {
                Ok(Ok(false)) => Some((peer, pending)),
                Ok(Ok(true)) => refuse(
                    UNTRUSTED_PROXY_HEADER,
                    &"a PROXY header from a peer not in BROKER_TRUSTED_PROXIES",
                ),
                // Closed before its first byte.
                Ok(Err(_)) => None,
                Err(_) => {
                    gate.metrics().socket_dropped(silent);
                    None
                }
            }
        }
        Admitted::ViaProxy(awaiting_header) => {
            let header =
                match tokio::time::timeout_at(deadline, proxy::read_header(socket)).await {
                    Ok(Ok(header)) => header,
                    // A health check that connects and closes is not worth a log line.
                    Ok(Err(e @ (proxy::ReadError::Closed | proxy::ReadError::Io(_)))) => {
                        gate.metrics().socket_dropped(e.reason());
                        return None;
                    }
                    Ok(Err(e)) => {
                        return refuse(e.reason(), &format_args!("from a trusted proxy, {e}"))
                    }
                    Err(_) => return refuse(
                        "proxy_header_timeout",
                        &"a trusted proxy sent no whole PROXY header before the handshake deadline",
                    ),
                };
            drop(awaiting_header);
            let client = match header {
                Header::Proxied { source, .. } => source,
                Header::Local => peer,
            };
            debug!(%client, proxy = %peer, "PROXY header");
            match admission.admit(client.ip()) {
                Ok(pending) => Some((client, pending)),
                Err(why) => {
                    gate.metrics().socket_dropped(why.reason());
                    admission.log_refusal(client.ip(), why);
                    None
                }
            }
        }
    }
}

/// A client stream that holds its source's pending slot until the broker
/// first writes to it. The server speaks first only with CONNACK (accepting
/// or refusing), so the first write marks the end of the pending phase;
/// ending before it (timeouts, garbage, a closed socket) drops the slot too.
/// Under TLS this wraps the TLS stream: handshake bytes do not count.
struct Answered<S> {
    inner: S,
    pending: Option<PendingGuard>,
}

impl<S> Answered<S> {
    fn new(inner: S, pending: PendingGuard) -> Self {
        Answered {
            inner,
            pending: Some(pending),
        }
    }

    fn answered(&mut self) {
        // An `Option::take` per write: the slot is released once.
        self.pending.take();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Answered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Answered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.answered();
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.answered();
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.answered();
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_pending_slot_is_held_until_the_first_write() {
        let admission = Admission::new("test", 0.0, 1, 1);
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("address");
        let guard = admission.admit(ip).expect("first");
        let (client, server) = tokio::io::duplex(64);
        let mut answered = Answered::new(server, guard);
        let mut client = client;
        client.write_all(b"CONNECT").await.expect("client writes");
        let mut buf = [0u8; 7];
        answered.read_exact(&mut buf).await.expect("server reads");
        assert_eq!(admission.pending(ip), 1, "reading does not answer");
        assert!(admission.admit(ip).is_err(), "still pending");
        answered.write_all(b"CONNACK").await.expect("server writes");
        assert_eq!(admission.pending(ip), 0, "the first write answers");
        assert!(admission.admit(ip).is_ok());
        drop(answered);
        assert_eq!(admission.pending(ip), 0);
    }

    /// The task of a connection is resident for its whole life: it keeps
    /// pointers to the boxed opening and loop, not the session's state.
    /// The bounds are this build's sizes (debug, 64 bits) plus ~10%; before
    /// issue 16 the task cell of a plain connection was ~2.4 KiB.
    #[tokio::test]
    async fn a_connections_task_future_is_small() {
        let gate = crate::gate_for_tests(
            crate::config::Config {
                jwt: crate::auth::jwt::JwtSettings {
                    hmac_secret: Some(protocol::Secret::new("listener-tests-secret-0123456789abc")),
                    ..Default::default()
                },
                handler_keys: Vec::new(),
                command_topics: Vec::new(),
                limits: Default::default(),
                revocations: None,
            },
            tokio_util::sync::CancellationToken::new(),
        )
        .expect("gate");
        let admission = Admission::new("test", 0.0, 8, 8);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (socket, peer) = listener.accept().await.expect("accept");
        let admission = Arc::new(admission);
        let admitted = admission.admit_accepted(peer.ip()).expect("admitted");
        let plain = serve_socket(
            socket,
            peer,
            &Transport::Plain,
            gate.clone(),
            admitted,
            &admission,
        );
        let plain_size = std::mem::size_of_val(&plain);
        drop(plain);
        println!("a plain connection's task future: {plain_size} B");
        assert!(plain_size <= 112, "{plain_size} B");
    }

    #[tokio::test]
    async fn the_pending_slot_is_released_when_the_stream_ends_unanswered() {
        let admission = Admission::new("test", 0.0, 1, 1);
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("address");
        let (_client, server) = tokio::io::duplex(64);
        let answered = Answered::new(server, admission.admit(ip).expect("first"));
        assert_eq!(admission.pending(ip), 1);
        drop(answered);
        assert_eq!(admission.pending(ip), 0);
    }
}
