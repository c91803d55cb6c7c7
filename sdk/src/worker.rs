//! Owns a running handler: the MQTT 5 connection and its poll loop
//! (connect, shared subscriptions, reconnect with backoff), dispatching each
//! command to handler code on its own task under a concurrency limit, error
//! replies, and graceful shutdown.
//!
//! The poll loop never awaits handler code or a full channel: a command is
//! checked (route, `user_id` property), then spawned; replies are published
//! from the command's task through the client's request channel, which the
//! poll loop drains.
//!
//! With a revocation source ([`Worker::checking_revocations`]), each
//! device command's task first compares the broker's `token_iat` stamp with
//! the user's revocation in the store, before the handler code runs: a
//! command sent by a session whose token was revoked meanwhile (the account
//! deleted, the user suspended) gets `{"status": 401, "error": "token
//! revoked"}` and is not acted on; a store that does not answer gets 503
//! (fail closed).

use super::command::{request_id_of, with_request_id, Command, HandlerError, Recipient, Reply};
use super::config::{ConfigError, SdkConfig};
use crate::publisher::Publisher;
use crate::tls::TlsClientError;
use bytes::Bytes;
use protocol::topics::{
    CLIENT_ID_PROPERTY, HANDLER_USERNAME, TOKEN_IAT_PROPERTY, USER_ID_PROPERTY,
};
use protocol::uid::UserId;
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
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

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A command before its body is typed.
struct Raw {
    user_id: UserId,
    client_id: Option<String>,
    token_iat: Option<u64>,
    topic: String,
    request_id: Option<String>,
    payload: Value,
    correlation_data: Option<Bytes>,
}

type Erased = Arc<dyn Fn(Raw) -> BoxFuture<Result<Reply, HandlerError>> + Send + Sync>;

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
                    tracing::warn!(in_flight = self.tracker.len(), "drain timeout: abandoning in-flight commands");
                    break;
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!("connected to the broker");
                        connected_once = true;
                        delay = BACKOFF_MIN;
                        if drain_until.is_none() {
                            self.subscribe_all();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => self.dispatch(publish),
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
                        let auth = matches!(code, ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized);
                        if auth && !connected_once {
                            tracing::error!(?code, "the broker refused the handler key");
                            return Err(SdkError::Refused(code));
                        }
                        tracing::warn!(?code, retry_in = ?delay, "connection refused");
                        delay = self.back_off(delay, &shutdown, drain_until).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?delay, "connection lost");
                        delay = self.back_off(delay, &shutdown, drain_until).await;
                    }
                },
            }
            if drain_until.is_some() && shutdown.is_cancelled() && !connected_once {
                // Never connected: nothing in flight, nothing to flush.
                return Ok(());
            }
        }
        self.flush(&mut eventloop).await;
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
    fn dispatch(&self, publish: rumqttc::v5::mqttbytes::v5::Publish) {
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
        };
        if self.waiting.load(Ordering::Relaxed) >= self.config.queue_limit {
            tracing::warn!(topic = %job.topic, uid = %job.user_id, "overloaded: refusing a command");
            self.tracker.spawn(async move {
                let err = HandlerError::unavailable("busy, try again later");
                job.send_error(None, &err).await;
            });
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

    /// After the drain: disconnect once every queued reply is written.
    async fn flush(&self, eventloop: &mut EventLoop) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// When the token of the session that sent a command was issued, as the
/// broker stamps it: `Some(iat)` from one decimal `token_iat` property;
/// `Some(0)` for a device's command whose stamp is missing, repeated or not
/// a number (fail closed: every revocation by time refuses it); `None` for
/// a command with neither `token_iat` nor the broker's `client_id` stamp,
/// which no device session sent (another handler published it).
fn token_iat(user_properties: &[(String, String)]) -> Option<u64> {
    let mut stamps = user_properties
        .iter()
        .filter(|(k, _)| k == TOKEN_IAT_PROPERTY)
        .map(|(_, v)| v);
    match (stamps.next(), stamps.next()) {
        (Some(iat), None) => Some(iat.parse::<u64>().unwrap_or(0)),
        (Some(_), Some(_)) => Some(0),
        (None, _) => user_properties
            .iter()
            .any(|(k, _)| k == CLIENT_ID_PROPERTY)
            .then_some(0),
    }
}

/// Whether `uid`'s command, sent by a session whose token was issued at
/// `iat`, may be acted on: `Err(401)` when the user's revocation refuses
/// that token, `Err(503)` when the store does not answer within `within`.
async fn check_revocation(
    store: &dyn Revocations,
    uid: &UserId,
    iat: u64,
    within: Duration,
) -> Result<(), HandlerError> {
    match tokio::time::timeout(within, store.revocation(uid)).await {
        Ok(Ok(Some(revocation))) if revocation.refuses(Some(iat)) => {
            tracing::info!(%uid, "command from a revoked token refused");
            Err(HandlerError::new(401, "token revoked"))
        }
        Ok(Ok(_)) => Ok(()),
        failed => {
            let error = match failed {
                Ok(Err(error)) => error.to_string(),
                _ => format!("no answer within {within:?}"),
            };
            tracing::warn!(%uid, %error, "revocation check failed: command refused");
            Err(HandlerError::unavailable(
                "cannot check the token now, try again later",
            ))
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One command being handled.
struct Job {
    topic: String,
    user_id: UserId,
    client_id: Option<String>,
    /// The sender token's `iat` (see [`token_iat`]); `None`: not a device's.
    token_iat: Option<u64>,
    revocations: Option<Arc<dyn Revocations>>,
    correlation_data: Option<Bytes>,
    payload: Bytes,
    error_reply: String,
    handler: Erased,
    client: AsyncClient,
    timeout: Duration,
}

impl Job {
    async fn execute(self) {
        let payload = if self.payload.iter().all(u8::is_ascii_whitespace) {
            Ok(Value::Object(Default::default()))
        } else {
            serde_json::from_slice::<Value>(&self.payload)
        };
        let payload = match payload {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                let err = HandlerError::bad_request("the command must be a JSON object");
                return self.send_error(None, &err).await;
            }
            Err(e) => {
                let err = HandlerError::bad_request(format!("malformed JSON: {e}"));
                return self.send_error(None, &err).await;
            }
        };
        let request_id = request_id_of(&payload);
        // Before any handler code: a revoked session's command is not acted on.
        if let (Some(store), Some(iat)) = (&self.revocations, self.token_iat) {
            if let Err(err) =
                check_revocation(store.as_ref(), &self.user_id, iat, self.timeout).await
            {
                return self.send_error(request_id.as_deref(), &err).await;
            }
        }
        let raw = Raw {
            user_id: self.user_id.clone(),
            client_id: self.client_id.clone(),
            token_iat: self.token_iat,
            topic: self.topic.clone(),
            request_id: request_id.clone(),
            payload,
            correlation_data: self.correlation_data.clone(),
        };
        // Its own task, so that a panic in handler code is an error reply.
        let work =
            tokio::spawn(tokio::time::timeout(self.timeout, (self.handler)(raw)).in_current_span());
        let outcome = match work.await {
            Ok(Ok(result)) => result,
            Ok(Err(_elapsed)) => Err(HandlerError::new(504, "the command timed out")),
            Err(join) => {
                tracing::error!(error = %join, "handler panicked");
                Err(HandlerError::internal("internal error"))
            }
        };
        match outcome {
            Ok(reply) => self.send_reply(request_id.as_deref(), reply).await,
            Err(err) => {
                if err.status >= 500 {
                    tracing::warn!(status = err.status, error = %err.message, "command failed");
                } else {
                    tracing::info!(status = err.status, error = %err.message, "command refused");
                }
                self.send_error(request_id.as_deref(), &err).await;
            }
        }
    }

    async fn send_error(&self, request_id: Option<&str>, err: &HandlerError) {
        let reply = Reply::json(self.error_reply.clone(), err.body());
        self.send_reply(request_id, reply).await;
    }

    async fn send_reply(&self, request_id: Option<&str>, reply: Reply) {
        for message in reply.messages {
            let (topic, body, props) = match message.to {
                Recipient::Sender => (
                    self.user_id.reply_topic(&message.name),
                    with_request_id(message.body, request_id),
                    PublishProperties {
                        correlation_data: self.correlation_data.clone(),
                        content_type: Some("application/json".into()),
                        ..Default::default()
                    },
                ),
                Recipient::User(uid) => (
                    uid.reply_topic(&message.name),
                    message.body,
                    PublishProperties {
                        content_type: Some("application/json".into()),
                        ..Default::default()
                    },
                ),
            };
            let bytes = match serde_json::to_vec(&body) {
                Ok(b) => b,
                Err(error) => {
                    tracing::error!(%error, "reply could not be encoded");
                    continue;
                }
            };
            if let Err(error) = self
                .client
                .publish_with_properties(topic.clone(), QoS::AtLeastOnce, false, bytes, props)
                .await
            {
                tracing::warn!(%topic, %error, "could not publish a reply");
            }
        }
    }
}

#[cfg(test)]
mod revocation_tests {
    use super::*;
    use store::{EmbeddedStore, Revocation};

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_iat_stamp_is_read_fail_closed() {
        let device = |iat: &str| props(&[("user_id", "u"), ("client_id", "c"), ("token_iat", iat)]);
        assert_eq!(token_iat(&device("1700000000")), Some(1_700_000_000));
        assert_eq!(token_iat(&device("0")), Some(0));
        assert_eq!(token_iat(&device("soon")), Some(0), "not a number");
        assert_eq!(token_iat(&device("-1")), Some(0));
        let mut twice = device("5");
        twice.push(("token_iat".into(), "6".into()));
        assert_eq!(token_iat(&twice), Some(0), "repeated");
        assert_eq!(
            token_iat(&props(&[("user_id", "u"), ("client_id", "c")])),
            Some(0),
            "a device's command without the stamp"
        );
        assert_eq!(
            token_iat(&props(&[("user_id", "u")])),
            None,
            "published by a handler for the user"
        );
        // Only the exact name counts (the broker drops look-alikes).
        assert_eq!(
            token_iat(&props(&[("user_id", "u"), ("TOKEN_IAT", "9")])),
            None
        );
    }

    #[tokio::test]
    async fn revoked_tokens_are_refused_and_an_outage_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"))
            .await
            .unwrap();
        let uid = UserId::parse("u1").unwrap();
        let within = Duration::from_secs(5);
        assert!(check_revocation(&store, &uid, 5, within).await.is_ok());
        store
            .record_revocation(&uid, Revocation::IssuedBefore(100))
            .await
            .unwrap();
        let refused = check_revocation(&store, &uid, 99, within)
            .await
            .unwrap_err();
        assert_eq!(
            refused.body(),
            serde_json::json!({"status": 401, "error": "token revoked"})
        );
        assert_eq!(
            check_revocation(&store, &uid, 0, within)
                .await
                .unwrap_err()
                .status,
            401
        );
        assert!(check_revocation(&store, &uid, 100, within).await.is_ok());
        let other = UserId::parse("u2").unwrap();
        assert!(check_revocation(&store, &other, 0, within).await.is_ok());
        store.revoke_user(&uid, Revocation::All).await.unwrap();
        assert_eq!(
            check_revocation(&store, &uid, u64::MAX, within)
                .await
                .unwrap_err()
                .status,
            401
        );

        // A Redis that is not there: 503, never a pass.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let down = store::RedisStore::new(&format!("redis://127.0.0.1:{port}")).unwrap();
        let err = check_revocation(&down, &other, 1, within)
            .await
            .unwrap_err();
        assert_eq!(err.status, 503);
    }
}
