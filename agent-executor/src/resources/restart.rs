//! Force restart of a release's workloads after an upgrade (the Hub's `forceRestart`): the
//! same annotation `kubectl rollout restart` sets on the pod template.

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use crate::{
    cluster::kube_util::{self, ApiError},
    resources::manifest::ManifestObject,
};

const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// A workload could not be restarted (retryable).
#[derive(Debug, thiserror::Error)]
#[error("cannot restart {kind} {name}: {source}")]
pub struct RestartError {
    pub kind: String,
    pub name: String,
    #[source]
    pub source: ApiError,
}

/// The merge patch that restarts a workload's pods.
pub fn restart_patch(now: DateTime<Utc>) -> serde_json::Value {
    serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT: now.to_rfc3339_opts(SecondsFormat::Secs, true)
        }}}}
    })
}

/// Restarts every Deployment, StatefulSet and DaemonSet in `objects`; returns how many.
pub async fn restart_workloads(
    client: &kube::Client,
    namespace: &str,
    objects: &[ManifestObject],
    now: DateTime<Utc>,
) -> Result<usize, RestartError> {
    let patch = restart_patch(now);
    let params = PatchParams::default();
    let mut restarted = 0;
    for object in objects.iter().filter(|object| object.group() == "apps") {
        let namespace = object.namespace.as_deref().unwrap_or(namespace);
        let name = object.name.as_str();
        let result = match object.kind.as_str() {
            "Deployment" => kube_util::call(Api::<Deployment>::namespaced(client.clone(), namespace).patch(
                name,
                &params,
                &Patch::Merge(&patch),
            ))
            .await
            .map(drop),
            "StatefulSet" => kube_util::call(Api::<StatefulSet>::namespaced(client.clone(), namespace).patch(
                name,
                &params,
                &Patch::Merge(&patch),
            ))
            .await
            .map(drop),
            "DaemonSet" => kube_util::call(Api::<DaemonSet>::namespaced(client.clone(), namespace).patch(
                name,
                &params,
                &Patch::Merge(&patch),
            ))
            .await
            .map(drop),
            _ => continue,
        };
        result.map_err(|source| RestartError {
            kind: object.kind.clone(),
            name: name.to_owned(),
            source,
        })?;
        restarted += 1;
    }
    Ok(restarted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn patch_sets_the_rollout_annotation() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            restart_patch(now),
            serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": "2023-11-14T22:13:20Z"
            }}}}})
        );
    }
}
