//! Owns the delivery tags of the publishes a session writes to its client
//! (`delivery::DELIVERY_TAG`): the property is taken off every publish
//! before it is written, and the tag of a QoS 1/2 publish is kept by packet
//! id until the client's acknowledgement, when the session reports it
//! (`Delivery::delivered`); a publish aimed at another session
//! (`delivery::DELIVERY_TARGET`) is told apart. Also removes a tag or
//! target a client put on its own publish or will, so that none can be
//! forged.

use crate::delivery::{DELIVERY_TAG, DELIVERY_TARGET};
use crate::router::protocol::PublishProperties;
use std::collections::HashMap;

/// The tags of the publishes written to the client and not yet
/// acknowledged, by packet id. Bounded by the packet ids in flight (the
/// router's window); allocated only while one waits.
// Boxed on purpose: an empty map is 48 bytes inline in every connection's
// resident state; the box is 8, allocated only while a tagged publish waits.
#[allow(clippy::box_collection)]
#[derive(Default)]
pub struct Tags(Option<Box<HashMap<u16, Box<str>>>>);

impl Tags {
    /// Keeps `tag` until the client acknowledges `pkid` (a retransmission of
    /// the same packet id replaces it).
    pub fn insert(&mut self, pkid: u16, tag: Box<str>) {
        self.0
            .get_or_insert_with(Default::default)
            .insert(pkid, tag);
    }

    /// The tag of `pkid`, if its publish carried one; forgotten here.
    pub fn take(&mut self, pkid: u16) -> Option<Box<str>> {
        let map = self.0.as_mut()?;
        let tag = map.remove(&pkid);
        if map.is_empty() {
            self.0 = None;
        }
        tag
    }

    /// How many tags wait for an acknowledgement.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }
}

/// Removes every [`DELIVERY_TAG`] property from `properties`; the value of
/// the last one, if any (only the cluster sets one: a client's is removed
/// when it arrives).
pub fn take(properties: &mut PublishProperties) -> Option<Box<str>> {
    let user = &mut properties.user_properties;
    // Almost every publish carries none: no change, no allocation.
    let (_, last) = user
        .iter_mut()
        .rev()
        .find(|(name, _)| name == DELIVERY_TAG)?;
    let tag = std::mem::take(last).into_boxed_str();
    user.retain(|(name, _)| name != DELIVERY_TAG);
    Some(tag)
}

/// Removes every [`DELIVERY_TARGET`] property from `properties`: true
/// when one names a session other than `session` (the publish is not for
/// it). Only a tagged publish carries one.
pub fn aimed_elsewhere(properties: &mut PublishProperties, session: &str) -> bool {
    let user = &mut properties.user_properties;
    if !user.iter().any(|(name, _)| name == DELIVERY_TARGET) {
        return false;
    }
    let elsewhere = user
        .iter()
        .any(|(name, value)| name == DELIVERY_TARGET && value != session);
    user.retain(|(name, _)| name != DELIVERY_TARGET);
    elsewhere
}

/// Removes from a client's publish or will anything that could be read as
/// a delivery tag or target (its name ignoring ASCII case and surrounding
/// space, as the identity stamps do).
pub fn strip_forged(properties: &mut PublishProperties) {
    properties
        .user_properties
        .retain(|(name, _)| !is_tag_name(name));
}

/// [`strip_forged`] on optional properties.
pub fn strip_forged_from(mut properties: Option<PublishProperties>) -> Option<PublishProperties> {
    if let Some(properties) = properties.as_mut() {
        strip_forged(properties);
    }
    properties
}

fn is_tag_name(name: &str) -> bool {
    let name = name.trim();
    name.eq_ignore_ascii_case(DELIVERY_TAG) || name.eq_ignore_ascii_case(DELIVERY_TARGET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(names: &[(&str, &str)]) -> PublishProperties {
        PublishProperties {
            user_properties: names
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn take_removes_every_tag_and_gives_the_last() {
        let mut p = with(&[
            ("a", "1"),
            (DELIVERY_TAG, "first"),
            ("b", "2"),
            (DELIVERY_TAG, "last"),
        ]);
        assert_eq!(take(&mut p).as_deref(), Some("last"));
        assert_eq!(
            p.user_properties,
            with(&[("a", "1"), ("b", "2")]).user_properties
        );
        assert_eq!(take(&mut p), None);
    }

    #[test]
    fn forged_look_alikes_are_stripped() {
        let mut p = with(&[
            ("X-Gate-Tag", "f"),
            (" x-gate-tag\t", "f"),
            ("x-gate-tag", "f"),
            ("x-gate-tags", "kept"),
            ("X-Gate-For", "D:1:a"),
            (" x-gate-for", "D:1:a"),
        ]);
        strip_forged(&mut p);
        assert_eq!(
            p.user_properties,
            with(&[("x-gate-tags", "kept")]).user_properties
        );
    }

    #[test]
    fn a_target_is_removed_and_tells_whether_the_publish_is_for_another() {
        // (properties, session) -> elsewhere
        type Props<'a> = &'a [(&'a str, &'a str)];
        let table: [(Props, &str, bool); 4] = [
            (&[("a", "1")], "D:1:a", false),
            (&[(DELIVERY_TARGET, "D:1:a")], "D:1:a", false),
            (&[(DELIVERY_TARGET, "D:1:a")], "D:1:b", true),
            (
                &[(DELIVERY_TAG, "r 1-0"), (DELIVERY_TARGET, "D:1:a")],
                "H:h",
                true,
            ),
        ];
        for (props, session, elsewhere) in table {
            let mut p = with(props);
            assert_eq!(
                aimed_elsewhere(&mut p, session),
                elsewhere,
                "{props:?} {session}"
            );
            assert!(
                p.user_properties.iter().all(|(n, _)| n != DELIVERY_TARGET),
                "{props:?}"
            );
        }
    }

    #[test]
    fn the_map_is_freed_when_empty() {
        let mut tags = Tags::default();
        assert_eq!(tags.take(1), None);
        tags.insert(1, "t1".into());
        tags.insert(2, "t2".into());
        assert_eq!(tags.take(1).as_deref(), Some("t1"));
        assert_eq!(tags.len(), 1);
        assert_eq!(tags.take(2).as_deref(), Some("t2"));
        assert!(tags.0.is_none());
    }
}
