//! A user revoked in the store is disconnected within a poll interval (MQTT 5
//! DISCONNECT 0x98, its will dropped: nothing is acted on for a revoked
//! user) and refused at CONNECT until un-revoked.

use e2e::clients::{Target, V5Client};
use e2e::{TestBroker, TestOptions, TEST_HANDLER_KEY};
use protocol::UserId;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

#[tokio::test]
async fn revoked_users_are_disconnected_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = store::open(None, dir.path()).await.unwrap();
    let mut options = TestOptions::default();
    options.limits.revocation_poll = Duration::from_millis(200);
    options.revocation_store = Some(store.clone());
    let broker = TestBroker::start_with(options).await;
    let tls = Target {
        addr: broker.tls_addr,
        ca_file: Some(&broker.ca_file),
    };
    let mut watcher = V5Client::connect(tls.clone(), "w", "handler", TEST_HANDLER_KEY, |_| {});
    watcher.connected().await;
    watcher.subscribe("presence", QoS::AtLeastOnce).await;

    let token = broker.token("666");
    let mut device = V5Client::connect(tls.clone(), "phone", "JWT", &token, |o| {
        o.set_last_will(p5::LastWill::new(
            "presence",
            "revoked",
            QoS::AtLeastOnce,
            false,
            None,
        ));
    });
    device.connected().await;
    let mut bystander =
        V5Client::connect(tls.clone(), "phone", "JWT", &broker.token("667"), |_| {});
    bystander.connected().await;

    let uid = UserId::parse("666").unwrap();
    store.set_revoked(&uid, true).await.unwrap();
    let ended = device.closed().await;
    assert!(ended.contains("AdministrativeAction"), "{ended}");
    // A revoked user's will is dropped (issue 15: a will on a command topic
    // would otherwise act for the user after the revocation).
    watcher.assert_no_publish(Duration::from_secs(2)).await;

    let mut again = V5Client::connect(tls.clone(), "phone", "JWT", &token, |_| {});
    let refused = again.connack().await.unwrap_err();
    assert!(refused.contains("NotAuthorized"), "{refused}");

    // Others are untouched, and un-revoking lets the user back in.
    assert_eq!(
        bystander.subscribe("667_x", QoS::AtMostOnce).await,
        p5::SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    store.set_revoked(&uid, false).await.unwrap();
    let mut back = V5Client::connect(tls, "phone", "JWT", &token, |_| {});
    back.connected().await;
    broker.shutdown().await;
}
