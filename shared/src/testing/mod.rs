//! Test doubles shared by the test suites of every crate in the workspace.
//!
//! - [`RedisServer`]: a throwaway `redis-server` on a free loopback port, no
//!   persistence, killed on drop. Tests never skip: a missing binary panics.
//! - [`Platform`]: a fake platform HTTP endpoint (axum on `127.0.0.1:0`) that
//!   records every request and answers 200, a chosen status, or hangs.
//!
//! Compiled for this crate's own tests and, elsewhere, with the `test-support`
//! feature (enabled from the `[dev-dependencies]` of `handlers` and by `e2e`).
//! [`Platform`] needs axum, so it exists only with the feature.

#[cfg(feature = "test-support")]
mod platform;
mod redis_server;

#[cfg(feature = "test-support")]
pub use platform::{Mode, Platform, Received};
pub use redis_server::RedisServer;
