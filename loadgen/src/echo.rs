//! Owns the echo handler: one or more handler connections that subscribe to
//! the command topic (shared or plain) and answer every command on the
//! sender's reply topic `<uid>_<reply_name>`, taking the uid from the
//! broker-stamped MQTT 5 `user_id` property or, for brokers that cannot stamp
//! it, from the payload.

use crate::mqtt::{self, ConnectParams, Connection, Endpoint, Incoming, MqttVersion, Stream};
use crate::payload;
use crate::LoadError;
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How the echo handler connects and answers.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    pub endpoint: Endpoint,
    pub version: MqttVersion,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Filter subscribed by every connection, e.g. `$share/echo/echo` or `echo`.
    pub filter: String,
    /// Replies go to `<uid>_<reply_name>`.
    pub reply_name: String,
    /// Take the uid from the payload rather than the `user_id` property.
    pub uid_in_payload: bool,
    pub connections: usize,
    /// QoS of the subscription and of replies (0 or 1).
    pub qos: u8,
    pub client_id_prefix: String,
    pub connect_timeout: Duration,
}

impl EchoConfig {
    /// Defaults: one MQTT 5 connection as `handler` (no password), filter
    /// `$share/echo/echo`, replies to `<uid>_echo`, uid from `user_id`.
    pub fn new(endpoint: Endpoint) -> Self {
        EchoConfig {
            endpoint,
            version: MqttVersion::V5,
            username: Some(protocol::topics::HANDLER_USERNAME.to_owned()),
            password: None,
            filter: "$share/echo/echo".into(),
            reply_name: "echo".into(),
            uid_in_payload: false,
            connections: 1,
            qos: 0,
            client_id_prefix: "loadgen-echo".into(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Echo handler counters.
#[derive(Debug, Default)]
pub struct EchoCounters {
    pub received: AtomicU64,
    pub replied: AtomicU64,
    /// Commands with no uid to answer to.
    pub no_uid: AtomicU64,
}

/// A snapshot of [`EchoCounters`].
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EchoStats {
    pub received: u64,
    pub replied: u64,
    pub no_uid: u64,
}

impl EchoCounters {
    /// The current values.
    pub fn snapshot(&self) -> EchoStats {
        EchoStats {
            received: self.received.load(Relaxed),
            replied: self.replied.load(Relaxed),
            no_uid: self.no_uid.load(Relaxed),
        }
    }
}

/// A running echo handler.
pub struct Echo {
    counters: Arc<EchoCounters>,
    cancel: CancellationToken,
    tasks: JoinSet<Result<(), LoadError>>,
}

impl Echo {
    /// Connects every handler connection and waits for each SUBACK; the
    /// handler then answers until [`Echo::stop`].
    pub async fn start(cfg: EchoConfig) -> Result<Echo, LoadError> {
        if cfg.qos > 1 {
            return Err(LoadError::Config("QoS must be 0 or 1".into()));
        }
        let counters = Arc::new(EchoCounters::default());
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let cfg = Arc::new(cfg);
        for i in 0..cfg.connections.max(1) {
            let client_id = format!("{}-{i}", cfg.client_id_prefix);
            let conn = tokio::time::timeout(cfg.connect_timeout, mqtt::open(&cfg.endpoint, None))
                .await
                .map_err(|_| LoadError::Setup("echo handler: connect timed out".into()))??;
            let params = ConnectParams {
                client_id: &client_id,
                username: cfg.username.as_deref(),
                password: cfg.password.as_deref(),
                keep_alive: 600,
                clean: true,
            };
            match conn {
                Connection::Tcp(s) => {
                    let h = Handler::setup(cfg.clone(), s, &params).await?;
                    tasks.spawn(h.run(counters.clone(), cancel.clone()));
                }
                Connection::Tls(s) => {
                    let h = Handler::setup(cfg.clone(), s, &params).await?;
                    tasks.spawn(h.run(counters.clone(), cancel.clone()));
                }
                Connection::Ws(s) => {
                    let h = Handler::setup(cfg.clone(), s, &params).await?;
                    tasks.spawn(h.run(counters.clone(), cancel.clone()));
                }
            }
        }
        Ok(Echo {
            counters,
            cancel,
            tasks,
        })
    }

    /// The live counters.
    pub fn counters(&self) -> Arc<EchoCounters> {
        self.counters.clone()
    }

    /// Waits until a connection fails (an error) or the handler is stopped.
    pub async fn wait(&mut self) -> Result<(), LoadError> {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(LoadError::Setup(format!("echo task: {e}"))),
            None => Ok(()),
        }
    }

    /// Disconnects every connection and returns the final counts.
    pub async fn stop(mut self) -> EchoStats {
        self.cancel.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
        self.counters.snapshot()
    }
}

struct Handler<S> {
    cfg: Arc<EchoConfig>,
    s: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl<S: Stream> Handler<S> {
    async fn setup(
        cfg: Arc<EchoConfig>,
        mut s: S,
        params: &ConnectParams<'_>,
    ) -> Result<Self, LoadError> {
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        let mut wbuf = BytesMut::with_capacity(64 * 1024);
        let filters = [cfg.filter.clone()];
        let granted = tokio::time::timeout(
            cfg.connect_timeout,
            mqtt::setup(
                &mut s,
                &mut rbuf,
                &mut wbuf,
                cfg.version,
                params,
                &filters,
                cfg.qos,
            ),
        )
        .await
        .map_err(|_| LoadError::Setup("echo handler: CONNACK/SUBACK timed out".into()))?
        .map_err(|e| LoadError::Setup(format!("echo handler: {e}")))?;
        if granted != [true] {
            return Err(LoadError::Setup(format!(
                "echo handler: subscription to {} refused",
                cfg.filter
            )));
        }
        Ok(Handler { cfg, s, rbuf, wbuf })
    }

    async fn run(
        mut self,
        counters: Arc<EchoCounters>,
        cancel: CancellationToken,
    ) -> Result<(), LoadError> {
        let cfg = self.cfg.clone();
        let mut topic = Vec::with_capacity(96);
        let mut pkid: u16 = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.wbuf.clear();
                    mqtt::encode_disconnect(&mut self.wbuf);
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = self.s.write_all(&self.wbuf).await;
                        let _ = self.s.shutdown().await;
                    }).await;
                    return Ok(());
                }
                r = self.s.read_buf(&mut self.rbuf) => {
                    if r? == 0 {
                        return Err(LoadError::Setup("echo handler: broker closed the connection".into()));
                    }
                    let mut received = 0;
                    let mut replied = 0;
                    let mut no_uid = 0;
                    while let Some(p) = mqtt::decode(cfg.version, &mut self.rbuf)? {
                        match p {
                            Incoming::Publish { payload: body, user_id, pkid: id, .. } => {
                                received += 1;
                                if let Some(id) = id {
                                    mqtt::encode_puback(id, &mut self.wbuf);
                                }
                                let uid = if cfg.uid_in_payload {
                                    payload::uid(&body)
                                } else {
                                    user_id.as_deref().or_else(|| payload::uid(&body))
                                };
                                let Some(uid) = uid else {
                                    no_uid += 1;
                                    continue;
                                };
                                topic.clear();
                                topic.extend_from_slice(uid.as_bytes());
                                topic.push(b'_');
                                topic.extend_from_slice(cfg.reply_name.as_bytes());
                                let id = (cfg.qos == 1).then(|| {
                                    pkid = pkid.checked_add(1).unwrap_or(1);
                                    pkid
                                });
                                mqtt::encode_publish(cfg.version, &topic, &body, id, &mut self.wbuf)?;
                                replied += 1;
                            }
                            Incoming::Disconnect { reason } => {
                                return Err(LoadError::Setup(format!("echo handler: broker disconnected: {reason}")));
                            }
                            _ => {}
                        }
                    }
                    if self.rbuf.capacity() - self.rbuf.len() < 8 * 1024 {
                        self.rbuf.reserve(64 * 1024);
                    }
                    if !self.wbuf.is_empty() {
                        self.s.write_all(&self.wbuf).await?;
                        self.wbuf.clear();
                    }
                    counters.received.fetch_add(received, Relaxed);
                    counters.replied.fetch_add(replied, Relaxed);
                    counters.no_uid.fetch_add(no_uid, Relaxed);
                }
            }
        }
    }
}
