//! Owns the pairing sessions of SWOB-style device pairing: the [`Pairings`]
//! domain, the one-time code's form ([`PairingCode`]), a session's record
//! and the states it moves through. The sync handler opens and drives a
//! session (codes, rotation, the person's decision, the sync result); the
//! identity service claims it with a code for a phone and waits for the
//! outcome. The two may be different processes: they meet only here, and
//! every step that decides something is one atomic transition in the store
//! (a Lua script on one key in Redis, one redb write transaction), so no
//! code can be claimed twice and no decision taken twice.
//!
//! ```text
//! open ─► Code ─(rotate: same state, new code, at most N times)─► Expired
//!          │ claim (phone, code matches, not expired)
//!          ▼
//!        Paused ─(deadline passed)─► TimedOut
//!          │ decide (the same user's session)
//!          ├──────────────► Declined
//!          ▼
//!        Accepted ─(sync result)─► Done / Failed
//! a newer session of the same user: Code or Paused ─► Replaced
//! ```

use crate::{StoreError, StoreFuture};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use protocol::uid::UserId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Random bytes in a session id and in a code's secret: 128 bits each.
const RANDOM_BYTES: usize = 16;
/// Length of 16 bytes in unpadded base64url.
const RANDOM_CHARS: usize = 22;

/// How long a session's record outlives its last possible step, so that
/// the side that polls sees the final state before it goes.
pub const PAIRING_RECORD_GRACE: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch (the clock every pairing deadline uses).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_b64() -> String {
    let mut bytes = [0u8; RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn is_random_b64(text: &str) -> bool {
    text.len() == RANDOM_CHARS
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new session id: 128 bits from the OS's CSPRNG, base64url.
pub fn new_session_id() -> String {
    random_b64()
}

/// A pairing code as the QR code carries it: `<session id>.<secret>`, each
/// 128 bits from the OS's CSPRNG in base64url (45 characters, URL-safe).
/// The session id finds the record with one key; the secret is what makes
/// the code unguessable, and only its SHA-256 is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode {
    /// The session it belongs to.
    pub session: String,
    secret: String,
}

impl std::fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is a credential until it is used: never printed.
        write!(f, "PairingCode({}.***)", self.session)
    }
}

impl PairingCode {
    /// A fresh code for `session`.
    pub fn generate(session: &str) -> Self {
        PairingCode {
            session: session.to_owned(),
            secret: random_b64(),
        }
    }

    /// Reads a code a phone sent; `None` for anything not of the form.
    pub fn parse(text: &str) -> Option<Self> {
        let (session, secret) = text.split_once('.')?;
        (is_random_b64(session) && is_random_b64(secret)).then(|| PairingCode {
            session: session.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The text the QR code carries.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.session, self.secret)
    }

    /// What the store keeps: hex SHA-256 of the secret.
    pub fn hash(&self) -> String {
        Sha256::digest(self.secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Where a pairing session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairingState {
    /// A code is shown; a phone may claim it.
    Code,
    /// A phone claimed the code; the person decides until the deadline.
    Paused,
    /// The person accepted; the sync result is being made.
    Accepted,
    /// The sync result is in the record for the phone.
    Done,
    /// Accepted, but the result could not be made (the record's status says why).
    Failed,
    /// The person declined.
    Declined,
    /// Nobody decided before the deadline.
    TimedOut,
    /// The last code expired unclaimed.
    Expired,
    /// The user opened a newer session.
    Replaced,
}

impl PairingState {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            PairingState::Code => "code",
            PairingState::Paused => "paused",
            PairingState::Accepted => "accepted",
            PairingState::Done => "done",
            PairingState::Failed => "failed",
            PairingState::Declined => "declined",
            PairingState::TimedOut => "timed_out",
            PairingState::Expired => "expired",
            PairingState::Replaced => "replaced",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "code" => PairingState::Code,
            "paused" => PairingState::Paused,
            "accepted" => PairingState::Accepted,
            "done" => PairingState::Done,
            "failed" => PairingState::Failed,
            "declined" => PairingState::Declined,
            "timed_out" => PairingState::TimedOut,
            "expired" => PairingState::Expired,
            "replaced" => PairingState::Replaced,
            _ => return None,
        })
    }
}

/// One pairing session as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairingRecord {
    /// The session id (the first half of every code it shows).
    pub session: String,
    /// The signed-in user who opened it; the phone is paired to this user.
    pub uid: UserId,
    /// The `iat` of the opening session's token (`None`: not a device's):
    /// the identity service refuses to pair when the user's revocation
    /// refuses it.
    pub token_iat: Option<u64>,
    pub state: PairingState,
    /// Codes replaced so far.
    pub generation: u32,
    /// SHA-256 of the live code's secret (`None` once claimed).
    pub code_hash: Option<String>,
    /// When the live code dies, ms since the epoch.
    pub code_expires_ms: u64,
    /// How long the person has to decide once a phone claims the code.
    pub pause_ms: u64,
    /// When the decision is due (set by the claim), ms since the epoch.
    pub deadline_ms: u64,
    /// The phone's RSA public key (PEM or base64 DER), from the claim.
    pub public_key: Option<String>,
    /// The sync result for the phone (JSON text), in `Done`.
    pub result: Option<String>,
    /// Why it failed (an HTTP-like status), in `Failed`.
    pub status: Option<u16>,
}

impl PairingRecord {
    /// A new session in [`PairingState::Code`] showing `code`.
    pub fn open(
        uid: &UserId,
        token_iat: Option<u64>,
        code: &PairingCode,
        code_life: Duration,
        pause: Duration,
    ) -> Self {
        PairingRecord {
            session: code.session.clone(),
            uid: uid.clone(),
            token_iat,
            state: PairingState::Code,
            generation: 0,
            code_hash: Some(code.hash()),
            code_expires_ms: now_millis().saturating_add(millis(code_life)),
            pause_ms: millis(pause),
            deadline_ms: 0,
            public_key: None,
            result: None,
            status: None,
        }
    }

    /// The stored fields (a Redis hash; the embedded store keeps them as JSON).
    pub(crate) fn to_fields(&self) -> Vec<(&'static str, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        vec![
            ("uid", self.uid.as_str().to_owned()),
            (
                "iat",
                self.token_iat.map(|i| i.to_string()).unwrap_or_default(),
            ),
            ("state", self.state.as_str().to_owned()),
            ("gen", self.generation.to_string()),
            ("code", opt(&self.code_hash)),
            ("code_exp", self.code_expires_ms.to_string()),
            ("pause_ms", self.pause_ms.to_string()),
            ("deadline", self.deadline_ms.to_string()),
            ("pk", opt(&self.public_key)),
            ("result", opt(&self.result)),
            (
                "status",
                self.status.map(|s| s.to_string()).unwrap_or_default(),
            ),
        ]
    }

    /// Reads the stored fields back; `session` is the key's id.
    pub(crate) fn from_fields(
        session: &str,
        fields: &HashMap<String, String>,
    ) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("pairing record: {what}"));
        let text = |name: &str| fields.get(name).filter(|v| !v.is_empty()).cloned();
        let number = |name: &str| -> Result<u64, StoreError> {
            match fields.get(name).map(String::as_str) {
                None | Some("") => Ok(0),
                Some(v) => v.parse().map_err(|_| corrupt(name)),
            }
        };
        let uid = fields
            .get("uid")
            .and_then(|u| UserId::parse(u).ok())
            .ok_or_else(|| corrupt("uid"))?;
        let state = fields
            .get("state")
            .and_then(|s| PairingState::parse(s))
            .ok_or_else(|| corrupt("state"))?;
        Ok(PairingRecord {
            session: session.to_owned(),
            uid,
            token_iat: text("iat")
                .map(|v| v.parse().map_err(|_| corrupt("iat")))
                .transpose()?,
            state,
            generation: u32::try_from(number("gen")?).map_err(|_| corrupt("gen"))?,
            code_hash: text("code"),
            code_expires_ms: number("code_exp")?,
            pause_ms: number("pause_ms")?,
            deadline_ms: number("deadline")?,
            public_key: text("pk"),
            result: text("result"),
            status: text("status")
                .map(|v| v.parse().map_err(|_| corrupt("status")))
                .transpose()?,
        })
    }

    /// How long a session opened now must be kept so that every step it
    /// may take fits: `codes` codes of `code_life` each, the pause, and
    /// [`PAIRING_RECORD_GRACE`]. Set once, at open.
    pub fn lifetime(&self, codes: u32, code_life: Duration) -> Duration {
        code_life
            .saturating_mul(codes)
            .saturating_add(Duration::from_millis(self.pause_ms))
            .saturating_add(PAIRING_RECORD_GRACE)
    }

    /// Whether `code` is this session's live code at `now_ms`.
    pub fn shows(&self, code: &PairingCode, now_ms: u64) -> bool {
        use subtle_eq::eq;
        self.state == PairingState::Code
            && now_ms < self.code_expires_ms
            && self
                .code_hash
                .as_deref()
                .is_some_and(|stored| eq(stored.as_bytes(), code.hash().as_bytes()))
    }
}

/// Constant-time comparison of two hashes (the stored side is a hash, so
/// timing reveals little anyway; this keeps it at nothing).
mod subtle_eq {
    pub fn eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A code replacing the live one of a session.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    pub session: &'a str,
    pub code: &'a PairingCode,
    /// The generation the caller saw (the rotation applies only to it).
    pub generation: u32,
    /// The new code's life.
    pub code_life: Duration,
}

/// A phone's claim of a code.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub code: &'a PairingCode,
    pub public_key: &'a str,
    pub now_ms: u64,
}

/// The pairing sessions. At most one session per user: opening one ends
/// the user's previous one ([`PairingState::Replaced`]). Every record
/// expires by itself (a TTL in Redis; a deadline swept in the embedded store).
pub trait Pairings: Send + Sync + 'static {
    /// Stores `record` (in `Code`) as the user's session for `lifetime`,
    /// ending the user's previous session if it is still in `Code` or `Paused`.
    fn open_pairing<'a>(
        &'a self,
        record: &'a PairingRecord,
        lifetime: Duration,
    ) -> StoreFuture<'a, ()>;

    /// The session `session`, if it has not expired.
    fn pairing<'a>(&'a self, session: &'a str) -> StoreFuture<'a, Option<PairingRecord>>;

    /// Replaces the live code, only while the session is in `Code` at
    /// `rotation.generation` (the old code is dead from then on).
    /// `Ok(false)`: the session moved on, nothing changed.
    fn rotate_pairing_code<'a>(&'a self, rotation: Rotation<'a>) -> StoreFuture<'a, bool>;

    /// Claims the session with its live, unexpired code: `Code` becomes
    /// `Paused` with the phone's key, the code is gone (single use) and the
    /// decision is due `pause_ms` from `now_ms`. Exactly one of racing
    /// claims gets `Some`; a dead, used or unknown code gets `None`.
    fn claim_pairing<'a>(&'a self, claim: Claim<'a>) -> StoreFuture<'a, Option<PairingRecord>>;

    /// The person's decision, for the user's current session: `Paused`
    /// (before its deadline at `now_ms`, and opened by `uid`) becomes
    /// `Accepted` or `Declined`. `None`: no session of this user waits for
    /// a decision.
    fn decide_pairing<'a>(
        &'a self,
        uid: &'a UserId,
        accept: bool,
        now_ms: u64,
    ) -> StoreFuture<'a, Option<PairingRecord>>;

    /// Moves the session from `from` to `to` (with the sync result or a
    /// failure status when given), only if it is in `from`: the one way to
    /// finish, expire or time out a session. `Ok(false)`: it was not.
    fn transition_pairing<'a>(
        &'a self,
        session: &'a str,
        from: PairingState,
        to: PairingState,
        outcome: PairingOutcome<'a>,
    ) -> StoreFuture<'a, bool>;

    /// Deletes the session (and the user's pointer to it), once its outcome
    /// has been handed over.
    fn delete_pairing<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()>;
}

/// What a transition writes beside the state.
#[derive(Debug, Clone, Copy, Default)]
pub enum PairingOutcome<'a> {
    #[default]
    Nothing,
    /// The sync result (JSON text) for `Done`.
    Result(&'a str),
    /// A failure status for `Failed`.
    Status(u16),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_long_random_and_parse_strictly() {
        let session = new_session_id();
        let code = PairingCode::generate(&session);
        let text = code.expose();
        assert_eq!(text.len(), 45);
        assert_eq!(PairingCode::parse(&text), Some(code.clone()));
        assert_ne!(PairingCode::generate(&session), code, "fresh secret");
        assert_eq!(code.hash().len(), 64);
        assert!(!format!("{code:?}").contains(&text[23..]), "secret hidden");
        for bad in [
            "",
            ".",
            "abc.def",
            &format!("{session}."),
            &format!("{session}.{session}x"),
            &format!("{session}.{}", "é".repeat(11)),
            &format!("{session}/{session}"),
            &text.replace('.', ".."),
        ] {
            assert_eq!(PairingCode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_through_fields() {
        let uid = UserId::parse("u1").unwrap();
        let code = PairingCode::generate(&new_session_id());
        let mut record = PairingRecord::open(
            &uid,
            Some(7),
            &code,
            Duration::from_secs(15),
            Duration::from_secs(120),
        );
        let fields: HashMap<String, String> = record
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(
            PairingRecord::from_fields(&code.session, &fields).unwrap(),
            record
        );
        assert!(record.shows(&code, now_millis()));
        assert!(!record.shows(&PairingCode::generate(&code.session), now_millis()));
        assert!(!record.shows(&code, record.code_expires_ms));
        record.state = PairingState::Done;
        record.result = Some("{\"status\":200}".into());
        record.status = Some(401);
        record.token_iat = None;
        let fields: HashMap<String, String> = record
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(
            PairingRecord::from_fields(&code.session, &fields).unwrap(),
            record
        );
        let mut broken = fields.clone();
        broken.insert("state".into(), "dancing".into());
        assert!(PairingRecord::from_fields(&code.session, &broken).is_err());
    }
}
