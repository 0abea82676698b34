//! Converting the Hub's resources into the executor's `SyncRequest`.

use distr_agent_proto::v1 as pb;

use crate::hub::{Deployment, HelmOptions, Resources};

/// The desired state for the executor. `hub_registry` is the Hub registry login, if any.
pub fn sync_request(resources: &Resources, hub_registry: Option<pb::RegistryLogin>) -> pb::SyncRequest {
    pb::SyncRequest {
        // Absent stays absent: the executor keeps the namespace in use (never "the default").
        namespace: resources.namespace.clone().filter(|namespace| !namespace.is_empty()),
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
    use prost::Message as _;

    use super::*;

    /// The executor decodes at most `MAX_MESSAGE_BYTES` per gRPC message (tonic's default is
    /// 4 MiB); the poller accepts a resources body up to `max_resources_body`. A body at that
    /// bound, turned into the `SyncRequest`, must fit, or a large desired state is refused whole.
    #[test]
    fn a_resources_body_at_the_poller_s_bound_fits_the_executor_s_grpc_limit() {
        let hub_limit = crate::hub::ClientOptions::default().max_resources_body;
        let grpc_limit = agent_runtime::grpc::MAX_MESSAGE_BYTES;
        assert!(
            grpc_limit >= hub_limit,
            "executor gRPC limit {grpc_limit} below the poller's Hub body limit {hub_limit}"
        );
        // Deployments with large values, many small keys and credentials, up to the bound.
        let deployment = |i: usize| {
            let small: serde_json::Map<String, serde_json::Value> =
                (0..200).map(|k| (format!("k{k}"), serde_json::json!(k))).collect();
            serde_json::json!({
                "id": "11111111-1111-1111-1111-111111111111",
                "revisionId": "22222222-2222-2222-2222-222222222222",
                "releaseName": format!("release-{i:05}"),
                "chartUrl": "oci://registry.example.com/charts/web",
                "chartVersion": "1.2.3",
                "values": {"padding": "x".repeat(64 * 1024), "small": small, "list": [1, 2.5, true, null, "é<&>"]},
                "registryAuth": {"r.example.com": {"username": "u", "password": "p"}},
                "helmOptions": {"timeout": "90s", "waitStrategy": "watcher"},
                "logsEnabled": true,
            })
        };
        let one = serde_json::to_vec(&deployment(0)).expect("serializable").len() + 1;
        let deployments: Vec<serde_json::Value> = (0..(hub_limit - 64) / one).map(deployment).collect();
        let body = serde_json::to_vec(&serde_json::json!({"namespace": "customer", "deployments": deployments}))
            .expect("serializable");
        assert!(body.len() <= hub_limit, "{}", body.len());
        assert!(
            body.len() > hub_limit - 128 * 1024,
            "the body is near the bound: {}",
            body.len()
        );
        let resources: Resources = serde_json::from_slice(&body).expect("valid resources");
        let login = pb::RegistryLogin {
            host: "registry.example.com".into(),
            username: "u".into(),
            password: "p".into(),
            plain_http: false,
        };
        let encoded = sync_request(&resources, Some(login)).encoded_len();
        assert!(
            encoded > 4 * 1024 * 1024 && encoded <= grpc_limit,
            "a {} byte body encodes to {encoded} bytes; the executor takes {grpc_limit}",
            body.len()
        );
    }

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
        assert_eq!(request.namespace.as_deref(), Some("customer"));
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

    #[test]
    fn an_absent_namespace_stays_absent() {
        for body in [
            serde_json::json!({"deployments": []}),
            serde_json::json!({"namespace": "", "deployments": []}),
        ] {
            let resources: Resources = serde_json::from_value(body).expect("valid resources");
            assert_eq!(sync_request(&resources, None).namespace, None);
        }
    }
}
