//! Self-update through the updater: the manifests of `deploy/` rendered for two agent versions,
//! the updater under its own ServiceAccount token, kwok rolling the pods out.

use std::time::{Duration, Instant};

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revision},
    charts,
    hubsim::Route,
    install::{self, Scope},
};
use distr_agent_proto::v1 as pb;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret},
    networking::v1::NetworkPolicy,
    rbac::v1::Role,
};
use serde_json::json;
use uuid::Uuid;

const MINUTE: Duration = Duration::from_secs(60);
const AGENT_DEPLOYMENTS: [&str; 3] = ["distr-agent", "distr-agent-executor", "distr-agent-updater"];
/// `agentDockerConfig` values (base64 docker configs) of two versions.
const OLD_PULL: &str = "eyJhdXRocyI6eyJvbGQucmVnaXN0cnkuZXhhbXBsZSI6eyJhdXRoIjoiYjJ4a09tOXNaQT09In19fQ==";
const NEW_PULL: &str = "eyJhdXRocyI6eyJuZXcucmVnaXN0cnkuZXhhbXBsZSI6eyJhdXRoIjoiYm1WM09tNWxkdz09In19fQ==";

/// The manifest the Hub serves at its manifest endpoint for `version` (no target secret).
async fn manifest_of(agent: &Agent, name: &str, id: Uuid) -> anyhow::Result<String> {
    manifest_pulling_with(agent, name, id, "").await
}

/// The scope the agent was installed with.
fn scope_of(agent: &Agent) -> Scope {
    if agent.manifest.contains("kind: ClusterRoleBinding\n") {
        Scope::Cluster
    } else {
        Scope::Namespace
    }
}

/// The same with `agentDockerConfig` (base64): the pull Secret `distr-agent-image-pull`.
async fn manifest_pulling_with(agent: &Agent, name: &str, id: Uuid, docker_config: &str) -> anyhow::Result<String> {
    let mut params = install::hub_params(&agent.hub, agent.target, None, &agent.ns.name, scope_of(agent));
    params["agentDockerConfig"] = json!(docker_config);
    params["agentInterval"] = json!("1s");
    params["agentVersion"] = json!(name);
    params["agentVersionId"] = json!(id.to_string());
    let dir = distr_agent_e2e::TestEnv::get().test_dir(&agent.test);
    install::render(&install::template_path(), &params, &dir).await
}

/// The manifest without the document that defines `kind` `name`.
fn without(manifest: &str, kind: &str, name: &str) -> String {
    manifest
        .split("\n---")
        .filter(|doc| !(doc.contains(&format!("kind: {kind}\n")) && doc.contains(&format!("  name: {name}\n"))))
        .collect::<Vec<_>>()
        .join("\n---")
}

async fn images(agent: &Agent) -> anyhow::Result<Vec<String>> {
    let api = agent.ns.api::<Deployment>();
    let mut images = Vec::new();
    for name in AGENT_DEPLOYMENTS {
        let d = api.get(name).await?;
        let pod = d.spec.and_then(|s| s.template.spec).unwrap_or_default();
        images.push(pod.containers[0].image.clone().unwrap_or_default());
    }
    Ok(images)
}

/// The pod template of each agent Deployment, whole.
async fn templates(agent: &Agent) -> anyhow::Result<Vec<serde_json::Value>> {
    let api = agent.ns.api::<Deployment>();
    let mut templates = Vec::new();
    for name in AGENT_DEPLOYMENTS {
        let d = api.get(name).await?;
        templates.push(serde_json::to_value(d.spec.map(|s| s.template))?);
    }
    Ok(templates)
}

async fn wait_phase(
    agent: &Agent,
    version: Uuid,
    phase: pb::UpdatePhase,
    timeout: Duration,
) -> anyhow::Result<pb::UpdateStatusResponse> {
    wait_phase_at(agent, &agent.updater_addr, version, phase, timeout).await
}

async fn wait_phase_at(
    agent: &Agent,
    addr: &str,
    version: Uuid,
    phase: pb::UpdatePhase,
    timeout: Duration,
) -> anyhow::Result<pb::UpdateStatusResponse> {
    let mut client = agent.updater_client_at("operator", addr)?;
    let deadline = Instant::now() + timeout;
    loop {
        let status = client
            .update_status(pb::UpdateStatusRequest {})
            .await
            .map(|s| s.into_inner());
        if let Ok(status) = &status
            && status.target_version_id == version.to_string()
            && status.phase == i32::from(phase)
        {
            return Ok(status.clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "update phase {phase:?} of {version} not reached in {timeout:?}; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn options(version: Uuid, gate_seconds: u64, scope: Scope) -> AgentOptions {
    AgentOptions {
        scope,
        version_id: version.to_string(),
        updater_env: vec![
            ("AGENT_UPDATE_TIMEOUT_SECONDS", gate_seconds.to_string()),
            ("AGENT_UPDATE_HEARTBEAT_SECONDS", "1".into()),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_new_version_named_by_the_hub_is_applied_gated_and_pruned_while_releases_keep_reporting() -> anyhow::Result<()>
{
    new_versions_are_applied("selfupdate-good", Scope::Namespace).await
}

/// The same in cluster scope, where the manifest also holds the admission policies and
/// cluster-wide RBAC, which the updater compares with what the API server stored (defaults
/// filled in).
#[tokio::test]
async fn in_cluster_scope_a_new_version_named_by_the_hub_is_applied_gated_and_pruned() -> anyhow::Result<()> {
    new_versions_are_applied("selfupdate-good-cluster", Scope::Cluster).await
}

async fn new_versions_are_applied(test: &str, scope: Scope) -> anyhow::Result<()> {
    let v1 = Uuid::new_v4();
    let agent = Agent::start(test, options(v1, 60, scope)).await?;
    let chart = charts::push_web_chart(test, "selfupdate-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent.wait_status(&revision(&web), "healthy", "", MINUTE).await?;

    // Version 0.2.0 no longer has the executor's NetworkPolicy, which only the install
    // (kubectl) applied: it is kept. It still has the poller's, which the updater applies.
    let v2 = Uuid::new_v4();
    let manifest = without(
        &manifest_of(&agent, "0.2.0", v2).await?,
        "NetworkPolicy",
        "distr-agent-executor",
    );
    agent.hub.set_manifest(agent.target, &manifest);
    let switched = Instant::now();
    let switched_at = chrono::Utc::now();
    agent.hub.set_agent_version(agent.target, v2, "0.2.0");

    let done = wait_phase(&agent, v2, pb::UpdatePhase::Done, 2 * MINUTE).await?;
    eprintln!(
        "Hub version change -> new agent healthy: {:.1?} ({})",
        switched.elapsed(),
        done.message
    );
    for image in images(&agent).await? {
        assert!(image.ends_with(":0.2.0"), "{image}");
    }
    // What an operator sees, with the command of the README.
    let operator = install::OperatorCert {
        dir: agent.tls_dirs["operator"].clone(),
    };
    let mut args = operator.flags_for("updater", &agent.ns.name);
    args.extend([agent.updater_addr.clone(), "distr.agent.v1.Updater/UpdateStatus".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shown = distr_agent_e2e::tools::grpcurl(&args)
        .await?
        .ok("grpcurl UpdateStatus")?;
    assert!(shown.stdout.contains("UPDATE_PHASE_DONE"), "{}", shown.stdout);
    assert_eq!(done.previous_version_id, v1.to_string(), "the versions involved");
    let config = agent.ns.api::<ConfigMap>().get("distr-agent-env").await?;
    assert_eq!(
        config.data.unwrap_or_default()["DISTR_AGENT_VERSION_ID"],
        v2.to_string()
    );
    let policies = agent.ns.api::<NetworkPolicy>();
    let executor_policy = policies.get("distr-agent-executor").await?;
    let labels = executor_policy.metadata.labels.unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/part-of"], "distr-agent");
    assert!(
        !labels.contains_key("agent.distr.sh/applied-by"),
        "kept: the updater did not apply it: {labels:?}"
    );
    let poller_policy = policies.get("distr-agent-poller").await?;
    assert_eq!(
        poller_policy.metadata.labels.unwrap_or_default()["agent.distr.sh/applied-by"],
        "distr-agent-updater"
    );

    // Version 0.3.0 drops the poller's NetworkPolicy too: the updater applied it, so it is
    // pruned; the executor's is still kept. It also brings pull credentials for the agent's
    // images, where the install had none: the pull Secret the install created empty gets them.
    let v3 = Uuid::new_v4();
    let manifest = without(
        &without(
            &manifest_pulling_with(&agent, "0.3.0", v3, NEW_PULL).await?,
            "NetworkPolicy",
            "distr-agent-executor",
        ),
        "NetworkPolicy",
        "distr-agent-poller",
    );
    agent.hub.set_manifest(agent.target, &manifest);
    agent.hub.set_agent_version(agent.target, v3, "0.3.0");
    let done = wait_phase(&agent, v3, pb::UpdatePhase::Done, 2 * MINUTE).await?;
    assert_eq!(done.previous_version_id, v2.to_string());
    for image in images(&agent).await? {
        assert!(image.ends_with(":0.3.0"), "{image}");
    }
    assert!(
        policies.get_opt("distr-agent-poller").await?.is_none(),
        "the object the updater applied and the new version dropped is pruned"
    );
    assert!(
        policies.get_opt("distr-agent-executor").await?.is_some(),
        "an object the updater never applied is kept"
    );
    let pull = agent.ns.api::<Secret>().get("distr-agent-image-pull").await?;
    assert_eq!(
        serde_json::to_value(&pull.data.unwrap_or_default()[".dockerconfigjson"])?,
        json!(NEW_PULL),
        "the new version's pull credentials"
    );
    // The release keeps its status on the Hub (refreshed every 30 s) through the update.
    let since = |agent: &Agent| -> Vec<_> {
        agent
            .statuses(&revision(&web))
            .into_iter()
            .filter(|s| s.received_at > switched_at)
            .collect()
    };
    distr_agent_e2e::wait_for("a status of the release after the switch", MINUTE, || async {
        (!since(&agent).is_empty()).then_some(())
    })
    .await?;
    let during = since(&agent);
    assert!(during.iter().all(|s| s.status_type == "healthy"), "{during:#?}");
    assert_eq!(
        agent.hub.requests_on(Route::Manifest).len(),
        2,
        "each version handed over once"
    );
    Ok(())
}

#[tokio::test]
async fn a_version_that_does_not_come_up_is_rolled_back_and_not_tried_again() -> anyhow::Result<()> {
    a_bad_version_is_rolled_back("selfupdate-bad", Scope::Namespace).await
}

#[tokio::test]
async fn in_cluster_scope_a_version_that_does_not_come_up_is_rolled_back() -> anyhow::Result<()> {
    a_bad_version_is_rolled_back("selfupdate-bad-cluster", Scope::Cluster).await
}

async fn a_bad_version_is_rolled_back(test: &str, scope: Scope) -> anyhow::Result<()> {
    let v1 = Uuid::new_v4();
    let agent = Agent::start(test, options(v1, 15, scope)).await?;
    // The pull Secret as an install with pull credentials leaves it; the bad version brings
    // other credentials, which the roll-back must take back.
    let secrets = agent.ns.api::<Secret>();
    secrets
        .patch(
            "distr-agent-image-pull",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {".dockerconfigjson": OLD_PULL}})),
        )
        .await?;
    let pull_data = || async {
        let secret = secrets.get("distr-agent-image-pull").await?;
        anyhow::Ok(secret.data.unwrap_or_default())
    };
    let pull_before = pull_data().await?;
    let before = templates(&agent).await?;
    let v3 = Uuid::new_v4();
    // The executor of version 0.3.0 asks for a node that does not exist: it never comes up.
    let manifest = manifest_pulling_with(&agent, "0.3.0", v3, NEW_PULL).await?.replacen(
        "      serviceAccountName: distr-agent-executor\n",
        "      serviceAccountName: distr-agent-executor\n      nodeSelector:\n        no-such-node: \"true\"\n",
        1,
    );
    agent.hub.set_manifest(agent.target, &manifest);
    let switched = Instant::now();
    agent.hub.set_agent_version(agent.target, v3, "0.3.0");

    let failed = wait_phase(&agent, v3, pb::UpdatePhase::Failed, 2 * MINUTE).await?;
    eprintln!(
        "bad version -> rolled back: {:.1?} ({})",
        switched.elapsed(),
        failed.message
    );
    assert!(
        failed.message.contains("rolled back to the previous version"),
        "{}",
        failed.message
    );
    assert!(failed.failed_version_ids.contains(&v3.to_string()));
    assert_eq!(
        templates(&agent).await?,
        before,
        "the previous Deployments are back, whole"
    );
    assert_eq!(
        pull_data().await?,
        pull_before,
        "the pull Secret's previous credentials are back"
    );
    let recorded = state(&agent).await?;
    assert_eq!(
        recorded["previous"]["Secret/distr-agent-image-pull"]["data"][".dockerconfigjson"], OLD_PULL,
        "recorded with its data"
    );
    assert!(
        !agent.updater.log_text().contains(OLD_PULL) && !agent.updater.log_text().contains(NEW_PULL),
        "no Secret's data in the updater's log"
    );

    // Several poller cycles later, the failed version was not handed over again.
    let cycles = agent.hub.requests_on(Route::Resources).len();
    distr_agent_e2e::wait_for("five more poller cycles", MINUTE, || async {
        (agent.hub.requests_on(Route::Resources).len() >= cycles + 5).then_some(())
    })
    .await?;
    assert_eq!(
        agent.hub.requests_on(Route::Manifest).len(),
        1,
        "the failed version is not fetched again"
    );
    Ok(())
}

#[tokio::test]
async fn manifests_that_reach_beyond_the_agent_are_refused_whole() -> anyhow::Result<()> {
    let test = "selfupdate-refused";
    // Self-update off in the poller: the test hands manifests over itself, as the poller.
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let before = images(&agent).await?;
    let good = manifest_of(&agent, "0.2.0", Uuid::new_v4()).await?;
    let other_ns = format!(
        "{good}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\n  namespace: kube-system\n"
    );
    let crb = format!(
        "{good}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: borrowed\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\nsubjects:\n  - kind: ServiceAccount\n    name: distr-agent-updater\n    namespace: {}\n",
        agent.ns.name
    );
    let wider_role = good.replacen(
        "    resourceNames: [\"distr-agent-image-pull\"]\n    verbs: [\"get\", \"patch\"]",
        "    verbs: [\"get\", \"list\"]",
        1,
    );
    assert_ne!(wider_role, good);
    let foreign = format!(
        "{good}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n        - name: web\n          image: registry.example/web:1\n"
    );
    // The poller's Deployment with another selector, which is immutable: only the API server
    // knows, and refuses it in the dry run before anything is written.
    // (In the poller's Deployment alone: the NetworkPolicies select by that label too, and the
    // updater refuses a NetworkPolicy that applies to other pods before any dry run.)
    let immutable = good
        .split("\n---")
        .map(|doc| {
            if doc.contains("kind: Deployment\n") && doc.contains("  name: distr-agent\n") {
                doc.replace("app: distr-agent\n", "app: distr-agent-moved\n")
            } else {
                doc.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n---");
    assert_ne!(immutable, good);
    let mut client = agent.updater_client("poller")?;
    for (case, manifest, expected) in [
        ("an immutable field changed", immutable, "field is immutable"),
        ("an object in another namespace", other_ns, "not the agent's namespace"),
        ("a ClusterRoleBinding", crb, "needs other rights"),
        ("a changed Role", wider_role, "needs other rights"),
        (
            "a Deployment that is not the agent's",
            foreign,
            "not one of the agent's own objects",
        ),
    ] {
        let refused = client
            .apply_agent_manifest(pb::ApplyAgentManifestRequest {
                manifest,
                target_version_id: Uuid::new_v4().to_string(),
            })
            .await
            .expect_err(case);
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{case}: {refused:?}");
        assert!(refused.message().contains(expected), "{case}: {}", refused.message());
        eprintln!("refused {case}: {}", refused.message());
    }
    // Nothing was applied.
    assert_eq!(images(&agent).await?, before);
    assert!(agent.ns.api::<Deployment>().get_opt("web").await?.is_none());
    let role = agent.ns.api::<Role>().get("distr-agent-updater").await?;
    assert!(
        role.rules
            .unwrap_or_default()
            .iter()
            .all(|r| r.resource_names.is_some())
    );
    // And the operator may read the state but not apply.
    let mut operator = agent.updater_client("operator")?;
    let denied = operator
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest: good,
            target_version_id: Uuid::new_v4().to_string(),
        })
        .await
        .expect_err("operator");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    Ok(())
}

#[tokio::test]
async fn an_updater_killed_half_way_finishes_the_update() -> anyhow::Result<()> {
    let test = "selfupdate-crash";
    // Self-update off in the poller: the test hands the manifest over itself, as the poller.
    let mut agent = Agent::start(
        test,
        AgentOptions {
            updater_env: vec![
                ("AGENT_UPDATE_TIMEOUT_SECONDS", "60".into()),
                ("AGENT_UPDATE_HEARTBEAT_SECONDS", "1".into()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let v2 = Uuid::new_v4();
    let manifest = manifest_of(&agent, "0.2.0", v2).await?;
    let mut client = agent.updater_client("poller")?;
    client
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest,
            target_version_id: v2.to_string(),
        })
        .await?;
    // Applied, rolling out: the updater dies (its pod replaced, or worse).
    agent.restart_updater().await?;
    let done = wait_phase(&agent, v2, pb::UpdatePhase::Done, 2 * MINUTE).await?;
    eprintln!("after the restart: {}", done.message);
    assert!(agent.updater.log_text().contains("resuming an interrupted self-update"));
    for image in images(&agent).await? {
        assert!(image.ends_with(":0.2.0"), "no mix of versions: {image}");
    }
    Ok(())
}

/// The updater's state, as its state Secret holds it.
async fn state(agent: &Agent) -> anyhow::Result<serde_json::Value> {
    let secret = agent.ns.api::<Secret>().get("distr-agent-updater-state").await?;
    anyhow::ensure!(secret.type_.as_deref() == Some("Opaque"), "{:?}", secret.type_);
    let data = secret.data.unwrap_or_default();
    let text = data.get("state.json").map(|b| b.0.clone()).unwrap_or_default();
    Ok(serde_json::from_slice(&text)?)
}

/// The holder the updater's state names.
async fn holder(agent: &Agent) -> anyhow::Result<String> {
    Ok(state(agent).await?["holder"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_second_updater_stands_by_then_takes_over_and_rolls_back_a_bad_version() -> anyhow::Result<()> {
    let test = "selfupdate-takeover";
    // Self-update off in the poller: the test hands the manifest over itself, as the poller.
    let mut agent = Agent::start(
        test,
        AgentOptions {
            version_id: String::new(),
            ..options(Uuid::nil(), 20, Scope::Namespace)
        },
    )
    .await?;
    let before = templates(&agent).await?;
    let v3 = Uuid::new_v4();
    // The executor of version 0.3.0 asks for a node that does not exist: it never comes up.
    let manifest = manifest_of(&agent, "0.3.0", v3).await?.replacen(
        "      serviceAccountName: distr-agent-executor\n",
        "      serviceAccountName: distr-agent-executor\n      nodeSelector:\n        no-such-node: \"true\"\n",
        1,
    );
    let mut client = agent.updater_client("poller")?;
    client
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest: manifest.clone(),
            target_version_id: v3.to_string(),
        })
        .await?;
    wait_phase(&agent, v3, pb::UpdatePhase::Waiting, MINUTE).await?;
    let first = format!("/{}", agent.updater.pid().unwrap_or_default());
    assert!(holder(&agent).await?.ends_with(&first));

    // A second updater (the new pod of a surge) starts while the first is in the gate.
    let (mut second, second_addr) = agent.start_another_updater().await?;
    let mut second_client = agent.updater_client_at("poller", &second_addr)?;
    let refused = second_client
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest: manifest.clone(),
            target_version_id: Uuid::new_v4().to_string(),
        })
        .await
        .expect_err("the second updater must not take an update");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    eprintln!("second updater while the first lives: {}", refused.message());
    // Well past three heartbeats, the first still acts and the second has written nothing.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            holder(&agent).await?.ends_with(&first),
            "the first updater holds the update"
        );
    }
    assert!(second.log_text().contains("standing by"), "{}", second.log_text());
    assert!(!second.log_text().contains("resuming an interrupted self-update"));

    // The first dies: the second takes over once the heartbeat is stale, and rolls back.
    let killed = Instant::now();
    agent.updater.kill().await?;
    let failed = wait_phase_at(&agent, &second_addr, v3, pb::UpdatePhase::Failed, 2 * MINUTE).await?;
    eprintln!(
        "first updater killed in the gate -> rolled back by the second: {:.1?} ({})",
        killed.elapsed(),
        failed.message
    );
    assert!(
        failed.message.contains("rolled back to the previous version"),
        "{}",
        failed.message
    );
    assert!(second.log_text().contains("resuming an interrupted self-update"));
    let second_id = format!("/{}", second.pid().unwrap_or_default());
    assert!(holder(&agent).await?.ends_with(&second_id));
    assert!(failed.failed_version_ids.contains(&v3.to_string()));
    assert_eq!(
        templates(&agent).await?,
        before,
        "the previous Deployments are back, whole"
    );

    // Restarted again, the updater still knows the version failed: not applied again.
    second.kill().await?;
    agent.start_updater_again().await?;
    let mut client = agent.updater_client("poller")?;
    let again = client
        .apply_agent_manifest(pb::ApplyAgentManifestRequest {
            manifest,
            target_version_id: v3.to_string(),
        })
        .await
        .expect_err("a failed version");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    let status = agent
        .updater_client("operator")?
        .update_status(pb::UpdateStatusRequest {})
        .await?
        .into_inner();
    assert!(status.failed_version_ids.contains(&v3.to_string()));
    assert_eq!(templates(&agent).await?, before, "nothing applied again");
    Ok(())
}
