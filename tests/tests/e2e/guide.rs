//! The operator's guide (`docs/operator-guide.md`), command by command: each shell block is
//! taken from the file and run with bash against the real control plane, Helm and the agent's
//! processes, and what the guide says follows is checked.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use distr_agent_e2e::{
    TestEnv, TestNamespace,
    access::{self, Probe},
    agent::{Agent, AgentOptions, deployment, revision},
    charts::{self, push_web_chart},
    guide,
    hubsim::{HubSim, HubSimOptions, RecordedStatus},
    install::{self, OperatorCert, Scope},
    kwok::LogFile,
    tools, wait_for,
};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{ConfigMap, Secret},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use uuid::Uuid;

const MINUTE: Duration = Duration::from_secs(60);

/// A namespace and a Hub target for it, before anything is installed.
struct Target {
    test: &'static str,
    ns: TestNamespace,
    hub: HubSim,
    id: Uuid,
    secret: String,
    work: PathBuf,
}

impl Target {
    async fn new(test: &'static str) -> anyhow::Result<Self> {
        let ns = TestNamespace::create(test).await?;
        let hub = HubSim::start(HubSimOptions::default()).await?;
        let (id, secret) = hub.add_target();
        hub.set_namespace(id, Some(&ns.name));
        let work = TestEnv::get().test_dir(test);
        Ok(Self {
            test,
            ns,
            hub,
            id,
            secret,
            work,
        })
    }

    /// What the Hub's connect URL returns for this target: `template` rendered with the Hub's
    /// parameters, written to a file that stands for the URL. Returns the file and the text.
    async fn connect_url(
        &self,
        template: &std::path::Path,
        scope: Scope,
        version: &str,
    ) -> anyhow::Result<(String, String)> {
        let mut params = install::hub_params(&self.hub, self.id, Some(&self.secret), &self.ns.name, scope);
        params["agentVersion"] = json!(version);
        let manifest = install::render(template, &params, &self.work).await?;
        let file = self.work.join(format!("connect-{}-{version}.yaml", scope.as_str()));
        std::fs::write(&file, &manifest)?;
        Ok((file.display().to_string(), manifest))
    }

    /// Installs the agent with the guide's command and runs its processes.
    async fn install(self, scope: Scope) -> anyhow::Result<Agent> {
        let (url, manifest) = self.connect_url(&install::template_path(), scope, "0.1.0").await?;
        guide::run(
            "install",
            &[("<namespace>", &self.ns.name), ("<connect URL>", &url)],
            &self.work,
        )
        .await?
        .ok("the guide's install command")?;
        let options = AgentOptions {
            scope,
            ..AgentOptions::default()
        };
        Agent::run(self.test, self.ns, self.hub, self.id, manifest, options).await
    }
}

/// `<namespace>` filled.
fn in_ns(ns: &str) -> [(&'static str, &str); 1] {
    [("<namespace>", ns)]
}

/// A release the Hub lists for the agent, healthy; returns its deployment entry.
async fn healthy_release(agent: &Agent, chart_name: &str) -> anyhow::Result<Value> {
    let chart = push_web_chart(&agent.test, chart_name, &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({"message": "from the hub"}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    Ok(web)
}

/// The finalizer with which the tests hold the ReplicaSets of the agent's Deployments while
/// they stop the matching process (see [`remove_as_the_kubelet_would_let_it`]).
const HELD_BY_PROCESS: &str = "distr.test/agent-process";

/// Runs the removal block `id` while playing the kubelet's part for the agent's processes,
/// which the harness runs on the host rather than in pods. On a node, a Deployment deleted with
/// `--cascade=foreground` is gone only once its pods are, and a pod is gone only once its
/// container has stopped; kwok deletes pods at once, so each ReplicaSet of the agent is held by
/// a finalizer instead: when it is being deleted, the matching process gets SIGTERM, and the
/// finalizer goes once the process has exited. A removal that does not wait for the
/// Deployments would delete the executor's Secrets while it still runs, and it would issue them
/// again.
async fn remove_as_the_kubelet_would_let_it(
    agent: &mut Agent,
    id: &'static str,
    fills: Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    let replica_sets: Api<ReplicaSet> = agent.ns.api();
    let ours = ListParams::default().labels("app.kubernetes.io/part-of=distr-agent");
    for rs in replica_sets.list(&ours).await? {
        let mut finalizers = rs.metadata.finalizers.unwrap_or_default();
        finalizers.push(HELD_BY_PROCESS.into());
        let patch = json!({"metadata": {"finalizers": finalizers}});
        let name = rs.metadata.name.unwrap_or_default();
        replica_sets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    assert!(agent.executor.is_running(), "the executor runs when the removal starts");

    let dir = agent_dir(agent).join("removal");
    let started = std::time::Instant::now();
    let removal = tokio::spawn(async move {
        let fills: Vec<(&str, &str)> = fills.iter().map(|(k, v)| (*k, v.as_str())).collect();
        guide::run(id, &fills, &dir).await
    });
    while !removal.is_finished() {
        for rs in replica_sets.list(&ours).await? {
            let held = rs.metadata.finalizers.clone().unwrap_or_default();
            if rs.metadata.deletion_timestamp.is_none() || !held.iter().any(|f| f == HELD_BY_PROCESS) {
                continue;
            }
            let labels = rs.metadata.labels.clone().unwrap_or_default();
            let process = match labels.get("app").map(String::as_str) {
                Some("distr-agent") => &mut agent.processes.poller,
                Some("distr-agent-executor") => &mut agent.processes.executor,
                Some("distr-agent-updater") => &mut agent.processes.updater,
                other => anyhow::bail!("a ReplicaSet of the agent with app={other:?}"),
            };
            if process.is_running() {
                let (code, took) = process.terminate(MINUTE).await?;
                eprintln!(
                    "{} stopped ({code:?}, {took:.1?}) {:.1?} after the removal started",
                    process.name,
                    started.elapsed()
                );
            }
            // Conditional on the version read: the garbage collector edits the list too.
            let patch = json!({"metadata": {
                "resourceVersion": rs.metadata.resource_version,
                "finalizers": held.iter().filter(|f| *f != HELD_BY_PROCESS).collect::<Vec<_>>(),
            }});
            let name = rs.metadata.name.clone().unwrap_or_default();
            match replica_sets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                // Changed meanwhile (read again next round) or gone already.
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
                Err(error) => return Err(error.into()),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    removal.await??.ok(&format!("the guide's {id} command"))?;
    eprintln!("the removal took {:.1?}", started.elapsed());
    for process in [
        &mut agent.processes.poller,
        &mut agent.processes.executor,
        &mut agent.processes.updater,
    ] {
        assert!(!process.is_running(), "{} still runs after the removal", process.name);
    }
    Ok(())
}

fn agent_dir(agent: &Agent) -> PathBuf {
    TestEnv::get().test_dir(&agent.test)
}

/// `kubectl <args> -o name` as the admin: the names it prints.
async fn names(args: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut all = args.to_vec();
    all.extend(["-o", "name"]);
    let run = install::kubectl(&all, None).await?.ok("kubectl get")?;
    Ok(run.stdout.lines().map(str::to_owned).collect())
}

/// Every kind the manifest holds, in the namespace, with the install's label.
const NAMESPACED_KINDS: &str =
    "deployments,replicasets,pods,configmaps,secrets,serviceaccounts,roles,rolebindings,services,networkpolicies";
/// Every cluster-wide kind the manifest holds.
const CLUSTER_KINDS: &str =
    "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings";

/// Checks that nothing the install (`manifest`) or the agent created remains in `ns` and the
/// cluster: each object of the manifest by kind and name, every kind of the manifest by the
/// install's labels, the agent's Secrets and the Go agent's ServiceAccount by name, and, unless
/// `releases_kept`, the releases' tracking and pull Secrets.
async fn nothing_of_the_agent_remains(ns: &str, manifest: &str, releases_kept: bool) -> anyhow::Result<()> {
    let mut left = Vec::new();
    for object in install::kinds_and_names(manifest)? {
        let run = install::kubectl(&["-n", ns, "get", &object.to_lowercase(), "-o", "name"], None).await?;
        if run.success {
            left.push(object);
        } else {
            assert!(run.stderr.contains("NotFound"), "{object}: {}", run.stderr);
        }
    }
    left.extend(
        names(&[
            "-n",
            ns,
            "get",
            NAMESPACED_KINDS,
            "-l",
            "app.kubernetes.io/part-of=distr-agent",
        ])
        .await?,
    );
    let instance = format!("app.kubernetes.io/instance=distr-agent-{ns}");
    left.extend(names(&["-n", ns, "get", NAMESPACED_KINDS, "-l", &instance]).await?);
    left.extend(names(&["get", CLUSTER_KINDS, "-l", &instance]).await?);
    for name in names(&["-n", ns, "get", "secrets,serviceaccounts,pods"]).await? {
        let agents = name.starts_with("secret/distr-agent")
            || name.starts_with("serviceaccount/distr-agent")
            || name.starts_with("pod/distr-agent");
        let releases = name.starts_with("secret/sh.distr.agent.v1.");
        if agents || (releases && !releases_kept) {
            left.push(name);
        }
    }
    assert!(left.is_empty(), "left behind in {ns}: {left:#?}");
    Ok(())
}

/// The release `web` and its objects are still there (Helm's view and its Deployment).
async fn the_release_remains(agent: &Agent) -> anyhow::Result<()> {
    let releases = agent.helm_json(&["ls"]).await?;
    let listed: Vec<&str> = releases
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(listed, ["web"], "{releases}");
    agent.ns.api::<Deployment>().get("web-web").await?;
    Ok(())
}

/// Objects of the customer's own in the namespace, which a removal must leave.
async fn customer_objects(ns: &TestNamespace) -> anyhow::Result<()> {
    let config: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "customer-settings"}, "data": {"a": "b"}}))?;
    ns.api::<ConfigMap>().create(&PostParams::default(), &config).await?;
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "customer-credentials"}, "stringData": {"a": "b"}}))?;
    ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
    Ok(())
}

async fn customer_objects_remain(ns: &TestNamespace) -> anyhow::Result<()> {
    ns.api::<ConfigMap>().get("customer-settings").await?;
    ns.api::<Secret>().get("customer-credentials").await?;
    Ok(())
}

/// Installs with the guide's command, runs each troubleshooting command against the running
/// agent, upgrades by hand to a version that needs another right, and removes the agent with
/// the guide's command: the release stays, nothing of the agent does.
#[tokio::test]
async fn removing_a_namespace_scoped_agent_leaves_only_the_releases() -> anyhow::Result<()> {
    let target = Target::new("guide-remove-ns").await?;
    customer_objects(&target.ns).await?;
    let secret = target.secret.clone();
    let mut agent = target.install(Scope::Namespace).await?;
    let ns = agent.ns.name.clone();
    let work = agent_dir(&agent);
    healthy_release(&agent, "guide-remove-web").await?;

    // Installing: the three Deployments and their pods.
    let status = guide::run("status", &in_ns(&ns), &work).await?.ok("status")?;
    for name in [
        "deployment.apps/distr-agent ",
        "distr-agent-executor",
        "distr-agent-updater",
    ] {
        assert!(status.stdout.contains(name), "{name} in\n{}", status.stdout);
    }

    // Troubleshooting: /readyz, the logs, grpcurl with the operator certificate.
    let admin = format!("127.0.0.1:{}", agent.executor.admin_port);
    let ready = guide::run("readyz", &[("localhost:9990", &admin)], &work)
        .await?
        .ok("readyz")?;
    assert_eq!(ready.stdout, "ok\n");
    let log = LogFile::serve_pods_matching(&agent.ns, "executor", "app=distr-agent-executor").await?;
    let listening = agent
        .executor
        .log_text()
        .lines()
        .find(|l| l.contains("gRPC server listening"))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("the executor logged no start"))?;
    log.append(&listening)?;
    let logs = guide::run("logs", &in_ns(&ns), &work).await?.ok("logs")?;
    assert!(logs.stdout.contains("gRPC server listening"), "{}", logs.stdout);
    // The harness asked for an operator certificate when it started the agent; the guide's
    // block asks again, as a person does, from no Secret.
    agent
        .ns
        .api::<k8s_openapi::api::core::v1::Secret>()
        .delete("distr-agent-operator-tls", &Default::default())
        .await?;
    wait_for(
        "the harness's operator Secret to go",
        Duration::from_secs(30),
        || async {
            agent
                .ns
                .api::<k8s_openapi::api::core::v1::Secret>()
                .get_opt("distr-agent-operator-tls")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await?;
    let certs = work.join("operator");
    guide::run("operator-certificate", &in_ns(&ns), &certs)
        .await?
        .ok("operator certificate")?;
    for file in OperatorCert::FILES {
        assert!(certs.join(file).metadata()?.len() > 0, "{file}");
    }
    let executor_addr = agent.executor_addr.clone();
    let executor = guide::run(
        "grpcurl-executor",
        &[("<namespace>", &ns), ("localhost:9443", &executor_addr)],
        &certs,
    )
    .await?
    .ok("grpcurl executor")?;
    assert!(
        executor.stdout.contains("distr.agent.v1.Executor"),
        "{}",
        executor.stdout
    );
    assert!(executor.stdout.contains("\"web\""), "{}", executor.stdout);
    let updater_addr = agent.updater_addr.clone();
    guide::run(
        "grpcurl-updater",
        &[("<namespace>", &ns), ("localhost:9444", &updater_addr)],
        &certs,
    )
    .await?
    .ok("grpcurl updater")?;

    // Upgrading by hand: a version whose updater Role has one more rule, which a self-update
    // would refuse; the connect command applies it.
    let template = std::fs::read_to_string(install::template_path())?;
    let anchor = "  - apiGroups: [\"rbac.authorization.k8s.io\"]\n    resources: [\"roles\", \"rolebindings\"]\n";
    assert!(template.contains(anchor), "the updater Role's last rule moved");
    let extra = "  - apiGroups: [\"\"]\n    resources: [\"configmaps\"]\n    resourceNames: [\"kube-root-ca.crt\"]\n    verbs: [\"get\"]\n";
    let next = work.join("next-version.yaml.tmpl");
    std::fs::write(&next, template.replacen(anchor, &format!("{extra}{anchor}"), 1))?;
    let (url, manifest) = connect_url_of(&agent, &secret, &next, "0.2.0").await?;
    guide::run(
        "upgrade-by-hand",
        &[("<namespace>", &ns), ("<connect URL>", &url)],
        &work,
    )
    .await?
    .ok("upgrade by hand")?;
    for name in ["distr-agent", "distr-agent-executor", "distr-agent-updater"] {
        let d = agent.ns.api::<Deployment>().get(name).await?;
        let image = d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.containers.into_iter().next())
            .and_then(|c| c.image)
            .unwrap_or_default();
        assert!(image.ends_with(":0.2.0"), "{name}: {image}");
    }
    let role = agent.ns.api::<Role>().get("distr-agent-updater").await?;
    let granted = role.rules.unwrap_or_default().iter().any(|r| {
        r.resource_names
            .as_deref()
            .is_some_and(|names| names.contains(&"kube-root-ca.crt".to_owned()))
    });
    assert!(granted, "the updater's Role has the new version's rule");

    // Removing.
    remove_as_the_kubelet_would_let_it(&mut agent, "remove-namespace", vec![("<namespace>", ns.clone())]).await?;
    nothing_of_the_agent_remains(&ns, &manifest, false).await?;
    the_release_remains(&agent).await?;
    customer_objects_remain(&agent.ns).await?;
    Ok(())
}

/// The connect URL's answer for the agent's target, rendered from `template` at `version`.
async fn connect_url_of(
    agent: &Agent,
    secret: &str,
    template: &std::path::Path,
    version: &str,
) -> anyhow::Result<(String, String)> {
    let mut params = install::hub_params(&agent.hub, agent.target, Some(secret), &agent.ns.name, Scope::Namespace);
    params["agentVersion"] = json!(version);
    let work = agent_dir(agent);
    let manifest = install::render(template, &params, &work).await?;
    let file = work.join(format!("connect-{version}.yaml"));
    std::fs::write(&file, &manifest)?;
    Ok((file.display().to_string(), manifest))
}

/// A cluster-scoped agent removed with the guide's command: nothing of it remains, cluster-wide
/// objects included, while another install's cluster-wide objects (told apart by the
/// `instance` label) and the release remain; the same command then removes that other install.
#[tokio::test]
async fn removing_a_cluster_scoped_agent_leaves_the_other_installs_and_the_releases() -> anyhow::Result<()> {
    let other = Target::new("guide-remove-other").await?;
    let (other_url, other_manifest) = other
        .connect_url(&install::template_path(), Scope::Cluster, "0.1.0")
        .await?;
    guide::run(
        "install",
        &[("<namespace>", &other.ns.name), ("<connect URL>", &other_url)],
        &other.work,
    )
    .await?
    .ok("install the other agent")?;
    let other_instance = format!("app.kubernetes.io/instance=distr-agent-{}", other.ns.name);
    let other_cluster_objects = names(&["get", CLUSTER_KINDS, "-l", &other_instance]).await?;
    assert_eq!(other_cluster_objects.len(), 11, "{other_cluster_objects:#?}");

    let target = Target::new("guide-remove-cluster").await?;
    customer_objects(&target.ns).await?;
    let (_, manifest) = target
        .connect_url(&install::template_path(), Scope::Cluster, "0.1.0")
        .await?;
    let mut agent = target.install(Scope::Cluster).await?;
    let ns = agent.ns.name.clone();
    healthy_release(&agent, "guide-remove-cluster-web").await?;

    remove_as_the_kubelet_would_let_it(&mut agent, "remove-cluster", vec![("<namespace>", ns.clone())]).await?;
    nothing_of_the_agent_remains(&ns, &manifest, false).await?;
    the_release_remains(&agent).await?;
    customer_objects_remain(&agent.ns).await?;
    assert_eq!(
        names(&["get", CLUSTER_KINDS, "-l", &other_instance]).await?,
        other_cluster_objects,
        "the other install's cluster-wide objects"
    );
    assert_eq!(
        names(&["-n", &other.ns.name, "get", "deployments"]).await?.len(),
        3,
        "the other install's Deployments"
    );

    // The other install (no processes run for it) goes with the same command.
    guide::run("remove-cluster", &in_ns(&other.ns.name), &other.work)
        .await?
        .ok("removing the other install")?;
    nothing_of_the_agent_remains(&other.ns.name, &other_manifest, false).await?;
    Ok(())
}

/// The first number of the second line of `helm history --max 1`: the release's revision.
fn revision_of(history: &str) -> anyhow::Result<String> {
    let row = history
        .lines()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no revision in\n{history}"))?;
    let revision = row.split_whitespace().next().unwrap_or_default();
    anyhow::ensure!(revision.parse::<u32>().is_ok(), "no revision in\n{history}");
    Ok(revision.to_owned())
}

/// A release installed by hand, adopted with the guide's commands before the agent is
/// installed: on its first pass the agent upgrades it to the Hub's revision and tracks it
/// under the Hub's ids.
#[tokio::test]
async fn a_release_adopted_as_the_guide_says_is_upgraded_on_the_next_pass() -> anyhow::Result<()> {
    let target = Target::new("guide-adopt").await?;
    let ns = target.ns.name.clone();
    let work = target.work.clone();
    let local = charts::write_web_chart(&work.join("local-charts"), "guide-adopt-web", "0.1.0")?;
    let helm_home = work.join("admin-helm");
    let local = local.display().to_string();
    tools::helm(
        &helm_home,
        &["install", "web", &local, "-n", &ns, "--set", "message=by-hand"],
    )
    .await?
    .ok("helm install by hand")?;
    let chart = push_web_chart(target.test, "guide-adopt-web", &["0.2.0"]).await?;
    let web = deployment("web", &chart, "0.2.0", json!({"message": "from the hub"}));
    target.hub.set_deployments(target.id, vec![web.clone()]);

    let history = guide::run(
        "adopt-revision",
        &[("<release-name>", "web"), ("<namespace>", &ns)],
        &work,
    )
    .await?
    .ok("helm history")?;
    let current = revision_of(&history.stdout)?;
    assert_eq!(current, "1");
    guide::run(
        "adopt",
        &[
            ("<release-name>", "web"),
            ("<namespace>", &ns),
            ("<REVISION>", &current),
        ],
        &work,
    )
    .await?
    .ok("the adoption commands")?;

    let agent = target.install(Scope::Namespace).await?;
    agent
        .wait_status(&revision(&web), "running", "helm upgrade succeeded", 2 * MINUTE)
        .await?;
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;
    let history = agent.helm_json(&["history", "web"]).await?;
    let charts: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["chart"].as_str())
        .collect();
    assert_eq!(charts, ["guide-adopt-web-0.1.0", "guide-adopt-web-0.2.0"], "{history}");
    let record = tracking_record(&agent).await?;
    assert_eq!(record["id"], web["id"], "{record}");
    assert_eq!(record["revisionId"], web["revisionId"], "{record}");
    assert_eq!(record["helmRevision"], 2, "{record}");
    Ok(())
}

/// The record of `web`'s tracking Secret.
async fn tracking_record(agent: &Agent) -> anyhow::Result<Value> {
    let secret = agent.ns.api::<Secret>().get("sh.distr.agent.v1.web").await?;
    let data = secret.data.unwrap_or_default();
    let record = data
        .get("release")
        .ok_or_else(|| anyhow::anyhow!("no release key in the tracking Secret"))?;
    Ok(serde_json::from_slice(&record.0)?)
}

/// Waits for a status of `revision` past the first `seen` ones.
async fn wait_status_after(
    agent: &Agent,
    revision: &str,
    seen: usize,
    kind: &str,
    contains: &str,
) -> anyhow::Result<RecordedStatus> {
    wait_for(&format!("a new {kind} status ({contains})"), 2 * MINUTE, || async {
        agent
            .statuses(revision)
            .into_iter()
            .skip(seen)
            .find(|s| s.status_type == kind && s.message.contains(contains))
    })
    .await
}

/// A manual `helm upgrade` stops the agent with the revision-skew error; the guide's
/// `kubectl patch` of the tracking Secret lets it re-apply the Hub's revision.
#[tokio::test]
async fn revision_skew_reset_as_the_guide_says_reapplies_the_hub_revision() -> anyhow::Result<()> {
    let target = Target::new("guide-skew").await?;
    let work = target.work.clone();
    let agent = target.install(Scope::Namespace).await?;
    let ns = agent.ns.name.clone();
    let web = healthy_release(&agent, "guide-skew-web").await?;
    let local = charts::write_web_chart(&work.join("local-charts"), "guide-skew-web", "0.1.0")?;
    let local = local.display().to_string();
    tools::helm(
        &work.join("admin-helm"),
        &[
            "upgrade",
            "web",
            &local,
            "-n",
            &ns,
            "--reuse-values",
            "--set",
            "message=manual",
        ],
    )
    .await?
    .ok("helm upgrade by hand")?;
    let skew = agent
        .wait_status(
            &revision(&web),
            "error",
            "actual helm revision for web (2) is different from latest deployed by agent (1)",
            MINUTE,
        )
        .await?;
    eprintln!("after the manual upgrade: {}", skew.message);

    let history = guide::run(
        "adopt-revision",
        &[("<release-name>", "web"), ("<namespace>", &ns)],
        &work,
    )
    .await?
    .ok("helm history")?;
    let current = revision_of(&history.stdout)?;
    assert_eq!(current, "2");
    let seen = agent.statuses(&revision(&web)).len();
    let patched = std::time::Instant::now();
    guide::run(
        "skew-reset",
        &[
            ("<release-name>", "web"),
            ("<namespace>", &ns),
            ("<CURRENT_REVISION>", &current),
        ],
        &work,
    )
    .await?
    .ok("the skew reset")?;
    wait_status_after(&agent, &revision(&web), seen, "running", "helm upgrade succeeded").await?;
    wait_status_after(&agent, &revision(&web), seen, "healthy", "status check passed").await?;
    eprintln!("skew reset -> healthy again: {:.1?}", patched.elapsed());
    let message = agent
        .ns
        .api::<Deployment>()
        .get("web-web")
        .await?
        .metadata
        .annotations
        .unwrap_or_default()
        .get("distr.test/message")
        .cloned();
    assert_eq!(message.as_deref(), Some("from the hub"), "the Hub's values again");
    let record = tracking_record(&agent).await?;
    assert_eq!(record["id"], web["id"], "{record}");
    assert_eq!(record["helmRevision"], 3, "{record}");
    Ok(())
}

/// After a take-over from the Go agent, the customer goes back to it as the guide says: this
/// agent removed (its objects, and the Go agent's leftover ServiceAccount, with the releases'
/// tracking Secrets kept), then the Go agent's manifest, rendered from the same parameters as
/// the take-over tests render it, applied: its Deployment and binding exist and its
/// ServiceAccount has its rights back.
#[tokio::test]
async fn after_a_take_over_the_customer_goes_back_to_the_go_agent() -> anyhow::Result<()> {
    let target = Target::new("guide-go-back").await?;
    let ns = target.ns.name.clone();
    let work = target.work.clone();
    let go_template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/go-agent-v2.yaml.tmpl");
    let (go_url, _) = target.connect_url(&go_template, Scope::Namespace, "0.1.0").await?;
    guide::run("install", &[("<namespace>", &ns), ("<connect URL>", &go_url)], &work)
        .await?
        .ok("installing the Go agent")?;

    // A release the Go agent installed and tracks.
    let chart_dir = charts::write_web_chart(&work.join("charts"), "guide-go-back-web", "0.1.0")?;
    let chart = chart_dir.display().to_string();
    tools::helm(&work.join("admin-helm"), &["install", "web", &chart, "-n", &ns])
        .await?
        .ok("helm install")?;
    let (id, revision_id) = (Uuid::new_v4(), Uuid::new_v4());
    let record = json!({"id": id, "revisionId": revision_id, "releaseName": "web", "helmRevision": 1, "phase": "ready", "logsEnabled": false});
    let tracking: Secret = serde_json::from_value(json!({
        "metadata": {"name": "sh.distr.agent.v1.web", "labels": {"agent.distr.sh/deployment": "web"}},
        "stringData": {"release": record.to_string()},
    }))?;
    target
        .ns
        .api::<Secret>()
        .create(&PostParams::default(), &tracking)
        .await?;
    let chart_url = charts::push_chart(&chart_dir).await?;
    let mut web = deployment("web", &chart_url, "0.1.0", json!({}));
    web["id"] = json!(id);
    web["revisionId"] = json!(revision_id);
    target.hub.set_deployments(target.id, vec![web.clone()]);

    // The take-over: the Go agent applies our manifest as served at the manifest endpoint.
    let mut params = install::hub_params(&target.hub, target.id, None, &ns, Scope::Namespace);
    params["agentVersion"] = json!("0.2.0");
    let ours = install::render(&install::template_path(), &params, &work).await?;
    let go_agent = target.ns.token_kubeconfig("distr-agent").await?;
    install::apply_like_the_go_agent(&go_agent, &ns, &ours).await?;
    let mut agent = Agent::run(
        target.test,
        target.ns,
        target.hub,
        target.id,
        ours.clone(),
        AgentOptions::default(),
    )
    .await?;
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;

    // Going back: remove this agent, keep the releases' Secrets, apply the Go agent's manifest.
    remove_as_the_kubelet_would_let_it(&mut agent, "go-back-remove", vec![("<namespace>", ns.clone())]).await?;
    nothing_of_the_agent_remains(&ns, &ours, true).await?;
    the_release_remains(&agent).await?;
    assert_eq!(
        tracking_record(&agent).await?["id"],
        json!(id),
        "the tracking Secret is kept"
    );
    guide::run(
        "go-back-install",
        &[("<namespace>", &ns), ("<connect URL>", &go_url)],
        &work,
    )
    .await?
    .ok("applying the Go agent's connect URL")?;

    let go = agent.ns.api::<Deployment>().get("distr-agent").await?;
    let pod = go.spec.and_then(|s| s.template.spec).unwrap_or_default();
    assert_eq!(pod.service_account_name.as_deref(), Some("distr-agent"));
    let image = pod.containers[0].image.clone().unwrap_or_default();
    assert!(image.starts_with("ghcr.io/distr-sh/distr/kubernetes-agent"), "{image}");
    let binding = agent.ns.api::<RoleBinding>().get("distr-agent").await?;
    let subjects: Vec<String> = binding
        .subjects
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(subjects, ["distr-agent"]);
    for (verb, group, resource) in [
        ("create", "apps", "deployments"),
        ("list", "", "secrets"),
        ("patch", "apps", "deployments"),
    ] {
        let probe = Probe {
            verb,
            group,
            resource,
            namespace: Some(ns.clone()),
            name: None,
        };
        assert!(
            access::allowed(&agent.ns.client, &ns, "distr-agent", &probe).await?,
            "the Go agent may {}",
            probe.label()
        );
    }
    Ok(())
}

/// Every shell block of the guide carries a marker, every marker is in the guide's table of
/// which test runs it, and that table names tests of this file; the operator-certificate and
/// grpcurl lines are the ones the harness builds (as the README's are).
#[test]
fn every_shell_block_of_the_guide_is_run_by_a_test() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(guide::path())?;
    let blocks = guide::blocks(&text);
    let unmarked: Vec<&str> = blocks
        .iter()
        .filter(|b| b.is_shell() && b.id.is_none())
        .map(|b| b.body.as_str())
        .collect();
    assert!(unmarked.is_empty(), "shell blocks no test runs: {unmarked:#?}");
    let marked: BTreeSet<String> = blocks.iter().filter_map(|b| b.id.clone()).collect();
    assert_eq!(
        marked.len(),
        blocks.iter().filter(|b| b.id.is_some()).count(),
        "an id twice"
    );

    let source = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/guide.rs"))?;
    let table = text
        .split("## How this guide is tested")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("the guide lost its testing section"))?;
    let mut listed = BTreeSet::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let test = cells[2].trim_matches('`').trim_start_matches("guide::");
        assert!(
            source.contains(&format!("async fn {test}()")),
            "the guide names a test {test} this file lacks"
        );
        for id in cells[1].split(", ") {
            let id = id.trim_matches('`');
            assert!(
                source.contains(&format!("\"{id}\"")),
                "block {id}: the tests never run it"
            );
            listed.insert(id.to_owned());
        }
    }
    assert_eq!(listed, marked, "the guide's table of tests and its blocks");

    // The operator's commands as the harness runs them elsewhere (mtls, selfupdate).
    let ns = "<namespace>";
    let request = format!("kubectl {}\n", OperatorCert::request_args(ns).join(" "));
    assert!(guide::block("operator-certificate")?.contains(&request), "{request}");
    for key in OperatorCert::FILES {
        let args: Vec<String> = OperatorCert::kubectl_args(ns, key)
            .into_iter()
            .map(|a| if a.contains('{') { format!("'{a}'") } else { a })
            .collect();
        let line = format!("kubectl {} | base64 -d >{key}\n", args.join(" "));
        assert!(guide::block("operator-certificate")?.contains(&line), "{line}");
    }
    let operator = OperatorCert { dir: PathBuf::new() };
    let flags = operator.grpcurl_flags(ns).join(" ");
    assert!(guide::block("grpcurl-executor")?.contains(&format!("grpcurl {flags} localhost:9443 list\n")));
    let flags = operator.flags_for("updater", ns).join(" ");
    assert!(guide::block("grpcurl-updater")?.contains(&format!(
        "grpcurl {flags} localhost:9444 distr.agent.v1.Updater/UpdateStatus\n"
    )));
    Ok(())
}
