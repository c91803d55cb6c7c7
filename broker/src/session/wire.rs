//! Owns a connection's socket halves and their buffers: reading the CONNECT,
//! encoding packets in the form the client can read (`translate`, its
//! Maximum Packet Size), and writing them out. Buffers start small and do
//! not keep what a burst grew them to.

use super::state::Actions;
use crate::codec::{sniff_version, Codec, CodecError};
use crate::router::protocol::Packet;
use crate::router::RouterTx;
use crate::translate;
use bytes::BytesMut;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tracing::{info, warn};

/// Most MQTT packets of this product are small; the read buffer grows when
/// one is not (and is resident per connection, so it starts small).
pub const INITIAL_READ_BUFFER: usize = 512;
/// Largest read buffer kept once it is empty (a burst must not leave a
/// large one behind for the connection's life).
const KEPT_READ_BUFFER: usize = 4 * 1024;
/// Largest write buffer kept between writes.
const KEPT_WRITE_BUFFER: usize = 1024;
/// Least free room in the read buffer before a read (see `reserve_read_room`).
const MIN_READ_ROOM: usize = 256;

/// The socket halves and their buffers, apart so that the loop can read
/// while it hands what the router has to the writing side.
pub struct Wire<S> {
    pub input: Input<S>,
    pub output: Output<S>,
}

/// The reading side.
pub struct Input<S> {
    pub reader: ReadHalf<S>,
    pub read_buf: BytesMut,
}

/// The writing side, and how packets are encoded for this client.
pub struct Output<S> {
    writer: WriteHalf<S>,
    write_buf: BytesMut,
    /// How much of `write_buf` is written (kept here, not by advancing the
    /// buffer, so that a flush can stop and resume, and the buffer's whole
    /// size is still seen when deciding whether to keep it).
    written: usize,
    /// How long one write may take (`Limits::write_timeout`).
    pub write_timeout: Duration,
    pub codec: Codec,
    /// Who reads what is written (known once CONNECT is decided).
    pub receiver: translate::Receiver,
    /// The largest packet the client accepts (MQTT 5 CONNECT Maximum Packet
    /// Size; unlimited otherwise): larger ones are not sent (3.1.2.11.4).
    pub client_max_packet: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("peer closed the connection")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl<S: AsyncRead + AsyncWrite> Wire<S> {
    pub fn new(stream: S, write_timeout: Duration, codec: Codec) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Wire {
            input: Input {
                reader,
                read_buf: BytesMut::with_capacity(INITIAL_READ_BUFFER),
            },
            output: Output {
                writer,
                write_buf: BytesMut::new(),
                written: 0,
                write_timeout,
                codec,
                receiver: translate::Receiver::Device,
                client_max_packet: usize::MAX,
            },
        }
    }

    /// Reads until the CONNECT is whole; fixes the codec by its version.
    pub async fn read_connect(&mut self, max_size: usize) -> Result<Packet, ConnectReadError> {
        let Input { reader, read_buf } = &mut self.input;
        loop {
            if let Some(version) = sniff_version(read_buf)? {
                self.output.codec = Codec::new(version, max_size);
                if let Some(packet) = self.output.codec.decode(read_buf)? {
                    return Ok(packet);
                }
            }
            if reader.read_buf(read_buf).await? == 0 {
                return Err(ConnectReadError::Closed);
            }
        }
    }

    /// Queues `packet` (see [`Output::queue`]).
    pub fn queue(&mut self, packet: Packet) -> bool {
        self.output.queue(packet)
    }

    /// Writes `packet` now, within the write deadline.
    pub async fn send_now(&mut self, packet: Packet) -> std::io::Result<()> {
        self.output.queue(packet);
        self.output.flush_within(self.output.write_timeout).await
    }
}

impl<S: AsyncRead> Input<S> {
    /// Decoded packets keep slices of the read buffer, so its spare room
    /// only shrinks; reading into a sliver would split packets over several
    /// syscalls. Room for a few packets per read instead. An empty buffer
    /// that a burst grew is let go.
    pub fn reserve_read_room(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > KEPT_READ_BUFFER {
            self.read_buf = BytesMut::with_capacity(INITIAL_READ_BUFFER);
        } else if self.read_buf.capacity() - self.read_buf.len() < MIN_READ_ROOM {
            self.read_buf.reserve(INITIAL_READ_BUFFER);
        }
    }
}

impl<S: AsyncWrite> Output<S> {
    /// Encodes into the write buffer, in the form the client's protocol
    /// version can carry (`translate`); says whether it was queued: a packet
    /// the codec cannot encode (it came from the router, not from this
    /// client) is logged and skipped, and one larger than the client's
    /// Maximum Packet Size is not sent (the caller settles what it owed).
    pub fn queue(&mut self, packet: Packet) -> bool {
        let Some(packet) = translate::for_client(self.codec.version, self.receiver, packet) else {
            return false;
        };
        let before = self.write_buf.len();
        if let Err(e) = self.codec.encode(packet, &mut self.write_buf) {
            warn!(error = %e, "could not encode an outgoing packet");
            return false;
        }
        if self.write_buf.len() - before > self.client_max_packet {
            self.write_buf.truncate(before);
            info!(
                client_max_packet = self.client_max_packet,
                "a packet larger than the client's Maximum Packet Size is not sent"
            );
            return false;
        }
        true
    }

    pub fn has_pending_write(&self) -> bool {
        !self.write_buf.is_empty()
    }

    /// Writes what is queued. Cancel-safe: what was written is counted as
    /// it goes, so a dropped flush resumes where it stopped
    /// (the session polls it once inline and waits for the rest elsewhere).
    pub async fn flush(&mut self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// [`Wire::flush`] as a poll.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some(rest) = self.write_buf.get(self.written..).filter(|r| !r.is_empty()) {
            let written = ready!(Pin::new(&mut self.writer).poll_write(cx, rest))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += written;
        }
        ready!(Pin::new(&mut self.writer).poll_flush(cx))?;
        self.written = 0;
        // A small buffer is kept (allocating it again for every reply cost
        // more than its memory); a burst must not leave a large one behind.
        if self.write_buf.capacity() > KEPT_WRITE_BUFFER {
            self.write_buf = BytesMut::new();
        } else {
            self.write_buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Flushes, giving up after `limit` (the client is not reading).
    pub async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        match tokio::time::timeout(limit, self.flush()).await {
            Ok(written) => written,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Closes the writing side, briefly (a client that stopped reading
    /// would hold it).
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.writer.shutdown()).await;
    }
}

/// Performs a session's actions: packets for the client are encoded into
/// the wire's write buffer; packets for the router are queued on its link,
/// all but the last, which [`Apply::finish`] sends to wake the router once
/// for all of them (one router event per read, not per packet). Nothing is
/// collected on the side: no buffer outlives one read.
pub struct Apply<'t, 'w, S> {
    router: &'t mut RouterTx,
    output: &'w mut Output<S>,
    last_for_router: Option<Packet>,
}

impl<'t, 'w, S: AsyncWrite> Apply<'t, 'w, S> {
    pub fn new(router: &'t mut RouterTx, output: &'w mut Output<S>) -> Self {
        Apply {
            router,
            output,
            last_for_router: None,
        }
    }

    /// What was queued for the router and not yet sent, for the rare caller
    /// that must send it later (boxed: it is held across a wait).
    pub fn unsent(self) -> Option<Box<Packet>> {
        self.last_for_router.map(Box::new)
    }

    /// Wakes the router for what was queued, if anything: the packet is
    /// handed over now, and the future only waits for room in its channel.
    pub fn finish(
        self,
    ) -> Option<impl std::future::Future<Output = Result<(), crate::router::LinkClosed>> + 't> {
        let last = self.last_for_router?;
        Some(self.router.send(last))
    }
}

impl<S: AsyncWrite> Actions for Apply<'_, '_, S> {
    fn to_client(&mut self, packet: Packet) -> bool {
        self.output.queue(packet)
    }

    fn to_router(&mut self, packet: Packet) {
        if let Some(earlier) = self.last_for_router.replace(packet) {
            self.router.queue(earlier);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Version;
    use crate::router::protocol::{Publish, QoS};
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_flush_resumes_where_it_stopped_and_a_burst_does_not_stay() {
        let (stream, mut client) = tokio::io::duplex(1024);
        let codec = Codec::new(Version::V5, 1 << 20);
        let mut wire = Wire::new(stream, Duration::from_secs(1), codec);
        let big = Publish::with_qos(
            Bytes::from_static(b"u1_reply"),
            Bytes::from(vec![7u8; 16 * 1024]),
            false,
            QoS::AtMostOnce,
            0,
        );
        assert!(wire.queue(Packet::Publish(big, None)));
        let total = wire.output.write_buf.len();
        // The client has room for 1 KiB: the first poll writes part of it.
        let first = std::future::poll_fn(|cx| Poll::Ready(wire.output.poll_flush(cx))).await;
        assert!(first.is_pending());
        assert!(wire.output.has_pending_write());
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            client.read_exact(&mut got).await.expect("reads it all");
            got
        });
        // A new flush (the first was dropped) writes the rest, once.
        wire.output.flush().await.expect("flushed");
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), total);
        assert!(got.ends_with(&[7u8; 64]));
        assert!(!wire.output.has_pending_write());
        assert!(
            wire.output.write_buf.capacity() <= KEPT_WRITE_BUFFER,
            "a 16 KiB burst left {} bytes",
            wire.output.write_buf.capacity()
        );
    }

    #[test]
    fn an_empty_read_buffer_a_burst_grew_is_let_go() {
        let (stream, _client) = tokio::io::duplex(64);
        let codec = Codec::new(Version::V5, 1 << 20);
        let mut wire = Wire::new(stream, Duration::from_secs(1), codec);
        wire.input.read_buf = BytesMut::with_capacity(256 * 1024);
        wire.input.reserve_read_room();
        let room = wire.input.read_buf.capacity();
        assert!((MIN_READ_ROOM..=KEPT_READ_BUFFER).contains(&room), "{room}");
        // Bytes still waiting keep their buffer.
        wire.input.read_buf = BytesMut::with_capacity(256 * 1024);
        wire.input.read_buf.extend_from_slice(b"half a packet");
        wire.input.reserve_read_room();
        assert!(wire.input.read_buf.capacity() > KEPT_READ_BUFFER);
    }
}
