//! The `idp` binary: the identity service on its own (`idp`, or `idp serve`),
//! and key rotation (`idp rotate-keys`) for the keys directory a running
//! service re-reads every few seconds.

use anyhow::Context;
use clap::{Parser, Subcommand};
use idp::config::IdpArgs;
use setup::telemetry::LogArgs;
use std::process::ExitCode;
use std::sync::Arc;
use store::StoreArgs;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "idp",
    about = "Phone-number sign-up by SMS code, issuing device tokens for the broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    args: IdpArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Make a new signing key in IDP_KEYS_DIR and retire the active one; it
    /// stays published until every token it signed has expired.
    RotateKeys,
}

fn main() -> ExitCode {
    let cli: Cli = setup::config::parse_args("idp");
    if let Err(e) = setup::telemetry::init_tracing(&cli.log) {
        eprintln!("idp: configuration error: {e}");
        return ExitCode::from(2);
    }
    let settings = match cli.args.resolve(&cli.store) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("idp: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("idp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(settings, &cli.store)),
        Command::RotateKeys => rotate(&settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn rotate(settings: &idp::config::Settings) -> anyhow::Result<()> {
    let ring = idp::keys::KeyRing::open(
        &settings.keys_dir,
        settings.token_ttl,
        settings.key_retire_leeway,
    )
    .context("opening IDP_KEYS_DIR")?;
    let kid = ring
        .rotate(protocol::claims::now_secs())
        .context("rotating the signing key")?;
    println!(
        "new signing key {kid}; published keys: {}",
        ring.kids().join(", ")
    );
    println!(
        "a running idp picks it up within {} s",
        idp::KEY_RELOAD_INTERVAL.as_secs()
    );
    Ok(())
}

async fn serve(settings: idp::config::Settings, store: &StoreArgs) -> anyhow::Result<()> {
    // On its own, the service's connections and the reserve must fit.
    idp::descriptors::plan(
        idp::descriptors::raise_open_files_limit(),
        settings.connections.max_connections as u64,
        0,
    )
    .context("the identity service's file descriptors")?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (IDP_LISTEN): is another process using it?",
                settings.listen
            )
        })?;
    let store: Arc<dyn store::Store> = store
        .open()
        .await
        .context("opening the store (REDIS_URL, or the embedded store in DATA_DIR)")?;
    let service = idp::Idp::start(settings, store).await?;
    let addr = listener.local_addr()?;
    println!("identity service listening on http://{addr}");
    println!("  JWKS: http://{addr}/.well-known/jwks.json");
    if service.is_development() {
        println!(
            "  !!! DEVELOPMENT: SMS_PROVIDER_URL is unset: one-time codes are LOGGED, not sent !!!"
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    idp::serve(listener, service, shutdown).await?;
    Ok(())
}
