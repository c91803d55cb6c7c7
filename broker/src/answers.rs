//! Owns the mapping of the gate's decisions to packets on the wire, for both
//! protocol versions, in one place: CONNACK refusals, SUBACK and PUBACK/PUBREC
//! denials, and server DISCONNECTs (which MQTT 3.1.1 does not have).

use crate::acl::Denial;
use crate::auth::Refusal;
use crate::codec::Version;
use crate::delivery::ack::Outcome;
use crate::router::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Packet, PubAck, PubAckProperties, PubAckReason, PubRec, PubRecProperties,
    PubRecReason, SubscribeReasonCode,
};

/// Why a CONNECT is answered with a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRefusal {
    Auth(Refusal),
    /// Empty client id with a persistent session, or otherwise unusable.
    ClientIdNotValid(&'static str),
    /// The will names a topic this client may not publish to.
    WillNotAllowed,
    /// Neither MQTT 3.1.1 nor 5.
    UnsupportedProtocol,
    /// The broker is at its connection limit or its router refused the session.
    Busy(&'static str),
    /// A per-user quota is used up (persistent sessions).
    QuotaExceeded(&'static str),
    /// The will carries more user properties or correlation data than a
    /// device may send (`property_caps`); 0x83.
    WillPropertiesTooLarge(&'static str),
    /// The CONNECT breaks a rule of MQTT 5 (a property of 0 where 0 is not
    /// allowed, one repeated, ...): MQTT 5 `0x82`.
    ProtocolError(&'static str),
    /// An MQTT 5 Authentication Method: the broker offers none (`0x8C`).
    BadAuthenticationMethod,
}

impl ConnectRefusal {
    /// Short label for logs, metrics and the MQTT 5 reason string.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectRefusal::Auth(r) => r.reason(),
            ConnectRefusal::ClientIdNotValid(r)
            | ConnectRefusal::Busy(r)
            | ConnectRefusal::QuotaExceeded(r)
            | ConnectRefusal::WillPropertiesTooLarge(r)
            | ConnectRefusal::ProtocolError(r) => r,
            ConnectRefusal::BadAuthenticationMethod => "authentication method not supported",
            ConnectRefusal::WillNotAllowed => "will topic not allowed",
            ConnectRefusal::UnsupportedProtocol => "unsupported protocol version",
        }
    }
}

/// The CONNACK that refuses a connection.
pub fn connack_refusal(version: Version, refusal: &ConnectRefusal) -> Packet {
    let code = match (version, refusal) {
        (_, ConnectRefusal::Auth(Refusal::BadCredentials(_))) => {
            ConnectReturnCode::BadUserNamePassword
        }
        (_, ConnectRefusal::Auth(Refusal::NotAuthorized(_)) | ConnectRefusal::WillNotAllowed) => {
            ConnectReturnCode::NotAuthorized
        }
        (_, ConnectRefusal::ClientIdNotValid(_)) => ConnectReturnCode::ClientIdentifierNotValid,
        (Version::V4, ConnectRefusal::UnsupportedProtocol) => {
            ConnectReturnCode::RefusedProtocolVersion
        }
        (Version::V5, ConnectRefusal::UnsupportedProtocol) => {
            ConnectReturnCode::UnsupportedProtocolVersion
        }
        (Version::V4, ConnectRefusal::Auth(Refusal::Unavailable(_)) | ConnectRefusal::Busy(_)) => {
            ConnectReturnCode::ServiceUnavailable
        }
        (Version::V5, ConnectRefusal::Auth(Refusal::Unavailable(_))) => {
            ConnectReturnCode::ServerUnavailable
        }
        (Version::V5, ConnectRefusal::Busy(_)) => ConnectReturnCode::ServerBusy,
        // MQTT 3.1.1 has no quota code: 3 (server unavailable) tells the
        // client to come back later, which is what it can do about it.
        (Version::V4, ConnectRefusal::QuotaExceeded(_)) => ConnectReturnCode::ServiceUnavailable,
        (Version::V5, ConnectRefusal::QuotaExceeded(_)) => ConnectReturnCode::QuotaExceeded,
        // A 3.1.1 will has no properties; the arm keeps the match total.
        (Version::V4, ConnectRefusal::WillPropertiesTooLarge(_)) => {
            ConnectReturnCode::ServiceUnavailable
        }
        (Version::V5, ConnectRefusal::WillPropertiesTooLarge(_)) => {
            ConnectReturnCode::ImplementationSpecificError
        }
        // MQTT 5 only (3.1.1 CONNECTs have no properties); should one ever
        // be refused so, the 3.1.1 encoder writes 3 and 4.
        (_, ConnectRefusal::ProtocolError(_)) => ConnectReturnCode::ProtocolError,
        (_, ConnectRefusal::BadAuthenticationMethod) => ConnectReturnCode::BadAuthenticationMethod,
    };
    let properties = match version {
        Version::V4 => None,
        Version::V5 => Some(ConnAckProperties {
            reason_string: Some(refusal.reason().to_owned()),
            ..Default::default()
        }),
    };
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        properties,
    )
}

/// The SUBACK code for a refused filter.
pub fn suback_denial(version: Version, denial: Denial) -> SubscribeReasonCode {
    match (version, denial) {
        (Version::V4, _) => SubscribeReasonCode::Failure,
        (Version::V5, Denial::NotAuthorized) => SubscribeReasonCode::NotAuthorized,
        (Version::V5, Denial::Invalid | Denial::TopicTooLong | Denial::TooManyLevels) => {
            SubscribeReasonCode::TopicFilterInvalid
        }
        (Version::V5, Denial::QuotaExceeded) => SubscribeReasonCode::QuotaExceeded,
        // Publishes only; a SUBSCRIBE carries no such properties.
        (Version::V5, Denial::PropertiesTooLarge) => SubscribeReasonCode::ImplementationSpecific,
    }
}

/// The PUBACK for a refused QoS 1 publish. MQTT 3.1.1 has no reason codes, so
/// there the publish is acknowledged and dropped (as Mosquitto does).
pub fn puback_denial(version: Version, pkid: u16, denial: Denial) -> Packet {
    match version {
        Version::V4 => Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        ),
        Version::V5 => Packet::PubAck(
            PubAck {
                pkid,
                reason: match denial {
                    Denial::NotAuthorized => PubAckReason::NotAuthorized,
                    Denial::Invalid | Denial::TopicTooLong | Denial::TooManyLevels => {
                        PubAckReason::TopicNameInvalid
                    }
                    Denial::QuotaExceeded => PubAckReason::QuotaExceeded,
                    // 0x83: "valid, but the receiver is not willing to accept
                    // it" (MQTT 5 allows no size code in PUBACK).
                    Denial::PropertiesTooLarge => PubAckReason::ImplementationSpecificError,
                },
            },
            Some(PubAckProperties {
                reason_string: Some(format!("publish refused: {}", denial.label())),
                user_properties: Vec::new(),
            }),
        ),
    }
}

/// The PUBREC for a refused QoS 2 publish (see [`puback_denial`]).
pub fn pubrec_denial(version: Version, pkid: u16, denial: Denial) -> Packet {
    match version {
        Version::V4 => Packet::PubRec(
            PubRec {
                pkid,
                reason: PubRecReason::Success,
            },
            None,
        ),
        Version::V5 => Packet::PubRec(
            PubRec {
                pkid,
                reason: match denial {
                    Denial::NotAuthorized => PubRecReason::NotAuthorized,
                    Denial::Invalid | Denial::TopicTooLong | Denial::TooManyLevels => {
                        PubRecReason::TopicNameInvalid
                    }
                    Denial::QuotaExceeded => PubRecReason::QuotaExceeded,
                    Denial::PropertiesTooLarge => PubRecReason::ImplementationSpecificError,
                },
            },
            Some(PubRecProperties {
                reason_string: Some(format!("publish refused: {}", denial.label())),
                user_properties: Vec::new(),
            }),
        ),
    }
}

/// Why the server ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerDisconnect {
    ShuttingDown,
    TakenOver,
    KeepAliveTimeout,
    TokenExpired,
    /// The user was revoked (MQTT 5 `0x98` administrative action).
    Revoked,
    PacketTooLarge,
    Malformed,
    ProtocolError,
    /// More unacknowledged QoS 1/2 publishes than the Receive Maximum the
    /// broker advertised (MQTT 5 `0x93`).
    ReceiveMaximumExceeded,
    /// The client did not take what was written to it within the write
    /// deadline (no DISCONNECT can reach it: it is not reading).
    WriteTimeout,
    /// A bug in the broker ended this session (a contained panic).
    InternalError,
    /// A QoS 1 publish of an MQTT 3.1.1 client was not stored for delivery
    /// (its PUBACK cannot say so: the connection ends without it, and the
    /// client sends it again on its next connection).
    NotStored,
}

impl ServerDisconnect {
    pub fn reason(self) -> &'static str {
        match self {
            ServerDisconnect::ShuttingDown => "server shutting down",
            ServerDisconnect::TakenOver => "session taken over by a new connection",
            ServerDisconnect::KeepAliveTimeout => "keep alive timeout",
            ServerDisconnect::TokenExpired => "token expired",
            ServerDisconnect::Revoked => "user revoked",
            ServerDisconnect::PacketTooLarge => "packet too large",
            ServerDisconnect::Malformed => "malformed packet",
            ServerDisconnect::ProtocolError => "protocol error",
            ServerDisconnect::ReceiveMaximumExceeded => "receive maximum exceeded",
            ServerDisconnect::WriteTimeout => "write timeout",
            ServerDisconnect::InternalError => "internal error",
            ServerDisconnect::NotStored => "a publish could not be stored for delivery",
        }
    }
}

/// The PUBACK for a QoS 1 publish the delivery did not store (Redis
/// refused it, its retries ran out, or the wait's deadline passed: `0x80`;
/// the queue in front of Redis was full: `0x97`). `None` for MQTT 3.1.1,
/// whose PUBACK has no reason: the session ends without it instead.
pub fn puback_not_stored(version: Version, pkid: u16, outcome: Outcome) -> Option<Packet> {
    if version == Version::V4 {
        return None;
    }
    let (full, text) = not_stored(outcome);
    let reason = if full {
        PubAckReason::QuotaExceeded
    } else {
        PubAckReason::UnspecifiedError
    };
    Some(Packet::PubAck(
        PubAck { pkid, reason },
        Some(PubAckProperties {
            reason_string: Some(text.to_owned()),
            user_properties: Vec::new(),
        }),
    ))
}

/// The PUBREC for a QoS 2 publish the delivery did not store, as
/// [`puback_not_stored`] (`0x80`, `0x97`; `None` for MQTT 3.1.1, whose
/// connection ends without it so that the client sends it again).
pub fn pubrec_not_stored(version: Version, pkid: u16, outcome: Outcome) -> Option<Packet> {
    if version == Version::V4 {
        return None;
    }
    let (full, text) = not_stored(outcome);
    let reason = if full {
        PubRecReason::QuotaExceeded
    } else {
        PubRecReason::UnspecifiedError
    };
    Some(Packet::PubRec(
        PubRec { pkid, reason },
        Some(PubRecProperties {
            reason_string: Some(text.to_owned()),
            user_properties: Vec::new(),
        }),
    ))
}

/// Whether a publish not stored met a full queue, and the reason string.
fn not_stored(outcome: Outcome) -> (bool, &'static str) {
    match outcome {
        Outcome::QueueFull => (true, "not stored: the delivery queue is full"),
        Outcome::Failed | Outcome::Stored => {
            (false, "not stored: the delivery store did not take it")
        }
    }
}

/// The DISCONNECT to send, if the protocol has one (MQTT 5 only).
pub fn server_disconnect(version: Version, why: ServerDisconnect) -> Option<Packet> {
    if version == Version::V4 {
        return None;
    }
    let reason_code = match why {
        ServerDisconnect::ShuttingDown => DisconnectReasonCode::ServerShuttingDown,
        ServerDisconnect::TakenOver => DisconnectReasonCode::SessionTakenOver,
        ServerDisconnect::KeepAliveTimeout => DisconnectReasonCode::KeepAliveTimeout,
        ServerDisconnect::TokenExpired => DisconnectReasonCode::NotAuthorized,
        ServerDisconnect::Revoked => DisconnectReasonCode::AdministrativeAction,
        ServerDisconnect::PacketTooLarge => DisconnectReasonCode::PacketTooLarge,
        ServerDisconnect::Malformed => DisconnectReasonCode::MalformedPacket,
        ServerDisconnect::ProtocolError => DisconnectReasonCode::ProtocolError,
        ServerDisconnect::ReceiveMaximumExceeded => DisconnectReasonCode::ReceiveMaximumExceeded,
        // Nothing would read it.
        ServerDisconnect::WriteTimeout => return None,
        ServerDisconnect::InternalError => DisconnectReasonCode::ImplementationSpecificError,
        ServerDisconnect::NotStored => DisconnectReasonCode::UnspecifiedError,
    };
    Some(Packet::Disconnect(
        Disconnect { reason_code },
        Some(DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(why.reason().to_owned()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use bytes::BytesMut;

    fn wire(version: Version, packet: Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        Codec::new(version, 1 << 20)
            .encode(packet, &mut out)
            .unwrap();
        out.to_vec()
    }

    #[test]
    fn v4_connack_codes() {
        let cases = [
            (ConnectRefusal::Auth(Refusal::BadCredentials("x")), 4),
            (ConnectRefusal::Auth(Refusal::NotAuthorized("x")), 5),
            (ConnectRefusal::Auth(Refusal::Unavailable("x")), 3),
            (ConnectRefusal::ClientIdNotValid("x"), 2),
            (ConnectRefusal::WillNotAllowed, 5),
            (ConnectRefusal::UnsupportedProtocol, 1),
            (ConnectRefusal::Busy("x"), 3),
        ];
        for (refusal, code) in cases {
            assert_eq!(
                wire(Version::V4, connack_refusal(Version::V4, &refusal)),
                vec![0x20, 2, 0, code]
            );
        }
    }

    #[test]
    fn v5_connack_codes_carry_a_reason_string() {
        let cases = [
            (
                ConnectRefusal::Auth(Refusal::BadCredentials("bad signature")),
                0x86,
            ),
            (
                ConnectRefusal::Auth(Refusal::NotAuthorized("token expired")),
                0x87,
            ),
            (ConnectRefusal::ClientIdNotValid("empty client id"), 0x85),
            (ConnectRefusal::Busy("full"), 0x89),
            (ConnectRefusal::ProtocolError("receive maximum 0"), 0x82),
            (ConnectRefusal::BadAuthenticationMethod, 0x8C),
        ];
        for (refusal, code) in cases {
            let bytes = wire(Version::V5, connack_refusal(Version::V5, &refusal));
            assert_eq!(bytes[3], code, "{refusal:?}");
            let text = String::from_utf8_lossy(&bytes);
            assert!(text.contains(refusal.reason()), "{refusal:?}");
        }
    }

    #[test]
    fn v4_has_no_server_disconnect() {
        assert!(server_disconnect(Version::V4, ServerDisconnect::ShuttingDown).is_none());
        let bytes = wire(
            Version::V5,
            server_disconnect(Version::V5, ServerDisconnect::ShuttingDown).unwrap(),
        );
        assert_eq!(bytes[0], 0xE0);
        assert_eq!(bytes[2], 0x8B);
    }
}
