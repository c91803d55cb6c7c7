//! Owns the identity service's HTTP listener: the accept loop, admission,
//! the deadlines of a connection, and the drain at shutdown. The service
//! shares a process (and so its file descriptors) with the broker, so it
//! keeps the broker's discipline:
//!
//! - admission at accept, before any read: at most
//!   [`ConnectionLimits::max_per_source`] connections per source ([`AddrKey`]:
//!   an IPv6 /64 counts as one) and [`ConnectionLimits::max_connections`] in
//!   all; a connection over either is closed at once, counted, and logged
//!   once per episode. The accept loop never waits on a connection, so one
//!   source's connections never stop others being served;
//! - a header-read deadline: hyper's `header_read_timeout`, which runs from
//!   accept to a complete request head and, on a kept-alive connection, from
//!   the end of the previous response to the next head (hyper restarts it
//!   when the connection turns idle), so an idle keep-alive connection is
//!   closed after it too;
//! - an idle deadline: a connection on which no byte moves either way for
//!   [`ConnectionLimits::idle_timeout`] is closed (a body trickled a byte at a
//!   time, a response the client does not read), except while a handler is
//!   at work on a request (waiting on the SMS provider or the store, whose
//!   own timeouts bound it; waiting on the request's body does not count);
//! - at shutdown the listener closes, each connection finishes the request
//!   it is in and closes, and whatever is still open after [`DRAIN`] is cut.
//!
//! The descriptors these caps bound are checked against the process's limit
//! at start ([`crate::descriptors`]).

use crate::config::ConnectionLimits;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use protocol::addr_key::AddrKey;
use protocol::admission::{RefusalEpisodes, SourceLimit, SourceSlot, EPISODE_QUIET};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// How long connections may take to finish at shutdown before they are cut.
pub const DRAIN: Duration = Duration::from_secs(3);

/// hyper's read (and write) buffer cap per connection, down from its ~400 KiB
/// default: a request head larger than this is answered 431. Requests here
/// are small (a body is at most 4 KiB, headers a bearer token), so this
/// bounds a connection's buffers at about 128 KiB and the listener's at
/// `IDP_MAX_CONNECTIONS` times that.
pub const MAX_BUFFER_BYTES: usize = 64 * 1024;

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its source holds its most connections.
    TooManyFromSource,
    /// The listener holds its most connections.
    TooManyConnections,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyFromSource => "too_many_from_source",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::TooManyFromSource => 0,
            Refusal::TooManyConnections => 1,
        }
    }
}

/// An admitted connection's slots (its source's and the listener's), given
/// back when it closes.
pub struct Admitted {
    _source: SourceSlot,
    _slot: OwnedSemaphorePermit,
}

/// Decides whether an accepted connection is served.
pub struct Admission {
    per_source: Arc<SourceLimit>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    episodes: RefusalEpisodes<Refusal>,
    refused: [AtomicU64; 2],
}

impl Admission {
    pub fn new(limits: &ConnectionLimits) -> Self {
        Admission {
            per_source: SourceLimit::new(limits.max_per_source),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            max_connections: limits.max_connections,
            episodes: RefusalEpisodes::default(),
            refused: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// The slots of a new connection from `ip`, or why not. The source's cap
    /// is checked first: a source at its cap is refused as such whether or
    /// not the listener is full, and takes none of the listener's slots.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refusal> {
        let source = self
            .per_source
            .try_admit(AddrKey::of(ip))
            .ok_or(Refusal::TooManyFromSource)?;
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyConnections)?;
        Ok(Admitted {
            _source: source,
            _slot: slot,
        })
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.max_connections
            .saturating_sub(self.slots.available_permits())
    }

    /// Connections `ip`'s source holds now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_source.held(AddrKey::of(ip))
    }

    /// Refusals of kind `why` since start.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused
            .get(why.index())
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Counts a refusal, and logs it when it begins an episode: a storm of
    /// refusals costs one line, which carries the running totals.
    pub fn record_refusal(&self, ip: IpAddr, why: Refusal) {
        if let Some(count) = self.refused.get(why.index()) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(previous_episode_refused) = self.episodes.record(why) {
            tracing::warn!(
                source = %AddrKey::of(ip),
                reason = why.reason(),
                open = self.open(),
                refused_total = self.refused(why),
                previous_episode_refused,
                "identity service: closing connections at accept; further refusals are counted until {}s pass without one",
                EPISODE_QUIET.as_secs()
            );
        }
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` fires,
/// then drains (see the module's documentation).
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let admission = Admission::new(&limits);
    let tasks = TaskTracker::new();
    let cut = CancellationToken::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Out of descriptors and the like: wait, don't spin.
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "identity service: accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                // Dropping the socket closes it: no byte read, none written.
                drop(socket);
                admission.record_refusal(peer.ip(), why);
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            limits,
            shutdown: shutdown.clone(),
            cut: cut.clone(),
        };
        tasks.spawn(async move {
            connection.serve(socket, peer).await;
            drop(admitted);
        });
    }
    // No new connections from here on.
    drop(listener);
    tasks.close();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        tracing::warn!(
            open = admission.open(),
            "identity service: cutting the connections still open {}s after shutdown",
            DRAIN.as_secs()
        );
        cut.cancel();
        tasks.wait().await;
    }
    Ok(())
}

/// What one connection's task needs.
struct Connection {
    router: Router,
    limits: ConnectionLimits,
    /// Finish the request in progress, then close.
    shutdown: CancellationToken,
    /// Close now (the drain is over).
    cut: CancellationToken,
}

impl Connection {
    async fn serve(self, socket: TcpStream, peer: SocketAddr) {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: socket,
            activity: activity.clone(),
        });
        let router = self.router;
        let busy = activity.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let activity = busy.clone();
            let mut request = request.map(|inner| ClientBody { inner, activity });
            // What `into_make_service_with_connect_info` gave the handlers.
            request.extensions_mut().insert(ConnectInfo(peer));
            let handling = busy.handling();
            let response = router.clone().call(request);
            async move {
                let response = response.await;
                drop(handling);
                response
            }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(MAX_BUFFER_BYTES)
            .keep_alive(true);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let idle = activity.idle_past(self.limits.idle_timeout);
        tokio::pin!(idle);
        let mut draining = false;
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(e) = ended {
                        // Header deadline, malformed request, reset: the client's doing.
                        tracing::debug!(%peer, error = %e, "identity service: connection ended");
                    }
                    return;
                }
                _ = &mut idle => {
                    tracing::debug!(%peer, idle_secs = self.limits.idle_timeout.as_secs(), "identity service: closing an idle connection");
                    return;
                }
                _ = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = self.cut.cancelled() => return,
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are
/// being handled: a handler waiting on the SMS provider or the store is not
/// idle, one waiting on the client's body is (the body is the client's to
/// send, and a trickle of it must not hold the connection).
struct Activity {
    origin: Instant,
    /// Milliseconds from `origin`.
    last: AtomicU64,
    handling: AtomicUsize,
    /// A handler's last poll of the request body found nothing yet.
    awaiting_body: AtomicBool,
}

/// A request body that tells its connection's [`Activity`] whether the
/// handler is waiting on the client for it.
struct ClientBody {
    inner: Incoming,
    activity: Arc<Activity>,
}

impl hyper::body::Body for ClientBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.activity
            .awaiting_body
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One request being handled; marks the connection active when it ends.
struct Handling(Arc<Activity>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            awaiting_body: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn handling(self: &Arc<Self>) -> Handling {
        self.handling.fetch_add(1, Ordering::Relaxed);
        Handling(self.clone())
    }

    /// Time since the last byte, or zero while a request is being handled
    /// and its handler is not waiting on the client.
    fn idle_for(&self) -> Duration {
        if self.handling.load(Ordering::Relaxed) > 0 && !self.awaiting_body.load(Ordering::Relaxed)
        {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Resolves once the connection has been idle for `limit`. Sleeps until
    /// the earliest moment that could be true, so an active connection
    /// costs a timer wake-up per `limit`, not per byte.
    async fn idle_past(&self, limit: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit.saturating_sub(idle)).await;
        }
    }
}

/// A socket that records in its [`Activity`] every read or write that moves bytes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_per_source: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_per_source,
            ..ConnectionLimits::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_over_its_cap_is_refused_and_others_are_not() {
        let admission = Admission::new(&limits(10, 2));
        let held: Vec<_> = (0..2)
            .map(|_| admission.admit(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(
            admission.admit(ip("10.0.0.1")).err().map(Refusal::reason),
            Some("too_many_from_source")
        );
        assert!(admission.admit(ip("10.0.0.2")).is_ok());
        assert_eq!(admission.open_from(ip("10.0.0.1")), 2);
        drop(held);
        assert_eq!(admission.open_from(ip("10.0.0.1")), 0);
        assert!(
            admission.admit(ip("10.0.0.1")).is_ok(),
            "slots come back on close"
        );
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let admission = Admission::new(&limits(100, 3));
        let held: Vec<_> = (1..=20)
            .filter_map(|i| admission.admit(ip(&format!("2001:db8:5:6::{i:x}"))).ok())
            .collect();
        assert_eq!(held.len(), 3);
        assert!(
            admission.admit(ip("2001:db8:5:7::1")).is_ok(),
            "the next /64 is another source"
        );
    }

    #[test]
    fn the_total_cap_holds_across_sources_and_a_refused_source_keeps_nothing() {
        let admission = Admission::new(&limits(4, 2));
        let held: Vec<_> = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]
            .into_iter()
            .map(|a| admission.admit(ip(a)).unwrap())
            .collect();
        assert_eq!(admission.open(), 4);
        assert_eq!(
            admission.admit(ip("10.0.0.3")).err(),
            Some(Refusal::TooManyConnections)
        );
        assert_eq!(
            admission.open_from(ip("10.0.0.3")),
            0,
            "a refusal by the total cap gives the source's slot back"
        );
        assert_eq!(
            admission.admit(ip("10.0.0.1")).err(),
            Some(Refusal::TooManyFromSource),
            "the source's cap is reported first"
        );
        drop(held);
        assert_eq!(admission.open(), 0);
        assert!(admission.admit(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn refusals_are_counted_by_kind() {
        let admission = Admission::new(&limits(1, 1));
        for _ in 0..5 {
            admission.record_refusal(ip("10.0.0.1"), Refusal::TooManyFromSource);
        }
        admission.record_refusal(ip("10.0.0.2"), Refusal::TooManyConnections);
        assert_eq!(admission.refused(Refusal::TooManyFromSource), 5);
        assert_eq!(admission.refused(Refusal::TooManyConnections), 1);
    }

    #[tokio::test]
    async fn idleness_counts_from_the_last_byte_and_not_while_handling() {
        let limit = Duration::from_millis(150);
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        activity.idle_past(limit).await;
        assert!(started.elapsed() >= limit);

        activity.touch();
        let touched = Instant::now();
        activity.idle_past(limit).await;
        assert!(touched.elapsed() >= limit, "a byte restarts the clock");

        let handling = activity.handling();
        let waited = tokio::time::timeout(limit * 3, activity.idle_past(limit)).await;
        assert!(waited.is_err(), "a request being handled is not idle");
        activity.awaiting_body.store(true, Ordering::Relaxed);
        let waited = tokio::time::timeout(limit * 3, activity.idle_past(limit)).await;
        assert!(waited.is_ok(), "a handler waiting on the client's body is");
        activity.awaiting_body.store(false, Ordering::Relaxed);
        drop(handling);
        assert!(
            activity.idle_for() < limit,
            "the end of a request counts as activity"
        );
    }
}
