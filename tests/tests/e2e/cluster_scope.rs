//! Which namespace the releases live in, and what a change of the Hub's `namespace` does: a
//! cluster-scoped install (the executor bound to cluster-admin by the manifest's
//! ClusterRoleBinding) installs where the Hub says, and moves only once the Hub undeployed the
//! releases of the old namespace; a namespace-scoped one deploys only to its own namespace. No
//! change of namespace ever uninstalls anything.

use std::{path::Path, time::Duration};

use distr_agent_e2e::{
    TestNamespace,
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts,
    install::Scope,
    tools, wait_for,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The releases Helm has in `namespace`: name, revision, status.
async fn releases(home: &Path, namespace: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let listed = tools::helm(home, &["ls", "-n", namespace, "-o", "json"])
        .await?
        .ok("helm ls")?;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout)?;
    let text = |release: &serde_json::Value, field: &str| match &release[field] {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    Ok(listed
        .iter()
        .map(|release| {
            (
                text(release, "name"),
                text(release, "revision"),
                text(release, "status"),
            )
        })
        .collect())
}

fn web(revision: &str) -> Vec<(String, String, String)> {
    vec![("web".into(), revision.into(), "deployed".into())]
}

#[tokio::test]
async fn a_cluster_scoped_executor_moves_to_another_namespace_only_once_the_old_one_is_undeployed() -> anyhow::Result<()>
{
    let test = "cluster-scope";
    let agent = Agent::start(
        test,
        AgentOptions {
            scope: Scope::Cluster,
            ..Default::default()
        },
    )
    .await?;
    let home = tempfile::tempdir()?;
    let chart = charts::push_web_chart(test, "cluster-web", &["0.1.0"]).await?;
    // The releases go to a namespace other than the agent's own.
    let apps = TestNamespace::create("cluster-apps").await?;
    agent.hub.set_namespace(agent.target, Some(&apps.name));
    let first = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![first.clone()]);
    agent.wait_status(&revision(&first), "healthy", "", MINUTE).await?;
    assert_eq!(releases(home.path(), &apps.name).await?, web("1"));

    // The Hub moves the target while the release is installed in the old namespace: the move
    // is reported on the deployment and nothing is touched (the old code uninstalled it).
    let moved = TestNamespace::create("cluster-moved").await?;
    agent.hub.set_namespace(agent.target, Some(&moved.name));
    let second = revise(&first, json!({"values": {"message": "second"}}));
    agent.set_deployments(vec![second.clone()]);
    let refused = agent
        .wait_status(
            &revision(&second),
            "error",
            "a change of namespace uninstalls nothing",
            MINUTE,
        )
        .await?;
    assert!(
        refused.message.contains(&format!(
            "from namespace {} to {}, but the agent installed web in {}",
            apps.name, moved.name, apps.name
        )),
        "{}",
        refused.message
    );
    assert_eq!(releases(home.path(), &apps.name).await?, web("1"), "left alone");
    assert_eq!(releases(home.path(), &moved.name).await?, Vec::new());

    // A Hub answer without a namespace means "unchanged": the release stays where it is and
    // is upgraded there (the old code moved everything to the agent's namespace).
    agent.hub.set_namespace(agent.target, None);
    agent
        .wait_status(&revision(&second), "healthy", "status check passed", MINUTE)
        .await?;
    assert_eq!(releases(home.path(), &apps.name).await?, web("2"));
    assert_eq!(releases(home.path(), &agent.ns.name).await?, Vec::new());

    // The explicit undeploy: the Hub names the old namespace without the release.
    agent.hub.set_namespace(agent.target, Some(&apps.name));
    agent.set_deployments(Vec::new());
    wait_for("the release uninstalled from the old namespace", MINUTE, || async {
        releases(home.path(), &apps.name).await.ok().filter(Vec::is_empty)
    })
    .await?;

    // Now the agent follows the Hub to the new namespace.
    agent.hub.set_namespace(agent.target, Some(&moved.name));
    let third = revise(&first, json!({"values": {"message": "third"}}));
    agent.set_deployments(vec![third.clone()]);
    agent.wait_status(&revision(&third), "healthy", "", MINUTE).await?;
    assert_eq!(releases(home.path(), &moved.name).await?, web("1"));
    assert_eq!(releases(home.path(), &apps.name).await?, Vec::new());

    // The namespace in use survives a restart: a Hub answer without one after it stays put.
    let mut agent = agent;
    agent.restart_executor().await?;
    agent.hub.set_namespace(agent.target, None);
    let fourth = revise(&first, json!({"values": {"message": "fourth"}}));
    agent.set_deployments(vec![fourth.clone()]);
    agent.wait_status(&revision(&fourth), "healthy", "", MINUTE).await?;
    assert_eq!(releases(home.path(), &moved.name).await?, web("2"));
    assert_eq!(releases(home.path(), &agent.ns.name).await?, Vec::new());
    Ok(())
}

#[tokio::test]
async fn a_namespace_scoped_executor_refuses_another_namespace_and_keeps_its_releases() -> anyhow::Result<()> {
    let test = "namespace-scope-move";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let home = tempfile::tempdir()?;
    let chart = charts::push_web_chart(test, "scoped-web", &["0.1.0"]).await?;
    let first = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![first.clone()]);
    agent.wait_status(&revision(&first), "healthy", "", MINUTE).await?;

    // The Hub names another namespace: an error on the deployment, the release untouched.
    let other = TestNamespace::create("scoped-other").await?;
    agent.hub.set_namespace(agent.target, Some(&other.name));
    let second = revise(&first, json!({"values": {"message": "second"}}));
    agent.set_deployments(vec![second.clone()]);
    let refused = agent
        .wait_status(&revision(&second), "error", "namespace-scoped", MINUTE)
        .await?;
    assert!(
        refused.message.contains(&format!(
            "only to its own namespace {}, not to {}",
            agent.ns.name, other.name
        )),
        "{}",
        refused.message
    );
    assert_eq!(releases(home.path(), &agent.ns.name).await?, web("1"));

    // Without a namespace, the agent's own it is.
    agent.hub.set_namespace(agent.target, None);
    agent
        .wait_status(&revision(&second), "healthy", "status check passed", MINUTE)
        .await?;
    assert_eq!(releases(home.path(), &agent.ns.name).await?, web("2"));
    assert_eq!(releases(home.path(), &other.name).await?, Vec::new());
    Ok(())
}
