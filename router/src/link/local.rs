use crate::protocol::{
    Filter, LastWill, LastWillProperties, Packet, Publish, QoS, RetainForwardRule, Subscribe,
    Unsubscribe,
};
use crate::router::Ack;
use crate::router::{
    iobufs::{Incoming, Outgoing},
    Connection, Event, Notification,
};
use crate::ConnectionId;
use bytes::Bytes;
use flume::{Receiver, RecvError, RecvTimeoutError, SendError, Sender, TrySendError};
use parking_lot::lock_api::MutexGuard;
use parking_lot::{Mutex, RawMutex};

use std::collections::VecDeque;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Channel timeout recv error")]
    RecvTimeout(#[from] RecvTimeoutError),
    #[error("Timeout = {0}")]
    Elapsed(#[from] tokio::time::error::Elapsed),
}

// used to build LinkTx and LinkRx
pub struct LinkBuilder<'a> {
    client_id: &'a str,
    router_tx: Sender<(ConnectionId, Event)>,
    // true by default
    clean_session: bool,
    last_will: Option<LastWill>,
    last_will_properties: Option<LastWillProperties>,
    // false by default
    dynamic_filters: bool,
    // default to 0, indicating to not use topic alias
    topic_alias_max: u16,
    // patched: the client's Receive Maximum (65,535 when it sent none)
    receive_maximum: u16,
    // patched: who may read what the link publishes (everyone by default)
    audience: crate::Audience,
}

impl<'a> LinkBuilder<'a> {
    pub fn new(client_id: &'a str, router_tx: Sender<(ConnectionId, Event)>) -> Self {
        LinkBuilder {
            client_id,
            router_tx,
            clean_session: true,
            last_will: None,
            last_will_properties: None,
            dynamic_filters: false,
            topic_alias_max: 0,
            receive_maximum: u16::MAX,
            audience: crate::Audience::everyone(),
        }
    }

    /// patched: only `audience`'s subscriptions get what this link
    /// publishes (see `Audience`). For links the embedding program opens
    /// for itself; a client's link keeps the default, everyone.
    pub fn audience(mut self, audience: crate::Audience) -> Self {
        self.audience = audience;
        self
    }

    pub fn last_will(mut self, last_will: Option<LastWill>) -> Self {
        self.last_will = last_will;
        self
    }

    pub fn last_will_properties(
        mut self,
        last_will_properties: Option<LastWillProperties>,
    ) -> Self {
        self.last_will_properties = last_will_properties;
        self
    }

    pub fn topic_alias_max(mut self, max: u16) -> Self {
        self.topic_alias_max = max;
        self
    }

    /// patched: the client's Receive Maximum (MQTT 5 3.1.2.11.3): the router
    /// keeps at most this many QoS 1/2 deliveries unacknowledged on this
    /// link (and never more than its own limit, 100); the others wait in
    /// their logs until acknowledgements arrive. Default 65,535 (none sent).
    pub fn receive_maximum(mut self, receive_maximum: u16) -> Self {
        self.receive_maximum = receive_maximum;
        self
    }

    pub fn clean_session(mut self, clean: bool) -> Self {
        self.clean_session = clean;
        self
    }

    pub fn dynamic_filters(mut self, dynamic_filters: bool) -> Self {
        self.dynamic_filters = dynamic_filters;
        self
    }

    /// patched: `build` for a router running on the same tokio runtime
    /// (`Router::spawn_on_runtime`): waits for the router's CONNACK without
    /// blocking the worker the router itself needs.
    pub async fn build_async(mut self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        let (event, link_rx, outgoing_data_buffer, incoming_data_buffer) = self.connect_event();
        self.router_tx.send_async((0, event)).await?;
        link_rx.recv_async().await?;
        self.finish(link_rx, outgoing_data_buffer, incoming_data_buffer)
    }

    pub fn build(mut self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        let (event, link_rx, outgoing_data_buffer, incoming_data_buffer) = self.connect_event();
        self.router_tx.send((0, event))?;
        link_rx.recv()?;
        self.finish(link_rx, outgoing_data_buffer, incoming_data_buffer)
    }

    #[allow(clippy::type_complexity)]
    fn connect_event(
        &mut self,
    ) -> (
        Event,
        Receiver<()>,
        Arc<Mutex<VecDeque<Notification>>>,
        Arc<Mutex<VecDeque<Packet>>>,
    ) {
        // Connect to router
        // Local connections to the router shall have access to all subscriptions
        let mut connection = Connection::new(
            self.client_id.to_owned(),
            self.clean_session,
            self.dynamic_filters,
        );

        connection
            .last_will(self.last_will.take(), self.last_will_properties.take())
            .topic_alias_max(self.topic_alias_max);
        // The stored publishes' origin says who may read them.
        if let Some(origin) = self.audience.origin() {
            connection.origin = origin;
        }
        let incoming = Incoming::new(connection.client_id.to_owned());
        let (mut outgoing, link_rx) = Outgoing::new(connection.client_id.to_owned());
        outgoing.set_receive_maximum(self.receive_maximum);
        let outgoing_data_buffer = outgoing.buffer();
        let incoming_data_buffer = incoming.buffer();

        let event = Event::Connect {
            connection,
            incoming,
            outgoing,
        };
        (event, link_rx, outgoing_data_buffer, incoming_data_buffer)
    }

    fn finish(
        self,
        link_rx: Receiver<()>,
        outgoing_data_buffer: Arc<Mutex<VecDeque<Notification>>>,
        incoming_data_buffer: Arc<Mutex<VecDeque<Packet>>>,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        // patched: the CONNACK is taken out of the router's outgoing buffer
        // here, and the emptied buffer let go: otherwise it kept room for
        // four notifications (~1 KiB) for the connection's life, since a
        // link whose replies the embedding broker delivers itself may never
        // take that buffer again.
        let notification = {
            let mut buffer = outgoing_data_buffer.lock();
            let first = buffer.pop_front();
            if buffer.is_empty() {
                *buffer = VecDeque::new();
            }
            first
        }
        .ok_or(LinkError::NotConnectionAck)?;

        // Right now link identifies failure with dropped rx in router,
        // which is probably ok. We need this here to get id assigned by router
        let id = match notification {
            Notification::DeviceAck(Ack::ConnAck(id, ..)) => id,
            _message => return Err(LinkError::NotConnectionAck),
        };

        let tx = LinkTx::new(id, self.router_tx.clone(), incoming_data_buffer);
        let rx = LinkRx::new(id, self.router_tx, link_rx, outgoing_data_buffer);
        Ok((tx, rx, notification))
    }
}

/// patched: tells the router about a link's event without waiting when its
/// channel has room (the common case); only a full channel yields a waiting
/// send, boxed. `(ConnectionId, Event)` and `LinkError` are hundreds of bytes:
/// held inline they would weigh on every session future that may send.
type WaitingSend<'a> = Pin<Box<flume::r#async::SendFut<'a, (ConnectionId, Event)>>>;

fn notify_router(
    router_tx: &Sender<(ConnectionId, Event)>,
    connection_id: ConnectionId,
    event: Event,
) -> Result<Option<WaitingSend<'_>>, Box<LinkError>> {
    match router_tx.try_send((connection_id, event)) {
        Ok(()) => Ok(None),
        Err(TrySendError::Full(item)) => Ok(Some(Box::pin(router_tx.send_async(item)))),
        Err(e) => Err(Box::new(e.into())),
    }
}

/// Awaits what `notify_router` left waiting, if anything.
async fn finish_notify(
    pending: Result<Option<WaitingSend<'_>>, Box<LinkError>>,
) -> Result<(), LinkError> {
    match pending {
        Ok(None) => Ok(()),
        Ok(Some(waiting)) => Ok(waiting.await?),
        Err(e) => Err(*e),
    }
}

pub struct LinkTx {
    pub(crate) connection_id: ConnectionId,
    router_tx: Sender<(ConnectionId, Event)>,
    recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
}

impl LinkTx {
    pub fn new(
        connection_id: ConnectionId,
        router_tx: Sender<(ConnectionId, Event)>,
        recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
    ) -> LinkTx {
        LinkTx {
            connection_id,
            router_tx,
            recv_buffer,
        }
    }

    pub fn buffer(&self) -> MutexGuard<RawMutex, VecDeque<Packet>> {
        self.recv_buffer.lock()
    }

    /// Send raw device data
    fn push(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx
            .send((self.connection_id, Event::DeviceData))?;

        Ok(len)
    }

    /// Send raw device data
    /// (patched: waits asynchronously for room in the router's channel
    /// instead of blocking the runtime worker thread).
    /// patched: the packet is queued before the returned future is first
    /// polled, and the future holds no `Packet` or `Event` inline (see
    /// `notify_router`), so an embedding session's state machine stays small.
    pub fn send(
        &mut self,
        data: Packet,
    ) -> impl std::future::Future<Output = Result<usize, LinkError>> + '_ {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };
        let pending = notify_router(&self.router_tx, self.connection_id, Event::DeviceData);
        async move {
            finish_notify(pending).await?;
            Ok(len)
        }
    }

    fn try_push(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx
            .try_send((self.connection_id, Event::DeviceData))?;
        Ok(len)
    }

    pub(crate) async fn notify(&mut self) -> Result<(), LinkError> {
        self.router_tx
            .send_async((self.connection_id, Event::DeviceData))
            .await?;

        Ok(())
    }

    /// Sends a MQTT Publish to the router
    pub fn publish<S, V>(&mut self, topic: S, payload: V) -> Result<usize, LinkError>
    where
        S: Into<Bytes>,
        V: Into<Bytes>,
    {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
        };

        let len = self.push(Packet::Publish(publish, None))?;
        Ok(len)
    }

    /// Sends a MQTT Publish to the router
    pub fn try_publish<S, V>(&mut self, topic: S, payload: V) -> Result<usize, LinkError>
    where
        S: Into<Bytes>,
        V: Into<Bytes>,
    {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
        };

        let len = self.try_push(Packet::Publish(publish, None))?;
        // TODO: Remote item in buffer after failure and write unittest
        Ok(len)
    }

    /// Sends a MQTT Subscribe to the eventloop
    pub fn subscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let filters = vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        }];

        let subscribe = Subscribe { pkid: 0, filters };

        let len = self.push(Packet::Subscribe(subscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Subscribe to the eventloop
    pub fn try_subscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let filters = vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        }];

        let subscribe = Subscribe { pkid: 0, filters };

        let len = self.try_push(Packet::Subscribe(subscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Unsubscribe to the eventloop
    pub fn unsubscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let unsubscribe = Unsubscribe {
            pkid: 0,
            filters: vec![filter.into()],
        };

        let len = self.push(Packet::Unsubscribe(unsubscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Unsubscribe to the eventloop
    pub fn try_unsubscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let unsubscribe = Unsubscribe {
            pkid: 0,
            filters: vec![filter.into()],
        };

        let len = self.try_push(Packet::Unsubscribe(unsubscribe, None))?;
        Ok(len)
    }
}

#[derive(Debug)]
pub struct LinkRx {
    connection_id: ConnectionId,
    router_tx: Sender<(ConnectionId, Event)>,
    router_rx: Receiver<()>,
    send_buffer: Arc<Mutex<VecDeque<Notification>>>,
    cache: VecDeque<Notification>,
    /// patched: one lasting wait for the router's trigger, for `poll_next`.
    /// A `recv_async` future per wait allocates a waiter, queues it and
    /// unqueues it again when dropped (every time a caller's select picks
    /// another branch).
    triggers: flume::r#async::RecvStream<'static, ()>,
}

impl LinkRx {
    pub fn new(
        connection_id: ConnectionId,
        router_tx: Sender<(ConnectionId, Event)>,
        router_rx: Receiver<()>,
        outgoing_data_buffer: Arc<Mutex<VecDeque<Notification>>>,
    ) -> LinkRx {
        LinkRx {
            connection_id,
            router_tx,
            triggers: router_rx.clone().into_stream(),
            router_rx,
            send_buffer: outgoing_data_buffer,
            // patched: grow on demand; upstream reserved 100 notifications
            // (~25 KB) per link.
            cache: VecDeque::new(),
        }
    }

    pub fn id(&self) -> ConnectionId {
        self.connection_id
    }

    /// Capacity of the router's outgoing buffer for this link (tests).
    #[cfg(test)]
    pub(crate) fn router_buffer_capacity(&self) -> usize {
        self.send_buffer.lock().capacity()
    }

    /// patched: the next cached notification; once the cache is drained its
    /// buffer is let go. The cache is the router's whole batch taken at
    /// once, so without this every link kept the capacity of its largest
    /// batch for the rest of its life (about 1 KiB per connection after
    /// the first SUBACK, measured with heaptrack).
    fn pop_cached(&mut self) -> Option<Notification> {
        let next = self.cache.pop_front();
        if self.cache.is_empty() && self.cache.capacity() > 0 {
            self.cache = VecDeque::new();
        }
        next
    }

    pub fn recv(&mut self) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.pop_cached() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.router_rx.recv()?;
                // Collect 'all' the data in the buffer after a notification.
                // Notification means fresh data which isn't previously collected
                // patched: take the router's buffer and drop our drained
                // one, so that an idle link holds no buffer.
                self.cache = mem::take(&mut *self.send_buffer.lock());
                Ok(self.pop_cached())
            }
        }
    }

    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.pop_cached() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.router_rx.recv_deadline(deadline)?;
                // patched: take the router's buffer and drop our drained
                // one, so that an idle link holds no buffer.
                self.cache = mem::take(&mut *self.send_buffer.lock());
                Ok(self.pop_cached())
            }
        }
    }

    pub async fn next(&mut self) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.pop_cached() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.router_rx.recv_async().await?;
                // Collect 'all' the data in the buffer after a notification.
                // Notification means fresh data which isn't previously collected
                // patched: take the router's buffer and drop our drained
                // one, so that an idle link holds no buffer.
                self.cache = mem::take(&mut *self.send_buffer.lock());
                Ok(self.pop_cached())
            }
        }
    }

    /// patched: `next` as a poll, keeping its wait registered between calls
    /// (see `triggers`), for callers that wait in a loop with other events.
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Notification>, LinkError>> {
        use futures_core::Stream;
        use std::task::Poll;
        if let Some(v) = self.pop_cached() {
            return Poll::Ready(Ok(Some(v)));
        }
        match Pin::new(&mut self.triggers).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(LinkError::Recv(RecvError::Disconnected))),
            Poll::Ready(Some(())) => {
                self.cache = mem::take(&mut *self.send_buffer.lock());
                Poll::Ready(Ok(self.pop_cached()))
            }
        }
    }

    /// patched: `next` without waiting: `None` when the router has nothing.
    pub fn try_next(&mut self) -> Result<Option<Option<Notification>>, LinkError> {
        if let Some(v) = self.pop_cached() {
            return Ok(Some(Some(v)));
        }
        match self.router_rx.try_recv() {
            Ok(()) => {
                self.cache = mem::take(&mut *self.send_buffer.lock());
                Ok(Some(self.pop_cached()))
            }
            Err(flume::TryRecvError::Empty) => Ok(None),
            Err(flume::TryRecvError::Disconnected) => Err(LinkError::Recv(RecvError::Disconnected)),
        }
    }

    pub(crate) async fn exchange(
        &mut self,
        notifications: &mut VecDeque<Notification>,
    ) -> Result<(), LinkError> {
        self.router_rx.recv_async().await?;
        mem::swap(&mut *self.send_buffer.lock(), notifications);
        Ok(())
    }

    pub fn ready(&self) -> Result<(), LinkError> {
        self.router_tx.send((self.connection_id, Event::Ready))?;
        Ok(())
    }

    pub fn wake(&self) -> impl std::future::Future<Output = Result<(), LinkError>> + '_ {
        finish_notify(notify_router(
            &self.router_tx,
            self.connection_id,
            Event::Ready,
        ))
    }
}

#[cfg(test)]
mod test {
    use super::LinkTx;
    use flume::bounded;
    use parking_lot::Mutex;
    use std::{collections::VecDeque, sync::Arc, thread};

    /// A drained link holds no buffer: upstream kept the router's last batch
    /// capacity in `cache` for the life of the connection.
    #[test]
    fn a_drained_link_lets_its_batch_buffer_go() {
        use super::{LinkRx, Notification};
        let (router_tx, _router_rx) = bounded(10);
        let (trigger_tx, trigger_rx) = bounded(1);
        let buffer = Arc::new(Mutex::new(VecDeque::new()));
        let mut rx = LinkRx::new(7, router_tx, trigger_rx, buffer.clone());
        {
            let mut batch = buffer.lock();
            for _ in 0..40 {
                batch.push_back(Notification::Unschedule);
            }
        }
        trigger_tx.send(()).unwrap();
        let mut got = 0;
        while let Some(Some(_)) = rx.try_next().unwrap() {
            got += 1;
            if got == 1 {
                assert!(rx.cache.capacity() >= 39, "the batch is taken whole");
            }
        }
        assert_eq!(got, 40);
        assert_eq!(rx.cache.capacity(), 0, "a drained cache keeps no buffer");
        assert_eq!(
            buffer.lock().capacity(),
            0,
            "the router's side starts afresh"
        );
    }

    #[test]
    fn push_sends_all_data_and_notifications_to_router() {
        let (router_tx, router_rx) = bounded(10);
        let mut buffers = Vec::new();
        const CONNECTIONS: usize = 1000;
        const MESSAGES_PER_CONNECTION: usize = 100;

        for i in 0..CONNECTIONS {
            let buffer = Arc::new(Mutex::new(VecDeque::new()));
            let mut link_tx = LinkTx::new(i, router_tx.clone(), buffer.clone());
            buffers.push(buffer);
            thread::spawn(move || {
                for _ in 0..MESSAGES_PER_CONNECTION {
                    link_tx.publish("hello/world", vec![1, 2, 3]).unwrap();
                }
            });
        }

        // Router should receive notifications from all the connections
        for _ in 0..CONNECTIONS * MESSAGES_PER_CONNECTION {
            let _v = router_rx.recv().unwrap();
        }

        // Every connection has expected number of messages
        for item in buffers.iter().take(CONNECTIONS) {
            assert_eq!(item.lock().len(), MESSAGES_PER_CONNECTION);
        }

        // TODO: Write a similar test to benchmark buffer vs channels
    }
}
