//! The Helm driver: runs the pinned `helm` v4 binary as a subprocess with explicit arguments
//! (never through a shell).
//!
//! - Helm's config, cache and data homes live in a writable scratch directory; the process
//!   gets a short allow-list of the executor's environment (kube access, proxies, CA files)
//!   and nothing else, so stray `HELM_*` variables cannot change what it does.
//! - Every install/upgrade runs in a private directory (mode 0700, removed afterwards, never
//!   shared between releases) holding `values.json` (JSON is valid YAML) and the
//!   `--registry-config` docker config built for that release.
//! - Hub-provided values of flags use the `--flag=value` form and positional arguments come
//!   after `--`, so nothing from the Hub can be read as a flag (validation also refuses
//!   leading dashes).
//! - A whole-operation timeout (Helm's own `--timeout` plus a margin for chart download)
//!   kills a stuck process. Helm's stderr becomes a one-line error message.

//!
//! [`storage`] reads Helm's own release Secrets; [`docker_config`] builds the registry
//! configs Helm and the kubelet read.

pub mod docker_config;
pub mod storage;

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::process::Command;

use crate::{
    model::{ChartSource, HelmOptions, RegistryCredentials, RegistryLogin, WaitStrategy, format_helm_duration},
    policy,
    validate::redact_url_credentials,
};

/// Extra time a whole Helm operation gets beyond Helm's own `--timeout` (chart download,
/// client start-up, hooks bookkeeping).
pub const OPERATION_MARGIN: Duration = Duration::from_secs(60);
/// Limit for a repository index update before an operation.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of Helm's stdout kept (the first ones): what the executor reads of it is short,
/// but for a render, which is the whole release.
const MAX_STDOUT: usize = 256 * 1024;
/// Bytes of a render's stdout kept (`--dry-run=server --output=json`, the policy's input):
/// a release's manifests as JSON; a longer one is cut, fails to parse, and is refused.
const MAX_RENDER_STDOUT: usize = 32 * 1024 * 1024;
/// Bytes of Helm's stderr kept (the last ones, where Helm's `Error:` line is).
const MAX_STDERR: usize = 64 * 1024;
/// Revisions Helm keeps per release.
const HISTORY_MAX: u32 = 10;
/// Longest error message taken from Helm's stderr.
const MAX_ERROR_LEN: usize = 512;
/// Environment variables handed down to `helm` (everything else is cleared).
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "TZ",
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Errors of the Helm driver.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    /// The scratch directory or an operation's private files could not be prepared
    /// (retryable once the disk is fixed).
    #[error("cannot prepare helm's working files in {path}: {source}")]
    Workspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The binary could not be started.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The operation ran longer than its limit and was killed.
    #[error("helm {operation} did not finish within {limit:?} and was stopped")]
    TimedOut { operation: &'static str, limit: Duration },
    /// Helm exited with an error; `message` is Helm's own, on one line.
    #[error("{message}")]
    Failed { operation: &'static str, message: String },
    /// Helm's output could not be parsed.
    #[error("cannot parse the output of helm {operation}: {reason}")]
    Output { operation: &'static str, reason: String },
    /// The agent policy refuses the operation (see [`crate::policy`]); nothing was written.
    #[error("{message}")]
    Refused { operation: &'static str, message: String },
}

/// How the driver is set up.
#[derive(Clone, Debug)]
pub struct HelmConfig {
    /// The `helm` binary (a path, or a name looked up in `PATH`).
    pub bin: PathBuf,
    /// Writable directory for Helm's homes and the per-operation files.
    pub scratch_dir: PathBuf,
    /// Accept `http://` chart repositories.
    pub allow_http_charts: bool,
}

/// One chart install or upgrade. `Debug` leaves out the values and credentials.
#[derive(Clone, Copy)]
pub struct ChartRequest<'a> {
    pub release: &'a str,
    pub namespace: &'a str,
    pub source: &'a ChartSource,
    pub version: &'a str,
    pub options: &'a HelmOptions,
    /// Final values (pull Secret already injected). Never logged.
    pub values: &'a serde_json::Value,
    pub hub_registry: Option<&'a RegistryLogin>,
    pub registry_auth: &'a BTreeMap<String, RegistryCredentials>,
}

impl std::fmt::Debug for ChartRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChartRequest")
            .field("release", &self.release)
            .field("namespace", &self.namespace)
            .field("source", &self.source)
            .field("version", &self.version)
            .field("options", &self.options)
            .field("values", &"<redacted>")
            .field("hub_registry", &self.hub_registry.map(|hub| &hub.host))
            .field("registry_auth", &self.registry_auth.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ChartRequest<'_> {
    /// `--plain-http` applies when the chart is an OCI chart on the Hub's plain-HTTP registry.
    fn plain_http(&self) -> bool {
        matches!(self.source, ChartSource::Oci { host, .. }
            if self.hub_registry.is_some_and(|hub| hub.plain_http && hub.host == *host))
    }

    /// Credentials for a classic repository: `registryAuth` for its host, else those the URL
    /// carried.
    fn repository_credentials(&self) -> Option<&RegistryCredentials> {
        match self.source {
            ChartSource::Repository {
                host, url_credentials, ..
            } => self.registry_auth.get(host).or(url_credentials.as_ref()),
            ChartSource::Oci { .. } => None,
        }
    }
}

/// Files of one operation, in its private directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OperationFiles {
    values: String,
    registry_config: String,
    /// For a classic repository with credentials: the private repository config holding
    /// them and its index cache (Helm's `--password` would show on the command line).
    repository: Option<RepositoryFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RepositoryFiles {
    config: String,
    cache: String,
}

/// Name of the repository in an operation's private repository config.
const REPOSITORY_NAME: &str = "distr-chart-repository";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChartOperation {
    Install,
    Upgrade,
}

impl ChartOperation {
    fn name(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Upgrade => "upgrade",
        }
    }
}

/// Runs `helm`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HelmDriver {
    inner: Arc<DriverInner>,
    /// The customer's policy, checked before every install and upgrade.
    policy: Option<policy::Gate>,
}

#[derive(Debug)]
struct DriverInner {
    bin: PathBuf,
    scratch: PathBuf,
    operations: PathBuf,
    allow_http_charts: bool,
    /// Process ids of the `helm` processes running now.
    running: std::sync::Mutex<std::collections::HashSet<u32>>,
    metrics: HelmMetrics,
}

/// Helm's figures on `/metrics`: operations by kind and outcome, their durations, and those
/// in flight. Read-only commands (`history`, `status`, `repo update`) count too.
#[derive(Clone, Debug)]
pub struct HelmMetrics {
    operations: Family<OperationLabels, Counter>,
    durations: Family<OperationKind, Histogram, fn() -> Histogram>,
    in_flight: Family<OperationKind, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationKind {
    operation: &'static str,
}

impl Default for HelmMetrics {
    fn default() -> Self {
        fn buckets() -> Histogram {
            // 0.1 s to about 27 min: queries take tenths of a second, installs with --wait minutes.
            Histogram::new(exponential_buckets(0.1, 2.5, 12))
        }
        Self {
            operations: Family::default(),
            durations: Family::new_with_constructor(buckets),
            in_flight: Family::default(),
        }
    }
}

impl HelmMetrics {
    /// Registers `distr_agent_helm_operations_total`, `_helm_operation_duration_seconds` and
    /// `_helm_operations_in_flight`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "helm_operations",
            "Helm commands run, by operation and outcome (ok, failed, timeout)",
            self.operations.clone(),
        );
        registry.register_with_unit(
            "helm_operation_duration",
            "Time Helm commands took, by operation",
            Unit::Seconds,
            self.durations.clone(),
        );
        registry.register(
            "helm_operations_in_flight",
            "Helm commands running now, by operation",
            self.in_flight.clone(),
        );
    }

    fn finished(&self, operation: &'static str, outcome: &'static str, elapsed: Duration) {
        self.operations
            .get_or_create(&OperationLabels { operation, outcome })
            .inc();
        self.durations
            .get_or_create(&OperationKind { operation })
            .observe(elapsed.as_secs_f64());
    }
}

/// Counts a Helm command in flight while it lives.
struct InFlight(Gauge);

impl InFlight {
    fn start(metrics: &HelmMetrics, operation: &'static str) -> Self {
        let gauge = metrics.in_flight.get_or_create(&OperationKind { operation }).clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether an operation changes a release (logged at info with its outcome and duration).
fn changes_a_release(operation: &str) -> bool {
    matches!(operation, "install" | "upgrade" | "uninstall" | "rollback")
}

/// Removes a process from [`DriverInner::running`] when its run ends (or is dropped).
struct Running<'a> {
    inner: &'a DriverInner,
    pid: Option<u32>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            self.inner.running.locked().remove(&pid);
        }
    }
}

impl HelmDriver {
    /// Creates the scratch layout (`config/`, `cache/`, `data/`, `kube-cache/`, `tmp/`,
    /// `operations/`, all private).
    pub fn new(config: HelmConfig) -> Result<Self, HelmError> {
        let scratch = config.scratch_dir;
        if scratch.to_str().is_none() {
            return Err(HelmError::Workspace {
                path: scratch,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path must be valid UTF-8"),
            });
        }
        for dir in ["config", "cache", "data", "kube-cache", "tmp", "operations"] {
            create_private_dir(&scratch.join(dir))?;
        }
        let operations = scratch.join("operations");
        Ok(Self {
            inner: Arc::new(DriverInner {
                bin: config.bin,
                scratch,
                operations,
                allow_http_charts: config.allow_http_charts,
                running: std::sync::Mutex::default(),
                metrics: HelmMetrics::default(),
            }),
            policy: None,
        })
    }

    /// Checks every install and upgrade against `gate`'s policy before Helm writes, and runs
    /// Helm as the ServiceAccount the policy names.
    #[must_use]
    pub fn with_policy(mut self, gate: policy::Gate) -> Self {
        self.policy = Some(gate);
        self
    }

    /// `--kube-as-user` for operations in `namespace`, when the policy names an account.
    fn impersonate(&self, namespace: &str, args: &mut Vec<String>) {
        if let Some(user) = self.policy.as_ref().and_then(|gate| gate.impersonation(namespace)) {
            insert_before_positionals(args, [format!("--kube-as-user={user}")]);
        }
    }

    /// Asks every running `helm` to stop (SIGTERM), as at shutdown. Helm 4 then cancels the
    /// operation and records it: the revision becomes `failed` ("context canceled"), and with
    /// `--rollback-on-failure` it rolls back; nothing is left `pending-*`, so the next executor
    /// need not wait out a live `helm`. Returns how many were asked.
    pub fn terminate_all(&self) -> usize {
        let pids: Vec<u32> = self.inner.running.locked().iter().copied().collect();
        let mut asked = 0;
        for pid in pids {
            let Some(process) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
                continue;
            };
            match rustix::process::kill_process(process, rustix::process::Signal::TERM) {
                Ok(()) => asked += 1,
                Err(error) => tracing::debug!(pid, %error, "cannot signal helm"),
            }
        }
        asked
    }

    /// The driver's figures, to register with the process's metrics.
    pub fn metrics(&self) -> &HelmMetrics {
        &self.inner.metrics
    }

    /// Whether `http://` chart repositories are accepted.
    pub fn allows_http_charts(&self) -> bool {
        self.inner.allow_http_charts
    }

    /// `helm install` of a new release.
    pub async fn install(&self, request: &ChartRequest<'_>) -> Result<(), HelmError> {
        self.chart_operation(ChartOperation::Install, request).await
    }

    /// `helm upgrade` of an existing release.
    pub async fn upgrade(&self, request: &ChartRequest<'_>) -> Result<(), HelmError> {
        self.chart_operation(ChartOperation::Upgrade, request).await
    }

    /// `helm uninstall` (a missing release is fine).
    pub async fn uninstall(&self, namespace: &str, release: &str, timeout: Duration) -> Result<(), HelmError> {
        let mut args = uninstall_args(namespace, release, timeout);
        self.impersonate(namespace, &mut args);
        self.run("uninstall", release, &args, timeout + OPERATION_MARGIN)
            .await
            .map(drop)
    }

    /// `helm rollback` to `revision` (`None`: the previous one).
    pub async fn rollback(
        &self,
        namespace: &str,
        release: &str,
        revision: Option<u32>,
        options: &HelmOptions,
    ) -> Result<(), HelmError> {
        let mut args = rollback_args(namespace, release, revision, options);
        self.impersonate(namespace, &mut args);
        self.run("rollback", release, &args, options.timeout + OPERATION_MARGIN)
            .await
            .map(drop)
    }

    async fn chart_operation(&self, operation: ChartOperation, request: &ChartRequest<'_>) -> Result<(), HelmError> {
        let refused = |message: String| HelmError::Refused {
            operation: operation.name(),
            message,
        };
        let policy = match self.policy.as_ref().map(|gate| (gate, gate.decision())) {
            None => None,
            Some((gate, decision)) => match decision.await {
                policy::Decision::Unrestricted => None,
                policy::Decision::Refuse(message) => return Err(refused(message)),
                policy::Decision::Check(policy) => {
                    let release = policy::check::Release {
                        name: request.release,
                        namespace: request.namespace,
                        source: request.source.policy_source(),
                    };
                    let violations = policy::check::check_release(&policy, &release);
                    if !violations.is_empty() {
                        return Err(refused(policy::Refusal(violations).to_string()));
                    }
                    Some((gate, policy))
                }
            },
        };
        let workspace = self.workspace()?;
        let values = serde_json::to_vec(request.values).map_err(|error| HelmError::Output {
            operation: operation.name(),
            reason: error.to_string(),
        })?;
        let repository = match (request.source, request.repository_credentials()) {
            (ChartSource::Repository { url, .. }, Some(credentials)) => {
                let files = RepositoryFiles {
                    config: workspace.write("repositories.json", &repository_config(url, credentials))?,
                    cache: workspace.dir("repository-cache")?,
                };
                // Fetches the index with the credentials from the file, into the private cache.
                let args = repository_update_args(&files);
                self.run(operation.name(), request.release, &args, QUERY_TIMEOUT)
                    .await?;
                Some(files)
            }
            _ => None,
        };
        let files = OperationFiles {
            values: workspace.write("values.json", &values)?,
            registry_config: workspace.write(
                "registry-config.json",
                &docker_config::build(request.hub_registry, request.registry_auth),
            )?,
            repository,
        };
        let mut args = chart_args(operation, request, &files);
        if let Some((gate, policy)) = policy {
            if let Some(user) = policy.impersonation(request.namespace) {
                insert_before_positionals(&mut args, [format!("--kube-as-user={user}")]);
            }
            self.render_and_check(operation, request, &args, gate, &policy).await?;
        }
        let result = self
            .run(
                operation.name(),
                request.release,
                &args,
                request.options.timeout + OPERATION_MARGIN,
            )
            .await;
        drop(workspace);
        result.map(drop)
    }

    /// Renders the release as the operation would write it (`--dry-run=server`, hooks
    /// included, same arguments) and checks every object against the policy.
    async fn render_and_check(
        &self,
        operation: ChartOperation,
        request: &ChartRequest<'_>,
        args: &[String],
        gate: &policy::Gate,
        policy: &policy::Policy,
    ) -> Result<(), HelmError> {
        let started = std::time::Instant::now();
        let mut render = args.to_vec();
        insert_before_positionals(&mut render, ["--dry-run=server".to_owned(), "--output=json".to_owned()]);
        let rendered = self
            .run(
                "render",
                request.release,
                &render,
                request.options.timeout + OPERATION_MARGIN,
            )
            .await?;
        let objects = policy::rendered_objects(&rendered).map_err(|error| HelmError::Output {
            operation: "render",
            reason: error.to_string(),
        })?;
        drop(rendered);
        let scopes = gate.scopes(&policy::check::unknown_kinds(&objects)).await;
        let violations =
            policy::check::check_objects(policy, request.namespace, &gate.agent_namespace, &objects, &scopes);
        let seconds = (started.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        if violations.is_empty() {
            tracing::info!(
                release = request.release,
                operation = operation.name(),
                objects = objects.len(),
                seconds,
                "the agent policy allows the release"
            );
            return Ok(());
        }
        let message = policy::Refusal(violations).to_string();
        tracing::warn!(
            release = request.release,
            operation = operation.name(),
            objects = objects.len(),
            seconds,
            reason = %message,
            "the agent policy refuses the release"
        );
        Err(HelmError::Refused {
            operation: operation.name(),
            message,
        })
    }

    fn workspace(&self) -> Result<Workspace, HelmError> {
        let dir = tempfile::Builder::new()
            .prefix("op-")
            .tempdir_in(&self.inner.operations)
            .map_err(|source| HelmError::Workspace {
                path: self.inner.operations.clone(),
                source,
            })?;
        Ok(Workspace { dir })
    }

    fn environment(&self) -> Vec<(String, PathBuf)> {
        let scratch = &self.inner.scratch;
        let mut env: Vec<(String, PathBuf)> = INHERITED_ENV
            .iter()
            .filter_map(|name| Some((name.to_string(), PathBuf::from(std::env::var_os(name)?))))
            .collect();
        // Helm runs in the scratch directory: a relative KUBECONFIG would point elsewhere (and
        // Helm would fall back to localhost:8080).
        if let Some((_, kubeconfig)) = env.iter_mut().find(|(name, _)| name == "KUBECONFIG")
            && let Ok(cwd) = std::env::current_dir()
        {
            *kubeconfig = absolute_path_list(kubeconfig.as_os_str(), &cwd);
        }
        env.extend([
            ("HELM_CONFIG_HOME".to_owned(), scratch.join("config")),
            ("HELM_CACHE_HOME".to_owned(), scratch.join("cache")),
            ("HELM_DATA_HOME".to_owned(), scratch.join("data")),
            ("HELM_DRIVER".to_owned(), PathBuf::from("secret")),
            ("KUBECACHEDIR".to_owned(), scratch.join("kube-cache")),
            ("TMPDIR".to_owned(), scratch.join("tmp")),
        ]);
        env
    }

    /// Runs helm with `args`; stdout on success.
    async fn run(
        &self,
        operation: &'static str,
        release: &str,
        args: &[String],
        limit: Duration,
    ) -> Result<Vec<u8>, HelmError> {
        tracing::debug!(release, operation, args = ?redacted(args), "running helm");
        let started = std::time::Instant::now();
        let _in_flight = InFlight::start(&self.inner.metrics, operation);
        let mut child = Command::new(&self.inner.bin)
            .args(args)
            .env_clear()
            .envs(self.environment())
            .current_dir(&self.inner.scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HelmError::Spawn {
                bin: self.inner.bin.clone(),
                source,
            })?;
        let _running = Running {
            inner: &self.inner,
            pid: child.id().inspect(|pid| {
                self.inner.running.locked().insert(*pid);
            }),
        };
        // Helm's output is read as it comes and only its bounded ends kept, however much it
        // prints. On timeout the child is dropped on return: kill_on_drop stops it.
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let finished = async {
            let (stdout, stderr, status) = tokio::join!(
                read_bounded(
                    stdout,
                    if operation == "render" {
                        MAX_RENDER_STDOUT
                    } else {
                        MAX_STDOUT
                    },
                    Keep::Head
                ),
                read_bounded(stderr, MAX_STDERR, Keep::Tail),
                child.wait(),
            );
            Ok::<_, std::io::Error>(std::process::Output {
                status: status?,
                stdout: stdout?,
                stderr: stderr?,
            })
        };
        let output = match tokio::time::timeout(limit, finished).await {
            Ok(Ok(output)) => output,
            Ok(Err(source)) => {
                return Err(HelmError::Spawn {
                    bin: self.inner.bin.clone(),
                    source,
                });
            }
            Err(_) => {
                self.inner.metrics.finished(operation, "timeout", started.elapsed());
                tracing::warn!(release, operation, ?limit, "helm did not finish in time; killed");
                return Err(HelmError::TimedOut { operation, limit });
            }
        };
        let elapsed = started.elapsed();
        let seconds = (elapsed.as_secs_f64() * 10.0).round() / 10.0;
        if output.status.success() {
            self.inner.metrics.finished(operation, "ok", elapsed);
            if changes_a_release(operation) {
                tracing::info!(release, operation, seconds, "helm succeeded");
            } else {
                tracing::debug!(release, operation, seconds, "helm succeeded");
            }
            Ok(output.stdout)
        } else {
            // Helm quotes URLs in its errors: never with credentials in them.
            let mut message = summarize_stderr(&String::from_utf8_lossy(&output.stderr), output.status.code());
            if let Some(cause) = repository_update_failures(&String::from_utf8_lossy(&output.stdout)) {
                message = format!("{message}: {cause}");
            }
            let message = explain(redact_url_credentials(&message));
            self.inner.metrics.finished(operation, "failed", elapsed);
            if changes_a_release(operation) {
                tracing::info!(release, operation, seconds, error = %message, "helm failed");
            } else {
                tracing::debug!(release, operation, seconds, error = %message, "helm failed");
            }
            Err(HelmError::Failed { operation, message })
        }
    }
}

/// Which end of a stream [`read_bounded`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    Head,
    Tail,
}

/// Reads `pipe` to its end (so the child never blocks on a full pipe) and keeps at most
/// `max` bytes of it: the first or the last.
async fn read_bounded(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    max: usize,
    keep: Keep,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let Some(mut pipe) = pipe else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut chunk = vec![0_u8; 16 * 1024];
    loop {
        let count = pipe.read(&mut chunk).await?;
        if count == 0 {
            break;
        }
        match keep {
            Keep::Head => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..count.min(room)]);
            }
            Keep::Tail => {
                kept.extend_from_slice(&chunk[..count]);
                // Trimmed in steps, not on every read.
                if kept.len() > 2 * max {
                    kept.drain(..kept.len() - max);
                }
            }
        }
    }
    if kept.len() > max {
        kept.drain(..kept.len() - max);
    }
    Ok(kept)
}

/// Inserts flags before the `--` that ends them.
fn insert_before_positionals<const N: usize>(args: &mut Vec<String>, flags: [String; N]) {
    let at = args.iter().position(|arg| arg == "--").unwrap_or(args.len());
    args.splice(at..at, flags);
}

/// A path list (`KUBECONFIG`: paths separated by `:`) with every relative entry made
/// absolute against `cwd`.
fn absolute_path_list(list: &std::ffi::OsStr, cwd: &Path) -> PathBuf {
    let paths: Vec<PathBuf> = std::env::split_paths(list)
        .map(|path| {
            if path.as_os_str().is_empty() || path.is_absolute() {
                path
            } else {
                cwd.join(path)
            }
        })
        .collect();
    std::env::join_paths(paths).map_or_else(|_| PathBuf::from(list), PathBuf::from)
}

/// A private directory for one operation, removed on drop.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// Creates a private sub-directory and returns its path.
    fn dir(&self, name: &str) -> Result<String, HelmError> {
        let path = self.dir.path().join(name);
        create_private_dir(&path)?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// Writes a private (0600) file and returns its path.
    fn write(&self, name: &str, content: &[u8]) -> Result<String, HelmError> {
        let path = self.dir.path().join(name);
        let error = |source| HelmError::Workspace {
            path: path.clone(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(error)?;
        file.write_all(content).map_err(error)?;
        file.sync_all().map_err(error)?;
        // The scratch path was checked to be UTF-8 and the rest is ASCII.
        Ok(path.to_string_lossy().into_owned())
    }
}

fn create_private_dir(path: &Path) -> Result<(), HelmError> {
    let error = |source| HelmError::Workspace {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(error)?;
    }
    Ok(())
}

/// Arguments of `helm install`/`helm upgrade`.
fn chart_args(operation: ChartOperation, request: &ChartRequest<'_>, files: &OperationFiles) -> Vec<String> {
    let options = request.options;
    let mut args = vec![
        operation.name().to_owned(),
        format!("--namespace={}", request.namespace),
        format!("--version={}", request.version),
        format!("--values={}", files.values),
        format!("--registry-config={}", files.registry_config),
        format!("--timeout={}", format_helm_duration(options.timeout)),
        format!("--wait={}", options.wait.as_helm_arg()),
    ];
    if options.rollback_on_failure {
        args.push("--rollback-on-failure".to_owned());
    }
    if operation == ChartOperation::Upgrade {
        // The Hub sends the complete, merged values: never let Helm reuse the previous ones
        // (which it does for an upgrade whose values are empty).
        args.push("--reset-values".to_owned());
        args.push(format!("--history-max={HISTORY_MAX}"));
        if options.cleanup_on_failure {
            args.push("--cleanup-on-fail".to_owned());
        }
    }
    if options.force_conflicts {
        args.push("--force-conflicts".to_owned());
    }
    if request.plain_http() {
        args.push("--plain-http".to_owned());
    }
    let chart = match request.source {
        ChartSource::Oci { reference, .. } => reference.clone(),
        ChartSource::Repository { url, chart, .. } => match &files.repository {
            // Credentials stay in the private repository config (`--registry-config` only
            // covers OCI registries, and `--password` would show in /proc).
            Some(repository) => {
                args.push(format!("--repository-config={}", repository.config));
                args.push(format!("--repository-cache={}", repository.cache));
                format!("{REPOSITORY_NAME}/{chart}")
            }
            None => {
                args.push(format!("--repo={url}"));
                chart.clone()
            }
        },
    };
    args.extend(["--".to_owned(), request.release.to_owned(), chart]);
    args
}

/// A repository config (`repositories.yaml`; JSON is YAML) naming one repository with its
/// credentials.
fn repository_config(url: &str, credentials: &RegistryCredentials) -> Vec<u8> {
    let config = serde_json::json!({
        "apiVersion": "",
        "generated": "0001-01-01T00:00:00Z",
        "repositories": [{
            "name": REPOSITORY_NAME,
            "url": url,
            "username": credentials.username,
            "password": credentials.password.expose(),
            "pass_credentials_all": false,
        }],
    });
    // A JSON value always serialises.
    serde_json::to_vec(&config).unwrap_or_default()
}

/// `helm repo update` of the one repository of an operation's private repository config.
fn repository_update_args(files: &RepositoryFiles) -> Vec<String> {
    vec![
        "repo".to_owned(),
        "update".to_owned(),
        format!("--repository-config={}", files.config),
        format!("--repository-cache={}", files.cache),
        "--".to_owned(),
        REPOSITORY_NAME.to_owned(),
    ]
}

/// `helm uninstall` that waits until the release's objects are gone (as the Go agent did), so
/// a reinstall under the same name does not run into terminating objects.
fn uninstall_args(namespace: &str, release: &str, timeout: Duration) -> Vec<String> {
    vec![
        "uninstall".to_owned(),
        format!("--namespace={namespace}"),
        format!("--timeout={}", format_helm_duration(timeout)),
        "--wait=watcher".to_owned(),
        "--ignore-not-found".to_owned(),
        "--".to_owned(),
        release.to_owned(),
    ]
}

fn rollback_args(namespace: &str, release: &str, revision: Option<u32>, options: &HelmOptions) -> Vec<String> {
    let mut args = vec![
        "rollback".to_owned(),
        format!("--namespace={namespace}"),
        format!("--timeout={}", format_helm_duration(options.timeout)),
        format!("--wait={}", options.wait.as_helm_arg()),
        format!("--history-max={HISTORY_MAX}"),
    ];
    if options.cleanup_on_failure {
        args.push("--cleanup-on-fail".to_owned());
    }
    if options.force_conflicts {
        args.push("--force-conflicts".to_owned());
    }
    args.extend(["--".to_owned(), release.to_owned()]);
    if let Some(revision) = revision {
        args.push(revision.to_string());
    }
    args
}

/// Options for a rollback that must be quick (crash recovery): no waiting for resources.
pub fn recovery_rollback_options(timeout: Duration) -> HelmOptions {
    HelmOptions {
        timeout,
        wait: WaitStrategy::HookOnly,
        rollback_on_failure: false,
        cleanup_on_failure: false,
        force_conflicts: false,
    }
}

/// The arguments with secret values hidden, for logs.
fn redacted(args: &[String]) -> Vec<&str> {
    args.iter()
        .map(|arg| {
            if arg.starts_with("--password=") {
                "--password=<redacted>"
            } else {
                arg.as_str()
            }
        })
        .collect()
}

/// Puts a plain explanation in front of Helm messages whose cause is not obvious from the
/// registry's wording: refused and missing credentials.
pub fn explain(message: String) -> String {
    const REFUSED: &[&str] = &[
        "response status code 401",
        "response status code 403",
        ": 401 Unauthorized",
        ": 403 Forbidden",
    ];
    if REFUSED.iter().any(|pattern| message.contains(pattern)) {
        format!("the registry refused the credentials: {message}")
    } else if message.contains("basic credential not found") {
        format!("the registry requires credentials and none were configured for it: {message}")
    } else {
        message
    }
}

/// Turns Helm's stderr into one line: Helm's last `Error: ...` (warnings before it are
/// dropped) without that prefix nor the `INSTALLATION FAILED: ` / `UPGRADE FAILED: `
/// banner (the status already says which operation failed), bounded in length.
pub fn summarize_stderr(stderr: &str, exit_code: Option<i32>) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    let text = match lines.iter().rposition(|line| line.starts_with("Error: ")) {
        Some(start) => lines[start..].join(" "),
        None => lines.last().map(|line| (*line).to_owned()).unwrap_or_default(),
    };
    let mut message = text.strip_prefix("Error: ").unwrap_or(&text);
    for banner in ["INSTALLATION FAILED: ", "UPGRADE FAILED: ", "ROLLBACK FAILED: "] {
        message = message.strip_prefix(banner).unwrap_or(message);
    }
    if message.is_empty() {
        return match exit_code {
            Some(code) => format!("helm exited with status {code} and no message"),
            None => "helm was killed by a signal".to_owned(),
        };
    }
    one_line(message, MAX_ERROR_LEN)
}

/// Why `helm repo update` could not read a repository: Helm prints the cause on stdout
/// (`...Unable to get an update from the "x" chart repository (url):` and the error on the next
/// line) and only the list of failed URLs on stderr.
fn repository_update_failures(stdout: &str) -> Option<String> {
    let start = stdout.find("Unable to get an update from")?;
    let causes: Vec<&str> = stdout[start..]
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("Update Complete"))
        .collect();
    Some(one_line(&causes.join(" "), MAX_ERROR_LEN))
}

/// Collapses whitespace (newlines included) to single spaces and bounds the length.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max + 4));
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() > max {
            break;
        }
    }
    if out.len() > max {
        let mut end = max;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::SecretString;

    fn files() -> OperationFiles {
        OperationFiles {
            values: "/s/op-1/values.json".into(),
            registry_config: "/s/op-1/registry-config.json".into(),
            repository: None,
        }
    }

    fn oci() -> ChartSource {
        ChartSource::Oci {
            reference: "oci://hub.example.com/org/charts/web".into(),
            host: "hub.example.com".into(),
        }
    }

    fn request<'a>(
        source: &'a ChartSource,
        options: &'a HelmOptions,
        hub: Option<&'a RegistryLogin>,
        auth: &'a BTreeMap<String, RegistryCredentials>,
    ) -> ChartRequest<'a> {
        static VALUES: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(|| serde_json::json!({}));
        ChartRequest {
            release: "web",
            namespace: "apps",
            source,
            version: "1.4.0",
            options,
            values: &VALUES,
            hub_registry: hub,
            registry_auth: auth,
        }
    }

    #[test]
    fn oci_install_args() {
        let (source, options, auth) = (oci(), HelmOptions::default(), BTreeMap::new());
        let args = chart_args(
            ChartOperation::Install,
            &request(&source, &options, None, &auth),
            &files(),
        );
        assert_eq!(
            args,
            [
                "install",
                "--namespace=apps",
                "--version=1.4.0",
                "--values=/s/op-1/values.json",
                "--registry-config=/s/op-1/registry-config.json",
                "--timeout=300s",
                "--wait=watcher",
                "--rollback-on-failure",
                "--",
                "web",
                "oci://hub.example.com/org/charts/web",
            ]
        );
    }

    #[test]
    fn oci_upgrade_args_with_all_options() {
        let source = oci();
        let options = HelmOptions {
            timeout: Duration::from_millis(3_723_500),
            wait: WaitStrategy::Legacy,
            rollback_on_failure: true,
            cleanup_on_failure: true,
            force_conflicts: true,
        };
        let hub = RegistryLogin {
            host: "hub.example.com".into(),
            username: "-".into(),
            password: SecretString::new("jwt"),
            plain_http: true,
        };
        let auth = BTreeMap::new();
        let args = chart_args(
            ChartOperation::Upgrade,
            &request(&source, &options, Some(&hub), &auth),
            &files(),
        );
        assert_eq!(
            args,
            [
                "upgrade",
                "--namespace=apps",
                "--version=1.4.0",
                "--values=/s/op-1/values.json",
                "--registry-config=/s/op-1/registry-config.json",
                "--timeout=3723500ms",
                "--wait=legacy",
                "--rollback-on-failure",
                "--reset-values",
                "--history-max=10",
                "--cleanup-on-fail",
                "--force-conflicts",
                "--plain-http",
                "--",
                "web",
                "oci://hub.example.com/org/charts/web",
            ]
        );
    }

    #[test]
    fn upgrade_without_failure_options() {
        let source = oci();
        let options = HelmOptions {
            wait: WaitStrategy::HookOnly,
            rollback_on_failure: false,
            cleanup_on_failure: false,
            ..HelmOptions::default()
        };
        let auth = BTreeMap::new();
        let args = chart_args(
            ChartOperation::Upgrade,
            &request(&source, &options, None, &auth),
            &files(),
        );
        assert!(args.contains(&"--wait=hookOnly".to_owned()));
        assert!(
            !args
                .iter()
                .any(|arg| arg == "--rollback-on-failure" || arg == "--cleanup-on-fail")
        );
    }

    #[test]
    fn plain_http_only_for_the_hub_registry_host() {
        let source = ChartSource::Oci {
            reference: "oci://other.example.com/c".into(),
            host: "other.example.com".into(),
        };
        let options = HelmOptions::default();
        let hub = RegistryLogin {
            host: "hub.example.com".into(),
            username: String::new(),
            password: SecretString::new("jwt"),
            plain_http: true,
        };
        let auth = BTreeMap::new();
        let args = chart_args(
            ChartOperation::Install,
            &request(&source, &options, Some(&hub), &auth),
            &files(),
        );
        assert!(!args.contains(&"--plain-http".to_owned()));
    }

    #[test]
    fn classic_repository_args() {
        let source = ChartSource::Repository {
            url: "https://charts.example.com/stable".into(),
            host: "charts.example.com".into(),
            chart: "web-chart".into(),
            url_credentials: None,
        };
        let options = HelmOptions::default();
        let no_auth = BTreeMap::new();
        let args = chart_args(
            ChartOperation::Install,
            &request(&source, &options, None, &no_auth),
            &files(),
        );
        assert_eq!(
            args,
            [
                "install",
                "--namespace=apps",
                "--version=1.4.0",
                "--values=/s/op-1/values.json",
                "--registry-config=/s/op-1/registry-config.json",
                "--timeout=300s",
                "--wait=watcher",
                "--rollback-on-failure",
                "--repo=https://charts.example.com/stable",
                "--",
                "web",
                "web-chart",
            ]
        );
    }

    #[test]
    fn a_repository_update_failure_says_why() {
        let stdout = "Hang tight while we grab the latest from your chart repositories...\n\
            ...Unable to get an update from the \"repo\" chart repository (https://127.0.0.1:4443):\n\
            \tfailed to fetch https://127.0.0.1:4443/index.yaml : 401 Unauthorized\n";
        let cause = repository_update_failures(stdout).expect("a cause");
        assert!(cause.ends_with("index.yaml : 401 Unauthorized"), "{cause}");
        assert!(explain(cause).starts_with("the registry refused the credentials"));
        assert_eq!(repository_update_failures("Update Complete. Happy Helming!"), None);
    }

    #[test]
    fn classic_repository_passwords_stay_off_the_command_line() {
        let source = ChartSource::Repository {
            url: "https://charts.example.com/stable".into(),
            host: "charts.example.com".into(),
            chart: "web-chart".into(),
            url_credentials: None,
        };
        let options = HelmOptions::default();
        let mut auth = BTreeMap::new();
        auth.insert(
            "charts.example.com".to_owned(),
            RegistryCredentials {
                username: "user".into(),
                password: SecretString::new("repo-pass"),
            },
        );
        let request = request(&source, &options, None, &auth);
        let credentials = request.repository_credentials().unwrap();
        let repository = RepositoryFiles {
            config: "/s/op-1/repositories.json".into(),
            cache: "/s/op-1/repository-cache".into(),
        };
        let files = OperationFiles {
            repository: Some(repository.clone()),
            ..files()
        };
        let args = chart_args(ChartOperation::Install, &request, &files);
        let update = repository_update_args(&repository);
        for arg in args.iter().chain(&update) {
            assert!(!arg.contains("repo-pass") && !arg.contains("user"), "{arg}");
        }
        assert_eq!(
            args[args.len() - 5..],
            [
                "--repository-config=/s/op-1/repositories.json",
                "--repository-cache=/s/op-1/repository-cache",
                "--",
                "web",
                "distr-chart-repository/web-chart",
            ]
        );
        assert_eq!(
            update,
            [
                "repo",
                "update",
                "--repository-config=/s/op-1/repositories.json",
                "--repository-cache=/s/op-1/repository-cache",
                "--",
                "distr-chart-repository",
            ]
        );
        // The private config holds them, for the repository's URL.
        let config: serde_json::Value =
            serde_json::from_slice(&repository_config("https://charts.example.com/stable", credentials)).unwrap();
        let entry = &config["repositories"][0];
        assert_eq!(entry["name"], "distr-chart-repository");
        assert_eq!(entry["url"], "https://charts.example.com/stable");
        assert_eq!(
            (&entry["username"], &entry["password"]),
            (&"user".into(), &"repo-pass".into())
        );
        // Credentials from the URL are used when registryAuth has none for the host.
        let from_url = ChartSource::Repository {
            url: "https://charts.example.com/stable".into(),
            host: "charts.example.com".into(),
            chart: "web-chart".into(),
            url_credentials: Some(RegistryCredentials {
                username: "vendor".into(),
                password: SecretString::new("url-pass"),
            }),
        };
        let none = BTreeMap::new();
        let request_from_url = super::tests::request(&from_url, &options, None, &none);
        assert_eq!(request_from_url.repository_credentials().unwrap().username, "vendor");
    }

    #[test]
    fn a_relative_kubeconfig_is_made_absolute_for_helm() {
        let cwd = Path::new("/work/agent");
        assert_eq!(
            absolute_path_list("kube/config".as_ref(), cwd),
            PathBuf::from("/work/agent/kube/config")
        );
        assert_eq!(
            absolute_path_list("/etc/kube:rel/two".as_ref(), cwd),
            PathBuf::from("/etc/kube:/work/agent/rel/two")
        );
        assert_eq!(
            absolute_path_list("/etc/kube".as_ref(), cwd),
            PathBuf::from("/etc/kube")
        );
    }

    #[test]
    fn chart_requests_debug_without_values_or_credentials() {
        let source = oci();
        let options = HelmOptions::default();
        let values = serde_json::json!({"db": {"password": "value-secret"}});
        let mut auth = BTreeMap::new();
        auth.insert(
            "hub.example.com".to_owned(),
            RegistryCredentials {
                username: "user".into(),
                password: SecretString::new("auth-secret"),
            },
        );
        let hub = RegistryLogin {
            host: "hub.example.com".into(),
            username: "-".into(),
            password: SecretString::new("jwt-secret"),
            plain_http: false,
        };
        let request = ChartRequest {
            values: &values,
            ..request(&source, &options, Some(&hub), &auth)
        };
        let debug = format!("{request:?}");
        assert!(debug.contains("hub.example.com"), "{debug}");
        for secret in ["value-secret", "auth-secret", "jwt-secret"] {
            assert!(!debug.contains(secret), "{debug}");
        }
    }

    #[test]
    fn uninstall_and_rollback_args() {
        assert_eq!(
            uninstall_args("apps", "web", Duration::from_secs(300)),
            [
                "uninstall",
                "--namespace=apps",
                "--timeout=300s",
                "--wait=watcher",
                "--ignore-not-found",
                "--",
                "web"
            ]
        );
        assert_eq!(
            rollback_args("apps", "web", Some(3), &HelmOptions::default()),
            [
                "rollback",
                "--namespace=apps",
                "--timeout=300s",
                "--wait=watcher",
                "--history-max=10",
                "--cleanup-on-fail",
                "--",
                "web",
                "3"
            ]
        );
        assert_eq!(
            rollback_args("apps", "web", None, &recovery_rollback_options(Duration::from_secs(60))),
            [
                "rollback",
                "--namespace=apps",
                "--timeout=60s",
                "--wait=hookOnly",
                "--history-max=10",
                "--",
                "web"
            ]
        );
    }

    #[tokio::test]
    async fn helms_output_is_kept_bounded_at_the_useful_end() {
        let text: Vec<u8> = (0..100_000_u32)
            .flat_map(|n| format!("line {n}\n").into_bytes())
            .collect();
        let head = read_bounded(Some(&text[..]), 1000, Keep::Head).await.unwrap();
        assert_eq!(head, text[..1000]);
        let tail = read_bounded(Some(&text[..]), 1000, Keep::Tail).await.unwrap();
        assert_eq!(tail, text[text.len() - 1000..]);
        assert!(String::from_utf8(tail).unwrap().ends_with("line 99999\n"));
        let short = read_bounded(Some(&b"Error: x\n"[..]), 1000, Keep::Tail).await.unwrap();
        assert_eq!(short, b"Error: x\n");
        let none = read_bounded(None::<&[u8]>, 10, Keep::Head).await.unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn one_line_collapses_and_bounds() {
        assert_eq!(one_line("a\n  b\tc", 100), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("ééé", 3), "é…");
    }

    #[test]
    fn stderr_becomes_one_line() {
        let stderr = "level=WARN msg=\"something\"\nError: INSTALLATION FAILED: failed to perform \"FetchReference\" on source: not found\n";
        assert_eq!(
            summarize_stderr(stderr, Some(1)),
            "failed to perform \"FetchReference\" on source: not found"
        );
        let stderr =
            "Error: UPGRADE FAILED: release web failed, and has been rolled back:\n  context deadline exceeded\n";
        assert_eq!(
            summarize_stderr(stderr, Some(1)),
            "release web failed, and has been rolled back: context deadline exceeded"
        );
        assert_eq!(
            summarize_stderr("", Some(2)),
            "helm exited with status 2 and no message"
        );
        assert_eq!(summarize_stderr("panic: boom\n", Some(2)), "panic: boom");
        assert!(summarize_stderr(&format!("Error: {}", "x".repeat(5000)), Some(1)).len() <= MAX_ERROR_LEN + 3);
    }

    #[test]
    fn registry_refusals_are_explained() {
        let refused = "failed to perform \"FetchReference\" on source: GET \"http://127.0.0.1:5000/v2/charts/web/manifests/0.1.0\": response status code 401: unauthorized: authentication required";
        assert!(explain(refused.to_owned()).starts_with("the registry refused the credentials: failed to perform"));
        let classic = "looks like \"https://charts.example.com\" is not a valid chart repository or cannot be reached: failed to fetch https://charts.example.com/index.yaml : 401 Unauthorized";
        assert!(explain(classic.to_owned()).starts_with("the registry refused the credentials: "));
        let missing = "failed to perform \"FetchReference\" on source: GET \"http://h/v2/c/manifests/1\": basic credential not found";
        assert!(explain(missing.to_owned()).starts_with("the registry requires credentials and none were configured"));
        let rbac = "secrets is forbidden: User \"system:serviceaccount:a:b\" cannot create resource \"secrets\"";
        assert_eq!(explain(rbac.to_owned()), rbac);
    }

    #[tokio::test]
    async fn the_real_binary_reports_a_clear_error() {
        // Runs the pinned helm if this machine has it; no cluster is needed because the chart
        // download fails first.
        let bin = PathBuf::from("/root/.cache/distr-agent-testenv/bin/helm");
        if !bin.exists() {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let driver = HelmDriver::new(HelmConfig {
            bin,
            scratch_dir: scratch.path().to_owned(),
            allow_http_charts: false,
        })
        .unwrap();
        let source = ChartSource::Oci {
            reference: "oci://127.0.0.1:1/org/web".into(),
            host: "127.0.0.1:1".into(),
        };
        let options = HelmOptions {
            timeout: Duration::from_secs(5),
            ..HelmOptions::default()
        };
        let auth = BTreeMap::new();
        let error = driver
            .install(&request(&source, &options, None, &auth))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("127.0.0.1:1"), "{error}");
        assert!(!error.starts_with("Error:"), "{error}");
        let leftovers = std::fs::read_dir(scratch.path().join("operations")).unwrap().count();
        assert_eq!(leftovers, 0, "the operation directory is removed");
    }
}
