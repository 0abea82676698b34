//! The install manifest (`deploy/`): rendered by Go's `text/template` as the Hub renders it,
//! applied to the real API server under the restricted Pod Security Standard, with the least
//! privilege each ServiceAccount needs proven by the API server's own access reviews, the
//! admission policy that pins the agent's Deployments, and a take-over from the Go agent.

use std::{path::Path, time::Duration};

use distr_agent_e2e::{
    TestEnv, TestNamespace,
    access::{self, Probe},
    agent::{Agent, AgentOptions},
    charts,
    hubsim::{HubSim, HubSimOptions},
    install::{self, Scope},
    tools, wait_for,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Namespace, Pod, Secret, ServiceAccount},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use uuid::Uuid;

const MINUTE: Duration = Duration::from_secs(60);
const AGENT_DEPLOYMENTS: [&str; 3] = ["distr-agent", "distr-agent-executor", "distr-agent-updater"];

fn example_params(scope: &str) -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/examples/{scope}.params.json"));
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

#[tokio::test]
async fn the_examples_are_the_template_as_the_hub_renders_it() -> anyhow::Result<()> {
    let work = TestEnv::get().test_dir("deploy-examples");
    for scope in ["namespace", "cluster"] {
        let rendered = install::render(&install::template_path(), &example_params(scope)?, &work).await?;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/examples/{scope}.yaml"));
        let committed = std::fs::read_to_string(&path)?;
        assert!(
            rendered == committed,
            "deploy/examples/{scope}.yaml is not the template rendered with {scope}.params.json; \
             regenerate it as deploy/README.md says"
        );
    }
    // At the manifest endpoint the Hub passes no target secret: the Secret is left out, so a
    // self-update never overwrites what the first install left.
    let mut params = example_params("namespace")?;
    params["targetSecret"] = Value::Null;
    let rendered = install::render(&install::template_path(), &params, &work).await?;
    assert!(!rendered.contains("distr-agent-auth\n  labels"), "{rendered}");
    assert!(!rendered.contains("DISTR_TARGET_SECRET"));
    Ok(())
}

/// A namespace that enforces the restricted Pod Security Standard.
pub(crate) async fn restricted_namespace(prefix: &str) -> anyhow::Result<TestNamespace> {
    let ns = TestNamespace::create(prefix).await?;
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}});
    Api::<Namespace>::all(ns.client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&labels))
        .await?;
    Ok(ns)
}

/// Renders the manifest for `ns` and `scope`, applies it, and waits until each agent
/// Deployment has its pod Ready (kwok plays the kubelet), with no pod refused on the way.
pub(crate) async fn install(ns: &TestNamespace, scope: Scope) -> anyhow::Result<String> {
    let mut params = example_params("namespace")?;
    params["targetNamespace"] = json!(ns.name);
    params["targetScope"] = json!(scope.as_str());
    let manifest = install::render(&install::template_path(), &params, &TestEnv::get().test_dir(&ns.name)).await?;
    install::apply(&ns.name, &manifest).await?;
    let deployments: Api<Deployment> = ns.api();
    for name in AGENT_DEPLOYMENTS {
        wait_for(&format!("Deployment {name} ready"), MINUTE, || async {
            let d = deployments.get(name).await.ok()?;
            (d.status?.ready_replicas? == 1).then_some(())
        })
        .await?;
    }
    let events: Api<Event> = ns.api();
    let refused: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .map(|e| e.message.unwrap_or_default())
        .collect();
    assert!(refused.is_empty(), "pods were refused: {refused:#?}");
    Ok(manifest)
}

fn probes(ns: &str) -> Vec<Probe> {
    let here = || Some(ns.to_owned());
    let elsewhere = || Some("kube-system".to_owned());
    let p = |verb, group, resource, namespace, name: Option<&str>| Probe {
        verb,
        group,
        resource,
        namespace,
        name: name.map(str::to_owned),
    };
    let executor_rights = format!("distr-agent-{ns}");
    let updater_rights = format!("distr-agent-{ns}-updater");
    vec![
        p("get", "", "secrets", here(), Some("distr-agent-auth")),
        p("list", "", "secrets", here(), None),
        p("create", "", "secrets", here(), None),
        // The updater's state: read and changed by name, never created (the install does).
        p("get", "", "secrets", here(), Some("distr-agent-updater-state")),
        p("patch", "", "secrets", here(), Some("distr-agent-updater-state")),
        p("create", "", "secrets", here(), Some("distr-agent-updater-state")),
        p("create", "", "configmaps", here(), Some("distr-agent-updater-state")),
        p("get", "", "configmaps", here(), Some("distr-agent-env")),
        // The customer's policy: no agent process but the executor may change it (see the
        // README on the namespace-scoped executor).
        p("patch", "", "configmaps", here(), Some("distr-agent-policy")),
        p("create", "", "configmaps", here(), Some("distr-agent-policy")),
        p("delete", "", "configmaps", here(), Some("distr-agent-policy")),
        p("create", "apps", "deployments", here(), None),
        p("patch", "apps", "deployments", here(), Some("distr-agent-executor")),
        p("patch", "apps", "deployments", here(), Some("web")),
        p("delete", "", "pods", here(), None),
        p("create", "rbac.authorization.k8s.io", "rolebindings", here(), None),
        p(
            "patch",
            "rbac.authorization.k8s.io",
            "rolebindings",
            here(),
            Some("distr-agent"),
        ),
        p(
            "patch",
            "rbac.authorization.k8s.io",
            "roles",
            here(),
            Some("distr-agent-updater"),
        ),
        p("get", "", "secrets", elsewhere(), None),
        p("create", "apps", "deployments", elsewhere(), None),
        p("list", "", "nodes", None, None),
        p("create", "rbac.authorization.k8s.io", "clusterrolebindings", None, None),
        p(
            "patch",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            Some(&executor_rights),
        ),
        p(
            "update",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            Some(&executor_rights),
        ),
        p(
            "patch",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            Some(&updater_rights),
        ),
        p(
            "update",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            Some(&updater_rights),
        ),
    ]
}

/// What each ServiceAccount may do, by probe label.
fn expected(service_account: &str, scope: Scope, probe: &Probe, ns: &str) -> bool {
    let in_ns = probe.namespace.as_deref() == Some(ns);
    match service_account {
        // The poller, and the Go agent's ServiceAccount after a take-over.
        "distr-agent-poller" | "distr-agent" => false,
        "distr-agent-updater" => {
            in_ns
                && matches!(
                    (probe.verb, probe.resource, probe.name.as_deref()),
                    ("patch", "deployments", Some("distr-agent-executor"))
                        | ("get", "configmaps", Some("distr-agent-env"))
                        | ("get" | "patch", "secrets", Some("distr-agent-updater-state"))
                )
        }
        "distr-agent-executor" => scope == Scope::Cluster || in_ns,
        other => panic!("no expectations for {other}"),
    }
}

/// Asks the API server about every probe for every account, prints the matrix, and fails on
/// any answer other than `expected`'s.
async fn access_matrix(ns: &TestNamespace, scope: Scope, title: &str, accounts: &[&str]) -> anyhow::Result<()> {
    let probes = probes(&ns.name);
    let mut table = format!(
        "\nSubjectAccessReview matrix, {} scope{title}\n{:<92}",
        scope.as_str(),
        "request"
    );
    for account in accounts {
        table.push_str(&format!(" {:>11}", account.trim_start_matches("distr-agent-")));
    }
    let mut wrong = Vec::new();
    for probe in &probes {
        table.push_str(&format!("\n{:<92}", probe.label().replace(&ns.name, "<ns>")));
        for &account in accounts {
            let allowed = access::allowed(&ns.client, &ns.name, account, probe).await?;
            table.push_str(&format!(" {:>11}", if allowed { "allowed" } else { "-" }));
            if allowed != expected(account, scope, probe, &ns.name) {
                wrong.push(format!(
                    "{account}: {} is {}",
                    probe.label(),
                    if allowed { "allowed" } else { "denied" }
                ));
            }
        }
    }
    eprintln!("{table}\n");
    assert!(wrong.is_empty(), "{wrong:#?}");
    Ok(())
}

async fn least_privilege(ns: &TestNamespace, scope: Scope) -> anyhow::Result<()> {
    access_matrix(
        ns,
        scope,
        "",
        &["distr-agent-poller", "distr-agent-updater", "distr-agent-executor"],
    )
    .await?;

    // The poller holds nothing beyond what every authenticated identity holds: the same rules
    // as a ServiceAccount nobody bound, and no binding anywhere names it.
    ns.api::<ServiceAccount>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "nobody"}}))?,
        )
        .await?;
    let nobody = access::own_rules(ns, "nobody").await?;
    assert_eq!(access::own_rules(ns, "distr-agent-poller").await?, nobody);
    assert_eq!(
        access::bindings_naming(&ns.client, &ns.name, "distr-agent-poller").await?,
        Vec::<String>::new()
    );
    // The updater is bound only to its own Role (and, cluster-wide, to reading the agent's
    // cluster objects).
    let mut updater_bindings = vec![format!("RoleBinding {}/distr-agent-updater", ns.name)];
    if scope == Scope::Cluster {
        updater_bindings.push(format!("ClusterRoleBinding distr-agent-{}-updater", ns.name));
    }
    assert_eq!(
        access::bindings_naming(&ns.client, &ns.name, "distr-agent-updater").await?,
        updater_bindings
    );

    // The poller's pod carries no ServiceAccount token.
    let pods: Api<Pod> = ns.api();
    let poller = pods.list(&ListParams::default().labels("app=distr-agent")).await?;
    let pod = poller.items.first().ok_or_else(|| anyhow::anyhow!("no poller pod"))?;
    let spec = pod.spec.clone().unwrap_or_default();
    assert_eq!(spec.automount_service_account_token, Some(false));
    let projected: Vec<String> = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.projected.is_some())
        .map(|v| v.name)
        .collect();
    assert!(projected.is_empty(), "the poller pod has token volumes: {projected:?}");
    Ok(())
}

#[tokio::test]
async fn namespace_scope_installs_restricted_with_least_privilege() -> anyhow::Result<()> {
    let ns = restricted_namespace("deploy-ns").await?;
    install(&ns, Scope::Namespace).await?;
    least_privilege(&ns, Scope::Namespace).await
}

#[tokio::test]
async fn cluster_scope_installs_restricted_and_pins_the_agent_deployments() -> anyhow::Result<()> {
    let ns = restricted_namespace("deploy-cluster").await?;
    install(&ns, Scope::Cluster).await?;
    least_privilege(&ns, Scope::Cluster).await?;

    let deployments: Api<Deployment> = ns.api();
    let dry_run = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let other_account = json!({"spec": {"template": {"spec": {"serviceAccountName": "default"}}}});
    let other_image = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "executor", "image": "registry.example/tools:latest"}
    ]}}}});
    // The policy takes effect once the API server has loaded it.
    let refusal = wait_for(
        "the admission policy to refuse another ServiceAccount",
        MINUTE,
        || async {
            match deployments
                .patch("distr-agent-executor", &dry_run, &Patch::Strategic(&other_account))
                .await
            {
                Err(kube::Error::Api(status)) => Some(status.message),
                _ => None,
            }
        },
    )
    .await?;
    assert!(
        refusal.contains("must run under the ServiceAccount distr-agent-executor"),
        "{refusal}"
    );
    let error = deployments
        .patch(
            "distr-agent-executor",
            &PatchParams::default(),
            &Patch::Strategic(&other_image),
        )
        .await
        .expect_err("another image is refused");
    assert!(
        error
            .to_string()
            .contains("must run images of ghcr.io/distr-sh/distr-agent/executor"),
        "{error}"
    );
    let error = deployments
        .patch(
            "distr-agent",
            &PatchParams::default(),
            &Patch::Strategic(&other_account),
        )
        .await
        .expect_err("the poller keeps its ServiceAccount");
    assert!(error.to_string().contains("distr-agent-poller"), "{error}");
    // A pod of another image under the executor's ServiceAccount, by any other route.
    executor_pod_refused(
        &ns,
        "borrowed-rights",
        json!({"name": "shell", "image": "registry.example/tools:latest"}),
        json!([]),
        "run only images of",
    )
    .await?;
    // The executor's image ships helm: a command, args or an init container of the agent's own
    // image would run anything under cluster-admin.
    let executor_image = "ghcr.io/distr-sh/distr-agent/executor:0.1.0";
    let helm_install = json!(["/usr/local/bin/helm", "install", "x", "oci://registry.example/x"]);
    let escapes = |container: &str| {
        let own_image = format!("ghcr.io/distr-sh/distr-agent/{container}:0.1.0");
        [
            (
                "a command override",
                json!({"spec": {"template": {"spec": {"containers": [
                    {"name": container, "command": helm_install}
                ]}}}}),
                "no command or args",
            ),
            (
                "an args override",
                json!({"spec": {"template": {"spec": {"containers": [
                    {"name": container, "args": ["install", "x", "oci://registry.example/x"]}
                ]}}}}),
                "no command or args",
            ),
            (
                "an added initContainer",
                json!({"spec": {"template": {"spec": {"initContainers": [
                    {"name": "init", "image": own_image, "command": helm_install}
                ]}}}}),
                "no init or ephemeral containers",
            ),
            (
                "a second container",
                json!({"spec": {"template": {"spec": {"containers": [
                    {"name": "sidecar", "image": own_image}
                ]}}}}),
                "its one container",
            ),
        ]
    };
    for (name, container) in AGENT_DEPLOYMENTS.into_iter().zip(["poller", "executor", "updater"]) {
        for (what, patch, message) in escapes(container) {
            let Err(error) = deployments
                .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            else {
                panic!("{what} on {name} was admitted");
            };
            assert!(error.to_string().contains(message), "{what} on {name}: {error}");
        }
    }
    // The executor starts the helm its environment names: no volume to bring another one, no
    // environment from elsewhere.
    for (what, patch) in [
        (
            "a ConfigMap volume with an executable",
            json!({"spec": {"template": {"spec": {"volumes": [
                {"name": "tools", "configMap": {"name": "distr-agent-env", "defaultMode": 0o755}}
            ]}}}}),
        ),
        (
            "environment from a ConfigMap",
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "executor", "envFrom": [{"configMapRef": {"name": "distr-agent-env"}}]}
            ]}}}}),
        ),
    ] {
        let Err(error) = deployments
            .patch(
                "distr-agent-executor",
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        else {
            panic!("{what} on the executor was admitted");
        };
        assert!(
            error
                .to_string()
                .contains("keeps the environment, envFrom and volumes of its template"),
            "{what}: {error}"
        );
    }
    executor_pod_refused(
        &ns,
        "borrowed-volume",
        json!({"name": "executor", "image": executor_image,
               "volumeMounts": [{"name": "tools", "mountPath": "/tools"}]}),
        json!([{"name": "tools", "configMap": {"name": "distr-agent-env", "defaultMode": 0o755}}]),
        "keep the environment, envFrom and volumes of the template",
    )
    .await?;
    // The same by any other route: a pod of the executor's image and ServiceAccount with a
    // command, and an ephemeral container added to the running executor pod.
    executor_pod_refused(
        &ns,
        "borrowed-helm",
        json!({"name": "executor", "image": executor_image, "command": helm_install}),
        json!([]),
        "no command, args or init containers",
    )
    .await?;
    let executor_pod = ns
        .api::<Pod>()
        .list(&ListParams::default().labels("app=distr-agent-executor"))
        .await?
        .items
        .into_iter()
        .next()
        .and_then(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no executor pod"))?;
    let debug = json!({"spec": {"ephemeralContainers": [{
        "name": "debugger", "image": executor_image, "command": ["/usr/local/bin/helm", "version"],
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
    }]}});
    let error = ns
        .api::<Pod>()
        .patch_ephemeral_containers(&executor_pod, &PatchParams::default(), &Patch::Strategic(&debug))
        .await
        .expect_err("an ephemeral container in the executor pod is refused");
    assert!(
        error.to_string().contains("ServiceAccount distr-agent-executor"),
        "{error}"
    );
    // A new version of the agent itself passes.
    let upgrade = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "executor", "image": "ghcr.io/distr-sh/distr-agent/executor:0.2.0"}
    ]}}}});
    deployments
        .patch(
            "distr-agent-executor",
            &PatchParams::default(),
            &Patch::Strategic(&upgrade),
        )
        .await?;
    Ok(())
}

/// Creates a pod under the executor's ServiceAccount and with its label (restricted, with
/// `container` and `volumes`) and requires the admission policy to refuse it with `message`.
async fn executor_pod_refused(
    ns: &TestNamespace,
    name: &str,
    mut container: Value,
    volumes: Value,
    message: &str,
) -> anyhow::Result<()> {
    container["securityContext"] = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "distr-agent-executor"}},
        "spec": {
            "serviceAccountName": "distr-agent-executor",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        }
    }))?;
    let Err(error) = ns.api::<Pod>().create(&PostParams::default(), &pod).await else {
        anyhow::bail!("the pod {name} under the executor's ServiceAccount was admitted");
    };
    anyhow::ensure!(error.to_string().contains(message), "{name}: {error}");
    Ok(())
}

/// The binding that moves the executor's rights away from the Go agent's ServiceAccount.
fn rights_removing_binding(scope: Scope, ns: &str) -> String {
    match scope {
        Scope::Cluster => format!("ClusterRoleBinding/distr-agent-{ns}"),
        Scope::Namespace => "RoleBinding/distr-agent".to_owned(),
    }
}

#[tokio::test]
async fn the_go_agent_replaces_its_deployment_next_to_last_and_loses_its_rights_last() -> anyhow::Result<()> {
    let work = TestEnv::get().test_dir("deploy-order");
    for scope in [Scope::Namespace, Scope::Cluster] {
        let mut params = example_params("namespace")?;
        params["targetScope"] = json!(scope.as_str());
        let ns = params["targetNamespace"].as_str().unwrap_or_default().to_owned();
        let manifest = install::render(&install::template_path(), &params, &work).await?;
        let order = install::kinds_and_names(&manifest)?;
        // The Go agent's pod stops once its Deployment is replaced: nothing but the binding
        // that takes its rights away may follow, and no other binding names it any more.
        assert_eq!(
            order[order.len() - 2..],
            ["Deployment/distr-agent".to_owned(), rights_removing_binding(scope, &ns)],
            "{} scope: {order:#?}",
            scope.as_str()
        );
        let first_deployment = order.iter().position(|o| o.starts_with("Deployment/"));
        assert_eq!(first_deployment, Some(order.len() - 4), "{order:#?}");
    }
    Ok(())
}

#[tokio::test]
async fn the_go_agent_hands_over_to_the_three_pods_by_applying_our_manifest() -> anyhow::Result<()> {
    take_over("takeover", Scope::Namespace).await
}

#[tokio::test]
async fn the_cluster_scoped_go_agent_hands_over_to_the_three_pods_by_applying_our_manifest() -> anyhow::Result<()> {
    take_over("takeover-cluster", Scope::Cluster).await
}

/// A take-over from the Go agent installed in `scope`.
async fn take_over(test: &str, scope: Scope) -> anyhow::Result<()> {
    let env = TestEnv::get();
    let ns = TestNamespace::create(test).await?;
    let hub = HubSim::start(HubSimOptions::default()).await?;
    let (target, secret) = hub.add_target();
    hub.set_namespace(target, Some(&ns.name));
    let work = env.test_dir(test);

    // The Go agent as a customer installed it, and a release it installed and tracks.
    let go_template = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/go-agent-v2.yaml.tmpl");
    let go_params = install::hub_params(&hub, target, Some(&secret), &ns.name, scope);
    install::apply(&ns.name, &install::render(&go_template, &go_params, &work).await?).await?;
    let chart_dir = charts::write_web_chart(&work.join("charts"), "takeover-web", "0.1.0")?;
    let helm_home = tempfile::tempdir()?;
    let chart = chart_dir.display().to_string();
    tools::helm(
        helm_home.path(),
        &["install", "web", &chart, "-n", &ns.name, "--wait", "--timeout", "60s"],
    )
    .await?
    .ok("helm install")?;
    let (id, revision) = (Uuid::new_v4(), Uuid::new_v4());
    let record = json!({"id": id, "revisionId": revision, "releaseName": "web", "helmRevision": 1, "phase": "ready", "logsEnabled": false});
    let tracking: Secret = serde_json::from_value(json!({
        "metadata": {"name": "sh.distr.agent.v1.web", "labels": {"agent.distr.sh/deployment": "web"}},
        "stringData": {"release": record.to_string()},
    }))?;
    ns.api::<Secret>().create(&PostParams::default(), &tracking).await?;
    let chart_url = charts::push_chart(&chart_dir).await?;
    hub.set_deployments(
        target,
        vec![json!({
            "registryAuth": distr_agent_e2e::agent::registry_auth(None),
            "id": id, "revisionId": revision, "releaseName": "web",
            "chartUrl": chart_url, "chartVersion": "0.1.0", "values": {},
            "logsEnabled": false, "forceRestart": false, "ignoreRevisionSkew": false,
        })],
    );

    // Its self-update into our manifest, as served at the manifest endpoint (no Secret), with
    // the Go agent's own token.
    let mut params = install::hub_params(&hub, target, None, &ns.name, scope);
    params["agentVersion"] = json!("0.2.0");
    let ours = install::render(&install::template_path(), &params, &work).await?;
    let go_agent = ns.token_kubeconfig("distr-agent").await?;
    let documents = install::apply_like_the_go_agent(&go_agent, &ns.name, &ours).await?;
    eprintln!("the Go agent applied all {documents} documents of our manifest");

    let deployments: Api<Deployment> = ns.api();
    for name in AGENT_DEPLOYMENTS {
        let d = deployments.get(name).await?;
        let pod = d.spec.and_then(|s| s.template.spec).unwrap_or_default();
        assert!(
            pod.containers[0]
                .image
                .as_deref()
                .unwrap_or_default()
                .starts_with("ghcr.io/distr-sh/distr-agent/")
        );
    }
    // Neither the Go agent's ServiceAccount nor the poller's holds anything now; the executor
    // holds what the Go agent held.
    for account in ["distr-agent", "distr-agent-poller"] {
        assert_eq!(
            access::bindings_naming(&ns.client, &ns.name, account).await?,
            Vec::<String>::new(),
            "{account}"
        );
    }
    access_matrix(
        &ns,
        scope,
        ", after the take-over",
        &["distr-agent", "distr-agent-poller", "distr-agent-executor"],
    )
    .await?;

    // Our processes adopt the release as the Go agent left it: healthy, no new revision.
    let agent = Agent::run(test, ns, hub, target, ours, AgentOptions::default()).await?;
    agent.wait_status(&revision.to_string(), "healthy", "", MINUTE).await?;
    // The poller names the manifest's agentVersion in its User-Agent (a real Hub records the
    // version only when it names one of its agent versions), on every call.
    let user_agents: std::collections::BTreeSet<Option<String>> = agent
        .hub
        .requests()
        .into_iter()
        .filter(|r| r.target == Some(target))
        .map(|r| r.user_agent)
        .collect();
    assert_eq!(
        user_agents,
        [Some("DistrAgentClient/0.2.0".to_owned())].into(),
        "the poller's User-Agent"
    );
    let history = agent.helm_json(&["history", "web"]).await?;
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    Ok(())
}

#[test]
fn the_images_are_static_binaries_from_scratch_with_the_tested_helm() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |path: &str| std::fs::read_to_string(root.join(path)).map_err(|e| anyhow::anyhow!("{path}: {e}"));
    let manifest = read("deploy/manifest.yaml.tmpl")?;
    for component in ["poller", "executor", "updater"] {
        let text = read(&format!("deploy/{component}.Dockerfile"))?;
        let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(
            stages,
            ["FROM scratch"],
            "{component}'s image has no base image from a registry"
        );
        assert!(
            text.contains("\nUSER 65532:65532\n"),
            "{component} runs as the manifest's numeric user"
        );
        assert!(
            text.contains(&format!("COPY ${{TARGETARCH}}/agent-{component}")),
            "{component}'s image copies the binary of its platform from deploy/context.sh's layout"
        );
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/agent-{component}\"]")),
            "{component}'s image runs its binary as built (the manifest sets no command)"
        );
        assert!(
            manifest.contains(&format!(
                "image: \"{{{{ $repo }}}}/{component}:{{{{ .agentVersion }}}}\""
            )),
            "the manifest runs the {component} image"
        );
    }
    let executor = read("deploy/executor.Dockerfile")?;
    assert!(
        executor.contains("${TARGETARCH}/helm /usr/local/bin/") && manifest.contains("value: /usr/local/bin/helm"),
        "the executor image ships helm where the manifest's AGENT_HELM_BIN names it"
    );
    // Both builds take the binaries from deploy/build.sh (as the benchmark measures them), lay
    // out the context with deploy/context.sh, and ship the helm version the tests run.
    let build = "bash deploy/build.sh --locked -p agent-poller -p agent-executor -p agent-updater)";
    let images = read("tests/env/images.sh")?;
    let release = read(".github/workflows/release.yml")?;
    for (name, text) in [("tests/env/images.sh", &images), ("release.yml", &release)] {
        // The script names the build script by its path from the repository root, quoted.
        let unquoted = text.replace('"', "").replace("$root/", "");
        assert!(unquoted.contains(build), "{name} builds through deploy/build.sh");
        assert!(text.contains("deploy/context.sh"), "{name} uses deploy/context.sh");
    }
    assert!(
        images.contains(r#"[ "$helm_version" = "$HELM_VERSION" ]"#),
        "tests/env/images.sh refuses a helm other than versions.env's"
    );
    assert!(
        release.contains("source tests/env/versions.env") && release.contains("helm.sh/helm/v4/cmd/helm@$HELM_VERSION"),
        "the release builds helm at versions.env's HELM_VERSION"
    );
    Ok(())
}
