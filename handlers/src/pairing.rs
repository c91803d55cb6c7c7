//! Owns device pairing over MQTT, SWOB's synchronization session: a
//! signed-in device or browser publishes `sync_session {}` and gets
//! one-time codes on `<uid>_sync_session`, a new one every
//! `SYNC_SESSION_ROTATE_SECS`; a phone claims a code through the identity
//! service (`POST /sync/pair`), the browser is told `201 pause`, and the
//! person answers with `sync_session_confirm {"accept": bool}`. On accept
//! this handler makes the phone's sync result ([`crate::sync::issue_key`],
//! exactly what `sync` gives) and leaves it in the pairing record, where
//! the identity service picks it up and adds the phone's device token.
//!
//! Each open session has a driver task here that polls the record every
//! [`POLL`] (the identity service may be another process; the store is
//! where the two meet): it rotates the code, tells the browser `pause` once
//! a phone claimed it, and `expired` when the codes run out or nobody
//! decided in time. Every step that decides is an atomic transition in
//! the store ([`store::Pairings`]), so two instances of this handler (or a
//! confirm reaching another instance than the driver) cannot disagree.
//!
//! Messages on `<uid>_sync_session` (each echoes the opening command's
//! `request_id`, the confirm's reply the confirm's):
//! - `{"status": 200, "state": "code", "code", "url", "expires_in"}`
//! - `{"status": 201, "state": "pause"}`: a phone claimed the code
//! - `{"status": 200, "state": "ack"}`: confirmed; the phone has its result
//! - `{"status": 200, "state": "declined"}`: the person said no
//! - `{"status": 408, "state": "expired"}`: no phone in time, or no decision
//! - `{"status": 409, "error"}`: a confirm with nothing waiting for it

use crate::Shared;
use envelope::ServerKey;
use sdk::{Command, HandlerError, Publisher, Reply, Worker};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use store::{now_millis, PairingCode, PairingOutcome, PairingRecord, PairingState, Rotation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The reply name of every pairing message: `<uid>_sync_session`.
pub const SESSION_REPLY: &str = "sync_session";
/// The command that opens a session.
pub const OPEN_COMMAND: &str = "sync_session";
/// The command that answers a phone's claim.
pub const CONFIRM_COMMAND: &str = "sync_session_confirm";
/// How often a driver reads its session's record: the most this adds to
/// the browser's `pause` after a phone's claim, and to a rotation.
pub const POLL: Duration = Duration::from_millis(250);
/// Open sessions one handler process drives at once (one small task
/// each); beyond it `sync_session` is answered 503.
pub const MAX_LIVE_SESSIONS: usize = 10_000;
/// How long past a pause's deadline a driver leaves the identity service
/// (which holds the phone's request) to time the session out, before it
/// does so itself (an identity service that died).
const TIMEOUT_GRACE_MS: u64 = 5_000;

/// The `sync_session` command: no fields (a `request_id` is echoed).
#[derive(Debug, Deserialize)]
pub struct OpenIn {}

/// The `sync_session_confirm` command.
#[derive(Debug, Deserialize)]
pub struct ConfirmIn {
    /// Pair the phone that claimed the code (`true`) or refuse it.
    pub accept: bool,
}

/// The pairing commands' shared state.
struct Pairing {
    shared: Arc<Shared>,
    server_key: Arc<ServerKey>,
    publisher: Publisher,
    /// Places for live sessions' drivers ([`MAX_LIVE_SESSIONS`]).
    live: Arc<Semaphore>,
}

/// Adds `sync_session` and `sync_session_confirm` to the sync worker.
pub fn serve(worker: Worker, shared: Arc<Shared>, server_key: Arc<ServerKey>) -> Worker {
    let pairing = Arc::new(Pairing {
        shared,
        server_key,
        publisher: worker.publisher(),
        live: Arc::new(Semaphore::new(MAX_LIVE_SESSIONS)),
    });
    let opener = Arc::clone(&pairing);
    worker
        .on(OPEN_COMMAND, move |cmd: Command<OpenIn>| {
            let pairing = Arc::clone(&opener);
            async move { pairing.open(cmd).await }
        })
        // Errors go where the page listens: `<uid>_sync_session`.
        .on_with_errors_to(
            CONFIRM_COMMAND,
            SESSION_REPLY,
            move |cmd: Command<ConfirmIn>| {
                let pairing = Arc::clone(&pairing);
                async move { pairing.confirm(cmd).await }
            },
        )
}

/// The message showing `code`.
fn code_message(settings: &crate::settings::PairingSettings, code: &PairingCode) -> Value {
    let text = code.expose();
    json!({
        "status": 200,
        "state": "code",
        "url": format!("{}?code={text}", settings.pair_url),
        "code": text,
        "expires_in": settings.rotate.as_secs().max(1),
    })
}

impl Pairing {
    /// `sync_session`: opens a session (ending the user's previous one) and
    /// answers with its first code; a driver task takes it from there.
    async fn open(&self, cmd: Command<OpenIn>) -> Result<Reply, HandlerError> {
        let permit = Arc::clone(&self.live).try_acquire_owned().map_err(|_| {
            tracing::warn!("pairing sessions at their cap: refusing a new one");
            HandlerError::unavailable("too many pairing sessions; try again later")
        })?;
        let settings = &self.shared.settings.pairing;
        let code = PairingCode::generate(&store::new_session_id());
        let record = PairingRecord::open(
            &cmd.user_id,
            cmd.token_iat,
            &code,
            settings.rotate,
            settings.paused,
        );
        let lifetime = record.lifetime(settings.changes.saturating_add(1), settings.rotate);
        self.shared.store.open_pairing(&record, lifetime).await?;
        let driver = Driver {
            shared: Arc::clone(&self.shared),
            publisher: self.publisher.clone(),
            session: record.session.clone(),
            uid: cmd.user_id.clone(),
            request_id: cmd.request_id.clone(),
            correlation_data: cmd.correlation_data.clone(),
            ends: tokio::time::Instant::now() + lifetime,
        };
        if !self.publisher.spawn(driver.run(permit)) {
            return Err(HandlerError::unavailable("shutting down; try again"));
        }
        tracing::info!(uid = %cmd.user_id, session = %record.session, "pairing session opened");
        Ok(Reply::json(SESSION_REPLY, code_message(settings, &code)))
    }

    /// `sync_session_confirm`: the person's decision on the phone that
    /// claimed the code of the sender's own session (the broker's
    /// `user_id`; no other user's session can be reached from here).
    async fn confirm(&self, cmd: Command<ConfirmIn>) -> Result<Reply, HandlerError> {
        let store = &self.shared.store;
        let accept = cmd.body.accept;
        let Some(record) = store
            .decide_pairing(&cmd.user_id, accept, now_millis())
            .await?
        else {
            return Err(HandlerError::conflict(
                "no pairing is waiting for your confirmation",
            ));
        };
        if !accept {
            tracing::info!(uid = %cmd.user_id, session = %record.session, "pairing declined");
            return Ok(Reply::json(
                SESSION_REPLY,
                json!({"status": 200, "state": "declined"}),
            ));
        }
        let public_key = record.public_key.clone().unwrap_or_default();
        let made = crate::sync::issue_key(
            &self.shared,
            &self.server_key,
            &cmd.user_id,
            cmd.token_iat,
            public_key,
        )
        .await;
        let session = record.session.as_str();
        match made {
            Ok(result) => {
                let text = result.to_string();
                let outcome = PairingOutcome::Result(&text);
                let done = store
                    .transition_pairing(
                        session,
                        PairingState::Accepted,
                        PairingState::Done,
                        outcome,
                    )
                    .await?;
                if !done {
                    return Err(HandlerError::new(
                        410,
                        "the pairing session ended meanwhile",
                    ));
                }
                tracing::info!(uid = %cmd.user_id, %session, "pairing confirmed; the phone gets its key");
                Ok(Reply::json(
                    SESSION_REPLY,
                    json!({"status": 200, "state": "ack"}),
                ))
            }
            Err(error) => {
                let outcome = PairingOutcome::Status(error.status);
                let _ = store
                    .transition_pairing(
                        session,
                        PairingState::Accepted,
                        PairingState::Failed,
                        outcome,
                    )
                    .await;
                Err(error)
            }
        }
    }
}

/// One open session's driver.
struct Driver {
    shared: Arc<Shared>,
    publisher: Publisher,
    session: String,
    uid: protocol::UserId,
    request_id: Option<String>,
    correlation_data: Option<bytes::Bytes>,
    /// When the record expires: nothing is left to drive after it.
    ends: tokio::time::Instant,
}

impl Driver {
    async fn run(self, _place: OwnedSemaphorePermit) {
        let mut told_pause = false;
        loop {
            tokio::select! {
                _ = self.publisher.stopping() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            if tokio::time::Instant::now() >= self.ends {
                return;
            }
            let record = match self.shared.store.pairing(&self.session).await {
                Ok(Some(record)) => record,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(session = %self.session, %error, "pairing session unreadable; retrying");
                    continue;
                }
            };
            let finished = match record.state {
                PairingState::Code => self.maybe_rotate(&record).await,
                PairingState::Paused => {
                    if !told_pause {
                        told_pause = true;
                        self.tell(json!({"status": 201, "state": "pause"})).await;
                    }
                    let overdue =
                        now_millis() > record.deadline_ms.saturating_add(TIMEOUT_GRACE_MS);
                    overdue && self.end(PairingState::Paused, PairingState::TimedOut).await
                }
                // The confirm is making the result; its reply says `ack`.
                PairingState::Accepted => false,
                PairingState::TimedOut => {
                    self.tell(json!({"status": 408, "state": "expired"})).await;
                    true
                }
                PairingState::Done
                | PairingState::Failed
                | PairingState::Declined
                | PairingState::Expired
                | PairingState::Replaced => true,
            };
            if finished {
                return;
            }
        }
    }

    /// Replaces the code once it has expired; ends the session (`expired`)
    /// after the last one. `true` when the session is over.
    async fn maybe_rotate(&self, record: &PairingRecord) -> bool {
        if now_millis() < record.code_expires_ms {
            return false;
        }
        let settings = &self.shared.settings.pairing;
        if record.generation >= settings.changes {
            return self.end(PairingState::Code, PairingState::Expired).await;
        }
        let code = PairingCode::generate(&self.session);
        let rotation = Rotation {
            session: &self.session,
            code: &code,
            generation: record.generation,
            code_life: settings.rotate,
        };
        match self.shared.store.rotate_pairing_code(rotation).await {
            Ok(true) => self.tell(code_message(settings, &code)).await,
            Ok(false) => {} // claimed or replaced meanwhile: the next poll sees it
            Err(error) => tracing::warn!(session = %self.session, %error, "code rotation failed"),
        }
        false
    }

    /// Moves the session from `from` to `to` (expired or timed out) and
    /// tells the browser; `true` when it did.
    async fn end(&self, from: PairingState, to: PairingState) -> bool {
        let store = &self.shared.store;
        match store
            .transition_pairing(&self.session, from, to, PairingOutcome::Nothing)
            .await
        {
            Ok(true) => {
                tracing::info!(session = %self.session, state = to.as_str(), "pairing session ended");
                self.tell(json!({"status": 408, "state": "expired"})).await;
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(session = %self.session, %error, "pairing session could not be ended");
                false
            }
        }
    }

    /// Publishes `body` on `<uid>_sync_session`, echoing the opener's ids.
    async fn tell(&self, mut body: Value) {
        if let (Some(id), Value::Object(map)) = (&self.request_id, &mut body) {
            map.insert("request_id".into(), Value::String(id.clone()));
        }
        if let Err(error) = self
            .publisher
            .publish(
                &self.uid,
                SESSION_REPLY,
                &body,
                self.correlation_data.clone(),
            )
            .await
        {
            tracing::warn!(session = %self.session, %error, "pairing message not published");
        }
    }
}
