//! Ships deployment logs (the pod log lines the executor collects) to the Hub's logs endpoint,
//! when the Hub turns them on (`deploymentLogsEnabled`).
//!
//! A batch is acknowledged to the executor (which then moves each release's watermark) only
//! once the Hub accepted it (204) or refused it for good (400): a batch lost on the way is
//! collected again, an accepted one never twice. A 429 or a 5xx pauses shipping for a while.

use std::time::{Duration, Instant};

use agent_runtime::tls::client::ReloadingChannel as Channel;
use chrono::{DateTime, Utc};
use distr_agent_proto::v1::{self as pb, executor_client::ExecutorClient};
use prometheus_client::metrics::counter::Counter;
use uuid::Uuid;

use crate::hub::{HubClient, HubError, LogEntry};

/// Lines per batch (one `PUT`).
pub const BATCH_LINES: u32 = 1000;
/// First pause after the Hub failed a batch; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(10);
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// Counters of deployment log shipping.
#[derive(Clone, Default)]
pub struct LogMetrics {
    pub shipped: Counter,
    /// Refused by the Hub for good (400).
    pub dropped: Counter,
}

/// Shipping state kept across cycles.
#[derive(Default)]
pub struct LogShipping {
    paused_until: Option<Instant>,
    pause: Option<Duration>,
    pub metrics: LogMetrics,
}

impl LogShipping {
    /// Collects one batch from the executor and ships it, if the Hub wants logs and no pause
    /// is under way.
    pub async fn step(
        &mut self,
        executor: &mut ExecutorClient<Channel>,
        hub: &HubClient,
        logs_after: Option<DateTime<Utc>>,
    ) {
        if self.paused_until.is_some_and(|until| Instant::now() < until) {
            return;
        }
        let request = pb::CollectLogsRequest {
            max_lines: BATCH_LINES,
            logs_after: logs_after.map(|t| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or_default(),
            }),
        };
        let batch = match executor.collect_logs(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "cannot collect deployment logs from the executor");
                return;
            }
        };
        let entries: Vec<LogEntry> = batch.records.iter().filter_map(entry).collect();
        if !entries.is_empty() {
            match hub.put_logs(&entries).await {
                Ok(()) => {
                    self.metrics.shipped.inc_by(entries.len() as u64);
                    self.pause = None;
                }
                Err(error) if error.status() == Some(reqwest::StatusCode::BAD_REQUEST) => {
                    // Refused for good: acknowledged anyway, or it would block every later line.
                    self.metrics.dropped.inc_by(entries.len() as u64);
                    tracing::warn!(%error, lines = entries.len(), "the Hub refused a batch of deployment logs; dropped");
                }
                Err(error) => {
                    self.back_off(&error);
                    return;
                }
            }
        }
        if batch.cursors.is_empty() {
            return;
        }
        if let Err(status) = executor.ack_logs(pb::AckLogsRequest { cursors: batch.cursors }).await {
            // The lines come again with the next collection: the Hub may see them twice.
            tracing::warn!(code = ?status.code(), message = status.message(), "cannot acknowledge deployment logs to the executor");
        }
    }

    fn back_off(&mut self, error: &HubError) {
        let pause = self.pause.map_or(FIRST_PAUSE, |pause| (pause * 2).min(MAX_PAUSE));
        let asked = match error {
            HubError::RateLimited { retry_after, .. } => retry_after.unwrap_or_default(),
            _ => Duration::ZERO,
        };
        let pause = pause.max(asked);
        self.pause = Some(pause);
        self.paused_until = Some(Instant::now() + pause);
        tracing::warn!(%error, pause_seconds = pause.as_secs(), "cannot ship deployment logs to the Hub; pausing");
    }
}

/// The Hub's entry for a record; a record with ids that are not UUIDs is skipped.
fn entry(record: &pb::LogRecord) -> Option<LogEntry> {
    let timestamp = record
        .timestamp
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))?;
    Some(LogEntry {
        id: Uuid::new_v4(),
        deployment_id: Uuid::parse_str(&record.deployment_id).ok()?,
        deployment_revision_id: Uuid::parse_str(&record.deployment_revision_id).ok()?,
        resource: record.resource.clone(),
        timestamp,
        severity: record.severity.clone(),
        body: record.body.clone(),
    })
}
