//! Owns sending one-time codes: `POST <SMS_PROVIDER_URL>` with JSON
//! `{"to": "<E.164>", "message": "<text with the code>"}` and the provider's
//! credential as a bearer token (never logged), under a deadline; or, in
//! development (no provider configured), a log line with the code.

use crate::config::SmsSettings;
use crate::msisdn::Msisdn;
use std::time::Duration;

/// Longest a provider call may take, connecting included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a code could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    #[error("SMS provider unreachable: {0}")]
    Unreachable(String),
    #[error("SMS provider answered HTTP {0}")]
    Status(u16),
    #[error("SMS client: {0}")]
    Client(String),
}

/// Sends codes.
pub struct SmsSender {
    settings: SmsSettings,
    client: reqwest::Client,
}

impl SmsSender {
    pub fn new(settings: SmsSettings) -> Result<SmsSender, SmsError> {
        let client = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .connect_timeout(SEND_TIMEOUT)
            .build()
            .map_err(|e| SmsError::Client(e.to_string()))?;
        Ok(SmsSender { settings, client })
    }

    /// Whether codes are logged instead of sent (development).
    pub fn is_development(&self) -> bool {
        self.settings.provider_url.is_none()
    }

    /// The number codes are sent from.
    pub fn sender(&self) -> &str {
        &self.settings.sender
    }

    /// Sends `code` to `to`.
    pub async fn send(&self, to: &Msisdn, code: &str) -> Result<(), SmsError> {
        let message = format!(
            "Your verification code is {code}. It expires in a few minutes; do not share it."
        );
        let Some(url) = &self.settings.provider_url else {
            // Development only: the banner says loudly that codes go to the log.
            tracing::warn!(to = %to, code = %code, "DEVELOPMENT: SMS not sent (no SMS_PROVIDER_URL); the one-time code is logged here");
            return Ok(());
        };
        let mut request = self
            .client
            .post(url)
            .json(&serde_json::json!({ "to": to.expose(), "message": message }));
        if let Some(token) = &self.settings.provider_token {
            request = request.bearer_auth(token.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|e| SmsError::Unreachable(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(SmsError::Status(response.status().as_u16()));
        }
        tracing::info!(to = %to, "one-time code sent");
        Ok(())
    }
}
