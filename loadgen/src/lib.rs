//! The load generator: many JWT devices against an MQTT broker, an echo
//! handler answering their commands, round-trip latency and exact loss and
//! duplicate accounting, and the broker's CPU and memory from `/proc`.
//!
//! - [`mqtt`]: a lean client codec and TCP/TLS streams bound to chosen source addresses.
//! - [`payload`]: the message layout (sequence, timestamp, optional uid).
//! - [`run`]: one process's devices ([`run::Shard`]): connect, subscribe, pace, account.
//! - [`echo`]: the echo handler ([`echo::Echo`]).
//! - [`driver`]: a whole run, in one process or as a coordinator of child processes.
//! - [`stats`]: counters, histograms and the end report.
//! - [`procstat`]: CPU seconds and RSS of a process from `/proc`.
//! - [`ws`]: MQTT over WebSocket (`--ws`), the client side.
//! - [`bare`]: the vendored rumqttd router with its own listener, for the baseline.

pub mod bare;
mod device;
pub mod driver;
pub mod echo;
pub mod mqtt;
pub mod payload;
pub mod procstat;
pub mod run;
pub mod stats;
pub mod ws;

pub use driver::{run_in_process, DriveOptions};
pub use echo::{Echo, EchoConfig};
pub use mqtt::{Endpoint, MqttVersion};
pub use run::{DeviceAuth, JwtKey, RunConfig, Shard};
pub use stats::Report;

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] sdk::tls::TlsClientError),
    #[error("{0}")]
    Codec(#[from] mqtt::CodecError),
    #[error("{0}")]
    Setup(String),
    #[error("broker process: {0}")]
    Proc(#[from] procstat::ProcError),
    #[error("child process: {0}")]
    Child(String),
    #[error("redis: {0}")]
    Redis(String),
}
