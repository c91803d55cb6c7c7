//! `loadgen`: the command line of the load generator (`run`, `echo`,
//! `bare-router`). See loadgen/README.md.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use loadgen::bare::BareRouterConfig;
use loadgen::driver::{self, DriveOptions};
use loadgen::{DeviceAuth, Echo, EchoConfig, Endpoint, JwtKey, MqttVersion, RunConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "MQTT load generator: JWT devices, an echo handler, round-trip latency and loss"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Runtime worker threads of each load-generator process (default: one
    /// per core). On a machine shared with the broker, fewer threads leave
    /// the broker a core of its own instead of preempting it.
    #[arg(long, global = true, env = "LOADGEN_THREADS")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect devices, drive round trips through an echo handler, report.
    Run(Box<RunArgs>),
    /// Run only the echo handler (a handler connection answering commands).
    Echo(EchoArgs),
    /// Run the vendored rumqttd router with its own plain TCP listeners and no gate.
    BareRouter(BareArgs),
}

#[derive(Args, Clone)]
struct Target {
    /// Broker address; for `run`, a comma-separated list spreads the devices
    /// over several broker nodes, device n on the (n mod count)-th.
    #[arg(
        long,
        default_value = "127.0.0.1:1883",
        value_delimiter = ',',
        required = true
    )]
    addr: Vec<SocketAddr>,
    /// Use TLS (implied by --ca).
    #[arg(long)]
    tls: bool,
    /// CA certificate file (PEM) to trust; turns TLS on.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name to verify in the broker's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// MQTT over WebSocket on path /mqtt: ws://, or wss:// with --ca.
    #[arg(long)]
    ws: bool,
    /// MQTT protocol version: 5 or 4 (3.1.1).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(4..=5))]
    protocol: u8,
}

impl Target {
    fn endpoint(&self) -> Result<Endpoint> {
        let Some(&addr) = self.addr.first() else {
            bail!("--addr needs at least one address");
        };
        let mut endpoint = match (&self.ca, self.tls) {
            (Some(ca), _) => Endpoint::tls(addr, ca, &self.server_name)?,
            (None, true) => bail!("--tls needs --ca"),
            (None, false) => Endpoint::tcp(addr),
        };
        endpoint.ws = self.ws;
        Ok(endpoint)
    }

    fn version(&self) -> MqttVersion {
        if self.protocol == 4 {
            MqttVersion::V4
        } else {
            MqttVersion::V5
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// Devices connected before sending starts (total over processes).
    #[arg(long, default_value_t = 100)]
    devices: u64,
    /// Device uids are <prefix><offset + n>.
    #[arg(long, default_value = "u")]
    uid_prefix: String,
    #[arg(long, default_value_t = 0)]
    uid_offset: u64,
    /// Reply topics per device: <uid>_<reply-name>, <uid>_s1, ...
    #[arg(long, default_value_t = 1)]
    subs: usize,
    #[arg(long, default_value = "echo")]
    reply_name: String,
    /// Command topic the devices publish to.
    #[arg(long, default_value = "echo")]
    command_topic: String,
    /// Total round trips per second offered (0: connect only).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// At most this many publishes in all (the run still lasts --duration).
    #[arg(long)]
    messages: Option<u64>,
    /// Longest wait in seconds for outstanding replies after sending stops.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// New connections per second (total; 0: unlimited).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Handshakes in flight at once, per process.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds allowed for one device's connect, TLS, CONNACK and SUBACK.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Spread devices over this many source addresses from 127.0.0.1 up (0: kernel's choice).
    #[arg(long, default_value_t = 0)]
    source_addrs: u32,
    /// Users that first connect while sending runs (total).
    #[arg(long, default_value_t = 0)]
    new_users: u64,
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// Carry the uid in the payload (brokers that cannot stamp user_id).
    #[arg(long)]
    uid_in_payload: bool,
    /// QoS of publishes and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    #[arg(long, default_value_t = 600)]
    keep_alive: u16,
    /// HS256 secret for device tokens (the raw text).
    #[arg(long, env = "LOADGEN_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM private key for device tokens (with --jwt-alg).
    #[arg(long)]
    jwt_key: Option<PathBuf>,
    /// Algorithm for --jwt-key: RS256, PS256, ES256, EdDSA, ...
    #[arg(long, default_value = "RS256")]
    jwt_alg: String,
    /// `kid` header for --jwt-key tokens.
    #[arg(long)]
    jwt_kid: Option<String>,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Fixed device username (instead of JWT).
    #[arg(long)]
    username: Option<String>,
    /// Fixed device password.
    #[arg(long, env = "LOADGEN_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Split the devices over this many child processes (each holds < 20,000 sockets).
    #[arg(long, default_value_t = 1)]
    processes: u64,
    /// Broker process id: report its CPU seconds and memory. A
    /// comma-separated list (several nodes, their Redis) reports the sums,
    /// and each process's share.
    #[arg(long, value_delimiter = ',')]
    broker_pid: Vec<u32>,
    /// Redis (or each Redis Cluster master) to read `INFO commandstats` from
    /// when every device is ready and at the end: Redis commands per round
    /// trip. Comma-separated `redis://host:port` URLs; the counts are summed.
    #[arg(long, value_delimiter = ',')]
    redis_stats: Vec<String>,
    /// Run this many echo handler connections in this process (0: use an external handler).
    #[arg(long, default_value_t = 0)]
    echo: usize,
    /// Filter the in-process echo handler subscribes to.
    #[arg(long, default_value = "$share/echo/echo")]
    echo_filter: String,
    /// Username of the in-process echo handler ("" for none).
    #[arg(long, default_value = "handler")]
    handler_user: String,
    /// Password (handler key) of the in-process echo handler.
    #[arg(long, env = "LOADGEN_HANDLER_KEY", hide_env_values = true)]
    handler_key: Option<String>,
    /// MQTT version of the in-process echo handler (default: --protocol).
    #[arg(long, value_parser = clap::value_parser!(u8).range(4..=5))]
    echo_protocol: Option<u8>,
    /// Address of the in-process echo handler's broker listener (default: the first --addr).
    #[arg(long)]
    echo_addr: Option<SocketAddr>,
    /// Name of this run in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// Write the JSON report here ("-": stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 1.0)]
    progress: f64,
    /// Exit with status 2 unless every message came back exactly once.
    #[arg(long)]
    strict: bool,
    #[arg(long, hide = true)]
    child: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    shard: u64,
    #[arg(long, hide = true, default_value_t = 1)]
    shards: u64,
}

impl RunArgs {
    fn run_config(&self) -> Result<RunConfig> {
        let mut cfg = RunConfig::new(self.target.endpoint()?);
        cfg.version = self.target.version();
        cfg.auth = match (&self.jwt_secret, &self.jwt_key, &self.username) {
            (Some(secret), None, None) => DeviceAuth::Jwt {
                key: JwtKey::Secret(secret.as_bytes().to_vec()),
                ttl_secs: self.token_ttl,
            },
            (None, Some(path), None) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let alg: jsonwebtoken::Algorithm = self
                    .jwt_alg
                    .parse()
                    .with_context(|| format!("algorithm {}", self.jwt_alg))?;
                DeviceAuth::Jwt {
                    key: JwtKey::Pem {
                        alg,
                        pem,
                        kid: self.jwt_kid.clone(),
                    },
                    ttl_secs: self.token_ttl,
                }
            }
            (None, None, Some(u)) => DeviceAuth::Password {
                username: u.clone(),
                password: self.password.clone().unwrap_or_default(),
            },
            (None, None, None) => DeviceAuth::Anonymous,
            _ => bail!("choose one of --jwt-secret, --jwt-key, --username"),
        };
        if self.target.addr.len() > 1 {
            cfg.node_addrs = self.target.addr.clone();
        }
        cfg.devices = self.devices;
        cfg.uid_prefix = self.uid_prefix.clone();
        cfg.uid_offset = self.uid_offset;
        cfg.subs = self.subs;
        cfg.reply_name = self.reply_name.clone();
        cfg.command_topic = self.command_topic.clone();
        cfg.rate = self.rate;
        cfg.duration = secs(self.duration)?;
        cfg.messages = self.messages;
        cfg.drain = secs(self.drain)?;
        cfg.connect_rate = self.connect_rate;
        cfg.connect_concurrency = self.connect_concurrency;
        cfg.connect_timeout = secs(self.connect_timeout)?;
        cfg.source_addrs = self.source_addrs;
        cfg.new_users = self.new_users;
        cfg.payload_size = self.payload_size;
        cfg.uid_in_payload = self.uid_in_payload;
        cfg.qos = self.qos;
        cfg.keep_alive = self.keep_alive;
        cfg.shard = self.shard;
        cfg.shards = self.shards;
        Ok(cfg)
    }
}

fn secs(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{s} is not a duration in seconds"))
}

#[derive(Args)]
struct EchoArgs {
    #[command(flatten)]
    target: Target,
    /// Username ("" for none).
    #[arg(long, default_value = "handler")]
    handler_user: String,
    /// Password (handler key).
    #[arg(long, env = "LOADGEN_HANDLER_KEY", hide_env_values = true)]
    handler_key: Option<String>,
    /// Filter to subscribe to.
    #[arg(long, default_value = "$share/echo/echo")]
    filter: String,
    /// Replies go to <uid>_<reply-name>.
    #[arg(long, default_value = "echo")]
    reply_name: String,
    /// Take the uid from the payload instead of the user_id property.
    #[arg(long)]
    uid_in_payload: bool,
    /// Handler connections (share the subscription with a $share filter).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Seconds to run (0: until interrupted).
    #[arg(long, default_value_t = 0.0)]
    duration: f64,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 0.0)]
    progress: f64,
}

#[derive(Args)]
struct BareArgs {
    /// MQTT 3.1.1 listener.
    #[arg(long)]
    v4_listen: Option<SocketAddr>,
    /// MQTT 5 listener.
    #[arg(long)]
    v5_listen: Option<SocketAddr>,
    #[arg(long, default_value_t = 20_010)]
    max_connections: usize,
    #[arg(long, default_value_t = 200)]
    max_outgoing_packet_count: u64,
    #[arg(long, default_value_t = 104_857_600)]
    max_segment_size: usize,
    #[arg(long, default_value_t = 10)]
    max_segment_count: usize,
    #[arg(long, default_value_t = 100)]
    max_inflight_count: usize,
}

fn echo_config(
    endpoint: Endpoint,
    version: MqttVersion,
    user: &str,
    key: Option<&String>,
) -> EchoConfig {
    let mut e = EchoConfig::new(endpoint);
    e.version = version;
    e.username = (!user.is_empty()).then(|| user.to_owned());
    e.password = key.cloned();
    e
}

async fn cmd_run(a: RunArgs) -> Result<i32> {
    let cfg = a.run_config()?;
    if a.child {
        driver::run_child(cfg).await?;
        return Ok(0);
    }
    let echo = if a.echo > 0 {
        let mut endpoint = cfg.endpoint.clone();
        if let Some(addr) = a.echo_addr {
            endpoint.addr = addr;
        }
        let mut e = echo_config(
            endpoint,
            match a.echo_protocol.unwrap_or(a.target.protocol) {
                4 => MqttVersion::V4,
                _ => MqttVersion::V5,
            },
            &a.handler_user,
            a.handler_key.as_ref(),
        );
        e.filter = a.echo_filter.clone();
        e.reply_name = a.reply_name.clone();
        e.uid_in_payload = a.uid_in_payload;
        e.connections = a.echo;
        e.qos = a.qos;
        Some(Echo::start(e).await.context("starting the echo handler")?)
    } else {
        None
    };
    let opts = DriveOptions {
        label: a.label.clone(),
        broker_pids: a.broker_pid.clone(),
        redis_stats: a.redis_stats.clone(),
        progress: (a.progress > 0.0).then(|| secs(a.progress)).transpose()?,
    };
    let report = if a.processes > 1 {
        let exe = std::env::current_exe().context("locating the loadgen binary")?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        driver::run_children(exe, args, a.processes, &opts).await?
    } else {
        driver::run_in_process(cfg, &opts).await?
    };
    if let Some(e) = echo {
        let s = e.stop().await;
        eprintln!(
            "echo handler: received {} replied {} without uid {}",
            s.received, s.replied, s.no_uid
        );
    }
    eprint!("{}", report.table());
    let json = serde_json::to_string_pretty(&report)?;
    match &a.json {
        Some(p) if p.as_os_str() == "-" => println!("{json}"),
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?
        }
        None => {}
    }
    Ok(if a.strict && !report.clean() { 2 } else { 0 })
}

async fn cmd_echo(a: EchoArgs) -> Result<i32> {
    if a.target.addr.len() != 1 {
        bail!("the echo handler connects to one broker: give one --addr");
    }
    let mut e = echo_config(
        a.target.endpoint()?,
        a.target.version(),
        &a.handler_user,
        a.handler_key.as_ref(),
    );
    e.filter = a.filter;
    e.reply_name = a.reply_name;
    e.uid_in_payload = a.uid_in_payload;
    e.connections = a.connections;
    e.qos = a.qos;
    let mut echo = Echo::start(e).await?;
    eprintln!("echo handler ready");
    let counters = echo.counters();
    let progress = (a.progress > 0.0).then(|| secs(a.progress)).transpose()?;
    let ticker = progress.map(|every| {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                t.tick().await;
                let s = counters.snapshot();
                eprintln!(
                    "echo: received {} replied {} no uid {}",
                    s.received, s.replied, s.no_uid
                );
            }
        })
    });
    let limit = async {
        if a.duration > 0.0 {
            tokio::time::sleep(secs(a.duration).unwrap_or_default()).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let failed = tokio::select! {
        r = echo.wait() => r.err(),
        _ = limit => None,
        _ = tokio::signal::ctrl_c() => None,
    };
    if let Some(t) = ticker {
        t.abort();
    }
    let s = echo.stop().await;
    eprintln!(
        "echo handler: received {} replied {} without uid {}",
        s.received, s.replied, s.no_uid
    );
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(0)
}

fn cmd_bare(a: BareArgs) -> Result<i32> {
    let cfg = BareRouterConfig {
        v4_listen: a.v4_listen,
        v5_listen: a.v5_listen,
        max_connections: a.max_connections,
        max_outgoing_packet_count: a.max_outgoing_packet_count,
        max_segment_size: a.max_segment_size,
        max_segment_count: a.max_segment_count,
        max_inflight_count: a.max_inflight_count,
        ..Default::default()
    };
    loadgen::bare::run(&cfg)?;
    Ok(0)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::BareRouter(a) => cmd_bare(a)?,
        cmd => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all();
            if let Some(threads) = cli.threads {
                if threads == 0 {
                    anyhow::bail!("--threads must be at least 1");
                }
                // Inherited by child processes (`--processes`).
                std::env::set_var("LOADGEN_THREADS", threads.to_string());
                rt.worker_threads(threads);
            }
            let rt = rt.build().context("starting the runtime")?;
            rt.block_on(async move {
                match cmd {
                    Cmd::Run(a) => cmd_run(*a).await,
                    Cmd::Echo(a) => cmd_echo(a).await,
                    Cmd::BareRouter(_) => Ok(0),
                }
            })?
        }
    };
    std::process::exit(code);
}
