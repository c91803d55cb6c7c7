//! Key rotation as the broker sees it, over real HTTP and MQTT over TLS:
//! the identity service's JWKS is the broker's only source for its keys.

mod idp_common;

use e2e::TestBroker;
use idp_common::{connect, options, Idp, ADMIN};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::Store;
use testkit::RedisServer;

/// Key rotation seen by the broker: the token signed before the rotation
/// works until it expires; a token signed with the retired key (long-lived,
/// made from its private key) works while the key is published and is
/// refused once it has left the JWKS, without anything else happening.
#[tokio::test]
async fn rotated_keys_are_honoured_until_their_tokens_expire_then_refused() {
    e2e::init_logging();
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(store::RedisStore::connect(&redis.url()).await.unwrap());
    let idp = Idp::start(store.clone(), &redis.url(), |s| {
        s.token_ttl = Duration::from_secs(3);
        s.key_retire_leeway = Duration::from_secs(1);
        s.jwks_max_age = Duration::ZERO;
    })
    .await;
    let mut options = options(&idp, store.clone());
    options.jwt.leeway_secs = 1;
    let broker = TestBroker::start_with(options).await;

    let (before, uid) = idp.sign_up("+15551234567").await;
    let fetched = Instant::now();
    let (_client, outcome) = connect(&broker, &before).await;
    outcome.expect("token of the first key accepted");
    let old_kid = idp.service.keys.active_meta().unwrap().kid;
    let old_pem = idp::keys::private_key_pem(&idp.service.settings.keys_dir, &old_kid).unwrap();
    let forged_by_old_key = protocol::claims::DeviceClaims::new(uid.clone(), 3600)
        .sign_pem(
            jsonwebtoken::Algorithm::RS256,
            old_pem.as_bytes(),
            Some(&old_kid),
        )
        .unwrap();

    let (status, body) = idp.post("/admin/keys/rotate", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    let rotated = Instant::now();
    // Signed before the rotation: still accepted.
    assert!(
        connect(&broker, &before).await.1.is_ok(),
        "pre-rotation token accepted after rotation"
    );
    assert!(
        connect(&broker, &forged_by_old_key).await.1.is_ok(),
        "the retired key is still published"
    );

    // Past its expiry (3 s + 1 s leeway) and, counted in whole seconds, past
    // the retired key's publication (retired_at + 3 s + 1 s).
    tokio::time::sleep(Duration::from_millis(5500).saturating_sub(rotated.elapsed())).await;
    let refused = connect(&broker, &before).await.1;
    assert!(refused.is_err(), "expired pre-rotation token refused");

    // The retired key leaves the JWKS at retired_at + 3 s + 1 s; the broker
    // refetches once the set's max-age has passed (at least its 10 s
    // refresh interval after the first fetch).
    let jwks: Value = idp
        .http
        .get(idp.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(!kids.contains(&old_kid.as_str()), "{kids:?}");
    let wait = Duration::from_secs(11).saturating_sub(fetched.elapsed());
    tokio::time::sleep(wait).await;
    let outcome = connect(&broker, &forged_by_old_key).await.1;
    assert!(outcome.is_err(), "a token of the removed key is refused");

    // Tokens of the new key work.
    let (after, _) = idp.sign_up("+15551234567").await;
    assert!(
        connect(&broker, &after).await.1.is_ok(),
        "token of the new key accepted"
    );
    broker.shutdown().await;
}
