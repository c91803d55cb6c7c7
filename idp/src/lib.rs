//! The identity service: signs up a phone number by SMS code, following
//! Mozilla's MSISDN gateway, and issues the device tokens the broker accepts.
//!
//! The path of a sign-up, one module per step:
//! 1. [`api`]: `POST /register {"msisdn"}` checks the number ([`msisdn`]),
//!    counts it against the per-number and per-address rates, and opens a
//!    session ([`store::SignUps`], named by [`session_id`]) whose token the client sends as a bearer from then on;
//! 2. `POST /sms/verify` (and `/sms/resend_code`) makes a 6-digit code from
//!    the OS's CSPRNG and sends it ([`sms`]);
//! 3. `POST /sms/verify_code` compares it in constant time (single-use,
//!    limited tries, short-lived), derives the user's opaque uid from the
//!    number, records the registration in the shared store, and signs an
//!    RS256 token with the active key ([`keys`]);
//! 4. the broker verifies that token through `GET /.well-known/jwks.json`;
//! 5. `POST /unregister` deletes the user's data in the shared store and
//!    revokes every token issued so far.
//!
//! Device pairing ([`pair`]): `POST /sync/pair` lets a phone without a token
//! claim a one-time code a signed-in browser shows (opened by the sync
//! handler's `sync_session`), waits for the person's decision, and answers
//! with a device token for the same user beside the sync result.
//!
//! [`web`] serves the page a person signs up with in a browser (`/app/`),
//! which then talks to the broker with MQTT.js over WebSocket.
//!
//! [`config`] holds the settings; [`Idp::start`] builds the service and
//! [`serve`] runs it on a bound listener until a shutdown token fires, under
//! the connection caps and deadlines of [`server`]; [`descriptors`] checks at
//! start that those caps fit the process's open-file limit.

pub mod admin;
pub mod api;
pub mod banner;
pub mod config;
pub mod descriptors;
pub mod keys;
pub mod msisdn;
pub mod pair;
pub mod server;
pub mod session_id;
pub mod sign_up;
pub mod sms;
pub mod web;

use config::Settings;
use keys::{KeyError, KeyRing};
use sms::SmsSender;
use std::sync::Arc;
use std::time::Duration;
use store::{SignUps, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How often a running service re-reads its keys directory (rotations by
/// `idp rotate-keys`, removal of keys past publication).
pub const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("signing keys: {0}")]
    Keys(#[from] KeyError),
    #[error("state: {0}")]
    State(#[from] store::StoreError),
    #[error("SMS: {0}")]
    Sms(#[from] sms::SmsError),
    #[error("key loading task failed")]
    Join,
    #[error("IDP_WEB_MQTT_URL: {0}")]
    Web(#[from] web::MqttUrlError),
}

/// The running service's parts, shared by every request.
pub struct Idp {
    pub settings: Settings,
    pub keys: Arc<KeyRing>,
    /// Sign-up sessions and rate counters (Redis, or memory without it).
    sign_ups: Arc<dyn SignUps>,
    store: Arc<dyn Store>,
    sms: SmsSender,
    uid_secret: Vec<u8>,
    /// The sign-up page's settings.
    page: web::Page,
    /// Places for `POST /sync/pair` requests held open ([`pair::MAX_HELD`]).
    pair_slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp")
            .field("settings", &self.settings)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Idp {
    /// Loads (or makes) the keys and the uid secret, and opens the state.
    /// Registrations and revocations go to `store`, the broker's own.
    pub async fn start(settings: Settings, store: Arc<dyn Store>) -> Result<Arc<Idp>, StartError> {
        let (dir, ttl, leeway, configured) = (
            settings.keys_dir.clone(),
            settings.token_ttl,
            settings.key_retire_leeway,
            settings.uid_secret.clone(),
        );
        let (keys, uid_secret) = tokio::task::spawn_blocking(move || {
            let keys = KeyRing::open(&dir, ttl, leeway)?;
            let secret = keys::uid_secret(&dir, configured.as_ref().map(protocol::Secret::expose))?;
            Ok::<_, KeyError>((keys, secret))
        })
        .await
        .map_err(|_| StartError::Join)??;
        let sign_ups = store::open_sign_ups(
            settings.redis_url.as_ref().map(protocol::Secret::expose),
            settings.max_entries,
        )?;
        let sms = SmsSender::new(settings.sms.clone())?;
        let page = web::Page::new(settings.web_mqtt_url.as_deref())?;
        if sms.is_development() {
            tracing::warn!("DEVELOPMENT: SMS_PROVIDER_URL is unset; one-time codes are written to this log instead of being sent");
        }
        Ok(Arc::new(Idp {
            settings,
            keys: Arc::new(keys),
            sign_ups,
            store,
            sms,
            uid_secret,
            page,
            pair_slots: Arc::new(tokio::sync::Semaphore::new(pair::MAX_HELD)),
        }))
    }

    /// The sign-up page's settings.
    pub fn page(&self) -> &web::Page {
        &self.page
    }

    /// Whether codes are logged instead of sent.
    pub fn is_development(&self) -> bool {
        self.sms.is_development()
    }
}

/// Serves the API on `listener` until `shutdown` fires (then drains for at
/// most [`server::DRAIN`]), re-reading the keys directory every
/// [`KEY_RELOAD_INTERVAL`].
pub async fn serve(
    listener: TcpListener,
    idp: Arc<Idp>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // The reload task stops with the server, not only with the caller's token.
    let stop = shutdown.child_token();
    let reload = {
        let (keys, shutdown) = (idp.keys.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(KEY_RELOAD_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let keys = keys.clone();
                match tokio::task::spawn_blocking(move || keys.reload(protocol::claims::now_secs()))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reloading the signing keys failed; keeping the loaded ones")
                    }
                    Err(_) => tracing::error!("the key reload task failed"),
                }
            }
        })
    };
    let limits = idp.settings.connections;
    let served = server::run(listener, api::router(idp), limits, shutdown).await;
    stop.cancel();
    let _ = reload.await;
    served
}
