//! The manifest's NetworkPolicies, enforced by the node's NetworkPolicy engine (none runs here yet:
//! tests/env/node.sh says why; ignored until one does): only pods with
//! the poller's labels may open a connection to the executor's and the updater's gRPC ports.

use std::time::Duration;

use distr_agent_e2e::{
    real_node::{self, PodAgent, PodAgentOptions},
    wait_for,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::json;

/// Runs a pod with `labels` that tries to connect to `addr` for `seconds`; returns whether it
/// connected, and what it printed.
async fn probe(
    agent: &PodAgent,
    name: &str,
    labels: serde_json::Value,
    addr: &str,
    seconds: u32,
) -> anyhow::Result<(bool, String)> {
    let pods: kube::Api<Pod> = agent.ns.api();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65535, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe",
                "image": real_node::PAUSE_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/pause", "connect", addr, seconds.to_string()],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let phase = wait_for(
        &format!("probe {name} done"),
        Duration::from_secs(u64::from(seconds) + 60),
        || async {
            let phase = pods.get(name).await.ok()?.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        },
    )
    .await?;
    let logs = pods.logs(name, &Default::default()).await.unwrap_or_default();
    Ok((phase == "Succeeded", logs.trim().to_owned()))
}

#[tokio::test]
#[ignore = "no NetworkPolicy engine runs on the real node yet (tests/env/node.sh says why)"]
async fn only_the_poller_reaches_the_executor_and_the_updater() -> anyhow::Result<()> {
    let test = "rn-netpol";
    let agent = PodAgent::install(test, PodAgentOptions::default()).await?;
    let poller_labels = json!({"app": "distr-agent", "distr.test/probe": "true"});
    let other_labels = json!({"app": "not-the-agent"});
    for (service, port) in [("distr-agent-executor", 9443), ("distr-agent-updater", 9444)] {
        let addr = format!("{service}:{port}");
        // With the poller's labels: the connection opens (retried while the engine learns the
        // new pod's address).
        let (connected, said) = probe(&agent, &format!("as-poller-{port}"), poller_labels.clone(), &addr, 30).await?;
        eprintln!("as the poller -> {addr}: {said}");
        assert!(connected, "a pod with the poller's labels cannot reach {addr}: {said}");
        // Without them: no connection in 8 s of attempts.
        let (connected, said) = probe(&agent, &format!("other-{port}"), other_labels.clone(), &addr, 8).await?;
        eprintln!("another pod -> {addr}: {said}");
        assert!(!connected, "a pod without the poller's labels reached {addr}: {said}");
        // The admin port (probes, metrics) stays open to all.
        let admin = format!(
            "{}:9990",
            agent
                .pod(service)
                .await?
                .status
                .and_then(|s| s.pod_ip)
                .unwrap_or_default()
        );
        let (connected, said) = probe(&agent, &format!("other-admin-{port}"), other_labels.clone(), &admin, 30).await?;
        assert!(connected, "the admin port of {service} is closed to other pods: {said}");
    }
    agent.remove().await?;
    Ok(())
}
