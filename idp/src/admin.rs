//! Owns the operators' endpoints (`/admin/users/<uid>/revoke`,
//! `/admin/users/<uid>/restore`, `/admin/keys/rotate`): the admin token,
//! compared in constant time, then the store or the keys.

use crate::api::{bearer, error, json_response, store_failed, ApiError, ApiResult};
use crate::Idp;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use protocol::UserId;
use serde_json::json;
use std::sync::Arc;
use store::Revocation;

impl Idp {
    /// Admin endpoints: a configured token, compared in constant time.
    pub(crate) fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
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

pub(crate) fn admin_uid(raw: &str) -> Result<UserId, ApiError> {
    UserId::parse(raw).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

pub(crate) async fn admin_revoke(
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

pub(crate) async fn admin_restore(
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

pub(crate) async fn admin_rotate(State(idp): State<Arc<Idp>>, headers: HeaderMap) -> ApiResult {
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
