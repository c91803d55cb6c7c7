//! The library the broker, the handlers and the load generator share.
//!
//! - [`uid`]: what a user id is, and its reply topics `<uid>_<name>`.
//! - [`topics`]: topic names, filters, matching, shared subscriptions, and the
//!   names on the wire (`JWT`, `handler`, the `user_id`/`client_id`/`token_iat`
//!   properties).
//! - [`claims`]: device token claims, and minting tokens (dev run, loadgen, tests).
//! - [`tls`]: client-side TLS trusting a given CA.
//! - [`envelope`]: the crypto of sync and publish (RSA-OAEP, RSA-PSS, AES-GCM).
//! - [`sdk`]: the handler SDK (`Worker`, `Command`, `Reply`) for lambda-like handlers.
//! - [`store`]: handler state on Redis or an embedded redb file (`store/SCHEMA.md`),
//!   configured by [`store::StoreArgs`].
//! - [`secret`]: the one masked, constant-time-compared [`Secret`].
//! - [`config`]: parsing any crate's `clap::Args` from a lookup, `.env.example`.
//! - [`telemetry`]: `RUST_LOG`/`LOG_FORMAT` and the one `init_tracing`.
//! - `testing` (tests and the `test-support` feature only): a throwaway
//!   `redis-server` and a fake platform HTTP endpoint for test suites.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable
    )
)]

pub mod addr_key;
pub mod admission;
pub mod claims;
pub mod config;
pub mod envelope;
pub mod sdk;
pub mod secret;
pub mod store;
pub mod telemetry;
// Test fixtures only: a failure there is a failed test, not input reaching a panic.
#[cfg(any(test, feature = "test-support"))]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
pub mod testing;
pub mod tls;
pub mod topics;
pub mod uid;

pub use secret::Secret;
pub use uid::UserId;
