//! The gate of an update (and of a roll-back): every agent Deployment rolled out, within a
//! deadline.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::AgentObjects;

/// How often the Deployments are read while the gate waits.
const PERIOD: Duration = Duration::from_secs(1);

/// Rolled out: the controller saw the latest spec and every replica is updated, ready and
/// available, with no old one left: kstatus's rule, the one the executor's health uses
/// ([`agent_kstatus::deployment`]).
pub fn rolled_out(deployment: &Value) -> bool {
    agent_kstatus::deployment_value(deployment).is_ok()
}

/// Waits until every Deployment in `names` rolled out (how long that took), or `timeout`
/// passed, or `acting` turned false (another updater took over): why not.
pub async fn wait(
    objects: &dyn AgentObjects,
    names: &[String],
    timeout: Duration,
    acting: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let mut waiting = Vec::new();
        for name in names {
            match objects.get("Deployment", name).await {
                Ok(Some(deployment)) if rolled_out(&deployment) => {}
                Ok(_) => waiting.push(name.clone()),
                Err(error) => waiting.push(format!("{name} ({error})")),
            }
        }
        if waiting.is_empty() {
            return Ok(started.elapsed());
        }
        if !acting() {
            return Err("another updater took over the update".into());
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "not rolled out within {}s: {}",
                timeout.as_secs(),
                waiting.join(", ")
            ));
        }
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_deployment_is_rolled_out_only_when_the_latest_generation_runs_everywhere() {
        let done = json!({"metadata": {"generation": 3}, "spec": {"replicas": 1},
            "status": {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}});
        assert!(rolled_out(&done));
        let mut stale = done.clone();
        stale["status"]["observedGeneration"] = json!(2);
        assert!(!rolled_out(&stale), "the previous rollout's status");
        let mut not_ready = done.clone();
        not_ready["status"]["readyReplicas"] = json!(0);
        assert!(!rolled_out(&not_ready));
        let mut old_pod_left = done;
        old_pod_left["status"]["replicas"] = json!(2);
        assert!(!rolled_out(&old_pod_left));
    }
}
