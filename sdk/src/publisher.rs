//! Owns publishing outside a command's reply: a [`Publisher`] lets handler
//! code that outlives one command (a session that sends a new pairing code
//! every few seconds) publish on users' reply topics through the worker's
//! connection, and run its background tasks under the worker's drain.

use bytes::Bytes;
use protocol::uid::UserId;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::Value;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Why a [`Publisher::publish`] did not go out.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The worker has not started (no connection to publish through).
    #[error("the worker is not running")]
    NotRunning,
    /// The client's request channel is closed (the worker stopped).
    #[error("could not publish: {0}")]
    Client(String),
    #[error("the body could not be encoded: {0}")]
    Encode(String),
}

/// A handle to a worker's connection for messages that are not a command's
/// reply. Get one with [`crate::Worker::publisher`] before running the
/// worker; clones share the connection.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: OnceLock<AsyncClient>,
    /// Cancelled when the worker starts to shut down.
    stopping: CancellationToken,
    /// The worker's tasks: its drain waits for these too.
    tracker: TaskTracker,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("running", &self.inner.client.get().is_some())
            .field("stopping", &self.inner.stopping.is_cancelled())
            .finish()
    }
}

impl Publisher {
    pub(crate) fn new(tracker: TaskTracker) -> Self {
        Publisher {
            inner: Arc::new(Inner {
                client: OnceLock::new(),
                stopping: CancellationToken::new(),
                tracker,
            }),
        }
    }

    pub(crate) fn attach(&self, client: AsyncClient) {
        let _ = self.inner.client.set(client);
    }

    pub(crate) fn stop(&self) {
        self.inner.stopping.cancel();
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Publishes `body` (JSON) on `<uid>_<name>`, QoS 1, with
    /// `correlation_data` (MQTT 5) when given. Queued on the worker's
    /// connection: it goes out once connected.
    pub async fn publish(
        &self,
        uid: &UserId,
        name: &str,
        body: &Value,
        correlation_data: Option<Bytes>,
    ) -> Result<(), PublishError> {
        let client = self.inner.client.get().ok_or(PublishError::NotRunning)?;
        let bytes = serde_json::to_vec(body).map_err(|e| PublishError::Encode(e.to_string()))?;
        let props = PublishProperties {
            correlation_data,
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        client
            .publish_with_properties(uid.reply_topic(name), QoS::AtLeastOnce, false, bytes, props)
            .await
            .map_err(|e| PublishError::Client(e.to_string()))
    }

    /// Runs `task` as one of the worker's tasks: the worker's drain at
    /// shutdown waits for it (up to its drain timeout), so it should end
    /// soon after [`Publisher::stopping`]. `false` (and `task` dropped)
    /// once the worker is shutting down.
    pub fn spawn<F>(&self, task: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.inner.stopping.is_cancelled() || self.inner.tracker.is_closed() {
            return false;
        }
        self.inner.tracker.spawn(task);
        true
    }

    /// Resolves when the worker starts to shut down.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.inner.stopping.cancelled()
    }

    /// Whether the worker is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.is_cancelled()
    }
}
