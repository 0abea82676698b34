//! The simulator driven in-process with reqwest.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;

const REVISION: &str = "66666666-7777-4888-9999-aaaaaaaaaaaa";

fn http() -> reqwest::Client {
    crate::init();
    reqwest::Client::builder()
        .user_agent("DistrAgentClient/9.9.9")
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn start() -> HubSim {
    HubSim::start(HubSimOptions::default()).await.expect("hub sim starts")
}

async fn login(sim: &HubSim, http: &reqwest::Client, user: &str, password: &str) -> reqwest::Response {
    http.post(sim.url(Route::Login))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("login request")
}

async fn token(sim: &HubSim, http: &reqwest::Client, target: Uuid, secret: &str) -> String {
    let response = login(sim, http, &target.to_string(), secret).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("login json");
    body["token"].as_str().expect("token").to_owned()
}

fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("claims part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("claims json")
}

fn deployment(revision: &str) -> Value {
    json!({
        "id": "11111111-2222-4333-8444-555555555555",
        "revisionId": revision,
        "releaseName": "web",
        "chartUrl": "oci://registry.example.com/charts/web",
        "chartVersion": "1.0.0",
        "values": {}
    })
}

#[tokio::test]
async fn login_issues_hs256_tokens_with_the_hub_claims() {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    let token = token(&sim, &http, target, &secret).await;
    let claims = claims(&token);
    assert_eq!(claims["sub"], target.to_string());
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["org"], sim.org_id().to_string());
    let lifetime = claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat");
    assert_eq!(lifetime, 60);
    assert!(claims["nbf"].as_i64().is_some());
    let verified = jwt::verify(&sim.shared.key, &token, chrono::Utc::now().timestamp()).expect("valid signature");
    assert_eq!(verified.sub, target.to_string());

    let logins = sim.logins(target);
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].user_agent.as_deref(), Some("DistrAgentClient/9.9.9"));
    assert_eq!(logins[0].status, Some(200));
}

#[tokio::test]
async fn login_refuses_bad_credentials() {
    let sim = HubSim::start(HubSimOptions {
        login_rate_limit: None,
        ..HubSimOptions::default()
    })
    .await
    .expect("sim");
    let http = http();
    let (target, _secret) = sim.add_target();
    assert_eq!(
        login(&sim, &http, &target.to_string(), "wrong").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&sim, &http, "not-a-uuid", "x").await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        login(&sim, &http, &Uuid::new_v4().to_string(), "x").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let no_auth = http.post(sim.url(Route::Login)).send().await.expect("request");
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn login_is_rate_limited_per_target() {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    let (other, other_secret) = sim.add_target();
    for _ in 0..5 {
        assert_eq!(
            login(&sim, &http, &target.to_string(), &secret).await.status(),
            StatusCode::OK
        );
    }
    let limited = login(&sim, &http, &target.to_string(), &secret).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after));
    assert_eq!(
        login(&sim, &http, &other.to_string(), &other_secret).await.status(),
        StatusCode::OK
    );
    sim.set_login_rate_limit(None);
    assert_eq!(
        login(&sim, &http, &target.to_string(), &secret).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn agent_routes_require_a_valid_token() {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    let get = |token: Option<String>| {
        let mut request = http.get(sim.url(Route::Resources));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get(None).await.expect("request").status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(Some(sim.mint_token(target, -5))).await.expect("request").status(),
        StatusCode::UNAUTHORIZED
    );
    let token = token(&sim, &http, target, &secret).await;
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        get(Some(forged)).await.expect("request").status(),
        StatusCode::UNAUTHORIZED
    );
    let ok = get(Some(token)).await.expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    let unknown = sim.requests_on(Route::Resources);
    assert_eq!(
        unknown.iter().map(|r| r.status).collect::<Vec<_>>(),
        [Some(401), Some(401), Some(401), Some(200)]
    );
    assert_eq!(unknown[3].target, Some(target));
    assert_eq!(unknown[0].target, None);
}

#[tokio::test]
async fn resources_reflect_what_the_test_sets() {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    let token = token(&sim, &http, target, &secret).await;
    let version = Uuid::new_v4();
    sim.set_agent_version(target, version, "2.0.0");
    sim.set_namespace(target, Some("customer-ns"));
    sim.set_metrics_enabled(target, true);
    sim.set_deployments(target, vec![deployment(REVISION)]);
    let mut extra = Map::new();
    extra.insert("composeFile".into(), json!("services: {}"));
    sim.set_extra_fields(target, extra);
    let fetch = || async {
        let response = http
            .get(sim.url(Route::Resources))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        response.json::<Value>().await.expect("json")
    };
    let body = fetch().await;
    assert_eq!(body["version"]["id"], version.to_string());
    assert_eq!(body["version"]["name"], "2.0.0");
    assert_eq!(body["namespace"], "customer-ns");
    assert_eq!(body["metricsEnabled"], true);
    assert_eq!(body["deploymentLogsEnabled"], false);
    assert_eq!(body["composeFile"], "services: {}");
    assert_eq!(body["deployments"][0]["revisionId"], REVISION);

    sim.set_namespace(target, None);
    sim.set_deployments(target, vec![]);
    let body = fetch().await;
    assert!(body.get("namespace").is_none());
    assert_eq!(body["deployments"], json!([]));
}

#[tokio::test]
async fn statuses_logs_and_metrics_are_recorded_in_order() {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    let token = token(&sim, &http, target, &secret).await;
    sim.set_deployments(target, vec![deployment(REVISION)]);
    let post_status = |revision: &str, kind: &str, message: &str| {
        http.post(sim.url(Route::Status))
            .bearer_auth(&token)
            .json(&json!({"revisionId": revision, "type": kind, "message": message}))
            .send()
    };
    assert_eq!(
        post_status(REVISION, "progressing", "installing")
            .await
            .expect("post")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        post_status(REVISION, "running", "helm install succeeded")
            .await
            .expect("post")
            .status(),
        StatusCode::OK
    );
    let unknown = Uuid::new_v4().to_string();
    assert_eq!(
        post_status(&unknown, "healthy", "x").await.expect("post").status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post_status(REVISION, "bogus", "x").await.expect("post").status(),
        StatusCode::BAD_REQUEST
    );

    // A past revision stays known after the list changes.
    sim.set_deployments(target, vec![deployment("77777777-7777-4888-9999-aaaaaaaaaaaa")]);
    assert_eq!(
        post_status(REVISION, "healthy", "still ok")
            .await
            .expect("post")
            .status(),
        StatusCode::OK
    );

    let statuses = sim.statuses_for(target);
    let summary: Vec<(&str, &str, bool)> = statuses
        .iter()
        .map(|s| (s.status_type.as_str(), s.message.as_str(), s.accepted()))
        .collect();
    assert_eq!(
        summary,
        [
            ("progressing", "installing", true),
            ("running", "helm install succeeded", true),
            ("healthy", "x", false),
            ("bogus", "x", false),
            ("healthy", "still ok", true),
        ]
    );
    assert!(statuses.windows(2).all(|w| w[0].received_at <= w[1].received_at));
    assert_eq!(sim.latest_statuses(target)[REVISION].message, "still ok");

    let logs = json!([{"id": Uuid::new_v4(), "deploymentId": Uuid::new_v4(), "deploymentRevisionId": REVISION,
                       "resource": "deployments/web", "timestamp": "2025-01-01T00:00:00.000000001Z",
                       "severity": "info", "body": "line"}]);
    let put = |route: Route, body: &Value| http.put(sim.url(route)).bearer_auth(&token).json(body).send();
    assert_eq!(
        put(Route::Logs, &logs).await.expect("put").status(),
        StatusCode::NO_CONTENT
    );
    let agent_logs = json!([{"timestamp": "2025-01-01T00:00:00Z", "severity": "warn", "body": "agent line"}]);
    assert_eq!(
        put(Route::AgentLogs, &agent_logs).await.expect("put").status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put(Route::AgentLogs, &json!({"not": "a list"}))
            .await
            .expect("put")
            .status(),
        StatusCode::BAD_REQUEST
    );
    let metrics = json!({"cpuCoresMillis": 1000, "cpuUsage": 0.1, "memoryBytes": 1, "memoryUsage": 0.2});
    let response = http
        .post(sim.url(Route::Metrics))
        .bearer_auth(&token)
        .json(&metrics)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK);

    assert_eq!(sim.logs()[0]["body"], "line");
    assert_eq!(sim.agent_logs(), [agent_logs[0].clone()]);
    assert_eq!(sim.metrics(), [metrics]);
    let requests = sim.requests();
    assert!(requests.iter().enumerate().all(|(i, r)| r.seq == i));
    assert!(
        requests
            .iter()
            .all(|r| r.user_agent.as_deref() == Some("DistrAgentClient/9.9.9"))
    );
}

#[tokio::test]
async fn manifest_is_yaml() {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    let token = token(&sim, &http, target, &secret).await;
    let get = || http.get(sim.url(Route::Manifest)).bearer_auth(&token).send();
    assert_eq!(get().await.expect("get").status(), StatusCode::NOT_FOUND);
    sim.set_manifest(target, "apiVersion: v1\nkind: Namespace\n---\n");
    let response = get().await.expect("get");
    assert_eq!(response.headers()["content-type"], "application/yaml");
    assert_eq!(
        response.text().await.expect("text"),
        "apiVersion: v1\nkind: Namespace\n---\n"
    );
}

#[tokio::test]
async fn secret_rotation_and_revocation() {
    let sim = HubSim::start(HubSimOptions {
        login_rate_limit: None,
        ..HubSimOptions::default()
    })
    .await
    .expect("sim");
    let http = http();
    let (target, secret) = sim.add_target();
    let old_token = token(&sim, &http, target, &secret).await;
    sim.set_secret(target, "rotated");
    assert_eq!(
        login(&sim, &http, &target.to_string(), &secret).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let new_token = token(&sim, &http, target, "rotated").await;
    let resources = |token: &str| http.get(sim.url(Route::Resources)).bearer_auth(token).send();
    assert_eq!(
        resources(&old_token).await.expect("get").status(),
        StatusCode::OK,
        "old tokens stay valid"
    );

    sim.revoke(target);
    assert_eq!(
        login(&sim, &http, &target.to_string(), "rotated").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        resources(&old_token).await.expect("get").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        resources(&new_token).await.expect("get").status(),
        StatusCode::UNAUTHORIZED
    );

    sim.set_secret(target, "third");
    let third = token(&sim, &http, target, "third").await;
    assert_eq!(resources(&third).await.expect("get").status(), StatusCode::OK);
    sim.revoke_tokens(target);
    assert_eq!(resources(&third).await.expect("get").status(), StatusCode::UNAUTHORIZED);
}

/// A logged-in client and the simulator, for the failure-switch tests.
async fn logged_in() -> (HubSim, reqwest::Client, Uuid, String) {
    let sim = start().await;
    let http = http();
    let (target, secret) = sim.add_target();
    sim.set_deployments(target, vec![deployment(REVISION)]);
    let token = token(&sim, &http, target, &secret).await;
    (sim, http, target, token)
}

#[tokio::test]
async fn failure_status_and_counted_switches() {
    let (sim, http, _target, token) = logged_in().await;
    let status = || async {
        http.get(sim.url(Route::Resources))
            .bearer_auth(&token)
            .send()
            .await
            .expect("get")
            .status()
    };
    sim.fail_resources(Failure::Status(500));
    assert_eq!(status().await, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(status().await, StatusCode::INTERNAL_SERVER_ERROR);
    sim.clear_failures();
    assert_eq!(status().await, StatusCode::OK);

    sim.fail_times(Route::Resources, Failure::Status(503), 1);
    assert_eq!(status().await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status().await, StatusCode::OK);

    sim.fail_all(Failure::Status(502));
    assert_eq!(
        login(&sim, &http, &Uuid::new_v4().to_string(), "x").await.status(),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(status().await, StatusCode::BAD_GATEWAY);
    sim.clear_failures();
    assert_eq!(
        sim.requests_on(Route::Resources).last().and_then(|r| r.status),
        Some(502)
    );
}

#[tokio::test]
async fn agent_routes_can_be_rate_limited() {
    let (sim, http, _target, token) = logged_in().await;
    sim.set_agent_rate_limit(Some(RateLimit {
        max: 2,
        per: Duration::from_secs(60),
    }));
    let status = || async {
        http.get(sim.url(Route::Resources))
            .bearer_auth(&token)
            .send()
            .await
            .expect("get")
            .status()
    };
    assert_eq!(status().await, StatusCode::OK);
    assert_eq!(status().await, StatusCode::OK);
    assert_eq!(status().await, StatusCode::TOO_MANY_REQUESTS);
    sim.set_agent_rate_limit(None);
    assert_eq!(status().await, StatusCode::OK);
}

#[tokio::test]
async fn failure_stall() {
    let (sim, http, _target, token) = logged_in().await;
    sim.fail_resources(Failure::Stall(Some(Duration::from_secs(3))));
    let error = http
        .get(sim.url(Route::Resources))
        .bearer_auth(&token)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("stalled");
    assert!(error.is_timeout());

    // Stalled until the switch changes.
    sim.fail_resources(Failure::Stall(None));
    let request = http.get(sim.url(Route::Resources)).bearer_auth(&token).send();
    let release = async {
        sim.wait_until("the stalled request", Duration::from_secs(5), |requests| {
            requests
                .last()
                .is_some_and(|r| r.route == Route::Resources && r.status.is_none())
        })
        .await
        .expect("request arrives");
        tokio::time::sleep(Duration::from_millis(200)).await;
        sim.clear_failures();
    };
    let (response, ()) = tokio::join!(request, release);
    assert_eq!(response.expect("released").status(), StatusCode::OK);
}

#[tokio::test]
async fn failure_bodies() {
    let (sim, http, target, token) = logged_in().await;
    let get = || http.get(sim.url(Route::Resources)).bearer_auth(&token).send();

    sim.fail_resources(Failure::MalformedJson);
    let response = get().await.expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.json::<Value>().await.is_err());

    sim.fail_resources(Failure::Oversized(20 * 1024 * 1024));
    let mut response = get().await.expect("get");
    assert_eq!(response.content_length(), None, "streamed");
    let mut total = 0;
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        total += chunk.len();
    }
    assert_eq!(total, 20 * 1024 * 1024);

    sim.fail_resources(Failure::Truncated);
    let response = get().await.expect("headers arrive");
    let announced = response.content_length().expect("content-length");
    let error = response.bytes().await.expect_err("body cut short");
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    assert!(announced > 1024);

    sim.fail_resources(Failure::EmptyDeployments);
    let body: Value = get().await.expect("get").json().await.expect("json");
    assert_eq!(body["deployments"], json!([]));
    assert_eq!(sim.deployments(target).len(), 1, "the configured list is kept");
    sim.clear_failures();
    let body: Value = get().await.expect("get").json().await.expect("json");
    assert_eq!(body["deployments"][0]["revisionId"], REVISION);
}

#[tokio::test]
async fn env_points_at_every_route() {
    let sim = start().await;
    let (target, secret) = sim.add_target();
    let env = sim.env(target, &secret);
    assert_eq!(
        env["DISTR_LOGIN_ENDPOINT"],
        format!("{}/api/v1/agent/login", sim.base_url())
    );
    assert_eq!(
        env["DISTR_AGENT_LOGS_ENDPOINT"],
        format!("{}/api/v1/agent/deployment-target-logs", sim.base_url())
    );
    assert_eq!(env["DISTR_TARGET_ID"], target.to_string());
    assert_eq!(env["DISTR_TARGET_SECRET"], secret);
    assert_eq!(env.len(), 9);
}

/// The admin interface the demo and a person drive with `curl`: every route, seen through the
/// Hub's own endpoints as the agent sees them.
#[tokio::test]
async fn the_admin_interface_changes_what_the_hub_serves() {
    let sim = std::sync::Arc::new(start().await);
    let http = http();
    let (target, secret) = sim.add_target();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin_url = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(axum::serve(listener, admin::router(sim.clone(), target)).into_future());
    let token = token(&sim, &http, target, &secret).await;
    let served = || async {
        let response = http
            .get(sim.url(Route::Resources))
            .bearer_auth(&token)
            .send()
            .await
            .expect("resources");
        response.json::<Value>().await.expect("json")
    };
    let admin = |method: reqwest::Method, path: &str| http.request(method, format!("{admin_url}{path}"));

    let added = admin(reqwest::Method::POST, "/deployments")
        .json(&json!({"releaseName": "web", "chartUrl": "oci://registry.example.com/charts/web", "chartVersion": "1.0.0"}))
        .send()
        .await
        .expect("add");
    assert_eq!(added.status(), StatusCode::CREATED);
    let again = admin(reqwest::Method::POST, "/deployments")
        .json(&json!({"releaseName": "web"}))
        .send()
        .await
        .expect("add again");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let first = served().await["deployments"][0]["revisionId"].clone();
    assert!(first.is_string(), "{first}");

    let changed = admin(reqwest::Method::PATCH, "/deployments/web")
        .json(&json!({"chartVersion": "1.1.0"}))
        .send()
        .await
        .expect("change");
    assert_eq!(changed.status(), StatusCode::OK);
    let deployment = served().await["deployments"][0].clone();
    assert_eq!(deployment["chartVersion"], "1.1.0");
    assert_ne!(deployment["revisionId"], first, "a change is a new revision");

    let version = Uuid::new_v4();
    let put = admin(reqwest::Method::PUT, "/version")
        .json(&json!({"id": version, "name": "0.9.0"}))
        .send()
        .await
        .expect("version");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    assert_eq!(served().await["version"]["id"], version.to_string());
    let bad = admin(reqwest::Method::PUT, "/version")
        .json(&json!({"id": "not-a-uuid", "name": "x"}))
        .send()
        .await
        .expect("bad version");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    let put = admin(reqwest::Method::PUT, "/manifest")
        .body("kind: ConfigMap\n")
        .send()
        .await
        .expect("manifest");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let manifest = http
        .get(sim.url(Route::Manifest))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get manifest");
    assert_eq!(manifest.text().await.expect("text"), "kind: ConfigMap\n");

    let deleted = admin(reqwest::Method::DELETE, "/deployments/web")
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(served().await["deployments"], json!([]));
    let missing = admin(reqwest::Method::DELETE, "/deployments/web")
        .send()
        .await
        .expect("delete again");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    server.abort();
}
