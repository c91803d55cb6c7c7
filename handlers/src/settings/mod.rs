//! Owns the handlers' configuration: their variables ([`HandlerArgs`]:
//! `PLATFORMS` and each platform's `PLATFORM_<NAME>_*`, `GATEWAYS`,
//! `TOKENS_MASTER_KEY`, the tuning variables), composed with the SDK's
//! ([`SdkArgs`]: `BROKER_URL`, `BROKER_CA`, `HANDLER_KEY`) and the store's
//! ([`StoreArgs`]: `REDIS_URL`, `DATA_DIR`) into [`Settings`], with a
//! message that says how to fix each mistake. Each variable is declared
//! once, in the crate that owns it.

use crate::tokens::MasterKey;
use protocol::Secret;
use sdk::{SdkArgs, SdkConfig};
use setup::telemetry::LogArgs;
use std::path::PathBuf;
use std::time::Duration;
use store::StoreArgs;

mod pairing;
pub use pairing::{PairingSettings, DEFAULT_SYNC_PAIR_URL};

/// Why the configuration is unusable. Each message names the variable and
/// how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is invalid: {reason}")]
    Invalid { var: String, reason: String },
    #[error(transparent)]
    Sdk(#[from] sdk::ConfigError),
    /// A value the argument parser refused (its message names the variable).
    #[error("{0}")]
    Arguments(String),
}

fn invalid(var: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.into(),
        reason: reason.into(),
    }
}

/// The handlers' own variables, flattened by every binary that runs them
/// (the handler binaries, and `broker` for its in-process handlers).
#[derive(Debug, Clone, clap::Args)]
pub struct HandlerArgs {
    /// Where `publish` forwards each platform's messages: comma-separated
    /// name=url. Per platform, PLATFORM_<NAME>_HEADERS (`Name: value; ...`)
    /// adds request headers and PLATFORM_<NAME>_TOKEN (`required`/`optional`)
    /// says whether the user's stored token is needed.
    #[arg(long, env = "PLATFORMS")]
    pub platforms: Option<String>,
    /// Gateways returned by `sync`: comma-separated.
    #[arg(long, env = "GATEWAYS", value_delimiter = ',')]
    pub gateways: Vec<String>,
    /// Commands each handler works on at once (1 to 100000).
    #[arg(long, env = "HANDLER_CONCURRENCY", default_value_t = 64)]
    pub handler_concurrency: usize,
    /// How long a used publish nonce is remembered, in seconds.
    #[arg(long, env = "NONCE_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    pub nonce_ttl_secs: u64,
    /// Per-attempt HTTP timeout to a platform, in milliseconds (1 to 600000).
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,
    /// Retries after the first attempt (5xx and timeouts), 0 to 10.
    #[arg(long, env = "PUBLISH_RETRIES", default_value_t = 2)]
    pub publish_retries: u32,
    /// Master key sealing users' platform tokens (AES-256-GCM): 32 bytes as
    /// 64 hex characters or base64. Needed by `publish` and `tokens` with
    /// REDIS_URL; unset otherwise = a development key in DATA_DIR.
    #[arg(long, env = "TOKENS_MASTER_KEY", hide_env_values = true)]
    pub tokens_master_key: Option<Secret>,
    /// During a rotation: the old master key, still accepted for reading.
    #[arg(long, env = "TOKENS_MASTER_KEY_PREVIOUS", hide_env_values = true)]
    pub tokens_master_key_previous: Option<Secret>,
    /// Pairing (`sync_session`): seconds each one-time code lives before a
    /// new one replaces it (1 to 600).
    #[arg(long, env = "SYNC_SESSION_ROTATE_SECS", default_value_t = 15)]
    pub sync_session_rotate_secs: u64,
    /// Pairing: how many times a code is replaced before the session ends
    /// unclaimed (0 to 100; the session shows this many codes plus one).
    #[arg(long, env = "SYNC_SESSION_CHANGES", default_value_t = 3)]
    pub sync_session_changes: u32,
    /// Pairing: seconds the person has to confirm a phone that claimed the
    /// code (1 to 3600); the phone's request is held that long at most.
    #[arg(long, env = "SYNC_SESSION_PAUSED_SECS", default_value_t = 120)]
    pub sync_session_paused_secs: u64,
    /// Pairing: the identity service's public URL of `POST /sync/pair`; the
    /// QR code carries it with `?code=<code>`. Default: the identity
    /// service's default address (the `broker` binary uses its in-process
    /// one's).
    #[arg(long, env = "SYNC_PAIR_URL")]
    pub sync_pair_url: Option<String>,
}

/// Everything a handler binary reads: logging, the store, the way to the
/// broker and the handlers' own variables.
#[derive(Debug, Clone, clap::Parser)]
pub struct HandlerCli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub sdk: SdkArgs,
    #[command(flatten)]
    pub handler: HandlerArgs,
}

/// Where `publish` forwards one platform's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// The name devices use in `publish` (`"platform": "<name>"`).
    pub name: String,
    /// The HTTP(S) endpoint that receives the POST.
    pub url: reqwest::Url,
    /// Extra request headers (e.g. an API key), from `PLATFORM_<NAME>_HEADERS`;
    /// values are often credentials.
    pub headers: Vec<(String, Secret)>,
    /// Whether `publish` needs the user's stored token for this platform
    /// (`PLATFORM_<NAME>_TOKEN`, default `required`).
    pub token: TokenUse,
}

/// How `publish` uses a user's stored platform token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TokenUse {
    /// Forward with the stored token; without one, answer 424 and forward
    /// nothing (platforms that act on the user's own account).
    #[default]
    Required,
    /// Forward with the stored token when there is one, without it
    /// otherwise (platforms authenticated by the operator's headers).
    Optional,
}

/// Everything the built-in handlers need. Fields are public so that the
/// broker can override the broker connection for in-process handlers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `BROKER_URL`: `mqtts://host:port` or `mqtt://host:port`.
    pub broker_url: String,
    /// `BROKER_CA`: CA file (PEM) to trust for `mqtts://`.
    pub broker_ca: Option<PathBuf>,
    /// `HANDLER_KEY`: the password handlers log in with.
    pub handler_key: Secret,
    /// `REDIS_URL`: unset means the embedded store in `DATA_DIR`.
    pub redis_url: Option<Secret>,
    /// `DATA_DIR`: the embedded store and the server's RSA key.
    pub data_dir: PathBuf,
    /// `PLATFORMS`: `name=url,...`.
    pub platforms: Vec<Platform>,
    /// `GATEWAYS`: returned by `sync`.
    pub gateways: Vec<String>,
    /// `HANDLER_CONCURRENCY`: commands each handler runs at once.
    pub concurrency: usize,
    /// `NONCE_TTL_SECS`: how long a used nonce is remembered.
    pub nonce_ttl: Duration,
    /// `PUBLISH_TIMEOUT_MS`: per-attempt HTTP timeout.
    pub publish_timeout: Duration,
    /// `PUBLISH_RETRIES`: retries after the first attempt on 5xx/timeouts.
    pub publish_retries: u32,
    /// `TOKENS_MASTER_KEY`: seals platform tokens. `None`: a key generated
    /// once in `DATA_DIR/tokens_master_key` with the embedded store; with
    /// `REDIS_URL`, the handlers that seal (`publish`, `tokens`) refuse to
    /// start (processes sharing Redis need one key), the others need none.
    pub tokens_master_key: Option<MasterKey>,
    /// `TOKENS_MASTER_KEY_PREVIOUS`: still opens tokens sealed before a
    /// master-key rotation.
    pub tokens_master_key_previous: Option<MasterKey>,
    /// `SYNC_SESSION_*`, `SYNC_PAIR_URL`: device pairing.
    pub pairing: PairingSettings,
}

/// File name of the server's RSA key inside `DATA_DIR`.
pub const SERVER_KEY_FILE: &str = "server_key.pem";

impl Settings {
    /// Composes the handlers' settings from their own variables, the way to
    /// the broker and the store. `platform_vars` reads the per-platform
    /// variables (`PLATFORM_<NAME>_HEADERS`, `PLATFORM_<NAME>_TOKEN`), whose
    /// names depend on `PLATFORMS`: the environment in the binaries. A
    /// missing `HANDLER_KEY` is only an error when a handler connects (the
    /// broker supplies one to in-process handlers).
    pub fn compose(
        args: HandlerArgs,
        sdk: SdkArgs,
        store: StoreArgs,
        platform_vars: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = |var: &str| {
            platform_vars(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let pairing = pairing::from_args(&args)?;
        let platforms = match args.platforms.as_deref().map(str::trim) {
            Some(list) if !list.is_empty() => parse_platforms(list, &get)?,
            _ => Vec::new(),
        };
        let master_key = |var: &str, text: Option<Secret>| {
            text.filter(|t| !t.expose().trim().is_empty())
                .map(|t| MasterKey::parse(t.expose()).map_err(|e| invalid(var, e.to_string())))
                .transpose()
        };
        let tokens_master_key = master_key("TOKENS_MASTER_KEY", args.tokens_master_key)?;
        let tokens_master_key_previous = master_key(
            "TOKENS_MASTER_KEY_PREVIOUS",
            args.tokens_master_key_previous,
        )?;
        match (&tokens_master_key, &tokens_master_key_previous) {
            (None, Some(_)) => {
                return Err(invalid(
                    "TOKENS_MASTER_KEY_PREVIOUS",
                    "it needs TOKENS_MASTER_KEY (the new key) beside it",
                ))
            }
            (Some(current), Some(previous)) if current.id() == previous.id() => {
                return Err(invalid(
                    "TOKENS_MASTER_KEY_PREVIOUS",
                    "it is the same key as TOKENS_MASTER_KEY; set the old key there, or unset it",
                ))
            }
            _ => {}
        }
        Ok(Settings {
            broker_url: sdk.broker_url,
            broker_ca: sdk.broker_ca,
            handler_key: sdk.handler_key.unwrap_or_default(),
            redis_url: store.redis_url,
            data_dir: store.data_dir,
            platforms,
            gateways: args
                .gateways
                .iter()
                .map(|g| g.trim())
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
            concurrency: check_num("HANDLER_CONCURRENCY", args.handler_concurrency, 1, 100_000)?,
            nonce_ttl: Duration::from_secs(check_num(
                "NONCE_TTL_SECS",
                args.nonce_ttl_secs,
                1,
                u64::MAX,
            )?),
            publish_timeout: Duration::from_millis(check_num(
                "PUBLISH_TIMEOUT_MS",
                args.publish_timeout_ms,
                1,
                600_000,
            )?),
            publish_retries: check_num("PUBLISH_RETRIES", args.publish_retries, 0, 10)?,
            tokens_master_key,
            tokens_master_key_previous,
            pairing,
        })
    }

    /// The settings from variables read through `get` instead of the
    /// process environment (tests, embedding): exactly what the binaries
    /// read from the environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let cli: HandlerCli = setup::config::parse_from_lookup("handler", &get)
            .map_err(|e| ConfigError::Arguments(e.to_string()))?;
        Self::compose(cli.handler, cli.sdk, cli.store, get)
    }

    /// The store these settings name.
    pub fn store_args(&self) -> StoreArgs {
        StoreArgs {
            redis_url: self.redis_url.clone(),
            data_dir: self.data_dir.clone(),
        }
    }

    /// The SDK configuration for one handler.
    pub fn sdk_config(&self) -> Result<SdkConfig, ConfigError> {
        let mut config = SdkConfig::new(self.broker_url.clone(), self.handler_key.clone());
        config.broker_ca = self.broker_ca.clone();
        config.concurrency = self.concurrency;
        // Publishing may retry a slow platform: leave it room before 504.
        let attempts = self.publish_retries + 1;
        config.command_timeout =
            (self.publish_timeout * attempts + Duration::from_secs(5)).max(config.command_timeout);
        config.validate()?;
        Ok(config)
    }

    /// The platform called `name`.
    pub fn platform(&self, name: &str) -> Option<&Platform> {
        self.platforms.iter().find(|p| p.name == name)
    }

    /// Where the server's RSA key lives.
    pub fn server_key_path(&self) -> PathBuf {
        self.data_dir.join(SERVER_KEY_FILE)
    }
}

fn check_num<T: PartialOrd + std::fmt::Display>(
    var: &str,
    n: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if n >= min && n <= max {
        Ok(n)
    } else {
        Err(invalid(
            var,
            format!("expected a number from {min} to {max}"),
        ))
    }
}

/// The environment variable holding a platform's extra headers.
pub fn headers_var(platform: &str) -> String {
    format!("PLATFORM_{}_HEADERS", env_name(platform))
}

/// The environment variable saying whether a platform needs a stored token.
pub fn token_var(platform: &str) -> String {
    format!("PLATFORM_{}_TOKEN", env_name(platform))
}

/// A platform name as it appears in variable names: upper case, `_` for
/// anything else.
fn env_name(platform: &str) -> String {
    platform
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn parse_platforms(
    list: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Platform>, ConfigError> {
    let mut platforms: Vec<Platform> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, url)) = entry.split_once('=') else {
            return Err(invalid(
                "PLATFORMS",
                format!("{entry:?} is not name=url (example: PLATFORMS=twitter=https://pub.example/twitter,email=http://127.0.0.1:9000/email)"),
            ));
        };
        let (name, url) = (name.trim(), url.trim());
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "PLATFORMS",
                format!(
                    "platform name {name:?} may contain only letters, digits, '-', '_' and '.'"
                ),
            ));
        }
        if !store::valid_platform_name(name) {
            return Err(invalid(
                "PLATFORMS",
                format!(
                    "platform name {name:?} is longer than {} characters",
                    store::MAX_PLATFORM_LEN
                ),
            ));
        }
        if platforms.iter().any(|p| p.name == name) {
            return Err(invalid(
                "PLATFORMS",
                format!("platform {name:?} is listed twice"),
            ));
        }
        let url = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                invalid(
                    "PLATFORMS",
                    format!(
                        "the URL of platform {name:?} must be an absolute http:// or https:// URL"
                    ),
                )
            })?;
        let var = headers_var(name);
        let headers = match get(&var) {
            Some(text) => parse_headers(&var, &text)?,
            None => Vec::new(),
        };
        let token_var = token_var(name);
        let token = match get(&token_var).as_deref() {
            None | Some("required") => TokenUse::Required,
            Some("optional") => TokenUse::Optional,
            Some(_) => {
                return Err(invalid(
                    token_var,
                    "expected `required` (publish needs the user's stored token) or `optional`",
                ))
            }
        };
        platforms.push(Platform {
            name: name.to_owned(),
            url,
            headers,
            token,
        });
    }
    Ok(platforms)
}

/// `Name: value; Other: value`.
fn parse_headers(var: &str, text: &str) -> Result<Vec<(String, Secret)>, ConfigError> {
    let mut headers = Vec::new();
    for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = pair.split_once(':') else {
            return Err(invalid(var, "expected `Header-Name: value; Other: value`"));
        };
        let (name, value) = (name.trim(), value.trim());
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            || reqwest::header::HeaderValue::from_str(value).is_err()
        {
            // Never echo the value: it is probably a credential.
            return Err(invalid(
                var,
                format!("header {name:?} has an invalid name or value"),
            ));
        }
        headers.push((name.to_owned(), Secret::from(value)));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdk::DEFAULT_BROKER_URL;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn pairing_settings_default_and_refuse_bad_values() {
        let s = from(&[]).unwrap();
        assert_eq!(s.pairing.rotate, Duration::from_secs(15));
        assert_eq!(s.pairing.changes, 3);
        assert_eq!(s.pairing.paused, Duration::from_secs(120));
        assert_eq!(s.pairing.pair_url, DEFAULT_SYNC_PAIR_URL);
        let s = from(&[("SYNC_PAIR_URL", "https://idp.example.com/sync/pair")]).unwrap();
        assert_eq!(s.pairing.pair_url, "https://idp.example.com/sync/pair");
        for (var, value) in [
            ("SYNC_SESSION_ROTATE_SECS", "0"),
            ("SYNC_SESSION_CHANGES", "101"),
            ("SYNC_SESSION_PAUSED_SECS", "0"),
            ("SYNC_PAIR_URL", "idp.example.com/sync/pair"),
            ("SYNC_PAIR_URL", "https://idp.example.com/sync/pair?x=1"),
            ("SYNC_PAIR_URL", "ftp://idp.example.com/sync/pair"),
        ] {
            let err = from(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn defaults_and_full_config() {
        let s = from(&[]).unwrap();
        assert_eq!(s.broker_url, DEFAULT_BROKER_URL);
        assert!(s.redis_url.is_none() && s.platforms.is_empty());
        let s = from(&[
            ("BROKER_URL", "mqtt://127.0.0.1:1883"),
            ("HANDLER_KEY", "k"),
            ("REDIS_URL", "redis://127.0.0.1:6379/0"),
            ("DATA_DIR", "/tmp/x"),
            (
                "PLATFORMS",
                "twitter=https://pub.example/t, email=http://127.0.0.1:9/e",
            ),
            (
                "PLATFORM_TWITTER_HEADERS",
                "Authorization: Bearer abc; X-A: b",
            ),
            ("GATEWAYS", "+237123, +1555 ,"),
            ("PLATFORM_TWITTER_TOKEN", "optional"),
            (
                "TOKENS_MASTER_KEY",
                "abababababababababababababababababababababababababababababababab",
            ),
        ])
        .unwrap();
        assert_eq!(s.platforms.len(), 2);
        assert_eq!(s.platform("twitter").unwrap().headers.len(), 2);
        assert_eq!(s.platform("twitter").unwrap().token, TokenUse::Optional);
        assert_eq!(s.platform("email").unwrap().token, TokenUse::Required);
        assert!(s.tokens_master_key.is_some());
        assert_eq!(s.gateways, vec!["+237123", "+1555"]);
        assert!(s.sdk_config().is_ok());
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("Bearer") && !debug.contains("redis://") && !debug.contains("abab"),
            "{debug}"
        );
    }

    #[test]
    fn refuses_bad_values_with_advice() {
        let zeros = "00".repeat(32);
        let long_name = format!("{}=http://x", "a".repeat(65));
        for (vars, needle) in [
            (vec![("PLATFORMS", "twitter")], "name=url"),
            (vec![("PLATFORMS", "a=ftp://x")], "http"),
            (vec![("PLATFORMS", "a=http://x,a=http://y")], "twice"),
            (vec![("PLATFORMS", "a b=http://x")], "letters"),
            (vec![("REDIS_URL", "localhost:6379")], "redis://"),
            (vec![("BROKER_URL", "tcp://x")], "mqtts://"),
            (vec![("HANDLER_CONCURRENCY", "0")], "number"),
            (
                vec![("PLATFORMS", "a=http://x"), ("PLATFORM_A_TOKEN", "maybe")],
                "required",
            ),
            (vec![("TOKENS_MASTER_KEY", "short")], "openssl rand -hex 32"),
            (
                vec![("TOKENS_MASTER_KEY_PREVIOUS", zeros.as_str())],
                "needs TOKENS_MASTER_KEY",
            ),
            (
                vec![
                    ("TOKENS_MASTER_KEY", zeros.as_str()),
                    ("TOKENS_MASTER_KEY_PREVIOUS", zeros.as_str()),
                ],
                "same key",
            ),
            (vec![("PLATFORMS", long_name.as_str())], "longer"),
            (
                vec![
                    ("PLATFORMS", "a=http://x"),
                    ("PLATFORM_A_HEADERS", "novalue"),
                ],
                "Header-Name",
            ),
        ] {
            let err = from(&vars).unwrap_err().to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
        // A handler key is needed to connect, not to read the settings.
        let s = from(&[]).unwrap();
        assert!(s
            .sdk_config()
            .unwrap_err()
            .to_string()
            .contains("BROKER_CA"));
        let s = from(&[("BROKER_URL", "mqtt://127.0.0.1:1883")]).unwrap();
        let err = s.sdk_config().unwrap_err().to_string();
        assert!(err.contains("HANDLER_KEY"), "{err}");
    }
}
