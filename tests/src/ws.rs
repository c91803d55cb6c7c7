//! WebSocket helpers for the MQTT-over-WebSocket tests: a tungstenite client
//! (its own framing), a raw client that writes frames byte by byte (to split
//! and fragment as the test chooses), and the upgrade request by hand.

use crate::TestBroker;
use futures::StreamExt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long a test waits for any one answer.
pub const WAIT: Duration = Duration::from_secs(10);

/// `broker_sockets_dropped_total{reason}`.
pub async fn dropped(broker: &TestBroker, reason: &str) -> f64 {
    broker
        .metric(&format!(
            "broker_sockets_dropped_total{{reason=\"{reason}\"}}"
        ))
        .await
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A tungstenite client on `ws://addr/mqtt` offering `protocols`; asserts
/// the broker answered `mqtt`.
pub async fn ws_client(addr: SocketAddr, protocols: &str) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("ws://127.0.0.1:{}/mqtt", addr.port())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(protocols).unwrap(),
    );
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "mqtt",
        "the broker answers with the protocol offered"
    );
    ws
}

/// Reads binary messages until `want` says the bytes so far are enough.
pub async fn read_until(
    ws: &mut WebSocketStream<TcpStream>,
    got: &mut Vec<u8>,
    want: impl Fn(&[u8]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want(got) {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("waited for more; have {got:?}"))
            .expect("stream open")
            .expect("message");
        if let Message::Binary(bytes) = message {
            got.extend_from_slice(&bytes);
        }
    }
}

/// An upgrade request for `path`, offering `protocols`, with `extra` header lines.
pub fn upgrade_request(path: &str, protocols: Option<&str>, extra: &str) -> String {
    let protocols = protocols
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocols}{extra}\r\n"
    )
}

/// The broker's HTTP answer head to `request` (empty if it closed first).
pub async fn http_answer(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = tokio::time::Instant::now() + WAIT;
    // Byte by byte: nothing after the head is consumed.
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => got.push(byte[0]),
            Err(_) => panic!("no answer in time; have {got:?}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the broker closes `stream` within `within` (what it sends
/// before is read and dropped).
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// A raw client's upgraded socket on `ws://addr/mqtt` (subprotocol `mqtt`).
pub async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let answer = http_answer(&mut s, &upgrade_request("/mqtt", Some("mqtt"), "")).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    s
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A client frame (masked, as RFC 6455 requires of clients).
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_header(fin, opcode, payload.len() as u64)
        .into_iter()
        .chain(masked(payload))
        .collect()
}

/// A client frame's header (with its mask) declaring `len` payload bytes.
pub fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn masked(payload: &[u8]) -> impl Iterator<Item = u8> + '_ {
    payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m)
}

/// Reads one server frame (unmasked): its opcode and payload; `None` when
/// the socket closed.
pub async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.ok()?;
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7f {
            126 => u64::from(s.read_u16().await.ok()?),
            127 => s.read_u64().await.ok()?,
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).unwrap()];
        s.read_exact(&mut payload).await.ok()?;
        Some((head[0] & 0x0f, payload))
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a frame or the end in time")
}
