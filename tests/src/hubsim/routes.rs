//! The HTTP side of the simulator: one axum route per Hub endpoint, all going through
//! [`handle`], which records the request, applies the failure switches, authenticates and
//! answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post, put};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use super::jwt::{self, Claims};
use super::{Failure, RecordedRequest, Route, Shared};

/// The router serving every Hub route.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    fn on(route: Route) -> MethodRouter<Arc<Shared>> {
        let handler =
            move |State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                handle(shared, route, method, uri, headers, body)
            };
        match route {
            Route::Login | Route::Status | Route::Metrics => post(handler),
            Route::Resources | Route::Manifest => get(handler),
            Route::Logs | Route::AgentLogs => put(handler),
        }
    }
    Route::ALL
        .into_iter()
        .fold(Router::new(), |router, route| router.route(route.path(), on(route)))
        .with_state(shared)
}

/// Who a request claims to be.
enum Auth {
    /// Login: the Basic-auth user and password, if present and well-formed.
    Basic(Option<(String, String)>),
    /// Other routes: the target of a valid bearer token, or why it was refused.
    Bearer(Result<Uuid, &'static str>),
}

impl Auth {
    fn target(&self) -> Option<Uuid> {
        match self {
            Auth::Basic(credentials) => credentials.as_ref().and_then(|(user, _)| Uuid::parse_str(user).ok()),
            Auth::Bearer(result) => result.as_ref().ok().copied(),
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    route: Route,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user_agent = headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (seq, auth, failure) = {
        let mut state = shared.lock();
        let auth = match route {
            Route::Login => Auth::Basic(basic_credentials(&headers)),
            _ => Auth::Bearer(shared.verify_bearer(&state, &headers)),
        };
        let seq = state.requests.len();
        state.requests.push(RecordedRequest {
            seq,
            received_at: Utc::now(),
            method: method.to_string(),
            path: uri.path().to_owned(),
            route,
            target: auth.target(),
            user_agent,
            body: serde_json::from_slice(&body).ok(),
            status: None,
        });
        (seq, auth, state.take_failure(route))
    };
    let response = respond(&shared, route, auth, &body, failure).await;
    if let Some(request) = shared.lock().requests.get_mut(seq) {
        request.status = Some(response.status().as_u16());
    }
    response
}

async fn respond(shared: &Shared, route: Route, auth: Auth, body: &[u8], failure: Option<Failure>) -> Response {
    match &failure {
        Some(Failure::Status(code)) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, "simulated failure").into_response();
        }
        Some(Failure::Stall(duration)) => shared.stall(*duration).await,
        _ => {}
    }
    let empty_deployments = matches!(failure, Some(Failure::EmptyDeployments));
    let response = match auth {
        Auth::Basic(credentials) => shared.login(credentials),
        Auth::Bearer(Err(reason)) => (StatusCode::UNAUTHORIZED, reason).into_response(),
        Auth::Bearer(Ok(target)) => match shared.admit_agent_call(target) {
            Err(wait) => too_many_requests(wait),
            Ok(()) => shared.serve(route, target, body, empty_deployments),
        },
    };
    if response.status() != StatusCode::OK {
        return response;
    }
    match failure {
        Some(Failure::MalformedJson) => malformed(),
        Some(Failure::Oversized(size)) => oversized(size),
        Some(Failure::Truncated) => truncated(response).await,
        _ => response,
    }
}

impl Shared {
    /// Verifies `Authorization: Bearer <JWT>` against the signing key and the target's
    /// revocations.
    fn verify_bearer(&self, state: &super::state::SimState, headers: &HeaderMap) -> Result<Uuid, &'static str> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("missing bearer token")?;
        let claims = jwt::verify(&self.key, token, Utc::now().timestamp()).map_err(|e| match e {
            jwt::JwtError::Expired => "token expired",
            jwt::JwtError::NotYetValid => "token not valid yet",
            _ => "invalid token",
        })?;
        let target_id = Uuid::parse_str(&claims.sub).map_err(|_| "invalid token subject")?;
        let target = state.targets.get(&target_id).ok_or("unknown target")?;
        if target.revoked.contains(&claims.jti) {
            return Err("token revoked");
        }
        Ok(target_id)
    }

    /// `POST /login`: rate limit per claimed id, then 400 / 401 / a fresh token.
    fn login(&self, credentials: Option<(String, String)>) -> Response {
        let Some((user, password)) = credentials else {
            return (StatusCode::UNAUTHORIZED, "missing basic auth").into_response();
        };
        let mut state = self.lock();
        if let Some(limit) = state.login_rate_limit
            && let Err(wait) = state.login_limiter.admit(&user, limit, Instant::now())
        {
            return too_many_requests(wait);
        }
        let Ok(target_id) = Uuid::parse_str(&user) else {
            return (StatusCode::BAD_REQUEST, "target id is not a UUID").into_response();
        };
        let lifetime = i64::try_from(state.token_lifetime.as_secs()).unwrap_or(i64::MAX / 2);
        let Some(target) = state.targets.get_mut(&target_id) else {
            return (StatusCode::UNAUTHORIZED, "unknown target").into_response();
        };
        if target.secret.as_deref() != Some(password.as_str()) {
            return (StatusCode::UNAUTHORIZED, "wrong secret").into_response();
        }
        let token = match &target.fixed_token {
            Some(token) => token.clone(),
            None => self.issue(target, target_id, lifetime),
        };
        axum::Json(json!({ "token": token })).into_response()
    }

    /// Signs a token for `target_id` valid for `lifetime` seconds from now (negative: expired).
    pub(crate) fn issue(&self, target: &mut super::state::Target, target_id: Uuid, lifetime: i64) -> String {
        let now = Utc::now().timestamp();
        let claims = Claims {
            exp: now.saturating_add(lifetime),
            nbf: now.min(now.saturating_add(lifetime)),
            iat: now,
            sub: target_id.to_string(),
            aud: jwt::AUDIENCE.to_owned(),
            org: self.org_id.to_string(),
            jti: Uuid::new_v4().to_string(),
        };
        target.issued.push(claims.jti.clone());
        let token = jwt::sign(&self.key, &claims);
        if let Some(env) = crate::TestEnv::try_get() {
            env.record_secret(&token);
        }
        token
    }

    /// Applies the agent-route rate limit; `Err` says how long until a call is admitted.
    fn admit_agent_call(&self, target: Uuid) -> Result<(), Duration> {
        let mut state = self.lock();
        match state.agent_rate_limit {
            Some(limit) => state.agent_limiter.admit(&target.to_string(), limit, Instant::now()),
            None => Ok(()),
        }
    }

    /// The answer of an authenticated agent route.
    fn serve(&self, route: Route, target_id: Uuid, body: &[u8], empty_deployments: bool) -> Response {
        let state = self.lock();
        let Some(target) = state.targets.get(&target_id) else {
            return (StatusCode::UNAUTHORIZED, "unknown target").into_response();
        };
        match route {
            Route::Login => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            Route::Resources => axum::Json(target.resources(empty_deployments)).into_response(),
            Route::Manifest => match &target.manifest {
                Some(manifest) => ([(CONTENT_TYPE, "application/yaml")], manifest.clone()).into_response(),
                None => (StatusCode::NOT_FOUND, "no manifest set for this target").into_response(),
            },
            Route::Status => match check_status(body) {
                Err(reason) => (StatusCode::BAD_REQUEST, reason).into_response(),
                Ok(revision) if !target.known_revisions.contains(&revision) => {
                    (StatusCode::BAD_REQUEST, "unknown revision id").into_response()
                }
                Ok(_) => StatusCode::OK.into_response(),
            },
            Route::Metrics => match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(_)) => StatusCode::OK.into_response(),
                _ => (StatusCode::BAD_REQUEST, "metrics must be a JSON object").into_response(),
            },
            Route::Logs | Route::AgentLogs => match serde_json::from_slice::<Value>(body) {
                Ok(Value::Array(_)) => StatusCode::NO_CONTENT.into_response(),
                _ => (StatusCode::BAD_REQUEST, "logs must be a JSON array").into_response(),
            },
        }
    }

    /// Holds a request for `duration`, or until the failure switches change.
    async fn stall(&self, duration: Option<Duration>) {
        match duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => {
                let mut changes = self.changes.subscribe();
                let _ = changes.changed().await;
            }
        }
    }
}

/// Validates a status body, returning its revision id.
fn check_status(body: &[u8]) -> Result<String, &'static str> {
    let value: Value = serde_json::from_slice(body).map_err(|_| "status body is not JSON")?;
    let revision = value
        .get("revisionId")
        .and_then(Value::as_str)
        .ok_or("missing revisionId")?;
    match value.get("type").and_then(Value::as_str) {
        Some("healthy" | "running" | "progressing" | "error") => {}
        _ => return Err("type must be healthy, running, progressing or error"),
    }
    if !value.get("message").is_some_and(Value::is_string) {
        return Err("missing message");
    }
    Ok(revision.to_owned())
}

/// `user:password` from `Authorization: Basic ...`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let encoded = headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn too_many_requests(wait: Duration) -> Response {
    let seconds = wait.as_secs().max(1).to_string();
    let retry_after = HeaderValue::from_str(&seconds).unwrap_or(HeaderValue::from_static("60"));
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(RETRY_AFTER, retry_after)],
        "rate limited",
    )
        .into_response()
}

fn malformed() -> Response {
    ([(CONTENT_TYPE, "application/json")], "{\"deployments\": [{\"id\": oops").into_response()
}

/// `size` bytes of an unterminated JSON document, streamed without `Content-Length`.
fn oversized(size: usize) -> Response {
    const CHUNK: usize = 64 * 1024;
    let head = Bytes::from_static(b"{\"deployments\":[],\"padding\":\"");
    let head = head.slice(..head.len().min(size));
    let filler = Bytes::from(vec![b'x'; CHUNK]);
    let body_len = size.saturating_sub(head.len());
    let tail = filler.slice(..body_len % CHUNK);
    let chunks = std::iter::once(head)
        .chain(std::iter::repeat_n(filler, body_len / CHUNK))
        .chain(std::iter::once(tail))
        .filter(|chunk| !chunk.is_empty())
        .map(Ok::<_, std::io::Error>);
    let stream = futures::stream::iter(chunks);
    ([(CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}

/// Announces more bytes than it sends (half of the real body), then breaks the connection.
async fn truncated(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let announced = body.len() + 1024;
    let sent = body.slice(..body.len() / 2);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(announced));
    // Break the connection only after hyper has had time to flush the head and the part.
    let stream = futures::stream::iter([Some(sent), None]).then(|part| async move {
        match part {
            Some(bytes) => Ok(bytes),
            None => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "simulated truncation",
                ))
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}
