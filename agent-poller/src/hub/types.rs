//! The JSON bodies of the Hub protocol (`hub-protocol.md`).
//!
//! Responses are parsed leniently: unknown fields (including the Docker-only ones such as
//! `composeFile`) are ignored, optional fields may be absent or `null` (the Hub is written in
//! Go, whose nil slices and maps encode as `null`). Request bodies are written exactly with the
//! protocol's field names.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::config::Secret;
use crate::duration::{DurationError, parse_go_duration};

/// `GET DISTR_RESOURCE_ENDPOINT`: what the Hub wants deployed on this target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// The agent version the Hub wants this target to run.
    #[serde(default)]
    pub version: Option<AgentVersion>,
    /// The namespace to deploy into (absent for some targets).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Whether cluster metrics should be sent.
    #[serde(default)]
    pub metrics_enabled: bool,
    /// Whether deployment logs should be shipped.
    #[serde(default)]
    pub deployment_logs_enabled: bool,
    /// Never ship deployment logs older than this.
    #[serde(default)]
    pub deployment_logs_after: Option<DateTime<Utc>>,
    /// The desired deployments; absent or empty means everything undeployed. An entry that
    /// does not parse (a field of the wrong JSON type) fails alone: see [`lenient_deployments`].
    #[serde(default, deserialize_with = "lenient_deployments")]
    pub deployments: Vec<Deployment>,
}

/// `resources.version`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentVersion {
    /// Compared with `DISTR_AGENT_VERSION_ID` to decide on self-update.
    pub id: Uuid,
    /// When the Hub created the version.
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// The version name, e.g. `1.2.3`.
    #[serde(default)]
    pub name: String,
}

/// One entry of `resources.deployments`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// The deployment id.
    pub id: Uuid,
    /// The revision to deploy; statuses are reported against it.
    pub revision_id: Uuid,
    /// Registry credentials by host, for the image pull Secret and the chart pull.
    #[serde(default, deserialize_with = "null_as_default")]
    pub registry_auth: BTreeMap<String, RegistryAuth>,
    /// Whether this deployment's logs are shipped.
    #[serde(default)]
    pub logs_enabled: bool,
    /// Restart the workloads after an upgrade.
    #[serde(default)]
    pub force_restart: bool,
    /// The Helm release name.
    #[serde(default)]
    pub release_name: String,
    /// `oci://...` for an OCI chart, otherwise a classic repository URL.
    #[serde(default)]
    pub chart_url: String,
    /// The chart's name in a classic repository (absent or empty for OCI charts).
    #[serde(default)]
    pub chart_name: Option<String>,
    /// The chart version.
    #[serde(default)]
    pub chart_version: String,
    /// Helm values, already merged by the Hub: a JSON object (`null` or absent: `{}`). Any
    /// other JSON is kept as it is, so that only this deployment fails (the executor refuses
    /// it) rather than the whole response.
    #[serde(default = "empty_object", deserialize_with = "null_as_empty_object")]
    pub values: serde_json::Value,
    /// Deploy even when the Helm revision differs from the one the agent recorded.
    #[serde(default)]
    pub ignore_revision_skew: bool,
    /// Helm options; absent means the defaults (see [`HelmOptions::effective`]).
    #[serde(default)]
    pub helm_options: Option<HelmOptions>,
    /// Why the Hub's entry for this deployment could not be read (only its ids and release
    /// name were): the executor reports it as this deployment's error and deploys nothing.
    #[serde(skip)]
    pub input_error: Option<String>,
}

impl Deployment {
    /// Whether the chart is pulled from an OCI registry (`chartUrl` starts with `oci://`).
    pub fn is_oci(&self) -> bool {
        self.chart_url.starts_with("oci://")
    }
}

/// Credentials for one registry host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegistryAuth {
    /// The user name.
    #[serde(default)]
    pub username: String,
    /// The password (redacted in `Debug`).
    #[serde(default = "empty_secret")]
    pub password: Secret,
}

fn empty_secret() -> Secret {
    Secret::new("")
}

/// `deployments[].helmOptions`: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelmOptions {
    /// A Go duration string such as `5m0s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// `watcher`, `legacy` or `hookOnly`.
    #[serde(default)]
    pub wait_strategy: Option<String>,
    /// Roll back a failed upgrade (`--rollback-on-failure`).
    #[serde(default)]
    pub rollback_on_failure: Option<bool>,
    /// Clean up new resources of a failed upgrade (`--cleanup-on-fail`).
    #[serde(default)]
    pub cleanup_on_failure: Option<bool>,
    /// `--force-conflicts`.
    #[serde(default)]
    pub force_conflicts: Option<bool>,
}

/// Helm options with the protocol's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveHelmOptions {
    /// Default 5 minutes.
    pub timeout: Duration,
    /// Default `watcher`.
    pub wait_strategy: String,
    /// Default true.
    pub rollback_on_failure: bool,
    /// Default true.
    pub cleanup_on_failure: bool,
    /// Default false.
    pub force_conflicts: bool,
}

impl Default for EffectiveHelmOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            wait_strategy: "watcher".to_owned(),
            rollback_on_failure: true,
            cleanup_on_failure: true,
            force_conflicts: false,
        }
    }
}

impl HelmOptions {
    /// The options with defaults applied for absent (or empty) fields; `None` gives all the
    /// defaults. Fails only on an unparsable timeout.
    pub fn effective(options: Option<&HelmOptions>) -> Result<EffectiveHelmOptions, DurationError> {
        let defaults = EffectiveHelmOptions::default();
        let Some(options) = options else {
            return Ok(defaults);
        };
        let timeout = match options.timeout.as_deref().filter(|t| !t.is_empty()) {
            Some(timeout) => parse_go_duration(timeout)?,
            None => defaults.timeout,
        };
        Ok(EffectiveHelmOptions {
            timeout,
            wait_strategy: options
                .wait_strategy
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or(defaults.wait_strategy),
            rollback_on_failure: options.rollback_on_failure.unwrap_or(defaults.rollback_on_failure),
            cleanup_on_failure: options.cleanup_on_failure.unwrap_or(defaults.cleanup_on_failure),
            force_conflicts: options.force_conflicts.unwrap_or(defaults.force_conflicts),
        })
    }
}

/// The `type` of a status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusType {
    /// Nothing to change and every resource passed its status check.
    Healthy,
    /// An install or upgrade finished.
    Running,
    /// An install or upgrade is under way.
    Progressing,
    /// Something failed; the message says what.
    Error,
}

/// `POST DISTR_STATUS_ENDPOINT` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The revision the status is about.
    pub revision_id: Uuid,
    /// The kind of status.
    #[serde(rename = "type")]
    pub status_type: StatusType,
    /// A human-readable message.
    pub message: String,
}

/// `POST DISTR_METRICS_ENDPOINT` body: sums over the cluster's nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentMetrics {
    /// Total CPU capacity in millicores.
    pub cpu_cores_millis: i64,
    /// CPU usage, 0..1.
    pub cpu_usage: f64,
    /// Total memory capacity in bytes.
    pub memory_bytes: i64,
    /// Memory usage, 0..1.
    pub memory_usage: f64,
    /// Per-filesystem disk usage, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_metrics: Option<Vec<DiskMetric>>,
}

/// One entry of `diskMetrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskMetric {
    /// Device name.
    pub device: String,
    /// Mount path.
    pub path: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Capacity in bytes.
    pub bytes_total: i64,
    /// Used bytes.
    pub bytes_used: i64,
}

/// One entry of the `PUT DISTR_LOGS_ENDPOINT` body: a deployment's log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    /// A fresh id per entry.
    pub id: Uuid,
    /// The deployment the line belongs to.
    pub deployment_id: Uuid,
    /// The deployment revision.
    pub deployment_revision_id: Uuid,
    /// The workload, e.g. `deployments/web`.
    pub resource: String,
    /// When the line was written (RFC 3339 with nanoseconds).
    pub timestamp: DateTime<Utc>,
    /// Severity.
    pub severity: String,
    /// The log line.
    pub body: String,
}

/// One entry of the `PUT DISTR_AGENT_LOGS_ENDPOINT` body: one of the agent's own log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLogEntry {
    /// When the line was written.
    pub timestamp: DateTime<Utc>,
    /// Severity.
    pub severity: String,
    /// The log line.
    pub body: String,
}

/// `POST DISTR_LOGIN_ENDPOINT` answer.
#[derive(Deserialize)]
pub(crate) struct LoginResponse {
    pub(crate) token: Secret,
}

/// Treats an explicit `null` like an absent field.
fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn null_as_empty_object<'de, D>(deserializer: D) -> Result<serde_json::Value, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Null => empty_object(),
        other => other,
    })
}

/// `resources.deployments`, one entry at a time. An entry whose `id`, `revisionId` and
/// `releaseName` are readable but another field is not (`"helmOptions": {"timeout": 300}`) is
/// kept with an [`Deployment::input_error`], so that it fails alone and its release still
/// counts as desired (never uninstalled because of bad input). Without those three nothing
/// can be said about the entry, and the whole response fails as before.
fn lenient_deployments<'de, D>(deserializer: D) -> Result<Vec<Deployment>, D::Error>
where
    D: Deserializer<'de>,
{
    let entries: Vec<serde_json::Value> = null_as_default(deserializer)?;
    entries
        .into_iter()
        .map(|entry| match Deployment::deserialize(&entry) {
            Ok(deployment) => Ok(deployment),
            Err(error) => unreadable_deployment(&entry).ok_or_else(|| serde::de::Error::custom(error)),
        })
        .collect()
}

/// The ids and release name of an entry that does not parse, with the reason as its
/// `input_error`; `None` when not even those are readable.
fn unreadable_deployment(entry: &serde_json::Value) -> Option<Deployment> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Ids {
        id: Uuid,
        revision_id: Uuid,
        release_name: String,
    }
    let ids = Ids::deserialize(entry).ok()?;
    let reason = entry
        .as_object()
        .and_then(|fields| unreadable_field(&ids_of(entry), fields, &[]))
        .unwrap_or_else(|| "it is not a JSON object of the expected shape".to_owned());
    Some(Deployment {
        id: ids.id,
        revision_id: ids.revision_id,
        registry_auth: BTreeMap::new(),
        logs_enabled: false,
        force_restart: false,
        release_name: ids.release_name,
        chart_url: String::new(),
        chart_name: None,
        chart_version: String::new(),
        values: empty_object(),
        ignore_revision_skew: false,
        helm_options: None,
        input_error: Some(format!("invalid deployment from the Hub: {reason}")),
    })
}

/// The entry's `id` and `revisionId` alone, to try one more field at a time against them.
fn ids_of(entry: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    ["id", "revisionId"]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), entry.get(key)?.clone())))
        .collect()
}

/// The path of the first field of `fields` (at `path` inside the entry) that makes the entry
/// fail, and what was expected there. Never quotes the value, which may be a secret.
fn unreadable_field(
    ids: &serde_json::Map<String, serde_json::Value>,
    fields: &serde_json::Map<String, serde_json::Value>,
    path: &[&str],
) -> Option<String> {
    // The entry with only this field (nested under `path`) besides the ids.
    let probe = |key: &str, value: serde_json::Value| {
        let mut nested = serde_json::Map::from_iter([(key.to_owned(), value)]);
        for parent in path.iter().rev() {
            nested = serde_json::Map::from_iter([((*parent).to_owned(), serde_json::Value::Object(nested))]);
        }
        let mut entry = ids.clone();
        entry.extend(nested);
        Deployment::deserialize(serde_json::Value::Object(entry)).err()
    };
    fields.iter().find_map(|(key, value)| {
        let error = probe(key, value.clone())?;
        let mut inner = path.to_vec();
        inner.push(key);
        if let serde_json::Value::Object(children) = value
            && let Some(found) = unreadable_field(ids, children, &inner)
        {
            return Some(found);
        }
        let kind = match value {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        };
        let error = error.to_string();
        let expected = error
            .split_once(", expected ")
            .map(|(_, expected)| format!(", expected {expected}"))
            .unwrap_or_default();
        Some(format!("{} is {kind}{expected}", inner.join(".")))
    })
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(value: serde_json::Value) -> Resources {
        serde_json::from_value(value).expect("resources parse")
    }

    #[test]
    fn parses_the_protocol_example_and_ignores_docker_and_unknown_fields() {
        let resources = parse(json!({
            "version": {"id": "7c0e5f4e-9a59-4c1b-bb4c-0c8f5a1f2d3e", "createdAt": "2025-01-02T03:04:05.123456789Z", "name": "1.2.3"},
            "namespace": "customer-ns",
            "metricsEnabled": true,
            "deploymentLogsEnabled": false,
            "deploymentLogsAfter": "2025-01-02T03:04:05Z",
            "somethingNew": {"nested": [1, 2]},
            "deployments": [{
                "id": "11111111-2222-4333-8444-555555555555",
                "revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa",
                "registryAuth": {"registry.example.com": {"username": "u", "password": "p"}},
                "logsEnabled": true,
                "forceRestart": false,
                "releaseName": "my-app",
                "chartUrl": "oci://registry.example.com/org/charts/my-app",
                "chartVersion": "1.4.0",
                "values": {"replicas": 2, "image": {"tag": "v1"}},
                "ignoreRevisionSkew": false,
                "helmOptions": {"timeout": "90s", "waitStrategy": "legacy"},
                "composeFile": "services: {}",
                "envFile": "A=B",
                "dockerType": "compose",
                "imageCleanupEnabled": true,
                "futureField": 42
            }]
        }));
        let version = resources.version.as_ref().expect("version");
        assert_eq!(version.name, "1.2.3");
        assert_eq!(resources.namespace.as_deref(), Some("customer-ns"));
        assert!(resources.metrics_enabled);
        assert!(resources.deployment_logs_after.is_some());
        let deployment = &resources.deployments[0];
        assert!(deployment.is_oci());
        assert_eq!(deployment.chart_name, None);
        assert_eq!(deployment.values["image"]["tag"], "v1");
        assert_eq!(deployment.registry_auth["registry.example.com"].password.expose(), "p");
        assert!(!format!("{deployment:?}").contains("\"p\""));
        let options = HelmOptions::effective(deployment.helm_options.as_ref()).expect("options");
        assert_eq!(options.timeout, Duration::from_secs(90));
        assert_eq!(options.wait_strategy, "legacy");
        assert!(options.rollback_on_failure && options.cleanup_on_failure && !options.force_conflicts);
    }

    #[test]
    fn absent_or_null_fields_take_defaults() {
        let resources = parse(json!({"version": {"id": "7c0e5f4e-9a59-4c1b-bb4c-0c8f5a1f2d3e", "name": "1"}}));
        assert_eq!(resources.namespace, None);
        assert!(resources.deployments.is_empty());

        let resources = parse(json!({
            "deployments": [{
                "id": "11111111-2222-4333-8444-555555555555",
                "revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa",
                "registryAuth": null,
                "values": null,
                "helmOptions": null,
                "releaseName": "classic",
                "chartUrl": "https://charts.example.com",
                "chartName": "nginx",
                "chartVersion": "1.0.0"
            }],
            "namespace": null
        }));
        let deployment = &resources.deployments[0];
        assert!(!deployment.is_oci());
        assert_eq!(deployment.chart_name.as_deref(), Some("nginx"));
        assert_eq!(deployment.values, json!({}));
        assert!(deployment.registry_auth.is_empty());
        assert_eq!(
            HelmOptions::effective(None).expect("defaults"),
            EffectiveHelmOptions::default()
        );

        let resources = parse(json!({"deployments": null}));
        assert!(resources.deployments.is_empty());
    }

    #[test]
    fn status_and_log_bodies_use_the_protocol_names() {
        let report = StatusReport {
            revision_id: Uuid::nil(),
            status_type: StatusType::Progressing,
            message: "helm upgrade in progress".into(),
        };
        assert_eq!(
            serde_json::to_value(&report).expect("json"),
            json!({"revisionId": "00000000-0000-0000-0000-000000000000", "type": "progressing", "message": "helm upgrade in progress"})
        );
        let metrics = AgentMetrics {
            cpu_cores_millis: 4000,
            cpu_usage: 0.25,
            memory_bytes: 1 << 30,
            memory_usage: 0.5,
            disk_metrics: Some(vec![DiskMetric {
                device: "/dev/sda1".into(),
                path: "/".into(),
                fs_type: "ext4".into(),
                bytes_total: 100,
                bytes_used: 40,
            }]),
        };
        let value = serde_json::to_value(&metrics).expect("json");
        assert_eq!(value["cpuCoresMillis"], 4000);
        assert_eq!(value["diskMetrics"][0]["fsType"], "ext4");
        assert_eq!(value["diskMetrics"][0]["bytesUsed"], 40);

        let entry = LogEntry {
            id: Uuid::nil(),
            deployment_id: Uuid::nil(),
            deployment_revision_id: Uuid::nil(),
            resource: "deployments/web".into(),
            timestamp: DateTime::parse_from_rfc3339("2025-01-02T03:04:05.000000123Z")
                .expect("time")
                .to_utc(),
            severity: "info".into(),
            body: "hello".into(),
        };
        let value = serde_json::to_value(&entry).expect("json");
        assert_eq!(value["deploymentRevisionId"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(value["timestamp"], "2025-01-02T03:04:05.000000123Z");
        let agent = AgentLogEntry {
            timestamp: entry.timestamp,
            severity: "warn".into(),
            body: "x".into(),
        };
        let keys: Vec<String> = serde_json::to_value(&agent)
            .expect("json")
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["body", "severity", "timestamp"]);
    }

    #[test]
    fn values_that_are_not_an_object_fail_only_their_deployment() {
        let resources = parse(json!({
            "deployments": [
                {"id": "11111111-2222-4333-8444-555555555555", "revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa",
                 "releaseName": "list", "chartUrl": "oci://r/c", "chartVersion": "1", "values": [1, 2]},
                {"id": "21111111-2222-4333-8444-555555555555", "revisionId": "76666666-7777-4888-9999-aaaaaaaaaaaa",
                 "releaseName": "fine", "chartUrl": "oci://r/c", "chartVersion": "1", "values": {"a": 1}}
            ]
        }));
        assert_eq!(resources.deployments.len(), 2);
        assert_eq!(resources.deployments[0].values, json!([1, 2]));
        assert_eq!(resources.deployments[1].values, json!({"a": 1}));
    }

    #[test]
    fn a_field_of_the_wrong_type_fails_only_its_deployment() {
        let resources = parse(json!({
            "deployments": [
                {"id": "11111111-2222-4333-8444-555555555555", "revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa",
                 "releaseName": "numeric-timeout", "chartUrl": "oci://r/c", "chartVersion": "1",
                 "helmOptions": {"timeout": 300, "waitStrategy": "watcher"}},
                {"id": "21111111-2222-4333-8444-555555555555", "revisionId": "76666666-7777-4888-9999-aaaaaaaaaaaa",
                 "releaseName": "fine", "chartUrl": "oci://r/c", "chartVersion": "1", "helmOptions": {"timeout": "90s"}},
                {"id": "31111111-2222-4333-8444-555555555555", "revisionId": "86666666-7777-4888-9999-aaaaaaaaaaaa",
                 "releaseName": "secret-flag", "forceRestart": "s3cr3t-value",
                 "registryAuth": {"r.example.com": {"username": "u", "password": 12345}}}
            ]
        }));
        assert_eq!(resources.deployments.len(), 3, "{resources:?}");
        let bad = &resources.deployments[0];
        assert_eq!(bad.release_name, "numeric-timeout");
        assert_eq!(
            bad.input_error.as_deref(),
            Some("invalid deployment from the Hub: helmOptions.timeout is a number, expected a string")
        );
        let fine = &resources.deployments[1];
        assert_eq!(fine.input_error, None);
        assert_eq!(
            fine.helm_options.as_ref().and_then(|o| o.timeout.as_deref()),
            Some("90s")
        );
        let error = resources.deployments[2].input_error.as_deref().unwrap_or_default();
        assert!(error.starts_with("invalid deployment from the Hub: "), "{error}");
        assert!(!error.contains("s3cr3t") && !error.contains("12345"), "{error}");
    }

    #[test]
    fn an_entry_without_readable_ids_still_fails_the_response() {
        let result = serde_json::from_value::<Resources>(json!({
            "deployments": [{"id": "not-a-uuid", "revisionId": "66666666-7777-4888-9999-aaaaaaaaaaaa", "releaseName": "x"}]
        }));
        assert!(result.is_err());
    }

    #[test]
    fn a_bad_timeout_is_reported() {
        let options = HelmOptions {
            timeout: Some("soon".into()),
            ..HelmOptions::default()
        };
        assert!(HelmOptions::effective(Some(&options)).is_err());
    }
}
