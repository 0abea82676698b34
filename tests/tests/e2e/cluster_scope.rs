//! A cluster-scoped install (the executor bound to cluster-admin by the manifest's
//! ClusterRoleBinding) installs where the Hub says, and follows the Hub to another namespace.

use std::time::Duration;

use distr_agent_e2e::{
    TestNamespace,
    agent::{Agent, AgentOptions, deployment, revision},
    charts,
    install::Scope,
    tools,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_cluster_scoped_executor_follows_the_hub_to_another_namespace() -> anyhow::Result<()> {
    let test = "cluster-scope";
    let agent = Agent::start(
        test,
        AgentOptions {
            scope: Scope::Cluster,
            ..Default::default()
        },
    )
    .await?;
    let chart = charts::push_web_chart(test, "cluster-web", &["0.1.0"]).await?;
    // The releases go to a namespace other than the agent's own.
    let apps = TestNamespace::create("cluster-apps").await?;
    agent.hub.set_namespace(agent.target, Some(&apps.name));
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent.wait_status(&revision(&web), "healthy", "", MINUTE).await?;
    let home = tempfile::tempdir()?;
    let listed = tools::helm(home.path(), &["ls", "-n", &apps.name, "-o", "json"])
        .await?
        .ok("helm ls")?;
    assert!(listed.stdout.contains("\"web\""), "{}", listed.stdout);

    // The Hub moves the target: the next revision lands in the new namespace.
    let moved = TestNamespace::create("cluster-moved").await?;
    agent.hub.set_namespace(agent.target, Some(&moved.name));
    let next = distr_agent_e2e::agent::revise(&web, json!({"values": {"message": "moved"}}));
    agent.set_deployments(vec![next.clone()]);
    agent.wait_status(&revision(&next), "healthy", "", MINUTE).await?;
    let listed = tools::helm(home.path(), &["ls", "-n", &moved.name, "-o", "json"])
        .await?
        .ok("helm ls")?;
    assert!(listed.stdout.contains("\"web\""), "{}", listed.stdout);
    let old = tools::helm(home.path(), &["ls", "-n", &apps.name, "-q"])
        .await?
        .ok("helm ls")?;
    eprintln!("left in the previous namespace: {:?}", old.stdout.trim());
    Ok(())
}
