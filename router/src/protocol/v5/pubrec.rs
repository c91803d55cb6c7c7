//! Owns what is particular to PUBREC (its first byte and reason
//! codes); the wire form it shares with the other acknowledgements is in
//! `ack.rs`.
use super::*;
use bytes::{Bytes, BytesMut};

pub fn read(
    fixed_header: FixedHeader,
    bytes: Bytes,
) -> Result<(PubRec, Option<PubRecProperties>), Error> {
    let (pkid, code, properties) = ack::read(fixed_header, bytes)?;
    let reason = match code {
        Some(code) => reason(code)?,
        None => PubRecReason::Success,
    };
    let properties = properties.map(|(reason_string, user_properties)| PubRecProperties {
        reason_string,
        user_properties,
    });
    Ok((PubRec { pkid, reason }, properties))
}

pub fn write(
    pubrec: &PubRec,
    properties: &Option<PubRecProperties>,
    buffer: &mut BytesMut,
) -> Result<usize, Error> {
    let properties = properties
        .as_ref()
        .map(|p| (&p.reason_string, p.user_properties.as_slice()));
    ack::write(0x50, pubrec.pkid, code(pubrec.reason), properties, buffer)
}

/// Connection return code type
fn reason(num: u8) -> Result<PubRecReason, Error> {
    let code = match num {
        0 => PubRecReason::Success,
        16 => PubRecReason::NoMatchingSubscribers,
        128 => PubRecReason::UnspecifiedError,
        131 => PubRecReason::ImplementationSpecificError,
        135 => PubRecReason::NotAuthorized,
        144 => PubRecReason::TopicNameInvalid,
        145 => PubRecReason::PacketIdentifierInUse,
        151 => PubRecReason::QuotaExceeded,
        153 => PubRecReason::PayloadFormatInvalid,
        num => return Err(Error::InvalidConnectReturnCode(num)),
    };

    Ok(code)
}

fn code(reason: PubRecReason) -> u8 {
    match reason {
        PubRecReason::Success => 0,
        PubRecReason::NoMatchingSubscribers => 16,
        PubRecReason::UnspecifiedError => 128,
        PubRecReason::ImplementationSpecificError => 131,
        PubRecReason::NotAuthorized => 135,
        PubRecReason::TopicNameInvalid => 144,
        PubRecReason::PacketIdentifierInUse => 145,
        PubRecReason::QuotaExceeded => 151,
        PubRecReason::PayloadFormatInvalid => 153,
    }
}
