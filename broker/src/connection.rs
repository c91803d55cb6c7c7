//! Owns one client connection after the socket (and TLS) is up: the CONNECT
//! deadline and decision, then the session loop that relays packets between
//! the socket and the router through the ACL and identity stamping, keep-alive
//! and token-expiry enforcement, wills on abnormal ends, takeover and shutdown.

use crate::acl::{self, Denial};
use crate::answers::{self, ConnectRefusal, ServerDisconnect};
use crate::auth::{Principal, Refusal};
use crate::codec::{sniff_version, Codec, CodecError, Version};
use crate::gate::Gate;
use crate::identity;
use crate::inbound::{Allowed, Arrival, InboundFlows, Refused, Release};
use crate::property_caps;
use crate::reply_index::{ReplyInbox, Served};
use crate::router::{RouterError, RouterRx, RouterTx};
use crate::sessions::{device_session_id, handler_session_id, EndRequest, SessionClaim};
use crate::subscriptions::Subscriptions;
use crate::translate;
use crate::validate;
use crate::wills::{self, ReadyWill};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use mqtt_router::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter,
    LastWill, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
    Publish, PublishProperties, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tracing::{debug, error, info, warn, Instrument};

/// Where a refused QoS 1 publish goes so that the router acknowledges it in
/// order: a `$` topic no client may subscribe to, which the router drops.
const DENIED_SINK_TOPIC: &[u8] = b"$gate/denied";

/// Most MQTT packets of this product are small; buffers grow when one is not
/// (and are resident per connection, so they start small).
const INITIAL_BUFFER: usize = 512;
/// Largest write buffer kept between writes.
const KEPT_WRITE_BUFFER: usize = 1024;
/// Least free room in the read buffer before a read (see `relay`).
const MIN_READ_ROOM: usize = 256;

/// Serves one client until it leaves, is refused, or the broker shuts down.
///
/// Not an `async fn`: the stream (a TLS stream is kilobytes) is moved into
/// its shared halves before the future exists, so that the future, resident
/// for the connection's whole life, does not keep a copy of it.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    gate: Arc<Gate>,
    admits: Admits,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let span = tracing::info_span!(
        "conn",
        %peer,
        kind = tracing::field::Empty,
        uid = tracing::field::Empty,
        client_id = tracing::field::Empty
    );
    async move {
        let mut wire = Wire {
            reader,
            writer,
            read_buf: BytesMut::with_capacity(INITIAL_BUFFER),
            write_buf: BytesMut::new(),
            write_timeout: gate.limits().write_timeout,
            receiver: translate::Receiver::Device,
            client_max_packet: usize::MAX,
        };
        // Boxed: reading and deciding the CONNECT needs more state than the
        // session does, and it would otherwise stay in every connection's
        // resident future for its whole life. A panic here (a bug) ends this
        // connection only; no session exists yet to clean up after.
        let opened = AssertUnwindSafe(Box::pin(open_session(&gate, &mut wire, admits)))
            .catch_unwind()
            .await;
        let session = match opened {
            Ok(Some(session)) => session,
            Ok(None) => return,
            Err(panic) => {
                gate.metrics().session_panicked();
                error!(
                    panic = panic_text(&*panic),
                    "a connection panicked before its session began; closed"
                );
                return;
            }
        };
        // Boxed: then this future is the same few hundred bytes for every
        // transport, and the session's state is allocated once, at its size.
        Box::pin(session.run(wire)).await;
    }
    .instrument(span)
}

/// Who a listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admits {
    Everyone,
    /// The internal listener of the in-process handlers: devices are refused.
    HandlersOnly,
}

/// Reads the CONNECT (within the deadline) and decides it.
async fn open_session<S: AsyncRead + AsyncWrite>(
    gate: &Arc<Gate>,
    wire: &mut Wire<S>,
    admits: Admits,
) -> Option<Session> {
    let first = tokio::time::timeout(
        gate.limits().connect_timeout,
        wire.read_connect(gate.limits().max_packet_size),
    )
    .await;
    let (codec, packet) = match first {
        Ok(Ok(found)) => found,
        Ok(Err(ConnectReadError::Codec(CodecError::UnsupportedProtocol(level)))) => {
            info!(level, "refused: unsupported protocol level");
            gate.metrics().connect_refused("unsupported protocol");
            let codec = Codec::new(Version::V4, gate.limits().max_packet_size);
            let refusal =
                answers::connack_refusal(Version::V4, &ConnectRefusal::UnsupportedProtocol);
            let _ = wire.send_now(&codec, refusal).await;
            return None;
        }
        Ok(Err(ConnectReadError::Codec(e @ CodecError::ProtocolViolation(_)))) => {
            // Only the MQTT 5 decoder reports these (a property repeated).
            info!(error = %e, "refused: CONNECT breaks a rule of MQTT 5");
            let refusal = ConnectRefusal::ProtocolError("a property appears more than once");
            gate.metrics().connect_refused(refusal.reason());
            let codec = Codec::new(Version::V5, gate.limits().max_packet_size);
            let _ = wire
                .send_now(&codec, answers::connack_refusal(Version::V5, &refusal))
                .await;
            return None;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "closed before CONNECT");
            gate.metrics().socket_dropped("not_mqtt");
            return None;
        }
        Err(_) => {
            info!("no CONNECT before the deadline");
            gate.metrics().socket_dropped("connect_timeout");
            return None;
        }
    };
    accept(gate, wire, codec, packet, admits).await
}

#[derive(Debug, thiserror::Error)]
enum ConnectReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("peer closed the connection")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The text of a caught panic, for the log.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&'static str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// The socket halves and their buffers.
struct Wire<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// How long one write may take (`Limits::write_timeout`).
    write_timeout: Duration,
    /// Who reads what is written (known once CONNECT is decided).
    receiver: translate::Receiver,
    /// The largest packet the client accepts (MQTT 5 CONNECT Maximum Packet
    /// Size; unlimited otherwise): larger ones are not sent (3.1.2.11.4).
    client_max_packet: usize,
}

impl<S: AsyncRead + AsyncWrite> Wire<S> {
    async fn read_connect(&mut self, max_size: usize) -> Result<(Codec, Packet), ConnectReadError> {
        loop {
            if let Some(version) = sniff_version(&self.read_buf)? {
                let codec = Codec::new(version, max_size);
                if let Some(packet) = codec.decode(&mut self.read_buf)? {
                    return Ok((codec, packet));
                }
            }
            if self.reader.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ConnectReadError::Closed);
            }
        }
    }

    /// Encodes into the write buffer, in the form the client's protocol
    /// version can carry (`translate`); a packet the codec cannot encode is
    /// logged and skipped (it came from the router, not from this client).
    ///
    /// Returns whether it was queued: a packet larger than the client's
    /// Maximum Packet Size is not (the caller settles what it owed).
    fn queue(&mut self, codec: &Codec, packet: Packet) {
        self.queue_checked(codec, packet);
    }

    /// `queue`, saying whether the packet was queued.
    fn queue_checked(&mut self, codec: &Codec, packet: Packet) -> bool {
        let Some(packet) = translate::for_client(codec.version, self.receiver, packet) else {
            return false;
        };
        let before = self.write_buf.len();
        if let Err(e) = codec.encode(packet, &mut self.write_buf) {
            warn!(error = %e, "could not encode an outgoing packet");
            return false;
        }
        if self.write_buf.len() - before > self.client_max_packet {
            self.write_buf.truncate(before);
            info!(
                client_max_packet = self.client_max_packet,
                "a packet larger than the client's Maximum Packet Size is not sent"
            );
            return false;
        }
        true
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        self.writer.write_all(&self.write_buf).await?;
        self.writer.flush().await?;
        // A small buffer is kept (allocating it again for every reply cost
        // more than its memory); a burst must not leave a large one behind.
        if self.write_buf.capacity() > KEPT_WRITE_BUFFER {
            self.write_buf = BytesMut::new();
        } else {
            self.write_buf.clear();
        }
        Ok(())
    }

    /// Writes `packet` now, within the write deadline.
    async fn send_now(&mut self, codec: &Codec, packet: Packet) -> std::io::Result<()> {
        self.queue(codec, packet);
        self.flush_within(self.write_timeout).await
    }

    /// Flushes, giving up after `limit` (the client is not reading).
    async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        match tokio::time::timeout(limit, self.flush()).await {
            Ok(written) => written,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

/// Decides a CONNECT: authentication, client id, will, router session.
/// Answers refusals itself and returns `None` for them.
async fn accept<S: AsyncRead + AsyncWrite>(
    gate: &Arc<Gate>,
    wire: &mut Wire<S>,
    codec: Codec,
    packet: Packet,
    admits: Admits,
) -> Option<Session> {
    let Packet::Connect(connect, properties, will, will_properties, login) = packet else {
        gate.metrics().socket_dropped("not_mqtt");
        return None;
    };
    let refuse = |refusal: ConnectRefusal| {
        info!(reason = refusal.reason(), "connect refused");
        gate.metrics().connect_refused(refusal.reason());
        answers::connack_refusal(codec.version, &refusal)
    };
    // First: a CONNECT MQTT 5 forbids costs no token verification.
    if let Err(refusal) = validate::connect_properties(properties.as_ref()) {
        let _ = wire.send_now(&codec, refuse(refusal)).await;
        return None;
    }
    if let Err(refusal) = crate::sessions::check_client_id(&connect.client_id, gate.limits()) {
        let _ = wire.send_now(&codec, refuse(refusal)).await;
        return None;
    }
    let principal = match gate
        .authenticate(
            login.as_ref().map(|l| l.username.as_str()),
            login.as_ref().map(|l| l.password.as_bytes()),
        )
        .await
    {
        Ok(principal) => principal,
        Err(refusal) => {
            let _ = wire
                .send_now(&codec, refuse(ConnectRefusal::Auth(refusal)))
                .await;
            return None;
        }
    };
    let span = tracing::Span::current();
    span.record("kind", principal.kind());
    if matches!(principal, Principal::Handler(_)) {
        wire.receiver = translate::Receiver::Handler;
    }
    if let Some(max) = properties.as_ref().and_then(|p| p.max_packet_size) {
        wire.client_max_packet = usize::try_from(max).unwrap_or(usize::MAX);
    }
    if let Principal::Device(device) = &principal {
        span.record("uid", device.uid().as_str());
        if admits == Admits::HandlersOnly {
            let refusal = ConnectRefusal::Auth(Refusal::NotAuthorized(
                "devices connect on the public listeners",
            ));
            let _ = wire.send_now(&codec, refuse(refusal)).await;
            return None;
        }
        if gate.is_revoked(device).await {
            let refusal = ConnectRefusal::Auth(Refusal::NotAuthorized("user revoked"));
            let _ = wire.send_now(&codec, refuse(refusal)).await;
            return None;
        }
    }

    let assigned_client_id = if connect.client_id.is_empty() {
        if !connect.clean_session {
            let refusal =
                ConnectRefusal::ClientIdNotValid("an empty client id needs a clean session");
            let _ = wire.send_now(&codec, refuse(refusal)).await;
            return None;
        }
        Some(format!("auto-{:016x}", rand::thread_rng().gen::<u64>()))
    } else {
        None
    };
    let client_id = assigned_client_id.clone().unwrap_or(connect.client_id);
    span.record("client_id", client_id.as_str());

    if let Some(will) = &will {
        let allowed = std::str::from_utf8(&will.topic)
            .map_err(|_| Denial::Invalid)
            .and_then(|topic| {
                acl::may_publish(&principal, topic, gate.commands(), &gate.limits().topics)
            });
        if allowed.is_err() {
            let _ = wire
                .send_now(&codec, refuse(ConnectRefusal::WillNotAllowed))
                .await;
            return None;
        }
    }

    if will.is_some() {
        let caps = &gate.limits().device_properties;
        if let Err(refusal) = property_caps::allow_will(&principal, caps, will_properties.as_ref())
        {
            let _ = wire.send_now(&codec, refuse(refusal)).await;
            return None;
        }
    }

    // A keep-alive of 0 (none) or beyond the maximum gets the maximum.
    let max_keep_alive = gate.limits().max_keep_alive_secs;
    let granted_keep_alive = match connect.keep_alive {
        0 => max_keep_alive,
        asked => asked.min(max_keep_alive),
    };

    // Before any router state exists: nothing after the router link is
    // opened may fail on the client's input.
    let token_deadline = match &principal {
        // Checked arithmetic, clamped: an enormous `exp` is "never", not a panic.
        Principal::Device(device) => device.session_deadline(gate.leeway_secs()),
        Principal::Handler(_) => None,
    };
    let session_id = match &principal {
        Principal::Device(device) => device_session_id(device.uid(), &client_id),
        Principal::Handler(_) => handler_session_id(&client_id),
    };
    let device = match &principal {
        Principal::Device(device) => Some(device),
        Principal::Handler(_) => None,
    };
    // MQTT 5 separates starting afresh (Clean Start) from outliving the
    // connection (Session Expiry Interval > 0); 3.1.1's Clean Session flag
    // means both. `clean_session` is the gate's sense: nothing of the
    // session outlives the connection. A Clean Start with an expiry starts
    // a new persistent session: whatever was stored goes first.
    let asked_expiry = properties.as_ref().and_then(|p| p.session_expiry_interval);
    let clean_session = match codec.version {
        Version::V4 => connect.clean_session,
        Version::V5 => connect.clean_session && asked_expiry.unwrap_or(0) == 0,
    };
    let discard_stored = connect.clean_session && !clean_session;
    let admitted = gate
        .sessions()
        .admit(&session_id, &principal, clean_session, gate.limits());
    if let Err(refusal) = admitted {
        let _ = wire.send_now(&codec, refuse(refusal)).await;
        return None;
    }
    let claim = gate.sessions().claim(session_id.clone(), device).await;
    if discard_stored {
        // The persistent session is opened after the stored one is gone.
        if let Err(e) = forget_router_session(gate, session_id.clone()).await {
            warn!(error = %e, "could not discard a stored session");
        }
    }
    let link = match gate
        .open_router_session(
            session_id,
            clean_session,
            properties
                .as_ref()
                .and_then(|p| p.receive_maximum)
                .unwrap_or(u16::MAX),
        )
        .await
    {
        Ok(link) => link,
        Err(e) => {
            warn!(error = %e, "router refused the session");
            let refusal = ConnectRefusal::Busy("the broker cannot take more sessions now");
            let _ = wire.send_now(&codec, refuse(refusal)).await;
            return None;
        }
    };

    // A new connection to this session: a will still waiting for its delay
    // is cancelled (the session is resumed) or, if it starts clean (the old
    // session ends), published now (MQTT 5 §3.1.3.2.2, MQTT-3.1.3-9).
    gate.wills()
        .session_reconnected(claim.id(), connect.clean_session);

    let connack_properties = match codec.version {
        Version::V4 => None,
        Version::V5 => Some(ConnAckProperties {
            assigned_client_identifier: assigned_client_id,
            server_keep_alive: (granted_keep_alive != connect.keep_alive)
                .then_some(granted_keep_alive),
            max_packet_size: u32::try_from(gate.limits().max_packet_size).ok(),
            receive_max: Some(gate.limits().receive_maximum),
            retain_available: Some(1),
            shared_subscription_available: Some(1),
            wildcard_subscription_available: Some(u8::from(matches!(
                principal,
                Principal::Handler(_)
            ))),
            // Delivered with each matching publish (absent = available).
            subscription_identifiers_available: None,
            ..Default::default()
        }),
    };
    let connack = Packet::ConnAck(
        ConnAck {
            session_present: link.session_present,
            code: ConnectReturnCode::Success,
        },
        connack_properties,
    );
    if wire.send_now(&codec, connack).await.is_err() {
        // Client gone before hearing yes: end the router session cleanly.
        let mut tx = link.tx;
        let _ = tx.send(normal_disconnect()).await;
        return None;
    }
    gate.metrics().connection_opened(principal.kind());
    info!(session_present = link.session_present, "connected");

    // Only a clean session's QoS 0 subscriptions can be served by the gate
    // (see `reply_index`): nothing of them outlives the connection.
    let inbox = (matches!(principal, Principal::Device(_)) && clean_session)
        .then(|| Arc::new(ReplyInbox::default()));
    let subs = gate.sessions().resume_subscriptions(
        claim.id(),
        connect.clean_session,
        Subscriptions::new(match principal {
            Principal::Device(_) => gate.limits().device_max_subscriptions,
            Principal::Handler(_) => gate.limits().handler_max_subscriptions,
        }),
        (gate.replies(), gate.commands()),
    );
    // A router that kept no session (Session Present 0) holds none of them.
    let held_qos2 = gate
        .sessions()
        .resume_qos2(claim.id(), connect.clean_session || !link.session_present);
    Some(Session {
        gate: gate.clone(),
        codec,
        principal,
        client_id,
        clean_session,
        session_expiry: session_expiry(
            codec.version,
            asked_expiry,
            gate.limits().max_session_expiry,
        ),
        connect_expiry_zero: codec.version == Version::V5 && asked_expiry.unwrap_or(0) == 0,
        keep_alive: Duration::from_secs(u64::from(granted_keep_alive)),
        token_deadline,
        // Out of the CONNECT's read buffer, which it would keep alive.
        will: will.map(wills::owned_will),
        will_delay_secs: will_properties.as_ref().and_then(|p| p.delay_interval),
        will_properties: wills::publish_properties(will_properties.as_ref()).map(Box::new),
        link_tx: link.tx,
        link_rx: link.rx,
        claim,
        pending_subacks: HashMap::new(),
        subs,
        outbox: Vec::new(),
        inbox,
        // The Receive Maximum is the session's: what its earlier
        // connections left unreleased still counts.
        inbound: InboundFlows::resumed(codec.version, gate.limits().receive_maximum, held_qos2),
        undeliverable_qos2: HashSet::new(),
        write_stalled: false,
        finished: false,
    })
}

/// How long a persistent session outlives its connection: MQTT 5 says so in
/// CONNECT (absent = 0, ended with the connection); MQTT 3.1.1 sessions have
/// no expiry of their own. Either way at most the configured maximum.
fn session_expiry(version: Version, asked_secs: Option<u32>, max: Duration) -> Duration {
    match version {
        Version::V4 => max,
        Version::V5 => Duration::from_secs(u64::from(asked_secs.unwrap_or(0))).min(max),
    }
}

/// Ends the persistent session connection `serial` left behind once `after` has passed,
/// unless its client came back.
fn expire_session_later(gate: Arc<Gate>, id: String, serial: u64, after: Duration) {
    tokio::spawn(async move {
        tokio::select! {
            _ = gate.shutting_down() => return,
            _ = tokio::time::sleep(after) => {}
        }
        let Some(expiring) = gate.sessions().claim_to_expire(&id, serial) else {
            return;
        };
        gate.sessions()
            .release_subscriptions(&id, (gate.replies(), gate.commands()));
        match forget_router_session(&gate, id).await {
            Ok(()) => debug!(session = expiring.id(), "persistent session expired"),
            Err(e) => warn!(error = %e, "could not expire a persistent session"),
        }
    });
}

/// Test-only (feature `fault-injection`): a handler's publish to
/// `$fault/panic` panics, as a bug in the session would.
#[cfg(feature = "fault-injection")]
#[allow(clippy::panic)]
fn inject_fault(principal: &Principal, verdict: Result<&str, Denial>) {
    if matches!(principal, Principal::Handler(_)) && verdict == Ok("$fault/panic") {
        panic!("fault injected: $fault/panic");
    }
}

/// The server's reason for ending a session on request.
fn server_end(why: EndRequest) -> ServerDisconnect {
    match why {
        EndRequest::TakenOver => ServerDisconnect::TakenOver,
        EndRequest::Revoked => ServerDisconnect::Revoked,
        EndRequest::ShuttingDown => ServerDisconnect::ShuttingDown,
    }
}

/// Makes the router forget the session stored under `id`: it does so when a
/// clean session with that id connects and leaves.
async fn forget_router_session(gate: &Gate, id: String) -> Result<(), RouterError> {
    let link = gate.open_router_session(id, true, u16::MAX).await?;
    let mut tx = link.tx;
    let _ = tx.send(normal_disconnect()).await;
    Ok(())
}

fn normal_disconnect() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// What the session does after one packet from the router.
enum RouterStep {
    Continue,
    /// The router paused the link after a burst and waits to be asked again.
    Wake,
    End(End),
}

/// A SUBACK waiting for the router's answer to the allowed filters.
struct PendingSubAck {
    /// One code per filter in the client's order; `None` = the router's.
    codes: Vec<Option<SubscribeReasonCode>>,
    /// Filters sent to the router (handlers declare them as command topics).
    forwarded: Vec<String>,
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `with_will` for MQTT 5 reason 0x04.
    ClientDisconnect { with_will: bool },
    /// The socket closed or failed without DISCONNECT.
    Abnormal(&'static str),
    /// The server ends the session.
    Server(ServerDisconnect),
}

/// A connected, authenticated client.
struct Session {
    gate: Arc<Gate>,
    codec: Codec,
    principal: Principal,
    client_id: String,
    clean_session: bool,
    keep_alive: Duration,
    token_deadline: Option<Instant>,
    will: Option<LastWill>,
    /// The will's MQTT 5 Will Delay Interval, in seconds.
    will_delay_secs: Option<u32>,
    /// The will's MQTT 5 properties, sent with it (boxed: most have none).
    will_properties: Option<Box<PublishProperties>>,
    link_tx: RouterTx,
    link_rx: RouterRx,
    claim: SessionClaim,
    /// How long a persistent session outlives this connection.
    session_expiry: Duration,
    /// MQTT 5 CONNECT had a Session Expiry Interval of 0 (or none): its
    /// DISCONNECT may not set one (`validate`).
    connect_expiry_zero: bool,
    pending_subacks: HashMap<u16, PendingSubAck>,
    /// Its filters, the path serving each, its declared command topics.
    subs: Subscriptions,
    /// Packets decoded from the current read, bound for the router.
    outbox: Vec<Packet>,
    /// Replies the gate delivers itself (clean device sessions only).
    inbox: Option<Arc<ReplyInbox>>,
    /// The client's QoS 1/2 publishes in flight (`inbound`).
    inbound: InboundFlows,
    /// QoS 2 forwards too large for the client, settled with the router:
    /// their PUBREL is answered by the gate (bounded by the router's
    /// in-flight window).
    undeliverable_qos2: HashSet<u16>,
    /// A write did not finish: nothing more is written to this client.
    write_stalled: bool,
    /// `finish` ran: the router link was closed (or handed over).
    finished: bool,
}

impl Drop for Session {
    /// The index lets go of this session however it ended (even a task
    /// cancelled at shutdown).
    fn drop(&mut self) {
        // Ended without `finish`: a panic outside the relay loop (the loop's
        // own are caught in `run`) or the task dropped at shutdown. The
        // router must not keep a session for a client nobody serves: queue
        // its DISCONNECT (the send's first attempt does not wait).
        if !self.finished {
            if std::thread::panicking() {
                self.gate.metrics().session_panicked();
                error!("a session panicked while ending; its router link is closed");
            }
            if self.claim.end.requested() != Some(EndRequest::TakenOver) {
                drop(self.link_tx.send(normal_disconnect()));
            }
        }
        if let Some(inbox) = &self.inbox {
            for topic in self.subs.direct() {
                self.gate.replies().unsubscribe(topic, inbox);
            }
        }
        // A persistent session keeps its subscriptions in the router.
        if self.clean_session {
            for filter in self.subs.via_router() {
                match self.principal {
                    Principal::Handler(_) => self.gate.replies().handler_unsubscribed(filter),
                    Principal::Device(_) => self.gate.replies().device_left_router(filter),
                }
            }
        }
    }
}

impl Session {
    async fn run<S: AsyncRead + AsyncWrite>(mut self, mut wire: Wire<S>) {
        // A panic in the loop (a bug: no input should reach one) ends this
        // session like any other server-side end: the client is told, the
        // will fires, the router link is closed, and it is counted.
        let end = match AssertUnwindSafe(self.relay(&mut wire)).catch_unwind().await {
            Ok(end) => end,
            Err(panic) => {
                self.gate.metrics().session_panicked();
                error!(
                    panic = panic_text(&*panic),
                    "a session panicked; ended, its will fired and its router link closed"
                );
                End::Server(ServerDisconnect::InternalError)
            }
        };
        // Boxed: the goodbye's state (will, DISCONNECT, timeouts) would
        // otherwise be part of every connection's resident future.
        Box::pin(self.finish(wire, end)).await;
    }

    /// Ends the session: tells the client and the router, fires the will,
    /// and leaves a persistent session to its expiry.
    async fn finish<S: AsyncRead + AsyncWrite>(mut self, mut wire: Wire<S>, end: End) {
        let kind = self.principal.kind();
        match end {
            End::ClientDisconnect { with_will } => {
                info!(with_will, "client disconnected");
                if with_will {
                    self.fire_will().await;
                }
                let _ = self.link_tx.send(normal_disconnect()).await;
            }
            End::Abnormal(why) => {
                info!(reason = why, "connection lost");
                self.fire_will().await;
                let _ = self.link_tx.send(normal_disconnect()).await;
            }
            End::Server(why) => {
                info!(reason = why.reason(), "server ends the session");
                self.gate.metrics().session_ended(why.reason());
                // A client that stopped reading would not get it anyway.
                if !self.write_stalled {
                    if let Some(packet) = answers::server_disconnect(self.codec.version, why) {
                        wire.queue(&self.codec, packet);
                        let _ = wire.flush_within(Duration::from_secs(2)).await;
                    }
                }
                // A revoked user's will is dropped: it would act for them.
                if why != ServerDisconnect::ShuttingDown && why != ServerDisconnect::Revoked {
                    self.fire_will().await;
                }
                // A replaced session must not touch the router again: its
                // successor now owns the client id there.
                if why != ServerDisconnect::TakenOver {
                    let _ = self.link_tx.send(normal_disconnect()).await;
                }
            }
        }
        if !self.write_stalled {
            let _ = tokio::time::timeout(Duration::from_secs(1), wire.writer.shutdown()).await;
        }
        // The socket closes when `wire` is dropped here, whatever it held.
        drop(wire);
        self.finished = true;
        if self.clean_session {
            for filter in self.subs.declared() {
                self.gate.commands().withdraw(filter);
            }
        }
        self.gate.metrics().connection_closed(kind);
        if !self.clean_session {
            // Its subscriptions stay in the router: the next connection
            // takes them back, the expiry releases them.
            let counts = (self.gate.replies(), self.gate.commands());
            let subs = self.subs.take();
            self.gate
                .sessions()
                .keep_subscriptions(self.claim.id(), subs, counts);
            // And its unreleased QoS 2 publishes: the router keeps them too.
            let held = self.inbound.take_held();
            self.gate.sessions().keep_qos2(self.claim.id(), held);
        }
        // A persistent session stays in the router until its expiry (unless
        // a new connection took it over). The claim is released first so the
        // expiry finds the id free.
        if !self.clean_session && self.claim.end.requested() != Some(EndRequest::TakenOver) {
            self.gate.sessions().left_away(&self.claim);
            let (id, serial) = (self.claim.id().to_owned(), self.claim.serial());
            let (gate, after) = (self.gate.clone(), self.session_expiry);
            drop(self);
            expire_session_later(gate, id, serial, after);
        }
    }

    /// Relays until the session ends, and says why.
    async fn relay<S: AsyncRead + AsyncWrite>(&mut self, wire: &mut Wire<S>) -> End {
        // Signals and timers live across iterations: creating them per
        // packet would register and drop timers and waiters on every message.
        // One timer for both deadlines (a timer polled per turn costs, and
        // most turns are messages): the token's expiry, and MQTT's keep-alive
        // (the server may close after 1.5 periods of silence). It is moved
        // forward lazily, only when it fires.
        let never = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let token_deadline = self.token_deadline.unwrap_or(never);
        let silence_limit = self.keep_alive.mul_f32(1.5);
        let mut last_heard = Instant::now();
        let timer = tokio::time::sleep_until(token_deadline.min(last_heard + silence_limit));
        tokio::pin!(timer);
        // Packets the client sent right behind its CONNECT arrived with it
        // (MQTT lets a client send before the CONNACK).
        if !wire.read_buf.is_empty() {
            if let Some(end) = self.take_buffered(wire, token_deadline).await {
                return end;
            }
            if let Err(end) = self.write_out(wire, token_deadline).await {
                return end;
            }
        }
        loop {
            // Decoded packets keep slices of the read buffer, so its spare
            // room only shrinks; reading into a sliver would split packets
            // over several syscalls. Room for a few packets per read instead.
            if wire.read_buf.capacity() - wire.read_buf.len() < MIN_READ_ROOM {
                wire.read_buf.reserve(INITIAL_BUFFER);
            }
            tokio::select! {
                biased;
                why = std::future::poll_fn(|cx| self.claim.end.poll_requested(cx)) => {
                    return End::Server(server_end(why));
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= token_deadline {
                        return End::Server(ServerDisconnect::TokenExpired);
                    }
                    let silence_deadline = last_heard + silence_limit;
                    if now >= silence_deadline {
                        return End::Server(ServerDisconnect::KeepAliveTimeout);
                    }
                    timer.as_mut().reset(token_deadline.min(silence_deadline));
                    continue;
                }
                read = wire.reader.read_buf(&mut wire.read_buf) => {
                    match read {
                        Ok(0) => return End::Abnormal("peer closed the connection"),
                        Err(_) => return End::Abnormal("read failed"),
                        Ok(_) => last_heard = Instant::now(),
                    }
                    if let Some(end) = self.take_buffered(wire, token_deadline).await {
                        return end;
                    }
                }
                () = std::future::poll_fn(|cx| match &self.inbox {
                    Some(inbox) => inbox.poll_ready(cx),
                    None => Poll::Pending,
                }) => self.drain_inbox(wire),
                notification = std::future::poll_fn(|cx| self.link_rx.poll_next(cx)) => {
                    let step = self.drain_router(notification, wire);
                    // Acknowledgements the gate made for the client (forwards
                    // too large for it) go back to the router.
                    if let Err(end) = self.flush_outbox().await {
                        return end;
                    }
                    match step {
                        RouterStep::Continue => {}
                        // No notification is held across this await, and
                        // the wake's future is small (vendor patch 9).
                        RouterStep::Wake => {
                            if self.link_rx.wake().await.is_err() {
                                return End::Abnormal("router link closed");
                            }
                        }
                        RouterStep::End(end) => return end,
                    }
                }
            }
            if let Err(end) = self.write_out(wire, token_deadline).await {
                return end;
            }
        }
    }

    /// Handles every whole packet in the read buffer; `Some` ends the
    /// session. What came before a fatal packet is still delivered.
    async fn take_buffered<S: AsyncRead + AsyncWrite>(
        &mut self,
        wire: &mut Wire<S>,
        token_deadline: Instant,
    ) -> Option<End> {
        let mut ended = None;
        while ended.is_none() {
            match self.codec.decode(&mut wire.read_buf) {
                Ok(Some(packet)) => ended = self.on_client_packet(packet, wire),
                Ok(None) => break,
                Err(CodecError::TooLarge(limit)) => {
                    info!(limit, "packet too large");
                    ended = Some(End::Server(ServerDisconnect::PacketTooLarge));
                }
                Err(e @ CodecError::ProtocolViolation(_)) => {
                    info!(error = %e, "protocol error");
                    ended = Some(End::Server(ServerDisconnect::ProtocolError));
                }
                Err(e) => {
                    info!(error = %e, "malformed packet");
                    ended = Some(End::Server(ServerDisconnect::Malformed));
                }
            }
        }
        if let Err(end) = self.flush_outbox().await {
            return Some(end);
        }
        let end = ended?;
        // Acknowledgements already queued still go out.
        if let Err(end) = self.write_out(wire, token_deadline).await {
            return Some(end);
        }
        Some(end)
    }

    /// Writes what is queued. A client that does not take it within the
    /// write deadline is cut off, and while a write waits, an end request
    /// (takeover, revocation, shutdown) or the token's expiry still ends the
    /// session at once: a client that stops reading cannot pin it.
    async fn write_out<S: AsyncRead + AsyncWrite>(
        &mut self,
        wire: &mut Wire<S>,
        token_deadline: Instant,
    ) -> Result<(), End> {
        if wire.write_buf.is_empty() {
            return Ok(());
        }
        let write_timeout = wire.write_timeout;
        let flush = wire.flush();
        tokio::pin!(flush);
        // Almost every write completes at once: no timer for those.
        if let Poll::Ready(written) = futures::poll!(flush.as_mut()) {
            return written.map_err(|_| End::Abnormal("write failed"));
        }
        let why = tokio::select! {
            biased;
            written = &mut flush => {
                return written.map_err(|_| End::Abnormal("write failed"));
            }
            why = std::future::poll_fn(|cx| self.claim.end.poll_requested(cx)) => {
                server_end(why)
            }
            _ = tokio::time::sleep_until(token_deadline) => ServerDisconnect::TokenExpired,
            _ = tokio::time::sleep(write_timeout) => ServerDisconnect::WriteTimeout,
        };
        self.write_stalled = true;
        Err(End::Server(why))
    }

    /// Handles one packet from the client; `Some` ends the session.
    fn on_client_packet<S: AsyncRead + AsyncWrite>(
        &mut self,
        packet: Packet,
        wire: &mut Wire<S>,
    ) -> Option<End> {
        match packet {
            Packet::Publish(publish, properties) => self.client_publish(publish, properties, wire),
            Packet::Subscribe(_, Some(SubscribeProperties { id: Some(0), .. })) => {
                // MQTT 5 3.8.2.1.2: identifiers start at 1.
                info!("subscription identifier 0");
                Some(End::Server(ServerDisconnect::ProtocolError))
            }
            Packet::Subscribe(subscribe, properties) => {
                self.client_subscribe(subscribe, properties, wire);
                None
            }
            Packet::Unsubscribe(unsubscribe, properties) => {
                // The router answers only filters it knew (and not at all after
                // a session resumes), so the gate answers every UNSUBSCRIBE.
                let count = unsubscribe.filters.len();
                for filter in &unsubscribe.filters {
                    self.stop_serving(filter);
                }
                if matches!(self.principal, Principal::Handler(_)) {
                    for filter in &unsubscribe.filters {
                        if self.subs.undeclare(filter) {
                            self.gate.commands().withdraw(filter);
                        }
                        if self.subs.remove_via_router(filter) {
                            self.gate.replies().handler_unsubscribed(filter);
                        }
                    }
                }
                for filter in &unsubscribe.filters {
                    self.subs.release(filter);
                }
                let pkid = unsubscribe.pkid;
                self.outbox
                    .push(Packet::Unsubscribe(unsubscribe, properties));
                wire.queue(
                    &self.codec,
                    Packet::UnsubAck(
                        UnsubAck {
                            pkid,
                            reasons: vec![UnsubAckReason::Success; count],
                        },
                        None,
                    ),
                );
                None
            }
            Packet::PubRel(pubrel, properties) => {
                let pkid = pubrel.pkid;
                let reason = match self.inbound.release(pkid) {
                    Release::CompleteHere(reason) => reason,
                    Release::ToRouter => {
                        self.outbox.push(Packet::PubRel(pubrel, properties));
                        return None;
                    }
                };
                wire.queue(&self.codec, Packet::PubComp(PubComp { pkid, reason }, None));
                None
            }
            packet @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                self.outbox.push(packet);
                None
            }
            Packet::PingReq(_) => {
                wire.queue(&self.codec, Packet::PingResp(PingResp));
                None
            }
            Packet::Disconnect(disconnect, properties) => {
                // MQTT 5: DISCONNECT may shorten (or lengthen) the expiry.
                if let Some(secs) = properties.and_then(|p| p.session_expiry_interval) {
                    if validate::disconnect_expiry_is_protocol_error(self.connect_expiry_zero, secs)
                    {
                        // The expiry stays 0: the will goes out now, and
                        // nothing of the session outlives it.
                        info!(
                            secs,
                            "DISCONNECT sets a session expiry its CONNECT did not have"
                        );
                        return Some(End::Server(ServerDisconnect::ProtocolError));
                    }
                    self.session_expiry = session_expiry(
                        self.codec.version,
                        Some(secs),
                        self.gate.limits().max_session_expiry,
                    );
                }
                Some(End::ClientDisconnect {
                    with_will: disconnect.reason_code
                        == DisconnectReasonCode::DisconnectWithWillMessage,
                })
            }
            Packet::Connect(..) => {
                info!("second CONNECT on one connection");
                Some(End::Server(ServerDisconnect::ProtocolError))
            }
            other => {
                info!(packet = ?std::mem::discriminant(&other), "packet a client may not send");
                Some(End::Server(ServerDisconnect::ProtocolError))
            }
        }
    }

    /// Hands the packets decoded from one read to the router with a single
    /// wake-up (one router event per read, not per packet).
    async fn flush_outbox(&mut self) -> Result<(), End> {
        let Some(last) = self.outbox.pop() else {
            return Ok(());
        };
        self.link_tx.buffer().extend(self.outbox.drain(..));
        match self.link_tx.send(last).await {
            Ok(_) => Ok(()),
            Err(_) => Err(End::Abnormal("router link closed")),
        }
    }

    /// Decides one PUBLISH; `Some` ends the session (Receive Maximum).
    fn client_publish<S: AsyncRead + AsyncWrite>(
        &mut self,
        mut publish: Publish,
        properties: Option<mqtt_router::protocol::PublishProperties>,
        wire: &mut Wire<S>,
    ) -> Option<End> {
        if properties
            .as_ref()
            .is_some_and(|p| !p.subscription_identifiers.is_empty())
        {
            // MQTT 5 3.3.4-6: only a server sets them, per subscription.
            info!("subscription identifier on a client's publish");
            return Some(End::Server(ServerDisconnect::ProtocolError));
        }
        if properties.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
            // CONNACK advertises no Topic Alias Maximum (0): any alias is a
            // protocol error (MQTT 5 3.3.2.3.4), and an empty topic with an
            // alias never set must not be read as a topic.
            info!("topic alias from a client (none allowed)");
            return Some(End::Server(ServerDisconnect::ProtocolError));
        }
        let pkid = publish.pkid();
        match self.inbound.arrival(publish.qos(), pkid) {
            Arrival::New => {}
            Arrival::Retransmitted => {
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                wire.queue(&self.codec, Packet::PubRec(rec, None));
                return None;
            }
            Arrival::OverReceiveMaximum => {
                info!(
                    receive_maximum = self.gate.limits().receive_maximum,
                    "more unacknowledged QoS 1/2 publishes than the broker's Receive Maximum"
                );
                return Some(End::Server(ServerDisconnect::ReceiveMaximumExceeded));
            }
        }
        // A handle on the topic (not a copy) so that it can be read while
        // `publish` changes.
        let topic_bytes = publish.topic.clone();
        let verdict = std::str::from_utf8(&topic_bytes)
            .map_err(|_| Denial::Invalid)
            .and_then(|topic| {
                let limits = &self.gate.limits().topics;
                acl::may_publish(&self.principal, topic, self.gate.commands(), limits)
                    .map(|()| topic)
            })
            .and_then(|topic| {
                let caps = &self.gate.limits().device_properties;
                property_caps::allow_publish(&self.principal, caps, properties.as_ref())
                    .map(|()| topic)
            });
        #[cfg(feature = "fault-injection")]
        inject_fault(&self.principal, verdict);
        let topic = match verdict {
            Ok(topic) => topic,
            Err(denial) => {
                self.refuse_publish(&publish, denial, wire);
                return None;
            }
        };
        let properties = match &self.principal {
            Principal::Device(device) => {
                // Devices never set retained messages; their identity is stamped.
                publish.retain = false;
                Some(identity::stamp(properties, device, &self.client_id))
            }
            Principal::Handler(_) => properties,
        };
        self.gate.metrics().message_in();
        let routed = self.gate.replies().route(topic, &publish, &properties);
        routed.record(self.gate.metrics(), topic);
        match self
            .inbound
            .allowed(publish.qos(), pkid, routed.needs_router)
        {
            // Served by the gate alone (or wanted by nobody).
            Allowed::Done => {}
            Allowed::AckHere => {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                wire.queue(&self.codec, Packet::PubAck(ack, None));
            }
            Allowed::ToRouter => self.outbox.push(Packet::Publish(publish, properties)),
        }
        None
    }

    /// Counts replies dropped for slow subscribers, and says so in the log
    /// once each time a subscriber starts falling behind.
    /// Answers a refused publish on the client's channel for its QoS.
    fn refuse_publish<S: AsyncRead + AsyncWrite>(
        &mut self,
        publish: &Publish,
        denial: Denial,
        wire: &mut Wire<S>,
    ) {
        self.gate.metrics().denied("publish", denial.label());
        info!(topic = %String::from_utf8_lossy(&publish.topic), reason = denial.label(), "publish denied");
        let pkid = publish.pkid();
        match self.inbound.refused(publish.qos(), pkid, denial) {
            Refused::Silent => {}
            Refused::PubAckHere => wire.queue(
                &self.codec,
                answers::puback_denial(self.codec.version, pkid, denial),
            ),
            Refused::PubAckThroughRouter => {
                // An earlier PUBACK is due from the router: this one goes
                // through it too, so PUBACKs keep the order of the publishes
                // (MQTT 4.6). The router drops a publish to the sink topic
                // and its PUBACK is rewritten.
                let sink = Publish::with_qos(
                    Bytes::from_static(DENIED_SINK_TOPIC),
                    Bytes::new(),
                    false,
                    QoS::AtLeastOnce,
                    pkid,
                );
                self.outbox.push(Packet::Publish(sink, None));
            }
            Refused::PubRecHere => wire.queue(
                &self.codec,
                answers::pubrec_denial(self.codec.version, pkid, denial),
            ),
        }
    }

    fn client_subscribe<S: AsyncRead + AsyncWrite>(
        &mut self,
        mut subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
        wire: &mut Wire<S>,
    ) {
        let subscription_id = properties.as_ref().and_then(|p| p.id);
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::with_capacity(subscribe.filters.len());
        let mut over_quota = 0usize;
        for filter in subscribe.filters.drain(..) {
            let (commands, limits) = (self.gate.commands(), &self.gate.limits().topics);
            let verdict = acl::may_subscribe(&self.principal, &filter.path, commands, limits)
                .and_then(|()| self.subs.admit(&filter.path));
            match verdict {
                Ok(()) if self.serve_directly(&filter, subscription_id) => {
                    codes.push(Some(SubscribeReasonCode::QoS0));
                }
                Ok(()) => {
                    self.subscribing_in_router(&filter.path);
                    codes.push(None);
                    allowed.push(filter);
                }
                Err(denial) => {
                    self.gate.metrics().denied("subscribe", denial.label());
                    // One line per SUBSCRIBE for the quota, however many filters.
                    if denial == Denial::QuotaExceeded {
                        over_quota += 1;
                    } else {
                        info!(filter = %filter.path, reason = denial.label(), "subscription denied");
                    }
                    codes.push(Some(answers::suback_denial(self.codec.version, denial)));
                }
            }
        }
        if over_quota > 0 {
            info!(
                filters = over_quota,
                held = self.subs.held(),
                "subscriptions denied: quota exceeded"
            );
        }
        let pkid = subscribe.pkid;
        if allowed.is_empty() {
            let return_codes = codes.into_iter().flatten().collect();
            wire.queue(
                &self.codec,
                Packet::SubAck(SubAck { pkid, return_codes }, None),
            );
            return;
        }
        let forwarded = allowed.iter().map(|f| f.path.clone()).collect();
        self.pending_subacks
            .insert(pkid, PendingSubAck { codes, forwarded });
        subscribe.filters = allowed;
        // The router carries the subscription identifier on what it delivers.
        self.outbox.push(Packet::Subscribe(subscribe, properties));
    }

    /// Takes `filter` into the reply index if the gate can serve it (see
    /// `reply_index`): a QoS 0 subscription of a clean device session that
    /// this connection has not already made through the router.
    ///
    /// A subscription keeps its path for as long as it exists: moving it
    /// while messages are on their way would lose or repeat some (MQTT
    /// 3.8.4: a resubscription must not interrupt the flow). So a QoS 1/2
    /// resubscription of a topic the gate serves stays with the gate, at
    /// granted QoS 0 (a server may grant less than asked); unsubscribing
    /// first gets the higher QoS from the router. The exception: a topic
    /// that has held a retained message since, which a resubscription must
    /// send (Retain Handling 0) and only the router has; it moves there.
    fn serve_directly(&mut self, filter: &Filter, subscription_id: Option<usize>) -> bool {
        let Some(inbox) = self.inbox.clone() else {
            return false;
        };
        let served = Served {
            subscription_id,
            retain_as_published: filter.preserve_retain,
        };
        if self.subs.is_direct(&filter.path) {
            let resend_retained = filter.retain_forward_rule == RetainForwardRule::OnEverySubscribe
                && self.gate.replies().is_retained(&filter.path);
            if resend_retained {
                self.stop_serving(&filter.path);
                return false;
            }
            return self.gate.replies().subscribe(&filter.path, &inbox, served);
        }
        if filter.qos != QoS::AtMostOnce || self.subs.is_via_router(&filter.path) {
            return false;
        }
        if !self.gate.replies().subscribe(&filter.path, &inbox, served) {
            return false;
        }
        self.subs.add_direct(&filter.path);
        true
    }

    /// `filter` is about to be subscribed in the router: the reply index
    /// learns that the router serves it, before any publish can miss it.
    fn subscribing_in_router(&mut self, filter: &str) {
        if !self.subs.add_via_router(filter) {
            return;
        }
        match self.principal {
            Principal::Device(_) => self.gate.replies().device_subscribed_in_router(filter),
            Principal::Handler(_) => self.gate.replies().handler_subscribed(filter),
        }
    }

    /// The gate stops serving `topic` to this session, if it did.
    fn stop_serving(&mut self, topic: &str) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        if self.subs.remove_direct(topic) {
            self.gate.replies().unsubscribe(topic, inbox);
        }
    }

    /// Queues every reply the gate has for this session.
    fn drain_inbox<S: AsyncRead + AsyncWrite>(&self, wire: &mut Wire<S>) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        let codec = self.codec;
        let delivered = inbox.drain(|delivery| {
            wire.queue(
                &codec,
                Packet::Publish(delivery.publish, delivery.properties.map(|p| *p)),
            );
        });
        if delivered > 0 {
            self.gate.metrics().messages_out(delivered);
        }
    }

    /// Queues everything the router has ready, without waiting, for one
    /// write. Synchronous, so that no notification is part of the session's
    /// resident future.
    fn drain_router<S: AsyncRead + AsyncWrite>(
        &mut self,
        first: Result<Option<mqtt_router::Notification>, mqtt_router::local::LinkError>,
        wire: &mut Wire<S>,
    ) -> RouterStep {
        let Ok(mut pending) = first else {
            return RouterStep::End(End::Abnormal("router ended the session"));
        };
        loop {
            if let Some(notification) = pending {
                match self.on_router_packet(notification.into(), wire) {
                    RouterStep::Continue => {}
                    stop => return stop,
                }
            }
            match self.link_rx.try_next() {
                Ok(Some(next)) => pending = next,
                Ok(None) => return RouterStep::Continue,
                Err(_) => return RouterStep::End(End::Abnormal("router ended the session")),
            }
        }
    }

    /// Handles one packet the router has for this client, and says what next.
    fn on_router_packet<S: AsyncRead + AsyncWrite>(
        &mut self,
        packet: Option<Packet>,
        wire: &mut Wire<S>,
    ) -> RouterStep {
        match packet {
            // The router paused this link after a burst: ask for more.
            None => return RouterStep::Wake,
            Some(Packet::SubAck(suback, _)) => {
                let merged = self.merge_suback(suback);
                wire.queue(&self.codec, Packet::SubAck(merged, None));
            }
            // Answered by the gate itself (see `on_client_packet`).
            Some(Packet::UnsubAck(..)) => {}
            Some(Packet::Disconnect(..)) => {
                return RouterStep::End(End::Abnormal("router ended the session"))
            }
            Some(Packet::Publish(publish, properties)) => {
                // Replies the gate queued first are written first.
                self.drain_inbox(wire);
                let (qos, pkid) = (publish.qos(), publish.pkid());
                if wire.queue_checked(&self.codec, Packet::Publish(publish, properties)) {
                    self.gate.metrics().messages_out(1);
                } else {
                    // Too large for this client: not sent, and settled with
                    // the router as if delivered, so its flow goes on.
                    self.settle_undeliverable(qos, pkid);
                }
            }
            Some(Packet::PubRel(release, _)) if self.undeliverable_qos2.remove(&release.pkid) => {
                let comp = PubComp {
                    pkid: release.pkid,
                    reason: PubCompReason::Success,
                };
                self.outbox.push(Packet::PubComp(comp, None));
            }
            Some(Packet::PubAck(ack, properties)) => match self.inbound.router_puback(ack.pkid) {
                Some(denial) => wire.queue(
                    &self.codec,
                    answers::puback_denial(self.codec.version, ack.pkid, denial),
                ),
                None => wire.queue(&self.codec, Packet::PubAck(ack, properties)),
            },
            Some(packet) => wire.queue(&self.codec, packet),
        }
        RouterStep::Continue
    }

    /// Acknowledges to the router a forward the client was not sent.
    fn settle_undeliverable(&mut self, qos: QoS, pkid: u16) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                self.outbox.push(Packet::PubAck(ack, None));
            }
            QoS::ExactlyOnce => {
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                self.outbox.push(Packet::PubRec(rec, None));
                // Its PUBREL is answered here too (above).
                self.undeliverable_qos2.insert(pkid);
            }
        }
    }

    /// Puts the router's codes for the forwarded filters back among the
    /// gate's denials, in the order the client sent them.
    fn merge_suback(&mut self, suback: SubAck) -> SubAck {
        let Some(pending) = self.pending_subacks.remove(&suback.pkid) else {
            return suback;
        };
        let mut on_router_packet = suback.return_codes.into_iter();
        let return_codes = pending
            .codes
            .into_iter()
            .map(|code| {
                code.unwrap_or_else(|| {
                    on_router_packet
                        .next()
                        .unwrap_or(SubscribeReasonCode::Unspecified)
                })
            })
            .collect::<Vec<_>>();
        if matches!(self.principal, Principal::Handler(_)) {
            for filter in pending.forwarded {
                if self.subs.declare(&filter) {
                    self.gate.commands().declare(&filter);
                }
            }
        }
        SubAck {
            pkid: suback.pkid,
            return_codes,
        }
    }

    /// Publishes the will, stamped like any publish of this client, with its
    /// MQTT 5 properties: now, or, with a Will Delay Interval and a session
    /// that outlives the connection, later (`wills`). A device whose token
    /// its user's revocation refuses by now gets no will (checked again
    /// when a delayed one falls due).
    async fn fire_will(&mut self) {
        let Some(will) = self.will.take() else {
            return;
        };
        let will_properties = self.will_properties.take().map(|p| *p);
        let (properties, retain, owner) = match &self.principal {
            Principal::Device(device) => {
                if self.gate.is_revoked(device).await {
                    info!("the user was revoked: the will is dropped");
                    return;
                }
                let stamped = identity::stamp(will_properties, device, &self.client_id);
                (Some(stamped), false, Some(device.clone()))
            }
            Principal::Handler(_) => (will_properties, will.retain, None),
        };
        // Only a session that outlives its connection, and so counts
        // against its user's persistent sessions, can park a will.
        let delay = (!self.clean_session)
            .then(|| wills::delay(self.will_delay_secs, self.session_expiry))
            .flatten();
        if let Some(after) = delay {
            // Published through the gate's own router link: this one closes.
            let publish = Publish::with_qos(will.topic, will.message, retain, will.qos, 0);
            let will = ReadyWill {
                publish,
                properties,
                owner,
            };
            self.gate.wills().schedule(self.claim.id(), will, after);
            return;
        }
        // The router delivers at each subscription's QoS; a QoS 1/2 will
        // also gets a packet id the router acknowledges to this (closing)
        // link, one that no QoS 2 publish of this client holds.
        let pkid = if will.qos == QoS::AtMostOnce {
            0
        } else {
            self.inbound.will_pkid()
        };
        let publish = Publish::with_qos(will.topic, will.message, retain, will.qos, pkid);
        info!("publishing will");
        let _ = wills::send_will(&self.gate, &mut self.link_tx, publish, properties).await;
    }
}
