//! Real MQTT clients for tests (rumqttc, MQTT 5 and 3.1.1, over TLS or plain
//! TCP) whose event loops run on their own task and report every event to
//! the test through a channel, with helpers that wait for a packet kind.

use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a helper waits for an expected packet.
pub const WAIT: Duration = Duration::from_secs(10);

/// What a client's event loop reported.
#[derive(Debug)]
pub enum Seen<P, E> {
    Packet(P),
    Error(E),
}

fn tls_transport(ca_file: &Path) -> rumqttc::Transport {
    let config = sdk::tls::client_config_trusting(ca_file).expect("client tls");
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
}

/// Where and how a test client connects.
#[derive(Clone)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    /// `Some` = TLS trusting this CA; `None` = plain TCP.
    pub ca_file: Option<&'a Path>,
}

/// The values of the MQTT 5 user property `name` on `publish`.
pub fn user_property<'a>(publish: &'a p5::Publish, name: &str) -> Vec<&'a str> {
    publish
        .properties
        .as_ref()
        .map(|p| {
            p.user_properties
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// `user_properties` without the broker's `token_iat` stamp, which must be
/// there exactly once as a decimal number (its value is the test token's
/// `iat`, a moment of the run): for tests that compare the rest exactly.
pub fn without_token_iat(user_properties: &[(String, String)]) -> Vec<(String, String)> {
    let stamps: Vec<&str> = user_properties
        .iter()
        .filter(|(k, _)| k == protocol::topics::TOKEN_IAT_PROPERTY)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(stamps.len(), 1, "one token_iat stamp: {user_properties:?}");
    assert!(
        stamps.iter().all(|v| v.parse::<u64>().is_ok()),
        "token_iat is a number: {user_properties:?}"
    );
    user_properties
        .iter()
        .filter(|(k, _)| k != protocol::topics::TOKEN_IAT_PROPERTY)
        .cloned()
        .collect()
}

/// What tests need to know about one protocol version's packets.
pub trait Flavor {
    type Packet: std::fmt::Debug + Send + 'static;
    type ConnAck: std::fmt::Debug;
    /// The CONNACK, if `packet` is one.
    fn connack(packet: Self::Packet) -> Result<Self::ConnAck, Self::Packet>;
    /// Whether the CONNACK accepts the connection.
    fn accepted(ack: &Self::ConnAck) -> bool;
    /// The topic, if `packet` is a PUBLISH.
    fn publish_topic(packet: &Self::Packet) -> Option<String>;
}

/// MQTT 5 (rumqttc::v5).
pub enum Mqtt5 {}
/// MQTT 3.1.1 (rumqttc).
pub enum Mqtt311 {}

impl Flavor for Mqtt5 {
    type Packet = p5::Packet;
    type ConnAck = p5::ConnAck;
    fn connack(packet: p5::Packet) -> Result<p5::ConnAck, p5::Packet> {
        match packet {
            p5::Packet::ConnAck(ack) => Ok(ack),
            other => Err(other),
        }
    }
    fn accepted(ack: &p5::ConnAck) -> bool {
        ack.code == p5::ConnectReturnCode::Success
    }
    fn publish_topic(packet: &p5::Packet) -> Option<String> {
        match packet {
            p5::Packet::Publish(p) => Some(String::from_utf8_lossy(&p.topic).into_owned()),
            _ => None,
        }
    }
}

impl Flavor for Mqtt311 {
    type Packet = rumqttc::Packet;
    type ConnAck = rumqttc::ConnAck;
    fn connack(packet: rumqttc::Packet) -> Result<rumqttc::ConnAck, rumqttc::Packet> {
        match packet {
            rumqttc::Packet::ConnAck(ack) => Ok(ack),
            other => Err(other),
        }
    }
    fn accepted(ack: &rumqttc::ConnAck) -> bool {
        ack.code == rumqttc::ConnectReturnCode::Success
    }
    fn publish_topic(packet: &rumqttc::Packet) -> Option<String> {
        match packet {
            rumqttc::Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        }
    }
}

/// A test client: the library's client handle, and every event its event
/// loop (on its own task) saw.
pub struct Client<C, F: Flavor> {
    pub client: C,
    pub events: mpsc::UnboundedReceiver<Seen<F::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

/// An MQTT 5 client.
pub type V5Client = Client<v5::AsyncClient, Mqtt5>;
/// An MQTT 3.1.1 client.
pub type V4Client = Client<rumqttc::AsyncClient, Mqtt311>;

impl<C, F: Flavor> Client<C, F> {
    /// Waits for the next packet matching `pick`, skipping others.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&F::Packet) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Seen::Packet(packet))) => {
                    if let Some(found) = pick(&packet) {
                        return found;
                    }
                }
                Ok(Some(Seen::Error(e))) => panic!("waiting for {what}: connection error: {e}"),
                Ok(None) => panic!("waiting for {what}: event loop ended"),
                Err(_) => panic!("waiting for {what}: timed out"),
            }
        }
    }

    /// Waits for CONNACK; a refusal comes back as the client's error text.
    pub async fn connack(&mut self) -> Result<F::ConnAck, String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Seen::Packet(packet))) => {
                    if let Ok(ack) = F::connack(packet) {
                        return Ok(ack);
                    }
                }
                Ok(Some(Seen::Error(e))) => return Err(e),
                Ok(None) => return Err("event loop ended".into()),
                Err(_) => return Err("timed out waiting for CONNACK".into()),
            }
        }
    }

    /// Waits for a successful CONNACK.
    pub async fn connected(&mut self) -> F::ConnAck {
        match self.connack().await {
            Ok(ack) if F::accepted(&ack) => ack,
            other => panic!("expected a successful CONNACK, got {other:?}"),
        }
    }

    /// Next event within `within`, if any (for asserting nothing arrives).
    pub async fn next_within(&mut self, within: Duration) -> Option<Seen<F::Packet, String>> {
        tokio::time::timeout(within, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Asserts that no PUBLISH arrives within `within`.
    pub async fn assert_no_publish(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Seen::Packet(packet) = event {
                if let Some(topic) = F::publish_topic(&packet) {
                    panic!("unexpected publish on {topic}");
                }
            }
        }
    }
}

impl<C, F: Flavor> Drop for Client<C, F> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs an event loop on its own task, reporting every incoming packet and
/// the error that ends it (a refused or closed client is done: no reconnect).
macro_rules! spawn_event_loop {
    ($eventloop:expr, $incoming:path) => {{
        let mut eventloop = $eventloop;
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok($incoming(packet)) => {
                        if tx.send(Seen::Packet(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Error(e.to_string()));
                        return;
                    }
                }
            }
        });
        (events, task)
    }};
}

impl V5Client {
    /// Connects with `username`/`password`; `configure` may adjust options.
    pub fn connect(
        target: Target<'_>,
        client_id: &str,
        username: &str,
        password: &str,
        configure: impl FnOnce(&mut v5::MqttOptions),
    ) -> Self {
        let mut options = v5::MqttOptions::new(client_id, "127.0.0.1", target.addr.port());
        options.set_credentials(username, password);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_outgoing_inflight_upper_limit(100);
        if let Some(ca) = target.ca_file {
            options.set_transport(tls_transport(ca));
        }
        configure(&mut options);
        let (client, eventloop) = v5::AsyncClient::new(options, 100);
        let (events, task) = spawn_event_loop!(eventloop, v5::Event::Incoming);
        Client {
            client,
            events,
            task,
        }
    }

    pub async fn suback(&mut self) -> p5::SubAck {
        self.wait_for("SUBACK", |p| match p {
            p5::Packet::SubAck(ack) => Some(ack.clone()),
            _ => None,
        })
        .await
    }

    pub async fn puback(&mut self) -> p5::PubAck {
        self.wait_for("PUBACK", |p| match p {
            p5::Packet::PubAck(ack) => Some(ack.clone()),
            _ => None,
        })
        .await
    }

    pub async fn publish_received(&mut self) -> p5::Publish {
        self.wait_for("PUBLISH", |p| match p {
            p5::Packet::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .await
    }

    /// Subscribes to one filter and returns its SUBACK reason.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: v5::mqttbytes::QoS,
    ) -> p5::SubscribeReasonCode {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue subscribe");
        let ack = self.suback().await;
        ack.return_codes[0]
    }

    /// Waits until the connection ends and returns what ended it.
    pub async fn closed(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Seen::Error(e))) => return e,
                Ok(Some(Seen::Packet(p5::Packet::Disconnect(d)))) => {
                    return format!("DISCONNECT {:?}", d.reason_code)
                }
                Ok(Some(Seen::Packet(_))) => {}
                Ok(None) => return "event loop ended".into(),
                Err(_) => panic!("connection did not close"),
            }
        }
    }
}

impl V4Client {
    /// Connects with `username`/`password`; `configure` may adjust options.
    pub fn connect(
        target: Target<'_>,
        client_id: &str,
        username: &str,
        password: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Self {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", target.addr.port());
        options.set_credentials(username, password);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(ca) = target.ca_file {
            options.set_transport(tls_transport(ca));
        }
        configure(&mut options);
        let (client, eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (events, task) = spawn_event_loop!(eventloop, rumqttc::Event::Incoming);
        Client {
            client,
            events,
            task,
        }
    }

    pub async fn suback(&mut self) -> rumqttc::SubAck {
        self.wait_for("SUBACK", |p| match p {
            rumqttc::Packet::SubAck(ack) => Some(ack.clone()),
            _ => None,
        })
        .await
    }

    pub async fn publish_received(&mut self) -> rumqttc::Publish {
        self.wait_for("PUBLISH", |p| match p {
            rumqttc::Packet::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .await
    }
}
