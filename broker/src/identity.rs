//! Owns identity stamping: every publish (and will) a device makes leaves
//! the gate with the MQTT 5 user properties `user_id`, `client_id` and
//! `token_iat` (the `iat` of its token, `0` without one: handlers check it
//! against the user's revocation) set by the broker; properties of those
//! names sent by the device are dropped, and so are look-alikes (`USER_ID`,
//! ` User_Id `): handler libraries compare property names differently
//! (case-folded, trimmed), so a look-alike could be read as the real one by
//! some of them.

use crate::auth::DeviceIdentity;
use crate::router::protocol::PublishProperties;
use protocol::topics::{CLIENT_ID_PROPERTY, TOKEN_IAT_PROPERTY, USER_ID_PROPERTY};

/// The names the broker stamps; devices can never send them.
const STAMPED: [&str; 3] = [USER_ID_PROPERTY, CLIENT_ID_PROPERTY, TOKEN_IAT_PROPERTY];

/// Returns `properties` with forged identity properties removed and the
/// verified ones appended.
pub fn stamp(
    properties: Option<PublishProperties>,
    device: &DeviceIdentity,
    client_id: &str,
) -> PublishProperties {
    let mut properties = properties.unwrap_or_default();
    properties
        .user_properties
        .retain(|(name, _)| !is_identity_name(name));
    properties.user_properties.push((
        USER_ID_PROPERTY.to_owned(),
        device.uid().as_str().to_owned(),
    ));
    properties
        .user_properties
        .push((CLIENT_ID_PROPERTY.to_owned(), client_id.to_owned()));
    // No `iat` stamps 0: a revocation by time refuses it, as it refuses the
    // token at CONNECT.
    properties.user_properties.push((
        TOKEN_IAT_PROPERTY.to_owned(),
        device.issued_at().unwrap_or(0).to_string(),
    ));
    properties
}

/// Whether `name` is, or could be read as, an identity property name:
/// equal to one ignoring ASCII case and surrounding whitespace.
fn is_identity_name(name: &str) -> bool {
    let name = name.trim();
    STAMPED
        .iter()
        .any(|stamped| name.eq_ignore_ascii_case(stamped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::device_issued;

    #[test]
    fn look_alike_names_are_dropped() {
        let device = device_issued("7", Some(1_700_000_000));
        let forged = PublishProperties {
            user_properties: [
                "USER_ID",
                " User_Id ",
                "\tuser_id\n",
                "Client_ID",
                " client_id",
                "user_id ",
                "token_iat",
                " TOKEN_IAT\t",
                "Token_Iat",
            ]
            .into_iter()
            .map(|name| (name.to_owned(), "forged".to_owned()))
            .chain([
                ("user-id".to_owned(), "kept".to_owned()),
                ("userid".to_owned(), "kept".to_owned()),
                ("user_ids".to_owned(), "kept".to_owned()),
                ("token-iat".to_owned(), "kept".to_owned()),
                ("iat".to_owned(), "kept".to_owned()),
            ])
            .collect(),
            ..Default::default()
        };
        let stamped = stamp(Some(forged), &device, "phone");
        assert_eq!(
            stamped.user_properties,
            vec![
                ("user-id".to_owned(), "kept".to_owned()),
                ("userid".to_owned(), "kept".to_owned()),
                ("user_ids".to_owned(), "kept".to_owned()),
                ("token-iat".to_owned(), "kept".to_owned()),
                ("iat".to_owned(), "kept".to_owned()),
                ("user_id".to_owned(), "7".to_owned()),
                ("client_id".to_owned(), "phone".to_owned()),
                ("token_iat".to_owned(), "1700000000".to_owned()),
            ]
        );
    }

    #[test]
    fn forged_properties_are_replaced() {
        let device = device_issued("68946", Some(42));
        let forged = PublishProperties {
            user_properties: vec![
                ("user_id".into(), "23412".into()),
                ("trace".into(), "t1".into()),
                ("client_id".into(), "other".into()),
                // A revoked session must not pass for a fresh one.
                ("token_iat".into(), "99999999999".into()),
                ("user_id".into(), "1".into()),
            ],
            ..Default::default()
        };
        let stamped = stamp(Some(forged), &device, "phone");
        assert_eq!(
            stamped.user_properties,
            vec![
                ("trace".to_owned(), "t1".to_owned()),
                ("user_id".to_owned(), "68946".to_owned()),
                ("client_id".to_owned(), "phone".to_owned()),
                ("token_iat".to_owned(), "42".to_owned()),
            ]
        );
        assert_eq!(stamp(None, &device, "c").user_properties.len(), 3);
        // A token without `iat` is stamped 0 (issued at the epoch).
        let no_iat = stamp(None, &device_issued("68946", None), "c");
        assert_eq!(
            no_iat.user_properties.last(),
            Some(&("token_iat".to_owned(), "0".to_owned()))
        );
    }
}
