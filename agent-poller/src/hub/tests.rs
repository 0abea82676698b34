//! [`HubClient`] against the scriptable fake Hub of `fake.rs`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use uuid::Uuid;

use super::fake::{FakeHub, Reply, Seen, TARGET_ID, TARGET_SECRET, jwt, streamed, token_reply};
use super::*;
use crate::config::{self, ConfigSource};

const RESOURCES: &str = "/api/v1/agent/resources";
const STATUS: &str = "/api/v1/agent/status";

fn resources_body() -> serde_json::Value {
    json!({
        "version": {"id": "7c0e5f4e-9a59-4c1b-bb4c-0c8f5a1f2d3e", "createdAt": "2025-01-02T03:04:05Z", "name": "1.2.3"},
        "namespace": "ns",
        "metricsEnabled": false,
        "unknownTopLevel": true,
        "deployments": [{
            "id": "11111111-2222-4333-8444-555555555555",
            "revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa",
            "releaseName": "web",
            "chartUrl": "oci://registry.example.com/charts/web",
            "chartVersion": "1.0.0",
            "values": {"a": 1},
            "composeFile": "services: {}",
            "dockerType": "compose",
            "imageCleanupEnabled": true,
            "brandNew": [1, 2, 3]
        }]
    })
}

fn client_for(fake: &FakeHub, options: ClientOptions) -> HubClient {
    agent_runtime::install_crypto_provider();
    HubClient::with_options(Arc::new(ConfigSource::from_env(fake.env())), "1.2.3", options).expect("client")
}

fn new_client(fake: &FakeHub) -> HubClient {
    client_for(fake, ClientOptions::default())
}

/// A fake Hub whose logins issue tokens of the given lifetime and whose other routes answer
/// with `route` when the bearer is one it issued.
async fn hub_with(lifetime: i64, route: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FakeHub {
    let issued = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    FakeHub::start(move |seen| {
        if seen.is_login() {
            let token = jwt(lifetime);
            issued.lock().unwrap().push(token.clone());
            return token_reply(&token);
        }
        if !seen
            .bearer()
            .is_some_and(|b| issued.lock().unwrap().iter().any(|t| t == b))
        {
            return StatusCode::UNAUTHORIZED.into();
        }
        route(seen)
    })
    .await
}

fn status_report() -> StatusReport {
    StatusReport {
        revision_id: Uuid::parse_str("66666666-7777-4888-9999-aaaaaaaaaaaa").unwrap(),
        status_type: StatusType::Healthy,
        message: "status check passed. 3 resources healthy".into(),
    }
}

fn resources_route(seen: &Seen) -> Reply {
    match seen.path.as_str() {
        RESOURCES => Json(resources_body()).into(),
        _ => StatusCode::OK.into(),
    }
}

#[tokio::test]
async fn logs_in_with_basic_auth_then_uses_the_bearer_and_user_agent() {
    let fake = hub_with(3600, resources_route).await;
    let client = new_client(&fake);
    let resources = client.resources().await.expect("resources");
    assert_eq!(resources.deployments.len(), 1, "docker and unknown fields ignored");
    assert_eq!(resources.deployments[0].release_name, "web");
    assert_eq!(resources.namespace.as_deref(), Some("ns"));
    client.resources().await.expect("second call");

    let seen = fake.seen();
    assert_eq!(seen.len(), 3, "one login, two resources calls: {seen:?}");
    let login = &seen[0];
    assert_eq!(login.method, Method::POST);
    assert_eq!(
        login.basic().as_deref(),
        Some(format!("{TARGET_ID}:{TARGET_SECRET}").as_str())
    );
    assert!(login.body.is_empty(), "login has no body");
    assert_eq!(login.content_length.as_deref(), Some("0"), "but says so");
    let token = client.current_token().await.expect("token");
    for call in &seen[1..] {
        assert_eq!(call.bearer(), Some(token.expose()));
    }
    for call in &seen {
        assert_eq!(call.user_agent.as_deref(), Some("DistrAgentClient/1.2.3"));
    }
    assert_eq!(client.user_agent(), "DistrAgentClient/1.2.3");
}

#[tokio::test]
async fn logs_in_again_shortly_before_expiry() {
    // 20 s left is inside the 30 s refresh margin: every call logs in again.
    let fake = hub_with(20, resources_route).await;
    let client = new_client(&fake);
    client.resources().await.expect("first");
    client.resources().await.expect("second");
    assert_eq!(fake.logins().len(), 2);

    // 120 s left: the token is reused.
    let fake = hub_with(120, resources_route).await;
    let client = new_client(&fake);
    client.resources().await.expect("first");
    client.resources().await.expect("second");
    assert_eq!(fake.logins().len(), 1);
}

#[tokio::test]
async fn keeps_the_old_token_when_a_refresh_fails() {
    let logins = Arc::new(AtomicUsize::new(0));
    let first_token = jwt(20);
    let counter = logins.clone();
    let token = first_token.clone();
    let fake = FakeHub::start(move |seen| {
        if seen.is_login() {
            return match counter.fetch_add(1, Ordering::SeqCst) {
                0 => token_reply(&token),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "database down").into(),
            };
        }
        resources_route(seen)
    })
    .await;
    let client = new_client(&fake);
    client.resources().await.expect("first call logs in");
    client.resources().await.expect("refresh fails, old token still valid");
    client.resources().await.expect("within the retry delay, no new login");
    assert_eq!(logins.load(Ordering::SeqCst), 2, "one login, one failed refresh");
    for call in fake.calls(RESOURCES) {
        assert_eq!(call.bearer(), Some(first_token.as_str()));
    }
}

#[tokio::test]
async fn an_expired_token_is_not_kept_when_the_login_fails() {
    let logins = Arc::new(AtomicUsize::new(0));
    let counter = logins.clone();
    let fake = FakeHub::start(move |seen| {
        if seen.is_login() {
            return match counter.fetch_add(1, Ordering::SeqCst) {
                0 => token_reply(&jwt(-5)),
                _ => StatusCode::SERVICE_UNAVAILABLE.into(),
            };
        }
        resources_route(seen)
    })
    .await;
    let client = new_client(&fake);
    client.resources().await.expect("an expired token is still tried once");
    let error = client.resources().await.expect_err("no valid token");
    assert_eq!(
        error.to_string(),
        "hub answered 503 Service Unavailable for POST /api/v1/agent/login"
    );
}

#[tokio::test]
async fn a_401_drops_the_token_and_retries_once_with_the_same_body() {
    let status_calls = Arc::new(AtomicUsize::new(0));
    let counter = status_calls.clone();
    let fake = hub_with(3600, move |seen| match seen.path.as_str() {
        STATUS if counter.fetch_add(1, Ordering::SeqCst) == 0 => StatusCode::UNAUTHORIZED.into(),
        _ => StatusCode::OK.into(),
    })
    .await;
    let client = new_client(&fake);
    let report = StatusReport {
        revision_id: Uuid::parse_str("66666666-7777-4888-9999-aaaaaaaaaaaa").unwrap(),
        status_type: StatusType::Healthy,
        message: "status check passed. 3 resources healthy".into(),
    };
    client.post_status(&report).await.expect("retried after 401");

    assert_eq!(fake.logins().len(), 2);
    let calls = fake.calls(STATUS);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].body, calls[1].body, "same body");
    assert_ne!(calls[0].bearer(), calls[1].bearer(), "a new token");
    let body: serde_json::Value = serde_json::from_slice(&calls[1].body).unwrap();
    assert_eq!(
        body,
        json!({"revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa", "type": "healthy",
               "message": "status check passed. 3 resources healthy"})
    );
}

#[tokio::test]
async fn a_second_401_is_an_error_without_more_retries() {
    let fake = hub_with(3600, |_| StatusCode::UNAUTHORIZED.into()).await;
    let client = new_client(&fake);
    let error = client.put_agent_logs(&[]).await.expect_err("always 401");
    assert_eq!(error.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(fake.calls("/deployment-target-logs").len(), 2);
    assert_eq!(fake.logins().len(), 2);
}

#[tokio::test]
async fn oversized_bodies_are_rejected_while_streaming() {
    let fake = hub_with(3600, |seen| match seen.path.as_str() {
        RESOURCES => streamed(4 * 1024 * 1024),
        _ => (StatusCode::OK, vec![b'x'; 200 * 1024]).into(),
    })
    .await;
    let options = ClientOptions {
        max_resources_body: 1024 * 1024,
        ..ClientOptions::default()
    };
    let client = client_for(&fake, options);
    let error = client.resources().await.expect_err("too large");
    assert!(
        matches!(error, HubError::BodyTooLarge { limit: 1_048_576, .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "hub response for GET /api/v1/agent/resources is larger than 1048576 bytes"
    );
    // The manifest has its own, larger bound.
    client
        .manifest()
        .await
        .expect("a 200 KiB manifest is under its 256 KiB bound");
    // Announced by Content-Length: refused before reading.
    let report = StatusReport {
        revision_id: Uuid::nil(),
        status_type: StatusType::Error,
        message: String::new(),
    };
    let error = client
        .post_status(&report)
        .await
        .expect_err("200 KiB answer to a status");
    assert!(
        matches!(error, HubError::BodyTooLarge { limit: 65_536, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn malformed_json_is_reported_with_the_parser_message() {
    let fake = hub_with(3600, |_| (StatusCode::OK, "{\"deployments\": [").into()).await;
    let error = new_client(&fake).resources().await.expect_err("malformed");
    let message = error.to_string();
    assert!(
        message.starts_with("hub sent a malformed response for GET /api/v1/agent/resources: "),
        "{message}"
    );
    assert!(message.contains("EOF while parsing"), "{message}");
}

#[tokio::test]
async fn failed_logins_back_off_instead_of_one_login_per_call() {
    let logins = Arc::new(AtomicUsize::new(0));
    let counter = logins.clone();
    let fake = FakeHub::start(move |seen| {
        if seen.is_login() {
            return match counter.fetch_add(1, Ordering::SeqCst) {
                0 => StatusCode::SERVICE_UNAVAILABLE.into(),
                _ => token_reply(&jwt(3600)),
            };
        }
        resources_route(seen)
    })
    .await;
    let options = ClientOptions {
        refresh_retry_after: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let client = client_for(&fake, options);
    let first = client.resources().await.expect_err("login fails");
    assert!(first.to_string().contains("503"), "{first}");
    // A cycle's other calls (statuses) do not log in again.
    for _ in 0..5 {
        let error = client.post_status(&status_report()).await.expect_err("backing off");
        assert!(matches!(error, HubError::LoginBackoff { .. }), "{error:?}");
        assert!(error.is_retryable());
        assert!(
            error.to_string().contains("after a failed login: hub answered 503"),
            "{error}"
        );
    }
    assert_eq!(logins.load(Ordering::SeqCst), 1);
    // Once the back-off has passed, the next call logs in.
    tokio::time::sleep(Duration::from_millis(350)).await;
    client.resources().await.expect("logged in after the back-off");
    assert_eq!(logins.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_rate_limited_login_waits_for_retry_after() {
    let fake = FakeHub::start(|_| (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "60")], "slow down").into()).await;
    let options = ClientOptions {
        refresh_retry_after: Duration::from_millis(10),
        ..ClientOptions::default()
    };
    let client = client_for(&fake, options);
    client.resources().await.expect_err("rate limited");
    // Well past the back-off of 10 ms, still within the Hub's Retry-After.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let error = client.resources().await.expect_err("still waiting");
    match &error {
        HubError::LoginBackoff { retry_in, .. } => assert!(*retry_in > Duration::from_secs(50), "{retry_in:?}"),
        other => panic!("expected a back-off, got {other:?}"),
    }
    assert_eq!(fake.logins().len(), 1);
}

#[test]
fn login_backoff_doubles_up_to_a_limit_and_honours_retry_after() {
    let (first, max) = (Duration::from_secs(10), Duration::from_secs(300));
    assert_eq!(client::login_backoff(first, max, 1, None), Duration::from_secs(10));
    assert_eq!(client::login_backoff(first, max, 3, None), Duration::from_secs(40));
    assert_eq!(client::login_backoff(first, max, 30, None), max);
    assert_eq!(
        client::login_backoff(first, max, 1, Some(Duration::from_secs(90))),
        Duration::from_secs(90)
    );
}

#[tokio::test]
async fn login_errors_are_distinct() {
    let fake = FakeHub::start(|_| (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "30")], "slow down").into()).await;
    let error = new_client(&fake).resources().await.expect_err("rate limited");
    assert!(matches!(error, HubError::RateLimited { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "hub rate limited POST /api/v1/agent/login (429 Too Many Requests), retry after 30s"
    );

    let fake = FakeHub::start(|_| StatusCode::UNAUTHORIZED.into()).await;
    let error = new_client(&fake).resources().await.expect_err("rejected");
    assert!(matches!(error, HubError::LoginRejected { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains(TARGET_ID));

    let fake = FakeHub::start(|_| Json(json!({"token": "not-a-jwt"})).into()).await;
    let error = new_client(&fake).resources().await.expect_err("bad token");
    assert_eq!(
        error.to_string(),
        "hub login returned an unusable token: the token is not a JWT"
    );
}

#[tokio::test]
async fn error_messages_never_carry_secrets() {
    let fake =
        FakeHub::start(|seen| (StatusCode::BAD_REQUEST, format!("bad header {:?}", seen.authorization)).into()).await;
    let error = new_client(&fake).resources().await.expect_err("400");
    let message = error.to_string();
    assert!(
        message.starts_with("hub answered 400 Bad Request for POST /api/v1/agent/login: bad header"),
        "{message}"
    );
    assert!(!message.contains(TARGET_SECRET));
    // The Basic header itself is base64; the secret never appears decoded either.
    assert!(!format!("{error:?}").contains(TARGET_SECRET));
}

#[tokio::test]
async fn a_stalled_hub_times_out() {
    let fake = hub_with(3600, |_| {
        Reply::After(Duration::from_secs(5), StatusCode::OK.into_response())
    })
    .await;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let error = client_for(&fake, options).resources().await.expect_err("timeout");
    assert!(matches!(error, HubError::Timeout { .. }), "{error:?}");
    assert_eq!(error.to_string(), "GET /api/v1/agent/resources timed out");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn a_truncated_body_is_a_transport_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let n = socket.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            let reply = if request.starts_with("POST") {
                let body = format!("{{\"token\":\"{}\"}}", jwt(3600));
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            } else {
                // Announces 1000 bytes, sends 15, closes.
                "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"deployments\":".to_owned()
            };
            socket.write_all(reply.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
        }
    });
    let mut env = std::collections::HashMap::new();
    for (name, path) in [
        (config::LOGIN_ENDPOINT, "login"),
        (config::RESOURCE_ENDPOINT, "resources"),
        (config::STATUS_ENDPOINT, "status"),
        (config::MANIFEST_ENDPOINT, "manifest"),
    ] {
        env.insert(name.to_owned(), format!("{base}/api/v1/agent/{path}"));
    }
    env.insert(config::TARGET_ID.to_owned(), TARGET_ID.to_owned());
    env.insert(config::TARGET_SECRET.to_owned(), TARGET_SECRET.to_owned());
    agent_runtime::install_crypto_provider();
    let client = HubClient::new(Arc::new(ConfigSource::from_env(env)), "1.0.0").expect("client");
    let error = client.resources().await.expect_err("truncated");
    assert!(matches!(error, HubError::Transport { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with("GET /api/v1/agent/resources failed: "),
        "{error}"
    );
    // Optional endpoints that are not configured give a config error naming the variable.
    let error = client.put_logs(&[]).await.expect_err("no logs endpoint");
    assert_eq!(error.to_string(), "configuration error: DISTR_LOGS_ENDPOINT is not set");
    server.abort();
}

#[tokio::test]
async fn a_rotated_secret_in_a_config_dir_is_used_at_the_next_login() {
    let fake = hub_with(3600, resources_route).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(config::TARGET_SECRET), "file-secret-1\n").unwrap();
    let mut env = fake.env();
    env.insert(config::AGENT_CONFIG_DIRS.to_owned(), dir.path().display().to_string());
    agent_runtime::install_crypto_provider();
    let client = HubClient::new(Arc::new(ConfigSource::from_env(env)), "1.2.3").expect("client");
    client.resources().await.expect("first");
    client.resources().await.expect("token reused");
    assert_eq!(fake.logins().len(), 1);

    std::fs::write(dir.path().join(config::TARGET_SECRET), "file-secret-2\n").unwrap();
    client.resources().await.expect("after rotation");
    let logins = fake.logins();
    assert_eq!(logins.len(), 2, "the rotation forces a login with the new secret");
    assert_eq!(logins[0].basic().unwrap(), format!("{TARGET_ID}:file-secret-1"));
    assert_eq!(logins[1].basic().unwrap(), format!("{TARGET_ID}:file-secret-2"));
}

#[tokio::test]
async fn manifest_and_logs_bodies() {
    let fake = hub_with(3600, |seen| match seen.path.as_str() {
        "/api/v1/agent/manifest" => (
            [("content-type", "application/yaml")],
            "apiVersion: v1\nkind: ConfigMap\n---\n",
        )
            .into(),
        _ => StatusCode::NO_CONTENT.into(),
    })
    .await;
    let client = new_client(&fake);
    assert_eq!(
        client.manifest().await.expect("manifest"),
        "apiVersion: v1\nkind: ConfigMap\n---\n"
    );
    let entry = AgentLogEntry {
        timestamp: chrono::Utc::now(),
        severity: "info".into(),
        body: "hello".into(),
    };
    client
        .put_agent_logs(std::slice::from_ref(&entry))
        .await
        .expect("agent logs");
    client.put_logs(&[]).await.expect("logs");
    let metrics = AgentMetrics {
        cpu_cores_millis: 1,
        cpu_usage: 0.5,
        memory_bytes: 2,
        memory_usage: 0.25,
        disk_metrics: None,
    };
    client.post_metrics(&metrics).await.expect("metrics");
    let agent_logs = fake.calls("/deployment-target-logs");
    assert_eq!(agent_logs[0].method, Method::PUT);
    let body: serde_json::Value = serde_json::from_slice(&agent_logs[0].body).unwrap();
    assert_eq!(body[0]["body"], "hello");
    let metrics = fake.calls("/metrics");
    let body: serde_json::Value = serde_json::from_slice(&metrics[0].body).unwrap();
    assert_eq!(
        body,
        json!({"cpuCoresMillis": 1, "cpuUsage": 0.5, "memoryBytes": 2, "memoryUsage": 0.25})
    );
}

#[test]
fn secrets_are_redacted_in_debug() {
    let secret = Secret::new("abc");
    assert_eq!(format!("{secret:?} {secret}"), "<redacted> <redacted>");
}
