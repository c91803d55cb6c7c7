//! The identity service on 127.0.0.1:0 for end-to-end tests (its SMS
//! provider a local fake that keeps what it was asked to send), broker
//! options that verify its tokens through its JWKS URL, and a device
//! connection with a given token.
#![allow(dead_code)]

use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TestOptions};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use testkit::Platform;
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "e2e-admin-token-0123456789";

/// The identity service on 127.0.0.1:0, its SMS provider a local fake.
pub struct Idp {
    pub base: String,
    pub service: Arc<idp::Idp>,
    pub sms: Platform,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Idp {
    pub async fn start(
        store: Arc<dyn Store>,
        redis_url: &str,
        adjust: impl FnOnce(&mut idp::config::Settings),
    ) -> Idp {
        let dir = tempfile::tempdir().unwrap();
        let sms = Platform::start().await;
        let mut settings = idp::config::Settings::for_tests(dir.path().join("keys"));
        settings.sms.provider_url = Some(sms.url("/sms"));
        settings.redis_url = Some(redis_url.into());
        settings.admin_token = Some(protocol::Secret::new(ADMIN));
        adjust(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        settings.public_url = base.clone();
        let service = idp::Idp::start(settings, store).await.unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(idp::serve(listener, service.clone(), shutdown.clone()));
        Idp {
            base,
            service,
            sms,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            _dir: dir,
            shutdown,
        }
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base)
    }

    pub async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.post_raw(path, bearer, body.map(|b| b.to_string().into_bytes()))
            .await
    }

    /// POSTs raw bytes (malformed or oversized bodies); status and JSON.
    pub async fn post_raw(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Steps 1: register, have the code sent, read it from the SMS
    /// provider's request, verify it. (token, uid)
    pub async fn sign_up(&self, msisdn: &str) -> (String, String) {
        let (_, token, uid) = self.sign_up_session(msisdn).await;
        (token, uid)
    }

    /// As [`Idp::sign_up`], also returning the verified session's token
    /// (valid for `/unregister` until the session expires). (session, token, uid)
    pub async fn sign_up_session(&self, msisdn: &str) -> (String, String, String) {
        let (status, body) = self
            .post("/register", None, Some(json!({ "msisdn": msisdn })))
            .await;
        assert_eq!(status, 200, "{body}");
        let session = body["session_token"].as_str().unwrap().to_owned();
        let sent_before = self.sms.received().len();
        let (status, body) = self.post("/sms/verify", Some(&session), None).await;
        assert_eq!(status, 200, "{body}");
        let sent = self.sms.received();
        assert_eq!(sent.len(), sent_before + 1);
        let sms = sent.last().unwrap();
        assert_eq!(sms.body["to"], msisdn);
        let message = sms.body["message"].as_str().unwrap();
        let code: String = message
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .expect("a 6-digit code in the SMS")
            .to_owned();
        let (status, body) = self
            .post(
                "/sms/verify_code",
                Some(&session),
                Some(json!({ "code": code })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            session,
            body["token"].as_str().unwrap().to_owned(),
            body["user_id"].as_str().unwrap().to_owned(),
        )
    }
}

pub fn options(idp: &Idp, store: Arc<dyn Store>) -> TestOptions {
    let mut options = TestOptions::default();
    // The idp's JWKS beside the test HMAC secret: several verifiers at once.
    options.jwt.jwks_url = Some(idp.jwks_url());
    options.revocation_store = Some(store);
    options
}

/// A device connection with `token`: the CONNACK's outcome.
pub async fn connect(broker: &TestBroker, token: &str) -> (V5Client, Result<(), String>) {
    let target = Target {
        addr: broker.tls_addr,
        ca_file: Some(&broker.ca_file),
    };
    let id = format!("phone-{}", rand::random::<u32>());
    let mut client = V5Client::connect(target, &id, "JWT", token, |_| {});
    let outcome = match client.connack().await {
        Ok(ack) if ack.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success => Ok(()),
        Ok(ack) => Err(format!("{:?}", ack.code)),
        Err(e) => Err(e),
    };
    (client, outcome)
}
