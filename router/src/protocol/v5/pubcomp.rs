//! Owns what is particular to PUBCOMP (its first byte and reason
//! codes); the wire form it shares with the other acknowledgements is in
//! `ack.rs`.
use super::*;
use bytes::{Bytes, BytesMut};

pub fn read(
    fixed_header: FixedHeader,
    bytes: Bytes,
) -> Result<(PubComp, Option<PubCompProperties>), Error> {
    let (pkid, code, properties) = ack::read(fixed_header, bytes)?;
    let reason = match code {
        Some(code) => reason(code)?,
        None => PubCompReason::Success,
    };
    let properties = properties.map(|(reason_string, user_properties)| PubCompProperties {
        reason_string,
        user_properties,
    });
    Ok((PubComp { pkid, reason }, properties))
}

pub fn write(
    pubcomp: &PubComp,
    properties: &Option<PubCompProperties>,
    buffer: &mut BytesMut,
) -> Result<usize, Error> {
    let properties = properties
        .as_ref()
        .map(|p| (&p.reason_string, p.user_properties.as_slice()));
    ack::write(0x70, pubcomp.pkid, code(pubcomp.reason), properties, buffer)
}

/// Connection return code type
fn reason(num: u8) -> Result<PubCompReason, Error> {
    let code = match num {
        0 => PubCompReason::Success,
        146 => PubCompReason::PacketIdentifierNotFound,
        num => return Err(Error::InvalidConnectReturnCode(num)),
    };

    Ok(code)
}

fn code(reason: PubCompReason) -> u8 {
    match reason {
        PubCompReason::Success => 0,
        PubCompReason::PacketIdentifierNotFound => 146,
    }
}
