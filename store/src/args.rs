//! Owns the store's configuration (`REDIS_URL`, `DATA_DIR`) and opening the
//! store it names; every binary flattens [`StoreArgs`] once and hands the
//! opened store to the components that share it.

use crate::{RedisTarget, Store, StoreError};
use protocol::secret::Secret;
use std::path::PathBuf;
use std::sync::Arc;

/// Default `DATA_DIR`.
pub const DEFAULT_DATA_DIR: &str = "data";

/// Where state shared by handler processes, the identity service and broker
/// nodes lives.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Redis for state shared by handler processes and broker nodes: one URL
    /// (redis://[:password@]host[:port][/db]) for one Redis, several
    /// comma-separated node URLs for Redis Cluster; unset = the embedded store in DATA_DIR.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = parse_redis_url)]
    pub redis_url: Option<Secret>,
    /// Where the embedded store and the server's RSA key pair (sync) live.
    #[arg(long, env = "DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

impl Default for StoreArgs {
    fn default() -> Self {
        StoreArgs {
            redis_url: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
        }
    }
}

/// Checks `REDIS_URL` at start ([`RedisTarget::parse`]) so that a bad list
/// is refused with its fix before anything runs.
fn parse_redis_url(url: &str) -> Result<Secret, String> {
    RedisTarget::parse(url)
        .map(|_| Secret::from(url))
        .map_err(|e| e.to_string())
}

impl StoreArgs {
    /// The Redis URL, when one is configured.
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_ref().map(Secret::expose)
    }

    /// What `REDIS_URL` names (one Redis or a cluster), for a component that
    /// opens connections of its own (cross-node delivery); `None` without it.
    pub fn redis_target(&self) -> Option<RedisTarget> {
        // Checked when parsed: a value that fails here was never accepted.
        self.redis_url()
            .and_then(|url| RedisTarget::parse(url).ok())
    }

    /// Opens the store: Redis (waiting for its first answer) when
    /// `REDIS_URL` is set, else the embedded store in `DATA_DIR`.
    pub async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        super::open(self.redis_url(), &self.data_dir).await
    }

    /// Like [`StoreArgs::open`], on the calling thread and without contacting
    /// Redis (it is connected on first use): for start-up code that is not async.
    pub fn open_blocking(&self) -> Result<Arc<dyn Store>, StoreError> {
        super::open_blocking(self.redis_url(), &self.data_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_url_without_its_scheme_and_masks_it() {
        let parse = |url: &str| {
            setup::config::parse_from_lookup::<Cli>("x", |var| {
                (var == "REDIS_URL").then(|| url.to_owned())
            })
        };
        let err = parse("localhost:6379").unwrap_err().to_string();
        assert!(
            err.contains("redis://") && err.contains("REDIS_URL"),
            "{err}"
        );
        let err = parse("redis://127.0.0.1:7000,,redis://127.0.0.1:7001")
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 2") && err.contains("comma"), "{err}");
        let args = parse("redis://127.0.0.1:7000, redis://127.0.0.1:7001")
            .unwrap()
            .store;
        assert!(args.redis_target().unwrap().is_cluster());
        let args = parse("redis://:hunter2@127.0.0.1:6379/0").unwrap().store;
        assert!(!args.redis_target().unwrap().is_cluster());
        assert_eq!(args.redis_url(), Some("redis://:hunter2@127.0.0.1:6379/0"));
        assert!(!format!("{args:?}").contains("hunter2"));
        assert_eq!(args.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        store: StoreArgs,
    }
}
