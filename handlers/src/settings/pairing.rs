//! Pairing sessions' settings (`SYNC_SESSION_*`, `SYNC_PAIR_URL`): read
//! from the handler's arguments and checked once at start-up.

use super::{check_num, invalid, HandlerArgs};
use crate::ConfigError;
use std::time::Duration;

/// The pairing URL when `SYNC_PAIR_URL` is unset: the identity service's
/// default public URL.
pub const DEFAULT_SYNC_PAIR_URL: &str = "http://127.0.0.1:8080/sync/pair";

/// Pairing sessions (`sync_session`): how codes rotate and how long a
/// decision may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairingSettings {
    /// `SYNC_SESSION_ROTATE_SECS`: each code's life.
    pub rotate: Duration,
    /// `SYNC_SESSION_CHANGES`: replacements before the session expires.
    pub changes: u32,
    /// `SYNC_SESSION_PAUSED_SECS`: the time to decide once a phone claimed.
    pub paused: Duration,
    /// `SYNC_PAIR_URL`: what the QR code carries, before `?code=`.
    pub pair_url: String,
}

/// The checked pairing settings, or the variable that is wrong and how to fix it.
pub(super) fn from_args(args: &HandlerArgs) -> Result<PairingSettings, ConfigError> {
    let pair_url = args
        .sync_pair_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .unwrap_or(DEFAULT_SYNC_PAIR_URL);
    let pair_url = reqwest::Url::parse(pair_url)
        .ok()
        .filter(|u| {
            matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.query().is_none()
        })
        .ok_or_else(|| {
            invalid(
                "SYNC_PAIR_URL",
                "expected the absolute http(s) URL of the identity service's POST /sync/pair, without a query (e.g. https://idp.example.com/sync/pair)",
            )
        })?;
    Ok(PairingSettings {
        rotate: Duration::from_secs(check_num(
            "SYNC_SESSION_ROTATE_SECS",
            args.sync_session_rotate_secs,
            1,
            600,
        )?),
        changes: check_num("SYNC_SESSION_CHANGES", args.sync_session_changes, 0, 100)?,
        paused: Duration::from_secs(check_num(
            "SYNC_SESSION_PAUSED_SECS",
            args.sync_session_paused_secs,
            1,
            3600,
        )?),
        pair_url: pair_url.to_string(),
    })
}
