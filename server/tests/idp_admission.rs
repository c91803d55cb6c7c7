//! The in-process identity service keeps the broker's discipline, over the
//! wire against the real `broker` binary (default run: built-in handlers,
//! the identity service on its own loopback port):
//!
//! - idle connections from one source beyond its cap are closed at once,
//!   while others (another loopback address) are served, the MQTT TLS
//!   listener completes a handshake and CONNECT, and `/healthz` answers;
//! - under a small open-file limit, hundreds of idle connections from many
//!   sources cannot take the MQTT listener's descriptors: beyond the total
//!   cap they are closed, MQTT still connects, the broker's `/healthz`
//!   answers, and the held ones go at the header deadline;
//! - a connection that sends no complete request head is closed at the
//!   header deadline (silent, partial head, kept alive after a response),
//!   and one that stalls its body at the idle deadline.
//!
//! Linux routes all of 127.0.0.0/8 to loopback, so binding a client to
//! 127.0.0.x makes it another source.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The running binary, killed when dropped.
struct Broker {
    child: Child,
    idp: SocketAddr,
    tls: SocketAddr,
    metrics: SocketAddr,
    ca: PathBuf,
    token: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// Starts the binary with development defaults on ports 0 and `env`;
    /// under `open_files` as both soft and hard limit when given.
    fn start(env: &[(&str, &str)], open_files: Option<u32>) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        let mut command = match open_files {
            Some(limit) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\""))
                    .arg(env!("CARGO_BIN_EXE_broker"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_broker")),
        };
        command
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .env("BROKER_DEV_DIR", dir.path().join("dev"))
            .env("DATA_DIR", dir.path().join("data"))
            .env("IDP_LISTEN", "127.0.0.1:0")
            .env("IDP_KEYS_DIR", dir.path().join("keys"))
            .env("BROKER_WORKER_THREADS", "1")
            .env("RUST_LOG", "info,mqtt_router=warn");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads to the end: a closed pipe would fail the broker's next print.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut idp, mut tls, mut metrics, mut ca, mut token) = (None, None, None, None, None);
        let mut token_next = false;
        let mut seen = Vec::new();
        while idp.is_none() || token.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!(
                    "no banner; got:\n{}\nlog:\n{}",
                    seen.join("\n"),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            };
            let addr_after = |prefix: &str, end: &str| -> Option<SocketAddr> {
                let rest = line.split(prefix).nth(1)?;
                rest.split(end).next()?.trim().parse().ok()
            };
            if token_next {
                token = Some(line.trim().to_owned());
                token_next = false;
            } else if line.contains("TLS on ") {
                tls = addr_after("TLS on ", " ");
            } else if line.contains("metrics on http://") {
                metrics = addr_after("metrics on http://", "/");
            } else if let Some(path) = line.strip_prefix("development certificate authority: ") {
                ca = Some(PathBuf::from(path.trim()));
            } else if line.starts_with("demo device token") {
                token_next = true;
            } else if line.starts_with("identity service (in-process): http://") {
                idp = addr_after("identity service (in-process): http://", " ");
            }
            seen.push(line);
        }
        Broker {
            child,
            idp: idp.unwrap(),
            tls: tls.expect("TLS address in the banner"),
            metrics: metrics.expect("metrics address in the banner"),
            ca: ca.expect("CA in the banner"),
            token: token.unwrap(),
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A TLS handshake and an MQTT v5 CONNECT with the demo token: the
    /// CONNACK's reason code, or what failed.
    async fn mqtt_connect(&self, client_id: &str) -> Result<u8, String> {
        let config = sdk::tls::client_config_trusting(&self.ca).map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let attempt = async {
            let tcp = TcpStream::connect(self.tls)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            tls.write_all(&connect_packet(client_id, &self.token))
                .await
                .map_err(|e| format!("CONNECT: {e}"))?;
            let mut head = [0u8; 2];
            tls.read_exact(&mut head)
                .await
                .map_err(|e| format!("CONNACK: {e}"))?;
            if head[0] != 0x20 {
                return Err(format!("not a CONNACK: {head:?}"));
            }
            let mut rest = vec![0u8; usize::from(head[1])];
            tls.read_exact(&mut rest)
                .await
                .map_err(|e| format!("CONNACK: {e}"))?;
            Ok(rest[1])
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .map_err(|_| "no CONNACK within 10 s".to_owned())?
    }
}

/// MQTT v5 CONNECT: clean start, username `JWT`, the token as password.
fn connect_packet(client_id: &str, token: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0b1100_0010, 0, 60, 0];
    for field in [client_id.as_bytes(), b"JWT", token.as_bytes()] {
        body.extend_from_slice(&u16::try_from(field.len()).unwrap().to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

fn loopback(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Whether the server has closed `stream` (end of stream or reset), judged
/// within `within`.
async fn is_closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

/// How many of `streams` are closed, once at least `want` are or `within` passes.
async fn closed_count(streams: &mut [TcpStream], want: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut closed = vec![false; streams.len()];
    loop {
        for (stream, closed) in streams.iter_mut().zip(closed.iter_mut()) {
            if !*closed {
                *closed = is_closed(stream, Duration::from_millis(5)).await;
            }
        }
        let count = closed.iter().filter(|c| **c).count();
        if count >= want || Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` from `from` on a fresh connection: the status line and body.
async fn http_get(from: IpAddr, to: SocketAddr, path: &str) -> Result<String, String> {
    let attempt = async {
        let mut stream = connect_from(from, to).await;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

fn assert_ok(response: &Result<String, String>, what: &str, broker: &Broker) {
    match response {
        Ok(text) if text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n") => {}
        other => panic!("{what}: {other:?}\nlog:\n{}", broker.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_a_sources_cap_are_closed_and_others_are_served() {
    let broker = Broker::start(&[], None);
    let flooder = loopback(0, 0, 5);
    let per_source = 16; // IDP_MAX_CONNECTIONS_PER_SOURCE's default
    let mut flood = Vec::new();
    for _ in 0..per_source * 3 {
        flood.push(connect_from(flooder, broker.idp).await);
    }
    // The excess is closed at accept, at once.
    let closed = closed_count(&mut flood, per_source * 2, Duration::from_secs(3)).await;
    assert_eq!(
        closed,
        per_source * 2,
        "idle connections beyond the per-source cap must be closed promptly\nlog:\n{}",
        broker.log()
    );
    // The source's first ones are held (until the header deadline, 10 s).
    let mut open = 0;
    for stream in &mut flood {
        if !is_closed(stream, Duration::from_millis(5)).await {
            open += 1;
        }
    }
    assert_eq!(open, per_source);
    // Another connection from the flooding source is closed at once...
    let mut more = connect_from(flooder, broker.idp).await;
    assert!(is_closed(&mut more, Duration::from_secs(2)).await);
    // ...while the rest of the machine is served: the identity service from
    // other loopback sources, the MQTT TLS listener, the broker's /healthz.
    assert_ok(
        &http_get(loopback(0, 0, 1), broker.idp, "/healthz").await,
        "the identity service's /healthz from 127.0.0.1",
        &broker,
    );
    let jwks = http_get(loopback(0, 0, 2), broker.idp, "/.well-known/jwks.json").await;
    assert!(
        jwks.as_deref()
            .is_ok_and(|t| t.starts_with("HTTP/1.1 200") && t.contains("\"keys\"")),
        "JWKS from 127.0.0.2: {jwks:?}"
    );
    assert_eq!(
        broker.mqtt_connect("idp-flood-1").await,
        Ok(0),
        "{}",
        broker.log()
    );
    assert_ok(
        &http_get(loopback(0, 0, 1), broker.metrics, "/healthz").await,
        "the broker's /healthz",
        &broker,
    );
    assert!(
        broker.log().contains("too_many_from_source"),
        "the refusals are logged\n{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_take_the_mqtt_listeners_descriptors() {
    // 400 descriptors in all: the identity service may take 48, hundreds
    // of idle connections from 38 sources are offered to it.
    let broker = Broker::start(
        &[
            ("IDP_MAX_CONNECTIONS", "48"),
            ("IDP_HEADER_READ_TIMEOUT_SECS", "8"),
        ],
        Some(400),
    );
    let started = Instant::now();
    let mut flood = Vec::new();
    let mut stopped = None;
    'flood: for source in 1..=38u8 {
        for _ in 0..16 {
            // A connect that is not even queued (past a SYN retransmit, 1 s)
            // means the service stopped accepting (out of descriptors): the
            // flood has done its worst.
            let socket = TcpSocket::new_v4().unwrap();
            socket
                .bind(SocketAddr::new(loopback(0, 1, source), 0))
                .unwrap();
            match tokio::time::timeout(Duration::from_secs(3), socket.connect(broker.idp)).await {
                Ok(Ok(stream)) => flood.push(stream),
                other => {
                    stopped = Some(format!("{other:?}"));
                    break 'flood;
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The MQTT listener still has its descriptors: handshake and CONNECT.
    let mqtt = broker.mqtt_connect("idp-flood-2").await;
    assert_eq!(mqtt, Ok(0), "MQTT under the flood\nlog:\n{}", broker.log());
    assert_ok(
        &http_get(loopback(0, 0, 1), broker.metrics, "/healthz").await,
        "the broker's /healthz under the flood",
        &broker,
    );
    // Everything beyond the total cap was closed at accept; the broker's own
    // JWKS client may hold one of the 48 slots.
    let total = flood.len();
    assert_eq!(
        total,
        38 * 16,
        "every connection of the flood is accepted (and closed); stopped by {stopped:?}\nlog:\n{}",
        broker.log()
    );
    let closed = closed_count(&mut flood, total - 48, Duration::from_secs(3)).await;
    assert!(
        (total - 48..=total - 47).contains(&closed),
        "{closed} of {total} closed; the total cap is 48\nlog:\n{}",
        broker.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "checked before the header deadline (8 s), after {:?}",
        started.elapsed()
    );
    assert!(
        broker.log().contains("too_many_connections"),
        "{}",
        broker.log()
    );
    // The held ones go at the header deadline, and the service answers again.
    let all_closed = closed_count(&mut flood, total, Duration::from_secs(12)).await;
    assert_eq!(
        all_closed, total,
        "held idle connections end at the header deadline"
    );
    assert_ok(
        &http_get(loopback(0, 0, 1), broker.idp, "/healthz").await,
        "the identity service's /healthz after the flood",
        &broker,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_head_or_a_moving_body_are_closed_at_their_deadlines() {
    let broker = Broker::start(
        &[
            ("IDP_HEADER_READ_TIMEOUT_SECS", "1"),
            ("IDP_IDLE_TIMEOUT_SECS", "2"),
        ],
        None,
    );
    let from = loopback(0, 0, 7);
    let started = Instant::now();
    // Silent from the start.
    let mut silent = connect_from(from, broker.idp).await;
    // Half a request head, then nothing.
    let mut partial = connect_from(from, broker.idp).await;
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    assert!(
        is_closed(&mut silent, Duration::from_secs(4)).await,
        "a silent connection"
    );
    assert!(
        is_closed(&mut partial, Duration::from_secs(4)).await,
        "a partial request head"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed at the 1 s header deadline, after {took:?}"
    );

    // Kept alive after a response, then silent: the header deadline again.
    let mut kept = connect_from(from, broker.idp).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 512];
    while !response.ends_with(b"ok\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "closed before answering");
        response.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    assert!(
        is_closed(&mut kept, Duration::from_secs(4)).await,
        "an idle kept-alive connection"
    );
    assert!(answered.elapsed() >= Duration::from_millis(800));

    // A complete head, then a body that stops: the idle deadline.
    let mut stalled = connect_from(from, broker.idp).await;
    stalled
        .write_all(
            b"POST /register HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"msisdn\":",
        )
        .await
        .unwrap();
    let sent = Instant::now();
    assert!(
        is_closed(&mut stalled, Duration::from_secs(5)).await,
        "a stalled body"
    );
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "closed by the 2 s idle deadline, not the header one: {took:?}"
    );

    // Others were served all along.
    assert_ok(
        &http_get(loopback(0, 0, 1), broker.idp, "/healthz").await,
        "the identity service's /healthz",
        &broker,
    );
}

#[test]
fn an_identity_cap_that_does_not_fit_the_open_file_limit_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("broker.log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 300 && exec \"$0\"")
        .arg(env!("CARGO_BIN_EXE_broker"))
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BROKER_TLS_LISTEN", "127.0.0.1:0")
        .env("BROKER_DEV_DIR", dir.path().join("dev"))
        .env("DATA_DIR", dir.path().join("data"))
        .env("IDP_LISTEN", "127.0.0.1:0")
        .env("IDP_KEYS_DIR", dir.path().join("keys"))
        .env("IDP_MAX_CONNECTIONS", "256")
        .env("BROKER_WORKER_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "started anyway ({status:?}):\n{err}"
    );
    assert!(
        err.contains("IDP_MAX_CONNECTIONS=256 does not fit the open-file limit of 300")
            && err.contains("lower IDP_MAX_CONNECTIONS to at most 86")
            && err.contains("ulimit -n"),
        "{err}"
    );
}
