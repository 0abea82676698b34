//! Applying a new agent version: check, record the intent, server-side apply, gate on the
//! rollout, then prune, or roll back to what the cluster had before.
//!
//! The state lives in the ConfigMap `distr-agent-updater-state` and is written before every
//! step, so an updater restarted half-way (it replaces its own Deployment, last) resumes the
//! gate or the roll-back instead of leaving a half-updated agent.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use k8s_openapi::api::{
    admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::manifest::{self, Object, Refusal, Rules};

pub const STATE_CONFIGMAP: &str = "distr-agent-updater-state";
const FIELD_MANAGER: &str = "distr-agent-updater";
const PART_OF: &str = "app.kubernetes.io/part-of";
const API_TIMEOUT: Duration = Duration::from_secs(15);
/// In `State::previous`: an object that existed but is not recorded (a Secret).
const NOT_RECORDED: &str = "not recorded";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    #[default]
    Idle,
    Validating,
    Applying,
    Waiting,
    RollingBack,
    Done,
    Failed,
}

/// What the updater did last, as kept in its state ConfigMap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub phase: Phase,
    pub target_version_id: String,
    pub message: String,
    pub changed_at: Option<DateTime<Utc>>,
    pub failed_version_ids: Vec<String>,
    /// The manifest being applied.
    pub manifest: String,
    /// Each object the update touches as it was before (`null`: it did not exist), by
    /// `Kind/name`.
    pub previous: BTreeMap<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("an update to version {0} is under way")]
    Busy(String),
    #[error("version {0} failed before; it is not applied again until the Hub names another one")]
    FailedBefore(String),
    #[error("{0}")]
    Cluster(String),
}

/// Runs updates, one at a time.
#[derive(Clone)]
pub struct Engine {
    client: kube::Client,
    rules: Rules,
    gate_timeout: Duration,
    state: Arc<Mutex<State>>,
    busy: Arc<tokio::sync::Mutex<()>>,
}

fn key(object: &Object) -> String {
    format!("{}/{}", object.kind, object.name)
}

fn resource(kind: &str) -> Option<ApiResource> {
    Some(match kind {
        "ServiceAccount" => ApiResource::erase::<ServiceAccount>(&()),
        "ConfigMap" => ApiResource::erase::<ConfigMap>(&()),
        "Secret" => ApiResource::erase::<Secret>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "NetworkPolicy" => ApiResource::erase::<NetworkPolicy>(&()),
        "Deployment" => ApiResource::erase::<Deployment>(&()),
        "Role" => ApiResource::erase::<Role>(&()),
        "RoleBinding" => ApiResource::erase::<RoleBinding>(&()),
        "ClusterRole" => ApiResource::erase::<ClusterRole>(&()),
        "ClusterRoleBinding" => ApiResource::erase::<ClusterRoleBinding>(&()),
        "ValidatingAdmissionPolicy" => ApiResource::erase::<ValidatingAdmissionPolicy>(&()),
        "ValidatingAdmissionPolicyBinding" => ApiResource::erase::<ValidatingAdmissionPolicyBinding>(&()),
        _ => return None,
    })
}

async fn timed<T>(what: &str, call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(kube::Error::Api(status))) => Err(format!("{what}: {} ({})", status.message, status.code)),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!("{what}: no answer within {API_TIMEOUT:?}")),
    }
}

fn not_found(error: &str) -> bool {
    error.ends_with("(404)")
}

/// The object as an apply configuration: what the cluster keeps for itself removed.
fn apply_config(mut live: Value) -> Value {
    if let Some(meta) = live.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(field);
        }
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
            annotations.remove("deployment.kubernetes.io/revision");
        }
    }
    if let Some(object) = live.as_object_mut() {
        object.remove("status");
    }
    live
}

fn previous_version(state: &State) -> String {
    state
        .previous
        .get("ConfigMap/distr-agent-env")
        .and_then(|config| config["data"]["DISTR_AGENT_VERSION_ID"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Rolled out: the controller saw the latest spec and every replica is updated, ready and
/// available, with no old one left (the `Progressing` condition of the previous rollout would
/// look complete right after the apply, so it is not used).
pub fn rolled_out(deployment: &Value) -> bool {
    let generation = deployment["metadata"]["generation"].as_i64().unwrap_or(0);
    let status = &deployment["status"];
    let wanted = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
    let count = |field: &str| status[field].as_i64().unwrap_or(0);
    status["observedGeneration"].as_i64().unwrap_or(0) >= generation
        && count("updatedReplicas") == wanted
        && count("readyReplicas") == wanted
        && count("availableReplicas") == wanted
        && count("replicas") == wanted
}

impl Engine {
    pub fn new(client: kube::Client, rules: Rules, gate_timeout: Duration) -> Self {
        Self {
            client,
            rules,
            gate_timeout,
            state: Arc::new(Mutex::new(State::default())),
            busy: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn status(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The version the agent ran before the last update, from the recorded ConfigMap.
    pub fn previous_version_id(&self) -> String {
        previous_version(&self.status())
    }

    fn api(&self, kind: &str) -> Option<Api<DynamicObject>> {
        let resource = resource(kind)?;
        Some(
            if kind.starts_with("Cluster") || kind.starts_with("ValidatingAdmission") {
                Api::all_with(self.client.clone(), &resource)
            } else {
                Api::namespaced_with(self.client.clone(), &self.rules.namespace, &resource)
            },
        )
    }

    async fn get(&self, kind: &str, name: &str) -> Result<Option<Value>, String> {
        let api = self
            .api(kind)
            .ok_or_else(|| format!("{kind} is no kind the updater knows"))?;
        match timed(&format!("reading {kind} {name}"), api.get(name)).await {
            Ok(object) => serde_json::to_value(object).map(Some).map_err(|e| e.to_string()),
            Err(error) if not_found(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn apply(&self, kind: &str, name: &str, body: &Value) -> Result<(), String> {
        let api = self
            .api(kind)
            .ok_or_else(|| format!("{kind} is no kind the updater knows"))?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        timed(
            &format!("applying {kind} {name}"),
            api.patch(name, &params, &Patch::Apply(body)),
        )
        .await?;
        Ok(())
    }

    async fn delete(&self, kind: &str, name: &str) -> Result<(), String> {
        let api = self
            .api(kind)
            .ok_or_else(|| format!("{kind} is no kind the updater knows"))?;
        match timed(
            &format!("deleting {kind} {name}"),
            api.delete(name, &DeleteParams::default()),
        )
        .await
        {
            Err(error) if !not_found(&error) => Err(error),
            _ => Ok(()),
        }
    }

    /// Records `state` in memory and in the state ConfigMap.
    async fn save(&self, mut state: State) -> Result<(), String> {
        state.changed_at = Some(Utc::now());
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
        let text = serde_json::to_string(&state).map_err(|e| e.to_string())?;
        let body = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": STATE_CONFIGMAP, "labels": {PART_OF: "distr-agent"}},
            "data": {"state.json": text},
        });
        self.apply("ConfigMap", STATE_CONFIGMAP, &body).await
    }

    async fn set(&self, phase: Phase, message: &str) -> Result<(), String> {
        let mut state = self.status();
        state.phase = phase;
        message.clone_into(&mut state.message);
        tracing::info!(?phase, version = %state.target_version_id, message, "self-update");
        self.save(state).await
    }

    /// Loads the state and finishes an update a previous updater left half-way.
    pub async fn resume(&self) {
        let stored = match self.get("ConfigMap", STATE_CONFIGMAP).await {
            Ok(Some(cm)) => cm["data"]["state.json"]
                .as_str()
                .and_then(|text| serde_json::from_str::<State>(text).ok()),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "cannot read the updater's state");
                None
            }
        };
        let Some(state) = stored else { return };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
        let _guard = self.busy.lock().await;
        match state.phase {
            Phase::Applying | Phase::Waiting => {
                tracing::info!(version = %state.target_version_id, "resuming an interrupted self-update");
                match manifest::check(&state.manifest, &self.rules) {
                    Ok(checked) => self.finish(checked, state.phase == Phase::Applying).await,
                    Err(refusal) => self.roll_back(&refusal.to_string()).await,
                }
            }
            Phase::RollingBack => self.roll_back(&state.message.clone()).await,
            _ => {}
        }
    }

    /// Checks `text` and applies it; returns the applied objects once they are written, and
    /// gates and finishes in the background.
    pub async fn start(&self, text: String, version: String) -> Result<Vec<Object>, StartError> {
        let guard = self
            .busy
            .clone()
            .try_lock_owned()
            .map_err(|_| StartError::Busy(self.status().target_version_id))?;
        let mut state = self.status();
        if state.failed_version_ids.contains(&version) {
            return Err(StartError::FailedBefore(version));
        }
        state.target_version_id.clone_from(&version);
        state.phase = Phase::Validating;
        state.message = "checking the manifest".into();
        state.manifest.clear();
        state.previous.clear();
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        let checked = match self.validate(&text).await {
            Ok(checked) => checked,
            Err(error) => {
                let mut state = self.status();
                state.phase = Phase::Failed;
                state.message = format!("refused, nothing applied: {error}");
                state.failed_version_ids.push(version);
                tracing::warn!(message = %state.message, "self-update refused");
                self.save(state).await.map_err(StartError::Cluster)?;
                return Err(error);
            }
        };
        // Record the intent and what the cluster has now before the first write.
        let mut previous = BTreeMap::new();
        for object in &checked.apply {
            let live = self
                .get(&object.kind, &object.name)
                .await
                .map_err(StartError::Cluster)?;
            let recorded = match live {
                None => Value::Null,
                // A Secret's data never goes into the state ConfigMap: it is left as it is on
                // a roll-back.
                Some(_) if object.kind == "Secret" => Value::String(NOT_RECORDED.into()),
                Some(live) => apply_config(live),
            };
            previous.insert(key(object), recorded);
        }
        let mut state = self.status();
        state.phase = Phase::Applying;
        state.message = format!("applying {} objects", checked.apply.len());
        state.manifest = text;
        state.previous = previous;
        self.save(state).await.map_err(StartError::Cluster)?;
        if let Err(error) = self.apply_all(&checked.apply).await {
            let engine = self.clone();
            let reason = error.clone();
            tokio::spawn(async move {
                let _guard = guard;
                engine.roll_back(&reason).await;
            });
            return Err(StartError::Cluster(error));
        }
        let applied = checked.apply.clone();
        let engine = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            engine.finish(checked, false).await;
        });
        Ok(applied)
    }

    async fn validate(&self, text: &str) -> Result<manifest::Checked, StartError> {
        let checked = manifest::check(text, &self.rules)?;
        for object in &checked.compare {
            // What the updater may not read is none of the agent's objects: a change too.
            let live = match self.get(&object.kind, &object.name).await {
                Err(error) if error.ends_with("(403)") => None,
                other => other.map_err(|e| {
                    StartError::Cluster(format!("cannot compare the manifest's RBAC with the cluster's: {e}"))
                })?,
            };
            if !live.is_some_and(|live| manifest::same_grant(&object.body, &live)) {
                return Err(Refusal::RbacChange {
                    object: object.to_string(),
                }
                .into());
            }
        }
        Ok(checked)
    }

    async fn apply_all(&self, objects: &[Object]) -> Result<(), String> {
        for object in objects {
            let mut body = object.body.clone();
            body["metadata"]["namespace"] = json!(self.rules.namespace);
            self.apply(&object.kind, &object.name, &body).await?;
        }
        Ok(())
    }

    /// Applies (again, when resuming), gates, then prunes or rolls back.
    async fn finish(&self, checked: manifest::Checked, apply_first: bool) {
        if apply_first && let Err(error) = self.apply_all(&checked.apply).await {
            return self.roll_back(&error).await;
        }
        if let Err(error) = self
            .set(Phase::Waiting, "waiting for the agent's Deployments to roll out")
            .await
        {
            tracing::warn!(%error, "cannot record the updater's state");
        }
        let deployments: Vec<String> = checked
            .apply
            .iter()
            .filter(|o| o.kind == "Deployment")
            .map(|o| o.name.clone())
            .collect();
        match self.gate(&deployments).await {
            Ok(took) => {
                self.prune(&checked.apply).await;
                let message = format!("the new version rolled out in {:.1}s", took.as_secs_f64());
                if let Err(error) = self.set(Phase::Done, &message).await {
                    tracing::warn!(%error, "cannot record the updater's state");
                }
            }
            Err(reason) => self.roll_back(&reason).await,
        }
    }

    /// Waits until every Deployment in `names` rolled out, or the gate's deadline.
    async fn gate(&self, names: &[String]) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let mut waiting = Vec::new();
            for name in names {
                match self.get("Deployment", name).await {
                    Ok(Some(deployment)) if rolled_out(&deployment) => {}
                    Ok(_) => waiting.push(name.clone()),
                    Err(error) => waiting.push(format!("{name} ({error})")),
                }
            }
            if waiting.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= self.gate_timeout {
                return Err(format!(
                    "not rolled out within {}s: {}",
                    self.gate_timeout.as_secs(),
                    waiting.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Deletes the agent's own objects the new manifest no longer has.
    async fn prune(&self, applied: &[Object]) {
        let kept: Vec<String> = applied.iter().map(key).collect();
        for (kind, name) in manifest::prunable() {
            if kept.contains(&format!("{kind}/{name}")) {
                continue;
            }
            match self.get(kind, name).await {
                Ok(Some(live)) if live["metadata"]["labels"][PART_OF] == "distr-agent" => {
                    match self.delete(kind, name).await {
                        Ok(()) => tracing::info!(kind, name, "pruned an object the new version no longer has"),
                        Err(error) => tracing::warn!(kind, name, %error, "cannot prune"),
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(kind, name, %error, "cannot check an object for pruning"),
            }
        }
    }

    /// Re-applies what the cluster had before, deletes what the update created, waits for the
    /// previous Deployments, and records the version as failed.
    async fn roll_back(&self, reason: &str) {
        let _ = self.set(Phase::RollingBack, reason).await;
        let previous = self.status().previous;
        let mut errors = Vec::new();
        let mut deployments = Vec::new();
        // Reverse order: the updater's own Deployment first, then the others, then the rest.
        for (key, live) in previous.iter().rev() {
            let Some((kind, name)) = key.split_once('/') else {
                continue;
            };
            let result = if live.as_str() == Some(NOT_RECORDED) {
                continue;
            } else if live.is_null() {
                self.delete(kind, name).await
            } else {
                if kind == "Deployment" {
                    deployments.push(name.to_owned());
                }
                self.apply(kind, name, live).await
            };
            if let Err(error) = result {
                errors.push(error);
            }
        }
        let restored = if errors.is_empty() {
            self.gate(&deployments).await.map(|_| ()).map_err(|e| vec![e])
        } else {
            Err(errors)
        };
        let mut state = self.status();
        state.phase = Phase::Failed;
        state.message = match restored {
            Ok(()) => format!("rolled back to the previous version: {reason}"),
            Err(errors) => format!("{reason}; the roll-back did not complete: {}", errors.join("; ")),
        };
        if !state.failed_version_ids.contains(&state.target_version_id) {
            state.failed_version_ids.push(state.target_version_id.clone());
        }
        tracing::warn!(version = %state.target_version_id, message = %state.message, "self-update failed");
        if let Err(error) = self.save(state).await {
            tracing::warn!(%error, "cannot record the updater's state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_is_rolled_out_only_when_the_latest_generation_runs_everywhere() {
        let done = json!({"metadata": {"generation": 3}, "spec": {"replicas": 1},
            "status": {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}});
        assert!(rolled_out(&done));
        let mut stale = done.clone();
        stale["status"]["observedGeneration"] = json!(2);
        assert!(!rolled_out(&stale), "the previous rollout's status");
        let mut not_ready = done.clone();
        not_ready["status"]["readyReplicas"] = json!(0);
        assert!(!rolled_out(&not_ready));
        let mut old_pod_left = done;
        old_pod_left["status"]["replicas"] = json!(2);
        assert!(!rolled_out(&old_pod_left));
    }

    #[test]
    fn the_previous_version_is_read_from_the_recorded_configmap() {
        let state = State {
            previous: BTreeMap::from([(
                "ConfigMap/distr-agent-env".to_owned(),
                json!({"data": {"DISTR_AGENT_VERSION_ID": "v1"}}),
            )]),
            ..Default::default()
        };
        assert_eq!(previous_version(&state), "v1");
        assert_eq!(previous_version(&State::default()), "", "no update yet");
    }

    #[test]
    fn an_apply_configuration_drops_what_the_cluster_keeps() {
        let live = json!({"metadata": {"name": "x", "uid": "u", "resourceVersion": "1", "managedFields": [],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "keep": "1"}},
            "spec": {}, "status": {"replicas": 1}});
        assert_eq!(
            apply_config(live),
            json!({"metadata": {"name": "x", "annotations": {"keep": "1"}}, "spec": {}})
        );
    }
}
