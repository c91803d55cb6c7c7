//! Owns the handling of one command once the poll loop accepted it: the
//! JSON payload's checks, the sender's revocation check, the handler code on
//! its own task (a panic or a timeout becomes an error reply), the replies
//! handed to the client, and then its acknowledgement: a [`Job`] carries the
//! command's [`AckOnDrop`], so the broker gets the PUBACK once the job is
//! over, whatever its outcome (see `acks.rs`).
//!
//! With a revocation source ([`crate::Worker::checking_revocations`]), each
//! device command first compares the broker's `token_iat` stamp with the
//! user's revocation in the store, before the handler code runs: a command
//! sent by a session whose token was revoked meanwhile (the account
//! deleted, the user suspended) gets `{"status": 401, "error": "token
//! revoked"}` and is not acted on; a store that does not answer gets 503
//! (fail closed).

use crate::acks::AckOnDrop;
use crate::command::{request_id_of, with_request_id, HandlerError, Recipient, Reply};
use bytes::Bytes;
use protocol::topics::{CLIENT_ID_PROPERTY, TOKEN_IAT_PROPERTY};
use protocol::uid::UserId;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use store::Revocations;
use tracing::Instrument;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A command before its body is typed.
pub(crate) struct Raw {
    pub(crate) user_id: UserId,
    pub(crate) client_id: Option<String>,
    pub(crate) token_iat: Option<u64>,
    pub(crate) topic: String,
    pub(crate) request_id: Option<String>,
    pub(crate) payload: Value,
    pub(crate) correlation_data: Option<Bytes>,
}

pub(crate) type Erased = Arc<dyn Fn(Raw) -> BoxFuture<Result<Reply, HandlerError>> + Send + Sync>;

/// When the token of the session that sent a command was issued, as the
/// broker stamps it: `Some(iat)` from one decimal `token_iat` property;
/// `Some(0)` for a device's command whose stamp is missing, repeated or not
/// a number (fail closed: every revocation by time refuses it); `None` for
/// a command with neither `token_iat` nor the broker's `client_id` stamp,
/// which no device session sent (another handler published it).
pub(crate) fn token_iat(user_properties: &[(String, String)]) -> Option<u64> {
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

/// One command being handled.
pub(crate) struct Job {
    pub(crate) topic: String,
    pub(crate) user_id: UserId,
    pub(crate) client_id: Option<String>,
    /// The sender token's `iat` (see [`token_iat`]); `None`: not a device's.
    pub(crate) token_iat: Option<u64>,
    pub(crate) revocations: Option<Arc<dyn Revocations>>,
    pub(crate) correlation_data: Option<Bytes>,
    pub(crate) payload: Bytes,
    pub(crate) error_reply: String,
    pub(crate) handler: Erased,
    pub(crate) client: AsyncClient,
    pub(crate) timeout: Duration,
    /// Sends the command's PUBACK when the job is dropped: after its reply
    /// (or error reply) was handed to the client, or when the task ends any
    /// other way (a panic outside the handler code, the runtime shutting
    /// down). `None` for a QoS 0 command (nothing to acknowledge).
    pub(crate) ack: Option<AckOnDrop>,
}

impl Job {
    /// Handles the command, then acknowledges it (its PUBACK is due once
    /// every reply was handed to the client). On every path: a handler
    /// error, timeout or panic is acknowledged after its error reply
    /// (delivering again a command that crashes its handler would loop).
    pub(crate) async fn execute(mut self) {
        let ack = self.ack.take();
        self.handle().await;
        drop(ack);
    }

    /// Refuses the command with `err` (overload), then acknowledges it.
    pub(crate) async fn refuse(mut self, err: HandlerError) {
        let ack = self.ack.take();
        self.send_error(None, &err).await;
        drop(ack);
    }

    async fn handle(self) {
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
