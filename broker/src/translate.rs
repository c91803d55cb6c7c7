//! Owns the translation of a packet for the protocol version of the client
//! it is written to: MQTT 5 packets (from the router, a handler's reply, the
//! gate's own answers) reach an MQTT 3.1.1 client without what 3.1.1 cannot
//! carry, instead of failing in its encoder.
//!
//! Every PUBLISH of this product carries MQTT 5 properties (the SDK sets a
//! content type on replies; the gate stamps `user_id`/`client_id` on every
//! device command), so without this no 3.1.1 client could receive them.
//!
//! An MQTT 3.1.1 *handler* still needs to know who sent a command, and 3.1.1
//! has no properties to carry it: a command stamped with the sender's
//! identity reaches it wrapped as `{"user_id", "client_id", "token_iat",
//! "payload": "<standard base64 of the original payload>"}` (`token_iat`:
//! the sender token's `iat`, a number, to check against the user's
//! revocation). Wrapped by the gate from its own stamp, so it is as
//! unforgeable as the MQTT 5 properties.

use crate::codec::Version;
use crate::router::protocol::{Packet, Publish, PublishProperties};
use base64::Engine;
use bytes::Bytes;
use protocol::topics::{CLIENT_ID_PROPERTY, TOKEN_IAT_PROPERTY, USER_ID_PROPERTY};

/// Who a packet is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    Device,
    Handler,
}

/// The form of `packet` that a client of `version` can receive, or `None`
/// when that protocol has no such packet (a server DISCONNECT under 3.1.1).
pub fn for_client(version: Version, receiver: Receiver, packet: Packet) -> Option<Packet> {
    if version == Version::V5 {
        return Some(packet);
    }
    // MQTT 3.1.1: no properties anywhere, no server DISCONNECT. Reason codes
    // of acknowledgements are not written by the 3.1.1 encoder (only the
    // packet id), and SUBACK/CONNACK codes are mapped for 3.1.1 where they are
    // made (`answers`).
    match packet {
        Packet::Publish(publish, Some(properties)) if receiver == Receiver::Handler => Some(
            Packet::Publish(with_identity_in_payload(publish, &properties), None),
        ),
        Packet::Publish(publish, _) => Some(Packet::Publish(publish, None)),
        Packet::PubAck(ack, _) => Some(Packet::PubAck(ack, None)),
        Packet::PubRec(rec, _) => Some(Packet::PubRec(rec, None)),
        Packet::PubRel(rel, _) => Some(Packet::PubRel(rel, None)),
        Packet::PubComp(comp, _) => Some(Packet::PubComp(comp, None)),
        Packet::SubAck(ack, _) => Some(Packet::SubAck(ack, None)),
        Packet::UnsubAck(ack, _) => Some(Packet::UnsubAck(ack, None)),
        Packet::ConnAck(ack, _) => Some(Packet::ConnAck(ack, None)),
        Packet::PingResp(pong) => Some(Packet::PingResp(pong)),
        Packet::PingReq(ping) => Some(Packet::PingReq(ping)),
        // A server sends neither; 3.1.1 has no server DISCONNECT.
        Packet::Connect(..)
        | Packet::Subscribe(..)
        | Packet::Unsubscribe(..)
        | Packet::Disconnect(..) => None,
    }
}

/// The value of the gate's stamp `name` (the last of that name: the gate
/// appends its own after dropping any the device sent).
fn stamped<'a>(properties: &'a PublishProperties, name: &str) -> Option<&'a str> {
    properties
        .user_properties
        .iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// A stamped command wrapped for a 3.1.1 handler; anything else unchanged.
fn with_identity_in_payload(mut publish: Publish, properties: &PublishProperties) -> Publish {
    let (Some(user_id), Some(client_id)) = (
        stamped(properties, USER_ID_PROPERTY),
        stamped(properties, CLIENT_ID_PROPERTY),
    ) else {
        return publish;
    };
    // The gate stamps a decimal number; anything else (a handler's own
    // publish) reads as 0, which every revocation by time refuses.
    let token_iat = stamped(properties, TOKEN_IAT_PROPERTY)
        .and_then(|iat| iat.parse::<u64>().ok())
        .unwrap_or(0);
    let envelope = serde_json::json!({
        "user_id": user_id,
        "client_id": client_id,
        "token_iat": token_iat,
        "payload": base64::engine::general_purpose::STANDARD.encode(&publish.payload),
    });
    publish.payload = Bytes::from(envelope.to_string());
    publish
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::router::protocol::{
        Disconnect, DisconnectReasonCode, PubAck, PubAckProperties, PubAckReason, Publish,
        PublishProperties, QoS,
    };
    use bytes::{Bytes, BytesMut};

    fn publish_with_properties() -> Packet {
        let publish = Publish::with_qos(
            Bytes::from_static(b"u1_reply"),
            Bytes::from_static(b"{}"),
            false,
            QoS::AtLeastOnce,
            7,
        );
        let properties = PublishProperties {
            content_type: Some("application/json".into()),
            user_properties: vec![("user_id".into(), "u1".into())],
            ..Default::default()
        };
        Packet::Publish(publish, Some(properties))
    }

    /// Decodes what a 3.1.1 client would read.
    fn as_v4_client_reads(packet: Packet) -> Packet {
        let codec = Codec::new(Version::V4, 1 << 20);
        let mut wire = BytesMut::new();
        let translated = for_client(Version::V4, Receiver::Device, packet).expect("a 3.1.1 form");
        codec.encode(translated, &mut wire).expect("encodes");
        codec.decode(&mut wire).expect("decodes").expect("whole")
    }

    #[test]
    fn a_publish_with_properties_reaches_a_3_1_1_client_without_them() {
        match as_v4_client_reads(publish_with_properties()) {
            Packet::Publish(publish, None) => {
                assert_eq!(&publish.topic[..], b"u1_reply");
                assert_eq!(&publish.payload[..], b"{}");
                assert_eq!(publish.qos(), QoS::AtLeastOnce);
                assert_eq!(publish.pkid(), 7);
            }
            other => panic!("expected a plain publish, got {other:?}"),
        }
    }

    #[test]
    fn acknowledgements_lose_their_properties_not_their_packet_id() {
        let ack = Packet::PubAck(
            PubAck {
                pkid: 9,
                reason: PubAckReason::Success,
            },
            Some(PubAckProperties {
                reason_string: Some("ok".into()),
                user_properties: Vec::new(),
            }),
        );
        match as_v4_client_reads(ack) {
            Packet::PubAck(ack, None) => assert_eq!(ack.pkid, 9),
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    }

    #[test]
    fn a_3_1_1_client_gets_no_server_disconnect() {
        let disconnect = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::ServerShuttingDown,
            },
            None,
        );
        assert!(for_client(Version::V4, Receiver::Device, disconnect).is_none());
    }

    #[test]
    fn mqtt_5_packets_pass_unchanged() {
        let packet = publish_with_properties();
        assert_eq!(
            for_client(Version::V5, Receiver::Handler, packet.clone()),
            Some(packet)
        );
    }

    #[test]
    fn a_3_1_1_handler_gets_the_senders_identity_in_the_payload() {
        let publish = Publish::with_qos(
            Bytes::from_static(b"sync"),
            Bytes::from_static(b"\x00{}"),
            false,
            QoS::AtLeastOnce,
            3,
        );
        let properties = PublishProperties {
            user_properties: vec![
                ("trace".into(), "t".into()),
                ("user_id".into(), "68946".into()),
                ("client_id".into(), "phone".into()),
                ("token_iat".into(), "1700000000".into()),
            ],
            ..Default::default()
        };
        let Some(Packet::Publish(wrapped, None)) = for_client(
            Version::V4,
            Receiver::Handler,
            Packet::Publish(publish, Some(properties)),
        ) else {
            panic!("expected a publish without properties");
        };
        let body: serde_json::Value = serde_json::from_slice(&wrapped.payload).expect("json");
        assert_eq!(body["user_id"], "68946");
        assert_eq!(body["client_id"], "phone");
        assert_eq!(body["token_iat"], 1_700_000_000u64);
        let original = base64::engine::general_purpose::STANDARD
            .decode(body["payload"].as_str().expect("payload"))
            .expect("base64");
        assert_eq!(original, b"\x00{}");
    }

    #[test]
    fn a_3_1_1_handler_gets_unstamped_publishes_as_they_are() {
        let publish = Publish::with_qos(
            Bytes::from_static(b"u1_x"),
            Bytes::from_static(b"raw"),
            false,
            QoS::AtMostOnce,
            0,
        );
        let properties = PublishProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let Some(Packet::Publish(plain, None)) = for_client(
            Version::V4,
            Receiver::Handler,
            Packet::Publish(publish, Some(properties)),
        ) else {
            panic!("expected a publish without properties");
        };
        assert_eq!(&plain.payload[..], b"raw");
    }
}
