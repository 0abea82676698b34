//! The poller loop: every interval, fetch the desired state from the Hub, hand it to the
//! executor with `Sync`, and post the statuses that are due.
//!
//! Nothing reaches the executor unless the Hub's response was complete and parsed: a failed,
//! malformed or partial response changes nothing in the cluster. The releases are still fine
//! then, so the poller keeps posting their real statuses (read from the executor with
//! `Statuses`, no new desired state needed) and reports the Hub failure in its own logs and
//! metrics. Only an executor that cannot be reached makes the deployments `error`.
//!
//! Statuses are posted a few at a time and within a deadline per cycle, so one slow status
//! endpoint cannot stall the cycle (and make every other status stale on the Hub).
//!
//! The decisions of a cycle live in [`Cycle`], which sees the Hub and the executor through
//! the [`Hub`] and [`Executor`] traits (the real clients implement them; the unit tests use
//! fakes in memory); [`Poller`] adds what rides on a cycle: logs, metrics, self-update.

use agent_runtime::sync::MutexExt as _;
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_runtime::tls::client::ReloadingChannel as Channel;
use distr_agent_proto::v1::{self as pb, executor_client::ExecutorClient};
use futures::StreamExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::{Registry, Unit},
};
use tonic::Code;
use uuid::Uuid;

use crate::{
    desired,
    hub::{HubClient, HubError, Resources, StatusReport, StatusType},
    report::StatusBook,
};

/// How often an unchanged status is posted again (the Hub calls a status older than 60 s stale).
pub const STATUS_REFRESH: Duration = Duration::from_secs(30);
/// Status posts in flight at once.
pub const MAX_CONCURRENT_POSTS: usize = 8;
/// Time the posts of one cycle may take; what is left is due again next cycle.
pub const POST_DEADLINE: Duration = Duration::from_secs(20);
/// How long an executor that cannot be reached is taken for one restarting (a new pod, a
/// crash and restart) before the deployments are reported as errors: the Hub keeps the last
/// statuses meanwhile.
pub const EXECUTOR_GRACE: Duration = Duration::from_secs(30);
/// Longest a healthy cycle takes (a login, the resources, the Sync, the posts, each bounded
/// by its own timeout), with room to spare: a cycle running longer is wedged.
pub const MAX_CYCLE: Duration = Duration::from_secs(300);

/// The Hub as a cycle uses it.
pub trait Hub: Send + Sync {
    fn resources(&self) -> impl Future<Output = Result<Resources, HubError>> + Send;
    fn post_status(&self, status: &StatusReport) -> impl Future<Output = Result<(), HubError>> + Send;
    /// The login for the Hub's registry (user `-`, the agent's JWT as password), when one is
    /// configured.
    fn registry_login(&self) -> impl Future<Output = Option<pb::RegistryLogin>> + Send;
}

/// The executor as a cycle uses it.
pub trait Executor: Send {
    /// Hands over the desired state; the statuses as they are after it.
    fn sync(
        &mut self,
        request: pb::SyncRequest,
    ) -> impl Future<Output = Result<Vec<pb::DeploymentStatus>, tonic::Status>> + Send;
    /// The current statuses, with no new desired state.
    fn statuses(&mut self) -> impl Future<Output = Result<Vec<pb::DeploymentStatus>, tonic::Status>> + Send;
}

impl Hub for HubClient {
    async fn resources(&self) -> Result<Resources, HubError> {
        HubClient::resources(self).await
    }

    async fn post_status(&self, status: &StatusReport) -> Result<(), HubError> {
        HubClient::post_status(self, status).await
    }

    async fn registry_login(&self) -> Option<pb::RegistryLogin> {
        let config = self.config().ok()?;
        let host = config.registry_host.clone()?;
        match self.current_token().await {
            Ok(token) => Some(pb::RegistryLogin {
                host,
                username: "-".to_owned(),
                password: token.expose().to_owned(),
                plain_http: config.registry_plain_http,
            }),
            Err(error) => {
                tracing::warn!(%error, "no token for the Hub registry");
                None
            }
        }
    }
}

impl Executor for ExecutorClient<Channel> {
    async fn sync(&mut self, request: pb::SyncRequest) -> Result<Vec<pb::DeploymentStatus>, tonic::Status> {
        Ok(ExecutorClient::sync(self, request).await?.into_inner().statuses)
    }

    async fn statuses(&mut self) -> Result<Vec<pb::DeploymentStatus>, tonic::Status> {
        Ok(ExecutorClient::statuses(self, pb::StatusesRequest {})
            .await?
            .into_inner()
            .statuses)
    }
}

/// The core of a cycle: fetch the desired state, hand it to the executor, post the statuses.
pub struct Cycle<H, E> {
    hub: H,
    executor: E,
    book: Arc<tokio::sync::Mutex<StatusBook>>,
    /// Revisions of the last complete Hub response.
    last_known: Arc<std::sync::Mutex<Vec<Uuid>>>,
    post_deadline: Duration,
    metrics: PollerMetrics,
    /// An agent update the poller handed over is under way (set by the self-update step): the
    /// executor may be down for its own rollout, which is no error of the deployments.
    agent_update: Arc<AtomicBool>,
    /// How long the executor may be unreachable before the deployments are errors.
    executor_grace: Duration,
    /// Since when the executor could not be reached (None: it answered last time).
    unreachable_since: Option<tokio::time::Instant>,
}

impl<H: Hub, E: Executor> Cycle<H, E> {
    /// The flag the self-update step sets while an agent update it handed over is under way.
    pub fn agent_update_flag(&self) -> Arc<AtomicBool> {
        self.agent_update.clone()
    }

    pub fn new(hub: H, executor: E, status_refresh: Duration) -> Self {
        Self {
            hub,
            executor,
            book: Arc::new(tokio::sync::Mutex::new(StatusBook::new(status_refresh))),
            last_known: Arc::default(),
            post_deadline: POST_DEADLINE,
            metrics: PollerMetrics::default(),
            agent_update: Arc::default(),
            executor_grace: EXECUTOR_GRACE,
            unreachable_since: None,
        }
    }

    /// How long the executor may be unreachable before the deployments are reported as
    /// errors (default [`EXECUTOR_GRACE`]).
    pub fn with_executor_grace(mut self, grace: Duration) -> Self {
        self.executor_grace = grace;
        self
    }

    /// Fetch, sync, post. Returns the Hub's answer when it came complete.
    pub async fn run(&mut self) -> Option<Resources> {
        let fetched = self.hub.resources().await;
        let statuses = match &fetched {
            Ok(resources) => {
                *lock(&self.last_known) = resources.deployments.iter().map(|d| d.revision_id).collect();
                self.sync(resources).await
            }
            Err(error) => {
                self.metrics.hub_fetch_failures.inc();
                tracing::warn!(%error, "cannot fetch the desired state from the Hub; the cluster is left as it is and the last statuses are reported");
                self.last_statuses().await
            }
        };
        post_current(&self.hub, &self.book, &statuses, self.post_deadline, &self.metrics).await;
        fetched.ok()
    }

    async fn sync(&mut self, resources: &Resources) -> Vec<StatusReport> {
        let request = desired::sync_request(resources, self.hub.registry_login().await);
        match self.executor.sync(request).await {
            Ok(statuses) => {
                self.executor_answered();
                statuses.iter().filter_map(report).collect()
            }
            Err(status) => self.executor_failed(&status),
        }
    }

    /// The executor's current statuses of the deployments of the last complete Hub response.
    async fn last_statuses(&mut self) -> Vec<StatusReport> {
        match self.executor.statuses().await {
            Ok(statuses) => {
                self.executor_answered();
                statuses
                    .iter()
                    .filter_map(report)
                    .filter(|status| lock(&self.last_known).contains(&status.revision_id))
                    .collect()
            }
            Err(status) => self.executor_failed(&status),
        }
    }

    fn executor_answered(&mut self) {
        if let Some(since) = self.unreachable_since.take() {
            tracing::info!(
                seconds = since.elapsed().as_secs_f64(),
                "the agent executor answers again"
            );
        }
    }

    /// An `error` for every deployment last seen, worded after what went wrong.
    /// An executor that cannot be reached is most likely restarting: nothing is posted (the
    /// Hub keeps the last statuses) and it is only logged, for the grace time, or as long as
    /// an agent update the poller handed over is under way.
    fn executor_failed(&mut self, status: &tonic::Status) -> Vec<StatusReport> {
        self.metrics.executor_failures.inc();
        let message = executor_error_message(status);
        if unreachable(status) {
            let since = *self.unreachable_since.get_or_insert_with(tokio::time::Instant::now);
            if self.agent_update.load(Ordering::Acquire) {
                tracing::info!(error = %message, "agent executor unreachable during an agent update; the Hub keeps the last statuses");
                return Vec::new();
            }
            let down = since.elapsed();
            if down < self.executor_grace {
                tracing::info!(
                    error = %message,
                    seconds = down.as_secs_f64(),
                    grace_seconds = self.executor_grace.as_secs_f64(),
                    "agent executor unreachable; the Hub keeps the last statuses until the grace time is over"
                );
                return Vec::new();
            }
        } else {
            self.unreachable_since = None;
        }
        tracing::warn!(code = ?status.code(), error = %message, "agent executor call failed");
        lock(&self.last_known)
            .iter()
            .map(|revision_id| StatusReport {
                revision_id: *revision_id,
                status_type: StatusType::Error,
                message: message.clone(),
            })
            .collect()
    }
}

pub struct Poller {
    cycle: Cycle<HubClient, ExecutorClient<Channel>>,
    self_update: Option<crate::selfupdate::SelfUpdate>,
    logs: crate::deployment_logs::LogShipping,
    cluster_metrics: crate::cluster_metrics::MetricsReporting,
}

/// Counters of the poll loop, served on `/metrics` once registered.
#[derive(Clone, Default)]
pub struct PollerMetrics {
    /// Cycles whose Hub fetch failed.
    pub hub_fetch_failures: Counter,
    /// Status posts the Hub did not accept (or that did not finish in time).
    pub status_post_failures: Counter,
    /// Cycles whose executor call failed.
    pub executor_failures: Counter,
    /// Seconds the oldest due status has waited for the Hub to accept it.
    pub oldest_unposted_status_age: Gauge<f64, AtomicU64>,
}

impl PollerMetrics {
    /// Registers the counters (`distr_agent_hub_fetch_failures_total`, ...).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hub_fetch_failures",
            "Cycles in which the desired state could not be fetched from the Hub",
            self.hub_fetch_failures.clone(),
        );
        registry.register(
            "status_post_failures",
            "Status posts the Hub did not accept in time",
            self.status_post_failures.clone(),
        );
        registry.register(
            "executor_failures",
            "Cycles in which the executor could not be called",
            self.executor_failures.clone(),
        );
        registry.register_with_unit(
            "oldest_unposted_status_age",
            "How long the oldest status due for the Hub has waited to be accepted",
            Unit::Seconds,
            self.oldest_unposted_status_age.clone(),
        );
    }
}

impl Poller {
    pub fn new(
        hub: HubClient,
        executor: ExecutorClient<Channel>,
        status_refresh: Duration,
        executor_grace: Duration,
    ) -> Self {
        Self {
            cycle: Cycle::new(hub, executor, status_refresh).with_executor_grace(executor_grace),
            self_update: None,
            logs: crate::deployment_logs::LogShipping::default(),
            cluster_metrics: crate::cluster_metrics::MetricsReporting::default(),
        }
    }

    /// Follows the Hub's agent version through the updater.
    pub fn with_self_update(mut self, self_update: crate::selfupdate::SelfUpdate) -> Self {
        self.self_update = Some(self_update.tracking(self.cycle.agent_update_flag()));
        self
    }

    /// Registers the loop's figures with the process's metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.cycle.metrics.register(registry);
        registry.register(
            "deployment_log_lines_shipped",
            "Pod log lines of deployments the Hub accepted",
            self.logs.metrics.shipped.clone(),
        );
        registry.register(
            "deployment_log_lines_dropped",
            "Pod log lines of deployments the Hub refused for good",
            self.logs.metrics.dropped.clone(),
        );
    }

    /// One cycle: fetch, sync, report; then logs, metrics and the agent's version.
    pub async fn cycle(&mut self) {
        let fetched = self.cycle.run().await;
        let Some(resources) = fetched else { return };
        let (hub, executor) = (&self.cycle.hub, &mut self.cycle.executor);
        if resources.deployment_logs_enabled {
            self.logs.step(executor, hub, resources.deployment_logs_after).await;
        }
        if resources.metrics_enabled {
            self.cluster_metrics.step(executor, hub).await;
        }
        // After the statuses: an update never delays the releases.
        if let Some(update) = self.self_update.as_mut() {
            let running = hub.config().ok().and_then(|c| c.agent_version_id);
            update.step(hub, resources.version.as_ref(), running).await;
        }
    }

    /// A follower of the executor's status stream that posts changes as they come, sharing
    /// this loop's record of what the Hub has.
    pub fn status_follower(&self, executor: ExecutorClient<Channel>) -> StatusFollower {
        StatusFollower {
            executor,
            hub: self.cycle.hub.clone(),
            book: self.cycle.book.clone(),
            last_known: self.cycle.last_known.clone(),
            metrics: self.cycle.metrics.clone(),
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.locked()
}

/// Posts what is due among `statuses` (the full current list) and records the outcome.
async fn post_current(
    hub: &impl Hub,
    book: &tokio::sync::Mutex<StatusBook>,
    statuses: &[StatusReport],
    deadline: Duration,
    metrics: &PollerMetrics,
) {
    let mut book = book.lock().await;
    let due = book.due(statuses, Instant::now());
    let failed = post_due(hub, &mut book, due, MAX_CONCURRENT_POSTS, deadline).await;
    metrics.status_post_failures.inc_by(failed as u64);
    metrics
        .oldest_unposted_status_age
        .set(book.oldest_unposted(Instant::now()).as_secs_f64());
}

/// Follows the executor's `WatchStatuses` stream and posts each change at once, so a new
/// status reaches the Hub within a second instead of at the next cycle. Reconnects (and
/// so gets the full list again) after any failure.
pub struct StatusFollower {
    executor: ExecutorClient<Channel>,
    hub: HubClient,
    book: Arc<tokio::sync::Mutex<StatusBook>>,
    last_known: Arc<std::sync::Mutex<Vec<Uuid>>>,
    metrics: PollerMetrics,
}

impl StatusFollower {
    pub async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let mut pause = FOLLOW_RETRY;
        loop {
            let followed = tokio::select! {
                result = self.follow() => result,
                () = shutdown.cancelled() => return,
            };
            match followed {
                // The stream ran (the server ends connections past their age, for certificate
                // rotation): follow again at once.
                (true, result) => {
                    if let Err(status) = result {
                        tracing::debug!(code = ?status.code(), message = status.message(), "the status stream ended; following it again");
                    }
                    pause = FOLLOW_RETRY;
                }
                // It could not even start: back off.
                (false, result) => {
                    if let Err(status) = result {
                        tracing::debug!(code = ?status.code(), message = status.message(), "cannot follow the status stream");
                    }
                    pause = (pause * 2).min(FOLLOW_RETRY_MAX);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Follows the stream until it ends; says whether it delivered anything, and how it ended.
    async fn follow(&mut self) -> (bool, Result<(), tonic::Status>) {
        let mut delivered = false;
        let result = self.follow_messages(&mut delivered).await;
        (delivered, result)
    }

    async fn follow_messages(&mut self, delivered: &mut bool) -> Result<(), tonic::Status> {
        let mut stream = self.executor.watch_statuses(pb::StatusesRequest {}).await?.into_inner();
        while let Some(message) = stream.message().await? {
            *delivered = true;
            let known = lock(&self.last_known).clone();
            // Only the deployments of the Hub's last complete answer; none before the first.
            if known.is_empty() {
                continue;
            }
            let statuses: Vec<StatusReport> = message
                .statuses
                .iter()
                .filter_map(report)
                .filter(|status| known.contains(&status.revision_id))
                .collect();
            post_current(&self.hub, &self.book, &statuses, POST_DEADLINE, &self.metrics).await;
        }
        Ok(())
    }
}

/// First pause before following the status stream again; doubles up to the maximum.
const FOLLOW_RETRY: Duration = Duration::from_millis(500);
const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(30);

/// Posts `due` with at most `concurrency` posts in flight, until `deadline`; records each
/// accepted post in `book`. Returns how many were not accepted (failed or cut off by the
/// deadline; they are due again next cycle).
pub async fn post_due(
    hub: &impl Hub,
    book: &mut StatusBook,
    due: Vec<StatusReport>,
    concurrency: usize,
    deadline: Duration,
) -> usize {
    let total = due.len();
    let mut accepted = 0;
    let posts = futures::stream::iter(due.into_iter().map(|status| async move {
        let result = hub.post_status(&status).await;
        (status, result)
    }))
    .buffer_unordered(concurrency.max(1))
    .take_until(tokio::time::sleep(deadline));
    futures::pin_mut!(posts);
    while let Some((status, result)) = posts.next().await {
        match result {
            Ok(()) => {
                tracing::debug!(revision = %status.revision_id, kind = ?status.status_type, "status posted");
                book.accepted(&status, Instant::now());
                accepted += 1;
            }
            Err(error) => tracing::warn!(revision = %status.revision_id, %error, "cannot post status"),
        }
    }
    let failed = total - accepted;
    if failed > 0 {
        tracing::warn!(
            failed,
            total,
            "some statuses were not posted this cycle; they are retried next cycle"
        );
    }
    failed
}

/// What to tell the Hub when an executor call failed: "unreachable" only when it could not
/// be reached (or did not answer); otherwise what it said.
pub fn executor_error_message(status: &tonic::Status) -> String {
    if unreachable(status) {
        format!("agent executor unreachable: {}", status.message())
    } else {
        format!(
            "agent executor refused the request ({:?}): {}",
            status.code(),
            status.message()
        )
    }
}

fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// The Hub's form of an executor status; `None` for a deployment without a status yet.
fn report(status: &pb::DeploymentStatus) -> Option<StatusReport> {
    let status_type = match pb::StatusType::try_from(status.r#type).ok()? {
        pb::StatusType::Progressing => StatusType::Progressing,
        pb::StatusType::Running => StatusType::Running,
        pb::StatusType::Healthy => StatusType::Healthy,
        pb::StatusType::Error => StatusType::Error,
        pb::StatusType::Unspecified => return None,
    };
    let revision_id = status.revision_id.parse().ok()?;
    Some(StatusReport {
        revision_id,
        status_type,
        message: status.message.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use axum::{http::StatusCode, response::IntoResponse};

    use super::*;
    use crate::{
        config::ConfigSource,
        hub::fake::{FakeHub, jwt, token_reply},
    };

    fn report(n: u128) -> StatusReport {
        StatusReport {
            revision_id: Uuid::from_u128(n),
            status_type: StatusType::Healthy,
            message: "status check passed. 1 resources healthy".into(),
        }
    }

    #[tokio::test]
    async fn one_slow_status_endpoint_does_not_stall_the_others() {
        let slow = Uuid::from_u128(3).to_string();
        let fake = FakeHub::start(move |seen| {
            if seen.is_login() {
                return token_reply(&jwt(3600));
            }
            if String::from_utf8_lossy(&seen.body).contains(&slow) {
                return crate::hub::fake::Reply::After(Duration::from_secs(20), StatusCode::OK.into_response());
            }
            StatusCode::OK.into()
        })
        .await;
        agent_runtime::install_crypto_provider();
        let hub = HubClient::new(Arc::new(ConfigSource::from_env(fake.env())), "1.2.3").unwrap();
        let mut book = StatusBook::new(STATUS_REFRESH);
        let statuses: Vec<StatusReport> = (1..=12).map(report).collect();
        let due = book.due(&statuses, Instant::now());
        let started = Instant::now();
        let failed = post_due(&hub, &mut book, due, 4, Duration::from_secs(2)).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "the cycle waited {took:?}");
        assert_eq!(failed, 1);
        // Everything but the slow one was accepted; the slow one is due again.
        assert_eq!(book.due(&statuses, Instant::now()), vec![report(3)]);
    }

    /// A Hub in memory: answers from a script, records the posts.
    #[derive(Default)]
    struct MemoryHub {
        answers: std::sync::Mutex<std::collections::VecDeque<Result<Resources, HubError>>>,
        posted: std::sync::Mutex<Vec<StatusReport>>,
    }

    impl MemoryHub {
        fn answer(&self, answer: Result<Resources, HubError>) {
            self.answers.lock().unwrap().push_back(answer);
        }

        fn take_posted(&self) -> Vec<StatusReport> {
            std::mem::take(&mut *self.posted.lock().unwrap())
        }
    }

    impl Hub for Arc<MemoryHub> {
        async fn resources(&self) -> Result<Resources, HubError> {
            self.answers.lock().unwrap().pop_front().expect("a scripted answer")
        }

        async fn post_status(&self, status: &StatusReport) -> Result<(), HubError> {
            self.posted.lock().unwrap().push(status.clone());
            Ok(())
        }

        async fn registry_login(&self) -> Option<pb::RegistryLogin> {
            None
        }
    }

    /// An executor in memory: records what it was sent and answers from a script.
    #[derive(Default)]
    struct MemoryExecutor {
        synced: Vec<pb::SyncRequest>,
        statuses_calls: usize,
        /// `Err` makes every call fail with it.
        down: Option<tonic::Status>,
        current: Vec<pb::DeploymentStatus>,
    }

    impl Executor for MemoryExecutor {
        async fn sync(&mut self, request: pb::SyncRequest) -> Result<Vec<pb::DeploymentStatus>, tonic::Status> {
            self.synced.push(request);
            match &self.down {
                Some(status) => Err(status.clone()),
                None => Ok(self.current.clone()),
            }
        }

        async fn statuses(&mut self) -> Result<Vec<pb::DeploymentStatus>, tonic::Status> {
            self.statuses_calls += 1;
            match &self.down {
                Some(status) => Err(status.clone()),
                None => Ok(self.current.clone()),
            }
        }
    }

    fn resources(revisions: &[u128]) -> Resources {
        let deployments: Vec<serde_json::Value> = revisions
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": Uuid::from_u128(100 + n), "revisionId": Uuid::from_u128(*n),
                    "releaseName": format!("web{n}"), "chartUrl": "oci://registry.example/charts/web",
                    "chartVersion": "1.0.0",
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({"namespace": "apps", "deployments": deployments})).unwrap()
    }

    fn executor_status(n: u128, kind: pb::StatusType, message: &str) -> pb::DeploymentStatus {
        pb::DeploymentStatus {
            revision_id: Uuid::from_u128(n).to_string(),
            r#type: kind.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    fn malformed() -> HubError {
        HubError::Malformed {
            method: reqwest::Method::GET,
            path: "/api/v1/agent/resources".into(),
            message: "expected value at line 1 column 1".into(),
        }
    }

    /// The loop's decisions over fakes: what reaches the executor and what the Hub hears, for
    /// a good answer, a failed one, and an executor that is down.
    #[tokio::test]
    async fn a_failed_hub_answer_never_reaches_the_executor_and_statuses_go_on() {
        let hub = Arc::new(MemoryHub::default());
        let executor = MemoryExecutor {
            current: vec![
                executor_status(1, pb::StatusType::Healthy, "status check passed. 1 resources healthy"),
                // A release the Hub does not list (the executor still uninstalls it).
                executor_status(9, pb::StatusType::Healthy, "status check passed. 1 resources healthy"),
                // No status yet: nothing to post.
                executor_status(2, pb::StatusType::Unspecified, ""),
            ],
            ..Default::default()
        };
        let mut cycle = Cycle::new(hub.clone(), executor, STATUS_REFRESH);

        hub.answer(Ok(resources(&[1, 2])));
        assert!(cycle.run().await.is_some());
        let synced = &cycle.executor.synced;
        assert_eq!(synced.len(), 1);
        assert_eq!(synced[0].namespace.as_deref(), Some("apps"));
        assert_eq!(synced[0].deployments.len(), 2, "the whole desired state");
        let posted = hub.take_posted();
        assert_eq!(
            posted.iter().map(|s| s.revision_id).collect::<Vec<_>>(),
            [Uuid::from_u128(1), Uuid::from_u128(9)],
            "what the executor said after the Sync"
        );

        // A malformed answer: no Sync (an empty list would uninstall everything); the real
        // statuses of the last known deployments are read instead, and unchanged ones are
        // not posted again before their refresh.
        hub.answer(Err(malformed()));
        assert!(cycle.run().await.is_none());
        assert_eq!(cycle.executor.synced.len(), 1, "nothing reached the executor");
        assert_eq!(cycle.executor.statuses_calls, 1);
        assert_eq!(cycle.metrics.hub_fetch_failures.get(), 1);
        assert!(hub.take_posted().is_empty(), "nothing changed, nothing posted");

        // A change while the Hub cannot be read still reaches it, for the deployments of the
        // Hub's last complete answer only.
        cycle.executor.current[0] = executor_status(1, pb::StatusType::Error, "pod web-1 ImagePullBackOff");
        cycle.executor.current[1] = executor_status(9, pb::StatusType::Error, "uninstall error: timed out");
        hub.answer(Err(malformed()));
        cycle.run().await;
        let posted = hub.take_posted();
        assert_eq!(posted.len(), 1);
        assert_eq!(posted[0].revision_id, Uuid::from_u128(1));
        assert_eq!(posted[0].status_type, StatusType::Error);
    }

    #[tokio::test]
    async fn an_executor_that_is_down_makes_every_known_deployment_an_error() {
        let hub = Arc::new(MemoryHub::default());
        let executor = MemoryExecutor {
            down: Some(tonic::Status::unavailable("connection refused")),
            ..Default::default()
        };
        let mut cycle = Cycle::new(hub.clone(), executor, STATUS_REFRESH).with_executor_grace(Duration::ZERO);
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        let posted = hub.take_posted();
        assert_eq!(posted.len(), 2);
        assert!(posted.iter().all(|status| status.status_type == StatusType::Error
            && status.message == "agent executor unreachable: connection refused"));
        assert_eq!(cycle.metrics.executor_failures.get(), 1);

        // During an agent update the poller handed over, the executor's absence is only
        // logged: the Hub keeps the last statuses.
        let hub = Arc::new(MemoryHub::default());
        let executor = MemoryExecutor {
            down: Some(tonic::Status::unavailable("connection refused")),
            ..Default::default()
        };
        let mut cycle = Cycle::new(hub.clone(), executor, STATUS_REFRESH).with_executor_grace(Duration::ZERO);
        cycle.agent_update_flag().store(true, Ordering::Release);
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        assert!(hub.take_posted().is_empty(), "no error during the agent's update");
        cycle.agent_update_flag().store(false, Ordering::Release);
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        assert_eq!(hub.take_posted().len(), 2, "errors again once it ended");

        // Before any complete Hub answer there is nothing to report on.
        let hub = Arc::new(MemoryHub::default());
        let executor = MemoryExecutor {
            down: Some(tonic::Status::unavailable("connection refused")),
            ..Default::default()
        };
        let mut cycle = Cycle::new(hub.clone(), executor, STATUS_REFRESH);
        hub.answer(Err(malformed()));
        cycle.run().await;
        assert!(hub.take_posted().is_empty());
    }

    /// An executor restart (a few seconds down) is no outage on the Hub: the last statuses
    /// stay until the executor has been unreachable for the grace time.
    #[tokio::test(start_paused = true)]
    async fn an_executor_down_for_less_than_the_grace_time_changes_nothing_on_the_hub() {
        let hub = Arc::new(MemoryHub::default());
        let executor = MemoryExecutor {
            down: Some(tonic::Status::unavailable("connection refused")),
            ..Default::default()
        };
        let mut cycle = Cycle::new(hub.clone(), executor, STATUS_REFRESH);
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        assert!(hub.take_posted().is_empty(), "down for a moment: nothing posted");
        tokio::time::advance(EXECUTOR_GRACE - Duration::from_secs(1)).await;
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        assert!(hub.take_posted().is_empty(), "still within the grace time");
        tokio::time::advance(Duration::from_secs(2)).await;
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        let posted = hub.take_posted();
        assert_eq!(posted.len(), 2, "past the grace time: the outage is reported");
        assert!(posted.iter().all(|s| s.status_type == StatusType::Error));

        // Back, then down again: the grace time starts anew.
        cycle.executor.down = None;
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        hub.take_posted();
        cycle.executor.down = Some(tonic::Status::unavailable("connection refused"));
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        assert!(hub.take_posted().is_empty(), "a new outage gets its grace time");
        // An executor that answers with an error is no outage: reported at once.
        cycle.executor.down = Some(tonic::Status::invalid_argument("invalid namespace"));
        hub.answer(Ok(resources(&[1, 2])));
        cycle.run().await;
        assert_eq!(hub.take_posted().len(), 2);
    }

    #[test]
    fn executor_errors_say_what_happened() {
        assert_eq!(
            executor_error_message(&tonic::Status::unavailable("connection refused")),
            "agent executor unreachable: connection refused"
        );
        assert_eq!(
            executor_error_message(&tonic::Status::invalid_argument("invalid namespace \"A\"")),
            "agent executor refused the request (InvalidArgument): invalid namespace \"A\""
        );
    }
}
