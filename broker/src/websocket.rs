//! Owns MQTT over WebSocket (`BROKER_WS_LISTEN`, `BROKER_WSS_LISTEN`): the
//! HTTP upgrade (path `/mqtt`, subprotocol `mqtt` or `mqttv3.1`, a bounded
//! request head, `X-Forwarded-For` from a trusted proxy) and [`WsBytes`],
//! which turns the WebSocket's binary messages into the byte stream
//! `session::serve` reads, so that a WebSocket client goes through the same
//! session, gate and limits as a TCP one.
//!
//! MQTT over WebSocket (MQTT 5, 6.0): binary messages only, read as one
//! stream (a packet may span messages, a message may hold several); a text
//! message closes the connection. Ping is answered by tungstenite as it
//! reads. Built on `tokio-tungstenite` with its buffers sized for many small
//! connections, messages and frames bounded by the MQTT maximum packet size.

use crate::proxy::TrustedProxies;
use crate::rate_limit::{Admission, AdmissionRefusal, PendingGuard};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The one path MQTT is served on.
pub const PATH: &str = "/mqtt";
/// The subprotocols accepted, in the broker's order of preference (MQTT 5
/// and 3.1.1 use `mqtt`, and the server must answer `mqtt`, MQTT-6.0.0-4;
/// some 3.1 era clients offer only `mqttv3.1`, and get it back).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// Longest upgrade request (request line and headers) read. Browsers send
/// well under 2 KiB; cookies of the page's origin may add some.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Most `X-Forwarded-For` hops looked at.
const MAX_FORWARDED_HOPS: usize = 32;
/// Bytes of outgoing MQTT put in one WebSocket message at most (a larger
/// write spans messages, as MQTT over WebSocket allows).
const WRITE_CHUNK: usize = 16 * 1024;
/// What tungstenite reads at once into its buffer (it grows for a larger
/// frame): resident per connection, so small.
const READ_BUFFER: usize = 512;

/// Why an upgrade was refused (the `reason` of `broker_sockets_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeRefusal {
    /// Not `/mqtt`: HTTP 404.
    NotFound,
    /// Neither `mqtt` nor `mqttv3.1` offered: HTTP 400.
    NoSubprotocol,
    /// A trusted proxy's `X-Forwarded-For` that is not a list of addresses: HTTP 400.
    BadForwardedFor,
    /// The forwarded client is over its admission: HTTP 503.
    Admission(AdmissionRefusal),
    /// Not a WebSocket upgrade, too long, closed, or not in time.
    Handshake,
}

impl UpgradeRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            UpgradeRefusal::NotFound => "ws_not_found",
            UpgradeRefusal::NoSubprotocol => "ws_no_subprotocol",
            UpgradeRefusal::BadForwardedFor => "ws_bad_forwarded_for",
            UpgradeRefusal::Admission(why) => why.reason(),
            UpgradeRefusal::Handshake => "ws_handshake",
        }
    }
}

/// Who the upgrade is for, when the peer is a trusted HTTP proxy: the
/// client is then named by `X-Forwarded-For` and admitted at the upgrade.
pub struct Forwarded<'a> {
    pub proxy: SocketAddr,
    pub trusted: &'a TrustedProxies,
    pub admission: &'a Admission,
}

/// A finished upgrade: the stream of MQTT bytes, and the client named by a
/// trusted proxy's `X-Forwarded-For` with its pending slot (when the
/// upgrade was [`Forwarded`]).
pub struct Upgraded<S> {
    pub stream: WsBytes<S>,
    pub forwarded: Option<(SocketAddr, PendingGuard)>,
}

/// The WebSocket configuration for a broker whose packets are at most
/// `max_packet_size` bytes.
fn config(max_packet_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Written at once: the session writes whole turns and flushes.
        .write_buffer_size(0)
        .max_write_buffer_size(2 * WRITE_CHUNK + 64)
        // A message or frame over the packet bound is refused before it is
        // buffered; MQTT's own bound (the packet) is checked by the codec.
        .max_message_size(Some(max_packet_size.saturating_add(16)))
        .max_frame_size(Some(max_packet_size.saturating_add(16)))
}

/// Runs the server side of the upgrade on `stream`. The caller bounds it in
/// time; the request head is bounded here ([`MAX_REQUEST_HEAD`]).
pub async fn upgrade<S>(
    stream: S,
    max_packet_size: usize,
    forwarded: Option<Forwarded<'_>>,
) -> Result<Upgraded<S>, UpgradeRefusal>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut decided: Option<UpgradeRefusal> = None;
    let mut admitted: Option<(SocketAddr, PendingGuard)> = None;
    // The closure's type is tungstenite's `Callback`: its error is the
    // HTTP response it sends, not ours to box.
    #[allow(clippy::result_large_err)]
    let callback =
        |request: &Request, mut response: Response| match decide(request, forwarded.as_ref()) {
            Ok((protocol, client)) => {
                if let Some((client, forwarded)) = client.zip(forwarded.as_ref()) {
                    match forwarded.admission.admit(client.ip()) {
                        Ok(pending) => admitted = Some((client, pending)),
                        Err(why) => {
                            forwarded.admission.log_refusal(client.ip(), why);
                            decided = Some(UpgradeRefusal::Admission(why));
                            return Err(refusal(StatusCode::SERVICE_UNAVAILABLE));
                        }
                    }
                }
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(protocol),
                );
                Ok(response)
            }
            Err(why) => {
                decided = Some(why);
                Err(refusal(match why {
                    UpgradeRefusal::NotFound => StatusCode::NOT_FOUND,
                    _ => StatusCode::BAD_REQUEST,
                }))
            }
        };
    let limited = Limited {
        inner: stream,
        head_left: MAX_REQUEST_HEAD,
    };
    let upgraded = tokio_tungstenite::accept_hdr_async_with_config(
        limited,
        callback,
        Some(config(max_packet_size)),
    )
    .await;
    match upgraded {
        Ok(mut ws) => {
            // The head is read: the limit is for it only.
            ws.get_mut().head_left = usize::MAX;
            Ok(Upgraded {
                stream: WsBytes {
                    ws,
                    pending: Bytes::new(),
                },
                forwarded: admitted,
            })
        }
        Err(_) => Err(decided.unwrap_or(UpgradeRefusal::Handshake)),
    }
}

fn refusal(status: StatusCode) -> ErrorResponse {
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status;
    response
}

/// The subprotocol to answer with and, from a trusted proxy, the client it
/// forwards for.
fn decide(
    request: &Request,
    forwarded: Option<&Forwarded<'_>>,
) -> Result<(&'static str, Option<SocketAddr>), UpgradeRefusal> {
    if request.uri().path() != PATH {
        return Err(UpgradeRefusal::NotFound);
    }
    let offers = || {
        request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    // `mqtt` whenever it is offered (MQTT-6.0.0-4); `mqttv3.1` only to a
    // client that offers nothing else of ours (MQTT 3.1 era clients).
    let chosen = SUBPROTOCOLS
        .iter()
        .find(|known| offers().any(|offer| offer == **known))
        .copied();
    let protocol = chosen.ok_or(UpgradeRefusal::NoSubprotocol)?;
    let client = match forwarded {
        None => None,
        Some(forwarded) => Some(forwarded_client(
            request
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.to_str().map_err(|_| UpgradeRefusal::BadForwardedFor)),
            forwarded.proxy,
            forwarded.trusted,
        )?),
    };
    Ok((protocol, client))
}

/// The client behind a trusted proxy: the last hop of `X-Forwarded-For`
/// that is not itself a trusted proxy (hops to the left of it were written
/// by whoever the client is, and could be anything), or the leftmost if all
/// are trusted; the proxy itself when there is no such header. The port is
/// not known (0).
pub fn forwarded_client<'h>(
    headers: impl Iterator<Item = Result<&'h str, UpgradeRefusal>>,
    proxy: SocketAddr,
    trusted: &TrustedProxies,
) -> Result<SocketAddr, UpgradeRefusal> {
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers {
        for hop in value?.split(',').map(str::trim) {
            if hops.len() == MAX_FORWARDED_HOPS {
                return Err(UpgradeRefusal::BadForwardedFor);
            }
            let ip = hop
                .parse::<IpAddr>()
                .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
                .map_err(|_| UpgradeRefusal::BadForwardedFor)?;
            hops.push(ip);
        }
    }
    let client = hops
        .iter()
        .rev()
        .find(|ip| !trusted.contains(**ip))
        .or_else(|| hops.first())
        .copied();
    Ok(match client {
        Some(ip) => SocketAddr::new(ip, 0),
        None => proxy,
    })
}

/// A stream whose reads stop with an error once `head_left` bytes were
/// read: the upgrade request's bound. Lifted when the upgrade is done.
pub struct Limited<S> {
    inner: S,
    head_left: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.head_left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "WebSocket upgrade request too long",
            )));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len().saturating_sub(before);
        this.head_left = this.head_left.saturating_sub(read);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The MQTT byte stream of a WebSocket: reads are the binary messages'
/// bytes in order, whatever their boundaries; each write is sent as one
/// binary message (at most [`WRITE_CHUNK`] bytes).
pub struct WsBytes<S> {
    ws: WebSocketStream<Limited<S>>,
    /// What is left of the last binary message read.
    pending: Bytes,
}

fn io_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(e) => e,
        Error::ConnectionClosed | Error::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                if this.pending.is_empty() {
                    // An empty slice would still hold the message's buffer.
                    this.pending = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match ready!(this.ws.poll_next_unpin(cx)) {
                // The end of the stream, or the client's Close (answered
                // by tungstenite): the session sees the peer hang up.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(bytes))) => this.pending = bytes,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text frame on MQTT over WebSocket",
                    )))
                }
                // Pings are answered by tungstenite; pongs need nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.ws.poll_ready_unpin(cx)).map_err(io_error)?;
        let chunk = buf.get(..buf.len().min(WRITE_CHUNK)).unwrap_or_default();
        self.ws
            .start_send_unpin(Message::Binary(Bytes::copy_from_slice(chunk)))
            .map_err(io_error)?;
        Poll::Ready(Ok(chunk.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(io_error)
    }

    /// The closing handshake (RFC 6455, 7.1.1): our Close, then the
    /// client's Close awaited (what else arrives is dropped), then the TCP
    /// connection closed, by the server as the RFC wants. The session
    /// bounds this in time. Closing the socket before the client's Close
    /// makes clients (Node's `ws` under MQTT.js) fail their reply with
    /// EPIPE and report an error for a clean DISCONNECT.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.ws.poll_close_unpin(cx)).map_err(io_error)?;
        this.pending = Bytes::new();
        while let Some(Ok(_)) = ready!(this.ws.poll_next_unpin(cx)) {}
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hops(values: &[&'static str], trusted: &str) -> Result<SocketAddr, UpgradeRefusal> {
        let trusted: TrustedProxies = trusted.parse().unwrap();
        forwarded_client(
            values.iter().map(|v| Ok(*v)),
            "10.0.0.2:5000".parse().unwrap(),
            &trusted,
        )
    }

    #[test]
    fn forwarded_for_takes_the_last_untrusted_hop() {
        let ip = |s: &str| SocketAddr::new(s.parse().unwrap(), 0);
        assert_eq!(hops(&["203.0.113.7"], "10.0.0.0/8"), Ok(ip("203.0.113.7")));
        // A client's own forged entry to the left is not believed.
        assert_eq!(
            hops(&["1.1.1.1, 203.0.113.7, 10.0.0.9"], "10.0.0.0/8"),
            Ok(ip("203.0.113.7"))
        );
        assert_eq!(
            hops(&["1.1.1.1", "203.0.113.7 , 10.0.0.9"], "10.0.0.0/8"),
            Ok(ip("203.0.113.7")),
            "several headers are one list"
        );
        assert_eq!(
            hops(&["10.0.0.3, 10.0.0.9"], "10.0.0.0/8"),
            Ok(ip("10.0.0.3"))
        );
        assert_eq!(
            hops(&["[2001:db8::1]:443"], "10.0.0.0/8"),
            Ok(ip("2001:db8::1"))
        );
        assert_eq!(
            hops(&[], "10.0.0.0/8"),
            Ok("10.0.0.2:5000".parse().unwrap()),
            "no header: the proxy itself"
        );
        for bad in ["unknown", "203.0.113.7, ", "1.2.3.4;5.6.7.8"] {
            assert_eq!(
                hops(&[bad], "10.0.0.0/8"),
                Err(UpgradeRefusal::BadForwardedFor),
                "{bad}"
            );
        }
        let long = vec!["203.0.113.7"; MAX_FORWARDED_HOPS + 1].join(",");
        let long: &'static str = Box::leak(long.into_boxed_str());
        assert_eq!(
            hops(&[long], "10.0.0.0/8"),
            Err(UpgradeRefusal::BadForwardedFor)
        );
    }
}
