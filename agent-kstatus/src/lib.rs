//! Whether a workload's rollout is complete, by the rules of kstatus (the status library
//! behind Helm v4's `--wait`), so that the agent calls healthy what `helm --wait` waits for.
//!
//! One implementation for two users: the executor's health of a release's resources and the
//! updater's gate on the agent's own Deployments. Each rule answers `Ok(())` when the rollout
//! is complete, otherwise `Err` with why, in words for a status line.
//!
//! A Deployment is complete when the controller has observed its latest spec and exactly the
//! desired number of replicas run, all of them updated, ready and available. Old replicas
//! still present ("extra pods") or fewer available than desired are not complete: a rolling
//! update whose new pod crash-loops beside a Ready old one is not healthy, whatever
//! `readyReplicas` says.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

/// The rule of a Deployment (see the crate's documentation); a paused one never completes.
pub fn deployment(object: &Deployment) -> Result<(), String> {
    let spec = object.spec.as_ref();
    if spec.and_then(|spec| spec.paused) == Some(true) {
        return Err("Deployment is paused".to_owned());
    }
    let desired = i64::from(spec.and_then(|spec| spec.replicas).unwrap_or(1));
    let status = object.status.clone().unwrap_or_default();
    let deadline_exceeded = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    if let Some(condition) = deadline_exceeded {
        return Err(format!(
            "rollout failed: {}",
            reason_and_message(condition.reason.as_deref(), condition.message.as_deref())
        ));
    }
    generation_observed(object.metadata.generation, status.observed_generation)?;
    behind("ReadyReplicas", status.ready_replicas.unwrap_or(0).into(), desired)?;
    behind(
        "AvailableReplicas",
        status.available_replicas.unwrap_or(0).into(),
        desired,
    )?;
    behind("UpdatedReplicas", status.updated_replicas.unwrap_or(0).into(), desired)?;
    extra_pods(status.replicas.unwrap_or(0).into(), desired)
}

/// The rule of a Deployment given as JSON (as the updater reads it); a Deployment that does
/// not decode is not complete.
pub fn deployment_value(object: &serde_json::Value) -> Result<(), String> {
    let object: Deployment =
        serde_json::from_value(object.clone()).map_err(|error| format!("not a Deployment: {error}"))?;
    deployment(&object)
}

/// A StatefulSet completes when the controller has observed its latest spec, the desired
/// replicas are ready with none extra, and the replicas to update are updated: all of them,
/// or with `rollingUpdate.partition` only those at or above the partition's ordinal. With the
/// `OnDelete` strategy nothing is updated by the controller, so ready is complete.
pub fn stateful_set(object: &StatefulSet) -> Result<(), String> {
    let spec = object.spec.as_ref();
    let desired = i64::from(spec.and_then(|spec| spec.replicas).unwrap_or(1));
    let status = object.status.clone().unwrap_or_default();
    generation_observed(object.metadata.generation, status.observed_generation)?;
    behind("ReadyReplicas", status.ready_replicas.unwrap_or(0).into(), desired)?;
    extra_pods(status.replicas.into(), desired)?;
    let strategy = spec.and_then(|spec| spec.update_strategy.as_ref());
    if strategy.and_then(|strategy| strategy.type_.as_deref()) == Some("OnDelete") {
        return Ok(());
    }
    let partition = strategy
        .and_then(|strategy| strategy.rolling_update.as_ref())
        .and_then(|rolling| rolling.partition)
        .map_or(0, i64::from)
        .clamp(0, desired);
    let updated = status.updated_replicas.unwrap_or(0).into();
    if partition > 0 {
        let to_update = desired - partition;
        if updated < to_update {
            return Err(format!(
                "UpdatedReplicas ({updated}) is less than the replicas at or above the partition ({to_update})"
            ));
        }
        return Ok(());
    }
    behind("UpdatedReplicas", updated, desired)
}

/// A DaemonSet completes when the controller has observed its latest spec and every
/// scheduled pod is updated, ready and available.
pub fn daemon_set(object: &DaemonSet) -> Result<(), String> {
    let status = object.status.clone().unwrap_or_default();
    let desired = i64::from(status.desired_number_scheduled);
    generation_observed(object.metadata.generation, status.observed_generation)?;
    behind("NumberReady", status.number_ready.into(), desired)?;
    behind(
        "UpdatedNumberScheduled",
        status.updated_number_scheduled.unwrap_or(0).into(),
        desired,
    )?;
    behind("NumberAvailable", status.number_available.unwrap_or(0).into(), desired)
}

fn behind(what: &str, actual: i64, desired: i64) -> Result<(), String> {
    if actual < desired {
        Err(format!("{what} ({actual}) is less than desired ({desired})"))
    } else {
        Ok(())
    }
}

fn extra_pods(replicas: i64, desired: i64) -> Result<(), String> {
    if replicas > desired {
        Err(format!(
            "Replicas ({replicas}) is more than desired ({desired}): old pods are still there"
        ))
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

/// `reason: message` of a condition, whichever of the two it has.
pub fn reason_and_message(reason: Option<&str>, message: Option<&str>) -> String {
    match (reason.filter(|r| !r.is_empty()), message.filter(|m| !m.is_empty())) {
        (Some(reason), Some(message)) => format!("{reason}: {message}"),
        (Some(text), None) | (None, Some(text)) => text.to_owned(),
        (None, None) => "no reason given".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::apps::v1::{
            DaemonSetStatus, DeploymentCondition, DeploymentSpec, DeploymentStatus, RollingUpdateStatefulSetStrategy,
            StatefulSetSpec, StatefulSetStatus, StatefulSetUpdateStrategy,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use serde_json::json;

    use super::*;

    /// Counts of a Deployment's status, in the order of the table below.
    #[derive(Clone, Copy)]
    struct Counts {
        desired: i32,
        replicas: i32,
        updated: i32,
        ready: i32,
        available: i32,
        generation: i64,
        observed: i64,
    }

    fn web(c: Counts) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                generation: Some(c.generation),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(c.desired),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(c.replicas),
                updated_replicas: Some(c.updated),
                ready_replicas: Some(c.ready),
                available_replicas: Some(c.available),
                observed_generation: Some(c.observed),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_deployment_rule_of_kstatus() {
        let counts = |desired, replicas, updated, ready, available, generation, observed| Counts {
            desired,
            replicas,
            updated,
            ready,
            available,
            generation,
            observed,
        };
        let table: &[(Counts, Result<(), &str>, &str)] = &[
            (counts(2, 2, 2, 2, 2, 3, 3), Ok(()), "rolled out"),
            (counts(0, 0, 0, 0, 0, 1, 1), Ok(()), "scaled to zero"),
            (
                // A rolling update whose new pod crash-loops beside the Ready old one.
                counts(1, 2, 1, 1, 1, 2, 2),
                Err("Replicas (2) is more than desired (1): old pods are still there"),
                "extra pods",
            ),
            (
                counts(2, 2, 2, 2, 1, 1, 1),
                Err("AvailableReplicas (1) is less than desired (2)"),
                "fewer available than desired (minReadySeconds)",
            ),
            (
                counts(1, 1, 1, 0, 0, 1, 1),
                Err("ReadyReplicas (0) is less than desired (1)"),
                "not ready",
            ),
            (
                counts(2, 2, 1, 2, 2, 2, 2),
                Err("UpdatedReplicas (1) is less than desired (2)"),
                "not updated",
            ),
            (
                counts(1, 1, 1, 1, 1, 4, 3),
                Err("ObservedGeneration (3) is less than Generation (4)"),
                "the previous rollout's status",
            ),
        ];
        for (c, expected, case) in table {
            assert_eq!(deployment(&web(*c)), expected.map_err(str::to_owned), "{case}");
            let value = serde_json::to_value(web(*c)).expect("serialisable");
            assert_eq!(
                deployment_value(&value),
                expected.map_err(str::to_owned),
                "{case} (JSON)"
            );
        }
    }

    #[test]
    fn a_deployment_without_status_or_replicas_is_not_rolled_out() {
        let bare = Deployment {
            status: None,
            spec: Some(DeploymentSpec::default()),
            ..Deployment::default()
        };
        assert_eq!(
            deployment(&bare),
            Err("ReadyReplicas (0) is less than desired (1)".into()),
            "replicas default to 1"
        );
        assert!(deployment_value(&json!({"kind": "Deployment", "spec": "nonsense"})).is_err());
    }

    #[test]
    fn a_paused_or_stalled_deployment_never_completes() {
        let done = Counts {
            desired: 1,
            replicas: 1,
            updated: 1,
            ready: 1,
            available: 1,
            generation: 1,
            observed: 1,
        };
        let mut paused = web(done);
        paused.spec.as_mut().expect("spec").paused = Some(true);
        assert_eq!(deployment(&paused), Err("Deployment is paused".into()));
        let mut stalled = web(done);
        stalled.status.as_mut().expect("status").conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"web-1\" has timed out progressing.".into()),
            ..Default::default()
        }]);
        assert_eq!(
            deployment(&stalled),
            Err("rollout failed: ProgressDeadlineExceeded: ReplicaSet \"web-1\" has timed out progressing.".into())
        );
    }

    fn db(
        desired: i32,
        replicas: i32,
        ready: i32,
        updated: i32,
        partition: Option<i32>,
        strategy: &str,
    ) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("db".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(desired),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some(strategy.into()),
                    rolling_update: partition.map(|partition| RollingUpdateStatefulSetStrategy {
                        partition: Some(partition),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            status: Some(StatefulSetStatus {
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                observed_generation: Some(1),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_stateful_set_rule_with_and_without_a_partition() {
        let table: &[(StatefulSet, Result<(), &str>, &str)] = &[
            (db(3, 3, 3, 3, None, "RollingUpdate"), Ok(()), "rolled out"),
            (
                db(3, 3, 3, 2, None, "RollingUpdate"),
                Err("UpdatedReplicas (2) is less than desired (3)"),
                "one pod left to update",
            ),
            (
                // Pods 2..3 of 0..3 are to be updated; they are.
                db(4, 4, 4, 2, Some(2), "RollingUpdate"),
                Ok(()),
                "partition: the pods above it updated",
            ),
            (
                db(4, 4, 4, 1, Some(2), "RollingUpdate"),
                Err("UpdatedReplicas (1) is less than the replicas at or above the partition (2)"),
                "partition: one of them not yet",
            ),
            (
                db(2, 2, 2, 0, Some(5), "RollingUpdate"),
                Ok(()),
                "a partition above every ordinal updates nothing",
            ),
            (
                db(2, 2, 1, 2, Some(1), "RollingUpdate"),
                Err("ReadyReplicas (1) is less than desired (2)"),
                "partition: not ready",
            ),
            (
                db(2, 3, 2, 2, None, "RollingUpdate"),
                Err("Replicas (3) is more than desired (2): old pods are still there"),
                "scaling down",
            ),
            (db(2, 2, 2, 0, None, "OnDelete"), Ok(()), "OnDelete: ready is enough"),
        ];
        for (object, expected, case) in table {
            assert_eq!(stateful_set(object), expected.map_err(str::to_owned), "{case}");
        }
    }

    #[test]
    fn the_daemon_set_rule() {
        let ds = |desired, ready, updated, available| DaemonSet {
            metadata: ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            status: Some(DaemonSetStatus {
                desired_number_scheduled: desired,
                number_ready: ready,
                updated_number_scheduled: Some(updated),
                number_available: Some(available),
                observed_generation: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(daemon_set(&ds(3, 3, 3, 3)), Ok(()));
        assert_eq!(
            daemon_set(&ds(3, 2, 3, 2)),
            Err("NumberReady (2) is less than desired (3)".into())
        );
        assert_eq!(
            daemon_set(&ds(3, 3, 2, 3)),
            Err("UpdatedNumberScheduled (2) is less than desired (3)".into())
        );
        assert_eq!(
            daemon_set(&ds(3, 3, 3, 2)),
            Err("NumberAvailable (2) is less than desired (3)".into())
        );
    }
}
