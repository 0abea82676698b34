//! What the executor knows of the cluster from watches, so that a release in steady state
//! costs no API request: each pass compares what the watches say with what the worker saw
//! last, and reads the API only when something moved.
//!
//! - [`secrets`]: per namespace, the metadata of the tracking Secrets and of Helm's release
//!   Secrets (names, labels, resource versions; never the payloads).
//! - [`objects`]: per kind and namespace, the health verdict of every object, computed when
//!   a watch event arrives (the objects themselves are not kept), shared by every release
//!   whose manifest has objects of that kind, started on first use and stopped once unused.
//!
//! - [`tracking`], [`pull_secret`]: the Secrets the agent itself keeps per release;
//!   [`kube_util`]: timeouts and messages of API calls.
//!
//! Every change that matters is announced on [`Cluster::changes`], so the worker of the
//! affected release (and only that one) looks again at once.

pub mod kube_util;
pub mod objects;
pub mod pull_secret;
pub mod secrets;
pub mod tracking;

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A change a worker may care about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A tracking or Helm release Secret of the release changed.
    Release { namespace: String, release: String },
    /// The health verdict of an object changed.
    Object {
        namespace: String,
        kind: String,
        name: String,
    },
}

/// Watch-fed state shared by the reconciler and its workers. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    client: kube::Client,
    changes: broadcast::Sender<Change>,
    /// Per namespace: its Secret index and what stops its watches.
    secrets: Mutex<HashMap<String, (secrets::SecretIndex, CancellationToken)>>,
    objects: objects::ObjectWatches,
    /// Watch streams that failed and were restarted (`distr_agent_watch_restarts_total`).
    restarts: Counter,
    shutdown: CancellationToken,
}

impl Cluster {
    pub fn new(client: kube::Client, shutdown: CancellationToken) -> Self {
        let (changes, _) = broadcast::channel(1024);
        let restarts = Counter::default();
        Self {
            inner: Arc::new(ClusterInner {
                objects: objects::ObjectWatches::new(
                    client.clone(),
                    changes.clone(),
                    restarts.clone(),
                    shutdown.clone(),
                ),
                client,
                changes,
                secrets: Mutex::default(),
                restarts,
                shutdown,
            }),
        }
    }

    /// Announcements of changes, from now on.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// The Secret index of `namespace`, started on first use.
    pub fn secrets(&self, namespace: &str) -> secrets::SecretIndex {
        let mut indexes = self.inner.secrets.locked();
        indexes
            .entry(namespace.to_owned())
            .or_insert_with(|| {
                let stop = self.inner.shutdown.child_token();
                let index = secrets::SecretIndex::start(
                    self.inner.client.clone(),
                    namespace,
                    self.inner.changes.clone(),
                    self.inner.restarts.clone(),
                    stop.clone(),
                );
                (index, stop)
            })
            .0
            .clone()
    }

    /// Stops the per-namespace watches (Secrets, Pods) of every namespace not in `needed`:
    /// no release there needs them any more. They start again on next use.
    pub fn retain_namespaces(&self, needed: &std::collections::HashSet<String>) {
        self.inner.secrets.locked().retain(|namespace, (_, stop)| {
            let keep = needed.contains(namespace);
            if !keep {
                tracing::debug!(%namespace, "stopping the Secret watches of a namespace no release needs");
                stop.cancel();
            }
            keep
        });
        self.inner.objects.retain_pod_watches(needed);
    }

    /// Namespaces whose Secrets are watched now.
    pub fn watched_namespaces(&self) -> Vec<String> {
        let mut namespaces: Vec<String> = self.inner.secrets.locked().keys().cloned().collect();
        namespaces.sort();
        namespaces
    }

    /// The object watches (health verdicts).
    pub fn objects(&self) -> &objects::ObjectWatches {
        &self.inner.objects
    }

    /// Registers `distr_agent_watch_restarts_total` and the watches in use.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "watch_restarts",
            "Watch streams of the executor that failed and were started again",
            self.inner.restarts.clone(),
        );
        self.inner.objects.register_metrics(registry);
    }
}
