//! Deployment logs: the log lines of the pods of each release whose deployment has logs
//! enabled, collected for the poller to ship to the Hub.
//!
//! Each release has a watermark: every line at or before it was shipped. It lives in the
//! release's tracking Secret (`lastLogTimestamp`, written with the Go agent's field manager)
//! and moves only when the poller acknowledges a batch the Hub accepted ([`LogCollector::ack`]),
//! so a lost batch is collected again and an accepted one never twice.
//!
//! A collection is bounded three ways, so a pod that floods its log (or fifty of them) costs
//! bounded memory and time and never starves the other releases:
//!
//! - **bytes**: each release gets an equal share of [`BATCH_BYTES`], split among its containers
//!   before anything is read. A container's log streams in ([`read`]); lines already shipped
//!   are dropped as they arrive and the read stops when the container's share is full. The
//!   kubelet sends at most [`CONTAINER_BYTES`] of one container per read.
//! - **lines**: at most about `max_lines` in all, taken per release between two instants
//!   ([`lines::take`]).
//! - **time**: everything read by the collection's deadline is returned; a read still under
//!   way then counts as cut short there.
//!
//! A container read that stops early (share full, byte limit, deadline, failure) caps the
//! release's cursor just before the instant where it stopped; one that fails before it
//! yields anything holds the release's cursor at its watermark, so no line is skipped
//! because a read failed (failures are counted in `distr_agent_log_read_failures_total`).
//! A release that falls further behind than [`MAX_LAG`] skips ahead and says which span of
//! lines it skipped. The reads start at the watermark's whole second (the API's `sinceTime`
//! has no fraction); the exact filter is applied to each line.

pub mod lines;
pub mod read;
pub mod source;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_runtime::sync::MutexExt as _;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt as _;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::release::status_board::ReleaseKey;
use lines::{Line, Workload};
pub use source::{FIELD_MANAGER, KubeSource, LogSource, SourceError};
use source::{LogRequest, PodContainers};

/// Bytes the kubelet sends of one container's log per read at most (`limitBytes`).
pub const CONTAINER_BYTES: i64 = 1024 * 1024;
/// Bytes of lines one collection keeps at most, shared equally by its releases and, within a
/// release, by its containers (but at least [`MIN_CONTAINER_SHARE`] each).
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The least a container may keep per collection, however many share the batch.
pub const MIN_CONTAINER_SHARE: usize = 16 * 1024;
/// Lines newer than this are left for the next collection: a line the kubelet is still
/// writing when the pods are read must not fall behind the watermark.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How far behind a release's logs may fall before the collection skips ahead.
pub const MAX_LAG: Duration = Duration::from_secs(600);
/// Releases collected at once.
const CONCURRENCY: usize = 4;
/// Containers of one release read at once.
const CONTAINER_CONCURRENCY: usize = 4;
/// How old the written watermark of a release without new lines may get before it is
/// written again (a restart then reads at most this much log again, and finds no new line).
pub const IDLE_WRITE: Duration = Duration::from_secs(600);

/// A release whose deployment has logs enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogTarget {
    pub key: ReleaseKey,
    pub deployment_id: String,
    pub revision_id: String,
}

/// One line for the Hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub deployment_id: String,
    pub revision_id: String,
    pub resource: String,
    pub timestamp: DateTime<Utc>,
    pub severity: &'static str,
    pub body: String,
}

/// A collection: the records, and per release where the next one starts once they shipped.
#[derive(Debug, Default)]
pub struct Collection {
    pub records: Vec<Record>,
    /// To hand back through [`LogCollector::ack`] once the records are shipped.
    pub cursors: Vec<Ack>,
}

/// An acknowledged cursor: the Hub has every line of the release at or before `time`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub key: ReleaseKey,
    pub time: DateTime<Utc>,
    /// No line of the release was in the batch.
    pub empty: bool,
}

/// Watermarks that could not be saved.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct AckError(pub Vec<SourceError>);

/// Collects pod logs and keeps the watermarks.
pub struct LogCollector<S = KubeSource> {
    source: S,
    /// Watermarks in effect (read from the tracking Secrets, then moved by acks).
    watermarks: Mutex<HashMap<ReleaseKey, DateTime<Utc>>>,
    /// Watermarks as last written to (or read from) the tracking Secrets.
    written: Mutex<HashMap<ReleaseKey, DateTime<Utc>>>,
    /// Container reads that failed (`distr_agent_log_read_failures_total`).
    read_failures: Counter,
}

/// The part of a collection one release gets.
#[derive(Clone, Copy)]
struct Share {
    lines: usize,
    bytes: usize,
}

impl<S: LogSource> LogCollector<S> {
    pub fn new(source: S) -> Self {
        Self {
            source,
            watermarks: Mutex::default(),
            written: Mutex::default(),
            read_failures: Counter::default(),
        }
    }

    /// Registers `distr_agent_log_read_failures_total`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "log_read_failures",
            "Container log reads that failed; the release's log watermark waited for them",
            self.read_failures.clone(),
        );
    }

    /// The lines of `targets` after their watermarks (and never before `after`), at most about
    /// `max_lines` in all, read until `deadline`. A release that cannot be read is skipped
    /// (and logged): the others still come. What the collector keeps of releases that are no
    /// longer targets is dropped.
    pub async fn collect(
        &self,
        targets: Vec<LogTarget>,
        after: Option<DateTime<Utc>>,
        max_lines: usize,
        deadline: Instant,
    ) -> Collection {
        self.forget_all_but(&targets);
        let now = Utc::now();
        let cutoff = now - chrono::Duration::from_std(SETTLE).unwrap_or_default();
        let share = Share {
            lines: (max_lines / targets.len().max(1)).max(1),
            bytes: BATCH_BYTES / targets.len().max(1),
        };
        let results: Vec<_> = futures::stream::iter(targets)
            .map(|target| async move {
                let result = self.collect_release(&target, after, now, cutoff, share, deadline).await;
                (target, result)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut collection = Collection::default();
        for (target, result) in results {
            match result {
                Ok((records, cursor)) => {
                    if let Some(time) = cursor {
                        collection.cursors.push(Ack {
                            key: target.key,
                            time,
                            empty: records.is_empty(),
                        });
                    }
                    collection.records.extend(records);
                }
                Err(error) => {
                    tracing::warn!(release = %target.key, %error, "cannot collect the release's pod logs");
                }
            }
        }
        collection.records.sort_by_key(|record| record.timestamp);
        collection
    }

    /// Drops the watermarks (and the source's memory) of releases other than `targets`.
    fn forget_all_but(&self, targets: &[LogTarget]) {
        let keep: HashSet<&ReleaseKey> = targets.iter().map(|target| &target.key).collect();
        self.watermarks.locked().retain(|key, _| keep.contains(key));
        self.written.locked().retain(|key, _| keep.contains(key));
        self.source.retain(&|key| keep.contains(key));
    }

    async fn collect_release(
        &self,
        target: &LogTarget,
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        share: Share,
        deadline: Instant,
    ) -> Result<(Vec<Record>, Option<DateTime<Utc>>), SourceError> {
        let key = &target.key;
        let mut watermark = self.watermark(key).await?.max(after.unwrap_or(DateTime::UNIX_EPOCH));
        let record = |timestamp, resource: String, severity, body| Record {
            deployment_id: target.deployment_id.clone(),
            revision_id: target.revision_id.clone(),
            resource,
            timestamp,
            severity,
            body,
        };
        let mut records = Vec::new();
        let lag_limit = now - chrono::Duration::from_std(MAX_LAG).unwrap_or_default();
        let mut skipped_to = None;
        if watermark > DateTime::UNIX_EPOCH && watermark < lag_limit {
            let resume = now - chrono::Duration::from_std(MAX_LAG / 10).unwrap_or_default();
            records.push(record(
                resume,
                "agent".to_owned(),
                "warn",
                format!(
                    "log lines of release {} from {} to {} were skipped: its pods log faster than the agent ships",
                    key.release,
                    watermark.to_rfc3339_opts(SecondsFormat::Secs, true),
                    resume.to_rfc3339_opts(SecondsFormat::Secs, true)
                ),
            ));
            watermark = resume;
            skipped_to = Some(resume);
        }
        let Some(workloads) = self.source.workloads(key).await? else {
            return Ok((records, None));
        };
        let (lines, complete_until) = self
            .release_lines(&key.namespace, &workloads, watermark, cutoff, share, deadline)
            .await?;
        let taken = lines::take(lines, watermark, cutoff.min(complete_until), share.lines);
        records.extend(
            taken
                .lines
                .into_iter()
                .map(|line| record(line.timestamp, line.resource.to_string(), "info", line.body)),
        );
        // A skip ahead stands even when nothing after it could be read yet.
        Ok((records, taken.cursor.max(skipped_to)))
    }

    /// The lines after `watermark` of every container of the workloads' pods, within `bytes`
    /// and `deadline`, and the instant up to which they are complete (`cutoff` when every
    /// read was).
    async fn release_lines(
        &self,
        namespace: &str,
        workloads: &[Workload],
        watermark: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        share: Share,
        deadline: Instant,
    ) -> Result<(Vec<Line>, DateTime<Utc>), SourceError> {
        let mut containers = Vec::new();
        for workload in workloads {
            let pods = match tokio::time::timeout_at(deadline, self.source.pods(namespace, workload)).await {
                Ok(pods) => pods?,
                // Out of time: nothing of the release is known to be complete.
                Err(_) => return Ok((Vec::new(), watermark)),
            };
            let resource: Arc<str> = Arc::from(workload.resource.as_str());
            for PodContainers { pod, containers: names } in pods {
                containers.extend(
                    names
                        .into_iter()
                        .map(|container| (resource.clone(), pod.clone(), container)),
                );
            }
        }
        let keep_bytes = (share.bytes / containers.len().max(1)).max(MIN_CONTAINER_SHARE);
        let reads: Vec<_> = futures::stream::iter(containers)
            .map(|(resource, pod, container)| async move {
                let request = LogRequest {
                    namespace: namespace.to_owned(),
                    pod,
                    container,
                    since: (watermark > DateTime::UNIX_EPOCH).then_some(watermark),
                    limit_bytes: CONTAINER_BYTES,
                };
                let bounds = read::Bounds {
                    watermark,
                    cutoff,
                    keep_bytes,
                    keep_lines: share.lines,
                    limit_bytes: CONTAINER_BYTES.unsigned_abs(),
                    deadline,
                };
                let opened = tokio::time::timeout_at(deadline, self.source.open(&request)).await;
                let read = match opened {
                    Ok(Ok(Some(stream))) => Ok(Some(read::read(stream, &resource, bounds).await)),
                    // The pod is gone, and its log with it.
                    Ok(Ok(None)) => Ok(None),
                    Ok(Err(error)) => Err(Some(error)),
                    Err(_) => Err(None),
                };
                (request, read)
            })
            .buffer_unordered(CONTAINER_CONCURRENCY)
            .collect()
            .await;
        let mut lines = Vec::new();
        let mut complete_until = cutoff;
        for (request, read) in reads {
            match read {
                Ok(None) => {}
                Ok(Some(read)) => {
                    if let Some(error) = &read.error
                        && error.kind() != std::io::ErrorKind::TimedOut
                    {
                        self.read_failures.inc();
                        tracing::warn!(pod = %request.pod, container = %request.container, %error, "a container's log read failed part-way; the rest comes next time");
                    }
                    if let read::End::CompleteUntil(until) = read.end {
                        complete_until = complete_until.min(until);
                    }
                    lines.extend(read.lines);
                }
                Err(error) => {
                    if let Some(error) = error {
                        self.read_failures.inc();
                        tracing::warn!(%error, "a container's log could not be read; the release's logs wait for it");
                    }
                    complete_until = complete_until.min(watermark);
                }
            }
        }
        Ok((lines, complete_until))
    }

    /// The release's watermark: remembered, or read from its tracking Secret.
    async fn watermark(&self, key: &ReleaseKey) -> Result<DateTime<Utc>, SourceError> {
        if let Some(known) = self.watermarks.locked().get(key) {
            return Ok(*known);
        }
        let stored = self.source.stored_watermark(key).await?.unwrap_or(DateTime::UNIX_EPOCH);
        self.watermarks.locked().insert(key.clone(), stored);
        self.written.locked().insert(key.clone(), stored);
        Ok(stored)
    }

    /// Moves the watermarks to the cursors of a batch the Hub accepted, in memory and in the
    /// tracking Secrets (a release with no line in the batch is written only every
    /// [`IDLE_WRITE`]). A watermark never moves back.
    pub async fn ack(&self, acks: Vec<Ack>) -> Result<(), AckError> {
        let mut failures = Vec::new();
        for Ack { key, time, empty } in acks {
            if self.watermarks.locked().get(&key).is_some_and(|known| *known >= time) {
                continue;
            }
            self.watermarks.locked().insert(key.clone(), time);
            let written = self.written.locked().get(&key).copied().unwrap_or(DateTime::UNIX_EPOCH);
            let idle_write = chrono::Duration::from_std(IDLE_WRITE).unwrap_or_default();
            if empty && time - written < idle_write {
                continue;
            }
            match self.source.save_watermark(&key, time).await {
                Ok(()) => {
                    self.written.locked().insert(key, time);
                }
                Err(error) => failures.push(error),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(AckError(failures))
        }
    }
}

#[cfg(test)]
mod tests;
