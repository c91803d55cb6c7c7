//! Owns the handlers' configuration: reading and checking the environment
//! (`BROKER_URL`, `BROKER_CA`, `HANDLER_KEY`, `REDIS_URL`, `DATA_DIR`,
//! `PLATFORMS`, `GATEWAYS`, `TOKENS_MASTER_KEY`, and the optional tuning
//! variables), with a message that says how to fix each mistake.

use crate::tokens::MasterKey;
use shared::sdk::SdkConfig;
use std::path::PathBuf;
use std::time::Duration;

/// Why the configuration is unusable. Each message names the variable and
/// how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is invalid: {reason}")]
    Invalid { var: String, reason: String },
    #[error(transparent)]
    Sdk(#[from] shared::sdk::ConfigError),
}

fn invalid(var: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.into(),
        reason: reason.into(),
    }
}

/// Where `publish` forwards one platform's messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Platform {
    /// The name devices use in `publish` (`"platform": "<name>"`).
    pub name: String,
    /// The HTTP(S) endpoint that receives the POST.
    pub url: reqwest::Url,
    /// Extra request headers (e.g. an API key), from `PLATFORM_<NAME>_HEADERS`.
    pub headers: Vec<(String, String)>,
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

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are often credentials: print names only.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Platform")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("headers", &names)
            .field("token", &self.token)
            .finish()
    }
}

/// Everything the built-in handlers need. Fields are public so that the
/// broker can override the broker connection for in-process handlers.
#[derive(Clone)]
pub struct Settings {
    /// `BROKER_URL`: `mqtts://host:port` or `mqtt://host:port`.
    pub broker_url: String,
    /// `BROKER_CA`: CA file (PEM) to trust for `mqtts://`.
    pub broker_ca: Option<PathBuf>,
    /// `HANDLER_KEY`: the password handlers log in with.
    pub handler_key: String,
    /// `REDIS_URL`: unset means the embedded store in `DATA_DIR`.
    pub redis_url: Option<String>,
    /// `DATA_DIR`: the embedded store and the server's RSA key (default `./data`).
    pub data_dir: PathBuf,
    /// `PLATFORMS`: `name=url,...`.
    pub platforms: Vec<Platform>,
    /// `GATEWAYS`: returned by `sync`.
    pub gateways: Vec<String>,
    /// `HANDLER_CONCURRENCY`: commands each handler runs at once (default 64).
    pub concurrency: usize,
    /// `NONCE_TTL_SECS`: how long a used nonce is remembered (default 30 days).
    pub nonce_ttl: Duration,
    /// `PUBLISH_TIMEOUT_MS`: per-attempt HTTP timeout (default 5000).
    pub publish_timeout: Duration,
    /// `PUBLISH_RETRIES`: retries after the first attempt on 5xx/timeouts (default 2).
    pub publish_retries: u32,
    /// `TOKENS_MASTER_KEY`: seals platform tokens. `None`: a key generated
    /// once in `DATA_DIR/tokens_master_key` (refused by [`Settings::from_env`]
    /// when `REDIS_URL` is set: processes sharing Redis need one key).
    pub tokens_master_key: Option<MasterKey>,
    /// `TOKENS_MASTER_KEY_PREVIOUS`: still opens tokens sealed before a
    /// master-key rotation.
    pub tokens_master_key_previous: Option<MasterKey>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("broker_url", &self.broker_url)
            .field("broker_ca", &self.broker_ca)
            .field("handler_key", &"***")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "***"))
            .field("data_dir", &self.data_dir)
            .field("platforms", &self.platforms)
            .field("gateways", &self.gateways)
            .field("concurrency", &self.concurrency)
            .field("nonce_ttl", &self.nonce_ttl)
            .field("publish_timeout", &self.publish_timeout)
            .field("publish_retries", &self.publish_retries)
            .field(
                "tokens_master_key",
                &self.tokens_master_key.as_ref().map(|_| "***"),
            )
            .field(
                "tokens_master_key_previous",
                &self.tokens_master_key_previous.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// Default `BROKER_URL` when unset.
pub const DEFAULT_BROKER_URL: &str = "mqtts://localhost:8883";
/// Default `DATA_DIR` when unset.
pub const DEFAULT_DATA_DIR: &str = "data";
/// File name of the server's RSA key inside `DATA_DIR`.
pub const SERVER_KEY_FILE: &str = "server_key.pem";

impl Default for Settings {
    fn default() -> Self {
        Settings {
            broker_url: DEFAULT_BROKER_URL.into(),
            broker_ca: None,
            handler_key: String::new(),
            redis_url: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            platforms: Vec::new(),
            gateways: Vec::new(),
            concurrency: 64,
            nonce_ttl: Duration::from_secs(30 * 24 * 3600),
            publish_timeout: Duration::from_secs(5),
            publish_retries: 2,
            tokens_master_key: None,
            tokens_master_key_previous: None,
        }
    }
}

impl Settings {
    /// Reads the environment. Unset variables take their defaults; a missing
    /// `HANDLER_KEY` is only an error when a handler connects (the broker
    /// may supply one for in-process handlers).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Like [`Settings::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |var: &str| {
            get(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut s = Settings::default();
        if let Some(url) = get("BROKER_URL") {
            shared::sdk::Endpoint::parse(&url)?;
            s.broker_url = url;
        }
        s.broker_ca = get("BROKER_CA").map(PathBuf::from);
        s.handler_key = get("HANDLER_KEY").unwrap_or_default();
        if let Some(url) = get("REDIS_URL") {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "REDIS_URL",
                    "expected redis://[:password@]host[:port][/db]; unset it to use the embedded store",
                ));
            }
            s.redis_url = Some(url);
        }
        if let Some(dir) = get("DATA_DIR") {
            s.data_dir = PathBuf::from(dir);
        }
        if let Some(list) = get("PLATFORMS") {
            s.platforms = parse_platforms(&list, &get)?;
        }
        if let Some(list) = get("GATEWAYS") {
            s.gateways = list
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(n) = get("HANDLER_CONCURRENCY") {
            s.concurrency = parse_num::<usize>("HANDLER_CONCURRENCY", &n, 1, 100_000)?;
        }
        if let Some(n) = get("NONCE_TTL_SECS") {
            s.nonce_ttl = Duration::from_secs(parse_num("NONCE_TTL_SECS", &n, 1, u64::MAX)?);
        }
        if let Some(n) = get("PUBLISH_TIMEOUT_MS") {
            s.publish_timeout =
                Duration::from_millis(parse_num("PUBLISH_TIMEOUT_MS", &n, 1, 600_000)?);
        }
        if let Some(n) = get("PUBLISH_RETRIES") {
            s.publish_retries = parse_num("PUBLISH_RETRIES", &n, 0, 10)?;
        }
        let master_key = |var: &str| {
            get(var)
                .map(|text| MasterKey::parse(&text).map_err(|e| invalid(var, e.to_string())))
                .transpose()
        };
        s.tokens_master_key = master_key("TOKENS_MASTER_KEY")?;
        s.tokens_master_key_previous = master_key("TOKENS_MASTER_KEY_PREVIOUS")?;
        match (&s.tokens_master_key, &s.tokens_master_key_previous) {
            (None, _) if s.redis_url.is_some() => {
                return Err(invalid(
                    "TOKENS_MASTER_KEY",
                    "it is required with REDIS_URL (every process sharing Redis must seal platform tokens under the same key): set it to 32 random bytes, e.g. TOKENS_MASTER_KEY=$(openssl rand -hex 32)",
                ))
            }
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
        Ok(s)
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

fn parse_num<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    var: &str,
    text: &str,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    match text.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(invalid(
            var,
            format!("expected a number from {min} to {max}"),
        )),
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
        if !shared::store::valid_platform_name(name) {
            return Err(invalid(
                "PLATFORMS",
                format!(
                    "platform name {name:?} is longer than {} characters",
                    shared::store::MAX_PLATFORM_LEN
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
fn parse_headers(var: &str, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
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
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
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
                vec![("REDIS_URL", "redis://127.0.0.1:1")],
                "TOKENS_MASTER_KEY",
            ),
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
