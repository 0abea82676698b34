//! The reconciler: turns the Hub's desired state into Helm releases, asynchronously.
//!
//! - [`Reconciler::sync`] never waits for Helm: it hands each desired deployment to the
//!   worker of its release (one tokio task per release, fed through a `watch` channel with
//!   the latest desired deployment) and answers with the statuses known right now.
//! - A global semaphore bounds concurrent Helm operations, so a release stuck in a long
//!   `--wait` delays nobody else's install or status.
//! - Releases the agent tracks that are no longer desired get a worker that uninstalls them:
//!   those with a worker are told at once; tracking Secrets without a worker (after a
//!   restart) are found by a background scan of the namespace. Only the agent's own records
//!   (canonical tracking Secrets) lead to an uninstall.
//! - The namespace of the releases follows the rules of [`crate::release::namespace`]: a change
//!   of the Hub's `namespace` never uninstalls anything.
//! - Per release, an async lock serialises the worker, a manual rollback and the start-up
//!   recovery.
//!
//! This module knows nothing of tonic; errors map to gRPC codes in [`crate::grpc`].

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    cluster::tracking::{Listed, Phase, Tracked, TrackingError, TrackingRecord, TrackingStore},
    helm::storage::{StorageError, StoredRelease},
    helm::{HelmDriver, HelmError},
    model::{Deployment, DeploymentStatus, DesiredState, HelmOptions, Status, StatusKind},
    release::namespace::{self, NamespaceRecord, Resolved, Scope},
    release::ops::{KubeOps, Stores},
    release::recovery::{self, Outcome},
    release::slots::{HelmLimits, HelmSlot, HelmSlots},
    release::status_board::{ReleaseKey, StatusBoard},
    release::worker::{Host, WorkItem, Worker},
    resources::health::{HealthChecker, ResourceHealth},
    resources::manifest,
    validate::{self, ValidationError},
};

/// How long a manual rollback waits for the release's worker to finish its current step.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Minimum time between two scans for orphaned tracking Secrets.
const SCAN_INTERVAL: Duration = Duration::from_secs(15);
/// Helm status shown for a release whose latest Helm Secret cannot be decoded.
pub const UNREADABLE_HELM_STATUS: &str = "unreadable";
/// Time between retries of the start-up recovery when the API is unavailable.
const STARTUP_RETRY: Duration = Duration::from_secs(5);

/// Errors of the reconciler's request/response operations.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Bad input (not retryable).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The release is not one the agent tracks (not retryable).
    #[error("release {0} is not tracked by the agent")]
    NotTracked(String),
    /// Helm has no revision of the release (not retryable).
    #[error("helm has no release {0}")]
    NotInstalled(String),
    /// Another operation holds the release (retryable).
    #[error("another operation on release {0} is in progress; try again later")]
    Busy(String),
    /// The executor is stopping (retryable elsewhere).
    #[error("the executor is shutting down")]
    ShuttingDown,
    /// Reading or writing a tracking Secret failed (retryable, unless the record is broken).
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// Reading Helm's storage failed (retryable).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Recovering an interrupted operation failed (retryable).
    #[error(transparent)]
    Recovery(Box<recovery::RecoveryError>),
    /// Helm refused or failed (not retryable as such).
    #[error("helm {operation} of {release} failed: {source}")]
    Helm {
        operation: &'static str,
        release: String,
        #[source]
        source: HelmError,
    },
}

/// One release as the tracking Secret and Helm's storage describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub release_name: String,
    pub deployment_id: String,
    pub revision_id: String,
    /// Helm revision the agent last recorded.
    pub tracked_revision: Option<u32>,
    /// Latest revision in Helm's storage.
    pub helm_revision: Option<u32>,
    /// Helm's status of that revision (`deployed`, `failed`, ...); empty when none.
    pub helm_status: String,
    /// Tracking phase (`progressing`, `ready`, `failed`), or `invalid` for a broken record.
    pub phase: String,
    /// `name-version` of the chart.
    pub chart: String,
    /// Latest status reported for the release, if it is desired.
    pub status: Option<DeploymentStatus>,
}

/// One revision in a release's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelmRevisionInfo {
    pub revision: u32,
    pub status: String,
    pub chart: String,
    pub app_version: String,
    pub description: String,
    pub updated: Option<DateTime<Utc>>,
}

/// A release with its history and the health of its resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseDetail {
    pub release: ReleaseInfo,
    pub history: Vec<HelmRevisionInfo>,
    pub resources: Vec<ResourceHealth>,
}

/// Reconciles desired deployments with Helm releases. Cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

/// State shared by the reconciler, its workers and the scan.
pub(crate) struct Inner {
    pub(crate) client: kube::Client,
    /// Watch-fed state: what moved since a worker last looked.
    pub(crate) cluster: crate::cluster::Cluster,
    pub(crate) helm: HelmDriver,
    pub(crate) statuses: StatusBoard,
    pub(crate) health: Arc<HealthChecker>,
    pub(crate) shutdown: CancellationToken,
    default_namespace: String,
    /// What the executor may deploy to.
    scope: Scope,
    /// Where a cluster-scoped executor records the namespace in use.
    namespace_record: NamespaceRecord,
    /// The namespace in use: `None` until read from the record (or, namespace-scoped, set to
    /// the agent's own); `Some(None)` when none is recorded yet. Held across a `sync`'s
    /// decision on the namespace, so two decisions never interleave.
    in_use: tokio::sync::Mutex<Option<Option<String>>>,
    helm_slots: HelmSlots,
    state: Mutex<State>,
    op_locks: Mutex<HashMap<ReleaseKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Deployment id named by each release's tracking Secret (see [`Inner::owner_of`]).
    owners: Mutex<HashMap<ReleaseKey, String>>,
    tasks: TaskTracker,
    /// The last reason a `sync`'s namespace was refused (logged when it changes).
    refusal: Mutex<Option<String>>,
}

#[derive(Default)]
struct State {
    /// Latest desired deployment per release with a worker (`None`: uninstall).
    workers: HashMap<ReleaseKey, watch::Sender<Option<Arc<WorkItem>>>>,
    /// What the latest `sync` asked for.
    desired: Option<DesiredSet>,
    /// Feeds the orphan scan; created on the first `sync`.
    scan: Option<watch::Sender<DesiredSet>>,
}

/// The releases a `sync` wants, by name, in its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DesiredSet {
    namespace: String,
    releases: HashSet<String>,
}

impl Inner {
    /// The deployment id the tracking Secret of the release names, as its worker last read it.
    pub(crate) fn owner_of(&self, key: &ReleaseKey) -> Option<String> {
        self.owners.locked().get(key).cloned()
    }

    fn spawn_worker(self: &Arc<Self>, state: &mut State, key: ReleaseKey, item: Option<Arc<WorkItem>>) {
        let (sender, receiver) = watch::channel(item);
        state.workers.insert(key.clone(), sender);
        let span = tracing::info_span!("release", release = %key.release, namespace = %key.namespace);
        let ops = KubeOps::new(
            self.client.clone(),
            self.helm.clone(),
            self.health.clone(),
            self.cluster.clone(),
            &key.namespace,
        );
        let worker = Worker::new(self.clone(), key, receiver, ops);
        self.tasks.spawn(worker.run().instrument(span));
    }

    /// Looks for tracking Secrets of releases that are neither desired nor handled by a
    /// worker, and starts a worker that uninstalls each.
    async fn scan_orphans(self: &Arc<Self>, desired: &DesiredSet) -> bool {
        let DesiredSet {
            namespace,
            releases: desired,
        } = desired;
        let store = TrackingStore::new(self.client.clone(), namespace);
        let entries = match store.list().await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%namespace, %error, "cannot look for releases to uninstall");
                return false;
            }
        };
        for entry in entries {
            let record = match entry {
                // Only the agent's own records lead to an uninstall.
                Listed::Valid(tracked) if tracked.is_own_record() => tracked.record,
                Listed::Valid(_) => continue,
                Listed::Broken { release, error } => {
                    // A desired release reports this as its status; ListReleases shows it too.
                    tracing::debug!(%namespace, ?release, %error, "ignoring a broken tracking Secret");
                    continue;
                }
            };
            // Adoption requests for releases the Hub does not list are left for later.
            if record.is_adoption_request() || desired.contains(&record.release_name) {
                continue;
            }
            if let Err(error) = validate::release_name(&record.release_name) {
                tracing::warn!(%namespace, %error, "ignoring a tracking Secret with an invalid release name");
                continue;
            }
            let key = ReleaseKey::new(namespace, &record.release_name);
            let mut state = self.state.locked();
            let desired_now = state
                .desired
                .as_ref()
                .is_some_and(|now| now.namespace == *namespace && now.releases.contains(&record.release_name));
            if !desired_now && !state.workers.contains_key(&key) {
                tracing::info!(release = %record.release_name, %namespace, "release is no longer desired; uninstalling");
                self.spawn_worker(&mut state, key, None);
            }
        }
        true
    }

    async fn scan_loop(self: Arc<Self>, mut requests: watch::Receiver<DesiredSet>) {
        // What the last scan saw: the desired set and the tracking Secrets (as the watch
        // fingerprints them). While neither moves, a scan would find nothing new.
        let mut last: Option<(DesiredSet, u64)> = None;
        loop {
            tokio::select! {
                changed = requests.changed() => if changed.is_err() { return },
                () = self.shutdown.cancelled() => return,
            }
            let request = requests.borrow_and_update().clone();
            let tracking = self.cluster.secrets(&request.namespace).tracking_fingerprint();
            let unchanged =
                matches!((&last, tracking), (Some((desired, seen)), Some(now)) if *desired == request && *seen == now);
            if !unchanged && self.scan_orphans(&request).await {
                last = tracking.map(|now| (request, now));
            }
            tokio::select! {
                () = tokio::time::sleep(SCAN_INTERVAL) => {},
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// The namespace in use as recorded (cluster scope), or the agent's own.
    async fn load_namespace_in_use(&self) -> Result<Option<String>, String> {
        match self.scope {
            Scope::Namespace => Ok(Some(self.default_namespace.clone())),
            Scope::Cluster => self
                .namespace_record
                .load()
                .await
                .map_err(|error| format!("cannot read the namespace in use ({}): {error}", namespace::RECORD_NAME)),
        }
    }

    /// The releases the agent installed in `namespace` (its own records there).
    async fn releases_installed_in(&self, namespace: &str) -> Result<Vec<String>, TrackingError> {
        let store = TrackingStore::new(self.client.clone(), namespace);
        let mut releases: Vec<String> = store
            .list()
            .await?
            .into_iter()
            .filter_map(|entry| match entry {
                Listed::Valid(tracked) if tracked.is_own_record() => Some(tracked.record.release_name),
                _ => None,
            })
            .collect();
        releases.sort();
        Ok(releases)
    }

    /// The namespace of the latest `sync`, else the one in use as last read, else the
    /// agent's own.
    fn current_namespace(&self) -> String {
        let state = self.state.locked();
        if let Some(desired) = state.desired.as_ref() {
            return desired.namespace.clone();
        }
        let recorded = self.in_use.try_lock().ok().and_then(|in_use| in_use.clone().flatten());
        recorded.unwrap_or_else(|| self.default_namespace.clone())
    }

    /// The namespace in use (read from the record the first time), or the agent's own.
    async fn namespace_in_use(&self) -> Result<String, String> {
        let mut in_use = self.in_use.lock().await;
        let current = self.recorded(&mut in_use).await?;
        Ok(current.unwrap_or_else(|| self.default_namespace.clone()))
    }

    /// The namespace in use as `in_use` (the guarded [`Inner::in_use`]) knows it, read from
    /// the record the first time; `None` when none is recorded yet.
    async fn recorded(&self, in_use: &mut Option<Option<String>>) -> Result<Option<String>, String> {
        if let Some(current) = in_use {
            return Ok(current.clone());
        }
        let loaded = self.load_namespace_in_use().await?;
        *in_use = Some(loaded.clone());
        Ok(loaded)
    }

    /// Remembers why a `sync`'s namespace was refused, logging it when the reason changed.
    fn refuse(&self, message: String) -> Result<String, String> {
        let mut last = self.refusal.locked();
        if last.as_deref() != Some(message.as_str()) {
            tracing::warn!(reason = %message, "the Hub's namespace is refused; nothing is touched");
            *last = Some(message.clone());
        }
        Err(message)
    }

    /// Drops the operation locks of releases without a worker that nobody holds (a lock
    /// held by a roll-back or a recovery stays until the next prune).
    fn prune_op_locks(&self, state: &State) {
        self.op_locks
            .locked()
            .retain(|key, lock| state.workers.contains_key(key) || Arc::strong_count(lock) > 1);
    }

    /// Stops the per-namespace watches no release needs: every namespace but the agent's
    /// own, the one the Hub names and those where a worker still runs.
    fn release_unused_watches(&self, state: &State) {
        let mut needed: HashSet<String> = state.workers.keys().map(|key| key.namespace.clone()).collect();
        needed.insert(self.default_namespace.clone());
        if let Some(desired) = &state.desired {
            needed.insert(desired.namespace.clone());
        }
        self.cluster.retain_namespaces(&needed);
    }

    /// Helm options of the release's desired deployment, or the defaults.
    fn options_of(&self, key: &ReleaseKey) -> HelmOptions {
        let state = self.state.locked();
        state
            .workers
            .get(key)
            .and_then(|sender| {
                sender
                    .borrow()
                    .as_ref()
                    .map(|item| item.deployment.helm_options.capped().0)
            })
            .unwrap_or_default()
    }
}

impl Host for Inner {
    /// Records a status observation for the deployment revision; true when it changed.
    fn report(
        &self,
        key: &ReleaseKey,
        deployment_id: &str,
        revision_id: &str,
        kind: StatusKind,
        message: &str,
    ) -> bool {
        self.statuses
            .report(key, deployment_id, revision_id, kind, message, Utc::now())
    }

    /// The lock that serialises operations on one release.
    fn op_lock(&self, key: &ReleaseKey) -> Arc<tokio::sync::Mutex<()>> {
        self.op_locks.locked().entry(key.clone()).or_default().clone()
    }

    /// Remembers the deployment id the tracking Secret of the release names.
    fn set_owner(&self, key: &ReleaseKey, id: Option<&str>) {
        let mut owners = self.owners.locked();
        match id {
            Some(id) => owners.insert(key.clone(), id.to_owned()),
            None => owners.remove(key),
        };
    }

    async fn helm_slot(&self) -> Option<HelmSlot> {
        self.helm_slots.acquire(&self.shutdown).await
    }

    /// Called by a worker whose release is no longer desired and fully removed: forgets the
    /// worker unless a `sync` made the release desired again meanwhile. True when the worker
    /// must stop.
    fn retire(&self, key: &ReleaseKey, receiver: &watch::Receiver<Option<Arc<WorkItem>>>) -> bool {
        let mut state = self.state.locked();
        let still_absent = receiver.borrow().is_none() && !receiver.has_changed().unwrap_or(false);
        if still_absent {
            state.workers.remove(key);
            self.statuses.remove(key);
            self.owners.locked().remove(key);
            self.prune_op_locks(&state);
            self.release_unused_watches(&state);
        }
        still_absent
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn changes(&self) -> broadcast::Receiver<crate::cluster::Change> {
        self.cluster.changes()
    }

    fn allows_http_charts(&self) -> bool {
        self.helm.allows_http_charts()
    }
}

impl Reconciler {
    /// Registers the executor's figures: Helm operations and releases by status.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.helm.metrics().register(registry);
        self.inner.cluster.register_metrics(registry);
        registry.register_collector(Box::new(crate::release::status_board::ReleasesByStatus(
            self.inner.statuses.clone(),
        )));
    }

    /// The watch-fed state of the cluster the workers share.
    pub fn cluster(&self) -> crate::cluster::Cluster {
        self.inner.cluster.clone()
    }

    /// A reconciler for releases in `namespace` (the agent's own, used until the Hub names
    /// another), deploying within `scope` and running Helm within `limits`.
    pub fn new(client: kube::Client, helm: HelmDriver, namespace: String, scope: Scope, limits: HelmLimits) -> Self {
        let shutdown = CancellationToken::new();
        let cluster = crate::cluster::Cluster::new(client.clone(), shutdown.clone());
        let namespace_record = NamespaceRecord::new(client.clone(), &namespace);
        Self {
            inner: Arc::new(Inner {
                health: Arc::new(HealthChecker::new(client.clone(), cluster.clone())),
                cluster,
                client,
                helm,
                statuses: StatusBoard::default(),
                shutdown,
                default_namespace: namespace,
                namespace_record,
                scope,
                in_use: tokio::sync::Mutex::new(None),
                helm_slots: HelmSlots::new(limits),
                state: Mutex::new(State::default()),
                op_locks: Mutex::new(HashMap::new()),
                owners: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                refusal: Mutex::new(None),
            }),
        }
    }

    /// Takes the desired state and returns at once with the current status of every
    /// deployment in it that has one (a deployment whose worker has not observed it yet, as
    /// after a restart, is left out: there is nothing new to report); the work happens in
    /// the background. Deployments with bad input get
    /// an `error` status and leave every other release alone.
    pub async fn sync(&self, desired: DesiredState) -> Vec<DeploymentStatus> {
        let inner = &self.inner;
        let now = Utc::now();
        let namespace = match self.resolve_namespace(desired.namespace.as_deref()).await {
            Ok(namespace) => namespace,
            Err(message) => {
                // Touch nothing (least of all uninstall) when the namespace cannot be used.
                return desired
                    .deployments
                    .iter()
                    .map(|deployment| error_status(deployment, &message, now))
                    .collect();
            }
        };
        if let Err(error) = validate::namespace(&namespace) {
            // Touch nothing (least of all uninstall) when the namespace itself is unusable.
            let message = error.to_string();
            return desired
                .deployments
                .iter()
                .map(|deployment| error_status(deployment, &message, now))
                .collect();
        }
        let mut seen = HashSet::new();
        let mut invalid = HashSet::new();
        let mut replies = Vec::with_capacity(desired.deployments.len());
        let mut state = inner.state.locked();
        let claims = claims_by_release(&desired.deployments);
        for deployment in desired.deployments {
            let key = ReleaseKey::new(&namespace, &deployment.release_name);
            if let Err(error) = validate::release_name(&deployment.release_name) {
                invalid.insert(key.clone());
                let message = error.to_string();
                inner.statuses.set(
                    &key,
                    &deployment.id,
                    &deployment.revision_id,
                    StatusKind::Error,
                    &message,
                    now,
                );
                replies.extend(inner.statuses.current(&key, &deployment.id, &deployment.revision_id));
                continue;
            }
            let claimants = claims.get(&deployment.release_name).map_or(&[][..], Vec::as_slice);
            let rivals: Vec<String> = claimants
                .iter()
                .filter(|id| !id.eq_ignore_ascii_case(&deployment.id))
                .cloned()
                .collect();
            if !rivals.is_empty() {
                // Several Hub deployments claim one release: one keeps it, the same one
                // whatever the order of the list (or the release would flip between them).
                let current = state
                    .workers
                    .get(&key)
                    .and_then(|sender| sender.borrow().as_ref().map(|item| item.deployment.id.clone()));
                let owner = inner.owner_of(&key);
                let winner = pick_claimant(claimants, owner.as_deref(), current.as_deref());
                if !winner.is_some_and(|winner| winner.eq_ignore_ascii_case(&deployment.id)) {
                    let message = format!("release name {} is used by another deployment", deployment.release_name);
                    replies.push(error_status(&deployment, &message, now));
                    continue;
                }
            }
            if !seen.insert(deployment.release_name.clone()) {
                // The same deployment listed twice: the first entry counts.
                let message = format!("release name {} is used by another deployment", deployment.release_name);
                replies.push(error_status(&deployment, &message, now));
                continue;
            }
            let (id, revision) = (deployment.id.clone(), deployment.revision_id.clone());
            let item = Arc::new(WorkItem {
                namespace: namespace.clone(),
                deployment,
                hub_registry: desired.hub_registry.clone(),
                rivals,
            });
            match state.workers.get(&key) {
                Some(sender) => {
                    sender.send_if_modified(|current| {
                        let modified = current.as_deref() != Some(&*item);
                        if modified {
                            *current = Some(item);
                        }
                        modified
                    });
                }
                None => inner.spawn_worker(&mut state, key.clone(), Some(item)),
            }
            // Nothing yet when the worker has not looked at the release since it started.
            replies.extend(inner.statuses.current(&key, &id, &revision));
        }
        for (key, sender) in &state.workers {
            if key.namespace != namespace || !seen.contains(&key.release) {
                sender.send_if_modified(|current| current.take().is_some());
            }
        }
        // Statuses of invalid deployments have no worker to forget them.
        inner
            .statuses
            .retain(|key| state.workers.contains_key(key) || invalid.contains(key));
        let desired_set = DesiredSet {
            namespace,
            releases: seen,
        };
        state.desired = Some(desired_set.clone());
        inner.release_unused_watches(&state);
        match &state.scan {
            Some(scan) => {
                scan.send_replace(desired_set);
            }
            None => {
                let (sender, mut receiver) = watch::channel(desired_set);
                // The first value counts as new for the scan.
                receiver.mark_changed();
                state.scan = Some(sender);
                inner.tasks.spawn(inner.clone().scan_loop(receiver));
            }
        }
        replies
    }

    /// The namespace of this `sync`'s releases, from the one the Hub names (`None`: absent,
    /// which means unchanged) and the one in use; `Err` says why the sync must touch nothing
    /// (see [`namespace`]).
    async fn resolve_namespace(&self, named: Option<&str>) -> Result<String, String> {
        let inner = &self.inner;
        let mut in_use = inner.in_use.lock().await;
        let current = match inner.recorded(&mut in_use).await {
            Ok(current) => current,
            Err(message) => return inner.refuse(message),
        };
        // Namespace-scoped, nothing is recorded: the agent's own is the only one.
        let record = inner.scope == Scope::Cluster;
        let refused = |message: String| inner.refuse(message);
        let to = match namespace::resolve(inner.scope, &inner.default_namespace, current.as_deref(), named) {
            Resolved::Keep(namespace) => {
                inner.refusal.locked().take();
                return Ok(namespace);
            }
            Resolved::Refused(message) => return refused(message),
            Resolved::Move { from, to } => {
                if let Err(error) = validate::namespace(&to) {
                    return refused(error.to_string());
                }
                if let Some(from) = from {
                    match inner.releases_installed_in(&from).await {
                        Ok(left) if left.is_empty() => {}
                        Ok(left) => return refused(namespace::move_refused(&from, &to, &left)),
                        Err(error) => {
                            return refused(format!(
                                "the Hub moved the deployments from namespace {from} to {to}; cannot tell which releases are left in {from}: {error}"
                            ));
                        }
                    }
                    tracing::info!(%from, %to, "no release left in the previous namespace; following the Hub");
                }
                to
            }
        };
        if record && let Err(error) = inner.namespace_record.save(&to).await {
            return refused(format!("cannot record the namespace {to} in use: {error}"));
        }
        *in_use = Some(Some(to.clone()));
        inner.refusal.locked().take();
        Ok(to)
    }

    /// Wakes on every status change.
    pub fn follow_statuses(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.statuses.follow()
    }

    /// The desired releases whose deployment has logs enabled.
    pub fn log_targets(&self) -> Vec<crate::logs::LogTarget> {
        let state = self.inner.state.locked();
        let mut targets: Vec<crate::logs::LogTarget> = state
            .workers
            .iter()
            .filter_map(|(key, sender)| {
                let item = sender.borrow().clone()?;
                item.deployment.logs_enabled.then(|| crate::logs::LogTarget {
                    key: key.clone(),
                    deployment_id: item.deployment.id.clone(),
                    revision_id: item.deployment.revision_id.clone(),
                })
            })
            .collect();
        targets.sort_by(|a, b| a.key.cmp(&b.key));
        targets
    }

    /// Waits until the watches of the default namespace's Secrets have listed once: before
    /// that, every pass would read the API directly.
    pub async fn watches_listed(&self) {
        self.inner.cluster.secrets(&self.inner.default_namespace).listed().await;
    }

    /// The current status of every deployment of the last `sync` that has one, with no new
    /// desired state (what the poller reports while the Hub cannot be read).
    pub fn statuses(&self) -> Vec<DeploymentStatus> {
        self.inner.statuses.all()
    }

    /// Recovers, before the executor reports ready, every release of the namespace in use
    /// whose last operation was interrupted. Retries while the API is unavailable; a pending
    /// revision that may still belong to a live `helm` is left to the release's worker.
    pub async fn recover_on_startup(&self) {
        let inner = &self.inner;
        let namespace = loop {
            match inner.namespace_in_use().await {
                Ok(namespace) => break namespace,
                Err(error) => {
                    tracing::warn!(%error, "start-up recovery cannot start; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(STARTUP_RETRY) => {},
                        () = inner.shutdown.cancelled() => return,
                    }
                }
            }
        };
        let stores = Stores::new(&inner.client, &namespace);
        loop {
            match self.recover_namespace(&namespace, &stores).await {
                Ok(count) => {
                    tracing::info!(%namespace, recovered = count, "start-up recovery done");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%namespace, %error, "start-up recovery failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(STARTUP_RETRY) => {},
                        () = inner.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn recover_namespace(&self, namespace: &str, stores: &Stores) -> Result<usize, ReconcileError> {
        let latest = stores.storage.latest_statuses().await?;
        let mut recovered = 0;
        for entry in stores.tracking.list().await? {
            let Listed::Valid(tracked) = entry else { continue };
            let release = tracked.record.release_name.clone();
            // Only what the agent started: a pending revision without a `progressing` record
            // is someone else's operation (see `plan::plan`).
            // Only from the agent's own record (canonical Secret, not an adoption request).
            let interrupted = tracked.record.phase == Phase::Progressing && tracked.is_own_record();
            if let Some((revision, status)) = latest.get(&release).filter(|(_, status)| status.is_pending())
                && !interrupted
            {
                tracing::warn!(%release, revision, %status, "a pending helm operation the agent did not start; leaving it alone");
            }
            if !interrupted || validate::release_name(&release).is_err() {
                continue;
            }
            // One release failing (a corrupt Helm Secret, a failed API call) is that
            // release's problem: its worker retries and reports it; the others go on.
            match self.recover_release(namespace, stores, &release).await {
                Ok(true) => recovered += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%release, %error, "start-up recovery of a release failed; the worker retries")
                }
            }
        }
        Ok(recovered)
    }

    /// Recovers one interrupted release; true when it was settled.
    async fn recover_release(&self, namespace: &str, stores: &Stores, release: &str) -> Result<bool, ReconcileError> {
        let inner = &self.inner;
        let key = ReleaseKey::new(namespace, release);
        let lock = inner.op_lock(&key);
        // A worker holding the lock already took the release over (it recovers too).
        let Ok(_guard) = lock.try_lock() else {
            return Ok(false);
        };
        // Read again under the lock: a worker may have recovered it already.
        let Some(tracked) = stores.tracking.find(release).await?.filter(Tracked::is_own_record) else {
            return Ok(false);
        };
        let latest = stores.storage.latest(release).await?;
        let timeout = inner.options_of(&key).timeout;
        match recovery::recover(
            &inner.helm,
            &stores.tracking,
            &stores.storage,
            &tracked,
            latest,
            timeout,
        )
        .await
        .map_err(|error| ReconcileError::Recovery(Box::new(error)))?
        {
            Outcome::Settled(_) => Ok(true),
            Outcome::Waiting(message) => {
                tracing::info!(%release, reason = %message, "leaving recovery to the worker");
                Ok(false)
            }
        }
    }

    /// Every release the agent tracks in the current namespace.
    pub async fn list_releases(&self) -> Result<Vec<ReleaseInfo>, ReconcileError> {
        let namespace = self.inner.current_namespace();
        let stores = Stores::new(&self.inner.client, &namespace);
        let entries = stores.tracking.list().await?;
        let names: BTreeSet<String> = entries
            .iter()
            .filter_map(|entry| match entry {
                Listed::Valid(tracked) => Some(tracked.record.release_name.clone()),
                Listed::Broken { release, .. } => release.clone(),
            })
            .collect();
        let latest = stores.storage.latest_of_each(&names).await?;
        // A release whose latest Helm Secret is unreadable is listed with that said.
        let latest_of = |release: &str| match latest.get(release) {
            Some(Ok(stored)) => (Some(stored), false),
            Some(Err(error)) => {
                tracing::warn!(release, %error, "cannot read the latest helm revision");
                (None, true)
            }
            None => (None, false),
        };
        let mut releases = Vec::new();
        for entry in entries {
            let (release, record) = match &entry {
                Listed::Valid(tracked) => (tracked.record.release_name.clone(), Some(&tracked.record)),
                Listed::Broken {
                    release: Some(release), ..
                } => (release.clone(), None),
                Listed::Broken { release: None, .. } => continue,
            };
            let (stored, unreadable) = latest_of(&release);
            let mut info = self.release_info(&namespace, &release, record, stored);
            if record.is_none() {
                "invalid".clone_into(&mut info.phase);
            }
            if unreadable {
                UNREADABLE_HELM_STATUS.clone_into(&mut info.helm_status);
            }
            releases.push(info);
        }
        releases.sort_by(|a, b| a.release_name.cmp(&b.release_name));
        Ok(releases)
    }

    /// One tracked release with its history and resource health; `None` when the agent
    /// does not track it.
    pub async fn get_release(&self, release: &str) -> Result<Option<ReleaseDetail>, ReconcileError> {
        validate::release_name(release)?;
        let namespace = self.inner.current_namespace();
        let stores = Stores::new(&self.inner.client, &namespace);
        let Some(tracked) = stores.tracking.find(release).await? else {
            return Ok(None);
        };
        let history = stores.storage.history(release).await?;
        let info = self.release_info(&namespace, release, Some(&tracked.record), history.last());
        let resources = match history.last().map(|latest| manifest::parse(&latest.manifest)) {
            Some(Ok(objects)) => self.inner.health.check(&namespace, &objects).await,
            Some(Err(error)) => {
                tracing::warn!(release, %error, "cannot parse the release manifest");
                Vec::new()
            }
            None => Vec::new(),
        };
        let history = history
            .iter()
            .rev()
            .map(|revision| HelmRevisionInfo {
                revision: revision.revision,
                status: revision.status.to_string(),
                chart: revision.chart(),
                app_version: revision.app_version.clone(),
                description: revision.description.clone(),
                updated: revision.last_deployed,
            })
            .collect();
        Ok(Some(ReleaseDetail {
            release: info,
            history,
            resources,
        }))
    }

    /// An operator's rollback of a tracked release to `revision` (`None`: the previous one).
    /// The new Helm revision is recorded in the tracking Secret, so no revision skew follows.
    pub async fn rollback(&self, release: &str, revision: Option<u32>) -> Result<u32, ReconcileError> {
        validate::release_name(release)?;
        let inner = &self.inner;
        let namespace = inner.current_namespace();
        let key = ReleaseKey::new(&namespace, release);
        let lock = inner.op_lock(&key);
        let _guard = tokio::time::timeout(LOCK_WAIT, lock.lock())
            .await
            .map_err(|_| ReconcileError::Busy(release.to_owned()))?;
        let stores = Stores::new(&inner.client, &namespace);
        let tracked = stores
            .tracking
            .find(release)
            .await?
            .ok_or_else(|| ReconcileError::NotTracked(release.to_owned()))?;
        if tracked.record.is_adoption_request() {
            return Err(ReconcileError::NotTracked(release.to_owned()));
        }
        let before = stores
            .storage
            .latest(release)
            .await?
            .ok_or_else(|| ReconcileError::NotInstalled(release.to_owned()))?;
        let options = inner.options_of(&key);
        let mut slot = inner.helm_slot().await.ok_or(ReconcileError::ShuttingDown)?;
        let mut record = TrackingRecord {
            phase: Phase::Progressing,
            ..tracked.record.clone()
        };
        stores.tracking.save(&record).await?;
        tracing::info!(release, ?revision, "manual rollback");
        let result = slot
            .run(inner.helm.rollback(&namespace, release, revision, &options))
            .await;
        let after = stores.storage.latest(release).await?;
        record.helm_revision = after.as_ref().map(|after| after.revision);
        match result {
            Ok(()) => {
                record.phase = Phase::Ready;
                // The Hub's revision no longer runs: its status says so (see the worker).
                record.rolled_back_to = record.helm_revision;
                stores.tracking.save(&record).await?;
                tracing::info!(release, helm_revision = ?record.helm_revision, "manual rollback done");
                Ok(record.helm_revision.unwrap_or_default())
            }
            Err(source) => {
                record.phase = if record.helm_revision == Some(before.revision) {
                    tracked.record.phase
                } else {
                    Phase::Failed
                };
                stores.tracking.save(&record).await?;
                Err(ReconcileError::Helm {
                    operation: "rollback",
                    release: release.to_owned(),
                    source,
                })
            }
        }
    }

    /// Stops the workers: no new operation starts; Helm operations in flight are asked to
    /// stop (SIGTERM) and get `grace` to record that and exit. Their intent is already in the
    /// tracking Secret, so whatever is still cut short is recovered on the next start.
    /// Returns whether every operation ended within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        // Helm stops gracefully on SIGTERM and records what it did (see
        // `HelmDriver::terminate_all`); the workers then record the operation as cut short.
        let stopping = self.inner.helm.terminate_all();
        if stopping > 0 {
            tracing::info!(helm_processes = stopping, "asked the running helm operations to stop");
        }
        if tokio::time::timeout(grace, self.inner.tasks.wait()).await.is_err() {
            tracing::warn!(
                ?grace,
                "helm operations still running at shutdown; they are recovered on the next start"
            );
            return false;
        }
        true
    }

    fn release_info(
        &self,
        namespace: &str,
        release_name: &str,
        record: Option<&TrackingRecord>,
        latest: Option<&StoredRelease>,
    ) -> ReleaseInfo {
        let release_name = release_name.to_owned();
        ReleaseInfo {
            status: self.inner.statuses.get(&ReleaseKey::new(namespace, &release_name)),
            deployment_id: record.map(|record| record.id.clone()).unwrap_or_default(),
            revision_id: record.map(|record| record.revision_id.clone()).unwrap_or_default(),
            tracked_revision: record.and_then(|record| record.helm_revision),
            helm_revision: latest.map(|latest| latest.revision),
            helm_status: latest.map(|latest| latest.status.to_string()).unwrap_or_default(),
            phase: record
                .map(|record| record.phase.as_str().to_owned())
                .unwrap_or_default(),
            chart: latest.map(StoredRelease::chart).unwrap_or_default(),
            release_name,
        }
    }
}

/// The ids of the deployments (with a valid release name) claiming each release name.
fn claims_by_release(deployments: &[Deployment]) -> HashMap<String, Vec<String>> {
    let mut claims: HashMap<String, Vec<String>> = HashMap::new();
    for deployment in deployments {
        if validate::release_name(&deployment.release_name).is_ok() {
            claims
                .entry(deployment.release_name.clone())
                .or_default()
                .push(deployment.id.clone());
        }
    }
    claims
}

/// Which of several deployments claiming one release name gets it: the one the tracking
/// Secret names (`owner`), else the one being reconciled (`current`), else the smallest id,
/// so that the choice does not depend on the order of the Hub's list.
fn pick_claimant<'a>(claimants: &'a [String], owner: Option<&str>, current: Option<&str>) -> Option<&'a str> {
    let find = |wanted: Option<&str>| {
        let wanted = wanted?;
        claimants
            .iter()
            .find(|id| id.eq_ignore_ascii_case(wanted))
            .map(String::as_str)
    };
    find(owner).or_else(|| find(current)).or_else(|| {
        claimants
            .iter()
            .min_by_key(|id| id.to_ascii_lowercase())
            .map(String::as_str)
    })
}

/// An `error` status that is not recorded (a deployment that never gets a worker).
fn error_status(deployment: &Deployment, message: &str, now: DateTime<Utc>) -> DeploymentStatus {
    DeploymentStatus {
        deployment_id: deployment.id.clone(),
        revision_id: deployment.revision_id.clone(),
        release_name: deployment.release_name.clone(),
        status: Status {
            kind: StatusKind::Error,
            message: message.to_owned(),
            changed_at: now,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::helm::HelmConfig;

    /// A reconciler whose API server and Helm are unreachable: `sync` answers without them.
    fn offline_reconciler(scratch: &std::path::Path) -> Reconciler {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let helm = HelmDriver::new(HelmConfig {
            bin: "/nonexistent/helm".into(),
            scratch_dir: scratch.to_owned(),
            allow_http_charts: false,
        })
        .unwrap();
        Reconciler::new(
            client,
            helm,
            "apps".into(),
            Scope::Namespace,
            HelmLimits {
                concurrent: 1,
                active_phase: Duration::from_millis(200),
                processes: 4,
            },
        )
    }

    fn deployment(id: &str, release: &str) -> Deployment {
        Deployment {
            id: id.into(),
            revision_id: format!("{id}-r1"),
            release_name: release.into(),
            chart_url: "oci://registry.example.com/charts/web".into(),
            chart_version: "1.0.0".into(),
            ..Deployment::default()
        }
    }

    /// The deployments refused because another one owns their release name.
    fn refused(statuses: &[DeploymentStatus]) -> Vec<&str> {
        statuses
            .iter()
            .filter(|status| status.status.message == "release name web is used by another deployment")
            .map(|status| status.deployment_id.as_str())
            .collect()
    }

    #[tokio::test]
    async fn a_retired_release_leaves_nothing_behind_in_the_per_release_maps() {
        let scratch = tempfile::tempdir().unwrap();
        let reconciler = offline_reconciler(scratch.path());
        let inner = &reconciler.inner;
        let (gone, held) = (ReleaseKey::new("apps", "gone"), ReleaseKey::new("apps", "held"));
        drop(inner.op_lock(&gone));
        inner.set_owner(&gone, Some("d1"));
        let in_use = inner.op_lock(&held);
        let (_sender, receiver) = watch::channel(None);
        assert!(inner.retire(&gone, &receiver));
        assert_eq!(inner.owner_of(&gone), None);
        let locks = inner.op_locks.lock().unwrap();
        assert!(!locks.contains_key(&gone), "the lock nobody holds is dropped");
        assert!(locks.contains_key(&held), "a lock in use stays");
        drop(locks);
        drop(in_use);
    }

    #[tokio::test]
    async fn the_watches_of_a_namespace_no_release_needs_stop() {
        let scratch = tempfile::tempdir().unwrap();
        let reconciler = offline_reconciler(scratch.path());
        let inner = &reconciler.inner;
        let cluster = &inner.cluster;
        let old = ReleaseKey::new("old", "web");
        let _ = cluster.secrets("old");
        let _ = cluster.objects().pod_problem("old", &Default::default());
        let _ = cluster.secrets("apps");
        let (_sender, receiver) = watch::channel(None);
        assert!(inner.retire(&old, &receiver));
        assert_eq!(
            cluster.watched_namespaces(),
            ["apps"],
            "the agent's own namespace stays watched"
        );
        assert!(cluster.objects().pod_watch_namespaces().is_empty());
    }

    #[tokio::test]
    async fn duplicate_release_names_have_a_winner_that_does_not_follow_the_order() {
        let scratch = tempfile::tempdir().unwrap();
        let reconciler = offline_reconciler(scratch.path());
        let (a, b) = (deployment("bbbb", "web"), deployment("aaaa", "web"));
        let desired = |deployments: Vec<Deployment>| DesiredState {
            deployments,
            ..DesiredState::default()
        };
        let first = reconciler.sync(desired(vec![a.clone(), b.clone()])).await;
        let second = reconciler.sync(desired(vec![b.clone(), a.clone()])).await;
        let third = reconciler.sync(desired(vec![a.clone(), b.clone()])).await;
        assert_eq!(refused(&first), vec!["bbbb"], "{first:#?}");
        assert_eq!(refused(&second), vec!["bbbb"], "{second:#?}");
        assert_eq!(refused(&third), vec!["bbbb"], "{third:#?}");
        // The deployment the tracking Secret names wins, once a worker has read it.
        reconciler
            .inner
            .set_owner(&ReleaseKey::new("apps", "web"), Some("BBBB"));
        let owned = reconciler.sync(desired(vec![b, a])).await;
        assert_eq!(refused(&owned), vec!["aaaa"], "{owned:#?}");
        reconciler.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn unobserved_deployments_report_nothing_rather_than_progressing() {
        let scratch = tempfile::tempdir().unwrap();
        let reconciler = offline_reconciler(scratch.path());
        // As after a restart: the worker has not looked at the release yet.
        let statuses = reconciler
            .sync(DesiredState {
                deployments: vec![deployment("dep", "web")],
                ..DesiredState::default()
            })
            .await;
        assert_eq!(statuses, Vec::new());
        reconciler.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn statuses_are_read_without_a_new_desired_state() {
        let scratch = tempfile::tempdir().unwrap();
        let reconciler = offline_reconciler(scratch.path());
        assert_eq!(reconciler.statuses(), Vec::new());
        reconciler
            .sync(DesiredState {
                deployments: vec![deployment("bad", "Not A Name"), deployment("dep", "web")],
                ..DesiredState::default()
            })
            .await;
        let statuses = reconciler.statuses();
        assert_eq!(statuses.len(), 1, "{statuses:#?}");
        assert_eq!(statuses[0].deployment_id, "bad");
        assert_eq!(statuses[0].status.kind, StatusKind::Error);
        reconciler.shutdown(Duration::from_secs(5)).await;
    }

    #[test]
    fn the_claimant_is_the_owner_then_the_current_one_then_the_smallest_id() {
        let claimants = ["c".to_owned(), "a".to_owned(), "B".to_owned()];
        assert_eq!(pick_claimant(&claimants, Some("b"), Some("c")), Some("B"));
        assert_eq!(pick_claimant(&claimants, Some("gone"), Some("c")), Some("c"));
        assert_eq!(pick_claimant(&claimants, None, None), Some("a"));
        assert_eq!(pick_claimant(&[], None, None), None);
    }
}
