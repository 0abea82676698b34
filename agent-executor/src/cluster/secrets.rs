//! The metadata of a namespace's tracking Secrets and Helm release Secrets, from two
//! metadata-only watches (no payload is ever held here). A worker takes a release's
//! [`SecretIndex::fingerprint`] after a full pass; while it has not moved, nothing of the
//! release changed in the cluster and the worker need not read the Secrets again.

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    hash::{Hash as _, Hasher as _},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, watcher},
    },
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::Change;
use crate::cluster::tracking::DEPLOYMENT_LABEL;

/// Labels Helm puts on its release Secrets.
const HELM_OWNER: &str = "owner=helm";
const HELM_NAME_LABEL: &str = "name";

/// What the watches hold of one Secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Meta {
    /// The release it belongs to (its deployment label or Helm's `name` label).
    release: String,
    resource_version: String,
}

#[derive(Default)]
struct Store {
    secrets: BTreeMap<String, Meta>,
    synced: bool,
}

/// The Secret metadata of one namespace. Cheap to clone.
#[derive(Clone)]
pub struct SecretIndex {
    tracking: Arc<Mutex<Store>>,
    helm: Arc<Mutex<Store>>,
    /// Per watch: whether it has listed the namespace once.
    listed: [watch::Receiver<bool>; 2],
}

impl SecretIndex {
    /// Starts both watches of `namespace`; they run until `shutdown`.
    pub fn start(
        client: kube::Client,
        namespace: &str,
        changes: broadcast::Sender<Change>,
        restarts: Counter,
        shutdown: CancellationToken,
    ) -> Self {
        let (tracking_listed, tracking_listed_rx) = watch::channel(false);
        let (helm_listed, helm_listed_rx) = watch::channel(false);
        let index = Self {
            tracking: Arc::default(),
            helm: Arc::default(),
            listed: [tracking_listed_rx, helm_listed_rx],
        };
        // An API of `PartialObjectMeta` lists and watches metadata only.
        let api: Api<PartialObjectMeta<Secret>> = Api::namespaced(client, namespace);
        let watches = [
            (
                index.tracking.clone(),
                DEPLOYMENT_LABEL.to_owned(),
                DEPLOYMENT_LABEL,
                tracking_listed,
            ),
            (index.helm.clone(), HELM_OWNER.to_owned(), HELM_NAME_LABEL, helm_listed),
        ];
        for (store, selector, release_label, listed) in watches {
            let stream = watcher(api.clone(), watcher::Config::default().labels(&selector)).default_backoff();
            let feed = Feed {
                store,
                namespace: namespace.to_owned(),
                release_label,
                listed,
                changes: changes.clone(),
                restarts: restarts.clone(),
            };
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = feed.run(stream) => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
        index
    }

    /// Waits until both watches have listed the namespace once (never returns if they cannot).
    pub async fn listed(&self) {
        for listed in &self.listed {
            let mut listed = listed.clone();
            // An error means the watch task ended (shutdown): nothing to wait for.
            let _ = listed.wait_for(|listed| *listed).await;
        }
    }

    /// A digest of the release's tracking and Helm Secrets (names and resource versions);
    /// `None` until both watches have listed the namespace once.
    pub fn fingerprint(&self, release: &str) -> Option<u64> {
        let mut hasher = DefaultHasher::new();
        for store in [&self.tracking, &self.helm] {
            let store = store.locked();
            if !store.synced {
                return None;
            }
            for (name, meta) in store.secrets.iter().filter(|(_, meta)| meta.release == release) {
                name.hash(&mut hasher);
                meta.resource_version.hash(&mut hasher);
            }
        }
        Some(hasher.finish())
    }

    /// A digest of the release's Helm release Secrets alone (names and resource versions):
    /// it moves when Helm writes a revision, not when the agent writes its tracking Secret.
    /// `None` until the Helm watch has listed the namespace once.
    pub fn helm_fingerprint(&self, release: &str) -> Option<u64> {
        let store = self.helm.locked();
        store.synced.then(|| {
            let mut hasher = DefaultHasher::new();
            for (name, meta) in store.secrets.iter().filter(|(_, meta)| meta.release == release) {
                name.hash(&mut hasher);
                meta.resource_version.hash(&mut hasher);
            }
            hasher.finish()
        })
    }

    /// A digest of every tracking Secret of the namespace (which releases the agent tracks);
    /// `None` until the watch has listed the namespace once.
    pub fn tracking_fingerprint(&self) -> Option<u64> {
        let store = self.tracking.locked();
        store.synced.then(|| {
            let mut hasher = DefaultHasher::new();
            store.secrets.hash(&mut hasher);
            hasher.finish()
        })
    }
}

/// Feeds one store from one watch and announces the releases whose Secrets changed.
struct Feed {
    store: Arc<Mutex<Store>>,
    namespace: String,
    release_label: &'static str,
    listed: watch::Sender<bool>,
    changes: broadcast::Sender<Change>,
    restarts: Counter,
}

impl Feed {
    async fn run(&self, stream: impl futures::Stream<Item = Result<Event<PartialObjectMeta<Secret>>, watcher::Error>>) {
        futures::pin_mut!(stream);
        let mut listing: Option<BTreeMap<String, Meta>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listing = Some(BTreeMap::new()),
                Ok(Event::InitApply(secret)) => {
                    if let (Some(listing), Some((name, meta))) = (listing.as_mut(), self.meta(&secret)) {
                        listing.insert(name, meta);
                    }
                }
                Ok(Event::InitDone) => {
                    let fresh = listing.take().unwrap_or_default();
                    let old = {
                        let mut store = self.store.locked();
                        store.synced = true;
                        std::mem::replace(&mut store.secrets, fresh.clone())
                    };
                    self.listed.send_replace(true);
                    // After a restart, whatever moved meanwhile is announced.
                    for (name, meta) in old.iter().chain(fresh.iter()) {
                        if old.get(name) != fresh.get(name) {
                            self.announce(&meta.release);
                        }
                    }
                }
                Ok(Event::Apply(secret)) => {
                    if let Some((name, meta)) = self.meta(&secret) {
                        let release = meta.release.clone();
                        let old = self.lock().secrets.insert(name, meta);
                        if let Some(old) = old.filter(|old| old.release != release) {
                            self.announce(&old.release);
                        }
                        self.announce(&release);
                    }
                }
                Ok(Event::Delete(secret)) => {
                    if let Some(name) = secret.metadata.name.as_deref()
                        && let Some(old) = self.lock().secrets.remove(name)
                    {
                        self.announce(&old.release);
                    }
                }
                Err(error) => {
                    self.restarts.inc();
                    tracing::warn!(namespace = %self.namespace, %error, "the Secret watch failed; it restarts");
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.locked()
    }

    fn meta(&self, secret: &PartialObjectMeta<Secret>) -> Option<(String, Meta)> {
        let name = secret.metadata.name.clone()?;
        let release = secret.metadata.labels.as_ref()?.get(self.release_label)?.clone();
        Some((
            name,
            Meta {
                release,
                resource_version: secret.metadata.resource_version.clone().unwrap_or_default(),
            },
        ))
    }

    fn announce(&self, release: &str) {
        // No receiver is fine: no worker is waiting.
        let _ = self.changes.send(Change::Release {
            namespace: self.namespace.clone(),
            release: release.to_owned(),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn secret(name: &str, release: &str, version: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(HELM_NAME_LABEL.to_owned(), release.to_owned())].into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The index is fed events directly: it says nothing (and the readiness gate stays
    /// closed) until the watch listed, then a fingerprint moves only for the release whose
    /// Secrets changed, and that release alone is announced.
    #[tokio::test]
    async fn listing_opens_the_gate_and_changes_move_one_fingerprint() {
        let (changes, mut announced) = broadcast::channel(16);
        let (listed, listed_rx) = watch::channel(false);
        let index = SecretIndex {
            tracking: Arc::new(Mutex::new(Store {
                synced: true,
                ..Default::default()
            })),
            helm: Arc::default(),
            listed: [watch::channel(true).1, listed_rx.clone()],
        };
        let feed = Feed {
            store: index.helm.clone(),
            namespace: "apps".into(),
            release_label: HELM_NAME_LABEL,
            listed,
            changes,
            restarts: Counter::default(),
        };
        assert_eq!(index.fingerprint("web"), None, "not listed yet");
        feed.run(futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(secret("sh.helm.release.v1.web.v1", "web", "1"))),
            Ok(Event::InitApply(secret("sh.helm.release.v1.db.v1", "db", "2"))),
            Ok(Event::InitDone),
        ]))
        .await;
        assert!(*listed_rx.borrow());
        tokio::time::timeout(std::time::Duration::from_secs(1), index.listed())
            .await
            .unwrap();
        let (web, db) = (index.fingerprint("web").unwrap(), index.fingerprint("db").unwrap());
        while announced.try_recv().is_ok() {}

        feed.run(futures::stream::iter(vec![Ok(Event::Apply(secret(
            "sh.helm.release.v1.web.v2",
            "web",
            "3",
        )))]))
        .await;
        assert_ne!(index.fingerprint("web").unwrap(), web);
        assert_eq!(index.fingerprint("db").unwrap(), db);
        assert_eq!(
            announced.try_recv().unwrap(),
            Change::Release {
                namespace: "apps".into(),
                release: "web".into()
            }
        );
        assert!(announced.try_recv().is_err(), "only the release that changed");
    }
}
