//! Owns identity stamping: every publish a device makes leaves the gate with
//! the MQTT 5 user properties `user_id` and `client_id` set by the broker;
//! properties of those names sent by the device are dropped, and so are
//! look-alikes (`USER_ID`, ` User_Id `): handler libraries compare property
//! names differently (case-folded, trimmed), so a look-alike could be read
//! as the real one by some of them.

use rumqttd::protocol::PublishProperties;
use shared::topics::{CLIENT_ID_PROPERTY, USER_ID_PROPERTY};
use shared::UserId;

/// Returns `properties` with forged identity properties removed and the
/// verified ones appended.
pub fn stamp(
    properties: Option<PublishProperties>,
    uid: &UserId,
    client_id: &str,
) -> PublishProperties {
    let mut properties = properties.unwrap_or_default();
    properties
        .user_properties
        .retain(|(name, _)| !is_identity_name(name));
    properties
        .user_properties
        .push((USER_ID_PROPERTY.to_owned(), uid.as_str().to_owned()));
    properties
        .user_properties
        .push((CLIENT_ID_PROPERTY.to_owned(), client_id.to_owned()));
    properties
}

/// Whether `name` is, or could be read as, an identity property name:
/// equal to one ignoring ASCII case and surrounding whitespace.
fn is_identity_name(name: &str) -> bool {
    let name = name.trim();
    name.eq_ignore_ascii_case(USER_ID_PROPERTY) || name.eq_ignore_ascii_case(CLIENT_ID_PROPERTY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_alike_names_are_dropped() {
        let uid = UserId::parse("7").unwrap();
        let forged = PublishProperties {
            user_properties: [
                "USER_ID",
                " User_Id ",
                "\tuser_id\n",
                "Client_ID",
                " client_id",
                "user_id ",
            ]
            .into_iter()
            .map(|name| (name.to_owned(), "forged".to_owned()))
            .chain([
                ("user-id".to_owned(), "kept".to_owned()),
                ("userid".to_owned(), "kept".to_owned()),
                ("user_ids".to_owned(), "kept".to_owned()),
            ])
            .collect(),
            ..Default::default()
        };
        let stamped = stamp(Some(forged), &uid, "phone");
        assert_eq!(
            stamped.user_properties,
            vec![
                ("user-id".to_owned(), "kept".to_owned()),
                ("userid".to_owned(), "kept".to_owned()),
                ("user_ids".to_owned(), "kept".to_owned()),
                ("user_id".to_owned(), "7".to_owned()),
                ("client_id".to_owned(), "phone".to_owned()),
            ]
        );
    }

    #[test]
    fn forged_properties_are_replaced() {
        let uid = UserId::parse("68946").unwrap();
        let forged = PublishProperties {
            user_properties: vec![
                ("user_id".into(), "23412".into()),
                ("trace".into(), "t1".into()),
                ("client_id".into(), "other".into()),
                ("user_id".into(), "1".into()),
            ],
            ..Default::default()
        };
        let stamped = stamp(Some(forged), &uid, "phone");
        assert_eq!(
            stamped.user_properties,
            vec![
                ("trace".to_owned(), "t1".to_owned()),
                ("user_id".to_owned(), "68946".to_owned()),
                ("client_id".to_owned(), "phone".to_owned()),
            ]
        );
        assert_eq!(stamp(None, &uid, "c").user_properties.len(), 2);
    }
}
