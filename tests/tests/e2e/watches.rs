//! The watch-driven executor (issue 8): a stuck pod is named in the status, and a release
//! whose pods become ready reaches `healthy` on the Hub without waiting for a timer.

use std::time::Duration;

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts::push_web_chart,
    wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_stuck_pod_is_named_and_readiness_reaches_the_hub_at_once() -> anyhow::Result<()> {
    let test = "watch-health";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "watch-web", &["0.1.0"]).await?;
    // Helm does not wait (no rollback on failure either, which would make it wait): the
    // release is installed at once and its pod stays unschedulable.
    let web = revise(
        &deployment("web", &chart, "0.1.0", json!({"neverReady": true})),
        json!({"helmOptions": {"timeout": "1m", "waitStrategy": "hookOnly", "rollbackOnFailure": false, "cleanupOnFailure": true, "forceConflicts": false}}),
    );
    agent.set_deployments(vec![web.clone()]);
    let stuck = agent
        .wait_status(&revision(&web), "error", "is unschedulable", MINUTE)
        .await?;
    eprintln!("stuck: {}", stuck.message);
    assert!(
        stuck.message.contains("Deployment web-web"),
        "names the workload: {}",
        stuck.message
    );
    assert!(
        stuck.message.contains("pod web-web-"),
        "names the pod: {}",
        stuck.message
    );

    // Let the pod be scheduled: kwok makes it ready; the Hub hears of it from the watch.
    let deployments = agent.ns.api::<Deployment>();
    let unpin = json!({"spec": {"template": {"spec": {"nodeSelector": null}}}});
    deployments
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&unpin))
        .await?;
    let ready_at = wait_for("the workload to be ready", MINUTE, || async {
        let ready = deployments
            .get("web-web")
            .await
            .ok()?
            .status?
            .ready_replicas
            .unwrap_or(0);
        (ready >= 1).then(chrono::Utc::now)
    })
    .await?;
    let healthy = agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;
    eprintln!(
        "pods ready -> healthy on the Hub: {} ms (seen ready by the test, polling every 100 ms)",
        (healthy.received_at - ready_at).num_milliseconds()
    );
    Ok(())
}
