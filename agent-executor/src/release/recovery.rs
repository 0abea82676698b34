//! Recovery of a release whose last operation was interrupted: the tracking phase says
//! `progressing` (the executor died between writing its intent and its outcome), or Helm's
//! latest revision is `pending-*` (the `helm` process died with it).
//!
//! Kept simple on purpose:
//! - Only operations the agent started (tracking phase `progressing`) are taken over; a
//!   pending revision without that is someone else's and left alone.
//! - A pending revision younger than the operation's timeout plus margins may still belong
//!   to a live `helm` (the previous executor pod during a rolling update): wait for it;
//!   unless the executor's fence knows that every `helm` of the executors before it has ended
//!   (its predecessor was its container's first process and is gone: [`crate::fence`]), and
//!   the revision was written before.
//! - An older `pending-install` is uninstalled (the install never completed, and a fresh
//!   install follows); an older `pending-upgrade`/`pending-rollback` is rolled back to the
//!   revision before it, without waiting for resources, so Helm accepts operations again.
//! - The tracking record is then settled against Helm's latest revision (see
//!   [`crate::release::plan::settle`]): an interrupted upgrade is retried, a finished one recorded.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{
    cluster::tracking::{Tracked, TrackingError, TrackingRecord, TrackingStore},
    helm::storage::{HelmStorage, ReleaseStatus, StorageError, StoredRelease},
    helm::{self, HelmDriver, HelmError, OPERATION_MARGIN},
    release::plan,
};

/// Extra wait, beyond the operation's own limit, before a pending revision is taken over.
const TAKEOVER_SLACK: Duration = Duration::from_secs(60);

/// Errors of a recovery (all retryable on a later pass).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("cannot recover the interrupted helm operation on {release}: {source}")]
    Helm {
        release: String,
        #[source]
        source: HelmError,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Tracking(#[from] TrackingError),
}

/// What a recovery achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The release is consistent again; this is its tracking record now.
    Settled(TrackingRecord),
    /// A pending revision may still be worked on by a live `helm`; try again later.
    Waiting(String),
}

/// Recovers one release. `latest` is Helm's latest revision as just read; `timeout` is the
/// release's Helm timeout. The caller holds the release's operation lock.
pub async fn recover(
    helm_driver: &HelmDriver,
    tracking: &TrackingStore,
    storage: &HelmStorage,
    tracked: &Tracked,
    latest: Option<StoredRelease>,
    timeout: Duration,
) -> Result<Outcome, RecoveryError> {
    let record = &tracked.record;
    let release = record.release_name.as_str();
    let namespace = tracking.namespace();
    if !tracked.is_own_record() {
        // Only the agent's own record (its canonical Secret) leads to a roll-back or an
        // uninstall; the callers never get here with another.
        return Ok(Outcome::Waiting(format!(
            "tracking Secret {} is not the agent's record of {release}; not recovering from it",
            tracked.secret
        )));
    }
    let mut latest = latest;
    let mut undone = false;
    if let Some(pending) = latest.as_ref().filter(|latest| latest.status.is_pending()) {
        if record.phase != crate::cluster::tracking::Phase::Progressing {
            // Not the agent's operation: never taken over.
            return Ok(Outcome::Waiting(plan::foreign_pending(release, pending)));
        }
        let grace = timeout + OPERATION_MARGIN + TAKEOVER_SLACK;
        let abandoned = crate::fence::earlier_helm_ended_before()
            .is_some_and(|ended| pending.last_deployed.is_some_and(|written| written < ended));
        if abandoned {
            tracing::info!(
                release,
                revision = pending.revision,
                "the helm of this interrupted operation ended with the executor that ran it: taking it over now"
            );
        } else if may_still_run(pending.last_deployed, Utc::now(), grace) {
            return Ok(Outcome::Waiting(format!(
                "waiting for the interrupted helm operation on {release} ({} of revision {}) to finish or time out",
                pending.status, pending.revision
            )));
        }
        let helm_error = |source| RecoveryError::Helm {
            release: release.to_owned(),
            source,
        };
        if pending.status == ReleaseStatus::PendingInstall {
            tracing::warn!(
                release,
                revision = pending.revision,
                "uninstalling an interrupted install"
            );
            helm_driver
                .uninstall(namespace, release, timeout)
                .await
                .map_err(helm_error)?;
        } else {
            tracing::warn!(release, revision = pending.revision, status = %pending.status, "rolling back an interrupted operation");
            let options = helm::recovery_rollback_options(timeout);
            helm_driver
                .rollback(namespace, release, None, &options)
                .await
                .map_err(helm_error)?;
        }
        undone = true;
        latest = storage.latest(release).await?;
    }
    let history = storage.revision_statuses(release).await?;
    let settled = plan::settle(record, latest.as_ref(), undone, &history);
    tracking.save(&settled).await?;
    if tracked.secret != crate::cluster::tracking::secret_name(release) {
        tracking.delete(&tracked.secret).await?;
    }
    tracing::info!(
        release,
        phase = settled.phase.as_str(),
        helm_revision = ?settled.helm_revision,
        "recovered an interrupted operation"
    );
    Ok(Outcome::Settled(settled))
}

/// Whether an operation started at `started` may still be running under a limit of `grace`.
/// Unknown start times do not hold recovery up; start times in the future (clock skew) do.
fn may_still_run(started: Option<DateTime<Utc>>, now: DateTime<Utc>, grace: Duration) -> bool {
    started.is_some_and(|started| (now - started).to_std().ok().is_none_or(|age| age < grace))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn young_pending_operations_are_left_alone() {
        let now = DateTime::from_timestamp(10_000, 0).unwrap();
        let grace = Duration::from_secs(420);
        let started = |seconds_ago: i64| Some(now - chrono::Duration::seconds(seconds_ago));
        assert!(may_still_run(started(60), now, grace));
        assert!(!may_still_run(started(600), now, grace));
        assert!(may_still_run(started(-30), now, grace), "a start in the future waits");
        assert!(!may_still_run(None, now, grace));
    }
}
