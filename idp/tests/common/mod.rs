//! The identity service on 127.0.0.1:0 for integration tests, a fake SMS
//! provider that keeps what it was asked to send, and a small HTTP client.

#![allow(dead_code)]

use idp::config::Settings;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use testkit::Platform;
use tokio_util::sync::CancellationToken;

pub const PROVIDER_TOKEN: &str = "provider-credential-xyz";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// A running identity service.
pub struct TestIdp {
    pub addr: SocketAddr,
    pub base: String,
    pub service: Arc<idp::Idp>,
    pub store: Arc<dyn Store>,
    pub sms: Platform,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Test settings: a real (fake) SMS provider, an admin token, generous rates.
pub async fn settings(dir: &std::path::Path, sms: &Platform) -> Settings {
    let mut settings = Settings::for_tests(dir.join("keys"));
    settings.sms.provider_url = Some(sms.url("/messages"));
    settings.sms.provider_token = Some(protocol::Secret::new(PROVIDER_TOKEN));
    settings.admin_token = Some(protocol::Secret::new(ADMIN_TOKEN));
    settings
}

impl TestIdp {
    /// Starts with the embedded store and in-memory state, after `adjust`.
    pub async fn start(adjust: impl FnOnce(&mut Settings)) -> TestIdp {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            store::EmbeddedStore::open(&dir.path().join("store.redb"))
                .await
                .unwrap(),
        );
        Self::start_with(dir, store, adjust).await
    }

    pub async fn start_with(
        dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        adjust: impl FnOnce(&mut Settings),
    ) -> TestIdp {
        let sms = Platform::start().await;
        let mut settings = settings(dir.path(), &sms).await;
        adjust(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        settings.public_url = format!("http://{addr}");
        let service = idp::Idp::start(settings, store.clone()).await.unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(idp::serve(listener, service.clone(), shutdown.clone()));
        TestIdp {
            addr,
            base: format!("http://{addr}"),
            service,
            store,
            sms,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            dir,
            shutdown,
        }
    }

    /// POSTs `body` (raw) to `path` with an optional bearer; status and JSON.
    pub async fn post_raw(&self, path: &str, bearer: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        self.post_raw(path, bearer, body.to_string().into_bytes())
            .await
    }

    pub async fn register(&self, msisdn: &str) -> String {
        let (status, body) = self
            .post("/register", None, serde_json::json!({ "msisdn": msisdn }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["verify_url"], format!("{}/sms/verify", self.base));
        body["session_token"].as_str().unwrap().to_owned()
    }

    /// The code in the last message the SMS provider received.
    pub fn last_code(&self) -> String {
        let received = self.sms.received();
        let last = received.last().expect("an SMS was sent");
        code_in(last.body["message"].as_str().unwrap())
    }

    /// Register, verify, read the code, verify it: (token, uid).
    pub async fn sign_up(&self, msisdn: &str) -> (String, String) {
        let session = self.register(msisdn).await;
        let (status, body) = self.post("/sms/verify", Some(&session), Value::Null).await;
        assert_eq!(status, 200, "{body}");
        let code = self.last_code();
        let (status, body) = self
            .post(
                "/sms/verify_code",
                Some(&session),
                serde_json::json!({ "code": code }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["token"].as_str().unwrap().to_owned(),
            body["user_id"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn jwks(&self) -> (Value, Option<String>) {
        let response = self
            .http
            .get(format!("{}/.well-known/jwks.json", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let cache = response
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap().to_owned());
        (response.json().await.unwrap(), cache)
    }
}

/// The 6-digit code inside an SMS text.
pub fn code_in(message: &str) -> String {
    let digits: Vec<&str> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| w.len() == 6)
        .collect();
    assert_eq!(digits.len(), 1, "one 6-digit code in {message:?}");
    digits[0].to_owned()
}

/// The token's claims, verified with the JWK of its kid in `jwks`.
pub fn verify_with_jwks(
    token: &str,
    jwks: &Value,
    issuer: &str,
    audience: &str,
) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(jwks.clone()).map_err(|e| e.to_string())?;
    let jwk = set.find(&kid).ok_or("kid not published")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}
