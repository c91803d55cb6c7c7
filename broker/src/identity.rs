//! Owns identity stamping: every publish a device makes leaves the gate with
//! the MQTT 5 user properties `user_id` and `client_id` set by the broker;
//! properties of those names sent by the device are dropped.

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
        .retain(|(name, _)| name != USER_ID_PROPERTY && name != CLIENT_ID_PROPERTY);
    properties
        .user_properties
        .push((USER_ID_PROPERTY.to_owned(), uid.as_str().to_owned()));
    properties
        .user_properties
        .push((CLIENT_ID_PROPERTY.to_owned(), client_id.to_owned()));
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

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
