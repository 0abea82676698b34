//! The decisions of the reconciler, as pure functions of what the tracking Secret and
//! Helm's storage say: what to do next for a release ([`plan`]), how to settle the tracking
//! record after an interrupted operation ([`settle`]), what a failed install or upgrade leaves
//! to do ([`after_failure`]), and how long to wait before retrying ([`retry_delay`]).

use std::time::Duration;

use crate::{
    cluster::tracking::{Phase, TrackingRecord},
    helm::storage::{ReleaseStatus, StoredRelease},
    model::{Deployment, NIL_UUID},
};

/// What the next pass over a desired release does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing of this release is deployed (or Helm lost it): `helm install`.
    Install,
    /// The agent tracks another revision (or an adoption request): `helm upgrade`.
    Upgrade,
    /// The tracked revision is deployed: check the health of its resources.
    CheckHealth,
    /// The last operation on this very revision failed and Helm recorded it: report the
    /// failure, do not retry the same revision (a new revision from the Hub retries).
    KeepFailed,
    /// An operation was interrupted (tracking phase `progressing`, or Helm `pending-*`).
    Recover,
    /// The agent must not touch the release; the message says why.
    Refuse(String),
}

/// Decides the next step for `desired` from the tracking record and Helm's latest revision.
pub fn plan(desired: &Deployment, tracked: Option<&TrackingRecord>, latest: Option<&StoredRelease>) -> Plan {
    let release = &desired.release_name;
    match (tracked, latest) {
        (None, None) => Plan::Install,
        (None, Some(_)) => Plan::Refuse(format!(
            "helm release {release} already exists but was not created by the agent"
        )),
        // Only the agent's own record of an operation it started is recovered; an adoption
        // request (whatever phase it claims) is not one.
        (Some(record), _) if record.phase == Phase::Progressing && !record.is_adoption_request() => Plan::Recover,
        // The agent records `progressing` before it starts Helm: a pending revision without
        // that is someone else's operation (an operator's long `helm upgrade`), never taken
        // over (rolled back) under them.
        (Some(_), Some(latest)) if latest.status.is_pending() => Plan::Refuse(foreign_pending(release, latest)),
        // Tracked but gone from Helm: a failed install that Helm rolled back, or an
        // uninstall behind the agent's back. Either way the Hub wants it deployed.
        (Some(_), None) => Plan::Install,
        (Some(record), Some(latest)) => {
            if let Some(tracked_revision) = record.helm_revision
                && tracked_revision != latest.revision
                && !desired.ignore_revision_skew
            {
                return Plan::Refuse(format!(
                    "actual helm revision for {release} ({}) is different from latest deployed by agent ({tracked_revision})",
                    latest.revision
                ));
            }
            if record.is_adoption_request() || !record.is_revision(&desired.revision_id) {
                Plan::Upgrade
            } else if record.phase == Phase::Failed {
                Plan::KeepFailed
            } else {
                Plan::CheckHealth
            }
        }
    }
}

/// Why the agent leaves a pending revision it did not start alone.
pub fn foreign_pending(release: &str, latest: &StoredRelease) -> String {
    format!(
        "helm release {release} revision {} is {}, started outside the agent; the agent does not touch the release until that operation ends",
        latest.revision, latest.status
    )
}

/// The tracking record after recovering an interrupted operation, given Helm's latest
/// revision once any pending revision was undone (`undone`: the recovery rolled back or
/// uninstalled it).
///
/// - Phase not `progressing` (only Helm was pending): keep the record, take Helm's revision.
/// - Helm has nothing: phase `failed`, no revision; the next pass installs again.
/// - The operation failed and Helm rolled it back before the crash (a newer revision is
///   `deployed`, nothing undone, and `history` has a `failed` revision above the recorded
///   one): phase `failed` with the rollback's revision; this revision is not retried, as
///   after any failed upgrade that Helm rolled back.
/// - The operation finished before the crash (a newer revision is `deployed`, nothing
///   undone, no failed revision since the recorded one): phase `ready` with that revision.
/// - The operation failed before the crash (latest `failed`): phase `failed` with that
///   revision; this revision is not retried, as after any failed upgrade.
/// - Otherwise (never started, or undone): phase `ready` at Helm's revision and the revision
///   id forgotten (nil UUID), so the next pass upgrades to the Hub's revision again.
///
/// `history` is the revision number and status of each stored revision of the release.
pub fn settle(
    record: &TrackingRecord,
    latest: Option<&StoredRelease>,
    undone: bool,
    history: &[(u32, ReleaseStatus)],
) -> TrackingRecord {
    let mut settled = record.clone();
    settled.helm_revision = latest.map(|latest| latest.revision);
    if record.phase != Phase::Progressing {
        return settled;
    }
    let recorded = record.helm_revision.unwrap_or(0);
    let failed_since_recorded = history
        .iter()
        .any(|(revision, status)| *revision > recorded && *status == ReleaseStatus::Failed);
    match latest {
        None => settled.phase = Phase::Failed,
        Some(latest)
            if !undone && latest.status == ReleaseStatus::Deployed && record.helm_revision != Some(latest.revision) =>
        {
            settled.phase = if failed_since_recorded {
                Phase::Failed
            } else {
                Phase::Ready
            };
        }
        Some(latest) if !undone && latest.status == ReleaseStatus::Failed => settled.phase = Phase::Failed,
        Some(_) => {
            settled.phase = Phase::Ready;
            NIL_UUID.clone_into(&mut settled.revision_id);
        }
    }
    settled
}

/// What a failed install or upgrade leaves to do, from Helm's latest revision read after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// What Helm left is unknown (its storage could not be read) or a revision is still
    /// pending (Helm was stopped at its time limit): the `progressing` record stays, so the
    /// next pass recovers from it.
    KeepProgressing { retry: bool },
    /// Cut short by the executor's shutdown, with a revision recorded by Helm: not a failure
    /// of this revision. This record (revision id forgotten, phase `ready`) makes the next
    /// executor deploy it again at once.
    Interrupted(TrackingRecord),
    /// Helm recorded the failed attempt (a new revision): record it as failed and report
    /// it until the Hub sends another revision; no retry.
    Failed(TrackingRecord),
    /// Helm left nothing behind (chart not found, registry down, an install rolled back and
    /// removed): put this record back and retry later.
    NothingLeft(TrackingRecord),
}

/// Decides what follows a failed operation. `attempt` is the `progressing` record written
/// before it, `previous` the record it replaced, `before` Helm's latest revision before it,
/// `after` the latest after it (`Err` when it could not be read).
pub fn after_failure(
    upgrade: bool,
    attempt: &TrackingRecord,
    previous: Option<&TrackingRecord>,
    before: Option<u32>,
    after: Result<Option<&StoredRelease>, ()>,
    shutting_down: bool,
) -> AfterFailure {
    let Ok(after) = after else {
        return AfterFailure::KeepProgressing { retry: true };
    };
    if after.is_some_and(|after| after.status.is_pending()) {
        return AfterFailure::KeepProgressing { retry: false };
    }
    let after_revision = after.map(|after| after.revision);
    if shutting_down && after_revision.is_some() {
        return AfterFailure::Interrupted(TrackingRecord {
            revision_id: NIL_UUID.to_owned(),
            helm_revision: after_revision,
            phase: Phase::Ready,
            ..attempt.clone()
        });
    }
    if after_revision.is_some() && after_revision != before {
        return AfterFailure::Failed(TrackingRecord {
            phase: Phase::Failed,
            helm_revision: after_revision,
            ..attempt.clone()
        });
    }
    AfterFailure::NothingLeft(match previous {
        Some(previous) if upgrade => previous.clone(),
        _ => TrackingRecord {
            phase: Phase::Failed,
            helm_revision: after_revision,
            ..attempt.clone()
        },
    })
}

/// Delay before retry number `attempt` (1-based) of an operation that left nothing behind:
/// 30 s, doubling, at most 10 minutes.
pub fn retry_delay(attempt: u32) -> Duration {
    const FIRST: Duration = Duration::from_secs(30);
    const MAX: Duration = Duration::from_secs(600);
    FIRST.saturating_mul(1u32 << attempt.saturating_sub(1).min(10)).min(MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn desired(revision: &str) -> Deployment {
        Deployment {
            id: "dep".into(),
            revision_id: revision.into(),
            release_name: "web".into(),
            ..Deployment::default()
        }
    }

    #[test]
    fn what_a_failed_operation_leaves_to_do() {
        let attempt = record("rev-2", Some(3), Phase::Progressing);
        let previous = record("rev-1", Some(3), Phase::Ready);
        let upgrade = |after: Result<Option<&StoredRelease>, ()>, shutting_down| {
            after_failure(true, &attempt, Some(&previous), Some(3), after, shutting_down)
        };
        assert_eq!(upgrade(Err(()), false), AfterFailure::KeepProgressing { retry: true });
        let pending = helm(4, ReleaseStatus::PendingUpgrade);
        assert_eq!(
            upgrade(Ok(Some(&pending)), false),
            AfterFailure::KeepProgressing { retry: false },
            "a pending revision is left to the recovery"
        );
        let failed = helm(4, ReleaseStatus::Failed);
        assert_eq!(
            upgrade(Ok(Some(&failed)), false),
            AfterFailure::Failed(record("rev-2", Some(4), Phase::Failed)),
            "Helm recorded the attempt: no retry"
        );
        assert_eq!(
            upgrade(Ok(Some(&failed)), true),
            AfterFailure::Interrupted(record(NIL_UUID, Some(4), Phase::Ready)),
            "stopped by the shutdown: redone by the next executor"
        );
        let unchanged = helm(3, ReleaseStatus::Deployed);
        assert_eq!(
            upgrade(Ok(Some(&unchanged)), false),
            AfterFailure::NothingLeft(previous.clone()),
            "an upgrade that left nothing puts the previous record back"
        );
        let install = after_failure(
            false,
            &record("rev-1", None, Phase::Progressing),
            None,
            None,
            Ok(None),
            false,
        );
        assert_eq!(
            install,
            AfterFailure::NothingLeft(record("rev-1", None, Phase::Failed)),
            "an install rolled back and removed is retried"
        );
    }

    fn record(revision: &str, helm_revision: Option<u32>, phase: Phase) -> TrackingRecord {
        TrackingRecord {
            id: "dep".into(),
            revision_id: revision.into(),
            release_name: "web".into(),
            helm_revision,
            phase,
            logs_enabled: false,
            rolled_back_to: None,
        }
    }

    fn helm(revision: u32, status: ReleaseStatus) -> StoredRelease {
        StoredRelease::for_test(revision, status)
    }

    #[test]
    fn untracked_releases_install_or_are_refused() {
        assert_eq!(plan(&desired("r1"), None, None), Plan::Install);
        assert_eq!(
            plan(&desired("r1"), None, Some(&helm(1, ReleaseStatus::Deployed))),
            Plan::Refuse("helm release web already exists but was not created by the agent".into())
        );
    }

    #[test]
    fn tracked_releases_upgrade_check_or_keep_failing() {
        let deployed = helm(3, ReleaseStatus::Deployed);
        assert_eq!(
            plan(
                &desired("r2"),
                Some(&record("r1", Some(3), Phase::Ready)),
                Some(&deployed)
            ),
            Plan::Upgrade
        );
        assert_eq!(
            plan(
                &desired("r1"),
                Some(&record("r1", Some(3), Phase::Ready)),
                Some(&deployed)
            ),
            Plan::CheckHealth
        );
        assert_eq!(
            plan(
                &desired("r1"),
                Some(&record("r1", Some(3), Phase::Failed)),
                Some(&deployed)
            ),
            Plan::KeepFailed
        );
        assert_eq!(
            plan(&desired("r1"), Some(&record("r1", Some(3), Phase::Ready)), None),
            Plan::Install
        );
    }

    #[test]
    fn revision_skew_is_refused_unless_ignored() {
        let tracked = record("r1", Some(1), Phase::Ready);
        let latest = helm(3, ReleaseStatus::Deployed);
        assert_eq!(
            plan(&desired("r1"), Some(&tracked), Some(&latest)),
            Plan::Refuse("actual helm revision for web (3) is different from latest deployed by agent (1)".into())
        );
        let ignoring = Deployment {
            ignore_revision_skew: true,
            ..desired("r1")
        };
        assert_eq!(plan(&ignoring, Some(&tracked), Some(&latest)), Plan::CheckHealth);
    }

    #[test]
    fn adoption_requests_upgrade_without_a_skew_check() {
        let adoption = TrackingRecord {
            id: NIL_UUID.into(),
            ..record("", None, Phase::Ready)
        };
        assert_eq!(
            plan(&desired("r1"), Some(&adoption), Some(&helm(7, ReleaseStatus::Deployed))),
            Plan::Upgrade
        );
        let with_revision = TrackingRecord {
            revision_id: "r1".into(),
            ..adoption
        };
        assert_eq!(
            plan(
                &desired("r1"),
                Some(&with_revision),
                Some(&helm(7, ReleaseStatus::Deployed))
            ),
            Plan::Upgrade
        );
    }

    #[test]
    fn interrupted_operations_are_recovered() {
        let progressing = record("r2", Some(3), Phase::Progressing);
        assert_eq!(
            plan(
                &desired("r2"),
                Some(&progressing),
                Some(&helm(3, ReleaseStatus::Deployed))
            ),
            Plan::Recover
        );
        assert_eq!(
            plan(
                &desired("r2"),
                Some(&progressing),
                Some(&helm(4, ReleaseStatus::PendingUpgrade))
            ),
            Plan::Recover
        );
    }

    #[test]
    fn an_adoption_request_is_never_recovered_whatever_phase_it_claims() {
        // Anyone may write an adoption request: a `progressing` one must not make the agent
        // roll back or uninstall a pending revision someone else started.
        let planted = TrackingRecord {
            id: NIL_UUID.into(),
            ..record("r1", Some(3), Phase::Progressing)
        };
        let pending = helm(4, ReleaseStatus::PendingInstall);
        assert_eq!(
            plan(&desired("r1"), Some(&planted), Some(&pending)),
            Plan::Refuse(foreign_pending("web", &pending))
        );
        assert_eq!(
            plan(&desired("r1"), Some(&planted), Some(&helm(3, ReleaseStatus::Deployed))),
            Plan::Upgrade
        );
    }

    #[test]
    fn pending_revisions_the_agent_did_not_start_are_left_alone() {
        // An operator's `helm upgrade` under way: the record says the agent's last operation
        // finished, so revision 4 is not the agent's to roll back.
        let ready = record("r1", Some(3), Phase::Ready);
        for desired_revision in ["r1", "r2"] {
            assert_eq!(
                plan(
                    &desired(desired_revision),
                    Some(&ready),
                    Some(&helm(4, ReleaseStatus::PendingUpgrade))
                ),
                Plan::Refuse(
                    "helm release web revision 4 is pending-upgrade, started outside the agent; the agent does not touch the release until that operation ends"
                        .into()
                )
            );
        }
    }

    #[test]
    fn after_a_failed_upgrade_that_helm_rolled_back_nothing_more_happens() {
        // Upgrade r1 (helm 3) → r2 failed; Helm wrote 4 (failed) and 5 (rollback to 3).
        // The worker records r2, phase failed, helm revision 5.
        let after = record("r2", Some(5), Phase::Failed);
        let latest = helm(5, ReleaseStatus::Deployed);
        assert_eq!(
            plan(&desired("r2"), Some(&after), Some(&latest)),
            Plan::KeepFailed,
            "no skew, no retry"
        );
        assert_eq!(
            plan(&desired("r3"), Some(&after), Some(&latest)),
            Plan::Upgrade,
            "a new revision retries"
        );
    }

    #[test]
    fn settling_interrupted_operations() {
        let progressing = record("r2", Some(3), Phase::Progressing);
        // Finished before the crash.
        let settled = settle(&progressing, Some(&helm(4, ReleaseStatus::Deployed)), false, &[]);
        assert_eq!(settled, record("r2", Some(4), Phase::Ready));
        // Never started.
        let settled = settle(&progressing, Some(&helm(3, ReleaseStatus::Deployed)), false, &[]);
        assert_eq!(settled, record(NIL_UUID, Some(3), Phase::Ready));
        // Pending upgrade rolled back by the recovery: retry.
        let settled = settle(&progressing, Some(&helm(5, ReleaseStatus::Deployed)), true, &[]);
        assert_eq!(settled, record(NIL_UUID, Some(5), Phase::Ready));
        // Failed before the crash: keep failed.
        let settled = settle(&progressing, Some(&helm(4, ReleaseStatus::Failed)), false, &[]);
        assert_eq!(settled, record("r2", Some(4), Phase::Failed));
        // Install interrupted and uninstalled: failed with no revision, the next pass installs.
        let installing = record("r1", None, Phase::Progressing);
        let settled = settle(&installing, None, true, &[]);
        assert_eq!(settled, record("r1", None, Phase::Failed));
        assert_eq!(plan(&desired("r1"), Some(&settled), None), Plan::Install);
        // Install finished before the crash.
        assert_eq!(
            settle(&installing, Some(&helm(1, ReleaseStatus::Deployed)), false, &[]),
            record("r1", Some(1), Phase::Ready)
        );
    }

    #[test]
    fn settling_a_failed_upgrade_that_helm_rolled_back_keeps_it_failed() {
        // Upgrade r1 (helm 3) → r2: Helm wrote 4 (failed) and 5 (rollback to 3), then the
        // executor died before recording it.
        let progressing = record("r2", Some(3), Phase::Progressing);
        let history = [
            (1, ReleaseStatus::Superseded),
            (2, ReleaseStatus::Superseded),
            (3, ReleaseStatus::Superseded),
            (4, ReleaseStatus::Failed),
            (5, ReleaseStatus::Deployed),
        ];
        let settled = settle(&progressing, Some(&helm(5, ReleaseStatus::Deployed)), false, &history);
        assert_eq!(settled, record("r2", Some(5), Phase::Failed));
        assert_eq!(
            plan(&desired("r2"), Some(&settled), Some(&helm(5, ReleaseStatus::Deployed))),
            Plan::KeepFailed,
            "reported as failed, not retried, not healthy"
        );
        // A failure before the recorded revision says nothing about this operation.
        let older_failure = [
            (2, ReleaseStatus::Failed),
            (3, ReleaseStatus::Superseded),
            (4, ReleaseStatus::Deployed),
        ];
        assert_eq!(
            settle(
                &progressing,
                Some(&helm(4, ReleaseStatus::Deployed)),
                false,
                &older_failure
            ),
            record("r2", Some(4), Phase::Ready)
        );
    }

    #[test]
    fn settling_only_a_pending_helm_release_keeps_the_phase() {
        let failed = record("r2", Some(4), Phase::Failed);
        assert_eq!(
            settle(&failed, Some(&helm(5, ReleaseStatus::Deployed)), true, &[]),
            record("r2", Some(5), Phase::Failed)
        );
    }

    #[test]
    fn retry_delays_grow_and_are_capped() {
        assert_eq!(retry_delay(1), Duration::from_secs(30));
        assert_eq!(retry_delay(2), Duration::from_secs(60));
        assert_eq!(retry_delay(5), Duration::from_secs(480));
        assert_eq!(retry_delay(6), Duration::from_secs(600));
        assert_eq!(retry_delay(100), Duration::from_secs(600));
    }
}
