//! Owns the behaviour checks every backend must pass, one per domain, run
//! against the embedded store and a real redis-server alike.

use crate::*;
use envelope::AesKey;
use protocol::uid::UserId;
use std::time::Duration;
use tokio::sync::broadcast;

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// Every domain, in turn.
pub async fn exercise(store: &dyn Store) {
    store.ping().await.unwrap();
    let k2 = keys(store).await;
    contacts(store).await;
    revocation_flag(store).await;
    deletion(store, k2).await;
    revocations(store).await;
    revocations_in_batches(store).await;
    registrations(store).await;
    platform_tokens(store).await;
    accounts(store).await;
    crate::pairings_conformance::pairings(store).await;
}

/// Keys: the newest replaces older ones; nonces are used once per (user, key).
async fn keys(store: &dyn Keys) -> KeyRecord {
    let a = uid("68946");
    let b = uid("23412");

    // Keys: newest replaces older.
    assert_eq!(store.get_key(&a).await.unwrap(), None);
    let k1 = KeyRecord {
        key_id: "k1".into(),
        key: AesKey::generate(),
        issued_at: 1,
    };
    let k2 = KeyRecord {
        key_id: "k2".into(),
        key: AesKey::generate(),
        issued_at: 2,
    };
    store.put_key(&a, &k1).await.unwrap();
    assert_eq!(store.get_key(&a).await.unwrap(), Some(k1));
    store.put_key(&a, &k2).await.unwrap();
    assert_eq!(store.get_key(&a).await.unwrap(), Some(k2.clone()));

    // Nonces: once per (user, key); expiry frees them.
    let ttl = Duration::from_secs(60);
    assert!(store
        .remember_nonce(NonceUse::new(&a, "k2", b"n1", ttl))
        .await
        .unwrap());
    assert!(!store
        .remember_nonce(NonceUse::new(&a, "k2", b"n1", ttl))
        .await
        .unwrap());
    assert!(store
        .remember_nonce(NonceUse::new(&b, "k2", b"n1", ttl))
        .await
        .unwrap());
    assert!(store
        .remember_nonce(NonceUse::new(&a, "k3", b"n1", ttl))
        .await
        .unwrap());
    let short = Duration::from_millis(50);
    assert!(store
        .remember_nonce(NonceUse::new(&a, "k2", b"n2", short))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(store
        .remember_nonce(NonceUse::new(&a, "k2", b"n2", short))
        .await
        .unwrap());
    k2
}

/// Contacts: accept needs a pending request.
async fn contacts(store: &dyn Contacts) {
    let a = uid("68946");
    let b = uid("23412");
    let c = uid("777");
    // Contacts: accept needs a pending request.
    assert!(!store.accept_contact(&a, &b).await.unwrap());
    store.add_contact_request(&a, &b).await.unwrap();
    store.add_contact_request(&a, &b).await.unwrap();
    store.add_contact_request(&c, &b).await.unwrap();
    assert_eq!(
        store.pending_requests(&b).await.unwrap(),
        vec!["68946".to_string(), "777".to_string()]
    );
    assert!(store.accept_contact(&a, &b).await.unwrap());
    assert!(!store.accept_contact(&a, &b).await.unwrap());
    assert_eq!(store.pending_requests(&b).await.unwrap(), vec!["777"]);
    assert_eq!(store.contacts(&a).await.unwrap(), vec!["23412"]);
    assert_eq!(store.contacts(&b).await.unwrap(), vec!["68946"]);
    assert!(store.accept_contact(&c, &b).await.unwrap());
    assert_eq!(store.contacts(&b).await.unwrap(), vec!["68946", "777"]);
}

/// The legacy revocation flag.
async fn revocation_flag(store: &dyn Revocations) {
    let c = uid("777");
    assert!(!store.is_revoked(&c).await.unwrap());
    store.set_revoked(&c, true).await.unwrap();
    assert!(store.is_revoked(&c).await.unwrap());
    store.set_revoked(&c, false).await.unwrap();
    assert!(!store.is_revoked(&c).await.unwrap());
}

/// Deleting a user removes them from others' lists too, and keeps their
/// revocation.
async fn deletion(store: &dyn Store, k2: KeyRecord) {
    let a = uid("68946");
    let b = uid("23412");
    let c = uid("777");
    store.add_contact_request(&b, &c).await.unwrap();
    store.add_contact_request(&c, &a).await.unwrap();
    store.set_revoked(&b, true).await.unwrap();
    store.delete_user(&b).await.unwrap();
    assert_eq!(store.get_key(&b).await.unwrap(), None);
    assert!(store.contacts(&b).await.unwrap().is_empty());
    assert!(store.contacts(&a).await.unwrap().is_empty());
    assert!(store.contacts(&c).await.unwrap().is_empty());
    assert!(store.pending_requests(&c).await.unwrap().is_empty());
    assert_eq!(store.pending_requests(&a).await.unwrap(), vec!["777"]);
    assert!(store.is_revoked(&b).await.unwrap());
    assert_eq!(store.get_key(&a).await.unwrap(), Some(k2));
}

/// Revocations by time: merged to the stronger one; restore clears every kind.
/// Many users' revocations in one read, in the order asked, unknown users
/// included (the broker's sweep).
async fn revocations_in_batches(store: &dyn Revocations) {
    assert!(store.revocations(&[]).await.unwrap().is_empty());
    let (a, b, c) = (uid("batch-a"), uid("batch-b"), uid("batch-c"));
    store.revoke_user(&a, Revocation::All).await.unwrap();
    store
        .revoke_user(&c, Revocation::IssuedBefore(42))
        .await
        .unwrap();
    let batch = [c.clone(), b.clone(), a.clone(), c.clone()];
    assert_eq!(
        store.revocations(&batch).await.unwrap(),
        vec![
            Some(Revocation::IssuedBefore(42)),
            None,
            Some(Revocation::All),
            Some(Revocation::IssuedBefore(42)),
        ]
    );
    for user in [&a, &c] {
        store.restore_user(user).await.unwrap();
    }
    assert_eq!(store.revocations(&[a]).await.unwrap(), vec![None]);
}

async fn revocations(store: &dyn Revocations) {
    let d = uid("acct-1");
    // Revocations merge to the stronger one; restore clears every kind.
    assert_eq!(store.revocation(&d).await.unwrap(), None);
    store
        .revoke_user(&d, Revocation::IssuedBefore(100))
        .await
        .unwrap();
    assert_eq!(
        store.revocation(&d).await.unwrap(),
        Some(Revocation::IssuedBefore(100))
    );
    assert!(store.is_revoked(&d).await.unwrap());
    store
        .revoke_user(&d, Revocation::IssuedBefore(50))
        .await
        .unwrap();
    assert_eq!(
        store.revocation(&d).await.unwrap(),
        Some(Revocation::IssuedBefore(100))
    );
    store
        .revoke_user(&d, Revocation::IssuedBefore(200))
        .await
        .unwrap();
    assert_eq!(
        store.revocation(&d).await.unwrap(),
        Some(Revocation::IssuedBefore(200))
    );
    store.revoke_user(&d, Revocation::All).await.unwrap();
    assert_eq!(store.revocation(&d).await.unwrap(), Some(Revocation::All));
    store
        .revoke_user(&d, Revocation::IssuedBefore(300))
        .await
        .unwrap();
    assert_eq!(store.revocation(&d).await.unwrap(), Some(Revocation::All));
    store.restore_user(&d).await.unwrap();
    assert_eq!(store.revocation(&d).await.unwrap(), None);
    assert!(!store.is_revoked(&d).await.unwrap());
    // Recording (without announcing) merges the same way.
    assert_eq!(
        store
            .record_revocation(&d, Revocation::IssuedBefore(70))
            .await
            .unwrap(),
        Revocation::IssuedBefore(70)
    );
    assert_eq!(
        store
            .record_revocation(&d, Revocation::IssuedBefore(60))
            .await
            .unwrap(),
        Revocation::IssuedBefore(70)
    );
    assert_eq!(
        store.revocation(&d).await.unwrap(),
        Some(Revocation::IssuedBefore(70))
    );
    store.restore_user(&d).await.unwrap();
    store.set_revoked(&d, true).await.unwrap();
    assert_eq!(store.revocation(&d).await.unwrap(), Some(Revocation::All));
    store.set_revoked(&d, false).await.unwrap();
    assert_eq!(store.revocation(&d).await.unwrap(), None);
}

/// Registrations: the later one replaces the earlier.
async fn registrations(store: &dyn Registrations) {
    let d = uid("acct-1");
    assert_eq!(store.registration(&d).await.unwrap(), None);
    store.put_registration(&d, 1_700_000_000).await.unwrap();
    store.put_registration(&d, 1_700_000_001).await.unwrap();
    assert_eq!(store.registration(&d).await.unwrap(), Some(1_700_000_001));
}

/// Platform tokens: per user and platform, sealed bytes kept exactly,
/// compare-and-swap, listing over pages.
async fn platform_tokens(store: &dyn PlatformTokens) {
    let d = uid("acct-1");
    let e = uid("acct-2");
    assert!(store.platforms_with_tokens(&d).await.unwrap().is_empty());
    assert_eq!(store.platform_token(&d, "twitter").await.unwrap(), None);
    let sealed_a = [0u8, 1, 2, 255, 0x1f, 0];
    store
        .put_platform_token(&d, "twitter", &sealed_a)
        .await
        .unwrap();
    store.put_platform_token(&d, "gmail", b"g1").await.unwrap();
    store.put_platform_token(&d, "gmail", b"g2").await.unwrap();
    store.put_platform_token(&e, "gmail", b"e1").await.unwrap();
    assert!(matches!(
        store.put_platform_token(&d, "bad\x1fname", b"x").await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        store.platforms_with_tokens(&d).await.unwrap(),
        vec!["gmail", "twitter"]
    );
    assert_eq!(
        store
            .platform_token(&d, "twitter")
            .await
            .unwrap()
            .as_deref(),
        Some(&sealed_a[..])
    );
    assert_eq!(
        store.platform_token(&d, "gmail").await.unwrap().as_deref(),
        Some(&b"g2"[..])
    );
    // Compare-and-swap for key rotation.
    assert!(!store
        .replace_platform_token(SealedToken::new(&d, "gmail", b"g1"), b"g3")
        .await
        .unwrap());
    assert!(store
        .replace_platform_token(SealedToken::new(&d, "gmail", b"g2"), b"g3")
        .await
        .unwrap());
    assert!(!store
        .replace_platform_token(SealedToken::new(&d, "absent", b"g2"), b"g3")
        .await
        .unwrap());
    assert_eq!(store.platform_token(&d, "absent").await.unwrap(), None);
    assert_eq!(
        store.platform_token(&d, "gmail").await.unwrap().as_deref(),
        Some(&b"g3"[..])
    );
    assert!(store.delete_platform_token(&d, "twitter").await.unwrap());
    assert!(!store.delete_platform_token(&d, "twitter").await.unwrap());
    assert_eq!(
        store.platforms_with_tokens(&d).await.unwrap(),
        vec!["gmail"]
    );

    // Listing every token, over several pages.
    let many: Vec<UserId> = (0..140).map(|i| uid(&format!("bulk-{i}"))).collect();
    for u in &many {
        store
            .put_platform_token(u, "p1", u.as_str().as_bytes())
            .await
            .unwrap();
        store.put_platform_token(u, "p2", b"two").await.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.platform_tokens_page(cursor.as_deref()).await.unwrap();
        pages += 1;
        assert!(pages < 10_000, "the listing does not end");
        for t in page.tokens {
            if t.platform == "p1" {
                assert_eq!(t.sealed, t.uid.as_str().as_bytes());
            }
            seen.insert((t.uid.as_str().to_owned(), t.platform));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 140 * 2 + 2);
    assert!(seen.contains(&("acct-1".to_owned(), "gmail".to_owned())));
    assert!(seen.contains(&("acct-2".to_owned(), "gmail".to_owned())));
}

/// Deleting the user drops tokens and registration, keeps the revocation;
/// guarded writes check the revocation in the same step.
async fn accounts(store: &dyn Store) {
    let d = uid("acct-1");
    let e = uid("acct-2");
    store
        .revoke_user(&d, Revocation::IssuedBefore(500))
        .await
        .unwrap();
    store.delete_user(&d).await.unwrap();
    assert!(store.platforms_with_tokens(&d).await.unwrap().is_empty());
    assert_eq!(store.platform_token(&d, "gmail").await.unwrap(), None);
    assert_eq!(store.registration(&d).await.unwrap(), None);
    assert_eq!(
        store.revocation(&d).await.unwrap(),
        Some(Revocation::IssuedBefore(500))
    );
    assert_eq!(
        store.platforms_with_tokens(&e).await.unwrap(),
        vec!["gmail"]
    );

    // Guarded writes: refused for a token the revocation refuses,
    // written for one issued at or after the cut-off, and for users
    // without a revocation.
    let key = KeyRecord {
        key_id: "kg".into(),
        key: AesKey::generate(),
        issued_at: 3,
    };
    assert!(!store
        .put_platform_token_unless_revoked(SealedToken::new(&d, "gmail", b"old"), 499)
        .await
        .unwrap());
    assert!(!store.put_key_unless_revoked(&d, &key, 0).await.unwrap());
    assert!(store.platforms_with_tokens(&d).await.unwrap().is_empty());
    assert_eq!(store.get_key(&d).await.unwrap(), None);
    assert!(store
        .put_platform_token_unless_revoked(SealedToken::new(&d, "gmail", b"new"), 500)
        .await
        .unwrap());
    assert!(store.put_key_unless_revoked(&d, &key, 500).await.unwrap());
    assert_eq!(
        store.platform_token(&d, "gmail").await.unwrap().as_deref(),
        Some(&b"new"[..])
    );
    assert_eq!(store.get_key(&d).await.unwrap(), Some(key.clone()));
    assert!(store
        .put_platform_token_unless_revoked(SealedToken::new(&e, "chat", b"e2"), 0)
        .await
        .unwrap());
    assert!(matches!(
        store
            .put_platform_token_unless_revoked(SealedToken::new(&e, "bad name", b"x"), 0)
            .await,
        Err(StoreError::Invalid(_))
    ));
    store.revoke_user(&d, Revocation::All).await.unwrap();
    assert!(!store
        .put_platform_token_unless_revoked(SealedToken::new(&d, "gmail", b"x"), u64::MAX)
        .await
        .unwrap());
    assert!(!store
        .put_key_unless_revoked(&d, &key, u64::MAX)
        .await
        .unwrap());
    assert_eq!(
        store.platform_token(&d, "gmail").await.unwrap().as_deref(),
        Some(&b"new"[..])
    );
    store.restore_user(&d).await.unwrap();
    store.delete_user(&d).await.unwrap();
}

/// Revocations recorded through `store` reach `events` (subscribed
/// before, possibly on another instance sharing the backend).
pub async fn exercise_events(
    store: &dyn Store,
    mut events: broadcast::Receiver<RevocationEvent>,
) -> broadcast::Receiver<RevocationEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let u = uid("evt-1");
    // A Redis subscription is set up in the background: announce until
    // the first one is heard.
    let first = loop {
        store
            .revoke_user(&u, Revocation::IssuedBefore(10))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
            Ok(Ok(RevocationEvent::Resync)) => continue,
            Ok(event) => break event.unwrap(),
            Err(_) => {
                assert!(tokio::time::Instant::now() < deadline, "no event heard");
            }
        }
    };
    assert_eq!(
        first,
        RevocationEvent::Revoked {
            uid: u.clone(),
            revocation: Revocation::IssuedBefore(10)
        }
    );
    // Drain repeats of the first announcement.
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {}
    // Recording alone announces nothing; the announcement that follows
    // carries the merged value.
    store
        .record_revocation(&u, Revocation::IssuedBefore(20))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), events.recv())
            .await
            .is_err(),
        "a recorded revocation is not announced"
    );
    store
        .revoke_user(&u, Revocation::IssuedBefore(15))
        .await
        .unwrap();
    let merged = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        merged,
        RevocationEvent::Revoked {
            uid: u.clone(),
            revocation: Revocation::IssuedBefore(20)
        }
    );
    store.revoke_user(&u, Revocation::All).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next,
        RevocationEvent::Revoked {
            uid: u.clone(),
            revocation: Revocation::All
        }
    );
    store.restore_user(&u).await.unwrap();
    events
}

/// The identity service's sign-up sessions and rate counters.
pub async fn sign_ups(state: &dyn SignUps) {
    let id = "0123abcd-token-1";
    assert_eq!(state.session(id).await.unwrap(), None);
    state
        .create_session(id, "+15551234567", Duration::from_secs(60))
        .await
        .unwrap();
    let s = state.session(id).await.unwrap().unwrap();
    assert_eq!(s.msisdn, "+15551234567");
    assert_eq!(
        (s.code.clone(), s.attempts, s.resends, s.uid.clone()),
        (None, 0, 0, None)
    );
    assert!(state.set_code(id, "123456", 99).await.unwrap());
    assert_eq!(state.add_attempt(id).await.unwrap(), Some(1));
    assert_eq!(state.add_attempt(id).await.unwrap(), Some(2));
    assert_eq!(state.add_resend(id).await.unwrap(), Some(1));
    let s = state.session(id).await.unwrap().unwrap();
    assert_eq!(
        (s.code.as_deref(), s.code_expires, s.attempts, s.resends),
        (Some("123456"), 99, 2, 1)
    );
    assert!(state.take_code(id).await.unwrap());
    assert!(!state.take_code(id).await.unwrap(), "a code is taken once");
    assert!(state.mark_verified(id, "uid1", 1234).await.unwrap());
    assert_eq!(
        state.session(id).await.unwrap().unwrap().uid.as_deref(),
        Some("uid1")
    );
    assert_eq!(state.session(id).await.unwrap().unwrap().verified_at, 1234);
    state.delete_session(id).await.unwrap();
    assert_eq!(state.session(id).await.unwrap(), None);
    // A gone session is not brought back by updates.
    assert!(!state.set_code(id, "1", 1).await.unwrap());
    assert_eq!(state.add_attempt(id).await.unwrap(), None);
    assert!(!state.mark_verified(id, "u", 1).await.unwrap());
    assert_eq!(state.session(id).await.unwrap(), None);
    // Counters.
    for n in 1..=3 {
        assert_eq!(
            state
                .hit("a:1.2.3.4", Duration::from_secs(60))
                .await
                .unwrap(),
            n
        );
    }
    assert_eq!(
        state
            .hit("a:1.2.3.5", Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    assert_eq!(state.hit("w", Duration::from_millis(200)).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state.hit("w", Duration::from_millis(200)).await.unwrap(),
        1,
        "a new window"
    );
    // Expiry.
    let short = "short";
    state
        .create_session(short, "+15551234567", Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state.session(short).await.unwrap(), None);
}

#[test]
fn revocation_rules() {
    let r = Revocation::IssuedBefore(100);
    assert!(r.refuses(Some(99)));
    assert!(!r.refuses(Some(100)));
    assert!(r.refuses(None));
    assert!(Revocation::All.refuses(Some(u64::MAX)));
    assert_eq!(Revocation::decode(&r.encode()), r);
    assert_eq!(Revocation::decode("all"), Revocation::All);
    assert_eq!(Revocation::decode("1700000000"), Revocation::All);
    assert_eq!(Revocation::decode("before:x"), Revocation::All);
    assert_eq!(
        Revocation::IssuedBefore(5).merge(Revocation::IssuedBefore(3)),
        Revocation::IssuedBefore(5)
    );
    assert_eq!(
        Revocation::IssuedBefore(5).merge(Revocation::All),
        Revocation::All
    );
    // An account deletion refuses every token up to this second, and
    // the deleting credential even when it was issued in the second of
    // an earlier deletion (its `iat` is later than `now`).
    let deleted = Revocation::account_deleted(1_000, Some(900));
    assert_eq!(deleted, Revocation::IssuedBefore(1_001));
    assert!(deleted.refuses(Some(1_000)) && !deleted.refuses(Some(1_001)));
    let same_second = Revocation::account_deleted(1_000, Some(1_001));
    assert!(same_second.refuses(Some(1_001)));
    assert_eq!(
        Revocation::account_deleted(1_000, None),
        Revocation::IssuedBefore(1_001)
    );
    assert!(valid_platform_name("gmail.v2_x-y"));
    assert!(!valid_platform_name(""));
    assert!(!valid_platform_name("a b"));
    assert!(!valid_platform_name(&"a".repeat(65)));
}
