//! Applying a new agent version: check, record the intent, server-side apply, gate on the
//! rollout, then prune, or roll back to what the cluster had before.
//!
//! The state lives in the Secret `distr-agent-updater-state` (a Secret, because it records the
//! agent's Secrets as they were, to restore them on a roll-back) and is written before every
//! step, so an updater restarted half-way resumes the gate or the roll-back instead of leaving
//! a half-updated agent. The updater's own Deployment rolls out with a surge (the old pod stays
//! until the new one is ready), so two updaters can run at once: the state names the updater
//! acting on an update under way (its holder) and a heartbeat the holder renews; another
//! updater stands by while that heartbeat moves, and every write of the state is conditional on
//! the `resourceVersion` last seen, so that two writers can never both win. The install
//! manifest creates that Secret empty; the updater may change it but never create it (nor any
//! Secret), so when it is missing no update is taken.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::Deployment,
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::manifest::{self, Object, Refusal, Rules};

pub use crate::manifest::STATE_SECRET;
/// Why no update is taken when the state Secret is missing.
pub const STATE_MISSING: &str =
    "the updater's state Secret distr-agent-updater-state is missing; apply the agent's manifest again with kubectl";
/// The key of the state in the state Secret's data.
const STATE_KEY: &str = "state.json";
const FIELD_MANAGER: &str = "distr-agent-updater";
const PART_OF: &str = "app.kubernetes.io/part-of";
/// Set on every object the updater applies: only such objects are ever pruned.
pub const APPLIED_BY: &str = "agent.distr.sh/applied-by";
const APPLIED_BY_VALUE: &str = "distr-agent-updater";
const API_TIMEOUT: Duration = Duration::from_secs(15);
/// The most a Secret holds (the API server's bound on its data): the state, with the manifest
/// and the objects as they were, must fit.
pub const MAX_STATE_BYTES: usize = 1024 * 1024;
/// How many failed versions the state remembers (the oldest are forgotten first).
pub const MAX_FAILED_VERSIONS: usize = 32;
/// First pause before a roll-back that did not complete is tried again; it doubles up to
/// [`ROLLBACK_RETRY_MAX`].
const ROLLBACK_RETRY: Duration = Duration::from_secs(2);
const ROLLBACK_RETRY_MAX: Duration = Duration::from_secs(60);
/// A holder's heartbeat that has not moved for this many periods is stale: its updater is gone.
const STALE_PERIODS: u32 = 3;

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

impl Phase {
    /// An update is under way: an updater must finish it (or roll it back).
    pub fn under_way(self) -> bool {
        matches!(self, Phase::Applying | Phase::Waiting | Phase::RollingBack)
    }
}

/// What the updater did last, as kept in its state Secret. Its `Debug` leaves out the manifest
/// and the recorded objects, which hold the agent's Secrets.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
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
    /// The updater acting on the update (`<pod>/<pid>`); empty once it let go.
    pub holder: String,
    /// When the holder last said it is alive, renewed while an update is under way.
    pub heartbeat: Option<DateTime<Utc>>,
    /// Why the update under way is rolled back (kept apart from `message`, which says how
    /// the roll-back goes).
    pub rollback_reason: String,
}

impl State {
    /// Records `version` as failed, forgetting the oldest beyond [`MAX_FAILED_VERSIONS`].
    pub fn remember_failed(&mut self, version: &str) {
        if self.failed_version_ids.iter().any(|v| v == version) {
            return;
        }
        self.failed_version_ids.push(version.to_owned());
        let excess = self.failed_version_ids.len().saturating_sub(MAX_FAILED_VERSIONS);
        self.failed_version_ids.drain(..excess);
    }
}

/// The bytes `state` takes in its Secret.
fn state_size(state: &State) -> usize {
    serde_json::to_vec(state).map_or(usize::MAX, |bytes| bytes.len())
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("phase", &self.phase)
            .field("target_version_id", &self.target_version_id)
            .field("message", &self.message)
            .field("changed_at", &self.changed_at)
            .field("failed_version_ids", &self.failed_version_ids)
            .field("manifest", &format_args!("<{} bytes>", self.manifest.len()))
            .field("previous", &self.previous.keys().collect::<Vec<_>>())
            .field("holder", &self.holder)
            .field("heartbeat", &self.heartbeat)
            .field("rollback_reason", &self.rollback_reason)
            .finish()
    }
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
    /// Not this updater's turn: its state is not loaded yet, or another updater acts.
    #[error("{0}")]
    NotReady(String),
}

/// Whether this updater may act.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The state is not read yet.
    Loading,
    /// Another updater (named) acts on an update under way and is alive.
    Standby(String),
    /// This updater acts.
    Active,
    /// Another updater wrote the state after this one (or this one let go): it acts no more
    /// until it has read the state again.
    Lost,
}

/// Runs updates, one at a time.
#[derive(Clone)]
pub struct Engine {
    client: kube::Client,
    rules: Rules,
    gate_timeout: Duration,
    heartbeat: Duration,
    /// First and longest pause between the attempts of a roll-back.
    rollback_retry: (Duration, Duration),
    identity: String,
    state: Arc<Mutex<State>>,
    mode: Arc<Mutex<Mode>>,
    /// The state Secret's `resourceVersion` as last read or written (None: it is missing).
    resource_version: Arc<Mutex<Option<String>>>,
    busy: Arc<tokio::sync::Mutex<()>>,
    /// Serializes the writes of the state (steps and heartbeats).
    writes: Arc<tokio::sync::Mutex<()>>,
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

/// What kind of JSON error, without the input it quotes.
fn classify(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not a state",
        serde_json::error::Category::Eof => "cut short",
    }
}

fn not_found(error: &str) -> bool {
    error.ends_with("(404)")
}

fn conflict(error: &str) -> bool {
    error.ends_with("(409)")
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

/// The object as the updater applies it: in the agent's namespace, labelled as applied by the
/// updater (what makes it prunable later).
fn labelled(object: &Object, namespace: &str) -> Value {
    let mut body = object.body.clone();
    body["metadata"]["namespace"] = json!(namespace);
    if !body["metadata"]["labels"].is_object() {
        body["metadata"]["labels"] = json!({});
    }
    body["metadata"]["labels"][APPLIED_BY] = json!(APPLIED_BY_VALUE);
    body
}

fn previous_version(state: &State) -> String {
    state
        .previous
        .get("ConfigMap/distr-agent-env")
        .and_then(|config| config["data"]["DISTR_AGENT_VERSION_ID"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The recorded objects in the order a roll-back re-applies them: the apply order
/// (dependencies first, the Deployments executor, poller, then the updater's own last).
pub fn rollback_order(previous: &BTreeMap<String, Value>) -> Vec<(&str, &str, &Value)> {
    let mut entries: Vec<(&str, &str, &Value)> = previous
        .iter()
        .filter_map(|(key, live)| key.split_once('/').map(|(kind, name)| (kind, name, live)))
        .collect();
    entries.sort_by_key(|(kind, name, _)| manifest::position(kind, name));
    entries
}

/// Rolled out: the controller saw the latest spec and every replica is updated, ready and
/// available, with no old one left: kstatus's rule, the one the executor's health uses
/// ([`agent_kstatus::deployment`]).
pub fn rolled_out(deployment: &Value) -> bool {
    agent_kstatus::deployment_value(deployment).is_ok()
}

/// This process's identity as a holder: its pod (host) name and process id.
pub fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "updater".into());
    format!("{host}/{}", std::process::id())
}

/// Watches another holder's heartbeat on this process's own clock (no clock is shared with the
/// other pod): stale once it has not moved for [`STALE_PERIODS`] periods.
#[derive(Default)]
struct Watch {
    seen: Option<(String, Option<DateTime<Utc>>, Instant)>,
}

impl Watch {
    fn stale(&mut self, state: &State, period: Duration) -> bool {
        let now = (state.holder.clone(), state.heartbeat);
        match &self.seen {
            Some((holder, beat, since)) if (holder, beat) == (&now.0, &now.1) => {
                since.elapsed() >= period * STALE_PERIODS
            }
            _ => {
                self.seen = Some((now.0, now.1, Instant::now()));
                false
            }
        }
    }
}

impl Engine {
    pub fn new(client: kube::Client, rules: Rules, gate_timeout: Duration, heartbeat: Duration) -> Self {
        Self {
            client,
            rules,
            gate_timeout,
            heartbeat,
            rollback_retry: (ROLLBACK_RETRY, ROLLBACK_RETRY_MAX),
            identity: identity(),
            state: Arc::new(Mutex::new(State::default())),
            mode: Arc::new(Mutex::new(Mode::Loading)),
            resource_version: Arc::new(Mutex::new(None)),
            busy: Arc::new(tokio::sync::Mutex::new(())),
            writes: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The first and longest pause between the attempts of a roll-back that did not complete.
    pub fn with_rollback_retry(mut self, first: Duration, longest: Duration) -> Self {
        self.rollback_retry = (first, longest.max(first));
        self
    }

    pub fn status(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_memory(&self, state: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    pub fn mode(&self) -> Mode {
        self.mode.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    fn acting(&self) -> bool {
        self.mode() == Mode::Active
    }

    /// The version the agent ran before the last update, from the recorded ConfigMap
    /// `distr-agent-env`.
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

    /// Reads the state Secret: the state (default when there is none, or no Secret) and its
    /// `resourceVersion` (None: the Secret is missing).
    async fn read_state(&self) -> Result<(State, Option<String>), String> {
        let Some(live) = self.get("Secret", STATE_SECRET).await? else {
            return Ok((State::default(), None));
        };
        // The error names no content: the Secret holds the agent's Secrets.
        let secret: Secret = serde_json::from_value(live)
            .map_err(|_| "the updater's state Secret cannot be read as a Secret".to_owned())?;
        let version = secret.metadata.resource_version;
        let state = match secret.data.as_ref().and_then(|data| data.get(STATE_KEY)) {
            None => State::default(),
            Some(bytes) => serde_json::from_slice::<State>(&bytes.0).map_err(|error| {
                format!(
                    "the updater's state Secret holds no state ({} at line {} column {})",
                    classify(&error),
                    error.line(),
                    error.column()
                )
            })?,
        };
        Ok((state, version))
    }

    /// Writes `state` as it is, conditional on the `resourceVersion` last seen. The caller
    /// holds `writes`. A conflict means another updater wrote since: this one acts no more.
    async fn write_locked(&self, state: &State) -> Result<(), String> {
        if !self.acting() {
            return Err("another updater acts on the update; this one no longer writes".into());
        }
        // Never created here: without a `resourceVersion` (the Secret was missing when last
        // read) a server-side apply would create it.
        let Some(version) = self.resource_version.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err(STATE_MISSING.into());
        };
        let text = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        let data = serde_json::to_value(ByteString(text)).map_err(|e| e.to_string())?;
        let body = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": STATE_SECRET, "namespace": self.rules.namespace, "labels": {PART_OF: "distr-agent"},
                // Server-side apply takes a `resourceVersion` as a precondition.
                "resourceVersion": version,
            },
            "data": {STATE_KEY: data},
        });
        let api = self.api("Secret").ok_or("no Secret API")?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let written = timed(
            "recording the updater's state",
            api.patch(STATE_SECRET, &params, &Patch::Apply(&body)),
        )
        .await;
        match written {
            Ok(object) => {
                *self.resource_version.lock().unwrap_or_else(|e| e.into_inner()) = object.metadata.resource_version;
                Ok(())
            }
            Err(error) if not_found(&error) => {
                *self.resource_version.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Err(STATE_MISSING.into())
            }
            Err(error) if conflict(&error) => {
                tracing::warn!(%error, "another updater wrote the state since this one read it; this one stops acting");
                self.set_mode(Mode::Lost);
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Records `state`, as changed now by this updater, in memory and in the state Secret.
    async fn save(&self, mut state: State) -> Result<(), String> {
        let _writing = self.writes.lock().await;
        if !self.acting() {
            return Err("another updater acts on the update; this one no longer writes".into());
        }
        let now = Utc::now();
        state.changed_at = Some(now);
        state.holder.clone_from(&self.identity);
        state.heartbeat = Some(now);
        self.set_memory(state.clone());
        self.write_locked(&state).await
    }

    async fn set(&self, phase: Phase, message: &str) -> Result<(), String> {
        let mut state = self.status();
        state.phase = phase;
        message.clone_into(&mut state.message);
        tracing::info!(?phase, version = %state.target_version_id, detail = message, "self-update");
        self.save(state).await
    }

    /// Renews the heartbeat of the update under way, if this updater acts on one.
    async fn renew(&self) -> Result<(), String> {
        let _writing = self.writes.lock().await;
        let mut state = self.status();
        if !self.acting() || !state.phase.under_way() {
            return Ok(());
        }
        state.holder.clone_from(&self.identity);
        state.heartbeat = Some(Utc::now());
        self.set_memory(state.clone());
        self.write_locked(&state).await
    }

    /// On shutdown: lets go of the update under way, so that the next updater takes it over
    /// at once instead of waiting for the heartbeat to go stale.
    pub async fn release(&self) {
        let _writing = self.writes.lock().await;
        let mut state = self.status();
        if !self.acting() || !state.phase.under_way() {
            return;
        }
        state.holder.clear();
        state.heartbeat = None;
        match self.write_locked(&state).await {
            Ok(()) => {
                tracing::info!(version = %state.target_version_id, "let go of the update under way for the next updater")
            }
            Err(error) => tracing::warn!(%error, "cannot let go of the update under way"),
        }
        self.set_mode(Mode::Lost);
    }

    /// Loads the state (readiness waits for it), stands by while another live updater acts on
    /// an update, takes over an update whose holder is gone, and renews the heartbeat while an
    /// update is under way. Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken, loaded: impl FnOnce()) {
        let mut loaded = Some(loaded);
        let mut watch = Watch::default();
        let mut standing_by = false;
        while !shutdown.is_cancelled() {
            match self.mode() {
                Mode::Loading | Mode::Lost | Mode::Standby(_) => match self.read_state().await {
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the updater's state; no update is taken until it is read")
                    }
                    Ok((state, version)) => {
                        *self.resource_version.lock().unwrap_or_else(|e| e.into_inner()) = version;
                        if let Some(loaded) = loaded.take() {
                            loaded();
                        }
                        let other = !state.holder.is_empty() && state.holder != self.identity;
                        if state.phase.under_way() && other && !watch.stale(&state, self.heartbeat) {
                            if !standing_by {
                                tracing::info!(holder = %state.holder, version = %state.target_version_id, "another updater acts on the update under way; standing by while its heartbeat moves");
                                standing_by = true;
                            }
                            self.set_mode(Mode::Standby(state.holder.clone()));
                            self.set_memory(state);
                        } else {
                            standing_by = false;
                            watch = Watch::default();
                            self.set_memory(state.clone());
                            let _writing = self.writes.lock().await;
                            self.set_mode(Mode::Active);
                            drop(_writing);
                            if state.phase.under_way() {
                                self.take_over(state).await;
                            }
                        }
                    }
                },
                Mode::Active => {
                    if let Err(error) = self.renew().await {
                        tracing::warn!(%error, "cannot renew the updater's heartbeat");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.heartbeat) => {}
            }
        }
    }

    /// Finishes (or rolls back) an update another updater (or this one, before a restart) left
    /// under way, in the background.
    async fn take_over(&self, state: State) {
        let guard = self.busy.clone().lock_owned().await;
        if let Err(error) = self.save(state.clone()).await {
            tracing::warn!(%error, "cannot take over the update under way");
            return;
        }
        tracing::info!(version = %state.target_version_id, previous_holder = %state.holder, "resuming an interrupted self-update");
        let engine = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match state.phase {
                Phase::Applying | Phase::Waiting => match manifest::check(&state.manifest, &engine.rules) {
                    Ok(checked) => engine.finish(checked, state.phase == Phase::Applying).await,
                    Err(refusal) => engine.roll_back(&refusal.to_string()).await,
                },
                Phase::RollingBack => {
                    let reason = if state.rollback_reason.is_empty() {
                        &state.message
                    } else {
                        &state.rollback_reason
                    };
                    engine.roll_back(reason).await
                }
                _ => {}
            }
        });
    }

    /// Ends an attempt that wrote nothing: `Failed` without recording the version as failed,
    /// so that the poller hands it over again on a later cycle.
    async fn abandon(&self, error: &str) -> StartError {
        let mut state = self.status();
        state.phase = Phase::Failed;
        state.message = format!("nothing applied: {error}; the version is tried again on a later cycle");
        tracing::warn!(version = %state.target_version_id, detail = %state.message, "self-update not started");
        if let Err(error) = self.save(state.clone()).await {
            tracing::warn!(%error, "cannot record the updater's state");
            // Whatever the write did, this updater's answer is Failed.
            self.set_memory(state);
        }
        StartError::Cluster(error.to_owned())
    }

    /// Ends an attempt the manifest's content refused: `Failed`, and the version is recorded as
    /// failed (not handed over again until the Hub names another one).
    async fn refuse(&self, error: StartError, version: String) -> StartError {
        let mut state = self.status();
        state.phase = Phase::Failed;
        state.message = format!("refused, nothing applied: {error}");
        state.remember_failed(&version);
        tracing::warn!(version = %version, detail = %state.message, "self-update refused");
        if let Err(save) = self.save(state.clone()).await {
            tracing::warn!(error = %save, "cannot record the updater's state");
            self.set_memory(state);
        }
        error
    }

    /// A server-side apply dry run of every object: an answer of the API server about the
    /// object (4xx but a conflict or throttling) is a refusal; anything else is transient.
    async fn dry_run(&self, objects: &[Object]) -> Result<(), StartError> {
        for object in objects {
            let api = self
                .api(&object.kind)
                .ok_or_else(|| StartError::Cluster(format!("{} is no kind the updater knows", object.kind)))?;
            let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
            let body = labelled(object, &self.rules.namespace);
            let patch = Patch::Apply(&body);
            let call = api.patch(&object.name, &params, &patch);
            match tokio::time::timeout(API_TIMEOUT, call).await {
                Ok(Ok(_)) => {}
                Ok(Err(kube::Error::Api(status)))
                    if (400..500).contains(&status.code) && ![408, 409, 429].contains(&status.code) =>
                {
                    return Err(Refusal::DryRun {
                        object: object.to_string(),
                        reason: format!("{} ({})", status.message, status.code),
                    }
                    .into());
                }
                Ok(Err(error)) => return Err(StartError::Cluster(format!("dry run of {object}: {error}"))),
                Err(_) => {
                    return Err(StartError::Cluster(format!(
                        "dry run of {object}: no answer within {API_TIMEOUT:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks `text` and applies it; returns the applied objects once they are written, and
    /// gates and finishes in the background.
    ///
    /// The work runs in a task of its own that holds the `busy` guard until the update ends:
    /// the caller (an RPC whose client may give up) may stop waiting at any point, and the
    /// update still goes on to its gate and its end (or its roll-back).
    pub async fn start(&self, text: String, version: String) -> Result<Vec<Object>, StartError> {
        match self.mode() {
            Mode::Active => {}
            Mode::Loading => return Err(StartError::NotReady("the updater has not read its state yet".into())),
            Mode::Standby(holder) => {
                return Err(StartError::NotReady(format!(
                    "another updater ({holder}) acts on the update to version {}; this one waits until it ends or that updater is gone",
                    self.status().target_version_id
                )));
            }
            Mode::Lost => return Err(StartError::NotReady("the updater is re-reading its state".into())),
        }
        let guard = self
            .busy
            .clone()
            .try_lock_owned()
            .map_err(|_| StartError::Busy(self.status().target_version_id))?;
        let (answer, answered) = tokio::sync::oneshot::channel();
        let engine = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            engine.update(text, version, answer).await;
        });
        answered
            .await
            .unwrap_or_else(|_| Err(StartError::Cluster("the update ended without an answer".into())))
    }

    /// The whole of one update: check, record the intent, apply (answering `answer` once the
    /// objects are written or the attempt ended), then gate and finish or roll back.
    async fn update(
        &self,
        text: String,
        version: String,
        answer: tokio::sync::oneshot::Sender<Result<Vec<Object>, StartError>>,
    ) {
        let checked = match self.begin(text, version).await {
            Ok(checked) => checked,
            Err(error) => {
                let _ = answer.send(Err(error));
                return;
            }
        };
        match self.apply_all(&checked.apply).await {
            Err(error) => {
                let _ = answer.send(Err(StartError::Cluster(error.clone())));
                self.roll_back(&error).await;
            }
            Ok(()) => {
                let _ = answer.send(Ok(checked.apply.clone()));
                self.finish(checked, false).await;
            }
        }
    }

    /// Everything before the first write: the state Secret exists, the version may be tried,
    /// the manifest passes the checks and the API server's dry run, and the intent (with the
    /// objects as they are now) is recorded.
    async fn begin(&self, text: String, version: String) -> Result<manifest::Checked, StartError> {
        if let Err(error) = self.state_secret_exists().await {
            let mut state = self.status();
            state.target_version_id.clone_from(&version);
            self.set_memory(state);
            return Err(self.abandon(&error).await);
        }
        let mut state = self.status();
        if state.phase.under_way() {
            return Err(StartError::Busy(state.target_version_id));
        }
        if state.failed_version_ids.contains(&version) {
            return Err(StartError::FailedBefore(version));
        }
        state.target_version_id.clone_from(&version);
        state.phase = Phase::Validating;
        state.message = "checking the manifest".into();
        state.manifest.clear();
        state.previous.clear();
        state.rollback_reason.clear();
        self.set_memory(state);
        let checked = match self.validate(&text).await {
            Ok(checked) => checked,
            Err(StartError::Cluster(error)) => return Err(self.abandon(&error).await),
            Err(error) => return Err(self.refuse(error, version).await),
        };
        // The API server checks every object first (an immutable field changed, an invalid
        // value): a refusal of any is a refusal of the whole manifest, nothing applied.
        match self.dry_run(&checked.apply).await {
            Ok(()) => {}
            Err(StartError::Cluster(error)) => return Err(self.abandon(&error).await),
            Err(error) => return Err(self.refuse(error, version).await),
        }
        // Record the intent and what the cluster has now before the first write.
        let mut previous = BTreeMap::new();
        for object in &checked.apply {
            let live = match self.get(&object.kind, &object.name).await {
                Ok(live) => live,
                Err(error) => return Err(self.abandon(&error).await),
            };
            // A Secret is recorded with its data (the state is a Secret too), so that a
            // roll-back restores it; neither is ever logged.
            previous.insert(key(object), live.map_or(Value::Null, apply_config));
        }
        let mut state = self.status();
        state.phase = Phase::Applying;
        state.message = format!("applying {} objects", checked.apply.len());
        state.manifest = text;
        state.previous = previous;
        let size = state_size(&state);
        if size > MAX_STATE_BYTES {
            let refusal = Refusal::TooLargeToRecord {
                bytes: size,
                limit: MAX_STATE_BYTES,
            };
            return Err(self.refuse(refusal.into(), version).await);
        }
        if let Err(error) = self.save(state).await {
            if !self.acting() {
                return Err(StartError::NotReady(error));
            }
            return Err(self.abandon(&error).await);
        }
        Ok(checked)
    }

    /// The state Secret exists: known from the last read or write, or read again now (the
    /// manifest may have been applied again since). Called with `busy` held, before anything
    /// else of an update.
    async fn state_secret_exists(&self) -> Result<(), String> {
        if self
            .resource_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let _writing = self.writes.lock().await;
        let (state, version) = self.read_state().await?;
        let Some(version) = version else {
            return Err(STATE_MISSING.into());
        };
        // Created since (empty, by the manifest): its state is taken as this updater's.
        tracing::info!("the updater's state Secret exists now");
        *self.resource_version.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
        self.set_memory(state);
        Ok(())
    }

    /// Checks the manifest, and its RBAC against the cluster's: a difference is a refusal; an
    /// error reading the cluster is not (`Cluster`: tried again later).
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
            if !self.acting() {
                return Err("another updater took over the update".into());
            }
            let body = labelled(object, &self.rules.namespace);
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
        let gated = self.gate(&deployments).await;
        if !self.acting() {
            return tracing::info!("another updater took over the update; this one stops");
        }
        match gated {
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

    /// Waits until every Deployment in `names` rolled out, or the gate's deadline (or until
    /// this updater no longer acts).
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
            if !self.acting() {
                return Err("another updater took over the update".into());
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

    /// Deletes the agent's own objects the new manifest no longer has, of those the updater
    /// applied itself (labelled [`APPLIED_BY`]).
    async fn prune(&self, applied: &[Object]) {
        let kept: Vec<String> = applied.iter().map(key).collect();
        for (kind, name) in manifest::prunable() {
            if kept.contains(&format!("{kind}/{name}")) {
                continue;
            }
            match self.get(kind, name).await {
                Ok(Some(live)) if live["metadata"]["labels"][APPLIED_BY] == APPLIED_BY_VALUE => {
                    match self.delete(kind, name).await {
                        Ok(()) => tracing::info!(kind, name, "pruned an object the new version no longer has"),
                        Err(error) => tracing::warn!(kind, name, %error, "cannot prune"),
                    }
                }
                Ok(Some(_)) => {
                    tracing::info!(
                        kind,
                        name,
                        "kept an object the new version no longer has: the updater did not apply it"
                    )
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(kind, name, %error, "cannot check an object for pruning"),
            }
        }
    }

    /// Rolls back to what the cluster had before, trying again with a growing pause until
    /// every recorded object is restored and the previous Deployments rolled out; says so in
    /// the state and the logs while it retries. Only then is the version recorded as failed.
    async fn roll_back(&self, reason: &str) {
        if !self.acting() {
            return;
        }
        let mut state = self.status();
        state.phase = Phase::RollingBack;
        reason.clone_into(&mut state.message);
        reason.clone_into(&mut state.rollback_reason);
        tracing::warn!(version = %state.target_version_id, reason, "self-update: rolling back");
        if let Err(error) = self.save(state).await {
            tracing::warn!(%error, "cannot record the updater's state");
        }
        let previous = self.status().previous;
        let mut pause = self.rollback_retry.0;
        let mut attempt = 1u32;
        loop {
            if !self.acting() {
                return;
            }
            let problems = match self.restore(&previous).await {
                Ok(()) => break,
                Err(problems) => problems,
            };
            if !self.acting() {
                return;
            }
            let message = format!(
                "{reason}; the roll-back did not complete (attempt {attempt}), trying again in {}s: {}",
                pause.as_secs_f64(),
                problems.join("; ")
            );
            tracing::warn!(detail = %message, "self-update: the roll-back did not complete; trying again");
            let mut state = self.status();
            state.message = message;
            if let Err(error) = self.save(state).await {
                tracing::warn!(%error, "cannot record the updater's state");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(self.rollback_retry.1);
            attempt += 1;
        }
        let mut state = self.status();
        state.phase = Phase::Failed;
        state.message = format!("rolled back to the previous version: {reason}");
        state.rollback_reason.clear();
        let version = state.target_version_id.clone();
        state.remember_failed(&version);
        tracing::warn!(%version, detail = %state.message, "self-update failed");
        if let Err(error) = self.save(state.clone()).await {
            tracing::warn!(%error, "cannot record the updater's state");
            self.set_memory(state);
        }
    }

    /// One pass of a roll-back: re-applies what the cluster had before (in the apply order),
    /// deletes what the update created (where the updater may delete: Services and
    /// NetworkPolicies; anything else it created is left, and said so), and waits for the
    /// previous Deployments. What went wrong, when anything did.
    async fn restore(&self, previous: &BTreeMap<String, Value>) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut deployments = Vec::new();
        for (kind, name, live) in rollback_order(previous) {
            if !self.acting() {
                return Err(vec!["another updater took over the update".into()]);
            }
            let result = if live.is_null() {
                if !manifest::deletable(kind) {
                    tracing::info!(
                        kind,
                        name,
                        "left in place: the update created it, and the updater may not delete this kind"
                    );
                    continue;
                }
                self.delete(kind, name).await
            } else {
                if kind == "Deployment" {
                    deployments.push(name.to_owned());
                }
                match manifest::recheck(kind, name, live, &self.rules) {
                    Ok(()) => self.apply(kind, name, live).await,
                    Err(refused) => Err(refused),
                }
            };
            if let Err(error) = result {
                errors.push(error);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        self.gate(&deployments).await.map(|_| ()).map_err(|e| vec![e])
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

    /// A Kubernetes API answering from `answer(method, path, dry_run)`; every request is
    /// recorded. What the updater's Role (`deploy/manifest.yaml.tmpl`) does not allow is
    /// refused with 403 before `answer` is asked, as the real API server would.
    struct FakeApi {
        client: kube::Client,
        requests: Arc<Mutex<Vec<(String, String, Value)>>>,
    }

    type Answer = dyn Fn(&str, &str, bool) -> (u16, Value) + Send + Sync;
    type Delay = dyn Fn(&str, &str, bool) -> Duration + Send + Sync;

    /// Whether the updater's Role and ClusterRole allow `method` on `path`.
    fn role_allows(method: &str, path: &str) -> bool {
        let verb = match method {
            "GET" => "get",
            "PATCH" => "patch",
            "PUT" => "update",
            "DELETE" => "delete",
            "POST" => "create",
            _ => return false,
        };
        let mut segments = path.rsplit('/');
        let (Some(name), Some(resource)) = (segments.next(), segments.next()) else {
            return false;
        };
        let (names, verbs): (&[&str], &[&str]) = match resource {
            "deployments" => (
                &["distr-agent", "distr-agent-executor", "distr-agent-updater"],
                &["get", "patch", "update"],
            ),
            "configmaps" => (&["distr-agent-env"], &["get", "patch", "update"]),
            "services" => (
                &["distr-agent-executor", "distr-agent-updater"],
                &["get", "patch", "update", "delete"],
            ),
            "serviceaccounts" => (
                &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
                &["get", "patch", "update"],
            ),
            "networkpolicies" => (
                &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
                &["get", "patch", "update", "delete"],
            ),
            "secrets" if name == STATE_SECRET => (&[STATE_SECRET], &["get", "patch", "update"]),
            "secrets" => (&["distr-agent-image-pull"], &["get", "patch"]),
            "roles" | "rolebindings" | "clusterroles" | "clusterrolebindings" => (&[name], &["get"]),
            "validatingadmissionpolicies" | "validatingadmissionpolicybindings" => (&[name], &["get"]),
            _ => return false,
        };
        names.contains(&name) && verbs.contains(&verb)
    }

    fn fake_api(answer: impl Fn(&str, &str, bool) -> (u16, Value) + Send + Sync + 'static) -> FakeApi {
        fake_api_delayed(answer, |_, _, _| Duration::ZERO)
    }

    /// The same, each answer given after `delay(method, path, dry_run)`.
    fn fake_api_delayed(
        answer: impl Fn(&str, &str, bool) -> (u16, Value) + Send + Sync + 'static,
        delay: impl Fn(&str, &str, bool) -> Duration + Send + Sync + 'static,
    ) -> FakeApi {
        let answer: Arc<Answer> = Arc::new(answer);
        let delay: Arc<Delay> = Arc::new(delay);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (answer, delay) = (answer.clone(), delay.clone());
            let recorded = recorded.clone();
            async move {
                let method = request.method().to_string();
                let path = request.uri().path().to_owned();
                let dry_run = request.uri().query().unwrap_or_default().contains("dryRun=All");
                let body = request.into_body().collect_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                recorded.lock().unwrap_or_else(|e| e.into_inner()).push((
                    method.clone(),
                    if dry_run {
                        format!("{path} (dry run)")
                    } else {
                        path.clone()
                    },
                    body,
                ));
                tokio::time::sleep(delay(&method, &path, dry_run)).await;
                let (code, answer) = if role_allows(&method, &path) {
                    answer(&method, &path, dry_run)
                } else {
                    status(403)
                };
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(
                            serde_json::to_vec(&answer).unwrap_or_default(),
                        ))
                        .expect("a response"),
                )
            }
        });
        FakeApi {
            client: kube::Client::new(service, "agent"),
            requests,
        }
    }

    fn status(code: u16) -> (u16, Value) {
        let reason = match code {
            404 => "NotFound",
            403 => "Forbidden",
            409 => "Conflict",
            _ => "InternalError",
        };
        (
            code,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "from the fake", "reason": reason, "code": code}),
        )
    }

    fn dry_run_answer() -> (u16, Value) {
        (
            200,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "distr-agent"}}),
        )
    }

    fn engine_on(api: &FakeApi) -> Engine {
        Engine::new(
            api.client.clone(),
            Rules {
                namespace: "agent".into(),
                image_repository: "ghcr.io/distr-sh/distr-agent".into(),
            },
            Duration::from_secs(1),
            Duration::from_millis(100),
        )
        .with_rollback_retry(Duration::from_millis(50), Duration::from_millis(200))
    }

    /// The poller's Deployment as the cluster has it, running `image`: rolled out when
    /// `rolled_out`.
    /// The poller's Deployment as the cluster has it: the template's shape (so that a
    /// roll-back's re-check passes), running `image`.
    fn poller_deployment(image: &str, rolled_out: bool) -> (u16, Value) {
        let ready = i64::from(rolled_out);
        let mut body: Value =
            serde_yaml::from_str(include_str!("../testdata/poller-deployment.yaml")).expect("the fixture is YAML");
        body["metadata"]["namespace"] = json!("agent");
        body["metadata"]["generation"] = json!(2);
        body["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
        body["status"] = json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
            "readyReplicas": ready, "availableReplicas": ready});
        (200, body)
    }

    /// Waits until the engine's phase is `phase`.
    async fn wait_phase(engine: &Engine, phase: Phase) -> State {
        for _ in 0..200 {
            let state = engine.status();
            if state.phase == phase {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("phase {phase:?} not reached: {:?}", engine.status());
    }

    /// Every state the updater wrote to its Secret, in order.
    fn written_states(api: &FakeApi) -> Vec<State> {
        api.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(method, path, _)| method == "PATCH" && path.ends_with(STATE_SECRET))
            .filter_map(|(_, _, body)| written_state(body))
            .collect()
    }

    const MANIFEST: &str = include_str!("../testdata/poller-deployment.yaml");

    fn state_secret(state: &State) -> (u16, Value) {
        let data = serde_json::to_value(ByteString(serde_json::to_vec(state).unwrap_or_default())).unwrap_or_default();
        (
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": STATE_SECRET, "namespace": "agent", "resourceVersion": "7"},
                "data": {"state.json": data}}),
        )
    }

    /// The answer to a write of the state Secret.
    fn written_answer() -> (u16, Value) {
        (
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": STATE_SECRET, "resourceVersion": "8"}}),
        )
    }

    /// The state a write of the state Secret carries.
    fn written_state(body: &Value) -> Option<State> {
        let bytes: ByteString = serde_json::from_value(body["data"]["state.json"].clone()).ok()?;
        serde_json::from_slice(&bytes.0).ok()
    }

    async fn active(engine: &Engine) -> CancellationToken {
        let shutdown = CancellationToken::new();
        tokio::spawn(engine.clone().run(shutdown.clone(), || {}));
        for _ in 0..100 {
            if engine.mode() == Mode::Active {
                return shutdown;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("not active: {:?}", engine.mode());
    }

    #[tokio::test]
    async fn no_update_is_taken_before_the_state_is_loaded_and_the_loaded_state_is_kept() {
        let stored = State {
            phase: Phase::Failed,
            target_version_id: "v9".into(),
            failed_version_ids: vec!["v9".into()],
            ..Default::default()
        };
        let api = fake_api(move |method, path, _| match (method, path.ends_with(STATE_SECRET)) {
            ("GET", true) => state_secret(&stored),
            _ => status(500),
        });
        let engine = engine_on(&api);
        let early = engine.start(MANIFEST.into(), "v10".into()).await;
        assert!(matches!(early, Err(StartError::NotReady(_))), "{early:?}");
        let shutdown = active(&engine).await;
        let again = engine.start(MANIFEST.into(), "v9".into()).await;
        assert!(matches!(again, Err(StartError::FailedBefore(_))), "{again:?}");
        assert_eq!(engine.status().failed_version_ids, ["v9"]);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_attempt_that_cannot_read_or_record_ends_failed_and_is_tried_again() {
        // The read before the first write fails.
        let api = fake_api(|method, path, dry_run| match (method, path.ends_with(STATE_SECRET)) {
            _ if dry_run => dry_run_answer(),
            ("GET", true) => state_secret(&State::default()),
            ("PATCH", true) => written_answer(),
            _ => status(500),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let started = engine.start(MANIFEST.into(), "v2".into()).await;
        assert!(matches!(started, Err(StartError::Cluster(_))), "{started:?}");
        let state = engine.status();
        assert_eq!(state.phase, Phase::Failed, "{state:?}");
        assert!(state.message.contains("tried again"), "{}", state.message);
        assert!(
            state.failed_version_ids.is_empty(),
            "a transient error blacklists nothing"
        );
        shutdown.cancel();

        // The state cannot be recorded before the first write.
        let api = fake_api(|method, path, dry_run| match method {
            _ if dry_run => dry_run_answer(),
            "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
            "GET" => status(404),
            _ => status(500),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let started = engine.start(MANIFEST.into(), "v2".into()).await;
        assert!(matches!(started, Err(StartError::Cluster(_))), "{started:?}");
        assert_eq!(engine.status().phase, Phase::Failed);
        assert!(engine.status().failed_version_ids.is_empty());
        let writes: Vec<String> = api
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(method, path, _)| {
                method == "PATCH" && !path.ends_with(STATE_SECRET) && !path.ends_with("(dry run)")
            })
            .map(|(_, path, _)| path.clone())
            .collect();
        assert!(writes.is_empty(), "nothing applied: {writes:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_transient_error_comparing_rbac_is_no_refusal() {
        let manifest = format!(
            "{MANIFEST}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: distr-agent\nrules: []\n"
        );
        let api = fake_api(|method, path, _| match (method, path.ends_with(STATE_SECRET)) {
            ("GET", true) => state_secret(&State::default()),
            ("PATCH", true) => written_answer(),
            _ => status(503),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let started = engine.start(manifest, "v2".into()).await;
        assert!(matches!(started, Err(StartError::Cluster(_))), "{started:?}");
        let state = engine.status();
        assert_eq!(state.phase, Phase::Failed);
        assert!(state.failed_version_ids.is_empty(), "not blacklisted: {state:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn another_live_updater_is_left_alone_until_its_heartbeat_stops() {
        let holder = Arc::new(Mutex::new(State {
            phase: Phase::Waiting,
            target_version_id: "v2".into(),
            holder: "other-pod/1".into(),
            heartbeat: Some(Utc::now()),
            manifest: MANIFEST.into(),
            ..Default::default()
        }));
        let stored = holder.clone();
        let api = fake_api(move |method, path, _| match (method, path.ends_with(STATE_SECRET)) {
            ("GET", true) => state_secret(&stored.lock().unwrap_or_else(|e| e.into_inner())),
            ("PATCH", true) => written_answer(),
            _ => status(404),
        });
        let engine = engine_on(&api);
        let shutdown = CancellationToken::new();
        tokio::spawn(engine.clone().run(shutdown.clone(), || {}));
        // The other updater renews its heartbeat: this one stands by and takes nothing.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            holder.lock().unwrap_or_else(|e| e.into_inner()).heartbeat = Some(Utc::now());
            assert_eq!(engine.mode(), Mode::Standby("other-pod/1".into()));
        }
        let refused = engine.start(MANIFEST.into(), "v3".into()).await;
        assert!(matches!(refused, Err(StartError::NotReady(_))), "{refused:?}");
        let written = |api: &FakeApi| {
            api.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(method, _, _)| method != "GET")
                .count()
        };
        assert_eq!(written(&api), 0, "a standby writes nothing");
        // The heartbeat stops: after three periods this one takes the update over.
        for _ in 0..20 {
            if engine.mode() == Mode::Active {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(engine.mode(), Mode::Active);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let requests = api.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let takeover = requests
            .iter()
            .find(|(method, _, _)| method == "PATCH")
            .expect("the take-over is written");
        let state = written_state(&takeover.2).expect("a state");
        assert_eq!(state.holder, engine.identity);
        assert_eq!(
            takeover.2["metadata"]["resourceVersion"], "7",
            "conditional on the version read"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_conflicting_write_stops_the_updater_from_acting() {
        let api = fake_api(|method, path, dry_run| match (method, path.ends_with(STATE_SECRET)) {
            _ if dry_run => dry_run_answer(),
            ("GET", true) => state_secret(&State::default()),
            ("PATCH", true) => status(409),
            _ => status(404),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let started = engine.start(MANIFEST.into(), "v2".into()).await;
        assert!(matches!(started, Err(StartError::NotReady(_))), "{started:?}");
        assert_eq!(engine.mode(), Mode::Lost);
        let applied = api
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(method, path, _)| method == "PATCH" && path.contains("deployments") && !path.ends_with("(dry run)"));
        assert!(!applied, "nothing applied after losing the state");
        shutdown.cancel();
    }

    #[test]
    fn a_roll_back_re_applies_in_the_apply_order() {
        let previous: BTreeMap<String, Value> = [
            "Deployment/distr-agent",
            "Deployment/distr-agent-executor",
            "Deployment/distr-agent-updater",
            "ConfigMap/distr-agent-env",
            "NetworkPolicy/distr-agent-poller",
            "Secret/distr-agent-image-pull",
            "Service/distr-agent-executor",
            "ServiceAccount/distr-agent-poller",
        ]
        .into_iter()
        .map(|key| (key.to_owned(), Value::Null))
        .collect();
        let order: Vec<String> = rollback_order(&previous)
            .into_iter()
            .map(|(kind, name, _)| format!("{kind}/{name}"))
            .collect();
        assert_eq!(
            order,
            [
                "ServiceAccount/distr-agent-poller",
                "ConfigMap/distr-agent-env",
                "Secret/distr-agent-image-pull",
                "Service/distr-agent-executor",
                "NetworkPolicy/distr-agent-poller",
                "Deployment/distr-agent-executor",
                "Deployment/distr-agent",
                "Deployment/distr-agent-updater",
            ]
        );
    }

    #[tokio::test]
    async fn the_updater_labels_what_it_applies_and_prunes_only_that() {
        let api = fake_api(|method, path, _| match method {
            "GET" if path.ends_with("networkpolicies/distr-agent-poller") => (
                200,
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "distr-agent-poller", "labels": {PART_OF: "distr-agent", APPLIED_BY: APPLIED_BY_VALUE}}}),
            ),
            "GET" if path.ends_with("networkpolicies/distr-agent-executor") => (
                200,
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "distr-agent-executor", "labels": {PART_OF: "distr-agent"}}}),
            ),
            "DELETE" => (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
            _ => status(404),
        });
        let engine = engine_on(&api);
        let checked = manifest::check(MANIFEST, &engine.rules).expect("valid");
        let body = labelled(&checked.apply[0], "agent");
        assert_eq!(body["metadata"]["labels"][APPLIED_BY], APPLIED_BY_VALUE);
        assert_eq!(body["metadata"]["namespace"], "agent");
        engine.prune(&checked.apply).await;
        let deleted: Vec<String> = api
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(method, _, _)| method == "DELETE")
            .map(|(_, path, _)| path.rsplit('/').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(deleted, ["distr-agent-poller"], "only what the updater applied");
    }

    #[tokio::test]
    async fn a_manifest_the_api_server_refuses_in_a_dry_run_is_refused_whole_before_any_write() {
        let api = fake_api(
            |method, path, dry_run| match (method, path.ends_with(STATE_SECRET), dry_run) {
                ("GET", true, _) => state_secret(&State::default()),
                ("GET", _, _) => status(404),
                ("PATCH", true, false) => written_answer(),
                ("PATCH", false, true) => (
                    422,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                    "message": "Deployment.apps \"distr-agent\" is invalid: spec.selector: field is immutable", "code": 422}),
                ),
                _ => status(500),
            },
        );
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let started = engine.start(MANIFEST.into(), "v2".into()).await;
        assert!(
            matches!(started, Err(StartError::Refused(Refusal::DryRun { .. }))),
            "{started:?}"
        );
        let state = engine.status();
        assert_eq!(state.phase, Phase::Failed);
        assert!(state.message.contains("field is immutable"), "{}", state.message);
        assert_eq!(state.failed_version_ids, ["v2"]);
        let requests = api.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let state_writes: Vec<State> = requests
            .iter()
            .filter(|(method, path, _)| method == "PATCH" && path.ends_with(STATE_SECRET))
            .filter_map(|(_, _, body)| written_state(body))
            .collect();
        assert!(
            state_writes.iter().all(|s| s.phase != Phase::Applying),
            "no intent recorded, nothing applied"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn without_its_state_secret_the_updater_applies_nothing_and_says_how_to_fix_it() {
        let exists = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let present = exists.clone();
        let api = fake_api(
            move |method, path, dry_run| match (method, path.ends_with(STATE_SECRET)) {
                _ if dry_run => dry_run_answer(),
                ("GET", true) if present.load(std::sync::atomic::Ordering::SeqCst) => state_secret(&State::default()),
                ("GET", _) => status(404),
                ("PATCH", true) => written_answer(),
                ("PATCH", false) => dry_run_answer(),
                _ => status(500),
            },
        );
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let started = engine.start(MANIFEST.into(), "v2".into()).await;
        match &started {
            Err(StartError::Cluster(message)) => assert_eq!(message, STATE_MISSING),
            other => panic!("{other:?}"),
        }
        let state = engine.status();
        assert_eq!(state.phase, Phase::Failed);
        assert!(state.message.contains(STATE_MISSING), "{}", state.message);
        assert!(state.message.contains("tried again"), "{}", state.message);
        assert!(state.failed_version_ids.is_empty(), "not the version's fault");
        let written: Vec<String> = api
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(method, _, _)| method != "GET")
            .map(|(method, path, _)| format!("{method} {path}"))
            .collect();
        assert!(written.is_empty(), "nothing applied, nothing created: {written:?}");

        // Once the manifest was applied again, the next attempt goes ahead.
        exists.store(true, std::sync::atomic::Ordering::SeqCst);
        let started = engine.start(MANIFEST.into(), "v2".into()).await;
        assert!(started.is_ok(), "{started:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_roll_back_restores_a_recorded_secret_with_its_data() {
        const PULL: &str = "/api/v1/namespaces/agent/secrets/distr-agent-image-pull";
        let api = fake_api(|method, path, dry_run| match method {
            _ if dry_run => dry_run_answer(),
            "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
            "GET" if path == PULL => (
                200,
                json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                    "metadata": {"name": "distr-agent-image-pull", "namespace": "agent", "uid": "u", "resourceVersion": "3",
                        "labels": {PART_OF: "distr-agent"}},
                    "data": {".dockerconfigjson": "b2xkLXB1bGwtc2VjcmV0"}}),
            ),
            // The new Deployment never rolls out (it did not exist before: deleted again).
            "GET" => status(404),
            "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
            "PATCH" => dry_run_answer(),
            "DELETE" => (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
            _ => status(500),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let manifest = format!(
            "{MANIFEST}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: distr-agent-image-pull\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: bmV3LXB1bGwtc2VjcmV0\n"
        );
        engine.start(manifest, "v2".into()).await.expect("applied");
        for _ in 0..100 {
            if engine.status().phase == Phase::Failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state = engine.status();
        assert_eq!(state.phase, Phase::Failed, "{state:?}");
        assert!(
            state.message.contains("rolled back to the previous version"),
            "{}",
            state.message
        );
        let requests = api.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let pull_data: Vec<Value> = requests
            .iter()
            .filter(|(method, path, _)| method == "PATCH" && path == PULL)
            .map(|(_, _, body)| body["data"][".dockerconfigjson"].clone())
            .collect();
        assert_eq!(
            pull_data,
            [json!("bmV3LXB1bGwtc2VjcmV0"), json!("b2xkLXB1bGwtc2VjcmV0")],
            "applied, then restored as it was"
        );
        let restored = requests
            .iter()
            .rfind(|(method, path, _)| method == "PATCH" && path == PULL)
            .map(|(_, _, body)| body.clone())
            .unwrap_or_default();
        assert_eq!(restored["type"], "kubernetes.io/dockerconfigjson");
        assert!(restored["metadata"]["uid"].is_null() && restored["metadata"]["resourceVersion"].is_null());
        // The intent recorded before the first write holds the Secret as it was, data included.
        let intent = requests
            .iter()
            .filter(|(method, path, _)| method == "PATCH" && path.ends_with(STATE_SECRET))
            .filter_map(|(_, _, body)| written_state(body))
            .find(|s| s.phase == Phase::Applying)
            .expect("the intent");
        assert_eq!(
            intent.previous["Secret/distr-agent-image-pull"]["data"][".dockerconfigjson"],
            "b2xkLXB1bGwtc2VjcmV0"
        );
        assert!(intent.previous["Deployment/distr-agent"].is_null());
        // Neither the state's nor an object's Debug shows a Secret's data or the manifest.
        let shown = format!(
            "{state:?} {intent:?} {:?}",
            manifest::check(&intent.manifest, &engine.rules).expect("valid")
        );
        for secret in ["b2xkLXB1bGwtc2VjcmV0", "bmV3LXB1bGwtc2VjcmV0", "dockerconfigjson"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        shutdown.cancel();
    }

    /// The RPC that started an update may be dropped (its client gave up) once the intent is
    /// recorded: the update still runs to its end, instead of staying `Applying` with nobody
    /// running the gate.
    #[tokio::test]
    async fn an_update_whose_caller_gives_up_still_runs_to_its_end() {
        let api = fake_api_delayed(
            |method, path, dry_run| match method {
                _ if dry_run => dry_run_answer(),
                "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
                "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
                "GET" if path.ends_with("deployments/distr-agent") => {
                    poller_deployment("ghcr.io/distr-sh/distr-agent/poller:0.2.0", true)
                }
                "PATCH" => dry_run_answer(),
                _ => status(404),
            },
            // The API server is slow to take the new Deployment.
            |method, path, dry_run| {
                if method == "PATCH" && path.contains("/deployments/") && !dry_run {
                    Duration::from_millis(300)
                } else {
                    Duration::ZERO
                }
            },
        );
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        {
            let start = engine.start(MANIFEST.into(), "v2".into());
            tokio::pin!(start);
            loop {
                tokio::select! {
                    answered = &mut start => panic!("answered before the caller gave up: {answered:?}"),
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                if engine.status().phase == Phase::Applying {
                    break;
                }
            }
            // The caller gives up here: the call is dropped.
        }
        let done = wait_phase(&engine, Phase::Done).await;
        assert!(done.message.contains("rolled out"), "{}", done.message);
        shutdown.cancel();
    }

    /// One object that cannot be restored at the first attempt: the roll-back says so and
    /// tries again, and only once everything is back is the version recorded as failed.
    #[tokio::test]
    async fn a_roll_back_that_fails_part_way_is_tried_again_until_everything_is_back() {
        const OLD: &str = "ghcr.io/distr-sh/distr-agent/poller:0.1.0";
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let config_patches = Arc::new(AtomicUsize::new(0));
        let deployment_patches = Arc::new(AtomicUsize::new(0));
        let (configs, deployments) = (config_patches.clone(), deployment_patches.clone());
        let api = fake_api(move |method, path, dry_run| match method {
            _ if dry_run => dry_run_answer(),
            "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
            "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
            "GET" if path.ends_with("configmaps/distr-agent-env") => (
                200,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "distr-agent-env", "namespace": "agent"},
                    "data": {"DISTR_AGENT_VERSION_ID": "v1"}}),
            ),
            // The new version (the first write) never comes up; the old one (before, and
            // restored by the later writes) does.
            "GET" if path.ends_with("deployments/distr-agent") => match deployments.load(SeqCst) {
                1 => poller_deployment("ghcr.io/distr-sh/distr-agent/poller:0.2.0", false),
                _ => poller_deployment(OLD, true),
            },
            "PATCH" if path.ends_with("deployments/distr-agent") => {
                deployments.fetch_add(1, SeqCst);
                dry_run_answer()
            }
            // The ConfigMap's restore (its second write) fails once.
            "PATCH" if path.ends_with("configmaps/distr-agent-env") => {
                if configs.fetch_add(1, SeqCst) == 1 {
                    status(500)
                } else {
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distr-agent-env"}}),
                    )
                }
            }
            _ => status(404),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let manifest = format!(
            "{MANIFEST}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\ndata:\n  DISTR_AGENT_VERSION_ID: v2\n"
        );
        engine.start(manifest, "v2".into()).await.expect("applied");
        let failed = wait_phase(&engine, Phase::Failed).await;
        assert!(
            failed.message.contains("rolled back to the previous version"),
            "{}",
            failed.message
        );
        assert_eq!(failed.failed_version_ids, ["v2"]);
        let states = written_states(&api);
        let retrying = states
            .iter()
            .find(|s| s.message.contains("the roll-back did not complete"))
            .expect("the failed attempt is recorded while the roll-back goes on");
        assert_eq!(retrying.phase, Phase::RollingBack, "{retrying:?}");
        assert!(retrying.failed_version_ids.is_empty(), "not failed yet: {retrying:?}");
        assert!(
            retrying.message.contains("ConfigMap distr-agent-env"),
            "{}",
            retrying.message
        );
        assert!(config_patches.load(SeqCst) >= 3, "restored at the next attempt");
        let last_image = api
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rfind(|(method, path, _)| method == "PATCH" && path.ends_with("deployments/distr-agent"))
            .map(|(_, _, body)| body["spec"]["template"]["spec"]["containers"][0]["image"].clone());
        assert_eq!(last_image, Some(json!(OLD)), "the previous Deployment is back");
        let deletes: Vec<String> = api
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(method, _, _)| method == "DELETE")
            .map(|(_, path, _)| path.clone())
            .collect();
        assert!(deletes.is_empty(), "{deletes:?}");
        shutdown.cancel();
    }

    /// The state holds the manifest and the objects as they were: one that would not fit in
    /// its Secret is refused before any write, instead of failing every cycle.
    #[tokio::test]
    async fn an_update_too_large_to_record_is_refused_before_any_write() {
        let api = fake_api(|method, path, dry_run| match method {
            _ if dry_run => dry_run_answer(),
            "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
            "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
            "GET" if path.ends_with("configmaps/distr-agent-env") => (
                200,
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distr-agent-env"},
                    "data": {"big": "x".repeat(MAX_STATE_BYTES)}}),
            ),
            _ => status(404),
        });
        let engine = engine_on(&api);
        let shutdown = active(&engine).await;
        let manifest =
            format!("{MANIFEST}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\ndata: {{}}\n");
        let started = engine.start(manifest, "v2".into()).await;
        assert!(
            matches!(started, Err(StartError::Refused(Refusal::TooLargeToRecord { .. }))),
            "{started:?}"
        );
        let state = engine.status();
        assert_eq!(state.phase, Phase::Failed);
        assert_eq!(state.failed_version_ids, ["v2"]);
        assert!(
            written_states(&api).iter().all(|s| s.phase != Phase::Applying),
            "no intent recorded"
        );
        shutdown.cancel();
    }

    #[test]
    fn the_failed_versions_are_capped_oldest_first() {
        let mut state = State::default();
        for n in 0..MAX_FAILED_VERSIONS + 5 {
            state.remember_failed(&format!("v{n}"));
        }
        state.remember_failed("v36");
        assert_eq!(state.failed_version_ids.len(), MAX_FAILED_VERSIONS);
        assert_eq!(state.failed_version_ids[0], "v5");
        assert_eq!(state.failed_version_ids.last().map(String::as_str), Some("v36"));
    }
}
