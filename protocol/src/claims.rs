//! Owns the JWT claims a device token carries, and minting tokens for the
//! parties that need to make them: the development run, the load generator
//! and tests. Verification lives in the broker (`broker::auth`).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Claims of a device token. `sub` is the user id; time claims are seconds
/// since the Unix epoch. Unknown claims are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceClaims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("signing key: {0}")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("signing: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl DeviceClaims {
    /// Claims for `sub`, issued now and valid for `ttl_secs`.
    pub fn new(sub: impl Into<String>, ttl_secs: u64) -> Self {
        let now = now_secs();
        DeviceClaims {
            sub: sub.into(),
            exp: Some(now + ttl_secs),
            iat: Some(now),
            ..Default::default()
        }
    }

    /// Signs these claims with an HMAC secret (the raw bytes of the text).
    pub fn sign_hs256(&self, secret: &[u8]) -> Result<String, MintError> {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            self,
            &EncodingKey::from_secret(secret),
        )
        .map_err(MintError::Sign)
    }

    /// Signs these claims with a PEM private key for an RSA, EC or Ed25519
    /// algorithm, with an optional `kid` header.
    pub fn sign_pem(
        &self,
        alg: Algorithm,
        private_key_pem: &[u8],
        kid: Option<&str>,
    ) -> Result<String, MintError> {
        let key = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => EncodingKey::from_rsa_pem(private_key_pem),
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(private_key_pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private_key_pem),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                Ok(EncodingKey::from_secret(private_key_pem))
            }
        }
        .map_err(MintError::Key)?;
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, self, &key).map_err(MintError::Sign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_round_trip() {
        let claims = DeviceClaims::new("423144", 60);
        let token = claims.sign_hs256(b"secret").unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.required_spec_claims = ["exp".to_owned()].into();
        let data = jsonwebtoken::decode::<DeviceClaims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"secret"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims, claims);
    }
}
