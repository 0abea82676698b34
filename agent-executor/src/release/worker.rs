//! The worker of one release: a tokio task that reconciles the release whenever its desired
//! deployment changes and every [`CHECK_INTERVAL`] otherwise, until the release is no longer
//! desired and has been uninstalled.
//!
//! Each pass reads the tracking Secret and Helm's storage, decides with [`plan::plan`] and
//! acts. Helm operations take a slot of the global semaphore; status checks need none.
//! Before each Helm operation the tracking record says `progressing` (with the revision
//! being deployed), after it `ready` or `failed` with Helm's latest revision.
//!
//! Failed operations:
//! - Helm recorded the attempt (a failed revision, and with `rollbackOnFailure` the rollback
//!   after it): the record keeps the attempted revision id, phase `failed` and Helm's new
//!   latest revision. The next passes see neither revision skew nor a revision to deploy;
//!   they report the failure until the Hub sends another revision.
//! - Helm left nothing behind (chart not found, registry down, an install rolled back and
//!   removed): the previous record is restored and the operation is retried with a growing
//!   delay ([`plan::retry_delay`]), as such failures are often transient.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::Change,
    cluster::pull_secret::{self, PullSecretError},
    cluster::tracking::{self, Phase, Tracked, TrackingRecord},
    helm::docker_config,
    helm::storage::{ReleaseStatus, StorageError, StoredRelease},
    helm::{ChartRequest, one_line},
    model::{ChartSource, DEFAULT_HELM_TIMEOUT, Deployment, RegistryLogin, StatusKind},
    release::ops::ReleaseOps,
    release::plan::{self, AfterFailure, Plan},
    release::recovery::Outcome,
    release::slots::HelmSlot,
    release::status_board::ReleaseKey,
    resources::health,
    resources::manifest,
    validate,
};

/// Time between two passes over a release while nothing changes (status checks from the
/// watches' verdicts: no API request unless something moved).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after a watch event before the pass it triggers, so a burst makes one pass.
const CHANGE_SETTLE: Duration = Duration::from_millis(100);
/// Longest failure message taken from Helm's history.
const MAX_MESSAGE_LEN: usize = 512;
/// Pause after a recovery before the next pass.
const AFTER_RECOVERY: Duration = Duration::from_secs(1);

/// The desired deployment of a release and what comes with it from the `sync`.
#[derive(Debug, PartialEq)]
pub(crate) struct WorkItem {
    pub namespace: String,
    pub deployment: Deployment,
    pub hub_registry: Option<RegistryLogin>,
    /// Ids of the other Hub deployments that claim the same release name.
    pub rivals: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Install,
    Upgrade,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Upgrade => "upgrade",
        }
    }
}

/// The status message of a revision an operator rolled back from.
fn rolled_back(revision: u32, chart: &str, health: &str) -> String {
    format!("rolled back by an operator: helm revision {revision} ({chart}) runs, not this revision; {health}")
}

/// A failed operation that left nothing behind, to retry later.
struct Retry {
    /// Revision id the retry is for (`""` for an uninstall).
    revision_id: String,
    attempts: u32,
    not_before: Instant,
}

/// The message of the last failed operation of a revision.
struct Failure {
    revision_id: String,
    message: String,
}

/// What a worker needs from the reconciler that runs it.
pub(crate) trait Host: Send + Sync + 'static {
    /// Records a status observation for the deployment revision; true when it changed.
    fn report(&self, key: &ReleaseKey, deployment_id: &str, revision_id: &str, kind: StatusKind, message: &str)
    -> bool;
    /// The lock that serialises operations on one release.
    fn op_lock(&self, key: &ReleaseKey) -> Arc<tokio::sync::Mutex<()>>;
    /// Remembers the deployment id the tracking Secret of the release names.
    fn set_owner(&self, key: &ReleaseKey, id: Option<&str>);
    /// A slot for one Helm operation, or `None` once shutdown began.
    fn helm_slot(&self) -> impl std::future::Future<Output = Option<HelmSlot>> + Send;
    /// Whether a worker whose release is gone may stop (no `sync` wants it again).
    fn retire(&self, key: &ReleaseKey, receiver: &watch::Receiver<Option<Arc<WorkItem>>>) -> bool;
    fn shutdown(&self) -> &CancellationToken;
    /// Changes in the cluster, from now on.
    fn changes(&self) -> broadcast::Receiver<Change>;
    fn allows_http_charts(&self) -> bool;
}

pub(crate) struct Worker<H, O> {
    host: Arc<H>,
    key: ReleaseKey,
    receiver: watch::Receiver<Option<Arc<WorkItem>>>,
    /// What it does to the cluster and Helm.
    ops: O,
    retry: Option<Retry>,
    failure: Option<Failure>,
    /// Digest of the docker config last written to the pull Secret.
    pull_secret_digest: Option<u64>,
    /// What the last full pass read, while the Secret watches say nothing moved.
    memo: Option<Memo>,
}

/// The state of a release in steady state (tracked, deployed, only health to check), valid
/// while the release's Secrets keep the fingerprint they had when it was read.
struct Memo {
    fingerprint: u64,
    /// The deployment it was read for (id, revision, skew setting, rivals).
    deployment: (String, String, bool, Vec<String>),
    tracked: Tracked,
    /// `name-version` of the chart of Helm's latest revision.
    chart: String,
    objects: Vec<manifest::ManifestObject>,
}

fn memo_key(item: &WorkItem) -> (String, String, bool, Vec<String>) {
    let deployment = &item.deployment;
    (
        deployment.id.clone(),
        deployment.revision_id.clone(),
        deployment.ignore_revision_skew,
        item.rivals.clone(),
    )
}

impl<H: Host, O: ReleaseOps> Worker<H, O> {
    pub(crate) fn new(host: Arc<H>, key: ReleaseKey, receiver: watch::Receiver<Option<Arc<WorkItem>>>, ops: O) -> Self {
        Self {
            host,
            key,
            receiver,
            ops,
            retry: None,
            failure: None,
            pull_secret_digest: None,
            memo: None,
        }
    }

    pub(crate) async fn run(mut self) {
        tracing::debug!("worker started");
        let mut changes = self.host.changes();
        loop {
            let item = self.receiver.borrow_and_update().clone();
            let wait = match item {
                Some(item) => self.reconcile(&item).await,
                None => match self.remove().await {
                    Ok(()) if self.host.retire(&self.key, &self.receiver) => {
                        tracing::debug!("worker stopped");
                        return;
                    }
                    Ok(()) => Duration::ZERO,
                    Err(delay) => delay,
                },
            };
            let deadline = Instant::now() + wait;
            loop {
                tokio::select! {
                    changed = self.receiver.changed() => if changed.is_err() { return } else { break },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = self.host.shutdown().cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(change) if !self.concerns(&change) => {}
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Let a burst of events settle into one pass.
                            tokio::time::sleep(CHANGE_SETTLE).await;
                            break;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// Whether a change in the cluster touches this release.
    fn concerns(&self, change: &Change) -> bool {
        match change {
            Change::Release { namespace, release } => *namespace == self.key.namespace && *release == self.key.release,
            Change::Object { namespace, kind, name } => self.memo.as_ref().is_some_and(|memo| {
                memo.objects.iter().any(|object| {
                    object.kind == *kind
                        && object.name == *name
                        && object.namespace.as_deref().unwrap_or(&self.key.namespace) == namespace
                })
            }),
        }
    }

    /// Records a status; true when it differs from the one before.
    fn report(&self, deployment: &Deployment, kind: StatusKind, message: &str) -> bool {
        self.host
            .report(&self.key, &deployment.id, &deployment.revision_id, kind, message)
    }

    fn report_error(&self, deployment: &Deployment, message: &str) -> Duration {
        self.report(deployment, StatusKind::Error, message);
        CHECK_INTERVAL
    }

    /// One pass over a desired release; returns the time until the next pass.
    async fn reconcile(&mut self, item: &WorkItem) -> Duration {
        let deployment = &item.deployment;
        if let Some(error) = &deployment.input_error {
            return self.report_error(deployment, error);
        }
        let source = match validate::deployment(deployment, self.host.allows_http_charts()) {
            Ok(source) => source,
            Err(error) => return self.report_error(deployment, &error.to_string()),
        };
        let lock = self.host.op_lock(&self.key);
        let _guard = lock.lock().await;
        // In steady state the watches say whether anything moved: nothing to read then.
        let fingerprint = self.ops.fingerprint(&deployment.release_name);
        if let Some(memo) = self
            .memo
            .take()
            .filter(|memo| Some(memo.fingerprint) == fingerprint && memo.deployment == memo_key(item))
        {
            return self.check_memo(item, memo).await;
        }
        let mut tracked = match self.ops.find_tracked(&deployment.release_name).await {
            Ok(tracked) => tracked,
            Err(error) => return self.report_error(deployment, &error.to_string()),
        };
        let owner = tracked
            .as_ref()
            .filter(|t| !t.record.is_adoption_request())
            .map(|t| t.record.id.as_str());
        self.host.set_owner(&self.key, owner);
        if let Some(owner) = owner
            && item.rivals.iter().any(|rival| rival.eq_ignore_ascii_case(owner))
        {
            // Another deployment of the same list owns the release: it is not replaced, and
            // the next sync hands the release to its owner.
            let message = format!("release name {} is used by another deployment", deployment.release_name);
            return self.report_error(deployment, &message);
        }
        if let Some(previous) = tracked
            .clone()
            .filter(|t| !t.record.is_adoption_request() && !t.record.belongs_to(&deployment.id))
        {
            // The Hub replaced the deployment that owned this release name (deleted and
            // recreated it): remove the old release first, as the earlier agent did.
            if let Some(wait) = self.retry_pending(&deployment.revision_id) {
                return wait;
            }
            tracing::info!(previous_deployment = %previous.record.id, "release belongs to a replaced deployment; reinstalling");
            if let Err(message) = self.uninstall(&previous, deployment.helm_options.timeout).await {
                let message = format!(
                    "cannot remove the release of replaced deployment {}: {message}",
                    previous.record.id
                );
                self.report(deployment, StatusKind::Error, &message);
                return self.schedule_retry(&deployment.revision_id);
            }
            tracked = None;
        }
        let latest = match self.ops.latest(&deployment.release_name).await {
            Ok(latest) => latest,
            Err(error) => return self.report_error(deployment, &error.to_string()),
        };
        let plan = plan::plan(
            deployment,
            tracked.as_ref().map(|tracked| &tracked.record),
            latest.as_ref(),
        );
        tracing::debug!(?plan, "planned");
        match (plan, tracked, latest) {
            (Plan::Install, tracked, latest) => self.deploy(item, &source, Operation::Install, tracked, latest).await,
            (Plan::Upgrade, tracked, latest) => self.deploy(item, &source, Operation::Upgrade, tracked, latest).await,
            (Plan::CheckHealth, Some(tracked), Some(latest)) => match manifest::parse(&latest.manifest) {
                // Helm's payload is read once per revision: the objects are kept in the memo.
                Ok(objects) => {
                    let memo = Memo {
                        // Unknown until the watches have listed: the next pass reads again.
                        fingerprint: fingerprint.unwrap_or_default(),
                        deployment: memo_key(item),
                        tracked,
                        chart: latest.chart(),
                        objects,
                    };
                    let wait = self.check_memo(item, memo).await;
                    if fingerprint.is_none() {
                        self.memo = None;
                    }
                    wait
                }
                Err(error) => self.report_error(deployment, &format!("resource status error: {error}")),
            },
            (Plan::KeepFailed, _, _) => self.keep_failed(deployment).await,
            (Plan::Recover, Some(tracked), latest) => self.recover(deployment, &tracked, latest).await,
            (Plan::Refuse(message), _, _) => {
                if self.report(deployment, StatusKind::Error, &message) {
                    tracing::warn!(reason = %message, "refusing to touch the release");
                }
                CHECK_INTERVAL
            }
            // The plan only checks health or recovers what is tracked (and installed).
            (plan, _, _) => {
                tracing::error!(?plan, "inconsistent plan");
                CHECK_INTERVAL
            }
        }
    }

    /// Install or upgrade the release to the desired revision.
    async fn deploy(
        &mut self,
        item: &WorkItem,
        source: &ChartSource,
        operation: Operation,
        tracked: Option<Tracked>,
        before: Option<StoredRelease>,
    ) -> Duration {
        let deployment = &item.deployment;
        let op = operation.name();
        if let Some(wait) = self.retry_pending(&deployment.revision_id) {
            // The error status of the last attempt stays until the retry.
            return wait;
        }
        let (options, capped) = deployment.helm_options.capped();
        let progress = match &capped {
            Some(note) => format!("helm {op} in progress ({note})"),
            None => format!("helm {op} in progress"),
        };
        self.report(deployment, StatusKind::Progressing, &progress);
        let Some(mut slot) = self.host.helm_slot().await else {
            return Duration::ZERO;
        };
        if let Some(note) = &capped {
            tracing::warn!(%note, "the Hub's helm timeout is too long");
        }
        tracing::info!(
            operation = op,
            revision = %deployment.revision_id,
            chart_version = %deployment.chart_version,
            "helm operation starting"
        );
        if let Err(error) = self.refresh_pull_secret(item, true).await {
            self.report(deployment, StatusKind::Error, &format!("{op} error: {error}"));
            return self.schedule_retry(&deployment.revision_id);
        }
        let before_revision = before.as_ref().map(|before| before.revision);
        let record = TrackingRecord {
            id: deployment.id.clone(),
            revision_id: deployment.revision_id.clone(),
            release_name: deployment.release_name.clone(),
            helm_revision: before_revision,
            phase: Phase::Progressing,
            logs_enabled: deployment.logs_enabled,
            rolled_back_to: None,
        };
        if let Err(error) = self.ops.save_tracked(&record).await {
            self.report(deployment, StatusKind::Error, &format!("{op} error: {error}"));
            return self.schedule_retry(&deployment.revision_id);
        }
        if let Some(adoption) = tracked
            .as_ref()
            .filter(|t| t.secret != tracking::secret_name(&deployment.release_name))
            && let Err(error) = self.ops.delete_tracked(&adoption.secret).await
        {
            tracing::warn!(%error, "cannot delete the adoption request");
        }
        let mut values = deployment.values.0.clone();
        pull_secret::inject(&mut values, &pull_secret::secret_name(&deployment.release_name));
        let request = ChartRequest {
            release: &deployment.release_name,
            namespace: &item.namespace,
            source,
            version: &deployment.chart_version,
            options: &options,
            values: &values,
            hub_registry: item.hub_registry.as_ref(),
            registry_auth: &deployment.registry_auth,
        };
        let result = match operation {
            Operation::Install => slot.run(self.ops.install(&request)).await,
            Operation::Upgrade => slot.run(self.ops.upgrade(&request)).await,
        };
        drop(slot);
        let after = self.ops.latest(&deployment.release_name).await;
        match result {
            Ok(()) => self.succeeded(item, operation, record, after).await,
            Err(error) => {
                let message = format!("{op} error: {error}");
                tracing::warn!(operation = op, error = %message, "helm operation failed");
                self.report(deployment, StatusKind::Error, &message);
                let previous = tracked.as_ref().map(|tracked| &tracked.record);
                if let Err(error) = &after {
                    tracing::warn!(%error, "cannot read helm's storage after a failed operation");
                }
                let after = after.as_ref().map(Option::as_ref).map_err(|_| ());
                let next = plan::after_failure(
                    operation == Operation::Upgrade,
                    &record,
                    previous,
                    before_revision,
                    after,
                    self.host.shutdown().is_cancelled(),
                );
                match next {
                    AfterFailure::KeepProgressing { retry: true } => self.schedule_retry(&deployment.revision_id),
                    AfterFailure::KeepProgressing { retry: false } => {
                        tracing::warn!("helm left a pending revision; the recovery takes it over");
                        CHECK_INTERVAL
                    }
                    AfterFailure::Interrupted(record) => {
                        tracing::info!(
                            operation = op,
                            "helm operation stopped by the shutdown; it is redone on the next start"
                        );
                        self.save_quietly(&record).await;
                        Duration::ZERO
                    }
                    AfterFailure::Failed(record) => {
                        self.save_quietly(&record).await;
                        self.failure = Some(Failure {
                            revision_id: deployment.revision_id.clone(),
                            message,
                        });
                        self.retry = None;
                        CHECK_INTERVAL
                    }
                    AfterFailure::NothingLeft(record) => {
                        self.save_quietly(&record).await;
                        self.schedule_retry(&deployment.revision_id)
                    }
                }
            }
        }
    }

    async fn succeeded(
        &mut self,
        item: &WorkItem,
        operation: Operation,
        mut record: TrackingRecord,
        after: Result<Option<StoredRelease>, StorageError>,
    ) -> Duration {
        let deployment = &item.deployment;
        self.retry = None;
        self.failure = None;
        let mut message = format!("helm {} succeeded", operation.name());
        tracing::info!(operation = operation.name(), "helm operation succeeded");
        match &after {
            Ok(after) => {
                record.phase = Phase::Ready;
                record.helm_revision = after.as_ref().map(|after| after.revision).or(record.helm_revision);
                if let Err(error) = self.ops.save_tracked(&record).await {
                    // The `progressing` record stays; the next pass settles it.
                    tracing::warn!(%error, "cannot record the successful operation");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read helm's storage; the next pass records the new revision"),
        }
        if operation == Operation::Upgrade && deployment.force_restart {
            let objects = match &after {
                Ok(Some(after)) => manifest::parse(&after.manifest).map_err(|error| error.to_string()),
                Ok(None) => Ok(Vec::new()),
                Err(error) => Err(error.to_string()),
            };
            let restarted = match objects {
                Ok(objects) => self.ops.restart(&objects).await,
                Err(error) => Err(error),
            };
            match restarted {
                Ok(count) => {
                    tracing::info!(workloads = count, "force restart done");
                    message.push_str("; force restart succeeded");
                }
                Err(error) => {
                    return self.report_error(deployment, &format!("{message}; force restart error: {error}"));
                }
            }
        }
        self.report(deployment, StatusKind::Running, &message);
        CHECK_INTERVAL
    }

    /// Nothing to deploy: keep the record and pull Secret in step and check the resources.
    /// Keeps `memo` for the next pass unless something was written.
    async fn check_memo(&mut self, item: &WorkItem, memo: Memo) -> Duration {
        let deployment = &item.deployment;
        if memo.tracked.record.logs_enabled != deployment.logs_enabled {
            let record = TrackingRecord {
                logs_enabled: deployment.logs_enabled,
                ..memo.tracked.record.clone()
            };
            // A write moves the fingerprint: the next pass reads everything again.
            if let Err(error) = self.ops.save_tracked(&record).await {
                return self.report_error(deployment, &error.to_string());
            }
        }
        // The Hub's JWT in the pull Secret expires: keep the Secret current.
        if let Err(error) = self.refresh_pull_secret(item, false).await {
            return self.report_error(deployment, &error.to_string());
        }
        let results = self.ops.check_health(&memo.objects).await;
        let (kind, mut message) = health::summarize(&results);
        if let Some(revision) = memo.tracked.record.rolled_back_to {
            // Not what the Hub asked for: say what runs instead.
            message = rolled_back(revision, &memo.chart, &message);
        }
        self.report(deployment, kind, &message);
        self.memo = Some(memo);
        CHECK_INTERVAL
    }

    /// The desired revision failed before: report it, do not retry it.
    async fn keep_failed(&mut self, deployment: &Deployment) -> Duration {
        let known = self
            .failure
            .as_ref()
            .filter(|failure| failure.revision_id == deployment.revision_id);
        let message = match known {
            Some(failure) => failure.message.clone(),
            None => {
                // After a restart: Helm's history still says what failed.
                let described = match self.ops.history(&deployment.release_name).await {
                    Ok(history) => history
                        .iter()
                        .rev()
                        .find(|r| r.status == ReleaseStatus::Failed)
                        .map(|failed| {
                            let op = if failed.revision == 1 { "install" } else { "upgrade" };
                            format!("{op} error: {}", one_line(&failed.description, MAX_MESSAGE_LEN))
                        }),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the release history");
                        None
                    }
                };
                let message = described.unwrap_or_else(|| {
                    format!(
                        "the last helm operation for revision {} failed; waiting for a new revision",
                        deployment.revision_id
                    )
                });
                self.failure = Some(Failure {
                    revision_id: deployment.revision_id.clone(),
                    message: message.clone(),
                });
                message
            }
        };
        self.report_error(deployment, &message)
    }

    async fn recover(&mut self, deployment: &Deployment, tracked: &Tracked, latest: Option<StoredRelease>) -> Duration {
        let Some(mut slot) = self.host.helm_slot().await else {
            return Duration::ZERO;
        };
        let timeout = deployment.helm_options.capped().0.timeout;
        match slot.run(self.ops.recover(tracked, latest, timeout)).await {
            Ok(Outcome::Settled(_)) => AFTER_RECOVERY,
            Ok(Outcome::Waiting(message)) => {
                self.report(deployment, StatusKind::Progressing, &message);
                CHECK_INTERVAL
            }
            Err(error) => {
                tracing::warn!(%error, "recovery failed");
                self.report(deployment, StatusKind::Error, &error.to_string());
                self.schedule_retry(&deployment.revision_id)
            }
        }
    }

    /// The release is no longer desired: uninstall it if the agent tracks it. `Err` holds
    /// the delay before the next attempt.
    async fn remove(&mut self) -> Result<(), Duration> {
        let lock = self.host.op_lock(&self.key);
        let _guard = lock.lock().await;
        let release = self.key.release.clone();
        let outcome = match self.ops.find_tracked(&release).await {
            Ok(None) => {
                if let Err(error) = self.ops.delete_pull_secret(&release).await {
                    tracing::debug!(%error, "cannot delete the pull Secret of an untracked release");
                }
                Ok(())
            }
            // An adoption request waits for the Hub to list the release; only the agent's own
            // record (its canonical Secret) leads to an uninstall.
            Ok(Some(tracked)) if !tracked.is_own_record() => Ok(()),
            Ok(Some(tracked)) => self.uninstall(&tracked, DEFAULT_HELM_TIMEOUT).await,
            Err(error) => Err(error.to_string()),
        };
        outcome.map_err(|message| {
            tracing::warn!(error = %message, "cannot uninstall the release; retrying later");
            self.schedule_retry("");
            self.retry
                .as_ref()
                .map_or(CHECK_INTERVAL, |retry| plan::retry_delay(retry.attempts))
        })
    }

    /// `helm uninstall` of this worker's release, then deletes its tracking and pull Secrets.
    /// The release name is the worker's own, never the one a record claims.
    async fn uninstall(&self, tracked: &Tracked, timeout: Duration) -> Result<(), String> {
        let release = self.key.release.as_str();
        if tracked.record.release_name != release || !tracked.is_own_record() {
            return Err(format!(
                "tracking Secret {} is not the agent's record of release {release}; not uninstalling",
                tracked.secret
            ));
        }
        let Some(mut slot) = self.host.helm_slot().await else {
            return Err("the executor is shutting down".to_owned());
        };
        let progressing = TrackingRecord {
            phase: Phase::Progressing,
            ..tracked.record.clone()
        };
        self.ops
            .save_tracked(&progressing)
            .await
            .map_err(|error| error.to_string())?;
        tracing::info!("helm uninstall starting");
        let uninstalled = slot.run(self.ops.uninstall(release, timeout)).await;
        drop(slot);
        if let Err(error) = uninstalled {
            self.save_quietly(&TrackingRecord {
                phase: Phase::Failed,
                ..tracked.record.clone()
            })
            .await;
            return Err(format!("uninstall error: {error}"));
        }
        self.ops
            .delete_tracked(&tracked.secret)
            .await
            .map_err(|error| error.to_string())?;
        self.ops
            .delete_pull_secret(release)
            .await
            .map_err(|error| error.to_string())?;
        tracing::info!("release uninstalled");
        Ok(())
    }

    /// Writes the pull Secret when forced or when its content changed since the last write.
    async fn refresh_pull_secret(&mut self, item: &WorkItem, force: bool) -> Result<(), PullSecretError> {
        let config = docker_config::build(item.hub_registry.as_ref(), &item.deployment.registry_auth);
        let mut hasher = DefaultHasher::new();
        config.hash(&mut hasher);
        let digest = hasher.finish();
        if force || self.pull_secret_digest != Some(digest) {
            self.ops
                .apply_pull_secret(&item.deployment.release_name, config)
                .await?;
            self.pull_secret_digest = Some(digest);
        }
        Ok(())
    }

    /// Time to wait before the next attempt at `revision_id`, while a retry is pending.
    fn retry_pending(&self, revision_id: &str) -> Option<Duration> {
        let retry = self.retry.as_ref().filter(|retry| retry.revision_id == revision_id)?;
        let now = Instant::now();
        (now < retry.not_before).then(|| (retry.not_before - now).min(CHECK_INTERVAL))
    }

    /// Remembers a failed attempt that left nothing behind; returns the time to the next pass.
    fn schedule_retry(&mut self, revision_id: &str) -> Duration {
        let attempts = match &self.retry {
            Some(retry) if retry.revision_id == revision_id => retry.attempts.saturating_add(1),
            _ => 1,
        };
        let delay = plan::retry_delay(attempts);
        tracing::debug!(attempts, ?delay, "retry scheduled");
        self.retry = Some(Retry {
            revision_id: revision_id.to_owned(),
            attempts,
            not_before: Instant::now() + delay,
        });
        CHECK_INTERVAL
    }

    async fn save_quietly(&self, record: &TrackingRecord) {
        if let Err(error) = self.ops.save_tracked(record).await {
            tracing::warn!(%error, "cannot update the tracking Secret");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The worker's decisions over a fake of the cluster and Helm ([`ReleaseOps`]): no API
    //! server, no `helm`.

    use std::{collections::VecDeque, sync::Mutex};

    use super::*;
    use crate::{
        cluster::{pull_secret::PullSecretError, tracking::TrackingError},
        helm::{
            HelmError,
            storage::{StorageError, StoredRelease},
        },
        release::{
            recovery::RecoveryError,
            slots::{HelmLimits, HelmSlots},
            status_board::StatusBoard,
        },
        resources::{health::ResourceHealth, manifest::ManifestObject},
    };

    /// The reconciler's side of a worker, in memory.
    struct FakeHost {
        statuses: StatusBoard,
        lock: Arc<tokio::sync::Mutex<()>>,
        slots: HelmSlots,
        shutdown: CancellationToken,
        changes: broadcast::Sender<Change>,
    }

    impl Host for FakeHost {
        fn report(
            &self,
            key: &ReleaseKey,
            deployment_id: &str,
            revision_id: &str,
            kind: StatusKind,
            message: &str,
        ) -> bool {
            self.statuses
                .report(key, deployment_id, revision_id, kind, message, chrono::Utc::now())
        }

        fn op_lock(&self, _key: &ReleaseKey) -> Arc<tokio::sync::Mutex<()>> {
            self.lock.clone()
        }

        fn set_owner(&self, _key: &ReleaseKey, _id: Option<&str>) {}

        async fn helm_slot(&self) -> Option<HelmSlot> {
            self.slots.acquire(&self.shutdown).await
        }

        fn retire(&self, _key: &ReleaseKey, _receiver: &watch::Receiver<Option<Arc<WorkItem>>>) -> bool {
            true
        }

        fn shutdown(&self) -> &CancellationToken {
            &self.shutdown
        }

        fn changes(&self) -> broadcast::Receiver<Change> {
            self.changes.subscribe()
        }

        fn allows_http_charts(&self) -> bool {
            false
        }
    }

    /// How the next Helm operation ends.
    #[derive(Clone, Copy)]
    enum HelmOutcome {
        Succeeds,
        /// Fails, and Helm records a failed revision.
        FailsRecorded,
        /// Fails before Helm records anything (chart not found, registry down).
        FailsEarly,
    }

    #[derive(Default)]
    struct Fake {
        tracked: Option<TrackingRecord>,
        /// The Secret the record sits in; `None`: the canonical one.
        tracked_secret: Option<String>,
        revisions: Vec<StoredRelease>,
        outcomes: VecDeque<HelmOutcome>,
        helm_calls: Vec<&'static str>,
        /// What the watches say of the release's Secrets.
        fingerprint: Option<u64>,
        /// Reads of the tracking Secret and of Helm's storage.
        reads: usize,
        /// How the next recoveries end (`Waiting` when none is queued); a `Settled` record
        /// becomes the tracking record.
        recoveries: VecDeque<Outcome>,
        recover_calls: usize,
    }

    #[derive(Default)]
    struct FakeOps(Mutex<Fake>);

    impl FakeOps {
        fn state(&self) -> std::sync::MutexGuard<'_, Fake> {
            self.0.lock().unwrap()
        }

        fn helm(&self, operation: &'static str) -> Result<(), HelmError> {
            let mut state = self.state();
            state.helm_calls.push(operation);
            let outcome = state.outcomes.pop_front().unwrap_or(HelmOutcome::Succeeds);
            let revision = state.revisions.last().map_or(1, |last| last.revision + 1);
            let status = match outcome {
                HelmOutcome::Succeeds => ReleaseStatus::Deployed,
                HelmOutcome::FailsRecorded => ReleaseStatus::Failed,
                HelmOutcome::FailsEarly => {
                    return Err(HelmError::Failed {
                        operation,
                        message: "chart not found".into(),
                    });
                }
            };
            state.revisions.push(StoredRelease::for_test(revision, status));
            match outcome {
                HelmOutcome::Succeeds => Ok(()),
                _ => Err(HelmError::Failed {
                    operation,
                    message: "context deadline exceeded".into(),
                }),
            }
        }
    }

    impl ReleaseOps for Arc<FakeOps> {
        async fn find_tracked(&self, release: &str) -> Result<Option<Tracked>, TrackingError> {
            let mut state = self.state();
            state.reads += 1;
            let secret = state.tracked_secret.clone();
            Ok(state
                .tracked
                .clone()
                .filter(|record| record.release_name == release)
                .map(|record| Tracked {
                    secret: secret.unwrap_or_else(|| tracking::secret_name(&record.release_name)),
                    record,
                }))
        }

        async fn save_tracked(&self, record: &TrackingRecord) -> Result<(), TrackingError> {
            let mut state = self.state();
            state.tracked = Some(record.clone());
            // The agent writes the canonical Secret; a write moves the watches' fingerprint.
            state.tracked_secret = None;
            state.fingerprint = state.fingerprint.map(|f| f + 1);
            Ok(())
        }

        async fn delete_tracked(&self, _secret: &str) -> Result<(), TrackingError> {
            let mut state = self.state();
            state.tracked = None;
            state.fingerprint = state.fingerprint.map(|f| f + 1);
            Ok(())
        }

        async fn latest(&self, _release: &str) -> Result<Option<StoredRelease>, StorageError> {
            let mut state = self.state();
            state.reads += 1;
            Ok(state.revisions.last().cloned())
        }

        async fn history(&self, _release: &str) -> Result<Vec<StoredRelease>, StorageError> {
            Ok(self.state().revisions.clone())
        }

        async fn apply_pull_secret(&self, _release: &str, _config: Vec<u8>) -> Result<(), PullSecretError> {
            Ok(())
        }

        async fn delete_pull_secret(&self, _release: &str) -> Result<(), PullSecretError> {
            Ok(())
        }

        async fn install(&self, _request: &ChartRequest<'_>) -> Result<(), HelmError> {
            self.helm("install")
        }

        async fn upgrade(&self, _request: &ChartRequest<'_>) -> Result<(), HelmError> {
            self.helm("upgrade")
        }

        async fn uninstall(&self, _release: &str, _timeout: Duration) -> Result<(), HelmError> {
            let mut state = self.state();
            state.helm_calls.push("uninstall");
            state.revisions.clear();
            Ok(())
        }

        async fn recover(
            &self,
            _tracked: &Tracked,
            _latest: Option<StoredRelease>,
            _timeout: Duration,
        ) -> Result<Outcome, RecoveryError> {
            let mut state = self.state();
            state.recover_calls += 1;
            let outcome = state
                .recoveries
                .pop_front()
                .unwrap_or_else(|| Outcome::Waiting("recovering".into()));
            if let Outcome::Settled(record) = &outcome {
                state.tracked = Some(record.clone());
            }
            Ok(outcome)
        }

        async fn check_health(&self, _objects: &[ManifestObject]) -> Vec<ResourceHealth> {
            vec![ResourceHealth {
                kind: "Deployment".into(),
                name: "web".into(),
                healthy: true,
                message: String::new(),
            }]
        }

        async fn restart(&self, _objects: &[ManifestObject]) -> Result<usize, String> {
            Ok(0)
        }

        fn fingerprint(&self, _release: &str) -> Option<u64> {
            self.state().fingerprint
        }
    }

    struct Setup {
        worker: Worker<FakeHost, Arc<FakeOps>>,
        ops: Arc<FakeOps>,
        host: Arc<FakeHost>,
    }

    /// A worker over fakes of its host and of the cluster and Helm.
    fn setup() -> Setup {
        let host = Arc::new(FakeHost {
            statuses: StatusBoard::default(),
            lock: Arc::default(),
            slots: HelmSlots::new(HelmLimits {
                concurrent: 1,
                active_phase: Duration::from_secs(45),
                processes: 1,
            }),
            shutdown: CancellationToken::new(),
            changes: broadcast::channel(16).0,
        });
        let ops = Arc::new(FakeOps::default());
        let (_sender, receiver) = watch::channel(None);
        let worker = Worker::new(host.clone(), ReleaseKey::new("apps", "web"), receiver, ops.clone());
        Setup { worker, ops, host }
    }

    fn item(revision: &str) -> WorkItem {
        WorkItem {
            namespace: "apps".into(),
            deployment: Deployment {
                id: "3f8e2a4c-0000-4e7f-9a2c-5b8d1e4f7a90".into(),
                revision_id: revision.into(),
                release_name: "web".into(),
                chart_url: "oci://registry.example/charts/web".into(),
                chart_version: "1.0.0".into(),
                ..Deployment::default()
            },
            hub_registry: None,
            rivals: Vec::new(),
        }
    }

    fn status(setup: &Setup) -> (StatusKind, String) {
        let status = setup.host.statuses.get(&ReleaseKey::new("apps", "web")).unwrap().status;
        (status.kind, status.message)
    }

    #[tokio::test]
    async fn a_new_release_is_installed_once_then_only_checked() {
        let mut setup = setup();
        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(setup.ops.state().helm_calls, ["install"]);
        assert_eq!(status(&setup), (StatusKind::Running, "helm install succeeded".into()));
        let tracked = setup.ops.state().tracked.clone().unwrap();
        assert_eq!((tracked.phase, tracked.helm_revision), (Phase::Ready, Some(1)));

        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(setup.ops.state().helm_calls, ["install"], "nothing to deploy");
        assert_eq!(status(&setup).0, StatusKind::Healthy);
    }

    #[tokio::test]
    async fn an_upgrade_helm_recorded_as_failed_is_reported_not_retried() {
        let mut setup = setup();
        setup.worker.reconcile(&item("rev-1")).await;
        setup.ops.state().outcomes.push_back(HelmOutcome::FailsRecorded);
        setup.worker.reconcile(&item("rev-2")).await;
        assert_eq!(setup.ops.state().helm_calls, ["install", "upgrade"]);
        let failed = (StatusKind::Error, "upgrade error: context deadline exceeded".to_owned());
        assert_eq!(status(&setup), failed);
        let tracked = setup.ops.state().tracked.clone().unwrap();
        assert_eq!(
            (tracked.revision_id.as_str(), tracked.phase, tracked.helm_revision),
            ("rev-2", Phase::Failed, Some(2))
        );

        setup.worker.reconcile(&item("rev-2")).await;
        assert_eq!(
            setup.ops.state().helm_calls.len(),
            2,
            "the same revision is not tried again"
        );
        assert_eq!(status(&setup), failed);

        setup.worker.reconcile(&item("rev-3")).await;
        assert_eq!(
            setup.ops.state().helm_calls,
            ["install", "upgrade", "upgrade"],
            "a new revision is"
        );
        assert_eq!(status(&setup).0, StatusKind::Running);
    }

    #[tokio::test]
    async fn an_install_that_left_nothing_is_retried_later_not_at_once() {
        let mut setup = setup();
        setup.ops.state().outcomes.push_back(HelmOutcome::FailsEarly);
        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(
            status(&setup),
            (StatusKind::Error, "install error: chart not found".into())
        );
        let tracked = setup.ops.state().tracked.clone().unwrap();
        assert_eq!((tracked.phase, tracked.helm_revision), (Phase::Failed, None));

        let wait = setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(setup.ops.state().helm_calls, ["install"], "the retry waits");
        assert!(wait <= CHECK_INTERVAL);
        assert_eq!(status(&setup).0, StatusKind::Error);
    }

    #[tokio::test]
    async fn a_release_that_is_no_longer_desired_is_uninstalled_and_forgotten() {
        let mut setup = setup();
        setup.worker.reconcile(&item("rev-1")).await;
        setup.worker.remove().await.unwrap();
        assert_eq!(setup.ops.state().helm_calls, ["install", "uninstall"]);
        assert!(setup.ops.state().tracked.is_none());
        setup.worker.remove().await.unwrap();
        assert_eq!(setup.ops.state().helm_calls.len(), 2, "nothing tracked: nothing to do");
    }

    fn record(id: &str, revision: &str, helm_revision: Option<u32>, phase: Phase) -> TrackingRecord {
        TrackingRecord {
            id: id.into(),
            revision_id: revision.into(),
            release_name: "web".into(),
            helm_revision,
            phase,
            logs_enabled: false,
            rolled_back_to: None,
        }
    }

    const OWN_ID: &str = "3f8e2a4c-0000-4e7f-9a2c-5b8d1e4f7a90";
    const OTHER_ID: &str = "9d1c7b6a-1111-4f2e-8b3a-6c5d4e3f2a10";

    #[tokio::test]
    async fn in_steady_state_a_pass_reads_nothing_while_the_watches_say_nothing_moved() {
        let mut setup = setup();
        setup.ops.state().fingerprint = Some(7);
        setup.worker.reconcile(&item("rev-1")).await;
        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(status(&setup).0, StatusKind::Healthy);
        let reads = setup.ops.state().reads;
        for _ in 0..3 {
            setup.worker.reconcile(&item("rev-1")).await;
        }
        assert_eq!(setup.ops.state().reads, reads, "checked from the memo");
        assert_eq!(status(&setup).0, StatusKind::Healthy);

        // Something moved (another writer, Helm): the next pass reads again.
        setup.ops.state().fingerprint = Some(99);
        setup.worker.reconcile(&item("rev-1")).await;
        assert!(setup.ops.state().reads > reads);
        // So does a new revision from the Hub, whatever the watches say.
        let reads = setup.ops.state().reads;
        setup.worker.reconcile(&item("rev-2")).await;
        assert!(setup.ops.state().reads > reads);
        assert_eq!(setup.ops.state().helm_calls, ["install", "upgrade"]);
    }

    #[tokio::test]
    async fn until_the_watches_listed_every_pass_reads() {
        let mut setup = setup();
        setup.worker.reconcile(&item("rev-1")).await;
        setup.worker.reconcile(&item("rev-1")).await;
        let reads = setup.ops.state().reads;
        setup.worker.reconcile(&item("rev-1")).await;
        assert!(setup.ops.state().reads > reads, "no fingerprint, no memo");
    }

    #[tokio::test]
    async fn an_interrupted_operation_is_recovered_by_the_worker() {
        let mut setup = setup();
        {
            let mut state = setup.ops.state();
            state.tracked = Some(record(OWN_ID, "rev-1", None, Phase::Progressing));
            state
                .revisions
                .push(StoredRelease::for_test(1, ReleaseStatus::PendingInstall));
            state
                .recoveries
                .push_back(Outcome::Waiting("waiting for the interrupted helm operation".into()));
        }
        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(setup.ops.state().recover_calls, 1);
        assert_eq!(
            status(&setup),
            (
                StatusKind::Progressing,
                "waiting for the interrupted helm operation".into()
            )
        );

        // The recovery settles it (Helm's revision finished): the next pass checks its health.
        {
            let mut state = setup.ops.state();
            state.revisions = vec![StoredRelease::for_test(1, ReleaseStatus::Deployed)];
            let settled = record(OWN_ID, "rev-1", Some(1), Phase::Ready);
            state.recoveries.push_back(Outcome::Settled(settled));
        }
        setup.worker.reconcile(&item("rev-1")).await;
        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(setup.ops.state().recover_calls, 2);
        assert!(setup.ops.state().helm_calls.is_empty(), "no helm operation of its own");
        assert_eq!(status(&setup).0, StatusKind::Healthy);
    }

    #[tokio::test]
    async fn the_release_of_a_replaced_deployment_is_uninstalled_then_installed() {
        let mut setup = setup();
        {
            let mut state = setup.ops.state();
            state.tracked = Some(record(OTHER_ID, "old", Some(1), Phase::Ready));
            state
                .revisions
                .push(StoredRelease::for_test(1, ReleaseStatus::Deployed));
        }
        setup.worker.reconcile(&item("rev-1")).await;
        assert_eq!(setup.ops.state().helm_calls, ["uninstall", "install"]);
        let tracked = setup.ops.state().tracked.clone().unwrap();
        assert_eq!((tracked.id.as_str(), tracked.phase), (OWN_ID, Phase::Ready));
    }

    #[tokio::test]
    async fn a_release_its_rival_deployment_owns_is_left_to_it() {
        let mut setup = setup();
        {
            let mut state = setup.ops.state();
            state.tracked = Some(record(OTHER_ID, "theirs", Some(1), Phase::Ready));
            state
                .revisions
                .push(StoredRelease::for_test(1, ReleaseStatus::Deployed));
        }
        let mut contested = item("rev-1");
        contested.rivals = vec![OTHER_ID.to_uppercase()];
        setup.worker.reconcile(&contested).await;
        assert!(setup.ops.state().helm_calls.is_empty(), "neither replaced nor upgraded");
        assert_eq!(
            status(&setup),
            (
                StatusKind::Error,
                "release name web is used by another deployment".into()
            )
        );
    }

    #[tokio::test]
    async fn the_record_of_another_release_is_not_this_one_s() {
        let mut setup = setup();
        setup.ops.state().tracked = Some(TrackingRecord {
            release_name: "db".into(),
            ..record(OTHER_ID, "theirs", Some(1), Phase::Ready)
        });
        setup.worker.remove().await.unwrap();
        assert!(setup.ops.state().helm_calls.is_empty());
        assert!(setup.ops.state().tracked.is_some(), "db's record kept");
    }

    #[tokio::test]
    async fn a_record_outside_the_canonical_secret_never_leads_to_an_uninstall() {
        let mut setup = setup();
        {
            let mut state = setup.ops.state();
            state.tracked = Some(record(OTHER_ID, "theirs", Some(1), Phase::Ready));
            state.tracked_secret = Some("planted-web".into());
            state
                .revisions
                .push(StoredRelease::for_test(1, ReleaseStatus::Deployed));
        }
        setup.worker.remove().await.unwrap();
        assert!(setup.ops.state().helm_calls.is_empty(), "not uninstalled");
        let uninstall = setup
            .worker
            .uninstall(
                &Tracked {
                    secret: "planted-web".into(),
                    record: record(OTHER_ID, "theirs", Some(1), Phase::Ready),
                },
                Duration::from_secs(1),
            )
            .await;
        assert!(uninstall.is_err_and(|error| error.contains("not the agent's record")));
        assert!(setup.ops.state().helm_calls.is_empty());
    }

    #[tokio::test]
    async fn after_an_operator_s_rollback_the_status_names_it_and_what_runs() {
        let mut setup = setup();
        setup.worker.reconcile(&item("rev-1")).await;
        {
            // As `Reconciler::rollback` leaves it: Helm's new revision 2 (a copy of an older
            // one), recorded with the roll-back.
            let mut state = setup.ops.state();
            state
                .revisions
                .push(StoredRelease::for_test(2, ReleaseStatus::Deployed));
            let mut tracked = state.tracked.clone().unwrap();
            tracked.helm_revision = Some(2);
            tracked.rolled_back_to = Some(2);
            state.tracked = Some(tracked);
        }
        setup.worker.reconcile(&item("rev-1")).await;
        let (kind, message) = status(&setup);
        assert_eq!(kind, StatusKind::Healthy);
        assert!(
            message.starts_with("rolled back by an operator: helm revision 2 ("),
            "{message}"
        );
        assert!(
            message.contains("runs, not this revision; status check passed"),
            "{message}"
        );
        assert_eq!(setup.ops.state().helm_calls, ["install"], "no upgrade back");
    }
}
