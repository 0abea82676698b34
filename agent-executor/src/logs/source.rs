//! Where the log collector reads from: the seam between the collection's decisions
//! ([`super::LogCollector`]) and the API server. [`KubeSource`] is the real one; unit tests
//! use a fake that fails reads on demand.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::io::AsyncBufRead;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::{ListParams, LogParams, Patch, PatchParams},
};

use super::lines::{PodSelector, Workload};
use crate::{
    cluster::{
        Cluster,
        kube_util::{self, ApiError},
        tracking::{self, LAST_LOG_TIMESTAMP_KEY},
    },
    helm::storage::{HelmStorage, StorageError},
    release::status_board::ReleaseKey,
    resources::manifest::{self, ManifestError},
};
use agent_runtime::sync::MutexExt as _;

/// The field manager of the watermark, as the Go agent writes it.
pub const FIELD_MANAGER: &str = "distr-agent-logs";

/// Why something the collection needs could not be read or written. Every variant is worth a
/// retry at the next collection.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the tracking Secret of {release}: {source}")]
    Watermark {
        release: String,
        #[source]
        source: ApiError,
    },
    #[error("cannot save the log watermark of {release}: {source}")]
    SaveWatermark {
        release: String,
        #[source]
        source: ApiError,
    },
    #[error("cannot read the release {release} from Helm's storage: {source}")]
    Storage {
        release: String,
        #[source]
        source: StorageError,
    },
    #[error("cannot parse the manifest of release {release}: {source}")]
    Manifest {
        release: String,
        #[source]
        source: ManifestError,
    },
    #[error("cannot list the pods of {resource}: {source}")]
    Pods {
        resource: String,
        #[source]
        source: ApiError,
    },
    #[error("cannot read the log of pod {pod} container {container}: {source}")]
    Read {
        pod: String,
        container: String,
        #[source]
        source: ApiError,
    },
}

/// A pod of a workload and the containers whose logs may be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodContainers {
    pub pod: String,
    /// Containers that have run (a container still waiting for its first start has no log).
    pub containers: Vec<String>,
}

/// One container's log from `since` (a whole second), at most `limit_bytes` of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// `None`: the whole log.
    pub since: Option<DateTime<Utc>>,
    pub limit_bytes: i64,
}

/// A container's log as it arrives, `<RFC 3339 time> <text>` lines.
pub type LogStream = Pin<Box<dyn AsyncBufRead + Send>>;

/// What the collection reads and writes.
pub trait LogSource: Send + Sync + 'static {
    /// The workloads of the release's latest Helm revision; `None` when Helm has none.
    fn workloads(&self, key: &ReleaseKey) -> impl Future<Output = Result<Option<Arc<[Workload]>>, SourceError>> + Send;
    /// The pods of a workload, with the containers that have a log.
    fn pods(
        &self,
        namespace: &str,
        workload: &Workload,
    ) -> impl Future<Output = Result<Vec<PodContainers>, SourceError>> + Send;
    /// Opens a container's log. `Ok(None)`: the pod is gone, there is nothing to read.
    fn open(&self, request: &LogRequest) -> impl Future<Output = Result<Option<LogStream>, SourceError>> + Send;
    /// The watermark stored in the release's tracking Secret, if any.
    fn stored_watermark(
        &self,
        key: &ReleaseKey,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, SourceError>> + Send;
    /// Stores the watermark in the release's tracking Secret.
    fn save_watermark(
        &self,
        key: &ReleaseKey,
        time: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// Forgets what it keeps of releases other than `keep`.
    fn retain(&self, keep: &dyn Fn(&ReleaseKey) -> bool);
}

/// A release's workloads and the fingerprint of the Helm Secrets they were read from.
type KnownWorkloads = (u64, Option<Arc<[Workload]>>);

/// The API server: every call bounded by [`kube_util::API_TIMEOUT`]. A release's workloads
/// are decoded from Helm's storage once per revision: the executor's Secret watches say when
/// Helm wrote a new one.
pub struct KubeSource {
    client: kube::Client,
    cluster: Cluster,
    /// Per release: the fingerprint of its Helm Secrets when its workloads were read.
    workloads: Mutex<HashMap<ReleaseKey, KnownWorkloads>>,
}

impl KubeSource {
    pub fn new(client: kube::Client, cluster: Cluster) -> Self {
        Self {
            client,
            cluster,
            workloads: Mutex::default(),
        }
    }
}

impl LogSource for KubeSource {
    async fn workloads(&self, key: &ReleaseKey) -> Result<Option<Arc<[Workload]>>, SourceError> {
        let fingerprint = self.cluster.secrets(&key.namespace).helm_fingerprint(&key.release);
        if let Some(fingerprint) = fingerprint
            && let Some((known, workloads)) = self.workloads.locked().get(key)
            && *known == fingerprint
        {
            return Ok(workloads.clone());
        }
        let latest = HelmStorage::new(self.client.clone(), &key.namespace)
            .latest(&key.release)
            .await
            .map_err(|source| SourceError::Storage {
                release: key.release.clone(),
                source,
            })?;
        let workloads = match latest {
            Some(release) => {
                let objects = manifest::parse(&release.manifest).map_err(|source| SourceError::Manifest {
                    release: key.release.clone(),
                    source,
                })?;
                Some(super::lines::workloads(&objects).into())
            }
            None => None,
        };
        if let Some(fingerprint) = fingerprint {
            self.workloads
                .locked()
                .insert(key.clone(), (fingerprint, workloads.clone()));
        }
        Ok(workloads)
    }

    async fn pods(&self, namespace: &str, workload: &Workload) -> Result<Vec<PodContainers>, SourceError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let error = |source| SourceError::Pods {
            resource: workload.resource.clone(),
            source,
        };
        let pods = match &workload.pods {
            PodSelector::Labels(selector) => {
                kube_util::call(api.list(&ListParams::default().labels(selector)))
                    .await
                    .map_err(error)?
                    .items
            }
            PodSelector::Name(name) => kube_util::call_opt(api.get(name))
                .await
                .map_err(error)?
                .into_iter()
                .collect(),
        };
        Ok(pods.iter().map(pod_containers).collect())
    }

    async fn open(&self, request: &LogRequest) -> Result<Option<LogStream>, SourceError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &request.namespace);
        let params = LogParams {
            container: Some(request.container.clone()),
            timestamps: true,
            // Whole seconds, which kube sends as they are (it rounds to the nearest second).
            since_time: request
                .since
                .and_then(|since| k8s_openapi::jiff::Timestamp::from_second(since.timestamp()).ok()),
            limit_bytes: Some(request.limit_bytes),
            ..LogParams::default()
        };
        match kube_util::call_opt(api.log_stream(&request.pod, &params)).await {
            Ok(stream) => Ok(stream.map(|stream| Box::pin(stream) as LogStream)),
            Err(source) => Err(SourceError::Read {
                pod: request.pod.clone(),
                container: request.container.clone(),
                source,
            }),
        }
    }

    async fn stored_watermark(&self, key: &ReleaseKey) -> Result<Option<DateTime<Utc>>, SourceError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        let secret = kube_util::call_opt(secrets.get(&tracking::secret_name(&key.release)))
            .await
            .map_err(|source| SourceError::Watermark {
                release: key.release.clone(),
                source,
            })?;
        Ok(secret
            .and_then(|secret| secret.data)
            .and_then(|data| data.get(LAST_LOG_TIMESTAMP_KEY).cloned())
            .and_then(|bytes| String::from_utf8(bytes.0).ok())
            .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
            .map(|time| time.with_timezone(&Utc)))
    }

    async fn save_watermark(&self, key: &ReleaseKey, time: DateTime<Utc>) -> Result<(), SourceError> {
        let text = time.to_rfc3339_opts(SecondsFormat::Nanos, true);
        let patch = serde_json::json!({"data": {LAST_LOG_TIMESTAMP_KEY: k8s_openapi::ByteString(text.into_bytes())}});
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        // A merge patch: a tracking Secret deleted meanwhile is not recreated with only this.
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        kube_util::call(secrets.patch(&tracking::secret_name(&key.release), &params, &Patch::Merge(&patch)))
            .await
            .map(drop)
            .map_err(|source| SourceError::SaveWatermark {
                release: key.release.clone(),
                source,
            })
    }

    fn retain(&self, keep: &dyn Fn(&ReleaseKey) -> bool) {
        self.workloads.locked().retain(|key, _| keep(key));
    }
}

/// The containers of a pod that have run: a container waiting for its first start has
/// written nothing yet, so reading it would only fail.
fn pod_containers(pod: &Pod) -> PodContainers {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref());
    let never_started = |name: &str| {
        statuses.is_none_or(|statuses| {
            statuses.iter().find(|status| status.name == name).is_none_or(|status| {
                status.restart_count == 0
                    && status.last_state.as_ref().is_none_or(|last| last.terminated.is_none())
                    && status.state.as_ref().is_none_or(|state| state.waiting.is_some())
            })
        })
    };
    PodContainers {
        pod: pod.metadata.name.clone().unwrap_or_default(),
        containers: pod
            .spec
            .iter()
            .flat_map(|spec| &spec.containers)
            .map(|container| container.name.clone())
            .filter(|name| !never_started(name))
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_containers_that_have_run_are_read() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "app"}, {"name": "sidecar"}, {"name": "crashing"}, {"name": "new"}]},
            "status": {"containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 0, "image": "", "imageID": "",
                 "state": {"running": {}}},
                {"name": "sidecar", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                 "state": {"waiting": {"reason": "ContainerCreating"}}},
                {"name": "crashing", "ready": false, "restartCount": 3, "image": "", "imageID": "",
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 1}}}
            ]}
        }))
        .unwrap();
        assert_eq!(
            pod_containers(&pod),
            PodContainers {
                pod: "web-1".into(),
                containers: vec!["app".into(), "crashing".into()],
            },
            "a container waiting for its first start (or with no status yet) has no log"
        );
        let pending: Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}}),
        )
        .unwrap();
        assert!(pod_containers(&pending).containers.is_empty());
    }
}
