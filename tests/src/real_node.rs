//! The environment's real node (`tests/env/node.sh`: kubelet, containerd with runc, the CNI
//! bridge, kube-proxy, CoreDNS, kube-network-policies) and the agent installed on it as a
//! customer installs it: the rendered manifest applied with `kubectl apply -n <ns>`, its three
//! images (built by `tests/env/images.sh`, imported into containerd) run as pods.
//!
//! Pods reach the host at [`RealNode::host_ip`]: the Hub simulator and the Hub's registry of a
//! [`PodAgent`] listen there.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    TestEnv, TestNamespace,
    charts::{self, PushTarget},
    hubsim::{HubSim, HubSimOptions, RecordedStatus},
    install::{self, Scope},
    registry::Registry,
    tools, wait_for,
};

/// The taint that keeps every other pod off the real node.
pub const TAINT_KEY: &str = "distr.local/real-node";
/// The label the real node carries (the kwok node carries `type=kwok`).
pub const NODE_LABEL: &str = "type=real";
/// The pod sandbox image `tests/env/build.sh` makes, imported by `tests/env/node.sh`: a static
/// binary that waits for a signal, also the workload of [`write_pause_chart`].
pub const PAUSE_IMAGE: &str = "distr.local/testenv/pause:1";
/// The agent version (image tag) the images are built with (`tests/run.sh`: the crate
/// version) and the manifest names.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A second tag of the same images: a "new version" for self-update tests.
pub const NEXT_AGENT_VERSION: &str = "next";
/// The agent's three Deployments, by the `app` label of their pods.
pub const AGENT_APPS: [&str; 3] = ["distr-agent", "distr-agent-executor", "distr-agent-updater"];

const MINUTE: Duration = Duration::from_secs(60);

/// The real node of this run.
#[derive(Clone, Debug)]
pub struct RealNode {
    pub name: String,
    /// The host's address as pods reach it.
    pub host_ip: String,
    /// containerd's socket (for `ctr`).
    pub containerd_socket: PathBuf,
}

impl RealNode {
    /// The real node. Panics when the environment runs none: these tests must never pass
    /// without one.
    pub fn get() -> RealNode {
        let env = TestEnv::get();
        match (&env.real_node, &env.containerd_socket) {
            (Some(name), Some(socket)) => RealNode {
                name: name.clone(),
                host_ip: env.host_ip.clone(),
                containerd_socket: socket.clone(),
            },
            _ => panic!(
                "the test environment runs no real node: start it with DISTR_TESTENV_REAL_NODE=1 \
                 (tests/run.sh does), and with no other environment on this machine running one"
            ),
        }
    }

    /// `ctr -n k8s.io <args>` against the node's containerd.
    pub async fn ctr(&self, args: &[&str]) -> anyhow::Result<tools::Run> {
        let output = tokio::process::Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .context("running ctr")?;
        Ok(output.into())
    }
}

/// A namespace whose pods run on the real node and that enforces the restricted Pod Security
/// Standard. Its pods are placed by the API server's admission plugins (PodNodeSelector,
/// PodTolerationRestriction) from the namespace's annotations, so a manifest applied into it
/// stays as rendered.
pub async fn namespace(prefix: &str) -> anyhow::Result<TestNamespace> {
    let node = RealNode::get();
    let ns = TestNamespace::create(prefix).await?;
    let tolerations = json!([{"key": TAINT_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"}]);
    let patch = json!({"metadata": {
        "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        },
        "annotations": {
            "scheduler.alpha.kubernetes.io/node-selector": NODE_LABEL,
            "scheduler.alpha.kubernetes.io/defaultTolerations": tolerations.to_string(),
        },
    }});
    Api::<Namespace>::all(ns.client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("placing namespace {} on node {}", ns.name, node.name))?;
    Ok(ns)
}

/// A chart with one Deployment (`<release>-pause`) of the pause image on the real node, under
/// the restricted Pod Security Standard. It serves TCP on port 8080, which its readiness probe
/// checks after `readyAfter` seconds (so an install or upgrade takes that long), or never
/// (`neverReady`: the probe checks a port nothing listens on). `message` is a pod annotation:
/// changing it rolls the pods.
pub fn write_pause_chart(dir: &Path, name: &str, version: &str) -> anyhow::Result<PathBuf> {
    let chart = charts::chart_dir(
        dir,
        name,
        version,
        "replicas: 1\nmessage: hello\nneverReady: false\nreadyAfter: 0\n",
    )?;
    std::fs::write(
        chart.join("templates/deployment.yaml"),
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{{{ .Release.Name }}}}-pause
  labels: {{app: {{{{ .Release.Name }}}}-pause}}
spec:
  replicas: {{{{ .Values.replicas }}}}
  selector:
    matchLabels: {{app: {{{{ .Release.Name }}}}-pause}}
  template:
    metadata:
      labels: {{app: {{{{ .Release.Name }}}}-pause}}
      annotations:
        distr.test/message: {{{{ .Values.message | quote }}}}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 1
      securityContext:
        runAsNonRoot: true
        runAsUser: 65535
        seccompProfile: {{type: RuntimeDefault}}
      containers:
        - name: pause
          image: {PAUSE_IMAGE}
          imagePullPolicy: Never
          args: [serve, "8080"]
          resources:
            # The node has two CPUs for every test at once: a token request, no CPU limit.
            requests: {{memory: 8Mi, cpu: 1m}}
            limits: {{memory: 16Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
          readinessProbe:
            tcpSocket: {{port: {{{{ if .Values.neverReady }}}}1{{{{ else }}}}8080{{{{ end }}}}}}
            initialDelaySeconds: {{{{ .Values.readyAfter }}}}
            periodSeconds: 1
"#
        ),
    )?;
    Ok(chart)
}

/// How a [`PodAgent`] is installed.
pub struct PodAgentOptions {
    /// `agentInterval`.
    pub interval: &'static str,
    /// `agentVersion`: the image tag.
    pub version: &'static str,
    /// `agentVersionId` (empty: self-update off).
    pub version_id: String,
    /// `targetResources` (null: the manifest's defaults).
    pub resources: Value,
    /// Extra environment of the updater's container, written into the rendered manifest (and
    /// into each manifest [`PodAgent::manifest_for`] renders).
    pub updater_env: Vec<(&'static str, String)>,
    /// Extra environment of the executor's container, written into the rendered manifest.
    pub executor_env: Vec<(&'static str, String)>,
    pub hub: HubSimOptions,
}

impl Default for PodAgentOptions {
    fn default() -> Self {
        Self {
            interval: "1s",
            version: AGENT_VERSION,
            version_id: String::new(),
            resources: Value::Null,
            updater_env: Vec::new(),
            executor_env: Vec::new(),
            hub: HubSimOptions::default(),
        }
    }
}

/// The agent as pods on the real node, for a Hub simulator and a Hub registry (plain HTTP,
/// as a Hub may run it) on the host.
pub struct PodAgent {
    pub test: String,
    pub ns: TestNamespace,
    pub hub: HubSim,
    pub target: Uuid,
    /// The manifest as applied.
    pub manifest: String,
    pub node: RealNode,
    /// The Hub's registry: admits user `-` with the agent's JWT, as the Hub does.
    pub hub_registry: Registry,
    token: String,
    params: Value,
    updater_env: Vec<(&'static str, String)>,
    helm_home: tempfile::TempDir,
}

/// `manifest` with `env` added to the updater container's environment.
fn with_updater_env(manifest: &str, env: &[(&str, String)]) -> String {
    with_env(manifest, "distr-agent-updater", env)
}

/// `manifest` with `env` added to the container environment of the Deployment `deployment`.
fn with_env(manifest: &str, deployment: &str, env: &[(&str, String)]) -> String {
    let anchor = "          imagePullPolicy: IfNotPresent\n          env:\n            - name: AGENT_NAMESPACE\n";
    let updater = manifest.find(&format!(
        "\n  name: {deployment}\n  labels:\n    app.kubernetes.io/part-of: distr-agent\nspec:\n  replicas"
    ));
    let (Some(start), false) = (updater, env.is_empty()) else {
        return manifest.to_owned();
    };
    let Some(at) = manifest[start..]
        .find(anchor)
        .map(|i| start + i + anchor.len() - "            - name: AGENT_NAMESPACE\n".len())
    else {
        return manifest.to_owned();
    };
    let lines: String = env
        .iter()
        .map(|(k, v)| format!("            - name: {k}\n              value: \"{v}\"\n"))
        .collect();
    format!("{}{}{}", &manifest[..at], lines, &manifest[at..])
}

impl PodAgent {
    /// Renders the manifest for a new target, applies it with `kubectl apply -n <ns>`, and
    /// waits until the three Deployments have their pod Ready.
    pub async fn install(test: &str, options: PodAgentOptions) -> anyhow::Result<Self> {
        let env = TestEnv::get();
        let node = RealNode::get();
        let ns = namespace(test).await?;
        let hub = HubSim::start_on(&node.host_ip, options.hub).await?;
        let (target, secret) = hub.add_target();
        env.record_secret(&secret);
        hub.set_namespace(target, Some(&ns.name));
        // The Hub registry's password is the agent's JWT: every login answers this one.
        let token = hub.mint_token(target, 3600);
        hub.set_fixed_token(target, Some(token.clone()));
        env.record_secret(&token);
        let hub_registry = Registry::start_on(&node.host_ip, test, "-", &token).await?;

        let mut params = install::hub_params(&hub, target, Some(&secret), &ns.name, Scope::Namespace);
        params["agentInterval"] = json!(options.interval);
        params["agentVersion"] = json!(options.version);
        params["agentVersionId"] = json!(options.version_id);
        params["registryEnabled"] = json!(true);
        params["registryHost"] = json!(hub_registry.host);
        params["registryPlainHttp"] = json!(true);
        params["targetResources"] = options.resources;
        if let Ok(id) = options.version_id.parse::<Uuid>() {
            hub.set_agent_version(target, id, options.version);
        }
        let manifest = install::render(&install::template_path(), &params, &env.test_dir(test)).await?;
        let manifest = with_updater_env(&manifest, &options.updater_env);
        let manifest = with_env(&manifest, "distr-agent-executor", &options.executor_env);
        install::kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&manifest))
            .await?
            .ok("kubectl apply")?;
        let agent = Self {
            test: test.to_owned(),
            ns,
            hub,
            target,
            manifest,
            node,
            hub_registry,
            token,
            params,
            updater_env: options.updater_env,
            helm_home: tempfile::tempdir()?,
        };
        agent.wait_ready(2 * MINUTE).await?;
        Ok(agent)
    }

    /// The manifest the Hub serves at its manifest endpoint for agent version `version` (the
    /// image tag) with id `id`: no target secret.
    pub async fn manifest_for(&self, version: &str, id: Uuid) -> anyhow::Result<String> {
        let mut params = self.params.clone();
        params["targetSecret"] = Value::Null;
        params["agentVersion"] = json!(version);
        params["agentVersionId"] = json!(id.to_string());
        let dir = TestEnv::get().test_dir(&self.test);
        let manifest = install::render(&install::template_path(), &params, &dir).await?;
        Ok(with_updater_env(&manifest, &self.updater_env))
    }

    /// Deletes the namespace (the agent's pods and the releases'), so that the real node's
    /// two CPUs are free for the next tests. Call it at the end of a test that passed; a failed
    /// test leaves everything for a look.
    pub async fn remove(self) -> anyhow::Result<()> {
        install::kubectl(&["delete", "namespace", &self.ns.name, "--wait=false"], None)
            .await?
            .ok("kubectl delete namespace")?;
        Ok(())
    }

    /// Waits until each agent Deployment has its one pod Ready and no other.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = self.ns.api();
        for name in AGENT_APPS {
            let result = wait_for(&format!("Deployment {name} ready"), timeout, || async {
                let status = deployments.get(name).await.ok()?.status?;
                (status.ready_replicas == Some(1) && status.replicas == Some(1)).then_some(())
            })
            .await;
            if let Err(error) = result {
                let pods = self.describe_pods().await.unwrap_or_default();
                anyhow::bail!("{error}; pods:\n{pods}");
            }
        }
        Ok(())
    }

    /// `kubectl get pods -o wide` and the namespace's events, for failure messages.
    pub async fn describe_pods(&self) -> anyhow::Result<String> {
        let pods = install::kubectl(&["get", "pods", "-o", "wide", "-n", &self.ns.name], None).await?;
        let events = install::kubectl(&["get", "events", "-n", &self.ns.name], None).await?;
        Ok(format!("{}\n{}", pods.stdout, events.stdout))
    }

    /// The running (not terminating) pod of the agent Deployment whose pods carry `app`.
    pub async fn pod(&self, app: &str) -> anyhow::Result<Pod> {
        let pods: Api<Pod> = self.ns.api();
        let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await?;
        list.items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
            .with_context(|| format!("no pod of {app}"))
    }

    /// Each agent pod's time from its creation to its Ready condition.
    pub async fn start_to_ready(&self) -> anyhow::Result<Vec<(String, Duration)>> {
        let mut times = Vec::new();
        for app in AGENT_APPS {
            let pod = self.pod(app).await?;
            times.push((app.to_owned(), pod_start_to_ready(&pod).context("no Ready time")?));
        }
        Ok(times)
    }

    /// Pushes `chart_dir` to the Hub registry; returns its `oci://` reference.
    pub async fn push_chart(&self, chart_dir: &Path) -> anyhow::Result<String> {
        let target = PushTarget {
            host: &self.hub_registry.host,
            user: "-",
            password: &self.token,
            plain_http: true,
        };
        charts::push_chart_to(chart_dir, &target).await
    }

    /// Writes the pause chart at each version and pushes each; returns its `oci://` URL.
    pub async fn push_pause_chart(&self, name: &str, versions: &[&str]) -> anyhow::Result<String> {
        let dir = TestEnv::get().test_dir(&self.test).join("charts");
        let mut url = String::new();
        for version in versions {
            url = self.push_chart(&write_pause_chart(&dir, name, version)?).await?;
        }
        Ok(url)
    }

    /// A Hub deployment entry for a chart of the Hub registry (whose login the Hub gives).
    pub fn deployment(&self, release: &str, chart_url: &str, version: &str, values: Value) -> Value {
        let mut deployment = crate::agent::deployment(release, chart_url, version, values);
        deployment["registryAuth"] = json!({});
        deployment
    }

    /// Replaces the Hub's deployment list.
    pub fn set_deployments(&self, deployments: Vec<Value>) {
        self.hub.set_deployments(self.target, deployments);
    }

    /// Waits for a status of `revision` of type `kind` whose message contains `contains`.
    pub async fn wait_status(
        &self,
        revision: &str,
        kind: &str,
        contains: &str,
        timeout: Duration,
    ) -> anyhow::Result<RecordedStatus> {
        let what = format!("status {kind} containing {contains:?} for revision {revision}");
        let found = wait_for(&what, timeout, || async {
            self.statuses(revision)
                .into_iter()
                .find(|s| s.status_type == kind && s.message.contains(contains))
        })
        .await;
        match found {
            Ok(status) => Ok(status),
            Err(error) => {
                let seen: Vec<String> = self
                    .statuses(revision)
                    .iter()
                    .map(|s| format!("{}: {}", s.status_type, s.message))
                    .collect();
                let pods = self.describe_pods().await.unwrap_or_default();
                anyhow::bail!("{error}; statuses seen: {seen:#?}\n{pods}")
            }
        }
    }

    /// Every status the Hub received for `revision`, in order.
    pub fn statuses(&self, revision: &str) -> Vec<RecordedStatus> {
        self.hub
            .statuses_for(self.target)
            .into_iter()
            .filter(|s| s.revision_id == revision)
            .collect()
    }

    /// `helm <args> -n <ns> -o json` as the admin, parsed.
    pub async fn helm_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-n", &self.ns.name, "-o", "json"]);
        let run = tools::helm(self.helm_home.path(), &all).await?.ok("helm")?;
        Ok(serde_json::from_str(&run.stdout)?)
    }

    /// `kubectl exec` is impossible (the images hold no shell): the container's process, seen
    /// from the host. Returns the host PID of the container `container` of `pod`.
    pub async fn container_pid(&self, pod: &Pod, container: &str) -> anyhow::Result<u32> {
        let id = container_id(pod, container)?;
        let info = self.node.ctr(&["tasks", "ls"]).await?.ok("ctr tasks ls")?;
        info.stdout
            .lines()
            .find(|line| line.starts_with(&id))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|pid| pid.parse().ok())
            .with_context(|| format!("no task of container {id}: {}", info.stdout))
    }
}

/// The containerd id of `container` in `pod` (its status's `containerd://<id>`).
pub fn container_id(pod: &Pod, container: &str) -> anyhow::Result<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.iter().find(|c| c.name == container))
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.strip_prefix("containerd://"))
        .map(str::to_owned)
        .with_context(|| format!("container {container} has no id yet"))
}

/// An API time as a `chrono` time.
pub fn api_time(time: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(time.0.as_second(), time.0.subsec_nanosecond().max(0) as u32).unwrap_or_default()
}

/// When the pod's Ready condition last became true.
pub fn ready_since(pod: &Pod) -> Option<DateTime<Utc>> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(api_time(ready.last_transition_time.as_ref()?))
}

/// From the pod's creation to its Ready condition (whole seconds: the API's precision).
pub fn pod_start_to_ready(pod: &Pod) -> Option<Duration> {
    let created = api_time(pod.metadata.creation_timestamp.as_ref()?);
    (ready_since(pod)? - created).to_std().ok()
}

/// The working set of a container, read from its memory cgroup (v1) on the host: usage minus
/// inactive file pages, as the kubelet computes it. In bytes.
pub fn working_set(pid: u32) -> anyhow::Result<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path = cgroups
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
        })
        .context("no memory cgroup")?;
    let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    let usage: u64 = std::fs::read_to_string(dir.join("memory.usage_in_bytes"))?
        .trim()
        .parse()?;
    let stat = std::fs::read_to_string(dir.join("memory.stat"))?;
    let inactive: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("total_inactive_file "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(usage.saturating_sub(inactive))
}

/// The memory limit of a container's cgroup, in bytes.
pub fn memory_limit(pid: u32) -> anyhow::Result<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path = cgroups
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
        })
        .context("no memory cgroup")?;
    let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    Ok(std::fs::read_to_string(dir.join("memory.limit_in_bytes"))?
        .trim()
        .parse()?)
}

/// MiB, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
