//! Owns the links: the ways a client session reaches the router.
//! `local` is the one the broker uses (one link per client connection);
//! `remote` and `network` serve the baseline's plain TCP listeners (`server/`).
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
pub mod local;
pub mod network;
pub mod remote;
