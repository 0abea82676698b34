//! Docker config JSON (`{"auths":{"host":{"auth":"base64(user:pass)"}}}`), the format both
//! Helm's `--registry-config` and Kubernetes' `kubernetes.io/dockerconfigjson` Secrets read.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};

use crate::model::{RegistryCredentials, RegistryLogin};

/// Builds the docker config for one release: the Hub registry login (user `-` unless the
/// login names another, password = the agent's JWT) and the deployment's own `registryAuth`
/// entries. A deployment entry for the same host wins, as it is the more specific one.
/// Hosts are sorted, so equal inputs give byte-equal output.
///
/// The result holds secrets: write it only to private files or Secrets, never to a log.
pub fn build(hub: Option<&RegistryLogin>, registry_auth: &BTreeMap<String, RegistryCredentials>) -> Vec<u8> {
    let mut auths = BTreeMap::new();
    if let Some(hub) = hub.filter(|hub| !hub.host.is_empty()) {
        auths.insert(
            hub.host.as_str(),
            entry(hub.effective_username(), hub.password.expose()),
        );
    }
    for (host, credentials) in registry_auth {
        auths.insert(
            host.as_str(),
            entry(&credentials.username, credentials.password.expose()),
        );
    }
    let config = serde_json::json!({ "auths": auths });
    // Serialising a tree of strings cannot fail.
    serde_json::to_vec(&config).unwrap_or_default()
}

fn entry(username: &str, password: &str) -> serde_json::Value {
    serde_json::json!({ "auth": STANDARD.encode(format!("{username}:{password}")) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::SecretString;

    #[test]
    fn hub_login_and_registry_auth_are_combined() {
        let hub = RegistryLogin {
            host: "hub.example.com:5000".into(),
            username: String::new(),
            password: SecretString::new("the.jwt"),
            plain_http: true,
        };
        let mut extra = BTreeMap::new();
        extra.insert(
            "registry.example.com".to_owned(),
            RegistryCredentials {
                username: "u".into(),
                password: SecretString::new("p"),
            },
        );
        let json = String::from_utf8(build(Some(&hub), &extra)).unwrap();
        assert_eq!(
            json,
            r#"{"auths":{"hub.example.com:5000":{"auth":"LTp0aGUuand0"},"registry.example.com":{"auth":"dTpw"}}}"#
        );
        assert_eq!(STANDARD.decode("LTp0aGUuand0").unwrap(), b"-:the.jwt");
    }

    #[test]
    fn deployment_credentials_win_for_the_same_host() {
        let hub = RegistryLogin {
            host: "hub.example.com".into(),
            username: "-".into(),
            password: SecretString::new("jwt"),
            plain_http: false,
        };
        let mut extra = BTreeMap::new();
        extra.insert(
            "hub.example.com".to_owned(),
            RegistryCredentials {
                username: "u".into(),
                password: SecretString::new("p"),
            },
        );
        let json: serde_json::Value = serde_json::from_slice(&build(Some(&hub), &extra)).unwrap();
        assert_eq!(json["auths"]["hub.example.com"]["auth"], "dTpw");
    }

    #[test]
    fn no_credentials_give_empty_auths() {
        assert_eq!(build(None, &BTreeMap::new()), br#"{"auths":{}}"#);
    }
}
