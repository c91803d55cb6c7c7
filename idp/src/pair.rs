//! Owns `POST /sync/pair`, the phone's half of device pairing: a phone with
//! no token sends the one-time code from the QR code a signed-in browser
//! shows, and its RSA public key; the request is held open until the person
//! confirms or declines on the browser (`sync_session_confirm`, served by
//! the sync handler) or the pause times out. On accept the phone gets a
//! device token for the browser's user beside the sync result the handler
//! made for its key.
//!
//! The sync handler may be another process: the two meet in the store's
//! pairing record ([`store::Pairings`]), which this side claims atomically
//! (single use: of racing phones exactly one wins) and then reads every
//! [`POLL`] until the outcome is there (the most this adds to the phone's
//! answer after the person's decision).
//!
//! Answers: 200 `{"token", "user_id", <the sync result's fields>}`; 400 a
//! malformed body or public key; 403 declined, refused, or the user
//! revoked; 408 nobody decided in time; 410 an unknown, used, replaced or
//! expired code; 429 the address's rate (`IDP_RATE_PER_ADDR`, counted as
//! every POST is, then `IDP_PAIR_RATE_PER_ADDR`, pairing claims only: each
//! is a guess at a code); 503 [`MAX_HELD`] requests already held, or the
//! store down.

use crate::api::{error, json_response, parse_json, store_failed, ApiError, ApiResult};
use crate::Idp;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::{
    now_millis, Claim, PairingCode, PairingOutcome, PairingRecord, PairingState, Revocation,
};

/// Pairing requests held open at once (each until its pause deadline);
/// beyond it a claim is answered 503 before anything is claimed, so held
/// requests can never take every connection (`IDP_MAX_CONNECTIONS`).
pub const MAX_HELD: usize = 128;
/// How often a held request reads its session's record.
pub const POLL: Duration = Duration::from_millis(200);
/// How long past the pause deadline an accepted session's result may take
/// (the handler encrypts and stores the key after the decision).
const RESULT_GRACE_MS: u64 = 10_000;

#[derive(Deserialize)]
struct PairBody {
    code: String,
    public_key: String,
}

fn gone() -> ApiError {
    error(
        StatusCode::GONE,
        "unknown, used or expired pairing code: scan the code the page shows now",
    )
}

/// `POST /sync/pair {"code", "public_key"}`.
pub(crate) async fn pair(
    State(idp): State<Arc<Idp>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = idp.admit(peer, &headers, body).await?;
    idp.limit_pairing(peer).await?;
    let body: PairBody = parse_json(&bytes, r#"{"code": "...", "public_key": "<PEM>"}"#)?;
    let code = PairingCode::parse(body.code.trim()).ok_or_else(gone)?;
    // A key the handler could not encrypt to is refused before the code is used.
    let key = body.public_key.clone();
    tokio::task::spawn_blocking(move || envelope::parse_public_key(&key))
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("public_key: {e}")))?;
    let _held = Arc::clone(&idp.pair_slots)
        .try_acquire_owned()
        .map_err(|_| {
            tracing::warn!("pairing requests held at their cap: refusing one");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many pairings in progress; try again shortly",
            )
        })?;
    let record = idp
        .store
        .pairing(&code.session)
        .await
        .map_err(store_failed)?
        .filter(|r| r.shows(&code, now_millis()))
        .ok_or_else(gone)?;
    // The user's revocation first, before the code is used.
    idp.check_pairing_user(&record).await?;
    let claim = Claim {
        code: &code,
        public_key: &body.public_key,
        now_ms: now_millis(),
    };
    let claimed = idp
        .store
        .claim_pairing(claim)
        .await
        .map_err(store_failed)?
        .ok_or_else(gone)?;
    tracing::info!(uid = %claimed.uid, session = %claimed.session, "pairing code claimed; waiting for the person's decision");
    idp.wait_for_decision(claimed).await
}

impl Idp {
    /// Refuses to pair for a user an operator suspended, or whose session
    /// that opened the pairing has been revoked since (an account deleted).
    async fn check_pairing_user(&self, record: &PairingRecord) -> Result<(), ApiError> {
        let revocation = self
            .store
            .revocation(&record.uid)
            .await
            .map_err(store_failed)?;
        let refused = match (revocation, record.token_iat) {
            (Some(Revocation::All), _) => true,
            (Some(revocation), Some(iat)) => revocation.refuses(Some(iat)),
            _ => false,
        };
        if refused {
            tracing::info!(uid = %record.uid, "pairing refused: the user is revoked");
            return Err(error(
                StatusCode::FORBIDDEN,
                "this account cannot pair devices now",
            ));
        }
        Ok(())
    }

    /// Holds the phone's request until the session's outcome: polls the
    /// record every [`POLL`], times the pause out at its deadline (which
    /// one atomic transition decides against a late confirm), and hands
    /// the result over once.
    async fn wait_for_decision(&self, claimed: PairingRecord) -> ApiResult {
        let session = claimed.session.as_str();
        let deadline = claimed.deadline_ms;
        loop {
            tokio::time::sleep(POLL).await;
            let now = now_millis();
            let record = match self.store.pairing(session).await {
                Ok(record) => record,
                Err(e) if now > deadline.saturating_add(RESULT_GRACE_MS) => {
                    return Err(store_failed(e))
                }
                Err(e) => {
                    tracing::warn!(%session, error = %e, "pairing record unreadable; retrying");
                    continue;
                }
            };
            let Some(record) = record else {
                return Err(error(StatusCode::GONE, "the pairing session ended"));
            };
            match record.state {
                PairingState::Done => return self.hand_over(record).await,
                PairingState::Failed | PairingState::Declined => {
                    let _ = self.store.delete_pairing(session).await;
                    tracing::info!(uid = %record.uid, %session, state = record.state.as_str(), "pairing refused");
                    return Err(error(
                        StatusCode::FORBIDDEN,
                        "the pairing was declined on the signed-in device",
                    ));
                }
                PairingState::TimedOut => return Err(timed_out()),
                PairingState::Paused if now > deadline => {
                    let none = PairingOutcome::Nothing;
                    let ended = self
                        .store
                        .transition_pairing(
                            session,
                            PairingState::Paused,
                            PairingState::TimedOut,
                            none,
                        )
                        .await;
                    if matches!(ended, Ok(true)) {
                        tracing::info!(uid = %record.uid, %session, "pairing timed out");
                        return Err(timed_out());
                    }
                }
                PairingState::Accepted if now > deadline.saturating_add(RESULT_GRACE_MS) => {
                    return Err(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the pairing could not be completed in time; try again",
                    ));
                }
                PairingState::Paused | PairingState::Accepted => {}
                PairingState::Code | PairingState::Expired | PairingState::Replaced => {
                    return Err(error(StatusCode::GONE, "the pairing session ended"));
                }
            }
        }
    }

    /// The accepted outcome: the user's revocation checked again, a device
    /// token issued, the record deleted (the result is handed over once).
    async fn hand_over(&self, record: PairingRecord) -> ApiResult {
        let _ = self.store.delete_pairing(&record.session).await;
        self.check_pairing_user(&record).await?;
        let mut body: Value = record
            .result
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok())
            .filter(Value::is_object)
            .ok_or_else(|| {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the pairing result is unreadable",
                )
            })?;
        let (token, _) = self.issue(&record.uid).await?;
        if let Value::Object(map) = &mut body {
            map.insert("token".into(), Value::String(token));
            map.insert(
                "user_id".into(),
                Value::String(record.uid.as_str().to_owned()),
            );
        }
        tracing::info!(uid = %record.uid, session = %record.session, "device paired; device token issued");
        Ok(json_response(StatusCode::OK, &body))
    }
}

fn timed_out() -> ApiError {
    error(
        StatusCode::REQUEST_TIMEOUT,
        "nobody confirmed this device in time; scan a new code",
    )
}
