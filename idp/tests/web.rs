//! The sign-up page over real HTTP: each file with its content type and the
//! security headers, the MQTT URL in `/app/config.json`, `/` leading to the
//! page, and nothing outside the page's table served, whatever the path.

// Test code: a failure here is a failed test, not input reaching a panic
// (the workspace lints forbid these in library code only).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use common::TestIdp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_page_is_served_with_its_types_and_policy() {
    let idp = TestIdp::start(|s| s.web_mqtt_url = Some("wss://localhost:8884/mqtt".into())).await;
    for (path, kind, contains) in [
        ("/app/", "text/html; charset=utf-8", "vendor/mqtt.min.js"),
        (
            "/app/app.js",
            "text/javascript; charset=utf-8",
            "sync_session_confirm",
        ),
        ("/app/style.css", "text/css; charset=utf-8", "main {"),
        (
            "/app/vendor/mqtt.min.js",
            "text/javascript; charset=utf-8",
            "mqtt",
        ),
        (
            "/app/vendor/qrcode.js",
            "text/javascript; charset=utf-8",
            "Kazuhiko Arase",
        ),
    ] {
        let response = idp
            .http
            .get(format!("{}{path}", idp.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], kind, "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["x-frame-options"], "DENY");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self';"),
            "{csp}"
        );
        assert!(
            csp.contains("connect-src 'self' wss://localhost:8884;"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        let body = response.text().await.unwrap();
        assert!(body.contains(contains), "{path}");
    }
    let config: serde_json::Value = idp
        .http
        .get(format!("{}/app/config.json", idp.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["mqtt_url"], "wss://localhost:8884/mqtt");

    // `/` and `/app` lead to the page.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/", "/app"] {
        let response = no_redirects
            .get(format!("{}{path}", idp.base))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_redirection(), "{path}");
        assert_eq!(response.headers()["location"], "/app/");
    }
}

#[tokio::test]
async fn no_path_reaches_a_file_outside_the_page() {
    let idp = TestIdp::start(|_| {}).await;
    // Raw requests: an HTTP client would normalise `..` away before sending.
    for path in [
        "/app/../Cargo.toml",
        "/app/..%2f..%2fCargo.toml",
        "/app/%2e%2e/%2e%2e/Cargo.toml",
        "/app/vendor/../../src/web.rs",
        "/app/vendor/",
        "/app/web.rs",
        "/app//etc/passwd",
    ] {
        let mut socket = tokio::net::TcpStream::connect(idp.addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            socket.read_to_string(&mut answer),
        )
        .await
        .expect("answered within 5 s")
        .unwrap();
        let status = answer.split(' ').nth(1).unwrap_or("");
        assert!(status == "404" || status == "400", "{path}: {answer}");
        assert!(
            !answer.contains("[package]") && !answer.contains("Owns the sign-up page"),
            "{path}"
        );
    }
    // Without IDP_WEB_MQTT_URL the page says so through its config.
    let config: serde_json::Value = idp
        .http
        .get(format!("{}/app/config.json", idp.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["mqtt_url"], serde_json::Value::Null);
}
