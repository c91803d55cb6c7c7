//! Raw MQTT packets for tests that act as clients no library would be: a
//! device that stops reading, filters libraries refuse to send, a silent
//! socket. Encoded with rumqttd's own codecs, so the bytes are well formed.

use bytes::BytesMut;
use mqtt_router::protocol::{
    Connect, Filter, Login, Packet, Protocol, QoS, RetainForwardRule, Subscribe,
};

/// Encodes `packet` for MQTT 3.1.1 (`version` 4) or 5.
pub fn encode(version: u8, packet: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    let written = if version == 4 {
        mqtt_router::protocol::v4::V4.write(packet, &mut out)
    } else {
        mqtt_router::protocol::v5::V5.write(packet, &mut out)
    };
    written.expect("a test packet encodes");
    out.to_vec()
}

/// A clean-session CONNECT as device (username `JWT`) with `token`.
pub fn connect(version: u8, client_id: &str, keep_alive: u16, token: &str) -> Vec<u8> {
    encode(
        version,
        Packet::Connect(
            Connect {
                keep_alive,
                client_id: client_id.into(),
                clean_session: true,
            },
            None,
            None,
            None,
            Some(Login {
                username: "JWT".into(),
                password: token.into(),
            }),
        ),
    )
}

/// A SUBSCRIBE with packet id `pkid` to `filters`, each at `qos`.
pub fn subscribe(version: u8, pkid: u16, filters: &[&str], qos: QoS) -> Vec<u8> {
    encode(
        version,
        Packet::Subscribe(
            Subscribe {
                pkid,
                filters: filters
                    .iter()
                    .map(|f| Filter {
                        path: f.to_string(),
                        qos,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                    })
                    .collect(),
            },
            None,
        ),
    )
}
