//! The rules every part of the product speaks, with no I/O: the broker, the
//! handlers, the identity service, the SDK and the load generator all build
//! on them.
//!
//! - [`uid`]: what a user id is, and its reply topics `<uid>_<name>`.
//! - [`topics`]: topic names, filters, matching, shared subscriptions, and the
//!   names on the wire (`JWT`, `handler`, the `user_id`/`client_id`/`token_iat`
//!   properties).
//! - [`claims`]: device token claims, and minting tokens (dev run, loadgen, tests).
//! - [`addr_key`] and [`admission`]: a client's source (an IPv4 address or an
//!   IPv6 /64) and per-source admission, for the MQTT and HTTP listeners.
//! - [`secret`]: the one masked, constant-time-compared [`Secret`].

pub mod addr_key;
pub mod admission;
pub mod claims;
pub mod secret;
pub mod topics;
pub mod uid;

pub use secret::Secret;
pub use uid::UserId;
