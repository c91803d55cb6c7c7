//! Owns what is particular to PUBACK (its first byte and reason
//! codes); the wire form it shares with the other acknowledgements is in
//! `ack.rs`.
use super::*;
use bytes::{Bytes, BytesMut};

pub fn read(
    fixed_header: FixedHeader,
    bytes: Bytes,
) -> Result<(PubAck, Option<PubAckProperties>), Error> {
    let (pkid, code, properties) = ack::read(fixed_header, bytes)?;
    let reason = match code {
        Some(code) => reason(code)?,
        None => PubAckReason::Success,
    };
    let properties = properties.map(|(reason_string, user_properties)| PubAckProperties {
        reason_string,
        user_properties,
    });
    Ok((PubAck { pkid, reason }, properties))
}

pub fn write(
    puback: &PubAck,
    properties: &Option<PubAckProperties>,
    buffer: &mut BytesMut,
) -> Result<usize, Error> {
    let properties = properties
        .as_ref()
        .map(|p| (&p.reason_string, p.user_properties.as_slice()));
    ack::write(0x40, puback.pkid, code(puback.reason), properties, buffer)
}

/// Connection return code type
fn reason(num: u8) -> Result<PubAckReason, Error> {
    let code = match num {
        0 => PubAckReason::Success,
        16 => PubAckReason::NoMatchingSubscribers,
        128 => PubAckReason::UnspecifiedError,
        131 => PubAckReason::ImplementationSpecificError,
        135 => PubAckReason::NotAuthorized,
        144 => PubAckReason::TopicNameInvalid,
        145 => PubAckReason::PacketIdentifierInUse,
        151 => PubAckReason::QuotaExceeded,
        153 => PubAckReason::PayloadFormatInvalid,
        num => return Err(Error::InvalidConnectReturnCode(num)),
    };

    Ok(code)
}

// TODO: Is typecasting significantly faster than functions?
fn code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0,
        PubAckReason::NoMatchingSubscribers => 16,
        PubAckReason::UnspecifiedError => 128,
        PubAckReason::ImplementationSpecificError => 131,
        PubAckReason::NotAuthorized => 135,
        PubAckReason::TopicNameInvalid => 144,
        PubAckReason::PacketIdentifierInUse => 145,
        PubAckReason::QuotaExceeded => 151,
        PubAckReason::PayloadFormatInvalid => 153,
    }
}
