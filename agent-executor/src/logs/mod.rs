//! Deployment logs: the log lines of the pods of each release whose deployment has logs
//! enabled, collected for the poller to ship to the Hub.
//!
//! Each release has a watermark: every line at or before it was shipped. It lives in the
//! release's tracking Secret (`lastLogTimestamp`, written with the Go agent's field manager)
//! and moves only when the poller acknowledges a batch the Hub accepted ([`LogCollector::ack`]),
//! so a lost batch is collected again and an accepted one never twice.
//!
//! A collection reads each container's log since the watermark (whole seconds: the filter at
//! the exact watermark is in [`lines::take`]), up to a byte bound per container and a line
//! budget per release, so a pod that floods its log costs bounded memory and never starves
//! the other releases: its lines come a budget at a time. A release that falls further behind
//! than [`MAX_LAG`] skips ahead and says which span of lines it skipped.

pub mod lines;

use std::{collections::HashMap, sync::Mutex, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::{ListParams, LogParams, Patch, PatchParams},
};

use crate::{
    cluster::tracking::{self, LAST_LOG_TIMESTAMP_KEY},
    helm::storage::HelmStorage,
    release::status_board::ReleaseKey,
    resources::manifest,
};
use lines::{Line, PodSelector, Workload};

/// Bytes read from one container's log per collection at most.
pub const CONTAINER_BYTES: i64 = 1024 * 1024;
/// Lines newer than this are left for the next collection: a line the kubelet is still
/// writing when the pods are read must not fall behind the watermark.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How far behind a release's logs may fall before the collection skips ahead.
pub const MAX_LAG: Duration = Duration::from_secs(600);
/// Releases collected at once.
const CONCURRENCY: usize = 4;
/// How old the written watermark of a release without new lines may get before it is
/// written again (a restart then reads at most this much log again, and finds no new line).
pub const IDLE_WRITE: Duration = Duration::from_secs(600);
/// The field manager of the watermark, as the Go agent writes it.
pub const FIELD_MANAGER: &str = "distr-agent-logs";

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

/// Collects pod logs and keeps the watermarks.
pub struct LogCollector {
    client: kube::Client,
    /// Watermarks in effect (read from the tracking Secrets, then moved by acks).
    watermarks: Mutex<HashMap<ReleaseKey, DateTime<Utc>>>,
    /// Watermarks as last written to (or read from) the tracking Secrets.
    written: Mutex<HashMap<ReleaseKey, DateTime<Utc>>>,
}

/// An acknowledged cursor: the Hub has every line of the release at or before `time`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub key: ReleaseKey,
    pub time: DateTime<Utc>,
    /// No line of the release was in the batch.
    pub empty: bool,
}

impl LogCollector {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            watermarks: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// The lines of `targets` after their watermarks (and never before `after`), at most about
    /// `max_lines` in all. A release that cannot be read is skipped (and logged): the others
    /// still come.
    pub async fn collect(&self, targets: Vec<LogTarget>, after: Option<DateTime<Utc>>, max_lines: usize) -> Collection {
        let now = Utc::now();
        let cutoff = now - chrono::Duration::from_std(SETTLE).unwrap_or_default();
        let budget = (max_lines / targets.len().max(1)).max(1);
        let results: Vec<_> = futures::stream::iter(targets)
            .map(|target| async move {
                let result = self.collect_release(&target, after, now, cutoff, budget).await;
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

    async fn collect_release(
        &self,
        target: &LogTarget,
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        cutoff: DateTime<Utc>,
        budget: usize,
    ) -> Result<(Vec<Record>, Option<DateTime<Utc>>), String> {
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
        }
        let Some(release) = HelmStorage::new(self.client.clone(), &key.namespace)
            .latest(&key.release)
            .await
            .map_err(|error| error.to_string())?
        else {
            return Ok((records, None));
        };
        let objects = manifest::parse(&release.manifest).map_err(|error| error.to_string())?;
        let mut lines = Vec::new();
        let mut cutoff = cutoff;
        for workload in lines::workloads(&objects) {
            let (found, complete_until) = self.workload_lines(&key.namespace, &workload, watermark, now).await?;
            lines.extend(found);
            if let Some(until) = complete_until {
                cutoff = cutoff.min(until);
            }
        }
        let taken = lines::take(lines, watermark, cutoff, budget);
        records.extend(
            taken
                .lines
                .into_iter()
                .map(|line| record(line.timestamp, line.resource, "info", line.body)),
        );
        Ok((records, taken.cursor))
    }

    /// The lines of a workload's pods after `watermark` (whole seconds), and, when a
    /// container's log was cut at the byte bound, the time up to which what was read is
    /// complete.
    async fn workload_lines(
        &self,
        namespace: &str,
        workload: &Workload,
        watermark: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<Line>, Option<DateTime<Utc>>), String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let found: Vec<Pod> = match &workload.pods {
            PodSelector::Labels(selector) => {
                pods.list(&ListParams::default().labels(selector))
                    .await
                    .map_err(|error| format!("cannot list the pods of {}: {error}", workload.resource))?
                    .items
            }
            PodSelector::Name(name) => pods.get_opt(name).await.ok().flatten().into_iter().collect(),
        };
        let since_seconds = (watermark > DateTime::UNIX_EPOCH).then(|| (now - watermark).num_seconds().max(0) + 1);
        let mut lines = Vec::new();
        let mut complete_until: Option<DateTime<Utc>> = None;
        for pod in found {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let containers = pod.spec.map(|spec| spec.containers).unwrap_or_default();
            for container in containers.into_iter().map(|c| c.name) {
                let params = LogParams {
                    container: Some(container.clone()),
                    timestamps: true,
                    since_seconds,
                    limit_bytes: Some(CONTAINER_BYTES),
                    ..LogParams::default()
                };
                let text = match pods.logs(&name, &params).await {
                    Ok(text) => text,
                    // Not started yet, or gone: nothing to read from it this time.
                    Err(error) => {
                        tracing::debug!(pod = %name, %container, %error, "no log to read");
                        continue;
                    }
                };
                let mut read = lines::parse_lines(&text, &workload.resource);
                if text.len() as i64 >= CONTAINER_BYTES
                    && let Some(last) = read.last().map(|line| line.timestamp)
                {
                    // The rest of this container's log waits for the next collection. A read
                    // starts at a whole second: when the byte bound fills up before passing the
                    // watermark, the rest of that second cannot be read at all, so it is
                    // skipped, and a line says so.
                    let until = if last > watermark {
                        last
                    } else {
                        let next_second = lines::next_second(watermark);
                        read.push(lines::Line {
                            timestamp: next_second - chrono::Duration::nanoseconds(1),
                            resource: workload.resource.clone(),
                            body: format!(
                                "[distr agent] lines of pod {name} container {container} past the first {} KiB logged within one second were skipped",
                                CONTAINER_BYTES / 1024
                            ),
                        });
                        next_second
                    };
                    complete_until = Some(complete_until.map_or(until, |t| t.min(until)));
                }
                lines.extend(read);
            }
        }
        Ok((lines, complete_until))
    }

    /// The release's watermark: remembered, or read from its tracking Secret.
    async fn watermark(&self, key: &ReleaseKey) -> Result<DateTime<Utc>, String> {
        if let Some(known) = self.watermarks().get(key) {
            return Ok(*known);
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        let secret = secrets
            .get_opt(&tracking::secret_name(&key.release))
            .await
            .map_err(|error| format!("cannot read the tracking Secret of {}: {error}", key.release))?;
        let stored = secret
            .and_then(|secret| secret.data)
            .and_then(|data| data.get(LAST_LOG_TIMESTAMP_KEY).cloned())
            .and_then(|bytes| String::from_utf8(bytes.0).ok())
            .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
            .map_or(DateTime::UNIX_EPOCH, |time| time.with_timezone(&Utc));
        self.watermarks().insert(key.clone(), stored);
        lock(&self.written).insert(key.clone(), stored);
        Ok(stored)
    }

    /// Moves the watermarks to the cursors of a batch the Hub accepted, in memory and in the
    /// tracking Secrets (a release with no line in the batch is written only every
    /// [`IDLE_WRITE`]). A watermark never moves back.
    pub async fn ack(&self, acks: Vec<Ack>) -> Result<(), String> {
        let mut failures = Vec::new();
        for Ack { key, time, empty } in acks {
            if self.watermarks().get(&key).is_some_and(|known| *known >= time) {
                continue;
            }
            self.watermarks().insert(key.clone(), time);
            let written = lock(&self.written).get(&key).copied().unwrap_or(DateTime::UNIX_EPOCH);
            let idle_write = chrono::Duration::from_std(IDLE_WRITE).unwrap_or_default();
            if empty && time - written < idle_write {
                continue;
            }
            let text = time.to_rfc3339_opts(SecondsFormat::Nanos, true);
            let patch =
                serde_json::json!({"data": {LAST_LOG_TIMESTAMP_KEY: k8s_openapi::ByteString(text.into_bytes())}});
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
            // A merge patch: a tracking Secret deleted meanwhile is not recreated with only this.
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            match secrets
                .patch(&tracking::secret_name(&key.release), &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    lock(&self.written).insert(key, time);
                }
                Err(error) => failures.push(format!("{}: {error}", key.release)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!("cannot save the log watermark of {}", failures.join("; ")))
        }
    }

    fn watermarks(&self) -> std::sync::MutexGuard<'_, HashMap<ReleaseKey, DateTime<Utc>>> {
        lock(&self.watermarks)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
