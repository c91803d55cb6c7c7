//! Owns the state every connection shares: the authenticator, the embedded
//! router, live sessions, command topics, metrics, limits and the shutdown
//! signal. Built once at start-up by `lib::Broker::start`.

use crate::auth::Authenticator;
use crate::command_topics::CommandTopics;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::reply_index::ReplyIndex;
use crate::revocation::Revocations;
use crate::router::EmbeddedRouter;
use crate::sessions::SessionRegistry;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Shared by all connections of one broker.
pub struct Gate {
    pub auth: Authenticator,
    pub router: EmbeddedRouter,
    pub sessions: Arc<SessionRegistry>,
    pub commands: CommandTopics,
    /// Device subscriptions the gate serves itself, beside the router.
    pub replies: ReplyIndex,
    /// Revocation checks, when a store is configured.
    pub revocations: Option<Arc<Revocations>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Clock leeway for the token-expiry disconnect (same as at connect).
    pub leeway_secs: u64,
    /// Cancelled on SIGTERM/SIGINT (or by tests): sessions say goodbye and end.
    pub shutdown: CancellationToken,
}
