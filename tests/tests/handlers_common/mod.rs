//! Helpers for the handler end-to-end tests: a device that plays the mobile
//! app over TLS, and settings for the built-in handlers against a
//! `TestBroker`. The fake platform and the throwaway `redis-server` are in
//! `testkit`.
#![allow(dead_code)]

use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY};
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

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
        // These tests forward without a stored user token.
        "PLATFORM_SMS_TOKEN" => Some("optional".into()),
        "GATEWAYS" => Some("+237600000000,+15550000000".into()),
        _ => None,
    })
    .unwrap();
    s.broker_url = format!("mqtts://127.0.0.1:{}", broker.tls_addr.port());
    s.broker_ca = Some(broker.ca_file.clone());
    s.handler_key = TEST_HANDLER_KEY.into();
    s.data_dir = data_dir.to_owned();
    if redis_url.is_some() {
        // Processes sharing Redis seal platform tokens under one configured
        // key, as an operator sets TOKENS_MASTER_KEY (none is made up).
        s.tokens_master_key =
            Some(handlers::tokens::MasterKey::parse(&"5e".repeat(32)).expect("a 32-byte key"));
    }
    s.redis_url = redis_url.map(Into::into);
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
