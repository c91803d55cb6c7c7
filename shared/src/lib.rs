//! The library the broker, the handlers and the load generator share.
//!
//! - [`uid`]: what a user id is, and its reply topics `<uid>_<name>`.
//! - [`topics`]: topic names, filters, matching, shared subscriptions, and the
//!   names on the wire (`JWT`, `handler`, the `user_id`/`client_id` properties).
//! - [`claims`]: device token claims, and minting tokens (dev run, loadgen, tests).
//! - [`tls`]: client-side TLS trusting a given CA.
//! - [`envelope`]: the crypto of sync and publish (RSA-OAEP, RSA-PSS, AES-GCM).
//! - [`sdk`]: the handler SDK (`Worker`, `Command`, `Reply`) for lambda-like handlers.
//! - [`store`]: handler state on Redis or an embedded redb file (`store/SCHEMA.md`).
//! - `testing` (tests and the `test-support` feature only): a throwaway
//!   `redis-server` and a fake platform HTTP endpoint for test suites.
pub mod claims;
pub mod envelope;
pub mod sdk;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tls;
pub mod topics;
pub mod uid;

pub use uid::UserId;
