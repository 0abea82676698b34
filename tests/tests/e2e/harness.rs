//! The harness itself (issue 19, item 11): a test's end stops every process it started, the
//! `helm` processes of its executor included.

use std::time::Duration;

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revise},
    charts::push_web_chart,
    process::group_members,
    wait_for,
};
use serde_json::json;

use crate::reliability::helm_reaches;

const MINUTE: Duration = Duration::from_secs(60);

/// An install that waits an hour for pods that never become ready is under way when the test
/// ends: dropping the agent kills the executor and its `helm` child, which would otherwise
/// wait out its hour after the run (as three did after a green run of the suite).
#[tokio::test]
async fn a_tests_end_stops_the_helm_processes_of_its_executor() -> anyhow::Result<()> {
    let test = "harness-leaves-nothing";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "leftover-web", &["0.1.0"]).await?;
    let web = revise(
        &deployment("web", &chart, "0.1.0", json!({"neverReady": true})),
        json!({"helmOptions": {"timeout": "1h", "rollbackOnFailure": false, "waitStrategy": "watcher",
                               "cleanupOnFailure": false, "forceConflicts": false}}),
    );
    agent.set_deployments(vec![web]);
    helm_reaches(&agent, "web", "pending-install").await?;
    let group = agent
        .executor
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the executor is not running"))?;
    let helm = wait_for("a helm process in the executor's group", MINUTE, || async {
        group_members(group).into_iter().find(|pid| *pid != group)
    })
    .await?;
    let command = std::fs::read_to_string(format!("/proc/{helm}/cmdline"))
        .unwrap_or_default()
        .replace('\0', " ");
    eprintln!("helm running in the executor's group: {helm} {command}");

    drop(agent);
    let started = std::time::Instant::now();
    wait_for(
        "nothing left of the executor's process group",
        Duration::from_secs(10),
        || async { group_members(group).is_empty().then_some(()) },
    )
    .await?;
    eprintln!(
        "the executor's group was gone {:?} after the test's end",
        started.elapsed()
    );
    Ok(())
}
