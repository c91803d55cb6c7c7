use std::slice::Iter;

use crate::router::Ack;

use super::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

mod ack;
mod connack;
mod connect;
mod disconnect;
mod ping;
mod puback;
mod pubcomp;
mod publish;
mod pubrec;
mod pubrel;
mod suback;
mod subscribe;
mod unsuback;
mod unsubscribe;

/// MQTT packet type
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    PingReq,
    PingResp,
    Disconnect,
}

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropertyType {
    PayloadFormatIndicator = 1,
    MessageExpiryInterval = 2,
    ContentType = 3,
    ResponseTopic = 8,
    CorrelationData = 9,
    SubscriptionIdentifier = 11,
    SessionExpiryInterval = 17,
    AssignedClientIdentifier = 18,
    ServerKeepAlive = 19,
    AuthenticationMethod = 21,
    AuthenticationData = 22,
    RequestProblemInformation = 23,
    WillDelayInterval = 24,
    RequestResponseInformation = 25,
    ResponseInformation = 26,
    ServerReference = 28,
    ReasonString = 31,
    ReceiveMaximum = 33,
    TopicAliasMaximum = 34,
    TopicAlias = 35,
    MaximumQos = 36,
    RetainAvailable = 37,
    UserProperty = 38,
    MaximumPacketSize = 39,
    WildcardSubscriptionAvailable = 40,
    SubscriptionIdentifierAvailable = 41,
    SharedSubscriptionAvailable = 42,
}

/// Packet type from a byte
///
/// ```ignore
///          7                          3                          0
///          +--------------------------+--------------------------+
/// byte 1   | MQTT Control Packet Type | Flags for each type      |
///          +--------------------------+--------------------------+
///          |         Remaining Bytes Len  (1/2/3/4 bytes)        |
///          +-----------------------------------------------------+
///
/// <https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html#_Toc385349207>
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd)]
pub struct FixedHeader {
    /// First byte of the stream. Used to identify packet types and
    /// several flags
    byte1: u8,
    /// Length of fixed header. Byte 1 + (1..4) bytes. So fixed header
    /// len can vary from 2 bytes to 5 bytes
    /// 1..4 bytes are variable length encoded to represent remaining length
    fixed_header_len: usize,
    /// Remaining length of the packet. Doesn't include fixed header bytes
    /// Represents variable header + payload size
    remaining_len: usize,
}

impl FixedHeader {
    pub fn new(byte1: u8, remaining_len_len: usize, remaining_len: usize) -> FixedHeader {
        FixedHeader {
            byte1,
            fixed_header_len: remaining_len_len + 1,
            remaining_len,
        }
    }

    pub fn packet_type(&self) -> Result<PacketType, Error> {
        let num = self.byte1 >> 4;
        match num {
            1 => Ok(PacketType::Connect),
            2 => Ok(PacketType::ConnAck),
            3 => Ok(PacketType::Publish),
            4 => Ok(PacketType::PubAck),
            5 => Ok(PacketType::PubRec),
            6 => Ok(PacketType::PubRel),
            7 => Ok(PacketType::PubComp),
            8 => Ok(PacketType::Subscribe),
            9 => Ok(PacketType::SubAck),
            10 => Ok(PacketType::Unsubscribe),
            11 => Ok(PacketType::UnsubAck),
            12 => Ok(PacketType::PingReq),
            13 => Ok(PacketType::PingResp),
            14 => Ok(PacketType::Disconnect),
            _ => Err(Error::InvalidPacketType(num)),
        }
    }

    /// Returns the size of full packet (fixed header + variable header + payload)
    /// Fixed header is enough to get the size of a frame in the stream
    pub fn frame_length(&self) -> usize {
        self.fixed_header_len + self.remaining_len
    }
}

fn property(num: u8) -> Result<PropertyType, Error> {
    let property = match num {
        1 => PropertyType::PayloadFormatIndicator,
        2 => PropertyType::MessageExpiryInterval,
        3 => PropertyType::ContentType,
        8 => PropertyType::ResponseTopic,
        9 => PropertyType::CorrelationData,
        11 => PropertyType::SubscriptionIdentifier,
        17 => PropertyType::SessionExpiryInterval,
        18 => PropertyType::AssignedClientIdentifier,
        19 => PropertyType::ServerKeepAlive,
        21 => PropertyType::AuthenticationMethod,
        22 => PropertyType::AuthenticationData,
        23 => PropertyType::RequestProblemInformation,
        24 => PropertyType::WillDelayInterval,
        25 => PropertyType::RequestResponseInformation,
        26 => PropertyType::ResponseInformation,
        28 => PropertyType::ServerReference,
        31 => PropertyType::ReasonString,
        33 => PropertyType::ReceiveMaximum,
        34 => PropertyType::TopicAliasMaximum,
        35 => PropertyType::TopicAlias,
        36 => PropertyType::MaximumQos,
        37 => PropertyType::RetainAvailable,
        38 => PropertyType::UserProperty,
        39 => PropertyType::MaximumPacketSize,
        40 => PropertyType::WildcardSubscriptionAvailable,
        41 => PropertyType::SubscriptionIdentifierAvailable,
        42 => PropertyType::SharedSubscriptionAvailable,
        num => return Err(Error::InvalidPropertyType(num)),
    };

    Ok(property)
}

/// Checks if the stream has enough bytes to frame a packet and returns fixed header
/// only if a packet can be framed with existing bytes in the `stream`.
/// The passed stream doesn't modify parent stream's cursor. If this function
/// returned an error, next `check` on the same parent stream is forced start
/// with cursor at 0 again (Iter is owned. Only Iter's cursor is changed internally)
pub fn check(stream: Iter<u8>, max_packet_size: usize) -> Result<FixedHeader, Error> {
    // Create fixed header if there are enough bytes in the stream
    // to frame full packet
    let stream_len = stream.len();
    let fixed_header = parse_fixed_header(stream)?;

    // Don't let rogue connections attack with huge payloads.
    // Disconnect them before reading all that data
    if fixed_header.remaining_len > max_packet_size {
        return Err(Error::PayloadSizeLimitExceeded(fixed_header.remaining_len));
    }

    // If the current call fails due to insufficient bytes in the stream,
    // after calculating remaining length, we extend the stream
    let frame_length = fixed_header.frame_length();
    if stream_len < frame_length {
        return Err(Error::InsufficientBytes(frame_length - stream_len));
    }

    Ok(fixed_header)
}

/// Parses fixed header
fn parse_fixed_header(mut stream: Iter<u8>) -> Result<FixedHeader, Error> {
    // At least 2 bytes are necessary to frame a packet
    let stream_len = stream.len();
    if stream_len < 2 {
        return Err(Error::InsufficientBytes(2 - stream_len));
    }

    let Some(&byte1) = stream.next() else {
        return Err(Error::InsufficientBytes(2));
    };
    let (len_len, len) = length(stream)?;

    Ok(FixedHeader::new(byte1, len_len, len))
}

/// Parses variable byte integer in the stream and returns the length
/// and number of bytes that make it. Used for remaining length calculation
/// as well as for calculating property lengths
fn length(stream: Iter<u8>) -> Result<(usize, usize), Error> {
    let mut len: usize = 0;
    let mut len_len = 0;
    let mut done = false;
    let mut shift = 0;

    // Use continuation bit at position 7 to continue reading next
    // byte to frame 'length'.
    // Stream 0b1xxx_xxxx 0b1yyy_yyyy 0b1zzz_zzzz 0b0www_wwww will
    // be framed as number 0bwww_wwww_zzz_zzzz_yyy_yyyy_xxx_xxxx
    for byte in stream {
        len_len += 1;
        let byte = *byte as usize;
        len += (byte & 0x7F) << shift;

        // stop when continue bit is 0
        done = (byte & 0x80) == 0;
        if done {
            break;
        }

        shift += 7;

        // Only a max of 4 bytes allowed for remaining length
        // more than 4 shifts (0, 7, 14, 21) implies bad length
        if shift > 21 {
            return Err(Error::MalformedRemainingLength);
        }
    }

    // Not enough bytes to frame remaining length. wait for
    // one more byte
    if !done {
        return Err(Error::InsufficientBytes(1));
    }

    Ok((len_len, len))
}

/// Reads a variable byte integer inside a packet (a property block's length,
/// a subscription identifier) and consumes it.
fn read_varint(bytes: &mut Bytes) -> Result<usize, Error> {
    let (len_len, value) = length(bytes.iter()).map_err(|e| match e {
        Error::InsufficientBytes(_) => Error::MalformedPacket,
        other => other,
    })?;
    // `length` read `len_len` bytes from `bytes`, so they are there.
    bytes.advance(len_len);
    Ok(value)
}

/// Splits a property block (its variable byte length, then that many bytes)
/// off the front of `bytes`. `None` for an empty block.
fn properties_block(bytes: &mut Bytes) -> Result<Option<Bytes>, Error> {
    let len = read_varint(bytes)?;
    if len == 0 {
        return Ok(None);
    }
    if len > bytes.len() {
        return Err(Error::BoundaryCrossed(len));
    }
    Ok(Some(bytes.split_to(len)))
}

/// patched: stores the value of a property that MQTT 5 allows at most once
/// in a packet; a second one is a Protocol Error (2.2.2.2, and each
/// property's own section), not a silent overwrite as upstream did.
fn once<T>(slot: &mut Option<T>, value: T, property: PropertyType) -> Result<(), Error> {
    if slot.is_some() {
        return Err(Error::DuplicateProperty(property as u8));
    }
    *slot = Some(value);
    Ok(())
}

/// Reads a series of bytes with a length from a byte stream
fn read_mqtt_bytes(stream: &mut Bytes) -> Result<Bytes, Error> {
    let len = read_u16(stream)? as usize;

    // Prevent attacks with wrong remaining length. This method is used in
    // `packet.assembly()` with (enough) bytes to frame packet. Ensures that
    // reading variable len string or bytes doesn't cross promised boundary
    // with `read_fixed_header()`
    if len > stream.len() {
        return Err(Error::BoundaryCrossed(len));
    }

    Ok(stream.split_to(len))
}

/// Reads a string from bytes stream
fn read_mqtt_string(stream: &mut Bytes) -> Result<String, Error> {
    let s = read_mqtt_bytes(stream)?;
    match String::from_utf8(s.to_vec()) {
        Ok(v) => Ok(v),
        Err(_e) => Err(Error::TopicNotUtf8),
    }
}

/// Serializes bytes to stream (including length). Refuses more than 65,535
/// bytes: the two-byte length would silently wrap and corrupt the stream.
fn write_mqtt_bytes(stream: &mut BytesMut, bytes: &[u8]) -> Result<(), Error> {
    let len = u16::try_from(bytes.len()).map_err(|_| Error::StringTooLong(bytes.len()))?;
    stream.put_u16(len);
    stream.extend_from_slice(bytes);
    Ok(())
}

/// Serializes a string to stream
fn write_mqtt_string(stream: &mut BytesMut, string: &str) -> Result<(), Error> {
    write_mqtt_bytes(stream, string.as_bytes())
}

/// Writes remaining length to stream and returns number of bytes for remaining length
fn write_remaining_length(stream: &mut BytesMut, len: usize) -> Result<usize, Error> {
    if len > 268_435_455 {
        return Err(Error::PayloadTooLong);
    }

    let mut done = false;
    let mut x = len;
    let mut count = 0;

    while !done {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 128;
        }

        stream.put_u8(byte);
        count += 1;
        done = x == 0;
    }

    Ok(count)
}

/// Return number of remaining length bytes required for encoding length
fn len_len(len: usize) -> usize {
    if len >= 2_097_152 {
        4
    } else if len >= 16_384 {
        3
    } else if len >= 128 {
        2
    } else {
        1
    }
}

/// After collecting enough bytes to frame a packet (packet's frame())
/// , It's possible that content itself in the stream is wrong. Like expected
/// packet id or qos not being present. In cases where `read_mqtt_string` or
/// `read_mqtt_bytes` exhausted remaining length but packet framing expects to
/// parse qos next, these pre checks will prevent `bytes` crashes
fn read_u16(stream: &mut Bytes) -> Result<u16, Error> {
    if stream.len() < 2 {
        return Err(Error::MalformedPacket);
    }

    Ok(stream.get_u16())
}

fn read_u8(stream: &mut Bytes) -> Result<u8, Error> {
    if stream.is_empty() {
        return Err(Error::MalformedPacket);
    }

    Ok(stream.get_u8())
}

fn read_u32(stream: &mut Bytes) -> Result<u32, Error> {
    if stream.len() < 4 {
        return Err(Error::MalformedPacket);
    }

    Ok(stream.get_u32())
}

#[derive(Debug, Clone)]
pub struct V5;

impl Protocol for V5 {
    /// Reads a stream of bytes and extracts next MQTT packet out of it
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let fixed_header = check(stream.iter(), max_size)?;

        // Test with a stream with exactly the size to check border panics
        let packet = stream.split_to(fixed_header.frame_length());
        let packet_type = fixed_header.packet_type()?;

        if fixed_header.remaining_len == 0 {
            // no payload packets
            return match packet_type {
                PacketType::PingReq => Ok(Packet::PingReq(PingReq)),
                PacketType::PingResp => Ok(Packet::PingResp(PingResp)),
                PacketType::Disconnect => Ok(Packet::Disconnect(
                    Disconnect {
                        reason_code: DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                )),
                _ => Err(Error::PayloadRequired),
            };
        }

        let packet = packet.freeze();
        read_body(fixed_header, packet_type, packet).map_err(|e| match e {
            // The whole frame is already here: running out of bytes inside it
            // means the packet lies about its lengths, not that more is coming.
            // Reported as "insufficient", a caller would wait for bytes that
            // belong to the next packet.
            Error::InsufficientBytes(_) => Error::MalformedPacket,
            other => other,
        })
    }

    fn write(&self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
        let size = match packet {
            Packet::Connect(
                connect,
                connect_properties,
                last_will,
                last_will_properties,
                login,
            ) => connect::write(
                &connect,
                &connect_properties,
                &last_will,
                &last_will_properties,
                &login,
                buffer,
            )?,
            Packet::ConnAck(connack, properties) => connack::write(&connack, &properties, buffer)?,
            Packet::Publish(publish, properties) => publish::write(&publish, &properties, buffer)?,
            Packet::PubAck(puback, properties) => puback::write(&puback, &properties, buffer)?,
            Packet::Subscribe(subscribe, properties) => {
                subscribe::write(&subscribe, &properties, buffer)?
            }
            Packet::SubAck(suback, properties) => suback::write(&suback, &properties, buffer)?,
            Packet::PubRec(pubrec, properties) => pubrec::write(&pubrec, &properties, buffer)?,
            Packet::PubRel(pubrel, properties) => pubrel::write(&pubrel, &properties, buffer)?,
            Packet::PubComp(pubcomp, properties) => pubcomp::write(&pubcomp, &properties, buffer)?,
            Packet::Unsubscribe(unsubscribe, properties) => {
                unsubscribe::write(&unsubscribe, &properties, buffer)?
            }
            Packet::UnsubAck(unsuback, properties) => {
                unsuback::write(&unsuback, &properties, buffer)?
            }
            Packet::Disconnect(disconnect, properties) => {
                disconnect::write(&disconnect, &properties, buffer)?
            }
            Packet::PingReq(_) => ping::pingreq::write(buffer)?,
            Packet::PingResp(_) => ping::pingresp::write(buffer)?,
        };
        Ok(size)
    }
}

/// Parses the variable header and payload of one whole frame.
fn read_body(
    fixed_header: FixedHeader,
    packet_type: PacketType,
    packet: Bytes,
) -> Result<Packet, Error> {
    let packet = match packet_type {
        // Server-to-client packets are decoded too (upstream hit
        // `unreachable!` on them): refusing one is the caller's decision.
        PacketType::ConnAck => {
            let (connack, properties) = connack::read(fixed_header, packet)?;
            Packet::ConnAck(connack, properties)
        }
        PacketType::UnsubAck => {
            let (unsuback, properties) = unsuback::read(fixed_header, packet)?;
            Packet::UnsubAck(unsuback, properties)
        }
        PacketType::Connect => {
            let (connect, properties, will, willproperties, login) =
                connect::read(fixed_header, packet)?;
            Packet::Connect(connect, properties, will, willproperties, login)
        }
        PacketType::Publish => {
            let (publish, properties) = publish::read(fixed_header, packet)?;
            Packet::Publish(publish, properties)
        }
        PacketType::PubAck => {
            let (puback, properties) = puback::read(fixed_header, packet)?;
            Packet::PubAck(puback, properties)
        }
        PacketType::Subscribe => {
            let (subscribe, properties) = subscribe::read(fixed_header, packet)?;
            Packet::Subscribe(subscribe, properties)
        }
        PacketType::SubAck => {
            let (suback, properties) = suback::read(fixed_header, packet)?;
            Packet::SubAck(suback, properties)
        }
        PacketType::Unsubscribe => {
            let (unsubscribe, properties) = unsubscribe::read(fixed_header, packet)?;
            Packet::Unsubscribe(unsubscribe, properties)
        }
        PacketType::PingReq => Packet::PingReq(PingReq),
        PacketType::PingResp => Packet::PingResp(PingResp),
        PacketType::Disconnect => {
            let (disconnect, properties) = disconnect::read(fixed_header, packet)?;
            Packet::Disconnect(disconnect, properties)
        }
        PacketType::PubRec => {
            let (pubrec, properties) = pubrec::read(fixed_header, packet)?;
            Packet::PubRec(pubrec, properties)
        }
        PacketType::PubRel => {
            let (pubrel, properties) = pubrel::read(fixed_header, packet)?;
            Packet::PubRel(pubrel, properties)
        }
        PacketType::PubComp => {
            let (pubcomp, properties) = pubcomp::read(fixed_header, packet)?;
            Packet::PubComp(pubcomp, properties)
        }
    };

    Ok(packet)
}

/// patched (patch 32): properties MQTT 5 allows once are refused when
/// repeated, in every packet; reserved subscription option bits are refused.
#[cfg(test)]
mod patch32_tests {
    use super::*;
    use crate::protocol::v4::V4;

    /// A packet: `first` byte, then the remaining length, then `body`.
    fn frame(first: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u8(first);
        write_remaining_length(&mut out, body.len()).unwrap();
        out.extend_from_slice(body);
        out
    }

    fn v5(first: u8, body: &[u8]) -> Result<Packet, Error> {
        V5.read_mut(&mut frame(first, body), 1 << 20)
    }

    /// An MQTT 5 CONNECT (clean start, client id "c") with these
    /// properties, and a will with `will_properties` if given.
    fn connect(properties: &[u8], will_properties: Option<&[u8]>) -> Vec<u8> {
        let flags = if will_properties.is_some() {
            0x06
        } else {
            0x02
        };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 60];
        body.push(properties.len() as u8);
        body.extend_from_slice(properties);
        body.extend_from_slice(&[0, 1, b'c']);
        if let Some(will) = will_properties {
            body.push(will.len() as u8);
            body.extend_from_slice(will);
            body.extend_from_slice(&[0, 1, b'w', 0, 1, b'm']);
        }
        body
    }

    /// An MQTT 5 SUBSCRIBE of `a` with these properties and options.
    fn subscribe(properties: &[u8], options: u8) -> Vec<u8> {
        let mut body = vec![0, 1, properties.len() as u8];
        body.extend_from_slice(properties);
        body.extend_from_slice(&[0, 1, b'a', options]);
        body
    }

    #[test]
    fn patch32_repeated_single_properties_are_protocol_errors() {
        let receive_maximum_twice = [0x21, 0, 10, 0x21, 0, 20];
        let expiry_twice = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
        let method_twice = [0x15, 0, 1, b'x', 0x15, 0, 1, b'y'];
        let delay_twice = [0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 2];
        let cases: Vec<(&str, u8, Vec<u8>, u8)> = vec![
            (
                "connect receive maximum",
                0x10,
                connect(&receive_maximum_twice, None),
                0x21,
            ),
            (
                "connect session expiry",
                0x10,
                connect(&expiry_twice, None),
                0x11,
            ),
            (
                "connect auth method",
                0x10,
                connect(&method_twice, None),
                0x15,
            ),
            ("will delay", 0x10, connect(&[], Some(&delay_twice)), 0x18),
            (
                "subscription identifier",
                0x82,
                subscribe(&[0x0B, 1, 0x0B, 2], 0),
                0x0B,
            ),
            (
                "publish topic alias",
                0x32,
                vec![0, 1, b't', 0, 1, 6, 0x23, 0, 1, 0x23, 0, 2, b'p'],
                0x23,
            ),
            (
                "puback reason string",
                0x40,
                vec![0, 1, 0, 8, 0x1F, 0, 1, b'a', 0x1F, 0, 1, b'b'],
                0x1F,
            ),
            (
                "disconnect session expiry",
                0xE0,
                {
                    let mut body = vec![0, expiry_twice.len() as u8];
                    body.extend_from_slice(&expiry_twice);
                    body
                },
                0x11,
            ),
        ];
        for (what, first, body, property) in cases {
            let read = v5(first, &body);
            assert!(
                matches!(read, Err(Error::DuplicateProperty(p)) if p == property),
                "{what}: {read:?}"
            );
        }
    }

    #[test]
    fn patch32_properties_allowed_many_times_still_are() {
        let two_user_properties = [0x26, 0, 1, b'k', 0, 1, b'1', 0x26, 0, 1, b'k', 0, 1, b'2'];
        match v5(0x10, &connect(&two_user_properties, None)) {
            Ok(Packet::Connect(_, Some(properties), ..)) => {
                assert_eq!(properties.user_properties.len(), 2)
            }
            other => panic!("{other:?}"),
        }
        // Each property once: all kept, the authentication method too.
        let mut once_each = vec![0x21, 0, 10, 0x27, 0, 0, 4, 0, 0x11, 0, 0, 0, 9];
        once_each.extend_from_slice(&[0x15, 0, 5, b'S', b'C', b'R', b'A', b'M']);
        match v5(0x10, &connect(&once_each, None)) {
            Ok(Packet::Connect(_, Some(p), ..)) => {
                assert_eq!(p.receive_maximum, Some(10));
                assert_eq!(p.max_packet_size, Some(1024));
                assert_eq!(p.session_expiry_interval, Some(9));
                assert_eq!(p.authentication_method.as_deref(), Some("SCRAM"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn patch32_reserved_subscription_option_bits_are_malformed() {
        for options in [0x40, 0x80, 0xC0 | 0x01] {
            let read = v5(0x82, &subscribe(&[], options));
            assert!(
                matches!(read, Err(Error::ReservedBitsSet(o)) if o == options),
                "{options:#x}: {read:?}"
            );
        }
        // Every defined bit (QoS 2, No Local, Retain As Published, Retain
        // Handling 2) is still accepted.
        match v5(0x82, &subscribe(&[0x0B, 7], 0b0010_1110)) {
            Ok(Packet::Subscribe(subscribe, Some(properties))) => {
                assert_eq!(properties.id, Some(7));
                let filter = &subscribe.filters[0];
                assert!(filter.nolocal && filter.preserve_retain);
                assert_eq!(filter.retain_forward_rule, RetainForwardRule::Never);
            }
            other => panic!("{other:?}"),
        }
        // MQTT 3.1.1: only the QoS bits are defined.
        let v4 = |options: u8| V4.read_mut(&mut frame(0x82, &[0, 1, 0, 1, b'a', options]), 1024);
        assert!(matches!(v4(0x04), Err(Error::ReservedBitsSet(0x04))));
        assert!(matches!(v4(0x80), Err(Error::ReservedBitsSet(0x80))));
        assert!(matches!(v4(0x01), Ok(Packet::Subscribe(..))));
    }
}
