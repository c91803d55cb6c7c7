//! Owns the HTTP API's routes and what every endpoint shares: the
//! MSISDN gateway's flow ([`crate::sign_up`]), device pairing
//! (`/sync/pair`, [`crate::pair`]), the JWKS, the admin endpoints
//! ([`crate::admin`]; the sign-up page's routes are [`crate::web`]'s),
//! the rates per address and number, and turning every failure into
//! `{"error": "..."}` with one status, in one place ([`ApiError`]).
//!
//! Every request body is read under [`MAX_BODY_BYTES`] (413 beyond), JSON is
//! parsed here (400 with what was expected), and every POST counts against
//! the client address's rate; the ones that register a number or send an SMS
//! also count against the number's.

use crate::msisdn::Msisdn;
use crate::Idp;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use store::StoreError;

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
        .route("/register", post(crate::sign_up::register))
        .route("/sms/verify", post(crate::sign_up::verify))
        .route("/sms/resend_code", post(crate::sign_up::resend_code))
        .route("/sms/verify_code", post(crate::sign_up::verify_code))
        .route("/unregister", post(crate::sign_up::unregister))
        .route("/sync/pair", post(crate::pair::pair))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/admin/users/:uid/revoke", post(crate::admin::admin_revoke))
        .route(
            "/admin/users/:uid/restore",
            post(crate::admin::admin_restore),
        )
        .route("/admin/keys/rotate", post(crate::admin::admin_rotate))
        .merge(crate::web::routes(idp.page().clone()))
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

pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
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

    pub(crate) async fn limit_address(&self, addr: SocketAddr) -> Result<(), ApiError> {
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

    pub(crate) async fn limit_number(&self, msisdn: &Msisdn) -> Result<(), ApiError> {
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
