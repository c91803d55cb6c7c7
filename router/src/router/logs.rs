use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubCompReason, PubRec, PubRel,
    Publish, PublishProperties, SubAck, UnsubAck,
};
use crate::router::shared_subs::Audience;
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::Storage;
use crate::segments::{CommitLog, Position};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Debug, Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
    /// patched: the client id of the connection that published it, for No
    /// Local (MQTT 5 3.8.3.1); `None` for the router's own publishes (wills).
    /// One beginning with `$` is no client id but the only subscriptions
    /// that may read it (`Audience`).
    pub origin: Option<Arc<str>>,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
            origin: None,
        }
    }
}

impl PublishData {
    /// patched: a publish stored now on behalf of `origin`. Its topic,
    /// payload and correlation data are copied out of the buffer they were
    /// decoded from (see `detach`): a stored message may wait in a log for
    /// a long time, and a slice of a connection's read buffer keeps that
    /// whole buffer alive.
    pub fn new(
        mut publish: Publish,
        mut properties: Option<PublishProperties>,
        origin: Option<Arc<str>>,
    ) -> PublishData {
        detach(&mut publish, properties.as_mut());
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
            origin,
        }
    }

    /// patched: whether `client_id` published it (No Local).
    pub fn published_by(&self, client_id: &str) -> bool {
        self.origin.as_deref() == Some(client_id)
    }

    /// patched: MQTT 5 3.3.2.3.3. Whether the message is still alive at
    /// `now`; if it is, its Message Expiry Interval becomes what is left of
    /// it (the interval minus the whole seconds it waited in the router).
    /// Upstream applied this to the *stored* retained message on every read,
    /// subtracting the total time waited again each time (a retained
    /// message aged twice as fast after its second reader, and so on).
    /// Called on copies only.
    pub fn age(&mut self, now: Instant) -> bool {
        let Some(interval) = self
            .properties
            .as_mut()
            .and_then(|p| p.message_expiry_interval.as_mut())
        else {
            return true;
        };
        let waited = u32::try_from(now.saturating_duration_since(self.timestamp).as_secs())
            .unwrap_or(u32::MAX);
        if waited >= *interval {
            return false;
        }
        *interval -= waited;
        true
    }

    /// patched: whether the message has expired at `now` (not changed).
    pub fn expired(&self, now: Instant) -> bool {
        self.properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .is_some_and(|interval| {
                now.saturating_duration_since(self.timestamp).as_secs() >= u64::from(interval)
            })
    }
}

/// patched: gives `publish` (and its correlation data) bytes of its own,
/// in one allocation of exactly their size. A decoded publish's topic,
/// payload and correlation data are slices of the connection's read buffer
/// (`Bytes` share their allocation), so one small message kept in a log
/// kept alive the whole buffer it arrived in, up to the largest packet the
/// connection ever read, and the log counted only the message. One copy per
/// stored publish (a memcpy of what the log holds anyway).
pub fn detach(publish: &mut Publish, properties: Option<&mut PublishProperties>) {
    let correlation = properties.and_then(|p| p.correlation_data.as_mut());
    let len =
        publish.topic.len() + publish.payload.len() + correlation.as_ref().map_or(0, |c| c.len());
    let mut owned = BytesMut::with_capacity(len);
    owned.extend_from_slice(&publish.topic);
    owned.extend_from_slice(&publish.payload);
    if let Some(c) = correlation.as_ref() {
        owned.extend_from_slice(c);
    }
    let mut owned = owned.freeze();
    publish.topic = owned.split_to(publish.topic.len());
    publish.payload = owned.split_to(publish.payload.len());
    if let Some(c) = correlation {
        *c = owned;
    }
}

/// patched: the bytes a publish keeps alive while it is stored: its record,
/// topic, payload and properties (strings, correlation data, user
/// properties, subscription identifiers). Upstream counted topic and
/// payload only (a TODO), so a log of publishes with empty payloads and
/// 200 KB of user properties each counted a few bytes per message and its
/// segments never rolled over: 48 MB of properties stayed in a 4 MiB log.
/// The embedding broker uses the same count for its own queues.
pub fn message_size(publish: &Publish, properties: Option<&PublishProperties>) -> usize {
    std::mem::size_of::<PublishData>()
        + publish.topic.len()
        + publish.payload.len()
        + properties.map_or(0, properties_size)
}

/// patched: the bytes `properties` hold outside their record (see
/// `message_size`, whose record includes theirs).
pub fn properties_size(properties: &PublishProperties) -> usize {
    let string = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    string(&properties.response_topic)
        + string(&properties.content_type)
        + properties.correlation_data.as_ref().map_or(0, Bytes::len)
        + properties
            .user_properties
            .iter()
            .map(|(k, v)| std::mem::size_of::<(String, String)>() + k.len() + v.len())
            .sum::<usize>()
        + properties.subscription_identifiers.len() * std::mem::size_of::<usize>()
}

impl Storage for PublishData {
    /// patched: everything the stored publish keeps alive (`message_size`).
    fn size(&self) -> usize {
        message_size(&self.publish, self.properties.as_ref())
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// Filters with `+` or `#`: the only ones a new topic has to be scanned
    /// against. Literal filters are found by one lookup in `filter_indexes`
    /// (patched: upstream scans every filter for each new topic, which costs
    /// O(subscribers) per first publish to a per-user reply topic).
    wildcard_filters: Vec<(Filter, FilterIdx)>,
    /// patched: bytes (`PublishData::size`) held by every filter's log, kept
    /// up to date by each `Data` (append, eviction, emptying, removal), so
    /// that the embedding program can watch the router's memory.
    stored_bytes: Arc<AtomicU64>,
}

/// patched: most topics whose matching filters are cached (see `matches`).
const MAX_CACHED_TOPICS: usize = 100_000;

fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

impl DataLog {
    pub fn new(config: RouterConfig) -> DataLog {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();
        let mut wildcard_filters = Vec::new();
        let stored_bytes = Arc::new(AtomicU64::new(0));

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config, stored_bytes.clone());

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if is_wildcard(&filter) {
                    wildcard_filters.push((filter.clone(), idx));
                }
                filter_indexes.insert(filter, idx);
            }
        }

        DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
            wildcard_filters,
            stored_bytes,
        }
    }

    /// patched: bytes held by every filter's log (see `stored_bytes`).
    pub fn stored_bytes(&self) -> Arc<AtomicU64> {
        self.stored_bytes.clone()
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|&(conn_id, _)| conn_id == id)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                // A literal filter matches only the identical topic (and no
                // `$` topic, as `matches` says); wildcards are scanned.
                let mut v: Vec<usize> = Vec::new();
                if !topic.starts_with('$') {
                    if let Some(idx) = self.filter_indexes.get(topic) {
                        v.push(*idx);
                    }
                }
                v.extend(
                    self.wildcard_filters
                        .iter()
                        .filter(|(filter, _)| matches(topic, filter))
                        .map(|(_, filter_idx)| *filter_idx),
                );

                if !v.is_empty() {
                    // patched: a cache, bounded: past the bound it starts
                    // over (a wildcard subscriber would otherwise make it
                    // grow with every distinct topic published).
                    if self.publish_filters.len() >= MAX_CACHED_TOPICS {
                        self.publish_filters = HashMap::new();
                    }
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let filter_idx = match filter_indexes.get(filter) {
            Some(idx) => *idx,
            None => {
                let data = Data::new(filter, &self.config, self.stored_bytes.clone());

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);

                // Match new filter to existing topics and add to publish_filters if it matches.
                // A literal filter can only match the topic of the same name.
                if is_wildcard(filter) {
                    self.wildcard_filters.push((filter.to_owned(), idx));
                    for (topic, filters) in publish_filters.iter_mut() {
                        if matches(topic, filter) {
                            filters.push(idx);
                        }
                    }
                } else if let Some(filters) = publish_filters.get_mut(filter) {
                    if matches(filter, filter) {
                        filters.push(idx);
                    }
                }

                idx
            }
        };

        // Present: found in, or just added to, `native`.
        let offset = self
            .native
            .get(filter_idx)
            .map(|data| data.log.next_offset())
            .unwrap_or_default();
        (filter_idx, offset)
    }

    /// patched: frees the log of `filter` (nobody reads it any more): its
    /// slot, its index entries, and the cached topic matches that point to
    /// it (slots are reused, so a stale entry would route into another
    /// filter's log). Filters configured at startup stay.
    pub fn remove_filter(&mut self, filter: &str) {
        let warm = self
            .config
            .initialized_filters
            .as_ref()
            .is_some_and(|filters| filters.iter().any(|f| f == filter));
        if warm {
            return;
        }
        let Some(idx) = self.filter_indexes.remove(filter) else {
            return;
        };
        self.native.try_remove(idx);
        if is_wildcard(filter) {
            self.wildcard_filters.retain(|(_, i)| *i != idx);
            self.publish_filters.retain(|_, idxs| {
                idxs.retain(|i| *i != idx);
                !idxs.is_empty()
            });
        } else if let Some(idxs) = self.publish_filters.get_mut(filter) {
            // A literal filter matches only the topic of its own name.
            idxs.retain(|i| *i != idx);
            if idxs.is_empty() {
                self.publish_filters.remove(filter);
            }
        }
    }

    /// The filter -> log index map (tests).
    #[cfg(test)]
    pub fn filter_indexes_for_tests(&self) -> &HashMap<Filter, FilterIdx> {
        &self.filter_indexes
    }

    /// How many filter logs exist (tests).
    #[cfg(test)]
    pub fn filter_count(&self) -> (usize, usize, usize, usize) {
        (
            self.native.len(),
            self.filter_indexes.len(),
            self.publish_filters.len(),
            self.wildcard_filters.len(),
        )
    }

    /// patched: empties the log of `filter_idx` if `cursor` has read all of
    /// it, and returns where that reader continues (see `CommitLog::clear`).
    pub fn trim_read(&mut self, filter_idx: FilterIdx, cursor: Offset) -> Option<Offset> {
        self.trim_read_keeping(filter_idx, cursor, &[])
            .map(|(next, _)| next)
    }

    /// patched: whether `cursor` has read all of the log of `filter_idx`
    /// (what `trim_read` needs before it empties it).
    pub fn read_to_end(&self, filter_idx: FilterIdx, cursor: Offset) -> bool {
        self.native
            .get(filter_idx)
            .is_some_and(|data| data.log.next_offset() == cursor)
    }

    /// patched: `trim_read` that keeps the publishes at `in_flight`
    /// offsets (sorted): returns where the reader continues and those
    /// publishes, moved out of the emptied log, with their offsets.
    pub fn trim_read_keeping(
        &mut self,
        filter_idx: FilterIdx,
        cursor: Offset,
        in_flight: &[Offset],
    ) -> Option<(Offset, Vec<(PublishData, Offset)>)> {
        let data = self.native.get_mut(filter_idx)?;
        if data.log.next_offset() != cursor {
            return None;
        }
        let freed = data.log.size();
        let (next, kept) = data.log.clear_keeping(in_flight);
        data.stored_bytes.fetch_sub(freed, Ordering::Relaxed);
        Some((next, kept))
    }

    /// patched: a copy of the publish stored at `offset` in `filter_idx`'s
    /// log, if it is still there.
    pub fn stored_at(&self, filter_idx: FilterIdx, offset: Offset) -> Option<PublishData> {
        let data = self.native.get(filter_idx)?;
        let mut out = Vec::new();
        data.log.readv(offset, 1, &mut out).ok()?;
        out.pop().filter(|(_, at)| *at == offset).map(|(p, _)| p)
    }

    /// patched: the log index of `filter`, if it has a log.
    pub fn filter_index(&self, filter: &str) -> Option<FilterIdx> {
        self.filter_indexes.get(filter).copied()
    }

    /// Reads up to `len` publishes of `filter_idx` from `offset`.
    /// patched: expired messages are left out and the others carry what is
    /// left of their expiry interval (as upstream), and so are messages
    /// published by `skip_origin` (No Local, MQTT 5 3.8.3.1) and those meant
    /// for other subscriptions than `shared` (the reader's `$share/...`
    /// path, `None` for a plain subscription; see `Audience`).
    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
        skip_origin: Option<&str>,
        shared: Option<&str>,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // patched: an error, not a panic, for a filter that is gone.
        let data = self.native.get(filter_idx).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no log {filter_idx}"))
        })?;
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        // patched: publishes meant for other subscriptions (`Audience`) and,
        // under No Local, this reader's own are skipped without a copy.
        let next = data.log.readv_where(offset, len, &mut o, |pubdata| {
            Audience::admits(pubdata.origin.as_deref(), shared)
                && !skip_origin.is_some_and(|id| pubdata.published_by(id))
        })?;

        let now = Instant::now();
        // `readv` returns copies: aging them leaves the log unchanged.
        o.retain_mut(|(pubdata, _)| pubdata.age(now));

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        if let Some(data) = self.native.get_mut(request.filter_idx) {
            data.waiters.register(id, request);
        }
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    pub fn insert_to_retained_publishes(&mut self, data: PublishData, topic: Topic) {
        self.retained_publishes.insert(topic, data);
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    /// The retained messages matching `filter`, as stored (retain flag set,
    /// expiry interval not yet aged: see `PublishData::age`).
    /// patched: expired ones are dropped from the store, and those published
    /// by `skip_origin` are left out (No Local). Upstream aged the stored
    /// messages in place on every read (see `age`).
    pub fn read_retained_messages(
        &mut self,
        filter: &str,
        skip_origin: Option<&str>,
    ) -> Vec<PublishData> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();
        self.retained_publishes
            .retain(|_, pubdata| !pubdata.expired(now));
        self.retained_publishes
            .iter()
            .filter(|(topic, p)| {
                matches(topic, filter) && !skip_origin.is_some_and(|id| p.published_by(id))
            })
            .map(|(_, p)| p.clone())
            .collect()
    }
}

pub struct Data<T: Storage + Clone> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
    /// patched: the router-wide count of stored bytes (`DataLog`).
    stored_bytes: Arc<AtomicU64>,
}

/// patched: a log that goes (its filter's last reader left) takes its bytes
/// out of the router-wide count.
impl<T: Storage + Clone> Drop for Data<T> {
    fn drop(&mut self) {
        self.stored_bytes
            .fetch_sub(self.log.size(), Ordering::Relaxed);
    }
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(
        filter: &str,
        router_config: &RouterConfig,
        stored_bytes: Arc<AtomicU64>,
    ) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // patched: limits clamped to what `CommitLog::new` accepts, so that
        // it cannot fail (it used to panic on a bad configuration, on the
        // router, at the first subscription).
        #[allow(clippy::expect_used)]
        let log = CommitLog::new(max_segment_size.max(1024), max_mem_segments.max(1))
            .expect("limits clamped to valid values");

        // patched: grow on demand (upstream reserved 10 per filter).
        let waiters = Waiters::with_capacity(0);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
            stored_bytes,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        // patched: the append may also drop the oldest segment (the log's
        // byte budget): the router-wide count follows both.
        let before = self.log.size();
        let offset = self.log.append(item);
        let after = self.log.size();
        if after >= before {
            self.stored_bytes
                .fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.stored_bytes
                .fetch_sub(before - after, Ordering::Relaxed);
        }
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes, by packet id (patched: upstream queued them
    // and released the oldest on any PUBREL, so a retransmitted publish was
    // stored twice and a PUBREL released another pkid's publish).
    recorded: HashMap<u16, (Publish, Option<PublishProperties>)>,
}

/// patched: the most QoS 2 publishes one connection may have awaiting PUBREL
/// in the router. The embedding program advertises and enforces a Receive
/// Maximum at or below this; the router caps its own state regardless so
/// that no client can grow it without limit.
pub const MAX_AWAITING_PUBREL: usize = 1024;

/// patched: what became of an incoming QoS 2 publish (see `AckLog::pubrec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2Record {
    /// Stored until its PUBREL.
    Stored,
    /// Its packet id already awaits PUBREL (a retransmission, MQTT 5
    /// 4.3.3): answered with PUBREC again, not stored again.
    Duplicate,
    /// `MAX_AWAITING_PUBREL` publishes already await PUBREL: not stored,
    /// not acknowledged; the connection is to be closed (0x93).
    Full,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            // patched: grow on demand; upstream reserved 100 acks and 100
            // QoS 2 publishes (~40 KB) per connection.
            committed: VecDeque::new(),
            recorded: HashMap::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    /// Records an incoming QoS 2 publish and queues its PUBREC (patched:
    /// once per packet id, and at most `MAX_AWAITING_PUBREL` of them).
    pub fn pubrec(
        &mut self,
        publish: Publish,
        props: Option<PublishProperties>,
        ack: PubRec,
    ) -> Qos2Record {
        let record = if self.recorded.contains_key(&ack.pkid) {
            Qos2Record::Duplicate
        } else if self.recorded.len() >= MAX_AWAITING_PUBREL {
            return Qos2Record::Full;
        } else {
            self.recorded.insert(ack.pkid, (publish, props));
            Qos2Record::Stored
        };
        self.committed.push_back(Ack::PubRec(ack));
        record
    }

    /// patched: the QoS 2 publishes awaiting PUBREL, taken to be saved
    /// with a persistent session.
    pub fn take_recorded(&mut self) -> HashMap<u16, (Publish, Option<PublishProperties>)> {
        std::mem::take(&mut self.recorded)
    }

    /// patched: puts back what `take_recorded` saved.
    pub fn restore_recorded(
        &mut self,
        recorded: HashMap<u16, (Publish, Option<PublishProperties>)>,
    ) {
        self.recorded = recorded;
    }

    /// How many QoS 2 publishes await their PUBREL.
    pub fn awaiting_pubrel(&self) -> usize {
        self.recorded.len()
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    /// Answers a PUBREL and releases the publish recorded under its packet
    /// id (patched: upstream released the oldest recorded publish,
    /// whichever its pkid). A PUBREL for a packet id with nothing recorded
    /// (a retransmitted PUBREL, or one for a session state the broker no
    /// longer has) is answered with PUBCOMP 0x92 (MQTT 5 4.3.3: the
    /// receiver must answer every PUBREL) and releases nothing.
    pub fn pubcomp(&mut self, mut ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let released = self.recorded.remove(&ack.pkid);
        if released.is_none() {
            ack.reason = PubCompReason::PacketIdentifierNotFound;
        }
        if self.recorded.is_empty() {
            // Give the map's memory back once the burst is over.
            self.recorded = HashMap::new();
        }
        self.committed.push_back(Ack::PubComp(ack));
        released
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config);
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config);
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config);
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}
