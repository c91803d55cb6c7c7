//! Owns the sharded pub/sub connection: a plain RESP2 connection that sends
//! `SSUBSCRIBE`/`SUNSUBSCRIBE` and reads what the server pushes (`smessage`,
//! `ssubscribe`, `sunsubscribe`, errors such as `MOVED`). The `redis`
//! crate's pub/sub connection does not speak sharded pub/sub (it takes an
//! `ssubscribe` reply for a broken connection), and its cluster connection
//! does no pub/sub at all; this one is small and bounded instead: a frame
//! larger than [`MAX_FRAME_BYTES`] ends the connection.

use bytes::{Buf, Bytes, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest frame read (a wake-up carries one entry: the broker's packet cap
/// is far below this).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// How long connecting (and authenticating) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Value>>),
}

/// Why a frame cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("malformed frame")]
    Malformed,
    #[error("frame larger than {MAX_FRAME_BYTES} bytes")]
    TooLarge,
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("refused: {0}")]
    Refused(String),
}

/// Parses one value from the front of `buf`; `Ok(None)` when more bytes are
/// needed (nothing is consumed then).
pub fn parse(buf: &mut BytesMut) -> Result<Option<Value>, RespError> {
    let mut at = 0;
    match parse_at(buf, &mut at, 0)? {
        Some(value) => {
            buf.advance(at);
            Ok(Some(value))
        }
        None if buf.len() > MAX_FRAME_BYTES => Err(RespError::TooLarge),
        None => Ok(None),
    }
}

/// Nesting deeper than this is not something Redis sends to a subscriber.
const MAX_DEPTH: usize = 8;
/// Most elements of one array (a push has three).
const MAX_ELEMENTS: i64 = 1024;

fn parse_at(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Value>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Malformed);
    }
    let Some(line_end) = find_crlf(buf, *at) else {
        return Ok(None);
    };
    let kind = *buf.get(*at).ok_or(RespError::Malformed)?;
    let line = buf.get(*at + 1..line_end).ok_or(RespError::Malformed)?;
    let text = std::str::from_utf8(line).map_err(|_| RespError::Malformed)?;
    let next = line_end + 2;
    match kind {
        b'+' | b'-' | b':' => {
            *at = next;
            Ok(Some(match kind {
                b'+' => Value::Simple(text.to_owned()),
                b'-' => Value::Error(text.to_owned()),
                _ => Value::Int(text.parse().map_err(|_| RespError::Malformed)?),
            }))
        }
        b'$' => {
            let len: i64 = text.parse().map_err(|_| RespError::Malformed)?;
            if len < 0 {
                *at = next;
                return Ok(Some(Value::Bulk(None)));
            }
            let len = usize::try_from(len).map_err(|_| RespError::Malformed)?;
            if len > MAX_FRAME_BYTES {
                return Err(RespError::TooLarge);
            }
            let Some(body) = buf.get(next..next + len) else {
                return Ok(None);
            };
            match buf.get(next + len..next + len + 2) {
                None => return Ok(None),
                Some(b"\r\n") => {}
                Some(_) => return Err(RespError::Malformed),
            }
            *at = next + len + 2;
            Ok(Some(Value::Bulk(Some(Bytes::copy_from_slice(body)))))
        }
        b'*' => {
            let count: i64 = text.parse().map_err(|_| RespError::Malformed)?;
            if count < 0 {
                *at = next;
                return Ok(Some(Value::Array(None)));
            }
            if count > MAX_ELEMENTS {
                return Err(RespError::Malformed);
            }
            let mut cursor = next;
            let mut items = Vec::new();
            for _ in 0..count {
                match parse_at(buf, &mut cursor, depth + 1)? {
                    Some(item) => items.push(item),
                    None => return Ok(None),
                }
            }
            *at = cursor;
            Ok(Some(Value::Array(Some(items))))
        }
        _ => Err(RespError::Malformed),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// What the server pushed to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A message on a channel.
    Message { channel: Bytes, payload: Bytes },
    /// A subscription confirmed.
    Subscribed(Bytes),
    /// A subscription ended: asked for, or by the server (its slot moved).
    Unsubscribed(Bytes),
    /// An error reply (`MOVED <slot> <host:port>` when the slot is elsewhere).
    Error(String),
    /// Anything else (ignored).
    Other,
}

impl Push {
    pub fn from_value(value: Value) -> Push {
        let items = match value {
            Value::Error(text) => return Push::Error(text),
            Value::Array(Some(items)) => items,
            _ => return Push::Other,
        };
        let mut items = items.into_iter();
        let (Some(Value::Bulk(Some(kind))), Some(Value::Bulk(Some(channel)))) =
            (items.next(), items.next())
        else {
            return Push::Other;
        };
        match &kind[..] {
            b"smessage" | b"message" => match items.next() {
                Some(Value::Bulk(Some(payload))) => Push::Message { channel, payload },
                _ => Push::Other,
            },
            b"ssubscribe" => Push::Subscribed(channel),
            b"sunsubscribe" => Push::Unsubscribed(channel),
            _ => Push::Other,
        }
    }
}

/// A pub/sub connection to one Redis server.
pub struct PubSubConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl PubSubConn {
    /// Connects to `addr` (`host:port`), authenticating when `auth` names a
    /// password (and user).
    pub async fn connect(
        addr: &str,
        auth: Option<(Option<String>, String)>,
    ) -> Result<PubSubConn, RespError> {
        let connecting = async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut conn = PubSubConn {
                stream,
                buf: BytesMut::with_capacity(4096),
            };
            if let Some((user, password)) = auth {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = user {
                    auth.arg(user);
                }
                auth.arg(password);
                conn.stream.write_all(&auth.get_packed_command()).await?;
                match conn.read().await? {
                    Value::Simple(_) => {}
                    Value::Error(e) => return Err(RespError::Refused(e)),
                    _ => return Err(RespError::Malformed),
                }
            }
            Ok(conn)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| RespError::TimedOut)?
    }

    /// Sends `command` (`SSUBSCRIBE` or `SUNSUBSCRIBE`) for `channels`.
    pub async fn send(&mut self, command: &str, channels: &[String]) -> Result<(), RespError> {
        let mut cmd = redis::cmd(command);
        for channel in channels {
            cmd.arg(channel);
        }
        self.stream.write_all(&cmd.get_packed_command()).await?;
        Ok(())
    }

    /// The next value the server sends. Cancel-safe: bytes read stay in the
    /// buffer for the next call.
    pub async fn read(&mut self) -> Result<Value, RespError> {
        loop {
            if let Some(value) = parse(&mut self.buf)? {
                return Ok(value);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(RespError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::Bulk(Some(Bytes::copy_from_slice(text.as_bytes())))
    }

    #[test]
    fn frames_parse_whole_or_wait() {
        // (bytes) -> value, or None: more bytes needed
        let table: [(&[u8], Option<Value>); 9] = [
            (b"+OK\r\n", Some(Value::Simple("OK".into()))),
            (
                b"-MOVED 12 127.0.0.1:7001\r\n",
                Some(Value::Error("MOVED 12 127.0.0.1:7001".into())),
            ),
            (b":3\r\n", Some(Value::Int(3))),
            (b"$-1\r\n", Some(Value::Bulk(None))),
            (b"$5\r\nhello\r\n", Some(bulk("hello"))),
            (b"$5\r\nhel", None),
            (b"$5\r\nhello", None),
            (
                b"*3\r\n$8\r\nsmessage\r\n$6\r\nr:{42}\r\n$2\r\nhi\r\n",
                Some(Value::Array(Some(vec![
                    bulk("smessage"),
                    bulk("r:{42}"),
                    bulk("hi"),
                ]))),
            ),
            (b"*3\r\n$8\r\nsmessage\r\n$6\r\nr:{42}\r\n", None),
        ];
        for (bytes, expected) in table {
            let mut buf = BytesMut::from(bytes);
            let got = parse(&mut buf).unwrap();
            assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(bytes));
            if got.is_none() {
                assert_eq!(buf.len(), bytes.len(), "nothing consumed");
            } else {
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let too_big = format!("${}\r\n", MAX_FRAME_BYTES + 1);
        for bytes in [
            &b"?x\r\n"[..],
            b"$5\r\nhelloXX",
            b":x\r\n",
            too_big.as_bytes(),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert!(
                parse(&mut buf).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn pushes() {
        let push = |items: Vec<Value>| Push::from_value(Value::Array(Some(items)));
        let channel = Bytes::from_static(b"r:{42}");
        // (what the server sent) -> push
        let table = [
            (
                push(vec![bulk("smessage"), bulk("r:{42}"), bulk("x")]),
                Push::Message {
                    channel: channel.clone(),
                    payload: Bytes::from_static(b"x"),
                },
            ),
            (
                push(vec![bulk("ssubscribe"), bulk("r:{42}"), Value::Int(1)]),
                Push::Subscribed(channel.clone()),
            ),
            (
                push(vec![bulk("sunsubscribe"), bulk("r:{42}"), Value::Int(0)]),
                Push::Unsubscribed(channel),
            ),
            (
                Push::from_value(Value::Error("MOVED 1 h:1".into())),
                Push::Error("MOVED 1 h:1".into()),
            ),
            (push(vec![bulk("pong")]), Push::Other),
        ];
        for (got, expected) in table {
            assert_eq!(got, expected);
        }
    }
}
