//! Fuzz target `codecs`: both MQTT codecs (rumqttd's `V4`/`V5` and the
//! broker's `Codec` over them) never panic on any bytes or on encoding any
//! packet; valid packets survive a round trip; the size limit holds; and
//! regression cases for every crash and mis-encoding found.

use broker::codec::{sniff_version, Codec, CodecError, Version as BrokerVersion};
use bytes::{Bytes, BytesMut};
use fuzz::{apply, as_v4, config, decode, encode, mutations, packet_v4, packet_v5, Version};
use mqtt_router::protocol::{
    matches, valid_filter, valid_topic, ConnAck, ConnectReturnCode, Disconnect,
    DisconnectReasonCode, Error, Packet, PubRel, PubRelProperties, PubRelReason, Publish,
    PublishProperties, QoS,
};
use proptest::collection::vec;
use proptest::prelude::*;

const LARGE: usize = 1 << 20;

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V4), Just(Version::V5)]
}

fn broker_codec(version: Version, max: usize) -> Codec {
    Codec::new(
        match version {
            Version::V4 => BrokerVersion::V4,
            Version::V5 => BrokerVersion::V5,
        },
        max,
    )
}

/// Feeds `bytes` to the broker's codec the way a session does (in pieces),
/// and decodes until it waits for more or refuses. Every packet it returns
/// must fit the limit and encode again without panicking.
fn drive_broker_codec(version: Version, bytes: &[u8], max: usize, chunk: usize) {
    let codec = broker_codec(version, max);
    let mut buf = BytesMut::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => {
                    let taken = before - buf.len();
                    // Fixed header is at most 5 bytes; the rest is bounded by `max`.
                    assert!(taken <= max + 5, "{taken} bytes taken past the {max} limit");
                    let mut out = BytesMut::new();
                    let _ = codec.encode(packet, &mut out);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

proptest! {
    #![proptest_config(config(20000))]

    /// Any bytes: no panic in either decoder, the broker's codec, or the
    /// version sniffer.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..300),
        max in prop_oneof![0usize..64, 0usize..LARGE],
        chunk in 1usize..64,
    ) {
        for v in [Version::V4, Version::V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            // Decode until error or need of more bytes.
            while let Ok(_packet) = decode(v, &mut buf, max) {}
            drive_broker_codec(v, &bytes, max, chunk);
        }
        let _ = sniff_version(&bytes);
        let _ = Publish::deserialize(Bytes::from(bytes.clone()));
    }

    /// Bytes that start like a packet of each type, with a plausible length.
    #[test]
    fn typed_garbage_never_panics(
        kind in 0u8..16,
        flags in 0u8..16,
        body in vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = vec![(kind << 4) | flags];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 { b |= 0x80; }
            bytes.push(b);
            if len == 0 { break; }
        }
        bytes.extend_from_slice(&body);
        for v in [Version::V4, Version::V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            let result = decode(v, &mut buf, LARGE);
            // A whole frame was there: never "insufficient bytes" (which would
            // make a session wait for the next packet's bytes).
            prop_assert!(!matches!(result, Err(Error::InsufficientBytes(_))), "{result:?}");
            prop_assert!(buf.is_empty());
        }
    }

    /// Valid MQTT 3.1.1 packets: decode(encode(p)) == p, all bytes taken.
    #[test]
    fn v4_round_trip(packet in packet_v4()) {
        let bytes = encode(Version::V4, packet.clone()).expect("a valid packet encodes");
        let mut buf = bytes.clone();
        let decoded = decode(Version::V4, &mut buf, LARGE);
        prop_assert_eq!(decoded, Ok(packet));
        prop_assert!(buf.is_empty());
    }

    /// Valid MQTT 5 packets: decode(encode(p)) == p, all bytes taken.
    #[test]
    fn v5_round_trip(packet in packet_v5()) {
        let bytes = encode(Version::V5, packet.clone()).expect("a valid packet encodes");
        let mut buf = bytes.clone();
        let decoded = decode(Version::V5, &mut buf, LARGE);
        prop_assert_eq!(decoded, Ok(packet));
        prop_assert!(buf.is_empty());
    }

    /// MQTT 5 packets sent to an MQTT 3.1.1 peer: never a panic, and what the
    /// 3.1.1 peer decodes is the packet without its properties.
    #[test]
    fn v5_packets_translate_to_v4(packet in packet_v5()) {
        let encoded = encode(Version::V4, packet.clone());
        if let Some(expected) = as_v4(&packet) {
            let mut buf = encoded.expect("translatable packet encodes for 3.1.1");
            prop_assert_eq!(decode(Version::V4, &mut buf, LARGE), Ok(expected));
        }
    }

    /// The packet size limit: a packet is decoded if and only if its
    /// remaining length fits.
    #[test]
    fn size_limit_holds(packet in packet_v5(), max in 0usize..96) {
        let bytes = encode(Version::V5, packet.clone()).expect("encodes");
        let header = 1 + bytes.iter().skip(1).take_while(|b| *b & 0x80 != 0).count() + 1;
        let remaining = bytes.len() - header;
        let codec = broker_codec(Version::V5, max);
        let mut buf = bytes.clone();
        match codec.decode(&mut buf) {
            Ok(Some(decoded)) => {
                prop_assert!(remaining <= max);
                prop_assert_eq!(decoded, packet);
            }
            Err(CodecError::TooLarge(limit)) => {
                prop_assert_eq!(limit, max);
                prop_assert!(remaining > max);
            }
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// Encoded valid packets, then mutated (bit flips, truncation, length
    /// changes, insertions, duplication): no panic anywhere, and whatever
    /// decodes encodes again.
    #[test]
    fn mutated_packets_never_panic(
        v in version(),
        p4 in packet_v4(),
        p5 in packet_v5(),
        muts in mutations(),
        max in prop_oneof![Just(LARGE), 0usize..128],
        chunk in 1usize..32,
    ) {
        let packet = if v == Version::V4 { p4 } else { p5 };
        let mut bytes = encode(v, packet).expect("encodes").to_vec();
        apply(&mut bytes, &muts);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(packet) = decode(v, &mut buf, max) {
            let _ = encode(Version::V4, packet.clone());
            let _ = encode(Version::V5, packet);
        }
        drive_broker_codec(v, &bytes, max, chunk);
    }

    /// Several valid packets back to back, cut at arbitrary points: the
    /// broker's codec returns exactly them, in order.
    #[test]
    fn stream_of_packets_reassembles(
        packets in vec(packet_v5(), 1..6),
        chunk in 1usize..40,
    ) {
        let mut bytes = Vec::new();
        for p in &packets {
            bytes.extend_from_slice(&encode(Version::V5, p.clone()).expect("encodes"));
        }
        let codec = broker_codec(Version::V5, LARGE);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(p) = codec.decode(&mut buf).expect("valid stream") {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
    }

    /// Topic matching and validation on any strings (the router calls
    /// `matches` with topics from clients).
    #[test]
    fn topic_helpers_never_panic(topic in ".{0,12}", filter in ".{0,12}") {
        let _ = matches(&topic, &filter);
        let _ = matches(&filter, &topic);
        let _ = valid_topic(&topic);
        let _ = valid_filter(&filter);
    }
}

// ------------------------------------------------ regressions, one per bug

fn publish_with_properties() -> Packet {
    Packet::Publish(
        Publish::with_qos("68946_contact_list", "[]", false, QoS::AtLeastOnce, 7),
        Some(PublishProperties {
            content_type: Some("application/json".into()),
            user_properties: vec![("user_id".into(), "68946".into())],
            ..PublishProperties::default()
        }),
    )
}

/// Issue 9: every reply of the SDK carries `content_type`; the MQTT 3.1.1
/// encoder hit `unreachable!` on any PUBLISH with properties.
#[test]
fn v4_publish_with_properties_is_sent_without_them() {
    let mut buf = encode(Version::V4, publish_with_properties()).expect("encodes");
    let decoded = decode(Version::V4, &mut buf, LARGE).expect("decodes");
    assert_eq!(
        decoded,
        Packet::Publish(
            Publish::with_qos("68946_contact_list", "[]", false, QoS::AtLeastOnce, 7),
            None
        )
    );
}

/// The broker's codec drops the properties too, for a 3.1.1 connection.
#[test]
fn broker_codec_translates_for_v4() {
    let codec = Codec::new(BrokerVersion::V4, LARGE);
    let mut out = BytesMut::new();
    codec
        .encode(publish_with_properties(), &mut out)
        .expect("encodes");
    let decoded = codec.decode(&mut out).expect("decodes").expect("whole");
    assert!(matches!(decoded, Packet::Publish(_, None)));
}

/// The v4 encoder hit `unreachable!` on MQTT 5-only CONNACK codes; it now
/// sends the nearest 3.1.1 code.
#[test]
fn v4_connack_maps_mqtt5_codes() {
    let cases = [
        (ConnectReturnCode::Banned, ConnectReturnCode::NotAuthorized),
        (
            ConnectReturnCode::NotAuthorized,
            ConnectReturnCode::NotAuthorized,
        ),
        (
            ConnectReturnCode::BadAuthenticationMethod,
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            ConnectReturnCode::UnsupportedProtocolVersion,
            ConnectReturnCode::RefusedProtocolVersion,
        ),
        (
            ConnectReturnCode::QuotaExceeded,
            ConnectReturnCode::ServiceUnavailable,
        ),
        (
            ConnectReturnCode::ServerBusy,
            ConnectReturnCode::ServiceUnavailable,
        ),
    ];
    for (sent, received) in cases {
        let packet = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: sent,
            },
            None,
        );
        let mut buf = encode(Version::V4, packet).expect("encodes");
        match decode(Version::V4, &mut buf, LARGE) {
            Ok(Packet::ConnAck(ack, None)) => assert_eq!(ack.code, received, "{sent:?}"),
            other => panic!("{sent:?}: {other:?}"),
        }
    }
    // And the two 3.1.1-only codes through the v5 encoder.
    for code in [
        ConnectReturnCode::RefusedProtocolVersion,
        ConnectReturnCode::ServiceUnavailable,
    ] {
        let packet = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        );
        assert!(encode(Version::V5, packet).is_ok());
    }
}

/// An MQTT 5 client sending packets only a server sends (CONNACK, UNSUBACK):
/// the v5 decoder hit `unreachable!`. They now decode; refusing them is the
/// gate's business.
#[test]
fn v5_decodes_server_only_packets() {
    for bytes in [
        &[0x20, 0x03, 0x00, 0x00, 0x00][..],       // CONNACK
        &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00][..], // UNSUBACK
        &[0xB0, 0x02, 0x00, 0x01][..],             // UNSUBACK, too short
        &[0x20, 0x01, 0x00][..],                   // CONNACK, too short
    ] {
        let mut buf = BytesMut::from(bytes);
        let _ = decode(Version::V5, &mut buf, LARGE);
        let codec = Codec::new(BrokerVersion::V5, LARGE);
        let mut buf = BytesMut::from(bytes);
        let _ = codec.decode(&mut buf);
    }
    let mut buf = BytesMut::from(&[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00][..]);
    assert!(matches!(
        decode(Version::V5, &mut buf, LARGE),
        Ok(Packet::UnsubAck(..))
    ));
}

/// MQTT 5 §3.6: a PUBREL with a reason code and properties decodes to the
/// packet id, reason and properties (the codec was right; the router
/// ignored `PubRel(_, Some(_))`, see the report).
#[test]
fn v5_pubrel_with_properties_decodes() {
    // PUBREL, pkid 0x1234, reason 0x00, properties: reason string "ok",
    // user property ("k", "v").
    let bytes = [
        0x62, 0x10, 0x12, 0x34, 0x00, 0x0c, 0x1f, 0x00, 0x02, b'o', b'k', 0x26, 0x00, 0x01, b'k',
        0x00, 0x01, b'v',
    ];
    let mut buf = BytesMut::from(&bytes[..]);
    let decoded = decode(Version::V5, &mut buf, LARGE).expect("decodes");
    assert_eq!(
        decoded,
        Packet::PubRel(
            PubRel {
                pkid: 0x1234,
                reason: PubRelReason::Success
            },
            Some(PubRelProperties {
                reason_string: Some("ok".into()),
                user_properties: vec![("k".into(), "v".into())],
            })
        )
    );
    assert!(buf.is_empty());
    // Reason code alone (remaining length 3), and reason + empty properties.
    for bytes in [
        &[0x62, 0x03, 0, 9, 0x92][..],
        &[0x62, 0x04, 0, 9, 0x00, 0x00][..],
    ] {
        let mut buf = BytesMut::from(bytes);
        match decode(Version::V5, &mut buf, LARGE) {
            Ok(Packet::PubRel(rel, None)) => assert_eq!(rel.pkid, 9),
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
    // Same for PUBREC and PUBCOMP.
    for first in [0x50u8, 0x70] {
        let mut b = bytes.to_vec();
        b[0] = first;
        let mut buf = BytesMut::from(&b[..]);
        let decoded = decode(Version::V5, &mut buf, LARGE).expect("decodes");
        assert!(
            matches!(
                decoded,
                Packet::PubRec(_, Some(_)) | Packet::PubComp(_, Some(_))
            ),
            "{decoded:?}"
        );
    }
}

/// Issue 9: a topic whose first character is multi-byte made `matches`
/// slice inside the character and took the router down.
#[test]
fn matches_multibyte_first_character() {
    assert!(matches("é/x", "#"));
    assert!(matches("é/x", "é/+"));
    assert!(!matches("é/x", "e/+"));
    assert!(matches("😀", "+"));
    assert!(!matches("$SYS/x", "#"));
}

/// A property block whose length runs past the packet, or stops inside a
/// property: an error, not a read into the payload, and never "need more
/// bytes" for a frame that is complete.
#[test]
fn property_block_lengths_are_bounded() {
    // PUBLISH QoS 0 topic "t", property length 5 but one property of 2 bytes
    // (payload format indicator) then payload "xyz".
    let bytes = [
        0x30, 0x09, 0x00, 0x01, b't', 0x05, 0x01, 0x01, b'x', b'y', b'z',
    ];
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(decode(Version::V5, &mut buf, LARGE).is_err());
    // Property length with the continuation bit set on the last byte.
    let bytes = [0x30, 0x04, 0x00, 0x01, b't', 0x80];
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode(Version::V5, &mut buf, LARGE),
        Err(Error::MalformedPacket)
    );
    let codec = Codec::new(BrokerVersion::V5, LARGE);
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CodecError::Malformed(_))
    ));
}

/// MQTT 5 DISCONNECT with a reason code and no properties: upstream wrote a
/// property length its remaining length did not count (one stray byte on
/// the wire), and an empty property set dropped the reason code.
#[test]
fn v5_disconnect_with_reason_round_trips() {
    let packet = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
        },
        None,
    );
    let bytes = encode(Version::V5, packet.clone()).expect("encodes");
    assert_eq!(&bytes[..], &[0xE0, 0x01, 0x8E]);
    let mut buf = bytes.clone();
    assert_eq!(decode(Version::V5, &mut buf, LARGE), Ok(packet));
    assert!(buf.is_empty());
}

/// Strings longer than MQTT's two-byte length: an error, and the broker's
/// codec leaves its output as it was (no half-written packet).
#[test]
fn oversized_strings_are_refused_cleanly() {
    let long = "x".repeat(70_000);
    let packet = Packet::Publish(
        Publish::with_qos(
            Bytes::from(long.clone()),
            Bytes::new(),
            false,
            QoS::AtMostOnce,
            0,
        ),
        None,
    );
    assert_eq!(
        encode(Version::V5, packet.clone()).err(),
        Some(Error::StringTooLong(70_000))
    );
    let codec = Codec::new(BrokerVersion::V5, LARGE);
    let mut out = BytesMut::from(&b"kept"[..]);
    assert!(codec.encode(packet, &mut out).is_err());
    assert_eq!(&out[..], b"kept");

    let props = Packet::Publish(
        Publish::with_qos("t", "p", false, QoS::AtMostOnce, 0),
        Some(PublishProperties {
            user_properties: vec![("k".into(), long)],
            ..PublishProperties::default()
        }),
    );
    let mut out = BytesMut::from(&b"kept"[..]);
    assert!(codec.encode(props, &mut out).is_err());
    assert_eq!(&out[..], b"kept");
    // QoS 1 with packet id 0: refused before anything is written.
    let zero = Packet::Publish(
        Publish::with_qos("t", "p", false, QoS::AtLeastOnce, 0),
        None,
    );
    let mut out = BytesMut::from(&b"kept"[..]);
    assert!(codec.encode(zero, &mut out).is_err());
    assert_eq!(&out[..], b"kept");
}

/// A CONNECT encoded after other bytes in the same buffer: upstream wrote
/// its flags at an offset counted from the start of the buffer.
#[test]
fn connect_encodes_after_other_bytes() {
    use mqtt_router::protocol::{Connect, Login, PingReq};
    for v in [Version::V4, Version::V5] {
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
        let mut buf = encode(v, Packet::PingReq(PingReq)).expect("encodes");
        buf.extend_from_slice(&encode(v, connect.clone()).expect("encodes"));
        assert_eq!(decode(v, &mut buf, LARGE), Ok(Packet::PingReq(PingReq)));
        assert_eq!(decode(v, &mut buf, LARGE), Ok(connect));
    }
}

/// Empty UNSUBSCRIBE (MQTT-3.10.3-2) is malformed in both versions.
#[test]
fn empty_unsubscribe_is_refused() {
    let mut v4 = BytesMut::from(&[0xA2, 0x02, 0x00, 0x01][..]);
    assert!(decode(Version::V4, &mut v4, LARGE).is_err());
    let mut v5 = BytesMut::from(&[0xA2, 0x03, 0x00, 0x01, 0x00][..]);
    assert!(decode(Version::V5, &mut v5, LARGE).is_err());
}
