//! Owns the broker's configuration: the environment variables and flags an
//! operator sets ([`BrokerArgs`], flattened by the `broker` binary beside the
//! store's, the handlers' and the identity service's), their validation, and
//! the development defaults the plain `cargo run` gets
//! ([`BrokerArgs::resolve`]), producing the typed [`Config`] the broker runs
//! on. Refuses bad values with a message that says how to fix them.

use crate::auth::jwt::JwtSettings;
use clap::Parser;
use protocol::Secret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod dev_certs;
mod limits;
pub use limits::Limits;

/// Which built-in handlers run inside the broker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BuiltinHandlers {
    /// sync, publish and contacts, connected over an internal loopback listener.
    All,
    /// The broker alone; handlers run as separate processes.
    None,
}

/// The broker's flags; each mirrors the environment variable of the same meaning.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// MQTT over TLS listen address (MQTT 3.1.1 and 5). Default 127.0.0.1:8883.
    #[arg(long, env = "BROKER_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listener. Unset: a development
    /// certificate is made under BROKER_DEV_DIR (loopback listeners only).
    #[arg(long, env = "BROKER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long, env = "BROKER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Plain MQTT listen address; unset means no plain listener.
    #[arg(long, env = "BROKER_TCP_LISTEN")]
    pub tcp_listen: Option<SocketAddr>,
    /// HMAC secret (raw text) for HS256/384/512 device tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// Comma-separated PEM public key files (RSA, EC, Ed25519).
    #[arg(long, env = "JWT_PUBLIC_KEYS", value_delimiter = ',')]
    pub jwt_public_keys: Vec<PathBuf>,
    /// JWKS URL to fetch verification keys from.
    #[arg(long, env = "JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock leeway in seconds for exp/nbf, at connect and for the expiry disconnect.
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5)]
    pub jwt_leeway_secs: u64,
    /// Whether tokens must carry `exp`.
    #[arg(long, env = "JWT_REQUIRE_EXP", default_value_t = true, action = clap::ArgAction::Set)]
    pub jwt_require_exp: bool,
    /// Comma-separated handler keys; any of them is accepted (rotation).
    #[arg(
        long,
        env = "HANDLER_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub handler_keys: Vec<Secret>,
    /// Comma-separated command topics devices may publish to, besides those
    /// connected handlers subscribe to.
    #[arg(long, env = "COMMAND_TOPICS", value_delimiter = ',')]
    pub command_topics: Vec<String>,
    /// Address of the HTTP endpoint with /metrics and /healthz; unset = off.
    #[arg(long, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// This node's name among the broker nodes sharing one Redis (REDIS_URL
    /// set: cross-node delivery is on). Unset: a name unique to this
    /// process. 1 to 64 letters, digits, '.', '-' or '_'.
    #[arg(long, env = "BROKER_NODE_ID")]
    pub node_id: Option<String>,
    /// Built-in handlers to run in-process.
    #[arg(long, env = "BROKER_HANDLERS", value_enum, default_value = "all")]
    pub handlers: BuiltinHandlers,
    /// Where development certificates and secrets are made when none are configured.
    #[arg(long, env = "BROKER_DEV_DIR", default_value = "certs/dev")]
    pub dev_dir: PathBuf,
    /// New connections allowed per second from one source (0 = no limit). A
    /// source is an IPv4 address or an IPv6 /64. Sized for thousands of
    /// devices behind one carrier-grade NAT address (README, "Connect storms").
    #[arg(long, env = "BROKER_CONN_RATE", default_value_t = DEFAULT_CONN_RATE)]
    pub conn_rate: f64,
    /// Burst of new connections allowed from one source.
    #[arg(long, env = "BROKER_CONN_BURST", default_value_t = DEFAULT_CONN_BURST)]
    pub conn_burst: u32,
    /// Most connections from one source between accept and CONNACK (TLS
    /// handshake and CONNECT in progress); more are closed before TLS. 0 = no limit.
    #[arg(long, env = "BROKER_MAX_PENDING_PER_ADDR", default_value_t = DEFAULT_MAX_PENDING_PER_ADDR)]
    pub max_pending_per_addr: usize,
    /// Comma-separated CIDR blocks of the load balancers allowed to send a
    /// PROXY protocol header (v1 or v2) naming the client's address, e.g.
    /// `127.0.0.1/32,10.0.0.0/8`; they must send one. Empty: nobody (a
    /// PROXY header is then refused from anyone).
    #[arg(long, env = "BROKER_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Most simultaneous client connections.
    #[arg(long, env = "BROKER_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Seconds a client has to finish the TLS handshake.
    #[arg(long, env = "BROKER_TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub tls_handshake_timeout_secs: u64,
    /// Seconds a client has to send CONNECT after the socket (and TLS) is up.
    #[arg(long, env = "BROKER_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    pub connect_timeout_secs: u64,
    /// Largest MQTT packet accepted, in bytes.
    #[arg(long, env = "BROKER_MAX_PACKET_SIZE", default_value_t = 256 * 1024)]
    pub max_packet_size: usize,
    /// Longest keep-alive granted, in seconds (also used when a client asks for 0).
    #[arg(long, env = "BROKER_MAX_KEEP_ALIVE_SECS", default_value_t = 1200)]
    pub max_keep_alive_secs: u16,
    /// Seconds a refused password is remembered, so retries cost almost nothing.
    #[arg(long, env = "BROKER_REFUSAL_CACHE_SECS", default_value_t = 10)]
    pub refusal_cache_secs: u64,
    /// Seconds to wait for sessions to close on SIGTERM/SIGINT.
    #[arg(long, env = "BROKER_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Longest a persistent session outlives its connection, in seconds
    /// (MQTT 5 clients may ask for less; MQTT 3.1.1 sessions get this).
    #[arg(long, env = "BROKER_MAX_SESSION_EXPIRY_SECS", default_value_t = 7 * 24 * 3600)]
    pub max_session_expiry_secs: u64,
    /// Seconds a write to a client may take before the client, not reading,
    /// is disconnected (its will fires). 1 to 600.
    #[arg(long, env = "BROKER_WRITE_TIMEOUT_SECS", default_value_t = 10)]
    pub write_timeout_secs: u64,
    /// Receive Maximum: QoS 1/2 publishes a client may have unacknowledged at
    /// once. Advertised in MQTT 5 CONNACK; beyond it, DISCONNECT 0x93. 1 to 1024.
    #[arg(long, env = "BROKER_RECEIVE_MAXIMUM", default_value_t = 100)]
    pub receive_maximum: u16,
    /// Async worker threads, the router's task included (default: one per core less one).
    #[arg(long, env = "BROKER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Seconds between sweeps that disconnect revoked users (0 = only at CONNECT).
    #[arg(long, env = "BROKER_REVOCATION_POLL_SECS", default_value_t = 5)]
    pub revocation_poll_secs: u64,
    /// Longest client id accepted at CONNECT, in bytes (longer: refused, 0x85).
    #[arg(long, env = "BROKER_MAX_CLIENT_ID_BYTES", default_value_t = 128)]
    pub max_client_id_bytes: usize,
    /// Longest topic name or filter a device may use, in bytes.
    #[arg(long, env = "BROKER_DEVICE_MAX_TOPIC_BYTES", default_value_t = 256)]
    pub device_max_topic_bytes: usize,
    /// Most `/`-separated levels in a device's topic name or filter.
    #[arg(long, env = "BROKER_DEVICE_MAX_TOPIC_LEVELS", default_value_t = 16)]
    pub device_max_topic_levels: usize,
    /// Longest topic name or filter a handler may use, in bytes.
    #[arg(long, env = "BROKER_HANDLER_MAX_TOPIC_BYTES", default_value_t = 4096)]
    pub handler_max_topic_bytes: usize,
    /// Most `/`-separated levels in a handler's topic name or filter.
    #[arg(long, env = "BROKER_HANDLER_MAX_TOPIC_LEVELS", default_value_t = 64)]
    pub handler_max_topic_levels: usize,
    /// Most bytes of user properties (names and values) a device's PUBLISH
    /// or will may carry (more: PUBACK/PUBREC 0x83, QoS 0 dropped; a will:
    /// CONNACK 0x83). 0 to 1048576.
    #[arg(
        long,
        env = "BROKER_DEVICE_MAX_USER_PROPERTY_BYTES",
        default_value_t = 4096
    )]
    pub device_max_user_property_bytes: usize,
    /// Most bytes of correlation data a device's PUBLISH or will may carry
    /// (answered as for user properties). 0 to 65535.
    #[arg(
        long,
        env = "BROKER_DEVICE_MAX_CORRELATION_DATA_BYTES",
        default_value_t = 256
    )]
    pub device_max_correlation_data_bytes: usize,
    /// Most subscriptions one device session may hold (more: SUBACK 0x97).
    #[arg(long, env = "BROKER_DEVICE_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub device_max_subscriptions: usize,
    /// Most subscriptions one handler session may hold.
    #[arg(
        long,
        env = "BROKER_HANDLER_MAX_SUBSCRIPTIONS",
        default_value_t = 10_000
    )]
    pub handler_max_subscriptions: usize,
    /// Most persistent sessions (clean_session=0) one user's devices may hold
    /// (connected or away); one more is refused (MQTT 5 0x97, 3.1.1 code 3).
    #[arg(
        long,
        env = "BROKER_MAX_PERSISTENT_SESSIONS_PER_USER",
        default_value_t = 8
    )]
    pub max_persistent_sessions_per_user: usize,
}

/// Default new connections per second per source: 5,000 devices behind one
/// NAT address that reconnect at once are all admitted within 4 s (1,000 at
/// once, then 1,000 a second); one source costs at most this many TLS
/// handshakes a second.
pub const DEFAULT_CONN_RATE: f64 = 1000.0;
/// Default burst of new connections per source.
pub const DEFAULT_CONN_BURST: u32 = 1000;
/// Default most unanswered connections per source: at the default rate, a
/// second of handshakes in flight (mobile round trips are 0.1–1 s, and a
/// connection takes two before its CONNACK), while one source can hold no
/// more than this many sockets idle until the handshake deadline.
pub const DEFAULT_MAX_PENDING_PER_ADDR: usize = 1000;

/// Why the configuration was refused. Each message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("BROKER_TLS_CERT and BROKER_TLS_KEY must be set together (PEM files): set both, or neither for a development certificate")]
    HalfTls,
    #[error("no TLS certificate is configured and {0} is not a loopback address: set BROKER_TLS_CERT and BROKER_TLS_KEY, or listen on 127.0.0.1 for development")]
    DevCertOnPublicAddress(SocketAddr),
    #[error("no way to verify device tokens is configured while listening on {0}: set JWT_SECRET, JWT_PUBLIC_KEYS or JWT_JWKS_URL (development defaults are only made for loopback listeners)")]
    DevSecretOnPublicAddress(SocketAddr),
    #[error("no HANDLER_KEYS configured while listening on {0}: set HANDLER_KEYS to one or more comma-separated keys of at least 16 characters")]
    DevHandlerKeyOnPublicAddress(SocketAddr),
    #[error("a handler key is shorter than 16 characters: use long random keys in HANDLER_KEYS (e.g. `openssl rand -hex 32`)")]
    WeakHandlerKey,
    #[error("JWT_SECRET is empty: set a long random secret or unset it")]
    EmptySecret,
    #[error("JWT_SECRET is {0} bytes; HS256 needs at least {min} bytes (256 bits) of secret: generate one with `openssl rand -hex 32`", min = crate::auth::jwt::MIN_HMAC_SECRET_BYTES)]
    WeakJwtSecret(usize),
    #[error("COMMAND_TOPICS entry {0:?} is not a valid topic name: use plain names without '+', '#', a leading '$', or an underscore-prefixed user id")]
    BadCommandTopic(String),
    #[error("BROKER_MAX_PACKET_SIZE must be between 1024 and 268435455 bytes (got {0})")]
    BadPacketSize(usize),
    #[error("BROKER_CONN_RATE must be 0 (no limit) or a positive number (got {0})")]
    BadConnRate(f64),
    #[error(
        "BROKER_WRITE_TIMEOUT_SECS must be between 1 and 600 (got {0}); 10 suits mobile networks"
    )]
    BadWriteTimeout(u64),
    #[error("BROKER_RECEIVE_MAXIMUM must be between 1 and 1024 (got {0}); 100 is the default")]
    BadReceiveMaximum(u16),
    #[error("BROKER_MAX_CONNECTIONS must be at least 1")]
    NoConnections,
    #[error("BROKER_CONN_BURST must be at least 1 (got 0): it is how many connections one source may open at once")]
    NoConnBurst,
    #[error("{name} must be between {min} and {max} (got {value}): {why}")]
    BadCap {
        name: &'static str,
        value: usize,
        min: usize,
        max: usize,
        why: &'static str,
    },
    #[error(transparent)]
    BadTrustedProxy(#[from] crate::proxy::BadTrustedProxy),
    #[error("cannot prepare development files in {path}: {source}")]
    DevFiles {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a development certificate: {0}")]
    DevCert(String),
}

/// Checks one cap against its sane range.
fn check_cap(
    name: &'static str,
    value: usize,
    range: std::ops::RangeInclusive<usize>,
    why: &'static str,
) -> Result<usize, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::BadCap {
            name,
            value,
            min: *range.start(),
            max: *range.end(),
            why,
        })
    }
}

/// What the broker runs with, validated. (`Debug` masks the secrets.)
#[derive(Debug)]
pub struct Config {
    pub jwt: JwtSettings,
    pub handler_keys: Vec<Secret>,
    pub command_topics: Vec<String>,
    pub limits: Limits,
    /// Revocation checks against the store; the binary sets them once the
    /// store (shared with in-process handlers) is open.
    pub revocations: Option<crate::revocation::Revocations>,
}

/// Where to listen and with which certificate, validated.
#[derive(Debug, Clone)]
pub struct ListenPlan {
    pub tls_listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tcp_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub builtin_handlers: bool,
}

/// What the development defaults made, so the start-up banner can print it.
#[derive(Debug, Clone, Default)]
pub struct DevDefaults {
    pub ca_file: Option<PathBuf>,
    pub jwt_secret: Option<Secret>,
    pub handler_key: Option<Secret>,
}

/// The command topics of the built-in handlers, configured whenever they
/// run: several are reply-shaped (`get_contact_list` could be user `get`'s
/// reply topic), and a handler subscribing to a reply-shaped topic never
/// declares it (see `command_topics`), so these must be configured.
pub const BUILTIN_COMMAND_TOPICS: [&str; 11] = [
    "sync",
    "sync_session",
    "sync_session_confirm",
    "publish",
    "request_contact",
    "accept_contact",
    "get_contact_list",
    "store_token",
    "list_tokens",
    "revoke_token",
    "delete_account",
];

/// Checks a command topic name from configuration.
pub fn validate_command_topic(topic: &str) -> Result<(), ConfigError> {
    if !protocol::topics::is_valid_topic_name(topic) || topic.starts_with('$') {
        return Err(ConfigError::BadCommandTopic(topic.to_owned()));
    }
    Ok(())
}

/// [`BrokerArgs`] parsed on their own (embedding and tests).
#[derive(Debug, Clone, Parser)]
#[command(name = "broker")]
pub struct BrokerOnly {
    #[command(flatten)]
    pub args: BrokerArgs,
}

impl BrokerArgs {
    /// Parses command-line flags (and the environment) as the binary does,
    /// without exiting on an error: for embedding and tests.
    pub fn try_from_argv<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        BrokerOnly::try_parse_from(argv).map(|only| only.args)
    }

    /// Validates the flags and environment, filling development defaults for
    /// loopback-only runs (certificate, HMAC secret, handler key under `dev_dir`).
    pub fn resolve(self) -> Result<(Config, ListenPlan, DevDefaults), ConfigError> {
        let tls_listen = self
            .tls_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8883)));
        let loopback_only =
            tls_listen.ip().is_loopback() && self.tcp_listen.is_none_or(|a| a.ip().is_loopback());
        let mut dev = DevDefaults::default();

        let (tls_cert, tls_key) = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) if loopback_only => {
                let made = dev_certs::ensure_dev_certificate(&self.dev_dir)?;
                dev.ca_file = Some(made.ca_file.clone());
                (made.cert_file, made.key_file)
            }
            (None, None) => return Err(ConfigError::DevCertOnPublicAddress(tls_listen)),
            _ => return Err(ConfigError::HalfTls),
        };

        let mut jwt_secret = self.jwt_secret;
        match jwt_secret.as_ref().map(Secret::len) {
            Some(0) => return Err(ConfigError::EmptySecret),
            // Checked here, like the handler keys' length, with the fix in the message.
            Some(n) if n < crate::auth::jwt::MIN_HMAC_SECRET_BYTES => {
                return Err(ConfigError::WeakJwtSecret(n))
            }
            _ => {}
        }
        let no_key_source =
            jwt_secret.is_none() && self.jwt_public_keys.is_empty() && self.jwt_jwks_url.is_none();
        let mut handler_keys: Vec<Secret> = self
            .handler_keys
            .iter()
            .map(|k| k.expose().trim())
            .filter(|k| !k.is_empty())
            .map(Secret::from)
            .collect();
        if no_key_source || handler_keys.is_empty() {
            if !loopback_only {
                return Err(if no_key_source {
                    ConfigError::DevSecretOnPublicAddress(tls_listen)
                } else {
                    ConfigError::DevHandlerKeyOnPublicAddress(tls_listen)
                });
            }
            let secrets = dev_certs::ensure_dev_secrets(&self.dev_dir)?;
            if no_key_source {
                dev.jwt_secret = Some(secrets.jwt_secret.clone());
                jwt_secret = Some(secrets.jwt_secret.clone());
            }
            if handler_keys.is_empty() {
                dev.handler_key = Some(secrets.handler_key.clone());
                handler_keys.push(secrets.handler_key);
            }
        }
        if handler_keys.iter().any(|k| k.expose().len() < 16) {
            return Err(ConfigError::WeakHandlerKey);
        }

        let mut command_topics: Vec<String> = self
            .command_topics
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if self.handlers == BuiltinHandlers::All {
            for topic in BUILTIN_COMMAND_TOPICS {
                if !command_topics.iter().any(|t| t == topic) {
                    command_topics.push(topic.to_owned());
                }
            }
        }
        for topic in &command_topics {
            validate_command_topic(topic)?;
        }
        if !(1024..=268_435_455).contains(&self.max_packet_size) {
            return Err(ConfigError::BadPacketSize(self.max_packet_size));
        }
        if !(self.conn_rate >= 0.0 && self.conn_rate.is_finite()) {
            return Err(ConfigError::BadConnRate(self.conn_rate));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        if !(1..=600).contains(&self.write_timeout_secs) {
            return Err(ConfigError::BadWriteTimeout(self.write_timeout_secs));
        }
        // The router holds at most 1,024 unreleased QoS 2 publishes per
        // session (vendor patch: `MAX_AWAITING_PUBREL`); the gate's limit
        // must come first so that clients hear 0x93 from the gate.
        if !(1..=1024).contains(&self.receive_maximum) {
            return Err(ConfigError::BadReceiveMaximum(self.receive_maximum));
        }
        if self.conn_burst == 0 {
            return Err(ConfigError::NoConnBurst);
        }
        let trusted_proxies: crate::proxy::TrustedProxies = self.trusted_proxies.parse()?;
        // Lower bounds keep the product working (MQTT servers must take 23-byte
        // client ids; a device needs room for `<64-byte uid>_<name>`); upper
        // bounds keep a cap a cap.
        let max_client_id_bytes = check_cap(
            "BROKER_MAX_CLIENT_ID_BYTES",
            self.max_client_id_bytes,
            23..=65_535,
            "MQTT servers must accept 23-byte client ids",
        )?;
        let topic_why = "a device needs room for a 64-byte user id and a reply name";
        let topics = crate::acl::TopicLimits {
            device: protocol::topics::TopicCaps {
                max_bytes: check_cap(
                    "BROKER_DEVICE_MAX_TOPIC_BYTES",
                    self.device_max_topic_bytes,
                    128..=65_535,
                    topic_why,
                )?,
                max_levels: check_cap(
                    "BROKER_DEVICE_MAX_TOPIC_LEVELS",
                    self.device_max_topic_levels,
                    1..=65_535,
                    "a topic has at least one level",
                )?,
            },
            handler: protocol::topics::TopicCaps {
                max_bytes: check_cap(
                    "BROKER_HANDLER_MAX_TOPIC_BYTES",
                    self.handler_max_topic_bytes,
                    128..=65_535,
                    topic_why,
                )?,
                max_levels: check_cap(
                    "BROKER_HANDLER_MAX_TOPIC_LEVELS",
                    self.handler_max_topic_levels,
                    1..=65_535,
                    "a topic has at least one level",
                )?,
            },
        };
        let subscriptions_why =
            "a session needs at least one subscription, and a cap bounds memory";
        let device_max_subscriptions = check_cap(
            "BROKER_DEVICE_MAX_SUBSCRIPTIONS",
            self.device_max_subscriptions,
            1..=1_000_000,
            subscriptions_why,
        )?;
        let handler_max_subscriptions = check_cap(
            "BROKER_HANDLER_MAX_SUBSCRIPTIONS",
            self.handler_max_subscriptions,
            1..=1_000_000,
            subscriptions_why,
        )?;
        let max_persistent_sessions_per_user = check_cap(
            "BROKER_MAX_PERSISTENT_SESSIONS_PER_USER",
            self.max_persistent_sessions_per_user,
            0..=10_000,
            "0 allows devices clean sessions only",
        )?;
        // Kept messages carry them (command logs, reply inboxes through the
        // echoed correlation data, delayed wills): a cap bounds each one.
        let device_properties = crate::property_caps::PropertyCaps {
            user_property_bytes: check_cap(
                "BROKER_DEVICE_MAX_USER_PROPERTY_BYTES",
                self.device_max_user_property_bytes,
                0..=1_048_576,
                "a cap bounds what each kept message carries (0: none allowed)",
            )?,
            correlation_data_bytes: check_cap(
                "BROKER_DEVICE_MAX_CORRELATION_DATA_BYTES",
                self.device_max_correlation_data_bytes,
                0..=65_535,
                "MQTT binary data is at most 65,535 bytes (0: none allowed)",
            )?,
        };

        let config = Config {
            jwt: JwtSettings {
                hmac_secret: jwt_secret,
                public_key_files: self.jwt_public_keys,
                jwks_url: self.jwt_jwks_url,
                issuer: self.jwt_issuer,
                audience: self.jwt_audience,
                leeway_secs: self.jwt_leeway_secs,
                require_exp: self.jwt_require_exp,
            },
            handler_keys,
            command_topics,
            limits: Limits {
                max_connections: self.max_connections,
                conn_rate_per_sec: self.conn_rate,
                conn_burst: self.conn_burst,
                max_pending_per_addr: self.max_pending_per_addr,
                trusted_proxies,
                tls_handshake_timeout: Duration::from_secs(self.tls_handshake_timeout_secs),
                connect_timeout: Duration::from_secs(self.connect_timeout_secs),
                max_packet_size: self.max_packet_size,
                max_keep_alive_secs: self.max_keep_alive_secs.max(1),
                refusal_cache_ttl: Duration::from_secs(self.refusal_cache_secs),
                shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
                revocation_poll: Duration::from_secs(self.revocation_poll_secs),
                max_session_expiry: Duration::from_secs(self.max_session_expiry_secs),
                write_timeout: Duration::from_secs(self.write_timeout_secs),
                receive_maximum: self.receive_maximum,
                max_client_id_bytes,
                topics,
                device_max_subscriptions,
                handler_max_subscriptions,
                max_persistent_sessions_per_user,
                device_properties,
            },
            revocations: None,
        };
        let plan = ListenPlan {
            tls_listen,
            tls_cert,
            tls_key,
            tcp_listen: self.tcp_listen,
            metrics_listen: self.metrics_listen,
            builtin_handlers: self.handlers == BuiltinHandlers::All,
        };
        Ok((config, plan, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const ENV_EXAMPLE: &str = include_str!("../../../.env.example");

    #[test]
    fn every_broker_variable_is_in_env_example() {
        let documented = setup::config::documented_variables(ENV_EXAMPLE);
        for var in setup::config::variables_of(&BrokerOnly::command()) {
            assert!(
                documented.iter().any(|(n, _)| *n == var),
                "{var} is missing from .env.example"
            );
        }
    }

    #[test]
    fn env_example_values_are_accepted() {
        let documented = setup::config::documented_variables(ENV_EXAMPLE);
        let dir = tempfile::tempdir().unwrap();
        let args = setup::config::parse_from_lookup::<BrokerOnly>("broker", |var| {
            if var == "BROKER_DEV_DIR" {
                return Some(dir.path().display().to_string());
            }
            documented
                .iter()
                .find(|(n, _)| n == var)
                .and_then(|(_, value)| value.clone())
        })
        .expect("documented values parse")
        .args;
        let (config, plan, dev) = args.resolve().expect("documented values validate");
        assert_eq!(plan.tls_listen.to_string(), "127.0.0.1:8883");
        assert_eq!(config.command_topics.len(), BUILTIN_COMMAND_TOPICS.len());
        assert!(dev.jwt_secret.is_some() && dev.handler_key.is_some());
    }

    fn base_args(extra: &[&str]) -> BrokerArgs {
        let mut argv = vec!["broker"];
        argv.extend_from_slice(extra);
        BrokerArgs::try_from_argv(argv).expect("parse")
    }

    #[test]
    fn builtin_handlers_configure_their_command_topics() {
        let dir = tempfile::tempdir().unwrap();
        let dev = format!("--dev-dir={}", dir.path().display());
        let (config, _, _) = base_args(&[&dev, "--command-topics=jobs,sync"])
            .resolve()
            .unwrap();
        assert_eq!(
            config.command_topics.len(),
            BUILTIN_COMMAND_TOPICS.len() + 1,
            "{:?}",
            config.command_topics
        );
        let (config, _, _) = base_args(&[&dev, "--handlers=none"]).resolve().unwrap();
        assert!(config.command_topics.is_empty());

        // That the list is the built-in handlers' own is checked where both
        // are known: the `broker` binary (server/src/main.rs).
    }

    #[test]
    fn refuses_public_listeners_without_real_credentials() {
        let err = base_args(&["--tls-listen=0.0.0.0:8883"])
            .resolve()
            .unwrap_err();
        assert!(
            matches!(err, ConfigError::DevCertOnPublicAddress(_)),
            "{err}"
        );
        assert!(err.to_string().contains("BROKER_TLS_CERT"));

        let err = base_args(&[
            "--tls-listen=0.0.0.0:8883",
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
        ])
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");

        let err = base_args(&[
            "--tls-listen=0.0.0.0:8883",
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
            "--jwt-secret=0123456789abcdef0123456789abcdef",
        ])
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("HANDLER_KEYS"), "{err}");
    }

    #[test]
    fn refuses_bad_values_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let dev = format!("--dev-dir={}", dir.path().display());
        for (flag, needle) in [
            ("--handler-keys=short", "HANDLER_KEYS"),
            ("--command-topics=cmd/#", "COMMAND_TOPICS"),
            ("--command-topics=$SYS/x", "COMMAND_TOPICS"),
            ("--max-packet-size=10", "BROKER_MAX_PACKET_SIZE"),
            ("--tls-cert=only-cert.pem", "BROKER_TLS_KEY"),
            ("--jwt-secret=", "JWT_SECRET"),
            ("--conn-burst=0", "BROKER_CONN_BURST"),
            ("--conn-rate=-1", "BROKER_CONN_RATE"),
            ("--trusted-proxies=10.0.0.1", "BROKER_TRUSTED_PROXIES"),
            ("--trusted-proxies=10.0.0.0/8,nope", "127.0.0.1/32"),
            ("--jwt-secret=s3cret", "openssl rand -hex 32"),
            (
                "--jwt-secret=0123456789abcdef0123456789abcde",
                "at least 32 bytes",
            ),
            ("--max-client-id-bytes=0", "BROKER_MAX_CLIENT_ID_BYTES"),
            ("--max-client-id-bytes=100000", "BROKER_MAX_CLIENT_ID_BYTES"),
            (
                "--device-max-topic-bytes=10",
                "BROKER_DEVICE_MAX_TOPIC_BYTES",
            ),
            (
                "--device-max-topic-levels=0",
                "BROKER_DEVICE_MAX_TOPIC_LEVELS",
            ),
            (
                "--handler-max-topic-bytes=70000",
                "BROKER_HANDLER_MAX_TOPIC_BYTES",
            ),
            (
                "--handler-max-topic-levels=0",
                "BROKER_HANDLER_MAX_TOPIC_LEVELS",
            ),
            (
                "--device-max-subscriptions=0",
                "BROKER_DEVICE_MAX_SUBSCRIPTIONS",
            ),
            (
                "--handler-max-subscriptions=0",
                "BROKER_HANDLER_MAX_SUBSCRIPTIONS",
            ),
            (
                "--max-persistent-sessions-per-user=100000",
                "BROKER_MAX_PERSISTENT_SESSIONS_PER_USER",
            ),
        ] {
            let err = base_args(&[flag, &dev]).resolve().unwrap_err();
            assert!(err.to_string().contains(needle), "{flag}: {err}");
        }
        assert!(BrokerArgs::try_from_argv(["broker", "--handlers=some"]).is_err());
        // 32 bytes exactly is enough.
        let (config, ..) = base_args(&["--jwt-secret=0123456789abcdef0123456789abcdef", &dev])
            .resolve()
            .expect("a 32-byte secret is accepted");
        let debug = format!("{config:?}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert_eq!(config.jwt.hmac_secret.map(|s| s.len()), Some(32));
    }
}
