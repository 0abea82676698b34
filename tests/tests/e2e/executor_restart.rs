//! An executor restart is no outage on the Hub (issue 19, item 10): while the executor has
//! been unreachable for less than `AGENT_EXECUTOR_GRACE_SECONDS` the poller keeps the last
//! statuses; past it, the outage is reported.

use std::time::{Duration, Instant};

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revision},
    charts::push_web_chart,
    hubsim::Route,
    wait_for,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn an_executor_restart_is_no_outage_on_the_hub_but_a_longer_absence_is() -> anyhow::Result<()> {
    let test = "executor-restart-grace";
    let mut agent = Agent::start(
        test,
        AgentOptions {
            poller_env: vec![
                ("AGENT_HUB_TIMEOUT_SECONDS", "3".to_owned()),
                ("AGENT_EXECUTOR_GRACE_SECONDS", "20".to_owned()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let chart = push_web_chart(test, "restart-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent.wait_status(&revision(&web), "healthy", "", 2 * MINUTE).await?;

    // Killed, and started again after three poller cycles (1 s each) found it gone.
    let killed_at = chrono::Utc::now();
    let killed = Instant::now();
    agent.executor.kill().await?;
    let cycles = agent.hub.requests_on(Route::Resources).len();
    wait_for("three poller cycles with the executor down", MINUTE, || async {
        (agent.hub.requests_on(Route::Resources).len() >= cycles + 3).then_some(())
    })
    .await?;
    agent.start_executor_again().await?;
    eprintln!("executor down and back ready in {:.1?}", killed.elapsed());
    let cycles = agent.hub.requests_on(Route::Resources).len();
    wait_for("two poller cycles with the executor back", MINUTE, || async {
        (agent.hub.requests_on(Route::Resources).len() >= cycles + 2).then_some(())
    })
    .await?;
    let errors: Vec<_> = agent
        .statuses(&revision(&web))
        .into_iter()
        .filter(|s| s.received_at > killed_at && s.status_type == "error")
        .collect();
    assert!(
        errors.is_empty(),
        "the restart reached the Hub as an outage: {errors:#?}"
    );

    // Down for longer than the grace time: the outage is reported.
    let killed = Instant::now();
    agent.executor.kill().await?;
    let reported = agent
        .wait_status(&revision(&web), "error", "agent executor unreachable", MINUTE)
        .await?;
    eprintln!(
        "executor down -> outage reported after {:.1?}: {}",
        killed.elapsed(),
        reported.message
    );
    Ok(())
}
