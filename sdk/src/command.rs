//! Owns what handler code sees and returns: a [`Command`] (the verified
//! sender and a typed body), a [`Reply`] (messages to reply topics), and a
//! [`HandlerError`] (an HTTP-like status the sender gets as an error reply).

use bytes::Bytes;
use envelope::EnvelopeError;
use protocol::uid::UserId;
use serde::Serialize;
use serde_json::Value;
use store::StoreError;

/// One command from a device, as a handler receives it.
#[derive(Debug, Clone)]
pub struct Command<T> {
    /// The sender, from the broker's `user_id` user property (never the payload).
    pub user_id: UserId,
    /// The sender's MQTT client id, from the broker's `client_id` property.
    pub client_id: Option<String>,
    /// When the sending session's token was issued, from the broker's
    /// `token_iat` property (`Some(0)` for a device's command without a
    /// valid one; `None` for a command another handler published). Pass it
    /// to the store's guarded writes (`Store::put_platform_token_unless_revoked`)
    /// so that a write cannot land after the user's revocation.
    pub token_iat: Option<u64>,
    /// The command topic it arrived on (`sync`, `publish`, ...).
    pub topic: String,
    /// The command's `"request_id"`, if it had one (string or number); echoed
    /// in every reply to the sender.
    pub request_id: Option<String>,
    /// The parsed payload.
    pub body: T,
    /// MQTT 5 correlation data, echoed in every reply to the sender.
    pub correlation_data: Option<Bytes>,
}

/// Who a reply message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// The command's sender: `request_id` and correlation data are echoed.
    Sender,
    /// Another user (e.g. the target of a contact request).
    User(UserId),
}

/// One message of a [`Reply`]: JSON published on `<uid>_<name>`.
#[derive(Debug, Clone)]
pub struct Message {
    /// Whose reply topic.
    pub to: Recipient,
    /// The reply name: the topic is `<uid>_<name>`.
    pub name: String,
    /// The JSON body.
    pub body: Value,
}

/// What a handler publishes when a command succeeds: zero or more messages
/// on reply topics. Build with [`Reply::json`], [`Reply::to_user`],
/// [`Reply::none`], and combine with [`Reply::and`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Reply {
    /// The messages, published in order.
    pub messages: Vec<Message>,
}

fn to_value(body: impl Serialize) -> Value {
    serde_json::to_value(body).unwrap_or_else(|e| {
        tracing::error!(error = %e, "reply body could not be encoded");
        serde_json::json!({"status": 500, "error": "reply could not be encoded"})
    })
}

impl Reply {
    /// A JSON message to the sender on `<sender uid>_<name>`.
    pub fn json(name: impl Into<String>, body: impl Serialize) -> Self {
        Reply {
            messages: vec![Message {
                to: Recipient::Sender,
                name: name.into(),
                body: to_value(body),
            }],
        }
    }

    /// A JSON message to another user on `<uid>_<name>`.
    pub fn to_user(uid: &UserId, name: impl Into<String>, body: impl Serialize) -> Self {
        Reply {
            messages: vec![Message {
                to: Recipient::User(uid.clone()),
                name: name.into(),
                body: to_value(body),
            }],
        }
    }

    /// Nothing to publish.
    pub fn none() -> Self {
        Reply::default()
    }

    /// These messages followed by `other`'s.
    pub fn and(mut self, other: Reply) -> Self {
        self.messages.extend(other.messages);
        self
    }
}

/// A failed command: the sender gets `{"status": status, "error": message}`
/// on its reply topic. Messages are shown to devices: say what was wrong with
/// the input, never leak internals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// 4xx for bad input, 5xx for a failed job.
    pub status: u16,
    /// A short human-readable reason.
    pub message: String,
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl HandlerError {
    /// Any status and message.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        HandlerError {
            status,
            message: message.into(),
        }
    }
    /// 400: the input is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
    /// 404: something the command names does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }
    /// 409: the command conflicts with the current state (stale key, replay).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }
    /// 500: a bug or an unexpected failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
    /// 502: an upstream service failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, message)
    }
    /// 503: a dependency is down; try again later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, message)
    }

    /// The error reply body.
    pub fn body(&self) -> Value {
        serde_json::json!({"status": self.status, "error": self.message})
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "store unavailable");
                HandlerError::unavailable("storage is unavailable, try again later")
            }
            other => {
                tracing::error!(error = %other, "store failure");
                HandlerError::internal("storage failure")
            }
        }
    }
}

impl From<EnvelopeError> for HandlerError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::KeyFile { .. } | EnvelopeError::Sign | EnvelopeError::Seal => {
                tracing::error!(error = %e, "crypto failure");
                HandlerError::internal("crypto failure")
            }
            other => HandlerError::bad_request(other.to_string()),
        }
    }
}

/// Adds `request_id` to an object body that does not already carry one.
pub(crate) fn with_request_id(mut body: Value, request_id: Option<&str>) -> Value {
    if let (Some(id), Value::Object(map)) = (request_id, &mut body) {
        map.entry("request_id")
            .or_insert_with(|| Value::String(id.to_owned()));
    }
    body
}

/// The `request_id` of a command payload: a string, or a number as text.
pub(crate) fn request_id_of(payload: &Value) -> Option<String> {
    match payload.get("request_id")? {
        Value::String(s) if s.len() <= 256 => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_id_is_echoed_into_objects_only() {
        assert_eq!(
            with_request_id(json!({"status": 200}), Some("r1")),
            json!({"status": 200, "request_id": "r1"})
        );
        assert_eq!(
            with_request_id(json!({"request_id": "mine"}), Some("r1")),
            json!({"request_id": "mine"})
        );
        assert_eq!(with_request_id(json!([1]), Some("r1")), json!([1]));
        assert_eq!(request_id_of(&json!({"request_id": 7})), Some("7".into()));
        assert_eq!(request_id_of(&json!({"request_id": "x"})), Some("x".into()));
        assert_eq!(request_id_of(&json!({"request_id": [1]})), None);
        assert_eq!(request_id_of(&json!({})), None);
    }

    #[test]
    fn replies_combine_in_order() {
        let uid = UserId::parse("23412").unwrap();
        let reply = Reply::json("a", json!({})).and(Reply::to_user(&uid, "b", json!({"x": 1})));
        assert_eq!(reply.messages.len(), 2);
        assert_eq!(reply.messages[1].to, Recipient::User(uid));
        assert!(Reply::none().messages.is_empty());
    }

    #[test]
    fn store_outage_is_503() {
        let e: HandlerError = StoreError::Unavailable("x".into()).into();
        assert_eq!(e.status, 503);
        assert_eq!(e.body(), json!({"status": 503, "error": e.message}));
    }
}
