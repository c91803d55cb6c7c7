//! Fuzz target `session`: gate sessions (`broker::session::serve`) driven
//! over `tokio::io::duplex` by arbitrary packet sequences from a handler
//! (handler key) and two authenticated devices (valid JWTs), MQTT 3.1.1 or
//! 5 each, against one gate and router built as the broker builds them.
//!
//! Each case asserts:
//! - no panic anywhere in the process (a panic hook counts them: sessions,
//!   the router, tasks they spawn);
//! - whatever the broker writes decodes (no malformed or stray bytes);
//! - no delivery to a non-owner: a device receives publishes only on its own
//!   reply topics (`<uid>_...`), never another user's;
//! - every session still open answers a PINGREQ within a deadline, and every
//!   session ends within a deadline once its client hangs up;
//! - no growth across cases: no device session of a finished case stays in
//!   the session registry.
//!
//! Publishes carry, now and then, heavy properties (large user properties,
//! correlation data) and DISCONNECTs MQTT 5 properties (a Session Expiry
//! Interval among them). A second target, `one_persistent_session_across_reconnects`,
//! drives one persistent session through reconnect sequences (hoarded QoS 2
//! publishes, releases, retransmissions, hang-ups, DISCONNECTs with an
//! expiry) on a gate with a small Receive Maximum, and asserts that the
//! broker never holds more unreleased QoS 2 publishes for the session than
//! that maximum, however often it reconnects.

use broker::auth::jwt::JwtSettings;
use broker::codec::{Codec, Version as WireVersion};
use broker::config::{Config, Limits};
use broker::gate::Gate;
use bytes::{Bytes, BytesMut};
use fuzz::{apply, config, mutations, Mutation};
use mqtt_router::protocol::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, Login, Packet, PingReq, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PubRel, PubRelProperties, PubRelReason, Publish,
    PublishProperties, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    Unsubscribe,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use protocol::claims::DeviceClaims;
use protocol::Secret;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "fuzz-session-secret-0123456789abcdef";
const HANDLER_KEY: &str = "fuzz-handler-key-0123456789abcdef";
/// A session still open must answer within this.
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
/// A session must end within this once its client hangs up.
const END_DEADLINE: Duration = Duration::from_secs(5);
/// Bound on one write from a client (a session that stops reading).
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
const COMMANDS: [&str; 3] = ["sync", "request_contact", "get_contact_list"];

static PANICS: AtomicUsize = AtomicUsize::new(0);
static CASE: AtomicUsize = AtomicUsize::new(0);
/// Totals over the run (printed with `FUZZ_STATS=1`), to see that cases do
/// reach deliveries and answers rather than failing early.
static CONNACKS: AtomicUsize = AtomicUsize::new(0);
static DELIVERIES: AtomicUsize = AtomicUsize::new(0);
static PINGS: AtomicUsize = AtomicUsize::new(0);
static PACKETS_SENT: AtomicUsize = AtomicUsize::new(0);
static SUBACK_TIMEOUTS: AtomicUsize = AtomicUsize::new(0);

struct Harness {
    runtime: tokio::runtime::Runtime,
    gate: Arc<Gate>,
    _shutdown: CancellationToken,
}

/// One gate for the whole target (as one broker serves many clients); each
/// case uses fresh user ids and client ids.
fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| build_harness(Limits::default().receive_maximum))
}

/// A second gate whose Receive Maximum is small, for the persistent-session
/// target: a hoarder crosses it within a few reconnects.
fn small_window_harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| build_harness(PERSISTENT_RECEIVE_MAXIMUM))
}

/// The Receive Maximum of [`small_window_harness`].
const PERSISTENT_RECEIVE_MAXIMUM: u16 = 8;

fn install_panic_counter() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Logs at `RUST_LOG` when set (say `RUST_LOG=broker=debug`).
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default_hook(info);
        }));
    });
}

fn build_harness(receive_maximum: u16) -> Harness {
    install_panic_counter();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let shutdown = CancellationToken::new();
    let config = Config {
        jwt: JwtSettings {
            hmac_secret: Some(Secret::from(SECRET)),
            ..JwtSettings::default()
        },
        handler_keys: vec![Secret::new(HANDLER_KEY)],
        command_topics: COMMANDS.iter().map(|s| s.to_string()).collect(),
        limits: Limits {
            conn_rate_per_sec: 0.0,
            connect_timeout: Duration::from_secs(2),
            max_packet_size: 64 * 1024,
            receive_maximum,
            ..Limits::default()
        },
        revocations: None,
    };
    let gate = runtime
        .block_on(async { broker::gate_for_tests(config, shutdown.clone()) })
        .expect("gate");
    Harness {
        runtime,
        gate,
        _shutdown: shutdown,
    }
}

// ------------------------------------------------------------- the inputs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Handler,
    DeviceA,
    DeviceB,
}

/// Topic names and filters, as templates over the case's user ids: own and
/// other users' reply topics, command topics, wildcards, `$` and shared
/// filters, multi-byte and invalid ones.
const TOPICS: &[&str] = &[
    "{a}_reply",
    "{b}_reply",
    "{a}_x/y",
    "{b}_contact_list",
    "sync",
    "request_contact",
    "get_contact_list",
    "#",
    "+",
    "{b}_+",
    "+/reply",
    "{b}_reply/#",
    "$share/g/sync",
    "$share/g/{b}_reply",
    "$share/g/#",
    "$SYS/x",
    "$gate/denied",
    "é/x",
    "{a}_é",
    "",
    "a/#/b",
    "{a}",
    "{a}_",
    "{b}_reply",
    "{a}_reply",
];

fn topic(template_index: usize, a: &str, b: &str) -> String {
    TOPICS[template_index % TOPICS.len()]
        .replace("{a}", a)
        .replace("{b}", b)
}

#[derive(Debug, Clone)]
enum Action {
    Subscribe {
        topics: Vec<usize>,
        qos: u8,
        pkid: u16,
    },
    Unsubscribe {
        topics: Vec<usize>,
        pkid: u16,
    },
    Publish {
        topic: usize,
        qos: u8,
        pkid: u16,
        dup: bool,
        retain: bool,
        properties: Option<PublishProps>,
        payload: Vec<u8>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16, bool),
    PubComp(u16),
    Ping,
    /// Packets only a server sends.
    ServerOnly(u8),
    /// A second CONNECT on the same connection.
    Reconnect,
    Disconnect(DisconnectReasonCode, Option<DisconnectProps>),
    /// An encoded packet of another action, mutated.
    Mutated(Box<Action>, Vec<Mutation>),
    Raw(Vec<u8>),
    /// Waits (bounded) for one more SUBACK: fixed sequences use it so that a
    /// reply is published after the subscription is in place.
    AwaitSubAck,
}

/// The properties of a fuzzed publish: forged identities now and then, and
/// (issue 15) heavy user properties and correlation data, which every
/// memory budget must count, with a response topic and an expiry.
#[derive(Debug, Clone)]
struct PublishProps {
    user: Vec<(String, String)>,
    /// How many large user properties, and the bytes of each value.
    heavy: (usize, usize),
    /// Bytes of correlation data.
    correlation: Option<usize>,
    response_topic: bool,
    expiry: Option<u32>,
}

impl PublishProps {
    fn build(&self) -> PublishProperties {
        let mut user_properties = self.user.clone();
        let (count, size) = self.heavy;
        user_properties.extend((0..count).map(|i| (format!("heavy{i}"), "h".repeat(size))));
        PublishProperties {
            content_type: Some("application/json".into()),
            user_properties,
            correlation_data: self.correlation.map(|n| Bytes::from(vec![0xC5; n])),
            response_topic: self.response_topic.then(|| "reply/here".to_owned()),
            message_expiry_interval: self.expiry,
            ..PublishProperties::default()
        }
    }
}

fn publish_props() -> impl Strategy<Value = PublishProps> {
    let heavy = prop_oneof![
        6 => Just((0usize, 0usize)),
        2 => (1usize..16, 1usize..2048),
        1 => (1usize..4, 4096usize..16_000),
    ];
    let correlation = option::of(prop_oneof![0usize..64, 900usize..1100, 8_000usize..20_000]);
    let expiry = option::of(prop_oneof![Just(0u32), Just(1), Just(60), Just(u32::MAX)]);
    (user_properties(), heavy, correlation, any::<bool>(), expiry).prop_map(
        |(user, heavy, correlation, response_topic, expiry)| PublishProps {
            user,
            heavy,
            correlation,
            response_topic,
            expiry,
        },
    )
}

/// The properties of a fuzzed DISCONNECT (MQTT 5): a Session Expiry
/// Interval (a non-zero one after a CONNECT without one is a protocol
/// error, MQTT-3.14.2-2), a reason string, user properties.
#[derive(Debug, Clone)]
struct DisconnectProps {
    session_expiry: Option<u32>,
    reason: bool,
    user: Vec<(String, String)>,
}

fn disconnect_props() -> impl Strategy<Value = DisconnectProps> {
    (
        option::of(prop_oneof![Just(0u32), Just(1), Just(3600), Just(u32::MAX)]),
        any::<bool>(),
        user_properties(),
    )
        .prop_map(|(session_expiry, reason, user)| DisconnectProps {
            session_expiry,
            reason,
            user,
        })
}

impl DisconnectProps {
    fn build(&self) -> DisconnectProperties {
        DisconnectProperties {
            session_expiry_interval: self.session_expiry,
            reason_string: self.reason.then(|| "bye".to_owned()),
            user_properties: self.user.clone(),
            server_reference: None,
        }
    }
}

fn pkid() -> impl Strategy<Value = u16> {
    prop_oneof![1u16..4, any::<u16>()]
}

fn user_properties() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("user_id".to_string()),
        Just("USER_ID".to_string()),
        Just(" client_id ".to_string()),
        Just("client_id".to_string()),
        "[a-z_]{0,6}",
    ];
    vec((name, "[a-z0-9é]{0,6}"), 0..3)
}

fn base_action() -> impl Strategy<Value = Action> {
    // Half the time a reply topic (`{a}_reply`, `{b}_reply`), so that
    // subscriptions meet publishes and deliveries happen.
    let topic_index = prop_oneof![1 => 0usize..2, 1 => 0..TOPICS.len()];
    prop_oneof![
        4 => (vec(topic_index.clone(), 1..4), 0u8..3, pkid())
            .prop_map(|(topics, qos, pkid)| Action::Subscribe { topics, qos, pkid }),
        1 => (vec(topic_index.clone(), 1..3), pkid())
            .prop_map(|(topics, pkid)| Action::Unsubscribe { topics, pkid }),
        6 => (
            topic_index,
            0u8..3,
            pkid(),
            any::<bool>(),
            prop_oneof![4 => Just(false), 1 => Just(true)],
            option::of(publish_props()),
            vec(any::<u8>(), 0..16),
        )
            .prop_map(|(topic, qos, pkid, dup, retain, properties, payload)| Action::Publish {
                topic,
                qos,
                pkid,
                dup,
                retain,
                properties,
                payload,
            }),
        1 => pkid().prop_map(Action::PubAck),
        1 => pkid().prop_map(Action::PubRec),
        1 => (pkid(), any::<bool>()).prop_map(|(p, props)| Action::PubRel(p, props)),
        1 => pkid().prop_map(Action::PubComp),
        1 => Just(Action::Ping),
        2 => Just(Action::AwaitSubAck),
        1 => (0u8..4).prop_map(Action::ServerOnly),
        1 => Just(Action::Reconnect),
        1 => (fuzz::disconnect_reason(), option::of(disconnect_props()))
            .prop_map(|(reason, props)| Action::Disconnect(reason, props)),
        1 => vec(any::<u8>(), 0..24).prop_map(Action::Raw),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => base_action(),
        1 => (base_action(), mutations()).prop_map(|(a, m)| Action::Mutated(Box::new(a), m)),
    ]
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![Just(Who::Handler), Just(Who::DeviceA), Just(Who::DeviceB)]
}

fn wire_version() -> impl Strategy<Value = WireVersion> {
    prop_oneof![Just(WireVersion::V4), Just(WireVersion::V5)]
}

// ------------------------------------------------------------- the clients

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The packet an action sends, if any (`Raw` and `Mutated` are bytes).
fn packet(action: &Action, a: &str, b: &str, client_id: &str, login: &Login) -> Option<Packet> {
    Some(match action {
        Action::Subscribe {
            topics,
            qos: q,
            pkid,
        } => Packet::Subscribe(
            Subscribe {
                pkid: *pkid,
                filters: topics
                    .iter()
                    .map(|t| Filter {
                        path: topic(*t, a, b),
                        qos: qos(*q),
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                    })
                    .collect(),
            },
            None,
        ),
        Action::Unsubscribe { topics, pkid } => Packet::Unsubscribe(
            Unsubscribe {
                pkid: *pkid,
                filters: topics.iter().map(|t| topic(*t, a, b)).collect(),
            },
            None,
        ),
        Action::Publish {
            topic: t,
            qos: q,
            pkid,
            dup: _,
            retain,
            properties,
            payload,
        } => {
            let q = qos(*q);
            let pkid = if q == QoS::AtMostOnce {
                0
            } else {
                (*pkid).max(1)
            };
            Packet::Publish(
                Publish::with_qos(
                    Bytes::from(topic(*t, a, b)),
                    Bytes::from(payload.clone()),
                    *retain,
                    q,
                    pkid,
                ),
                properties.as_ref().map(PublishProps::build),
            )
        }
        Action::PubAck(pkid) => Packet::PubAck(
            PubAck {
                pkid: *pkid,
                reason: PubAckReason::Success,
            },
            None,
        ),
        Action::PubRec(pkid) => Packet::PubRec(
            PubRec {
                pkid: *pkid,
                reason: PubRecReason::Success,
            },
            None,
        ),
        Action::PubRel(pkid, props) => Packet::PubRel(
            PubRel {
                pkid: *pkid,
                reason: PubRelReason::Success,
            },
            props.then(|| PubRelProperties {
                reason_string: Some("r".into()),
                user_properties: vec![],
            }),
        ),
        Action::PubComp(pkid) => Packet::PubComp(
            PubComp {
                pkid: *pkid,
                reason: PubCompReason::Success,
            },
            None,
        ),
        Action::Ping => Packet::PingReq(PingReq),
        Action::ServerOnly(n) => match n {
            0 => Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::Success,
                },
                None,
            ),
            1 => Packet::SubAck(
                SubAck {
                    pkid: 1,
                    return_codes: vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
                },
                None,
            ),
            2 => Packet::UnsubAck(
                UnsubAck {
                    pkid: 1,
                    reasons: vec![],
                },
                None,
            ),
            _ => Packet::PingResp(PingResp),
        },
        Action::Reconnect => connect_packet(client_id, login.clone()),
        Action::Disconnect(reason_code, props) => Packet::Disconnect(
            Disconnect {
                reason_code: *reason_code,
            },
            props.as_ref().map(DisconnectProps::build),
        ),
        Action::Mutated(..) | Action::Raw(_) | Action::AwaitSubAck => return None,
    })
}

fn connect_packet(client_id: &str, login: Login) -> Packet {
    Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: client_id.into(),
            clean_session: true,
        },
        None,
        None,
        None,
        Some(login),
    )
}

/// What a client saw of its session.
#[derive(Default, Debug)]
struct Seen {
    publishes: Vec<String>,
    ping_responses: usize,
    connacks: usize,
    subacks: usize,
    closed: bool,
    malformed: Option<String>,
    /// PUBRECs for the client's QoS 2 publishes: packet id, success.
    pubrecs: Vec<(u16, bool)>,
    /// PUBCOMPs for the client's PUBRELs.
    pubcomps: Vec<u16>,
    /// The server's DISCONNECT reason, if it sent one.
    disconnect: Option<DisconnectReasonCode>,
}

/// A client of the gate over an in-memory stream.
struct Client {
    who: Who,
    uid: Option<String>,
    codec: Codec,
    login: Login,
    client_id: String,
    /// Shared with the reader, which acknowledges deliveries as a real
    /// client does (without that the router's flow control stalls the
    /// session behind unacknowledged QoS 1/2 deliveries).
    writer: Arc<tokio::sync::Mutex<tokio::io::WriteHalf<DuplexStream>>>,
    /// Snapshots of what the reader saw, one per packet or end.
    seen: mpsc::UnboundedReceiver<()>,
    state: Arc<std::sync::Mutex<Seen>>,
    reader: JoinHandle<()>,
    session: JoinHandle<()>,
    gone: bool,
    /// Raw or mutated bytes were sent: the stream may now hold a partial
    /// frame that swallows later packets, so only the end is checked.
    garbled: bool,
    /// Well-formed SUBSCRIBEs written, for `AwaitSubAck`.
    subscribes_sent: usize,
}

impl Client {
    fn start(who: Who, version: WireVersion, uid: Option<String>, case: usize) -> Client {
        Self::start_on(harness(), who, version, uid, case)
    }

    fn start_on(
        h: &Harness,
        who: Who,
        version: WireVersion,
        uid: Option<String>,
        case: usize,
    ) -> Client {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000 + (case % 20000) as u16));
        let session = tokio::spawn(broker::session::serve(
            theirs,
            peer,
            h.gate.clone(),
            broker::session::Admits::Everyone,
        ));
        let (mut reader, writer) = tokio::io::split(ours);
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let codec = Codec::new(version, 1 << 20);
        let state = Arc::new(std::sync::Mutex::new(Seen::default()));
        let (tx, seen) = mpsc::unbounded_channel();
        let reader = {
            let state = state.clone();
            let acks = writer.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(4096);
                loop {
                    loop {
                        match codec.decode(&mut buf) {
                            Ok(Some(packet)) => {
                                let ack = match &packet {
                                    Packet::Publish(p, _) if p.qos() == QoS::AtLeastOnce => {
                                        Some(Packet::PubAck(
                                            PubAck {
                                                pkid: p.pkid(),
                                                reason: PubAckReason::Success,
                                            },
                                            None,
                                        ))
                                    }
                                    Packet::Publish(p, _) if p.qos() == QoS::ExactlyOnce => {
                                        Some(Packet::PubRec(
                                            PubRec {
                                                pkid: p.pkid(),
                                                reason: PubRecReason::Success,
                                            },
                                            None,
                                        ))
                                    }
                                    Packet::PubRel(rel, _) => Some(Packet::PubComp(
                                        PubComp {
                                            pkid: rel.pkid,
                                            reason: PubCompReason::Success,
                                        },
                                        None,
                                    )),
                                    _ => None,
                                };
                                if let Some(ack) = ack {
                                    let mut out = BytesMut::new();
                                    if codec.encode(ack, &mut out).is_ok() {
                                        let mut w = acks.lock().await;
                                        let _ =
                                            tokio::time::timeout(WRITE_DEADLINE, w.write_all(&out))
                                                .await;
                                    }
                                }
                                let mut s = state.lock().expect("state");
                                match packet {
                                    Packet::Publish(p, _) => s
                                        .publishes
                                        .push(String::from_utf8_lossy(&p.topic).into_owned()),
                                    Packet::PingResp(_) => s.ping_responses += 1,
                                    Packet::ConnAck(..) => s.connacks += 1,
                                    Packet::SubAck(..) => s.subacks += 1,
                                    Packet::PubRec(rec, _) => s
                                        .pubrecs
                                        .push((rec.pkid, rec.reason == PubRecReason::Success)),
                                    Packet::PubComp(comp, _) => s.pubcomps.push(comp.pkid),
                                    Packet::Disconnect(d, _) => s.disconnect = Some(d.reason_code),
                                    _ => {}
                                }
                                drop(s);
                                let _ = tx.send(());
                            }
                            Ok(None) => break,
                            Err(e) => {
                                state.lock().expect("state").malformed =
                                    Some(format!("{e}: {:?}", &buf[..buf.len().min(32)]));
                                state.lock().expect("state").closed = true;
                                let _ = tx.send(());
                                return;
                            }
                        }
                    }
                    match reader.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => {
                            state.lock().expect("state").closed = true;
                            let _ = tx.send(());
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            })
        };
        let (username, password) = match (&who, &uid) {
            (Who::Handler, _) => ("handler".to_string(), HANDLER_KEY.to_string()),
            (_, Some(uid)) => (
                "JWT".to_string(),
                DeviceClaims::new(uid.as_str(), 3600)
                    .sign_hs256(SECRET.as_bytes())
                    .expect("sign"),
            ),
            (_, None) => ("JWT".to_string(), String::new()),
        };
        Client {
            who,
            uid,
            codec,
            login: Login { username, password },
            client_id: format!("fuzz-{case}-{who:?}"),
            writer,
            seen,
            state,
            reader,
            session,
            gone: false,
            garbled: false,
            subscribes_sent: 0,
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        if self.gone {
            return;
        }
        PACKETS_SENT.fetch_add(1, Ordering::Relaxed);
        let write = async { self.writer.lock().await.write_all(bytes).await };
        match tokio::time::timeout(WRITE_DEADLINE, write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => self.gone = true,
            Err(_) => panic!(
                "{:?}: the session did not read for {WRITE_DEADLINE:?}",
                self.who
            ),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        if self.codec.encode(packet, &mut out).is_ok() {
            self.write(&out).await;
        }
    }

    /// Sends CONNECT and waits for the CONNACK (or the end) before anything
    /// else is sent: the gate leaves packets that arrive in the same read
    /// as the CONNECT unread until more bytes come (reported; see
    /// `pipelined_packets_after_connect_are_answered`).
    async fn connect(&mut self) {
        let packet = connect_packet(&self.client_id, self.login.clone());
        self.connect_with(packet).await;
    }

    /// Sends this CONNECT and waits as [`Client::connect`] does.
    async fn connect_with(&mut self, packet: Packet) {
        self.send(packet).await;
        let wait = async {
            loop {
                {
                    let s = self.state.lock().expect("state");
                    if s.closed || s.connacks > 0 {
                        return;
                    }
                }
                if self.seen.recv().await.is_none() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(ANSWER_DEADLINE, wait).await;
    }

    /// Waits (bounded) until every SUBSCRIBE sent so far is answered;
    /// `false` when one is not answered in time and the session is open.
    async fn await_suback(&mut self) -> bool {
        // A garbled stream may hold a partial frame that swallowed the
        // SUBSCRIBE: nothing to wait for.
        if self.garbled || self.gone {
            return true;
        }
        let wanted = self.subscribes_sent;
        let wait = async {
            loop {
                {
                    let s = self.state.lock().expect("state");
                    if s.closed || s.subacks >= wanted {
                        return;
                    }
                }
                if self.seen.recv().await.is_none() {
                    return;
                }
            }
        };
        if tokio::time::timeout(ANSWER_DEADLINE, wait).await.is_err() {
            SUBACK_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn closed(&self) -> bool {
        self.state.lock().expect("state").closed
    }

    /// Sends PINGREQ and waits for PINGRESP or the end of the session.
    async fn ping_answered(&mut self) -> bool {
        let before = self.state.lock().expect("state").ping_responses;
        self.send(Packet::PingReq(PingReq)).await;
        let wait = async {
            loop {
                {
                    let s = self.state.lock().expect("state");
                    if s.closed || s.ping_responses > before {
                        return;
                    }
                }
                if self.seen.recv().await.is_none() {
                    return;
                }
            }
        };
        tokio::time::timeout(ANSWER_DEADLINE, wait).await.is_ok()
    }
}

/// Runs one case. `expect`: (client index, topic template from the
/// handler's side) deliveries that must arrive before hanging up.
async fn run_case(
    versions: [WireVersion; 3],
    ops: Vec<(Who, Action)>,
    expect: Vec<(usize, usize)>,
) -> Result<(), TestCaseError> {
    let case = CASE.fetch_add(1, Ordering::SeqCst);
    let (a, b) = (format!("a{case}"), format!("b{case}"));
    let mut clients = [
        Client::start(Who::Handler, versions[0], None, case),
        Client::start(Who::DeviceA, versions[1], Some(a.clone()), case),
        Client::start(Who::DeviceB, versions[2], Some(b.clone()), case),
    ];
    for c in clients.iter_mut() {
        c.connect().await;
    }
    // Inner filters the handler holds plainly and through `$share/`: one
    // session holding both panics the router (see
    // `handler_shared_and_plain_subscription_of_one_filter`); until that is
    // fixed, such a SUBSCRIBE is left out here.
    let mut handler_filters: Vec<(bool, String)> = Vec::new();
    for (who, action) in &ops {
        if let (Who::Handler, Action::Subscribe { topics, .. }) = (who, action) {
            let mut conflict = false;
            for t in topics {
                let f = topic(*t, &a, &b);
                let entry = match f.strip_prefix("$share/") {
                    Some(rest) => (
                        true,
                        rest.split_once('/')
                            .map_or("", |(_, inner)| inner)
                            .to_string(),
                    ),
                    None => (false, f),
                };
                if handler_filters
                    .iter()
                    .any(|(shared, inner)| *inner == entry.1 && *shared != entry.0)
                {
                    conflict = true;
                }
                handler_filters.push(entry);
            }
            if conflict {
                continue;
            }
        }
        let i = match who {
            Who::Handler => 0,
            Who::DeviceA => 1,
            Who::DeviceB => 2,
        };
        let c = &mut clients[i];
        // Devices see the templates from their own side: `{a}` is the sender.
        let (me, other) = match who {
            Who::DeviceB => (b.as_str(), a.as_str()),
            _ => (a.as_str(), b.as_str()),
        };
        match action {
            Action::AwaitSubAck => {
                let answered = c.await_suback().await;
                prop_assert!(
                    answered,
                    "{:?}: a SUBSCRIBE got no SUBACK within {ANSWER_DEADLINE:?}",
                    c.who
                );
            }
            Action::Raw(bytes) => {
                c.garbled = true;
                c.write(bytes).await;
            }
            Action::Mutated(inner, muts) => {
                c.garbled = true;
                if let Some(p) = packet(inner, me, other, &c.client_id, &c.login) {
                    let mut out = BytesMut::new();
                    if c.codec.encode(p, &mut out).is_ok() {
                        let mut bytes = out.to_vec();
                        apply(&mut bytes, muts);
                        c.write(&bytes).await;
                    }
                }
            }
            other_action => {
                if let Some(p) = packet(other_action, me, other, &c.client_id, &c.login) {
                    if matches!(p, Packet::Subscribe(..)) {
                        c.subscribes_sent += 1;
                    }
                    let mut out = BytesMut::new();
                    if c.codec.encode(p, &mut out).is_ok() {
                        // A retransmission: the DUP flag is not settable on
                        // rumqttd's `Publish`, so set it on the wire.
                        if let (Action::Publish { dup: true, .. }, Some(first)) =
                            (other_action, out.first_mut())
                        {
                            *first |= 0x08;
                        }
                        c.write(&out).await;
                    }
                }
            }
        }
    }
    // Every session still open answers.
    for c in clients.iter_mut() {
        if !c.closed() && !c.gone && !c.garbled {
            prop_assert!(
                c.ping_answered().await,
                "{:?}: no PINGRESP and no close within {ANSWER_DEADLINE:?}",
                c.who
            );
        }
    }
    for (i, template) in expect {
        let wanted = topic(template, &a, &b);
        let c = &mut clients[i];
        let wait = async {
            loop {
                if c.state.lock().expect("state").publishes.contains(&wanted) {
                    return;
                }
                if c.seen.recv().await.is_none() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(ANSWER_DEADLINE, wait).await;
        let got = c.state.lock().expect("state").publishes.clone();
        prop_assert!(
            got.contains(&wanted),
            "{:?} never received {wanted:?} (got {got:?})",
            c.who
        );
    }
    // Hang up; every session ends.
    for c in clients.iter_mut() {
        let _ = c.writer.lock().await.shutdown().await;
    }
    for c in clients.iter_mut() {
        let ended = tokio::time::timeout(END_DEADLINE, &mut c.session).await;
        prop_assert!(
            ended.is_ok(),
            "{:?}: session still running {END_DEADLINE:?} after hang-up",
            c.who
        );
        if let Ok(Err(e)) = ended {
            prop_assert!(false, "{:?}: session task failed: {e}", c.who);
        }
        c.reader.abort();
    }
    // Nothing of the case outlives it: every (clean) session it opened has
    // left the registry, so the registry cannot grow with cases.
    // (Per user: other targets share the gate and run at the same time.)
    let still_live: Vec<String> = harness()
        .gate
        .sessions()
        .device_sessions()
        .into_iter()
        .map(|(uid, _)| uid.as_str().to_owned())
        .filter(|uid| {
            clients
                .iter()
                .any(|c| c.uid.as_deref() == Some(uid.as_str()))
        })
        .collect();
    prop_assert!(
        still_live.is_empty(),
        "sessions of {still_live:?} left in the registry after the case ended"
    );
    for c in &clients {
        let s = c.state.lock().expect("state");
        CONNACKS.fetch_add(s.connacks, Ordering::Relaxed);
        DELIVERIES.fetch_add(s.publishes.len(), Ordering::Relaxed);
        PINGS.fetch_add(s.ping_responses, Ordering::Relaxed);
        prop_assert!(
            s.malformed.is_none(),
            "{:?} got malformed bytes: {:?}",
            c.who,
            s.malformed
        );
        if let Some(uid) = &c.uid {
            let own = format!("{uid}_");
            for t in &s.publishes {
                prop_assert!(t.starts_with(&own), "{:?} ({uid}) received {t:?}", c.who);
            }
        }
    }
    Ok(())
}

fn check(
    versions: [WireVersion; 3],
    ops: Vec<(Who, Action)>,
    expect: Vec<(usize, usize)>,
) -> Result<(), TestCaseError> {
    let h = harness();
    let before = PANICS.load(Ordering::SeqCst);
    let described = format!("versions = {versions:?}, ops = {ops:?}");
    let result = h.runtime.block_on(run_case(versions, ops, expect));
    let after = PANICS.load(Ordering::SeqCst);
    if after != before {
        // Shrinking replays cases on the same (possibly broken) router, so
        // the case that first panicked is printed as it was.
        eprintln!("panic during case: {described}");
    }
    let cases = CASE.load(Ordering::Relaxed);
    if std::env::var_os("FUZZ_STATS").is_some() && cases % 100 == 0 {
        eprintln!(
            "session fuzz: {cases} cases, {} packets sent, {} CONNACKs, {} deliveries, {} PINGRESPs, {} SUBACK waits timed out, {after} panics",
            PACKETS_SENT.load(Ordering::Relaxed),
            CONNACKS.load(Ordering::Relaxed),
            DELIVERIES.load(Ordering::Relaxed),
            PINGS.load(Ordering::Relaxed),
            SUBACK_TIMEOUTS.load(Ordering::Relaxed),
        );
    }
    prop_assert_eq!(
        after,
        before,
        "a panic happened during this case (see stderr)"
    );
    result
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn sessions_survive_arbitrary_sequences(
        versions in [wire_version(), wire_version(), wire_version()],
        ops in vec((who(), action()), 1..24),
    ) {
        check(versions, ops, vec![])?;
    }
}

// ------------------------------------------------ one persistent session

/// One step in the life of a persistent device session across connections
/// (issue 15: caps that reset on reconnect).
#[derive(Debug, Clone)]
enum Step {
    /// This many QoS 2 commands with fresh packet ids, never released.
    Hoard(u8),
    /// PUBREL for the oldest packet id the session holds.
    ReleaseOldest,
    /// The newest held packet id again, with DUP set.
    Retransmit,
    /// A publish with heavy properties.
    Heavy(u8, PublishProps),
    /// Hang up without DISCONNECT; the next step reconnects.
    HangUp,
    /// DISCONNECT, MQTT 5 with this Session Expiry Interval if any.
    Disconnect(Option<u32>),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u8..6).prop_map(Step::Hoard),
        1 => Just(Step::ReleaseOldest),
        1 => Just(Step::Retransmit),
        1 => (0u8..3, publish_props()).prop_map(|(q, p)| Step::Heavy(q, p)),
        2 => Just(Step::HangUp),
        1 => option::of(prop_oneof![Just(0u32), Just(60), Just(u32::MAX)]).prop_map(Step::Disconnect),
    ]
}

/// Session expiry asked for at every CONNECT of the persistent target.
const PERSISTENT_EXPIRY_SECS: u32 = 300;

fn persistent_connect(
    version: WireVersion,
    client_id: &str,
    login: Login,
    clean_start: bool,
) -> Packet {
    // MQTT 3.1.1: Clean Session 0 is a persistent session, with no expiry
    // of its own; MQTT 5: Clean Start and an expiry.
    let properties = (version == WireVersion::V5).then(|| ConnectProperties {
        session_expiry_interval: Some(PERSISTENT_EXPIRY_SECS),
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: vec![],
        authentication_method: None,
        authentication_data: None,
    });
    Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: client_id.into(),
            clean_session: clean_start,
        },
        properties,
        None,
        None,
        Some(login),
    )
}

/// Waits (bounded) until `done` holds for what the client saw, or it closed.
async fn wait_for(c: &mut Client, done: impl Fn(&Seen) -> bool) {
    let wait = async {
        loop {
            {
                let s = c.state.lock().expect("state");
                if s.closed || done(&s) {
                    return;
                }
            }
            if c.seen.recv().await.is_none() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(ANSWER_DEADLINE, wait).await;
}

/// Runs one persistent session through `steps`, reconnecting after each
/// end. Asserts, besides what every case asserts (no panic, nothing
/// malformed, sessions end): the broker never holds more unreleased QoS 2
/// publishes for the session than its Receive Maximum, whatever the
/// reconnects (each PUBREC with success is a publish it holds until the
/// PUBREL), and a retransmitted held packet id is answered, not refused.
async fn run_persistent(version: WireVersion, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let h = small_window_harness();
    let case = CASE.fetch_add(1, Ordering::SeqCst);
    let uid = format!("p{case}");
    let limit = usize::from(PERSISTENT_RECEIVE_MAXIMUM);
    // Packet ids the broker acknowledged with PUBREC and not yet completed.
    let mut held: std::collections::BTreeSet<u16> = std::collections::BTreeSet::new();
    let mut next_pkid: u16 = 1;
    let mut current: Option<Client> = None;
    for step in steps {
        let c = match &mut current {
            Some(c) if !c.closed() && !c.gone => c,
            _ => {
                if let Some(old) = current.take() {
                    finish_client(old).await?;
                }
                let mut c = Client::start_on(h, Who::DeviceA, version, Some(uid.clone()), case);
                let connect = persistent_connect(version, &c.client_id, c.login.clone(), false);
                c.connect_with(connect).await;
                current.insert(c)
            }
        };
        let (recs_before, comps_before) = {
            let s = c.state.lock().expect("state");
            (s.pubrecs.len(), s.pubcomps.len())
        };
        match step {
            Step::Hoard(n) => {
                for _ in 0..n {
                    let publish = Publish::with_qos(
                        Bytes::from_static(b"sync"),
                        Bytes::from_static(b"{}"),
                        false,
                        QoS::ExactlyOnce,
                        next_pkid,
                    );
                    next_pkid = next_pkid.wrapping_add(1).max(1);
                    c.send(Packet::Publish(publish, None)).await;
                }
                let wanted = recs_before + usize::from(n);
                wait_for(c, |s| s.pubrecs.len() >= wanted).await;
            }
            Step::ReleaseOldest => {
                if let Some(&pkid) = held.iter().next() {
                    let release = PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                    };
                    c.send(Packet::PubRel(release, None)).await;
                    wait_for(c, |s| s.pubcomps.len() > comps_before).await;
                }
            }
            Step::Retransmit => {
                if let Some(&pkid) = held.iter().next_back() {
                    let publish = Publish::with_qos(
                        Bytes::from_static(b"sync"),
                        Bytes::from_static(b"{}"),
                        false,
                        QoS::ExactlyOnce,
                        pkid,
                    );
                    let mut out = BytesMut::new();
                    if c.codec
                        .encode(Packet::Publish(publish, None), &mut out)
                        .is_ok()
                    {
                        if let Some(first) = out.first_mut() {
                            *first |= 0x08;
                        }
                        c.write(&out).await;
                    }
                    wait_for(c, |s| s.pubrecs.len() > recs_before).await;
                    let s = c.state.lock().expect("state");
                    prop_assert!(
                        s.closed || s.pubrecs[recs_before..].contains(&(pkid, true)),
                        "a retransmission of held packet id {pkid} was not answered PUBREC \
                         (got {:?})",
                        &s.pubrecs[recs_before..]
                    );
                }
            }
            Step::Heavy(q, props) => {
                let q = qos(q);
                let pkid = if q == QoS::AtMostOnce { 0 } else { next_pkid };
                if q != QoS::AtMostOnce {
                    next_pkid = next_pkid.wrapping_add(1).max(1);
                }
                let publish =
                    Publish::with_qos(Bytes::from_static(b"sync"), Bytes::new(), false, q, pkid);
                c.send(Packet::Publish(publish, Some(props.build()))).await;
                prop_assert!(c.ping_answered().await, "no PINGRESP after a heavy publish");
            }
            Step::HangUp => {
                let _ = c.writer.lock().await.shutdown().await;
            }
            Step::Disconnect(expiry) => {
                let props = expiry.map(|secs| DisconnectProperties {
                    session_expiry_interval: Some(secs),
                    reason_string: None,
                    user_properties: vec![],
                    server_reference: None,
                });
                let disconnect = Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                };
                c.send(Packet::Disconnect(disconnect, props)).await;
                wait_for(c, |_| false).await;
                // Expiry 0 at DISCONNECT ends the session (MQTT 5): the
                // broker forgets what it held.
                let ended_session = version == WireVersion::V5 && expiry == Some(0);
                if ended_session && c.state.lock().expect("state").disconnect.is_none() {
                    held.clear();
                }
            }
        }
        {
            let s = c.state.lock().expect("state");
            for &(pkid, ok) in &s.pubrecs[recs_before..] {
                if ok {
                    held.insert(pkid);
                }
            }
            for pkid in &s.pubcomps[comps_before..] {
                held.remove(pkid);
            }
        }
        prop_assert!(
            held.len() <= limit,
            "the broker holds {} unreleased QoS 2 publishes of one session ({held:?}), \
             more than its Receive Maximum {limit}",
            held.len()
        );
    }
    if let Some(old) = current.take() {
        finish_client(old).await?;
    }
    // End the session: a clean start, then DISCONNECT (expiry 0).
    let mut c = Client::start_on(h, Who::DeviceA, version, Some(uid.clone()), case);
    let connect = persistent_connect(version, &c.client_id, c.login.clone(), true);
    c.connect_with(connect).await;
    let ending = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    let props = (version == WireVersion::V5).then(|| DisconnectProperties {
        session_expiry_interval: Some(0),
        reason_string: None,
        user_properties: vec![],
        server_reference: None,
    });
    c.send(Packet::Disconnect(ending, props)).await;
    finish_client(c).await?;
    let still_live = h
        .gate
        .sessions()
        .device_sessions()
        .into_iter()
        .any(|(live, _)| live.as_str() == uid);
    prop_assert!(
        !still_live,
        "the session of {uid} is still live after the case"
    );
    Ok(())
}

/// Hangs up `c` and checks that its session ended in time and that what it
/// received decoded.
async fn finish_client(mut c: Client) -> Result<(), TestCaseError> {
    let _ = c.writer.lock().await.shutdown().await;
    let ended = tokio::time::timeout(END_DEADLINE, &mut c.session).await;
    prop_assert!(
        ended.is_ok(),
        "session still running {END_DEADLINE:?} after hang-up"
    );
    c.reader.abort();
    let s = c.state.lock().expect("state");
    prop_assert!(s.malformed.is_none(), "malformed bytes: {:?}", s.malformed);
    Ok(())
}

fn check_persistent(version: WireVersion, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let h = small_window_harness();
    let before = PANICS.load(Ordering::SeqCst);
    let described = format!("version = {version:?}, steps = {steps:?}");
    let result = h.runtime.block_on(run_persistent(version, steps));
    let after = PANICS.load(Ordering::SeqCst);
    if after != before {
        eprintln!("panic during case: {described}");
    }
    prop_assert_eq!(
        after,
        before,
        "a panic happened during this case (see stderr)"
    );
    result
}

proptest! {
    #![proptest_config(config(48))]

    /// Reconnect sequences of one persistent session: hoarded QoS 2
    /// publishes, releases, retransmissions, heavy properties, hang-ups and
    /// DISCONNECTs with and without a Session Expiry Interval.
    #[test]
    fn one_persistent_session_across_reconnects(
        version in wire_version(),
        steps in vec(step(), 1..14),
    ) {
        check_persistent(version, steps)?;
    }
}

/// The hoarder the issue found: a persistent session that holds almost a
/// Receive Maximum of unreleased QoS 2 publishes, reconnects and does it
/// again. Its total is the session's, so the broker never holds more than
/// the Receive Maximum.
#[test]
fn a_reconnecting_qos2_hoarder_is_held_to_the_receive_maximum() {
    for version in [WireVersion::V4, WireVersion::V5] {
        let steps = vec![
            Step::Hoard(5),
            Step::HangUp,
            Step::Hoard(5),
            Step::HangUp,
            Step::Hoard(5),
        ];
        check_persistent(version, steps).expect("held within the Receive Maximum");
    }
}

/// A handler replying to both users while each subscribes to its own and
/// the other's reply topic: each gets only its own (fixed sequence, both
/// versions).
#[test]
fn replies_reach_only_their_owner() {
    for versions in [
        [WireVersion::V5, WireVersion::V5, WireVersion::V5],
        [WireVersion::V4, WireVersion::V4, WireVersion::V4],
        [WireVersion::V5, WireVersion::V4, WireVersion::V5],
    ] {
        let sub = |topics: Vec<usize>| Action::Subscribe {
            topics,
            qos: 1,
            pkid: 1,
        };
        let publish = |topic: usize| Action::Publish {
            topic,
            qos: 1,
            pkid: 9,
            dup: false,
            retain: false,
            properties: Some(PublishProps {
                user: vec![("user_id".into(), "x".into())],
                heavy: (0, 0),
                correlation: None,
                response_topic: false,
                expiry: None,
            }),
            payload: b"{}".to_vec(),
        };
        let ops = vec![
            (Who::DeviceA, sub(vec![0, 1, 9, 7])),
            (Who::DeviceB, sub(vec![0, 1, 13])),
            (Who::Handler, sub(vec![12])),
            (Who::DeviceA, Action::AwaitSubAck),
            (Who::DeviceB, Action::AwaitSubAck),
            (Who::Handler, Action::AwaitSubAck),
            (Who::Handler, publish(0)),
            (Who::Handler, publish(1)),
            (Who::DeviceA, publish(4)),
            (Who::Handler, publish(3)),
        ];
        // Device A must get `a_reply` (template 0), device B `b_reply` (1).
        check(versions, ops, vec![(1, 0), (2, 1)]).expect("no panic, no foreign delivery");
    }
}

/// MQTT 3.1.1 §3.1.4: a client may send packets right after CONNECT without
/// waiting for the CONNACK. A PINGREQ that arrives in the same read as the
/// CONNECT is left in the gate's read buffer until more bytes come, so it
/// is never answered. Found by this target; the fix belongs to
/// `broker/src/session/mod.rs` (decode what is already buffered when the
/// session starts).
#[test]
fn pipelined_packets_after_connect_are_answered() {
    let h = harness();
    let answered = h.runtime.block_on(async {
        let mut c = Client::start(Who::Handler, WireVersion::V5, None, usize::MAX / 2);
        let mut bytes = BytesMut::new();
        c.codec
            .encode(connect_packet(&c.client_id, c.login.clone()), &mut bytes)
            .expect("encodes");
        c.codec
            .encode(Packet::PingReq(PingReq), &mut bytes)
            .expect("encodes");
        c.write(&bytes).await;
        let wait = async {
            loop {
                if c.state.lock().expect("state").ping_responses > 0 {
                    return;
                }
                if c.seen.recv().await.is_none() {
                    return;
                }
            }
        };
        tokio::time::timeout(ANSWER_DEADLINE, wait).await.is_ok()
            && c.state.lock().expect("state").ping_responses > 0
    });
    assert!(answered, "PINGREQ sent with the CONNECT was not answered");
}

/// A handler session holding the same filter plainly and as a shared
/// subscription (`sync` and `$share/g/sync`): the router's
/// `debug_assert!(check_tracker_duplicates(..))` in `prepare_filter`
/// (router/src/router/routing.rs) fails and the router task dies;
/// in release builds the assertion is compiled out and the session holds two
/// trackers for one filter. Found by this target; the fix belongs to the
/// router.
#[test]
fn handler_shared_and_plain_subscription_of_one_filter() {
    let sub = |topics: Vec<usize>| Action::Subscribe {
        topics,
        qos: 1,
        pkid: 1,
    };
    // Templates 4 = `sync`, 12 = `$share/g/sync`; sent as separate packets
    // so the harness's filter above does not drop them.
    let h = harness();
    let before = PANICS.load(Ordering::SeqCst);
    h.runtime.block_on(async {
        let mut c = Client::start(Who::Handler, WireVersion::V5, None, usize::MAX / 3);
        c.connect().await;
        for action in [sub(vec![4]), sub(vec![12])] {
            if let Some(p) = packet(&action, "a", "b", &c.client_id, &c.login) {
                c.send(p).await;
            }
        }
        assert!(c.ping_answered().await);
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), before, "the router panicked");
}

/// Issue 9: a validly signed token whose `exp` is enormous (10^19, u64::MAX)
/// overflowed the session's deadline arithmetic (`exp + leeway`,
/// `Instant + Duration`) and the session task panicked: on this branch at
/// the session, then `broker/src/connection.rs` (`exp + gate.leeway_secs`, attempt to add
/// with overflow) and std's `Instant + Duration` (overflow when adding
/// duration to instant). The fix belonged to the session (saturating
/// arithmetic, `Instant::checked_add`).
#[test]
fn enormous_token_expiry_does_not_panic_the_session() {
    let h = harness();
    let before = PANICS.load(Ordering::SeqCst);
    let answered = h.runtime.block_on(async {
        let mut all = true;
        for (i, exp) in [u64::MAX, 10_000_000_000_000_000_000]
            .into_iter()
            .enumerate()
        {
            let uid = format!("exp{i}");
            let mut c = Client::start(
                Who::DeviceA,
                WireVersion::V5,
                Some(uid.clone()),
                usize::MAX / 4 + i,
            );
            let claims = DeviceClaims {
                exp: Some(exp),
                ..DeviceClaims::new(uid.as_str(), 3600)
            };
            c.login.password = claims.sign_hs256(SECRET.as_bytes()).expect("sign");
            c.connect().await;
            all &= c.ping_answered().await;
        }
        all
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), before, "a session panicked");
    assert!(answered, "no answer and no close");
}

/// From the long run, after 21,405 cases on one gate: an MQTT 3.1.1 handler
/// subscribing to `#` (and so to every retained message earlier cases left)
/// and a reply topic, then to another reply topic at QoS 2. Its second
/// SUBACK waited behind QoS 1 deliveries the harness did not acknowledge
/// (the router's flow control, not a gate bug): the harness's clients now
/// acknowledge deliveries, and every SUBSCRIBE must be answered.
#[test]
fn handler_wildcard_then_reply_subscriptions_are_answered() {
    let sub = |topics: Vec<usize>, qos: u8, pkid: u16| Action::Subscribe { topics, qos, pkid };
    let ops = vec![
        (Who::Handler, sub(vec![7, 0], 1, 1)),
        (Who::Handler, Action::Ping),
        (Who::Handler, sub(vec![1], 2, 33770)),
        (Who::Handler, Action::AwaitSubAck),
    ];
    check([WireVersion::V4; 3], ops, vec![]).expect("every SUBSCRIBE answered");
}
