//! The back-end description's scenario shapes through the real broker over
//! TLS: a device publishes a command, a handler receives it with the verified
//! `user_id`, replies on `<uid>_<name>`, and only that user receives it.

use e2e::clients::user_property;
use e2e::clients::{Target, V4Client, V5Client};
use e2e::{TestBroker, TEST_HANDLER_KEY};
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

#[tokio::test]
async fn request_contact_reaches_the_handler_with_identity_and_only_the_target_gets_the_reply() {
    let broker = TestBroker::start().await;
    let tls = Target {
        addr: broker.tls_addr,
        ca_file: Some(&broker.ca_file),
    };

    let mut handler = V5Client::connect(
        tls.clone(),
        "contacts-1",
        "handler",
        TEST_HANDLER_KEY,
        |_| {},
    );
    handler.connected().await;
    assert_eq!(
        handler
            .subscribe("$share/contacts/request_contact", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    let mut requester =
        V5Client::connect(tls.clone(), "phone", "JWT", &broker.token("68946"), |_| {});
    requester.connected().await;
    assert_eq!(
        requester
            .subscribe("68946_contact_approved", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut target = V5Client::connect(tls.clone(), "phone", "JWT", &broker.token("23412"), |_| {});
    target.connected().await;
    assert_eq!(
        target
            .subscribe("23412_contact_requested", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    requester
        .client
        .publish(
            "request_contact",
            QoS::AtLeastOnce,
            false,
            r#"{"contact_id":"23412"}"#,
        )
        .await
        .unwrap();
    assert_eq!(
        requester.puback().await.reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::Success
    );

    let command = handler.publish_received().await;
    assert_eq!(command.topic, "request_contact");
    assert_eq!(user_property(&command, "user_id"), vec!["68946"]);
    assert_eq!(user_property(&command, "client_id"), vec!["phone"]);

    handler
        .client
        .publish(
            "23412_contact_requested",
            QoS::AtLeastOnce,
            false,
            r#"{"requester_id":"68946"}"#,
        )
        .await
        .unwrap();
    let reply = target.publish_received().await;
    assert_eq!(reply.topic, "23412_contact_requested");
    assert_eq!(&reply.payload[..], br#"{"requester_id":"68946"}"#);
    requester
        .assert_no_publish(Duration::from_millis(300))
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_311_device_over_tls_gets_its_reply() {
    let broker = TestBroker::start().await;
    let tls = Target {
        addr: broker.tls_addr,
        ca_file: Some(&broker.ca_file),
    };
    let mut handler = V5Client::connect(tls.clone(), "h", "handler", TEST_HANDLER_KEY, |_| {});
    handler.connected().await;
    handler.subscribe("get_contact_list", QoS::AtMostOnce).await;

    let mut device = V4Client::connect(
        tls.clone(),
        "old-phone",
        "JWT",
        &broker.token("68946"),
        |_| {},
    );
    device.connected().await;
    device
        .client
        .subscribe("68946_contact_list", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        device.suback().await.return_codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    device
        .client
        .publish("get_contact_list", rumqttc::QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    let command = handler.publish_received().await;
    assert_eq!(user_property(&command, "user_id"), vec!["68946"]);
    handler
        .client
        .publish(
            "68946_contact_list",
            QoS::AtLeastOnce,
            false,
            r#"{"contacts":[]}"#,
        )
        .await
        .unwrap();
    let reply = device.publish_received().await;
    assert_eq!(reply.topic, "68946_contact_list");
    broker.shutdown().await;
}
