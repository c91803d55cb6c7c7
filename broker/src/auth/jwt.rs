//! Owns device-token verification: which key may check which algorithm (an
//! HMAC secret for HS*, PEM public keys and a JWKS for the rest, never one for
//! the other), the claim rules (`exp`, `nbf`, `iss`, `aud`, leeway), and the
//! `sub` that becomes the user id. Signature and claim checks are jsonwebtoken's.

use super::jwks::{JwksCache, JwksError, DEFAULT_MIN_REFRESH_INTERVAL};
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Header, Validation};
use protocol::uid::UidError;
use protocol::{Secret, UserId};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Shortest `JWT_SECRET` accepted at start-up, in bytes: HS256 keys need at
/// least 256 bits (RFC 7518 §3.2), and a shorter secret can be brute-forced
/// offline from any one token.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// How device tokens are verified (from the broker's configuration).
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// The `JWT_SECRET` text, its raw bytes the key (not base64); enables
    /// HS256/384/512.
    pub hmac_secret: Option<Secret>,
    /// PEM public keys: RSA (RS*, PS*), EC P-256/P-384 (ES256/ES384), Ed25519 (EdDSA).
    pub public_key_files: Vec<PathBuf>,
    /// A JWK set of public keys, fetched and cached.
    pub jwks_url: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (a string, or one member of an array), when set.
    pub audience: Option<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Whether a token without `exp` is refused.
    pub require_exp: bool,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            hmac_secret: None,
            public_key_files: Vec::new(),
            jwks_url: None,
            issuer: None,
            audience: None,
            leeway_secs: 5,
            require_exp: true,
        }
    }
}

/// Why the verifier could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("no way to verify device tokens: set JWT_SECRET, JWT_PUBLIC_KEYS or JWT_JWKS_URL")]
    NoKeySource,
    #[error("JWT_SECRET is empty: set a long random secret or unset it")]
    EmptySecret,
    #[error("JWT public key file {path}: cannot read it: {source}")]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JWT public key file {path} holds a private key: configure the public key (PEM `BEGIN PUBLIC KEY`) instead")]
    PrivateKeyFile { path: PathBuf },
    #[error("JWT public key file {path}: {problem}; expected a PEM public key (`BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`) for RSA, EC P-256/P-384 or Ed25519")]
    BadKeyFile {
        path: PathBuf,
        problem: &'static str,
    },
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

/// Why a token was refused. [`TokenError::reason`] is safe to send and log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not accepted")]
    AlgorithmNotAllowed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has no expiry")]
    MissingExpiry,
    #[error("wrong token issuer")]
    WrongIssuer,
    #[error("wrong token audience")]
    WrongAudience,
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(UidError),
    #[error("token key id unknown")]
    UnknownKey,
    #[error("token keys unavailable, try again later")]
    KeysUnavailable,
    /// RFC 7515 §4.1.11: a `crit` header names extensions the verifier must
    /// understand; this broker understands none, so any `crit` is refused.
    #[error("token header names critical extensions (crit) this broker does not support")]
    CriticalExtension,
}

impl TokenError {
    /// A short reason for a CONNACK reason string; never token content.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed token",
            TokenError::AlgorithmNotAllowed => "token algorithm not accepted",
            TokenError::BadSignature => "bad token signature",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not yet valid",
            TokenError::MissingExpiry => "token has no expiry",
            TokenError::WrongIssuer => "wrong token issuer",
            TokenError::WrongAudience => "wrong token audience",
            TokenError::BadSubject(_) => "token subject is not a valid user id",
            TokenError::UnknownKey => "token key id unknown",
            TokenError::KeysUnavailable => "token keys unavailable, try again later",
            TokenError::CriticalExtension => "token header has unsupported crit extensions",
        }
    }
}

/// What a verified token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub uid: UserId,
    /// The token's `exp`, Unix seconds.
    pub expires_at: Option<u64>,
    /// The token's `iat`, Unix seconds (`None` without one, or when it is
    /// not a non-negative number): revocations compare it with their cut-off.
    pub issued_at: Option<u64>,
}

/// The curve of an EC key, which decides its one algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcCurve {
    P256,
    P384,
}

/// The family of an asymmetric key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    Ec(EcCurve),
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind can check signatures of `alg`.
    pub fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyKind::Ec(EcCurve::P256) => alg == Algorithm::ES256,
            KeyKind::Ec(EcCurve::P384) => alg == Algorithm::ES384,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// An asymmetric verification key, from a PEM file or a JWKS.
#[derive(Clone)]
pub struct PublicKey {
    /// The JWK's `kid`; PEM files have none.
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The one algorithm a JWK allows (its `alg`), if it names one.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl PublicKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && (self.alg.is_none() || self.alg == Some(alg))
    }
}

/// Verifies device tokens. Cheap to clone; clones share the JWKS cache.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// Only ever used for HS* tokens.
    hmac: Option<DecodingKey>,
    /// Only ever used for asymmetric algorithms.
    pem_keys: Vec<PublicKey>,
    jwks: Option<JwksCache>,
    /// Claim rules; `algorithms` is set per token to its header's one.
    validation: Validation,
    require_exp: bool,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hmac", &self.inner.hmac.is_some())
            .field("pem_keys", &self.inner.pem_keys.len())
            .field("jwks", &self.inner.jwks.is_some())
            .finish()
    }
}

/// The claims read after jsonwebtoken has checked them. Loosely typed so that
/// an `aud` array or odd extra claims do not make a good token malformed.
#[derive(serde::Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    nbf: Option<Value>,
    #[serde(default)]
    iat: Option<Value>,
}

/// The outcome of looking for JWKS keys for one token.
enum JwksLookup {
    Keys(Vec<PublicKey>),
    UnknownKid,
    Unavailable,
}

impl JwtVerifier {
    /// Builds a verifier, reading and parsing the PEM files now. The JWKS, if
    /// any, is fetched on first use (or by [`JwtVerifier::prefetch_jwks`]).
    pub fn new(settings: JwtSettings) -> Result<Self, JwtConfigError> {
        Self::with_jwks_refresh_interval(settings, DEFAULT_MIN_REFRESH_INTERVAL)
    }

    /// As [`JwtVerifier::new`], with another least time between JWKS fetches.
    pub fn with_jwks_refresh_interval(
        settings: JwtSettings,
        min_refresh_interval: Duration,
    ) -> Result<Self, JwtConfigError> {
        if settings.hmac_secret.is_none()
            && settings.public_key_files.is_empty()
            && settings.jwks_url.is_none()
        {
            return Err(JwtConfigError::NoKeySource);
        }
        let hmac = match &settings.hmac_secret {
            Some(secret) if secret.is_empty() => return Err(JwtConfigError::EmptySecret),
            Some(secret) => Some(DecodingKey::from_secret(secret.expose().as_bytes())),
            None => None,
        };
        let pem_keys = settings
            .public_key_files
            .iter()
            .map(|path| load_pem_key(path))
            .collect::<Result<Vec<_>, _>>()?;
        let jwks = match &settings.jwks_url {
            Some(url) => {
                let mut cache = JwksCache::new(url)?;
                cache.min_refresh_interval = min_refresh_interval;
                Some(cache)
            }
            None => None,
        };

        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = settings.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = Vec::new();
        if settings.require_exp {
            required.push("exp");
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Unconfigured: a token's aud is not checked.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        tracing::info!(
            hmac = hmac.is_some(),
            pem_keys = pem_keys.len(),
            jwks = jwks.is_some(),
            "device token verifier ready"
        );
        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                hmac,
                pem_keys,
                jwks,
                validation,
                require_exp: settings.require_exp,
            }),
        })
    }

    /// Fetches the JWKS now (a no-op without one), e.g. to report a bad URL at start.
    pub async fn prefetch_jwks(&self) -> Result<(), JwksError> {
        match &self.inner.jwks {
            Some(cache) => cache.refresh().await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Verifies a compact JWS and returns the user it proves.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let result = self.verify_inner(token).await;
        if let Err(e) = &result {
            tracing::debug!(reason = e.reason(), "device token refused");
        }
        result
    }

    async fn verify_inner(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        // jsonwebtoken's `Header` has no `crit` and ignores unknown fields, so
        // the header JSON is read here too: one small base64 and JSON decode,
        // before any signature work.
        let raw_header = raw_header(token).ok_or(TokenError::Malformed)?;
        if raw_header.contains_key("crit") {
            return Err(TokenError::CriticalExtension);
        }
        let header = decode_header(token).map_err(|_| classify_bad_header(&raw_header))?;
        let mut validation = self.inner.validation.clone();
        validation.algorithms = vec![header.alg];
        let claims = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let key = self
                    .inner
                    .hmac
                    .as_ref()
                    .ok_or(TokenError::AlgorithmNotAllowed)?;
                try_keys(token, std::iter::once(key), &validation)?
                    .ok_or(TokenError::BadSignature)?
            }
            _ => self.verify_asymmetric(token, &header, &validation).await?,
        };
        self.finish(claims)
    }

    async fn verify_asymmetric(
        &self,
        token: &str,
        header: &Header,
        validation: &Validation,
    ) -> Result<RawClaims, TokenError> {
        let alg = header.alg;
        let pem: Vec<&PublicKey> = self.inner.pem_keys.iter().filter(|k| k.fits(alg)).collect();
        let (jwks_keys, jwks_problem) = match &self.inner.jwks {
            None => (Vec::new(), None),
            Some(cache) => match jwks_lookup(cache, header.kid.as_deref(), alg).await {
                JwksLookup::Keys(keys) => (keys, None),
                JwksLookup::UnknownKid => (Vec::new(), Some(TokenError::UnknownKey)),
                JwksLookup::Unavailable => (Vec::new(), Some(TokenError::KeysUnavailable)),
            },
        };
        if pem.is_empty() && jwks_keys.is_empty() {
            return Err(jwks_problem.unwrap_or(TokenError::AlgorithmNotAllowed));
        }
        let keys = pem.into_iter().chain(jwks_keys.iter()).map(|k| &k.key);
        match try_keys(token, keys, validation)? {
            Some(claims) => Ok(claims),
            None => Err(jwks_problem.unwrap_or(TokenError::BadSignature)),
        }
    }

    /// Checks what jsonwebtoken does not: time claims are integers, and `sub` is a uid.
    fn finish(&self, claims: RawClaims) -> Result<VerifiedToken, TokenError> {
        let expires_at = match claims.exp {
            None => None,
            Some(exp) => Some(exp.as_u64().ok_or(TokenError::Malformed)?),
        };
        if claims.nbf.is_some_and(|nbf| nbf.as_u64().is_none()) {
            return Err(TokenError::Malformed);
        }
        if self.inner.require_exp && expires_at.is_none() {
            return Err(TokenError::MissingExpiry);
        }
        let uid = match claims.sub {
            Some(Value::String(sub)) => UserId::parse(&sub).map_err(TokenError::BadSubject)?,
            _ => return Err(TokenError::BadSubject(UidError::Empty)),
        };
        // A NumericDate may have a fraction; anything else reads as "no iat",
        // which a revocation by time refuses (fails closed, never open).
        let issued_at = claims.iat.as_ref().and_then(|iat| {
            iat.as_u64().or_else(|| {
                iat.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                    .map(|f| f.floor() as u64)
            })
        });
        Ok(VerifiedToken {
            uid,
            expires_at,
            issued_at,
        })
    }
}

/// The JWKS keys that may check a token of `alg` naming `kid`, refreshing the
/// cache first when it is empty or does not know the `kid`.
async fn jwks_lookup(cache: &JwksCache, kid: Option<&str>, alg: Algorithm) -> JwksLookup {
    let mut snapshot = cache.snapshot();
    // Stale: past the set's max-age, so that removed keys stop verifying.
    if !snapshot.loaded || snapshot.stale {
        // Failures are logged by the cache; the snapshot below says what we have.
        let _ = cache.refresh().await;
        snapshot = cache.snapshot();
    }
    if !snapshot.loaded {
        return JwksLookup::Unavailable;
    }
    let Some(kid) = kid else {
        return JwksLookup::Keys(
            snapshot
                .keys
                .iter()
                .filter(|k| k.fits(alg))
                .cloned()
                .collect(),
        );
    };
    let has_kid = |keys: &[PublicKey]| keys.iter().any(|k| k.kid.as_deref() == Some(kid));
    if !has_kid(&snapshot.keys) {
        tracing::debug!(kid = %kid.chars().take(64).collect::<String>(), "unknown JWKS kid; refreshing");
        let _ = cache.refresh().await;
        snapshot = cache.snapshot();
        if !has_kid(&snapshot.keys) {
            return JwksLookup::UnknownKid;
        }
    }
    JwksLookup::Keys(
        snapshot
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid) && k.fits(alg))
            .cloned()
            .collect(),
    )
}

/// Decodes with each key in turn: the claims of the first whose signature
/// matches (`Ok(None)` if none does), or the claim error jsonwebtoken found
/// once a signature matched.
fn try_keys<'a>(
    token: &str,
    keys: impl IntoIterator<Item = &'a DecodingKey>,
    validation: &Validation,
) -> Result<Option<RawClaims>, TokenError> {
    for key in keys {
        match decode::<RawClaims>(token, key, validation) {
            Ok(data) => return Ok(Some(data.claims)),
            Err(e) => match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => continue,
                _ => return Err(map_error(e.kind())),
            },
        }
    }
    Ok(None)
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            TokenError::AlgorithmNotAllowed
        }
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => TokenError::MissingExpiry,
            "iss" => TokenError::WrongIssuer,
            "aud" => TokenError::WrongAudience,
            _ => TokenError::Malformed,
        },
        _ => TokenError::Malformed,
    }
}

/// The JOSE header of a compact JWS as a JSON object (the base64url of the
/// text before the first `.`), or `None` when it is not one.
fn raw_header(token: &str) -> Option<serde_json::Map<String, Value>> {
    let encoded = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()?;
    match serde_json::from_slice::<Value>(&json) {
        Ok(Value::Object(header)) => Some(header),
        _ => None,
    }
}

/// A header jsonwebtoken cannot read: an `alg` it does not know (`none`
/// above all) is a refused algorithm, anything else is malformed.
fn classify_bad_header(header: &serde_json::Map<String, Value>) -> TokenError {
    match header.get("alg").and_then(Value::as_str) {
        Some(alg) if alg.parse::<Algorithm>().is_err() => TokenError::AlgorithmNotAllowed,
        _ => TokenError::Malformed,
    }
}

/// Reads a PEM public key file and tells its kind. jsonwebtoken parses the
/// key; the EC curve (which jsonwebtoken does not expose) is read from the
/// curve's OID in the DER.
fn load_pem_key(path: &Path) -> Result<PublicKey, JwtConfigError> {
    use rustls_pemfile::Item;
    let bytes = std::fs::read(path).map_err(|source| JwtConfigError::ReadKeyFile {
        path: path.to_owned(),
        source,
    })?;
    let bad = |problem| JwtConfigError::BadKeyFile {
        path: path.to_owned(),
        problem,
    };
    let first = rustls_pemfile::read_one_from_slice(&bytes).ok().flatten();
    let der = match first {
        Some((Item::Pkcs1Key(_) | Item::Pkcs8Key(_) | Item::Sec1Key(_), _)) => {
            return Err(JwtConfigError::PrivateKeyFile {
                path: path.to_owned(),
            })
        }
        Some((Item::SubjectPublicKeyInfo(spki), _)) => Some(spki.as_ref().to_vec()),
        Some((Item::X509Certificate(cert), _)) => Some(cert.as_ref().to_vec()),
        _ => None,
    };
    let (kind, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&bytes) {
        (KeyKind::Rsa, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(&bytes) {
        let der = der.ok_or_else(|| bad("not a PEM public key"))?;
        let curve =
            ec_curve(&der).ok_or_else(|| bad("EC key on a curve other than P-256 or P-384"))?;
        (KeyKind::Ec(curve), key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(&bytes) {
        (KeyKind::Ed25519, key)
    } else {
        return Err(bad("not a PEM public key this broker reads"));
    };
    tracing::debug!(path = %path.display(), kind = ?kind, "JWT public key loaded");
    Ok(PublicKey {
        kid: None,
        kind,
        alg: None,
        key,
    })
}

/// The named curve of an EC public key's DER, by its OID.
fn ec_curve(der: &[u8]) -> Option<EcCurve> {
    // OID 1.2.840.10045.3.1.7 (prime256v1) and 1.3.132.0.34 (secp384r1), tag and length included.
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    let contains = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    if contains(P256) {
        Some(EcCurve::P256)
    } else if contains(P384) {
        Some(EcCurve::P384)
    } else {
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use envelope::rsa;
    use jsonwebtoken::{encode, EncodingKey};
    use protocol::claims::{now_secs, DeviceClaims};
    use serde_json::json;
    use std::sync::OnceLock;

    const SECRET: &[u8] = b"a-long-shared-secret-for-tests-0123456789";

    fn test_secret() -> Secret {
        Secret::from(std::str::from_utf8(SECRET).unwrap())
    }

    /// One RSA key for every test (here and in `jwks`): generation is slow in debug builds.
    pub(crate) fn rsa_key() -> &'static rsa::RsaPrivateKey {
        static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap())
    }

    /// The private (PKCS#8) and public (SPKI) PEMs of [`rsa_key`].
    pub(crate) fn rsa_pems() -> &'static (String, String) {
        static PEMS: OnceLock<(String, String)> = OnceLock::new();
        PEMS.get_or_init(|| {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let key = rsa_key();
            let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
            let public = key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
            (private, public)
        })
    }

    /// A private and a public PEM of a fresh rcgen key.
    fn rcgen_pems(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        (key.serialize_pem(), key.public_key_pem())
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn hmac_verifier() -> JwtVerifier {
        JwtVerifier::new(JwtSettings {
            hmac_secret: Some(test_secret()),
            ..Default::default()
        })
        .unwrap()
    }

    fn pem_verifier(files: Vec<PathBuf>) -> JwtVerifier {
        JwtVerifier::new(JwtSettings {
            public_key_files: files,
            ..Default::default()
        })
        .unwrap()
    }

    fn sign_hs(alg: Algorithm, claims: &impl serde::Serialize, secret: &[u8]) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[tokio::test]
    async fn hmac_algorithms_verify() {
        let verifier = hmac_verifier();
        let claims = DeviceClaims::new("423144", 60);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let token = sign_hs(alg, &claims, SECRET);
            let verified = verifier.verify(&token).await.unwrap();
            assert_eq!(verified.uid.as_str(), "423144");
            assert_eq!(verified.expires_at, claims.exp);
        }
        let token = claims.sign_hs256(SECRET).unwrap();
        assert!(verifier.verify(&token).await.is_ok());
    }

    #[tokio::test]
    async fn asymmetric_algorithms_verify_from_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let claims = DeviceClaims::new("dev-1.a", 60);
        let (rsa_private, rsa_public) = rsa_pems();
        let (ec_private, ec_public) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (ec384_private, ec384_public) = rcgen_pems(&rcgen::PKCS_ECDSA_P384_SHA384);
        let (ed_private, ed_public) = rcgen_pems(&rcgen::PKCS_ED25519);
        let cases = [
            (Algorithm::RS256, rsa_private.as_str(), rsa_public.as_str()),
            (Algorithm::RS512, rsa_private, rsa_public),
            (Algorithm::PS256, rsa_private, rsa_public),
            (Algorithm::ES256, &ec_private, &ec_public),
            (Algorithm::ES384, &ec384_private, &ec384_public),
            (Algorithm::EdDSA, &ed_private, &ed_public),
        ];
        for (alg, private, public) in cases {
            let verifier = pem_verifier(vec![write(&dir, "key.pem", public)]);
            let token = claims.sign_pem(alg, private.as_bytes(), None).unwrap();
            let verified = verifier
                .verify(&token)
                .await
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(verified.uid.as_str(), "dev-1.a");
        }
    }

    #[tokio::test]
    async fn the_second_of_two_public_keys_signs() {
        let dir = tempfile::tempdir().unwrap();
        let (_, first_public) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (second_private, second_public) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, ed_public) = rcgen_pems(&rcgen::PKCS_ED25519);
        let verifier = pem_verifier(vec![
            write(&dir, "a.pem", &first_public),
            write(&dir, "ed.pem", &ed_public),
            write(&dir, "b.pem", &second_public),
        ]);
        let token = DeviceClaims::new("7", 60)
            .sign_pem(Algorithm::ES256, second_private.as_bytes(), None)
            .unwrap();
        assert_eq!(verifier.verify(&token).await.unwrap().uid.as_str(), "7");

        // A key nobody configured fails on its signature.
        let (stranger, _) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let token = DeviceClaims::new("7", 60)
            .sign_pem(Algorithm::ES256, stranger.as_bytes(), None)
            .unwrap();
        assert_eq!(verifier.verify(&token).await, Err(TokenError::BadSignature));
    }

    #[tokio::test]
    async fn algorithms_without_a_fitting_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, p256_public) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (p384_private, _) = rcgen_pems(&rcgen::PKCS_ECDSA_P384_SHA384);
        let (ed_private, _) = rcgen_pems(&rcgen::PKCS_ED25519);
        let verifier = pem_verifier(vec![write(&dir, "p256.pem", &p256_public)]);
        let claims = DeviceClaims::new("7", 60);
        let es384 = claims
            .sign_pem(Algorithm::ES384, p384_private.as_bytes(), None)
            .unwrap();
        assert_eq!(
            verifier.verify(&es384).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
        let eddsa = claims
            .sign_pem(Algorithm::EdDSA, ed_private.as_bytes(), None)
            .unwrap();
        assert_eq!(
            verifier.verify(&eddsa).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
        let hs = claims.sign_hs256(SECRET).unwrap();
        assert_eq!(
            verifier.verify(&hs).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
        // And an HMAC-only verifier takes no asymmetric token.
        let (rsa_private, _) = rsa_pems();
        let rs = claims
            .sign_pem(Algorithm::RS256, rsa_private.as_bytes(), None)
            .unwrap();
        assert_eq!(
            hmac_verifier().verify(&rs).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        let verifier = hmac_verifier();
        let payload = json!({"sub": "423144", "exp": now_secs() + 60});
        for alg in ["none", "None", "NONE", "nOnE"] {
            let token = format!(
                "{}.{}.",
                b64(&json!({"alg": alg, "typ": "JWT"})),
                b64(&payload)
            );
            assert_eq!(
                verifier.verify(&token).await,
                Err(TokenError::AlgorithmNotAllowed),
                "{alg}"
            );
        }
        // With a signature of some HMAC tacked on, still refused.
        let token = format!(
            "{}.{}.{}",
            b64(&json!({"alg": "none"})),
            b64(&payload),
            URL_SAFE_NO_PAD.encode(b"sig")
        );
        assert_eq!(
            verifier.verify(&token).await,
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    /// RFC 7515 §4.1.11: a validly signed token whose header carries `crit`
    /// (an unknown extension, an empty list, or a registered name) is refused.
    #[tokio::test]
    async fn critical_header_extensions_are_refused() {
        let verifier = hmac_verifier();
        let claims = DeviceClaims::new("u1", 60);
        let signed_with = |crit: Value| {
            let header = b64(&json!({"alg": "HS256", "typ": "JWT", "crit": crit, "exp": 1}));
            let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
            let input = format!("{header}.{payload}");
            let signature = jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(SECRET),
                Algorithm::HS256,
            )
            .unwrap();
            format!("{input}.{signature}")
        };
        for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!("x")] {
            let token = signed_with(crit.clone());
            assert_eq!(
                verifier.verify(&token).await,
                Err(TokenError::CriticalExtension),
                "{crit}"
            );
        }
        // The same token without `crit` verifies: the signature is genuine.
        let plain = sign_hs(Algorithm::HS256, &claims, SECRET);
        assert!(verifier.verify(&plain).await.is_ok());
        // Asymmetric tokens too.
        let dir = tempfile::tempdir().unwrap();
        let (ec_private, ec_public) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let pem = pem_verifier(vec![write(&dir, "ec.pem", &ec_public)]);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k".into());
        let good = encode(
            &header,
            &claims,
            &EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(pem.verify(&good).await.is_ok());
        let header =
            b64(&json!({"alg": "ES256", "crit": ["urn:example:ext"], "urn:example:ext": 1}));
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let input = format!("{header}.{payload}");
        let signature = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap(),
            Algorithm::ES256,
        )
        .unwrap();
        assert_eq!(
            pem.verify(&format!("{input}.{signature}")).await,
            Err(TokenError::CriticalExtension)
        );
    }

    #[tokio::test]
    async fn hmac_signed_with_the_public_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, rsa_public) = rsa_pems();
        let path = write(&dir, "rsa.pem", rsa_public);
        let claims = DeviceClaims::new("423144", 60);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let forged = sign_hs(alg, &claims, rsa_public.as_bytes());

            let public_only = pem_verifier(vec![path.clone()]);
            assert_eq!(
                public_only.verify(&forged).await,
                Err(TokenError::AlgorithmNotAllowed)
            );

            let both = JwtVerifier::new(JwtSettings {
                hmac_secret: Some(test_secret()),
                public_key_files: vec![path.clone()],
                ..Default::default()
            })
            .unwrap();
            assert_eq!(both.verify(&forged).await, Err(TokenError::BadSignature));
            // The genuine HMAC token still works there.
            assert!(both.verify(&sign_hs(alg, &claims, SECRET)).await.is_ok());
        }
    }

    /// `iat` is read for revocations by time: an integer or a NumericDate
    /// with a fraction; anything else (or none) reads as no `iat`.
    #[tokio::test]
    async fn issued_at_is_read() {
        let verifier = hmac_verifier();
        let exp = now_secs() + 60;
        let token = |iat: Value| {
            sign_hs(
                Algorithm::HS256,
                &json!({"sub": "u1", "exp": exp, "iat": iat}),
                SECRET,
            )
        };
        let at = |v: Value| {
            let t = token(v);
            let verifier = &verifier;
            async move { verifier.verify(&t).await.unwrap().issued_at }
        };
        assert_eq!(at(json!(1_700_000_000u64)).await, Some(1_700_000_000));
        assert_eq!(at(json!(1_700_000_000.75)).await, Some(1_700_000_000));
        assert_eq!(at(json!("1700000000")).await, None);
        assert_eq!(at(json!(-5)).await, None);
        let without = sign_hs(Algorithm::HS256, &json!({"sub": "u1", "exp": exp}), SECRET);
        assert_eq!(verifier.verify(&without).await.unwrap().issued_at, None);
    }

    #[tokio::test]
    async fn expiry_and_leeway() {
        let verifier = hmac_verifier(); // leeway 5 s
        let now = now_secs();
        let token = |exp: u64| sign_hs(Algorithm::HS256, &json!({"sub": "u1", "exp": exp}), SECRET);
        assert_eq!(
            verifier.verify(&token(now - 60)).await,
            Err(TokenError::Expired)
        );
        assert_eq!(
            verifier.verify(&token(now - 6 - 1)).await,
            Err(TokenError::Expired)
        );
        let within = verifier.verify(&token(now - 2)).await.unwrap();
        assert_eq!(within.expires_at, Some(now - 2));

        let strict = JwtVerifier::new(JwtSettings {
            hmac_secret: Some(test_secret()),
            leeway_secs: 0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            strict.verify(&token(now - 2)).await,
            Err(TokenError::Expired)
        );
    }

    /// Far-future `exp` values verify as valid with that expiry (the session
    /// clamps it, see `auth::DeviceIdentity::time_left`); one beyond `u64`
    /// is not an integer claim we can hold, and is refused.
    #[tokio::test]
    async fn enormous_expiry_verifies() {
        let verifier = hmac_verifier();
        for exp in [10_000_000_000_000_000_000, u64::MAX, i64::MAX as u64] {
            let token = sign_hs(Algorithm::HS256, &json!({"sub": "u1", "exp": exp}), SECRET);
            let verified = verifier.verify(&token).await.unwrap();
            assert_eq!(verified.expires_at, Some(exp));
        }
        let beyond = sign_hs(Algorithm::HS256, &json!({"sub": "u1", "exp": 1e20}), SECRET);
        assert!(verifier.verify(&beyond).await.is_err());
    }

    #[tokio::test]
    async fn not_before_is_checked() {
        let verifier = hmac_verifier();
        let now = now_secs();
        let token = |nbf: u64| {
            sign_hs(
                Algorithm::HS256,
                &json!({"sub": "u1", "exp": now + 600, "nbf": nbf}),
                SECRET,
            )
        };
        assert_eq!(
            verifier.verify(&token(now + 60)).await,
            Err(TokenError::NotYetValid)
        );
        assert!(
            verifier.verify(&token(now + 2)).await.is_ok(),
            "within leeway"
        );
        assert!(verifier.verify(&token(now - 10)).await.is_ok());
    }

    #[tokio::test]
    async fn issuer_and_audience_when_configured() {
        let verifier = JwtVerifier::new(JwtSettings {
            hmac_secret: Some(test_secret()),
            issuer: Some("https://auth.example".into()),
            audience: Some("broker".into()),
            ..Default::default()
        })
        .unwrap();
        let exp = now_secs() + 60;
        let token = |claims: Value| sign_hs(Algorithm::HS256, &claims, SECRET);
        let iss = "https://auth.example";
        let ok = [
            json!({"sub": "u1", "exp": exp, "iss": iss, "aud": "broker"}),
            json!({"sub": "u1", "exp": exp, "iss": iss, "aud": ["other", "broker"]}),
            json!({"sub": "u1", "exp": exp, "iss": iss, "aud": ["broker"]}),
        ];
        for claims in ok {
            assert!(
                verifier.verify(&token(claims.clone())).await.is_ok(),
                "{claims}"
            );
        }
        let refused = [
            (
                json!({"sub": "u1", "exp": exp, "iss": "evil", "aud": "broker"}),
                TokenError::WrongIssuer,
            ),
            (
                json!({"sub": "u1", "exp": exp, "aud": "broker"}),
                TokenError::WrongIssuer,
            ),
            (
                json!({"sub": "u1", "exp": exp, "iss": iss, "aud": "other"}),
                TokenError::WrongAudience,
            ),
            (
                json!({"sub": "u1", "exp": exp, "iss": iss, "aud": ["a", "b"]}),
                TokenError::WrongAudience,
            ),
            (
                json!({"sub": "u1", "exp": exp, "iss": iss}),
                TokenError::WrongAudience,
            ),
        ];
        for (claims, want) in refused {
            assert_eq!(
                verifier.verify(&token(claims.clone())).await,
                Err(want),
                "{claims}"
            );
        }

        // Unconfigured, iss and aud are not checked.
        let lax = hmac_verifier();
        let claims = json!({"sub": "u1", "exp": exp, "iss": "anyone", "aud": ["x"]});
        assert!(lax.verify(&token(claims)).await.is_ok());
    }

    #[tokio::test]
    async fn missing_exp() {
        let token = sign_hs(Algorithm::HS256, &json!({"sub": "u1"}), SECRET);
        assert_eq!(
            hmac_verifier().verify(&token).await,
            Err(TokenError::MissingExpiry)
        );
        let lenient = JwtVerifier::new(JwtSettings {
            hmac_secret: Some(test_secret()),
            require_exp: false,
            ..Default::default()
        })
        .unwrap();
        let verified = lenient.verify(&token).await.unwrap();
        assert_eq!(verified.expires_at, None);
        // Not an integer: never silently unchecked.
        let float = sign_hs(Algorithm::HS256, &json!({"sub": "u1", "exp": 1.5}), SECRET);
        assert!(lenient.verify(&float).await.is_err());
        assert!(hmac_verifier().verify(&float).await.is_err());
    }

    #[tokio::test]
    async fn bad_signatures() {
        let verifier = hmac_verifier();
        let claims = DeviceClaims::new("u1", 60);
        let other = claims.sign_hs256(b"another secret").unwrap();
        assert_eq!(verifier.verify(&other).await, Err(TokenError::BadSignature));

        // A payload swapped under a valid signature.
        let good = claims.sign_hs256(SECRET).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let forged_payload = b64(&json!({"sub": "admin", "exp": now_secs() + 60}));
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            verifier.verify(&forged).await,
            Err(TokenError::BadSignature)
        );
        // A flipped signature character.
        let mut sig = parts[2].to_owned();
        let last = if sig.ends_with('A') { "B" } else { "A" };
        sig.replace_range(sig.len() - 1.., last);
        let flipped = format!("{}.{}.{}", parts[0], parts[1], sig);
        assert!(verifier.verify(&flipped).await.is_err());
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let verifier = hmac_verifier();
        let random: String = (0..200).map(|_| rand::random::<u8>() as char).collect();
        let header = b64(&json!({"alg": "HS256"}));
        for token in [
            "",
            "abc",
            "a.b.c",
            "...",
            "a.b.c.d",
            random.as_str(),
            &format!("{header}.!!!.abc"),
            &format!("{header}.{}.abc", URL_SAFE_NO_PAD.encode(b"not json")),
            &format!("{}.e30.abc", URL_SAFE_NO_PAD.encode(b"[1,2]")),
        ] {
            let result = verifier.verify(token).await;
            assert!(
                matches!(
                    result,
                    Err(TokenError::Malformed | TokenError::BadSignature)
                ),
                "{token:?}: {result:?}"
            );
        }
        for token in ["", "abc", "a.b.c"] {
            assert_eq!(verifier.verify(token).await, Err(TokenError::Malformed));
        }
    }

    #[tokio::test]
    async fn subject_must_be_a_uid() {
        let verifier = hmac_verifier();
        let exp = now_secs() + 60;
        let cases = [
            (
                json!({"sub": "12_3", "exp": exp}),
                UidError::BadCharacter('_'),
            ),
            (
                json!({"sub": "a/b", "exp": exp}),
                UidError::BadCharacter('/'),
            ),
            (
                json!({"sub": "a#", "exp": exp}),
                UidError::BadCharacter('#'),
            ),
            (
                json!({"sub": "a+", "exp": exp}),
                UidError::BadCharacter('+'),
            ),
            (
                json!({"sub": "a\u{0}b", "exp": exp}),
                UidError::BadCharacter('\0'),
            ),
            (json!({"sub": "", "exp": exp}), UidError::Empty),
            (
                json!({"sub": "x".repeat(65), "exp": exp}),
                UidError::TooLong,
            ),
            (json!({"exp": exp}), UidError::Empty),
            (json!({"sub": 12345, "exp": exp}), UidError::Empty),
        ];
        for (claims, want) in cases {
            let token = sign_hs(Algorithm::HS256, &claims, SECRET);
            assert_eq!(
                verifier.verify(&token).await,
                Err(TokenError::BadSubject(want)),
                "{claims}"
            );
        }
    }

    #[test]
    fn configuration_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            JwtVerifier::new(JwtSettings::default()),
            Err(JwtConfigError::NoKeySource)
        ));
        assert!(matches!(
            JwtVerifier::new(JwtSettings {
                hmac_secret: Some(Secret::default()),
                ..Default::default()
            }),
            Err(JwtConfigError::EmptySecret)
        ));

        let missing = dir.path().join("missing.pem");
        let err = JwtVerifier::new(JwtSettings {
            public_key_files: vec![missing.clone()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, JwtConfigError::ReadKeyFile { .. }));
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let garbage = write(&dir, "garbage.pem", "hello");
        let err = JwtVerifier::new(JwtSettings {
            public_key_files: vec![garbage],
            ..Default::default()
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("garbage.pem") && text.contains("PUBLIC KEY"),
            "{text}"
        );

        let (ec_private, _) = rcgen_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
        let private = write(&dir, "private.pem", &ec_private);
        let err = JwtVerifier::new(JwtSettings {
            public_key_files: vec![private],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, JwtConfigError::PrivateKeyFile { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("private.pem"));

        let private = write(&dir, "rsa-private.pem", &rsa_pems().0);
        let err = JwtVerifier::new(JwtSettings {
            public_key_files: vec![private],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, JwtConfigError::PrivateKeyFile { .. }),
            "{err}"
        );

        let bad_url = JwtVerifier::new(JwtSettings {
            jwks_url: Some("not a url".into()),
            ..Default::default()
        });
        assert!(matches!(
            bad_url,
            Err(JwtConfigError::Jwks(JwksError::BadUrl))
        ));
    }

    #[test]
    fn reasons_never_carry_token_content() {
        let e = TokenError::BadSubject(UidError::BadCharacter('_'));
        assert!(!e.reason().contains('_'));
        let verifier = hmac_verifier();
        let text = format!("{verifier:?}");
        assert!(!text.contains("secret"), "{text}");
        let settings = JwtSettings {
            hmac_secret: Some(test_secret()),
            ..Default::default()
        };
        assert!(!format!("{settings:?}").contains("long-shared"));
    }

    #[test]
    fn verifier_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<JwtVerifier>();
    }
}
