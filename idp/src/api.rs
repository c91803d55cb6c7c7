//! Owns the HTTP API: the MSISDN gateway's flow (`/register`,
//! `/sms/verify`, `/sms/verify_code`, `/sms/resend_code`, `/unregister`),
//! device pairing (`/sync/pair`, in [`crate::pair`]),
//! the JWKS, the admin endpoints, and turning every failure into
//! `{"error": "..."}` with one status, in one place ([`ApiError`]).
//!
//! Every request body is read under [`MAX_BODY_BYTES`] (413 beyond), JSON is
//! parsed here (400 with what was expected), and every POST counts against
//! the client address's rate; the ones that register a number or send an SMS
//! also count against the number's.

use crate::keys::TokenClaims;
use crate::msisdn::{check_network, Msisdn};
use crate::session_id::session_id;
use crate::Idp;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use protocol::UserId;
use rand::{Rng, RngCore};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use store::{Revocation, SignUpSession as Session, StoreError};
use subtle::ConstantTimeEq;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4096;
/// Longest bearer credential looked at (a session token is 43 characters,
/// a device token under 1 KiB).
const MAX_BEARER_BYTES: usize = 2048;
/// The rate windows.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// A failure, answered as `{"error": message}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &json!({ "error": self.message }));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("60"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    /// The sign-up state's errors: full maps are a 429, anything else a 503.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full => error(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
            _ => {
                tracing::error!(error = %e, "identity state unavailable");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service temporarily unavailable; try again later",
                )
            }
        }
    }
}

pub(crate) fn store_failed(e: store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service temporarily unavailable; try again later",
    )
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        bytes,
    )
        .into_response()
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// The routes, over the shared service.
pub fn router(idp: Arc<Idp>) -> Router {
    Router::new()
        .route("/register", post(register))
        .route("/sms/verify", post(verify))
        .route("/sms/resend_code", post(resend_code))
        .route("/sms/verify_code", post(verify_code))
        .route("/unregister", post(unregister))
        .route("/sync/pair", post(crate::pair::pair))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/admin/users/:uid/revoke", post(admin_revoke))
        .route("/admin/users/:uid/restore", post(admin_restore))
        .route("/admin/keys/rotate", post(admin_rotate))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint (POST, or GET for the JWKS)",
            )
        })
        .with_state(idp)
}

/// Reads the body under the cap.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large())
}

pub(crate) fn parse_json<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    expected: &str,
) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON body: expected {expected}"),
        )
    })
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let missing = || {
        error(
            StatusCode::UNAUTHORIZED,
            "missing or malformed Authorization: Bearer <session_token>",
        )
    };
    let value = headers.get(AUTHORIZATION).ok_or_else(missing)?;
    let text = value.to_str().map_err(|_| missing())?;
    let token = text.strip_prefix("Bearer ").ok_or_else(missing)?.trim();
    if token.is_empty() || token.len() > MAX_BEARER_BYTES {
        return Err(missing());
    }
    Ok(token)
}

/// The rate key of a client address, counted as the broker's admission
/// counts it (an IPv6 /64 is one address).
fn address_key(addr: IpAddr) -> String {
    format!("a:{}", protocol::addr_key::AddrKey::of(addr))
}

impl Idp {
    async fn limit_address(&self, addr: SocketAddr) -> Result<(), ApiError> {
        let count = self
            .sign_ups
            .hit(&address_key(addr.ip()), RATE_WINDOW)
            .await?;
        if count > self.settings.rate_per_addr {
            tracing::info!(peer = %addr.ip(), "rate limited: too many requests from this address");
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this address; try again in a minute",
            ));
        }
        Ok(())
    }

    /// The pairing claims' own, tighter rate per address
    /// (`IDP_PAIR_RATE_PER_ADDR`): each claim is a guess at a code.
    pub(crate) async fn limit_pairing(&self, addr: SocketAddr) -> Result<(), ApiError> {
        let key = format!("p:{}", address_key(addr.ip()));
        let count = self.sign_ups.hit(&key, RATE_WINDOW).await?;
        if count > self.settings.pair_rate_per_addr {
            tracing::info!(peer = %addr.ip(), "rate limited: too many pairing claims from this address");
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many pairing attempts from this address; try again in a minute",
            ));
        }
        Ok(())
    }

    async fn limit_number(&self, msisdn: &Msisdn) -> Result<(), ApiError> {
        // Keyed by the number's uid: the counters never hold the number.
        let uid = self.uid_of(msisdn)?;
        let count = self
            .sign_ups
            .hit(&format!("n:{}", uid.as_str()), RATE_WINDOW)
            .await?;
        if count > self.settings.rate_per_number {
            tracing::info!(msisdn = %msisdn, "rate limited: too many requests for this number");
            return Err(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests for this number; try again in a minute",
            ));
        }
        Ok(())
    }

    fn uid_of(&self, msisdn: &Msisdn) -> Result<UserId, ApiError> {
        msisdn.uid(&self.uid_secret).ok_or_else(|| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not derive the user id",
            )
        })
    }

    /// The session a bearer session token names.
    async fn session(&self, headers: &HeaderMap) -> Result<(String, Session, Msisdn), ApiError> {
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

    /// The preamble of every public endpoint: the client address's rate
    /// first (before any other work), then the body, bounded.
    pub(crate) async fn admit(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<axum::body::Bytes, ApiError> {
        self.limit_address(peer).await?;
        read_body(headers, body).await
    }

    /// The sign-up session the bearer token names, still open for codes.
    async fn open_session(
        &self,
        headers: &HeaderMap,
    ) -> Result<(String, Session, Msisdn), ApiError> {
        let (id, session, msisdn) = self.session(headers).await?;
        self.check_open(&session)?;
        Ok((id, session, msisdn))
    }

    fn check_open(&self, session: &Session) -> Result<(), ApiError> {
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
    async fn send_code(&self, id: &str, msisdn: &Msisdn) -> ApiResult {
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
    async fn check_not_revoked(&self, uid: &UserId, iat: u64) -> Result<(), ApiError> {
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

    /// Admin endpoints: a configured token, compared in constant time.
    fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.settings.admin_token else {
            return Err(error(
                StatusCode::FORBIDDEN,
                "admin endpoints are disabled: set IDP_ADMIN_TOKEN to enable them",
            ));
        };
        let refused = || {
            error(
                StatusCode::UNAUTHORIZED,
                "admin endpoints need Authorization: Bearer <IDP_ADMIN_TOKEN>",
            )
        };
        let given = bearer(headers).map_err(|_| refused())?;
        if expected.matches(given.as_bytes()) {
            Ok(())
        } else {
            Err(refused())
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

async fn register(
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

async fn verify(
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

async fn resend_code(
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

async fn verify_code(
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
async fn unregister(
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

async fn jwks(State(idp): State<Arc<Idp>>) -> Response {
    let mut response = json_response(StatusCode::OK, &idp.keys.jwks(protocol::claims::now_secs()));
    if let Ok(value) = HeaderValue::from_str(&format!(
        "public, max-age={}",
        idp.settings.jwks_max_age.as_secs()
    )) {
        response.headers_mut().insert(CACHE_CONTROL, value);
    }
    response
}

fn admin_uid(raw: &str) -> Result<UserId, ApiError> {
    UserId::parse(raw).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn admin_revoke(
    State(idp): State<Arc<Idp>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    idp.check_admin(&headers)?;
    let uid = admin_uid(&uid)?;
    idp.store
        .revoke_user(&uid, Revocation::All)
        .await
        .map_err(store_failed)?;
    tracing::info!(%uid, "user revoked by an operator");
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user_id": uid.as_str(), "revoked": true }),
    ))
}

async fn admin_restore(
    State(idp): State<Arc<Idp>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    idp.check_admin(&headers)?;
    let uid = admin_uid(&uid)?;
    idp.store.restore_user(&uid).await.map_err(store_failed)?;
    tracing::info!(%uid, "user restored by an operator");
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user_id": uid.as_str(), "revoked": false }),
    ))
}

async fn admin_rotate(State(idp): State<Arc<Idp>>, headers: HeaderMap) -> ApiResult {
    idp.check_admin(&headers)?;
    let keys = idp.keys.clone();
    let rotated = tokio::task::spawn_blocking(move || keys.rotate(protocol::claims::now_secs()))
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "key rotation failed"))?;
    let kid = rotated.map_err(|e| {
        tracing::error!(error = %e, "key rotation failed");
        error(StatusCode::INTERNAL_SERVER_ERROR, "key rotation failed")
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "kid": kid, "published": idp.keys.kids() }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_keys() {
        assert_eq!(address_key("10.1.2.3".parse().unwrap()), "a:10.1.2.3");
        assert_eq!(
            address_key("::ffff:10.1.2.3".parse().unwrap()),
            "a:10.1.2.3"
        );
        assert_eq!(
            address_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            address_key("2001:db8:1:2:bbbb::9".parse().unwrap())
        );
    }

    #[test]
    fn bearer_is_read_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h).unwrap_err().status, StatusCode::UNAUTHORIZED);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&h).is_err());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h).unwrap(), "abc");
        let long = format!("Bearer {}", "a".repeat(MAX_BEARER_BYTES + 1));
        h.insert(AUTHORIZATION, HeaderValue::from_str(&long).unwrap());
        assert!(bearer(&h).is_err());
    }
}
