//! Owns the wire form the four MQTT 5 publish acknowledgements share
//! (PUBACK, PUBREC, PUBREL, PUBCOMP, MQTT 5 3.4-3.7): a packet id, a reason
//! code, and properties holding a reason string and user properties. Each
//! packet's module keeps only its first byte and its reason codes (upstream
//! repeated this code four times).
use super::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// An acknowledgement's properties, borrowed from or moved into the
/// packet-specific property types, which have these two fields.
pub(super) type Properties = (Option<String>, Vec<(String, String)>);

/// The reason code of a success with no properties, which the sender may
/// leave out (remaining length 2).
const SUCCESS: u8 = 0;

fn len(code: u8, properties: Option<(&Option<String>, &[(String, String)])>) -> usize {
    // The Reason Code and Property Length can be omitted if the Reason Code
    // is 0x00 (Success) and there are no Properties (Remaining Length 2).
    let Some((reason_string, user_properties)) = properties else {
        if code == SUCCESS {
            return 2;
        }
        // pkid, reason, and one byte of zero property length
        return 2 + 1 + 1;
    };
    let properties_len = properties_len(reason_string, user_properties);
    2 + 1 + len_len(properties_len) + properties_len
}

fn properties_len(reason_string: &Option<String>, user_properties: &[(String, String)]) -> usize {
    let mut len = 0;
    if let Some(reason) = reason_string {
        len += 1 + 2 + reason.len();
    }
    for (key, value) in user_properties {
        len += 1 + 2 + key.len() + 2 + value.len();
    }
    len
}

/// Reads an acknowledgement: its packet id, its reason code (`None` when
/// left out, meaning success) and its properties.
pub(super) fn read(
    fixed_header: FixedHeader,
    mut bytes: Bytes,
) -> Result<(u16, Option<u8>, Option<Properties>), Error> {
    bytes.advance(fixed_header.fixed_header_len);
    let pkid = read_u16(&mut bytes)?;
    if fixed_header.remaining_len == 2 {
        return Ok((pkid, None, None));
    }
    let code = read_u8(&mut bytes)?;
    // No property length or properties when the remaining length is 3.
    if fixed_header.remaining_len < 4 {
        return Ok((pkid, Some(code), None));
    }
    Ok((pkid, Some(code), read_properties(&mut bytes)?))
}

fn read_properties(bytes: &mut Bytes) -> Result<Option<Properties>, Error> {
    let mut reason_string = None;
    let mut user_properties = Vec::new();

    // Properties are read from their own block, so a property can never
    // run past the declared length into the rest of the packet.
    let Some(mut block) = properties_block(bytes)? else {
        return Ok(None);
    };
    let bytes = &mut block;

    while bytes.has_remaining() {
        let prop = read_u8(bytes)?;
        match property(prop)? {
            PropertyType::ReasonString => {
                let reason = read_mqtt_string(bytes)?;
                once(&mut reason_string, reason, PropertyType::ReasonString)?;
            }
            PropertyType::UserProperty => {
                let key = read_mqtt_string(bytes)?;
                let value = read_mqtt_string(bytes)?;
                user_properties.push((key, value));
            }
            _ => return Err(Error::InvalidPropertyType(prop)),
        }
    }
    Ok(Some((reason_string, user_properties)))
}

/// Writes an acknowledgement whose first byte is `first_byte`.
pub(super) fn write(
    first_byte: u8,
    pkid: u16,
    code: u8,
    properties: Option<(&Option<String>, &[(String, String)])>,
    buffer: &mut BytesMut,
) -> Result<usize, Error> {
    let len = len(code, properties);
    buffer.put_u8(first_byte);
    let count = write_remaining_length(buffer, len)?;
    buffer.put_u16(pkid);

    // If there are no properties during success, sending reason code is optional
    let Some((reason_string, user_properties)) = properties else {
        if code == SUCCESS {
            return Ok(4);
        }
        buffer.put_u8(code);
        write_remaining_length(buffer, 0)?;
        return Ok(1 + count + len);
    };
    buffer.put_u8(code);
    write_remaining_length(buffer, properties_len(reason_string, user_properties))?;
    if let Some(reason) = reason_string {
        buffer.put_u8(PropertyType::ReasonString as u8);
        write_mqtt_string(buffer, reason)?;
    }
    for (key, value) in user_properties {
        buffer.put_u8(PropertyType::UserProperty as u8);
        write_mqtt_string(buffer, key)?;
        write_mqtt_string(buffer, value)?;
    }
    Ok(1 + count + len)
}
