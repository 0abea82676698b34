//! The customer's policy: what the vendor may install through this agent, decided by the
//! cluster's admin in a ConfigMap the Hub cannot change, and enforced before Helm writes.
//!
//! - [`document`]: the document and its parser; [`check`]: the pure check of a release and
//!   its rendered objects; [`pod_security`]: the Pod Security Standards over a pod spec.
//! - [`watch`]: the watch of the ConfigMap, so that an edit takes effect without a restart.
//! - [`Gate`]: what the Helm driver asks before an install or upgrade (see
//!   `helm::HelmDriver`): the current policy, and the scopes of kinds the check cannot tell.

pub mod check;
pub mod document;
pub mod pod_security;
pub mod watch;

use std::{sync::Arc, time::Duration};

use serde::Deserialize;
use serde_json::Value;

pub use self::{
    check::{Refusal, Scopes, Violation},
    document::{Policy, PolicyError},
};

/// How long an install waits for the first reading of the policy before it is refused.
const FIRST_READ_WAIT: Duration = Duration::from_secs(30);

/// What the executor knows of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyState {
    /// Not read yet: installs wait, then are refused.
    Unknown,
    /// No ConfigMap: no restriction (the behaviour before policies).
    Absent,
    Active(Arc<Policy>),
    /// The ConfigMap does not hold a valid policy: every install and upgrade is refused.
    Invalid(PolicyError),
}

impl PolicyState {
    /// The state a ConfigMap's `policy.yaml` gives.
    pub fn from_document(text: Option<&str>) -> Self {
        match document::parse(text) {
            Ok(policy) => Self::Active(Arc::new(policy)),
            Err(error) => Self::Invalid(error),
        }
    }
}

/// The policy as the Helm driver sees it. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    state: tokio::sync::watch::Receiver<PolicyState>,
    /// For the scopes of kinds neither built in nor defined by the release (`None` in tests).
    client: Option<kube::Client>,
    /// The agent's namespace, where the policy lives.
    pub agent_namespace: String,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("state", &*self.state.borrow())
            .field("agent_namespace", &self.agent_namespace)
            .finish_non_exhaustive()
    }
}

/// What an operation may do under the current policy.
#[derive(Clone, Debug)]
pub enum Decision {
    /// No policy: proceed as before.
    Unrestricted,
    /// Check the release against this policy.
    Check(Arc<Policy>),
    /// Refuse, for this reason.
    Refuse(String),
}

impl Gate {
    pub fn new(
        state: tokio::sync::watch::Receiver<PolicyState>,
        client: Option<kube::Client>,
        agent_namespace: &str,
    ) -> Self {
        Self {
            state,
            client,
            agent_namespace: agent_namespace.to_owned(),
        }
    }

    /// The policy now, once it has been read (waiting up to [`FIRST_READ_WAIT`] at start).
    pub async fn decision(&self) -> Decision {
        let mut state = self.state.clone();
        let read = tokio::time::timeout(FIRST_READ_WAIT, state.wait_for(|state| *state != PolicyState::Unknown)).await;
        let current = match read {
            Ok(Ok(state)) => state.clone(),
            _ => PolicyState::Unknown,
        };
        match current {
            PolicyState::Absent => Decision::Unrestricted,
            PolicyState::Active(policy) => Decision::Check(policy),
            PolicyState::Unknown => Decision::Refuse(format!(
                "the agent policy ({}) could not be read yet; nothing is installed until it is",
                document::CONFIG_MAP
            )),
            PolicyState::Invalid(error) => Decision::Refuse(format!(
                "the agent policy is invalid, and blocks every install and upgrade until it is fixed: {error}"
            )),
        }
    }

    /// The ServiceAccount Helm runs as in `namespace` (`--kube-as-user`), if the policy names
    /// one. An unread or invalid policy names none (uninstalls and rollbacks still run).
    pub fn impersonation(&self, namespace: &str) -> Option<String> {
        match &*self.state.borrow() {
            PolicyState::Active(policy) => policy.impersonation(namespace),
            _ => None,
        }
    }

    /// Whether each kind is namespaced, as the API server says (kinds it does not serve are
    /// left out: the check then treats them by their objects).
    pub async fn scopes(&self, kinds: &[(String, String)]) -> Scopes {
        let mut scopes = Scopes::new();
        let Some(client) = &self.client else {
            return scopes;
        };
        for (api_version, kind) in kinds {
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
            match kube::discovery::pinned_kind(client, &gvk).await {
                Ok((_, capabilities)) => {
                    scopes.insert(
                        (group.to_owned(), kind.clone()),
                        capabilities.scope == kube::discovery::Scope::Namespaced,
                    );
                }
                Err(error) => tracing::debug!(%api_version, %kind, %error, "kind unknown to the API server"),
            }
        }
        scopes
    }
}

/// The release Helm would write, as `helm install|upgrade --dry-run=server --output=json`
/// prints it.
#[derive(Debug, Deserialize)]
struct RenderedRelease {
    #[serde(default)]
    manifest: String,
    #[serde(default)]
    hooks: Vec<RenderedHook>,
}

#[derive(Debug, Deserialize)]
struct RenderedHook {
    #[serde(default)]
    manifest: String,
}

/// Errors reading what Helm rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("helm's rendered release is not the JSON expected: {0}")]
    Json(#[source] serde_json::Error),
    #[error("a rendered manifest is not valid YAML: {0}")]
    Yaml(#[source] serde_norway::Error),
}

/// Every object of a rendered release (manifest and hooks), `List`s flattened.
pub fn rendered_objects(release_json: &[u8]) -> Result<Vec<Value>, RenderError> {
    // Helm prints what it pulled (`Pulled: ...`, `Digest: ...`) on stdout before the JSON.
    let start = if release_json.starts_with(b"{") {
        0
    } else {
        release_json
            .windows(2)
            .position(|pair| pair == b"\n{")
            .map_or(0, |index| index + 1)
    };
    let release: RenderedRelease = serde_json::from_slice(&release_json[start..]).map_err(RenderError::Json)?;
    let mut objects = Vec::new();
    for manifest in std::iter::once(&release.manifest).chain(release.hooks.iter().map(|hook| &hook.manifest)) {
        manifest_objects(manifest, &mut objects)?;
    }
    Ok(objects)
}

/// Appends the objects of a multi-document YAML manifest.
pub fn manifest_objects(manifest: &str, objects: &mut Vec<Value>) -> Result<(), RenderError> {
    for document in serde_norway::Deserializer::from_str(manifest) {
        let value = Value::deserialize(document).map_err(RenderError::Yaml)?;
        flatten(value, objects);
    }
    Ok(())
}

fn flatten(value: Value, objects: &mut Vec<Value>) {
    let is_list = value
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|kind| kind.ends_with("List"))
        && value.get("items").is_some_and(Value::is_array);
    if is_list {
        if let Some(Value::Array(items)) = value.get("items").cloned() {
            items.into_iter().for_each(|item| flatten(item, objects));
        }
    } else if value.is_object() {
        objects.push(value);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_release_gives_its_objects_and_hooks() {
        let json = serde_json::json!({
            "name": "web",
            "manifest": "---\n# Source: a.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n# empty\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Secret, metadata: {name: b}}\n",
            "hooks": [{"manifest": "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: migrate\n"}]
        });
        let objects = rendered_objects(json.to_string().as_bytes()).unwrap();
        let pulled = format!("Pulled: 127.0.0.1:5000/charts/web:0.1.0\nDigest: sha256:00\n{json}");
        assert_eq!(rendered_objects(pulled.as_bytes()).unwrap(), objects);
        let names: Vec<&str> = objects
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "migrate"]);
        assert!(rendered_objects(b"not json").is_err());
        let bad_yaml = serde_json::json!({"manifest": "a: [b"}).to_string();
        assert!(matches!(
            rendered_objects(bad_yaml.as_bytes()),
            Err(RenderError::Yaml(_))
        ));
    }

    #[tokio::test]
    async fn the_gate_follows_the_state() {
        let (sender, receiver) = tokio::sync::watch::channel(PolicyState::Absent);
        let gate = Gate::new(receiver, None, "agent");
        assert!(matches!(gate.decision().await, Decision::Unrestricted));
        sender.send_replace(PolicyState::from_document(Some("serviceAccounts: {apps: deployer}")));
        assert!(matches!(gate.decision().await, Decision::Check(_)));
        assert_eq!(
            gate.impersonation("apps").as_deref(),
            Some("system:serviceaccount:apps:deployer")
        );
        sender.send_replace(PolicyState::from_document(Some("images: nope")));
        let Decision::Refuse(message) = gate.decision().await else {
            panic!("an invalid policy refuses")
        };
        assert!(message.contains("blocks every install and upgrade"), "{message}");
        assert!(message.contains("invalid type"), "{message}");
        assert_eq!(gate.impersonation("apps"), None);
    }
}
