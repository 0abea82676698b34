//! Which namespace the releases live in, and what a change of the Hub's `namespace` does: a
//! cluster-scoped install (the executor bound to cluster-admin by the manifest's
//! ClusterRoleBinding) installs where the Hub says, and moves only once the Hub undeployed the
//! releases of the old namespace; a namespace-scoped one deploys only to its own namespace. No
//! change of namespace ever uninstalls anything. A cluster-scoped install also updates and rolls
//! itself back under its admission policies.

use std::{path::Path, time::Duration};

use distr_agent_e2e::{
    TestNamespace,
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts,
    install::{self, Scope},
    tools, wait_for,
};
use distr_agent_proto::v1 as pb;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Secret},
};
use kube::api::{Patch, PatchParams};
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

/// The manifest of a cluster-scoped agent as the Hub serves it for `version` (no target secret).
async fn cluster_manifest(agent: &Agent, version: &str, id: uuid::Uuid) -> anyhow::Result<String> {
    let mut params = install::hub_params(&agent.hub, agent.target, None, &agent.ns.name, Scope::Cluster);
    params["agentInterval"] = json!("1s");
    params["agentVersion"] = json!(version);
    params["agentVersionId"] = json!(id.to_string());
    install::render(
        &install::template_path(),
        &params,
        &distr_agent_e2e::TestEnv::get().test_dir(&agent.test),
    )
    .await
}

/// Waits until the updater reports `phase` for `version`; returns its message.
async fn update_phase(agent: &Agent, version: uuid::Uuid, phase: pb::UpdatePhase) -> anyhow::Result<String> {
    update_phase_saying(agent, version, phase, "").await
}

/// Waits until the update of `version` is in `phase` with a message that contains `saying`.
async fn update_phase_saying(
    agent: &Agent,
    version: uuid::Uuid,
    phase: pb::UpdatePhase,
    saying: &str,
) -> anyhow::Result<String> {
    let mut client = agent.updater_client("operator")?;
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    loop {
        let status = client
            .update_status(pb::UpdateStatusRequest {})
            .await
            .map(|s| s.into_inner());
        if let Ok(status) = &status
            && status.target_version_id == version.to_string()
            && status.phase == i32::from(phase)
            && status.message.contains(saying)
        {
            return Ok(status.message.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "update phase {phase:?} of {version} not reached; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn images(agent: &Agent) -> anyhow::Result<Vec<String>> {
    let mut images = Vec::new();
    for d in agent.ns.api::<Deployment>().list(&Default::default()).await?.items {
        let pod = d.spec.and_then(|s| s.template.spec).unwrap_or_default();
        images.extend(pod.containers.into_iter().filter_map(|c| c.image));
    }
    Ok(images)
}

#[tokio::test]
async fn a_cluster_scoped_agent_updates_itself_and_rolls_back_under_its_admission_policies() -> anyhow::Result<()> {
    let test = "cluster-selfupdate";
    // Self-update off in the poller: the test hands the manifests over itself, as the poller.
    let agent = Agent::start(
        test,
        AgentOptions {
            scope: Scope::Cluster,
            updater_env: vec![
                ("AGENT_UPDATE_TIMEOUT_SECONDS", "30".into()),
                ("AGENT_UPDATE_HEARTBEAT_SECONDS", "1".into()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let mut client = agent.updater_client("poller")?;
    // An upgrade: every object checked against the template, the admission objects compared
    // with the cluster's, the Deployments (and so their pods) admitted by the policies.
    let v2 = uuid::Uuid::new_v4();
    let started = std::time::Instant::now();
    client
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest: cluster_manifest(&agent, "0.2.0", v2).await?,
            target_version_id: v2.to_string(),
        })
        .await?;
    let done = update_phase(&agent, v2, pb::UpdatePhase::Done).await?;
    eprintln!("0.2.0 in {:.1}s: {done}", started.elapsed().as_secs_f64());
    for image in images(&agent).await? {
        assert!(image.ends_with(":0.2.0"), "{image}");
    }
    // A version whose executor never comes up is rolled back, the recorded objects checked again
    // and admitted again.
    let v3 = uuid::Uuid::new_v4();
    let stuck = cluster_manifest(&agent, "0.3.0", v3).await?.replacen(
        "      serviceAccountName: distr-agent-executor\n",
        "      serviceAccountName: distr-agent-executor\n      nodeSelector:\n        no-such-node: \"true\"\n",
        1,
    );
    let started = std::time::Instant::now();
    client
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest: stuck,
            target_version_id: v3.to_string(),
        })
        .await?;
    let failed = update_phase(&agent, v3, pb::UpdatePhase::Failed).await?;
    eprintln!("0.3.0 rolled back in {:.1}s: {failed}", started.elapsed().as_secs_f64());
    assert!(failed.contains("rolled back to the previous version"), "{failed}");
    for image in images(&agent).await? {
        assert!(image.ends_with(":0.2.0"), "{image}");
    }
    // No pod of the agent was refused on the way.
    let refused: Vec<String> = agent
        .ns
        .api::<Event>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .filter_map(|e| e.message)
        .collect();
    assert!(refused.is_empty(), "pods were refused: {refused:#?}");
    Ok(())
}

#[tokio::test]
async fn a_roll_back_does_not_write_back_a_recorded_object_outside_the_templates_shape() -> anyhow::Result<()> {
    let test = "cluster-rollback-recheck";
    let mut agent = Agent::start(
        test,
        AgentOptions {
            scope: Scope::Cluster,
            updater_env: vec![
                ("AGENT_UPDATE_TIMEOUT_SECONDS", "15".into()),
                ("AGENT_UPDATE_HEARTBEAT_SECONDS", "1".into()),
            ],
            ..Default::default()
        },
    )
    .await?;
    // A version that never comes up: the updater records the objects as they are, applies,
    // and waits at its gate.
    let v2 = uuid::Uuid::new_v4();
    let stuck = cluster_manifest(&agent, "0.2.0", v2).await?.replacen(
        "      serviceAccountName: distr-agent-executor\n",
        "      serviceAccountName: distr-agent-executor\n      nodeSelector:\n        no-such-node: \"true\"\n",
        1,
    );
    agent
        .updater_client("poller")?
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest: stuck,
            target_version_id: v2.to_string(),
        })
        .await?;
    update_phase(&agent, v2, pb::UpdatePhase::Waiting).await?;
    // The updater dies; meanwhile someone who may write its state Secret changes the recorded
    // executor Deployment (here the admin, which the policies let through; in a namespace-scoped
    // install anyone with `edit`).
    agent.updater.kill().await?;
    let secrets = agent.ns.api::<Secret>();
    let secret = secrets.get("distr-agent-updater-state").await?;
    let data = secret.data.unwrap_or_default();
    let mut state: serde_json::Value =
        serde_json::from_slice(&data.get("state.json").map(|b| b.0.clone()).unwrap_or_default())?;
    let recorded = &mut state["previous"]["Deployment/distr-agent-executor"];
    anyhow::ensure!(recorded.is_object(), "the executor's Deployment is recorded");
    recorded["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
    let patch = json!({"data": {"state.json": base64_of(&serde_json::to_vec(&state)?)}});
    secrets
        .patch(
            "distr-agent-updater-state",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    // The next updater takes the update over, its gate fails, and the roll-back writes back
    // every recorded object but that one; it does not complete, so it stays rolling back and
    // says why (in `UpdateStatus`, and again on each retry) instead of failing the version.
    agent.start_updater_again().await?;
    let refused = "not re-applied: Deployment distr-agent-executor changes the pod's hostNetwork";
    let rolling_back = update_phase_saying(&agent, v2, pb::UpdatePhase::RollingBack, refused).await?;
    eprintln!("{rolling_back}");
    assert!(
        rolling_back.contains("the roll-back did not complete"),
        "{rolling_back}"
    );
    let executor = agent.ns.api::<Deployment>().get("distr-agent-executor").await?;
    let pod = executor.spec.and_then(|s| s.template.spec).unwrap_or_default();
    assert_ne!(pod.host_network, Some(true), "the changed record was not applied");
    Ok(())
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
