//! Owns the keys fetched from a JWKS URL: fetching (bounded in time and size),
//! the cache, and refreshing it when a token names an unknown `kid`, at most
//! once per interval and with one fetch in flight however many connections ask.
//! The cached set also goes stale after the response's `Cache-Control:
//! max-age` (or [`DEFAULT_MAX_AGE`]), so that a key the provider removed
//! (a retired key whose tokens have all expired) stops verifying.

use super::jwt::{EcCurve, KeyKind, PublicKey};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Fewest time between two fetches triggered by unknown `kid`s.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Longest a fetch may take, connecting included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long a fetched set is used before the next verification refetches
/// it, when the response names no `max-age`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The longest `max-age` honoured.
pub const MAX_CACHE_AGE: Duration = Duration::from_secs(3600);

/// Why the JWKS could not be set up or fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWT_JWKS_URL is not a valid http(s) URL")]
    BadUrl,
    #[error("building the JWKS HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("fetching the JWKS: {0}")]
    Fetch(#[source] reqwest::Error),
    #[error("fetching the JWKS: HTTP status {0}")]
    Status(u16),
    #[error("the JWKS is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("the JWKS is not a JSON object with a \"keys\" array: {0}")]
    Parse(#[source] serde_json::Error),
}

/// What the cache holds at one moment.
#[derive(Clone)]
pub struct Snapshot {
    /// Usable verification keys of the last successful fetch.
    pub keys: Arc<[PublicKey]>,
    /// Whether any fetch has succeeded yet.
    pub loaded: bool,
    /// Whether the set is older than its `max-age`: the next lookup refetches it.
    pub stale: bool,
}

struct CacheState {
    keys: Arc<[PublicKey]>,
    loaded: bool,
    /// Start of the last fetch, successful or not: the rate limit counts from it.
    last_attempt: Option<Instant>,
    /// Bumped after every fetch, so tasks that queued behind it do not repeat it.
    generation: u64,
    /// When the keys were fetched, and for how long they are fresh.
    fresh_until: Option<Instant>,
}

/// A cached JWK set behind a URL.
pub struct JwksCache {
    url: reqwest::Url,
    client: reqwest::Client,
    /// Fewest time between fetches; tests shorten it.
    pub min_refresh_interval: Duration,
    state: RwLock<CacheState>,
    /// Held for the whole of a fetch: this is what makes concurrent refreshes one.
    in_flight: tokio::sync::Mutex<()>,
}

impl JwksCache {
    /// A cache for `url`; nothing is fetched until the first refresh.
    pub fn new(url: &str) -> Result<Self, JwksError> {
        let url = reqwest::Url::parse(url).map_err(|_| JwksError::BadUrl)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(JwksError::BadUrl);
        }
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()
            .map_err(JwksError::Client)?;
        Ok(JwksCache {
            url,
            client,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            state: RwLock::new(CacheState {
                keys: Arc::from(Vec::new()),
                loaded: false,
                last_attempt: None,
                generation: 0,
                fresh_until: None,
            }),
            in_flight: tokio::sync::Mutex::new(()),
        })
    }

    /// The keys cached now.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Snapshot {
            keys: state.keys.clone(),
            loaded: state.loaded,
            stale: state
                .fresh_until
                .is_some_and(|until| Instant::now() >= until),
        }
    }

    fn generation(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }

    /// Fetches the set again unless a fetch finished while this call waited
    /// for the one in flight, or the last one started less than
    /// `min_refresh_interval` ago. `Ok(true)` when this call fetched; on a
    /// failed fetch the old keys stay.
    pub async fn refresh(&self) -> Result<bool, JwksError> {
        let seen = self.generation();
        let _in_flight = self.in_flight.lock().await;
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            if state.generation != seen {
                return Ok(false);
            }
            if let Some(last) = state.last_attempt {
                if last.elapsed() < self.min_refresh_interval {
                    tracing::debug!("JWKS refresh skipped: rate limited");
                    return Ok(false);
                }
            }
            state.last_attempt = Some(Instant::now());
        }
        let fetched = self.fetch().await;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.generation += 1;
        match fetched {
            Ok((keys, max_age)) => {
                tracing::info!(keys = keys.len(), "JWKS fetched");
                state.keys = Arc::from(keys);
                state.loaded = true;
                // Never refetched more often than the rate limit allows.
                let max_age = max_age
                    .unwrap_or(DEFAULT_MAX_AGE)
                    .min(MAX_CACHE_AGE)
                    .max(self.min_refresh_interval);
                state.fresh_until = Instant::now().checked_add(max_age);
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, cached = state.keys.len(), "JWKS fetch failed");
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<(Vec<PublicKey>, Option<Duration>), JwksError> {
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| JwksError::Fetch(e.without_url()))?;
        if !response.status().is_success() {
            return Err(JwksError::Status(response.status().as_u16()));
        }
        let max_age = cache_max_age(response.headers());
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(JwksError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| JwksError::Fetch(e.without_url()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(JwksError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((parse_jwks(&body)?, max_age))
    }
}

/// The `max-age` of a `Cache-Control` header (`no-cache`/`no-store` read as 0).
fn cache_max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').map(str::trim).find_map(|directive| {
        if directive.eq_ignore_ascii_case("no-cache") || directive.eq_ignore_ascii_case("no-store")
        {
            return Some(Duration::ZERO);
        }
        let seconds = directive.strip_prefix("max-age=")?.trim_matches('"');
        seconds.parse::<u64>().ok().map(Duration::from_secs)
    })
}

/// The document's shape, with each key parsed on its own so that one key of
/// a kind we cannot use does not hide the others.
#[derive(serde::Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

/// The usable signature-verification keys of a JWKS document.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<PublicKey>, JwksError> {
    let set: RawJwkSet = serde_json::from_slice(body).map_err(JwksError::Parse)?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for raw in set.keys {
        let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        match serde_json::from_value::<Jwk>(raw) {
            Ok(jwk) => match key_from_jwk(&jwk) {
                Some(key) => keys.push(key),
                None => tracing::debug!(?kid, "JWKS key skipped: not a usable signature key"),
            },
            Err(_) => tracing::debug!(?kid, "JWKS key skipped: not a key this broker reads"),
        }
    }
    Ok(keys)
}

/// A verification key from a JWK: RSA, EC P-256/P-384 or Ed25519, meant for
/// signatures. Symmetric (`oct`) keys are never taken from a JWKS.
fn key_from_jwk(jwk: &Jwk) -> Option<PublicKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::Ec(EcCurve::P256),
            EllipticCurve::P384 => KeyKind::Ec(EcCurve::P384),
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyKind::Ed25519,
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(signature_algorithm(a)?),
    };
    if alg.is_some_and(|a| !kind.fits(a)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(PublicKey {
        kid: jwk.common.key_id.clone(),
        kind,
        alg,
        key,
    })
}

/// The signature algorithm a JWK's `alg` names; `None` for encryption
/// algorithms and for HMAC, which a JWKS key is never used for.
fn signature_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::HS256
        | KeyAlgorithm::HS384
        | KeyAlgorithm::HS512
        | KeyAlgorithm::RSA1_5
        | KeyAlgorithm::RSA_OAEP
        | KeyAlgorithm::RSA_OAEP_256 => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::tests::{rsa_key, rsa_pems};
    use crate::auth::jwt::{JwtSettings, JwtVerifier, TokenError};
    use axum::extract::State;
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use envelope::rsa::traits::PublicKeyParts;
    use protocol::claims::DeviceClaims;
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A JWKS endpoint on 127.0.0.1:0 whose set tests change and whose hits they count.
    struct JwksServer {
        url: String,
        state: Arc<ServerState>,
    }

    struct ServerState {
        jwks: Mutex<Value>,
        hits: AtomicUsize,
        delay: Duration,
        cache_control: Mutex<Option<&'static str>>,
    }

    async fn serve_jwks(
        State(state): State<Arc<ServerState>>,
    ) -> impl axum::response::IntoResponse {
        state.hits.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(state.delay).await;
        let body = state.jwks.lock().unwrap().to_string();
        let cache = state.cache_control.lock().unwrap().unwrap_or("private");
        (
            [
                (CONTENT_TYPE, "application/json"),
                (axum::http::header::CACHE_CONTROL, cache),
            ],
            body,
        )
    }

    impl JwksServer {
        async fn start(keys: Vec<Value>, delay: Duration) -> Self {
            let state = Arc::new(ServerState {
                jwks: Mutex::new(json!({ "keys": keys })),
                hits: AtomicUsize::new(0),
                delay,
                cache_control: Mutex::new(None),
            });
            let app = axum::Router::new()
                .route("/.well-known/jwks.json", get(serve_jwks))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            JwksServer {
                url: format!("http://{addr}/.well-known/jwks.json"),
                state,
            }
        }

        fn hits(&self) -> usize {
            self.state.hits.load(Ordering::SeqCst)
        }

        fn add_key(&self, key: Value) {
            let mut jwks = self.state.jwks.lock().unwrap();
            jwks["keys"].as_array_mut().unwrap().push(key);
        }

        fn verifier(&self, interval: Duration) -> JwtVerifier {
            JwtVerifier::with_jwks_refresh_interval(
                JwtSettings {
                    jwks_url: Some(self.url.clone()),
                    ..Default::default()
                },
                interval,
            )
            .unwrap()
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa_jwk(kid: &str, alg: &str) -> Value {
        let key = rsa_key();
        json!({"kty": "RSA", "kid": kid, "alg": alg, "use": "sig",
               "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())})
    }

    /// An EC P-256 key and its JWK (x and y from the uncompressed point).
    fn ec_key(kid: &str) -> (String, Value) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = key.public_key_raw();
        assert_eq!(point.len(), 65);
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid,
                         "x": b64(&point[1..33]), "y": b64(&point[33..])});
        (key.serialize_pem(), jwk)
    }

    fn ed_key(kid: &str) -> (String, Value) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
                         "x": b64(key.public_key_raw())});
        (key.serialize_pem(), jwk)
    }

    fn token(alg: jsonwebtoken::Algorithm, private_pem: &str, kid: Option<&str>) -> String {
        DeviceClaims::new("423144", 60)
            .sign_pem(alg, private_pem.as_bytes(), kid)
            .unwrap()
    }

    #[tokio::test]
    async fn known_kids_verify_from_one_fetch() {
        use jsonwebtoken::Algorithm::*;
        let (ec_private, ec_jwk) = ec_key("ec-1");
        let (ed_private, ed_jwk) = ed_key("ed-1");
        let server = JwksServer::start(
            vec![
                rsa_jwk("rsa-1", "RS256"),
                ec_jwk,
                ed_jwk,
                json!({"kty": "oct", "kid": "hmac-1", "k": b64(b"shared secret")}),
                json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
                json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}),
                json!({"kty": "weird", "kid": "weird"}),
            ],
            Duration::ZERO,
        )
        .await;
        let verifier = server.verifier(DEFAULT_MIN_REFRESH_INTERVAL);
        let rsa_private = &rsa_pems().0;

        let ok = [
            token(RS256, rsa_private, Some("rsa-1")),
            token(ES256, &ec_private, Some("ec-1")),
            token(EdDSA, &ed_private, Some("ed-1")),
            token(ES256, &ec_private, None),
        ];
        for t in &ok {
            assert_eq!(verifier.verify(t).await.unwrap().uid.as_str(), "423144");
        }
        assert_eq!(server.hits(), 1);

        // The JWK says RS256: the same key may not check PS256.
        let ps = token(PS256, rsa_private, Some("rsa-1"));
        assert_eq!(
            verifier.verify(&ps).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
        // A JWKS `oct` key never becomes an HMAC key.
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header {
                kid: Some("hmac-1".into()),
                ..jsonwebtoken::Header::new(HS256)
            },
            &DeviceClaims::new("423144", 60),
            &jsonwebtoken::EncodingKey::from_secret(b"shared secret"),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&hs).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
        // The right kid with the wrong key is a bad signature.
        let wrong = token(ES256, &ec_key("x").0, Some("ec-1"));
        assert_eq!(verifier.verify(&wrong).await, Err(TokenError::BadSignature));
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn a_new_kid_is_picked_up_by_refresh() {
        let server = JwksServer::start(vec![rsa_jwk("rsa-1", "RS256")], Duration::ZERO).await;
        let interval = Duration::from_millis(200);
        let verifier = server.verifier(interval);
        let rsa_private = &rsa_pems().0;
        let t1 = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some("rsa-1"));
        assert!(verifier.verify(&t1).await.is_ok());
        assert_eq!(server.hits(), 1);

        let (ec_private, ec_jwk) = ec_key("ec-2");
        server.add_key(ec_jwk);
        tokio::time::sleep(interval + Duration::from_millis(50)).await;
        let t2 = token(jsonwebtoken::Algorithm::ES256, &ec_private, Some("ec-2"));
        assert!(verifier.verify(&t2).await.is_ok());
        assert_eq!(server.hits(), 2);
        // Both now come from the cache.
        assert!(verifier.verify(&t1).await.is_ok());
        assert!(verifier.verify(&t2).await.is_ok());
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn unknown_kids_within_the_interval_cause_no_fetches() {
        let server = JwksServer::start(vec![rsa_jwk("rsa-1", "RS256")], Duration::ZERO).await;
        let verifier = server.verifier(DEFAULT_MIN_REFRESH_INTERVAL);
        let rsa_private = &rsa_pems().0;
        let known = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some("rsa-1"));
        assert!(verifier.verify(&known).await.is_ok());
        for i in 0..10 {
            let kid = format!("unknown-{i}");
            let t = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some(&kid));
            assert_eq!(verifier.verify(&t).await, Err(TokenError::UnknownKey));
        }
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn concurrent_refreshes_are_one_fetch() {
        let server =
            JwksServer::start(vec![rsa_jwk("rsa-1", "RS256")], Duration::from_millis(300)).await;
        // No rate limit: only coalescing can keep this to one fetch.
        let verifier = server.verifier(Duration::ZERO);
        let t = token(jsonwebtoken::Algorithm::RS256, &rsa_pems().0, Some("rsa-1"));
        let results = futures::future::join_all((0..20).map(|_| verifier.verify(&t))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn server_down_with_nothing_cached_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let verifier = JwtVerifier::new(JwtSettings {
            jwks_url: Some(format!("http://{addr}/jwks.json")),
            ..Default::default()
        })
        .unwrap();
        let rsa_private = &rsa_pems().0;
        for kid in [Some("rsa-1"), None] {
            let t = token(jsonwebtoken::Algorithm::RS256, rsa_private, kid);
            assert_eq!(verifier.verify(&t).await, Err(TokenError::KeysUnavailable));
        }
        assert!(
            verifier.prefetch_jwks().await.is_ok(),
            "rate limited: no fetch, no error"
        );
    }

    #[tokio::test]
    async fn a_failing_server_keeps_the_cached_keys() {
        let server = JwksServer::start(vec![rsa_jwk("rsa-1", "RS256")], Duration::ZERO).await;
        let verifier = server.verifier(Duration::ZERO);
        let rsa_private = &rsa_pems().0;
        let known = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some("rsa-1"));
        assert!(verifier.verify(&known).await.is_ok());
        *server.state.jwks.lock().unwrap() = json!("not a jwks");
        let unknown = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some("rsa-2"));
        assert_eq!(verifier.verify(&unknown).await, Err(TokenError::UnknownKey));
        assert!(verifier.verify(&known).await.is_ok());
        assert_eq!(server.hits(), 2);
    }

    /// A key the provider stopped publishing stops verifying once the set's
    /// max-age has passed (never sooner than the refresh interval), without
    /// any unknown kid to trigger a refresh.
    #[tokio::test]
    async fn a_removed_kid_stops_verifying_after_max_age() {
        let server = JwksServer::start(
            vec![rsa_jwk("old", "RS256"), rsa_jwk("new", "RS256")],
            Duration::ZERO,
        )
        .await;
        *server.state.cache_control.lock().unwrap() = Some("public, max-age=0");
        let interval = Duration::from_millis(300);
        let verifier = server.verifier(interval);
        let rsa_private = &rsa_pems().0;
        let old = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some("old"));
        assert!(verifier.verify(&old).await.is_ok());
        *server.state.jwks.lock().unwrap() = json!({ "keys": [rsa_jwk("new", "RS256")] });
        // Within max-age (raised to the refresh interval): still cached.
        assert!(verifier.verify(&old).await.is_ok());
        assert_eq!(server.hits(), 1);
        tokio::time::sleep(interval + Duration::from_millis(50)).await;
        assert_eq!(verifier.verify(&old).await, Err(TokenError::UnknownKey));
        assert_eq!(server.hits(), 2);
        let new = token(jsonwebtoken::Algorithm::RS256, rsa_private, Some("new"));
        assert!(verifier.verify(&new).await.is_ok());
    }

    #[test]
    fn cache_control_max_age() {
        let headers = |v: &'static str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::CACHE_CONTROL, v.parse().unwrap());
            h
        };
        let age = |v| cache_max_age(&headers(v));
        assert_eq!(age("public, max-age=60"), Some(Duration::from_secs(60)));
        assert_eq!(age("no-store"), Some(Duration::ZERO));
        assert_eq!(age("public"), None);
        assert_eq!(age("max-age=x"), None);
        assert_eq!(cache_max_age(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn only_http_urls() {
        assert!(matches!(
            JwksCache::new("file:///etc/passwd"),
            Err(JwksError::BadUrl)
        ));
        assert!(matches!(JwksCache::new("nope"), Err(JwksError::BadUrl)));
        assert!(JwksCache::new("https://auth.example/.well-known/jwks.json").is_ok());
    }
}
