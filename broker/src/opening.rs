//! Owns a public connection's opening, in its own task, under one deadline
//! (`BROKER_TLS_HANDSHAKE_TIMEOUT_SECS`): who the client is (a PROXY header
//! from a trusted load balancer, or a look at the first bytes of anyone
//! else's), the TLS handshake, and on the WebSocket listeners the HTTP
//! upgrade. Then it hands the stream to `session::serve`. Everything here is
//! boxed apart from the session's resident future and freed when the
//! session starts.
//!
//! Each refusal closes the socket, is counted in
//! `broker_sockets_dropped_total{reason}`, and is logged once per episode.

use crate::gate::Gate;
use crate::listener::Answered;
use crate::proxy::{self, Header};
use crate::rate_limit::{Admission, Admitted, PendingGuard, UNTRUSTED_PROXY_HEADER};
use crate::session::{self, Admits};
use crate::websocket::{self, Forwarded};
use futures::future::OptionFuture;
use futures::FutureExt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

/// A stream whose opening is done, with the client's address and its slot.
type Opened<S> = Option<(S, SocketAddr, PendingGuard)>;

/// The opening, boxed (it and the stream before the session takes it are
/// needed only until the session starts; inline they would stay in every
/// connection's resident future), then the session in its place (a
/// combinator: an `async` block would keep the session's future twice).
pub fn then_serve<S, F>(opening: F, gate: Arc<Gate>) -> impl Future<Output = ()> + Send
where
    F: Future<Output = Opened<S>> + Send + 'static,
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

/// What a connection's public listener does after the opening.
pub struct Opening {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    pub admitted: Admitted,
    pub admission: Arc<Admission>,
    pub gate: Arc<Gate>,
}

/// An opening past its first step: who it is from, and what the next
/// steps need (the socket is apart, as the steps wrap it).
struct Identified {
    found: Found,
    peer: SocketAddr,
    admission: Arc<Admission>,
    gate: Arc<Gate>,
    deadline: Instant,
}

impl Identified {
    /// The address the connection is known by so far (for logs).
    fn seen_as(&self) -> SocketAddr {
        match &self.found {
            Found::Client(client, _) => *client,
            Found::Forwarding(_) => self.peer,
        }
    }
}

impl Opening {
    /// Who the connection is from (see [`client_of`]).
    async fn identify(self, silent: Silent) -> Option<(TcpStream, Identified)> {
        let deadline = Instant::now() + self.gate.limits().tls_handshake_timeout;
        let Opening {
            mut socket,
            peer,
            admitted,
            admission,
            gate,
        } = self;
        let found = tokio::select! {
            _ = gate.shutting_down() => None,
            found = client_of(&mut socket, peer, admitted, &admission, &gate, deadline, silent) => found,
        }?;
        let identified = Identified {
            found,
            peer,
            admission,
            gate,
            deadline,
        };
        Some((socket, identified))
    }

    /// Plain MQTT.
    pub async fn plain(self) -> Opened<TcpStream> {
        let (socket, opened) = self.identify(Silent::Plain).await?;
        match opened.found {
            Found::Client(client, pending) => Some((socket, client, pending)),
            Found::Forwarding(_) => None,
        }
    }

    /// MQTT over TLS.
    pub async fn tls(self, acceptor: TlsAcceptor) -> Opened<TlsStream<TcpStream>> {
        let (socket, opened) = self.identify(Silent::Tls).await?;
        let Found::Client(client, pending) = opened.found else {
            return None;
        };
        let stream = handshake(&acceptor, socket, client, &opened.gate, opened.deadline).await?;
        Some((stream, client, pending))
    }

    /// MQTT over WebSocket.
    pub async fn ws(self) -> Opened<websocket::WsBytes<TcpStream>> {
        let (socket, opened) = self.identify(Silent::WebSocket).await?;
        upgrade(socket, opened).await
    }

    /// MQTT over WebSocket over TLS.
    pub async fn wss(
        self,
        acceptor: TlsAcceptor,
    ) -> Opened<websocket::WsBytes<TlsStream<TcpStream>>> {
        let (socket, opened) = self.identify(Silent::WebSocket).await?;
        let stream = handshake(
            &acceptor,
            socket,
            opened.seen_as(),
            &opened.gate,
            opened.deadline,
        )
        .await?;
        upgrade(stream, opened).await
    }
}

/// The HTTP upgrade, in what is left of the deadline; a trusted HTTP
/// proxy's client is admitted there.
async fn upgrade<S>(stream: S, opened: Identified) -> Opened<websocket::WsBytes<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let seen_as = opened.seen_as();
    let Identified {
        found,
        peer,
        admission,
        gate,
        deadline,
    } = opened;
    let forwarded = match &found {
        Found::Client(..) => None,
        Found::Forwarding(_) => Some(Forwarded {
            proxy: peer,
            trusted: admission.trusted_proxies(),
            admission: &admission,
        }),
    };
    let upgrade = websocket::upgrade(stream, gate.limits().max_packet_size, forwarded);
    let upgraded = tokio::select! {
        _ = gate.shutting_down() => return None,
        upgraded = tokio::time::timeout_at(deadline, upgrade) => upgraded,
    };
    let upgraded = match upgraded {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(why)) => {
            gate.metrics().socket_dropped(why.reason());
            debug!(peer = %seen_as, reason = why.reason(), "WebSocket upgrade refused");
            return None;
        }
        Err(_) => {
            gate.metrics().socket_dropped("ws_handshake");
            debug!(peer = %seen_as, "WebSocket upgrade not done in time");
            return None;
        }
    };
    match (found, upgraded.forwarded) {
        (Found::Client(client, pending), _) => Some((upgraded.stream, client, pending)),
        (Found::Forwarding(awaiting), Some((client, pending))) => {
            drop(awaiting);
            debug!(%client, proxy = %peer, "X-Forwarded-For");
            Some((upgraded.stream, client, pending))
        }
        (Found::Forwarding(_), None) => None,
    }
}

/// The TLS handshake in what is left of the opening's deadline.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    socket: TcpStream,
    client: SocketAddr,
    gate: &Gate,
    deadline: Instant,
) -> Option<TlsStream<TcpStream>> {
    let left = deadline.saturating_duration_since(Instant::now());
    let handshake = tokio::select! {
        _ = gate.shutting_down() => return None,
        h = crate::tls::handshake(acceptor, socket, left) => h,
    };
    match handshake {
        Ok(stream) => Some(stream),
        Err(e) => {
            debug!(peer = %client, error = %e, "TLS handshake failed");
            gate.metrics().socket_dropped("tls_handshake");
            None
        }
    }
}

/// What is counted when nothing arrives before the deadline, per listener
/// (as before this step existed: the TLS handshake's or CONNECT's deadline).
#[derive(Clone, Copy)]
enum Silent {
    Plain,
    Tls,
    WebSocket,
}

impl Silent {
    fn reason(self) -> &'static str {
        match self {
            Silent::Plain => "connect_timeout",
            Silent::Tls => "tls_handshake",
            Silent::WebSocket => "ws_handshake",
        }
    }
}

/// Who a connection is from.
enum Found {
    /// The client and its pending slot.
    Client(SocketAddr, PendingGuard),
    /// A trusted peer with no PROXY header on a WebSocket listener: an HTTP
    /// proxy, whose `X-Forwarded-For` names the client at the upgrade. It
    /// holds its slot of connections awaiting their client until then.
    Forwarding(PendingGuard),
}

/// Who the connection is from, once its opening says so, or `None` when it
/// was refused.
///
/// A trusted proxy must open with a PROXY header on the TCP and TLS
/// listeners: it is configured to send one on every connection, so a
/// connection without one is a proxy misconfigured (every client behind it
/// would be admitted, limited and logged as the proxy) or another process
/// on the proxy's host. On the WebSocket listeners a trusted peer without
/// one is an HTTP proxy, and `X-Forwarded-For` names the client. A v2
/// `LOCAL` header (health checks) or a v1 `UNKNOWN` is served as the
/// proxy's own connection, admitted under the proxy's address.
/// Anyone else must not open with a PROXY header: it would be a client
/// choosing its own address.
async fn client_of(
    socket: &mut TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    admission: &Admission,
    gate: &Gate,
    deadline: Instant,
    silent: Silent,
) -> Option<Found> {
    let refuse = |reason: &'static str, why: &dyn std::fmt::Display| {
        gate.metrics().socket_dropped(reason);
        admission.log_opening_refusal(peer, reason, why);
        None
    };
    let first = tokio::time::timeout_at(deadline, proxy::opens_with_header(socket)).await;
    let opens_with_header = match first {
        Ok(Ok(opens)) => opens,
        // Closed before its first byte.
        Ok(Err(_)) => {
            if matches!(admitted, Admitted::ViaProxy(_)) {
                gate.metrics().socket_dropped("proxy_header_closed");
            }
            return None;
        }
        Err(_) => {
            return match admitted {
                Admitted::Direct(_) => {
                    gate.metrics().socket_dropped(silent.reason());
                    None
                }
                Admitted::ViaProxy(_) => refuse(
                    "proxy_header_timeout",
                    &"a trusted proxy sent nothing before the handshake deadline",
                ),
            };
        }
    };
    let awaiting_header = match admitted {
        Admitted::Direct(_) if opens_with_header => {
            return refuse(
                UNTRUSTED_PROXY_HEADER,
                &"a PROXY header from a peer not in BROKER_TRUSTED_PROXIES",
            )
        }
        Admitted::Direct(pending) => return Some(Found::Client(peer, pending)),
        Admitted::ViaProxy(awaiting) => awaiting,
    };
    if !opens_with_header {
        if let Silent::WebSocket = silent {
            return Some(Found::Forwarding(awaiting_header));
        }
    }
    let header = match tokio::time::timeout_at(deadline, proxy::read_header(socket)).await {
        Ok(Ok(header)) => header,
        // A health check that connects and closes is not worth a log line.
        Ok(Err(e @ (proxy::ReadError::Closed | proxy::ReadError::Io(_)))) => {
            gate.metrics().socket_dropped(e.reason());
            return None;
        }
        Ok(Err(e)) => return refuse(e.reason(), &format_args!("from a trusted proxy, {e}")),
        Err(_) => {
            return refuse(
                "proxy_header_timeout",
                &"a trusted proxy sent no whole PROXY header before the handshake deadline",
            )
        }
    };
    drop(awaiting_header);
    let client = match header {
        Header::Proxied { source, .. } => source,
        Header::Local => peer,
    };
    debug!(%client, proxy = %peer, "PROXY header");
    match admission.admit(client.ip()) {
        Ok(pending) => Some(Found::Client(client, pending)),
        Err(why) => {
            gate.metrics().socket_dropped(why.reason());
            admission.log_refusal(client.ip(), why);
            None
        }
    }
}
