use crate::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    LastWillProperties, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use crate::router::scheduler::{PauseReason, Tracker};
use crate::router::{ConnectionEvents, Forward};
use crate::segments::Position;
use crate::*;
use flume::{bounded, Receiver, RecvError, Sender, TryRecvError};
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::str::Utf8Error;
use std::sync::Arc;
use std::thread;
use std::time::{Instant, SystemTime};
use thiserror::Error;
use tracing::{debug, error, info, trace, warn};

use super::graveyard::Graveyard;
use super::iobufs::{Incoming, Outgoing};
use super::logs::{AckLog, DataLog, PublishData, Qos2Record};
use super::scheduler::{ScheduleReason, Scheduler};
use super::shared_subs::SharedGroup;
use super::{
    packetid, Connection, DataRequest, Event, FilterIdx, Notification, MAX_CHANNEL_CAPACITY,
    MAX_SCHEDULE_ITERATIONS,
};

#[derive(Error, Debug)]
pub enum RouterError {
    #[error("Receive error = {0}")]
    Recv(#[from] RecvError),
    #[error("Try Receive error = {0}")]
    TryRecv(#[from] TryRecvError),
    #[error("Disconnection")]
    Disconnected,
    #[error("Topic not utf-8")]
    NonUtf8Topic(#[from] Utf8Error),
    #[error("No matching filters to topic {0}")]
    NoMatchingFilters(String),
    #[error("Invalid filter prefix {0}")]
    InvalidFilterPrefix(Filter),
    #[error("Invalid client_id {0}")]
    InvalidClientId(String),
    #[error("Disconnection (Reason: {0:?})")]
    Disconnect(DisconnectReasonCode),
    /// patched: a connection id with no connection (instead of a panic).
    #[error("No connection {0}")]
    NoConnection(ConnectionId),
}

// TODO: set this to some appropriate value
const TOPIC_ALIAS_MAX: u16 = 4096;

pub struct Router {
    id: RouterId,
    /// Id of this router. Used to index native commitlog to store data from
    /// local connections
    config: RouterConfig,
    /// Saved state of dead persistent connections
    graveyard: Graveyard,
    /// patched: how many saved (offline) persistent sessions hold each
    /// filter; their cursors point into its log, so it must not be trimmed.
    persistent_readers: HashMap<Filter, usize>,
    /// patched: how many sessions (connected, or saved while offline) hold
    /// a subscription reading each filter's log (`$share/<g>/<f>` counts
    /// for `f`). At zero the log and its entries are freed (upstream kept
    /// every filter ever subscribed, so memory grew with distinct filters).
    filter_readers: HashMap<Filter, usize>,
    /// List of connections
    connections: Slab<Connection>,
    /// Connection map from device id to connection id
    connection_map: HashMap<String, ConnectionId>,
    /// Subscription map to interested connection ids
    subscription_map: HashMap<Filter, HashSet<ConnectionId>>,
    /// Incoming data grouped by connection
    ibufs: Slab<Incoming>,
    /// Outgoing data grouped by connection
    obufs: Slab<Outgoing>,
    /// Data log of all the subscriptions
    datalog: DataLog,
    /// Acks log per connection
    ackslog: Slab<AckLog>,
    /// Scheduler to schedule connections
    scheduler: Scheduler,
    /// Parked requests that are ready because of new data on the subscription
    notifications: VecDeque<(ConnectionId, DataRequest)>,
    /// Channel receiver to receive data from all the active connections and
    /// replicators. Each connection will have a tx handle which they use
    /// to send data and requests to router
    router_rx: Receiver<(ConnectionId, Event)>,
    /// Channel sender to send data to this router. This is given to active
    /// network connections, local connections and replicators to communicate
    /// with this router
    router_tx: Sender<(ConnectionId, Event)>,
    /// Buffer for cache exchange of incoming packets
    cache: Option<VecDeque<Packet>>,
    /// Shared subscriptions map <group-name, group>
    shared_subscriptions: HashMap<String, SharedGroup>,
    /// Will messages per client_id
    last_wills: HashMap<String, (LastWill, Option<LastWillProperties>)>,
}

impl Router {
    pub fn new(router_id: RouterId, config: RouterConfig) -> Router {
        let (router_tx, router_rx) = bounded(1000);

        let connections = Slab::with_capacity(config.max_connections);
        let ibufs = Slab::with_capacity(config.max_connections);
        let obufs = Slab::with_capacity(config.max_connections);
        let ackslog = Slab::with_capacity(config.max_connections);

        let max_connections = config.max_connections;
        Router {
            id: router_id,
            config: config.clone(),
            graveyard: Graveyard::new(),
            persistent_readers: HashMap::new(),
            filter_readers: HashMap::new(),
            connections,
            connection_map: Default::default(),
            subscription_map: Default::default(),
            ibufs,
            obufs,
            datalog: DataLog::new(config.clone()),
            ackslog,
            scheduler: Scheduler::with_capacity(max_connections),
            notifications: VecDeque::with_capacity(1024),
            router_rx,
            router_tx,
            cache: Some(VecDeque::with_capacity(MAX_CHANNEL_CAPACITY)),
            shared_subscriptions: HashMap::new(),
            last_wills: HashMap::new(),
        }
    }

    /// Gets handle to the router. This is not a public method to ensure that link
    /// is created only after the router starts
    fn link(&self) -> Sender<(ConnectionId, Event)> {
        self.router_tx.clone()
    }

    // pub(crate) fn get_replica_handle(&mut self, _replica_id: NodeId) -> (LinkTx, LinkRx) {
    //     unimplemented!()
    // }

    /// Starts the router in a background thread and returns link to it. Link
    /// to communicate with router should only be returned only after it starts.
    /// For that reason, all the public methods should start the router in the
    /// background
    #[tracing::instrument(skip_all)]
    pub fn spawn(mut self) -> Sender<(ConnectionId, Event)> {
        let router = thread::Builder::new().name(format!("router-{}", self.id));
        let link = self.link();
        // Startup, not client input: a router that cannot get its thread
        // cannot run at all.
        #[allow(clippy::expect_used)]
        router
            .spawn(move || {
                let e = self.run(0);
                error!(reason=?e, "Router done!");
            })
            .expect("router thread");
        link
    }

    /// patched: runs the router as a task on the caller's tokio runtime
    /// instead of on a thread of its own. With its own thread every publish
    /// crossed threads twice (connection task -> router thread -> connection
    /// task), and those futex wake-ups were about a third of the broker's CPU
    /// per round trip. On the runtime, the wake-ups are task switches.
    /// Must be called from inside a tokio runtime.
    /// The handle ends, with the reason, when the router does: it runs until
    /// every sender is gone, so an end while the program runs is a failure.
    pub fn spawn_on_runtime(
        mut self,
    ) -> (
        Sender<(ConnectionId, Event)>,
        tokio::task::JoinHandle<String>,
    ) {
        let link = self.link();
        let task = tokio::spawn(async move {
            match self.run_async().await {
                Err(e) => e.to_string(),
                Ok(never) => match never {},
            }
        });
        (link, task)
    }

    async fn run_async(&mut self) -> Result<std::convert::Infallible, RouterError> {
        loop {
            // As `run_inner`, but waiting on the channel yields the worker
            // instead of blocking it.
            if self.consume().is_none() {
                let (id, data) = self.router_rx.recv_async().await?;
                self.events(id, data);
            }
            self.run_batch()?;
            // A busy router must still let the connection tasks it feeds run
            // (they share its worker): give the worker back after each batch.
            tokio::task::yield_now().await;
        }
    }

    /// Waits on incoming events when ready queue is empty.
    /// After pulling 1 event, tries to pull 500 more events
    /// before polling ready queue 100 times (connections)
    #[tracing::instrument(skip_all)]
    fn run(&mut self, count: usize) -> Result<(), RouterError> {
        match count {
            0 => loop {
                self.run_inner()?;
            },
            n => {
                for _ in 0..n {
                    self.run_inner()?;
                }
            }
        };

        Ok(())
    }

    fn run_inner(&mut self) -> Result<(), RouterError> {
        // Block on incoming events if there are no ready connections for consumption
        if self.consume().is_none() {
            // trace!("{}:: {:20} {:20} {:?}", self.id, "", "done-await", self.readyqueue);
            let (id, data) = self.router_rx.recv()?;
            self.events(id, data);
        }
        self.run_batch()
    }

    /// The work after the first event of a batch (patched: shared by
    /// `run_inner` and `run_async`).
    fn run_batch(&mut self) -> Result<(), RouterError> {
        // Try reading more from connections in a non-blocking
        // fashion to accumulate data and handle subscriptions.
        // Accumulating more data lets requests retrieve bigger
        // bulks which in turn increases efficiency
        for _ in 0..500 {
            // All these methods will handle state and errors
            match self.router_rx.try_recv() {
                Ok((id, data)) => self.events(id, data),
                Err(TryRecvError::Disconnected) => return Err(RouterError::Disconnected),
                Err(TryRecvError::Empty) => break,
            }
        }

        // A connection should not be scheduled multiple times
        #[cfg(debug_assertions)]
        if let Some(readyqueue) = self.scheduler.check_readyqueue_duplicates() {
            warn!(
                "Connection was scheduled multiple times in readyqueue: {:?}",
                readyqueue
            );
        }

        // Poll 100 connections which are ready in ready queue
        for _ in 0..100 {
            self.consume();
        }

        Ok(())
    }

    fn events(&mut self, id: ConnectionId, data: Event) {
        // patched: trace level (was error): an enabled span formats its fields on
        // every batch, a measurable share of the router thread at warn level.
        let span = tracing::trace_span!("[>] incoming", connection_id = id);
        let _guard = span.enter();

        match data {
            Event::Connect {
                connection,
                incoming,
                outgoing,
            } => self.handle_new_connection(connection, incoming, outgoing),
            Event::DeviceData => self.handle_device_payload(id),
            Event::Disconnect => self.handle_disconnection(id, None),
            Event::Ready => self.scheduler.reschedule(id, ScheduleReason::Ready),
            Event::PublishWill(client_id) => self.handle_last_will(client_id),
        }
    }

    fn handle_new_connection(
        &mut self,
        mut connection: Connection,
        incoming: Incoming,
        mut outgoing: Outgoing,
    ) {
        let client_id = outgoing.client_id.clone();
        if let Err(err) = validate_clientid(&client_id) {
            error!("Invalid client_id: {}", err);
            return;
        };

        let span = tracing::info_span!("incoming_connect", client_id);
        let _guard = span.enter();

        // Check if same client_id already exists and if so, replace it with this new connection
        // ref: https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html#_Toc398718032
        if let Some(connection_id) = self.connection_map.get(&client_id) {
            error!(
                "Duplicate client_id, dropping previous connection with connection_id: {}",
                connection_id
            );
            self.handle_disconnection(*connection_id, None);
        }

        if self.connections.len() >= self.config.max_connections {
            error!("no space for new connection");
            // let ack = ConnectionAck::Failure("No space for new connection".to_owned());
            // let message = Notification::ConnectionAck(ack);
            return;
        }

        // Retrieve previous connection state from graveyard
        let saved = self.graveyard.retrieve(&client_id);
        if let Some(state) = saved.as_ref().and_then(|s| s.session_state.as_ref()) {
            for filter in &state.subscriptions {
                if let Some(count) = self.persistent_readers.get_mut(filter) {
                    *count -= 1;
                    if *count == 0 {
                        self.persistent_readers.remove(filter);
                    }
                }
            }
        }
        let clean_session = connection.clean;
        let previous_session = saved.as_ref().is_some_and(|s| s.session_state.is_some());
        // patched: a clean start ends the saved session: its filters lose a
        // reader (and are freed if it was the last).
        if clean_session {
            if let Some(state) = saved.as_ref().and_then(|s| s.session_state.as_ref()) {
                let dropped: Vec<Filter> = state.subscriptions.iter().cloned().collect();
                for path in &dropped {
                    self.release_filter(path);
                }
            }
        }
        // for qos2 pending pubrels
        let mut pending_acks = VecDeque::new();
        // patched: incoming QoS 2 publishes the saved session awaits PUBREL for
        let mut awaiting_pubrel = HashMap::new();

        let tracker = if !clean_session {
            // if there was some saved state, restore the metrics
            // and get the session's state if present
            let saved_state = saved.and_then(|saved| {
                connection.events = saved.metrics;
                saved.session_state
            });

            // if session's state is present, restore that session
            // otherwise, just start new one
            saved_state.map_or_else(
                || Tracker::new(client_id.clone()),
                |session_state| {
                    connection.subscriptions = session_state.subscriptions;
                    // for using in acklog
                    pending_acks.clone_from(&session_state.unacked_pubrels);
                    outgoing.unacked_pubrels = session_state.unacked_pubrels;
                    awaiting_pubrel = session_state.awaiting_pubrel;
                    session_state.tracker
                },
            )
        } else {
            // Only retrieve metrics in clean session
            connection.events = saved.map_or_else(ConnectionEvents::default, |s| s.metrics);
            Tracker::new(client_id.clone())
        };

        let mut ackslog = AckLog::new();
        ackslog.restore_recorded(awaiting_pubrel);

        let time = match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(v) => v.as_millis().to_string(),
            Err(e) => format!("Time error = {e:?}"),
        };

        let event = "connection at ".to_owned() + &time + ", clean = " + &clean_session.to_string();
        connection.events.events.push_back(event);

        if connection.events.events.len() > 10 {
            connection.events.events.pop_front();
        }

        if let Some(will) = connection.last_will.take() {
            self.last_wills.insert(
                client_id.clone(),
                (will, connection.last_will_properties.take()),
            );
        }

        // patched: a restored persistent session rejoins its shared groups.
        // Upstream restored the session's `$share/...` requests but not its
        // group membership, so the requests read a group it was not in (and
        // never got a turn) or no group at all.
        self.rejoin_shared_groups(&client_id, &tracker);

        let connection_id = self.connections.insert(connection);
        assert_eq!(self.ibufs.insert(incoming), connection_id);
        assert_eq!(self.obufs.insert(outgoing), connection_id);

        self.connection_map.insert(client_id.clone(), connection_id);
        info!(connection_id, "Client connection registered");

        assert_eq!(self.ackslog.insert(ackslog), connection_id);
        assert_eq!(self.scheduler.add(tracker), connection_id);

        // Check if there are multiple data requests on same filter.
        debug_assert!(self
            .scheduler
            .check_tracker_duplicates(connection_id)
            .is_none());

        let ack = ConnAck {
            session_present: !clean_session && previous_session,
            code: ConnectReturnCode::Success,
        };

        let properties = ConnAckProperties {
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            ..Default::default()
        };

        let Some(ackslog) = self.ackslog.get_mut(connection_id) else {
            return;
        };
        ackslog.connack(connection_id, ack, Some(properties));

        pending_acks.into_iter().for_each(|pkid| {
            // NOTE: will it be better if we store the whole PubRel
            // instead of pkid in pending acks
            let pubrel = PubRel {
                pkid,
                reason: PubRelReason::Success,
            };
            ackslog.pubrel(pubrel)
        });

        self.scheduler
            .reschedule(connection_id, ScheduleReason::Init);
    }

    /// patched: adds `client_id` back to the shared groups its restored
    /// requests read through. A group emptied while the session was offline
    /// is re-created at the request's cursor (where its unacknowledged
    /// deliveries start), so nothing published meanwhile is skipped.
    fn rejoin_shared_groups(&mut self, client_id: &str, tracker: &Tracker) {
        for request in tracker.data_requests.iter() {
            let Some(group_name) = request.group.as_ref() else {
                continue;
            };
            let group = self
                .shared_subscriptions
                .entry(group_name.clone())
                .or_insert_with(|| {
                    SharedGroup::new(
                        request.cursor,
                        self.config.shared_subscriptions_strategy.clone(),
                    )
                });
            if !group.contains(client_id) {
                group.add_client(client_id.to_owned());
            }
            self.member_joined(group_name, &request.filter);
        }
    }

    /// patched: one more session reads the log of `path`'s filter.
    fn hold_filter(&mut self, path: &str) {
        let filter = extract_group(path).map_or_else(|| path.to_owned(), |(_, f)| f);
        *self.filter_readers.entry(filter).or_default() += 1;
    }

    /// patched: one session fewer reads the log of `path`'s filter; the last
    /// one gone frees the log, its waiters and its index entries. Retained
    /// messages are kept apart (by topic) and stay.
    fn release_filter(&mut self, path: &str) {
        let filter = extract_group(path).map_or_else(|| path.to_owned(), |(_, f)| f);
        let Some(count) = self.filter_readers.get_mut(&filter) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.filter_readers.remove(&filter);
            self.datalog.remove_filter(&filter);
        }
    }

    fn handle_disconnection(&mut self, id: ConnectionId, reason: Option<DisconnectReasonCode>) {
        // Some clients can choose to send Disconnect packet before network disconnection.
        // This will lead to double Disconnect packets in router `events`
        let client_id = match &self.obufs.get(id) {
            Some(v) => v.client_id.clone(),
            None => {
                error!("no-connection id {} is already gone", id);
                return;
            }
        };

        let span = tracing::info_span!("incoming_disconnect", client_id);
        let _guard = span.enter();

        // must handle last will before sending disconnect packet
        // as the disconnecting client might have subscribed to will topic.
        // if execute_last_will {
        //     self.handle_last_will(id);
        // }

        info!("Disconnecting connection");

        if let Some(reason_code) = reason {
            let outgoing = match self.obufs.get_mut(id) {
                Some(v) => v,
                None => {
                    error!("no-connection id {} is already gone", id);
                    return;
                }
            };

            let disconnect = Disconnect { reason_code };

            let disconnect_notification = Notification::Disconnect(disconnect, None);

            outgoing
                .data_buffer
                .lock()
                .push_back(disconnect_notification);

            outgoing.handle.try_send(()).ok();
        }

        // Remove connection from router
        // patched: `try_remove` (upstream's `remove` panics on a vacant
        // slot). The slabs are filled and emptied together; `obufs` was
        // checked above.
        // Everything is removed first, so the slabs stay in step whatever
        // was missing.
        let connection = self.connections.try_remove(id);
        let outgoing = self.obufs.try_remove(id);
        let tracker = self.scheduler.remove(id);
        let _incoming = self.ibufs.try_remove(id);
        let ackslog = self.ackslog.try_remove(id);
        self.connection_map.remove(&client_id);
        let (Some(mut connection), Some(outgoing), Some(mut tracker)) =
            (connection, outgoing, tracker)
        else {
            error!("connection {} was half gone", id);
            return;
        };

        // Don't remove connection id from readyqueue with index. This will
        // remove wrong connection from readyqueue. Instead just leave disconnected
        // connection in readyqueue and allow 'consume()' method to deal with this
        // self.readyqueue.remove(id);

        let inflight_data_requests = self.datalog.clean(id);
        let retransmissions = outgoing.retransmission_map();

        // patched: what a clean session leaves unacknowledged in its
        // groups goes back to them (`shared_redelivery.rs`); upstream
        // dropped it.
        let unacked = if connection.clean {
            self.unacked_shared(&connection, &outgoing)
        } else {
            Vec::new()
        };

        // Remove connections from all groups and
        // discard empty group ( group with no client )
        // note: can we do this in better way?
        self.shared_subscriptions.retain(|_, group| {
            group.remove_client(&client_id);
            !group.is_empty() || group.kept
        });

        // Remove this connection from subscriptions
        // (patched: and a filter's entry with it once nobody is left).
        for filter in connection.subscriptions.iter() {
            if let Some(connections) = self.subscription_map.get_mut(filter) {
                connections.remove(&id);
                if connections.is_empty() {
                    self.subscription_map.remove(filter);
                }
            }
        }
        self.give_back_to_groups(unacked);

        // Add disconnection event to metrics
        let time = match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(v) => v.as_millis().to_string(),
            Err(e) => format!("Time error = {e:?}"),
        };

        let event = "disconnection at ".to_owned() + &time;
        connection.events.events.push_back(event);

        if connection.events.events.len() > 10 {
            connection.events.events.pop_front();
        }

        // Save state for persistent sessions
        if !connection.clean {
            // Add inflight data requests back to tracker
            inflight_data_requests
                .into_iter()
                .for_each(|r| tracker.register_data_request(r));

            for request in tracker.data_requests.iter_mut() {
                if let Some(cursor) = retransmissions.get(&request.filter_idx) {
                    request.cursor = *cursor;
                    // patched: rewind the group so that the unacknowledged
                    // deliveries go to its other members. Upstream expected
                    // the group to exist, but the loop above drops a group
                    // its last member leaves: a persistent session that was
                    // the only member of a `$share/...` group and left with
                    // a QoS 1/2 delivery unacknowledged panicked the router
                    // (and with it the broker). An emptied group is gone; the
                    // saved request keeps the rewound cursor and rejoins (or
                    // re-creates) the group on reconnect, see
                    // `rejoin_shared_groups`.
                    if let Some(group) = request
                        .group
                        .as_ref()
                        .and_then(|name| self.shared_subscriptions.get_mut(name))
                    {
                        group.cursor = *cursor;
                    }
                }
            }

            for filter in &connection.subscriptions {
                *self.persistent_readers.entry(filter.clone()).or_default() += 1;
            }
            // patched: incoming QoS 2 publishes awaiting PUBREL are part
            // of the session (MQTT 4.1): kept, so that the PUBREL the client
            // sends after reconnecting releases them (upstream dropped them,
            // and the message was lost).
            let awaiting_pubrel = ackslog
                .map(|mut log| log.take_recorded())
                .unwrap_or_default();
            self.graveyard.save_state(
                tracker,
                connection.subscriptions,
                connection.events,
                outgoing.unacked_pubrels,
                awaiting_pubrel,
            );
        } else {
            // patched: a clean session leaves nothing behind. Upstream kept a
            // metrics record for every client id that ever connected, so a
            // long-running broker grew with each new (or assigned) client id.
            tracker.pause(PauseReason::Busy);
            let _ = connection.events;
            // patched: and its filters lose a reader (freed at zero).
            for path in &connection.subscriptions {
                self.release_filter(path);
            }
        }
    }

    /// Handles new incoming data on a topic
    fn handle_device_payload(&mut self, id: ConnectionId) {
        // TODO: Retun errors and move error handling to the caller
        let incoming = match self.ibufs.get_mut(id) {
            Some(v) => v,
            None => {
                error!("no-connection id {} is already gone", id);
                return;
            }
        };

        let client_id = incoming.client_id.clone();
        // patched: trace level (was error), see above.
        let span = tracing::trace_span!("incoming_payload", client_id);
        let _guard = span.enter();

        // Instead of exchanging, we should just append new incoming packets inside cache
        let mut packets = incoming.exchange(self.cache.take().unwrap_or_default());

        let mut force_ack = false;
        let mut new_data = false;
        let mut disconnect = false;
        let mut disconnect_reason: Option<DisconnectReasonCode> = None;

        // info!("{:15.15}[I] {:20} count = {}", client_id, "packets", packets.len());

        for packet in packets.drain(0..) {
            match packet {
                Packet::Publish(publish, properties) => {
                    // patched: trace level (was error): formatted the topic on every publish.
                    let span = tracing::trace_span!("publish", topic = ?publish.topic, pkid = publish.pkid);
                    let _guard = span.enter();

                    let qos = publish.qos;
                    let pkid = publish.pkid;

                    // Prepare acks for the above publish
                    // If any of the publish in the batch results in force flush,
                    // set global force flush flag. Force flush is triggered when the
                    // router is in instant ack more or connection data is from a replica
                    //
                    // TODO: handle multiple offsets
                    //
                    // The problem with multiple offsets is that when using replication with the current
                    // architecture, a single publish might get appended to multiple commit logs, resulting in
                    // multiple offsets (see `append_to_commitlog` function), meaning replicas will need to
                    // coordinate using multiple offsets, and we don't have any idea how to do so right now.
                    // Currently as we don't have replication, we just use a single offset, even when appending to
                    // multiple commit logs.

                    match qos {
                        QoS::AtLeastOnce => {
                            let puback = PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            };

                            let Some(ackslog) = self.ackslog.get_mut(id) else {
                                disconnect = true;
                                break;
                            };
                            ackslog.puback(puback);
                            force_ack = true;
                        }
                        QoS::ExactlyOnce => {
                            let pubrec = PubRec {
                                pkid,
                                reason: PubRecReason::Success,
                            };

                            let Some(ackslog) = self.ackslog.get_mut(id) else {
                                break;
                            };
                            // patched: a retransmission of a publish that
                            // awaits PUBREL is acknowledged, not stored twice;
                            // past the cap the client is disconnected (0x93).
                            match ackslog.pubrec(publish, properties, pubrec) {
                                Qos2Record::Stored | Qos2Record::Duplicate => {
                                    force_ack = true;
                                    continue;
                                }
                                Qos2Record::Full => {
                                    warn!(pkid, "too many QoS 2 publishes awaiting PUBREL");
                                    disconnect = true;
                                    disconnect_reason =
                                        Some(DisconnectReasonCode::ReceiveMaximumExceeded);
                                    break;
                                }
                            }
                        }
                        QoS::AtMostOnce => {
                            // Do nothing
                        }
                    };

                    // Try to append publish to commitlog
                    match append_to_commitlog(
                        id,
                        publish.clone(),
                        properties,
                        &mut self.datalog,
                        &mut self.notifications,
                        &mut self.connections,
                    ) {
                        Ok(_offset) => {
                            // Even if one of the data in the batch is appended to commitlog,
                            // set new data. This triggers notifications to wake waiters.
                            // Don't overwrite this flag to false if it is already true.
                            new_data = true;
                        }
                        Err(e) => {
                            // Disconnect on bad publishes
                            error!(
                                reason = ?e, "Failed to append to commitlog"
                            );
                            disconnect = true;

                            if let RouterError::Disconnect(code) = e {
                                disconnect_reason = Some(code)
                            }

                            break;
                        }
                    };

                    if let Some(incoming) = self.ibufs.get_mut(id) {
                        if let Err(e) = incoming.meter.register_publish(&publish) {
                            error!(
                                reason = ?e, "Failed to write to incoming meter"
                            );
                        };
                    }
                }
                Packet::Subscribe(mut subscribe, props) => {
                    let mut return_codes = Vec::new();
                    let pkid = subscribe.pkid;
                    // let len = s.len();

                    for f in &mut subscribe.filters {
                        let span =
                            tracing::info_span!("subscribe", topic = f.path, pkid = subscribe.pkid);
                        let _guard = span.enter();

                        info!("Adding subscription on topic {}", f.path);
                        let Some(connection) = self.connections.get_mut(id) else {
                            disconnect = true;
                            break;
                        };

                        if let Err(e) = validate_subscription(connection, f) {
                            warn!(reason = ?e,"Subscription cannot be validated: {}", e);

                            disconnect = true;
                            break;
                        }

                        let mut filter = f.path.clone();
                        let mut group = None;

                        if let Some((grp, filter_path)) = extract_group(&f.path) {
                            group = Some(grp);
                            filter = filter_path;
                        };

                        // patched: MQTT 5 3.8.3.1 (MQTT-3.8.3-4).
                        if f.nolocal && group.is_some() {
                            warn!("No Local on a shared subscription");
                            disconnect = true;
                            disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                            break;
                        }

                        let subscription_id = props.as_ref().and_then(|p| p.id);

                        if subscription_id == Some(0) {
                            error!("Subscription identifier can't be 0");
                            disconnect = true;
                            disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                            break;
                        }

                        let (idx, cursor) = self.datalog.next_native_offset(&filter);

                        // in case of shared sub original_filter will be $share/group/topic
                        // this is because we do want to treat is as diffrent subscription
                        // and create DataRequest, while using the same datalog of "topic"
                        // NOTE: topic & $share/group/topic will have same filteridx!
                        self.prepare_filter(id, cursor, idx, f, group, subscription_id);

                        let code = match f.qos {
                            QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                            QoS::AtLeastOnce => SubscribeReasonCode::QoS1,
                            QoS::ExactlyOnce => SubscribeReasonCode::QoS2,
                        };

                        return_codes.push(code);
                    }

                    // let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
                    // meter.total_size += len;

                    let suback = SubAck { pkid, return_codes };
                    let Some(ackslog) = self.ackslog.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    ackslog.suback(suback);
                    force_ack = true;
                }
                Packet::Unsubscribe(unsubscribe, _) => {
                    let mut released = Vec::new();
                    let Some(connection) = self.connections.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    let pkid = unsubscribe.pkid;
                    for filter in &unsubscribe.filters {
                        let span = tracing::info_span!("unsubscribe", topic = filter, pkid);
                        let _guard = span.enter();

                        debug!("Removing subscription on filter {}", filter);
                        if let Some(connection_ids) = self.subscription_map.get_mut(filter) {
                            let removed = connection_ids.remove(&id);
                            if !removed {
                                continue;
                            }
                            if connection_ids.is_empty() {
                                self.subscription_map.remove(filter);
                            }

                            if !connection.subscriptions.remove(filter) {
                                warn!(
                                    pkid = unsubscribe.pkid,
                                    "Unsubscribe failed as filter was not subscribed previously"
                                );
                                continue;
                            }

                            // patched: leave only the shared group of this filter
                            // (upstream left every group on any unsubscribe).
                            if let Some((group_key, _)) = extract_group(filter) {
                                let now_empty = self
                                    .shared_subscriptions
                                    .get_mut(&group_key)
                                    .map(|group| {
                                        group.remove_client(&client_id);
                                        group.is_empty() && !group.kept
                                    })
                                    .unwrap_or(false);
                                if now_empty {
                                    self.shared_subscriptions.remove(&group_key);
                                }
                            }

                            if let Some(broker_aliases) = connection.broker_topic_aliases.as_mut() {
                                broker_aliases.remove_alias(filter);
                            }

                            let unsuback = UnsubAck {
                                pkid,
                                // reasons are used in MQTTv5
                                reasons: vec![UnsubAckReason::Success],
                            };
                            let Some(ackslog) = self.ackslog.get_mut(id) else {
                                disconnect = true;
                                break;
                            };
                            ackslog.unsuback(unsuback);
                            self.scheduler.untrack(id, filter);
                            self.datalog.remove_waiters_for_id(id, filter);
                            released.push(filter.clone());
                            force_ack = true;
                        }
                    }
                    for filter in &released {
                        self.release_filter(filter);
                    }
                }
                Packet::PubAck(puback, _) => {
                    let span = tracing::info_span!("puback", pkid = puback.pkid);
                    let _guard = span.enter();

                    let Some(outgoing) = self.obufs.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    let pkid = puback.pkid;
                    if outgoing.register_ack(pkid).is_none() {
                        error!(pkid, "Unsolicited/ooo ack received for pkid {}", pkid);
                        disconnect = true;
                        break;
                    }

                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubRec(pubrec, _) => {
                    let span = tracing::info_span!("pubrec", pkid = pubrec.pkid);
                    let _guard = span.enter();

                    let Some(outgoing) = self.obufs.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    let pkid = pubrec.pkid;
                    if outgoing.register_ack(pkid).is_none() {
                        error!(pkid, "Unsolicited/ooo ack received for pkid {}", pkid);
                        disconnect = true;
                        break;
                    }

                    let Some(ackslog) = self.ackslog.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    let pubrel = PubRel {
                        pkid: pubrec.pkid,
                        reason: PubRelReason::Success,
                    };

                    outgoing.register_pubrec(pubrel.pkid);
                    ackslog.pubrel(pubrel);
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                // patched: any PUBREL (upstream matched only those without
                // properties, and ignored the others: no PUBCOMP, no delivery).
                Packet::PubRel(pubrel, _) => {
                    let span = tracing::info_span!("pubrel", pkid = pubrel.pkid);
                    let _guard = span.enter();

                    let Some(ackslog) = self.ackslog.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    let pubcomp = PubComp {
                        pkid: pubrel.pkid,
                        reason: PubCompReason::Success,
                    };

                    // NOTE: client can try to resend previously unacked pubrels
                    // on reconnection ( with clean session false )
                    // we try to retrive publish assuming broker saved the previous state
                    // successfully in graveyard.
                    // patched: an unknown pkid is answered with PUBCOMP 0x92
                    // (see `AckLog::pubcomp`), not by dropping the client.
                    let Some((publish, props)) = ackslog.pubcomp(pubcomp) else {
                        force_ack = true;
                        continue;
                    };
                    force_ack = true;

                    // Try to append publish to commitlog
                    match append_to_commitlog(
                        id,
                        publish,
                        props,
                        &mut self.datalog,
                        &mut self.notifications,
                        &mut self.connections,
                    ) {
                        Ok(_offset) => {
                            // Even if one of the data in the batch is appended to commitlog,
                            // set new data. This triggers notifications to wake waiters.
                            // Don't overwrite this flag to false if it is already true.
                            new_data = true;
                        }
                        Err(e) => {
                            // Disconnect on bad publishes
                            error!(
                                reason = ?e, "Failed to append to commitlog"
                            );
                            disconnect = true;
                            break;
                        }
                    };
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubComp(pubcomp, _) => {
                    let span = tracing::info_span!("pubcomp", pkid = pubcomp.pkid);
                    let _guard = span.enter();

                    let Some(outgoing) = self.obufs.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    let pkid = pubcomp.pkid;
                    if outgoing.register_pubcomp(pkid).is_none() {
                        error!(
                            pkid,
                            "ack received for pkid {}, but the pkid didn't exists!", pkid
                        );
                        disconnect = true;
                        break;
                    }
                    // patched: a QoS 2 delivery holds its slot until
                    // PUBCOMP (see `Outgoing::free_slots`), so PUBCOMP frees
                    // one: a connection paused with its window full resumes.
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PingReq(_) => {
                    let Some(ackslog) = self.ackslog.get_mut(id) else {
                        disconnect = true;
                        break;
                    };
                    ackslog.pingresp(PingResp);

                    force_ack = true;
                }
                Packet::Disconnect(_, _) => {
                    let span = tracing::info_span!("disconnect");
                    let _guard = span.enter();
                    disconnect = true;
                    // delete the last will message
                    self.last_wills.remove(&client_id);
                    break;
                }
                incoming => {
                    warn!(packet=?incoming, "Unexpected packet received, ignoring the packet." );
                }
            }
        }

        self.cache = Some(packets);

        // Prepare AcksRequest in tracker if router is operating in a
        // single node mode or force ack request for subscriptions
        if force_ack {
            self.scheduler.reschedule(id, ScheduleReason::FreshData);
        }

        // Notify waiting consumers only if there is publish data. During
        // subscription, data request is added to data waiter. With out this
        // if condition, connection will be woken up even during subscription
        if new_data {
            self.wake_notified();
        }

        // Incase BytesMut represents 10 packets, publish error/diconnect event
        // on say 5th packet should not block new data notifications for packets
        // 1 - 4. Hence we use a flag instead of diconnecting immediately
        if disconnect {
            self.handle_disconnection(id, disconnect_reason);
        }
    }

    /// Apply filter and prepare this connection to receive subscription data
    /// Handle retained messages as per subscription options!
    fn prepare_filter(
        &mut self,
        id: ConnectionId,
        cursor: Offset,
        filter_idx: FilterIdx,
        filter: &protocol::Filter,
        group: Option<String>,
        subscription_id: Option<usize>,
    ) {
        let filter_path = &filter.path;
        let joined = group.clone();

        // Add connection id to subscription list
        match self.subscription_map.get_mut(filter_path) {
            Some(connections) => {
                connections.insert(id);
            }
            None => {
                let mut connections = HashSet::new();
                connections.insert(id);
                self.subscription_map
                    .insert(filter_path.clone(), connections);
            }
        }

        // Prepare consumer to pull data in case of subscription
        let Some(connection) = self.connections.get_mut(id) else {
            return;
        };

        // Add/Create shared group
        if let Some(group_name) = &group {
            let client_id = connection.client_id.clone();

            let shared_group = self
                .shared_subscriptions
                .entry(group_name.to_string())
                .or_insert(SharedGroup::new(
                    cursor,
                    self.config.shared_subscriptions_strategy.clone(),
                ));

            shared_group.add_client(client_id);
        };

        // check is group is None because retained messages aren't sent
        // for shared subscriptions
        // patched: and as the subscription's Retain Handling says (MQTT 5
        // 3.8.3.1): 0 at every subscribe, 1 only for a new subscription,
        // 2 never. Upstream sent them for every new subscription.
        let rule = &filter.retain_forward_rule;
        let retained_wanted = group.is_none() && *rule != RetainForwardRule::Never;

        // call to `insert(_)` returns `true` if it didn't contain the filter_path already
        // i.e. its a new subscription
        if connection.subscriptions.insert(filter_path.clone()) {
            connection.retained_backlog.remove(filter_path);
            let request = DataRequest {
                filter: filter_path.clone(),
                filter_idx,
                qos: filter.qos as u8,
                cursor,
                read_count: 0,
                max_count: 100,
                forward_retained: retained_wanted,
                group,
                nolocal: filter.nolocal,
                preserve_retain: filter.preserve_retain,
                subscription_id,
            };

            self.scheduler.track(id, request);
            self.scheduler.reschedule(id, ScheduleReason::NewFilter);
            debug_assert!(self.scheduler.check_tracker_duplicates(id).is_none());
            self.hold_filter(filter_path);
            if let Some(key) = &joined {
                self.member_joined(key, filter_path);
            }
            return;
        }

        // patched: a SUBSCRIBE to a filter this session already holds
        // replaces the subscription (MQTT 5 3.8.4): its QoS, options and
        // identifier change, its cursor does not (no message lost or
        // repeated), and under Retain Handling 0 the retained messages are
        // sent again. Upstream left the old subscription unchanged.
        let resend = retained_wanted && *rule == RetainForwardRule::OnEverySubscribe;
        if resend {
            connection.retained_backlog.remove(filter_path);
        }
        let (qos, nolocal, preserve_retain) =
            (filter.qos as u8, filter.nolocal, filter.preserve_retain);
        self.replace_subscription(id, filter_idx, filter_path, |request| {
            request.qos = qos;
            request.nolocal = nolocal;
            request.preserve_retain = preserve_retain;
            request.subscription_id = subscription_id;
            request.forward_retained |= resend;
        });
        if let Some(key) = &joined {
            self.member_joined(key, filter_path);
        }
    }

    /// patched: applies `apply` to connection `id`'s request for
    /// subscription `path`, wherever it is: tracked (ready or paused),
    /// parked in its log's waiters (moved back to the tracker, so that
    /// retained messages to resend go out now), or woken and about to be
    /// tracked.
    fn replace_subscription(
        &mut self,
        id: ConnectionId,
        filter_idx: FilterIdx,
        path: &str,
        apply: impl FnOnce(&mut DataRequest),
    ) {
        if let Some(request) = self
            .scheduler
            .trackers
            .get_mut(id)
            .and_then(|t| t.data_requests.iter_mut().find(|r| r.filter == path))
        {
            apply(request);
            self.scheduler.reschedule(id, ScheduleReason::NewFilter);
            return;
        }
        if let Some(data) = self.datalog.native.get_mut(filter_idx) {
            let waiters = data.waiters.get_mut();
            if let Some(at) = waiters
                .iter()
                .position(|(conn, r)| *conn == id && r.filter == path)
            {
                if let Some((_, mut request)) = waiters.remove(at) {
                    apply(&mut request);
                    self.scheduler.track(id, request);
                    self.scheduler.reschedule(id, ScheduleReason::NewFilter);
                }
                return;
            }
        }
        if let Some((_, request)) = self
            .notifications
            .iter_mut()
            .find(|(conn, r)| *conn == id && r.filter == path)
        {
            apply(request);
        }
    }

    /// When a connection is ready, it should sweep native data from 'datalog',
    /// send data and notifications to consumer.
    /// To activate a connection, first connection's tracker is fetched and
    /// all the requests are handled.
    fn consume(&mut self) -> Option<()> {
        let (id, mut requests) = self.scheduler.poll()?;

        let span = tracing::info_span!("[<] outgoing", connection_id = id);
        let _guard = span.enter();

        let outgoing = match self.obufs.get_mut(id) {
            Some(v) => v,
            None => {
                error!("Connection is already disconnected");
                return Some(());
            }
        };

        let Some(ackslog) = self.ackslog.get_mut(id) else {
            return Some(());
        };

        trace!("Consuming requests");

        // We always try to ack when ever a connection is scheduled
        ack_device_data(ackslog, outgoing);

        if !self.connections.contains(id) {
            return Some(());
        }

        // Keep track of temporarily skipped DataRequest
        // NOTE: VecDeque::new() doesn't allocate memory until elements are pushed
        let mut skipped_requests: VecDeque<DataRequest> = VecDeque::new();

        // A new connection's tracker is always initialized with acks request.
        // A subscribe will register data request.
        // So a new connection is always scheduled with at least one request
        for _ in 0..MAX_SCHEDULE_ITERATIONS {
            let mut request = match requests.pop_front() {
                // Handle next data or acks request
                Some(request) => request,
                // No requests in the queue. This implies that consumer data and
                // acks are completely caught up. Pending requests are registered
                // in waiters and awaiting new notifications (device or replica data)
                None => {
                    if skipped_requests.is_empty() {
                        // if no requests is in skip list, that means
                        // we have nothing left to process, i.e. we caughtup
                        self.scheduler.pause(id, PauseReason::Caughtup);
                    }
                    // add back the skipped requests!
                    self.scheduler.trackv(id, skipped_requests);
                    return Some(());
                }
            };

            // patched: looked up per request, so that a caught-up shared
            // request can look at the other members' connections (`trim`).
            let (Some(outgoing), Some(connection)) =
                (self.obufs.get_mut(id), self.connections.get_mut(id))
            else {
                requests.push_back(request);
                break;
            };
            let datalog = &mut self.datalog;
            let shared_group = request
                .group
                .as_ref()
                .and_then(|name| self.shared_subscriptions.get_mut(name));

            match forward_device_data(&mut request, datalog, outgoing, connection, shared_group) {
                ConsumeStatus::BufferFull => {
                    requests.push_back(request);
                    self.scheduler.pause(id, PauseReason::Busy);
                    break;
                }
                ConsumeStatus::InflightFull => {
                    requests.push_back(request);
                    self.scheduler.pause(id, PauseReason::InflightFull);
                    break;
                }
                ConsumeStatus::FilterCaughtup => {
                    let filter = &request.filter;
                    trace!(filter, "Filter caughtup {filter}, parking connection");

                    // When all the data in the log is caught up, current request is
                    // registered in waiters and not added back to the tracker. This
                    // ensures that tracker.next() stops when all the requests are done
                    // patched: a log read to its end by its only reader is
                    // emptied. Upstream kept every publish until its segment
                    // rolled over (64 KiB of payload per reply topic here, a
                    // few hundred bytes of memory per message), so memory
                    // grew with traffic on every per-user topic. Not when
                    // another reader may still need the data: a shared group,
                    // a second subscriber, an offline persistent session, or
                    // unacknowledged QoS 1/2 deliveries that a persistent
                    // session would replay from the log.
                    // patched (issue 9): readers are counted per log
                    // (`filter_readers`), so a `$share/<g>/<f>` group or an
                    // offline session on `$share/<g>/<f>` also keeps the log
                    // of `f` (keyed by subscription path, they did not).
                    let sole_reader = request.group.is_none()
                        && (connection.clean || request.qos == 0 || outgoing.inflight_is_empty())
                        && !self.persistent_readers.contains_key(&request.filter)
                        && self.filter_readers.get(&request.filter) == Some(&1)
                        && self
                            .subscription_map
                            .get(&request.filter)
                            .is_some_and(|readers| readers.len() == 1);
                    if sole_reader {
                        if let Some(cursor) = datalog.trim_read(request.filter_idx, request.cursor)
                        {
                            request.cursor = cursor;
                        }
                    } else if request.group.is_some() {
                        self.trim_read_by_group(&mut request);
                    }
                    self.datalog.park(id, request);
                }
                ConsumeStatus::PartialRead => {
                    requests.push_back(request);
                }
                ConsumeStatus::SkipRequest => {
                    skipped_requests.push_back(request);
                }
            }
        }

        // Add requests back to the tracker if there are any
        requests.extend(skipped_requests);
        self.scheduler.trackv(id, requests);
        Some(())
    }

    /// patched: empties the log a caught-up `$share/...` request reads if
    /// its group is the log's only reader and has read it all. Upstream, and
    /// patch 11, never emptied a log read through a group: command logs kept
    /// every command until their segments rolled over (4 MiB of commands
    /// per topic here, and with properties uncounted, without bound). Not
    /// when anyone else reads the log (a plain subscriber, another group, an
    /// offline member: all counted in `filter_readers`, while the group
    /// holds only its connected members), nor while a persistent member has
    /// unacknowledged deliveries, which its disconnect rewinds the group to.
    /// Prepares every consumer that was waiting for new data (the
    /// appends queued them in `notifications`).
    pub(super) fn wake_notified(&mut self) {
        while let Some((id, request)) = self.notifications.pop_front() {
            self.scheduler.track(id, request);
            self.scheduler.reschedule(id, ScheduleReason::FreshData);
        }
    }

    fn trim_read_by_group(&mut self, request: &mut DataRequest) {
        let Some(name) = request.group.as_ref() else {
            return;
        };
        let Some((_, filter)) = extract_group(&request.filter) else {
            return;
        };
        let Some(group) = self.shared_subscriptions.get_mut(name) else {
            return;
        };
        // Most caught-up reads are of a log not read to its end (another
        // member's turn): nothing to look at then.
        if !self.datalog.read_to_end(request.filter_idx, group.cursor) {
            return;
        }
        let alone = self.filter_readers.get(&filter) == Some(&group.len())
            && !self.persistent_readers.contains_key(&request.filter)
            && group.clients().all(|client| {
                self.connection_map.get(client).is_some_and(|&cid| {
                    self.connections.get(cid).is_some_and(|c| c.clean)
                        || self.obufs.get(cid).is_some_and(|o| o.inflight_is_empty())
                })
            });
        if !alone {
            return;
        }
        // patched: what clean members still have unacknowledged is kept
        // apart (`SharedGroup::held`): delivered again to the group if such
        // a member leaves (`shared_redelivery.rs`). Upstream, and patch 31,
        // emptied the log under them and the publishes were lost.
        let mut in_flight: Vec<Offset> = Vec::new();
        for client in group.clients() {
            if let Some(outgoing) = self
                .connection_map
                .get(client)
                .and_then(|&cid| self.obufs.get(cid))
            {
                in_flight.extend(outgoing.inflight_cursors(request.filter_idx));
            }
        }
        in_flight.sort_unstable();
        in_flight.dedup();
        let Some((cursor, moved)) =
            self.datalog
                .trim_read_keeping(request.filter_idx, group.cursor, &in_flight)
        else {
            return;
        };
        group.cursor = cursor;
        request.cursor = cursor;
        if !group.held.is_empty() || !moved.is_empty() {
            group
                .held
                .retain(|(_, offset)| in_flight.binary_search(offset).is_ok());
            // Every moved offset is past every held one (the log was
            // emptied after those were moved): still sorted.
            group.held.extend(moved);
        }
    }

    /// patched: bytes held by every filter's log (`PublishData::size`:
    /// topic, payload, properties, record), kept up to date by the router;
    /// for the embedding program's metrics.
    pub fn stored_bytes(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.datalog.stored_bytes()
    }

    pub fn handle_last_will(&mut self, client_id: String) {
        let Some((will, will_props)) = self.last_wills.remove(&client_id) else {
            return;
        };

        let publish = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            pkid: 0,
            payload: will.message,
        };

        let properties = will_props.map(|props| PublishProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
            content_type: props.content_type,
            ..Default::default()
        });

        match append_will_message(
            publish,
            properties,
            &mut self.datalog,
            &mut self.notifications,
        ) {
            Ok(_offset) => {
                self.wake_notified();
            }
            Err(e) => {
                // Disconnect on bad publishes
                error!(
                    reason = ?e, "Failed to append to commitlog"
                );
                // Removed disconnect = true from here because we disconnect anyways
            }
        };
    }
}

fn append_to_commitlog(
    id: ConnectionId,
    mut publish: Publish,
    mut properties: Option<PublishProperties>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    connections: &mut Slab<Connection>,
) -> Result<Offset, RouterError> {
    let connection = connections
        .get_mut(id)
        .ok_or(RouterError::NoConnection(id))?;

    let topic_alias = properties.as_mut().and_then(|p| {
        // clear the received value as it is irrelevant while forwarding publishes
        p.topic_alias.take()
    });

    // TODO: broker should properly send the disconnect packet!
    if properties
        .as_ref()
        .is_some_and(|p| !p.subscription_identifiers.is_empty())
    {
        error!("A PUBLISH packet sent from a Client to a Server MUST NOT contain a Subscription Identifier");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::MalformedPacket,
        ));
    }

    if let Some(alias) = topic_alias {
        validate_and_set_topic_alias(&mut publish, connection, alias)?;
    };

    let topic = std::str::from_utf8(&publish.topic)?;

    let origin = Some(connection.origin.clone());
    store_retained(datalog, &publish, &properties, topic, &origin);
    let pkid = publish.pkid;

    let filter_idxs = datalog.matches(topic);

    // Create a dynamic filter if dynamic_filters are enabled for this connection
    let filter_idxs = match filter_idxs {
        Some(v) => v,
        None if connection.dynamic_filters => {
            let (idx, _cursor) = datalog.next_native_offset(topic);
            vec![idx]
        }
        None => return Err(RouterError::NoMatchingFilters(topic.to_owned())),
    };

    let o = append_to_filters(
        publish,
        properties,
        origin,
        pkid,
        filter_idxs,
        datalog,
        notifications,
    );

    // error!("{:15.15}[E] {:20} topic = {}", connections[id].client_id, "no-filter", topic);
    Ok(o)
}

fn append_will_message(
    publish: Publish,
    properties: Option<PublishProperties>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
) -> Result<Offset, RouterError> {
    // TODO: broker should properly send the disconnect packet!
    if properties
        .as_ref()
        .is_some_and(|p| !p.subscription_identifiers.is_empty())
    {
        error!("A PUBLISH packet sent from a Client to a Server MUST NOT contain a Subscription Identifier");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::MalformedPacket,
        ));
    }

    let topic = std::str::from_utf8(&publish.topic)?;

    store_retained(datalog, &publish, &properties, topic, &None);
    let pkid = publish.pkid;

    let filter_idxs = datalog.matches(topic);

    let filter_idxs = match filter_idxs {
        Some(v) => v,
        None => return Err(RouterError::NoMatchingFilters(topic.to_owned())),
    };

    let o = append_to_filters(
        publish,
        properties,
        None,
        pkid,
        filter_idxs,
        datalog,
        notifications,
    );

    Ok(o)
}

/// patched: the retained store (MQTT 5 3.3.1.3). Only a publish with the
/// retain flag changes it: a zero-byte one removes the topic's retained
/// message, another replaces it. Upstream also removed it on any zero-byte
/// publish without the flag. The publish keeps its retain flag in the logs:
/// a Retain As Published subscription forwards it, others clear it (see
/// `forward_device_data`).
fn store_retained(
    datalog: &mut DataLog,
    publish: &Publish,
    properties: &Option<PublishProperties>,
    topic: &str,
    origin: &Option<Arc<str>>,
) {
    if !publish.retain {
        return;
    }
    if publish.payload.is_empty() {
        datalog.remove_from_retained_publishes(topic.to_owned());
    } else {
        let data = PublishData::new(publish.clone(), properties.clone(), origin.clone());
        datalog.insert_to_retained_publishes(data, topic.to_owned());
    }
}

/// patched: appends a publish to the logs of the filters it matches; the
/// last (usually the only) one takes the publish itself. Upstream cloned it
/// for every filter, in two copies of this loop, and dropped the original: a
/// deep copy of the properties (user properties: a Vec and its Strings) per
/// publish for nothing. Returns the last offset written.
fn append_to_filters(
    publish: Publish,
    properties: Option<PublishProperties>,
    origin: Option<Arc<str>>,
    pkid: u16,
    filter_idxs: Vec<FilterIdx>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
) -> Offset {
    let mut last = (0, 0);
    let mut remaining = filter_idxs.len();
    let mut data = Some(PublishData::new(publish, properties, origin));
    for filter_idx in filter_idxs {
        remaining -= 1;
        let publish_data = if remaining == 0 {
            data.take()
        } else {
            data.clone()
        };
        let Some(publish_data) = publish_data else {
            break;
        };
        let Some(datalog) = datalog.native.get_mut(filter_idx) else {
            continue;
        };
        let (offset, filter) = datalog.append(publish_data, notifications);
        debug!(
            pkid,
            "Appended to commitlog: {}[{}, {})", filter, offset.0, offset.1,
        );
        last = offset;
    }
    last
}

fn validate_and_set_topic_alias(
    publish: &mut Publish,
    connection: &mut Connection,
    alias: u16,
) -> Result<(), RouterError> {
    if alias == 0 || alias > TOPIC_ALIAS_MAX {
        error!("Alias must be greater than 0 and <={TOPIC_ALIAS_MAX}");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::TopicAliasInvalid,
        ));
    }

    if publish.topic.is_empty() {
        // if publish topic is empty, publisher must have set a valid alias
        let Some(alias_topic) = connection.topic_aliases.get(&alias) else {
            error!("Empty topic name with invalid alias");
            return Err(RouterError::Disconnect(DisconnectReasonCode::ProtocolError));
        };
        // set the publish topic before further processing
        publish.topic = alias_topic.to_owned().into();
    } else {
        // if publish topic isn't empty, that means
        // publisher wants to establish new mapping for topic & alias
        let topic = std::str::from_utf8(&publish.topic)?;
        connection.topic_aliases.insert(alias, topic.to_owned());
        trace!("set alias {alias} for topic {topic}");
    };

    Ok(())
}

/// Sweep ackslog for all the pending acks.
/// We write everything to outgoing buf with out worrying about buffer size
/// because acks most certainly won't cause memory bloat
fn ack_device_data(ackslog: &mut AckLog, outgoing: &mut Outgoing) -> bool {
    let span = tracing::info_span!("outgoing_ack", client_id = outgoing.client_id);
    let _guard = span.enter();

    let acks = ackslog.readv();
    if acks.is_empty() {
        debug!("No acks pending");
        return false;
    }

    let mut count = 0;
    let mut buffer = outgoing.data_buffer.lock();

    // Unlike forwards, we are reading all the pending acks for a given connection.
    // At any given point of time, there can be a max of connection's buffer size
    // patched: take the acks and leave an unallocated queue, so that an
    // idle connection holds no ack buffer.
    for ack in std::mem::take(acks) {
        let pkid = packetid(&ack);
        trace!(pkid, "Ack added for pkid {}", pkid);
        let message = Notification::DeviceAck(ack);
        buffer.push_back(message);
        count += 1;
    }

    debug!(acks_count = count, "Acks sent to device");
    outgoing.handle.try_send(()).ok();
    true
}

enum ConsumeStatus {
    /// Limit for publishes on outgoing channel reached
    BufferFull,
    /// Limit for inflight publishes on outgoing channel reached
    InflightFull,
    /// All publishes on topic forwarded
    FilterCaughtup,
    /// Some publishes on topic have been forwarded
    PartialRead,
    /// Use to indicate we want to skip the datareqest
    /// for shared subscriptions
    SkipRequest,
}

/// Sweep datalog from offset in DataRequest and updates DataRequest
/// for next sweep. Returns (busy, caughtup) status
/// Returned arguments:
/// 1. `busy`: whether the data request was completed or not.
/// 2. `done`: whether the connection was busy or not.
/// 3. `inflight_full`: whether the inflight requests were completely filled
fn forward_device_data(
    request: &mut DataRequest,
    datalog: &mut DataLog,
    outgoing: &mut Outgoing,
    connection: &mut Connection,
    shared_group: Option<&mut SharedGroup>,
) -> ConsumeStatus {
    let span = tracing::info_span!("outgoing_publish", client_id = outgoing.client_id);
    let _guard = span.enter();

    if let Some(ref shared_group) = shared_group {
        // update the request cursor to use shared cursor
        request.cursor = shared_group.cursor;
    }

    trace!(
        "Reading from datalog: {}[{}, {}]",
        request.filter,
        request.cursor.0,
        request.cursor.1
    );

    let mut inflight_slots = if request.qos != 0 {
        // for qos 1 & 2
        let len = outgoing.free_slots();
        if len == 0 {
            trace!("Aborting read from datalog: inflight capacity reached");
            return ConsumeStatus::InflightFull;
        }

        len as u64
    } else {
        datalog.config.max_outgoing_packet_count
    };

    if shared_group
        .as_ref()
        .is_some_and(|g| g.strategy == Strategy::RoundRobin)
    {
        // only read one message in case of round robin
        // so that messages get equally distributed!
        inflight_slots = 1;
    }

    let mut publishes = Vec::new();

    // patched: No Local (MQTT 5 3.8.3.1): this connection's own publishes
    // are not read for this subscription.
    let skip_origin = request.nolocal.then_some(&*connection.origin);

    // patched: the retained messages still to send wait in a backlog taken
    // a slot at a time, and the log is read only once it is empty.
    // Upstream read them all and dropped those beyond the free in-flight
    // slots (with a Receive Maximum of 2, a `#` subscription got 2).
    let mut retained_pending = false;
    if request.forward_retained {
        if !connection.retained_backlog.contains_key(&request.filter) {
            let retained = datalog.read_retained_messages(&request.filter, skip_origin);
            connection
                .retained_backlog
                .insert(request.filter.clone(), retained.into());
        }
        let now = Instant::now();
        if let Some(backlog) = connection.retained_backlog.get_mut(&request.filter) {
            while inflight_slots > 0 {
                let Some(mut retained) = backlog.pop_front() else {
                    break;
                };
                // Expired while waiting here: dropped (MQTT 5 3.3.2.3.3).
                if retained.age(now) {
                    publishes.push(((retained.publish, retained.properties), None));
                    inflight_slots -= 1;
                }
            }
            retained_pending = !backlog.is_empty();
        }
        if !retained_pending {
            connection.retained_backlog.remove(&request.filter);
            // we only want to forward retained messages once
            request.forward_retained = false;
        }
    }

    let (start, next, caughtup) = if retained_pending {
        (request.cursor, request.cursor, false)
    } else {
        let shared = request.group.is_some().then_some(request.filter.as_str());
        let (next, publishes_from_datalog) = match datalog.native_readv(
            request.filter_idx,
            request.cursor,
            inflight_slots,
            skip_origin,
            shared,
        ) {
            Ok(v) => v,
            Err(e) => {
                error!(error = ?e, "Failed to read from commitlog {}", e);
                return ConsumeStatus::FilterCaughtup;
            }
        };

        publishes.extend(
            publishes_from_datalog
                .into_iter()
                .map(|(p, offset)| (p, Some(offset))),
        );

        match next {
            Position::Next { start, end } => (start, end, false),
            Position::Done { start, end } => (start, end, true),
        }
    };

    if let Some(ref shared_group) = shared_group {
        let skip_current_client = Some(&outgoing.client_id) != shared_group.current_client();

        if skip_current_client {
            return if caughtup {
                ConsumeStatus::FilterCaughtup
            } else {
                ConsumeStatus::SkipRequest
            };
        }
    }

    if start != request.cursor {
        let error = format!(
            "Read cursor start jumped from {:?} to {:?} on {}",
            request.cursor, start, request.filter
        );

        warn!(
            request_cursor = ?request.cursor,
            start_cursor = ?start,
            error
        );
    }

    trace!(
        "Read from commitlog, cursor = {}[{}, {}), read count = {}",
        request.filter,
        next.0,
        next.1,
        publishes.len()
    );

    let qos = request.qos;
    let filter_idx = request.filter_idx;
    request.read_count += publishes.len();
    request.cursor = next;
    // println!("{:?} {:?} {}", start, next, request.read_count);

    if publishes.is_empty() {
        // patched: everything read was skipped (expired, No Local, or meant
        // for other subscriptions: `Audience`). The group moves past it
        // (upstream left the group's cursor before it, so the group read
        // the same skipped message forever and stalled behind it), and a
        // reader that is not at the end reads on instead of waiting for the
        // next publish.
        if let Some(share) = shared_group {
            share.cursor = request.cursor;
        }
        return if caughtup {
            ConsumeStatus::FilterCaughtup
        } else {
            ConsumeStatus::PartialRead
        };
    }

    let broker_topic_aliases = &mut connection.broker_topic_aliases;
    let mut topic_alias = broker_topic_aliases
        .as_ref()
        .and_then(|aliases| aliases.get_alias(&request.filter));

    let topic_alias_already_exists = topic_alias.is_some();

    // if topic alias doesn't exists, try creating new one!
    if !topic_alias_already_exists {
        topic_alias = broker_topic_aliases
            .as_mut()
            .and_then(|broker_aliases| broker_aliases.set_new_alias(&request.filter))
    }

    let subscription_id = request.subscription_id;
    let preserve_retain = request.preserve_retain;

    // Fill and notify device data
    let forwards = publishes
        .into_iter()
        .map(|((mut publish, mut properties), offset)| {
            // patched: MQTT 5 3.3.1.3. A message sent because a subscription
            // was made (read from the retained store: no offset) keeps its
            // retain flag; one forwarded as it is published keeps it only
            // for a Retain As Published subscription.
            if offset.is_some() && !preserve_retain {
                publish.retain = false;
            }

            // patched: delivered at the lower of the publish's QoS and the
            // subscription's (MQTT 3.1.1 and 5, 3.8.4), not always at the
            // subscription's: a QoS 0 publish reached a QoS 1 subscriber as
            // QoS 1. `qos` is a subscription's `QoS as u8` (0..=2).
            if publish.qos as u8 > qos {
                publish.qos = protocol::qos(qos).unwrap_or(QoS::AtMostOnce);
            }

            // if there is some topic alias to use, set it in publish properties
            if topic_alias.is_some() {
                let mut props = properties.unwrap_or_default();
                props.topic_alias = topic_alias;
                properties = Some(props);
            }

            // We want to clear topic if we are using an existing alias
            if topic_alias_already_exists {
                publish.topic.clear()
            }

            if let Some(subscription_id) = subscription_id {
                // create new props if not already exists
                let mut props = properties.unwrap_or_default();
                props.subscription_identifiers.push(subscription_id);
                properties = Some(props);
            }

            Forward {
                cursor: offset,
                size: 0,
                publish,
                properties,
            }
        });

    let (len, inflight) = outgoing.push_forwards(forwards, qos, filter_idx);

    // patched: advance the shared group before the buffer-full return below.
    // Upstream returned first, leaving the group's cursor behind the
    // publishes just forwarded, so the next read forwarded them again:
    // duplicates to `$share/...` subscribers whenever their outgoing buffer
    // filled (measured: 11 duplicates in 240,000 at 30,000/s).
    if let Some(share) = shared_group {
        share.update_next_client();
        share.cursor = request.cursor;
    }

    debug!(
        inflight_count = inflight,
        forward_count = len,
        "Forwarding publishes, cursor = {}[{}, {}) forward count = {}",
        request.filter,
        request.cursor.0,
        request.cursor.1,
        len
    );

    if len >= MAX_CHANNEL_CAPACITY - 1 {
        debug!("Outgoing channel reached its capacity");
        outgoing.push_notification(Notification::Unschedule);
        outgoing.handle.try_send(()).ok();
        return ConsumeStatus::BufferFull;
    }

    outgoing.handle.try_send(()).ok();

    if caughtup {
        ConsumeStatus::FilterCaughtup
    } else {
        ConsumeStatus::PartialRead
    }
}

fn validate_subscription(
    connection: &mut Connection,
    filter: &protocol::Filter,
) -> Result<(), RouterError> {
    trace!("validate subscription = {}", filter.path);
    if filter.path.starts_with('$') && !filter.path.starts_with("$share") {
        return Err(RouterError::InvalidFilterPrefix(filter.path.to_owned()));
    }

    Ok(())
}

fn validate_clientid(client_id: &str) -> Result<(), RouterError> {
    trace!("Validating Client ID = {}", client_id,);
    if "+$#/".chars().any(|c| client_id.contains(c)) {
        return Err(RouterError::InvalidClientId(client_id.to_string()));
    }

    Ok(())
}

/// Splits `$share/<group>/<filter>` into the shared group's key and the filter.
/// patched: the key is `<group>/<filter>`, not the group name alone: upstream
/// kept one delivery cursor per group name, so one group over several filters
/// lost messages (MQTT 5 4.8.2: a shared subscription is the pair).
fn extract_group(filter: &str) -> Option<(String, String)> {
    filter.strip_prefix("$share/").and_then(|s| {
        s.split_once('/')
            .map(|(_group, path)| (s.to_string(), path.to_string()))
    })
}

// patched: synchronous tests of the router's state machine (no threads, no
// sockets): each test drives `Router::events` and `Router::consume` directly.
#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "shared_tests.rs"]
mod shared_tests;

#[path = "shared_redelivery.rs"]
mod shared_redelivery;
