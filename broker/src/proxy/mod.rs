//! Owns the client's address when a load balancer stands in front of the
//! broker: which peers are trusted to say it ([`TrustedProxies`],
//! `BROKER_TRUSTED_PROXIES`), the PROXY protocol header they say it with
//! ([`header`], versions 1 and 2), and reading that header off a socket
//! without reading one byte past it, so that the TLS handshake or the
//! CONNECT that follows is untouched.
//!
//! The listener decides when these run (see `listener.rs`): a trusted peer
//! must open with a header; anyone else must not.

pub mod header;
mod trusted;

pub use header::{Header, HeaderError, MAX_HEADER};
pub use trusted::{BadTrustedProxy, TrustedProxies, MAX_TRUSTED_BLOCKS};

use header::Parsed;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Why no header was taken from a trusted peer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("closed before the PROXY header ended")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl ReadError {
    /// The `reason` label of `broker_sockets_dropped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::Header(e) => e.reason(),
            ReadError::Closed | ReadError::Io(_) => "proxy_header_closed",
        }
    }
}

/// Reads the PROXY header that opens `socket`, and nothing after it.
///
/// It peeks at what has arrived and consumes only bytes the parser says
/// belong to the header: all of them while it is incomplete, exactly its
/// length once it is whole. Each turn consumes at least one byte or ends,
/// and the header is at most [`MAX_HEADER`] bytes, so the loop is bounded;
/// the caller bounds it in time.
pub async fn read_header(socket: &mut TcpStream) -> Result<Header, ReadError> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut have = 0;
    loop {
        let room = buf.get_mut(have..).ok_or(HeaderError::TooLong)?;
        if room.is_empty() {
            return Err(HeaderError::TooLong.into());
        }
        let peeked = socket.peek(room).await?;
        if peeked == 0 {
            return Err(ReadError::Closed);
        }
        let seen = have + peeked;
        let parsed = header::parse(buf.get(..seen).unwrap_or_default())?;
        let (take, done) = match parsed {
            Parsed::Complete { len, header } => (len, Some(header)),
            Parsed::Incomplete => (seen, None),
        };
        // Consumes what was peeked (already in the socket's buffer).
        let consume = buf.get_mut(have..take).ok_or(HeaderError::TooLong)?;
        socket.read_exact(consume).await?;
        have = take;
        if let Some(header) = done {
            return Ok(header);
        }
    }
}

/// Whether the connection opens with (the start of) a PROXY header, looking
/// at its first bytes without consuming them. Waits for the first byte.
pub async fn opens_with_header(socket: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 12];
    let peeked = socket.peek(&mut first).await?;
    if peeked == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(header::looks_like_header(
        first.get(..peeked).unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// The header arrives in pieces, with the client's bytes right behind
    /// it in the last piece: the header is read, the client's bytes are not.
    #[tokio::test]
    async fn reads_the_header_in_pieces_and_nothing_after_it() {
        for header in [b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n".to_vec(), {
            let mut h = header::V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 7, 10, 0, 0, 1]);
            h.extend_from_slice(&56324u16.to_be_bytes());
            h.extend_from_slice(&1883u16.to_be_bytes());
            h
        }] {
            let (mut client, mut server) = pair().await;
            let reader = tokio::spawn(async move {
                let header = read_header(&mut server).await;
                let mut rest = [0u8; 4];
                server.read_exact(&mut rest).await.unwrap();
                (header, rest)
            });
            for piece in header.chunks(5) {
                let mut piece = piece.to_vec();
                if piece.len() < 5 {
                    piece.extend_from_slice(b"MQTT");
                }
                client.write_all(&piece).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            if header.len() % 5 == 0 {
                client.write_all(b"MQTT").await.unwrap();
            }
            let (header, rest) = reader.await.unwrap();
            assert_eq!(
                header.unwrap(),
                Header::Proxied {
                    source: "192.0.2.7:56324".parse().unwrap(),
                    destination: "10.0.0.1:1883".parse().unwrap(),
                }
            );
            assert_eq!(&rest, b"MQTT");
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_header_or_too_long() {
        let (mut client, mut server) = pair().await;
        client.write_all(&[0x10, 0x0c, 0, 4]).await.unwrap();
        let err = read_header(&mut server).await.unwrap_err();
        assert_eq!(err.reason(), "proxy_header_missing");

        let (mut client, mut server) = pair().await;
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 300));
        client.write_all(&long).await.unwrap();
        let err = read_header(&mut server).await.unwrap_err();
        assert_eq!(err.reason(), "proxy_header_too_long");

        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.unwrap();
        drop(client);
        let err = read_header(&mut server).await.unwrap_err();
        assert_eq!(err.reason(), "proxy_header_closed");
    }

    #[tokio::test]
    async fn sniffing_leaves_the_bytes_in_place() {
        let (mut client, mut server) = pair().await;
        client.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        assert!(!opens_with_header(&server).await.unwrap());
        let mut first = [0u8; 3];
        server.read_exact(&mut first).await.unwrap();
        assert_eq!(first, [0x16, 0x03, 0x01]);

        let (mut client, server) = pair().await;
        client.write_all(b"PROXY TCP4 ").await.unwrap();
        assert!(opens_with_header(&server).await.unwrap());
    }
}
