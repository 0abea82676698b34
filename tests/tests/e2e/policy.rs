//! The customer's policy (ConfigMap `distr-agent-policy` in the agent's namespace), enforced
//! by the executor before Helm writes: refusals name the rule, the object and the value,
//! leave nothing installed, and an edit of the policy takes effect without a restart.

use std::time::Duration;

use distr_agent_e2e::{
    TestEnv, TestNamespace,
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts,
    install::Scope,
    tools,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
/// A refused release is retried after 30 s at first: an edit of the policy is followed by
/// then.
const RETRY: Duration = Duration::from_secs(100);

/// Writes the policy document into the agent's namespace (creating the ConfigMap the first
/// time), as the cluster's admin does.
async fn write_policy(ns: &TestNamespace, document: &str) -> anyhow::Result<()> {
    let api = ns.api::<ConfigMap>();
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("distr-agent-policy".into()),
            ..Default::default()
        },
        data: Some([("policy.yaml".to_owned(), document.to_owned())].into()),
        ..Default::default()
    };
    match api.get_opt("distr-agent-policy").await? {
        None => drop(api.create(&PostParams::default(), &config_map).await?),
        Some(_) => drop(
            api.patch(
                "distr-agent-policy",
                &PatchParams::apply("cluster-admin").force(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "distr-agent-policy"},
                    "data": {"policy.yaml": document},
                })),
            )
            .await?,
        ),
    }
    Ok(())
}

/// The sample chart plus a ClusterRoleBinding that gives its ServiceAccount cluster-admin.
async fn push_chart_with_cluster_role_binding(test: &str) -> anyhow::Result<String> {
    let dir = TestEnv::get().test_dir(test).join("charts");
    let chart = charts::write_web_chart(&dir, "policy-crb", "0.1.0")?;
    std::fs::write(
        chart.join("templates/crb.yaml"),
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .Release.Namespace }}-{{ .Release.Name }}-admin
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects:
  - {kind: ServiceAccount, name: default, namespace: {{ .Release.Namespace }}}
"#,
    )?;
    charts::push_chart(&chart).await
}

/// The releases Helm knows in `namespace`.
async fn helm_releases(namespace: &str) -> anyhow::Result<String> {
    let home = tempfile::tempdir()?;
    Ok(tools::helm(home.path(), &["ls", "-q", "-n", namespace])
        .await?
        .ok("helm ls")?
        .stdout)
}

#[tokio::test]
async fn images_are_checked_an_edit_takes_effect_and_a_bad_policy_blocks() -> anyhow::Result<()> {
    let test = "policy-images";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let ns = &agent.ns.name;
    write_policy(&agent.ns, "images: [registry.example/web]\npodSecurity: baseline\n").await?;
    let chart = charts::push_web_chart(test, "policy-web", &["0.1.0"]).await?;

    let good = deployment("good", &chart, "0.1.0", json!({}));
    let bad = deployment("bad", &chart, "0.1.0", json!({"image": "evil.example/miner:1"}));
    agent.set_deployments(vec![good.clone(), bad.clone()]);
    let started = std::time::Instant::now();
    agent.wait_status(&revision(&good), "healthy", "", MINUTE).await?;
    eprintln!(
        "allowed release healthy after {:.1}s (render, check, install)",
        started.elapsed().as_secs_f64()
    );
    let refused = agent
        .wait_status(
            &revision(&bad),
            "error",
            &format!("rule images refuses Deployment {ns}/bad-web: container web: evil.example/miner:1"),
            MINUTE,
        )
        .await?;
    eprintln!("refusal: {}", refused.message);
    let releases = helm_releases(ns).await?;
    assert!(
        !releases.lines().any(|name| name == "bad"),
        "nothing written: {releases}"
    );

    // The cluster's admin allows the registry: the refused release installs on its next
    // attempt, without a restart of anything.
    write_policy(
        &agent.ns,
        "images: [registry.example/web, evil.example]\npodSecurity: baseline\n",
    )
    .await?;
    let edited = std::time::Instant::now();
    agent.wait_status(&revision(&bad), "healthy", "", RETRY).await?;
    eprintln!(
        "refused release healthy {:.1}s after the policy edit",
        edited.elapsed().as_secs_f64()
    );

    // A policy that does not parse blocks the next upgrade, saying why, and the release
    // stays at its revision.
    write_policy(&agent.ns, "images: registry.example/web\n").await?;
    let upgrade = revise(&good, json!({"values": {"message": "blocked"}}));
    agent.set_deployments(vec![upgrade.clone(), bad.clone()]);
    agent
        .wait_status(&revision(&upgrade), "error", "the agent policy is invalid", MINUTE)
        .await?;
    let message = agent
        .statuses(&revision(&upgrade))
        .into_iter()
        .rev()
        .find(|status| status.status_type == "error")
        .map(|status| status.message)
        .unwrap_or_default();
    assert!(
        message.contains("distr-agent-policy/policy.yaml does not parse"),
        "{message}"
    );
    let history = agent.helm_json(&["history", "good"]).await?;
    assert_eq!(history.as_array().map(Vec::len), Some(1), "no upgrade: {history}");
    Ok(())
}

#[tokio::test]
async fn cluster_scope_refuses_namespaces_and_cluster_kinds_not_allowed() -> anyhow::Result<()> {
    let test = "policy-cluster";
    let agent = Agent::start(
        test,
        AgentOptions {
            scope: Scope::Cluster,
            ..Default::default()
        },
    )
    .await?;
    let apps = TestNamespace::create("policy-apps").await?;
    let elsewhere = TestNamespace::create("policy-elsewhere").await?;
    write_policy(
        &agent.ns,
        &format!("namespaces: [{}]\nclusterResourceWhitelist: []\n", apps.name),
    )
    .await?;
    let web = charts::push_web_chart(test, "policy-cluster-web", &["0.1.0"]).await?;
    let crb = push_chart_with_cluster_role_binding(test).await?;

    // A namespace the policy does not list.
    agent.hub.set_namespace(agent.target, Some(&elsewhere.name));
    let outside = deployment("outside", &web, "0.1.0", json!({}));
    agent.set_deployments(vec![outside.clone()]);
    agent
        .wait_status(
            &revision(&outside),
            "error",
            &format!("rule namespaces refuses release outside: {}", elsewhere.name),
            MINUTE,
        )
        .await?;
    assert_eq!(helm_releases(&elsewhere.name).await?.trim(), "");

    // The Hub undeploys there before it names another namespace (a move never uninstalls, and
    // waits until the agent's records of the old namespace are gone).
    agent.set_deployments(vec![]);
    for ns in [&elsewhere, &agent.ns] {
        let secrets = ns.api::<k8s_openapi::api::core::v1::Secret>();
        distr_agent_e2e::wait_for("the refused release's record to go", MINUTE, || async {
            secrets
                .get_opt("sh.distr.agent.v1.outside")
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await?;
    }

    // In an allowed namespace, a chart with a ClusterRoleBinding is refused, the plain one is
    // installed.
    agent.hub.set_namespace(agent.target, Some(&apps.name));
    let admin = deployment("admin", &crb, "0.1.0", json!({}));
    let plain = deployment("plain", &web, "0.1.0", json!({}));
    agent.set_deployments(vec![admin.clone(), plain.clone()]);
    agent.wait_status(&revision(&plain), "healthy", "", MINUTE).await?;
    let refused = agent
        .wait_status(
            &revision(&admin),
            "error",
            &format!(
                "rule clusterResourceWhitelist refuses ClusterRoleBinding {}-admin-admin: ClusterRoleBinding.rbac.authorization.k8s.io",
                apps.name
            ),
            MINUTE,
        )
        .await?;
    eprintln!("refusal: {}", refused.message);
    let releases = helm_releases(&apps.name).await?;
    assert!(!releases.lines().any(|name| name == "admin"), "{releases}");
    Ok(())
}
