//! Owns the SDK's configuration: where the broker is (`BROKER_URL`), which CA
//! to trust (`BROKER_CA`), the handler key (`HANDLER_KEY`), declared once in
//! [`SdkArgs`], and the limits of a worker (concurrency, queue, timeouts).

use protocol::secret::Secret;
use std::path::PathBuf;
use std::time::Duration;

/// Default `BROKER_URL`: the broker's default TLS listener.
pub const DEFAULT_BROKER_URL: &str = "mqtts://localhost:8883";

/// How a standalone handler reaches the broker. Handler binaries flatten
/// it; the broker's in-process handlers get theirs from the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct SdkArgs {
    /// Where a standalone handler connects: mqtts://host:port (TLS) or mqtt://host:port.
    #[arg(long, env = "BROKER_URL", default_value = DEFAULT_BROKER_URL, value_parser = parse_broker_url)]
    pub broker_url: String,
    /// CA file (PEM) to trust for mqtts:// (the development CA is certs/dev/ca.pem).
    #[arg(long, env = "BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
    /// The handler key a standalone handler presents (one of the broker's HANDLER_KEYS).
    #[arg(long, env = "HANDLER_KEY", hide_env_values = true)]
    pub handler_key: Option<Secret>,
}

fn parse_broker_url(url: &str) -> Result<String, ConfigError> {
    Endpoint::parse(url).map(|_| url.to_owned())
}

/// A wrapper so that [`SdkArgs`] can be parsed on its own.
#[derive(clap::Parser)]
struct SdkOnly {
    #[command(flatten)]
    args: SdkArgs,
}

impl SdkArgs {
    /// The SDK configuration these arguments name, with default limits (not
    /// yet validated: see [`SdkConfig::validate`]).
    pub fn config(&self) -> SdkConfig {
        let key = self.handler_key.clone().unwrap_or_default();
        let mut config = SdkConfig::new(self.broker_url.clone(), key);
        config.broker_ca = self.broker_ca.clone();
        config
    }
}

/// Why the SDK configuration is unusable. Each message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set: {1}")]
    Missing(&'static str, &'static str),
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
    #[error("{0}")]
    Environment(String),
}

/// Default port of `mqtts://` URLs.
pub const DEFAULT_TLS_PORT: u16 = 8883;
/// Default port of `mqtt://` URLs.
pub const DEFAULT_TCP_PORT: u16 = 1883;

/// A parsed `BROKER_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `true` for `mqtts://`.
    pub tls: bool,
    /// Host name or IP address (also the TLS server name).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `mqtts://host[:port]` or `mqtt://host[:port]` (IPv6 as `[::1]`).
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            var: "BROKER_URL",
            reason: format!("{reason} (expected mqtts://host:port or mqtt://host:port)"),
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(invalid("unknown scheme"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '@', '?']) {
            return Err(invalid("only host and port are allowed"));
        }
        let default_port = if tls {
            DEFAULT_TLS_PORT
        } else {
            DEFAULT_TCP_PORT
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| invalid("unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(invalid("garbage after the IPv6 address")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("bad port"))?,
            None => default_port,
        };
        Ok(Endpoint {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

/// How a worker connects and how much work it takes on.
#[derive(Clone, Debug)]
pub struct SdkConfig {
    /// `mqtts://host:port` (TLS) or `mqtt://host:port` (plain TCP, loopback).
    pub broker_url: String,
    /// CA certificate file (PEM) to trust for `mqtts://`.
    pub broker_ca: Option<PathBuf>,
    /// The handler key (MQTT password with username `handler`).
    pub handler_key: Secret,
    /// MQTT client id; default `<worker name>-<random>`.
    pub client_id: Option<String>,
    /// Commands handled at the same time.
    pub concurrency: usize,
    /// Commands allowed to wait for a free slot; beyond this the sender gets
    /// `503 busy` at once.
    pub queue_limit: usize,
    /// Longest one command may take before the sender gets `504`.
    pub command_timeout: Duration,
    /// How long shutdown waits for in-flight commands.
    pub drain_timeout: Duration,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
}

impl SdkConfig {
    /// A configuration with default limits.
    pub fn new(broker_url: impl Into<String>, handler_key: impl Into<Secret>) -> Self {
        SdkConfig {
            broker_url: broker_url.into(),
            broker_ca: None,
            handler_key: handler_key.into(),
            client_id: None,
            concurrency: 64,
            queue_limit: 4096,
            command_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
        }
    }

    /// Sets the CA file to trust.
    pub fn with_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.broker_ca = Some(ca.into());
        self
    }

    /// Reads `BROKER_URL`, `BROKER_CA` (required for `mqtts://`) and
    /// `HANDLER_KEY` (required) from the environment, and checks them.
    pub fn from_env() -> Result<Self, ConfigError> {
        use clap::Parser;
        let args = SdkOnly::try_parse_from(["handler"])
            .map_err(|e| ConfigError::Environment(e.to_string()))?
            .args;
        let config = args.config();
        config.validate()?;
        Ok(config)
    }

    /// Checks the URL, that TLS has a CA file, and that there is a key.
    pub fn validate(&self) -> Result<Endpoint, ConfigError> {
        let endpoint = Endpoint::parse(&self.broker_url)?;
        if endpoint.tls && self.broker_ca.is_none() {
            return Err(ConfigError::Missing(
                "BROKER_CA",
                "mqtts:// needs the CA certificate file (PEM) that signed the broker's certificate",
            ));
        }
        if self.handler_key.is_empty() {
            return Err(ConfigError::Missing(
                "HANDLER_KEY",
                "set it to one of the broker's handler keys",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::Invalid {
                var: "concurrency",
                reason: "must be at least 1".into(),
            });
        }
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("mqtts://localhost:8883").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (true, "localhost", 8883));
        let e = Endpoint::parse("mqtt://127.0.0.1").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "127.0.0.1", 1883));
        let e = Endpoint::parse("mqtts://[::1]:9000/").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (true, "::1", 9000));
        for bad in [
            "http://x:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h:1",
            "mqtt://h:1/path",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_needs_a_ca_and_debug_hides_the_key() {
        let config = SdkConfig::new("mqtts://h:1", "sekrit");
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Missing("BROKER_CA", _))
        ));
        assert!(config.clone().with_ca("/ca.pem").validate().is_ok());
        assert!(!format!("{config:?}").contains("sekrit"));
        assert!(SdkConfig::new("mqtt://h:1", "").validate().is_err());
    }
}
