//! In-memory statuses of the desired deployments, keyed by release. Workers write them,
//! `Sync` reads them; `changed_at` moves only when something the Hub sees changes.

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::model::{DeploymentStatus, Status, StatusKind};

/// A release in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReleaseKey {
    pub namespace: String,
    pub release: String,
}

impl ReleaseKey {
    pub fn new(namespace: &str, release: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            release: release.to_owned(),
        }
    }
}

impl fmt::Display for ReleaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.release)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    deployment_id: String,
    revision_id: String,
    status: Status,
}

/// Latest status per release. Cheap to clone (clones share the board).
#[derive(Clone)]
pub struct StatusBoard {
    entries: Arc<Mutex<HashMap<ReleaseKey, Entry>>>,
    /// Bumped whenever a status changes, for those who follow the board.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self {
            entries: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

/// `distr_agent_releases{status}`: the releases on the board by status, counted at each scrape.
#[derive(Debug)]
pub struct ReleasesByStatus(pub StatusBoard);

impl fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusBoard").finish_non_exhaustive()
    }
}

impl Collector for ReleasesByStatus {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut counts = [
            (StatusKind::Progressing, 0_i64),
            (StatusKind::Running, 0),
            (StatusKind::Healthy, 0),
            (StatusKind::Error, 0),
        ];
        for entry in self.0.entries.locked().values() {
            if let Some(count) = counts.iter_mut().find(|(kind, _)| *kind == entry.status.kind) {
                count.1 += 1;
            }
        }
        let mut family = encoder.encode_descriptor(
            "releases",
            "Releases the executor manages, by the status it reports",
            None,
            MetricType::Gauge,
        )?;
        for (kind, count) in counts {
            let labels = [("status", kind.as_str())];
            ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl StatusBoard {
    /// Records an observation at `now`, as [`StatusBoard::set`]; true when it changed the status.
    pub fn report(
        &self,
        key: &ReleaseKey,
        deployment_id: &str,
        revision_id: &str,
        kind: StatusKind,
        message: &str,
        now: DateTime<Utc>,
    ) -> bool {
        self.set(key, deployment_id, revision_id, kind, message, now).changed_at == now
    }

    /// Records an observation for the deployment revision. `changed_at` moves when the kind,
    /// the message or the deployment revision differ from what was recorded.
    pub fn set(
        &self,
        key: &ReleaseKey,
        deployment_id: &str,
        revision_id: &str,
        kind: StatusKind,
        message: &str,
        now: DateTime<Utc>,
    ) -> Status {
        let mut entries = self.entries.locked();
        let previous = entries
            .get(key)
            .filter(|entry| entry.deployment_id == deployment_id && entry.revision_id == revision_id)
            .map(|entry| &entry.status);
        let status = Status::observe(previous, kind, message, now);
        if status.changed_at == now {
            self.changes.send_modify(|generation| *generation += 1);
        }
        entries.insert(
            key.clone(),
            Entry {
                deployment_id: deployment_id.to_owned(),
                revision_id: revision_id.to_owned(),
                status: status.clone(),
            },
        );
        status
    }

    /// The status to report for the deployment revision: the recorded one, or `None` when
    /// nothing was observed for this revision yet. There is no placeholder: after an executor
    /// restart, a release the Hub already knows as `healthy` must not flip to `progressing`
    /// before its worker has looked at it (the Hub keeps the status it has).
    pub fn current(&self, key: &ReleaseKey, deployment_id: &str, revision_id: &str) -> Option<DeploymentStatus> {
        let entries = self.entries.locked();
        entries
            .get(key)
            .filter(|entry| entry.deployment_id == deployment_id && entry.revision_id == revision_id)
            .map(|entry| DeploymentStatus {
                deployment_id: entry.deployment_id.clone(),
                revision_id: entry.revision_id.clone(),
                release_name: key.release.clone(),
                status: entry.status.clone(),
            })
    }

    /// The recorded status of a release, whatever revision it is for.
    pub fn get(&self, key: &ReleaseKey) -> Option<DeploymentStatus> {
        let entries = self.entries.locked();
        entries.get(key).map(|entry| DeploymentStatus {
            deployment_id: entry.deployment_id.clone(),
            revision_id: entry.revision_id.clone(),
            release_name: key.release.clone(),
            status: entry.status.clone(),
        })
    }

    /// Every recorded status.
    pub fn all(&self) -> Vec<DeploymentStatus> {
        let entries = self.entries.locked();
        let mut all: Vec<DeploymentStatus> = entries
            .iter()
            .map(|(key, entry)| DeploymentStatus {
                deployment_id: entry.deployment_id.clone(),
                revision_id: entry.revision_id.clone(),
                release_name: key.release.clone(),
                status: entry.status.clone(),
            })
            .collect();
        all.sort_by(|a, b| a.release_name.cmp(&b.release_name));
        all
    }

    /// Keeps only the releases `keep` says yes to.
    pub fn retain(&self, mut keep: impl FnMut(&ReleaseKey) -> bool) {
        self.entries.locked().retain(|key, _| keep(key));
    }

    /// Forgets a release (it is no longer desired).
    pub fn remove(&self, key: &ReleaseKey) {
        self.entries.locked().remove(key);
    }

    /// Wakes on every status change (the value is a counter of changes).
    pub fn follow(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    #[test]
    fn unchanged_observations_keep_changed_at() {
        let board = StatusBoard::default();
        let key = ReleaseKey::new("apps", "web");
        board.set(
            &key,
            "d",
            "r1",
            StatusKind::Healthy,
            "status check passed. 2 resources healthy",
            at(1),
        );
        let again = board.set(
            &key,
            "d",
            "r1",
            StatusKind::Healthy,
            "status check passed. 2 resources healthy",
            at(2),
        );
        assert_eq!(again.changed_at, at(1));
        let changed = board.set(&key, "d", "r1", StatusKind::Error, "resource status error: x", at(3));
        assert_eq!(changed.changed_at, at(3));
    }

    #[test]
    fn a_new_revision_is_a_change_even_with_the_same_message() {
        let board = StatusBoard::default();
        let key = ReleaseKey::new("apps", "web");
        board.set(&key, "d", "r1", StatusKind::Running, "helm upgrade succeeded", at(1));
        let next = board.set(&key, "d", "r2", StatusKind::Running, "helm upgrade succeeded", at(2));
        assert_eq!(next.changed_at, at(2));
    }

    #[test]
    fn unobserved_revisions_have_no_status() {
        let board = StatusBoard::default();
        let key = ReleaseKey::new("apps", "web");
        // After a restart nothing is known: no placeholder that would flip the Hub's status.
        assert_eq!(board.current(&key, "d", "r1"), None);
        board.set(&key, "d", "r1", StatusKind::Healthy, "ok", at(6));
        assert_eq!(board.current(&key, "d", "r1").unwrap().status.kind, StatusKind::Healthy);
        // The Hub moved on to another revision: the old status must not be reported for it.
        assert_eq!(board.current(&key, "d", "r2"), None);
        assert_eq!(board.current(&key, "other", "r1"), None);
    }
}
