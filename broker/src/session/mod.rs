//! Owns one client connection after the socket (and TLS) is up: a loop that
//! only moves bytes and applies what the session's state decides.
//!
//! - `connect`: the CONNECT deadline and decision, the router link;
//! - `state` (with `publish` and `subscribe`): the session as a value that
//!   takes one event and performs its actions, with no I/O;
//! - `wire`: the socket halves, their buffers, encoding for the client;
//! - `ending`: the goodbye, the will, a persistent session's hand-off and
//!   expiry.
//!
//! The loop waits on five things at once: an end request (takeover,
//! revocation, shutdown), one timer (the state's next deadline), socket
//! reads, the reply inbox, and router events (with the acknowledgements a
//! delivery owes, which also change the state as they are polled). Each becomes one [`Event`] for
//! [`SessionState::handle`]; what the state hands the router from one read
//! wakes it once, and what it queues for the client is written at the end of
//! the turn.

mod connect;
mod ending;
mod publish;
pub mod state;
mod subscribe;
mod tags;
#[cfg(test)]
mod tags_tests;
#[cfg(test)]
mod tests;
mod wire;

use crate::answers::ServerDisconnect;
use crate::codec::{Codec, Version};
use crate::gate::Gate;
use crate::router::protocol::Packet;
use crate::router::{LinkClosed, RouterEvent, RouterRx, RouterTx};
use futures::future::Either;
use futures::FutureExt;
pub use state::{Actions, End, Event, SessionState};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, error, Instrument};
use wire::{Apply, Wire};

/// Who a listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admits {
    Everyone,
    /// The internal listener of the in-process handlers: devices are refused.
    HandlersOnly,
}

/// A session's loop, allocated once at its own size.
type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one client until it leaves, is refused, or the broker shuts down.
///
/// What stays in the connection's task for its whole life is two pointers
/// and the span: the opening (CONNECT, authentication) needs more state than
/// the session and is boxed apart and freed once decided; the session's
/// loop is boxed at its own size.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    gate: Arc<Gate>,
    admits: Admits,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!(
        "conn",
        %peer,
        kind = tracing::field::Empty,
        uid = tracing::field::Empty,
        client_id = tracing::field::Empty
    );
    let opening = Box::pin(open(stream, gate, admits));
    async move {
        if let Some(running) = opening.await {
            running.await;
        }
    }
    .instrument(span)
}

/// Reads and decides the CONNECT; the session's loop if it was accepted.
async fn open<S>(stream: S, gate: Arc<Gate>, admits: Admits) -> Option<Running>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = gate.limits();
    let codec = Codec::new(Version::V4, limits.max_packet_size);
    let mut wire = Wire::new(stream, limits.write_timeout, codec);
    // A panic here (a bug) ends this connection only; no session exists
    // yet to clean up after.
    let opened = AssertUnwindSafe(connect::open_session(&gate, &mut wire, admits))
        .catch_unwind()
        .await;
    let (state, link) = match opened {
        Ok(Some(opened)) => opened,
        Ok(None) => return None,
        Err(panic) => {
            gate.metrics().session_panicked();
            error!(
                panic = panic_text(&*panic),
                "a connection panicked before its session began; closed"
            );
            return None;
        }
    };
    let session = Session {
        state,
        tx: link.tx,
        rx: link.rx,
        write_stalled: false,
        finished: false,
    };
    Some(Box::pin(run(session, wire)))
}

/// The session's loop, then its ending.
///
/// Not an `async fn`: its arguments would be stored twice in the future (as
/// arguments, then moved into the body), and this future is resident for
/// the connection's whole life. An `async move` block uses what it
/// captured in place.
fn run<S>(session: Session, wire: Wire<S>) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut session, mut wire) = (session, wire);
    async move {
        // A panic in the loop (a bug: no input should reach one) ends this
        // session like any other server-side end: the client is told, the
        // will fires, the router link is closed, and it is counted.
        let gate = session.state.gate.clone();
        let relay = AssertUnwindSafe(session.relay(&mut wire)).catch_unwind();
        let end = match relay.await {
            Ok(end) => end,
            Err(panic) => {
                session.state.gate.metrics().session_panicked();
                error!(
                    panic = panic_text(&*panic),
                    "a session panicked; ended, its will fired and its router link closed"
                );
                End::Server(ServerDisconnect::InternalError)
            }
        };
        // Boxed: the goodbye's state (will, DISCONNECT, timeouts) would
        // otherwise be part of every connection's resident future. A panic
        // while ending is caught here too (the session's `Drop` still
        // queues the router's DISCONNECT) so that it is told apart from a
        // session dropped by a thread that unwinds for another reason.
        let ending = AssertUnwindSafe(Box::pin(ending::finish(session, wire, end)));
        if let Err(panic) = ending.catch_unwind().await {
            gate.metrics().session_panicked();
            error!(
                panic = panic_text(&*panic),
                "a session panicked while ending; its router link is closed"
            );
        }
    }
}

/// The text of a caught panic, for the log.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&'static str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// What the loop does after the router's events.
enum RouterStep {
    Continue,
    /// The router paused the link after a burst and waits to be asked again.
    Wake,
    End(End),
    /// A delivery settled an acknowledgement it owed.
    Acknowledged,
}

/// A connected session: its state and its router link.
struct Session {
    state: SessionState,
    tx: RouterTx,
    rx: RouterRx,
    /// A write did not finish: nothing more is written to this client.
    write_stalled: bool,
    /// `ending::finish` ran: the router link was closed (or handed over).
    finished: bool,
}

impl Drop for Session {
    /// Ended without `finish`: a panic while ending (caught, logged and
    /// counted in `run`), or the task dropped (the runtime shut down, or
    /// its thread unwinds for a panic that is not the session's, as when a
    /// test's assertion fails beside in-process sessions). The router must
    /// not keep a session for a client nobody serves: queue its DISCONNECT
    /// (the send's first attempt does not wait).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        debug!("session dropped before its ending finished; its router link is closed");
        if !self.state.taken_over() {
            drop(self.tx.send(ending::normal_disconnect()));
        }
    }
}

/// The end for a router link that closed.
const LINK_CLOSED: End = End::Abnormal("router link closed");

/// Gives `then` once the router is woken for what the state handed it (if
/// anything; `closed` if its link is gone). Built, not awaited, by the
/// synchronous steps below, so that the loop's state holds only this small
/// future across the wait, never a packet or an event.
fn then_wake<'t, T: 't>(
    sent: Option<impl Future<Output = Result<(), LinkClosed>> + 't>,
    then: T,
    closed: T,
) -> impl Future<Output = T> + 't {
    match sent {
        None => Either::Left(std::future::ready(then)),
        Some(sent) => Either::Right(sent.map(move |sent| match sent {
            Ok(()) => then,
            Err(LinkClosed) => closed,
        })),
    }
}

impl Session {
    /// Relays until the session ends, and says why.
    async fn relay<S: AsyncRead + AsyncWrite>(&mut self, wire: &mut Wire<S>) -> End {
        // One timer, living across turns (creating it per packet would
        // register and drop a timer on every message), moved only when it
        // fires: the state says when it must next.
        let timer = tokio::time::sleep_until(self.state.next_deadline());
        tokio::pin!(timer);
        // Handles on what the loop waits for, apart from the state, which
        // the router's branch changes as it polls.
        let end_signal = self.state.end_signal().clone();
        let inbox = self.state.subs.inbox().cloned();
        // Packets the client sent right behind its CONNECT arrived with it
        // (MQTT lets a client send before the CONNACK).
        if !wire.input.read_buf.is_empty() {
            if let Some(end) = self.take_buffered(wire, None).await {
                // Acknowledgements already queued still go out.
                return self.write_out(wire).await.err().unwrap_or(end);
            }
            if let Err(end) = self.write_out(wire).await {
                return end;
            }
        }
        loop {
            wire.input.reserve_read_room();
            tokio::select! {
                biased;
                why = std::future::poll_fn(|cx| end_signal.poll_requested(cx)) => {
                    if let Some(end) = self.handle(wire, Event::EndRequested(why)).await {
                        return end;
                    }
                }
                _ = &mut timer => {
                    if let Some(end) = self.handle(wire, Event::Tick(Instant::now())).await {
                        return end;
                    }
                    timer.as_mut().reset(self.state.next_deadline());
                }
                read = tokio::io::AsyncReadExt::read_buf(&mut wire.input.reader, &mut wire.input.read_buf) => {
                    match read {
                        Ok(0) => return End::Abnormal("peer closed the connection"),
                        Err(_) => return End::Abnormal("read failed"),
                        Ok(_) => {}
                    }
                    if let Some(end) = self.take_buffered(wire, Some(Instant::now())).await {
                        // Acknowledgements already queued still go out.
                        return self.write_out(wire).await.err().unwrap_or(end);
                    }
                }
                () = std::future::poll_fn(|cx| match &inbox {
                    Some(inbox) => inbox.poll_ready(cx),
                    None => Poll::Pending,
                }) => {
                    if let Some(end) = self.handle(wire, Event::InboxReady).await {
                        return end;
                    }
                }
                // Handled as it is polled: a router event (a whole packet)
                // never becomes part of this future's state. An
                // acknowledgement a delivery owes is waited for here too
                // (both change the state as they are polled).
                (step, unsent) = std::future::poll_fn(|cx| {
                    if self.state.poll_acknowledged(cx).is_ready() {
                        return Poll::Ready((RouterStep::Acknowledged, None));
                    }
                    let first = ready!(self.rx.poll_next(cx));
                    Poll::Ready(Self::drain_router(
                        &mut self.state,
                        &mut self.rx,
                        &mut self.tx,
                        first,
                        &mut wire.output,
                    ))
                }) => {
                    // Acknowledgements the gate made for the client (forwards
                    // too large for it) go back to the router first.
                    if let Some(packet) = unsent {
                        if self.tx.send(*packet).await.is_err() {
                            return LINK_CLOSED;
                        }
                    }
                    match step {
                        RouterStep::Continue => {}
                        // The wake's future is small.
                        RouterStep::Wake => {
                            if self.rx.wake().await.is_err() {
                                return LINK_CLOSED;
                            }
                        }
                        RouterStep::End(end) => return end,
                        RouterStep::Acknowledged => {
                            if let Some(end) = self.handle(wire, Event::Acknowledged).await {
                                // PUBACKs already queued still go out.
                                return self.write_out(wire).await.err().unwrap_or(end);
                            }
                        }
                    }
                }
            }
            if let Err(end) = self.write_out(wire).await {
                return end;
            }
            // A publish may have brought a deadline nearer (an
            // acknowledgement a delivery owes).
            let next = self.state.next_deadline();
            if next < timer.deadline() {
                timer.as_mut().reset(next);
            }
        }
    }

    /// Handles one event; the future wakes the router for what it was
    /// handed and gives the end, if the event ended the session.
    fn handle<'t, S: AsyncRead + AsyncWrite>(
        &'t mut self,
        wire: &mut Wire<S>,
        event: Event,
    ) -> impl Future<Output = Option<End>> + 't {
        let mut out = Apply::new(&mut self.tx, &mut wire.output);
        let end = self.state.handle(event, &mut out);
        then_wake(out.finish(), end, Some(LINK_CLOSED))
    }

    /// Handles every whole packet in the read buffer (bytes `heard` at that
    /// instant); the future wakes the router once for all of them and gives
    /// the end, if one ended the session (what came before a fatal packet
    /// is still delivered).
    fn take_buffered<'t, S: AsyncRead + AsyncWrite>(
        &'t mut self,
        wire: &mut Wire<S>,
        heard: Option<Instant>,
    ) -> impl Future<Output = Option<End>> + 't {
        let codec = wire.output.codec;
        let mut out = Apply::new(&mut self.tx, &mut wire.output);
        if let Some(now) = heard {
            self.state.handle(Event::Heard(now), &mut out);
        }
        let mut ended = None;
        while ended.is_none() {
            let event = match codec.decode(&mut wire.input.read_buf) {
                Ok(Some(packet)) => Event::Client(packet),
                Ok(None) => break,
                Err(error) => Event::Undecodable(error),
            };
            ended = self.state.handle(event, &mut out);
        }
        then_wake(out.finish(), ended, Some(LINK_CLOSED))
    }

    /// Hands everything the router has ready to the state, without waiting,
    /// for one write, and says what next. What the state hands the router
    /// meanwhile (rare: acknowledgements for forwards too large for the
    /// client) is queued, the last of it returned to be sent.
    fn drain_router<S: AsyncWrite>(
        state: &mut SessionState,
        rx: &mut RouterRx,
        tx: &mut RouterTx,
        first: Result<Option<RouterEvent>, LinkClosed>,
        output: &mut wire::Output<S>,
    ) -> (RouterStep, Option<Box<Packet>>) {
        let mut out = Apply::new(tx, output);
        let mut next = first;
        let step = loop {
            match next {
                Err(LinkClosed) => {
                    break RouterStep::End(End::Abnormal("router ended the session"))
                }
                Ok(None) => {}
                Ok(Some(RouterEvent::Paused)) => break RouterStep::Wake,
                Ok(Some(RouterEvent::Packet(packet))) => {
                    if let Some(end) = state.handle(Event::Router(packet), &mut out) {
                        break RouterStep::End(end);
                    }
                }
            }
            next = match rx.try_next() {
                Ok(None) => break RouterStep::Continue,
                other => other,
            };
        };
        (step, out.unsent())
    }

    /// Writes what is queued. A client that does not take it within the
    /// write deadline is cut off, and while a write waits, an end request
    /// (takeover, revocation, shutdown) or the token's expiry still ends the
    /// session at once: a client that stops reading cannot pin it.
    async fn write_out<S: AsyncRead + AsyncWrite>(
        &mut self,
        wire: &mut Wire<S>,
    ) -> Result<(), End> {
        if !wire.output.has_pending_write() {
            return Ok(());
        }
        // Almost every write completes at once: no timer and no waiting
        // state for those (the flush is cancel-safe, so the rare one that
        // waits picks up where this left off).
        let first = std::future::poll_fn(|cx| Poll::Ready(wire.output.poll_flush(cx))).await;
        if let Poll::Ready(written) = first {
            return written.map_err(|_| End::Abnormal("write failed"));
        }
        Box::pin(self.wait_for_write(wire)).await
    }

    /// The rare write that waits (boxed by `write_out`: its timers are not
    /// part of every connection's resident future).
    async fn wait_for_write<S: AsyncRead + AsyncWrite>(
        &mut self,
        wire: &mut Wire<S>,
    ) -> Result<(), End> {
        let write_timeout = wire.output.write_timeout;
        let token_deadline = self.state.token_deadline();
        let token_expired = async {
            match token_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let end_signal = self.state.end_signal().clone();
        let why = tokio::select! {
            biased;
            written = wire.output.flush() => {
                return written.map_err(|_| End::Abnormal("write failed"));
            }
            why = std::future::poll_fn(|cx| end_signal.poll_requested(cx)) => {
                state::server_end(why)
            }
            _ = token_expired => ServerDisconnect::TokenExpired,
            _ = tokio::time::sleep(write_timeout) => ServerDisconnect::WriteTimeout,
        };
        self.write_stalled = true;
        Err(End::Server(why))
    }
}
