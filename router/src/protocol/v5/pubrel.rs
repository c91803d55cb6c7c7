//! Owns what is particular to PUBREL (its first byte and reason
//! codes); the wire form it shares with the other acknowledgements is in
//! `ack.rs`.
use super::*;
use bytes::{Bytes, BytesMut};

pub fn read(
    fixed_header: FixedHeader,
    bytes: Bytes,
) -> Result<(PubRel, Option<PubRelProperties>), Error> {
    let (pkid, code, properties) = ack::read(fixed_header, bytes)?;
    let reason = match code {
        Some(code) => reason(code)?,
        None => PubRelReason::Success,
    };
    let properties = properties.map(|(reason_string, user_properties)| PubRelProperties {
        reason_string,
        user_properties,
    });
    Ok((PubRel { pkid, reason }, properties))
}

pub fn write(
    pubrel: &PubRel,
    properties: &Option<PubRelProperties>,
    buffer: &mut BytesMut,
) -> Result<usize, Error> {
    let properties = properties
        .as_ref()
        .map(|p| (&p.reason_string, p.user_properties.as_slice()));
    ack::write(0x62, pubrel.pkid, code(pubrel.reason), properties, buffer)
}

/// Connection return code type
fn reason(num: u8) -> Result<PubRelReason, Error> {
    let code = match num {
        0 => PubRelReason::Success,
        146 => PubRelReason::PacketIdentifierNotFound,
        num => return Err(Error::InvalidConnectReturnCode(num)),
    };

    Ok(code)
}

fn code(reason: PubRelReason) -> u8 {
    match reason {
        PubRelReason::Success => 0,
        PubRelReason::PacketIdentifierNotFound => 146,
    }
}
