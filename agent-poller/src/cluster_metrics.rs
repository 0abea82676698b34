//! Posts the cluster's metrics to the Hub every [`INTERVAL`] while the Hub wants them
//! (`metricsEnabled`), as the Go agent does. The executor reads them (the poller has no
//! Kubernetes access); a namespace-scoped agent or a cluster without metrics-server has none,
//! which is logged once, not every cycle.

use std::time::{Duration, Instant};

use agent_runtime::tls::client::ReloadingChannel as Channel;
use distr_agent_proto::v1::{self as pb, executor_client::ExecutorClient};
use tonic::Code;

use crate::hub::{AgentMetrics, HubClient};

/// Time between two posts.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// When the next post is due, and whether "unavailable" was said already.
#[derive(Default)]
pub struct MetricsReporting {
    next: Option<Instant>,
    unavailable_said: bool,
}

impl MetricsReporting {
    /// Reads and posts the metrics if a post is due.
    pub async fn step(&mut self, executor: &mut ExecutorClient<Channel>, hub: &HubClient) {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            return;
        }
        self.next = Some(now + INTERVAL);
        let metrics = match executor.cluster_metrics(pb::ClusterMetricsRequest {}).await {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == Code::FailedPrecondition => {
                if !self.unavailable_said {
                    self.unavailable_said = true;
                    tracing::info!(reason = status.message(), "no cluster metrics are posted");
                }
                return;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot read the cluster metrics");
                return;
            }
        };
        if self.unavailable_said {
            self.unavailable_said = false;
            tracing::info!("cluster metrics are available again");
        }
        let body = AgentMetrics {
            cpu_cores_millis: metrics.cpu_cores_millis,
            cpu_usage: metrics.cpu_usage,
            memory_bytes: metrics.memory_bytes,
            memory_usage: metrics.memory_usage,
            disk_metrics: None,
        };
        if let Err(error) = hub.post_metrics(&body).await {
            tracing::warn!(%error, "cannot post the cluster metrics");
        }
    }
}
