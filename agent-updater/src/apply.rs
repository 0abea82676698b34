//! What an update and a roll-back do to the agent's objects, over [`AgentObjects`]: the
//! objects as the updater applies them (labelled), the dry run of a manifest, the prune of
//! what a new version dropped, and one pass of a roll-back.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{
    cluster::{AgentObjects, ApiError},
    manifest::{self, Object},
};

/// Set on every object the updater applies: only such objects are ever pruned.
pub const APPLIED_BY: &str = "agent.distr.sh/applied-by";
pub const APPLIED_BY_VALUE: &str = "distr-agent-updater";

/// An object's key in the recorded state: `Kind/name`.
pub fn key(object: &Object) -> String {
    format!("{}/{}", object.kind, object.name)
}

/// The object as an apply configuration: what the cluster keeps for itself removed.
pub fn apply_config(mut live: Value) -> Value {
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
pub fn labelled(object: &Object, namespace: &str) -> Value {
    let mut body = object.body.clone();
    body["metadata"]["namespace"] = json!(namespace);
    if !body["metadata"]["labels"].is_object() {
        body["metadata"]["labels"] = json!({});
    }
    body["metadata"]["labels"][APPLIED_BY] = json!(APPLIED_BY_VALUE);
    body
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

/// Why a dry run did not pass.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    /// The API server refuses the object (invalid, an immutable field, not allowed): the
    /// manifest is refused, whatever is tried again.
    #[error("{object}: {error}")]
    Refused { object: String, error: ApiError },
    /// No answer about the object (the API server failed, or no answer in time): retryable.
    #[error("{0}")]
    Cluster(ApiError),
}

/// A server-side apply dry run of every object, in order; stops at the first that does not
/// pass.
pub async fn dry_run(objects: &dyn AgentObjects, manifest: &[Object], namespace: &str) -> Result<(), DryRunError> {
    for object in manifest {
        let body = labelled(object, namespace);
        match objects.apply(&object.kind, &object.name, &body, true).await {
            Ok(_) => {}
            // An answer about the object: refused. A conflict or throttling is no answer.
            Err(error @ (ApiError::NotFound { .. } | ApiError::Forbidden { .. } | ApiError::Refused { .. })) => {
                return Err(DryRunError::Refused {
                    object: object.to_string(),
                    error,
                });
            }
            Err(error) => return Err(DryRunError::Cluster(error)),
        }
    }
    Ok(())
}

/// Deletes the agent's own objects the new manifest no longer has, of those the updater
/// applied itself (labelled [`APPLIED_BY`]). What cannot be pruned is logged and left.
pub async fn prune(objects: &dyn AgentObjects, applied: &[Object]) {
    let kept: Vec<String> = applied.iter().map(key).collect();
    for (kind, name) in manifest::prunable() {
        if kept.contains(&format!("{kind}/{name}")) {
            continue;
        }
        match objects.get(kind, name).await {
            Ok(Some(live)) if live["metadata"]["labels"][APPLIED_BY] == APPLIED_BY_VALUE => {
                match objects.delete(kind, name).await {
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

/// One pass of a roll-back: re-applies every recorded object as it was (in the apply order)
/// and deletes what the update created where the updater may delete (Services and
/// NetworkPolicies; anything else it created is left, and logged). Every object is tried
/// whatever happened to the others. The previous Deployments, to wait for; or what went wrong.
pub async fn restore(
    objects: &dyn AgentObjects,
    previous: &BTreeMap<String, Value>,
    rules: &manifest::Rules,
    acting: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Vec<String>, Vec<String>> {
    let mut errors = Vec::new();
    let mut deployments = Vec::new();
    for (kind, name, live) in rollback_order(previous) {
        if !acting() {
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
            objects.delete(kind, name).await.map_err(|e| e.to_string())
        } else {
            if kind == "Deployment" {
                deployments.push(name.to_owned());
            }
            // Whoever could write the state Secret chose what it records: each object is
            // checked again as a new version's would be, and one that fails is not written.
            match manifest::recheck(kind, name, live, rules) {
                Ok(()) => objects
                    .apply(kind, name, live, false)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(refused) => Err(refused),
            }
        };
        if let Err(error) = result {
            errors.push(error);
        }
    }
    if errors.is_empty() {
        Ok(deployments)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fake::{Call, FakeObjects};

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

    /// A pass where one object cannot be restored still restores every other one, and says
    /// which failed; what the update created and the Role cannot delete is left alone instead
    /// of failing every pass.
    #[tokio::test]
    async fn a_roll_back_pass_restores_what_it_can_and_names_what_it_could_not() {
        let objects = FakeObjects::default();
        objects.fail_once(Call::Apply, "ConfigMap", "distr-agent-env");
        let previous: BTreeMap<String, Value> = [
            (
                "ConfigMap/distr-agent-env",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distr-agent-env"}, "data": {"DISTR_AGENT_VERSION_ID": "1"}}),
            ),
            (
                "Deployment/distr-agent",
                serde_norway::from_str(include_str!("../testdata/poller-deployment.yaml")).expect("the fixture is YAML"),
            ),
            // Created by the update: a ServiceAccount may not be deleted; a Service may.
            ("ServiceAccount/distr-agent-poller", Value::Null),
            ("Service/distr-agent-updater", Value::Null),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        objects.put(
            "Service",
            "distr-agent-updater",
            json!({"metadata": {"name": "distr-agent-updater"}}),
        );
        objects.put(
            "ServiceAccount",
            "distr-agent-poller",
            json!({"metadata": {"name": "distr-agent-poller"}}),
        );
        let rules = manifest::Rules {
            namespace: "agent".into(),
            image_repository: "ghcr.io/distr-sh/distr-agent".into(),
        };
        let first = restore(&objects, &previous, &rules, &|| true).await;
        let problems = first.expect_err("the ConfigMap failed");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("ConfigMap distr-agent-env"), "{problems:?}");
        assert!(
            objects.get_now("Deployment", "distr-agent").is_some(),
            "restored all the same"
        );
        assert!(objects.get_now("Service", "distr-agent-updater").is_none(), "deleted");
        assert!(
            objects.get_now("ServiceAccount", "distr-agent-poller").is_some(),
            "left: the Role deletes no ServiceAccount"
        );
        assert!(
            !objects
                .calls()
                .contains(&(Call::Delete, "ServiceAccount".into(), "distr-agent-poller".into()))
        );
        let second = restore(&objects, &previous, &rules, &|| true).await;
        assert_eq!(second, Ok(vec!["distr-agent".to_owned()]));
        assert_eq!(
            objects
                .get_now("ConfigMap", "distr-agent-env")
                .map(|c| c["data"]["DISTR_AGENT_VERSION_ID"].clone()),
            Some(json!("1"))
        );
    }
}
