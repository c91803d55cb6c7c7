//! Owns the translation of a packet for the protocol version of the client
//! it is written to: MQTT 5 packets (from the router, a handler's reply, the
//! gate's own answers) reach an MQTT 3.1.1 client without what 3.1.1 cannot
//! carry, instead of failing in its encoder.
//!
//! Every PUBLISH of this product carries MQTT 5 properties (the SDK sets a
//! content type on replies; the gate stamps `user_id`/`client_id` on every
//! device command), so without this no 3.1.1 client could receive them.

use crate::codec::Version;
use rumqttd::protocol::Packet;

/// The form of `packet` that a client of `version` can receive, or `None`
/// when that protocol has no such packet (a server DISCONNECT under 3.1.1).
pub fn for_client(version: Version, packet: Packet) -> Option<Packet> {
    if version == Version::V5 {
        return Some(packet);
    }
    // MQTT 3.1.1: no properties anywhere, no server DISCONNECT. Reason codes
    // of acknowledgements are not written by the 3.1.1 encoder (only the
    // packet id), and SUBACK/CONNACK codes are mapped for 3.1.1 where they are
    // made (`answers`).
    match packet {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use bytes::{Bytes, BytesMut};
    use rumqttd::protocol::{
        Disconnect, DisconnectReasonCode, PubAck, PubAckProperties, PubAckReason, Publish,
        PublishProperties, QoS,
    };

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
        let translated = for_client(Version::V4, packet).expect("a 3.1.1 form");
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
        assert!(for_client(Version::V4, disconnect).is_none());
    }

    #[test]
    fn mqtt_5_packets_pass_unchanged() {
        let packet = publish_with_properties();
        assert_eq!(for_client(Version::V5, packet.clone()), Some(packet));
    }
}
