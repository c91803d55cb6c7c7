//! Owns the user id: the only shape a JWT `sub` may take to become a user, and
//! the reply topics derived from it.

use std::fmt;

/// Longest user id accepted, in bytes (all allowed characters are ASCII).
pub const MAX_UID_LEN: usize = 64;

/// The separator between a user id and a reply name (`423144_sync`). It is
/// forbidden inside a uid so that user `12` can never read `12_3_x` of user `12_3`.
pub const REPLY_SEPARATOR: char = '_';

/// Why a string is not a user id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    #[error("user id is empty")]
    Empty,
    #[error("user id is longer than {MAX_UID_LEN} characters")]
    TooLong,
    #[error("user id may contain only A-Z, a-z, 0-9, '.' and '-' (found {0:?})")]
    BadCharacter(char),
}

/// A validated user id: 1-64 characters of `[A-Za-z0-9.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// Validates `raw` as a user id.
    pub fn parse(raw: &str) -> Result<Self, UidError> {
        if raw.is_empty() {
            return Err(UidError::Empty);
        }
        if raw.len() > MAX_UID_LEN {
            return Err(UidError::TooLong);
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '-'))
        {
            return Err(UidError::BadCharacter(bad));
        }
        Ok(UserId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix of every topic this user may read: `<uid>_`.
    pub fn reply_prefix(&self) -> String {
        format!("{}{REPLY_SEPARATOR}", self.0)
    }

    /// The reply topic `<uid>_<name>`.
    pub fn reply_topic(&self, name: &str) -> String {
        format!("{}{REPLY_SEPARATOR}{name}", self.0)
    }

    /// Whether `topic` is one of this user's reply topics.
    pub fn owns_topic(&self, topic: &str) -> bool {
        topic.len() > self.0.len() + 1
            && topic.starts_with(self.0.as_str())
            && topic[self.0.len()..].starts_with(REPLY_SEPARATOR)
    }
}

/// Whether `topic` has the shape of a reply topic: `<uid>_<name>` for some
/// valid user id (the text before the first `_`) and a non-empty name. Such a
/// topic may be some user's reply topic, so it must never become a command
/// topic by a handler subscribing to it (every device could then publish
/// there and spoof that user's replies). Configured command topics such as
/// `request_contact` are the operator's explicit choice and stay commands.
pub fn is_reply_shaped(topic: &str) -> bool {
    topic
        .split_once(REPLY_SEPARATOR)
        .is_some_and(|(uid, name)| !name.is_empty() && UserId::parse(uid).is_ok())
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for UserId {
    type Err = UidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UserId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["1", "423144", "a.b-C9", &"x".repeat(64)] {
            assert_eq!(UserId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_separators_wildcards_and_control() {
        assert_eq!(UserId::parse(""), Err(UidError::Empty));
        assert_eq!(UserId::parse(&"x".repeat(65)), Err(UidError::TooLong));
        for (bad, c) in [
            ("12_3", '_'),
            ("a/b", '/'),
            ("a#", '#'),
            ("+", '+'),
            ("$SYS", '$'),
            ("a\0", '\0'),
            ("é", 'é'),
            ("a b", ' '),
        ] {
            assert_eq!(
                UserId::parse(bad),
                Err(UidError::BadCharacter(c)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn reply_topics_belong_only_to_their_user() {
        let u12 = UserId::parse("12").unwrap();
        assert_eq!(u12.reply_topic("sync"), "12_sync");
        assert!(u12.owns_topic("12_sync"));
        assert!(u12.owns_topic("12_3_contact_list"));
        assert!(!u12.owns_topic("12_"));
        assert!(!u12.owns_topic("123_sync"));
        assert!(!u12.owns_topic("1_sync"));
        assert!(!u12.owns_topic("12"));
    }

    #[test]
    fn reply_shaped_topics() {
        for reply in [
            "alice_x",
            "12_sync",
            "a.b-C_x/y",
            "12_3_contact_list",
            "x_#",
        ] {
            assert!(is_reply_shaped(reply), "{reply:?}");
        }
        for not_reply in [
            "sync", "_x", "alice_", "a/b_x", "$SYS_x", "a b_x", "jobs/+", "",
        ] {
            assert!(!is_reply_shaped(not_reply), "{not_reply:?}");
        }
        assert!(is_reply_shaped(&format!("{}_x", "u".repeat(64))));
        assert!(!is_reply_shaped(&format!("{}_x", "u".repeat(65))));
    }
}
