//! Owns the handler SDK: everything a lambda-like worker needs to serve
//! command topics through the broker, so that a new handler is about twenty
//! lines.
//!
//! ```text
//!  device ── PUBLISH sync {...} ──► broker (stamps user_id) ──► $share/<worker>/sync
//!                                                                   │ poll loop (never blocks)
//!                                                                   ▼
//!                                   handler task: parse JSON ─► Command<T> ─► your fn
//!                                                                   │ Ok(Reply) / Err(HandlerError)
//!  device ◄── <uid>_sync {..., request_id} ◄── broker ◄─────────────┘
//! ```
//!
//! - [`Worker`]: a name (the shared-subscription group, so instances split the
//!   load) and a handler per command topic, registered with [`Worker::on`].
//!   [`Worker::run`] connects as user `handler` over TLS (`mqtts://`) or TCP
//!   (`mqtt://`), MQTT 5, subscribes `$share/<name>/<topic>` with QoS 1 (one
//!   group per topic when a worker has several; see `Runner::filter`),
//!   reconnects with jittered exponential backoff (100 ms to 10 s) and
//!   re-subscribes, and on shutdown finishes in-flight commands.
//! - [`Command<T>`]: the sender's verified [`UserId`](protocol::UserId) from the
//!   broker's `user_id` user property (a publish without it is logged and
//!   dropped; the payload is never trusted for identity), the body parsed
//!   into `T` with serde, `request_id` and correlation data.
//! - [`Reply`]: JSON messages to `<uid>_<name>` topics; replies to the sender
//!   echo `request_id` (added to object bodies) and MQTT 5 correlation data.
//! - [`HandlerError`]: becomes `{"status": 4xx|5xx, "error": "..."}` on the
//!   sender's reply topic. Malformed JSON, a body that does not fit `T`, a
//!   handler panic (500) or timeout (504), and overload (503) are answered
//!   the same way: never a crash, never silence.
//! - Acknowledgement (`acks.rs`): a QoS 1 command's PUBACK goes to the
//!   broker only once its handling ended (reply or error reply handed to
//!   the connection, or refused/dropped by the SDK's checks), in the order
//!   the commands arrived, never on a later connection; so a command may be
//!   delivered twice (handlers are idempotent; `request_id` names a repeat).
//! - [`Publisher`] ([`Worker::publisher`]): messages on users' reply topics
//!   outside a command's reply (a session that outlives its command), and
//!   background tasks the worker's drain waits for.
//! - [`Worker::checking_revocations`]: before handler code runs, the
//!   broker's `token_iat` stamp is checked against the user's revocation in
//!   the store; a revoked sender gets `{"status": 401, "error": "token
//!   revoked"}`, a store outage 503 (fail closed).
//! - [`SdkArgs`] and [`SdkConfig`]: `BROKER_URL`, `BROKER_CA`, `HANDLER_KEY`
//!   and the limits.
//!
//! Concurrency: at most `concurrency` commands run at once (a semaphore);
//! up to `queue_limit` more wait; beyond that the sender gets `503 busy`.
//! Each command runs on its own task, so slow handler code never stalls the
//! MQTT connection.

mod acks;
mod command;
mod config;
mod job;
mod publisher;
pub mod tls;
mod worker;

pub use command::{Command, HandlerError, Message, Recipient, Reply};
pub use config::{ConfigError, Endpoint, SdkArgs, SdkConfig, DEFAULT_BROKER_URL};
pub use publisher::{PublishError, Publisher};
pub use worker::{SdkError, Worker};

use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM, for `main`.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests;
