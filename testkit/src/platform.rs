//! A fake platform endpoint: axum on `127.0.0.1:0`, answering POSTs on any
//! path. It records each request (method, path, the headers the handlers
//! send, the JSON body) and answers 200, a chosen status, or never.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the platform received.
#[derive(Debug, Clone)]
pub struct Received {
    /// `POST`, normally.
    pub method: String,
    /// The request path, e.g. `/in`.
    pub path: String,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
}

/// How the platform answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 OK.
    Ok,
    /// This status code.
    Status(u16),
    /// Never (the request hangs for an hour).
    Hang,
}

#[derive(Clone)]
struct PlatformState {
    received: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
}

/// A running fake platform; the server stops on drop.
pub struct Platform {
    /// Where it listens.
    pub addr: SocketAddr,
    state: PlatformState,
    server: tokio::task::JoinHandle<()>,
}

impl Platform {
    /// Binds `127.0.0.1:0` and serves in a task on the current runtime.
    pub async fn start() -> Platform {
        let state = PlatformState {
            received: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake platform on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake platform address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Platform {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How to answer from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("platform mode lock") = mode;
    }

    /// Every request so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .expect("platform received lock")
            .clone()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(state): State<PlatformState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state
        .received
        .lock()
        .expect("platform received lock")
        .push(Received {
            method: method.to_string(),
            path: uri.path().to_owned(),
            idempotency_key: header("idempotency-key"),
            authorization: header("authorization"),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
    let mode = *state.mode.lock().expect("platform mode lock");
    match mode {
        Mode::Ok => StatusCode::OK,
        Mode::Status(code) => StatusCode::from_u16(code).expect("a valid HTTP status code"),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK
        }
    }
}
