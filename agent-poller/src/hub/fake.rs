//! A tiny scriptable Hub for the client's unit tests: an axum server on 127.0.0.1:0 that
//! records every request and answers with whatever the test's handler returns.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::config;

pub(crate) const TARGET_ID: &str = "3f8e2a4c-6d1b-4e7f-9a2c-5b8d1e4f7a90";
pub(crate) const TARGET_SECRET: &str = "fake-target-secret";

/// One request the fake received.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) authorization: Option<String>,
    pub(crate) user_agent: Option<String>,
    pub(crate) content_length: Option<String>,
    pub(crate) body: Vec<u8>,
}

impl Seen {
    pub(crate) fn is_login(&self) -> bool {
        self.path.ends_with("/login")
    }

    /// The Basic-auth `user:password` of a login.
    pub(crate) fn basic(&self) -> Option<String> {
        let encoded = self.authorization.as_deref()?.strip_prefix("Basic ")?;
        String::from_utf8(STANDARD.decode(encoded).ok()?).ok()
    }

    pub(crate) fn bearer(&self) -> Option<&str> {
        self.authorization.as_deref()?.strip_prefix("Bearer ")
    }
}

/// What the handler wants answered.
pub(crate) enum Reply {
    Now(Response),
    After(Duration, Response),
}

impl<T: IntoResponse> From<T> for Reply {
    fn from(response: T) -> Self {
        Reply::Now(response.into_response())
    }
}

type Handler = Box<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct Shared {
    seen: Mutex<Vec<Seen>>,
    handler: Handler,
}

pub(crate) struct FakeHub {
    pub(crate) base: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeHub {
    pub(crate) async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let shared = Arc::new(Shared {
            seen: Mutex::new(Vec::new()),
            handler: Box::new(handler),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = shared.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let seen = Seen {
                    method,
                    path: uri.path().to_owned(),
                    authorization: header("authorization"),
                    user_agent: header("user-agent"),
                    content_length: header("content-length"),
                    body: body.to_vec(),
                };
                state.seen.lock().unwrap().push(seen.clone());
                match (state.handler)(&seen) {
                    Reply::Now(response) => response,
                    Reply::After(delay, response) => {
                        tokio::time::sleep(delay).await;
                        response
                    }
                }
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, shared, task }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub(crate) fn logins(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(Seen::is_login).collect()
    }

    pub(crate) fn calls(&self, suffix: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path.ends_with(suffix)).collect()
    }

    /// The `DISTR_*` variables pointing at this fake.
    pub(crate) fn env(&self) -> HashMap<String, String> {
        let api = format!("{}/api/v1/agent", self.base);
        [
            (config::TARGET_ID, TARGET_ID.to_owned()),
            (config::TARGET_SECRET, TARGET_SECRET.to_owned()),
            (config::LOGIN_ENDPOINT, format!("{api}/login")),
            (config::RESOURCE_ENDPOINT, format!("{api}/resources")),
            (config::STATUS_ENDPOINT, format!("{api}/status")),
            (config::MANIFEST_ENDPOINT, format!("{api}/manifest")),
            (config::METRICS_ENDPOINT, format!("{api}/metrics")),
            (config::LOGS_ENDPOINT, format!("{api}/logs")),
            (config::AGENT_LOGS_ENDPOINT, format!("{api}/deployment-target-logs")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// An unsigned-looking JWT expiring `lifetime_secs` from now (negative: already expired).
/// Every call gives a different token.
pub(crate) fn jwt(lifetime_secs: i64) -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = serde_json::json!({
        "exp": now + lifetime_secs,
        "iat": now,
        "nbf": now,
        "sub": TARGET_ID,
        "jti": SERIAL.fetch_add(1, Ordering::Relaxed),
    });
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// `{"token": jwt}` as a 200 answer.
pub(crate) fn token_reply(jwt: &str) -> Reply {
    axum::Json(serde_json::json!({ "token": jwt })).into()
}

/// A 200 answer of `total` bytes streamed in 64 KiB chunks, without `Content-Length`.
pub(crate) fn streamed(total: usize) -> Reply {
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let count = total.div_ceil(chunk.len());
    let chunks = std::iter::repeat_n(chunk, count).map(Ok::<_, std::io::Error>);
    Reply::Now((StatusCode::OK, Body::from_stream(futures::stream::iter(chunks))).into_response())
}
