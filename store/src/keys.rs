//! Owns the user's sync key and the publish replay nonces: the [`Keys`]
//! domain (sync writes the key, publish reads it and remembers nonces).

use crate::{StoreError, StoreFuture};
use envelope::AesKey;
use protocol::uid::UserId;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The shared AES key of a user, as `sync` issued it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Identifies this key; `publish` refuses any other id.
    pub key_id: String,
    /// The AES-256 key.
    pub key: AesKey,
    /// When it was issued, seconds since the Unix epoch.
    pub issued_at: u64,
}

/// The stored form of a [`KeyRecord`] (JSON, key in base64).
#[derive(Serialize, Deserialize)]
struct KeyRecordWire {
    key_id: String,
    key: String,
    issued_at: u64,
}

impl KeyRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let wire = KeyRecordWire {
            key_id: self.key_id.clone(),
            key: envelope::b64_encode(&self.key.0),
            issued_at: self.issued_at,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let wire: KeyRecordWire =
            serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = envelope::b64_decode(&wire.key)
            .ok()
            .and_then(|b| AesKey::from_slice(&b).ok())
            .ok_or_else(|| StoreError::Corrupt("key record holds no 32-byte key".into()))?;
        Ok(KeyRecord {
            key_id: wire.key_id,
            key,
            issued_at: wire.issued_at,
        })
    }
}

/// The user's sync key and the replay nonces of publish.
pub trait Keys: Send + Sync + 'static {
    /// Makes `record` the user's only key (the newest replaces every older one).
    fn put_key<'a>(&'a self, uid: &'a UserId, record: &'a KeyRecord) -> StoreFuture<'a, ()>;

    /// As [`Keys::put_key`], unless the user's revocation refuses a token
    /// issued at `iat` (the sending session's token), checked in the same
    /// atomic step as the write (a Lua script; one redb write transaction):
    /// a command that passed its revocation check just before an account
    /// deletion recorded its revocation cannot write just after it.
    /// `Ok(false)`: refused, nothing written.
    fn put_key_unless_revoked<'a>(
        &'a self,
        uid: &'a UserId,
        record: &'a KeyRecord,
        iat: u64,
    ) -> StoreFuture<'a, bool>;

    /// The user's current key, if they ever synced.
    fn get_key<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<KeyRecord>>;

    /// Records that `nonce` was used with key `key_id` by `uid`, for `ttl`.
    /// Returns `true` the first time and `false` for a replay.
    fn remember_nonce<'a>(&'a self, used: NonceUse<'a>) -> StoreFuture<'a, bool>;
}

/// One use of a nonce: by `uid`, with key `key_id`, remembered for `ttl`.
#[derive(Debug, Clone, Copy)]
pub struct NonceUse<'a> {
    pub uid: &'a UserId,
    pub key_id: &'a str,
    pub nonce: &'a [u8],
    pub ttl: Duration,
}

impl<'a> NonceUse<'a> {
    pub fn new(uid: &'a UserId, key_id: &'a str, nonce: &'a [u8], ttl: Duration) -> Self {
        NonceUse {
            uid,
            key_id,
            nonce,
            ttl,
        }
    }
}
