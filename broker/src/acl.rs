//! Owns authorization: which topics a verified principal may publish to and
//! subscribe to (the README's table of who may publish and subscribe).
//! Pure functions over `&Principal`, so no unverified path can reach them.
//! Also the size caps on topics and filters, by kind of client.

use crate::auth::Principal;
use protocol::topics::{
    is_valid_filter, is_valid_topic_name, is_wildcard, split_shared, CapExceeded, TopicCaps,
};

/// Which topics are commands devices may publish to. The delivery owner
/// answers (`delivery`): configured ones, and those handlers declared.
pub trait CommandTopics {
    fn is_command(&self, topic: &str) -> bool;
}

/// Topic and filter size caps for devices and for handlers. Handlers get
/// more room (trusted with a key, and they may use long filters), devices
/// as little as the product needs: commands and `<uid>_<name>` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub device: TopicCaps,
    pub handler: TopicCaps,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits {
            device: TopicCaps {
                max_bytes: 256,
                max_levels: 16,
            },
            handler: TopicCaps {
                max_bytes: 4096,
                max_levels: 64,
            },
        }
    }
}

impl TopicLimits {
    /// Checks `topic` (a name or a filter) against `principal`'s caps.
    fn check(&self, principal: &Principal, topic: &str) -> Result<(), Denial> {
        let caps = match principal {
            Principal::Device(_) => &self.device,
            Principal::Handler(_) => &self.handler,
        };
        caps.check(topic).map_err(|e| match e {
            CapExceeded::TooLong(_) => Denial::TopicTooLong,
            CapExceeded::TooManyLevels(_) => Denial::TooManyLevels,
        })
    }
}

/// Why a publish or subscription is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Syntactically not a topic name / filter.
    Invalid,
    /// Well-formed, but this principal may not use it.
    NotAuthorized,
    /// Longer than the principal's topic cap (answered as an invalid topic).
    TopicTooLong,
    /// More levels than the principal's topic cap (answered as an invalid topic).
    TooManyLevels,
    /// The session holds as many subscriptions as it may.
    QuotaExceeded,
    /// A device's publish carries more user properties or correlation data
    /// than its caps (`property_caps`); answered 0x83.
    PropertiesTooLarge,
}

impl Denial {
    /// Short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Denial::Invalid => "invalid",
            Denial::NotAuthorized => "not_authorized",
            Denial::TopicTooLong => "topic_too_long",
            Denial::TooManyLevels => "topic_too_many_levels",
            Denial::QuotaExceeded => "quota_exceeded",
            Denial::PropertiesTooLarge => "properties_too_large",
        }
    }
}

/// May `principal` publish to `topic`?
pub fn may_publish(
    principal: &Principal,
    topic: &str,
    commands: &(impl CommandTopics + ?Sized),
    limits: &TopicLimits,
) -> Result<(), Denial> {
    limits.check(principal, topic)?;
    if !is_valid_topic_name(topic) {
        return Err(Denial::Invalid);
    }
    match principal {
        Principal::Handler(_) => {
            if topic.starts_with("$SYS") {
                Err(Denial::NotAuthorized)
            } else {
                Ok(())
            }
        }
        Principal::Device(device) => {
            // Command topics only; never `$...`, never a reply topic of its own
            // (that would spoof a handler's answer to itself).
            if topic.starts_with('$')
                || device.uid().owns_topic(topic)
                || !commands.is_command(topic)
            {
                Err(Denial::NotAuthorized)
            } else {
                Ok(())
            }
        }
    }
}

/// May `principal` subscribe to `filter`?
pub fn may_subscribe(
    principal: &Principal,
    filter: &str,
    commands: &(impl CommandTopics + ?Sized),
    limits: &TopicLimits,
) -> Result<(), Denial> {
    limits.check(principal, filter)?;
    match principal {
        Principal::Handler(_) => {
            if let Some((_, inner)) = split_shared(filter) {
                if is_valid_filter(inner) && !inner.starts_with('$') {
                    return Ok(());
                }
                return Err(Denial::Invalid);
            }
            if !is_valid_filter(filter) {
                return Err(Denial::Invalid);
            }
            // The router refuses `$` filters other than shared ones.
            if filter.starts_with('$') {
                return Err(Denial::NotAuthorized);
            }
            Ok(())
        }
        Principal::Device(device) => {
            if !is_valid_filter(filter) {
                return Err(Denial::Invalid);
            }
            // Literal topics under the device's own prefix, and never a
            // command topic (a uid equal to a command's first word must not
            // read everyone's commands).
            if is_wildcard(filter)
                || filter.starts_with('$')
                || !device.uid().owns_topic(filter)
                || commands.is_command(filter)
            {
                return Err(Denial::NotAuthorized);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::testing::{device, handler};

    #[test]
    fn device_publish_table() {
        let limits = TopicLimits::default();
        let commands = crate::delivery::Table::new(
            ["sync".to_owned(), "request_contact".to_owned()],
            Default::default(),
        );
        commands.declare("$share/publish/publish");
        // A handler reading a user's reply topic does not open it to devices.
        commands.declare("alice_x");
        let d = device("68946");
        let cases = [
            ("sync", Ok(())),
            ("request_contact", Ok(())),
            ("publish", Ok(())),
            ("undeclared", Err(Denial::NotAuthorized)),
            ("23412_contact_requested", Err(Denial::NotAuthorized)),
            ("68946_sync", Err(Denial::NotAuthorized)),
            ("alice_x", Err(Denial::NotAuthorized)),
            ("$SYS/x", Err(Denial::NotAuthorized)),
            ("sync/+", Err(Denial::Invalid)),
            ("#", Err(Denial::Invalid)),
            ("", Err(Denial::Invalid)),
        ];
        for (topic, want) in cases {
            assert_eq!(
                may_publish(&d, topic, &commands, &limits),
                want,
                "{topic:?}"
            );
        }
    }

    #[test]
    fn handler_publish_table() {
        let limits = TopicLimits::default();
        let commands = crate::delivery::Table::new([], Default::default());
        let h = handler();
        assert_eq!(
            may_publish(&h, "23412_contact_requested", &commands, &limits),
            Ok(())
        );
        assert_eq!(
            may_publish(&h, "anything/at/all", &commands, &limits),
            Ok(())
        );
        assert_eq!(
            may_publish(&h, "$SYS/broker", &commands, &limits),
            Err(Denial::NotAuthorized)
        );
        assert_eq!(
            may_publish(&h, "a/#", &commands, &limits),
            Err(Denial::Invalid)
        );
    }

    #[test]
    fn device_subscribe_table() {
        let limits = TopicLimits::default();
        let commands = crate::delivery::Table::new(
            ["sync".to_owned(), "request_contact".to_owned()],
            Default::default(),
        );
        let d = device("68946");
        let cases = [
            ("68946_contact_approved", Ok(())),
            ("68946_sync", Ok(())),
            ("68946_a/b", Ok(())),
            ("23412_contact_requested", Err(Denial::NotAuthorized)),
            ("6894_x", Err(Denial::NotAuthorized)),
            ("68946_#", Err(Denial::Invalid)),
            ("68946_+", Err(Denial::Invalid)),
            ("68946_/+", Err(Denial::NotAuthorized)),
            ("#", Err(Denial::NotAuthorized)),
            ("+", Err(Denial::NotAuthorized)),
            ("$SYS/#", Err(Denial::NotAuthorized)),
            ("$share/g/68946_x", Err(Denial::NotAuthorized)),
            ("sync", Err(Denial::NotAuthorized)),
            ("a/#/b", Err(Denial::Invalid)),
        ];
        for (filter, want) in cases {
            assert_eq!(
                may_subscribe(&d, filter, &commands, &limits),
                want,
                "{filter:?}"
            );
        }
        // A user whose id is a command's first word cannot read that command.
        let request = device("request");
        assert_eq!(
            may_subscribe(&request, "request_contact", &commands, &limits),
            Err(Denial::NotAuthorized)
        );
        assert_eq!(
            may_subscribe(&request, "request_contact_list", &commands, &limits),
            Ok(())
        );
    }

    #[test]
    fn topic_caps_by_kind() {
        let commands = crate::delivery::Table::new(["sync".to_owned()], Default::default());
        let limits = TopicLimits {
            device: TopicCaps {
                max_bytes: 16,
                max_levels: 2,
            },
            handler: TopicCaps {
                max_bytes: 32,
                max_levels: 4,
            },
        };
        let (d, h) = (device("7"), handler());
        let long = format!("7_{}", "x".repeat(20));
        assert_eq!(
            may_subscribe(&d, &long, &commands, &limits),
            Err(Denial::TopicTooLong)
        );
        assert_eq!(
            may_subscribe(&d, "7_a/b/c", &commands, &limits),
            Err(Denial::TooManyLevels)
        );
        assert_eq!(may_subscribe(&d, "7_a/b", &commands, &limits), Ok(()));
        assert_eq!(
            may_publish(&d, "sync/a/b", &commands, &limits),
            Err(Denial::TooManyLevels)
        );
        // The cap is checked before authorization: no work on a huge topic.
        assert_eq!(
            may_publish(&d, &"s".repeat(17), &commands, &limits),
            Err(Denial::TopicTooLong)
        );
        assert_eq!(may_publish(&h, &long, &commands, &limits), Ok(()));
        assert_eq!(may_subscribe(&h, "a/b/+/#", &commands, &limits), Ok(()));
        assert_eq!(
            may_subscribe(&h, "a/b/c/d/e", &commands, &limits),
            Err(Denial::TooManyLevels)
        );
        assert_eq!(
            may_publish(&h, &"h".repeat(33), &commands, &limits),
            Err(Denial::TopicTooLong)
        );
    }

    #[test]
    fn handler_subscribe_table() {
        let limits = TopicLimits::default();
        let commands = crate::delivery::Table::new([], Default::default());
        let h = handler();
        for ok in [
            "#",
            "+",
            "sync",
            "$share/sync/sync",
            "$share/g/a/+",
            "+/x/#",
        ] {
            assert_eq!(may_subscribe(&h, ok, &commands, &limits), Ok(()), "{ok:?}");
        }
        assert_eq!(
            may_subscribe(&h, "$SYS/#", &commands, &limits),
            Err(Denial::NotAuthorized)
        );
        assert_eq!(
            may_subscribe(&h, "$share/g/$SYS/#", &commands, &limits),
            Err(Denial::Invalid)
        );
        assert_eq!(
            may_subscribe(&h, "a/#/b", &commands, &limits),
            Err(Denial::Invalid)
        );
        assert_eq!(
            may_subscribe(&h, "$share//x", &commands, &limits),
            Err(Denial::NotAuthorized)
        );
    }
}
