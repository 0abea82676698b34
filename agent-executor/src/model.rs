//! Domain types of the executor: the desired state as the Hub sends it (converted from the
//! protocol by the gRPC layer) and the status reported back per deployment.
//!
//! Nothing here knows about tonic or Kubernetes. Secrets (registry passwords, the Hub's JWT)
//! live in [`SecretString`], values in [`Values`]; both print as `<redacted>` in `Debug` so
//! neither can leak through a `?deployment` in a log line.

use std::{collections::BTreeMap, fmt, time::Duration};

use chrono::{DateTime, Utc};

/// The nil UUID: a tracking Secret with this `id` is an adoption request.
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Errors converting Hub input into domain types.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// `helmOptions.timeout` is not a Go duration.
    #[error("invalid helm timeout {value:?}: {reason}")]
    Duration { value: String, reason: &'static str },
    /// `helmOptions.waitStrategy` is not one Helm knows.
    #[error("invalid helm wait strategy {0:?} (expected watcher, legacy or hookOnly)")]
    WaitStrategy(String),
}

/// A secret value (password, token). `Debug` never shows it; use [`SecretString::expose`]
/// where the value must really be used.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Helm values of a deployment (a JSON object). Values routinely hold passwords, so `Debug`
/// does not print them.
#[derive(Clone, PartialEq, Default)]
pub struct Values(pub serde_json::Value);

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Values(<redacted>)")
    }
}

/// Credentials for one registry (OCI or classic chart repository).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: SecretString,
}

/// Login for the Hub's own OCI registry: user `-`, password = the agent's JWT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryLogin {
    /// `host[:port]`.
    pub host: String,
    pub username: String,
    pub password: SecretString,
    /// Talk plain HTTP to this registry (development Hubs).
    pub plain_http: bool,
}

impl RegistryLogin {
    /// User name to log in with; the Hub's registry takes `-` when none is given.
    pub fn effective_username(&self) -> &str {
        if self.username.is_empty() { "-" } else { &self.username }
    }
}

/// Everything the Hub wants deployed in one namespace. Level-triggered: releases the agent
/// tracks that are not listed here are uninstalled.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DesiredState {
    /// Namespace of the releases; `None` (the Hub named none) means unchanged.
    pub namespace: Option<String>,
    pub deployments: Vec<Deployment>,
    pub hub_registry: Option<RegistryLogin>,
}

/// One entry of the Hub's `deployments` list.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Deployment {
    pub id: String,
    pub revision_id: String,
    pub release_name: String,
    /// `oci://...` for an OCI chart, otherwise a classic repository URL.
    pub chart_url: String,
    /// Chart name inside a classic repository; ignored for OCI charts.
    pub chart_name: String,
    pub chart_version: String,
    /// Helm values, a JSON object.
    pub values: Values,
    /// Extra registry credentials by registry host.
    pub registry_auth: BTreeMap<String, RegistryCredentials>,
    pub logs_enabled: bool,
    pub force_restart: bool,
    pub ignore_revision_skew: bool,
    pub helm_options: HelmOptions,
    /// Set when the deployment as received could not be used (values not a JSON object, a bad
    /// helm option). Such a deployment still counts as desired, so its release is never
    /// uninstalled because of bad input, but it only reports this message as an `error`.
    pub input_error: Option<String>,
}

/// How Helm waits for resources (`--wait=<strategy>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WaitStrategy {
    /// kstatus-based watching (the Hub's default).
    #[default]
    Watcher,
    /// Helm 3 style polling.
    Legacy,
    /// Wait for hooks only.
    HookOnly,
}

impl WaitStrategy {
    /// The value Helm's `--wait` flag takes.
    pub fn as_helm_arg(self) -> &'static str {
        match self {
            Self::Watcher => "watcher",
            Self::Legacy => "legacy",
            Self::HookOnly => "hookOnly",
        }
    }
}

impl std::str::FromStr for WaitStrategy {
    type Err = ModelError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "watcher" => Ok(Self::Watcher),
            "legacy" => Ok(Self::Legacy),
            "hookOnly" => Ok(Self::HookOnly),
            other => Err(ModelError::WaitStrategy(other.to_owned())),
        }
    }
}

/// Helm options of a deployment. [`Default`] gives the Hub's defaults for absent fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelmOptions {
    pub timeout: Duration,
    pub wait: WaitStrategy,
    pub rollback_on_failure: bool,
    pub cleanup_on_failure: bool,
    pub force_conflicts: bool,
}

/// The Hub's default Helm timeout.
pub const DEFAULT_HELM_TIMEOUT: Duration = Duration::from_secs(5 * 60);

impl Default for HelmOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_HELM_TIMEOUT,
            wait: WaitStrategy::Watcher,
            rollback_on_failure: true,
            cleanup_on_failure: true,
            force_conflicts: false,
        }
    }
}

/// Longest Helm timeout the agent uses: a release in `--wait` holds a Helm process (and, at
/// its start, an operation slot) that long, and a recovery waits it out.
pub const MAX_HELM_TIMEOUT: Duration = Duration::from_secs(60 * 60);

impl HelmOptions {
    /// The options with the timeout capped at [`MAX_HELM_TIMEOUT`], and a note saying so
    /// when it was.
    pub fn capped(&self) -> (HelmOptions, Option<String>) {
        if self.timeout <= MAX_HELM_TIMEOUT {
            return (self.clone(), None);
        }
        let note = format!(
            "helm timeout {} capped at the agent's maximum of {}",
            format_helm_duration(self.timeout),
            format_helm_duration(MAX_HELM_TIMEOUT)
        );
        let capped = HelmOptions {
            timeout: MAX_HELM_TIMEOUT,
            ..self.clone()
        };
        (capped, Some(note))
    }
}

/// Parses the Hub's `helmOptions.timeout`. A zero duration means "not set" and gives the
/// default, as Helm would otherwise fail every wait at once.
pub fn parse_helm_timeout(value: &str) -> Result<Duration, ModelError> {
    let duration = parse_go_duration(value)?;
    Ok(if duration.is_zero() {
        DEFAULT_HELM_TIMEOUT
    } else {
        duration
    })
}

/// Parses a Go duration string (`"5m0s"`, `"90s"`, `"1h2m3.5s"`, `"250ms"`) with the parser
/// the poller uses for `DISTR_INTERVAL`; negative durations are rejected.
pub fn parse_go_duration(value: &str) -> Result<Duration, ModelError> {
    agent_runtime::duration::parse_go_duration(value).map_err(|error| ModelError::Duration {
        value: error.input,
        reason: error.reason,
    })
}

/// Formats a duration the way Helm's `--timeout` flag accepts it, normalised: whole seconds
/// as `"300s"`, anything finer in milliseconds (`"3723500ms"`, rounded up to 1 ms).
pub fn format_helm_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_nanos().div_ceil(1_000_000))
    }
}

/// What a deployment's status says, as the Hub knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusKind {
    /// A Helm operation is under way.
    Progressing,
    /// The last install or upgrade succeeded.
    Running,
    /// Nothing to change and every resource passed its check.
    Healthy,
    /// Something failed; the message says what.
    Error,
}

impl StatusKind {
    /// The Hub's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusKind::Progressing => "progressing",
            StatusKind::Running => "running",
            StatusKind::Healthy => "healthy",
            StatusKind::Error => "error",
        }
    }
}

/// The status of one deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub kind: StatusKind,
    pub message: String,
    /// When kind or message last changed.
    pub changed_at: DateTime<Utc>,
}

impl Status {
    /// The status after an observation of `kind`/`message` at `now`: `changed_at` moves only
    /// when the kind or the message differs from `previous`.
    pub fn observe(previous: Option<&Status>, kind: StatusKind, message: &str, now: DateTime<Utc>) -> Status {
        match previous {
            Some(previous) if previous.kind == kind && previous.message == message => previous.clone(),
            _ => Status {
                kind,
                message: message.to_owned(),
                changed_at: now,
            },
        }
    }
}

/// The status of one desired deployment, as [`crate::release::reconciler::Reconciler::sync`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentStatus {
    pub deployment_id: String,
    pub revision_id: String,
    pub release_name: String,
    pub status: Status,
}

/// Where a chart comes from, after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChartSource {
    /// `oci://host[:port]/path`; Helm takes the URL as the chart reference.
    Oci {
        reference: String,
        /// `host[:port]` of the registry.
        host: String,
    },
    /// A classic chart repository (`--repo <url> <chart>`).
    Repository {
        /// The URL without any `user:password@` (those are in `url_credentials`).
        url: String,
        /// `host[:port]` of the repository.
        host: String,
        chart: String,
        /// Credentials written into the URL (`https://user:password@host/...`).
        url_credentials: Option<RegistryCredentials>,
    },
}

impl ChartSource {
    /// The source as the agent policy's `chartSources` see it: the `oci://` reference, or
    /// the classic repository's URL (without credentials).
    pub fn policy_source(&self) -> &str {
        match self {
            Self::Oci { reference, .. } => reference,
            Self::Repository { url, .. } => url,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn absurd_helm_timeouts_are_capped_with_a_note() {
        let options = HelmOptions {
            timeout: parse_helm_timeout("24h").unwrap(),
            ..HelmOptions::default()
        };
        let (capped, note) = options.capped();
        assert_eq!(capped.timeout, MAX_HELM_TIMEOUT);
        assert_eq!(
            note.as_deref(),
            Some("helm timeout 86400s capped at the agent's maximum of 3600s")
        );
        assert_eq!(HelmOptions::default().capped(), (HelmOptions::default(), None));
    }

    #[test]
    fn go_durations_parse() {
        let cases = [
            ("5m0s", Duration::from_secs(300)),
            ("90s", Duration::from_secs(90)),
            ("1h2m3.5s", Duration::from_millis(3_723_500)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("1.5h", Duration::from_secs(5400)),
            ("+10s", Duration::from_secs(10)),
            (".5s", Duration::from_millis(500)),
            ("3us", Duration::from_micros(3)),
            ("3µs", Duration::from_micros(3)),
            ("7ns", Duration::from_nanos(7)),
            ("1m1m", Duration::from_secs(120)),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_go_duration(input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn bad_go_durations_are_rejected() {
        for input in [
            "",
            "5",
            "5x",
            "-5s",
            "m",
            "1.2.3s",
            "s5",
            ".s",
            "99999999999999999999999h",
            "5 m",
        ] {
            assert!(parse_go_duration(input).is_err(), "{input} should be rejected");
        }
    }

    #[test]
    fn helm_timeout_defaults_when_zero() {
        assert_eq!(parse_helm_timeout("0s"), Ok(DEFAULT_HELM_TIMEOUT));
        assert_eq!(parse_helm_timeout("90s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn durations_are_normalised_for_helm() {
        assert_eq!(format_helm_duration(Duration::from_secs(300)), "300s");
        assert_eq!(format_helm_duration(Duration::from_millis(3_723_500)), "3723500ms");
        assert_eq!(format_helm_duration(Duration::from_nanos(1)), "1ms");
    }

    #[test]
    fn helm_option_defaults_are_the_hubs() {
        let options = HelmOptions::default();
        assert_eq!(options.timeout, Duration::from_secs(300));
        assert_eq!(options.wait, WaitStrategy::Watcher);
        assert!(options.rollback_on_failure && options.cleanup_on_failure && !options.force_conflicts);
    }

    #[test]
    fn wait_strategies_round_trip() {
        for value in ["watcher", "legacy", "hookOnly"] {
            assert_eq!(value.parse::<WaitStrategy>().unwrap().as_helm_arg(), value);
        }
        assert!("hookonly".parse::<WaitStrategy>().is_err());
    }

    #[test]
    fn status_changed_at_moves_only_on_change() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let first = Status::observe(None, StatusKind::Progressing, "helm install in progress", t0);
        assert_eq!(first.changed_at, t0);
        let same = Status::observe(Some(&first), StatusKind::Progressing, "helm install in progress", t1);
        assert_eq!(same.changed_at, t0, "same kind and message keep the time");
        let new_message = Status::observe(Some(&same), StatusKind::Progressing, "other", t1);
        assert_eq!(new_message.changed_at, t1);
        let new_kind = Status::observe(Some(&first), StatusKind::Error, "helm install in progress", t1);
        assert_eq!(new_kind.changed_at, t1);
    }

    #[test]
    fn secrets_and_values_are_redacted_in_debug() {
        let login = RegistryLogin {
            host: "registry.example.com".into(),
            username: String::new(),
            password: SecretString::new("jwt-secret"),
            plain_http: false,
        };
        let printed = format!("{login:?}");
        assert!(!printed.contains("jwt-secret"), "{printed}");
        assert_eq!(login.effective_username(), "-");
        let values = Values(serde_json::json!({"password": "hunter2"}));
        assert!(!format!("{values:?}").contains("hunter2"));
    }
}
