//! Ships the agent's own log lines, of all three processes, to the Hub's agent-logs endpoint.
//!
//! Each process keeps its lines in a bounded buffer ([`agent_runtime::logging::LogBuffer`]);
//! the poller's own is read directly, the executor's and the updater's through their
//! `AgentLogs` gRPC service. A batch is acknowledged to its process only once the Hub took it
//! (204) or refused it for good (400), so a batch lost on the way is sent again and an
//! accepted one never twice. While the Hub fails (a Hub without its log store answers 500),
//! shipping backs off instead of retrying many times a minute as the Go agent does.

use std::time::Duration;

use agent_runtime::{
    logging::{LogBuffer, service::collect_reply},
    tls::client::ReloadingChannel as Channel,
};
use chrono::{DateTime, Utc};
use distr_agent_proto::v1::{self as pb, agent_logs_client::AgentLogsClient};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::hub::{AgentLogEntry, HubClient, HubError};

/// Lines per `PUT` at most.
pub const BATCH_LINES: u32 = 500;
/// Time between shipping rounds while the Hub takes the lines.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Longest pause after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Where the lines of one process come from.
pub enum Source {
    /// The poller's own buffer.
    Local(LogBuffer),
    /// Another process's `AgentLogs` service.
    Remote {
        component: &'static str,
        client: AgentLogsClient<Channel>,
    },
}

impl Source {
    fn component(&self) -> &str {
        match self {
            Source::Local(buffer) => buffer.component(),
            Source::Remote { component, .. } => component,
        }
    }

    async fn collect(&mut self, after: u64) -> Result<pb::CollectAgentLogsResponse, tonic::Status> {
        match self {
            Source::Local(buffer) => Ok(collect_reply(buffer, after, BATCH_LINES as usize)),
            Source::Remote { client, .. } => Ok(client
                .collect(pb::CollectAgentLogsRequest {
                    after,
                    max_lines: BATCH_LINES,
                })
                .await?
                .into_inner()),
        }
    }

    async fn ack(&mut self, instance: &str, through: u64) -> Result<(), tonic::Status> {
        match self {
            Source::Local(buffer) => {
                buffer.ack(through);
                Ok(())
            }
            Source::Remote { client, .. } => client
                .ack(pb::AckAgentLogsRequest {
                    through,
                    instance: instance.to_owned(),
                })
                .await
                .map(drop),
        }
    }
}

/// Where the lines go: the Hub (a fake in unit tests).
pub trait Sink {
    fn put(&self, entries: &[AgentLogEntry]) -> impl std::future::Future<Output = Result<(), HubError>> + Send;
}

impl Sink for HubClient {
    async fn put(&self, entries: &[AgentLogEntry]) -> Result<(), HubError> {
        self.put_agent_logs(entries).await
    }
}

/// Counters of the shipping, by component.
#[derive(Clone, Default)]
pub struct ShipMetrics {
    /// Lines the Hub accepted.
    pub shipped: Family<Vec<(&'static str, String)>, Counter>,
    /// Lines lost: refused by the Hub (400), or dropped from a full buffer.
    pub dropped: Family<Vec<(&'static str, String)>, Counter>,
}

impl ShipMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agent_log_lines_shipped",
            "Own log lines of the agent's processes the Hub accepted",
            self.shipped.clone(),
        );
        registry.register(
            "agent_log_lines_lost",
            "Own log lines of the agent's processes the Hub refused or a full buffer dropped",
            self.dropped.clone(),
        );
    }

    fn count(family: &Family<Vec<(&'static str, String)>, Counter>, component: &str, lines: usize) {
        family
            .get_or_create(&vec![("component", component.to_owned())])
            .inc_by(lines as u64);
    }
}

/// Per source: the instance its lines came from and the last line shipped.
struct Cursor {
    instance: String,
    after: u64,
}

/// What one round achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Round {
    /// Everything collected was shipped (or there was nothing).
    Done,
    /// The Hub failed; try again after this long at the earliest.
    Failed(Option<Duration>),
}

/// Ships the lines of every source.
pub struct Shipper<S> {
    sink: S,
    sources: Vec<(Source, Cursor)>,
    metrics: ShipMetrics,
    /// Whether the last round failed (a failure is logged once, not every retry).
    failing: bool,
}

impl<S: Sink> Shipper<S> {
    pub fn new(sink: S, sources: Vec<Source>, metrics: ShipMetrics) -> Self {
        Self {
            sink,
            sources: sources
                .into_iter()
                .map(|source| {
                    (
                        source,
                        Cursor {
                            instance: String::new(),
                            after: 0,
                        },
                    )
                })
                .collect(),
            metrics,
            failing: false,
        }
    }

    /// Ships what every source has, a batch at a time.
    pub async fn round(&mut self) -> Round {
        for (source, cursor) in &mut self.sources {
            loop {
                let reply = match source.collect(cursor.after).await {
                    Ok(reply) => reply,
                    // The process is away (restarting, updating): its lines wait in its buffer.
                    Err(status) => {
                        tracing::debug!(component = source.component(), code = ?status.code(), "cannot collect agent logs");
                        break;
                    }
                };
                if reply.instance != cursor.instance {
                    // A restarted process numbers its lines from 1 again.
                    cursor.instance.clone_from(&reply.instance);
                    if cursor.after != 0 {
                        cursor.after = 0;
                        continue;
                    }
                }
                let Some(through) = reply.lines.last().map(|line| line.sequence) else {
                    break;
                };
                let entries = entries(source.component(), &reply);
                match self.sink.put(&entries).await {
                    Ok(()) => {
                        ShipMetrics::count(&self.metrics.shipped, source.component(), reply.lines.len());
                        if reply.dropped > 0 {
                            ShipMetrics::count(&self.metrics.dropped, source.component(), reply.dropped as usize);
                        }
                        if self.failing {
                            self.failing = false;
                            tracing::info!("agent logs reach the Hub again");
                        }
                    }
                    Err(error) if error.status() == Some(reqwest::StatusCode::BAD_REQUEST) => {
                        // Refused for good: drop the batch, or it would block every later line.
                        ShipMetrics::count(&self.metrics.dropped, source.component(), reply.lines.len());
                        tracing::warn!(%error, lines = reply.lines.len(), "the Hub refused a batch of agent logs; dropped");
                    }
                    Err(HubError::Config(error)) => {
                        tracing::debug!(%error, "agent logs are not shipped");
                        return Round::Failed(None);
                    }
                    Err(error) => {
                        if !self.failing {
                            self.failing = true;
                            tracing::warn!(%error, "cannot ship agent logs to the Hub; backing off");
                        }
                        return Round::Failed(retry_after(&error));
                    }
                }
                cursor.after = through;
                if let Err(status) = source.ack(&reply.instance, through).await {
                    // Shipped already: the cursor skips these lines even if the ack was lost.
                    tracing::debug!(component = source.component(), code = ?status.code(), "cannot acknowledge agent logs");
                }
                if reply.lines.len() < BATCH_LINES as usize {
                    break;
                }
            }
        }
        Round::Done
    }

    /// Runs rounds until `shutdown`: every [`INTERVAL`], backing off after failures.
    pub async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = INTERVAL;
        loop {
            let pause = match self.round().await {
                Round::Done => {
                    backoff = INTERVAL;
                    INTERVAL
                }
                Round::Failed(asked) => {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    asked.map_or(backoff, |asked| asked.max(backoff))
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => {
                    // One last round for the lines of the shutdown itself.
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.round()).await;
                    return;
                }
            }
        }
    }
}

fn retry_after(error: &HubError) -> Option<Duration> {
    match error {
        HubError::RateLimited { retry_after, .. } => *retry_after,
        _ => None,
    }
}

/// The Hub's entries for a reply, led by a line saying how many were dropped, if any.
fn entries(component: &str, reply: &pb::CollectAgentLogsResponse) -> Vec<AgentLogEntry> {
    let timestamp = |line: &pb::AgentLogLine| {
        line.timestamp
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
            .unwrap_or_else(Utc::now)
    };
    let mut entries = Vec::with_capacity(reply.lines.len() + 1);
    if reply.dropped > 0 {
        entries.push(AgentLogEntry {
            timestamp: reply.lines.first().map_or_else(Utc::now, timestamp),
            severity: "warn".into(),
            body: format!(
                "{component}: {} log lines were dropped: the buffer was full while the Hub did not take them",
                reply.dropped
            ),
        });
    }
    entries.extend(reply.lines.iter().map(|line| AgentLogEntry {
        timestamp: timestamp(line),
        severity: line.severity.clone(),
        body: line.body.clone(),
    }));
    entries
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A Hub that answers each `PUT` with the next scripted status (then 204) and keeps the
    /// bodies it accepted.
    #[derive(Clone, Default)]
    struct FakeHub {
        script: Arc<Mutex<Vec<u16>>>,
        accepted: Arc<Mutex<Vec<String>>>,
    }

    impl Sink for FakeHub {
        async fn put(&self, entries: &[AgentLogEntry]) -> Result<(), HubError> {
            let status = {
                let mut script = self.script.lock().unwrap();
                if script.is_empty() { 204 } else { script.remove(0) }
            };
            if status == 204 {
                self.accepted
                    .lock()
                    .unwrap()
                    .extend(entries.iter().map(|e| e.body.clone()));
                return Ok(());
            }
            Err(HubError::Status {
                method: reqwest::Method::PUT,
                path: "/logs".into(),
                status: reqwest::StatusCode::from_u16(status).unwrap(),
                excerpt: String::new(),
            })
        }
    }

    fn shipper(hub: &FakeHub, buffer: &LogBuffer) -> Shipper<FakeHub> {
        Shipper::new(hub.clone(), vec![Source::Local(buffer.clone())], ShipMetrics::default())
    }

    #[tokio::test]
    async fn a_failed_batch_arrives_once_after_the_hub_recovers() {
        let hub = FakeHub::default();
        hub.script.lock().unwrap().extend([500, 503]);
        let buffer = LogBuffer::with_capacity("executor", 100);
        buffer.push("info", "one");
        buffer.push("warn", "two");
        let mut shipper = shipper(&hub, &buffer);
        assert_eq!(shipper.round().await, Round::Failed(None));
        assert_eq!(shipper.round().await, Round::Failed(None));
        buffer.push("info", "three");
        assert_eq!(shipper.round().await, Round::Done);
        assert_eq!(shipper.round().await, Round::Done);
        assert_eq!(
            *hub.accepted.lock().unwrap(),
            ["executor: one", "executor: two", "executor: three"]
        );
        assert_eq!(buffer.collect(0, 10).lines, [], "acknowledged lines are released");
    }

    #[tokio::test]
    async fn a_refused_batch_is_dropped_and_the_next_lines_flow() {
        let hub = FakeHub::default();
        hub.script.lock().unwrap().push(400);
        let buffer = LogBuffer::with_capacity("updater", 100);
        buffer.push("info", "bad");
        let metrics = ShipMetrics::default();
        let mut shipper = Shipper::new(hub.clone(), vec![Source::Local(buffer.clone())], metrics.clone());
        assert_eq!(shipper.round().await, Round::Done);
        buffer.push("info", "good");
        assert_eq!(shipper.round().await, Round::Done);
        assert_eq!(*hub.accepted.lock().unwrap(), ["updater: good"]);
        let lost = metrics
            .dropped
            .get_or_create(&vec![("component", "updater".to_owned())])
            .get();
        assert_eq!(lost, 1);
    }

    #[tokio::test]
    async fn dropped_lines_are_announced_before_the_rest() {
        let hub = FakeHub::default();
        let buffer = LogBuffer::with_capacity("poller", 2);
        for n in 1..=5 {
            buffer.push("info", &n.to_string());
        }
        assert_eq!(shipper(&hub, &buffer).round().await, Round::Done);
        assert_eq!(
            *hub.accepted.lock().unwrap(),
            [
                "poller: 3 log lines were dropped: the buffer was full while the Hub did not take them",
                "poller: 4",
                "poller: 5"
            ]
        );
    }

    #[tokio::test]
    async fn large_backlogs_go_in_bounded_batches() {
        let hub = FakeHub::default();
        let buffer = LogBuffer::with_capacity("executor", 2000);
        for n in 0..1200 {
            buffer.push("info", &n.to_string());
        }
        assert_eq!(shipper(&hub, &buffer).round().await, Round::Done);
        assert_eq!(hub.accepted.lock().unwrap().len(), 1200);
    }
}
