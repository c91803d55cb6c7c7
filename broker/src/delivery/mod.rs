//! Owns delivery: which path serves each subscription (the gate's inbox of a
//! session, or the router), where every publish goes, and which topics are
//! commands. One owner, one table; the session asks, and never decides.
//!
//! The map:
//! - [`Delivery`] (this file): what a session may ask, and the seam a second
//!   implementation plugs into (see below).
//! - `local.rs`: [`LocalDelivery`], the one-node implementation: the path
//!   decision for a subscription, a session's row at its start and end, the
//!   rows persistent sessions keep while their client is away.
//! - `table.rs`: [`Table`], the one subscription table every session shares:
//!   per topic, the inboxes the gate serves it to, the device sessions and
//!   handler subscriptions the router serves it to, command declarations,
//!   retained topics; the configured command topics.
//! - `row.rs`: [`Subscriptions`], one session's row: filters held (the cap
//!   counts them), the path of each, a handler's declared commands.
//! - `route.rs`: [`Table::route`], the decision for one publish.
//! - `inbox.rs`: [`ReplyInbox`], a clean device session's bounded inbox.
//! - `resume.rs`: what a persistent session carries to another node.
//! - `ack.rs`: an acknowledgement the delivery owes a publish later
//!   ([`ack::Pending`] in [`Routed`], settled through its [`ack::Ticket`]).
//!
//! The rules (README, "Replies skip the router"): the gate serves a
//! subscription itself only if it is a QoS 0 subscription of a clean device
//! session (nothing to keep after the connection, nothing to acknowledge) to
//! a topic that has never held a retained message (a new subscriber must get
//! it, and the router holds it). Everything else stays in the router. A
//! session gets each topic from one path only, so the order of messages per
//! topic is kept; a subscription keeps its path for as long as it exists.
//!
//! # The seam
//! [`Delivery`] is everything the session knows of delivery; it holds its
//! row ([`Subscriptions`]) and hands it back, but changes nothing in it.
//! The multi-node implementation (the `cluster` crate, over Redis)
//! implements [`Delivery`] and wraps [`LocalDelivery`], which stays as it
//! is: the rows, the inboxes and the local table are per node (what other
//! nodes send comes in through `crate::inject`). What it adds, per method
//! (ARCHITECTURE.md, "Many nodes", says which are done):
//! - `open`: while a node holds a session of a user, it listens for that
//!   user's replies (`SSUBSCRIBE` on a `{uid}` channel); a persistent
//!   device session's record (subscriptions, cursor) is kept in the
//!   cluster, read back by `resume` at CONNECT on the node the device
//!   reconnects to (`resume.rs`), kept current by `subscribed`,
//!   `unsubscribed`, `session_expiry` and `delivered`.
//! - `route`: a reply is also appended to the user's stream (and announced
//!   on the `{uid}` channel); a command goes to its topic's stream, for the
//!   consumer groups of handlers on any node. The local decision (inboxes
//!   now, router or not) is unchanged. A QoS 1 or 2 publish appended this
//!   way carries an [`ack::Pending`]: the client's PUBACK or PUBREC waits
//!   for the append.
//! - `close` / `expire`: a persistent session's record lives for its
//!   expiry, then goes; the listening stops with the node's last session of
//!   the user.
//! - `is_command` / `granted`: handlers' declarations are shared, so a
//!   device on one node may publish to a command a handler on another
//!   declared.
//!
//! - `delivered`: a client acknowledged a publish that carried a
//!   [`DELIVERY_TAG`]: a command is acknowledged in its stream (`XACK`)
//!   once a handler acknowledged it; a reply moves a persistent session's
//!   cursor; `skipped`: one not written (too large) is not waited for.
//! - `will_armed` / `will_done` / `will_reconnected` (default: nothing): a
//!   device's will is kept in the cluster while it is owed, so another
//!   node publishes it if this one dies, and a reconnect on another node
//!   publishes or drops a dead node's.
//!
//! `subscribe` and `unsubscribe` stay local decisions (the path is per
//! connection); the cluster only learns the user's interest through `open`.

pub mod ack;
mod inbox;
mod local;
mod resume;
mod route;
mod row;
mod table;

pub use inbox::{Reply, ReplyInbox, Served, INBOX_LIMIT_BYTES};
pub use local::LocalDelivery;
pub use resume::{ResumeFuture, Resumed, SessionSubscription};
pub use route::Routed;
pub use row::{Kind, Subscriptions};
pub use table::Table;

use crate::acl::{CommandTopics, Denial};
use crate::router::protocol::{Publish, PublishProperties, QoS};
use crate::wills::{ReadyWill, WillClock};

/// The one gate-internal user property an injected publish may carry: an
/// opaque tag (at most [`DELIVERY_TAG_MAX`] bytes of UTF-8, made by the
/// `cluster` crate) that [`Delivery::delivered`] hands back once the client
/// acknowledged the publish. The session removes it before writing any
/// publish to a client, and the gate removes it from every publish and will
/// a client sends, so it cannot be forged.
pub const DELIVERY_TAG: &str = "x-gate-tag";

/// The longest [`DELIVERY_TAG`] value the cluster makes, in bytes.
pub const DELIVERY_TAG_MAX: usize = 256;

/// The other gate-internal user property, only with a [`DELIVERY_TAG`]:
/// the id of the one session an injected publish is for (the cluster's
/// replay of a user's replies to the one session that resumed on this
/// node). Every other session the router hands it to settles it with the
/// router unwritten (as a publish too large for its client) and reports
/// nothing. Removed before writing, and from what clients send, as the
/// tag is.
pub const DELIVERY_TARGET: &str = "x-gate-for";

/// How a connection of a session starts, for [`Delivery::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    pub kind: Kind,
    /// Its subscriptions outlive the connection (the gate's sense: MQTT 5
    /// with a Session Expiry Interval, or 3.1.1 without Clean Session).
    pub persistent: bool,
    /// The client asked for a clean start: what a persistent session of the
    /// same id left is released, not resumed.
    pub clean_start: bool,
    /// Most filters the session may hold.
    pub cap: usize,
}

/// One filter of a SUBSCRIBE (already authorized), for
/// [`Delivery::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub filter: &'a str,
    /// The QoS the client asked for.
    pub qos: QoS,
    /// Retain Handling 0: a retained message is sent on every subscribe,
    /// which only the router can do.
    pub resend_retained: bool,
    /// The options a delivery from the inbox carries.
    pub served: Served,
}

/// Which path serves one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The gate delivers from the session's inbox, at granted QoS 0: the
    /// session answers the SUBACK itself.
    Inbox,
    /// The router serves it: the session forwards the filter, and the
    /// router's SUBACK grants the QoS.
    Router,
}

/// Everything a session asks of delivery (see "The seam" above). Each
/// method is a decision or a change of the table; none waits.
pub trait Delivery: CommandTopics + Send + Sync {
    /// A connection of session `id` starts (after its claim, so an earlier
    /// connection of it has closed): its row, resumed from what a
    /// persistent session left, or fresh.
    fn open(&self, id: &str, opening: Opening) -> Subscriptions;

    /// `row` subscribes to `request.filter`: admitted under the cap (a
    /// resubscription always), and served by the path this decides.
    fn subscribe(&self, row: &mut Subscriptions, request: &Request<'_>) -> Result<Path, Denial>;

    /// The router granted `filter` to `row`: a handler's filter declares a
    /// command topic (see [`Table::declare`]).
    fn granted(&self, row: &mut Subscriptions, filter: &str);

    /// `row` unsubscribes from `filter`.
    fn unsubscribe(&self, row: &mut Subscriptions, filter: &str);

    /// Routes one publish (already authorized): delivered to the inboxes
    /// that serve its topic now; the answer says whether the router still
    /// needs it, and (`Routed::later`) whether the client's acknowledgement
    /// of a QoS 1 publish must wait for the delivery to store it.
    fn route(
        &self,
        topic: &str,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Routed;

    /// The connection of session `id` ended, however it ended: a clean
    /// session's row is forgotten, a persistent one's kept for its next
    /// connection. Leaves `row` empty.
    fn close(&self, id: &str, row: &mut Subscriptions);

    /// Persistent session `id` expired: what it kept is released.
    fn expire(&self, id: &str);

    /// The client of session `session_id` acknowledged a publish that
    /// carried [`DELIVERY_TAG`] `tag`: QoS 0 once written, QoS 1 on its
    /// PUBACK, QoS 2 on its PUBCOMP (or a PUBREC refusing it, which ends
    /// the flow). A publish not written (too large for the client, expired,
    /// the connection ended first) is not reported. Called from the
    /// session: must not wait.
    fn delivered(&self, session_id: &str, tag: &str) {
        let _ = (session_id, tag);
    }

    /// Session `session_id` will not write the publish that carried
    /// [`DELIVERY_TAG`] `tag` to its client: too large for it (settled
    /// with the router unwritten). Never for a publish aimed at another
    /// session ([`DELIVERY_TARGET`]). Called from the session: must not
    /// wait.
    fn skipped(&self, session_id: &str, tag: &str) {
        let _ = (session_id, tag);
    }

    /// At CONNECT with Clean Start 0 of persistent device session `id`,
    /// before its router session opens: whether it lived on another node,
    /// and with which subscriptions. Awaited under the caller's deadline.
    fn resume(&self, _id: &str) -> ResumeFuture {
        Box::pin(std::future::ready(Resumed::Here))
    }

    /// Persistent session `id` lasts `expiry` after its connection ends
    /// (told at each CONNECT of a device, after [`Delivery::open`], and
    /// when a connection ends with the expiry its DISCONNECT may have
    /// changed).
    fn session_expiry(&self, _id: &str, _expiry: std::time::Duration) {}

    /// Persistent device session `id` now holds `subscriptions` (the
    /// router serves them; a filter held already is replaced).
    fn subscribed(&self, _id: &str, _subscriptions: &[SessionSubscription]) {}

    /// Persistent device session `id` no longer holds `filters`.
    fn unsubscribed(&self, _id: &str, _filters: &[String]) {}
    /// Connection `connection` (its claim serial) of device session `id`
    /// has `will`, due as `clock` says: with several nodes, a copy is kept
    /// where another node can publish it if this one dies. Called again
    /// when the connection ends and the will waits for its delay.
    fn will_armed(&self, _id: &str, _connection: u64, _will: &ReadyWill, _clock: WillClock) {}

    /// The will connection `connection` of session `id` armed is published,
    /// cancelled or dropped here: the copy goes (a later connection's stays).
    fn will_done(&self, _id: &str, _connection: u64) {}

    /// A connection of device session `id` opens (before its own will is
    /// armed): a will another node armed for it and can no longer publish
    /// (that node died) is published now (`clean_start`) or dropped (the
    /// session resumes: MQTT-3.1.3-9).
    fn will_reconnected(&self, _id: &str, _clean_start: bool) {}
}
