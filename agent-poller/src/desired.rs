//! Converting the Hub's resources into the executor's `SyncRequest`.

use distr_agent_proto::v1 as pb;

use crate::hub::{Deployment, HelmOptions, Resources};

/// The desired state for the executor. `hub_registry` is the Hub registry login, if any.
pub fn sync_request(resources: &Resources, hub_registry: Option<pb::RegistryLogin>) -> pb::SyncRequest {
    pb::SyncRequest {
        namespace: resources.namespace.clone().unwrap_or_default(),
        deployments: resources.deployments.iter().map(deployment).collect(),
        hub_registry,
    }
}

fn deployment(d: &Deployment) -> pb::Deployment {
    pb::Deployment {
        id: d.id.to_string(),
        revision_id: d.revision_id.to_string(),
        release_name: d.release_name.clone(),
        chart_url: d.chart_url.clone(),
        chart_name: d.chart_name.clone().unwrap_or_default(),
        chart_version: d.chart_version.clone(),
        // Whatever JSON the Hub sent: the executor refuses anything but an object, for this
        // deployment alone.
        values_json: d.values.to_string(),
        registry_auth: d
            .registry_auth
            .iter()
            .map(|(host, auth)| {
                let credentials = pb::RegistryCredentials {
                    username: auth.username.clone(),
                    password: auth.password.expose().to_owned(),
                };
                (host.clone(), credentials)
            })
            .collect(),
        logs_enabled: d.logs_enabled,
        force_restart: d.force_restart,
        ignore_revision_skew: d.ignore_revision_skew,
        helm_options: d.helm_options.as_ref().map(helm_options),
        input_error: d.input_error.clone().unwrap_or_default(),
    }
}

fn helm_options(o: &HelmOptions) -> pb::HelmOptions {
    pb::HelmOptions {
        timeout: o.timeout.clone(),
        wait_strategy: o.wait_strategy.clone(),
        rollback_on_failure: o.rollback_on_failure,
        cleanup_on_failure: o.cleanup_on_failure,
        force_conflicts: o.force_conflicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_every_field_and_keeps_absent_options_absent() {
        let resources: Resources = serde_json::from_value(serde_json::json!({
            "namespace": "customer",
            "composeFile": "ignored",
            "deployments": [{
                "id": "11111111-1111-1111-1111-111111111111",
                "revisionId": "22222222-2222-2222-2222-222222222222",
                "releaseName": "web",
                "chartUrl": "https://charts.example.com",
                "chartName": "web",
                "chartVersion": "1.2.3",
                "values": {"replicas": 2},
                "registryAuth": {"r.example.com": {"username": "u", "password": "p"}},
                "helmOptions": {"timeout": "90s"}
            }]
        }))
        .expect("valid resources");
        let request = sync_request(&resources, None);
        assert_eq!(request.namespace, "customer");
        let d = &request.deployments[0];
        assert_eq!(d.release_name, "web");
        assert_eq!(d.chart_name, "web");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&d.values_json).ok(),
            Some(serde_json::json!({"replicas": 2}))
        );
        assert_eq!(d.registry_auth["r.example.com"].password, "p");
        let options = d.helm_options.as_ref().expect("options");
        assert_eq!(options.timeout.as_deref(), Some("90s"));
        assert_eq!(
            options.rollback_on_failure, None,
            "absent stays absent; the executor applies the defaults"
        );
    }
}
