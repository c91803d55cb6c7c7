//! Owns the MQTT 5 rules on values the decoder reads but does not judge:
//! the CONNECT properties that make a CONNECT a Protocol Error or name an
//! authentication the broker does not offer, and a DISCONNECT that sets a
//! Session Expiry Interval its CONNECT did not have. (A property repeated
//! where MQTT 5 allows it once, or reserved bits set, are refused by the
//! decoder itself: vendor patch 32.) Pure code; `connection` acts on it.

use crate::answers::ConnectRefusal;
use mqtt_router::protocol::ConnectProperties;

/// Refuses a CONNECT whose properties MQTT 5 forbids, before anything else
/// is spent on it (a token's verification included). MQTT 3.1.1 CONNECTs
/// carry no properties (`None`) and always pass.
pub fn connect_properties(properties: Option<&ConnectProperties>) -> Result<(), ConnectRefusal> {
    let Some(p) = properties else {
        return Ok(());
    };
    // MQTT 5 3.1.2.11.3: "It is a Protocol Error to include the Receive
    // Maximum value more than once or for it to have the value 0."
    if p.receive_maximum == Some(0) {
        return Err(ConnectRefusal::ProtocolError("receive maximum 0"));
    }
    // 3.1.2.11.4: likewise for a Maximum Packet Size of 0 (no packet, the
    // CONNACK included, could be sent to such a client).
    if p.max_packet_size == Some(0) {
        return Err(ConnectRefusal::ProtocolError("maximum packet size 0"));
    }
    // 3.1.2.11.6, 3.1.2.11.7: 0 or 1, anything else a Protocol Error.
    if p.request_response_info.is_some_and(|v| v > 1) {
        return Err(ConnectRefusal::ProtocolError(
            "request response information not 0 or 1",
        ));
    }
    if p.request_problem_info.is_some_and(|v| v > 1) {
        return Err(ConnectRefusal::ProtocolError(
            "request problem information not 0 or 1",
        ));
    }
    // 3.1.2.11.9: extended authentication is not offered (devices prove
    // themselves with a JWT as password), so any method is one the broker
    // does not support: 0x8C, as 4.12 says.
    if p.authentication_method.is_some() {
        return Err(ConnectRefusal::BadAuthenticationMethod);
    }
    // 3.1.2.11.10: Authentication Data without a method.
    if p.authentication_data.is_some() {
        return Err(ConnectRefusal::ProtocolError(
            "authentication data without a method",
        ));
    }
    Ok(())
}

/// Whether a DISCONNECT's Session Expiry Interval breaks MQTT-3.14.2-2: a
/// session that connected with an expiry of 0 (or none) may not set a
/// non-zero one when it leaves. Such a session is clean, counted against no
/// persistent-session cap, and must not come to outlive its connection
/// (nor park a delayed will) this way.
pub fn disconnect_expiry_is_protocol_error(
    connect_expiry_zero: bool,
    disconnect_secs: u32,
) -> bool {
    connect_expiry_zero && disconnect_secs > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CONNECT properties with nothing set (the type has no `Default`).
    fn none() -> ConnectProperties {
        ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }
    }

    #[test]
    fn connect_properties_table() {
        let ok = none();
        let cases = [
            (none(), None),
            (
                ConnectProperties {
                    receive_maximum: Some(1),
                    max_packet_size: Some(1),
                    request_response_info: Some(1),
                    request_problem_info: Some(0),
                    ..none()
                },
                None,
            ),
            (
                ConnectProperties {
                    receive_maximum: Some(0),
                    ..none()
                },
                Some(ConnectRefusal::ProtocolError("receive maximum 0")),
            ),
            (
                ConnectProperties {
                    max_packet_size: Some(0),
                    ..none()
                },
                Some(ConnectRefusal::ProtocolError("maximum packet size 0")),
            ),
            (
                ConnectProperties {
                    request_response_info: Some(2),
                    ..none()
                },
                Some(ConnectRefusal::ProtocolError(
                    "request response information not 0 or 1",
                )),
            ),
            (
                ConnectProperties {
                    request_problem_info: Some(7),
                    ..none()
                },
                Some(ConnectRefusal::ProtocolError(
                    "request problem information not 0 or 1",
                )),
            ),
            (
                ConnectProperties {
                    authentication_method: Some("SCRAM-SHA-1".into()),
                    authentication_data: Some(bytes::Bytes::from_static(b"x")),
                    ..none()
                },
                Some(ConnectRefusal::BadAuthenticationMethod),
            ),
            (
                ConnectProperties {
                    authentication_data: Some(bytes::Bytes::from_static(b"x")),
                    ..none()
                },
                Some(ConnectRefusal::ProtocolError(
                    "authentication data without a method",
                )),
            ),
        ];
        for (properties, expected) in cases {
            assert_eq!(
                connect_properties(Some(&properties)).err(),
                expected,
                "{properties:?}"
            );
        }
        assert_eq!(connect_properties(None), Ok(()), "MQTT 3.1.1");
        assert_eq!(connect_properties(Some(&ok)), Ok(()));
    }

    #[test]
    fn disconnect_may_not_give_a_clean_session_an_expiry() {
        // (CONNECT expiry was 0, DISCONNECT expiry) -> protocol error
        let table = [
            (true, 0, false),
            (true, 1, true),
            (true, u32::MAX, true),
            (false, 0, false),
            (false, 600, false),
        ];
        for (zero, secs, expected) in table {
            assert_eq!(
                disconnect_expiry_is_protocol_error(zero, secs),
                expected,
                "{zero} {secs}"
            );
        }
    }
}
