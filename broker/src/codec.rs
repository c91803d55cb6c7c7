//! Owns MQTT framing on the wire: telling MQTT 3.1.1 from MQTT 5 by the
//! CONNECT's protocol level, and decoding/encoding packets with rumqttd's own
//! codecs (`protocol::v4::V4`, `protocol::v5::V5`) over a byte buffer.

use bytes::BytesMut;
use mqtt_router::protocol::{v4::V4, v5::V5, Error as ProtocolError, Packet, Protocol};

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// Why bytes from a client could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the first packet is not CONNECT")]
    FirstPacketNotConnect,
    #[error("unsupported protocol level {0} (MQTT 3.1.1 and 5 are supported)")]
    UnsupportedProtocol(u8),
    #[error("packet larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(ProtocolError),
    /// Well formed, but against a rule of MQTT 5 that makes it a Protocol
    /// Error (0x82) rather than a Malformed Packet (0x81): a property that
    /// may appear once appeared again.
    #[error("protocol error: {0}")]
    ProtocolViolation(ProtocolError),
}

impl CodecError {
    fn from_protocol(e: ProtocolError, max_size: usize) -> Self {
        match e {
            ProtocolError::PayloadSizeLimitExceeded(_) | ProtocolError::PayloadTooLong => {
                CodecError::TooLarge(max_size)
            }
            e @ ProtocolError::DuplicateProperty(_) => CodecError::ProtocolViolation(e),
            other => CodecError::Malformed(other),
        }
    }
}

/// Reads the protocol level of a CONNECT at the start of `buf`.
/// `Ok(None)` means more bytes are needed.
pub fn sniff_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::FirstPacketNotConnect);
    }
    // Skip the variable-length "remaining length" (1 to 4 bytes).
    let mut pos = 1;
    loop {
        let Some(&byte) = buf.get(pos) else {
            return Ok(None);
        };
        pos += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Err(CodecError::Malformed(
                ProtocolError::MalformedRemainingLength,
            ));
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(pos), buf.get(pos + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    let Some(&level) = buf.get(pos + 2 + name_len) else {
        return Ok(None);
    };
    match level {
        4 => Ok(Some(Version::V4)),
        5 => Ok(Some(Version::V5)),
        other => Err(CodecError::UnsupportedProtocol(other)),
    }
}

/// Frames packets of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub version: Version,
    max_size: usize,
}

impl Codec {
    pub fn new(version: Version, max_size: usize) -> Self {
        Codec { version, max_size }
    }

    /// Takes one whole packet off the front of `buf`; `Ok(None)` when the
    /// buffer holds only part of one.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        if buf.is_empty() {
            return Ok(None);
        }
        let result = match self.version {
            Version::V4 => V4.read_mut(buf, self.max_size),
            Version::V5 => V5.read_mut(buf, self.max_size),
        };
        match result {
            Ok(packet) => Ok(Some(packet)),
            Err(ProtocolError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(CodecError::from_protocol(e, self.max_size)),
        }
    }

    /// Appends the wire form of `packet` to `out`. On error `out` is left as
    /// it was: an encoder that fails half-way must not leave a partial packet
    /// in front of the next one. MQTT 5 properties are dropped for an MQTT
    /// 3.1.1 peer (the v4 encoder ignores them).
    pub fn encode(&self, packet: Packet, out: &mut BytesMut) -> Result<(), CodecError> {
        let start = out.len();
        let result = match self.version {
            Version::V4 => V4.write(packet, out),
            Version::V5 => V5.write(packet, out),
        };
        result.map(|_| ()).map_err(|e| {
            out.truncate(start);
            CodecError::from_protocol(e, self.max_size)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(level: u8) -> Vec<u8> {
        // CONNECT, remaining length, "MQTT", level, flags, keep-alive, client id "c"
        let mut v = vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
        v.extend_from_slice(&[0, 1, b'c']);
        v
    }

    #[test]
    fn sniffs_levels_and_waits_for_bytes() {
        assert_eq!(sniff_version(&connect_bytes(4)).unwrap(), Some(Version::V4));
        assert_eq!(sniff_version(&connect_bytes(5)).unwrap(), Some(Version::V5));
        assert_eq!(sniff_version(&connect_bytes(4)[..5]).unwrap(), None);
        assert_eq!(sniff_version(&[]).unwrap(), None);
        assert!(matches!(
            sniff_version(&connect_bytes(3)),
            Err(CodecError::UnsupportedProtocol(3))
        ));
        assert!(matches!(
            sniff_version(&[0x30, 0, 0]),
            Err(CodecError::FirstPacketNotConnect)
        ));
        assert!(matches!(
            sniff_version(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn decodes_a_connect_split_across_reads() {
        let codec = Codec::new(Version::V4, 1024);
        let bytes = connect_bytes(4);
        let mut buf = BytesMut::from(&bytes[..6]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&bytes[6..]);
        match codec.decode(&mut buf).unwrap() {
            Some(Packet::Connect(connect, ..)) => assert_eq!(connect.client_id, "c"),
            other => panic!("expected CONNECT, got {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_repeated_property_is_a_protocol_error_and_reserved_bits_malformed() {
        let codec = Codec::new(Version::V5, 1024);
        // SUBSCRIBE pkid 1, two Subscription Identifiers, filter "a".
        let mut twice = BytesMut::from(&[0x82, 10, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'a', 0][..]);
        twice[1] = u8::try_from(twice.len() - 2).unwrap();
        assert!(matches!(
            codec.decode(&mut twice),
            Err(CodecError::ProtocolViolation(
                ProtocolError::DuplicateProperty(0x0B)
            ))
        ));
        // SUBSCRIBE pkid 1, no properties, filter "a", reserved bit 7 set.
        let mut reserved = BytesMut::from(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x80][..]);
        assert!(matches!(
            codec.decode(&mut reserved),
            Err(CodecError::Malformed(ProtocolError::ReservedBitsSet(0x80)))
        ));
    }

    #[test]
    fn refuses_oversized_packets() {
        let codec = Codec::new(Version::V4, 1024);
        // PUBLISH with remaining length 2000
        let mut buf = BytesMut::from(&[0x30, 0xd0, 0x0f][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::TooLarge(1024))
        ));
    }
}
