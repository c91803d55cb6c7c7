//! Owns the `sync` handler (SMSWithoutBorders synchronization): a device
//! sends its RSA public key; the handler makes a fresh AES-256 key, stores it
//! as the user's only key, and replies on `<uid>_sync` with the key encrypted
//! to the device (RSA-OAEP-SHA256), the key id, the server's public key, an
//! RSA-PSS-SHA256 signature over the encrypted key, and the configured
//! platforms and gateways. Pairing a phone ([`crate::pairing`]) gives the
//! phone the same result through [`issue_key`].

use crate::Shared;
use envelope::{self, AesKey, ServerKey};
use protocol::UserId;
use rand::RngCore;
use sdk::{Command, HandlerError, Reply, Worker};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use store::KeyRecord;

/// The `sync` command.
#[derive(Debug, Deserialize)]
pub struct SyncIn {
    /// RSA 2048-4096 bit public key: base64 SPKI DER, or PEM.
    pub public_key: String,
}

/// The worker serving `sync`, and pairing (`sync_session`,
/// `sync_session_confirm`: see [`crate::pairing`]).
pub fn worker(shared: Arc<Shared>, server_key: ServerKey) -> Worker {
    let server_key = Arc::new(server_key);
    let worker = Worker::new("sync").on("sync", {
        let (shared, server_key) = (Arc::clone(&shared), Arc::clone(&server_key));
        move |cmd: Command<SyncIn>| {
            let (shared, server_key) = (Arc::clone(&shared), Arc::clone(&server_key));
            async move { handle(&shared, &server_key, cmd).await }
        }
    });
    crate::pairing::serve(worker, shared, server_key)
}

/// A new random key id: 16 bytes as hex.
fn new_key_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Handles one `sync` command.
pub async fn handle(
    shared: &Shared,
    server_key: &ServerKey,
    cmd: Command<SyncIn>,
) -> Result<Reply, HandlerError> {
    let body = issue_key(
        shared,
        server_key,
        &cmd.user_id,
        cmd.token_iat,
        cmd.body.public_key,
    )
    .await?;
    Ok(Reply::json("sync", body))
}

/// What `sync` does for `uid`, whose session's token was issued at
/// `token_iat` (`None`: not a device's): a fresh AES-256 key, encrypted to
/// `public_key` and signed, stored as the user's only key (unless the
/// revocation refuses that token, checked with the write), and the reply
/// body. Pairing (`sync_session_confirm`) gives the paired phone the same.
pub async fn issue_key(
    shared: &Shared,
    server_key: &ServerKey,
    uid: &UserId,
    token_iat: Option<u64>,
    public_key: String,
) -> Result<serde_json::Value, HandlerError> {
    let key = AesKey::generate();
    let signer = server_key.clone();
    let secret = key.clone();
    // RSA work is CPU-bound: keep it off the async workers.
    let (encrypted, signature) = tokio::task::spawn_blocking(move || {
        let device_key = envelope::parse_public_key(&public_key)?;
        let encrypted = envelope::oaep_encrypt(&device_key, &secret.0)?;
        let signature = signer.sign(&encrypted)?;
        Ok::<_, envelope::EnvelopeError>((encrypted, signature))
    })
    .await
    .map_err(|_| HandlerError::internal("internal error"))??;

    let now = time::OffsetDateTime::now_utc();
    let record = KeyRecord {
        key_id: new_key_id(),
        key,
        issued_at: u64::try_from(now.unix_timestamp()).unwrap_or(0),
    };
    // Written only while the sender's token is not revoked, checked with
    // the write (see `tokens::store_token`).
    let stored = match token_iat {
        Some(iat) => {
            shared
                .store
                .put_key_unless_revoked(uid, &record, iat)
                .await?
        }
        None => {
            shared.store.put_key(uid, &record).await?;
            true
        }
    };
    if !stored {
        tracing::info!(%uid, "key not issued: the token was revoked meanwhile");
        return Err(HandlerError::new(401, "token revoked"));
    }
    tracing::info!(%uid, key_id = %record.key_id, "issued a new shared key");
    let issued_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| HandlerError::internal("internal error"))?;
    let platforms: Vec<&str> = shared
        .settings
        .platforms
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    Ok(json!({
        "status": 200,
        "key_id": record.key_id,
        "encrypted_key": envelope::b64_encode(&encrypted),
        "server_public_key": server_key.public_b64(),
        "signature": envelope::b64_encode(&signature),
        "platforms": platforms,
        "gateways": shared.settings.gateways,
        "issued_at": issued_at,
    }))
}
