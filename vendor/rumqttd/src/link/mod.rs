// patched: no panic reachable from a client's input in the router's paths
// (issue 9). Provably unreachable cases are allowed locally, with the reason.
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
pub mod alerts;
// Operator-side services the embedding broker does not start (a bridge to
// another broker, the HTTP console, the metrics timer): configuration and
// startup code, not reached by any client's input.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable
)]
pub mod bridge;
// Operator-side services the embedding broker does not start (a bridge to
// another broker, the HTTP console, the metrics timer): configuration and
// startup code, not reached by any client's input.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable
)]
pub mod console;
pub mod local;
pub mod meters;
pub mod network;
pub mod remote;
// Operator-side services the embedding broker does not start (a bridge to
// another broker, the HTTP console, the metrics timer): configuration and
// startup code, not reached by any client's input.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable
)]
pub mod timer;
