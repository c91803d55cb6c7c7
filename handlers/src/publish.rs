//! Owns the `publish` handler: opens a device's AES-256-GCM envelope (uid as
//! associated data) with the user's current key, refuses stale key ids and
//! replayed nonces, forwards the plaintext to the platform's HTTP endpoint
//! (POST JSON, `Idempotency-Key`, per-attempt timeout, bounded retries with
//! backoff on 5xx, 408, 429 and network errors), and replies on
//! `<uid>_publish` with `{"status": 200 | 4xx | 502, "request_id"}`.
//!
//! The user's stored platform token (see [`crate::tokens`]) goes with the
//! forward: the whole token object as the body field `"token"`, and, when it
//! has a string `access_token`, the header `Authorization: Bearer <it>`
//! (replacing an `Authorization` from `PLATFORM_<NAME>_HEADERS`). Without a
//! stored token, a platform whose token is `required` (the default) gets
//! nothing and the device gets 424 "no stored token for platform X: send
//! store_token first"; an `optional` one is forwarded without.
//!
//! Checks run cheapest first, and the nonce is only recorded after the
//! ciphertext authenticates, so garbage cannot fill the nonce store. A nonce
//! is spent even when the platform then fails: a retry by the device needs a
//! fresh encryption.

use crate::settings::{Platform, TokenUse};
use crate::Shared;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use sdk::{Command, HandlerError, Reply, Worker};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The `publish` command.
#[derive(Debug, Deserialize)]
pub struct PublishIn {
    /// A configured platform name.
    pub platform: String,
    /// The key id from the last `sync`.
    pub key_id: String,
    /// base64 of 12 bytes.
    pub nonce: String,
    /// base64 of the AES-256-GCM ciphertext with its tag.
    pub ciphertext: String,
}

/// What the platform receives.
#[derive(Debug, Serialize)]
pub struct Forward<'a> {
    pub request_id: &'a str,
    pub user_id: &'a str,
    pub platform: &'a str,
    pub message: &'a str,
    /// The user's stored token for the platform, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a Map<String, Value>>,
}

/// The worker serving `publish`.
pub fn worker(shared: Arc<Shared>) -> Worker {
    Worker::new("publish").on("publish", move |cmd: Command<PublishIn>| {
        let shared = Arc::clone(&shared);
        async move { handle(&shared, cmd).await }
    })
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Handles one `publish` command.
pub async fn handle(shared: &Shared, cmd: Command<PublishIn>) -> Result<Reply, HandlerError> {
    let body = cmd.body;
    let uid = &cmd.user_id;
    let platform = shared
        .settings
        .platform(&body.platform)
        .ok_or_else(|| HandlerError::not_found(format!("unknown platform {:?}", body.platform)))?;
    let nonce = envelope::b64_decode(&body.nonce)
        .map_err(|_| HandlerError::bad_request("nonce is not valid base64"))?;
    if nonce.len() != envelope::NONCE_LEN {
        return Err(HandlerError::bad_request("nonce must be 12 bytes"));
    }
    let ciphertext = envelope::b64_decode(&body.ciphertext)
        .map_err(|_| HandlerError::bad_request("ciphertext is not valid base64"))?;
    let record = shared
        .store
        .get_key(uid)
        .await?
        .ok_or_else(|| HandlerError::conflict("no shared key: sync first"))?;
    if !bool::from(record.key_id.as_bytes().ct_eq(body.key_id.as_bytes())) {
        return Err(HandlerError::conflict("stale key_id: sync again"));
    }
    let plaintext = envelope::aes_open(&record.key, &nonce, uid.as_str().as_bytes(), &ciphertext)
        .map_err(|_| HandlerError::bad_request("decryption failed"))?;
    let message = String::from_utf8(plaintext)
        .map_err(|_| HandlerError::bad_request("the message is not UTF-8"))?;
    // Before the nonce is spent: a device told to store a token first can
    // send the same envelope again.
    let token = crate::tokens::stored_token(shared, uid, &platform.name).await?;
    if token.is_none() && platform.token == TokenUse::Required {
        return Err(HandlerError::new(
            424,
            format!(
                "no stored token for platform {}: send store_token first",
                platform.name
            ),
        ));
    }
    if !shared
        .store
        .remember_nonce(store::NonceUse {
            uid,
            key_id: &record.key_id,
            nonce: &nonce,
            ttl: shared.settings.nonce_ttl,
        })
        .await?
    {
        return Err(HandlerError::conflict("replayed nonce"));
    }
    let request_id = cmd.request_id.unwrap_or_else(new_request_id);
    let forward = Forward {
        request_id: &request_id,
        user_id: uid.as_str(),
        platform: &platform.name,
        message: &message,
        token: token.as_ref(),
    };
    match deliver(shared, platform, &forward).await {
        Ok(()) => {
            tracing::info!(%uid, platform = %platform.name, %request_id, "message delivered");
            Ok(Reply::json(
                "publish",
                json!({"status": 200, "request_id": request_id}),
            ))
        }
        Err(reason) => {
            tracing::warn!(%uid, platform = %platform.name, %request_id, %reason, "delivery failed");
            Ok(Reply::json(
                "publish",
                json!({"status": 502, "request_id": request_id, "error": reason}),
            ))
        }
    }
}

/// Whether an HTTP status is worth another attempt.
fn retryable(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// POSTs `forward` to the platform with bounded retries; `Err` says why the
/// last attempt failed (safe to show to the device).
pub async fn deliver(
    shared: &Shared,
    platform: &Platform,
    forward: &Forward<'_>,
) -> Result<(), String> {
    let attempts = shared.settings.publish_retries + 1;
    let bearer = forward
        .token
        .and_then(|t| t.get("access_token"))
        .and_then(Value::as_str)
        .and_then(|access| {
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {access}")).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
    let mut backoff = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let mut request = shared
            .http
            .post(platform.url.clone())
            .timeout(shared.settings.publish_timeout)
            .header("Idempotency-Key", forward.request_id)
            .json(forward);
        for (name, value) in &platform.headers {
            if bearer.is_some() && name.eq_ignore_ascii_case("authorization") {
                continue;
            }
            request = request.header(name.as_str(), value.expose());
        }
        if let Some(bearer) = &bearer {
            request = request.header(reqwest::header::AUTHORIZATION, bearer.clone());
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                last = format!("platform answered HTTP {}", status.as_u16());
                if !retryable(status) {
                    return Err(last);
                }
            }
            Err(e) if e.is_timeout() => last = "platform timed out".into(),
            Err(e) if e.is_connect() => last = "platform unreachable".into(),
            Err(_) => last = "platform request failed".into(),
        }
        tracing::debug!(attempt, platform = %platform.name, reason = %last, "delivery attempt failed");
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    Err(last)
}
