//! Authentication of CONNECT: decides from the username and password who a
//! client is. Devices present `JWT` and a token ([`jwt`], keys from PEM files
//! or [`jwks`]); handlers present `handler` and one of the configured keys.
//! Only this module can build a [`Principal`], so every later decision
//! (ACL, identity stamping) is made on verified identity.

pub mod jwks;
pub mod jwt;
pub mod refusals;

use crate::metrics::Metrics;
use jwt::{JwtVerifier, TokenError};
use protocol::topics::{DEVICE_USERNAME, HANDLER_USERNAME};
use protocol::Secret;
use protocol::UserId;
use refusals::RefusalCache;
use std::sync::Arc;
use std::time::Duration;

/// Longest a token keeps a session open, whatever its `exp` says. An `exp`
/// further away than this (up to `u64::MAX` seconds) means "no expiry within
/// any reachable time": it is clamped here, so the session deadline built
/// from it can neither overflow `Instant` arithmetic nor wrap into the past.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A verified client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A device, proven by a token whose `sub` is `uid`.
    Device(DeviceIdentity),
    /// A handler, proven by a handler key.
    Handler(HandlerIdentity),
}

/// Identity of a verified device. Fields are private: only `auth` makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    uid: UserId,
    expires_at: Option<u64>,
    issued_at: Option<u64>,
}

impl DeviceIdentity {
    /// The owner of a will another node armed and kept in the cluster
    /// (`crate::inject::Injector::publish_will`): only ever checked against
    /// its user's revocation, never admitted as a connection.
    pub(crate) fn will_owner(uid: UserId, issued_at: Option<u64>) -> DeviceIdentity {
        DeviceIdentity {
            uid,
            expires_at: None,
            issued_at,
        }
    }

    pub fn uid(&self) -> &UserId {
        &self.uid
    }

    /// When the token expires (Unix seconds), if it says.
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// When the token was issued (its `iat`, Unix seconds), if it says. A
    /// revocation by time treats `None` as issued at 0.
    pub fn issued_at(&self) -> Option<u64> {
        self.issued_at
    }

    /// How long after `now_secs` (Unix seconds) the session must end for the
    /// token's expiry, `leeway_secs` included: never negative (an expired
    /// token gives zero), never more than [`MAX_TOKEN_LIFETIME`]. `None`
    /// when the token has no `exp`.
    pub fn time_left(&self, now_secs: u64, leeway_secs: u64) -> Option<Duration> {
        let end = self.expires_at?.saturating_add(leeway_secs);
        Some(Duration::from_secs(end.saturating_sub(now_secs)).min(MAX_TOKEN_LIFETIME))
    }

    /// The instant the session must end for the token's expiry, from the
    /// clock now. `None` when the token sets no deadline that can be reached
    /// (no `exp`, or one no `Instant` on this platform can represent).
    pub fn session_deadline(&self, leeway_secs: u64) -> Option<tokio::time::Instant> {
        let left = self.time_left(protocol::claims::now_secs(), leeway_secs)?;
        tokio::time::Instant::now().checked_add(left)
    }
}

/// Identity of a verified handler (which key matched is not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerIdentity {
    _verified: (),
}

impl Principal {
    /// The label metrics and logs use for this kind of client.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Device(_) => "device",
            Principal::Handler(_) => "handler",
        }
    }
}

/// Why a CONNECT was refused; each maps to one CONNACK reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// MQTT 5 `0x86` / 3.1.1 code 4: the credentials do not prove anything.
    BadCredentials(&'static str),
    /// MQTT 5 `0x87` / 3.1.1 code 5: proven, but not allowed (expired, wrong audience, ...).
    NotAuthorized(&'static str),
    /// MQTT 5 `0x88` / 3.1.1 code 3: keys could not be fetched; try again later.
    Unavailable(&'static str),
}

impl Refusal {
    /// Short reason for the CONNACK reason string, logs and metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadCredentials(r) | Refusal::NotAuthorized(r) | Refusal::Unavailable(r) => r,
        }
    }

    fn from_token_error(e: &TokenError) -> Self {
        let reason = e.reason();
        match e {
            TokenError::Malformed
            | TokenError::AlgorithmNotAllowed
            | TokenError::BadSignature
            | TokenError::UnknownKey
            | TokenError::CriticalExtension => Refusal::BadCredentials(reason),
            TokenError::Expired
            | TokenError::NotYetValid
            | TokenError::MissingExpiry
            | TokenError::WrongIssuer
            | TokenError::WrongAudience
            | TokenError::BadSubject(_) => Refusal::NotAuthorized(reason),
            TokenError::KeysUnavailable => Refusal::Unavailable(reason),
        }
    }

    /// Whether the same credentials would be refused again a moment later.
    fn is_lasting(&self) -> bool {
        !matches!(self, Refusal::Unavailable(_))
    }
}

/// Decides CONNECTs.
pub struct Authenticator {
    jwt: JwtVerifier,
    handler_keys: Vec<Secret>,
    refusals: RefusalCache<Refusal>,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(
        jwt: JwtVerifier,
        handler_keys: Vec<Secret>,
        refusal_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Authenticator {
            jwt,
            handler_keys,
            refusals: RefusalCache::new(refusal_ttl),
            metrics,
        }
    }

    /// Verifies a CONNECT's username and password.
    pub async fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        let (Some(username), Some(password)) = (username, password) else {
            return Err(Refusal::BadCredentials(
                "username and password required (JWT + token, or handler + key)",
            ));
        };
        if let Some(refusal) = self.refusals.get(username, password) {
            self.metrics.refusal_cache_hit();
            return Err(refusal);
        }
        let result = match username {
            DEVICE_USERNAME => self.verify_device(password).await,
            HANDLER_USERNAME => self.verify_handler(password),
            _ => Err(Refusal::BadCredentials(
                "unknown username: use JWT (device) or handler",
            )),
        };
        if let Err(refusal) = &result {
            if refusal.is_lasting() {
                self.refusals.remember(username, password, refusal.clone());
            }
        }
        result
    }

    async fn verify_device(&self, password: &[u8]) -> Result<Principal, Refusal> {
        let token = std::str::from_utf8(password)
            .map_err(|_| Refusal::BadCredentials("token is not UTF-8"))?;
        let verified = self
            .jwt
            .verify(token)
            .await
            .map_err(|e| Refusal::from_token_error(&e))?;
        Ok(Principal::Device(DeviceIdentity {
            uid: verified.uid,
            expires_at: verified.expires_at,
            issued_at: verified.issued_at,
        }))
    }

    fn verify_handler(&self, password: &[u8]) -> Result<Principal, Refusal> {
        // Compare against every key so timing does not reveal which one is close.
        let matched = self
            .handler_keys
            .iter()
            .fold(false, |found, key| key.matches(password) | found);
        if matched {
            Ok(Principal::Handler(HandlerIdentity { _verified: () }))
        } else {
            Err(Refusal::BadCredentials("handler key not accepted"))
        }
    }
}

/// Principals for unit tests of the modules that consume them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn device(uid: &str) -> Principal {
        Principal::Device(device_expiring(uid, None))
    }

    pub fn device_expiring(uid: &str, expires_at: Option<u64>) -> DeviceIdentity {
        DeviceIdentity {
            uid: UserId::parse(uid).expect("test uid"),
            expires_at,
            issued_at: None,
        }
    }

    pub fn device_issued(uid: &str, issued_at: Option<u64>) -> DeviceIdentity {
        DeviceIdentity {
            uid: UserId::parse(uid).expect("test uid"),
            expires_at: None,
            issued_at,
        }
    }

    pub fn handler() -> Principal {
        Principal::Handler(HandlerIdentity { _verified: () })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::device_expiring;
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn time_left_counts_the_leeway_and_never_goes_negative() {
        let device = device_expiring("u1", Some(NOW + 60));
        assert_eq!(device.time_left(NOW, 5), Some(Duration::from_secs(65)));
        let expired = device_expiring("u1", Some(NOW - 60));
        assert_eq!(expired.time_left(NOW, 5), Some(Duration::ZERO));
        assert_eq!(device_expiring("u1", None).time_left(NOW, 5), None);
    }

    /// Enormous `exp` values mean "no reachable expiry": clamped, never a
    /// panic (10^19 overflowed `Instant + Duration`) and never "expired"
    /// (`u64::MAX + leeway` wrapped around to a few seconds).
    #[test]
    fn enormous_expiry_is_clamped_not_overflowed() {
        for exp in [
            10_000_000_000_000_000_000,
            u64::MAX,
            i64::MAX as u64,
            u64::MAX - 4,
        ] {
            let device = device_expiring("u1", Some(exp));
            for leeway in [0, 5, u64::MAX] {
                assert_eq!(
                    device.time_left(NOW, leeway),
                    Some(MAX_TOKEN_LIFETIME),
                    "exp {exp}, leeway {leeway}"
                );
            }
            let deadline = device
                .session_deadline(5)
                .expect("a 100-year deadline is representable");
            assert!(
                deadline > tokio::time::Instant::now() + Duration::from_secs(50 * 365 * 24 * 3600),
                "exp {exp} must not read as expired"
            );
        }
        // A near-future exp is not clamped.
        let soon = device_expiring("u1", Some(protocol::claims::now_secs() + 30));
        let deadline = soon.session_deadline(0).expect("deadline");
        assert!(deadline <= tokio::time::Instant::now() + Duration::from_secs(31));
    }
}
