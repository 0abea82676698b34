//! The image pull Secret of each release and its injection into the release's values.
//!
//! `sh.distr.agent.v1.<release>.pull`, type `kubernetes.io/dockerconfigjson`, holds the Hub
//! registry login and the deployment's `registryAuth`. Its name is appended to every list
//! named `imagePullSecrets` or `pullSecrets` anywhere in the values, so charts that expose
//! such a list pull from the Hub's registry without the vendor writing the Secret name.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use serde_json::Value;

use crate::cluster::kube_util::{self, ApiError};

const SECRET_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DATA_KEY: &str = ".dockerconfigjson";
/// Value lists that receive the Secret name.
const LIST_KEYS: [&str; 2] = ["imagePullSecrets", "pullSecrets"];

/// Errors writing or deleting the pull Secret (all retryable).
#[derive(Debug, thiserror::Error)]
pub enum PullSecretError {
    #[error("cannot {action} image pull Secret {secret}: {source}")]
    Api {
        action: &'static str,
        secret: String,
        #[source]
        source: ApiError,
    },
}

/// Name of the pull Secret of `release`.
pub fn secret_name(release: &str) -> String {
    format!("sh.distr.agent.v1.{release}.pull")
}

/// The pull Secret of `release` holding `docker_config` (see [`crate::helm::docker_config`]).
/// It deliberately carries no `agent.distr.sh/deployment` label: that label marks tracking
/// Secrets, and agents list by it.
pub fn build_secret(namespace: &str, release: &str, docker_config: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(release)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "distr-agent".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([(DATA_KEY.to_owned(), ByteString(docker_config))])),
        ..Secret::default()
    }
}

/// Writes (creates or replaces) and deletes pull Secrets in one namespace.
#[derive(Clone)]
pub struct PullSecrets {
    api: Api<Secret>,
    namespace: String,
}

impl PullSecrets {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// Creates the pull Secret of `release`, or replaces its content.
    pub async fn apply(&self, release: &str, docker_config: Vec<u8>) -> Result<(), PullSecretError> {
        let secret = build_secret(&self.namespace, release, docker_config);
        let name = secret_name(release);
        let api_error = |action, source| PullSecretError::Api {
            action,
            secret: name.clone(),
            source,
        };
        match kube_util::call(self.api.create(&PostParams::default(), &secret)).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_conflict() => {
                kube_util::call(self.api.replace(&name, &PostParams::default(), &secret))
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("replace", e))
            }
            Err(error) => Err(api_error("create", error)),
        }
    }

    /// Deletes the pull Secret of `release`; a missing one is fine.
    pub async fn delete(&self, release: &str) -> Result<(), PullSecretError> {
        let name = secret_name(release);
        kube_util::call_opt(self.api.delete(&name, &DeleteParams::default()))
            .await
            .map(|_| ())
            .map_err(|source| PullSecretError::Api {
                action: "delete",
                secret: name,
                source,
            })
    }
}

/// Appends `secret` to every list named `imagePullSecrets` or `pullSecrets` anywhere in
/// `values` (in objects nested at any depth, also inside lists). Other shapes under those
/// keys are left alone, and a list already naming the Secret is not changed.
///
/// Item shape: a list of strings gets a string (Bitnami's `global.imagePullSecrets` style);
/// an empty list or a list of objects gets `{"name": secret}` (the Kubernetes
/// `LocalObjectReference` shape, which is what the earlier agent always appended).
pub fn inject(values: &mut Value, secret: &str) {
    match values {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::Array(items) if LIST_KEYS.contains(&key.as_str()) => append(items, secret),
                    _ => inject(value, secret),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| inject(item, secret)),
        _ => {}
    }
}

fn append(items: &mut Vec<Value>, secret: &str) {
    let already = items.iter().any(|item| match item {
        Value::String(name) => name == secret,
        Value::Object(object) => object.get("name").and_then(Value::as_str) == Some(secret),
        _ => false,
    });
    if already {
        return;
    }
    let strings = !items.is_empty() && items.iter().all(Value::is_string);
    items.push(if strings {
        Value::from(secret)
    } else {
        serde_json::json!({ "name": secret })
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    const NAME: &str = "sh.distr.agent.v1.web.pull";

    #[test]
    fn names_follow_the_protocol() {
        assert_eq!(secret_name("web"), NAME);
    }

    #[test]
    fn lists_anywhere_get_the_secret() {
        let mut values = json!({
            "imagePullSecrets": [],
            "global": {"imagePullSecrets": ["vendor-secret"]},
            "sub": {"deep": {"pullSecrets": [{"name": "other"}]}},
            "workers": [{"imagePullSecrets": []}],
            "unrelated": [1, 2],
        });
        inject(&mut values, NAME);
        assert_eq!(
            values,
            json!({
                "imagePullSecrets": [{"name": NAME}],
                "global": {"imagePullSecrets": ["vendor-secret", NAME]},
                "sub": {"deep": {"pullSecrets": [{"name": "other"}, {"name": NAME}]}},
                "workers": [{"imagePullSecrets": [{"name": NAME}]}],
                "unrelated": [1, 2],
            })
        );
    }

    #[test]
    fn other_shapes_are_left_alone() {
        let mut values = json!({
            "imagePullSecrets": "a-string",
            "pullSecrets": {"name": "x"},
            "image": {"pullSecrets": null},
        });
        let before = values.clone();
        inject(&mut values, NAME);
        assert_eq!(values, before);
    }

    #[test]
    fn injection_is_idempotent() {
        let mut values = json!({"imagePullSecrets": [], "global": {"imagePullSecrets": ["a"]}});
        inject(&mut values, NAME);
        let once = values.clone();
        inject(&mut values, NAME);
        assert_eq!(values, once);
    }

    #[test]
    fn mixed_lists_get_objects() {
        let mut values = json!({"imagePullSecrets": ["a", {"name": "b"}]});
        inject(&mut values, NAME);
        assert_eq!(values["imagePullSecrets"][2], json!({"name": NAME}));
    }

    #[test]
    fn secret_has_the_docker_config_type() {
        let secret = build_secret("apps", "web", br#"{"auths":{}}"#.to_vec());
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        assert_eq!(secret.metadata.name.as_deref(), Some(NAME));
        assert_eq!(secret.data.unwrap()[".dockerconfigjson"].0, br#"{"auths":{}}"#);
        assert!(
            !secret
                .metadata
                .labels
                .unwrap()
                .contains_key("agent.distr.sh/deployment")
        );
    }
}
