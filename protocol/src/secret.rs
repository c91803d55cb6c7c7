//! Owns secret values (handler keys, the HMAC secret, the Redis URL with its
//! password, admin and provider tokens): the one type whose `Debug` and
//! `Display` never show the value, compared in constant time. Every crate
//! holds its secrets in it, so no configuration struct needs a hand-written
//! masking `Debug`.

use std::fmt;
use subtle::ConstantTimeEq;

/// A secret string. Printing it shows a mask; equality is constant-time.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that needs it (signing, verifying,
    /// connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty (unset in configuration).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Its length in bytes (strength checks; reveals no content).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Constant-time comparison with a presented value.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// For `clap`: any text is a secret (checks on its strength belong to the
/// component that uses it).
impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret::from(value))
    }
}

/// Constant-time, like [`Secret::matches`].
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_compares_exactly() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(****) ****");
        assert_eq!(format!("{:?}", Some(&s)), "Some(Secret(****))");
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter"));
        assert!(!s.matches(b"hunter22"));
        assert!(!s.matches(b""));
        assert_eq!(s, "hunter2".parse::<Secret>().unwrap());
        assert_ne!(s, Secret::from("hunter3"));
    }
}
