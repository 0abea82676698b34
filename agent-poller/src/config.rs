//! The poller's Hub configuration: the `DISTR_*` variables of the Hub protocol, read from the
//! environment and from files in watched directories.
//!
//! # Sources and precedence
//!
//! 1. The environment snapshot given to [`ConfigSource`] (the process environment in
//!    production, a plain map in tests).
//! 2. Every directory named in `DISTR_AGENT_CONFIG_DIRS` (newline-separated, taken from the
//!    environment only). Each regular file in such a directory is a variable: the file name is
//!    the variable name, the content (without its trailing newline) the value. Names starting
//!    with `.` are skipped: Kubernetes ConfigMap and Secret volumes keep their real files in
//!    `..<timestamp>` directories behind a `..data` symlink and expose each key as a symlink,
//!    which is followed.
//!
//! A value from a file overrides the environment; when several directories hold the same
//! name, the directory listed last wins. [`ConfigSource::current`] re-reads the directories
//! on every call (they hold a handful of tiny files) and rebuilds the configuration only when
//! their content changed, so a rotated secret or a moved endpoint takes effect without a
//! restart.
//!
//! Secret values are held in [`Secret`], which never prints its content.

use agent_runtime::sync::MutexExt as _;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use uuid::Uuid;

use crate::duration::parse_go_duration;

/// Deployment target id (the Basic-auth user at login).
pub const TARGET_ID: &str = "DISTR_TARGET_ID";
/// Deployment target secret (the Basic-auth password at login).
pub const TARGET_SECRET: &str = "DISTR_TARGET_SECRET";
/// `.../api/v1/agent/login`
pub const LOGIN_ENDPOINT: &str = "DISTR_LOGIN_ENDPOINT";
/// `.../api/v1/agent/resources`
pub const RESOURCE_ENDPOINT: &str = "DISTR_RESOURCE_ENDPOINT";
/// `.../api/v1/agent/status`
pub const STATUS_ENDPOINT: &str = "DISTR_STATUS_ENDPOINT";
/// `.../api/v1/agent/manifest`
pub const MANIFEST_ENDPOINT: &str = "DISTR_MANIFEST_ENDPOINT";
/// `.../api/v1/agent/metrics`
pub const METRICS_ENDPOINT: &str = "DISTR_METRICS_ENDPOINT";
/// `.../api/v1/agent/logs` (deployment logs)
pub const LOGS_ENDPOINT: &str = "DISTR_LOGS_ENDPOINT";
/// `.../api/v1/agent/deployment-target-logs` (the agent's own logs)
pub const AGENT_LOGS_ENDPOINT: &str = "DISTR_AGENT_LOGS_ENDPOINT";
/// Loop period, a Go duration string; default 5 s.
pub const INTERVAL: &str = "DISTR_INTERVAL";
/// UUID of the agent version this pod runs; empty disables self-update.
pub const AGENT_VERSION_ID: &str = "DISTR_AGENT_VERSION_ID";
/// host\[:port\] of the Hub's OCI registry.
pub const REGISTRY_HOST: &str = "DISTR_REGISTRY_HOST";
/// `true` to talk plain HTTP to the Hub's registry.
pub const REGISTRY_PLAIN_HTTP: &str = "DISTR_REGISTRY_PLAIN_HTTP";
/// Newline-separated directories whose files override the environment.
pub const AGENT_CONFIG_DIRS: &str = "DISTR_AGENT_CONFIG_DIRS";

/// The loop period when `DISTR_INTERVAL` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Files larger than this in a config directory are refused (a config value is a few bytes).
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// A secret value (target secret, JWT, registry password). `Debug` and `Display` print
/// `<redacted>`; the value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself, for the one place that needs to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// Why the configuration could not be loaded. Messages name the variable or the file, never a
/// value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is absent or empty.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A variable has a value that cannot be used.
    #[error("{name} is invalid: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// What is wrong (never the value of a secret).
        reason: String,
    },
    /// A config directory or one of its files could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The directory or file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A config file is too large or not UTF-8.
    #[error("config file {path} is unusable: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Everything the poller needs to talk to the Hub. `Debug` is safe to log: secrets are
/// redacted.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// `DISTR_TARGET_ID`.
    pub target_id: String,
    /// `DISTR_TARGET_SECRET`.
    pub target_secret: Secret,
    /// `DISTR_LOGIN_ENDPOINT`.
    pub login_endpoint: Url,
    /// `DISTR_RESOURCE_ENDPOINT`.
    pub resource_endpoint: Url,
    /// `DISTR_STATUS_ENDPOINT`.
    pub status_endpoint: Url,
    /// `DISTR_MANIFEST_ENDPOINT`.
    pub manifest_endpoint: Url,
    /// `DISTR_METRICS_ENDPOINT`; optional, metrics are not sent without it.
    pub metrics_endpoint: Option<Url>,
    /// `DISTR_LOGS_ENDPOINT`; optional, deployment logs are not sent without it.
    pub logs_endpoint: Option<Url>,
    /// `DISTR_AGENT_LOGS_ENDPOINT`; optional, agent logs are not sent without it.
    pub agent_logs_endpoint: Option<Url>,
    /// `DISTR_INTERVAL`, default [`DEFAULT_INTERVAL`]; always positive.
    pub interval: Duration,
    /// `DISTR_AGENT_VERSION_ID`; `None` (unset or empty) disables self-update.
    pub agent_version_id: Option<Uuid>,
    /// `DISTR_REGISTRY_HOST`.
    pub registry_host: Option<String>,
    /// `DISTR_REGISTRY_PLAIN_HTTP`.
    pub registry_plain_http: bool,
}

impl HubConfig {
    /// Builds the configuration from variable values (files already merged over the
    /// environment). Empty values count as unset.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| vars.get(name).map(String::as_str).filter(|v| !v.trim().is_empty());
        let required = |name: &'static str| get(name).ok_or(ConfigError::Missing(name));
        let url = |name: &'static str, value: &str| parse_endpoint(name, value);
        let optional_url = |name: &'static str| get(name).map(|v| url(name, v)).transpose();

        let interval = match get(INTERVAL) {
            None => DEFAULT_INTERVAL,
            Some(value) => {
                let interval = parse_go_duration(value.trim()).map_err(|e| ConfigError::Invalid {
                    name: INTERVAL,
                    reason: e.to_string(),
                })?;
                if interval.is_zero() {
                    return Err(ConfigError::Invalid {
                        name: INTERVAL,
                        reason: "must be positive".into(),
                    });
                }
                interval
            }
        };
        let agent_version_id = get(AGENT_VERSION_ID)
            .map(|v| {
                Uuid::parse_str(v.trim()).map_err(|e| ConfigError::Invalid {
                    name: AGENT_VERSION_ID,
                    reason: format!("not a UUID ({e})"),
                })
            })
            .transpose()?;
        let registry_plain_http = get(REGISTRY_PLAIN_HTTP)
            .map(|v| {
                parse_bool(v.trim()).ok_or(ConfigError::Invalid {
                    name: REGISTRY_PLAIN_HTTP,
                    reason: "expected true or false".into(),
                })
            })
            .transpose()?
            .unwrap_or(false);

        Ok(Self {
            target_id: required(TARGET_ID)?.trim().to_owned(),
            target_secret: Secret::new(required(TARGET_SECRET)?),
            login_endpoint: url(LOGIN_ENDPOINT, required(LOGIN_ENDPOINT)?)?,
            resource_endpoint: url(RESOURCE_ENDPOINT, required(RESOURCE_ENDPOINT)?)?,
            status_endpoint: url(STATUS_ENDPOINT, required(STATUS_ENDPOINT)?)?,
            manifest_endpoint: url(MANIFEST_ENDPOINT, required(MANIFEST_ENDPOINT)?)?,
            metrics_endpoint: optional_url(METRICS_ENDPOINT)?,
            logs_endpoint: optional_url(LOGS_ENDPOINT)?,
            agent_logs_endpoint: optional_url(AGENT_LOGS_ENDPOINT)?,
            interval,
            agent_version_id,
            registry_host: get(REGISTRY_HOST).and_then(|value| match parse_registry_host(value) {
                Ok(host) => Some(host),
                Err(reason) => {
                    // Only the charts of the Hub registry can fail for this; the rest goes on.
                    tracing::warn!(variable = REGISTRY_HOST, %reason, "ignoring the Hub registry host");
                    None
                }
            }),
            registry_plain_http,
        })
    }
}

/// An endpoint must be an absolute `http` or `https` URL. The error carries the parser's
/// reason, not the value.
fn parse_endpoint(name: &'static str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value.trim()).map_err(|e| ConfigError::Invalid {
        name,
        reason: format!("not a URL ({e})"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid {
            name,
            reason: "the URL scheme must be http or https".into(),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::Invalid {
            name,
            reason: "the URL must not carry credentials".into(),
        });
    }
    Ok(url)
}

/// `DISTR_REGISTRY_HOST` as `host[:port]`: a scheme (`https://`, `http://`, `oci://`) and a
/// trailing `/` are dropped, as people and templates write them; a path, credentials or
/// spaces are an error naming the problem, not the value.
fn parse_registry_host(value: &str) -> Result<String, String> {
    let value = value.trim();
    let host = ["https://", "http://", "oci://"]
        .iter()
        .find_map(|scheme| {
            value
                .get(..scheme.len())
                .filter(|prefix| prefix.eq_ignore_ascii_case(scheme))
                .map(|_| &value[scheme.len()..])
        })
        .unwrap_or(value)
        .trim_end_matches('/');
    if host.is_empty() {
        return Err("no host".to_owned());
    }
    if host.contains('@') {
        return Err("must not carry credentials".to_owned());
    }
    if host.contains("://") || host.chars().any(|c| c == '/' || c.is_whitespace() || c.is_control()) {
        return Err("must be host[:port]".to_owned());
    }
    Ok(host.to_owned())
}

/// The boolean spellings Go's `strconv.ParseBool` accepts.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Where the configuration comes from: an environment snapshot plus the watched directories.
/// Cheap to share (`Arc<ConfigSource>`); [`ConfigSource::current`] is safe to call from many
/// tasks.
pub struct ConfigSource {
    env: HashMap<String, String>,
    dirs: Vec<PathBuf>,
    state: Mutex<State>,
}

/// What the last look at the directories found.
#[derive(Default)]
struct State {
    /// The directory files seen last time (name → content), compared to detect changes.
    files: Option<BTreeMap<String, String>>,
    /// The configuration built from them, if it was valid.
    current: Option<Arc<HubConfig>>,
    /// The last problem warned about, so a persisting problem is logged once.
    warned: Option<String>,
}

impl State {
    /// Logs a problem with the directories once, while it persists.
    fn warn_once(&mut self, error: &ConfigError, what: &str) {
        let message = error.to_string();
        if self.warned.as_deref() != Some(message.as_str()) {
            tracing::warn!(error = %message, "{what}; keeping the last valid configuration");
            self.warned = Some(message);
        }
    }
}

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The environment snapshot holds secrets: show only the directories.
        f.debug_struct("ConfigSource")
            .field("dirs", &self.dirs)
            .finish_non_exhaustive()
    }
}

impl ConfigSource {
    /// A source over the process environment (taken once, now).
    pub fn from_process_env() -> Self {
        Self::from_env(std::env::vars().collect())
    }

    /// A source over the given environment snapshot; `DISTR_AGENT_CONFIG_DIRS` is taken from it.
    pub fn from_env(env: HashMap<String, String>) -> Self {
        let dirs = env
            .get(AGENT_CONFIG_DIRS)
            .map(|value| {
                value
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            env,
            dirs,
            state: Mutex::new(State::default()),
        }
    }

    /// The watched directories, in precedence order (last wins).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The configuration as of now. Re-reads the config directories and rebuilds the
    /// configuration when a file was added, removed or changed.
    ///
    /// If the directories cannot be read or their new content is invalid, the last valid
    /// configuration is kept (with a warning naming the problem) so that a half-written
    /// update does not stop the agent; the error is returned only when no valid configuration
    /// was ever loaded.
    pub fn current(&self) -> Result<Arc<HubConfig>, ConfigError> {
        let files = read_dirs(&self.dirs);
        let mut state = self.state.locked();
        let files = match files {
            Ok(files) => files,
            Err(error) => {
                return match state.current.clone() {
                    Some(config) => {
                        state.warn_once(&error, "cannot re-read the config directories");
                        Ok(config)
                    }
                    None => Err(error),
                };
            }
        };
        if state.files.as_ref() == Some(&files)
            && let Some(config) = &state.current
        {
            return Ok(config.clone());
        }

        let mut vars = self.env.clone();
        vars.extend(files.iter().map(|(name, value)| (name.clone(), value.clone())));
        let built = HubConfig::from_vars(&vars);
        let changed_since_load = state.files.is_some();
        state.files = Some(files);
        match built {
            Ok(config) => {
                if changed_since_load {
                    tracing::info!("config directories changed; configuration reloaded");
                }
                let config = Arc::new(config);
                state.current = Some(config.clone());
                state.warned = None;
                Ok(config)
            }
            Err(error) => match state.current.clone() {
                Some(config) => {
                    state.warn_once(&error, "the changed configuration is invalid");
                    Ok(config)
                }
                None => Err(error),
            },
        }
    }
}

/// Reads every directory into one map; later directories override earlier ones.
fn read_dirs(dirs: &[PathBuf]) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut files = BTreeMap::new();
    for dir in dirs {
        read_dir_into(dir, &mut files)?;
    }
    Ok(files)
}

fn read_dir_into(dir: &Path, files: &mut BTreeMap<String, String>) -> Result<(), ConfigError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Read { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(read_error(dir))? {
        let entry = entry.map_err(read_error(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `metadata` follows the per-key symlinks of ConfigMap and Secret volumes.
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => metadata,
            // A dangling symlink mid-update: the next call sees the settled state.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(read_error(&path)(error)),
        };
        if !metadata.is_file() {
            continue;
        }
        if metadata.len() > MAX_CONFIG_FILE {
            return Err(ConfigError::BadFile {
                path,
                reason: "larger than 1 MiB",
            });
        }
        let mut content = Vec::new();
        std::fs::File::open(&path)
            .and_then(|file| file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut content))
            .map_err(read_error(&path))?;
        if content.len() as u64 > MAX_CONFIG_FILE {
            return Err(ConfigError::BadFile {
                path,
                reason: "larger than 1 MiB",
            });
        }
        let Ok(mut value) = String::from_utf8(content) else {
            return Err(ConfigError::BadFile {
                path,
                reason: "not UTF-8 text",
            });
        };
        let trimmed = value.trim_end_matches(['\n', '\r']).len();
        value.truncate(trimmed);
        files.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_env() -> HashMap<String, String> {
        let base = "https://hub.example.com/api/v1/agent";
        [
            (TARGET_ID, "8d4b2c5e-0f4b-4a8e-9d7c-2f1e3a4b5c6d".to_owned()),
            (TARGET_SECRET, "env-secret".to_owned()),
            (LOGIN_ENDPOINT, format!("{base}/login")),
            (RESOURCE_ENDPOINT, format!("{base}/resources")),
            (STATUS_ENDPOINT, format!("{base}/status")),
            (MANIFEST_ENDPOINT, format!("{base}/manifest")),
            (METRICS_ENDPOINT, format!("{base}/metrics")),
            (LOGS_ENDPOINT, format!("{base}/logs")),
            (AGENT_LOGS_ENDPOINT, format!("{base}/deployment-target-logs")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn load(env: HashMap<String, String>) -> Result<Arc<HubConfig>, ConfigError> {
        ConfigSource::from_env(env).current()
    }

    #[test]
    fn loads_from_env_with_defaults() {
        let config = load(base_env()).expect("valid config");
        assert_eq!(config.target_id, "8d4b2c5e-0f4b-4a8e-9d7c-2f1e3a4b5c6d");
        assert_eq!(config.target_secret.expose(), "env-secret");
        assert_eq!(config.login_endpoint.path(), "/api/v1/agent/login");
        assert_eq!(config.interval, Duration::from_secs(5));
        assert_eq!(config.agent_version_id, None);
        assert_eq!(config.registry_host, None);
        assert!(!config.registry_plain_http);
    }

    #[test]
    fn reads_optional_values() {
        let mut env = base_env();
        env.insert(INTERVAL.into(), "1m30s".into());
        env.insert(AGENT_VERSION_ID.into(), "0b7a1b0e-7c1c-4bde-9a4a-6b8ce5b1f00d".into());
        env.insert(REGISTRY_HOST.into(), "registry.example.com:5000".into());
        env.insert(REGISTRY_PLAIN_HTTP.into(), "true".into());
        env.remove(METRICS_ENDPOINT);
        let config = load(env).expect("valid config");
        assert_eq!(config.interval, Duration::from_secs(90));
        assert_eq!(
            config.agent_version_id.map(|id| id.to_string()).as_deref(),
            Some("0b7a1b0e-7c1c-4bde-9a4a-6b8ce5b1f00d")
        );
        assert_eq!(config.registry_host.as_deref(), Some("registry.example.com:5000"));
        assert!(config.registry_plain_http);
        assert_eq!(config.metrics_endpoint, None);
    }

    #[test]
    fn the_registry_host_is_validated_where_it_is_read() {
        let host = |value: &str| {
            let mut env = base_env();
            env.insert(REGISTRY_HOST.into(), value.into());
            load(env)
                .expect("a bad registry host never invalidates the configuration")
                .registry_host
                .clone()
        };
        assert_eq!(
            host("https://registry.example.com:5000/").as_deref(),
            Some("registry.example.com:5000")
        );
        assert_eq!(
            host("HTTP://registry.example.com").as_deref(),
            Some("registry.example.com")
        );
        assert_eq!(
            host(" oci://registry.example.com ").as_deref(),
            Some("registry.example.com")
        );
        assert_eq!(host("registry.example.com/org"), None);
        assert_eq!(host("u:p@registry.example.com"), None);
        assert_eq!(host("https://"), None);
    }

    #[test]
    fn empty_agent_version_id_disables_self_update() {
        let mut env = base_env();
        env.insert(AGENT_VERSION_ID.into(), String::new());
        assert_eq!(load(env).expect("valid config").agent_version_id, None);
    }

    #[test]
    fn missing_and_invalid_values_name_the_variable_not_the_value() {
        let mut env = base_env();
        env.remove(TARGET_SECRET);
        let error = load(env).expect_err("missing secret");
        assert_eq!(error.to_string(), "DISTR_TARGET_SECRET is not set");

        let mut env = base_env();
        env.insert(TARGET_ID.into(), "  ".into());
        assert_eq!(
            load(env).expect_err("blank id").to_string(),
            "DISTR_TARGET_ID is not set"
        );

        let mut env = base_env();
        env.insert(INTERVAL.into(), "5 parsecs".into());
        let message = load(env).expect_err("bad interval").to_string();
        assert!(message.starts_with("DISTR_INTERVAL is invalid"), "{message}");

        let mut env = base_env();
        env.insert(INTERVAL.into(), "0".into());
        assert_eq!(
            load(env).expect_err("zero").to_string(),
            "DISTR_INTERVAL is invalid: must be positive"
        );

        let mut env = base_env();
        env.insert(RESOURCE_ENDPOINT.into(), "ftp://hub/resources".into());
        let message = load(env).expect_err("bad scheme").to_string();
        assert!(message.starts_with("DISTR_RESOURCE_ENDPOINT is invalid"), "{message}");

        let mut env = base_env();
        env.insert(REGISTRY_PLAIN_HTTP.into(), "yes".into());
        assert!(
            load(env)
                .expect_err("bad bool")
                .to_string()
                .starts_with("DISTR_REGISTRY_PLAIN_HTTP")
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_display() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret}"), "<redacted>");
        let config = load(base_env()).expect("valid config");
        let debug = format!("{config:?}");
        assert!(!debug.contains("env-secret"), "{debug}");
        assert!(debug.contains("<redacted>"));
        let source = ConfigSource::from_env(base_env());
        assert!(!format!("{source:?}").contains("env-secret"));
    }

    /// Writes a file the way the kubelet does for a ConfigMap/Secret volume: the real files in
    /// a timestamped dot-directory, `..data` pointing at it, and one symlink per key.
    fn write_volume(dir: &Path, generation: u32, entries: &[(&str, &str)]) {
        let real = dir.join(format!("..2024_01_01_00_00_0{generation}"));
        std::fs::create_dir(&real).expect("create data dir");
        for (name, value) in entries {
            std::fs::write(real.join(name), value).expect("write key");
        }
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(&real, &tmp).expect("symlink data");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
        for (name, _) in entries {
            let link = dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("symlink key");
            }
        }
    }

    #[test]
    fn files_override_env_and_are_reread_when_they_change() {
        let configmap = tempfile::tempdir().expect("tempdir");
        let secret = tempfile::tempdir().expect("tempdir");
        write_volume(
            configmap.path(),
            1,
            &[
                (RESOURCE_ENDPOINT, "https://other.example.com/api/v1/agent/resources\n"),
                (INTERVAL, "10s"),
            ],
        );
        write_volume(secret.path(), 1, &[(TARGET_SECRET, "file-secret-1\n")]);

        let mut env = base_env();
        env.insert(
            AGENT_CONFIG_DIRS.into(),
            format!("{}\n{}\n", configmap.path().display(), secret.path().display()),
        );
        let source = ConfigSource::from_env(env);
        assert_eq!(source.dirs().len(), 2);
        let first = source.current().expect("valid config");
        assert_eq!(first.target_secret.expose(), "file-secret-1");
        assert_eq!(first.resource_endpoint.host_str(), Some("other.example.com"));
        assert_eq!(first.interval, Duration::from_secs(10));
        assert_eq!(
            first.status_endpoint.host_str(),
            Some("hub.example.com"),
            "env still used"
        );

        // Unchanged files: the very same configuration comes back.
        let again = source.current().expect("valid config");
        assert!(Arc::ptr_eq(&first, &again));

        // The Secret is rotated (same length, so only the content differs).
        write_volume(secret.path(), 2, &[(TARGET_SECRET, "file-secret-2\n")]);
        let rotated = source.current().expect("valid config");
        assert_eq!(rotated.target_secret.expose(), "file-secret-2");

        // A plain file written in place is picked up too.
        std::fs::write(
            configmap.path().join(STATUS_ENDPOINT),
            "http://moved.example.com/status",
        )
        .expect("write");
        assert_eq!(
            source.current().expect("valid").status_endpoint.host_str(),
            Some("moved.example.com")
        );
    }

    #[test]
    fn later_directories_win_and_dot_files_are_skipped() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        std::fs::write(first.path().join(TARGET_SECRET), "first").expect("write");
        std::fs::write(second.path().join(TARGET_SECRET), "second").expect("write");
        std::fs::write(second.path().join(format!(".{TARGET_ID}")), "ignored").expect("write");
        std::fs::create_dir(second.path().join(LOGIN_ENDPOINT)).expect("a directory is not a value");
        let mut env = base_env();
        env.insert(
            AGENT_CONFIG_DIRS.into(),
            format!("{}\n{}", first.path().display(), second.path().display()),
        );
        let config = load(env).expect("valid config");
        assert_eq!(config.target_secret.expose(), "second");
        assert_eq!(config.target_id, "8d4b2c5e-0f4b-4a8e-9d7c-2f1e3a4b5c6d");
        assert_eq!(config.login_endpoint.path(), "/api/v1/agent/login");
    }

    #[test]
    fn an_invalid_change_keeps_the_last_valid_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = base_env();
        env.insert(AGENT_CONFIG_DIRS.into(), dir.path().display().to_string());
        let source = ConfigSource::from_env(env);
        assert_eq!(source.current().expect("valid").interval, Duration::from_secs(5));
        std::fs::write(dir.path().join(INTERVAL), "soon").expect("write");
        assert_eq!(
            source.current().expect("last valid kept").interval,
            Duration::from_secs(5)
        );
        std::fs::write(dir.path().join(INTERVAL), "7s").expect("write");
        assert_eq!(source.current().expect("valid").interval, Duration::from_secs(7));
    }

    #[test]
    fn a_missing_directory_is_an_error_before_the_first_load() {
        let mut env = base_env();
        env.insert(AGENT_CONFIG_DIRS.into(), "/nonexistent/distr-config".into());
        let message = load(env).expect_err("missing dir").to_string();
        assert!(
            message.starts_with("cannot read config /nonexistent/distr-config"),
            "{message}"
        );
    }
}
