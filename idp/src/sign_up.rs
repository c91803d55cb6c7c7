//! Owns the MSISDN gateway's sign-up flow over HTTP: `/register`,
//! `/sms/verify`, `/sms/resend_code`, `/sms/verify_code` and `/unregister`
//! (a sign-up session, its SMS code, the token it issues, account
//! deletion). The routes, body caps, rates and error replies are
//! [`crate::api`]'s.

use crate::api::{bearer, error, json_response, parse_json, store_failed, ApiError, ApiResult};
use crate::keys::TokenClaims;
use crate::msisdn::{check_network, Msisdn};
use crate::session_id::session_id;
use crate::Idp;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use protocol::UserId;
use rand::{Rng, RngCore};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use store::{Revocation, SignUpSession as Session};
use subtle::ConstantTimeEq;

impl Idp {
    pub(crate) fn uid_of(&self, msisdn: &Msisdn) -> Result<UserId, ApiError> {
        msisdn.uid(&self.uid_secret).ok_or_else(|| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not derive the user id",
            )
        })
    }

    /// The session a bearer session token names.
    pub(crate) async fn session(
        &self,
        headers: &HeaderMap,
    ) -> Result<(String, Session, Msisdn), ApiError> {
        let token = bearer(headers)?;
        let id = session_id(token);
        let session = self.sign_ups.session(&id).await?.ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "unknown or expired session token: register again",
            )
        })?;
        let msisdn = Msisdn::parse(&session.msisdn)
            .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "corrupt session"))?;
        Ok((id, session, msisdn))
    }

    /// The sign-up session the bearer token names, still open for codes.
    pub(crate) async fn open_session(
        &self,
        headers: &HeaderMap,
    ) -> Result<(String, Session, Msisdn), ApiError> {
        let (id, session, msisdn) = self.session(headers).await?;
        self.check_open(&session)?;
        Ok((id, session, msisdn))
    }

    pub(crate) fn check_open(&self, session: &Session) -> Result<(), ApiError> {
        if session.uid.is_some() {
            return Err(error(
                StatusCode::CONFLICT,
                "this number is already verified in this session",
            ));
        }
        if session.attempts >= self.settings.max_code_attempts {
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong codes: this session is closed; register again",
            ));
        }
        Ok(())
    }

    /// Makes a code, stores it, sends it. On a failed send the code is
    /// withdrawn, so the client can try again.
    pub(crate) async fn send_code(&self, id: &str, msisdn: &Msisdn) -> ApiResult {
        let code = format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32));
        let expires = protocol::claims::now_secs().saturating_add(self.settings.code_ttl.as_secs());
        if !self.sign_ups.set_code(id, &code, expires).await? {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "unknown or expired session token: register again",
            ));
        }
        if let Err(e) = self.sms.send(msisdn, &code).await {
            tracing::warn!(msisdn = %msisdn, error = %e, "one-time code not sent");
            let _ = self.sign_ups.take_code(id).await;
            return Err(error(
                StatusCode::BAD_GATEWAY,
                "the SMS could not be sent; try again later",
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({ "msisdn": self.sms.sender() }),
        ))
    }

    /// Signs a device token for `uid`. Its `iat` is never earlier than the
    /// user's revocation cut-off (`IssuedBefore(t)`, left by unregister and
    /// `delete_account`): the broker refuses tokens issued before it, so a
    /// user who registers again in the same second still gets a working one.
    /// Returns the token and its `iat`.
    pub(crate) async fn issue(&self, uid: &UserId) -> Result<(String, u64), ApiError> {
        let now = protocol::claims::now_secs();
        let iat = match self.store.revocation(uid).await.map_err(store_failed)? {
            None => now,
            Some(Revocation::IssuedBefore(cutoff)) => now.max(cutoff),
            Some(Revocation::All) => {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "this account is suspended by an operator",
                ));
            }
        };
        let claims = TokenClaims {
            sub: uid.as_str().to_owned(),
            iat,
            exp: iat.saturating_add(self.settings.token_ttl.as_secs()),
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
        };
        let token = self.keys.sign(&claims).map_err(|e| {
            tracing::error!(error = %e, "signing a device token failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not sign the token",
            )
        })?;
        Ok((token, iat))
    }

    /// Refuses a credential issued at `iat` (a device token's `iat`, or the
    /// one issued when a session was verified) that the user's revocation
    /// covers: a token revoked by an earlier unregister or `delete_account`
    /// must not act for the account registered since (401; 403 while an
    /// operator suspends the user). A store that does not answer refuses too
    /// (503): this check guards a deletion.
    pub(crate) async fn check_not_revoked(&self, uid: &UserId, iat: u64) -> Result<(), ApiError> {
        match self.store.revocation(uid).await.map_err(store_failed)? {
            Some(Revocation::All) => {
                tracing::info!(%uid, "refused a credential of a suspended user");
                Err(error(
                    StatusCode::FORBIDDEN,
                    "this account is suspended by an operator",
                ))
            }
            Some(revocation) if revocation.refuses(Some(iat)) => {
                tracing::info!(%uid, "refused a revoked credential");
                Err(error(
                    StatusCode::UNAUTHORIZED,
                    "credential revoked: the account was deleted after it was issued; sign up again",
                ))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Deserialize)]
struct RegisterBody {
    msisdn: String,
    #[serde(default)]
    mcc: Option<String>,
    #[serde(default)]
    mnc: Option<String>,
}

pub(crate) async fn register(
    State(idp): State<Arc<Idp>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = idp.admit(peer, &headers, body).await?;
    let body: RegisterBody = parse_json(
        &bytes,
        r#"{"msisdn": "+15551234567"} (optional "mcc", "mnc")"#,
    )?;
    let msisdn =
        Msisdn::parse(&body.msisdn).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    check_network(body.mcc.as_deref(), body.mnc.as_deref())
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    idp.limit_number(&msisdn).await?;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = URL_SAFE_NO_PAD.encode(raw);
    idp.sign_ups
        .create_session(
            &session_id(&token),
            msisdn.expose(),
            idp.settings.session_ttl,
        )
        .await?;
    tracing::info!(msisdn = %msisdn, "registration started");
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "session_token": token,
            "verify_url": format!("{}/sms/verify", idp.settings.public_url),
        }),
    ))
}

pub(crate) async fn verify(
    State(idp): State<Arc<Idp>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    idp.admit(peer, &headers, body).await?;
    let (id, session, msisdn) = idp.open_session(&headers).await?;
    if session.code.is_some() {
        return Err(error(
            StatusCode::CONFLICT,
            "a code was already sent: ask for another with /sms/resend_code",
        ));
    }
    idp.limit_number(&msisdn).await?;
    idp.send_code(&id, &msisdn).await
}

pub(crate) async fn resend_code(
    State(idp): State<Arc<Idp>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    idp.admit(peer, &headers, body).await?;
    let (id, session, msisdn) = idp.open_session(&headers).await?;
    if session.code.is_none() {
        return Err(error(
            StatusCode::CONFLICT,
            "no code sent yet: call /sms/verify first",
        ));
    }
    let resends = idp.sign_ups.add_resend(&id).await?.unwrap_or(u32::MAX);
    if resends > idp.settings.max_resends {
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many resends (at most {}): register again later",
                idp.settings.max_resends
            ),
        ));
    }
    idp.limit_number(&msisdn).await?;
    idp.send_code(&id, &msisdn).await
}

#[derive(Deserialize)]
struct CodeBody {
    code: String,
}

pub(crate) async fn verify_code(
    State(idp): State<Arc<Idp>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bytes = idp.admit(peer, &headers, body).await?;
    let body: CodeBody = parse_json(&bytes, r#"{"code": "123456"}"#)?;
    if body.code.len() != 6 || !body.code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error(StatusCode::BAD_REQUEST, "code must be 6 digits"));
    }
    let (id, session, msisdn) = idp.open_session(&headers).await?;
    let Some(expected) = &session.code else {
        return Err(error(
            StatusCode::CONFLICT,
            "no code sent yet: call /sms/verify first",
        ));
    };
    if protocol::claims::now_secs() > session.code_expires {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "code expired: ask for a new one with /sms/resend_code",
        ));
    }
    if !bool::from(body.code.as_bytes().ct_eq(expected.as_bytes())) {
        let attempts = idp.sign_ups.add_attempt(&id).await?.unwrap_or(u32::MAX);
        tracing::info!(msisdn = %msisdn, attempts, "wrong one-time code");
        let max = idp.settings.max_code_attempts;
        if attempts >= max {
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong codes: this session is closed; register again",
            ));
        }
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("wrong code ({} tries left)", max.saturating_sub(attempts)),
        ));
    }
    // Exactly one concurrent caller gets the code.
    if !idp.sign_ups.take_code(&id).await? {
        return Err(error(StatusCode::CONFLICT, "this code was already used"));
    }
    let uid = idp.uid_of(&msisdn)?;
    let (token, iat) = idp.issue(&uid).await?;
    idp.store
        .put_registration(&uid, protocol::claims::now_secs())
        .await
        .map_err(store_failed)?;
    idp.sign_ups.mark_verified(&id, uid.as_str(), iat).await?;
    tracing::info!(msisdn = %msisdn, %uid, "number verified; device token issued");
    Ok(json_response(
        StatusCode::OK,
        &json!({ "token": token, "user_id": uid.as_str() }),
    ))
}

/// Drops everything about the user: with the session token of a verified
/// session (valid until the session expires), or with a device token this
/// service issued.
pub(crate) async fn unregister(
    State(idp): State<Arc<Idp>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    idp.admit(peer, &headers, body).await?;
    let credential = bearer(&headers)?;
    let now = protocol::claims::now_secs();
    // The latest `iat` the credential speaks for: a token issued within the
    // second of an earlier deletion has `iat` = that cut-off, later than
    // `now`, and must be revoked by its own unregister too.
    let mut issued = 0;
    let (uid, session) = if credential.matches('.').count() == 2 {
        let claims = idp
            .keys
            .verify(
                credential,
                &idp.settings.issuer,
                &idp.settings.audience,
                now,
            )
            .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "device token not accepted"))?;
        let uid = UserId::parse(&claims.sub)
            .map_err(|_| error(StatusCode::UNAUTHORIZED, "device token not accepted"))?;
        idp.check_not_revoked(&uid, claims.iat).await?;
        issued = issued.max(claims.iat);
        (Some(uid), None)
    } else {
        let (id, session, _) = idp.session(&headers).await?;
        let uid = match &session.uid {
            Some(uid) => {
                let uid = UserId::parse(uid)
                    .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "corrupt session"))?;
                // A session verified before a later unregister speaks for
                // the token it was issued, not for the account made since.
                idp.check_not_revoked(&uid, session.verified_at).await?;
                issued = issued.max(session.verified_at);
                Some(uid)
            }
            None => None,
        };
        (uid, Some(id))
    };
    if let Some(uid) = &uid {
        // The revocation first: once it is recorded, nothing the user's old
        // tokens send is acted on (the broker, the handlers and this service
        // all check it), so nothing can write into the account between the
        // deletion and the revocation. A revocation that cannot be recorded
        // deletes nothing (503). Tokens issued up to this second are refused
        // from now on; the next registration's token gets `iat` >= this (see
        // `Idp::issue`). Announced at once: this answer goes over HTTP, not
        // through the sessions it cuts.
        idp.store
            .revoke_user(uid, Revocation::account_deleted(now, Some(issued)))
            .await
            .map_err(store_failed)?;
        idp.store.delete_user(uid).await.map_err(store_failed)?;
        tracing::info!(%uid, "user unregistered: earlier tokens revoked, data deleted");
    }
    if let Some(id) = session {
        idp.sign_ups.delete_session(&id).await?;
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({ "deleted": uid.is_some(), "user_id": uid.as_ref().map(UserId::as_str) }),
    ))
}
