//! What every binary's configuration shares, so that each crate declares its
//! own variables once (a `clap::Args` struct) and binaries only flatten them.
//!
//! - [`config`]: parsing any crate's `clap::Args` from a lookup instead of the
//!   environment (tests, embedding), naming values after their variables,
//!   and reading `.env.example`, the list of every variable.
//! - [`telemetry`]: `RUST_LOG` and `LOG_FORMAT` ([`telemetry::LogArgs`]) and
//!   the one `init_tracing` (no colour codes off a terminal).

pub mod config;
pub mod telemetry;
