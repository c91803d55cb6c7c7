//! The identity service over real HTTP: the MSISDN sign-up flow against a
//! local HTTP server standing in for the SMS provider, every error case the
//! issue lists (each a clear `{"error"}` with its status, the service still
//! serving after it), rate limits, unregister, the admin endpoints and key
//! rotation in the JWKS.

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use common::{verify_with_jwks, TestIdp, ADMIN_TOKEN, PROVIDER_TOKEN};
use protocol::UserId;
use serde_json::{json, Value};
use std::time::Duration;
use store::Revocation;

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

#[tokio::test]
async fn sign_up_sends_the_code_through_the_provider_and_issues_a_jwks_verified_token() {
    let idp = TestIdp::start(|_| {}).await;
    let session = idp.register("+15551234567").await;
    assert!(session.len() >= 43, "a 256-bit session token");

    let (status, body) = idp.post("/sms/verify", Some(&session), Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "msisdn": "+15550100000" }));
    let sent = idp.sms.received();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].path, "/messages");
    assert_eq!(
        sent[0].authorization.as_deref(),
        Some(format!("Bearer {PROVIDER_TOKEN}").as_str())
    );
    assert_eq!(sent[0].body["to"], "+15551234567");
    let code = idp.last_code();

    let (status, body) = idp
        .post("/sms/verify_code", Some(&session), json!({ "code": code }))
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    let user = body["user_id"].as_str().unwrap();
    assert!(UserId::parse(user).is_ok());
    assert!(!user.contains("5551234567"));

    let (jwks, cache) = idp.jwks().await;
    assert_eq!(cache.as_deref(), Some("public, max-age=60"));
    let claims = verify_with_jwks(token, &jwks, "test-idp", "mqtt-broker").unwrap();
    assert_eq!(claims["sub"], user);
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 3600);
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(
        Some(header.kid.unwrap()),
        idp.service.keys.active_meta().map(|m| m.kid)
    );

    // The registration is in the shared store; the uid is stable.
    assert!(idp.store.registration(&uid(user)).await.unwrap().is_some());
    let (_, again) = idp.sign_up("+15551234567").await;
    assert_eq!(again, user);
    let (_, other) = idp.sign_up("+15551234568").await;
    assert_ne!(other, user);

    // The code is single-use: the verified session cannot verify again.
    let (status, body) = idp
        .post("/sms/verify_code", Some(&session), json!({ "code": code }))
        .await;
    assert_eq!(status, 409, "{body}");
}

/// Each error case gets a clear HTTP error, and the service keeps serving.
#[tokio::test]
async fn every_error_case_is_answered_and_the_service_keeps_serving() {
    let idp = TestIdp::start(|s| {
        s.code_ttl = Duration::from_secs(1);
    })
    .await;
    let expect = |(status, body): (u16, Value), want: u16, words: &str| {
        assert_eq!(status, want, "{body}");
        let message = body["error"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(words), "{message:?} should say {words:?}");
    };

    // Malformed numbers and network codes.
    for bad in [
        "15551234567",
        "+1555",
        "+0123456789",
        "+1555123456789012",
        "+1555-123-4567",
        "",
    ] {
        expect(
            idp.post("/register", None, json!({ "msisdn": bad })).await,
            400,
            "E.164",
        );
    }
    expect(
        idp.post("/register", None, json!({ "msisdn": 15551234567u64 }))
            .await,
        400,
        "malformed JSON",
    );
    expect(
        idp.post(
            "/register",
            None,
            json!({ "msisdn": "+15551234567", "mcc": "1" }),
        )
        .await,
        400,
        "mcc",
    );
    expect(
        idp.post(
            "/register",
            None,
            json!({ "msisdn": "+15551234567", "mnc": "x" }),
        )
        .await,
        400,
        "mnc",
    );
    // Malformed and oversized bodies.
    expect(
        idp.post_raw("/register", None, b"{not json".to_vec()).await,
        400,
        "malformed JSON",
    );
    expect(
        idp.post_raw("/register", None, vec![b' '; 5000]).await,
        413,
        "larger than 4096",
    );
    let session = idp.register("+15551230000").await;
    expect(
        idp.post_raw("/sms/verify_code", Some(&session), b"[]".to_vec())
            .await,
        400,
        "malformed JSON",
    );
    expect(
        idp.post(
            "/sms/verify_code",
            Some(&session),
            json!({ "code": "12ab56" }),
        )
        .await,
        400,
        "6 digits",
    );
    // Unknown routes and methods.
    expect(
        idp.post("/nope", None, Value::Null).await,
        404,
        "no such endpoint",
    );
    let response = idp
        .http
        .get(format!("{}/register", idp.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("method not allowed"));
    // Missing, unknown session tokens.
    expect(
        idp.post("/sms/verify", None, Value::Null).await,
        401,
        "Bearer",
    );
    expect(
        idp.post("/sms/verify", Some("not-a-session"), Value::Null)
            .await,
        401,
        "unknown or expired session",
    );
    // Order: resend and verify_code before any code.
    expect(
        idp.post("/sms/resend_code", Some(&session), Value::Null)
            .await,
        409,
        "/sms/verify first",
    );
    expect(
        idp.post(
            "/sms/verify_code",
            Some(&session),
            json!({ "code": "123456" }),
        )
        .await,
        409,
        "/sms/verify first",
    );
    // A second verify points at resend.
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );
    expect(
        idp.post("/sms/verify", Some(&session), Value::Null).await,
        409,
        "resend_code",
    );

    // Expired code: refused; a resent one works.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = idp.last_code();
    expect(
        idp.post("/sms/verify_code", Some(&session), json!({ "code": stale }))
            .await,
        400,
        "expired",
    );
    assert_eq!(
        idp.post("/sms/resend_code", Some(&session), Value::Null)
            .await
            .0,
        200
    );
    let fresh = idp.last_code();
    assert_eq!(
        idp.post("/sms/verify_code", Some(&session), json!({ "code": fresh }))
            .await
            .0,
        200
    );

    // Wrong codes: 4 wrong tries say how many are left; the 5th closes the
    // session, and then even the right code is refused.
    let session = idp.register("+15551230001").await;
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );
    let right = idp.last_code();
    let wrong = if right == "000000" {
        "000001"
    } else {
        "000000"
    };
    for left in (1..=4).rev() {
        expect(
            idp.post("/sms/verify_code", Some(&session), json!({ "code": wrong }))
                .await,
            400,
            &format!("wrong code ({left} tries left)"),
        );
    }
    expect(
        idp.post("/sms/verify_code", Some(&session), json!({ "code": wrong }))
            .await,
        429,
        "too many wrong codes",
    );
    expect(
        idp.post("/sms/verify_code", Some(&session), json!({ "code": right }))
            .await,
        429,
        "too many wrong codes",
    );
    expect(
        idp.post("/sms/resend_code", Some(&session), Value::Null)
            .await,
        429,
        "too many wrong codes",
    );

    // Too many resends: 3 allowed, the 4th refused (and no SMS sent for it).
    let session = idp.register("+15551230002").await;
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );
    for _ in 0..3 {
        assert_eq!(
            idp.post("/sms/resend_code", Some(&session), Value::Null)
                .await
                .0,
            200
        );
    }
    let sent = idp.sms.received().len();
    expect(
        idp.post("/sms/resend_code", Some(&session), Value::Null)
            .await,
        429,
        "too many resends",
    );
    assert_eq!(idp.sms.received().len(), sent);

    // The SMS provider failing is a 502, and the session can try again.
    let session = idp.register("+15551230003").await;
    idp.sms.set_mode(testkit::Mode::Status(500));
    expect(
        idp.post("/sms/verify", Some(&session), Value::Null).await,
        502,
        "could not be sent",
    );
    idp.sms.set_mode(testkit::Mode::Ok);
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );

    // Still serving after all of it.
    let (token, _) = idp.sign_up("+15551230004").await;
    assert!(!token.is_empty());
}

#[tokio::test]
async fn an_expired_session_token_is_refused() {
    let idp = TestIdp::start(|s| {
        s.session_ttl = Duration::from_secs(1);
        s.code_ttl = Duration::from_secs(1);
    })
    .await;
    let session = idp.register("+15551234567").await;
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = idp
        .post(
            "/sms/verify_code",
            Some(&session),
            json!({ "code": idp.last_code() }),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("expired session"));
    assert_eq!(
        idp.post("/unregister", Some(&session), Value::Null).await.0,
        401
    );
}

#[tokio::test]
async fn rates_are_limited_per_number_and_per_address() {
    let idp = TestIdp::start(|s| {
        s.rate_per_number = 2;
        s.rate_per_addr = 8;
    })
    .await;
    // Per number: register, register, then refused; another number is fine.
    idp.register("+15551234567").await;
    idp.register("+15551234567").await;
    let (status, body) = idp
        .post("/register", None, json!({ "msisdn": "+15551234567" }))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("this number"));
    idp.register("+15551234500").await;
    // Per address: 8 requests a minute from 127.0.0.1, the 5th so far above.
    for _ in 0..4 {
        let (status, _) = idp
            .post("/register", None, json!({ "msisdn": "bad" }))
            .await;
        assert_eq!(status, 400);
    }
    let (status, body) = idp
        .post("/register", None, json!({ "msisdn": "+15551234599" }))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("this address"));
    // The JWKS is not rate limited.
    idp.jwks().await;
}

#[tokio::test]
async fn unregister_deletes_and_revokes_and_a_new_registration_works_again() {
    let idp = TestIdp::start(|_| {}).await;
    // With the verified session's token.
    let session = idp.register("+15551234567").await;
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );
    let (_, body) = idp
        .post(
            "/sms/verify_code",
            Some(&session),
            json!({ "code": idp.last_code() }),
        )
        .await;
    let user = uid(body["user_id"].as_str().unwrap());
    let before = protocol::claims::now_secs();
    let (status, body) = idp.post("/unregister", Some(&session), Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "deleted": true, "user_id": user.as_str() }));
    assert_eq!(idp.store.registration(&user).await.unwrap(), None);
    let Some(Revocation::IssuedBefore(cutoff)) = idp.store.revocation(&user).await.unwrap() else {
        panic!("unregister records IssuedBefore");
    };
    assert!(cutoff > before);
    // The session is gone with it.
    assert_eq!(
        idp.post("/unregister", Some(&session), Value::Null).await.0,
        401
    );

    // Registering again (in the same second): the new token's iat is not
    // before the cut-off, so the broker accepts it.
    let (token, again) = idp.sign_up("+15551234567").await;
    assert_eq!(again, user.as_str());
    let (jwks, _) = idp.jwks().await;
    let claims = verify_with_jwks(&token, &jwks, "test-idp", "mqtt-broker").unwrap();
    assert!(claims["iat"].as_u64().unwrap() >= cutoff);
    assert!(!Revocation::IssuedBefore(cutoff).refuses(claims["iat"].as_u64()));

    // With the device token itself.
    let (status, body) = idp.post("/unregister", Some(&token), Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], user.as_str());
    assert_eq!(idp.store.registration(&user).await.unwrap(), None);
    // Revoked now: the same token cannot unregister again (it would wipe
    // an account registered since), nor can the suspended user's.
    let (status, body) = idp.post("/unregister", Some(&token), Value::Null).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let (fresh, _) = idp.sign_up("+15551234567").await;
    idp.store.revoke_user(&user, Revocation::All).await.unwrap();
    let (status, body) = idp.post("/unregister", Some(&fresh), Value::Null).await;
    assert_eq!(status, 403, "{body}");
    assert!(idp.store.registration(&user).await.unwrap().is_some());
    idp.store.restore_user(&user).await.unwrap();
    // A forged device token is refused.
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(
        idp.post("/unregister", Some(&forged), Value::Null).await.0,
        401
    );
}

#[tokio::test]
async fn admin_endpoints_need_their_token() {
    let idp = TestIdp::start(|_| {}).await;
    let (_, user) = idp.sign_up("+15551234567").await;
    let revoke = format!("/admin/users/{user}/revoke");
    let restore = format!("/admin/users/{user}/restore");
    for bearer in [None, Some("wrong-admin-token-0123456789"), Some("")] {
        let (status, body) = idp.post(&revoke, bearer, Value::Null).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(
            idp.post("/admin/keys/rotate", bearer, Value::Null).await.0,
            401
        );
    }
    assert_eq!(idp.store.revocation(&uid(&user)).await.unwrap(), None);

    let (status, body) = idp.post(&revoke, Some(ADMIN_TOKEN), Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        idp.store.revocation(&uid(&user)).await.unwrap(),
        Some(Revocation::All)
    );
    // A suspended user gets no new token.
    let session = idp.register("+15551234567").await;
    assert_eq!(
        idp.post("/sms/verify", Some(&session), Value::Null).await.0,
        200
    );
    let (status, body) = idp
        .post(
            "/sms/verify_code",
            Some(&session),
            json!({ "code": idp.last_code() }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("suspended"));

    let (status, _) = idp.post(&restore, Some(ADMIN_TOKEN), Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(idp.store.revocation(&uid(&user)).await.unwrap(), None);
    let (status, _) = idp
        .post(
            "/admin/users/bad_uid/revoke",
            Some(ADMIN_TOKEN),
            Value::Null,
        )
        .await;
    assert_eq!(status, 400);

    // Rotation: the new key signs, the old one stays published.
    let (old_token, _) = idp.sign_up("+15551234500").await;
    let old_kid = idp.service.keys.active_meta().unwrap().kid;
    let (status, body) = idp
        .post("/admin/keys/rotate", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 200, "{body}");
    let new_kid = body["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    let (new_token, _) = idp.sign_up("+15551234501").await;
    assert_eq!(
        jsonwebtoken::decode_header(&new_token)
            .unwrap()
            .kid
            .as_deref(),
        Some(new_kid.as_str())
    );
    let (jwks, _) = idp.jwks().await;
    assert!(verify_with_jwks(&old_token, &jwks, "test-idp", "mqtt-broker").is_ok());
    assert!(verify_with_jwks(&new_token, &jwks, "test-idp", "mqtt-broker").is_ok());
}

#[tokio::test]
async fn admin_endpoints_are_disabled_without_a_token() {
    let idp = TestIdp::start(|s| s.admin_token = None).await;
    let (status, body) = idp
        .post("/admin/users/abc/revoke", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("IDP_ADMIN_TOKEN"));
}

/// A retired key leaves the JWKS once every token it signed has expired.
#[tokio::test]
async fn a_retired_key_leaves_the_jwks_after_its_tokens_expired() {
    let idp = TestIdp::start(|s| {
        s.token_ttl = Duration::from_secs(2);
        s.key_retire_leeway = Duration::from_secs(0);
    })
    .await;
    let old_kid = idp.service.keys.active_meta().unwrap().kid;
    let (status, _) = idp
        .post("/admin/keys/rotate", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 200);
    let kids = |jwks: &Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(kids(&idp.jwks().await.0).contains(&old_kid));
    // retired_at + 2 s TTL + 0 leeway, counted in whole seconds.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let now_published = kids(&idp.jwks().await.0);
    assert!(!now_published.contains(&old_kid), "{now_published:?}");
    assert_eq!(now_published.len(), 1);
}
