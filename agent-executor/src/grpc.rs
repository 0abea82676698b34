//! The `distr.agent.v1.Executor` gRPC service: converts protocol messages to domain types,
//! calls the [`Reconciler`], the log collector and the cluster metrics, and maps their errors
//! to `tonic::Status`.
//!
//! Bad input in one deployment (values that are not a JSON object, a bad Helm option) is not
//! a failed RPC: the deployment is handed on with an `input_error` and gets an `error`
//! status of its own. Only a request that is malformed as a whole is `INVALID_ARGUMENT`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use distr_agent_proto::v1::{self as pb, executor_server::Executor};
use tonic::{Request, Response, Status};

use crate::{
    cluster::tracking::TrackingError,
    logs::{Ack, LogCollector},
    model::{
        self, DeploymentStatus, DesiredState, HelmOptions, RegistryCredentials, RegistryLogin, SecretString,
        StatusKind, Values,
    },
    release::reconciler::{ReconcileError, Reconciler, ReleaseDetail, ReleaseInfo},
    release::status_board::ReleaseKey,
    validate,
};

/// `WatchStatuses` sends everything again at least this often.
const STATUS_STREAM_REFRESH: Duration = Duration::from_secs(30);
/// Pause after a change before `WatchStatuses` sends, so a burst makes one message.
const STATUS_STREAM_SETTLE: Duration = Duration::from_millis(50);

/// Lines per `CollectLogs` reply when the caller sets no bound, and at most.
const DEFAULT_LOG_LINES: u32 = 1000;
const MAX_LOG_LINES: u32 = 5000;
/// How long a `CollectLogs` reads before it answers with what it has, well inside the
/// poller's executor deadline (10 s by default); shorter when the caller's `grpc-timeout`
/// asks for less.
const LOG_COLLECTION_TIME: Duration = Duration::from_secs(5);

/// The Executor service.
#[derive(Clone)]
pub struct ExecutorService {
    reconciler: Reconciler,
    logs: Arc<LogCollector>,
    metrics: crate::cluster_metrics::ClusterMetricsReader,
    /// Ends the status streams, so a graceful shutdown of the server does not wait for them.
    shutdown: tokio_util::sync::CancellationToken,
}

impl ExecutorService {
    pub fn new(
        reconciler: Reconciler,
        logs: Arc<LogCollector>,
        metrics: crate::cluster_metrics::ClusterMetricsReader,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            reconciler,
            logs,
            metrics,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Executor for ExecutorService {
    async fn sync(&self, request: Request<pb::SyncRequest>) -> Result<Response<pb::SyncResponse>, Status> {
        let desired = desired_state(request.into_inner())?;
        let statuses = self.reconciler.sync(desired).await;
        Ok(Response::new(pb::SyncResponse {
            statuses: statuses.into_iter().map(deployment_status).collect(),
        }))
    }

    async fn statuses(&self, _: Request<pb::StatusesRequest>) -> Result<Response<pb::StatusesResponse>, Status> {
        Ok(Response::new(pb::StatusesResponse {
            statuses: self.reconciler.statuses().into_iter().map(deployment_status).collect(),
        }))
    }

    type WatchStatusesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::StatusesResponse, Status>> + Send + 'static>>;

    async fn watch_statuses(
        &self,
        _: Request<pb::StatusesRequest>,
    ) -> Result<Response<Self::WatchStatusesStream>, Status> {
        let reconciler = self.reconciler.clone();
        let changes = reconciler.follow_statuses();
        let state = (reconciler, changes, self.shutdown.clone(), true);
        let stream = futures::stream::unfold(state, |(reconciler, mut changes, shutdown, first)| async move {
            if !first {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return None },
                    () = tokio::time::sleep(STATUS_STREAM_REFRESH) => {}
                    () = shutdown.cancelled() => return None,
                }
                // Let a burst of changes settle into one message.
                tokio::time::sleep(STATUS_STREAM_SETTLE).await;
            }
            changes.borrow_and_update();
            let message = pb::StatusesResponse {
                statuses: reconciler.statuses().into_iter().map(deployment_status).collect(),
            };
            if shutdown.is_cancelled() {
                return None;
            }
            Some((Ok(message), (reconciler, changes, shutdown, false)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_releases(
        &self,
        _: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let releases = self.reconciler.list_releases().await.map_err(to_status)?;
        Ok(Response::new(pb::ListReleasesResponse {
            releases: releases.into_iter().map(release).collect(),
        }))
    }

    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::GetReleaseResponse>, Status> {
        let name = request.into_inner().release_name;
        if name.is_empty() {
            return Err(Status::invalid_argument("release_name is required"));
        }
        match self.reconciler.get_release(&name).await.map_err(to_status)? {
            Some(detail) => Ok(Response::new(release_detail(detail))),
            None => Err(Status::not_found(format!("release {name} is not tracked by the agent"))),
        }
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let request = request.into_inner();
        if request.release_name.is_empty() {
            return Err(Status::invalid_argument("release_name is required"));
        }
        let revision = match request.revision {
            0 => None,
            positive if positive > 0 => Some(positive.unsigned_abs()),
            _ => return Err(Status::invalid_argument("revision must not be negative")),
        };
        // In a task of its own: a caller that gives up (a deadline, Ctrl-C) must not kill
        // Helm mid-rollback, which would leave the release `pending-rollback`.
        let reconciler = self.reconciler.clone();
        let release = request.release_name;
        let new_revision = tokio::spawn(async move { reconciler.rollback(&release, revision).await })
            .await
            .map_err(|error| Status::internal(format!("the rollback task failed: {error}")))?
            .map_err(to_status)?;
        Ok(Response::new(pb::RollbackResponse {
            new_revision: to_i32(new_revision),
        }))
    }

    async fn collect_logs(
        &self,
        request: Request<pb::CollectLogsRequest>,
    ) -> Result<Response<pb::CollectLogsResponse>, Status> {
        let deadline = tokio::time::Instant::now() + log_collection_time(request.metadata());
        let request = request.into_inner();
        let max_lines = match request.max_lines {
            0 => DEFAULT_LOG_LINES,
            n => n.min(MAX_LOG_LINES),
        };
        let after = request.logs_after.and_then(|t| from_timestamp(&t));
        let collection = self
            .logs
            .collect(self.reconciler.log_targets(), after, max_lines as usize, deadline)
            .await;
        Ok(Response::new(pb::CollectLogsResponse {
            records: collection
                .records
                .into_iter()
                .map(|record| pb::LogRecord {
                    deployment_id: record.deployment_id,
                    deployment_revision_id: record.revision_id,
                    resource: record.resource,
                    timestamp: Some(timestamp(record.timestamp)),
                    severity: record.severity.to_owned(),
                    body: record.body,
                })
                .collect(),
            cursors: collection
                .cursors
                .into_iter()
                .map(|ack| pb::LogCursor {
                    release_name: ack.key.release,
                    last_timestamp: Some(timestamp(ack.time)),
                    namespace: ack.key.namespace,
                    empty: ack.empty,
                })
                .collect(),
        }))
    }

    async fn ack_logs(&self, request: Request<pb::AckLogsRequest>) -> Result<Response<pb::AckLogsResponse>, Status> {
        let mut cursors = Vec::new();
        for cursor in request.into_inner().cursors {
            let time = cursor
                .last_timestamp
                .and_then(|t| from_timestamp(&t))
                .ok_or_else(|| Status::invalid_argument("a log cursor without a valid time"))?;
            validate::release_name(&cursor.release_name)
                .map_err(|error| Status::invalid_argument(error.to_string()))?;
            validate::namespace(&cursor.namespace).map_err(|error| Status::invalid_argument(error.to_string()))?;
            cursors.push(Ack {
                key: ReleaseKey::new(&cursor.namespace, &cursor.release_name),
                time,
                empty: cursor.empty,
            });
        }
        self.logs
            .ack(cursors)
            .await
            .map_err(|error| Status::unavailable(error.to_string()))?;
        Ok(Response::new(pb::AckLogsResponse {}))
    }

    async fn cluster_metrics(
        &self,
        _: Request<pb::ClusterMetricsRequest>,
    ) -> Result<Response<pb::ClusterMetricsResponse>, Status> {
        use crate::cluster_metrics::MetricsError;
        match self.metrics.read().await {
            Ok(metrics) => Ok(Response::new(pb::ClusterMetricsResponse {
                cpu_cores_millis: metrics.cpu_cores_millis,
                cpu_usage: metrics.cpu_usage,
                memory_bytes: metrics.memory_bytes,
                memory_usage: metrics.memory_usage,
                disk_metrics: Vec::new(),
            })),
            Err(error @ (MetricsError::Forbidden(_) | MetricsError::NoMetricsApi)) => {
                Err(Status::failed_precondition(error.to_string()))
            }
            Err(error) => Err(Status::unavailable(error.to_string())),
        }
    }
}

/// The time a log collection may take: [`LOG_COLLECTION_TIME`], or less when the caller's
/// `grpc-timeout` leaves less (then two thirds of it, so the answer travels back in time).
fn log_collection_time(metadata: &tonic::metadata::MetadataMap) -> Duration {
    let asked = metadata
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(grpc_timeout);
    asked.map_or(LOG_COLLECTION_TIME, |asked| LOG_COLLECTION_TIME.min(asked * 2 / 3))
}

/// A `grpc-timeout` header value: up to eight digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Maps reconciler errors: bad input → `INVALID_ARGUMENT`, unknown release → `NOT_FOUND`,
/// what a retry may fix → `UNAVAILABLE`/`ABORTED`, Helm refusing → `FAILED_PRECONDITION`.
fn to_status(error: ReconcileError) -> Status {
    let message = error.to_string();
    match error {
        ReconcileError::Invalid(_) => Status::invalid_argument(message),
        ReconcileError::NotTracked(_) | ReconcileError::NotInstalled(_) => Status::not_found(message),
        ReconcileError::Busy(_) => Status::aborted(message),
        ReconcileError::ShuttingDown | ReconcileError::Storage(_) | ReconcileError::Recovery(_) => {
            Status::unavailable(message)
        }
        ReconcileError::Tracking(TrackingError::Api { .. }) => Status::unavailable(message),
        ReconcileError::Tracking(TrackingError::Invalid { .. }) | ReconcileError::Helm { .. } => {
            Status::failed_precondition(message)
        }
    }
}

/// Converts a `SyncRequest`. Fails only when the request as a whole is unusable.
fn desired_state(request: pb::SyncRequest) -> Result<DesiredState, Status> {
    // Absent or empty: unchanged.
    let namespace = request.namespace.filter(|namespace| !namespace.is_empty());
    if let Some(namespace) = &namespace {
        validate::namespace(namespace).map_err(|error| Status::invalid_argument(error.to_string()))?;
    }
    let hub_registry = match request.hub_registry {
        Some(login)
            if !login.host.is_empty()
                && login
                    .host
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '/') =>
        {
            // Only the charts of that registry can fail for it; every other release goes on.
            tracing::warn!("hub_registry.host is not host[:port]; charts from the Hub registry get no login");
            None
        }
        Some(login) if !login.host.is_empty() => Some(RegistryLogin {
            host: login.host,
            username: login.username,
            password: SecretString::new(login.password),
            plain_http: login.plain_http,
        }),
        _ => None,
    };
    Ok(DesiredState {
        namespace,
        deployments: request.deployments.into_iter().map(deployment).collect(),
        hub_registry,
    })
}

/// Converts one deployment; problems become its `input_error`.
fn deployment(deployment: pb::Deployment) -> model::Deployment {
    let mut problems = Vec::new();
    if !deployment.input_error.is_empty() {
        problems.push(deployment.input_error.clone());
    }
    let values = match parse_values(&deployment.values_json) {
        Ok(values) => values,
        Err(problem) => {
            problems.push(problem);
            serde_json::Value::Object(serde_json::Map::new())
        }
    };
    let helm_options = match helm_options(deployment.helm_options) {
        Ok(options) => options,
        Err(problem) => {
            problems.push(problem);
            HelmOptions::default()
        }
    };
    let registry_auth: BTreeMap<String, RegistryCredentials> = deployment
        .registry_auth
        .into_iter()
        .map(|(host, credentials)| {
            (
                host,
                RegistryCredentials {
                    username: credentials.username,
                    password: SecretString::new(credentials.password),
                },
            )
        })
        .collect();
    model::Deployment {
        id: deployment.id,
        revision_id: deployment.revision_id,
        release_name: deployment.release_name,
        chart_url: deployment.chart_url,
        chart_name: deployment.chart_name,
        chart_version: deployment.chart_version,
        values: Values(values),
        registry_auth,
        logs_enabled: deployment.logs_enabled,
        force_restart: deployment.force_restart,
        ignore_revision_skew: deployment.ignore_revision_skew,
        helm_options,
        input_error: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

/// Values as the Hub sent them: a JSON object (empty and `null` mean no values). The error
/// never quotes the input, which may hold secrets.
fn parse_values(json: &str) -> Result<serde_json::Value, String> {
    if json.trim().is_empty() {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(values @ serde_json::Value::Object(_)) => Ok(values),
        Ok(serde_json::Value::Null) => Ok(serde_json::Value::Object(serde_json::Map::new())),
        Ok(_) => Err("invalid values: values_json must be a JSON object".to_owned()),
        Err(error) => Err(format!("invalid values: values_json is not valid JSON ({error})")),
    }
}

fn helm_options(options: Option<pb::HelmOptions>) -> Result<HelmOptions, String> {
    let mut resolved = HelmOptions::default();
    let Some(options) = options else {
        return Ok(resolved);
    };
    if let Some(timeout) = options.timeout.filter(|timeout| !timeout.is_empty()) {
        resolved.timeout = model::parse_helm_timeout(&timeout).map_err(|error| error.to_string())?;
    }
    if let Some(wait) = options.wait_strategy.filter(|wait| !wait.is_empty()) {
        resolved.wait = wait.parse().map_err(|error: model::ModelError| error.to_string())?;
    }
    resolved.rollback_on_failure = options.rollback_on_failure.unwrap_or(resolved.rollback_on_failure);
    resolved.cleanup_on_failure = options.cleanup_on_failure.unwrap_or(resolved.cleanup_on_failure);
    resolved.force_conflicts = options.force_conflicts.unwrap_or(resolved.force_conflicts);
    Ok(resolved)
}

fn status_type(kind: StatusKind) -> pb::StatusType {
    match kind {
        StatusKind::Progressing => pb::StatusType::Progressing,
        StatusKind::Running => pb::StatusType::Running,
        StatusKind::Healthy => pb::StatusType::Healthy,
        StatusKind::Error => pb::StatusType::Error,
    }
}

fn from_timestamp(time: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(time.seconds, u32::try_from(time.nanos).ok()?)
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn deployment_status(status: DeploymentStatus) -> pb::DeploymentStatus {
    pb::DeploymentStatus {
        deployment_id: status.deployment_id,
        revision_id: status.revision_id,
        release_name: status.release_name,
        r#type: status_type(status.status.kind).into(),
        message: status.status.message,
        changed_at: Some(timestamp(status.status.changed_at)),
    }
}

fn release(info: ReleaseInfo) -> pb::Release {
    pb::Release {
        release_name: info.release_name,
        deployment_id: info.deployment_id,
        revision_id: info.revision_id,
        tracked_revision: info.tracked_revision.map_or(0, to_i32),
        helm_revision: info.helm_revision.map_or(0, to_i32),
        helm_status: info.helm_status,
        phase: info.phase,
        chart: info.chart,
        status: info.status.map(deployment_status),
    }
}

fn release_detail(detail: ReleaseDetail) -> pb::GetReleaseResponse {
    pb::GetReleaseResponse {
        release: Some(release(detail.release)),
        history: detail
            .history
            .into_iter()
            .map(|revision| pb::HelmRevision {
                revision: to_i32(revision.revision),
                status: revision.status,
                chart: revision.chart,
                app_version: revision.app_version,
                description: revision.description,
                updated: revision.updated.map(timestamp),
            })
            .collect(),
        resources: detail
            .resources
            .into_iter()
            .map(|resource| pb::ResourceHealth {
                resource: resource.resource(),
                healthy: resource.healthy,
                message: resource.message,
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;
    use crate::model::WaitStrategy;

    #[test]
    fn a_log_collection_answers_within_the_callers_deadline() {
        assert_eq!(grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        for bad in ["", "S", "10", "123456789S", "10s", "-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(log_collection_time(&metadata), LOG_COLLECTION_TIME);
        metadata.insert("grpc-timeout", "3S".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(log_collection_time(&metadata), Duration::from_secs(2));
        metadata.insert("grpc-timeout", "1H".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(log_collection_time(&metadata), LOG_COLLECTION_TIME);
    }

    fn proto_deployment(values_json: &str) -> pb::Deployment {
        pb::Deployment {
            id: "d".into(),
            revision_id: "r".into(),
            release_name: "web".into(),
            chart_url: "oci://hub.example.com/c/web".into(),
            chart_version: "1.0.0".into(),
            values_json: values_json.into(),
            registry_auth: HashMap::from([(
                "registry.example.com".to_owned(),
                pb::RegistryCredentials {
                    username: "u".into(),
                    password: "p".into(),
                },
            )]),
            ..Default::default()
        }
    }

    #[test]
    fn values_are_parsed() {
        let converted = deployment(proto_deployment(r#"{"replicas": 2}"#));
        assert_eq!(converted.values.0, serde_json::json!({"replicas": 2}));
        assert_eq!(converted.input_error, None);
        assert_eq!(converted.registry_auth["registry.example.com"].password.expose(), "p");
        assert_eq!(deployment(proto_deployment("")).values.0, serde_json::json!({}));
    }

    #[test]
    fn bad_values_become_the_deployments_error() {
        let converted = deployment(proto_deployment(r#"{"password": "hunter2""#));
        let error = converted.input_error.unwrap();
        assert!(
            error.starts_with("invalid values: values_json is not valid JSON"),
            "{error}"
        );
        assert!(!error.contains("hunter2"));
        assert_eq!(
            deployment(proto_deployment("[1]")).input_error.as_deref(),
            Some("invalid values: values_json must be a JSON object")
        );
    }

    #[test]
    fn helm_options_take_defaults_and_overrides() {
        assert_eq!(helm_options(None), Ok(HelmOptions::default()));
        let options = helm_options(Some(pb::HelmOptions {
            timeout: Some("1h2m3.5s".into()),
            wait_strategy: Some("legacy".into()),
            rollback_on_failure: Some(false),
            cleanup_on_failure: None,
            force_conflicts: Some(true),
        }))
        .unwrap();
        assert_eq!(options.timeout, Duration::from_millis(3_723_500));
        assert_eq!(options.wait, WaitStrategy::Legacy);
        assert!(!options.rollback_on_failure && options.cleanup_on_failure && options.force_conflicts);
        let mut bad = proto_deployment("{}");
        bad.helm_options = Some(pb::HelmOptions {
            timeout: Some("soon".into()),
            ..Default::default()
        });
        assert!(deployment(bad).input_error.unwrap().contains("invalid helm timeout"));
    }

    #[test]
    fn an_entry_the_poller_could_not_read_is_an_input_error() {
        let mut unread = proto_deployment("{}");
        unread.input_error = "invalid deployment from the Hub: helmOptions.timeout is a number".into();
        assert_eq!(
            deployment(unread).input_error.as_deref(),
            Some("invalid deployment from the Hub: helmOptions.timeout is a number")
        );
        assert_eq!(deployment(proto_deployment("{}")).input_error, None);
    }

    #[test]
    fn malformed_requests_are_invalid_arguments() {
        let bad_namespace = pb::SyncRequest {
            namespace: Some("Bad NS".into()),
            ..Default::default()
        };
        assert_eq!(
            desired_state(bad_namespace).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        // Absent and empty both mean unchanged.
        for namespace in [None, Some(String::new())] {
            let request = pb::SyncRequest {
                namespace,
                ..Default::default()
            };
            assert_eq!(desired_state(request).unwrap().namespace, None);
        }
        let no_host = pb::SyncRequest {
            hub_registry: Some(pb::RegistryLogin {
                host: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(desired_state(no_host).unwrap().hub_registry, None);
    }

    #[test]
    fn a_bad_hub_registry_host_fails_only_that_registry() {
        // With a scheme, the whole Sync used to be refused and nothing reconciled.
        for host in ["https://registry.example.com", "a b"] {
            let request = pb::SyncRequest {
                hub_registry: Some(pb::RegistryLogin {
                    host: host.into(),
                    username: "-".into(),
                    password: "jwt".into(),
                    plain_http: false,
                }),
                deployments: vec![pb::Deployment {
                    id: "d".into(),
                    release_name: "web".into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let desired = desired_state(request).unwrap();
            assert_eq!(desired.hub_registry, None, "{host}");
            assert_eq!(desired.deployments.len(), 1);
        }
    }

    #[test]
    fn statuses_convert() {
        let time = DateTime::from_timestamp(1_700_000_000, 5).unwrap();
        let status = deployment_status(DeploymentStatus {
            deployment_id: "d".into(),
            revision_id: "r".into(),
            release_name: "web".into(),
            status: model::Status {
                kind: StatusKind::Healthy,
                message: "ok".into(),
                changed_at: time,
            },
        });
        assert_eq!(status.r#type, pb::StatusType::Healthy as i32);
        assert_eq!(
            status.changed_at,
            Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5
            })
        );
    }

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(
            to_status(ReconcileError::NotTracked("web".into())).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            to_status(ReconcileError::Busy("web".into())).code(),
            tonic::Code::Aborted
        );
        assert_eq!(to_status(ReconcileError::ShuttingDown).code(), tonic::Code::Unavailable);
        let invalid = validate::release_name("Bad").unwrap_err();
        assert_eq!(to_status(invalid.into()).code(), tonic::Code::InvalidArgument);
    }
}
