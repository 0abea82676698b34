//! Helm operations cut short by the executor's container dying: SIGKILL through the runtime
//! during an upgrade (the kubelet restarts the container; `helm` died with it, which the
//! executor's fence knows, so the upgrade is taken over at once instead of after Helm's
//! timeout), and SIGTERM through `kubectl delete pod` during an install (Helm stops within the
//! grace period and records what it did: no `pending-*` revision is left).

use std::time::{Duration, Instant};

use chrono::Utc;
use distr_agent_e2e::{
    agent::{revise, revision},
    install,
    real_node::{self, PodAgent, PodAgentOptions},
    wait_for,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Helm's statuses of the release's revisions.
async fn helm_statuses(agent: &PodAgent, release: &str) -> anyhow::Result<Vec<String>> {
    let history = agent.helm_json(&["history", release]).await?;
    Ok(history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["status"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
#[ignore = "needs the executor image with the fence (agent-executor/src/fence.rs); not yet run on the real node"]
async fn a_killed_executor_container_restarts_and_its_upgrade_converges_at_once() -> anyhow::Result<()> {
    let test = "rn-sigkill";
    let agent = PodAgent::install(test, PodAgentOptions::default()).await?;
    let chart = agent.push_pause_chart("rn-kill", &["0.1.0", "0.2.0"]).await?;
    let v1 = agent.deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "healthy", "status check passed", 2 * MINUTE)
        .await?;

    // An upgrade whose pods become ready 12 s after they start, under a 60 s Helm timeout
    // (a host-run executor waits that plus two minutes before it takes such an upgrade over).
    let v2 = revise(
        &v1,
        json!({"chartVersion": "0.2.0", "values": {"readyAfter": 12},
               "helmOptions": {"timeout": "60s", "waitStrategy": "watcher"}}),
    );
    agent.set_deployments(vec![v2.clone()]);
    wait_for("helm upgrade pending", MINUTE, || async {
        let statuses = helm_statuses(&agent, "web").await.ok()?;
        (statuses.last().map(String::as_str) == Some("pending-upgrade")).then_some(())
    })
    .await?;

    let pod = agent.pod("distr-agent-executor").await?;
    let container = real_node::container_id(&pod, "executor")?;
    let killed = Instant::now();
    let killed_at = Utc::now();
    agent
        .node
        .ctr(&["tasks", "kill", "--signal", "SIGKILL", &container])
        .await?
        .ok("ctr tasks kill")?;

    // The kubelet starts the container again in the same pod.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = agent.ns.api();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let started_at = wait_for("executor container restarted", 2 * MINUTE, || async {
        let pod = pods.get(&name).await.ok()?;
        let status = pod.status?.container_statuses?.into_iter().next()?;
        let running = status.state?.running?;
        (status.restart_count >= 1).then_some(real_node::api_time(&running.started_at?))
    })
    .await?;
    let restarted = killed.elapsed();
    let converged = agent
        .wait_status(&revision(&v2), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    let start_to_converged = (converged.received_at - started_at).to_std().unwrap_or_default();
    eprintln!(
        "SIGKILL -> container running again: {restarted:?}; new container start -> upgrade converged: \
         {start_to_converged:?}; SIGKILL -> converged: {:?}",
        (converged.received_at - killed_at).to_std().unwrap_or_default()
    );
    let statuses = helm_statuses(&agent, "web").await?;
    assert!(!statuses.iter().any(|s| s.starts_with("pending")), "{statuses:?}");
    assert_eq!(statuses.last().map(String::as_str), Some("deployed"), "{statuses:?}");
    assert!(
        start_to_converged <= Duration::from_secs(30),
        "the upgrade converged {start_to_converged:?} after the new container started (helm died with the old one)"
    );
    agent.remove().await?;
    Ok(())
}

#[tokio::test]
async fn a_deleted_executor_pod_stops_helm_within_its_grace_period() -> anyhow::Result<()> {
    let test = "rn-sigterm";
    let agent = PodAgent::install(test, PodAgentOptions::default()).await?;
    let chart = agent.push_pause_chart("rn-term", &["0.1.0"]).await?;
    // An install that waits 20 s for its pod.
    let web = revise(
        &agent.deployment("web", &chart, "0.1.0", json!({"readyAfter": 20})),
        json!({"helmOptions": {"timeout": "120s", "waitStrategy": "watcher"}}),
    );
    agent.set_deployments(vec![web.clone()]);
    wait_for("helm install pending", MINUTE, || async {
        let statuses = helm_statuses(&agent, "web").await.ok()?;
        (statuses.last().map(String::as_str) == Some("pending-install")).then_some(())
    })
    .await?;

    let pod = agent.pod("distr-agent-executor").await?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    let deleted = Instant::now();
    // `kubectl delete pod` waits until the pod is gone.
    install::kubectl(&["delete", "pod", "-n", &agent.ns.name, &name, "--wait=true"], None)
        .await?
        .ok("kubectl delete pod")?;
    let gone = deleted.elapsed();
    eprintln!("kubectl delete pod -> pod gone: {gone:?} (grace period {grace} s)");
    assert!(
        gone < Duration::from_secs(grace as u64),
        "the executor took its whole grace period"
    );
    // Helm recorded how its install ended: nothing pending.
    let statuses = helm_statuses(&agent, "web").await.unwrap_or_default();
    eprintln!("helm history after the pod stopped: {statuses:?}");
    assert!(!statuses.iter().any(|s| s.starts_with("pending")), "{statuses:?}");

    // The Deployment's next pod finishes the job.
    agent.wait_ready(2 * MINUTE).await?;
    let running = agent
        .wait_status(&revision(&web), "running", "succeeded", 2 * MINUTE)
        .await?;
    eprintln!(
        "kubectl delete pod -> release running ({}): {:?}",
        running.message,
        deleted.elapsed()
    );
    agent.remove().await?;
    Ok(())
}
