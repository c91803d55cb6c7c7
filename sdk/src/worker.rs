//! Owns a running handler: the MQTT 5 connection and its poll loop
//! (connect, shared subscriptions, reconnect with backoff), dispatching each
//! command to handler code on its own task under a concurrency limit, error
//! replies, and graceful shutdown.
//!
//! The poll loop never awaits handler code or a full channel: a command is
//! checked (route, `user_id` property), then spawned as a [`Job`]
//! (`job.rs`); replies are published from the command's task through the
//! client's request channel, which the poll loop drains. Commands are
//! acknowledged by hand (`acks.rs`): the poll loop sends a command's PUBACK
//! once its handling ended, in the order the commands arrived.

use super::command::{Command, HandlerError, Reply};
use super::config::{ConfigError, SdkConfig};
use crate::acks::{Acks, Sent};
use crate::job::{token_iat, Erased, Job, Raw};
use crate::publisher::Publisher;
use crate::tls::TlsClientError;
use protocol::topics::{CLIENT_ID_PROPERTY, HANDLER_USERNAME, USER_ID_PROPERTY};
use protocol::uid::UserId;
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::Revocations;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Outgoing QoS 1 publishes allowed in flight at once.
const OUTGOING_INFLIGHT: u16 = 100;
/// Capacity of the client's request channel.
const REQUEST_CHANNEL: usize = 512;
/// Largest packet the broker may send us.
const MAX_INCOMING_PACKET: u32 = 1 << 20;
/// First and largest reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("BROKER_CA: {0}")]
    Tls(#[from] TlsClientError),
    #[error("the broker refused the handler login ({0:?}): check HANDLER_KEY")]
    Refused(ConnectReturnCode),
    #[error("worker {0:?} has no command topics: add one with .on(...)")]
    NoRoutes(String),
}

struct Route {
    /// Where the sender gets error replies: `<uid>_<error_reply>`.
    error_reply: String,
    handler: Erased,
}

/// A handler process's worker: a name (its shared-subscription group), the
/// command topics it serves and the code for each.
///
/// ```no_run
/// use sdk::{Command, Reply, SdkConfig, Worker};
/// # async fn demo(shutdown: tokio_util::sync::CancellationToken) -> Result<(), sdk::SdkError> {
/// #[derive(serde::Deserialize)]
/// struct Ping { text: String }
/// Worker::new("echo")
///     .on("echo", |cmd: Command<Ping>| async move {
///         Ok(Reply::json("echo", serde_json::json!({"status": 200, "text": cmd.body.text})))
///     })
///     .run(SdkConfig::from_env()?, shutdown)
///     .await
/// # }
/// ```
pub struct Worker {
    name: String,
    routes: HashMap<String, Route>,
    /// Where each device command's sender is checked for revocation.
    revocations: Option<Arc<dyn Revocations>>,
    /// The connection's handle for handler code, and the worker's tasks.
    publisher: Publisher,
}

impl Worker {
    /// A worker named `name`. Instances with the same name share the load
    /// (`$share/<name>/<topic>`), so the name must be a valid topic level
    /// (no `/ + #`).
    pub fn new(name: impl Into<String>) -> Self {
        Worker {
            name: name.into(),
            routes: HashMap::new(),
            revocations: None,
            publisher: Publisher::new(TaskTracker::new()),
        }
    }

    /// A handle to publish on users' reply topics outside a command's reply,
    /// and to run background tasks that the worker's drain waits for
    /// (see [`Publisher`]). It works once [`Worker::run`] has started.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Checks every device command against its user's revocation in `store`
    /// before the handler runs (the built-in handlers all do): a command
    /// whose `token_iat` stamp the revocation refuses is answered `401 token
    /// revoked`, and 503 while the store does not answer. A command without
    /// `token_iat` counts as issued at 0 when it came from a device (it has
    /// the broker's `client_id` stamp), so a revocation refuses it; a
    /// command another handler published for a user (no `client_id`, no
    /// `token_iat`) is not a session of that user and is not checked.
    pub fn checking_revocations(mut self, store: Arc<dyn Revocations>) -> Self {
        self.revocations = Some(store);
        self
    }

    /// Serves `topic` with `handler`; error replies go to `<uid>_<topic>`.
    pub fn on<T, F, Fut>(self, topic: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Command<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
    {
        self.on_with_errors_to(topic, topic, handler)
    }

    /// Serves `topic` with `handler`; error replies go to `<uid>_<error_reply>`
    /// (e.g. `get_contact_list` answers on `<uid>_contact_list`).
    pub fn on_with_errors_to<T, F, Fut>(
        mut self,
        topic: &str,
        error_reply: &str,
        handler: F,
    ) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Command<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Erased = Arc::new(move |raw: Raw| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let body: T = serde_json::from_value(raw.payload)
                    .map_err(|e| HandlerError::bad_request(format!("invalid command: {e}")))?;
                handler(Command {
                    user_id: raw.user_id,
                    client_id: raw.client_id,
                    token_iat: raw.token_iat,
                    topic: raw.topic,
                    request_id: raw.request_id,
                    body,
                    correlation_data: raw.correlation_data,
                })
                .await
            })
        });
        self.routes.insert(
            topic.to_owned(),
            Route {
                error_reply: error_reply.to_owned(),
                handler: erased,
            },
        );
        self
    }

    /// The command topics served.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// Connects and serves until `shutdown` is cancelled, then stops taking
    /// commands, finishes the ones in flight (up to `drain_timeout`), flushes
    /// their replies and disconnects. Connection losses are retried forever
    /// with backoff; only a configuration error or a refused handler key on
    /// the first connection ends it early.
    pub async fn run(self, config: SdkConfig, shutdown: CancellationToken) -> Result<(), SdkError> {
        let endpoint = config.validate()?;
        if self.routes.is_empty() {
            return Err(SdkError::NoRoutes(self.name));
        }
        if self.name.is_empty() || self.name.contains(['/', '+', '#']) {
            return Err(ConfigError::Invalid {
                var: "worker name",
                reason: format!("{:?} must be one topic level (no '/', '+', '#')", self.name),
            }
            .into());
        }
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("{}-{:08x}", self.name, rand::thread_rng().gen::<u32>()));
        let mut options = MqttOptions::new(client_id.clone(), endpoint.host.clone(), endpoint.port);
        options
            .set_credentials(HANDLER_USERNAME, config.handler_key.expose())
            .set_keep_alive(config.keep_alive)
            .set_clean_start(true)
            // A command's PUBACK is sent once its handling ended (acks.rs).
            .set_manual_acks(true)
            .set_max_packet_size(Some(MAX_INCOMING_PACKET))
            .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(10);
        options.set_network_options(network);
        if endpoint.tls {
            // validate() made sure a CA is configured for TLS.
            let ca = config
                .broker_ca
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            let tls = crate::tls::client_config_trusting(ca)?;
            options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
        }
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        self.publisher.attach(client.clone());
        let span = tracing::info_span!("worker", worker = %self.name, client_id = %client_id);
        let runner = Runner {
            group: self.name,
            routes: Arc::new(self.routes),
            revocations: self.revocations,
            client,
            permits: Arc::new(Semaphore::new(config.concurrency)),
            config,
            waiting: Arc::new(AtomicUsize::new(0)),
            tracker: self.publisher.tracker().clone(),
            publisher: self.publisher,
        };
        runner.serve(eventloop, shutdown).instrument(span).await
    }
}

/// The state of a running worker.
struct Runner {
    group: String,
    routes: Arc<HashMap<String, Route>>,
    revocations: Option<Arc<dyn Revocations>>,
    client: AsyncClient,
    config: SdkConfig,
    permits: Arc<Semaphore>,
    /// Commands spawned and waiting for a permit.
    waiting: Arc<AtomicUsize>,
    /// Commands in flight and the handler code's background tasks.
    tracker: TaskTracker,
    /// Told when the drain starts, so background tasks end.
    publisher: Publisher,
}

impl Runner {
    async fn serve(
        &self,
        mut eventloop: EventLoop,
        shutdown: CancellationToken,
    ) -> Result<(), SdkError> {
        let mut delay = BACKOFF_MIN;
        let mut connected_once = false;
        let mut drain_until: Option<Instant> = None;
        let mut acks = Acks::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_until.is_none() => {
                    tracing::info!(in_flight = self.tracker.len(), "shutting down: finishing in-flight commands");
                    for topic in self.routes.keys() {
                        let _ = self.client.try_unsubscribe(self.filter(topic));
                    }
                    self.publisher.stop();
                    self.tracker.close();
                    drain_until = Some(Instant::now() + self.config.drain_timeout);
                }
                _ = self.tracker.wait(), if drain_until.is_some() => break,
                _ = sleep_until_opt(drain_until) => {
                    tracing::warn!(in_flight = self.tracker.len(), unacknowledged = acks.len(), "drain timeout: abandoning in-flight commands (the broker delivers them again)");
                    break;
                }
                done = acks.next_done() => acks.finished(done),
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!("connected to the broker");
                        acks.new_connection();
                        connected_once = true;
                        delay = BACKOFF_MIN;
                        if drain_until.is_none() {
                            self.subscribe_all();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => self.dispatch(publish, &mut acks),
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        for code in &ack.return_codes {
                            if !matches!(code, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)) {
                                tracing::error!(?code, "the broker refused a command subscription");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        tracing::warn!(reason = ?d.reason_code, "the broker disconnected us");
                    }
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        acks.new_connection();
                        let auth = matches!(code, ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized);
                        if auth && !connected_once {
                            tracing::error!(?code, "the broker refused the handler key");
                            return Err(SdkError::Refused(code));
                        }
                        tracing::warn!(?code, retry_in = ?delay, "connection refused");
                        delay = self.back_off(delay, &shutdown, drain_until).await;
                    }
                    Err(error) => {
                        acks.new_connection();
                        tracing::warn!(%error, retry_in = ?delay, "connection lost");
                        delay = self.back_off(delay, &shutdown, drain_until).await;
                    }
                },
            }
            // Every iteration: the PUBACKs that became due (a command
            // ended, or room in the request channel after a poll).
            acks.collect_finished();
            acks.send_ready(&self.client);
            if drain_until.is_some() && shutdown.is_cancelled() && !connected_once {
                // Never connected: nothing in flight, nothing to flush.
                return Ok(());
            }
        }
        self.flush(&mut eventloop, &mut acks).await;
        tracing::info!("stopped");
        Ok(())
    }

    /// The shared subscription for `topic`: `$share/<worker name>/<topic>`,
    /// so instances of a worker split each topic's load. (The broker's router
    /// keys a shared group by group and filter, as MQTT 5 says.)
    fn filter(&self, topic: &str) -> String {
        format!("$share/{}/{topic}", self.group)
    }

    /// Subscribes every command topic. `try_` because the poll loop must
    /// never wait on the request channel it alone drains.
    fn subscribe_all(&self) {
        let filters: Vec<Filter> = self
            .routes
            .keys()
            .map(|t| Filter::new(self.filter(t), QoS::AtLeastOnce))
            .collect();
        if let Err(error) = self.client.try_subscribe_many(filters) {
            tracing::error!(%error, "could not queue the subscriptions");
        }
    }

    /// Sleeps `delay` (with jitter) unless shutdown starts; returns the next delay.
    async fn back_off(
        &self,
        delay: Duration,
        shutdown: &CancellationToken,
        drain_until: Option<Instant>,
    ) -> Duration {
        let jitter = rand::thread_rng().gen_range(0.5..1.0);
        let sleep = delay.mul_f64(jitter);
        if drain_until.is_none() {
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.cancelled() => {}
            }
        } else {
            tokio::time::sleep(sleep).await;
        }
        (delay * 2).min(BACKOFF_MAX)
    }

    /// Checks one incoming publish and spawns its handling. Never awaits.
    /// Its acknowledgement is due when the returned-early checks drop it
    /// (no route, no valid `user_id`) or when its job ends.
    fn dispatch(&self, publish: rumqttc::v5::mqttbytes::v5::Publish, acks: &mut Acks) {
        let ack = acks.received(&publish);
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let Some(route) = self.routes.get(&topic) else {
            tracing::debug!(%topic, "publish on a topic we do not serve");
            return;
        };
        let props = publish.properties.unwrap_or_default();
        let mut uids = props
            .user_properties
            .iter()
            .filter(|(k, _)| k == USER_ID_PROPERTY)
            .map(|(_, v)| v);
        let user_id = match (uids.next(), uids.next()) {
            (Some(raw), None) => match UserId::parse(raw) {
                Ok(uid) => uid,
                Err(error) => {
                    tracing::warn!(%topic, %error, "dropping a command with an invalid user_id property");
                    return;
                }
            },
            (None, _) => {
                tracing::warn!(%topic, "dropping a command without the broker's user_id property");
                return;
            }
            (Some(_), Some(_)) => {
                tracing::warn!(%topic, "dropping a command with several user_id properties");
                return;
            }
        };
        let client_id = props
            .user_properties
            .iter()
            .find(|(k, _)| k == CLIENT_ID_PROPERTY)
            .map(|(_, v)| v.clone());
        let token_iat = token_iat(&props.user_properties);
        let job = Job {
            topic,
            user_id,
            client_id,
            token_iat,
            revocations: self.revocations.clone(),
            correlation_data: props.correlation_data,
            payload: publish.payload,
            error_reply: route.error_reply.clone(),
            handler: Arc::clone(&route.handler),
            client: self.client.clone(),
            timeout: self.config.command_timeout,
            ack,
        };
        if self.waiting.load(Ordering::Relaxed) >= self.config.queue_limit {
            tracing::warn!(topic = %job.topic, uid = %job.user_id, "overloaded: refusing a command");
            self.tracker
                .spawn(job.refuse(HandlerError::unavailable("busy, try again later")));
            return;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permits = Arc::clone(&self.permits);
        let waiting = Arc::clone(&self.waiting);
        let span = tracing::info_span!("command", topic = %job.topic, uid = %job.user_id);
        self.tracker.spawn(
            async move {
                let permit = permits.acquire_owned().await;
                waiting.fetch_sub(1, Ordering::Relaxed);
                if permit.is_err() {
                    return;
                }
                job.execute().await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// After the drain: acknowledge what ended, then disconnect once every
    /// queued reply and PUBACK is written (the request channel is FIFO). A
    /// command abandoned at the drain timeout stays unacknowledged: the
    /// broker delivers it again.
    async fn flush(&self, eventloop: &mut EventLoop, acks: &mut Acks) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            acks.collect_finished();
            if acks.send_ready(&self.client) == Sent::All {
                break;
            }
            // The request channel is full: let the event loop write some.
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
        if self.client.try_disconnect().is_err() {
            return;
        }
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
