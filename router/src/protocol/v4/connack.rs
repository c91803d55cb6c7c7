use super::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

fn len() -> usize {
    // sesssion present + code
    1 + 1
}

pub fn read(fixed_header: FixedHeader, mut bytes: Bytes) -> Result<ConnAck, Error> {
    let variable_header_index = fixed_header.fixed_header_len;
    bytes.advance(variable_header_index);

    let flags = read_u8(&mut bytes)?;
    let return_code = read_u8(&mut bytes)?;

    let session_present = (flags & 0x01) == 1;
    let code = connect_return(return_code)?;
    let connack = ConnAck {
        session_present,
        code,
    };

    Ok(connack)
}

pub fn write(connack: &ConnAck, buffer: &mut BytesMut) -> Result<usize, Error> {
    let len = len();
    buffer.put_u8(0x20);

    let count = write_remaining_length(buffer, len)?;
    buffer.put_u8(connack.session_present as u8);
    buffer.put_u8(connect_code(connack.code));

    Ok(1 + count + len)
}

/// Connection return code type
fn connect_return(num: u8) -> Result<ConnectReturnCode, Error> {
    match num {
        0 => Ok(ConnectReturnCode::Success),
        1 => Ok(ConnectReturnCode::RefusedProtocolVersion),
        2 => Ok(ConnectReturnCode::ClientIdentifierNotValid),
        3 => Ok(ConnectReturnCode::ServiceUnavailable),
        4 => Ok(ConnectReturnCode::BadUserNamePassword),
        5 => Ok(ConnectReturnCode::NotAuthorized),
        num => Err(Error::InvalidConnectReturnCode(num)),
    }
}

/// MQTT 3.1.1 has six return codes; an MQTT 5 reason is sent as the nearest
/// of them (upstream panicked), so a refusal built for MQTT 5 still reaches a
/// 3.1.1 client as a refusal.
fn connect_code(return_code: ConnectReturnCode) -> u8 {
    match return_code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion
        | ConnectReturnCode::UnsupportedProtocolVersion => 1,
        ConnectReturnCode::ClientIdentifierNotValid => 2,
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::BadAuthenticationMethod => 4,
        ConnectReturnCode::NotAuthorized | ConnectReturnCode::Banned => 5,
        // Everything else is "the server cannot serve you now".
        ConnectReturnCode::ServiceUnavailable
        | ConnectReturnCode::UnspecifiedError
        | ConnectReturnCode::MalformedPacket
        | ConnectReturnCode::ProtocolError
        | ConnectReturnCode::ImplementationSpecificError
        | ConnectReturnCode::ServerUnavailable
        | ConnectReturnCode::ServerBusy
        | ConnectReturnCode::TopicNameInvalid
        | ConnectReturnCode::PacketTooLarge
        | ConnectReturnCode::QuotaExceeded
        | ConnectReturnCode::PayloadFormatInvalid
        | ConnectReturnCode::RetainNotSupported
        | ConnectReturnCode::QoSNotSupported
        | ConnectReturnCode::UseAnotherServer
        | ConnectReturnCode::ServerMoved
        | ConnectReturnCode::ConnectionRateExceeded => 3,
    }
}
