//! Test doubles shared by the test suites of every crate in the workspace.
//!
//! - [`RedisServer`]: a throwaway `redis-server` on a free loopback port, no
//!   persistence, killed on drop. Tests never skip: a missing binary panics.
//! - [`RedisCluster`]: a throwaway Redis Cluster (3 masters, 3 replicas) on
//!   free loopback ports, with the faults tests inject (kill -9 a node, a
//!   failover, a slot moved), killed on drop.
//! - [`Platform`]: a fake platform HTTP endpoint (axum on `127.0.0.1:0`) that
//!   records every request and answers 200, a chosen status, or hangs.
//!
//! A crate of its own, used only as a dev-dependency (and by `e2e`): a
//! failure here is a failed test, so it may unwrap.

mod platform;
mod redis_cluster;
mod redis_server;

pub use platform::{Mode, Platform, Received};
pub use redis_cluster::{RedisCluster, NODE_TIMEOUT_MS};
pub use redis_server::RedisServer;
