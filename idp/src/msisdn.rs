//! Owns phone numbers: what an E.164 number (and its optional MCC/MNC) must
//! look like, the masked form logs may show, and the opaque user id derived
//! from a number.

use hmac::{Hmac, Mac};
use protocol::UserId;
use sha2::Sha256;
use std::fmt;

/// Fewest and most digits after the `+` (E.164 allows at most 15; the
/// shortest numbers in use have 7).
pub const MIN_DIGITS: usize = 7;
pub const MAX_DIGITS: usize = 15;

/// Characters of the uid: 26 base32 characters carry 130 bits of the HMAC,
/// far past any collision concern, and obey the uid rule (`[a-z2-7]`).
pub const UID_CHARS: usize = 26;

/// Why a number (or its network codes) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsisdnError {
    #[error("msisdn must be in E.164 form: '+' then {MIN_DIGITS}-{MAX_DIGITS} digits, the first not 0 (e.g. +15551234567)")]
    NotE164,
    #[error("mcc must be 3 digits")]
    BadMcc,
    #[error("mnc must be 2 or 3 digits")]
    BadMnc,
}

/// A phone number in E.164 form. Its `Debug` and `Display` are masked, so
/// that a log line can never carry it in full.
#[derive(Clone, PartialEq, Eq)]
pub struct Msisdn(String);

impl Msisdn {
    /// Validates `raw` as `+` and 7-15 digits, the first not zero.
    pub fn parse(raw: &str) -> Result<Msisdn, MsisdnError> {
        let digits = raw.strip_prefix('+').ok_or(MsisdnError::NotE164)?;
        let ok = (MIN_DIGITS..=MAX_DIGITS).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if ok {
            Ok(Msisdn(raw.to_owned()))
        } else {
            Err(MsisdnError::NotE164)
        }
    }

    /// The full number: only for the SMS provider and the state store.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `+*********67`: the last two digits only.
    pub fn masked(&self) -> String {
        let shown = 2;
        let len = self.0.len();
        let hidden = len.saturating_sub(shown + 1);
        let tail: String = self.0.chars().skip(1 + hidden).collect();
        format!("+{}{tail}", "*".repeat(hidden))
    }

    /// The stable opaque uid of this number: HMAC-SHA256 under the server's
    /// secret, base32 (lower case, no padding), truncated to [`UID_CHARS`].
    /// Without the secret it reveals nothing about the number (a bare hash
    /// of a phone number is reversed by trying every number).
    /// `None` only if HMAC refused the key, which it never does (any length
    /// is a valid HMAC key).
    pub fn uid(&self, secret: &[u8]) -> Option<UserId> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
        mac.update(self.0.as_bytes());
        let digest = mac.finalize().into_bytes();
        let encoded = base32_lower(&digest);
        let truncated: String = encoded.chars().take(UID_CHARS).collect();
        UserId::parse(&truncated).ok()
    }
}

impl fmt::Debug for Msisdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Display for Msisdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Checks the optional mobile country and network codes of a registration.
pub fn check_network(mcc: Option<&str>, mnc: Option<&str>) -> Result<(), MsisdnError> {
    let digits =
        |s: &str, lens: &[usize]| lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    if mcc.is_some_and(|m| !digits(m, &[3])) {
        return Err(MsisdnError::BadMcc);
    }
    if mnc.is_some_and(|m| !digits(m, &[2, 3])) {
        return Err(MsisdnError::BadMnc);
    }
    Ok(())
}

/// RFC 4648 base32 in lower case, without padding.
fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            let index = ((buffer >> bits) & 31) as usize;
            out.push(char::from(ALPHABET.get(index).copied().unwrap_or(b'a')));
        }
    }
    if bits > 0 {
        let index = ((buffer << (5 - bits)) & 31) as usize;
        out.push(char::from(ALPHABET.get(index).copied().unwrap_or(b'a')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_numbers() {
        for ok in [
            "+15551234567",
            "+4930123456",
            "+1234567",
            "+123456789012345",
        ] {
            assert!(Msisdn::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "15551234567",
            "+",
            "+123456",
            "+1234567890123456",
            "+05551234567",
            "+1555123456a",
            "+1 555 123 4567",
            "++15551234567",
            "",
            "+١٢٣٤٥٦٧٨",
        ] {
            assert_eq!(Msisdn::parse(bad), Err(MsisdnError::NotE164), "{bad}");
        }
    }

    #[test]
    fn masked_shows_only_the_last_two_digits() {
        let n = Msisdn::parse("+15551234567").unwrap();
        assert_eq!(n.masked(), "+*********67");
        assert_eq!(format!("{n:?} {n}"), "+*********67 +*********67");
        assert!(!format!("{n:?}").contains("555"));
    }

    #[test]
    fn uid_is_stable_opaque_and_valid() {
        let n = Msisdn::parse("+15551234567").unwrap();
        let a = n.uid(b"secret-one-0123456789abcdef0123456789").unwrap();
        assert_eq!(a, n.uid(b"secret-one-0123456789abcdef0123456789").unwrap());
        assert_eq!(a.as_str().len(), UID_CHARS);
        assert!(!a.as_str().contains("5551234567"));
        assert!(UserId::parse(a.as_str()).is_ok());
        assert_ne!(a, n.uid(b"secret-two-0123456789abcdef0123456789").unwrap());
        let other = Msisdn::parse("+15551234568").unwrap();
        assert_ne!(
            a,
            other.uid(b"secret-one-0123456789abcdef0123456789").unwrap()
        );
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32_lower(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32_lower(b"f"), "my");
        assert_eq!(base32_lower(b""), "");
    }

    #[test]
    fn network_codes() {
        assert!(check_network(Some("310"), Some("260")).is_ok());
        assert!(check_network(Some("208"), Some("01")).is_ok());
        assert!(check_network(None, None).is_ok());
        assert_eq!(check_network(Some("31"), None), Err(MsisdnError::BadMcc));
        assert_eq!(check_network(None, Some("2601")), Err(MsisdnError::BadMnc));
    }
}
