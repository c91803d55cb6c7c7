//! The `broker` binary: the one place where the broker library, the
//! built-in handlers and the identity service meet (the libraries point down
//! only: `broker` knows neither `handlers` nor `idp`). It reads every
//! component's configuration (each declared by its own crate, flattened
//! here), binds the listeners, starts the broker and (by default) the
//! built-in handlers in-process, prints what a newcomer needs (how to sign
//! up by hand with the in-process identity service included), and shuts
//! down gracefully on SIGTERM/SIGINT.

use anyhow::Context;
use broker::config::{BrokerArgs, DevDefaults, ListenPlan};
use broker::{Broker, Listeners, RunningBroker};
use clap::Parser;
use setup::telemetry::LogArgs;
use std::process::ExitCode;
use store::StoreArgs;
use tokio::net::TcpListener;

// glibc's allocator took about a fifth of the broker's CPU at 10,000 devices
// (`_int_malloc`, `malloc_consolidate` over fragmented bins: many short-lived
// per-message allocations beside many live per-connection buffers). jemalloc
// removes most of that at the same memory per connection; mimalloc did too
// but held ~1 KiB more per connection (bench/ab.sh, issue 16's note).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Everything `broker` reads: each component's own arguments, each
/// variable declared once in the crate that uses it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "broker",
    version,
    about = "MQTT broker with JWT-gated topic handlers"
)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten, next_help_heading = "Cross-node delivery (with REDIS_URL)")]
    cluster: cluster::ClusterArgs,
    #[command(flatten, next_help_heading = "Built-in handlers (BROKER_HANDLERS=all)")]
    handlers: handlers::HandlerArgs,
    #[command(flatten, next_help_heading = "Identity service (in-process)")]
    idp: idp::config::IdpArgs,
    #[command(flatten, next_help_heading = "Logging")]
    log: LogArgs,
}

/// What `main` hands the runtime: every component's configuration, checked.
struct Startup {
    config: broker::config::Config,
    plan: ListenPlan,
    dev: DevDefaults,
    store: StoreArgs,
    /// The in-process handlers' variables, when they run.
    handlers: Option<handlers::HandlerArgs>,
    /// `BROKER_NODE_ID`, for cross-node delivery (with REDIS_URL).
    node_id: Option<String>,
    cluster: cluster::ClusterArgs,
    idp: idp::config::Settings,
}

fn main() -> ExitCode {
    let cli: Cli = setup::config::parse_args("broker");
    if let Err(e) = setup::telemetry::init_tracing(&cli.log) {
        eprintln!("broker: configuration error: {e}");
        return ExitCode::from(2);
    }
    let worker_threads = cli.broker.worker_threads;
    if worker_threads == Some(0) {
        eprintln!("broker: configuration error: BROKER_WORKER_THREADS must be at least 1 (or unset for one per core less one)");
        return ExitCode::from(2);
    }
    let startup = match compose(cli) {
        Ok(startup) => startup,
        Err(e) => {
            eprintln!("broker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // The router is a task on this runtime. One core is left to the kernel's
    // network work and the in-process handlers' blocking pool: on two cores,
    // one worker costs the least CPU per message (no cross-thread wake-ups),
    // while two give lower latency near saturation (bench/RESULTS.md). One
    // worker is a current-thread runtime: the multi-thread scheduler's
    // parking and stealing bookkeeping cost 10-20% more CPU per message for
    // nothing to steal from (bench/notes.md).
    let workers = worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1)
    });
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(startup)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Checks every component's configuration before anything starts. Each
/// component is asked only for what it uses: the handlers' variables are
/// read only when they run in-process (`BROKER_HANDLERS=all`), so the broker
/// alone needs no `TOKENS_MASTER_KEY`.
fn compose(cli: Cli) -> anyhow::Result<Startup> {
    let node_id = cli.broker.node_id.clone();
    let (config, plan, dev) = cli.broker.resolve()?;
    let handlers = plan.builtin_handlers.then_some(cli.handlers);
    let idp = cli
        .idp
        .resolve(&cli.store)
        .context("identity service configuration (IDP_*)")?;
    Ok(Startup {
        config,
        plan,
        dev,
        store: cli.store,
        handlers,
        node_id,
        cluster: cli.cluster,
        idp,
    })
}

/// The error and its causes on one line, without repeating a cause that the
/// message above it already quotes.
fn describe(error: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !previous.contains(&message) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&message);
        }
        previous = message;
    }
    out
}

async fn bind(addr: std::net::SocketAddr, variable: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({variable}): is another process using it? choose another address"))
}

async fn run(startup: Startup) -> anyhow::Result<()> {
    let Startup {
        config,
        plan,
        dev,
        store: store_args,
        handlers: handler_args,
        node_id,
        cluster: cluster_args,
        idp: idp_settings,
    } = startup;
    let acceptor = broker::tls::acceptor_from_files(&plan.tls_cert, &plan.tls_key)
        .context("TLS certificate (BROKER_TLS_CERT / BROKER_TLS_KEY)")?;
    let mut listeners = Listeners {
        tls: Some((
            bind(plan.tls_listen, "BROKER_TLS_LISTEN").await?,
            acceptor.clone(),
        )),
        ..Default::default()
    };
    if let Some(addr) = plan.tcp_listen {
        listeners.tcp.push(bind(addr, "BROKER_TCP_LISTEN").await?);
    }
    // MQTT over WebSocket: WSS with the TLS listener's certificate.
    if let Some(addr) = plan.wss_listen {
        listeners.wss = Some((bind(addr, "BROKER_WSS_LISTEN").await?, acceptor));
    }
    if let Some(addr) = plan.ws_listen {
        listeners.ws = Some(bind(addr, "BROKER_WS_LISTEN").await?);
    }
    // The sign-up page's broker URL, unless IDP_WEB_MQTT_URL gives one: this
    // broker's own WebSocket listener, when it is on loopback.
    let mut idp_settings = idp_settings;
    if idp_settings.web_mqtt_url.is_none() {
        let ws = listeners.ws.as_ref().and_then(|l| l.local_addr().ok());
        let wss = listeners
            .wss
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok());
        idp_settings.web_mqtt_url = idp::web::local_mqtt_url(ws, wss);
        if idp_settings.web_mqtt_url.is_none() && (ws.is_some() || wss.is_some()) {
            tracing::warn!(
                "the sign-up page (/app/) has no broker URL: the WebSocket listener is not on loopback, so set IDP_WEB_MQTT_URL to the name browsers reach it by (e.g. wss://mqtt.example.com:8084/mqtt)"
            );
        }
    }
    // In-process handlers reach the gate over a loopback listener of their own.
    let internal_addr = if plan.builtin_handlers {
        let internal = bind(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            "internal handler listener",
        )
        .await?;
        let addr = internal.local_addr()?;
        listeners.internal = Some(internal);
        Some(addr)
    } else {
        None
    };
    if let Some(addr) = plan.metrics_listen {
        listeners.metrics = Some(bind(addr, "METRICS_LISTEN").await?);
    }
    let handler_key = config.handler_keys.first().cloned();
    let jwt_secret = config.jwt.hmac_secret.clone();

    // One store for the in-process handlers and the broker's revocation checks
    // (the embedded store can be opened once per process). With the handlers
    // elsewhere, the broker checks revocations only when Redis is configured.
    let store = if internal_addr.is_some() || store_args.redis_url.is_some() {
        Some(
            store_args
                .open()
                .await
                .context("opening the store (REDIS_URL, or the embedded store in DATA_DIR)")?,
        )
    } else {
        None
    };
    let mut config = config;
    config.revocations = store
        .clone()
        .map(|store| broker::revocation::Revocations::new(store, config.limits.revocation_poll));

    // The identity service in-process, on its own loopback HTTP port, sharing
    // the store; the broker verifies its tokens through its JWKS, beside
    // whatever else is configured (the development HMAC secret included).
    let identity = match &store {
        Some(store) => start_identity(idp_settings, store.clone(), &mut config).await?,
        None => None,
    };

    // With Redis, this node serves as one of many: replies and commands
    // cross nodes through it (the `cluster` crate, behind the delivery seam).
    let cluster = match store_args.redis_url() {
        Some(url) => {
            let id = cluster::node_id(node_id.as_deref()).context("BROKER_NODE_ID")?;
            Some(
                cluster::Cluster::connect(url, id, &cluster_args)
                    .await
                    .context("cross-node delivery over Redis (REDIS_URL)")?,
            )
        }
        None => None,
    };
    let running = match &cluster {
        Some(cluster) => Broker::start_with(config, listeners, cluster.wrap()).await?,
        None => Broker::start(config, listeners).await?,
    };
    let shutdown = running.shutdown_token();
    // The QR codes of pairing sessions point at the in-process identity
    // service unless SYNC_PAIR_URL says otherwise.
    let pair_url = identity
        .as_ref()
        .map(|(_, service)| format!("{}/sync/pair", service.settings.public_url));
    let cluster = cluster.and_then(|cluster| {
        tracing::info!(node = cluster.id(), "cross-node delivery over Redis is on");
        cluster.run(running.injector(), shutdown.child_token())
    });
    let identity = identity.map(|(listener, service)| {
        let addr = listener.local_addr().ok();
        let development = service.is_development();
        let page_mqtt_url = service.settings.web_mqtt_url.clone();
        let task = tokio::spawn(idp::serve(listener, service, shutdown.child_token()));
        (addr, development, page_mqtt_url, task)
    });

    let handlers = match (internal_addr, handler_key, store, handler_args) {
        (Some(addr), Some(key), Some(store), Some(mut args)) => {
            if args.sync_pair_url.is_none() {
                args.sync_pair_url = pair_url;
            }
            // In-process handlers reach the gate over its internal listener
            // with the broker's own key: they ask for no BROKER_URL.
            let sdk = sdk::SdkArgs {
                broker_url: format!("mqtt://{addr}"),
                broker_ca: None,
                handler_key: Some(key),
            };
            let settings =
                handlers::Settings::compose(args, sdk, store_args, |var| std::env::var(var).ok())
                    .context("handlers configuration")?;
            Some(
                handlers::spawn_builtin_with_store(settings, store, shutdown.child_token())
                    .context("starting the built-in handlers")?,
            )
        }
        _ => None,
    };

    print_banner(
        &running,
        &dev,
        jwt_secret.as_ref().map(|s| s.expose().as_bytes()),
        handlers.is_some(),
    );
    if let (Some((Some(addr), development, page_mqtt_url, _)), Some(tls)) =
        (&identity, running.tls_addr)
    {
        let ca = dev.ca_file.as_ref().map_or_else(
            || "<your CA file>".to_owned(),
            |ca| ca.display().to_string(),
        );
        for line in idp::banner::signup_lines(*addr, tls.port(), &ca, *development) {
            println!("{line}");
        }
        for line in idp::banner::page_lines(*addr, page_mqtt_url.as_deref()) {
            println!("{line}");
        }
    }

    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });
    let ended = running.wait().await;
    if let Some(cluster) = cluster {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), cluster.wait()).await;
    }
    if let Some(handlers) = handlers {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), handlers).await;
    }
    if let Some((_, _, _, task)) = identity {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    Ok(ended?)
}

/// Binds and builds the in-process identity service (unless
/// `IDP_IN_PROCESS=false`), and points the broker's JWKS client at it when
/// no other JWKS URL is configured.
async fn start_identity(
    settings: idp::config::Settings,
    store: std::sync::Arc<dyn store::Store>,
    config: &mut broker::config::Config,
) -> anyhow::Result<Option<(TcpListener, std::sync::Arc<idp::Idp>)>> {
    if !settings.in_process {
        return Ok(None);
    }
    share_descriptors(&settings, config)?;
    let listener = TcpListener::bind(settings.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (IDP_LISTEN) for the in-process identity service: choose another address, or set IDP_IN_PROCESS=false",
            settings.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let mut settings = settings;
    if settings.listen.port() == 0 {
        // A port chosen by the system: verify_url must name the real one.
        settings.public_url = format!("http://{addr}");
    }
    let service = idp::Idp::start(settings, store)
        .await
        .context("starting the in-process identity service")?;
    let jwks = format!("http://{addr}/.well-known/jwks.json");
    match &config.jwt.jwks_url {
        None => config.jwt.jwks_url = Some(jwks),
        Some(other) if *other != jwks => tracing::warn!(
            "JWT_JWKS_URL names another identity provider: tokens of the in-process identity service verify only if it publishes the same keys"
        ),
        Some(_) => {}
    }
    Ok(Some((listener, service)))
}

/// Gives the in-process identity service its share of the process's file
/// descriptors (see `idp::descriptors`): refuses a configuration where its
/// connections and the MQTT listeners' cannot both fit, and lowers the
/// broker's connection cap to what is left for it when it is above it.
fn share_descriptors(
    settings: &idp::config::Settings,
    config: &mut broker::config::Config,
) -> anyhow::Result<()> {
    let limit = idp::descriptors::raise_open_files_limit();
    let identity = settings.connections.max_connections as u64;
    let asked = config.limits.max_connections as u64;
    let budget = idp::descriptors::plan(limit, identity, asked)
        .context("the in-process identity service's share of file descriptors")?;
    if budget.lowers_mqtt(asked) {
        tracing::warn!(
            open_files_limit = limit,
            broker_max_connections = asked,
            idp_max_connections = identity,
            serving_at_most = budget.mqtt,
            "BROKER_MAX_CONNECTIONS is above what the open-file limit leaves the MQTT listeners beside the identity service ({} kept for listeners and clients); they will refuse connections at accept beyond {}: raise the limit (`ulimit -n`, LimitNOFILE= under systemd, --ulimit nofile= in Docker) or lower BROKER_MAX_CONNECTIONS to silence this",
            idp::descriptors::RESERVED,
            budget.mqtt
        );
        config.limits.max_connections = usize::try_from(budget.mqtt).unwrap_or(usize::MAX);
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Tells a newcomer how to talk to a development broker. Secrets and the demo
/// token are printed only when the broker made them itself (development defaults).
fn print_banner(
    running: &RunningBroker,
    dev: &DevDefaults,
    jwt_secret: Option<&[u8]>,
    handlers: bool,
) {
    let Some(tls) = running.tls_addr else {
        return;
    };
    let port = tls.port();
    // The addresses actually bound (port 0 in configuration picks a free one).
    println!("MQTT broker listening: TLS on {tls}");
    if let Some(tcp) = running.tcp_addrs.first() {
        println!("                       plain TCP on {tcp}");
    }
    if let Some(wss) = running.wss_addr {
        println!("                       MQTT over WebSocket on wss://{wss}/mqtt");
    }
    if let Some(ws) = running.ws_addr {
        println!("                       MQTT over WebSocket on ws://{ws}/mqtt");
    }
    if let Some(metrics) = running.metrics_addr {
        println!("                       metrics on http://{metrics}/metrics");
    }
    if handlers {
        println!("built-in handlers: sync, publish, contacts, tokens (in-process)");
    }
    let Some(ca) = &dev.ca_file else {
        return;
    };
    println!("development certificate authority: {}", ca.display());
    if let Some(key) = &dev.handler_key {
        println!(
            "development handler key (username `handler`): {}",
            key.expose()
        );
    }
    let (Some(_), Some(secret)) = (&dev.jwt_secret, jwt_secret) else {
        return;
    };
    println!(
        "development JWT secret (HS256): {}",
        String::from_utf8_lossy(secret)
    );
    let claims = protocol::claims::DeviceClaims::new("demo", 24 * 3600);
    let Ok(token) = claims.sign_hs256(secret) else {
        return;
    };
    let ca = ca.display();
    println!("demo device token for user `demo` (valid 24 h):\n  {token}");
    println!("try it, in two terminals:");
    println!(
        "  mosquitto_sub -h localhost -p {port} --cafile {ca} -V mqttv5 -u JWT -P {token} -t demo_contact_list -v"
    );
    println!(
        "  mosquitto_pub -h localhost -p {port} --cafile {ca} -V mqttv5 -u JWT -P {token} -t get_contact_list -m '{{}}'"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::config::BUILTIN_COMMAND_TOPICS;

    /// The command topics the broker configures for its built-in handlers
    /// are the handlers' own: each built-in worker's topics are in the list.
    #[test]
    fn builtin_command_topics_are_the_handlers_topics() {
        let data = tempfile::tempdir().unwrap();
        let mut settings = handlers::Settings::from_lookup(|_| None).unwrap();
        settings.data_dir = data.path().to_owned();
        let shared = handlers::Shared::open(settings).unwrap();
        let mut served = Vec::new();
        for kind in [
            handlers::Kind::Publish,
            handlers::Kind::Contacts,
            handlers::Kind::Tokens,
        ] {
            let worker = handlers::worker(kind, shared.clone(), None).unwrap();
            served.extend(worker.topics().map(str::to_owned));
        }
        // Its worker needs an RSA key: slow to make here.
        served.extend(["sync", "sync_session", "sync_session_confirm"].map(str::to_owned));
        served.sort();
        let mut listed = BUILTIN_COMMAND_TOPICS.map(str::to_owned).to_vec();
        listed.sort();
        assert_eq!(served, listed);
    }

    /// The broker alone asks nothing of the handlers: with
    /// `BROKER_HANDLERS=none`, their variables are not even checked.
    #[test]
    fn the_broker_alone_composes_without_handler_settings() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().display().to_string();
        let cli: Cli = setup::config::parse_from_lookup("broker", |var| match var {
            "BROKER_HANDLERS" => Some("none".into()),
            "REDIS_URL" => Some("redis://127.0.0.1:6379/0".into()),
            "BROKER_DEV_DIR" => Some(dev.clone()),
            // A value the handlers would refuse, were they asked.
            "PLATFORMS" => Some("not-a-platform-list".into()),
            _ => None,
        })
        .unwrap();
        let startup = compose(cli).expect("the broker alone composes");
        assert!(startup.handlers.is_none());
        assert!(startup.store.redis_url.is_some());
    }

    #[test]
    fn help_lists_each_variable_once() {
        let help = setup::config::command::<Cli>()
            .render_long_help()
            .to_string();
        for var in setup::config::variables_of(&setup::config::command::<Cli>()) {
            // `[env: NAME=value]`, or `[env: NAME]` for hidden values.
            let times = help.matches(&format!("[env: {var}=")).count()
                + help.matches(&format!("[env: {var}]")).count();
            assert_eq!(times, 1, "{var} in --help");
        }
        assert!(!help.contains("BROKER_URL") && !help.contains("HANDLER_KEY]"));
    }
}
