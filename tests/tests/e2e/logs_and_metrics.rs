//! Logs and metrics (issue 10): the agent's own log lines of all three processes reach the
//! Hub once, after the Hub failed them; every process serves Prometheus metrics that move
//! when the agent works.

use std::{collections::HashSet, time::Duration};

use distr_agent_e2e::{
    AgentProcess,
    agent::{Agent, AgentOptions, deployment, revision},
    charts::push_web_chart,
    hubsim::{Failure, Route},
    wait_for,
};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// The value of the first sample of `/metrics` text whose name and labels start with `series`
/// (`distr_agent_releases{status="healthy"}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', ',', '}']) || series.ends_with('}'))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn scrape(process: &AgentProcess) -> anyhow::Result<String> {
    Ok(reqwest::get(process.admin_url("/metrics")).await?.text().await?)
}

fn bodies(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|entry| entry["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_agents_own_logs_reach_the_hub_once_and_metrics_move() -> anyhow::Result<()> {
    let test = "agent-logs";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    // A Hub whose log store is down answers 500: the lines wait and come later, once.
    agent.hub.fail(Route::AgentLogs, Failure::Status(500));
    let chart = push_web_chart(test, "agent-logs-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    wait_for("the Hub to refuse agent logs", MINUTE, || async {
        let refused = agent.hub.requests_on(Route::AgentLogs);
        refused.iter().any(|r| r.status == Some(500)).then_some(())
    })
    .await?;
    let install_line = "helm succeeded release=\"web\" operation=\"install\"";
    assert!(
        !bodies(&agent.hub.agent_logs()).iter().any(|b| b.contains(install_line)),
        "the install, logged while the Hub failed, is not shipped yet"
    );
    agent.hub.clear_failure(Route::AgentLogs);

    let wanted = ["poller: ", "updater: ", "executor: ", install_line];
    let entries = wait_for("agent logs of all three processes", MINUTE, || async {
        let entries = agent.hub.agent_logs();
        let bodies = bodies(&entries);
        wanted
            .iter()
            .all(|want| bodies.iter().any(|body| body.contains(want)))
            .then_some(entries)
    })
    .await?;
    let lines = bodies(&entries);
    eprintln!(
        "{} agent log lines, e.g.:\n{}",
        lines.len(),
        lines[..lines.len().min(8)].join("\n")
    );
    let mut seen = HashSet::new();
    for entry in &entries {
        let key = (entry["timestamp"].to_string(), entry["body"].to_string());
        assert!(seen.insert(key), "a line arrived twice: {entry}");
        let severity = entry["severity"].as_str().unwrap_or_default();
        assert!(["info", "warn", "error"].contains(&severity), "{entry}");
    }
    let secret = agent.hub.secret_of(agent.target).unwrap_or_default();
    for body in &lines {
        assert!(!body.contains(&secret) && !body.contains("eyJ"), "a secret in {body}");
    }

    // Every process serves its figures, and they moved with the work just done.
    let executor = scrape(&agent.executor).await?;
    assert!(
        sample(
            &executor,
            "distr_agent_helm_operations_total{operation=\"install\",outcome=\"ok\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &executor,
            "distr_agent_helm_operation_duration_seconds_count{operation=\"install\"}"
        ) >= Some(1.0)
    );
    assert_eq!(sample(&executor, "distr_agent_releases{status=\"healthy\"}"), Some(1.0));
    assert_eq!(
        sample(
            &executor,
            "distr_agent_helm_operations_in_flight{operation=\"install\"}"
        ),
        Some(0.0)
    );
    let now = chrono::Utc::now().timestamp() as f64;
    for process in [&agent.executor, &agent.updater, &agent.poller] {
        let text = scrape(process).await?;
        let expiry = sample(&text, "distr_agent_tls_certificate_expiry_timestamp_seconds");
        assert!(expiry > Some(now), "a certificate that expires later: {expiry:?}");
    }
    let poller = scrape(&agent.poller).await?;
    assert!(
        sample(
            &poller,
            "distr_agent_hub_requests_total{route=\"resources\",outcome=\"ok\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &poller,
            "distr_agent_hub_requests_total{route=\"agent_logs\",outcome=\"server_error\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &poller,
            "distr_agent_hub_request_duration_seconds_count{route=\"status\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &poller,
            "distr_agent_agent_log_lines_shipped_total{component=\"executor\"}"
        ) >= Some(1.0)
    );
    assert!(sample(&poller, "distr_agent_oldest_unposted_status_age_seconds").is_some());
    Ok(())
}
