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

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use agent_runtime::tls::client::ReloadingChannel as Channel;
use distr_agent_proto::v1::{self as pb, executor_client::ExecutorClient};
use futures::StreamExt as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::{Registry, Unit},
};
use tonic::Code;
use uuid::Uuid;

use crate::{
    desired,
    hub::{HubClient, Resources, StatusReport, StatusType},
    report::StatusBook,
};

/// How often an unchanged status is posted again (the Hub calls a status older than 60 s stale).
pub const STATUS_REFRESH: Duration = Duration::from_secs(30);
/// Status posts in flight at once.
pub const MAX_CONCURRENT_POSTS: usize = 8;
/// Time the posts of one cycle may take; what is left is due again next cycle.
pub const POST_DEADLINE: Duration = Duration::from_secs(20);
/// Longest a healthy cycle takes (a login, the resources, the Sync, the posts, each bounded
/// by its own timeout), with room to spare: a cycle running longer is wedged.
pub const MAX_CYCLE: Duration = Duration::from_secs(300);

pub struct Poller {
    hub: HubClient,
    executor: ExecutorClient<Channel>,
    book: Arc<tokio::sync::Mutex<StatusBook>>,
    /// Revisions of the last complete Hub response.
    last_known: Arc<std::sync::Mutex<Vec<Uuid>>>,
    post_deadline: Duration,
    metrics: PollerMetrics,
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
    pub fn new(hub: HubClient, executor: ExecutorClient<Channel>, status_refresh: Duration) -> Self {
        Self {
            hub,
            executor,
            book: Arc::new(tokio::sync::Mutex::new(StatusBook::new(status_refresh))),
            last_known: Arc::default(),
            post_deadline: POST_DEADLINE,
            metrics: PollerMetrics::default(),
            self_update: None,
            logs: crate::deployment_logs::LogShipping::default(),
            cluster_metrics: crate::cluster_metrics::MetricsReporting::default(),
        }
    }

    /// Follows the Hub's agent version through the updater.
    pub fn with_self_update(mut self, self_update: crate::selfupdate::SelfUpdate) -> Self {
        self.self_update = Some(self_update);
        self
    }

    /// Registers the loop's figures with the process's metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
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

    /// One cycle: fetch, sync, report.
    pub async fn cycle(&mut self) {
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
        self.post(statuses).await;
        if let Ok(resources) = &fetched
            && resources.deployment_logs_enabled
        {
            self.logs
                .step(&mut self.executor, &self.hub, resources.deployment_logs_after)
                .await;
        }
        if let Ok(resources) = &fetched
            && resources.metrics_enabled
        {
            self.cluster_metrics.step(&mut self.executor, &self.hub).await;
        }
        // After the statuses: an update never delays the releases.
        if let (Ok(resources), Some(update)) = (&fetched, self.self_update.as_mut()) {
            let running = self.hub.config().ok().and_then(|c| c.agent_version_id);
            update.step(&self.hub, resources.version.as_ref(), running).await;
        }
    }

    async fn sync(&mut self, resources: &Resources) -> Vec<StatusReport> {
        let request = desired::sync_request(resources, self.hub_registry().await);
        match self.executor.sync(request).await {
            Ok(reply) => reply.into_inner().statuses.iter().filter_map(report).collect(),
            Err(status) => self.executor_failed(&status),
        }
    }

    /// The executor's current statuses of the deployments of the last complete Hub response.
    async fn last_statuses(&mut self) -> Vec<StatusReport> {
        match self.executor.statuses(pb::StatusesRequest {}).await {
            Ok(reply) => reply
                .into_inner()
                .statuses
                .iter()
                .filter_map(report)
                .filter(|status| lock(&self.last_known).contains(&status.revision_id))
                .collect(),
            Err(status) => self.executor_failed(&status),
        }
    }

    /// An `error` for every deployment last seen, worded after what went wrong.
    fn executor_failed(&mut self, status: &tonic::Status) -> Vec<StatusReport> {
        self.metrics.executor_failures.inc();
        let message = executor_error_message(status);
        tracing::warn!(code = ?status.code(), error = %message, "agent executor call failed");
        self.errors_for_all(&message)
    }

    /// The Hub registry login (user `-`, the agent's JWT as password), when one is configured.
    async fn hub_registry(&self) -> Option<pb::RegistryLogin> {
        let config = self.hub.config().ok()?;
        let host = config.registry_host.clone()?;
        match self.hub.current_token().await {
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

    fn errors_for_all(&self, message: &str) -> Vec<StatusReport> {
        lock(&self.last_known)
            .iter()
            .map(|revision_id| StatusReport {
                revision_id: *revision_id,
                status_type: StatusType::Error,
                message: message.to_owned(),
            })
            .collect()
    }

    async fn post(&mut self, statuses: Vec<StatusReport>) {
        post_current(&self.hub, &self.book, &statuses, self.post_deadline, &self.metrics).await;
    }

    /// A follower of the executor's status stream that posts changes as they come, sharing
    /// this loop's record of what the Hub has.
    pub fn status_follower(&self, executor: ExecutorClient<Channel>) -> StatusFollower {
        StatusFollower {
            executor,
            hub: self.hub.clone(),
            book: self.book.clone(),
            last_known: self.last_known.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Posts what is due among `statuses` (the full current list) and records the outcome.
async fn post_current(
    hub: &HubClient,
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
    hub: &HubClient,
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
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            format!("agent executor unreachable: {}", status.message())
        }
        code => format!("agent executor refused the request ({code:?}): {}", status.message()),
    }
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
