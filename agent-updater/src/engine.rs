//! Applying a new agent version: check, record the intent, server-side apply, gate on the
//! rollout, then prune, or roll back to what the cluster had before. The pieces live apart:
//! [`crate::state`] (the state and its conditional writes), [`crate::lease`] (which updater
//! acts), [`crate::apply`] (dry run, prune, roll-back pass) and [`crate::gate`], all over the
//! [`AgentObjects`] trait; this module decides what happens when.
//!
//! The state is written before every step, so an updater restarted half-way resumes the gate
//! or the roll-back instead of leaving a half-updated agent. The updater's own Deployment rolls
//! out with a surge (the old pod stays until the new one is ready), so two updaters can run at
//! once: the state names the updater acting on an update under way (its holder) and a
//! heartbeat the holder renews; another updater stands by while that heartbeat moves, and every
//! write of the state is conditional on the `resourceVersion` last seen, so that two writers
//! can never both win.
//!
//! An update runs in a task of its own, which holds the `busy` guard until the update ends:
//! the RPC that started it may be dropped at any point.

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::BTreeMap,
    fmt::Display,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{
    apply::{self, DryRunError},
    cluster::{AgentObjects, ApiError},
    gate,
    lease::{Watch, identity},
    manifest::{self, Object, Refusal, Rules},
    state::{self, MAX_STATE_BYTES, StateError},
};

pub use crate::{
    lease::Mode,
    state::{Phase, State},
};

/// First pause before a roll-back that did not complete is tried again; it doubles up to
/// [`ROLLBACK_RETRY_MAX`].
const ROLLBACK_RETRY: Duration = Duration::from_secs(2);
const ROLLBACK_RETRY_MAX: Duration = Duration::from_secs(60);

/// Why an update was not started (or not written). `Cluster` and `NotReady` may go away by
/// themselves (the poller hands the version over again later); `Refused` and `FailedBefore`
/// do not until the Hub names another version; `Busy` ends with the update under way.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("an update to version {0} is under way")]
    Busy(String),
    #[error("version {0} failed before; it is not applied again until the Hub names another one")]
    FailedBefore(String),
    /// The cluster could not be read or written (nothing applied).
    #[error("{0}")]
    Cluster(String),
    /// Not this updater's turn: its state is not loaded yet, or another updater acts.
    #[error("{0}")]
    NotReady(String),
}

impl StartError {
    /// Whether handing the same version over again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StartError::Cluster(_) | StartError::NotReady(_) | StartError::Busy(_)
        )
    }
}

/// Runs updates, one at a time.
#[derive(Clone)]
pub struct Engine {
    objects: Arc<dyn AgentObjects>,
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.locked()
}

impl Engine {
    pub fn new(objects: Arc<dyn AgentObjects>, rules: Rules, gate_timeout: Duration, heartbeat: Duration) -> Self {
        Self {
            objects,
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
        lock(&self.state).clone()
    }

    fn set_memory(&self, state: State) {
        *lock(&self.state) = state;
    }

    pub fn mode(&self) -> Mode {
        lock(&self.mode).clone()
    }

    fn set_mode(&self, mode: Mode) {
        *lock(&self.mode) = mode;
    }

    fn acting(&self) -> bool {
        self.mode() == Mode::Active
    }

    /// The version the agent ran before the last update, from the recorded ConfigMap
    /// `distr-agent-env`.
    pub fn previous_version_id(&self) -> String {
        state::previous_version(&self.status())
    }

    fn still_acting(&self) -> impl Fn() -> bool + Send + Sync + use<> {
        let mode = self.mode.clone();
        move || *lock(&mode) == Mode::Active
    }

    /// Writes `state` as it is, conditional on the `resourceVersion` last seen. The caller
    /// holds `writes`. A conflict means another updater wrote since: this one acts no more.
    async fn write_locked(&self, state: &State) -> Result<(), StateError> {
        if !self.acting() {
            return Err(StateError::NotActing);
        }
        // Never created here: without a `resourceVersion` (the Secret was missing when last
        // read) a server-side apply would create it.
        let Some(version) = lock(&self.resource_version).clone() else {
            return Err(StateError::Missing);
        };
        match state::write(self.objects.as_ref(), &self.rules.namespace, state, &version).await {
            Ok(version) => {
                *lock(&self.resource_version) = Some(version);
                Ok(())
            }
            Err(StateError::Missing) => {
                *lock(&self.resource_version) = None;
                Err(StateError::Missing)
            }
            Err(error @ StateError::Lost(_)) => {
                tracing::warn!(%error, "this updater stops acting");
                self.set_mode(Mode::Lost);
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Records `state`, as changed now by this updater, in memory and in the state Secret.
    async fn save(&self, mut state: State) -> Result<(), StateError> {
        let _writing = self.writes.lock().await;
        if !self.acting() {
            return Err(StateError::NotActing);
        }
        let now = Utc::now();
        state.changed_at = Some(now);
        state.holder.clone_from(&self.identity);
        state.heartbeat = Some(now);
        self.set_memory(state.clone());
        self.write_locked(&state).await
    }

    async fn set(&self, phase: Phase, message: &str) -> Result<(), StateError> {
        let mut state = self.status();
        state.phase = phase;
        message.clone_into(&mut state.message);
        tracing::info!(?phase, version = %state.target_version_id, detail = message, "self-update");
        self.save(state).await
    }

    /// Renews the heartbeat of the update under way, if this updater acts on one.
    async fn renew(&self) -> Result<(), StateError> {
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
                Mode::Loading | Mode::Lost | Mode::Standby(_) => match state::read(self.objects.as_ref()).await {
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the updater's state; no update is taken until it is read")
                    }
                    Ok(read) => {
                        let (state, version) =
                            read.map_or((State::default(), None), |(state, version)| (state, Some(version)));
                        *lock(&self.resource_version) = version;
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
    async fn abandon(&self, error: impl Display) -> StartError {
        let mut state = self.status();
        state.phase = Phase::Failed;
        state.message = format!("nothing applied: {error}; the version is tried again on a later cycle");
        tracing::warn!(version = %state.target_version_id, detail = %state.message, "self-update not started");
        if let Err(save) = self.save(state.clone()).await {
            tracing::warn!(error = %save, "cannot record the updater's state");
            // Whatever the write did, this updater's answer is Failed.
            self.set_memory(state);
        }
        StartError::Cluster(error.to_string())
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
            return Err(self.abandon(error).await);
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
            Err(StartError::Cluster(error)) => return Err(self.abandon(error).await),
            Err(error) => return Err(self.refuse(error, version).await),
        };
        // The API server checks every object first (an immutable field changed, an invalid
        // value): a refusal of any is a refusal of the whole manifest, nothing applied.
        match apply::dry_run(self.objects.as_ref(), &checked.apply, &self.rules.namespace).await {
            Ok(()) => {}
            Err(DryRunError::Cluster(error)) => return Err(self.abandon(format!("dry run: {error}")).await),
            Err(DryRunError::Refused { object, error }) => {
                let refusal = Refusal::DryRun {
                    object,
                    reason: error.to_string(),
                };
                return Err(self.refuse(refusal.into(), version).await);
            }
        }
        // Record the intent and what the cluster has now before the first write.
        let mut previous = BTreeMap::new();
        for object in &checked.apply {
            let live = match self.objects.get(&object.kind, &object.name).await {
                Ok(live) => live,
                Err(error) => return Err(self.abandon(error).await),
            };
            // A Secret is recorded with its data (the state is a Secret too), so that a
            // roll-back restores it; neither is ever logged.
            previous.insert(apply::key(object), live.map_or(Value::Null, apply::apply_config));
        }
        let mut state = self.status();
        state.phase = Phase::Applying;
        state.message = format!("applying {} objects", checked.apply.len());
        state.manifest = text;
        state.previous = previous;
        let size = state::state_size(&state);
        if size > MAX_STATE_BYTES {
            let refusal = Refusal::TooLargeToRecord {
                bytes: size,
                limit: MAX_STATE_BYTES,
            };
            return Err(self.refuse(refusal.into(), version).await);
        }
        if let Err(error) = self.save(state).await {
            if !self.acting() {
                return Err(StartError::NotReady(error.to_string()));
            }
            return Err(self.abandon(error).await);
        }
        Ok(checked)
    }

    /// The state Secret exists: known from the last read or write, or read again now (the
    /// manifest may have been applied again since). Called with `busy` held, before anything
    /// else of an update.
    async fn state_secret_exists(&self) -> Result<(), StateError> {
        if self.resource_version.locked().is_some() {
            return Ok(());
        }
        let _writing = self.writes.lock().await;
        let Some((state, version)) = state::read(self.objects.as_ref()).await? else {
            return Err(StateError::Missing);
        };
        // Created since (empty, by the manifest): its state is taken as this updater's.
        tracing::info!("the updater's state Secret exists now");
        *lock(&self.resource_version) = Some(version);
        self.set_memory(state);
        Ok(())
    }

    /// Checks the manifest, and its RBAC against the cluster's: a difference is a refusal; an
    /// error reading the cluster is not (`Cluster`: tried again later).
    async fn validate(&self, text: &str) -> Result<manifest::Checked, StartError> {
        let checked = manifest::check(text, &self.rules)?;
        for object in &checked.compare {
            // What the updater may not read is none of the agent's objects: a change too.
            let live = match self.objects.get(&object.kind, &object.name).await {
                Err(ApiError::Forbidden { .. }) => None,
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
            let body = apply::labelled(object, &self.rules.namespace);
            self.objects
                .apply(&object.kind, &object.name, &body, false)
                .await
                .map_err(|error| error.to_string())?;
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
        let gated = gate::wait(
            self.objects.as_ref(),
            &deployments,
            self.gate_timeout,
            &self.still_acting(),
        )
        .await;
        if !self.acting() {
            return tracing::info!("another updater took over the update; this one stops");
        }
        match gated {
            Ok(took) => {
                apply::prune(self.objects.as_ref(), &checked.apply).await;
                let message = format!("the new version rolled out in {:.1}s", took.as_secs_f64());
                if let Err(error) = self.set(Phase::Done, &message).await {
                    tracing::warn!(%error, "cannot record the updater's state");
                }
            }
            Err(reason) => self.roll_back(&reason).await,
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

    /// One pass of a roll-back: every recorded object restored (see [`apply::restore`]), then
    /// the previous Deployments rolled out. What went wrong, when anything did.
    async fn restore(&self, previous: &BTreeMap<String, Value>) -> Result<(), Vec<String>> {
        let acting = self.still_acting();
        let deployments = apply::restore(self.objects.as_ref(), previous, &self.rules, &acting).await?;
        gate::wait(self.objects.as_ref(), &deployments, self.gate_timeout, &acting)
            .await
            .map(|_| ())
            .map_err(|e| vec![e])
    }
}

#[cfg(test)]
mod tests;
