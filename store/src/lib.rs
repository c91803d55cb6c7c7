//! Owns the handlers' and the identity service's state: the user's current
//! AES key, replay nonces, contact requests and contacts, registrations,
//! sealed platform tokens, and user revocations (with a live stream of
//! revocation events for the broker), behind one small async trait per
//! domain, each with two implementations:
//!
//! - [`Keys`] (sync keys, replay nonces), [`Contacts`], [`Revocations`]
//!   (records, restore, the live feed), [`Registrations`],
//!   [`PlatformTokens`], and [`Accounts`] (deleting a user across domains);
//!   and the identity service's short-lived [`SignUps`] (sessions, codes,
//!   rate counters: Redis, or [`MemorySignUps`] without it);
//!   [`Store`] bundles them for composition (what [`open`] returns), and a
//!   component takes only the domains it uses (`Arc<dyn Revocations>`).
//!
//! The backends:
//!
//! - [`RedisStore`]: Redis (one server, or a Redis Cluster when `REDIS_URL`
//!   lists several nodes: [`RedisTarget`]) through one reconnecting
//!   connection ([`RedisConn`]), shared by handler processes and broker
//!   nodes. An outage turns into
//!   [`StoreError::Unavailable`] (handlers answer 503) and service resumes by
//!   itself when Redis is back.
//! - [`EmbeddedStore`]: a redb file under `DATA_DIR` for the single-process
//!   default; it survives a restart. One process at a time may open it.
//!
//! The key schema of both is in `SCHEMA.md` beside this file.
//!
//! The traits return boxed futures so that a component can hold an
//! `Arc<dyn Revocations>` (or any domain) and not care which backend it was given.

mod accounts;
mod args;
mod contacts;
mod embedded;
mod keys;
mod redis_conn;
mod redis_store;
mod registrations;
mod revocations;
mod sign_ups;
mod tokens;

pub use accounts::Accounts;
pub use args::{StoreArgs, DEFAULT_DATA_DIR};
pub use contacts::Contacts;
pub use embedded::EmbeddedStore;
pub use keys::{KeyRecord, Keys, NonceUse};
pub use redis_conn::{RedisConn, RedisConnection, RedisTarget, RedisUrlError, REDIS_URL_FORMS};
pub use redis_store::{RedisStore, KEY_PREFIX};
pub use registrations::Registrations;
pub use revocations::{Revocation, RevocationEvent, Revocations, REVOCATION_EVENTS_CAPACITY};
pub use sign_ups::{open_sign_ups, MemorySignUps, SignUpSession, SignUps, SIGN_UP_KEY_PREFIX};
pub use tokens::{
    valid_platform_name, PlatformTokens, SealedToken, StoredToken, TokenPage, MAX_PLATFORM_LEN,
};

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

/// File name of the embedded store inside `DATA_DIR`.
pub const EMBEDDED_FILE: &str = "store.redb";

/// A boxed future returned by [`Store`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing service cannot be reached or did not answer in time;
    /// retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded database failed.
    #[error("embedded store: {0}")]
    Embedded(String),
    /// A stored record could not be decoded.
    #[error("corrupt stored record: {0}")]
    Corrupt(String),
    /// The store could not be opened with the given configuration.
    #[error("store configuration: {0}")]
    Config(String),
    /// The caller passed an argument the store cannot hold (a bad platform name).
    #[error("invalid store argument: {0}")]
    Invalid(String),
    /// The in-memory sign-up state holds as many entries as it may
    /// ([`MemorySignUps`]); the identity service answers 429.
    #[error("too many registrations in progress; try again later")]
    Full,
}

/// The whole store, every domain behind one object (what [`open`] returns):
/// a component that needs only some domains takes those (`Arc<dyn
/// Revocations>`, ...), to which an `Arc<dyn Store>` converts.
///
/// Every method is atomic on its own; none holds a lock across calls.
pub trait Store: Keys + Contacts + Revocations + Registrations + PlatformTokens + Accounts {
    /// Checks that the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// A short name for logs: `redis` or `embedded`.
    fn kind(&self) -> &'static str;
}

/// Opens the configured store: Redis when `redis_url` is given, otherwise the
/// embedded store in `data_dir/store.redb` (the directory is created).
pub async fn open(redis_url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match redis_url {
        Some(url) => Ok(Arc::new(RedisStore::connect(url).await?)),
        None => Ok(Arc::new(
            EmbeddedStore::open(&data_dir.join(EMBEDDED_FILE)).await?,
        )),
    }
}

/// Like [`open`], on the calling thread and without contacting Redis (it is
/// connected on first use): for start-up code that is not async.
pub fn open_blocking(
    redis_url: Option<&str>,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, StoreError> {
    match redis_url {
        Some(url) => Ok(Arc::new(RedisStore::new(url)?)),
        None => Ok(Arc::new(EmbeddedStore::open_blocking(
            &data_dir.join(EMBEDDED_FILE),
        )?)),
    }
}

#[cfg(test)]
pub(crate) mod conformance;
