//! Owns the identity service's configuration: every `IDP_*` / `SMS_*`
//! variable with its flag and safe default, and the checks that refuse an
//! absurd value at start-up with a message that says how to fix it.

use clap::Args;
use protocol::Secret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use store::StoreArgs;

/// The environment and flags of the identity service, flattened by the
/// `idp` binary and by `broker` (which runs it in-process). The store
/// (`REDIS_URL`, `DATA_DIR`) is the binary's [`StoreArgs`].
#[derive(Args, Clone, Debug)]
pub struct IdpArgs {
    /// HTTP address of the identity service.
    #[arg(long, env = "IDP_LISTEN", default_value = "127.0.0.1:8080")]
    pub idp_listen: SocketAddr,
    /// Base URL clients reach the service at (for `verify_url`); default `http://<IDP_LISTEN>`.
    #[arg(long, env = "IDP_PUBLIC_URL")]
    pub idp_public_url: Option<String>,
    /// `iss` of the tokens issued.
    #[arg(long, env = "IDP_ISSUER", default_value = "mqtt-broker-idp")]
    pub idp_issuer: String,
    /// `aud` of the tokens issued.
    #[arg(long, env = "IDP_AUDIENCE", default_value = "mqtt-broker")]
    pub idp_audience: String,
    /// Directory of the signing keys (PEM + metadata JSON), made on first start.
    #[arg(long, env = "IDP_KEYS_DIR", default_value = "data/idp-keys")]
    pub idp_keys_dir: PathBuf,
    /// Lifetime of an issued device token, in seconds.
    #[arg(long, env = "IDP_TOKEN_TTL", default_value_t = 86_400)]
    pub idp_token_ttl: u64,
    /// How long a retired key stays published beyond the token lifetime, in
    /// seconds (cover the verifiers' clock leeway).
    #[arg(long, env = "IDP_KEY_RETIRE_LEEWAY_SECS", default_value_t = 60)]
    pub idp_key_retire_leeway_secs: u64,
    /// `Cache-Control: max-age` of the JWKS, in seconds: how soon verifiers
    /// that honour it see a removed key gone.
    #[arg(long, env = "IDP_JWKS_MAX_AGE_SECS", default_value_t = 60)]
    pub idp_jwks_max_age_secs: u64,
    /// Secret the uid is derived from (HMAC-SHA256 of the number); at least
    /// 32 bytes. Unset: one is made and kept in IDP_KEYS_DIR/uid-secret.
    #[arg(long, env = "IDP_UID_SECRET", hide_env_values = true)]
    pub idp_uid_secret: Option<Secret>,
    /// Lifetime of a registration session (its token), in seconds.
    #[arg(long, env = "IDP_SESSION_TTL_SECS", default_value_t = 3600)]
    pub idp_session_ttl_secs: u64,
    /// Lifetime of a one-time code, in seconds.
    #[arg(long, env = "IDP_CODE_TTL_SECS", default_value_t = 300)]
    pub idp_code_ttl_secs: u64,
    /// Wrong codes a session may try before it is closed.
    #[arg(long, env = "IDP_MAX_CODE_ATTEMPTS", default_value_t = 5)]
    pub idp_max_code_attempts: u32,
    /// Codes a session may ask to be sent again.
    #[arg(long, env = "IDP_MAX_RESENDS", default_value_t = 3)]
    pub idp_max_resends: u32,
    /// Requests per minute for one phone number (registrations and SMS sent).
    #[arg(long, env = "IDP_RATE_PER_NUMBER", default_value_t = 5)]
    pub idp_rate_per_number: u32,
    /// Requests per minute from one client address.
    #[arg(long, env = "IDP_RATE_PER_ADDR", default_value_t = 60)]
    pub idp_rate_per_addr: u32,
    /// Device pairing claims (`POST /sync/pair`) per minute from one client
    /// address, on top of IDP_RATE_PER_ADDR: what a code guesser gets.
    #[arg(long, env = "IDP_PAIR_RATE_PER_ADDR", default_value_t = 10)]
    pub idp_pair_rate_per_addr: u32,
    /// Most connections the HTTP listener holds at once; beyond it a new
    /// connection is closed at accept. Each is a file descriptor taken from
    /// the process (the broker's, when in-process): checked at start against
    /// the open-file limit.
    #[arg(long, env = "IDP_MAX_CONNECTIONS", default_value_t = 256)]
    pub idp_max_connections: usize,
    /// Most connections one source address (an IPv6 /64 counts as one)
    /// holds at once; beyond it its new connections are closed at accept.
    #[arg(long, env = "IDP_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 16)]
    pub idp_max_connections_per_source: usize,
    /// Seconds a connection has to send a complete request head, counted from
    /// accept and, on a kept-alive connection, from the end of the previous
    /// response; past it the connection is closed.
    #[arg(long, env = "IDP_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub idp_header_read_timeout_secs: u64,
    /// Seconds a connection may go without a byte moving either way (a
    /// request body trickled, a response not read) before it is closed.
    #[arg(long, env = "IDP_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idp_idle_timeout_secs: u64,
    /// Most sessions and rate counters held by the embedded (no Redis) state.
    #[arg(long, env = "IDP_MAX_ENTRIES", default_value_t = 100_000)]
    pub idp_max_entries: usize,
    /// Bearer token of the admin endpoints (revoke, restore, key rotation);
    /// unset disables them. At least 16 characters.
    #[arg(long, env = "IDP_ADMIN_TOKEN", hide_env_values = true)]
    pub idp_admin_token: Option<Secret>,
    /// SMS provider endpoint: `POST` JSON `{"to","message"}`. Unset: codes are
    /// logged instead (development only).
    #[arg(long, env = "SMS_PROVIDER_URL")]
    pub sms_provider_url: Option<String>,
    /// Bearer credential sent to the SMS provider.
    #[arg(long, env = "SMS_PROVIDER_TOKEN", hide_env_values = true)]
    pub sms_provider_token: Option<Secret>,
    /// The number codes are sent from (answered by /sms/verify).
    #[arg(long, env = "SMS_SENDER", default_value = "+15550100000")]
    pub sms_sender: String,
    /// Whether the `broker` binary runs the identity service in-process
    /// (when it has a store: built-in handlers, or REDIS_URL).
    #[arg(long, env = "IDP_IN_PROCESS", default_value_t = true, action = clap::ArgAction::Set)]
    pub idp_in_process: bool,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub public_url: String,
    pub issuer: String,
    pub audience: String,
    pub keys_dir: PathBuf,
    pub token_ttl: Duration,
    pub key_retire_leeway: Duration,
    pub jwks_max_age: Duration,
    /// `None`: made and kept in the keys directory (see [`crate::keys::uid_secret`]).
    pub uid_secret: Option<Secret>,
    pub session_ttl: Duration,
    pub code_ttl: Duration,
    pub max_code_attempts: u32,
    pub max_resends: u32,
    pub rate_per_number: u32,
    pub rate_per_addr: u32,
    /// Pairing claims per minute from one address (`IDP_PAIR_RATE_PER_ADDR`).
    pub pair_rate_per_addr: u32,
    pub max_entries: usize,
    /// What the HTTP listener admits and how long it waits.
    pub connections: ConnectionLimits,
    pub admin_token: Option<Secret>,
    pub sms: SmsSettings,
    /// Sessions, codes and counters live in Redis when set (`REDIS_URL`),
    /// in memory otherwise.
    pub redis_url: Option<Secret>,
    pub in_process: bool,
}

/// What the HTTP listener admits and how long it waits (see `crate::server`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections held at once.
    pub max_connections: usize,
    /// Connections one source (an IPv6 /64 counting as one) holds at once.
    pub max_per_source: usize,
    /// From accept, or from the end of the last response, to a complete request head.
    pub header_read_timeout: Duration,
    /// Without a byte read or written.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 256,
            max_per_source: 16,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Where codes go.
#[derive(Clone, Debug)]
pub struct SmsSettings {
    /// `None`: development, codes are logged.
    pub provider_url: Option<String>,
    pub provider_token: Option<Secret>,
    pub sender: String,
}

/// Shortest accepted `IDP_UID_SECRET` and `IDP_ADMIN_TOKEN`.
pub const MIN_UID_SECRET_BYTES: usize = 32;
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

fn check_range(name: &str, value: u64, min: u64, max: u64, hint: &str) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(format!(
            "{name}={value} is out of range: use {min}..={max} ({hint})"
        )));
    }
    Ok(())
}

impl IdpArgs {
    /// Checks every value and builds the settings, over the store the
    /// binary configured.
    pub fn resolve(self, store: &StoreArgs) -> Result<Settings, ConfigError> {
        const DAY: u64 = 24 * 3600;
        check_range(
            "IDP_TOKEN_TTL",
            self.idp_token_ttl,
            1,
            90 * DAY,
            "seconds; a day is 86400",
        )?;
        check_range(
            "IDP_KEY_RETIRE_LEEWAY_SECS",
            self.idp_key_retire_leeway_secs,
            0,
            DAY,
            "seconds",
        )?;
        check_range(
            "IDP_JWKS_MAX_AGE_SECS",
            self.idp_jwks_max_age_secs,
            0,
            DAY,
            "seconds",
        )?;
        check_range(
            "IDP_SESSION_TTL_SECS",
            self.idp_session_ttl_secs,
            10,
            30 * DAY,
            "seconds",
        )?;
        check_range(
            "IDP_CODE_TTL_SECS",
            self.idp_code_ttl_secs,
            1,
            DAY,
            "seconds; 300 is usual",
        )?;
        check_range(
            "IDP_MAX_CODE_ATTEMPTS",
            self.idp_max_code_attempts.into(),
            1,
            20,
            "a handful: each try is a guess at a 6-digit code",
        )?;
        check_range(
            "IDP_MAX_RESENDS",
            self.idp_max_resends.into(),
            0,
            20,
            "each resend is an SMS paid for",
        )?;
        check_range(
            "IDP_RATE_PER_NUMBER",
            self.idp_rate_per_number.into(),
            1,
            10_000,
            "per minute",
        )?;
        check_range(
            "IDP_RATE_PER_ADDR",
            self.idp_rate_per_addr.into(),
            1,
            1_000_000,
            "per minute",
        )?;
        check_range(
            "IDP_PAIR_RATE_PER_ADDR",
            self.idp_pair_rate_per_addr.into(),
            1,
            10_000,
            "pairing claims per minute per address; a phone needs one or two",
        )?;
        check_range(
            "IDP_MAX_ENTRIES",
            self.idp_max_entries as u64,
            100,
            100_000_000,
            "entries",
        )?;
        check_range(
            "IDP_MAX_CONNECTIONS",
            self.idp_max_connections as u64,
            1,
            1_000_000,
            "connections; each is a file descriptor of the process",
        )?;
        check_range(
            "IDP_MAX_CONNECTIONS_PER_SOURCE",
            self.idp_max_connections_per_source as u64,
            1,
            1_000_000,
            "connections from one address; a browser opens about 6",
        )?;
        if self.idp_max_connections_per_source > self.idp_max_connections {
            return Err(invalid(format!(
                "IDP_MAX_CONNECTIONS_PER_SOURCE={} is above IDP_MAX_CONNECTIONS={}: one address could take every connection; lower it (16 is usual)",
                self.idp_max_connections_per_source, self.idp_max_connections
            )));
        }
        check_range(
            "IDP_HEADER_READ_TIMEOUT_SECS",
            self.idp_header_read_timeout_secs,
            1,
            300,
            "seconds; a client sends its request head at once, 10 is usual",
        )?;
        check_range(
            "IDP_IDLE_TIMEOUT_SECS",
            self.idp_idle_timeout_secs,
            1,
            3600,
            "seconds",
        )?;
        if self.idp_code_ttl_secs > self.idp_session_ttl_secs {
            return Err(invalid("IDP_CODE_TTL_SECS is longer than IDP_SESSION_TTL_SECS: a code cannot outlive its session; shorten the code TTL"));
        }
        for (name, value) in [
            ("IDP_ISSUER", &self.idp_issuer),
            ("IDP_AUDIENCE", &self.idp_audience),
        ] {
            if value.trim().is_empty() || value.len() > 256 {
                return Err(invalid(format!("{name} must be 1-256 characters")));
            }
        }
        if let Some(secret) = &self.idp_uid_secret {
            if secret.len() < MIN_UID_SECRET_BYTES {
                return Err(invalid(format!("IDP_UID_SECRET is shorter than {MIN_UID_SECRET_BYTES} bytes: make one with `openssl rand -hex 32` (and keep it: changing it changes every uid)")));
            }
        }
        if let Some(token) = &self.idp_admin_token {
            if token.len() < MIN_ADMIN_TOKEN_BYTES {
                return Err(invalid(format!("IDP_ADMIN_TOKEN is shorter than {MIN_ADMIN_TOKEN_BYTES} characters: make one with `openssl rand -hex 32`, or unset it to disable the admin endpoints")));
            }
        }
        if let Some(url) = &self.sms_provider_url {
            let parsed = reqwest::Url::parse(url).map_err(|_| {
                invalid("SMS_PROVIDER_URL is not a URL: use https://provider.example/messages")
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid("SMS_PROVIDER_URL must be an http(s) URL"));
            }
        }
        let public_url = match self.idp_public_url {
            Some(url) => {
                if reqwest::Url::parse(&url).is_err() {
                    return Err(invalid(
                        "IDP_PUBLIC_URL is not a URL: use e.g. https://idp.example.com",
                    ));
                }
                url.trim_end_matches('/').to_owned()
            }
            None => format!("http://{}", self.idp_listen),
        };
        Ok(Settings {
            listen: self.idp_listen,
            public_url,
            issuer: self.idp_issuer,
            audience: self.idp_audience,
            keys_dir: self.idp_keys_dir,
            token_ttl: Duration::from_secs(self.idp_token_ttl),
            key_retire_leeway: Duration::from_secs(self.idp_key_retire_leeway_secs),
            jwks_max_age: Duration::from_secs(self.idp_jwks_max_age_secs),
            uid_secret: self.idp_uid_secret,
            session_ttl: Duration::from_secs(self.idp_session_ttl_secs),
            code_ttl: Duration::from_secs(self.idp_code_ttl_secs),
            max_code_attempts: self.idp_max_code_attempts,
            max_resends: self.idp_max_resends,
            rate_per_number: self.idp_rate_per_number,
            rate_per_addr: self.idp_rate_per_addr,
            pair_rate_per_addr: self.idp_pair_rate_per_addr,
            max_entries: self.idp_max_entries,
            connections: ConnectionLimits {
                max_connections: self.idp_max_connections,
                max_per_source: self.idp_max_connections_per_source,
                header_read_timeout: Duration::from_secs(self.idp_header_read_timeout_secs),
                idle_timeout: Duration::from_secs(self.idp_idle_timeout_secs),
            },
            admin_token: self.idp_admin_token,
            sms: SmsSettings {
                provider_url: self.sms_provider_url,
                provider_token: self.sms_provider_token,
                sender: self.sms_sender,
            },
            redis_url: store.redis_url.clone(),
            in_process: self.idp_in_process,
        })
    }
}

impl Settings {
    /// Settings for tests: defaults, keys under `keys_dir`, generous rate
    /// limits, no SMS provider and no admin token (tests set what they need).
    pub fn for_tests(keys_dir: PathBuf) -> Settings {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: "http://127.0.0.1:0".into(),
            issuer: "test-idp".into(),
            audience: "mqtt-broker".into(),
            keys_dir,
            token_ttl: Duration::from_secs(3600),
            key_retire_leeway: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(60),
            uid_secret: Some(Secret::from("test-uid-secret-0123456789abcdef0123456789")),
            session_ttl: Duration::from_secs(600),
            code_ttl: Duration::from_secs(300),
            max_code_attempts: 5,
            max_resends: 3,
            rate_per_number: 100,
            rate_per_addr: 10_000,
            pair_rate_per_addr: 10_000,
            max_entries: 10_000,
            // Generous like the rates: suites run many clients from 127.0.0.1.
            connections: ConnectionLimits {
                max_connections: 4096,
                max_per_source: 4096,
                ..ConnectionLimits::default()
            },
            admin_token: None,
            sms: SmsSettings {
                provider_url: None,
                provider_token: None,
                sender: "+15550100000".into(),
            },
            redis_url: None,
            in_process: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `IdpArgs` parsed on its own, from flags only.
    #[derive(clap::Parser)]
    struct EnvOnly {
        #[command(flatten)]
        args: IdpArgs,
    }

    fn args() -> IdpArgs {
        setup::config::parse_from_lookup::<EnvOnly>("idp", |_| None)
            .unwrap()
            .args
    }

    const ENV_EXAMPLE: &str = include_str!("../../.env.example");

    /// Every variable here is documented in `.env.example`, and the values
    /// documented there parse and validate.
    #[test]
    fn env_example_documents_every_variable_with_valid_values() {
        use clap::CommandFactory;
        let documented = setup::config::documented_variables(ENV_EXAMPLE);
        for var in setup::config::variables_of(&EnvOnly::command()) {
            assert!(
                documented.iter().any(|(n, _)| *n == var),
                "{var} is missing from .env.example"
            );
        }
        let args = setup::config::parse_from_lookup::<EnvOnly>("idp", |var| {
            documented
                .iter()
                .find(|(n, _)| n == var)
                .and_then(|(_, value)| value.clone())
        })
        .unwrap()
        .args;
        let settings = args.resolve(&StoreArgs::default()).unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn defaults_resolve() {
        let settings = args().resolve(&StoreArgs::default()).unwrap();
        assert_eq!(settings.public_url, "http://127.0.0.1:8080");
        assert_eq!(settings.max_code_attempts, 5);
        assert_eq!(settings.code_ttl, Duration::from_secs(300));
        assert_eq!(settings.connections, ConnectionLimits::default());
        assert_eq!(settings.connections.max_connections, 256);
        assert_eq!(settings.connections.max_per_source, 16);
        assert_eq!(
            settings.connections.header_read_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(settings.connections.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn connection_limits_are_checked() {
        let refused = |change: fn(&mut IdpArgs)| {
            let mut a = args();
            change(&mut a);
            a.resolve(&StoreArgs::default()).unwrap_err().to_string()
        };
        assert!(refused(|a| a.idp_max_connections = 0).contains("IDP_MAX_CONNECTIONS="));
        assert!(refused(|a| a.idp_max_connections_per_source = 0)
            .contains("IDP_MAX_CONNECTIONS_PER_SOURCE"));
        let above = refused(|a| {
            a.idp_max_connections = 8;
            a.idp_max_connections_per_source = 9;
        });
        assert!(
            above.contains("one address could take every connection"),
            "{above}"
        );
        assert!(refused(|a| a.idp_header_read_timeout_secs = 0)
            .contains("IDP_HEADER_READ_TIMEOUT_SECS"));
        assert!(refused(|a| a.idp_idle_timeout_secs = 0).contains("IDP_IDLE_TIMEOUT_SECS"));
    }

    #[test]
    fn absurd_values_are_refused_with_a_fix() {
        let mut a = args();
        a.idp_token_ttl = 0;
        assert!(a
            .resolve(&StoreArgs::default())
            .unwrap_err()
            .to_string()
            .contains("IDP_TOKEN_TTL"));
        let mut a = args();
        a.idp_uid_secret = Some("short".into());
        assert!(a
            .resolve(&StoreArgs::default())
            .unwrap_err()
            .to_string()
            .contains("openssl rand"));
        let mut a = args();
        a.idp_admin_token = Some("short".into());
        assert!(a
            .resolve(&StoreArgs::default())
            .unwrap_err()
            .to_string()
            .contains("IDP_ADMIN_TOKEN"));
        let mut a = args();
        a.sms_provider_url = Some("ftp://x".into());
        assert!(a.resolve(&StoreArgs::default()).is_err());
        let mut a = args();
        a.idp_code_ttl_secs = 7200;
        assert!(a
            .resolve(&StoreArgs::default())
            .unwrap_err()
            .to_string()
            .contains("IDP_CODE_TTL_SECS"));
        for bad in [0, 10_001] {
            let mut a = args();
            a.idp_pair_rate_per_addr = bad;
            let err = a.resolve(&StoreArgs::default()).unwrap_err().to_string();
            assert!(
                err.contains("IDP_PAIR_RATE_PER_ADDR=") && err.contains("1..=10000"),
                "{err}"
            );
        }
        assert_eq!(
            args()
                .resolve(&StoreArgs::default())
                .unwrap()
                .pair_rate_per_addr,
            10
        );
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let mut a = args();
        a.idp_admin_token = Some("admin-token-very-secret".into());
        let settings = a.resolve(&StoreArgs::default()).unwrap();
        assert!(!format!("{settings:?}").contains("very-secret"));
    }
}
