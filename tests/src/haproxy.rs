//! A real HAProxy (Debian's `haproxy`) in front of a test broker, started
//! from a configuration the test writes, in the foreground as a child
//! process, and killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// A running HAProxy.
pub struct HaProxy {
    child: Child,
    _dir: tempfile::TempDir,
}

/// A loopback port free a moment ago (bound, read, released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// The `haproxy` binary, or `None` when it is not installed.
pub fn binary() -> Option<PathBuf> {
    [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl HaProxy {
    /// Starts HAProxy with `sections` (frontends and backends) after a
    /// minimal `global`/`defaults` in TCP mode (a section may say `mode
    /// http`), and waits until every
    /// address in `listening` accepts connections (10 s at most). The probes
    /// come from [`PROBE_SOURCE`], so that the connections HAProxy relays
    /// for them spend no admission budget of the addresses a test watches.
    pub async fn start(sections: &str, listening: &[SocketAddr]) -> HaProxy {
        let binary = binary().expect("haproxy is installed (apt-get install -y haproxy)");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("haproxy.cfg");
        let text = format!(
            "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n{sections}\n"
        );
        std::fs::write(&config, text).expect("write haproxy.cfg");
        let check = Command::new(&binary)
            .arg("-c")
            .arg("-f")
            .arg(&config)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refuses the configuration: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&binary)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let proxy = HaProxy { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in listening {
            loop {
                if probe(*addr).await {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "haproxy is not listening on {addr}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        proxy
    }
}

/// Where readiness probes connect from.
pub const PROBE_SOURCE: [u8; 4] = [127, 0, 0, 254];

/// Whether `addr` accepts a connection from [`PROBE_SOURCE`].
async fn probe(addr: SocketAddr) -> bool {
    let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
        return false;
    };
    if socket.bind(SocketAddr::from((PROBE_SOURCE, 0))).is_err() {
        return false;
    }
    socket.connect(addr).await.is_ok()
}

/// A TCP connection to `to` from the loopback address `from` (any of
/// 127.0.0.0/8 on Linux), so that a test can be several clients, a proxy
/// or a stranger on one machine.
pub async fn connect_from(from: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    socket.connect(to).await.expect("connect")
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
