//! Owns the wire: a lean MQTT 3.1.1 / 5 client codec for load generation
//! (CONNECT, SUBSCRIBE and the rare packets through rumqttc's public
//! `mqttbytes` codecs; PUBLISH, PUBACK, PINGREQ and DISCONNECT written by hand
//! on the hot path), and opening TCP or TLS streams bound to a chosen source
//! address, which rumqttc's event loop cannot do.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::tokio_rustls::{client::TlsStream, TlsConnector};
use rumqttc::v5::mqttbytes::{self as m5, v5};
use rustls::pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

/// Largest packet accepted from a broker.
pub const MAX_PACKET: usize = 1 << 20;

/// MQTT protocol version spoken on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// A codec failure or an unexpected packet.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("MQTT 3.1.1 codec: {0}")]
    V4(#[from] m4::Error),
    #[error("MQTT 5 codec: {0}")]
    V5(#[from] m5::Error),
    #[error("topic longer than 65,535 bytes")]
    TopicTooLong,
}

/// A packet received from the broker, reduced to what a load generator needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// CONNACK: whether the connection was accepted, and the code's name.
    ConnAck { accepted: bool, code: String },
    /// SUBACK: packet id and, per filter in order, whether it was granted.
    SubAck { pkid: u16, granted: Vec<bool> },
    /// PUBLISH: topic, payload, the `user_id` user property (MQTT 5) and the
    /// packet id when QoS > 0.
    Publish {
        topic: Bytes,
        payload: Bytes,
        user_id: Option<String>,
        pkid: Option<u16>,
    },
    /// PUBACK for one of our QoS 1 publishes.
    PubAck,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT from the broker, with its reason.
    Disconnect { reason: String },
    /// Anything else (ignored).
    Other,
}

/// Decodes one packet from the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn decode(version: MqttVersion, buf: &mut BytesMut) -> Result<Option<Incoming>, CodecError> {
    match version {
        MqttVersion::V4 => match v4::Packet::read(buf, MAX_PACKET) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(m4::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        },
        MqttVersion::V5 => match v5::Packet::read(buf, Some(MAX_PACKET as u32)) {
            Ok(p) => Ok(Some(from_v5(p))),
            Err(m5::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        },
    }
}

fn from_v4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(a) => Incoming::ConnAck {
            accepted: a.code == v4::ConnectReturnCode::Success,
            code: format!("{:?}", a.code),
        },
        v4::Packet::SubAck(s) => Incoming::SubAck {
            pkid: s.pkid,
            granted: s
                .return_codes
                .iter()
                .map(|c| matches!(c, v4::SubscribeReasonCode::Success(_)))
                .collect(),
        },
        v4::Packet::Publish(p) => Incoming::Publish {
            pkid: (p.qos != m4::QoS::AtMostOnce).then_some(p.pkid),
            topic: Bytes::from(p.topic.into_bytes()),
            payload: p.payload,
            user_id: None,
        },
        v4::Packet::PubAck(_) => Incoming::PubAck,
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect {
            reason: "disconnect".into(),
        },
        _ => Incoming::Other,
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnAck(a) => Incoming::ConnAck {
            accepted: a.code == v5::ConnectReturnCode::Success,
            code: format!("{:?}", a.code),
        },
        v5::Packet::SubAck(s) => Incoming::SubAck {
            pkid: s.pkid,
            granted: s
                .return_codes
                .iter()
                .map(|c| matches!(c, v5::SubscribeReasonCode::Success(_)))
                .collect(),
        },
        v5::Packet::Publish(p) => {
            let user_id = p.properties.and_then(|props| {
                props
                    .user_properties
                    .into_iter()
                    .find(|(k, _)| k == protocol::topics::USER_ID_PROPERTY)
                    .map(|(_, v)| v)
            });
            Incoming::Publish {
                pkid: (p.qos != m5::QoS::AtMostOnce).then_some(p.pkid),
                topic: p.topic,
                payload: p.payload,
                user_id,
            }
        }
        v5::Packet::PubAck(_) => Incoming::PubAck,
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            reason: format!("{:?}", d.reason_code),
        },
        _ => Incoming::Other,
    }
}

/// Login and session parameters of a CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectParams<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub keep_alive: u16,
    pub clean: bool,
}

/// Appends a CONNECT to `buf`.
pub fn encode_connect(
    version: MqttVersion,
    p: &ConnectParams<'_>,
    buf: &mut BytesMut,
) -> Result<(), CodecError> {
    match version {
        MqttVersion::V4 => {
            let mut c = v4::Connect::new(p.client_id);
            c.keep_alive = p.keep_alive;
            c.clean_session = p.clean;
            if let Some(u) = p.username {
                c.set_login(u, p.password.unwrap_or_default());
            }
            v4::Packet::Connect(c).write(buf, MAX_PACKET)?;
        }
        MqttVersion::V5 => {
            let c = v5::Connect {
                keep_alive: p.keep_alive,
                client_id: p.client_id.to_owned(),
                clean_start: p.clean,
                properties: None,
            };
            let login = p
                .username
                .map(|u| v5::Login::new(u, p.password.unwrap_or_default()));
            v5::Packet::Connect(c, None, login).write(buf, None)?;
        }
    }
    Ok(())
}

/// Appends a SUBSCRIBE of `filters` at `qos` to `buf`.
pub fn encode_subscribe(
    version: MqttVersion,
    pkid: u16,
    filters: &[String],
    qos: u8,
    buf: &mut BytesMut,
) -> Result<(), CodecError> {
    match version {
        MqttVersion::V4 => {
            let q = if qos == 0 {
                m4::QoS::AtMostOnce
            } else {
                m4::QoS::AtLeastOnce
            };
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), q)),
            );
            s.pkid = pkid;
            v4::Packet::Subscribe(s).write(buf, MAX_PACKET)?;
        }
        MqttVersion::V5 => {
            let q = if qos == 0 {
                m5::QoS::AtMostOnce
            } else {
                m5::QoS::AtLeastOnce
            };
            let mut s = v5::Subscribe::new_many(
                filters.iter().map(|f| v5::Filter::new(f.clone(), q)),
                None,
            );
            s.pkid = pkid;
            v5::Packet::Subscribe(s).write(buf, None)?;
        }
    }
    Ok(())
}

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends a PUBLISH (QoS 0, or QoS 1 with `pkid`) to `buf`.
pub fn encode_publish(
    version: MqttVersion,
    topic: &[u8],
    payload: &[u8],
    qos1_pkid: Option<u16>,
    buf: &mut BytesMut,
) -> Result<(), CodecError> {
    if topic.len() > u16::MAX as usize {
        return Err(CodecError::TopicTooLong);
    }
    let props = usize::from(version == MqttVersion::V5);
    let pkid_len = if qos1_pkid.is_some() { 2 } else { 0 };
    let remaining = 2 + topic.len() + pkid_len + props + payload.len();
    buf.reserve(remaining + 5);
    buf.put_u8(if qos1_pkid.is_some() { 0x32 } else { 0x30 });
    put_remaining_length(buf, remaining);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    if let Some(pkid) = qos1_pkid {
        buf.put_u16(pkid);
    }
    if props == 1 {
        buf.put_u8(0);
    }
    buf.put_slice(payload);
    Ok(())
}

/// Appends a PUBACK (success) to `buf`.
pub fn encode_puback(pkid: u16, buf: &mut BytesMut) {
    buf.put_slice(&[0x40, 2]);
    buf.put_u16(pkid);
}

/// Appends a PINGREQ to `buf`.
pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0]);
}

/// Appends a DISCONNECT (normal) to `buf`.
pub fn encode_disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0]);
}

/// A byte stream to a broker, over TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Where and how to reach a broker.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// TLS client configuration and the server name to verify; `None` is plain TCP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// MQTT over WebSocket on `/mqtt` (over the TLS above, if any).
    pub ws: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("tls", &self.tls.as_ref().map(|(_, n)| n))
            .field("ws", &self.ws)
            .finish()
    }
}

impl Endpoint {
    /// A plain TCP endpoint.
    pub fn tcp(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            tls: None,
            ws: false,
        }
    }

    /// A TLS endpoint trusting the CA certificates in `ca_file`, verifying `server_name`.
    pub fn tls(
        addr: SocketAddr,
        ca_file: &std::path::Path,
        server_name: &str,
    ) -> Result<Self, crate::LoadError> {
        let config = sdk::tls::client_config_trusting(ca_file)?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| crate::LoadError::Config(format!("server name {server_name}: {e}")))?;
        Ok(Endpoint {
            addr,
            tls: Some((config, name)),
            ws: false,
        })
    }
}

/// Opens a TCP connection to `addr` from `source` (port chosen by the kernel),
/// with `TCP_NODELAY` on.
pub async fn open_tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        // Lets a source port whose previous connection sits in TIME_WAIT be reused.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connected stream: plain TCP, TLS over TCP, or a WebSocket over either.
pub enum Connection {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<crate::ws::WsBytes<Box<dyn Stream>>>),
}

/// Opens the endpoint's transport (TCP, then the TLS handshake if
/// configured, then the WebSocket upgrade if configured).
pub async fn open(ep: &Endpoint, source: Option<IpAddr>) -> std::io::Result<Connection> {
    open_at(ep, ep.addr, source).await
}

/// As [`open`], to `addr` instead of the endpoint's own address (one of
/// several broker nodes sharing the endpoint's TLS and WebSocket settings).
pub async fn open_at(
    ep: &Endpoint,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<Connection> {
    let tcp = open_tcp(addr, source).await?;
    let connection = match &ep.tls {
        None => Connection::Tcp(tcp),
        Some((config, name)) => {
            let tls = TlsConnector::from(config.clone())
                .connect(name.clone(), tcp)
                .await?;
            Connection::Tls(Box::new(tls))
        }
    };
    if !ep.ws {
        return Ok(connection);
    }
    let stream: Box<dyn Stream> = match connection {
        Connection::Tcp(s) => Box::new(s),
        Connection::Tls(s) => s,
        Connection::Ws(s) => return Ok(Connection::Ws(s)),
    };
    let ws = crate::ws::upgrade(stream, &addr.to_string()).await?;
    Ok(Connection::Ws(Box::new(ws)))
}

/// Why a connection could not be set up (CONNECT/CONNACK, SUBSCRIBE/SUBACK).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("connection refused by broker: {0}")]
    Refused(String),
    #[error("broker closed the connection")]
    Closed,
    #[error("broker disconnected: {0}")]
    Disconnected(String),
}

/// Reads until one whole packet is decoded.
pub async fn read_packet<S: Stream>(
    s: &mut S,
    rbuf: &mut BytesMut,
    version: MqttVersion,
) -> Result<Incoming, SetupError> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(p) = decode(version, rbuf)? {
            return Ok(p);
        }
        rbuf.reserve(1024);
        if s.read_buf(rbuf).await? == 0 {
            return Err(SetupError::Closed);
        }
    }
}

/// Sends CONNECT, waits for an accepting CONNACK, then (if `filters` is not
/// empty) sends one SUBSCRIBE with packet id 1 and waits for its SUBACK.
/// Returns, per filter in order, whether it was granted. Publishes that
/// arrive before the SUBACK are dropped.
pub async fn setup<S: Stream>(
    s: &mut S,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    version: MqttVersion,
    params: &ConnectParams<'_>,
    filters: &[String],
    qos: u8,
) -> Result<Vec<bool>, SetupError> {
    use tokio::io::AsyncWriteExt;
    wbuf.clear();
    encode_connect(version, params, wbuf)?;
    s.write_all(wbuf).await?;
    wbuf.clear();
    loop {
        match read_packet(s, rbuf, version).await? {
            Incoming::ConnAck { accepted: true, .. } => break,
            Incoming::ConnAck { code, .. } => return Err(SetupError::Refused(code)),
            Incoming::Disconnect { reason } => return Err(SetupError::Disconnected(reason)),
            _ => {}
        }
    }
    if filters.is_empty() {
        return Ok(Vec::new());
    }
    encode_subscribe(version, 1, filters, qos, wbuf)?;
    s.write_all(wbuf).await?;
    wbuf.clear();
    loop {
        match read_packet(s, rbuf, version).await? {
            Incoming::SubAck { pkid: 1, granted } => return Ok(granted),
            Incoming::Publish { pkid: Some(p), .. } => {
                encode_puback(p, wbuf);
                s.write_all(wbuf).await?;
                wbuf.clear();
            }
            Incoming::Disconnect { reason } => return Err(SetupError::Disconnected(reason)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_through_rumqttc_decoders() {
        for version in [MqttVersion::V4, MqttVersion::V5] {
            let mut buf = BytesMut::new();
            let payload = vec![7u8; 300];
            encode_publish(version, b"u1_echo", &payload, None, &mut buf).unwrap();
            encode_publish(version, b"u1_echo", b"x", Some(9), &mut buf).unwrap();
            match decode(version, &mut buf).unwrap().unwrap() {
                Incoming::Publish {
                    topic,
                    payload: p,
                    pkid,
                    ..
                } => {
                    assert_eq!(&topic[..], b"u1_echo");
                    assert_eq!(&p[..], &payload[..]);
                    assert_eq!(pkid, None);
                }
                other => panic!("{other:?}"),
            }
            match decode(version, &mut buf).unwrap().unwrap() {
                Incoming::Publish { pkid, payload, .. } => {
                    assert_eq!(pkid, Some(9));
                    assert_eq!(&payload[..], b"x");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(decode(version, &mut buf).unwrap(), None);
        }
    }

    #[test]
    fn partial_packet_waits_for_more() {
        let mut full = BytesMut::new();
        encode_publish(MqttVersion::V5, b"t", b"payload", None, &mut full).unwrap();
        let mut part = BytesMut::from(&full[..4]);
        assert_eq!(decode(MqttVersion::V5, &mut part).unwrap(), None);
        assert_eq!(part.len(), 4);
    }

    #[test]
    fn v5_user_id_property_is_read() {
        let props = v5::PublishProperties {
            user_properties: vec![("user_id".into(), "u42".into())],
            ..Default::default()
        };
        let p = v5::Publish::new("echo", m5::QoS::AtMostOnce, "hi", Some(props));
        let mut buf = BytesMut::new();
        v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        match decode(MqttVersion::V5, &mut buf).unwrap().unwrap() {
            Incoming::Publish { user_id, .. } => assert_eq!(user_id.as_deref(), Some("u42")),
            other => panic!("{other:?}"),
        }
    }
}
