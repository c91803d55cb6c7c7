//! The tokens handler's logic with a real store (embedded and Redis) and a
//! real HTTP platform, without MQTT: store, list and revoke platform tokens,
//! sealed at rest; publish forwarding with the stored token or refusing
//! without one; `delete_account`; master-key rotation.

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use envelope::{device, AesKey};
use handlers::tokens::{self, MasterKey, MasterKeys, NoFields, RevokeToken, StoreToken};
use handlers::{publish, Settings, Shared};
use protocol::UserId;
use sdk::{Command, HandlerError, Recipient, Reply};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use store::{EmbeddedStore, KeyRecord, RedisStore, Revocation, Store};
use testkit::{Platform, RedisServer};

fn cmd<T>(uid: &str, body: T) -> Command<T> {
    Command {
        user_id: UserId::parse(uid).unwrap(),
        client_id: None,
        token_iat: None,
        topic: "t".into(),
        request_id: Some("r1".into()),
        body,
        correlation_data: None,
    }
}

/// Platforms `mail` (token required, the default) and `sms` (optional,
/// authenticated by the operator's header).
fn settings(platform_url: &str, key: &MasterKey) -> Settings {
    let mut s = Settings::from_lookup(|var| match var {
        "PLATFORMS" => Some(format!("mail={platform_url}/mail,sms={platform_url}/sms")),
        "PLATFORM_MAIL_HEADERS" => Some("Authorization: Bearer operator; X-Api: 1".into()),
        "PLATFORM_SMS_HEADERS" => Some("Authorization: Bearer operator".into()),
        "PLATFORM_SMS_TOKEN" => Some("optional".into()),
        _ => None,
    })
    .unwrap();
    s.tokens_master_key = Some(key.clone());
    s.publish_timeout = Duration::from_millis(500);
    s.publish_retries = 0;
    s
}

fn only(reply: Reply) -> (String, Value) {
    assert_eq!(reply.messages.len(), 1, "{reply:?}");
    let m = reply.messages.into_iter().next().unwrap();
    assert_eq!(m.to, Recipient::Sender);
    (m.name, m.body)
}

async fn embedded() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb"))
        .await
        .unwrap();
    (dir, Arc::new(store))
}

async fn store_token(
    shared: &Shared,
    uid: &str,
    platform: &str,
    token: Value,
) -> Result<Value, HandlerError> {
    let reply = tokens::store_token(
        shared,
        cmd(
            uid,
            StoreToken {
                platform: platform.into(),
                token,
            },
        ),
    )
    .await?;
    let (name, body) = only(reply);
    assert_eq!(name, "store_token");
    Ok(body)
}

async fn list(shared: &Shared, uid: &str) -> Value {
    let (name, body) = only(
        tokens::list_tokens(shared, cmd(uid, NoFields {}))
            .await
            .unwrap(),
    );
    assert_eq!(name, "list_tokens");
    body
}

async fn revoke(shared: &Shared, uid: &str, platform: &str) -> Result<Value, HandlerError> {
    let reply = tokens::revoke_token(
        shared,
        cmd(
            uid,
            RevokeToken {
                platform: platform.into(),
            },
        ),
    )
    .await?;
    let (name, body) = only(reply);
    assert_eq!(name, "revoke_token");
    Ok(body)
}

/// Gives `uid` a sync key directly in the store; returns it.
async fn give_key(store: &dyn Store, uid: &str) -> (String, AesKey) {
    let key = AesKey::generate();
    store
        .put_key(
            &UserId::parse(uid).unwrap(),
            &KeyRecord {
                key_id: "k1".into(),
                key: key.clone(),
                issued_at: 1,
            },
        )
        .await
        .unwrap();
    ("k1".into(), key)
}

async fn publish_to(
    shared: &Shared,
    uid: &str,
    platform: &str,
    key: &(String, AesKey),
    text: &str,
) -> Result<Value, HandlerError> {
    let (nonce, ciphertext) = device::seal_message(&key.1, uid, text).unwrap();
    let body = publish::PublishIn {
        platform: platform.into(),
        key_id: key.0.clone(),
        nonce,
        ciphertext,
    };
    let (name, body) = only(publish::handle(shared, cmd(uid, body)).await?);
    assert_eq!(name, "publish");
    Ok(body)
}

async fn token_lifecycle(store: Arc<dyn Store>) {
    let platform = Platform::start().await;
    let key = MasterKey::generate().0;
    let shared = Shared::new(settings(&platform.url(""), &key), store.clone()).unwrap();
    let uid = "68946";
    let user = UserId::parse(uid).unwrap();

    assert_eq!(
        list(&shared, uid).await,
        json!({"status": 200, "platforms": []})
    );
    let token = json!({"access_token": "user-at-1", "refresh_token": "rt", "scope": ["a"]});
    assert_eq!(
        store_token(&shared, uid, "mail", token.clone())
            .await
            .unwrap(),
        json!({"status": 200, "platform": "mail"})
    );
    store_token(&shared, uid, "sms", json!({"k": "v"}))
        .await
        .unwrap();
    assert_eq!(
        list(&shared, uid).await,
        json!({"status": 200, "platforms": ["mail", "sms"]})
    );
    // Another user sees none of it.
    assert_eq!(list(&shared, "23412").await["platforms"], json!([]));

    // Sealed at rest: the store holds no plaintext, and the blob opens only
    // for its user and platform.
    let sealed = store.platform_token(&user, "mail").await.unwrap().unwrap();
    let as_text = String::from_utf8_lossy(&sealed);
    assert!(
        !as_text.contains("user-at-1") && !as_text.contains("refresh"),
        "{as_text}"
    );
    assert!(shared
        .master_keys()
        .unwrap()
        .open(&user, "mail", &sealed)
        .is_ok());
    assert!(shared
        .master_keys()
        .unwrap()
        .open(&user, "sms", &sealed)
        .is_err());

    // Bad input.
    for (platform, token, status) in [
        ("nope", json!({"a": 1}), 404),
        ("mail", json!("a string"), 400),
        ("mail", json!([1, 2]), 400),
        ("mail", json!({}), 400),
        (
            "mail",
            json!({"big": "x".repeat(tokens::MAX_TOKEN_BYTES)}),
            413,
        ),
    ] {
        let err = store_token(&shared, uid, platform, token)
            .await
            .unwrap_err();
        assert_eq!(err.status, status, "{platform}: {err}");
    }
    assert_eq!(revoke(&shared, uid, "a b").await.unwrap_err().status, 400);
    assert_eq!(revoke(&shared, uid, "nope").await.unwrap_err().status, 404);

    // Publish forwards with the stored token: Bearer from access_token
    // (replacing the operator's Authorization), the token in the body.
    let sync_key = give_key(store.as_ref(), uid).await;
    let body = publish_to(&shared, uid, "mail", &sync_key, "hi")
        .await
        .unwrap();
    assert_eq!(body["status"], 200, "{body}");
    let got = platform.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/mail");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer user-at-1"));
    assert_eq!(got[0].body["token"], token);
    assert_eq!(got[0].body["message"], "hi");
    // A token without access_token: body only, the operator's header stays.
    let body = publish_to(&shared, uid, "sms", &sync_key, "yo")
        .await
        .unwrap();
    assert_eq!(body["status"], 200, "{body}");
    let got = platform.received();
    assert_eq!(got[1].authorization.as_deref(), Some("Bearer operator"));
    assert_eq!(got[1].body["token"], json!({"k": "v"}));

    // Revoked: publish to a required platform is refused before anything
    // is sent or the nonce spent; an optional one goes without a token.
    assert_eq!(
        revoke(&shared, uid, "mail").await.unwrap(),
        json!({"status": 200, "platform": "mail"})
    );
    let err = revoke(&shared, uid, "mail").await.unwrap_err();
    assert_eq!(
        (err.status, err.message.as_str()),
        (404, "no stored token for platform mail")
    );
    assert_eq!(list(&shared, uid).await["platforms"], json!(["sms"]));
    let err = publish_to(&shared, uid, "mail", &sync_key, "no")
        .await
        .unwrap_err();
    assert_eq!(err.status, 424);
    assert_eq!(
        err.message,
        "no stored token for platform mail: send store_token first"
    );
    assert_eq!(platform.received().len(), 2);
    revoke(&shared, uid, "sms").await.unwrap();
    let body = publish_to(&shared, uid, "sms", &sync_key, "bare")
        .await
        .unwrap();
    assert_eq!(body["status"], 200, "{body}");
    let got = platform.received();
    assert_eq!(got[2].authorization.as_deref(), Some("Bearer operator"));
    assert!(got[2].body.get("token").is_none(), "{}", got[2].body);

    // A token sealed under a key this process does not have: a clear 424.
    let other = Shared::new(
        settings(&platform.url(""), &MasterKey::generate().0),
        store.clone(),
    )
    .unwrap();
    store_token(&other, uid, "mail", json!({"access_token": "x"}))
        .await
        .unwrap();
    let err = publish_to(&shared, uid, "mail", &sync_key, "x")
        .await
        .unwrap_err();
    assert_eq!(err.status, 424, "{err}");
    assert!(err.message.contains("send store_token again"), "{err}");
}

#[tokio::test]
async fn token_lifecycle_on_the_embedded_store() {
    let (_dir, store) = embedded().await;
    token_lifecycle(store).await;
}

#[tokio::test]
async fn token_lifecycle_on_redis() {
    let redis = RedisServer::start();
    token_lifecycle(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

async fn deletion(store: Arc<dyn Store>) {
    let platform = Platform::start().await;
    let shared = Shared::new(
        settings(&platform.url(""), &MasterKey::generate().0),
        store.clone(),
    )
    .unwrap();
    let (a, b) = (UserId::parse("a1").unwrap(), UserId::parse("b1").unwrap());
    give_key(store.as_ref(), "a1").await;
    store_token(&shared, "a1", "mail", json!({"t": 1}))
        .await
        .unwrap();
    store_token(&shared, "b1", "mail", json!({"t": 2}))
        .await
        .unwrap();
    store.put_registration(&a, 1_700_000_000).await.unwrap();
    store.add_contact_request(&a, &b).await.unwrap();
    store.add_contact_request(&b, &a).await.unwrap();
    assert!(store.accept_contact(&b, &a).await.unwrap());
    store.add_contact_request(&a, &b).await.unwrap();

    let mut events = store.revocation_events();
    let before = protocol::claims::now_secs();
    let (name, body) = only(
        tokens::delete_account(&shared, cmd("a1", NoFields {}))
            .await
            .unwrap(),
    );
    assert_eq!(
        (name.as_str(), body),
        ("delete_account", json!({"status": 200}))
    );
    // The revocation was recorded before anything was deleted: it is in
    // force when the answer goes out (announced only later).
    let recorded = store.revocation(&a).await.unwrap();
    assert!(
        recorded.is_some_and(|r| r.refuses(Some(before))),
        "{recorded:?}"
    );
    // The data is gone at once.
    assert_eq!(store.get_key(&a).await.unwrap(), None);
    assert!(store.platforms_with_tokens(&a).await.unwrap().is_empty());
    assert_eq!(store.registration(&a).await.unwrap(), None);
    assert!(store.contacts(&a).await.unwrap().is_empty());
    assert!(store.contacts(&b).await.unwrap().is_empty());
    assert!(store.pending_requests(&b).await.unwrap().is_empty());
    assert!(store.pending_requests(&a).await.unwrap().is_empty());
    // Others keep theirs.
    assert_eq!(store.platforms_with_tokens(&b).await.unwrap(), vec!["mail"]);
    // The revocation follows the reply, announced to the broker.
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await.unwrap() {
                store::RevocationEvent::Revoked { uid, revocation } if uid == a => {
                    return revocation
                }
                _ => {}
            }
        }
    })
    .await
    .expect("a revocation event within 5 s");
    let Revocation::IssuedBefore(cutoff) = event else {
        panic!("expected IssuedBefore, got {event:?}");
    };
    assert!(
        cutoff > before && cutoff <= protocol::claims::now_secs() + 1,
        "{cutoff}"
    );
    assert_eq!(store.revocation(&a).await.unwrap(), Some(event));
    assert!(event.refuses(Some(before)));
    assert!(!event.refuses(Some(cutoff)));
    assert_eq!(store.revocation(&b).await.unwrap(), None);
}

/// A command that passed the SDK's revocation check just before an account
/// deletion recorded its revocation writes nothing after it: the write
/// checks the revocation atomically (`store_token`, and `sync`'s key).
async fn guarded_writes(store: Arc<dyn Store>) {
    let platform = Platform::start().await;
    let shared = Shared::new(
        settings(&platform.url(""), &MasterKey::generate().0),
        store.clone(),
    )
    .unwrap();
    let uid = UserId::parse("g1").unwrap();
    let issued = protocol::claims::now_secs() - 10;
    let sent = |iat: Option<u64>| {
        let mut command = cmd(
            "g1",
            StoreToken {
                platform: "mail".into(),
                token: json!({"access_token": "x"}),
            },
        );
        command.token_iat = iat;
        command
    };
    store
        .record_revocation(&uid, Revocation::IssuedBefore(issued + 5))
        .await
        .unwrap();
    let refused = tokens::store_token(&shared, sent(Some(issued)))
        .await
        .unwrap_err();
    assert_eq!(
        refused.body(),
        json!({"status": 401, "error": "token revoked"})
    );
    assert!(store.platforms_with_tokens(&uid).await.unwrap().is_empty());
    // A token issued at the cut-off (a new registration's) writes.
    let (_, body) = only(
        tokens::store_token(&shared, sent(Some(issued + 5)))
            .await
            .unwrap(),
    );
    assert_eq!(body["status"], 200, "{body}");
    assert_eq!(
        store.platforms_with_tokens(&uid).await.unwrap(),
        vec!["mail"]
    );
}

#[tokio::test]
async fn guarded_writes_on_the_embedded_store() {
    let (_dir, store) = embedded().await;
    guarded_writes(store).await;
}

#[tokio::test]
async fn guarded_writes_on_redis() {
    let redis = RedisServer::start();
    guarded_writes(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

#[tokio::test]
async fn delete_account_on_the_embedded_store() {
    let (_dir, store) = embedded().await;
    deletion(store).await;
}

#[tokio::test]
async fn delete_account_on_redis() {
    let redis = RedisServer::start();
    deletion(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

/// Rotation re-seals every token under the new key (many, over several
/// listing pages), skips those already rotated, and leaves a token its user
/// changed meanwhile alone; afterwards the old key is not needed.
async fn rotation(store: Arc<dyn Store>) {
    let old = MasterKeys {
        current: MasterKey::generate().0,
        previous: None,
    };
    let new_key = MasterKey::generate().0;
    let during = MasterKeys {
        current: new_key.clone(),
        previous: Some(old.current.clone()),
    };
    let after = MasterKeys {
        current: new_key,
        previous: None,
    };
    let users: Vec<UserId> = (0..300)
        .map(|i| UserId::parse(&format!("u{i}")).unwrap())
        .collect();
    for user in &users {
        let plain = format!("{{\"access_token\":\"{user}\"}}");
        let sealed = old.seal(user, "mail", plain.as_bytes()).unwrap();
        store
            .put_platform_token(user, "mail", &sealed)
            .await
            .unwrap();
    }
    // One stored under the new key already (a user who stored a token
    // while handlers ran with the new key).
    let fresh = UserId::parse("fresh").unwrap();
    let sealed = during.seal(&fresh, "mail", b"{\"n\":1}").unwrap();
    store
        .put_platform_token(&fresh, "mail", &sealed)
        .await
        .unwrap();
    // One unreadable under both keys.
    let lost = UserId::parse("lost").unwrap();
    let stranger = MasterKeys {
        current: MasterKey::generate().0,
        previous: None,
    };
    let sealed = stranger.seal(&lost, "mail", b"{}").unwrap();
    store
        .put_platform_token(&lost, "mail", &sealed)
        .await
        .unwrap();

    let report = tokens::rotate_master_key(store.as_ref(), &during)
        .await
        .unwrap();
    assert_eq!(report.resealed, 300, "{report:?}");
    assert_eq!(report.current, 1, "{report:?}");
    assert_eq!(report.unreadable, 1, "{report:?}");
    for user in &users {
        let sealed = store.platform_token(user, "mail").await.unwrap().unwrap();
        assert!(after.is_current(&sealed));
        let plain = after.open(user, "mail", &sealed).unwrap();
        assert_eq!(plain, format!("{{\"access_token\":\"{user}\"}}").as_bytes());
    }
    // Running it again changes nothing.
    let again = tokens::rotate_master_key(store.as_ref(), &during)
        .await
        .unwrap();
    assert_eq!(
        (again.resealed, again.current, again.unreadable),
        (0, 301, 1)
    );
}

#[tokio::test]
async fn master_key_rotation_on_the_embedded_store() {
    let (_dir, store) = embedded().await;
    rotation(store).await;
}

#[tokio::test]
async fn master_key_rotation_on_redis() {
    let redis = RedisServer::start();
    rotation(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

/// The documented command: `TOKENS_MASTER_KEY=<new>
/// TOKENS_MASTER_KEY_PREVIOUS=<old> tokens-handler rotate-master-key`, run
/// as a process against the embedded store in `DATA_DIR`.
#[tokio::test]
async fn rotate_master_key_command() {
    let dir = tempfile::tempdir().unwrap();
    let (old_key, old_hex) = MasterKey::generate();
    let (new_key, new_hex) = MasterKey::generate();
    let old = MasterKeys {
        current: old_key,
        previous: None,
    };
    let uid = UserId::parse("68946").unwrap();
    {
        let store = store::open(None, dir.path()).await.unwrap();
        let sealed = old.seal(&uid, "mail", b"{\"access_token\":\"a\"}").unwrap();
        store
            .put_platform_token(&uid, "mail", &sealed)
            .await
            .unwrap();
    }
    let run = |extra: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tokens-handler"));
        command
            .arg("rotate-master-key")
            .env_clear()
            .env("DATA_DIR", dir.path())
            .env("RUST_LOG", "error");
        for (k, v) in extra {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    // Without the old key the token is unreadable: exit 1, nothing changed.
    let out = run(&[("TOKENS_MASTER_KEY", &new_hex)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOKENS_MASTER_KEY_PREVIOUS"));
    // Without a new key: a usage error.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&[
        ("TOKENS_MASTER_KEY", &new_hex),
        ("TOKENS_MASTER_KEY_PREVIOUS", &old_hex),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("re-sealed 1 platform tokens"), "{stdout}");

    let store = store::open(None, dir.path()).await.unwrap();
    let sealed = store.platform_token(&uid, "mail").await.unwrap().unwrap();
    let after = MasterKeys {
        current: new_key,
        previous: None,
    };
    assert_eq!(
        after.open(&uid, "mail", &sealed).unwrap(),
        b"{\"access_token\":\"a\"}"
    );
}
