//! Owns [`ClusterDelivery`]: the broker's delivery seam
//! (`broker::delivery::Delivery`) for many nodes. Each method keeps the
//! wrapped [`LocalDelivery`]'s decision and queues what Redis must learn
//! (appends, record and will changes, acknowledgements) for the node's
//! tasks; none waits on Redis.

use crate::*;

/// Delivery across nodes: the local decision, plus Redis (see the crate's
/// map). Every method stays synchronous and never waits on Redis: appends
/// are queued, subscriptions are changed by the node's tasks.
pub struct ClusterDelivery {
    pub(crate) local: Arc<LocalDelivery>,
    pub(crate) id: Arc<str>,
    pub(crate) interest: Arc<Interest>,
    pub(crate) groups: Arc<Groups>,
    /// Command topics handlers on other nodes declared.
    pub(crate) declared: Arc<Declared>,
    pub(crate) replies: Appends,
    pub(crate) commands: Appends,
    /// Device sessions opened here, announced to the other nodes (one of
    /// them may hold the same session: it ends it).
    pub(crate) takeovers: Queue,
    /// Commands handlers here acknowledged, for their `XACK`.
    pub(crate) acks: acks::AckQueue,
    /// Retained publishes received here, for the cluster's store.
    pub(crate) retained: retained::StoreQueue,
    pub(crate) retained_held: Arc<retained::Held>,
    pub(crate) metrics: Arc<Metrics>,
    /// Device sessions counted in `interest` (a persistent one until it
    /// expires or a clean connection replaces it), by session id.
    pub(crate) held: Mutex<HashSet<String>>,
    /// Persistent device sessions held here, with their records in Redis.
    pub(crate) persistent: Arc<Persistent>,
    /// Acknowledgements a paced burst of replies waits for.
    pub(crate) paced: Arc<crate::pacing::Acks>,
    /// Commands handlers here are working on (`holds.rs`).
    pub(crate) holds: Arc<Mutex<crate::holds::Holds>>,
    /// Replays for sessions that moved here (the listener's).
    pub(crate) resumes: mpsc::Sender<Resume>,
    pub(crate) redis: Redis,
    /// Devices' wills kept in Redis for when this node dies.
    pub(crate) wills: wills::Copies,
}

/// The user id of a device session id (`D:<uid>:<client>`).
pub(crate) fn device_uid(session_id: &str) -> Option<&str> {
    session_id.strip_prefix("D:")?.split(':').next()
}

impl ClusterDelivery {
    fn forget(&self, id: &str) {
        if self.held.lock().remove(id) {
            if let Some(uid) = device_uid(id) {
                self.interest.remove(uid);
            }
        }
    }

    /// Whether `filter`, declared by a handler here, is read from the
    /// command streams: it names a command topic (configured, or declared
    /// by the local table's rules: never a reply topic or a wildcard).
    fn reads(&self, row: &Subscriptions, filter: &str) -> bool {
        row.is_declared(filter)
            && self
                .local
                .is_command(protocol::topics::effective_filter(filter))
    }

    fn queue(&self, queue: &Appends, append: Append) {
        let (outcome, append) = match queue.try_send(append) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(append)) => (Outcome::QueueFull, append),
            Err(mpsc::error::TrySendError::Closed(append)) => (Outcome::Failed, append),
        };
        self.metrics.cluster_dropped("queue_full", 1);
        if let Some(ticket) = append.ticket {
            ticket.settle(outcome);
        }
    }
}

impl CommandTopics for ClusterDelivery {
    fn is_command(&self, topic: &str) -> bool {
        self.local.is_command(topic) || self.declared.contains(topic)
    }
}

impl Delivery for ClusterDelivery {
    fn open(&self, id: &str, opening: Opening) -> Subscriptions {
        let row = self.local.open(id, opening);
        match row.kind() {
            Kind::Device => {
                if let Some(uid) = device_uid(id) {
                    if self.held.lock().insert(id.to_owned()) {
                        self.interest.add(uid);
                    }
                    let opened = replies::opened(id, opening.clean_start);
                    if self.takeovers.try_send((uid.to_owned(), opened)).is_err() {
                        self.metrics.cluster_dropped("queue_full", 1);
                    }
                    let moved = self
                        .persistent
                        .open(id, opening.persistent, opening.clean_start);
                    if let Some(from) = moved {
                        let replay = Resume::Replay {
                            uid: uid.to_owned(),
                            from,
                            session: id.to_owned(),
                        };
                        if self.resumes.try_send(replay).is_err() {
                            self.metrics.cluster_dropped("queue_full", 1);
                            // Its cursor stays; a resync replays it.
                            self.persistent.replayed(id, false);
                        }
                    }
                }
            }
            Kind::Handler => {
                for filter in row.declared() {
                    if self.reads(&row, filter) {
                        self.groups.add(filter, &self.id);
                    }
                }
            }
        }
        row
    }

    fn subscribe(&self, row: &mut Subscriptions, request: &Request<'_>) -> Result<Path, Denial> {
        self.local.subscribe(row, request)
    }

    fn granted(&self, row: &mut Subscriptions, filter: &str) {
        let before = row.is_declared(filter);
        self.local.granted(row, filter);
        if !before && self.reads(row, filter) {
            self.groups.add(filter, &self.id);
        }
    }

    fn unsubscribe(&self, row: &mut Subscriptions, filter: &str) {
        if self.reads(row, filter) {
            self.groups.remove(filter, &self.id);
        }
        self.local.unsubscribe(row, filter);
    }

    fn route(
        &self,
        topic: &str,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Routed {
        let mut routed = self.local.route(topic, publish, properties);
        if publish.retain {
            // Retained messages go to every node through the retained log
            // (`retained.rs`), never a user's reply stream: delivered once
            // per node, and to nodes with no session of the user.
            // A QoS 1 publish's PUBACK (QoS 2: PUBREC) waits for the
            // store, as for an append: a handler's in-flight window paces
            // its retained publishes, and one refused (a cap) or lost is
            // answered so.
            match Entry::encode(&self.id, publish, properties) {
                Ok(entry) => {
                    self.retained_held
                        .received(topic, &entry, publish.payload.is_empty());
                    let ticket = (publish.qos() != QoS::AtMostOnce).then(|| {
                        let (ticket, pending) = ack::ticket(Instant::now() + ACK_WITHIN);
                        routed.later = Some(pending);
                        ticket
                    });
                    let append = Append {
                        key: topic.to_owned(),
                        entry,
                        ticket,
                    };
                    self.queue(&self.retained, append);
                }
                Err(_) => self.metrics.cluster_dropped("unencodable", 1),
            }
            return routed;
        }
        let command = self.is_command(topic);
        let mut left_to_stream = false;
        let key = if command {
            // Handlers anywhere read it from the stream, local ones too.
            routed.needs_router = false;
            command_key(topic, partition(properties))
        } else {
            match topic.split_once('_') {
                Some((uid, _)) if protocol::uid::is_reply_shaped(topic) => {
                    if self.persistent.holds_user(uid) {
                        // Through the stream, so that it reaches the
                        // router here with its stream id (`replies::deliver`)
                        // and a persistent session's acknowledgement moves
                        // its cursor, at every QoS. The entry records the
                        // choice, so that this node delivers it from the
                        // stream even if the session has left by then. The
                        // gate owns a QoS 2 sender's exactly once (the
                        // router never gets this publish from it).
                        routed.needs_router = false;
                        left_to_stream = true;
                    }
                    uid.to_owned()
                }
                _ => return routed,
            }
        };
        let entry = match Entry::encode_with(&self.id, left_to_stream, publish, properties) {
            Ok(entry) => entry,
            Err(_) => {
                self.metrics.cluster_dropped("unencodable", 1);
                return routed;
            }
        };
        // A QoS 1 publish's PUBACK, and a QoS 2 one's PUBREC, waits for
        // its append (QoS 0 is fire and forget). A QoS 2 command never
        // reaches the router (`needs_router` is false): the session owns
        // its exactly once.
        let ticket = (publish.qos() != QoS::AtMostOnce).then(|| {
            let (ticket, pending) = ack::ticket(Instant::now() + ACK_WITHIN);
            routed.later = Some(pending);
            ticket
        });
        let append = Append { key, entry, ticket };
        self.queue(
            if command {
                &self.commands
            } else {
                &self.replies
            },
            append,
        );
        routed
    }

    fn close(&self, id: &str, row: &mut Subscriptions) {
        if row.kind() == Kind::Handler {
            for filter in row.declared() {
                if self.reads(row, filter) {
                    self.groups.remove(filter, &self.id);
                }
            }
        }
        if !row.persistent() {
            self.forget(id);
        } else if row.kind() == Kind::Device {
            self.persistent.close(id);
        }
        self.local.close(id, row);
    }

    fn expire(&self, id: &str) {
        self.forget(id);
        self.persistent.expire(id);
        self.local.expire(id);
    }

    fn will_armed(&self, id: &str, connection: u64, will: &ReadyWill, clock: WillClock) {
        self.wills.armed(id, connection, will, clock);
    }

    fn will_done(&self, id: &str, connection: u64) {
        self.wills.done(id, connection);
    }

    fn will_reconnected(&self, id: &str, clean_start: bool) {
        self.wills.reconnected(id, clean_start);
    }

    fn delivered(&self, session_id: &str, tag: &str) {
        // A command a handler here acknowledged: its XACK is queued.
        if let Some(command) = acks::CommandTag::parse(tag) {
            self.holds.lock().released(&command);
            if self.acks.try_send(command).is_err() {
                // Delivered again once idle: a duplicate, not a loss.
                self.metrics.cluster_dropped("ack_queue_full", 1);
            }
            return;
        }
        // A reply a paced burst waits for, and a persistent session's
        // cursor.
        self.paced.delivered(session_id, tag);
        self.persistent.delivered(session_id, tag);
    }

    fn skipped(&self, session_id: &str, tag: &str) {
        // A reply too large for the client: a persistent session's cursor
        // does not wait for it. A command's: no longer kept from looking
        // idle, so it is delivered again once idle, to a handler that may
        // take it.
        if let Some(command) = acks::CommandTag::parse(tag) {
            self.holds.lock().released(&command);
            return;
        }
        self.persistent.skipped(session_id, tag);
    }

    fn resume(&self, id: &str) -> ResumeFuture {
        let resumes = self.resumes.clone();
        let read = self
            .persistent
            .clone()
            .resume(self.redis.clone(), id.to_owned());
        let uid = device_uid(id).map(str::to_owned);
        Box::pin(sessions::holding_replies(read, resumes, uid))
    }

    fn session_expiry(&self, id: &str, expiry: std::time::Duration) {
        self.persistent.expiry(id, expiry);
    }

    fn subscribed(&self, id: &str, subscriptions: &[SessionSubscription]) {
        self.persistent.subscribed(id, subscriptions);
    }

    fn unsubscribed(&self, id: &str, filters: &[String]) {
        self.persistent.unsubscribed(id, filters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_uids_of_session_ids() {
        let table = [
            ("D:42:phone", Some("42")),
            ("D:alice:a%3Ab", Some("alice")),
            ("H:sync-1", None),
            ("X:cluster-1", None),
        ];
        for (id, uid) in table {
            assert_eq!(device_uid(id), uid, "{id}");
        }
    }
}
