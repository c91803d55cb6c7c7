//! Owns topic syntax shared by every party: names of the identity properties,
//! validation of topic names and filters, wildcard matching and shared
//! subscriptions (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7-4.8).

/// User property the broker sets on every device publish: the verified uid.
pub const USER_ID_PROPERTY: &str = "user_id";
/// User property the broker sets on every device publish: the device's client id.
pub const CLIENT_ID_PROPERTY: &str = "client_id";
/// User property the broker sets on every device publish and will: the
/// `iat` (Unix seconds, decimal) of the token the session logged in with, `0`
/// for a token without one. Handlers compare it with the user's revocation
/// (the SDK does, before handler code runs), so nothing an old session sends
/// after its user was revoked is acted on.
pub const TOKEN_IAT_PROPERTY: &str = "token_iat";
/// Username a device presents, with its JWT as the password.
pub const DEVICE_USERNAME: &str = "JWT";
/// Username a handler presents, with a handler key as the password.
pub const HANDLER_USERNAME: &str = "handler";
/// Prefix of a shared subscription: `$share/<group>/<filter>`.
pub const SHARE_PREFIX: &str = "$share/";

/// Whether `topic` is a valid topic *name* for PUBLISH: non-empty, no
/// wildcard characters, no NUL, at most 65,535 bytes.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 65_535 && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` is a valid topic filter: `#` only as the last level,
/// `+` only as a whole level, no NUL.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 65_535 || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

/// Limits on the size of topic names and filters one kind of client may use
/// (both bound the memory and the matching work a topic costs the broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicCaps {
    /// Longest topic name or filter, in bytes.
    pub max_bytes: usize,
    /// Most `/`-separated levels.
    pub max_levels: usize,
}

/// Why a topic or filter is over its caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error("topic longer than {0} bytes")]
    TooLong(usize),
    #[error("topic with more than {0} levels")]
    TooManyLevels(usize),
}

impl TopicCaps {
    /// Checks a topic name or filter (a shared subscription counts whole).
    /// Bytes first: the level count then walks a bounded string.
    pub fn check(&self, topic: &str) -> Result<(), CapExceeded> {
        if topic.len() > self.max_bytes {
            return Err(CapExceeded::TooLong(self.max_bytes));
        }
        // Levels are separators plus one.
        if topic.bytes().filter(|b| *b == b'/').count() >= self.max_levels {
            return Err(CapExceeded::TooManyLevels(self.max_levels));
        }
        Ok(())
    }
}

/// Whether `filter` contains a wildcard level.
pub fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Splits a shared subscription `$share/<group>/<filter>` into group and filter.
/// Returns `None` for a plain filter, and for a malformed share (empty group,
/// a group with wildcards, or no filter).
pub fn split_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return None;
    }
    Some((group, inner))
}

/// The filter a subscription actually matches against (shared prefix removed).
pub fn effective_filter(filter: &str) -> &str {
    split_shared(filter).map_or(filter, |(_, inner)| inner)
}

/// MQTT topic matching: `+` one level, `#` this level and all below, and
/// wildcards at the first level never match topics that begin with `$`.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => continue,
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(is_valid_topic_name("sync"));
        assert!(is_valid_topic_name("a/b/c"));
        for bad in ["", "a/+", "#", "a\0b"] {
            assert!(!is_valid_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "sync"] {
            assert!(is_valid_filter(ok), "{ok:?}");
        }
        for bad in ["", "a/#/b", "a+", "a/b#", "#/a", "x\0"] {
            assert!(!is_valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(split_shared("$share/g/sync"), Some(("g", "sync")));
        assert_eq!(split_shared("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(split_shared("$share//sync"), None);
        assert_eq!(split_shared("$share/g/"), None);
        assert_eq!(split_shared("$share/g+/x"), None);
        assert_eq!(split_shared("sync"), None);
        assert_eq!(effective_filter("$share/g/x/#"), "x/#");
        assert_eq!(effective_filter("x/#"), "x/#");
    }

    #[test]
    fn caps() {
        let caps = TopicCaps {
            max_bytes: 8,
            max_levels: 3,
        };
        assert_eq!(caps.check("a/b/c"), Ok(()));
        assert_eq!(caps.check("12345678"), Ok(()));
        assert_eq!(caps.check("123456789"), Err(CapExceeded::TooLong(8)));
        assert_eq!(caps.check("a/b/c/d"), Err(CapExceeded::TooManyLevels(3)));
        assert_eq!(caps.check("//"), Ok(()), "three empty levels");
        assert_eq!(caps.check("///"), Err(CapExceeded::TooManyLevels(3)));
        // Multi-byte characters count in bytes.
        assert_eq!(caps.check("ééé"), Ok(()));
        assert_eq!(caps.check("éééé/"), Err(CapExceeded::TooLong(8)));
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/+", true),
            ("a/b", "#", true),
            ("a", "a/#", true),
            ("a/b/c", "a/+", false),
            ("a", "a/b", false),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("12_sync", "+", true),
            ("12_sync", "12_sync", true),
        ];
        for (topic, filter, want) in cases {
            assert_eq!(matches(topic, filter), want, "{topic} vs {filter}");
        }
    }
}
