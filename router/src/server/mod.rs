//! Owns the baseline's plain TCP listeners (`loadgen bare-router`): the
//! router with no gate in front, for measuring what the gate costs.
mod broker;

pub use broker::Broker;
