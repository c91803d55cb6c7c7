//! Helpers for the handler end-to-end tests: a fake platform (a tiny HTTP/1.1
//! server on 127.0.0.1:0 that records requests and can fail or hang), a
//! throwaway `redis-server`, a device that plays the mobile app over TLS, and
//! starting the built-in handlers against a `TestBroker`.
#![allow(dead_code)]

use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY};
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One request the platform received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub body: Value,
}

/// How the platform answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Status(u16),
    Hang,
}

/// A fake platform endpoint.
pub struct Platform {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Platform {
    pub async fn start() -> Platform {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let mode = Arc::new(Mutex::new(Mode::Ok));
        let (r, m) = (received.clone(), mode.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, m) = (r.clone(), m.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, r, m).await;
                });
            }
        });
        Platform {
            addr,
            received,
            mode,
            task,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let (mut length, mut key) = (0usize, None);
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "idempotency-key" => key = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).await?;
        received.lock().unwrap().push(Received {
            path,
            idempotency_key: key,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        let mode = *mode.lock().unwrap();
        let status = match mode {
            Mode::Ok => "200 OK",
            Mode::Status(500) => "500 Internal Server Error",
            Mode::Status(_) => "400 Bad Request",
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
        };
        let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        reader.get_mut().write_all(response.as_bytes()).await?;
    }
}

/// A running `redis-server` on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// `None` (and a note) when redis-server is not installed.
    pub fn start() -> Option<RedisServer> {
        if !Path::new("/usr/bin/redis-server").exists() {
            eprintln!("redis-server not installed: skipping");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer PING");
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Settings for handlers connecting to `broker` over TLS, with the platform
/// `sms` at `platform_url`.
pub fn settings(
    broker: &TestBroker,
    data_dir: &Path,
    redis_url: Option<String>,
    platform_url: &str,
) -> handlers::Settings {
    let mut s = handlers::Settings::from_lookup(|var| match var {
        "PLATFORMS" => Some(format!("sms={platform_url}")),
        "GATEWAYS" => Some("+237600000000,+15550000000".into()),
        _ => None,
    })
    .unwrap();
    s.broker_url = format!("mqtts://127.0.0.1:{}", broker.tls_addr.port());
    s.broker_ca = Some(broker.ca_file.clone());
    s.handler_key = TEST_HANDLER_KEY.into();
    s.data_dir = data_dir.to_owned();
    s.redis_url = redis_url;
    s.publish_timeout = Duration::from_millis(400);
    s.publish_retries = 1;
    s
}

/// A device: a TLS MQTT 5 client logged in with a token for `uid`.
pub struct Device {
    pub uid: String,
    pub client: V5Client,
}

impl Device {
    pub async fn connect(broker: &TestBroker, uid: &str) -> Device {
        let target = Target {
            addr: broker.tls_addr,
            ca_file: Some(&broker.ca_file),
        };
        let id = format!("phone-{uid}-{}", rand::random::<u32>());
        let mut client = V5Client::connect(target, &id, "JWT", &broker.token(uid), |_| {});
        client.connected().await;
        Device {
            uid: uid.to_owned(),
            client,
        }
    }

    /// Subscribes to `<uid>_<name>` for each name.
    pub async fn subscribe(&mut self, names: &[&str]) {
        for name in names {
            let topic = format!("{}_{name}", self.uid);
            assert_eq!(
                self.client.subscribe(&topic, QoS::AtLeastOnce).await,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                "{topic}"
            );
        }
    }

    pub async fn send(&self, topic: &str, body: Value) {
        self.send_raw(topic, serde_json::to_vec(&body).unwrap())
            .await;
    }

    pub async fn send_raw(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// The next message on one of this device's reply topics: (name, body).
    pub async fn reply(&mut self) -> (String, Value) {
        let publish = self.client.publish_received().await;
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let name = topic
            .strip_prefix(&format!("{}_", self.uid))
            .unwrap_or_else(|| panic!("{} got a message on {topic}", self.uid))
            .to_owned();
        (name, serde_json::from_slice(&publish.payload).unwrap())
    }

    /// The next reply, which must come on `<uid>_<name>`.
    pub async fn reply_on(&mut self, name: &str) -> Value {
        let (got, body) = self.reply().await;
        assert_eq!(got, name, "reply {body}");
        body
    }

    /// Waits until the handler serving `topic` answers (an empty command
    /// gets a reply or an error reply on `<uid>_<reply>`, to which this
    /// device must be subscribed). Handlers subscribe asynchronously after
    /// connecting, and a command published before that reaches no one.
    pub async fn wait_for(&mut self, topic: &str, reply: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            self.send(topic, serde_json::json!({})).await;
            if self
                .wait_publish(Duration::from_millis(300))
                .await
                .is_some()
            {
                // Swallow late answers to earlier probes.
                while self
                    .wait_publish(Duration::from_millis(300))
                    .await
                    .is_some()
                {}
                return;
            }
        }
        panic!("no handler answered on {topic} (reply {reply})");
    }

    /// Waits for sync, publish and contacts (subscribes their reply topics).
    pub async fn wait_for_handlers(&mut self) {
        self.subscribe(&["sync", "publish", "contact_list"]).await;
        self.wait_for("sync", "sync").await;
        self.wait_for("publish", "publish").await;
        self.wait_for("get_contact_list", "contact_list").await;
    }

    async fn wait_publish(
        &mut self,
        within: Duration,
    ) -> Option<e2e::clients::Seen<rumqttc::v5::mqttbytes::v5::Packet, String>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.client.events.recv()).await {
                Ok(Some(e2e::clients::Seen::Packet(
                    p @ rumqttc::v5::mqttbytes::v5::Packet::Publish(_),
                ))) => return Some(e2e::clients::Seen::Packet(p)),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }
}
