//! Work an RPC starts runs to its end when the caller gives up (issue 19, item 1): the
//! operator's `Rollback` on the executor. (The updater's `ApplyAgentManifest` has its unit test
//! in `agent-updater`.)

use std::time::Duration;

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts::push_web_chart,
    wait_for,
};
use distr_agent_proto::v1 as pb;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// An operator's `grpcurl` that times out, or a Ctrl-C, drops the call: Helm must not be
/// killed mid-rollback (leaving the release `pending-rollback`); the rollback completes.
#[tokio::test]
async fn an_operator_rollback_whose_caller_gives_up_still_completes() -> anyhow::Result<()> {
    let test = "rollback-given-up";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "given-up-web", &["0.1.0", "0.2.0"]).await?;
    let first = deployment("web", &chart, "0.1.0", json!({}));
    let second = revise(&first, json!({"chartVersion": "0.2.0"}));
    for current in [&first, &second] {
        agent.set_deployments(vec![current.clone()]);
        agent
            .wait_status(&revision(current), "healthy", "status check passed", 2 * MINUTE)
            .await?;
    }
    let mut client = agent.executor_client().await?;
    // The connection is up before the call, so that the request reaches the executor.
    client.list_releases(pb::ListReleasesRequest {}).await?;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        client.rollback(pb::RollbackRequest {
            release_name: "web".into(),
            revision: 1,
        }),
    )
    .await;
    assert!(gave_up.is_err(), "the rollback answered within 50 ms: {gave_up:?}");
    let rolled_back = wait_for("revision 3 of web deployed, chart 0.1.0", MINUTE, || async {
        let history = agent.helm_json(&["history", "web"]).await.ok()?;
        history
            .as_array()?
            .iter()
            .find(|entry| entry["revision"] == 3 && entry["status"] == "deployed")
            .cloned()
    })
    .await?;
    assert_eq!(rolled_back["chart"], "given-up-web-0.1.0", "{rolled_back}");
    Ok(())
}
