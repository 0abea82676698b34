//! What kwok's emulated kubelet gives tests: container logs read from files the test writes, and
//! resource usage that metrics-server reports through `metrics.k8s.io`.
//!
//! # Logs
//!
//! kube-apiserver answers `pods/log` by asking the node's kubelet, here kwok's server. kwok serves
//! a container's log from a file named by a `Logs` object (namespaced, named after the pod) or a
//! `ClusterLogs` object (selecting pods by namespace and name; kwok cannot select by label).
//! [`LogFile`] creates the file and the object. What kwok v0.8.0 does with the file:
//!
//! - It opens and reads the file on every request, so lines appended later show in the next
//!   request; with `follow=true` it watches the file (fsnotify) and streams appended lines.
//! - Each line must be in the CRI log format, `<RFC 3339 time> <stdout|stderr> F <text>`, which
//!   [`LogFile::append`] writes. The time is the line's own: kwok does not stamp lines itself.
//! - `timestamps=true` prefixes each line with that time, as RFC 3339 with exactly nine fraction
//!   digits (`2026-01-02T03:04:05.120000000Z`).
//! - `sinceTime` keeps the lines whose time is at or after it. kube-apiserver passes it on to the
//!   kubelet in whole seconds (a fraction is cut off, not rounded), so the filter's granularity
//!   is one second: `sinceTime=…:05.900Z` also returns a line of `…:05.100Z`. (kube's
//!   `LogParams::since_time` rounds to the nearest second before sending.) `sinceSeconds`,
//!   `tailLines` and `limitBytes` are applied by kwok as a kubelet does.
//! - A pod that no `Logs`/`ClusterLogs` object covers has no logs: `pods/log` answers 400 Bad
//!   Request, "no logs found for container …"; so does a missing file ("failed to try resolving
//!   symlinks in path …").
//!
//! # Metrics
//!
//! metrics-server scrapes kwok every 10 s (`tests/env/kwok-metrics.yaml` describes the series).
//! Each container of a pod uses the CPU and memory of the pod's annotations
//! [`USAGE_CPU_ANNOTATION`] / [`USAGE_MEMORY_ANNOTATION`] (10m and 16Mi without them), see
//! [`usage_annotations`]. The node `kwok-node-0` reports a constant usage, [`NodeUsage::get`],
//! whatever pods run on it, so tests running in parallel do not change it.
//!
//! # Example
//!
//! ```ignore
//! let ns = TestNamespace::create("logs").await?;
//! // ... a Deployment in `ns` whose pod template carries kwok::usage_annotations("250m", "64Mi")
//! let file = LogFile::serve_namespace(&ns, "app").await?; // every pod of `ns`, now and later
//! file.append("started")?; // stdout, stamped now
//! file.append_at(time, Stream::Stderr, "an error")?;
//! let text = kwok::pod_log(&ns.client, &ns.name, &pod, "timestamps=true&container=app").await?;
//! ```

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams},
};

use crate::{TestEnv, TestNamespace};

/// Pod annotation: the CPU each container of the pod uses, as a quantity (`250m`).
pub const USAGE_CPU_ANNOTATION: &str = "kwok.x-k8s.io/usage-cpu";
/// Pod annotation: the memory each container of the pod uses, as a quantity (`64Mi`).
pub const USAGE_MEMORY_ANNOTATION: &str = "kwok.x-k8s.io/usage-memory";

/// The annotations that make each container of a pod use `cpu` and `memory` (quantities such
/// as `"250m"` and `"64Mi"`). Put them on a pod template's metadata.
pub fn usage_annotations(cpu: &str, memory: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (USAGE_CPU_ANNOTATION.to_owned(), cpu.to_owned()),
        (USAGE_MEMORY_ANNOTATION.to_owned(), memory.to_owned()),
    ])
}

/// The usage the node `kwok-node-0` reports through `metrics.k8s.io`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeUsage {
    pub cpu_cores: f64,
    pub memory_bytes: f64,
}

impl NodeUsage {
    /// The node's configured usage, as `tests/env/start.sh` set it.
    pub fn get() -> anyhow::Result<Self> {
        let env = TestEnv::get();
        Ok(Self {
            cpu_cores: parse_quantity(&env.node_cpu_usage)
                .with_context(|| format!("node CPU usage {:?}", env.node_cpu_usage))?,
            memory_bytes: parse_quantity(&env.node_memory_usage)
                .with_context(|| format!("node memory usage {:?}", env.node_memory_usage))?,
        })
    }
}

/// The value of a Kubernetes quantity (`1500m`, `1498870123n`, `3Gi`, `3145728Ki`, `1e3`).
pub fn parse_quantity(quantity: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let quantity = quantity.trim();
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    // No suffix, or a decimal exponent (`1e3`), which f64 parses itself.
    quantity.parse().ok()
}

/// Which stream a log line was written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A file whose lines kwok serves as the log of some containers. Writing to it is all a test
/// does to make those containers "log"; the next `pods/log` request reads the new lines.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
}

impl LogFile {
    /// Serves the file as the log of every container of every pod in `ns`, those there now and
    /// those made later (one `ClusterLogs` object selecting the namespace, owned by the
    /// Namespace so that it goes with it). `name` names the file and must be unique per test run.
    ///
    /// A namespace has at most one such file: kwok consults `ClusterLogs` objects in no fixed
    /// order. Per-pod files ([`LogFile::serve_pods`]) take precedence over it.
    pub async fn serve_namespace(ns: &TestNamespace, name: &str) -> anyhow::Result<Self> {
        let file = Self::create(&format!("{}-{name}", ns.name))?;
        let namespace = Api::<Namespace>::all(ns.client.clone()).get(&ns.name).await?;
        let owner = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "name": ns.name,
            "uid": namespace.metadata.uid,
        });
        let object = serde_json::json!({
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "ClusterLogs",
            "metadata": {"name": format!("{}-{name}", ns.name), "ownerReferences": [owner]},
            "spec": {
                "selector": {"matchNamespaces": [ns.name]},
                "logs": [{"logsFile": file.path}]
            }
        });
        let api = Api::<DynamicObject>::all_with(ns.client.clone(), &kwok_resource("ClusterLogs"));
        api.create(&PostParams::default(), &serde_json::from_value(object)?)
            .await
            .context("creating the kwok ClusterLogs object")?;
        Ok(file)
    }

    /// Serves the file as the log of every container of the named pods in `ns` (one `Logs`
    /// object per pod, named after it; replaces an earlier one for the same pod). Pods made later
    /// are not covered: call this again with them.
    pub async fn serve_pods(ns: &TestNamespace, name: &str, pods: &[String]) -> anyhow::Result<Self> {
        let file = Self::create(&format!("{}-{name}", ns.name))?;
        file.add_pods(&ns.client, &ns.name, pods).await?;
        Ok(file)
    }

    /// Serves the file as the log of every container of the pods in `ns` that match
    /// `label_selector` (`app=web`) now; see [`LogFile::serve_pods`].
    pub async fn serve_pods_matching(ns: &TestNamespace, name: &str, label_selector: &str) -> anyhow::Result<Self> {
        let pods = ns
            .api::<Pod>()
            .list(&ListParams::default().labels(label_selector))
            .await?;
        let names: Vec<String> = pods.items.into_iter().filter_map(|p| p.metadata.name).collect();
        anyhow::ensure!(!names.is_empty(), "no pod in {} matches {label_selector}", ns.name);
        Self::serve_pods(ns, name, &names).await
    }

    /// Adds pods of `namespace` to those served from this file.
    pub async fn add_pods(&self, client: &Client, namespace: &str, pods: &[String]) -> anyhow::Result<()> {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &kwok_resource("Logs"));
        for pod in pods {
            let object: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "kwok.x-k8s.io/v1alpha1",
                "kind": "Logs",
                "metadata": {"name": pod, "namespace": namespace},
                "spec": {"logs": [{"logsFile": self.path}]}
            }))?;
            match api.create(&PostParams::default(), &object).await {
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let mut current = api.get(pod).await?;
                    current.data["spec"] = object.data["spec"].clone();
                    api.replace(pod, &PostParams::default(), &current).await?;
                }
                other => {
                    other.with_context(|| format!("creating the kwok Logs object of pod {namespace}/{pod}"))?;
                }
            }
        }
        Ok(())
    }

    /// Appends `line` to stdout, stamped with the current time, which it returns.
    pub fn append(&self, line: &str) -> anyhow::Result<DateTime<Utc>> {
        let now = Utc::now();
        self.append_at(now, Stream::Stdout, line)?;
        Ok(now)
    }

    /// Appends lines to stdout, all stamped with the current time, which it returns.
    pub fn append_lines<S: AsRef<str>>(&self, lines: &[S]) -> anyhow::Result<DateTime<Utc>> {
        let now = Utc::now();
        for line in lines {
            self.append_at(now, Stream::Stdout, line.as_ref())?;
        }
        Ok(now)
    }

    /// Appends `line` as written to `stream` at `time`. Lines are served in file order, whatever
    /// their times; `sinceTime` compares each line's time on its own.
    pub fn append_at(&self, time: DateTime<Utc>, stream: Stream, line: &str) -> anyhow::Result<()> {
        anyhow::ensure!(!line.contains('\n'), "a log line holds no newline: {line:?}");
        let stream = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        // CRI format; "F" marks a full line (not a part of a longer one). One write per line, so
        // kwok never reads half a line.
        let record = format!(
            "{} {stream} F {line}\n",
            time.to_rfc3339_opts(SecondsFormat::Nanos, true)
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        file.write_all(record.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn create(name: &str) -> anyhow::Result<Self> {
        let path = TestEnv::get().kwok_logs_dir.join(format!("{name}.log"));
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

/// `GET /api/v1/namespaces/<ns>/pods/<pod>/log?<query>` through kube-apiserver, with the query
/// string as given (kube's `LogParams` rounds `sinceTime` to whole seconds; this does not).
pub async fn pod_log(client: &Client, namespace: &str, pod: &str, query: &str) -> anyhow::Result<String> {
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}/log?{query}");
    let request = http::Request::get(&uri).body(Vec::new())?;
    client.request_text(request).await.with_context(|| format!("GET {uri}"))
}

/// A kwok kind; their plurals are the kind in lower case (`logs`, `clusterlogs`), which kube's
/// guess (`logses`) misses.
fn kwok_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kwok.x-k8s.io", "v1alpha1", kind),
        &kind.to_lowercase(),
    )
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1500m"), Some(1.5));
        assert_eq!(parse_quantity("3Gi"), Some(3.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("3145728Ki"), Some(3.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert!((parse_quantity("1500012345n").unwrap_or_default() - 1.500012345).abs() < 1e-12);
        assert_eq!(parse_quantity("x"), None);
    }
}
