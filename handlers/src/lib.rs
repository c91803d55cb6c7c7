//! The built-in handlers, as a library the broker runs in-process
//! (`BROKER_HANDLERS=all`) and as the binaries `sync-handler`,
//! `publish-handler`, `contacts-handler` and `tokens-handler`. Each is a
//! [`sdk::Worker`] over one shared state ([`Shared`]: settings,
//! store, HTTP client, platform-token master keys).
//!
//! - [`settings`]: the handlers' variables ([`HandlerArgs`]: `PLATFORMS`,
//!   `GATEWAYS`, `TOKENS_MASTER_KEY`, ...) composed with the SDK's and the
//!   store's into [`Settings`], checked at start.
//! - [`sync`]: RSA public key in, fresh AES-256 key stored, signed reply.
//! - [`pairing`]: `sync_session` and `sync_session_confirm` on the sync
//!   worker: rotating one-time codes, the person's decision, and the paired
//!   phone's sync result (picked up by the identity service's `/sync/pair`).
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
//! In-process use: [`Settings::compose`] with the broker's own way in, then
//! [`spawn_builtin`] (or [`spawn_builtin_with_store`] to share one store
//! with the broker).

pub mod contacts;
pub mod pairing;
pub mod publish;
pub mod settings;
pub mod sync;
pub mod tokens;

pub use settings::{
    ConfigError, HandlerArgs, HandlerCli, PairingSettings, Platform, Settings, TokenUse,
};

use envelope::{EnvelopeError, ServerKey};
use sdk::{HandlerError, SdkConfig, SdkError, Worker};
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};
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
    /// Seal and open platform tokens; `None` when none is configured with
    /// Redis, where only the handlers that need none (`sync`, `contacts`)
    /// may run (see [`worker`]).
    master_keys: Option<tokens::MasterKeys>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("store", &self.store.kind())
            .field("master_keys", &self.master_keys)
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
        let master_keys = load_master_keys(&settings)?;
        Ok(Arc::new(Shared {
            settings,
            store,
            http,
            master_keys,
        }))
    }

    /// The platform-token master keys. [`worker`] builds `publish` and
    /// `tokens` only when there are some, so the 500 here is not reached.
    pub fn master_keys(&self) -> Result<&tokens::MasterKeys, HandlerError> {
        self.master_keys.as_ref().ok_or_else(|| {
            tracing::error!("no platform-token master key (TOKENS_MASTER_KEY)");
            HandlerError::internal("platform tokens are not configured")
        })
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
    Ok(settings.store_args().open_blocking()?)
}

/// The platform-token master keys the settings name: `TOKENS_MASTER_KEY`
/// (and `TOKENS_MASTER_KEY_PREVIOUS`), or with the embedded store the
/// development key in `DATA_DIR/tokens_master_key`, made on first use.
/// `None` with Redis and no key: processes sharing Redis must share one
/// key, so none is made up (see [`require_master_keys`]).
pub fn load_master_keys(settings: &Settings) -> Result<Option<tokens::MasterKeys>, Error> {
    let current = match (&settings.tokens_master_key, &settings.redis_url) {
        (Some(key), _) => key.clone(),
        (None, Some(_)) => return Ok(None),
        (None, None) => tokens::MasterKey::load_or_generate(
            &settings.data_dir.join(tokens::DEV_MASTER_KEY_FILE),
        )?,
    };
    Ok(Some(tokens::MasterKeys {
        current,
        previous: settings.tokens_master_key_previous.clone(),
    }))
}

/// Like [`load_master_keys`], for the handlers that seal or open platform
/// tokens: no key is refused with the fix.
pub fn require_master_keys(settings: &Settings) -> Result<tokens::MasterKeys, Error> {
    load_master_keys(settings)?.ok_or_else(|| {
        Error::Config(ConfigError::Invalid {
            var: "TOKENS_MASTER_KEY".into(),
            reason: "it is required with REDIS_URL by the publish and tokens handlers (every process sharing Redis must seal platform tokens under the same key): set it to 32 random bytes, e.g. TOKENS_MASTER_KEY=$(openssl rand -hex 32)".into(),
        })
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

impl Kind {
    /// Whether the handler seals or opens platform tokens (and so needs
    /// `TOKENS_MASTER_KEY` with Redis).
    pub fn needs_master_key(self) -> bool {
        matches!(self, Kind::Publish | Kind::Tokens)
    }

    /// The name of its binary.
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Sync => "sync-handler",
            Kind::Publish => "publish-handler",
            Kind::Contacts => "contacts-handler",
            Kind::Tokens => "tokens-handler",
        }
    }
}

/// The worker of one built-in handler.
pub fn worker(
    kind: Kind,
    shared: Arc<Shared>,
    server_key: Option<&ServerKey>,
) -> Result<Worker, Error> {
    if kind.needs_master_key() && shared.master_keys.is_none() {
        require_master_keys(&shared.settings)?;
    }
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

/// The whole `main` of a handler binary: parses its flags and environment
/// ([`HandlerCli`]; `tokens-handler` also takes `rotate-master-key`), runs
/// `kind` until SIGINT/SIGTERM, and turns a configuration error into a
/// one-line message on stderr and exit code 2 (other failures: 1).
pub async fn main_for(kind: Kind) -> std::process::ExitCode {
    use clap::FromArgMatches;
    let name = kind.binary();
    let mut command = setup::config::command::<HandlerCli>()
        .name(name)
        .about(format!(
            "The `{name}` built-in handler, served through the broker"
        ));
    if kind == Kind::Tokens {
        command = command.subcommand(clap::Command::new("rotate-master-key").about(
            "Re-seal every stored platform token under TOKENS_MASTER_KEY (old ones opened with TOKENS_MASTER_KEY_PREVIOUS), then exit",
        ));
    }
    let matches = command.get_matches();
    let cli = match HandlerCli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = setup::telemetry::init_tracing(&cli.log) {
        eprintln!("{name}: {e}");
        return std::process::ExitCode::from(2);
    }
    let rotate = matches.subcommand_name() == Some("rotate-master-key");
    let settings = match Settings::compose(cli.handler, cli.sdk, cli.store, |var| {
        std::env::var(var).ok()
    }) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if rotate {
        return rotate_master_key_main(settings).await;
    }
    match run(kind, settings, sdk::shutdown_on_signals()).await {
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
async fn rotate_master_key_main(settings: Settings) -> std::process::ExitCode {
    if settings.tokens_master_key.is_none() {
        eprintln!("tokens-handler rotate-master-key: set TOKENS_MASTER_KEY to the new key and TOKENS_MASTER_KEY_PREVIOUS to the old one");
        return std::process::ExitCode::from(2);
    }
    let outcome = async {
        let keys = require_master_keys(&settings)?;
        let store = settings.store_args().open().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// With Redis, a process asks for the master key only when it runs a
    /// handler that seals platform tokens; none is made up for the others.
    #[tokio::test]
    async fn with_redis_only_the_sealing_handlers_need_the_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().display().to_string();
        let settings = Settings::from_lookup(|var| match var {
            // Never contacted: building workers does not connect.
            "REDIS_URL" => Some("redis://127.0.0.1:1/0".into()),
            "DATA_DIR" => Some(data.clone()),
            "BROKER_URL" => Some("mqtt://127.0.0.1:1".into()),
            "HANDLER_KEY" => Some("handler-key-0123456789".into()),
            _ => None,
        })
        .unwrap();
        settings.sdk_config().unwrap();
        let shared = Shared::open(settings).unwrap();
        for kind in [Kind::Sync, Kind::Contacts] {
            assert!(worker(kind, Arc::clone(&shared), None).is_ok(), "{kind:?}");
        }
        for kind in [Kind::Publish, Kind::Tokens] {
            let err = worker(kind, Arc::clone(&shared), None)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("TOKENS_MASTER_KEY") && err.contains("openssl rand -hex 32"),
                "{kind:?}: {err}"
            );
        }
        assert!(!dir.path().join(tokens::DEV_MASTER_KEY_FILE).exists());
    }
}
