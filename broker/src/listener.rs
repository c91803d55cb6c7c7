//! Owns accepting sockets: admission per source address (rate and pending
//! connections, see `rate_limit`) and the connection cap before any work,
//! then one task per connection that does the TLS handshake under its
//! deadline (never in the accept loop) and hands the stream to
//! `session::serve`. Accept errors back off instead of spinning.
//!
//! Each accept loop has its own [`Admission`]: the internal listener of the
//! in-process handlers never shares buckets with the public listeners, so
//! clients exhausting the loopback address's allowance cannot lock the
//! handlers out, and nothing reaching a public listener can use theirs.

use crate::gate::Gate;
use crate::rate_limit::{Admission, AdmissionRefusal, PendingGuard};
use crate::session;
use crate::session::Admits;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
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
            let admitted = self.admission.admit(peer.ip()).and_then(|pending| {
                self.connection_slots
                    .clone()
                    .try_acquire_owned()
                    .map(|slot| (pending, slot))
                    .map_err(|_| AdmissionRefusal::TooManyConnections)
            });
            let (pending, slot) = match admitted {
                Ok(admitted) => admitted,
                Err(why) => {
                    self.gate.metrics().socket_dropped(why.reason());
                    self.admission.log_refusal(peer.ip(), why);
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let gate = self.gate.clone();
            let transport = self.transport.clone();
            self.tasks.spawn(async move {
                serve_socket(socket, peer, transport, gate, pending).await;
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
    pending: PendingGuard,
) {
    match transport {
        Transport::Plain => {
            session::serve(Answered::new(socket, pending), peer, gate, Admits::Everyone).await;
        }
        Transport::InternalHandlers => {
            let stream = Answered::new(socket, pending);
            session::serve(stream, peer, gate, Admits::HandlersOnly).await;
        }
        Transport::Tls(acceptor) => {
            // Boxed: the handshake, and the TLS stream before the session
            // splits it, are needed only until the session starts; inline they
            // would stay in every connection's resident future.
            let session = Box::pin(async {
                let handshake = tokio::select! {
                    _ = gate.shutting_down() => return None,
                    h = crate::tls::handshake(&acceptor, socket, gate.limits().tls_handshake_timeout) => h,
                };
                match handshake {
                    Ok(stream) => Some(session::serve(
                        Answered::new(stream, pending),
                        peer,
                        gate.clone(),
                        Admits::Everyone,
                    )),
                    Err(e) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        gate.metrics().socket_dropped("tls_handshake");
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
