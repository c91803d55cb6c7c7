//! The built-in handlers, as a library the broker runs in-process
//! (`BROKER_HANDLERS=all`) and as the binaries `sync-handler`,
//! `publish-handler`, `contacts-handler` and `tokens-handler`. Each is a
//! [`shared::sdk::Worker`] over one shared state ([`Shared`]: settings,
//! store, HTTP client, platform-token master keys).
//!
//! - [`settings`]: the environment (`BROKER_URL`, `BROKER_CA`, `HANDLER_KEY`,
//!   `REDIS_URL`, `DATA_DIR`, `PLATFORMS`, `GATEWAYS`, `TOKENS_MASTER_KEY`),
//!   checked at start.
//! - [`sync`]: RSA public key in, fresh AES-256 key stored, signed reply.
//! - [`publish`]: AES-GCM envelope opened, replay refused, message POSTed
//!   to the platform with the user's stored platform token.
//! - [`contacts`]: request, accept and list contacts.
//! - [`tokens`]: store, list and revoke platform tokens (sealed under the
//!   master key), master-key rotation, and `delete_account`.
//!
//! The path of a command: device → broker (stamps `user_id`) →
//! `$share/<handler>/<topic>` → the SDK's poll loop → a task running the
//! handler fn → store / HTTP → `Reply` → `<uid>_<name>` → device.
//!
//! In-process use: [`Settings::from_env`], override the broker fields, then
//! [`spawn_builtin`] (or [`spawn_builtin_with_store`] to share one store
//! with the broker).

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable
    )
)]

pub mod contacts;
pub mod publish;
pub mod settings;
pub mod sync;
pub mod tokens;

pub use settings::{ConfigError, Platform, Settings, TokenUse};

use shared::envelope::{EnvelopeError, ServerKey};
use shared::sdk::{SdkConfig, SdkError, Worker};
use shared::store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why the handlers could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("server RSA key: {0}")]
    ServerKey(#[from] EnvelopeError),
    #[error(transparent)]
    Sdk(#[from] SdkError),
    #[error("HTTP client: {0}")]
    Http(String),
    #[error("platform tokens: {0}")]
    Tokens(#[from] tokens::SealError),
}

/// State shared by every handler of a process.
pub struct Shared {
    /// The configuration.
    pub settings: Settings,
    /// Where keys, nonces and contacts live.
    pub store: Arc<dyn Store>,
    /// The client `publish` forwards with (no redirects, connect timeout).
    pub http: reqwest::Client,
    /// Seal and open platform tokens.
    pub tokens: tokens::MasterKeys,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("store", &self.store.kind())
            .finish()
    }
}

impl Shared {
    /// Builds the shared state over an already opened store.
    pub fn new(settings: Settings, store: Arc<dyn Store>) -> Result<Arc<Self>, Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.publish_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("mqtt-handlers/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        let tokens = master_keys(&settings)?;
        Ok(Arc::new(Shared {
            settings,
            store,
            http,
            tokens,
        }))
    }

    /// Opens the configured store (Redis if `REDIS_URL`, else the embedded
    /// store in `DATA_DIR`) and builds the shared state.
    pub fn open(settings: Settings) -> Result<Arc<Self>, Error> {
        let store = open_store(&settings)?;
        Self::new(settings, store)
    }
}

/// Opens the store the settings name (without waiting for Redis).
pub fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, Error> {
    Ok(shared::store::open_blocking(
        settings.redis_url.as_deref(),
        &settings.data_dir,
    )?)
}

/// The platform-token master keys the settings name: `TOKENS_MASTER_KEY`
/// (and `TOKENS_MASTER_KEY_PREVIOUS`), or the development key in
/// `DATA_DIR/tokens_master_key`, made on first use.
pub fn master_keys(settings: &Settings) -> Result<tokens::MasterKeys, Error> {
    let current = match &settings.tokens_master_key {
        Some(key) => key.clone(),
        None => tokens::MasterKey::load_or_generate(
            &settings.data_dir.join(tokens::DEV_MASTER_KEY_FILE),
        )?,
    };
    Ok(tokens::MasterKeys {
        current,
        previous: settings.tokens_master_key_previous.clone(),
    })
}

/// Loads the server's RSA key from `DATA_DIR/server_key.pem`, generating it
/// on first start.
pub fn load_server_key(settings: &Settings) -> Result<ServerKey, Error> {
    Ok(ServerKey::load_or_generate(&settings.server_key_path())?)
}

/// One of the built-in handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sync,
    Publish,
    Contacts,
    Tokens,
}

/// The worker of one built-in handler.
pub fn worker(
    kind: Kind,
    shared: Arc<Shared>,
    server_key: Option<&ServerKey>,
) -> Result<Worker, Error> {
    // Every built-in command is checked against its sender's revocation
    // before it runs: nothing a revoked session sends is acted on.
    let store = Arc::clone(&shared.store);
    let worker = match kind {
        Kind::Sync => {
            let key = match server_key {
                Some(key) => key.clone(),
                None => load_server_key(&shared.settings)?,
            };
            sync::worker(shared, key)
        }
        Kind::Publish => publish::worker(shared),
        Kind::Contacts => contacts::worker(shared),
        Kind::Tokens => tokens::worker(shared),
    };
    Ok(worker.checking_revocations(store))
}

/// Runs one built-in handler until `shutdown` (what the binaries do).
pub async fn run(kind: Kind, settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    let sdk = settings.sdk_config()?;
    let shared = Shared::open(settings)?;
    tracing::info!(handler = ?kind, store = shared.store.kind(), "starting");
    worker(kind, shared, None)?.run(sdk, shutdown).await?;
    Ok(())
}

/// The whole `main` of a handler binary: reads the environment, runs `kind`
/// until SIGINT/SIGTERM, and turns a configuration error into a one-line
/// message on stderr and exit code 2 (other failures: 1).
pub async fn main_for(kind: Kind) -> std::process::ExitCode {
    init_tracing();
    let name = match kind {
        Kind::Sync => "sync-handler",
        Kind::Publish => "publish-handler",
        Kind::Contacts => "contacts-handler",
        Kind::Tokens => "tokens-handler",
    };
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(kind, settings, shared::sdk::shutdown_on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e @ (Error::Config(_) | Error::Sdk(SdkError::Config(_)))) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Opens the store once and runs `sync`, `publish`, `contacts` and `tokens`
/// in this process until `shutdown`; the handle ends when all have drained.
/// Must be called inside a Tokio runtime. Configuration errors (including a
/// missing `HANDLER_KEY`), an unusable store or server key are returned here.
pub fn spawn_builtin(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, Error> {
    settings.sdk_config()?;
    let store = open_store(&settings)?;
    spawn_builtin_with_store(settings, store, shutdown)
}

/// Like [`spawn_builtin`] over a store the caller opened (so the broker can
/// share it, e.g. for revocation checks; the embedded store can be opened
/// only once per process).
pub fn spawn_builtin_with_store(
    settings: Settings,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, Error> {
    let sdk = settings.sdk_config()?;
    let server_key = load_server_key(&settings)?;
    let shared = Shared::new(settings, store)?;
    tracing::info!(
        store = shared.store.kind(),
        "starting the built-in handlers"
    );
    let workers = [Kind::Sync, Kind::Publish, Kind::Contacts, Kind::Tokens]
        .into_iter()
        .map(|kind| Ok((kind, worker(kind, Arc::clone(&shared), Some(&server_key))?)))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(tokio::spawn(run_workers(workers, sdk, shutdown)))
}

async fn run_workers(workers: Vec<(Kind, Worker)>, sdk: SdkConfig, shutdown: CancellationToken) {
    let tasks = workers.into_iter().map(|(kind, worker)| {
        let (sdk, shutdown) = (sdk.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = worker.run(sdk, shutdown).await {
                tracing::error!(handler = ?kind, %error, "handler stopped");
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        let _ = task.await;
    }
}

/// `tokens-handler rotate-master-key`: re-seals every stored platform token
/// under `TOKENS_MASTER_KEY`, opening old ones with
/// `TOKENS_MASTER_KEY_PREVIOUS`, prints a summary, and exits 0 only when
/// every token is under the new key. With the embedded store, stop the
/// process that holds `DATA_DIR` first (one process may open it).
pub async fn rotate_master_key_main() -> std::process::ExitCode {
    init_tracing();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("tokens-handler rotate-master-key: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if settings.tokens_master_key.is_none() {
        eprintln!("tokens-handler rotate-master-key: set TOKENS_MASTER_KEY to the new key and TOKENS_MASTER_KEY_PREVIOUS to the old one");
        return std::process::ExitCode::from(2);
    }
    let outcome = async {
        let keys = master_keys(&settings)?;
        let store = shared::store::open(settings.redis_url.as_deref(), &settings.data_dir).await?;
        Ok::<_, Error>(tokens::rotate_master_key(store.as_ref(), &keys).await?)
    }
    .await;
    match outcome {
        Ok(report) => {
            println!(
                "re-sealed {} platform tokens; {} were under the new key already; {} changed meanwhile (left as the user set them); {} unreadable",
                report.resealed, report.current, report.changed_meanwhile, report.unreadable
            );
            if report.unreadable == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("tokens-handler rotate-master-key: {} tokens open under neither key: is TOKENS_MASTER_KEY_PREVIOUS the old key?", report.unreadable);
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tokens-handler rotate-master-key: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`). For the binaries.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
