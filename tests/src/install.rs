//! The install manifest as a customer gets it: `deploy/manifest.yaml.tmpl` rendered with Go's
//! `text/template` (the Hub's engine), applied with `kubectl`, and what the kubelet would give
//! each pod: its ServiceAccount token, its environment, and its mounted ConfigMaps and Secrets
//! (kept current with the kubelet's atomic `..data` symlink swap).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret},
};
use kube::{Api, Client};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{TestEnv, hubsim::HubSim, tools};

/// The template, as users get it.
pub fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifest.yaml.tmpl")
}

/// `targetScope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Namespace,
    Cluster,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Namespace => "namespace",
            Scope::Cluster => "cluster",
        }
    }
}

/// The template parameters a Hub fills for `target` of `hub`.
pub fn hub_params(hub: &HubSim, target: Uuid, secret: Option<&str>, namespace: &str, scope: Scope) -> Value {
    use crate::hubsim::Route;
    json!({
        "targetId": target.to_string(),
        "targetSecret": secret,
        "loginEndpoint": hub.url(Route::Login),
        "manifestEndpoint": hub.url(Route::Manifest),
        "resourcesEndpoint": hub.url(Route::Resources),
        "statusEndpoint": hub.url(Route::Status),
        "metricsEndpoint": hub.url(Route::Metrics),
        "logsEndpoint": hub.url(Route::Logs),
        "agentLogsEndpoint": hub.url(Route::AgentLogs),
        "agentInterval": "1s",
        "agentVersion": "0.1.0",
        "agentVersionId": "",
        "registryEnabled": false,
        "registryHost": "",
        "registryPlainHttp": false,
        "agentDockerConfig": "",
        "targetScope": scope.as_str(),
        "targetNamespace": namespace,
        "targetResources": null,
        "metricsEnabled": false,
        "autohealAll": false,
        "dockerSocketPath": "",
    })
}

/// Renders `template` with `params` through the test environment's `render-manifest` (Go's
/// `text/template`).
pub async fn render(template: &Path, params: &Value, work_dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(work_dir)?;
    let file = work_dir.join(format!("params-{}.json", Uuid::new_v4().simple()));
    std::fs::write(&file, serde_json::to_vec_pretty(params)?)?;
    let output = tokio::process::Command::new(TestEnv::get().bin.join("render-manifest"))
        .arg(template)
        .arg(&file)
        .output()
        .await
        .context("running render-manifest")?;
    anyhow::ensure!(
        output.status.success(),
        "render-manifest failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `kubectl <args>` as the admin, with `stdin` piped in.
pub async fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<tools::Run> {
    kubectl_with(&TestEnv::get().admin_kubeconfig, args, stdin).await
}

/// `kubectl <args>` with `kubeconfig`, with `stdin` piped in.
pub async fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<tools::Run> {
    use tokio::io::AsyncWriteExt as _;
    let env = TestEnv::get();
    let mut child = tokio::process::Command::new(env.bin.join("kubectl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running kubectl")?;
    let mut pipe = child.stdin.take().context("kubectl stdin")?;
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).await?;
    }
    drop(pipe);
    Ok(child.wait_with_output().await?.into())
}

/// `kubectl apply -n <namespace> -f -` as the admin.
pub async fn apply(namespace: &str, manifest: &str) -> anyhow::Result<()> {
    kubectl(&["apply", "-n", namespace, "-f", "-"], Some(manifest))
        .await?
        .ok("kubectl apply")?;
    Ok(())
}

/// The documents of a rendered manifest, comments and empty ones left out.
pub fn documents(manifest: &str) -> impl Iterator<Item = &str> {
    manifest.split("\n---").map(str::trim).filter(|d| {
        d.lines()
            .any(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty() && l.trim() != "---")
    })
}

/// `Kind/name` of each document of `manifest`, in order.
pub fn kinds_and_names(manifest: &str) -> anyhow::Result<Vec<String>> {
    documents(manifest)
        .map(|doc| {
            let object: Value = serde_norway::from_str(doc)?;
            Ok(format!(
                "{}/{}",
                object["kind"].as_str().unwrap_or_default(),
                object["metadata"]["name"].as_str().unwrap_or_default()
            ))
        })
        .collect()
}

/// Applies `manifest` document by document, in order, the way the Go agent's self-update
/// does: create what is missing, plainly update what exists, stop at the first error. Once it
/// has replaced its own Deployment `distr-agent` its pod is stopping: at most one more document
/// is applied in its grace period.
pub async fn apply_like_the_go_agent(kubeconfig: &Path, namespace: &str, manifest: &str) -> anyhow::Result<usize> {
    let mut applied = 0;
    let mut replaced_itself = false;
    for doc in documents(manifest) {
        let object: Value = serde_norway::from_str(doc)?;
        let kind = object["kind"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        anyhow::ensure!(
            !replaced_itself || applied + 1 == documents(manifest).count(),
            "{kind}/{name} comes after the Go agent's own Deployment and before the last document: \
             its pod may be gone before it gets there"
        );
        replaced_itself |= kind == "Deployment" && name == "distr-agent";
        let kubectl = |args: Vec<String>| {
            let mut all = vec!["-n".to_owned(), namespace.into()];
            all.extend(args);
            all
        };
        let get = kubectl(vec!["get".into(), kind.into(), name.into()]);
        let get: Vec<&str> = get.iter().map(String::as_str).collect();
        let exists = kubectl_with(kubeconfig, &get, None).await?.success;
        let verb = if exists { "replace" } else { "create" };
        let write = kubectl(vec![verb.into(), "-f".into(), "-".into()]);
        let write: Vec<&str> = write.iter().map(String::as_str).collect();
        kubectl_with(kubeconfig, &write, Some(doc))
            .await?
            .ok(&format!("{verb} {kind}/{name} as the Go agent"))?;
        applied += 1;
    }
    Ok(applied)
}

/// The environment the kubelet gives a Deployment's container: `envFrom` ConfigMaps and
/// Secrets, then `env` (literal values, and the pod's namespace from the downward API).
pub async fn container_env(
    client: &Client,
    namespace: &str,
    deployment: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let deployment: Deployment = Api::namespaced(client.clone(), namespace).get(deployment).await?;
    let container = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .context("the Deployment has no container")?;
    let mut env = BTreeMap::new();
    for source in container.env_from.unwrap_or_default() {
        if let Some(cm) = source.config_map_ref {
            let cm: ConfigMap = Api::namespaced(client.clone(), namespace).get(&cm.name).await?;
            env.extend(cm.data.unwrap_or_default());
        }
        if let Some(secret) = source.secret_ref {
            let secret: Secret = Api::namespaced(client.clone(), namespace).get(&secret.name).await?;
            for (key, value) in secret.data.unwrap_or_default() {
                env.insert(key, String::from_utf8(value.0)?);
            }
        }
    }
    for var in container.env.unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(value), _) => value,
            (None, Some(from))
                if from
                    .field_ref
                    .as_ref()
                    .is_some_and(|f| f.field_path == "metadata.namespace") =>
            {
                namespace.to_owned()
            }
            _ => anyhow::bail!("the harness cannot provide env {}", var.name),
        };
        env.insert(var.name, value);
    }
    Ok(env)
}

/// What a volume mounts.
#[derive(Clone, Debug)]
pub enum VolumeSource {
    Secret(String),
    ConfigMap(String),
}

/// A ConfigMap or Secret volume as the kubelet keeps it: the data lives in a timestamped
/// directory behind the `..data` symlink, each key is a symlink through `..data`, and an update
/// swaps `..data` atomically. Polled every 200 ms until dropped.
pub struct KubeletVolume {
    pub dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl KubeletVolume {
    pub fn mount(client: Client, namespace: &str, source: VolumeSource, dir: PathBuf) -> anyhow::Result<Self> {
        // A new pod's volume starts empty.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let namespace = namespace.to_owned();
        let target = dir.clone();
        let task = tokio::spawn(async move {
            let mut current: Option<BTreeMap<String, Vec<u8>>> = None;
            loop {
                if let Ok(Some(data)) = read_source(&client, &namespace, &source).await
                    && current.as_ref() != Some(&data)
                {
                    match write_atomically(&target, &data) {
                        Ok(()) => current = Some(data),
                        Err(error) => tracing::warn!(%error, dir = %target.display(), "kubelet volume update failed"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Self { dir, task })
    }
}

impl Drop for KubeletVolume {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_source(
    client: &Client,
    namespace: &str,
    source: &VolumeSource,
) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
    Ok(match source {
        VolumeSource::Secret(name) => Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|s| s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()),
        VolumeSource::ConfigMap(name) => Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|c| {
                c.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect()
            }),
    })
}

/// The kubelet's atomic writer: new `..<stamp>` directory, `..data_tmp` symlink renamed over
/// `..data`, key symlinks, then the old directory removed.
pub fn write_atomically(dir: &Path, data: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    let stamp = format!("..{}", Uuid::new_v4().simple());
    let payload = dir.join(&stamp);
    std::fs::create_dir_all(&payload)?;
    for (key, value) in data {
        std::fs::write(payload.join(key), value)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for key in data.keys() {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(key), &link)?;
        }
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// The operator's client certificate, as a person who may create and read Secrets in the
/// namespace asks for it (an empty `distr-agent-operator-tls`) and takes it from that Secret
/// (waiting for the executor to issue it).
pub struct OperatorCert {
    pub dir: PathBuf,
}

impl OperatorCert {
    /// The files an operator takes from the Secret.
    pub const FILES: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

    /// The `kubectl` arguments that ask the executor for an operator certificate, as the
    /// README gives them.
    pub fn request_args(namespace: &str) -> Vec<String> {
        [
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            "distr-agent-operator-tls",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    }

    /// Asks for an operator certificate with the README's command; a request (or a
    /// certificate) already there is fine.
    pub async fn request(namespace: &str) -> anyhow::Result<()> {
        let args = Self::request_args(namespace);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = kubectl(&args, None).await?;
        if run.success || run.stderr.contains("already exists") {
            return Ok(());
        }
        run.ok("kubectl create secret generic distr-agent-operator-tls")?;
        Ok(())
    }

    /// The `kubectl` arguments that print `key` of the operator's Secret, base64-encoded.
    pub fn kubectl_args(namespace: &str, key: &str) -> Vec<String> {
        let path = format!("{{.data.{}}}", key.replace('.', "\\."));
        ["-n", namespace, "get", "secret", "distr-agent-operator-tls", "-o"]
            .into_iter()
            .map(str::to_owned)
            .chain([format!("jsonpath={path}")])
            .collect()
    }

    pub async fn fetch(ns: &crate::TestNamespace, dir: PathBuf) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let api: Api<Secret> = ns.api();
        Self::request(&ns.name).await?;
        crate::wait_for("the operator certificate", Duration::from_secs(30), || async {
            let secret = api.get_opt("distr-agent-operator-tls").await.ok().flatten()?;
            secret
                .data?
                .get("tls.crt")
                .filter(|cert| !cert.0.is_empty())
                .map(|_| ())
        })
        .await?;
        std::fs::create_dir_all(&dir)?;
        // As the README has an operator do it: kubectl get secret ... -o jsonpath | base64 -d.
        for key in Self::FILES {
            let args = Self::kubectl_args(&ns.name, key);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run = kubectl(&args, None).await?.ok("kubectl get secret")?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(run.stdout.trim())?;
            std::fs::write(dir.join(key), bytes)?;
        }
        Ok(Self { dir })
    }

    /// `grpcurl` flags for a server of the agent in `namespace` reached on another address
    /// (a port-forward): the executor's certificate names its Service.
    pub fn grpcurl_flags(&self, namespace: &str) -> Vec<String> {
        self.flags_for("executor", namespace)
    }

    pub fn flags_for(&self, component: &str, namespace: &str) -> Vec<String> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        vec![
            "-cacert".into(),
            file("ca.crt"),
            "-cert".into(),
            file("tls.crt"),
            "-key".into(),
            file("tls.key"),
            "-servername".into(),
            format!("distr-agent-{component}.{namespace}.svc"),
        ]
    }
}
