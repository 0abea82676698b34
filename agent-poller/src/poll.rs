//! The poller loop: every interval, fetch the desired state from the Hub, hand it to the
//! executor with `Sync`, and post the statuses that are due.
//!
//! Nothing reaches the executor unless the Hub's response was complete and parsed: a failed,
//! malformed or partial response changes nothing in the cluster, and the statuses of the
//! deployments last seen say what went wrong.

use std::time::{Duration, Instant};

use agent_runtime::tls::client::ReloadingChannel as Channel;
use distr_agent_proto::v1::{self as pb, executor_client::ExecutorClient};
use uuid::Uuid;

use crate::{
    desired,
    hub::{HubClient, Resources, StatusReport, StatusType},
    report::StatusBook,
};

/// How often an unchanged status is posted again (the Hub calls a status older than 60 s stale).
pub const STATUS_REFRESH: Duration = Duration::from_secs(30);

pub struct Poller {
    hub: HubClient,
    executor: ExecutorClient<Channel>,
    book: StatusBook,
    /// Revisions of the last complete Hub response.
    last_known: Vec<Uuid>,
}

impl Poller {
    pub fn new(hub: HubClient, executor: ExecutorClient<Channel>, status_refresh: Duration) -> Self {
        Self {
            hub,
            executor,
            book: StatusBook::new(status_refresh),
            last_known: Vec::new(),
        }
    }

    /// One cycle: fetch, sync, report.
    pub async fn cycle(&mut self) {
        let statuses = match self.hub.resources().await {
            Ok(resources) => {
                self.last_known = resources.deployments.iter().map(|d| d.revision_id).collect();
                self.sync(&resources).await
            }
            Err(error) => {
                tracing::warn!(%error, "cannot fetch the desired state from the Hub; the cluster is left as it is");
                let message = format!("cannot fetch deployments from the Hub, nothing changed in the cluster: {error}");
                self.errors_for_all(&message)
            }
        };
        self.post(statuses).await;
    }

    async fn sync(&mut self, resources: &Resources) -> Vec<StatusReport> {
        let request = desired::sync_request(resources, self.hub_registry().await);
        match self.executor.sync(request).await {
            Ok(reply) => reply.into_inner().statuses.iter().filter_map(report).collect(),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "agent executor unreachable");
                self.errors_for_all(&format!("agent executor unreachable: {}", status.message()))
            }
        }
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
        self.last_known
            .iter()
            .map(|revision_id| StatusReport {
                revision_id: *revision_id,
                status_type: StatusType::Error,
                message: message.to_owned(),
            })
            .collect()
    }

    async fn post(&mut self, statuses: Vec<StatusReport>) {
        for status in self.book.due(&statuses, Instant::now()) {
            match self.hub.post_status(&status).await {
                Ok(()) => {
                    tracing::debug!(revision = %status.revision_id, kind = ?status.status_type, "status posted");
                    self.book.accepted(&status, Instant::now());
                }
                Err(error) => tracing::warn!(revision = %status.revision_id, %error, "cannot post status"),
            }
        }
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
