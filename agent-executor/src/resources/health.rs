//! Health of a release's resources, judged from the live objects named in its manifest.
//!
//! The judgements are pure functions over k8s-openapi objects (unit-tested without an API
//! server); [`HealthChecker`] takes them from the object watches ([`crate::cluster::objects`])
//! and reads an object directly only when its watch cannot say. Kinds that carry no runtime
//! state (ConfigMap, RBAC, ...) are healthy when they exist (a metadata watch says).

use agent_runtime::sync::MutexExt as _;
use std::{collections::HashMap, sync::Mutex};

use futures::{StreamExt, stream};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{PersistentVolumeClaim, Pod, Service},
};
use kube::{
    Api, Resource,
    api::{ApiResource, DynamicObject},
    core::GroupVersionKind,
    discovery::{ApiCapabilities, Scope},
};

use crate::{
    cluster::{Cluster, kube_util, objects::Lookup},
    model::StatusKind,
    resources::{manifest::ManifestObject, readiness},
};

/// Requests in flight per health check.
const CONCURRENT_FETCHES: usize = 8;

/// Kinds with no readiness of their own: healthy when they exist.
const STATELESS_KINDS: &[&str] = &[
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "NetworkPolicy",
    "Endpoints",
    "EndpointSlice",
    "LimitRange",
    "ResourceQuota",
    "PriorityClass",
    "StorageClass",
    "CronJob",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "Ingress",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "Namespace",
];

/// Whether only the existence of `object` counts: a kind without readiness of its own, and
/// no readiness annotations that say otherwise.
pub fn existence_only(object: &ManifestObject) -> bool {
    STATELESS_KINDS.contains(&object.kind.as_str()) && !object.custom_readiness
}

/// The message of an object a release names that does not exist.
pub const NOT_FOUND: &str = "resource not found";

/// What the rules say of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    /// Counts as ready, with something the user should know (a LoadBalancer without an
    /// address, an object the executor may not read).
    Noted(String),
    NotReady(String),
}

impl From<Result<(), String>> for Verdict {
    fn from(result: Result<(), String>) -> Self {
        match result {
            Ok(()) => Self::Ready,
            Err(why) => Self::NotReady(why),
        }
    }
}

/// Judges `object` by Helm's readiness annotations when it declares both, otherwise by
/// `rule`, its kind's rule.
pub fn judge<K: Resource + serde::Serialize>(object: &K, rule: impl Fn(&K) -> Verdict) -> Verdict {
    if let Some(annotations) = object.meta().annotations.as_ref()
        && readiness::declared(annotations)
    {
        let status = serde_json::to_value(object)
            .ok()
            .and_then(|mut value| value.get_mut("status").map(serde_json::Value::take));
        return readiness::evaluate(annotations, status.as_ref()).map_or(Verdict::Ready, Verdict::from);
    }
    rule(object)
}

/// Judges an object of a kind without a typed rule here (custom resources, CRDs), from its
/// JSON: Helm's readiness annotations, the CRD rule, or the `Ready` condition.
pub fn judge_dynamic(object: &DynamicObject) -> Verdict {
    if let Some(annotations) = object.metadata.annotations.as_ref()
        && let Some(verdict) = readiness::evaluate(annotations, object.data.get("status"))
    {
        return verdict.into();
    }
    let kind = object
        .types
        .as_ref()
        .map(|types| (types.api_version.as_str(), types.kind.as_str()));
    match kind {
        Some((api_version, "CustomResourceDefinition")) if api_version.starts_with("apiextensions.k8s.io/") => {
            custom_resource_definition(&object.data).into()
        }
        _ => ready_condition(&object.data).into(),
    }
}

/// Health of one resource of a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceHealth {
    pub kind: String,
    pub name: String,
    pub healthy: bool,
    /// Why it is unhealthy, or what to know of it although healthy; empty otherwise.
    pub message: String,
}

impl ResourceHealth {
    fn new(object: &ManifestObject, verdict: Verdict) -> Self {
        let (healthy, message) = match verdict {
            Verdict::Ready => (true, String::new()),
            Verdict::Noted(note) => (true, note),
            Verdict::NotReady(message) => (false, message),
        };
        Self {
            kind: object.kind.clone(),
            name: object.name.clone(),
            healthy,
            message,
        }
    }

    /// `Kind/name`, such as `Deployment/web`.
    pub fn resource(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// The status a health check reports: `healthy` when every resource passed, otherwise
/// `error` naming the first resource that did not.
pub fn summarize(results: &[ResourceHealth]) -> (StatusKind, String) {
    match results.iter().find(|result| !result.healthy) {
        Some(bad) => (
            StatusKind::Error,
            format!(
                "resource status error: {} {} status check failed: {}",
                bad.kind, bad.name, bad.message
            ),
        ),
        None => {
            let notes: Vec<String> = results
                .iter()
                .filter(|result| !result.message.is_empty())
                .map(|result| format!("{} {}: {}", result.kind, result.name, result.message))
                .collect();
            let mut message = format!("status check passed. {} resources healthy", results.len());
            if !notes.is_empty() {
                message = format!("{message} (note: {})", notes.join("; "));
            }
            (StatusKind::Healthy, message)
        }
    }
}

fn behind(what: &str, actual: i64, desired: i64) -> Result<(), String> {
    if actual < desired {
        Err(format!("{what} ({actual}) is less than desired ({desired})"))
    } else {
        Ok(())
    }
}

fn generation_observed(generation: Option<i64>, observed: Option<i64>) -> Result<(), String> {
    match (generation, observed) {
        (Some(generation), Some(observed)) if observed < generation => Err(format!(
            "ObservedGeneration ({observed}) is less than Generation ({generation})"
        )),
        (Some(generation), None) if generation > 0 => Err("the controller has not observed it yet".to_owned()),
        _ => Ok(()),
    }
}

/// Why a pod does not run as it should, from its status, for a message a user can act on
/// without `kubectl`: a container waiting in `CrashLoopBackOff`, `ImagePullBackOff`,
/// `ErrImagePull`, `CreateContainerConfigError` (and the like), a container last killed by
/// `OOMKilled`, or a pod the scheduler cannot place. `None` for a pod without such a problem.
pub fn pod_problem(object: &Pod) -> Option<String> {
    let status = object.status.as_ref()?;
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for container in containers {
        let state = container.state.as_ref();
        if let Some(waiting) = state.and_then(|state| state.waiting.as_ref())
            && let Some(reason) = waiting.reason.as_deref()
            && !matches!(reason, "ContainerCreating" | "PodInitializing")
        {
            let oom = container
                .last_state
                .as_ref()
                .and_then(|last| last.terminated.as_ref())
                .is_some_and(|terminated| terminated.reason.as_deref() == Some("OOMKilled"));
            let detail = reason_and_message(Some(reason), waiting.message.as_deref());
            return Some(if oom {
                format!("{detail} (container {} was OOMKilled)", container.name)
            } else {
                format!("{detail} (container {})", container.name)
            });
        }
        if let Some(terminated) = state.and_then(|state| state.terminated.as_ref())
            && terminated.reason.as_deref() == Some("OOMKilled")
        {
            return Some(format!("OOMKilled (container {})", container.name));
        }
    }
    let unschedulable = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    Some(format!(
        "is unschedulable: {}",
        unschedulable.message.as_deref().unwrap_or("no node fits it")
    ))
}

// Deployments, StatefulSets and DaemonSets: kstatus's rules, shared with the updater's gate.
pub use agent_kstatus::{daemon_set, deployment, stateful_set};

/// A ReplicaSet is healthy when all desired replicas are ready and available and none
/// failed to be created.
pub fn replica_set(object: &ReplicaSet) -> Result<(), String> {
    let desired = i64::from(object.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(1));
    let status = object.status.clone().unwrap_or_default();
    let failure = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True");
    if let Some(failure) = failure {
        return Err(format!(
            "ReplicaFailure: {}",
            reason_and_message(failure.reason.as_deref(), failure.message.as_deref())
        ));
    }
    generation_observed(object.metadata.generation, status.observed_generation)?;
    behind("ReadyReplicas", status.ready_replicas.unwrap_or(0).into(), desired)?;
    behind(
        "AvailableReplicas",
        status.available_replicas.unwrap_or(0).into(),
        desired,
    )
}

/// A Job is healthy once it completed; failed or still running is not healthy.
pub fn job(object: &Job) -> Result<(), String> {
    let status = object.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let is_true = |kind: &str| conditions.iter().find(|c| c.type_ == kind && c.status == "True");
    if let Some(failed) = is_true("Failed") {
        return Err(format!(
            "Job failed: {}",
            reason_and_message(failed.reason.as_deref(), failed.message.as_deref())
        ));
    }
    if is_true("Complete").is_some() || is_true("SuccessCriteriaMet").is_some() {
        return Ok(());
    }
    Err(format!(
        "Job has not completed yet ({} active, {} succeeded)",
        status.active.unwrap_or(0),
        status.succeeded.unwrap_or(0)
    ))
}

/// A Pod is healthy when it succeeded, or runs with its `Ready` condition true.
pub fn pod(object: &Pod) -> Result<(), String> {
    let status = object.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Unknown".to_owned());
    match phase.as_str() {
        "Succeeded" => Ok(()),
        "Running" => {
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                Ok(())
            } else {
                Err("Pod is running but not ready".to_owned())
            }
        }
        other => Err(match pod_problem(object) {
            Some(problem) => format!("Pod phase is {other}: {problem}"),
            None => format!("Pod phase is {other}"),
        }),
    }
}

/// A PersistentVolumeClaim is healthy once bound.
pub fn persistent_volume_claim(object: &PersistentVolumeClaim) -> Result<(), String> {
    let phase = object
        .status
        .as_ref()
        .and_then(|status| status.phase.clone())
        .unwrap_or_else(|| "Pending".to_owned());
    if phase == "Bound" {
        Ok(())
    } else {
        Err(format!("PersistentVolumeClaim phase is {phase}, not Bound"))
    }
}

/// A Service is always healthy, as `helm --wait` judges it; a LoadBalancer without an
/// ingress address yet is noted (on clusters without a load-balancer controller, bare
/// metal, it never gets one, and the release works all the same through its cluster IP).
pub fn service(object: &Service) -> Verdict {
    let load_balancer = object.spec.as_ref().and_then(|spec| spec.type_.as_deref()) == Some("LoadBalancer");
    let has_ingress = object
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|ingress| !ingress.is_empty());
    if !load_balancer || has_ingress {
        Verdict::Ready
    } else {
        Verdict::Noted("LoadBalancer has no ingress address yet".to_owned())
    }
}

/// A CustomResourceDefinition is healthy once established; names the API server refused are
/// a failure.
pub fn custom_resource_definition(object: &serde_json::Value) -> Result<(), String> {
    if let Some(names) = json_condition(object, "NamesAccepted").filter(|c| text(c, "status") == Some("False")) {
        return Err(format!(
            "names not accepted: {}",
            reason_and_message(text(names, "reason"), text(names, "message"))
        ));
    }
    match json_condition(object, "Established") {
        Some(established) if text(established, "status") == Some("True") => Ok(()),
        _ => Err("CustomResourceDefinition is not established yet".to_owned()),
    }
}

/// Any other object: healthy unless it has a `Ready` condition that is not `True`.
pub fn ready_condition(object: &serde_json::Value) -> Result<(), String> {
    let Some(ready) = json_condition(object, "Ready") else {
        return Ok(());
    };
    let status = text(ready, "status").unwrap_or("Unknown");
    if status == "True" {
        Ok(())
    } else {
        Err(format!(
            "Ready condition is {status}: {}",
            reason_and_message(text(ready, "reason"), text(ready, "message"))
        ))
    }
}

/// The condition of type `kind` in an object's `status.conditions` (JSON).
fn json_condition<'a>(object: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    object
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|condition| text(condition, "type") == Some(kind))
}

/// A string field of a JSON object.
fn text<'a>(object: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    object.get(name).and_then(serde_json::Value::as_str)
}

fn reason_and_message(reason: Option<&str>, message: Option<&str>) -> String {
    match (reason.filter(|r| !r.is_empty()), message.filter(|m| !m.is_empty())) {
        (Some(reason), Some(message)) => format!("{reason}: {message}"),
        (Some(text), None) | (None, Some(text)) => text.to_owned(),
        (None, None) => "no reason given".to_owned(),
    }
}

/// Fetches the objects of a release and judges them. Remembers resolved kinds.
pub struct HealthChecker {
    client: kube::Client,
    cluster: Cluster,
    kinds: Mutex<HashMap<GroupVersionKind, (ApiResource, ApiCapabilities)>>,
}

impl HealthChecker {
    pub fn new(client: kube::Client, cluster: Cluster) -> Self {
        Self {
            client,
            cluster,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Health of every object, in manifest order. `namespace` is the release namespace, used
    /// for objects whose manifest names none.
    pub async fn check(&self, namespace: &str, objects: &[ManifestObject]) -> Vec<ResourceHealth> {
        let checks: Vec<_> = objects.iter().map(|object| self.check_one(namespace, object)).collect();
        stream::iter(checks).buffered(CONCURRENT_FETCHES).collect().await
    }

    async fn check_one(&self, release_namespace: &str, object: &ManifestObject) -> ResourceHealth {
        let namespace = object.namespace.as_deref().unwrap_or(release_namespace);
        let kind = object.kind.as_str();
        let verdict = match self.cluster.objects().lookup(namespace, object).await {
            Lookup::Known(verdict) => verdict,
            Lookup::Unknown => self.judge(namespace, object).await,
        };
        let verdict = match verdict {
            // The TTL controller deletes a finished Job (`ttlSecondsAfterFinished`): gone is
            // done, not missing.
            Verdict::NotReady(why)
                if why == NOT_FOUND && object.group() == "batch" && kind == "Job" && object.deleted_when_finished =>
            {
                Verdict::Ready
            }
            Verdict::NotReady(error) => Verdict::NotReady(self.pod_problem_or(namespace, object, error)),
            other => other,
        };
        ResourceHealth::new(object, verdict)
    }

    /// For a workload that is not ready: a pod of it with a problem, if one has, else `error`.
    fn pod_problem_or(&self, namespace: &str, object: &ManifestObject, error: String) -> String {
        {
            let labels = object.selector.as_ref().and_then(|selector| {
                serde_json::from_value::<std::collections::BTreeMap<String, String>>(selector["matchLabels"].clone())
                    .ok()
                    .filter(|labels| !labels.is_empty())
            });
            match labels.and_then(|labels| self.cluster.objects().pod_problem(namespace, &labels)) {
                Some((pod, problem)) => format!("pod {pod} {problem}"),
                None => error,
            }
        }
    }

    /// Reads the object itself and judges it (when its watch cannot say).
    async fn judge(&self, namespace: &str, object: &ManifestObject) -> Verdict {
        let name = object.name.as_str();
        let verdict = match (object.group(), object.kind.as_str()) {
            ("apps", "Deployment") => self.fetch(namespace, name, typed(deployment)).await,
            ("apps", "StatefulSet") => self.fetch(namespace, name, typed(stateful_set)).await,
            ("apps", "DaemonSet") => self.fetch(namespace, name, typed(daemon_set)).await,
            ("apps", "ReplicaSet") => self.fetch(namespace, name, typed(replica_set)).await,
            ("batch", "Job") => self.fetch(namespace, name, typed(job)).await,
            ("", "Pod") => self.fetch(namespace, name, typed(pod)).await,
            ("", "PersistentVolumeClaim") => self.fetch(namespace, name, typed(persistent_volume_claim)).await,
            ("", "Service") => self.fetch(namespace, name, service).await,
            _ => match self.fetch_dynamic(namespace, object).await {
                Ok(_) if existence_only(object) => Ok(Verdict::Ready),
                Ok(found) => Ok(judge_dynamic(&found)),
                // A custom resource the executor may not read (a namespace-scoped agent, a
                // kind its Role does not name) says nothing against the release.
                Err((why, Some(403))) => Ok(Verdict::Noted(format!("not checked: {why}"))),
                Err((why, _)) => Err(why),
            },
        };
        verdict.unwrap_or_else(Verdict::NotReady)
    }

    async fn fetch<K>(&self, namespace: &str, name: &str, rule: impl Fn(&K) -> Verdict) -> Result<Verdict, String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        match kube_util::call_opt(api.get(name)).await {
            Ok(Some(object)) => Ok(judge(&object, rule)),
            Ok(None) => Err(NOT_FOUND.to_owned()),
            Err(error) => Err(format!("cannot read it: {error}")),
        }
    }

    /// The object, or why not with the HTTP status of the refusal.
    async fn fetch_dynamic(
        &self,
        namespace: &str,
        object: &ManifestObject,
    ) -> Result<DynamicObject, (String, Option<u16>)> {
        let gvk = GroupVersionKind::gvk(object.group(), object.version(), &object.kind);
        let cached = self.kinds.locked().get(&gvk).cloned();
        let (resource, capabilities) = match cached {
            Some(found) => found,
            None => {
                let found = kube_util::call(kube::discovery::pinned_kind(&self.client, &gvk))
                    .await
                    .map_err(|error| {
                        (
                            format!("cannot resolve kind {}: {error}", object.api_version),
                            error.code(),
                        )
                    })?;
                self.kinds.locked().insert(gvk, found.clone());
                found
            }
        };
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Cluster => Api::all_with(self.client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(self.client.clone(), namespace, &resource),
        };
        match kube_util::call_opt(api.get(&object.name)).await {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err((NOT_FOUND.to_owned(), None)),
            Err(error) => Err((format!("cannot read it: {error}"), error.code())),
        }
    }
}

/// A typed rule as a [`Verdict`] rule.
pub fn typed<K>(rule: fn(&K) -> Result<(), String>) -> impl Fn(&K) -> Verdict {
    move |object| rule(object).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::{Deployment, DeploymentSpec, DeploymentStatus},
            batch::v1::{JobCondition, JobStatus},
            core::v1::{
                LoadBalancerIngress, LoadBalancerStatus, PersistentVolumeClaimStatus, PodCondition, PodStatus,
                ServiceSpec, ServiceStatus,
            },
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use serde_json::json;

    use super::*;

    fn web(replicas: i32, ready: i32, updated: i32, generation: i64, observed: i64) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                generation: Some(generation),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                updated_replicas: Some(updated),
                observed_generation: Some(observed),
                ..Default::default()
            }),
        }
    }

    fn object(kind: &str) -> ManifestObject {
        ManifestObject {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: "web".into(),
            namespace: None,
            spec_type: None,
            selector: None,
            custom_readiness: false,
            deleted_when_finished: false,
        }
    }

    #[test]
    fn a_rollout_whose_new_pod_crash_loops_beside_the_ready_old_one_is_not_healthy() {
        // `kubectl rollout restart` (or an upgrade with `waitStrategy: hookOnly`) of a
        // one-replica Deployment whose new pod never becomes ready: the old pod still serves.
        let mut rolling = web(1, 1, 1, 2, 2);
        rolling.status.as_mut().unwrap().replicas = Some(2);
        let results = [ResourceHealth::new(
            &object("Deployment"),
            judge(&rolling, typed(deployment)),
        )];
        assert_eq!(
            summarize(&results),
            (
                StatusKind::Error,
                "resource status error: Deployment web status check failed: Replicas (2) is more than desired (1): old pods are still there".to_owned()
            )
        );
        // Once the old pod is gone and the new one available, it is.
        let done = web(1, 1, 1, 2, 2);
        assert_eq!(judge(&done, typed(deployment)), Verdict::Ready);
    }

    #[test]
    fn pod_problems_are_named_for_the_user() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        };
        let pod_with = |status: PodStatus| Pod {
            status: Some(status),
            ..Default::default()
        };
        let container = |state: ContainerState, last: Option<ContainerState>| ContainerStatus {
            name: "web".into(),
            state: Some(state),
            last_state: last,
            ..Default::default()
        };
        let waiting = |reason: &str, message: &str| ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            }),
            ..Default::default()
        };
        let oom = ContainerState {
            terminated: Some(ContainerStateTerminated {
                reason: Some("OOMKilled".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pulling = pod_with(PodStatus {
            container_statuses: Some(vec![container(
                waiting("ImagePullBackOff", "Back-off pulling image \"web:2\""),
                None,
            )]),
            ..Default::default()
        });
        assert_eq!(
            pod_problem(&pulling).as_deref(),
            Some("ImagePullBackOff: Back-off pulling image \"web:2\" (container web)")
        );
        let crashing = pod_with(PodStatus {
            container_statuses: Some(vec![container(waiting("CrashLoopBackOff", "back-off 5m0s"), Some(oom))]),
            ..Default::default()
        });
        assert_eq!(
            pod_problem(&crashing).as_deref(),
            Some("CrashLoopBackOff: back-off 5m0s (container web was OOMKilled)")
        );
        let unschedulable = pod_with(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                message: Some("0/1 nodes are available".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            pod_problem(&unschedulable).as_deref(),
            Some("is unschedulable: 0/1 nodes are available")
        );
        let creating = pod_with(PodStatus {
            container_statuses: Some(vec![container(waiting("ContainerCreating", ""), None)]),
            ..Default::default()
        });
        assert_eq!(pod_problem(&creating), None, "starting is not a problem");
    }

    #[test]
    fn summary_names_the_first_bad_resource() {
        let results = vec![
            ResourceHealth::new(&object("ConfigMap"), Verdict::Ready),
            ResourceHealth::new(&object("Deployment"), deployment(&web(1, 0, 1, 1, 1)).into()),
        ];
        assert_eq!(
            summarize(&results),
            (
                StatusKind::Error,
                "resource status error: Deployment web status check failed: ReadyReplicas (0) is less than desired (1)"
                    .into()
            )
        );
        assert_eq!(results[1].resource(), "Deployment/web");
        assert_eq!(
            summarize(&results[..1]),
            (StatusKind::Healthy, "status check passed. 1 resources healthy".into())
        );
        let noted = [
            ResourceHealth::new(&object("ConfigMap"), Verdict::Ready),
            ResourceHealth::new(
                &object("Service"),
                Verdict::Noted("LoadBalancer has no ingress address yet".into()),
            ),
        ];
        assert_eq!(
            summarize(&noted),
            (
                StatusKind::Healthy,
                "status check passed. 2 resources healthy (note: Service web: LoadBalancer has no ingress address yet)"
                    .into()
            ),
            "a note is reported, not failed"
        );
    }

    #[test]
    fn replica_sets() {
        use k8s_openapi::api::apps::v1::{ReplicaSetCondition, ReplicaSetSpec, ReplicaSetStatus};
        let set = |ready, available, failure: bool| ReplicaSet {
            spec: Some(ReplicaSetSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(ReplicaSetStatus {
                ready_replicas: Some(ready),
                available_replicas: Some(available),
                conditions: failure.then(|| {
                    vec![ReplicaSetCondition {
                        type_: "ReplicaFailure".into(),
                        status: "True".into(),
                        reason: Some("FailedCreate".into()),
                        message: Some("pods \"web-x\" is forbidden: exceeded quota".into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(replica_set(&set(2, 2, false)), Ok(()));
        assert_eq!(
            replica_set(&set(2, 1, false)),
            Err("AvailableReplicas (1) is less than desired (2)".into())
        );
        assert_eq!(
            replica_set(&set(0, 0, true)),
            Err("ReplicaFailure: FailedCreate: pods \"web-x\" is forbidden: exceeded quota".into())
        );
    }

    #[test]
    fn custom_resource_definitions_wait_for_establishment() {
        let crd = |conditions: serde_json::Value| json!({"status": {"conditions": conditions}});
        assert_eq!(
            custom_resource_definition(&crd(json!([{"type": "Established", "status": "True"}]))),
            Ok(())
        );
        assert_eq!(
            custom_resource_definition(&crd(json!([]))),
            Err("CustomResourceDefinition is not established yet".into())
        );
        assert_eq!(
            custom_resource_definition(&crd(json!([
                {"type": "NamesAccepted", "status": "False", "reason": "PluralConflict", "message": "\"webs\" is already in use"},
                {"type": "Established", "status": "False"},
            ]))),
            Err("names not accepted: PluralConflict: \"webs\" is already in use".into())
        );
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "webs.example.com"},
            "status": {"conditions": []},
        }))
        .unwrap();
        assert_eq!(
            judge_dynamic(&object),
            Verdict::NotReady("CustomResourceDefinition is not established yet".into()),
            "a CRD watched through the dynamic API gets its kind's rule"
        );
    }

    #[test]
    fn readiness_annotations_replace_the_kind_rule() {
        let mut annotated = web(1, 0, 1, 1, 1);
        annotated.metadata.annotations = Some(
            [
                (
                    readiness::SUCCESS_ANNOTATION.to_owned(),
                    r#"["{.observedGeneration} >= 1"]"#.to_owned(),
                ),
                (
                    readiness::FAILURE_ANNOTATION.to_owned(),
                    r#"["{.unavailableReplicas} > 5"]"#.to_owned(),
                ),
            ]
            .into(),
        );
        assert!(deployment(&annotated).is_err(), "the kind's rule says not ready");
        assert_eq!(
            judge(&annotated, typed(deployment)),
            Verdict::Ready,
            "the chart's rule says ready"
        );
        annotated.status.as_mut().unwrap().unavailable_replicas = Some(6);
        assert_eq!(
            judge(&annotated, typed(deployment)),
            Verdict::NotReady("readiness failure condition met: {.unavailableReplicas} > 5".into())
        );
        annotated
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(readiness::FAILURE_ANNOTATION);
        assert_eq!(
            judge(&annotated, typed(deployment)),
            deployment(&annotated).into(),
            "with one annotation only, the kind's rule applies (as in Helm)"
        );
        let custom: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "example.com/v1",
            "kind": "Web",
            "metadata": {"name": "web", "annotations": {
                readiness::SUCCESS_ANNOTATION: r#"["{.phase} == \"Serving\""]"#,
                readiness::FAILURE_ANNOTATION: r#"["{.phase} == \"Broken\""]"#,
            }},
            "status": {"phase": "Serving", "conditions": [{"type": "Ready", "status": "False"}]},
        }))
        .unwrap();
        assert_eq!(judge_dynamic(&custom), Verdict::Ready);
    }

    #[test]
    fn jobs() {
        let with = |kind: &str, reason: Option<&str>| Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: kind.into(),
                    status: "True".into(),
                    reason: reason.map(Into::into),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(job(&with("Complete", None)), Ok(()));
        assert_eq!(
            job(&with("Failed", Some("BackoffLimitExceeded"))),
            Err("Job failed: BackoffLimitExceeded".into())
        );
        let running = Job {
            status: Some(JobStatus {
                active: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            job(&running),
            Err("Job has not completed yet (1 active, 0 succeeded)".into())
        );
    }

    #[test]
    fn pods() {
        let with = |phase: &str, ready: &str| Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod(&with("Running", "True")), Ok(()));
        assert_eq!(pod(&with("Succeeded", "False")), Ok(()));
        assert_eq!(
            pod(&with("Running", "False")),
            Err("Pod is running but not ready".into())
        );
        assert_eq!(pod(&with("Pending", "False")), Err("Pod phase is Pending".into()));
    }

    #[test]
    fn claims_and_load_balancers() {
        let claim = |phase: &str| PersistentVolumeClaim {
            status: Some(PersistentVolumeClaimStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(persistent_volume_claim(&claim("Bound")), Ok(()));
        assert!(persistent_volume_claim(&claim("Pending")).is_err());
        let lb = |ingress: Vec<LoadBalancerIngress>| Service {
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress) }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            service(&lb(vec![])),
            Verdict::Noted("LoadBalancer has no ingress address yet".into()),
            "bare metal: reported, not failed"
        );
        assert_eq!(
            service(&lb(vec![LoadBalancerIngress {
                ip: Some("10.0.0.1".into()),
                ..Default::default()
            }])),
            Verdict::Ready
        );
    }

    #[test]
    fn ready_conditions_of_other_objects() {
        assert_eq!(ready_condition(&json!({"status": {}})), Ok(()), "no Ready condition");
        assert_eq!(
            ready_condition(&json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
            Ok(())
        );
        assert_eq!(
            ready_condition(&json!({"status": {"conditions": [
                {"type": "Synced", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "Pending", "message": "waiting for issuer"}
            ]}})),
            Err("Ready condition is False: Pending: waiting for issuer".into())
        );
    }
}
