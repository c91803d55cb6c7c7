//! Owns the set of command topics devices may publish to: the ones the
//! operator configured, plus the filters connected handlers subscribed to
//! (a handler declares its topics by subscribing, shared or not).
//!
//! A reply-shaped topic (`<uid>_<name>`, see `protocol::uid::is_reply_shaped`)
//! is never declared: a handler reading some user's reply topic must not open
//! it to every device's publishes. Underscored commands (`request_contact`)
//! are commands because the operator configured them.

use parking_lot::RwLock;
use protocol::topics::{effective_filter, is_wildcard, matches};
use protocol::uid::is_reply_shaped;
use std::collections::{HashMap, HashSet};

/// Configured and handler-declared command topics.
pub struct CommandTopics {
    configured: HashSet<String>,
    declared: RwLock<Declared>,
}

#[derive(Default)]
struct Declared {
    /// Literal topics with the number of live handler subscriptions naming them.
    literal: HashMap<String, usize>,
    /// Wildcard filters (whose first level is literal), with counts.
    wildcard: HashMap<String, usize>,
}

impl Declared {
    /// The counts a declared filter is kept in: literal or wildcard.
    fn counts_for(&mut self, filter: &str) -> &mut HashMap<String, usize> {
        if is_wildcard(filter) {
            &mut self.wildcard
        } else {
            &mut self.literal
        }
    }
}

impl CommandTopics {
    pub fn new(configured: impl IntoIterator<Item = String>) -> Self {
        CommandTopics {
            configured: configured.into_iter().collect(),
            declared: RwLock::new(Declared::default()),
        }
    }

    /// The filter a handler subscription declares as a command topic, if any.
    /// Filters that begin with a wildcard or `$` (monitoring subscriptions
    /// such as `#`) declare nothing: they would open every topic to devices.
    /// Nor do reply-shaped ones: the first level of a declarable filter is
    /// literal, so no topic it matches is reply-shaped when its first level
    /// is not.
    fn declarable(filter: &str) -> Option<&str> {
        let inner = effective_filter(filter);
        let first_level = inner.split('/').next().unwrap_or_default();
        if inner.starts_with('$') || is_wildcard(first_level) || is_reply_shaped(first_level) {
            return None;
        }
        Some(inner)
    }

    /// A handler subscribed to `filter`.
    pub fn declare(&self, filter: &str) {
        let Some(inner) = Self::declarable(filter) else {
            return;
        };
        let mut declared = self.declared.write();
        *declared
            .counts_for(inner)
            .entry(inner.to_owned())
            .or_default() += 1;
    }

    /// A handler's subscription to `filter` ended.
    pub fn withdraw(&self, filter: &str) {
        let Some(inner) = Self::declarable(filter) else {
            return;
        };
        let mut declared = self.declared.write();
        let map = declared.counts_for(inner);
        if let Some(count) = map.get_mut(inner) {
            *count -= 1;
            if *count == 0 {
                map.remove(inner);
            }
        }
    }

    /// Whether `topic` is currently a command topic.
    pub fn is_command(&self, topic: &str) -> bool {
        if self.configured.contains(topic) {
            return true;
        }
        let declared = self.declared.read();
        declared.literal.contains_key(topic)
            || declared
                .wildcard
                .keys()
                .any(|filter| matches(topic, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_and_declared_topics() {
        let topics = CommandTopics::new(["sync".to_owned()]);
        assert!(topics.is_command("sync"));
        assert!(!topics.is_command("publish"));

        topics.declare("$share/publish/publish");
        topics.declare("publish");
        assert!(topics.is_command("publish"));
        topics.withdraw("publish");
        assert!(topics.is_command("publish"), "still one subscription");
        topics.withdraw("$share/publish/publish");
        assert!(!topics.is_command("publish"));

        topics.declare("jobs/+");
        assert!(topics.is_command("jobs/resize"));
        assert!(!topics.is_command("jobs/a/b"));
    }

    #[test]
    fn monitoring_filters_declare_nothing() {
        let topics = CommandTopics::new([]);
        for filter in ["#", "+", "+/x", "$share/g/#", "$SYS/#"] {
            topics.declare(filter);
        }
        assert!(!topics.is_command("anything"));
        assert!(!topics.is_command("42_sync"));
        topics.withdraw("#");
    }

    #[test]
    fn reply_topics_never_become_commands() {
        let topics = CommandTopics::new(["request_contact".to_owned()]);
        for filter in [
            "alice_x",
            "$share/g/alice_x",
            "alice_x/+",
            "alice_x/#",
            "request_contact_list",
            "12_3_contact_list",
        ] {
            topics.declare(filter);
            assert!(!topics.is_command(effective_filter(filter)), "{filter:?}");
        }
        assert!(!topics.is_command("alice_x/y"));
        // Withdrawing what was never declared changes nothing.
        topics.withdraw("alice_x");
        // Configured underscored commands stay commands; plain ones still declare.
        assert!(topics.is_command("request_contact"));
        topics.declare("jobs");
        assert!(topics.is_command("jobs"));
    }
}
