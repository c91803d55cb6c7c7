//! `sync-handler`: serves the `sync` handler's command topics through the broker
//! until SIGINT/SIGTERM, then finishes in-flight commands. Configuration is the
//! environment (see `handlers/README.md`); a bad value stops it at start with
//! a message saying how to fix it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handlers::init_tracing();
    let settings = handlers::Settings::from_env()?;
    let shutdown = shared::sdk::shutdown_on_signals();
    handlers::run(handlers::Kind::Sync, settings, shutdown).await?;
    Ok(())
}
