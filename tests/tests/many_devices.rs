//! A thousand authenticated devices over TLS, each subscribed to its own reply
//! topic: every one sends a command, the handler answers each sender by the
//! verified `user_id`, and every device receives exactly its own reply.

use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY};
use futures::future::join_all;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

const DEVICES: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_each_get_only_their_own_replies() {
    let broker = TestBroker::start().await;
    let tls = Target {
        addr: broker.tls_addr,
        ca_file: Some(&broker.ca_file),
    };
    let mut handler = V5Client::connect(tls.clone(), "echo", "handler", TEST_HANDLER_KEY, |o| {
        o.set_outgoing_inflight_upper_limit(1000);
    });
    handler.connected().await;
    handler.subscribe("sync", QoS::AtLeastOnce).await;

    // Connect and subscribe every device (in batches, to keep handshakes flowing).
    let mut devices = Vec::with_capacity(DEVICES);
    for batch in (0..DEVICES).collect::<Vec<_>>().chunks(100) {
        let connecting = batch.iter().map(|i| {
            let uid = format!("u{i}");
            let token = broker.token(&uid);
            let tls = tls.clone();
            async move {
                let mut d = V5Client::connect(tls, "phone", "JWT", &token, |_| {});
                d.connected().await;
                let code = d.subscribe(&format!("{uid}_sync"), QoS::AtLeastOnce).await;
                assert_eq!(
                    code,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    "{uid}"
                );
                (uid, d)
            }
        });
        devices.extend(join_all(connecting).await);
    }

    // Every device sends one command; the handler replies by verified identity.
    for (uid, d) in &devices {
        d.client
            .publish("sync", QoS::AtLeastOnce, false, format!("from {uid}"))
            .await
            .unwrap();
    }
    for _ in 0..DEVICES {
        let command = handler.publish_received().await;
        let uid = command
            .properties
            .as_ref()
            .and_then(|p| p.user_properties.iter().find(|(k, _)| k == "user_id"))
            .map(|(_, v)| v.clone())
            .expect("user_id stamped");
        assert_eq!(&command.payload[..], format!("from {uid}").as_bytes());
        handler
            .client
            .publish(
                format!("{uid}_sync"),
                QoS::AtLeastOnce,
                false,
                format!("for {uid}"),
            )
            .await
            .unwrap();
    }

    let checks = devices.into_iter().map(|(uid, mut d)| async move {
        let reply = d.publish_received().await;
        assert_eq!(reply.topic, format!("{uid}_sync"));
        assert_eq!(&reply.payload[..], format!("for {uid}").as_bytes());
        // Nothing else arrives: no one else's reply, no duplicate.
        while let Some(event) = d.next_within(Duration::from_millis(200)).await {
            if let e2e::clients::Seen::Packet(Packet::Publish(p)) = event {
                panic!("{uid} received an extra publish on {:?}", p.topic);
            }
        }
    });
    join_all(checks).await;
    broker.shutdown().await;
}
