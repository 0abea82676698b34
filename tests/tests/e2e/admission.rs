//! Someone with rights only in the agent's namespace (the stock ClusterRole `edit` bound there)
//! tries every known way to borrow the executor's rights or an identity of the agent, on the
//! real API server: in cluster scope the admission policies refuse each one; in namespace scope
//! no cluster-wide policy exists, and the table shows what stays open (deploy/README.md).

use std::time::Duration;

use distr_agent_e2e::{
    TestEnv, TestNamespace,
    access::Probe,
    install::{self, Scope},
    wait_for,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{ConfigMap, Pod, Secret},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const USER: &str = "namespace-editor";

/// Binds the stock ClusterRole `edit` to [`USER`] in `ns`, and returns a client that acts as
/// that user (the admin impersonating them).
async fn editor(ns: &TestNamespace) -> anyhow::Result<Client> {
    bound_user(ns, USER, "edit").await
}

/// Binds the ClusterRole `role` to the user `user` in `ns`; a client acting as them.
async fn bound_user(ns: &TestNamespace, user: &str, role: &str) -> anyhow::Result<Client> {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?;
    ns.api::<RoleBinding>().create(&PostParams::default(), &binding).await?;
    let kubeconfig = Kubeconfig::read_from(&TestEnv::get().admin_kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.into());
    Ok(Client::try_from(config)?)
}

/// `kubectl --as <USER> -n <ns> <args>`, stopped after 20 s (a port-forward that is let through
/// would run on).
async fn kubectl_as_editor(ns: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut all = vec!["--as", USER, "-n", ns];
    all.extend(args);
    match tokio::time::timeout(Duration::from_secs(20), install::kubectl(&all, None)).await {
        Ok(run) => {
            let run = run?;
            // stdout may hold a token: only stderr is ever shown, its last line (the error).
            let last = run
                .stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            Ok((run.success, last.trim().to_owned()))
        }
        Err(_) => Ok((true, "still running after 20 s".into())),
    }
}

/// A pod that passes the restricted Pod Security Standard, so that only the agent's policies
/// can refuse it.
fn pod(name: &str, account: Option<&str>, labels: Value, env: Value, volumes: Value) -> anyhow::Result<Pod> {
    let mounts: Vec<Value> = volumes
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| json!({"name": v["name"], "mountPath": format!("/mnt/{}", v["name"].as_str().unwrap_or_default())}))
        .collect();
    let mut spec = json!({
        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "shell", "image": "registry.example/tools:latest", "env": env,
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if let Some(account) = account {
        spec["serviceAccountName"] = json!(account);
    }
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "spec": spec}),
    )?)
}

/// How the API server answered one path: refused (with its message) or let through.
struct Outcome {
    path: &'static str,
    refused: bool,
    message: String,
}

fn answer<T>(path: &'static str, result: Result<T, kube::Error>) -> Outcome {
    match result {
        Ok(_) => Outcome {
            path,
            refused: false,
            message: "done".into(),
        },
        Err(kube::Error::Api(status)) => Outcome {
            path,
            refused: true,
            message: status.message,
        },
        Err(other) => Outcome {
            path,
            refused: true,
            message: other.to_string(),
        },
    }
}

fn answer_kubectl(path: &'static str, (success, stderr): (bool, String)) -> Outcome {
    Outcome {
        path,
        refused: !success,
        message: if success { format!("done {stderr}") } else { stderr },
    }
}

/// The name of the running pod of `app`.
async fn pod_of(ns: &TestNamespace, app: &str) -> anyhow::Result<String> {
    ns.api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items
        .into_iter()
        .find_map(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no pod of {app}"))
}

/// Tries every path as the namespace editor, once each, and returns the answers in order.
async fn try_every_path(ns: &TestNamespace, editor: &Client) -> anyhow::Result<Vec<Outcome>> {
    let pods: Api<Pod> = Api::namespaced(editor.clone(), &ns.name);
    let create = PostParams::default();
    let mount = |secret: &str| json!([{"name": "stolen", "secret": {"secretName": secret}}]);
    let mut outcomes = Vec::new();
    let attempts: [(&'static str, Pod); 7] = [
        (
            "a pod mounting distr-agent-poller-tls",
            pod(
                "mounts-poller-tls",
                None,
                json!({}),
                json!([]),
                mount("distr-agent-poller-tls"),
            )?,
        ),
        (
            "a pod mounting distr-agent-ca",
            pod("mounts-ca", None, json!({}), json!([]), mount("distr-agent-ca"))?,
        ),
        (
            "a pod taking distr-agent-auth as env",
            pod(
                "env-auth",
                None,
                json!({}),
                json!([{"name": "S", "valueFrom": {"secretKeyRef": {"name": "distr-agent-auth", "key": "DISTR_TARGET_SECRET"}}}]),
                json!([]),
            )?,
        ),
        (
            "a pod labelled app: distr-agent",
            pod(
                "poller-label",
                None,
                json!({"app": "distr-agent"}),
                json!([]),
                json!([]),
            )?,
        ),
        (
            "a pod labelled app: distr-agent-executor",
            pod(
                "executor-label",
                None,
                json!({"app": "distr-agent-executor"}),
                json!([]),
                json!([]),
            )?,
        ),
        (
            "a pod under distr-agent-updater",
            pod(
                "as-updater",
                Some("distr-agent-updater"),
                json!({}),
                json!([]),
                json!([]),
            )?,
        ),
        (
            "a pod under distr-agent-poller",
            pod("as-poller", Some("distr-agent-poller"), json!({}), json!([]), json!([]))?,
        ),
    ];
    for (path, attempt) in attempts {
        outcomes.push(answer(path, pods.create(&create, &attempt).await));
    }
    let hub = json!({"data": {"DISTR_RESOURCE_ENDPOINT": "https://hub.attacker.example/resources"}});
    outcomes.push(answer(
        "a patch of ConfigMap distr-agent-env",
        Api::<ConfigMap>::namespaced(editor.clone(), &ns.name)
            .patch("distr-agent-env", &PatchParams::default(), &Patch::Merge(&hub))
            .await,
    ));
    outcomes.push(answer_kubectl(
        "kubectl set env deployment/distr-agent",
        kubectl_as_editor(
            &ns.name,
            &[
                "set",
                "env",
                "deployment/distr-agent",
                "DISTR_RESOURCE_ENDPOINT=https://hub.attacker.example/resources",
            ],
        )
        .await?,
    ));
    let volume = json!({"spec": {"template": {"spec": {
        "volumes": [{"name": "config", "configMap": {"name": "attacker-config"}}]
    }}}});
    outcomes.push(answer(
        "another volume in the poller's Deployment",
        Api::<Deployment>::namespaced(editor.clone(), &ns.name)
            .patch("distr-agent", &PatchParams::default(), &Patch::Strategic(&volume))
            .await,
    ));
    outcomes.push(answer_kubectl(
        "kubectl create token distr-agent-executor",
        kubectl_as_editor(&ns.name, &["create", "token", "distr-agent-executor"]).await?,
    ));
    let token_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "executor-token", "annotations": {"kubernetes.io/service-account.name": "distr-agent-executor"}},
        "type": "kubernetes.io/service-account-token",
    }))?;
    outcomes.push(answer(
        "a service-account-token Secret for distr-agent-executor",
        Api::<Secret>::namespaced(editor.clone(), &ns.name)
            .create(&create, &token_secret)
            .await,
    ));
    // The executor creates its CA create-only: one planted before it would be trusted.
    let planted_ca: Secret = serde_json::from_value(json!({
        "metadata": {"name": "distr-agent-ca"},
        "stringData": {"ca.crt": "planted", "ca.key": "planted"},
    }))?;
    outcomes.push(answer(
        "a Secret created as distr-agent-ca",
        Api::<Secret>::namespaced(editor.clone(), &ns.name)
            .create(&create, &planted_ca)
            .await,
    ));
    let executor = pod_of(ns, "distr-agent-executor").await?;
    outcomes.push(answer_kubectl(
        "kubectl exec into the executor",
        kubectl_as_editor(&ns.name, &["exec", &executor, "--", "/usr/local/bin/helm", "version"]).await?,
    ));
    outcomes.push(answer_kubectl(
        "kubectl attach to the executor",
        kubectl_as_editor(&ns.name, &["attach", &executor]).await?,
    ));
    outcomes.push(answer_kubectl(
        "kubectl port-forward to the executor",
        kubectl_as_editor(&ns.name, &["port-forward", &format!("pod/{executor}"), ":9443"]).await?,
    ));
    Ok(outcomes)
}

fn table(scope: Scope, outcomes: &[Outcome]) -> String {
    let mut text = format!(
        "\nPaths tried as a user bound to `edit` in the agent's namespace, {} scope\n",
        scope.as_str()
    );
    for o in outcomes {
        // Refused by one of the agent's policies, denied by RBAC, or let through admission (an
        // exec then fails at kwok, which plays the kubelet and runs no container).
        let verdict = if o.message.contains("ValidatingAdmissionPolicy") {
            "REFUSED"
        } else if o.refused && o.message.contains("cannot") {
            "denied"
        } else {
            "admitted"
        };
        text.push_str(&format!("{:<58} {verdict:<8} {}\n", o.path, o.message));
    }
    text
}

/// What admission cannot see: whether the editor may read the agent's Secrets and impersonate
/// its ServiceAccounts (authorization only; the README names both).
async fn remainder(ns: &TestNamespace) -> anyhow::Result<String> {
    let mut text = String::from("What RBAC alone decides (no admission request):\n");
    let probes = [
        Probe {
            verb: "get",
            group: "",
            resource: "secrets",
            namespace: Some(ns.name.clone()),
            name: Some("distr-agent-ca".into()),
        },
        Probe {
            verb: "impersonate",
            group: "",
            resource: "serviceaccounts",
            namespace: Some(ns.name.clone()),
            name: Some("distr-agent-executor".into()),
        },
    ];
    for probe in probes {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(USER.into()),
                groups: Some(vec!["system:authenticated".into()]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(probe.verb.into()),
                    group: Some(probe.group.into()),
                    resource: Some(probe.resource.into()),
                    namespace: probe.namespace.clone(),
                    name: probe.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = Api::<SubjectAccessReview>::all(ns.client.clone())
            .create(&PostParams::default(), &review)
            .await?
            .status
            .is_some_and(|s| s.allowed);
        let label = probe.label().replace(&ns.name, "<ns>");
        text.push_str(&format!(
            "  {label:<56} {}\n",
            if allowed { "allowed" } else { "denied" }
        ));
    }
    Ok(text)
}

/// Waits until the API server has loaded the agent's policies: a dry-run pod carrying the
/// poller's label and a dry-run patch of `distr-agent-env`, both as the editor, are refused.
async fn policies_loaded(ns: &TestNamespace, editor: &Client) -> anyhow::Result<()> {
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let probe = pod("probe", None, json!({"app": "distr-agent"}), json!([]), json!([]))?;
    let pods: Api<Pod> = Api::namespaced(editor.clone(), &ns.name);
    wait_for("the pods policy to be loaded", MINUTE, || async {
        pods.create(&dry_run, &probe).await.is_err().then_some(())
    })
    .await?;
    let config: Api<ConfigMap> = Api::namespaced(editor.clone(), &ns.name);
    let patch = json!({"metadata": {"labels": {"probe": "yes"}}});
    let params = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for("the objects policy to be loaded", MINUTE, || async {
        config
            .patch("distr-agent-env", &params, &Patch::Merge(&patch))
            .await
            .is_err()
            .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn in_cluster_scope_a_namespace_editor_cannot_borrow_the_agents_rights() -> anyhow::Result<()> {
    let ns = crate::deploy::restricted_namespace("admission-cluster").await?;
    crate::deploy::install(&ns, Scope::Cluster).await?;
    let editor = editor(&ns).await?;
    policies_loaded(&ns, &editor).await?;
    let started = std::time::Instant::now();
    let outcomes = try_every_path(&ns, &editor).await?;
    eprintln!(
        "{}{}(tried in {:.1}s)",
        table(Scope::Cluster, &outcomes),
        remainder(&ns).await?,
        started.elapsed().as_secs_f64()
    );
    // `edit` may not write RBAC objects at all; `admin` may, but not the updater's.
    let namespace_admin = bound_user(&ns, "namespace-admin", "admin").await?;
    // (Within what `admin` holds itself, or RBAC refuses the escalation first.)
    let wider = json!({"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create"]}]});
    let error = Api::<Role>::namespaced(namespace_admin, &ns.name)
        .patch("distr-agent-updater", &PatchParams::default(), &Patch::Merge(&wider))
        .await
        .expect_err("a namespace admin widens the updater's Role");
    eprintln!("a namespace admin widening Role distr-agent-updater: REFUSED {error}");
    assert!(error.to_string().contains("ValidatingAdmissionPolicy"), "{error}");
    let let_through: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.refused || !o.message.contains("ValidatingAdmissionPolicy"))
        .map(|o| o.path)
        .collect();
    assert!(
        let_through.is_empty(),
        "not refused by the agent's admission policies: {let_through:#?}"
    );
    // The agent's own pods were admitted under the same policies: every Deployment is ready
    // (install waited for it), with no pod refused.
    Ok(())
}

#[tokio::test]
async fn in_namespace_scope_the_paths_stay_with_rbac() -> anyhow::Result<()> {
    let ns = crate::deploy::restricted_namespace("admission-ns").await?;
    crate::deploy::install(&ns, Scope::Namespace).await?;
    let editor = editor(&ns).await?;
    let outcomes = try_every_path(&ns, &editor).await?;
    eprintln!("{}{}", table(Scope::Namespace, &outcomes), remainder(&ns).await?);
    // No cluster-wide policy: nothing here is refused by one of the agent's.
    assert!(
        outcomes
            .iter()
            .all(|o| !o.message.contains("ValidatingAdmissionPolicy")),
        "a namespace-scoped install holds no admission policy"
    );
    Ok(())
}
