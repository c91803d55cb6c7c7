//! Owns the sign-up page: the static files of `idp/web/` (compiled into the
//! binary, so a running service needs no files beside it), their content
//! types and security headers, and `/app/config.json`, which tells the page
//! where the broker's MQTT-over-WebSocket listener is (`IDP_WEB_MQTT_URL`).
//!
//! Files are looked up by exact name in [`FILES`]: a request path is never
//! joined to a directory, so no path (`..`, encoded or not) reaches a file
//! that is not in the table. Every answer carries a Content-Security-Policy
//! that allows scripts, styles and images from this origin only (images
//! also as `data:`, the QR code; workers as `blob:`, MQTT.js's timers), and
//! connections to this origin and to the MQTT URL's origin only.

use axum::extract::{Path, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// Where the page lives.
pub const PREFIX: &str = "/app/";

/// The page's files: name under [`PREFIX`], content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/style.css"),
    ),
    (
        "vendor/mqtt.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/vendor/mqtt.min.js"),
    ),
    (
        "vendor/qrcode.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/vendor/qrcode.js"),
    ),
];

/// The file served at `/app/<name>`, with its content type.
pub fn file(name: &str) -> Option<(&'static str, &'static [u8])> {
    let name = if name.is_empty() { "index.html" } else { name };
    FILES
        .iter()
        .find(|(known, _, _)| *known == name)
        .map(|(_, kind, bytes)| (*kind, *bytes))
}

/// Why an MQTT URL for the page was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MqttUrlError {
    #[error("not a URL: use e.g. wss://mqtt.example.com:8884/mqtt")]
    NotAUrl,
    #[error("the scheme must be wss (or ws on loopback or behind a TLS proxy), e.g. wss://mqtt.example.com:8884/mqtt")]
    Scheme,
    #[error("it must not carry a user name, password, query or fragment: the page logs in with the token")]
    Extra,
}

/// The page's MQTT URL when `IDP_WEB_MQTT_URL` is unset and the service
/// runs inside the `broker` binary, from the broker's own WebSocket
/// listeners as bound: plain `ws_addr` on loopback first (the page is
/// served over plain HTTP on the same machine, and a browser needs no
/// certificate for it), else `wss_addr` on loopback as `wss://localhost`
/// (the name the development certificate carries; the browser must trust
/// its CA). Anything else: `None`, since only the operator knows the name
/// browsers reach the broker by.
pub fn local_mqtt_url(
    ws_addr: Option<std::net::SocketAddr>,
    wss_addr: Option<std::net::SocketAddr>,
) -> Option<String> {
    if let Some(ws) = ws_addr.filter(|a| a.ip().is_loopback()) {
        return Some(format!("ws://{ws}/mqtt"));
    }
    wss_addr
        .filter(|a| a.ip().is_loopback())
        .map(|wss| format!("wss://localhost:{}/mqtt", wss.port()))
}

/// The page's settings, read once at start.
#[derive(Clone, Debug)]
pub struct Page {
    /// The broker's MQTT-over-WebSocket URL (`wss://host:port/mqtt`), or
    /// `None`: the page says the service was started without one.
    mqtt_url: Option<String>,
    /// The Content-Security-Policy every answer carries.
    csp: HeaderValue,
}

impl Page {
    /// Checks `mqtt_url` and builds the policy that lets the page reach it.
    pub fn new(mqtt_url: Option<&str>) -> Result<Page, MqttUrlError> {
        let origin = match mqtt_url {
            Some(url) => Some(mqtt_origin(url)?),
            None => None,
        };
        let connect = match &origin {
            Some(origin) => format!("'self' {origin}"),
            None => "'self'".to_owned(),
        };
        // `worker-src blob:`: MQTT.js runs its keep-alive timers in a
        // worker it makes from a blob, so that a tab in the background (whose
        // timers browsers throttle) keeps its connection.
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src {connect}; worker-src blob:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        );
        let csp = HeaderValue::from_str(&csp).map_err(|_| MqttUrlError::NotAUrl)?;
        Ok(Page {
            mqtt_url: mqtt_url.map(str::to_owned),
            csp,
        })
    }

    fn headers(&self, content_type: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(CONTENT_SECURITY_POLICY, self.csp.clone());
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        );
        // Small files that change with the binary: revalidate every time.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers
    }
}

/// `scheme://host[:port]` of a WebSocket URL, as a CSP source.
fn mqtt_origin(url: &str) -> Result<String, MqttUrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| MqttUrlError::NotAUrl)?;
    if !matches!(parsed.scheme(), "ws" | "wss") {
        return Err(MqttUrlError::Scheme);
    }
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(MqttUrlError::Extra);
    }
    let host = parsed.host_str().ok_or(MqttUrlError::NotAUrl)?;
    Ok(match parsed.port() {
        Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    })
}

/// The page's routes: `/` and `/app` lead to `/app/`, the files under it.
pub fn routes<S>(page: Page) -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to(PREFIX) }))
        .route("/app", get(|| async { Redirect::to(PREFIX) }))
        .route("/app/", get(index))
        .route("/app/config.json", get(config))
        .route("/app/*name", get(static_file))
        .with_state(Arc::new(page))
}

async fn index(State(page): State<Arc<Page>>) -> Response {
    serve(&page, "")
}

async fn static_file(State(page): State<Arc<Page>>, Path(name): Path<String>) -> Response {
    serve(&page, &name)
}

fn serve(page: &Page, name: &str) -> Response {
    match file(name) {
        Some((kind, bytes)) => (StatusCode::OK, page.headers(kind), bytes).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            page.headers("text/plain; charset=utf-8"),
            "no such file\n",
        )
            .into_response(),
    }
}

async fn config(State(page): State<Arc<Page>>) -> Response {
    let body = serde_json::json!({ "mqtt_url": page.mqtt_url });
    let mut headers = page.headers("application/json");
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    (
        StatusCode::OK,
        headers,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listed_files_are_served() {
        assert_eq!(file("").map(|f| f.0), Some("text/html; charset=utf-8"));
        assert_eq!(
            file("app.js").map(|f| f.0),
            Some("text/javascript; charset=utf-8")
        );
        assert!(file("vendor/mqtt.min.js").is_some());
        for name in [
            "../Cargo.toml",
            "vendor/../app.js",
            "..%2fCargo.toml",
            "/etc/passwd",
            "vendor/",
            "vendor",
            "APP.JS",
            "app.js/",
            "web.rs",
        ] {
            assert!(file(name).is_none(), "{name}");
        }
    }

    #[test]
    fn the_mqtt_url_is_checked_and_its_origin_allowed() {
        let page = Page::new(Some("wss://localhost:8884/mqtt")).unwrap();
        let csp = page.csp.to_str().unwrap();
        assert!(
            csp.contains("connect-src 'self' wss://localhost:8884;"),
            "{csp}"
        );
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(
            mqtt_origin("ws://127.0.0.1:8083/mqtt").unwrap(),
            "ws://127.0.0.1:8083"
        );
        assert_eq!(
            mqtt_origin("wss://mqtt.example.com/mqtt").unwrap(),
            "wss://mqtt.example.com"
        );
        assert_eq!(
            mqtt_origin("https://x/mqtt").unwrap_err(),
            MqttUrlError::Scheme
        );
        assert_eq!(mqtt_origin("not a url").unwrap_err(), MqttUrlError::NotAUrl);
        assert_eq!(
            mqtt_origin("wss://u:p@x/mqtt").unwrap_err(),
            MqttUrlError::Extra
        );
        assert_eq!(
            mqtt_origin("wss://x/mqtt?a=1").unwrap_err(),
            MqttUrlError::Extra
        );
        let none = Page::new(None).unwrap();
        assert!(none.csp.to_str().unwrap().contains("connect-src 'self';"));
    }

    #[test]
    fn the_broker_binary_offers_its_own_loopback_websocket() {
        let ws = "127.0.0.1:8083".parse().ok();
        let wss = "127.0.0.1:8084".parse().ok();
        let public = "0.0.0.0:8084".parse().ok();
        assert_eq!(
            local_mqtt_url(ws, wss).as_deref(),
            Some("ws://127.0.0.1:8083/mqtt")
        );
        assert_eq!(
            local_mqtt_url(None, wss).as_deref(),
            Some("wss://localhost:8084/mqtt")
        );
        assert_eq!(
            local_mqtt_url("[::1]:8083".parse().ok(), None).as_deref(),
            Some("ws://[::1]:8083/mqtt")
        );
        assert_eq!(local_mqtt_url(None, public), None);
        assert_eq!(local_mqtt_url(public, None), None);
        assert_eq!(local_mqtt_url(None, None), None);
        // What it gives, the page accepts.
        for url in [local_mqtt_url(ws, None), local_mqtt_url(None, wss)] {
            assert!(Page::new(url.as_deref()).is_ok(), "{url:?}");
        }
    }
}
