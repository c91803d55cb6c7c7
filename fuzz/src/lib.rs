//! Owns the shared parts of the fuzz targets in `fuzz/tests/`: proptest
//! configuration (case counts and seeds from the environment), strategies
//! that generate valid MQTT 3.1.1 and MQTT 5 packets in their canonical form
//! (the form a decoder gives back), and byte-level mutations of encoded
//! packets.
//!
//! Targets (each a proptest test, stable toolchain, no instrumentation):
//! - `codecs`: arbitrary and mutated bytes into both decoders (rumqttd's
//!   `V4`/`V5` and the broker's `Codec`), round trips, encoder limits;
//! - `jwt`: arbitrary and mutated tokens into the broker's verifier;
//! - `session`: gate sessions driven by packet sequences over
//!   `tokio::io::duplex`.
//!
//! `PROPTEST_CASES` sets the number of cases of every target (each target has
//! its own default, small enough for `cargo test`); `PROPTEST_RNG_SEED` fixes
//! the seed, so a run can be repeated exactly.

use bytes::{Bytes, BytesMut};
use mqtt_router::protocol::{
    v4::V4, v5::V5, ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode,
    Disconnect, DisconnectProperties, DisconnectReasonCode, Filter, LastWill, LastWillProperties,
    Login, Packet, PingReq, PingResp, Protocol, PubAck, PubAckProperties, PubAckReason, PubComp,
    PubCompProperties, PubCompReason, PubRec, PubRecProperties, PubRecReason, PubRel,
    PubRelProperties, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule, SubAck,
    SubAckProperties, Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck,
    UnsubAckProperties, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// Proptest settings for a target: `default_cases` (sized so that all
/// targets together take well under two minutes on two cores) times
/// `FUZZ_SCALE` (default 1; the documented longer run uses more), unless
/// `PROPTEST_CASES` sets the count outright; the seed from
/// `PROPTEST_RNG_SEED` when set (proptest reads it), random otherwise; no
/// regression files written into the source tree (found cases become named
/// regression tests instead).
pub fn config(default_cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        let scale = std::env::var("FUZZ_SCALE")
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        config.cases = default_cases.saturating_mul(scale);
    }
    config
}

/// Which codec to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// Encodes with rumqttd's codec for `version`.
pub fn encode(version: Version, packet: Packet) -> Result<BytesMut, mqtt_router::protocol::Error> {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => V4.write(packet, &mut out)?,
        Version::V5 => V5.write(packet, &mut out)?,
    };
    Ok(out)
}

/// Decodes one packet with rumqttd's codec for `version`.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Packet, mqtt_router::protocol::Error> {
    match version {
        Version::V4 => V4.read_mut(buf, max_size),
        Version::V5 => V5.read_mut(buf, max_size),
    }
}

// ---------------------------------------------------------------- scalars

/// Short strings with multi-byte characters, separators and wildcards.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_/]{0,10}", "[a-zé€😀/+#$_ ]{0,8}", ".{0,6}",]
}

/// Binary fields (payloads, correlation data).
pub fn blob() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn user_properties() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..3)
}

/// Variable byte integers the encoder can write (subscription identifiers).
fn varint() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..200, 1usize..=268_435_455]
}

/// `Some(p)` unless `p` is the empty set of properties, which encodes as a
/// zero property length and decodes as `None`.
fn canonical<T: PartialEq>(p: Option<T>, empty: T) -> Option<T> {
    p.filter(|p| *p != empty)
}

/// A publish of `qos`: packet id 0 at QoS 0, non-zero otherwise.
pub fn publish() -> impl Strategy<Value = Publish> {
    (text(), blob(), any::<bool>(), qos(), 1u16..).prop_map(|(topic, payload, retain, qos, id)| {
        let pkid = if qos == QoS::AtMostOnce { 0 } else { id };
        Publish::with_qos(Bytes::from(topic), payload, retain, qos, pkid)
    })
}

fn login() -> impl Strategy<Value = Option<Login>> {
    option::of((text(), text())).prop_map(|l| {
        l.filter(|(u, p)| !(u.is_empty() && p.is_empty()))
            .map(|(username, password)| Login { username, password })
    })
}

fn last_will() -> impl Strategy<Value = LastWill> {
    (text(), blob(), qos(), any::<bool>()).prop_map(|(topic, message, qos, retain)| LastWill {
        topic: Bytes::from(topic),
        message,
        qos,
        retain,
    })
}

fn connect() -> impl Strategy<Value = Connect> {
    (any::<u16>(), text(), any::<bool>()).prop_map(|(keep_alive, client_id, clean_session)| {
        Connect {
            keep_alive,
            client_id,
            clean_session,
        }
    })
}

// ---------------------------------------------------------------- MQTT 3.1.1

/// Valid MQTT 3.1.1 packets, as the v4 decoder returns them.
pub fn packet_v4() -> impl Strategy<Value = Packet> {
    let filter = (text(), qos()).prop_map(|(path, qos)| Filter {
        path,
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    });
    let connack_code = prop_oneof![
        Just(ConnectReturnCode::Success),
        Just(ConnectReturnCode::RefusedProtocolVersion),
        Just(ConnectReturnCode::ClientIdentifierNotValid),
        Just(ConnectReturnCode::ServiceUnavailable),
        Just(ConnectReturnCode::BadUserNamePassword),
        Just(ConnectReturnCode::NotAuthorized),
    ];
    let suback_code = prop_oneof![
        qos().prop_map(SubscribeReasonCode::Success),
        Just(SubscribeReasonCode::Failure),
    ];
    prop_oneof![
        (connect(), option::of(last_will()), login())
            .prop_map(|(c, will, login)| Packet::Connect(c, None, will, None, login)),
        (any::<bool>(), connack_code).prop_map(|(session_present, code)| Packet::ConnAck(
            ConnAck {
                session_present,
                code
            },
            None
        )),
        publish().prop_map(|p| Packet::Publish(p, None)),
        any::<u16>().prop_map(|pkid| Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success
            },
            None
        )),
        any::<u16>().prop_map(|pkid| Packet::PubRec(
            PubRec {
                pkid,
                reason: PubRecReason::Success
            },
            None
        )),
        any::<u16>().prop_map(|pkid| Packet::PubRel(
            PubRel {
                pkid,
                reason: PubRelReason::Success
            },
            None
        )),
        any::<u16>().prop_map(|pkid| Packet::PubComp(
            PubComp {
                pkid,
                reason: PubCompReason::Success
            },
            None
        )),
        (any::<u16>(), vec(filter, 1..4))
            .prop_map(|(pkid, filters)| Packet::Subscribe(Subscribe { pkid, filters }, None)),
        (any::<u16>(), vec(suback_code, 1..4))
            .prop_map(|(pkid, return_codes)| Packet::SubAck(SubAck { pkid, return_codes }, None)),
        (any::<u16>(), vec(text(), 1..4))
            .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters }, None)),
        any::<u16>().prop_map(|pkid| Packet::UnsubAck(
            UnsubAck {
                pkid,
                reasons: vec![]
            },
            None
        )),
        Just(Packet::PingReq(PingReq)),
        Just(Packet::PingResp(PingResp)),
        Just(Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection
            },
            None
        )),
    ]
}

// ---------------------------------------------------------------- MQTT 5

fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        option::of(any::<u8>()),
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(text()),
        option::of(blob()),
        user_properties(),
        vec(varint(), 0..3),
        option::of(text()),
    )
        .prop_map(
            |(pfi, expiry, alias, response_topic, correlation, user, ids, content_type)| {
                PublishProperties {
                    payload_format_indicator: pfi,
                    message_expiry_interval: expiry,
                    topic_alias: alias,
                    response_topic,
                    correlation_data: correlation,
                    user_properties: user,
                    subscription_identifiers: ids,
                    content_type,
                }
            },
        )
}

/// Publish properties as the v5 decoder returns them (`None` when empty).
pub fn publish_properties_v5() -> impl Strategy<Value = Option<PublishProperties>> {
    option::of(publish_properties()).prop_map(|p| canonical(p, PublishProperties::default()))
}

fn connect_properties() -> impl Strategy<Value = Option<ConnectProperties>> {
    option::of((
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(any::<u8>()),
        option::of(any::<u8>()),
        user_properties(),
        option::of(text()),
        option::of(blob()),
    ))
    .prop_map(|p| {
        let p = p.map(
            |(
                expiry,
                receive_maximum,
                max_packet_size,
                alias_max,
                rri,
                rpi,
                user,
                method,
                data,
            )| {
                ConnectProperties {
                    session_expiry_interval: expiry,
                    receive_maximum,
                    max_packet_size,
                    topic_alias_max: alias_max,
                    request_response_info: rri,
                    request_problem_info: rpi,
                    user_properties: user,
                    authentication_method: method,
                    authentication_data: data,
                }
            },
        );
        canonical(
            p,
            ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: vec![],
                authentication_method: None,
                authentication_data: None,
            },
        )
    })
}

fn will_properties() -> impl Strategy<Value = Option<LastWillProperties>> {
    option::of((
        option::of(any::<u32>()),
        option::of(any::<u8>()),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(text()),
        option::of(blob()),
        user_properties(),
    ))
    .prop_map(|p| {
        let p = p.map(
            |(delay, pfi, expiry, content_type, response_topic, correlation, user)| {
                LastWillProperties {
                    delay_interval: delay,
                    payload_format_indicator: pfi,
                    message_expiry_interval: expiry,
                    content_type,
                    response_topic,
                    correlation_data: correlation,
                    user_properties: user,
                }
            },
        );
        canonical(
            p,
            LastWillProperties {
                delay_interval: None,
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: vec![],
            },
        )
    })
}

fn connack_properties() -> impl Strategy<Value = Option<ConnAckProperties>> {
    let numbers = (
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(any::<u8>()),
        option::of(any::<u8>()),
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(any::<u8>()),
        option::of(any::<u8>()),
        option::of(any::<u8>()),
        option::of(any::<u16>()),
    );
    let texts = (
        option::of(text()),
        option::of(text()),
        user_properties(),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(blob()),
    );
    option::of((numbers, texts)).prop_map(|p| {
        let p = p.map(
            |((sei, rm, mq, ra, mps, tam, wsa, sia, ssa, ska), t)| ConnAckProperties {
                session_expiry_interval: sei,
                receive_max: rm,
                max_qos: mq,
                retain_available: ra,
                max_packet_size: mps,
                assigned_client_identifier: t.0,
                topic_alias_max: tam,
                reason_string: t.1,
                user_properties: t.2,
                wildcard_subscription_available: wsa,
                subscription_identifiers_available: sia,
                shared_subscription_available: ssa,
                server_keep_alive: ska,
                response_information: t.3,
                server_reference: t.4,
                authentication_method: t.5,
                authentication_data: t.6,
            },
        );
        canonical(p, ConnAckProperties::default())
    })
}

/// A reason string and user properties, the properties of every
/// acknowledgement.
type ReasonProperties = (Option<String>, Vec<(String, String)>);

/// `(reason_string, user_properties)`, `None` when both are empty.
fn reason_properties() -> impl Strategy<Value = Option<ReasonProperties>> {
    option::of((option::of(text()), user_properties()))
        .prop_map(|p| p.filter(|(r, u)| r.is_some() || !u.is_empty()))
}

fn connack_code_v5() -> impl Strategy<Value = ConnectReturnCode> {
    use ConnectReturnCode::*;
    proptest::sample::select(vec![
        Success,
        UnspecifiedError,
        MalformedPacket,
        ProtocolError,
        ImplementationSpecificError,
        UnsupportedProtocolVersion,
        ClientIdentifierNotValid,
        BadUserNamePassword,
        NotAuthorized,
        ServerUnavailable,
        ServerBusy,
        Banned,
        BadAuthenticationMethod,
        TopicNameInvalid,
        PacketTooLarge,
        QuotaExceeded,
        PayloadFormatInvalid,
        RetainNotSupported,
        QoSNotSupported,
        UseAnotherServer,
        ServerMoved,
        ConnectionRateExceeded,
    ])
}

fn puback_reason() -> impl Strategy<Value = PubAckReason> {
    use PubAckReason::*;
    proptest::sample::select(vec![
        Success,
        NoMatchingSubscribers,
        UnspecifiedError,
        ImplementationSpecificError,
        NotAuthorized,
        TopicNameInvalid,
        PacketIdentifierInUse,
        QuotaExceeded,
        PayloadFormatInvalid,
    ])
}

fn pubrec_reason() -> impl Strategy<Value = PubRecReason> {
    use PubRecReason::*;
    proptest::sample::select(vec![
        Success,
        NoMatchingSubscribers,
        UnspecifiedError,
        ImplementationSpecificError,
        NotAuthorized,
        TopicNameInvalid,
        PacketIdentifierInUse,
        QuotaExceeded,
        PayloadFormatInvalid,
    ])
}

fn suback_code_v5() -> impl Strategy<Value = SubscribeReasonCode> {
    use SubscribeReasonCode::*;
    proptest::sample::select(vec![
        QoS0,
        QoS1,
        QoS2,
        Unspecified,
        ImplementationSpecific,
        NotAuthorized,
        TopicFilterInvalid,
        PkidInUse,
        QuotaExceeded,
        SharedSubscriptionsNotSupported,
        SubscriptionIdNotSupported,
        WildcardSubscriptionsNotSupported,
    ])
}

fn unsuback_reason() -> impl Strategy<Value = UnsubAckReason> {
    use UnsubAckReason::*;
    proptest::sample::select(vec![
        Success,
        NoSubscriptionExisted,
        UnspecifiedError,
        ImplementationSpecificError,
        NotAuthorized,
        TopicFilterInvalid,
        PacketIdentifierInUse,
    ])
}

/// Every MQTT 5 DISCONNECT reason code.
pub fn disconnect_reason() -> impl Strategy<Value = DisconnectReasonCode> {
    use DisconnectReasonCode::*;
    proptest::sample::select(vec![
        NormalDisconnection,
        DisconnectWithWillMessage,
        UnspecifiedError,
        MalformedPacket,
        ProtocolError,
        ImplementationSpecificError,
        NotAuthorized,
        ServerBusy,
        ServerShuttingDown,
        KeepAliveTimeout,
        SessionTakenOver,
        TopicFilterInvalid,
        TopicNameInvalid,
        ReceiveMaximumExceeded,
        TopicAliasInvalid,
        PacketTooLarge,
        MessageRateTooHigh,
        QuotaExceeded,
        AdministrativeAction,
        PayloadFormatInvalid,
        RetainNotSupported,
        QoSNotSupported,
        UseAnotherServer,
        ServerMoved,
        SharedSubscriptionNotSupported,
        ConnectionRateExceeded,
        MaximumConnectTime,
        SubscriptionIdentifiersNotSupported,
        WildcardSubscriptionsNotSupported,
    ])
}

fn filter_v5() -> impl Strategy<Value = Filter> {
    let rule = prop_oneof![
        Just(RetainForwardRule::OnEverySubscribe),
        Just(RetainForwardRule::OnNewSubscribe),
        Just(RetainForwardRule::Never),
    ];
    (text(), qos(), any::<bool>(), any::<bool>(), rule).prop_map(
        |(path, qos, nolocal, preserve_retain, retain_forward_rule)| Filter {
            path,
            qos,
            nolocal,
            preserve_retain,
            retain_forward_rule,
        },
    )
}

/// Valid MQTT 5 packets, as the v5 decoder returns them.
pub fn packet_v5() -> impl Strategy<Value = Packet> {
    let pubrel_reason = prop_oneof![
        Just(PubRelReason::Success),
        Just(PubRelReason::PacketIdentifierNotFound)
    ];
    let pubcomp_reason = prop_oneof![
        Just(PubCompReason::Success),
        Just(PubCompReason::PacketIdentifierNotFound)
    ];
    let disconnect_properties = option::of((
        option::of(any::<u32>()),
        option::of(text()),
        user_properties(),
        option::of(text()),
    ))
    .prop_map(|p| {
        let p = p.map(|(sei, reason, user, reference)| DisconnectProperties {
            session_expiry_interval: sei,
            reason_string: reason,
            user_properties: user,
            server_reference: reference,
        });
        canonical(
            p,
            DisconnectProperties {
                session_expiry_interval: None,
                reason_string: None,
                user_properties: vec![],
                server_reference: None,
            },
        )
    });
    let subscribe_properties = option::of((option::of(1usize..=268_435_455), user_properties()))
        .prop_map(|p| {
            p.filter(|(id, user)| id.is_some() || !user.is_empty())
                .map(|(id, user_properties)| SubscribeProperties {
                    id,
                    user_properties,
                })
        });
    prop_oneof![
        (
            connect(),
            connect_properties(),
            option::of((last_will(), will_properties())),
            login()
        )
            .prop_map(|(c, props, will, login)| {
                let (will, will_props) = match will {
                    Some((w, p)) => (Some(w), p),
                    None => (None, None),
                };
                Packet::Connect(c, props, will, will_props, login)
            }),
        (any::<bool>(), connack_code_v5(), connack_properties()).prop_map(
            |(session_present, code, props)| Packet::ConnAck(
                ConnAck {
                    session_present,
                    code
                },
                props
            )
        ),
        (publish(), publish_properties_v5()).prop_map(|(p, props)| Packet::Publish(p, props)),
        (any::<u16>(), puback_reason(), reason_properties()).prop_map(|(pkid, reason, p)| {
            Packet::PubAck(
                PubAck { pkid, reason },
                p.map(|(reason_string, user_properties)| PubAckProperties {
                    reason_string,
                    user_properties,
                }),
            )
        }),
        (any::<u16>(), pubrec_reason(), reason_properties()).prop_map(|(pkid, reason, p)| {
            Packet::PubRec(
                PubRec { pkid, reason },
                p.map(|(reason_string, user_properties)| PubRecProperties {
                    reason_string,
                    user_properties,
                }),
            )
        }),
        (any::<u16>(), pubrel_reason, reason_properties()).prop_map(|(pkid, reason, p)| {
            Packet::PubRel(
                PubRel { pkid, reason },
                p.map(|(reason_string, user_properties)| PubRelProperties {
                    reason_string,
                    user_properties,
                }),
            )
        }),
        (any::<u16>(), pubcomp_reason, reason_properties()).prop_map(|(pkid, reason, p)| {
            Packet::PubComp(
                PubComp { pkid, reason },
                p.map(|(reason_string, user_properties)| PubCompProperties {
                    reason_string,
                    user_properties,
                }),
            )
        }),
        (any::<u16>(), vec(filter_v5(), 1..4), subscribe_properties).prop_map(
            |(pkid, filters, props)| Packet::Subscribe(Subscribe { pkid, filters }, props)
        ),
        (
            any::<u16>(),
            vec(suback_code_v5(), 1..4),
            reason_properties()
        )
            .prop_map(|(pkid, return_codes, p)| Packet::SubAck(
                SubAck { pkid, return_codes },
                p.map(|(reason_string, user_properties)| SubAckProperties {
                    reason_string,
                    user_properties,
                })
            )),
        (any::<u16>(), vec(text(), 1..4), user_properties()).prop_map(|(pkid, filters, user)| {
            Packet::Unsubscribe(
                Unsubscribe { pkid, filters },
                (!user.is_empty()).then_some(UnsubscribeProperties {
                    user_properties: user,
                }),
            )
        }),
        (
            any::<u16>(),
            vec(unsuback_reason(), 1..4),
            reason_properties()
        )
            .prop_map(|(pkid, reasons, p)| Packet::UnsubAck(
                UnsubAck { pkid, reasons },
                p.map(|(reason_string, user_properties)| UnsubAckProperties {
                    reason_string,
                    user_properties,
                })
            )),
        Just(Packet::PingReq(PingReq)),
        Just(Packet::PingResp(PingResp)),
        (disconnect_reason(), disconnect_properties).prop_map(|(reason_code, props)| {
            Packet::Disconnect(Disconnect { reason_code }, props)
        }),
    ]
}

/// What an MQTT 3.1.1 peer receives of an MQTT 5 packet: the same packet
/// without properties, reason codes reduced to what 3.1.1 carries. `None`
/// for packets whose v5 form has no v4 equivalent the v4 decoder returns
/// as is (the caller then only checks that encoding does not panic).
pub fn as_v4(packet: &Packet) -> Option<Packet> {
    Some(match packet.clone() {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::Subscribe(s, _) => Packet::Subscribe(
            Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| Filter {
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                        ..f
                    })
                    .collect(),
            },
            None,
        ),
        Packet::Unsubscribe(u, _) => Packet::Unsubscribe(u, None),
        Packet::Connect(c, _, will, _, login) => Packet::Connect(c, None, will, None, login),
        Packet::PingReq(p) => Packet::PingReq(p),
        Packet::PingResp(p) => Packet::PingResp(p),
        _ => return None,
    })
}

// ---------------------------------------------------------------- mutations

/// One change to an encoded packet.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Insert {
        at: usize,
        value: u8,
    },
    Remove {
        at: usize,
    },
    Truncate {
        to: usize,
    },
    /// Rewrites the remaining length (1 to 4 bytes) with another value.
    Length {
        value: u32,
    },
    /// Repeats a slice (lengths that count it twice).
    Duplicate {
        at: usize,
        len: usize,
    },
}

/// A few mutations to apply in order.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Insert { at, value }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        prop_oneof![0u32..300, 0u32..268_435_456].prop_map(|value| Mutation::Length { value }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
    ];
    vec(one, 1..4)
}

/// Applies `mutations` to `bytes` (positions taken modulo the length).
pub fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::FlipBit { at, bit } if len > 0 => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::SetByte { at, value } if len > 0 => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b = value;
                }
            }
            Mutation::Insert { at, value } => bytes.insert(at % (len + 1), value),
            Mutation::Remove { at } if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::Truncate { to } => bytes.truncate(to % (len + 1)),
            Mutation::Length { value } if len > 1 => {
                // Skip the old remaining length, write the new one in its place.
                let old = bytes
                    .iter()
                    .skip(1)
                    .take(4)
                    .position(|b| b & 0x80 == 0)
                    .map_or(1, |p| p + 1);
                let mut encoded = Vec::new();
                let mut x = value;
                loop {
                    let mut byte = (x % 128) as u8;
                    x /= 128;
                    if x > 0 {
                        byte |= 0x80;
                    }
                    encoded.push(byte);
                    if x == 0 {
                        break;
                    }
                }
                let end = (1 + old).min(len);
                bytes.splice(1..end, encoded);
            }
            Mutation::Duplicate { at, len: n } if len > 0 => {
                let start = at % len;
                let end = (start + n).min(len);
                let copy: Vec<u8> = bytes
                    .get(start..end)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                let tail = bytes.split_off(end);
                bytes.extend_from_slice(&copy);
                bytes.extend_from_slice(&tail);
            }
            _ => {}
        }
    }
}
