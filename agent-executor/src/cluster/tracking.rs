//! The tracking Secret of each release: what the agent deployed, in the format existing
//! Distr agents write (so installs stay compatible in both directions).
//!
//! Name `sh.distr.agent.v1.<release>`, label `agent.distr.sh/deployment=<release>`, key
//! `release` = JSON `{"id","revisionId","releaseName","helmRevision","phase","logsEnabled"}`,
//! optional key `lastLogTimestamp` (owned by log collection; never touched here). A record
//! whose `id` is the nil UUID is an adoption request for the Hub deployment with that release
//! name.
//!
//! Only the canonical Secret holds a record of what the agent deployed: a Secret of another
//! name carrying the label is read only as an adoption request (nil id), never as a record
//! the agent acts on destructively (uninstall, recovery). Whoever may create a Secret in the
//! namespace (or a chart that renders one) must not make the agent uninstall a release it did
//! not install.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};

use crate::{
    cluster::kube_util::{self, ApiError},
    model::NIL_UUID,
};

/// Label that marks a tracking Secret; its value is the release name.
pub const DEPLOYMENT_LABEL: &str = "agent.distr.sh/deployment";
/// Data key holding the record JSON.
pub const RELEASE_KEY: &str = "release";
/// Data key of the log watermark (RFC 3339).
pub const LAST_LOG_TIMESTAMP_KEY: &str = "lastLogTimestamp";
const NAME_PREFIX: &str = "sh.distr.agent.v1.";

/// Errors reading or writing tracking Secrets.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The Secret exists but its `release` key is missing or not the expected JSON. Not
    /// retryable until someone fixes or deletes the Secret.
    #[error("tracking Secret {secret} is invalid: {reason}")]
    Invalid { secret: String, reason: String },
    /// An API call failed (retryable).
    #[error("cannot {action} tracking Secret {secret}: {source}")]
    Api {
        action: &'static str,
        secret: String,
        #[source]
        source: ApiError,
    },
}

/// Tracking phase: where the last operation of the agent on the release stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// A Helm operation was started and its outcome not yet recorded.
    Progressing,
    /// The last operation succeeded. Records of older agents carry no phase and mean this.
    #[default]
    Ready,
    /// The last operation failed.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "progressing",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

/// The JSON under the `release` key. Field names are the wire format; do not rename.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingRecord {
    /// Hub deployment id; the nil UUID marks an adoption request.
    pub id: String,
    #[serde(rename = "revisionId", default)]
    pub revision_id: String,
    #[serde(rename = "releaseName")]
    pub release_name: String,
    /// Helm revision the agent last recorded; absent (or 0 from older agents) when unknown.
    #[serde(
        rename = "helmRevision",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "positive_or_none"
    )]
    pub helm_revision: Option<u32>,
    #[serde(default)]
    pub phase: Phase,
    #[serde(rename = "logsEnabled", default)]
    pub logs_enabled: bool,
    /// The Helm revision an operator's `Rollback` went back to: until the Hub sends another
    /// revision, the cluster runs that one, not `revisionId`. Absent otherwise (and in the
    /// records of older agents, which ignore it).
    #[serde(rename = "rolledBackTo", default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u32>,
}

fn positive_or_none<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    let value = Option::<i64>::deserialize(deserializer)?;
    Ok(value
        .and_then(|value| u32::try_from(value).ok())
        .filter(|value| *value > 0))
}

impl TrackingRecord {
    /// An adoption request (nil id) rather than a record of something the agent deployed.
    pub fn is_adoption_request(&self) -> bool {
        self.id.is_empty() || self.id == NIL_UUID
    }

    /// Whether this record belongs to the Hub deployment `id` (UUIDs compare case-blind).
    pub fn belongs_to(&self, id: &str) -> bool {
        self.id.eq_ignore_ascii_case(id)
    }

    /// Whether the recorded revision is `revision_id`.
    pub fn is_revision(&self, revision_id: &str) -> bool {
        self.revision_id.eq_ignore_ascii_case(revision_id)
    }

    /// Serialises the record for the `release` key.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, integers and booleans always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Name of the tracking Secret of `release`.
pub fn secret_name(release: &str) -> String {
    format!("{NAME_PREFIX}{release}")
}

/// A tracking record read from the cluster, with the name of the Secret it came from (an
/// adoption request may sit in a Secret of another name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub secret: String,
    pub record: TrackingRecord,
}

impl Tracked {
    /// Read from the canonical Secret of its release: the agent's own record.
    pub fn is_canonical(&self) -> bool {
        self.secret == secret_name(&self.record.release_name)
    }

    /// A record of something the agent deployed, which it may act on destructively
    /// (uninstall, recovery): read from the canonical Secret and not an adoption request.
    pub fn is_own_record(&self) -> bool {
        self.is_canonical() && !self.record.is_adoption_request()
    }
}

/// Whether a record read from the Secret `secret` counts at all: the canonical Secret's
/// record, or an adoption request (nil id) in a Secret of any name. A Secret of another name
/// that claims a deployment id is ignored: only the agent writes records of what it deployed,
/// and it writes them to the canonical Secret.
pub fn admissible(secret: &str, record: &TrackingRecord) -> bool {
    secret == secret_name(&record.release_name) || record.is_adoption_request()
}

/// One tracking Secret found by [`TrackingStore::list`].
#[derive(Debug)]
pub enum Listed {
    Valid(Tracked),
    /// A Secret whose record does not decode, with the release it names (when it does).
    Broken {
        release: Option<String>,
        error: TrackingError,
    },
}

/// Decodes the record of a tracking Secret.
pub fn decode(secret: &Secret) -> Result<TrackingRecord, TrackingError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let invalid = |reason: String| TrackingError::Invalid {
        secret: name.clone(),
        reason,
    };
    let data = secret
        .data
        .as_ref()
        .and_then(|data| data.get(RELEASE_KEY))
        .ok_or_else(|| invalid(format!("no {RELEASE_KEY:?} key")))?;
    let record: TrackingRecord = serde_json::from_slice(&data.0).map_err(|error| invalid(error.to_string()))?;
    if record.release_name.is_empty() {
        return Err(invalid("releaseName is empty".to_owned()));
    }
    // A record must be about the release its Secret is for: acting on the record's name
    // could touch (even uninstall) another release.
    let claims = [
        ("name", name.strip_prefix(NAME_PREFIX)),
        (
            "label",
            secret
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(DEPLOYMENT_LABEL))
                .map(String::as_str),
        ),
    ];
    for (what, release) in claims {
        if let Some(release) = release
            && release != record.release_name
        {
            return Err(invalid(format!(
                "its releaseName {:?} does not match the release {release:?} of its {what}",
                record.release_name
            )));
        }
    }
    Ok(record)
}

/// Decodes the tracking record found for `release`, which must be about that release.
pub fn decode_for(secret: &Secret, release: &str) -> Result<TrackingRecord, TrackingError> {
    let record = decode(secret)?;
    if record.release_name != release {
        return Err(TrackingError::Invalid {
            secret: secret.metadata.name.clone().unwrap_or_default(),
            reason: format!(
                "its releaseName {:?} does not match the release {release:?}",
                record.release_name
            ),
        });
    }
    Ok(record)
}

/// Release name a tracking Secret is about, even when its record does not parse.
pub fn release_of(secret: &Secret) -> Option<String> {
    let from_label = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(DEPLOYMENT_LABEL))
        .cloned();
    from_label.or_else(|| {
        secret
            .metadata
            .name
            .as_deref()?
            .strip_prefix(NAME_PREFIX)
            .map(str::to_owned)
    })
}

/// A new tracking Secret holding `record`.
pub fn build_secret(namespace: &str, record: &TrackingRecord) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&record.release_name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                DEPLOYMENT_LABEL.to_owned(),
                record.release_name.clone(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(RELEASE_KEY.to_owned(), ByteString(record.to_json()))])),
        ..Secret::default()
    }
}

/// Tracking Secrets of one namespace.
#[derive(Clone)]
pub struct TrackingStore {
    api: Api<Secret>,
    namespace: String,
}

impl TrackingStore {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// The namespace of these Secrets (and of the releases they track).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The tracking record of `release`: the canonical Secret, or else an adoption request
    /// (nil id) in a Secret of another name labelled for the release. `Err(Invalid)` when the
    /// canonical Secret exists but its record is broken.
    pub async fn find(&self, release: &str) -> Result<Option<Tracked>, TrackingError> {
        let name = secret_name(release);
        let api_error = |action, source| TrackingError::Api {
            action,
            secret: name.clone(),
            source,
        };
        if let Some(secret) = kube_util::call_opt(self.api.get(&name))
            .await
            .map_err(|e| api_error("read", e))?
        {
            return decode_for(&secret, release).map(|record| {
                Some(Tracked {
                    secret: name.clone(),
                    record,
                })
            });
        }
        let selector = format!("{DEPLOYMENT_LABEL}={release}");
        let list = kube_util::call(self.api.list(&ListParams::default().labels(&selector)))
            .await
            .map_err(|e| api_error("list", e))?;
        Ok(list.items.iter().find_map(|secret| {
            let record = decode_for(secret, release).ok()?;
            let name = secret.metadata.name.clone()?;
            if !admissible(&name, &record) {
                tracing::debug!(secret = %name, release, "ignoring a Secret that claims a deployment under another name than the agent's");
                return None;
            }
            Some(Tracked { secret: name, record })
        }))
    }

    /// Every tracking Secret of the namespace, broken ones included; a Secret of another name
    /// than the canonical one counts only as an adoption request (see [`admissible`]).
    pub async fn list(&self) -> Result<Vec<Listed>, TrackingError> {
        let list = kube_util::call(self.api.list(&ListParams::default().labels(DEPLOYMENT_LABEL)))
            .await
            .map_err(|source| TrackingError::Api {
                action: "list",
                secret: format!("{NAME_PREFIX}*"),
                source,
            })?;
        Ok(list
            .items
            .iter()
            // Only tracking Secrets: not the pull Secrets, whatever labels someone gave them.
            .filter(|secret| !secret.metadata.name.as_deref().unwrap_or_default().ends_with(".pull"))
            .filter_map(|secret| {
                let name = secret.metadata.name.clone().unwrap_or_default();
                match decode(secret) {
                    Ok(record) if admissible(&name, &record) => Some(Listed::Valid(Tracked { secret: name, record })),
                    Ok(record) => {
                        tracing::debug!(secret = %name, release = %record.release_name, "ignoring a Secret that claims a deployment under another name than the agent's");
                        None
                    }
                    Err(error) => Some(Listed::Broken {
                        release: release_of(secret),
                        error,
                    }),
                }
            })
            .collect())
    }

    /// Writes `record` to the canonical Secret of its release: a merge patch of the
    /// `release` key and the label (other keys, such as `lastLogTimestamp`, stay as they
    /// are), or a create when the Secret does not exist.
    pub async fn save(&self, record: &TrackingRecord) -> Result<(), TrackingError> {
        let name = secret_name(&record.release_name);
        let api_error = |action, source| TrackingError::Api {
            action,
            secret: name.clone(),
            source,
        };
        let patch = serde_json::json!({
            "metadata": {"labels": {DEPLOYMENT_LABEL: record.release_name}},
            "data": {RELEASE_KEY: ByteString(record.to_json())},
        });
        let patched = kube_util::call_opt(self.api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await
            .map_err(|e| api_error("update", e))?;
        if patched.is_some() {
            return Ok(());
        }
        let secret = build_secret(&self.namespace, record);
        match kube_util::call(self.api.create(&PostParams::default(), &secret)).await {
            Ok(_) => Ok(()),
            // Created concurrently: patch again.
            Err(error) if error.is_conflict() => {
                kube_util::call(self.api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)))
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error("update", e))
            }
            Err(error) => Err(api_error("create", error)),
        }
    }

    /// Deletes the Secret `secret` (a tracking Secret); a missing one is fine.
    pub async fn delete(&self, secret: &str) -> Result<(), TrackingError> {
        kube_util::call_opt(self.api.delete(secret, &DeleteParams::default()))
            .await
            .map(|_| ())
            .map_err(|source| TrackingError::Api {
                action: "delete",
                secret: secret.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record() -> TrackingRecord {
        TrackingRecord {
            id: "8c5b2a8e-3f0e-4a53-9d5e-2f3c1f0b9a11".into(),
            revision_id: "1d0f6a5e-7c84-4d61-8f1e-9b0c2d3e4f50".into(),
            release_name: "web".into(),
            helm_revision: Some(3),
            phase: Phase::Ready,
            logs_enabled: true,
            rolled_back_to: None,
        }
    }

    #[test]
    fn record_json_uses_the_wire_field_names() {
        let json = String::from_utf8(record().to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"id":"8c5b2a8e-3f0e-4a53-9d5e-2f3c1f0b9a11","revisionId":"1d0f6a5e-7c84-4d61-8f1e-9b0c2d3e4f50","releaseName":"web","helmRevision":3,"phase":"ready","logsEnabled":true}"#
        );
        let back: TrackingRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record());
    }

    #[test]
    fn a_manual_rollback_is_recorded_and_read_back() {
        let rolled_back = TrackingRecord {
            helm_revision: Some(4),
            rolled_back_to: Some(4),
            ..record()
        };
        let json: serde_json::Value = serde_json::from_slice(&rolled_back.to_json()).unwrap();
        assert_eq!(json["rolledBackTo"], 4);
        let back: TrackingRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, rolled_back);
        let plain: serde_json::Value = serde_json::from_slice(&record().to_json()).unwrap();
        assert!(plain.get("rolledBackTo").is_none(), "{plain}");
    }

    #[test]
    fn unknown_helm_revision_is_left_out() {
        let mut record = record();
        record.helm_revision = None;
        record.phase = Phase::Progressing;
        let json: serde_json::Value = serde_json::from_slice(&record.to_json()).unwrap();
        assert!(json.get("helmRevision").is_none());
        assert_eq!(json["phase"], "progressing");
    }

    #[test]
    fn records_of_older_agents_parse() {
        // The Go agent writes no phase and helmRevision 0 when unknown.
        let record: TrackingRecord = serde_json::from_str(
            r#"{"id":"8c5b2a8e-3f0e-4a53-9d5e-2f3c1f0b9a11","revisionId":"r","releaseName":"web","helmRevision":0,"logsEnabled":false,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(record.phase, Phase::Ready);
        assert_eq!(record.helm_revision, None);
    }

    #[test]
    fn adoption_requests_are_recognised() {
        let record: TrackingRecord =
            serde_json::from_str(r#"{"id":"00000000-0000-0000-0000-000000000000","releaseName":"web"}"#).unwrap();
        assert!(record.is_adoption_request());
        assert_eq!(record.revision_id, "");
        assert!(!super::tests::record().is_adoption_request());
    }

    #[test]
    fn secrets_round_trip() {
        let secret = build_secret("apps", &record());
        assert_eq!(secret.metadata.name.as_deref(), Some("sh.distr.agent.v1.web"));
        assert_eq!(secret.metadata.labels.as_ref().unwrap()[DEPLOYMENT_LABEL], "web");
        assert_eq!(decode(&secret).unwrap(), record());
        assert_eq!(release_of(&secret).as_deref(), Some("web"));
    }

    #[test]
    fn broken_records_give_a_clear_error() {
        let mut secret = build_secret("apps", &record());
        secret.data = Some(BTreeMap::from([(
            RELEASE_KEY.to_owned(),
            ByteString(b"{not json".to_vec()),
        )]));
        let error = decode(&secret).unwrap_err().to_string();
        assert!(
            error.starts_with("tracking Secret sh.distr.agent.v1.web is invalid: "),
            "{error}"
        );
        secret.data = None;
        assert!(decode(&secret).unwrap_err().to_string().contains("no \"release\" key"));
    }

    #[test]
    fn a_record_about_another_release_is_invalid() {
        // The Secret of release "web" whose record names "db": acting on it would touch db.
        let mut secret = build_secret("apps", &record());
        let other = TrackingRecord {
            release_name: "db".into(),
            ..record()
        };
        secret.data = Some(BTreeMap::from([(RELEASE_KEY.to_owned(), ByteString(other.to_json()))]));
        let error = decode(&secret).unwrap_err().to_string();
        assert!(
            error.contains(r#"its releaseName "db" does not match the release "web" of its name"#),
            "{error}"
        );
        assert!(decode_for(&secret, "web").is_err());
        assert!(decode_for(&secret, "db").is_err());
        // The same with only the label saying which release it is for.
        secret.metadata.name = Some("adopt-web".into());
        let error = decode(&secret).unwrap_err().to_string();
        assert!(error.contains("of its label"), "{error}");
        // A record found for another release than the one asked for.
        let fine = build_secret("apps", &record());
        assert_eq!(decode_for(&fine, "web").unwrap(), record());
        assert!(
            decode_for(&fine, "db")
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
    }

    #[test]
    fn only_the_canonical_secret_holds_a_record_of_a_deployed_release() {
        let own = record();
        assert!(admissible("sh.distr.agent.v1.web", &own));
        // A Secret of another name claiming a deployment: ignored, whatever its labels say.
        assert!(!admissible("planted-web", &own));
        assert!(!admissible("sh.distr.agent.v1.db", &own));
        // Under another name, only an adoption request counts.
        let adoption = TrackingRecord {
            id: NIL_UUID.into(),
            ..record()
        };
        assert!(admissible("adopt-web", &adoption));
        let tracked = |secret: &str, record: &TrackingRecord| Tracked {
            secret: secret.into(),
            record: record.clone(),
        };
        assert!(tracked("sh.distr.agent.v1.web", &own).is_own_record());
        assert!(!tracked("adopt-web", &own).is_own_record());
        assert!(!tracked("sh.distr.agent.v1.web", &adoption).is_own_record());
        assert!(!tracked("adopt-web", &adoption).is_canonical());
    }

    #[test]
    fn ids_compare_case_blind() {
        let record = record();
        assert!(record.belongs_to("8C5B2A8E-3F0E-4A53-9D5E-2F3C1F0B9A11"));
        assert!(record.is_revision("1D0F6A5E-7C84-4D61-8F1E-9B0C2D3E4F50"));
    }
}
