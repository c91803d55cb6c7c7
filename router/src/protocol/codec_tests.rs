//! Tests of the codec changes from upstream (DESIGN.md, "Codecs"): each
//! panicked, wrote wrong bytes or accepted a malformed packet in rumqttd
//! 0.20. The fuzz targets (`fuzz/tests/codecs.rs`) search for more; these
//! pin the bugs found, in the crate that owns the codecs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use super::v4::V4;
use super::v5::V5;
use super::*;
use bytes::{Bytes, BytesMut};

const LARGE: usize = 1 << 20;

fn encode(version: u8, packet: Packet) -> Result<BytesMut, Error> {
    let mut out = BytesMut::new();
    if version == 4 {
        V4.write(packet, &mut out)?;
    } else {
        V5.write(packet, &mut out)?;
    }
    Ok(out)
}

fn decode(version: u8, buf: &mut BytesMut) -> Result<Packet, Error> {
    if version == 4 {
        V4.read_mut(buf, LARGE)
    } else {
        V5.read_mut(buf, LARGE)
    }
}

/// A decoded publish tells its QoS and packet id (upstream kept both
/// crate-private, so a gate could not tell a QoS 1 publish it must
/// acknowledge from a QoS 0 one).
#[test]
fn decoded_publish_exposes_qos_and_packet_id() {
    for version in [4, 5] {
        let sent = Publish::with_qos("t", "p", false, QoS::AtLeastOnce, 7);
        let mut buf = encode(version, Packet::Publish(sent, None)).unwrap();
        let Packet::Publish(publish, _) = decode(version, &mut buf).unwrap() else {
            panic!("not a publish");
        };
        assert_eq!(publish.qos(), QoS::AtLeastOnce);
        assert_eq!(publish.pkid(), 7);
    }
}

/// The 3.1.1 encoder hit `unreachable!` on a publish with MQTT 5
/// properties (every reply of the SDK has a content type); it now sends the
/// publish without them.
#[test]
fn v4_encoder_drops_mqtt5_properties() {
    let packet = Packet::Publish(
        Publish::with_qos("reply", "[]", false, QoS::AtLeastOnce, 7),
        Some(PublishProperties {
            content_type: Some("application/json".into()),
            user_properties: vec![("user_id".into(), "68946".into())],
            ..PublishProperties::default()
        }),
    );
    let mut buf = encode(4, packet).unwrap();
    assert_eq!(
        decode(4, &mut buf).unwrap(),
        Packet::Publish(
            Publish::with_qos("reply", "[]", false, QoS::AtLeastOnce, 7),
            None
        )
    );
}

/// The 3.1.1 encoder hit `unreachable!` on MQTT 5-only CONNACK codes; it now
/// sends the nearest 3.1.1 code.
#[test]
fn v4_connack_maps_mqtt5_codes() {
    let cases = [
        (ConnectReturnCode::Banned, ConnectReturnCode::NotAuthorized),
        (
            ConnectReturnCode::BadAuthenticationMethod,
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            ConnectReturnCode::UnsupportedProtocolVersion,
            ConnectReturnCode::RefusedProtocolVersion,
        ),
        (
            ConnectReturnCode::ServerBusy,
            ConnectReturnCode::ServiceUnavailable,
        ),
    ];
    for (sent, received) in cases {
        let ack = ConnAck {
            session_present: false,
            code: sent,
        };
        let mut buf = encode(4, Packet::ConnAck(ack, None)).unwrap();
        match decode(4, &mut buf) {
            Ok(Packet::ConnAck(ack, None)) => assert_eq!(ack.code, received, "{sent:?}"),
            other => panic!("{sent:?}: {other:?}"),
        }
    }
}

/// Packets only a server sends (CONNACK, UNSUBACK) from an MQTT 5 client:
/// the decoder hit `unreachable!`; they now decode (or fail cleanly when
/// short), and refusing them is the gate's business.
#[test]
fn v5_decodes_server_only_packets() {
    let mut unsuback = BytesMut::from(&[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00][..]);
    assert!(matches!(decode(5, &mut unsuback), Ok(Packet::UnsubAck(..))));
    let mut connack = BytesMut::from(&[0x20, 0x03, 0x00, 0x00, 0x00][..]);
    assert!(matches!(decode(5, &mut connack), Ok(Packet::ConnAck(..))));
    for short in [&[0xB0, 0x02, 0x00, 0x01][..], &[0x20, 0x01, 0x00][..]] {
        assert!(decode(5, &mut BytesMut::from(short)).is_err(), "{short:?}");
    }
}

/// A property block is read within its declared length: one that runs past
/// its properties into the payload, or whose length never ends, is an
/// error (and never "need more bytes" for a frame that is complete).
#[test]
fn property_block_lengths_are_bounded() {
    // PUBLISH QoS 0, topic "t", property length 5 over one 2-byte property.
    let mut buf = BytesMut::from(
        &[
            0x30, 0x09, 0x00, 0x01, b't', 0x05, 0x01, 0x01, b'x', b'y', b'z',
        ][..],
    );
    assert!(decode(5, &mut buf).is_err());
    // Property length with the continuation bit set on its last byte.
    let mut buf = BytesMut::from(&[0x30, 0x04, 0x00, 0x01, b't', 0x80][..]);
    assert_eq!(decode(5, &mut buf), Err(Error::MalformedPacket));
}

/// An MQTT 5 DISCONNECT with a reason code and no properties: upstream
/// wrote a property length its remaining length did not count.
#[test]
fn v5_disconnect_with_reason_is_written_right() {
    let packet = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
        },
        None,
    );
    let mut bytes = encode(5, packet.clone()).unwrap();
    assert_eq!(&bytes[..], &[0xE0, 0x01, 0x8E]);
    assert_eq!(decode(5, &mut bytes), Ok(packet));
    assert!(bytes.is_empty());
}

/// A string longer than MQTT's two-byte length is an error, not a wrapped
/// length; a QoS 1 publish with packet id 0 is refused.
#[test]
fn oversized_strings_and_packet_id_zero_are_refused() {
    let long = "x".repeat(70_000);
    let packet = Packet::Publish(
        Publish::with_qos(Bytes::from(long), Bytes::new(), false, QoS::AtMostOnce, 0),
        None,
    );
    assert_eq!(encode(5, packet).err(), Some(Error::StringTooLong(70_000)));
    let zero = Packet::Publish(
        Publish::with_qos("t", "p", false, QoS::AtLeastOnce, 0),
        None,
    );
    for version in [4, 5] {
        assert!(encode(version, zero.clone()).is_err(), "v{version}");
    }
}

/// A CONNECT encoded after other bytes in the same buffer: upstream wrote
/// its flags at an offset counted from the start of the buffer, over a byte
/// of the earlier packet.
#[test]
fn connect_encodes_after_other_bytes() {
    for version in [4, 5] {
        let connect = Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: "c".into(),
                clean_session: true,
            },
            None,
            None,
            None,
            Some(Login {
                username: "JWT".into(),
                password: "t".into(),
            }),
        );
        let mut buf = encode(version, Packet::PingReq(PingReq)).unwrap();
        buf.extend_from_slice(&encode(version, connect.clone()).unwrap());
        assert_eq!(decode(version, &mut buf), Ok(Packet::PingReq(PingReq)));
        assert_eq!(decode(version, &mut buf), Ok(connect));
    }
}

/// An UNSUBSCRIBE with no filter (MQTT-3.10.3-2) is malformed in both
/// versions.
#[test]
fn empty_unsubscribe_is_refused() {
    let mut v4 = BytesMut::from(&[0xA2, 0x02, 0x00, 0x01][..]);
    assert!(decode(4, &mut v4).is_err());
    let mut v5 = BytesMut::from(&[0xA2, 0x03, 0x00, 0x01, 0x00][..]);
    assert!(decode(5, &mut v5).is_err());
}

/// The four MQTT 5 acknowledgements share one wire form (`v5/ack.rs`):
/// success without properties is two bytes of packet id, another reason
/// without properties adds the code and an empty property length, and
/// properties round-trip.
#[test]
fn v5_acknowledgements_share_one_wire_form() {
    let props = || {
        Some((
            Some("why".to_owned()),
            vec![("k".to_owned(), "v".to_owned())],
        ))
    };
    let cases: Vec<(u8, Packet, Packet, Packet)> = vec![
        (
            0x40,
            Packet::PubAck(
                PubAck {
                    pkid: 9,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            Packet::PubAck(
                PubAck {
                    pkid: 9,
                    reason: PubAckReason::NotAuthorized,
                },
                None,
            ),
            Packet::PubAck(
                PubAck {
                    pkid: 9,
                    reason: PubAckReason::Success,
                },
                props().map(|(reason_string, user_properties)| PubAckProperties {
                    reason_string,
                    user_properties,
                }),
            ),
        ),
        (
            0x50,
            Packet::PubRec(
                PubRec {
                    pkid: 9,
                    reason: PubRecReason::Success,
                },
                None,
            ),
            Packet::PubRec(
                PubRec {
                    pkid: 9,
                    reason: PubRecReason::NotAuthorized,
                },
                None,
            ),
            Packet::PubRec(
                PubRec {
                    pkid: 9,
                    reason: PubRecReason::Success,
                },
                props().map(|(reason_string, user_properties)| PubRecProperties {
                    reason_string,
                    user_properties,
                }),
            ),
        ),
        (
            0x62,
            Packet::PubRel(
                PubRel {
                    pkid: 9,
                    reason: PubRelReason::Success,
                },
                None,
            ),
            Packet::PubRel(
                PubRel {
                    pkid: 9,
                    reason: PubRelReason::PacketIdentifierNotFound,
                },
                None,
            ),
            Packet::PubRel(
                PubRel {
                    pkid: 9,
                    reason: PubRelReason::Success,
                },
                props().map(|(reason_string, user_properties)| PubRelProperties {
                    reason_string,
                    user_properties,
                }),
            ),
        ),
        (
            0x70,
            Packet::PubComp(
                PubComp {
                    pkid: 9,
                    reason: PubCompReason::Success,
                },
                None,
            ),
            Packet::PubComp(
                PubComp {
                    pkid: 9,
                    reason: PubCompReason::PacketIdentifierNotFound,
                },
                None,
            ),
            Packet::PubComp(
                PubComp {
                    pkid: 9,
                    reason: PubCompReason::Success,
                },
                props().map(|(reason_string, user_properties)| PubCompProperties {
                    reason_string,
                    user_properties,
                }),
            ),
        ),
    ];
    for (first, success, refused, with_properties) in cases {
        let mut bytes = encode(5, success.clone()).unwrap();
        assert_eq!(&bytes[..], &[first, 0x02, 0x00, 0x09]);
        assert_eq!(decode(5, &mut bytes), Ok(success));

        let mut bytes = encode(5, refused.clone()).unwrap();
        assert_eq!(&bytes[..4], &[first, 0x04, 0x00, 0x09]);
        assert_eq!(bytes[5], 0x00, "empty property length");
        assert_eq!(decode(5, &mut bytes), Ok(refused));

        let mut bytes = encode(5, with_properties.clone()).unwrap();
        // properties: reason string 1 + 2 + 3, user property 1 + 2 + 1 + 2 + 1
        assert_eq!(&bytes[..6], &[first, 0x11, 0x00, 0x09, 0x00, 0x0D]);
        assert_eq!(decode(5, &mut bytes), Ok(with_properties));
        assert!(bytes.is_empty());
    }
}
