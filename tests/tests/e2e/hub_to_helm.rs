//! From the Hub to Helm and back: the poller speaks the Hub protocol, the executor installs,
//! upgrades, rolls back and uninstalls releases. Each test runs the real binaries against the
//! Hub simulator, the real control plane (executor with a namespace-only Role), helm v4 and
//! the authenticated OCI registry.

use std::time::{Duration, Instant};

use distr_agent_e2e::{
    TestEnv,
    agent::{Agent, AgentOptions, deployment, registry_auth, revise, revision},
    chart_repo::{ChartRepo, Scheme},
    charts::{self, PushTarget, push_web_chart},
    hubsim::{Failure, HubSimOptions},
    registry::Registry,
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

fn tracking_secret(release: &str) -> String {
    format!("sh.distr.agent.v1.{release}")
}

#[tokio::test]
async fn install_upgrade_and_uninstall_follow_the_hub() -> anyhow::Result<()> {
    let test = "lifecycle";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "lifecycle-web", &["0.1.0"]).await?;
    let started = Instant::now();
    let v1 = deployment(
        "web",
        &chart,
        "0.1.0",
        json!({"message": "one", "imagePullSecrets": [], "nested": {"pullSecrets": [{"name": "existing"}]}}),
    );
    let v1 = revise(&v1, json!({"registryAuth": registry_auth(None)}));
    agent.set_deployments(vec![v1.clone()]);

    // a. install: progressing, then running; the release, tracking and pull Secrets exist.
    // (`progressing` is checked in `a_release_stuck_waiting_does_not_delay_another`: this
    // install is over within one poll interval.)
    agent
        .wait_status(&revision(&v1), "running", "helm install succeeded", MINUTE)
        .await?;
    eprintln!("hub change -> running (install): {:?}", started.elapsed());
    let releases = agent.helm_json(&["ls"]).await?;
    assert_eq!(releases[0]["name"], "web");
    assert_eq!(releases[0]["status"], "deployed");
    let secrets = agent.secret_names().await?;
    assert!(secrets.contains(&tracking_secret("web")), "{secrets:?}");
    assert!(
        secrets.contains(&format!("{}.pull", tracking_secret("web"))),
        "{secrets:?}"
    );
    let tracking = agent.ns.api::<Secret>().get(&tracking_secret("web")).await?;
    let labels = tracking.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("agent.distr.sh/deployment").map(String::as_str), Some("web"));
    let record: serde_json::Value = serde_json::from_slice(&tracking.data.unwrap_or_default()["release"].0)?;
    assert_eq!(record["revisionId"], v1["revisionId"]);
    assert_eq!(record["id"], v1["id"]);
    assert_eq!(record["releaseName"], "web");
    assert_eq!(record["helmRevision"], 1);
    // The pull Secret's name is appended to the values' pull-secret lists.
    let web = agent.ns.api::<Deployment>().get("web-web").await?;
    let pull = web
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.image_pull_secrets)
        .unwrap_or_default();
    assert_eq!(
        pull.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["sh.distr.agent.v1.web.pull"]
    );

    // b. changed values with a new revision: an upgrade to Helm revision 2.
    let started = Instant::now();
    let v2 = revise(&v1, json!({"values": {"message": "two", "imagePullSecrets": []}}));
    agent.set_deployments(vec![v2.clone()]);
    agent
        .wait_status(&revision(&v2), "running", "helm upgrade succeeded", MINUTE)
        .await?;
    eprintln!("hub change -> running (upgrade): {:?}", started.elapsed());
    let history = agent.helm_json(&["history", "web"]).await?;
    let revisions: Vec<i64> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["revision"].as_i64())
        .collect();
    assert_eq!(revisions, vec![1, 2]);
    let web = agent.ns.api::<Deployment>().get("web-web").await?;
    let message = web
        .metadata
        .annotations
        .unwrap_or_default()
        .get("distr.test/message")
        .cloned();
    assert_eq!(message.as_deref(), Some("two"));
    agent
        .wait_status(&revision(&v2), "healthy", "status check passed", MINUTE)
        .await?;

    // c. removed from the Hub: the release, its tracking and pull Secrets are gone.
    agent.set_deployments(vec![]);
    distr_agent_e2e::wait_for("release uninstalled", MINUTE, || async {
        let releases = agent.helm_json(&["ls"]).await.ok()?;
        let secrets = agent.secret_names().await.ok()?;
        let gone = releases.as_array().is_some_and(|r| r.is_empty())
            && !secrets
                .iter()
                .any(|s| s.starts_with("sh.distr.agent.v1.web") || s.starts_with("sh.helm.release.v1.web"));
        gone.then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_failed_upgrade_is_rolled_back_and_reported_once() -> anyhow::Result<()> {
    let test = "rollback";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "rollback-web", &["0.1.0", "0.2.0"]).await?;
    let v1 = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "running", "helm install succeeded", MINUTE)
        .await?;

    // An upgrade to 0.2.0 whose pods never become ready, with rollback on failure.
    let v2 = revise(
        &v1,
        json!({
            "chartVersion": "0.2.0",
            "values": {"neverReady": true},
            "helmOptions": {"timeout": "8s", "rollbackOnFailure": true, "waitStrategy": "watcher"}
        }),
    );
    agent.set_deployments(vec![v2.clone()]);
    let error = agent.wait_status(&revision(&v2), "error", "", 2 * MINUTE).await?;
    assert!(
        error.message.contains("upgrade"),
        "says the upgrade failed: {}",
        error.message
    );

    // Back at the previous chart, with Helm's rollback recorded.
    let releases = agent.helm_json(&["ls"]).await?;
    assert_eq!(releases[0]["chart"], "rollback-web-0.1.0", "{releases}");
    assert_eq!(releases[0]["status"], "deployed");
    // Install (1), the failed upgrade (2), Helm's rollback (3).
    let history = agent.helm_json(&["history", "web"]).await?;
    let latest = history
        .as_array()
        .and_then(|h| h.iter().max_by_key(|entry| entry["revision"].as_u64()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(latest["revision"], 3, "{history}");
    assert_eq!(latest["status"], "deployed", "{history}");
    let tracking = agent.ns.api::<Secret>().get(&tracking_secret("web")).await?;
    let record: serde_json::Value = serde_json::from_slice(&tracking.data.unwrap_or_default()["release"].0)?;
    assert_eq!(
        record["helmRevision"], 3,
        "tracking follows Helm's rollback revision: {record}"
    );

    // The following cycles: no revision-skew error and no new upgrade of the same revision.
    // A wrong retry would come after the first retry delay (30 s, `plan::retry_delay`), so
    // the window must be longer than that; the absence of an event has no condition to wait on.
    let failed_at = error.received_at;
    let window_end = failed_at + chrono::Duration::seconds(40);
    let left = (window_end - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left).await;
    let statuses = agent.statuses(&revision(&v2));
    assert!(
        statuses
            .iter()
            .all(|s| !s.message.contains("is different from latest deployed by agent")),
        "no revision skew: {statuses:#?}"
    );
    let history_after = agent.helm_json(&["history", "web"]).await?;
    assert_eq!(
        history_after.as_array().map(Vec::len),
        history.as_array().map(Vec::len),
        "no new upgrade"
    );
    let errors: Vec<_> = statuses.iter().filter(|s| s.status_type == "error").collect();
    assert!(
        errors.iter().all(|s| s.message == error.message),
        "one error, repeated unchanged: {errors:#?}"
    );
    Ok(())
}

/// A resources body above tonic's default 4 MiB message limit (large values) reaches the
/// executor in one `Sync` and is installed: the executor's gRPC limit is above the poller's
/// bound on the Hub's body (8 MiB).
#[tokio::test]
async fn a_desired_state_above_four_mebibytes_is_installed() -> anyhow::Result<()> {
    let test = "large-values";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "large-values-web", &["0.1.0"]).await?;
    // Compressible, so that Helm's release Secret stays small.
    let big = deployment(
        "big",
        &chart,
        "0.1.0",
        json!({"message": "big", "padding": "x".repeat(5 * 1024 * 1024)}),
    );
    agent.set_deployments(vec![big.clone()]);
    agent
        .wait_status(&revision(&big), "running", "helm install succeeded", MINUTE)
        .await?;
    let body = serde_json::to_vec(&json!({"deployments": [big]}))?.len();
    assert!(body > 4 * 1024 * 1024, "{body}");
    let values = agent.helm_json(&["get", "values", "big"]).await?;
    assert_eq!(values["padding"].as_str().map(str::len), Some(5 * 1024 * 1024));
    Ok(())
}

#[tokio::test]
async fn a_release_stuck_waiting_does_not_delay_another() -> anyhow::Result<()> {
    let test = "concurrency";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "concurrency-web", &["0.1.0"]).await?;
    let slow = deployment("slow", &chart, "0.1.0", json!({"neverReady": true}));
    let slow = revise(
        &slow,
        json!({"helmOptions": {"timeout": "10m", "waitStrategy": "watcher"}}),
    );
    agent.set_deployments(vec![slow.clone()]);
    // The executor's own report of the install under way (no placeholder meets this).
    agent
        .wait_status(&revision(&slow), "progressing", "helm install in progress", MINUTE)
        .await?;

    let fast = deployment("fast", &chart, "0.1.0", json!({}));
    let started = Instant::now();
    agent.set_deployments(vec![slow.clone(), fast.clone()]);
    agent
        .wait_status(
            &revision(&fast),
            "running",
            "helm install succeeded",
            Duration::from_secs(30),
        )
        .await?;
    eprintln!(
        "fast release running {:?} after it appeared, while slow waits",
        started.elapsed()
    );
    let slow_statuses = agent.statuses(&revision(&slow));
    assert!(
        slow_statuses.iter().all(|s| s.status_type == "progressing"),
        "slow still in progress: {slow_statuses:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn hub_failures_change_nothing_and_the_agent_recovers() -> anyhow::Result<()> {
    let test = "hub-failures";
    let agent = Agent::start(
        test,
        AgentOptions {
            poller_env: vec![
                ("AGENT_HUB_TIMEOUT_SECONDS", "3".to_owned()),
                // Unchanged statuses are posted again every 3 s (the Hub wants one a minute).
                ("AGENT_STATUS_REFRESH_SECONDS", "3".to_owned()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let chart = push_web_chart(test, "failures-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;

    // What the poller logs about each failure (the Hub sees none of it).
    let failures = [
        (Failure::Status(500), "500"),
        (Failure::Stall(None), "timed out"),
        (Failure::MalformedJson, "malformed"),
        (Failure::Truncated, "GET /api/v1/agent/resources failed"),
        (Failure::Oversized(20 << 20), "larger than"),
    ];
    for (failure, expected) in failures {
        let log_mark = agent.poller.log_text().len();
        let started = chrono::Utc::now();
        agent.hub.fail_resources(failure.clone());
        // The failure reaches the poller's log with its reason.
        distr_agent_e2e::wait_for("the Hub failure in the poller's log", MINUTE, || async {
            let log = agent.poller.log_text();
            log.get(log_mark..)?
                .lines()
                .find(|line| line.contains("cannot fetch the desired state from the Hub"))
                .map(str::to_owned)
        })
        .await
        .and_then(|line| {
            anyhow::ensure!(
                line.to_lowercase().contains(&expected.to_lowercase()),
                "{failure:?}: {line}"
            );
            Ok(())
        })?;
        // The Hub keeps getting the release's real status, fresh, while it cannot be read.
        distr_agent_e2e::wait_for("a fresh healthy status during the failure", MINUTE, || async {
            agent
                .statuses(&revision(&web))
                .into_iter()
                .find(|s| s.received_at > started && s.status_type == "healthy" && s.accepted())
        })
        .await?;
        let during: Vec<_> = agent
            .statuses(&revision(&web))
            .into_iter()
            .filter(|s| s.received_at > started)
            .collect();
        assert!(
            during.iter().all(|s| s.status_type == "healthy"),
            "{failure:?}: no error for a Hub failure: {during:#?}"
        );
        let releases = agent.helm_json(&["ls"]).await?;
        assert_eq!(
            releases.as_array().map(Vec::len),
            Some(1),
            "{failure:?}: nothing uninstalled"
        );
        assert!(agent.secret_names().await?.contains(&tracking_secret("web")));
        agent.hub.clear_failures();
    }
    // The failures are counted in the poller's metrics.
    let metrics = reqwest::get(agent.poller.admin_url("/metrics")).await?.text().await?;
    let failures_counted = metrics
        .lines()
        .find_map(|line| line.strip_prefix("distr_agent_hub_fetch_failures_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(failures_counted.is_some_and(|n| n >= 5.0), "{metrics}");

    // A complete response with an empty list is a real removal: only now is it uninstalled.
    agent.set_deployments(vec![]);
    distr_agent_e2e::wait_for("uninstalled after an explicit empty list", MINUTE, || async {
        agent
            .helm_json(&["ls"])
            .await
            .ok()?
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn charts_come_through_registry_auth_and_the_hub_registry() -> anyhow::Result<()> {
    let test = "registries";
    let env = TestEnv::get();
    let agent = Agent::start(
        test,
        AgentOptions {
            poller_env: vec![
                ("AGENT_HUB_TIMEOUT_SECONDS", "3".into()),
                ("DISTR_REGISTRY_PLAIN_HTTP", "true".into()),
            ],
            ..Default::default()
        },
    )
    .await?;
    // The Hub registry admits user "-" with the agent's JWT as password.
    // Revoke what the poller holds so its next login answers the known token.
    agent.hub.revoke_tokens(agent.target);
    let token = agent.hub.mint_token(agent.target, 3600);
    agent.hub.set_fixed_token(agent.target, Some(token.clone()));
    let hub_registry = Registry::start(test, "-", &token).await?;
    std::fs::write(agent.config_dir.join("DISTR_REGISTRY_HOST"), &hub_registry.host)?;

    let chart = push_web_chart(test, "auth-web", &["0.1.0"]).await?;
    let with_auth = revise(
        &deployment("with-auth", &chart, "0.1.0", json!({})),
        json!({"registryAuth": registry_auth(None)}),
    );
    let wrong = revise(
        &deployment("wrong-password", &chart, "0.1.0", json!({})),
        json!({"registryAuth": registry_auth(Some("not-the-password"))}),
    );

    // Push a chart to the Hub registry with the JWT.
    let chart_dir = charts::write_web_chart(&env.test_dir(test).join("hub-chart"), "hub-web", "0.1.0")?;
    let hub_target = PushTarget {
        host: &hub_registry.host,
        user: "-",
        password: &token,
        plain_http: true,
    };
    let hub_chart = charts::push_chart_to(&chart_dir, &hub_target).await?;
    let from_hub = deployment("from-hub", &hub_chart, "0.1.0", json!({}));

    agent.set_deployments(vec![with_auth.clone(), wrong.clone(), from_hub.clone()]);
    agent
        .wait_status(&revision(&with_auth), "running", "helm install succeeded", MINUTE)
        .await?;
    agent
        .wait_status(&revision(&from_hub), "running", "helm install succeeded", MINUTE)
        .await?;
    let refused = agent.wait_status(&revision(&wrong), "error", "", MINUTE).await?;
    assert!(
        refused.message.contains("registry refused the credentials"),
        "says the registry refused the credentials: {}",
        refused.message
    );
    // The Hub registry login lands in the pull Secret too.
    let pull = agent.ns.api::<Secret>().get("sh.distr.agent.v1.from-hub.pull").await?;
    let config: serde_json::Value = serde_json::from_slice(&pull.data.unwrap_or_default()[".dockerconfigjson"].0)?;
    assert!(config["auths"][&hub_registry.host].is_object(), "{config}");
    assert_eq!(pull.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    Ok(())
}

#[tokio::test]
async fn steady_state_statuses_token_expiry_and_secret_rotation() -> anyhow::Result<()> {
    let test = "steady-state";
    let agent = Agent::start(
        test,
        AgentOptions {
            hub: HubSimOptions {
                token_lifetime: MINUTE,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let chart = push_web_chart(test, "steady-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;

    // Rotate the target secret: the new one, written into a config dir, is used at the next login.
    let rotated = "rotated-secret-value";
    agent.hub.set_secret(agent.target, rotated);
    std::fs::write(agent.config_dir.join("DISTR_TARGET_SECRET"), rotated)?;
    agent.hub.revoke_tokens(agent.target);

    // Observe the steady state across more than one token lifetime.
    let window_start = chrono::Utc::now();
    let window = Duration::from_secs(95);
    tokio::time::sleep(window).await;
    let statuses: Vec<_> = agent
        .statuses(&revision(&web))
        .into_iter()
        .filter(|s| s.received_at >= window_start)
        .collect();
    let resources = agent
        .hub
        .requests_on(distr_agent_e2e::hubsim::Route::Resources)
        .into_iter()
        .filter(|r| r.received_at >= window_start)
        .count();
    let logins = agent
        .hub
        .logins(agent.target)
        .into_iter()
        .filter(|r| r.received_at >= window_start)
        .collect::<Vec<_>>();
    eprintln!(
        "steady state over {window:?}: {resources} resource fetches, {} status posts, {} logins",
        statuses.len(),
        logins.len()
    );
    // The rotated secret works and tokens are renewed across several 60 s expiries.
    assert!(
        logins.iter().filter(|l| l.status == Some(200)).count() >= 3,
        "logins: {logins:#?}"
    );
    assert!(resources > 60, "the loop kept running: {resources} fetches");
    // Fresh statuses at least every 60 s, fewer than one post per cycle.
    let mut previous = window_start;
    for status in &statuses {
        assert!(
            (status.received_at - previous).num_seconds() <= 60,
            "gap before {status:?}"
        );
        previous = status.received_at;
    }
    assert!(
        (chrono::Utc::now() - previous).num_seconds() <= 60,
        "no status in the last minute"
    );
    assert!(
        statuses.len() * 5 < resources,
        "{} posts for {resources} cycles",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| s.status_type == "healthy" && s.accepted()),
        "{statuses:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn charts_come_from_a_classic_https_repository_with_basic_auth() -> anyhow::Result<()> {
    let test = "classic-repo";
    let env = TestEnv::get();
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart_dir = env.test_dir(test).join("charts");
    let charts = [charts::write_web_chart(&chart_dir, "classic-web", "0.1.0")?];
    let password = uuid::Uuid::new_v4().simple().to_string();
    let repo = ChartRepo::start(test, &charts, "vendor", &password, Scheme::Https).await?;
    let plain = ChartRepo::start(test, &charts, "vendor", &password, Scheme::Http).await?;

    let classic = |release: &str, url: &str, auth: serde_json::Value| {
        revise(
            &deployment(release, url, "0.1.0", json!({})),
            json!({"chartName": "classic-web", "registryAuth": auth}),
        )
    };
    let auth = |password: &str| json!({ repo.host.clone(): {"username": "vendor", "password": password} });
    let with_auth = classic("classic", &repo.url, auth(&password));
    let in_url = classic(
        "classic-in-url",
        &repo.url.replace("https://", &format!("https://vendor:{password}@")),
        json!(null),
    );
    let wrong = classic("classic-wrong", &repo.url, auth("not-the-password"));
    let plain_http = classic(
        "classic-http",
        &plain.url,
        json!({ plain.host.clone(): {"username": "vendor", "password": password} }),
    );
    agent.set_deployments(vec![
        with_auth.clone(),
        in_url.clone(),
        wrong.clone(),
        plain_http.clone(),
    ]);

    for ok in [&with_auth, &in_url] {
        agent
            .wait_status(&revision(ok), "running", "helm install succeeded", MINUTE)
            .await?;
    }
    let refused = agent.wait_status(&revision(&wrong), "error", "", MINUTE).await?;
    eprintln!("wrong password: {}", refused.message);
    assert!(
        refused.message.contains("401"),
        "says the repository refused: {}",
        refused.message
    );
    assert!(repo.refused() > 0, "the repository saw the wrong password");
    let insecure = agent.wait_status(&revision(&plain_http), "error", "", MINUTE).await?;
    assert!(
        insecure
            .message
            .contains("plain http:// chart repositories are not allowed"),
        "{}",
        insecure.message
    );
    // The password never reaches the Hub, not even from the URL that carried it.
    for deployment in [&with_auth, &in_url, &wrong, &plain_http] {
        for status in agent.statuses(&revision(deployment)) {
            assert!(!status.message.contains(&password), "{status:?}");
        }
    }
    // The chart from the repository is what got installed.
    agent.ns.api::<Deployment>().get("classic-in-url-web").await?;
    Ok(())
}

#[tokio::test]
async fn plain_http_repositories_work_when_the_operator_allows_them() -> anyhow::Result<()> {
    let test = "classic-http";
    let env = TestEnv::get();
    let agent = Agent::start(
        test,
        AgentOptions {
            executor_env: vec![("AGENT_ALLOW_HTTP_CHARTS", "true".into())],
            ..Default::default()
        },
    )
    .await?;
    let charts = [charts::write_web_chart(
        &env.test_dir(test).join("charts"),
        "plain-web",
        "0.1.0",
    )?];
    let password = uuid::Uuid::new_v4().simple().to_string();
    let plain = ChartRepo::start(test, &charts, "vendor", &password, Scheme::Http).await?;
    let from_http = revise(
        &deployment("plain", &plain.url, "0.1.0", json!({})),
        json!({"chartName": "plain-web", "registryAuth": { plain.host.clone(): {"username": "vendor", "password": password} }}),
    );
    agent.set_deployments(vec![from_http.clone()]);
    agent
        .wait_status(&revision(&from_http), "running", "helm install succeeded", MINUTE)
        .await?;
    Ok(())
}
