//! The updater's state and its Secret `distr-agent-updater-state`: what the updater did last,
//! recorded before every step, read and written with writes conditional on the
//! `resourceVersion` last seen (so that two updaters can never both win).
//!
//! A Secret, because it records the agent's Secrets as they were, to restore them on a
//! roll-back. The install manifest creates it empty; the updater may change it but never create
//! it (nor any Secret): when it is missing, no update is taken.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cluster::{AgentObjects, ApiError};

pub use crate::manifest::STATE_SECRET;
/// Why no update is taken when the state Secret is missing.
pub const STATE_MISSING: &str =
    "the updater's state Secret distr-agent-updater-state is missing; apply the agent's manifest again with kubectl";
/// The key of the state in the state Secret's data.
const STATE_KEY: &str = "state.json";
const PART_OF: &str = "app.kubernetes.io/part-of";
/// The most a Secret holds (the API server's bound on its data): the state, with the manifest
/// and the objects as they were, must fit.
pub const MAX_STATE_BYTES: usize = 1024 * 1024;
/// How many failed versions the state remembers (the oldest are forgotten first).
pub const MAX_FAILED_VERSIONS: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    #[default]
    Idle,
    Validating,
    Applying,
    Waiting,
    RollingBack,
    Done,
    Failed,
}

impl Phase {
    /// An update is under way: an updater must finish it (or roll it back).
    pub fn under_way(self) -> bool {
        matches!(self, Phase::Applying | Phase::Waiting | Phase::RollingBack)
    }
}

/// What the updater did last, as kept in its state Secret. Its `Debug` leaves out the manifest
/// and the recorded objects, which hold the agent's Secrets.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct State {
    pub phase: Phase,
    pub target_version_id: String,
    pub message: String,
    pub changed_at: Option<DateTime<Utc>>,
    pub failed_version_ids: Vec<String>,
    /// The manifest being applied.
    pub manifest: String,
    /// Each object the update touches as it was before (`null`: it did not exist), by
    /// `Kind/name`.
    pub previous: BTreeMap<String, Value>,
    /// The updater acting on the update (`<pod>/<pid>`); empty once it let go.
    pub holder: String,
    /// When the holder last said it is alive, renewed while an update is under way.
    pub heartbeat: Option<DateTime<Utc>>,
    /// Why the update under way is rolled back (kept apart from `message`, which says how
    /// the roll-back goes).
    pub rollback_reason: String,
}

impl State {
    /// Records `version` as failed, forgetting the oldest beyond [`MAX_FAILED_VERSIONS`].
    pub fn remember_failed(&mut self, version: &str) {
        if self.failed_version_ids.iter().any(|v| v == version) {
            return;
        }
        self.failed_version_ids.push(version.to_owned());
        let excess = self.failed_version_ids.len().saturating_sub(MAX_FAILED_VERSIONS);
        self.failed_version_ids.drain(..excess);
    }
}

/// The bytes `state` takes in its Secret.
pub fn state_size(state: &State) -> usize {
    serde_json::to_vec(state).map_or(usize::MAX, |bytes| bytes.len())
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("phase", &self.phase)
            .field("target_version_id", &self.target_version_id)
            .field("message", &self.message)
            .field("changed_at", &self.changed_at)
            .field("failed_version_ids", &self.failed_version_ids)
            .field("manifest", &format_args!("<{} bytes>", self.manifest.len()))
            .field("previous", &self.previous.keys().collect::<Vec<_>>())
            .field("holder", &self.holder)
            .field("heartbeat", &self.heartbeat)
            .field("rollback_reason", &self.rollback_reason)
            .finish()
    }
}

/// The version the agent ran before the update, from the recorded ConfigMap `distr-agent-env`.
pub fn previous_version(state: &State) -> String {
    state
        .previous
        .get("ConfigMap/distr-agent-env")
        .and_then(|config| config["data"]["DISTR_AGENT_VERSION_ID"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Why the state could not be read or written. Only [`StateError::Api`] with a retryable
/// [`ApiError`] may go away by itself; `Missing` needs the manifest applied again; `Lost` and
/// `NotActing` mean another updater acts (this one reads the state again before it does).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{STATE_MISSING}")]
    Missing,
    /// The Secret holds something that is no state (the error names no content: the Secret
    /// holds the agent's Secrets).
    #[error("the updater's state Secret holds no state ({0})")]
    Unreadable(String),
    /// Another updater wrote the state since this one read it.
    #[error("another updater wrote the state since this one read it: {0}")]
    Lost(ApiError),
    #[error("another updater acts on the update; this one no longer writes")]
    NotActing,
    #[error("cannot read or record the updater's state: {0}")]
    Api(ApiError),
}

/// What kind of JSON error, without the input it quotes.
fn classify(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not a state",
        serde_json::error::Category::Eof => "cut short",
    }
}

/// Reads the state Secret: the state (default when it holds none) and its `resourceVersion`;
/// `None` when the Secret is missing.
pub async fn read(objects: &dyn AgentObjects) -> Result<Option<(State, String)>, StateError> {
    let Some(live) = objects.get("Secret", STATE_SECRET).await.map_err(StateError::Api)? else {
        return Ok(None);
    };
    let secret: Secret = serde_json::from_value(live).map_err(|_| StateError::Unreadable("not a Secret".into()))?;
    let version = secret.metadata.resource_version.unwrap_or_default();
    let state = match secret.data.as_ref().and_then(|data| data.get(STATE_KEY)) {
        None => State::default(),
        Some(bytes) => serde_json::from_slice::<State>(&bytes.0).map_err(|error| {
            StateError::Unreadable(format!(
                "{} at line {} column {}",
                classify(&error),
                error.line(),
                error.column()
            ))
        })?,
    };
    Ok(Some((state, version)))
}

/// Writes `state`, conditional on `version` (the `resourceVersion` last seen; never creating
/// the Secret); the new `resourceVersion`.
pub async fn write(
    objects: &dyn AgentObjects,
    namespace: &str,
    state: &State,
    version: &str,
) -> Result<String, StateError> {
    let text = serde_json::to_vec(state).map_err(|e| StateError::Unreadable(e.to_string()))?;
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": STATE_SECRET, "namespace": namespace, "labels": {PART_OF: "distr-agent"},
            // Server-side apply takes a `resourceVersion` as a precondition.
            "resourceVersion": version,
        },
        "data": {STATE_KEY: ByteString(text)},
    });
    match objects.apply("Secret", STATE_SECRET, &body, false).await {
        Ok(stored) => Ok(stored["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned()),
        Err(ApiError::NotFound { .. }) => Err(StateError::Missing),
        Err(error @ ApiError::Conflict { .. }) => Err(StateError::Lost(error)),
        Err(error) => Err(StateError::Api(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_version_is_read_from_the_recorded_configmap() {
        let state = State {
            previous: BTreeMap::from([(
                "ConfigMap/distr-agent-env".to_owned(),
                json!({"data": {"DISTR_AGENT_VERSION_ID": "v1"}}),
            )]),
            ..Default::default()
        };
        assert_eq!(previous_version(&state), "v1");
        assert_eq!(previous_version(&State::default()), "", "no update yet");
    }

    #[test]
    fn the_failed_versions_are_capped_oldest_first() {
        let mut state = State::default();
        for n in 0..MAX_FAILED_VERSIONS + 5 {
            state.remember_failed(&format!("v{n}"));
        }
        state.remember_failed("v36");
        assert_eq!(state.failed_version_ids.len(), MAX_FAILED_VERSIONS);
        assert_eq!(state.failed_version_ids[0], "v5");
        assert_eq!(state.failed_version_ids.last().map(String::as_str), Some("v36"));
    }
}
