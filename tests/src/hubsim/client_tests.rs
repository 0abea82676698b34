//! The poller's real `HubClient` against the simulator: the two sides of the protocol agree.

use std::sync::Arc;
use std::time::Duration;

use agent_poller::config::ConfigSource;
use agent_poller::hub::{ClientOptions, HubClient, HubError, StatusReport, StatusType};
use serde_json::json;
use uuid::Uuid;

use super::*;

const REVISION: &str = "66666666-7777-4888-9999-aaaaaaaaaaaa";

async fn setup(options: HubSimOptions) -> (HubSim, Uuid, HubClient) {
    crate::init();
    let sim = HubSim::start(options).await.expect("sim");
    let (target, secret) = sim.add_target();
    sim.set_namespace(target, Some("ns"));
    sim.set_deployments(
        target,
        vec![json!({
            "id": "11111111-2222-4333-8444-555555555555",
            "revisionId": REVISION,
            "releaseName": "web",
            "chartUrl": "oci://registry.example.com/charts/web",
            "chartVersion": "1.0.0",
            "values": {"replicas": 1},
            "composeFile": "ignored"
        })],
    );
    let config = Arc::new(ConfigSource::from_env(sim.env(target, &secret)));
    let client = HubClient::with_options(
        config,
        "1.2.3",
        ClientOptions {
            request_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    )
    .expect("client");
    (sim, target, client)
}

#[tokio::test]
async fn the_client_speaks_the_simulated_protocol() {
    let (sim, target, client) = setup(HubSimOptions::default()).await;
    let resources = client.resources().await.expect("resources");
    assert_eq!(resources.namespace.as_deref(), Some("ns"));
    assert_eq!(resources.deployments[0].revision_id.to_string(), REVISION);
    assert_eq!(resources.version.expect("version").id, sim.agent_version_id(target));

    let report = StatusReport {
        revision_id: Uuid::parse_str(REVISION).expect("uuid"),
        status_type: StatusType::Running,
        message: "helm install succeeded".into(),
    };
    client.post_status(&report).await.expect("status");
    let unknown = StatusReport {
        revision_id: Uuid::new_v4(),
        ..report.clone()
    };
    let error = client.post_status(&unknown).await.expect_err("unknown revision");
    assert_eq!(
        error.to_string(),
        "hub answered 400 Bad Request for POST /api/v1/agent/status: unknown revision id"
    );
    client.put_logs(&[]).await.expect("logs 204");
    sim.set_manifest(target, "kind: List\n");
    assert_eq!(client.manifest().await.expect("manifest"), "kind: List\n");

    let statuses = sim.statuses_for(target);
    assert_eq!(statuses.len(), 2);
    assert_eq!(
        (statuses[0].status_type.as_str(), statuses[0].accepted()),
        ("running", true)
    );
    assert_eq!(sim.logins(target).len(), 1, "one login for all calls");
    assert!(
        sim.requests()
            .iter()
            .all(|r| r.user_agent.as_deref() == Some("DistrAgentClient/1.2.3"))
    );
}

#[tokio::test]
async fn the_client_recovers_from_revoked_tokens_and_reports_failures() {
    let (sim, target, client) = setup(HubSimOptions::default()).await;
    client.resources().await.expect("first");
    sim.revoke_tokens(target);
    client.resources().await.expect("401, new login, retry");
    assert_eq!(sim.logins(target).len(), 2);

    sim.fail_resources(Failure::Truncated);
    let error = client.resources().await.expect_err("truncated");
    assert!(matches!(error, HubError::Transport { .. }), "{error}");
    sim.fail_resources(Failure::Oversized(20 * 1024 * 1024));
    assert!(matches!(client.resources().await, Err(HubError::BodyTooLarge { .. })));
    sim.fail_resources(Failure::MalformedJson);
    assert!(matches!(client.resources().await, Err(HubError::Malformed { .. })));
    sim.fail_resources(Failure::Stall(None));
    assert!(matches!(client.resources().await, Err(HubError::Timeout { .. })));
    sim.fail_resources(Failure::Status(500));
    assert_eq!(
        client.resources().await.expect_err("500").to_string(),
        "hub answered 500 Internal Server Error for GET /api/v1/agent/resources: simulated failure"
    );
    sim.fail_resources(Failure::EmptyDeployments);
    assert!(client.resources().await.expect("empty").deployments.is_empty());
    sim.clear_failures();
    assert_eq!(client.resources().await.expect("recovered").deployments.len(), 1);

    sim.revoke(target);
    let error = client.resources().await.expect_err("revoked");
    assert!(matches!(error, HubError::LoginRejected { .. }), "{error}");
}

#[tokio::test]
async fn short_tokens_hit_the_login_rate_limit() {
    // Tokens of 20 s are always inside the 30 s refresh margin: every call logs in.
    let options = HubSimOptions {
        token_lifetime: Duration::from_secs(20),
        ..HubSimOptions::default()
    };
    let (sim, target, client) = setup(options).await;
    for _ in 0..5 {
        client.resources().await.expect("within the login budget");
    }
    // The sixth login is refused, but the current token is still valid: it is kept.
    client.resources().await.expect("old token kept");
    let logins = sim.logins(target);
    assert_eq!(logins.len(), 6);
    assert_eq!(logins[5].status, Some(429));
    // Once the token is gone, no new login before the Hub's Retry-After (a target that keeps
    // trying stays locked out), and the error says why.
    sim.revoke_tokens(target);
    let error = client.resources().await.expect_err("rate limited");
    assert!(matches!(error, HubError::LoginBackoff { .. }), "{error}");
    assert!(error.to_string().contains("429 Too Many Requests"), "{error}");
    assert_eq!(sim.logins(target).len(), 6, "no login while backing off");
}
