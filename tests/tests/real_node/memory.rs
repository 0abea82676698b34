//! Memory inside the limits: the executor pod installs 20 releases at once under the memory
//! limit the manifest gives it, with no OOM kill; each pod's working set (from its memory
//! cgroup, as the kubelet computes it) at rest and at the install peak is printed.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use distr_agent_e2e::{
    agent::revision,
    real_node::{self, AGENT_APPS, PodAgent, PodAgentOptions, mib},
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
const RELEASES: usize = 20;

#[tokio::test]
async fn twenty_releases_at_once_stay_inside_the_executors_memory_limit() -> anyhow::Result<()> {
    let test = "rn-memory";
    let agent = PodAgent::install(test, PodAgentOptions::default()).await?;
    let mut pids = BTreeMap::new();
    for (app, container) in AGENT_APPS.into_iter().zip(["poller", "executor", "updater"]) {
        let pod = agent.pod(app).await?;
        pids.insert(app, agent.container_pid(&pod, container).await?);
    }
    let executor_limit = real_node::memory_limit(pids["distr-agent-executor"])?;
    // At rest: the agent idle between polls.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut at_rest = BTreeMap::new();
    for (app, pid) in &pids {
        at_rest.insert(*app, real_node::working_set(*pid)?);
    }

    // The peak: sampled every 100 ms while the 20 installs run.
    let peaks = Arc::new(Mutex::new(at_rest.clone()));
    let sampler = {
        let peaks = peaks.clone();
        let pids = pids.clone();
        tokio::spawn(async move {
            loop {
                for (app, pid) in &pids {
                    if let Ok(now) = real_node::working_set(*pid) {
                        let mut peaks = peaks.lock().unwrap_or_else(|e| e.into_inner());
                        let peak = peaks.entry(*app).or_default();
                        *peak = (*peak).max(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let chart = agent.push_pause_chart("rn-mem", &["0.1.0"]).await?;
    let deployments: Vec<_> = (0..RELEASES)
        .map(|i| agent.deployment(&format!("web-{i}"), &chart, "0.1.0", json!({})))
        .collect();
    let started = Instant::now();
    agent.set_deployments(deployments.clone());
    for deployment in &deployments {
        agent
            // Healthy: installed and its pod Ready (an install's "running" may be overtaken
            // between two polls when twenty run at once).
            .wait_status(&revision(deployment), "healthy", "", 5 * MINUTE)
            .await?;
    }
    let installed = started.elapsed();
    sampler.abort();
    let peaks = peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // No container was OOM-killed or restarted.
    for app in AGENT_APPS {
        let pod = agent.pod(app).await?;
        let status = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
        let container = &status[0];
        let last = container
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.reason.clone());
        assert_ne!(last.as_deref(), Some("OOMKilled"), "{app}");
        assert_eq!(container.restart_count, 0, "{app} restarted");
    }
    eprintln!("{RELEASES} releases installed at once in {installed:?}");
    for app in AGENT_APPS {
        eprintln!(
            "{app}: working set at rest {:.1} MiB, at the {RELEASES}-release peak {:.1} MiB",
            mib(at_rest[app]),
            mib(peaks[app])
        );
    }
    eprintln!("executor memory limit {:.0} MiB", mib(executor_limit));
    assert!(peaks["distr-agent-executor"] < executor_limit);
    agent.remove().await?;
    Ok(())
}
