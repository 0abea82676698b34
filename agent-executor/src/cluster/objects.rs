//! Health verdicts of the objects of releases, from one watch per kind and namespace.
//!
//! A watch starts the first time a release needs a kind in a namespace, is shared by every
//! release that needs it, and stops after [`IDLE_STOP`] without use. It keeps no object:
//! each event is judged at once (the same rules as a GET would get, [`crate::resources::health`]) and
//! only the verdict is stored, so memory follows the number of objects, not their size. A
//! verdict that changes is announced, so only the releases holding that object look again.
//! Until a watch has listed its objects once, lookups wait for it (up to 10 s);
//! when it cannot run (a kind the executor may not list, a kind the API server does not
//! know) they answer [`Lookup::Unknown`] at once and the caller reads the object itself.
//! Kinds that carry no readiness of their own (ConfigMap, RBAC, ...) are only checked to
//! exist, from a watch of their metadata.

use agent_runtime::sync::MutexExt as _;
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
    batch::v1::Job,
    core::v1::{PersistentVolumeClaim, Pod, Service},
};
use kube::{
    Api, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, PartialObjectMeta},
    core::GroupVersionKind,
    discovery::Scope,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, watcher},
    },
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::Change;
use crate::resources::{
    health::{self, Verdict},
    manifest::ManifestObject,
};

/// A watch unused this long is stopped.
pub const IDLE_STOP: Duration = Duration::from_secs(300);
/// How long a lookup waits for a new watch to list its objects.
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// Where a watch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WatchState {
    /// Listing for the first time.
    Listing,
    /// Listed at least once: its verdicts are current.
    Listed,
    /// Failed before it could list (it keeps trying): lookups read directly meanwhile.
    Failing,
}

/// What a watch says of an object.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Known(Verdict),
    /// The watch has not listed yet or cannot run: read the object directly.
    Unknown,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct WatchKey {
    group: String,
    version: String,
    kind: String,
    /// Empty for a cluster-scoped kind.
    namespace: String,
    /// Only whether the objects exist ([`health::existence_only`]): a metadata watch.
    metadata_only: bool,
}

struct KindWatch {
    verdicts: Mutex<HashMap<String, Verdict>>,
    sync: watch::Receiver<WatchState>,
    last_used: Mutex<Instant>,
    stop: CancellationToken,
}

/// A problem pod: its labels and what is wrong with it.
type ProblemPod = (BTreeMap<String, String>, String);

/// The pods of a namespace that have a problem ([`health::pod_problem`]): their labels and
/// the problem, from a Pod watch. Pods without a problem are not kept.
#[derive(Default)]
struct PodProblems {
    problems: Mutex<HashMap<String, ProblemPod>>,
    synced: AtomicBool,
    /// Stops its watch.
    stop: CancellationToken,
}

/// Every object watch of the executor.
pub struct ObjectWatches {
    client: kube::Client,
    changes: broadcast::Sender<Change>,
    restarts: Counter,
    shutdown: CancellationToken,
    watches: Arc<Mutex<HashMap<WatchKey, Arc<KindWatch>>>>,
    pods: Mutex<HashMap<String, Arc<PodProblems>>>,
    running: Gauge,
}

impl ObjectWatches {
    pub fn new(
        client: kube::Client,
        changes: broadcast::Sender<Change>,
        restarts: Counter,
        shutdown: CancellationToken,
    ) -> Self {
        let watches: Arc<Mutex<HashMap<WatchKey, Arc<KindWatch>>>> = Arc::default();
        let running = Gauge::default();
        // Stops the watches no release used for a while.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (watches, running, shutdown) = (watches.clone(), running.clone(), shutdown.clone());
            handle.spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(IDLE_STOP / 5) => {}
                        () = shutdown.cancelled() => return,
                    }
                    let mut watches = watches.locked();
                    watches.retain(|key, watch| {
                        let idle = watch.last_used.locked().elapsed() > IDLE_STOP;
                        if idle {
                            tracing::debug!(kind = %key.kind, namespace = %key.namespace, "stopping an unused watch");
                            watch.stop.cancel();
                        }
                        !idle
                    });
                    running.set(i64::try_from(watches.len()).unwrap_or(i64::MAX));
                }
            });
        }
        Self {
            client,
            changes,
            restarts,
            shutdown,
            watches,
            pods: Mutex::default(),
            running,
        }
    }

    /// A pod of `namespace` whose labels include `labels` and that has a problem: its name
    /// and the problem. Starts the namespace's Pod watch on first use; `None` until it listed.
    pub fn pod_problem(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Option<(String, String)> {
        let store = {
            let mut pods = self.pods.locked();
            pods.entry(namespace.to_owned())
                .or_insert_with(|| {
                    let store = Arc::new(PodProblems {
                        stop: self.shutdown.child_token(),
                        ..PodProblems::default()
                    });
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                    tokio::spawn(follow_pods(
                        api,
                        store.clone(),
                        self.restarts.clone(),
                        store.stop.clone(),
                    ));
                    store
                })
                .clone()
        };
        if !store.synced.load(Ordering::Acquire) {
            tracing::debug!(namespace, "the pod watch has not listed yet");
            return None;
        }
        let problems = store.problems.locked();
        tracing::debug!(
            namespace,
            problems = problems.len(),
            ?labels,
            "looking for a pod with a problem"
        );
        problems
            .iter()
            .filter(|(_, (pod_labels, _))| labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(name, (_, problem))| (name.clone(), problem.clone()))
    }

    /// Stops the Pod watches of namespaces not in `needed`.
    pub fn retain_pod_watches(&self, needed: &std::collections::HashSet<String>) {
        self.pods.locked().retain(|namespace, store| {
            let keep = needed.contains(namespace);
            if !keep {
                store.stop.cancel();
            }
            keep
        });
    }

    /// Namespaces whose Pods are watched now.
    pub fn pod_watch_namespaces(&self) -> Vec<String> {
        let mut namespaces: Vec<String> = self.pods.locked().keys().cloned().collect();
        namespaces.sort();
        namespaces
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "object_watches",
            "Watches of release objects running now (one per kind and namespace)",
            self.running.clone(),
        );
    }

    /// The verdict on `object` (in `namespace` unless its manifest names one), starting the
    /// watch of its kind if needed.
    pub async fn lookup(&self, namespace: &str, object: &ManifestObject) -> Lookup {
        let key = WatchKey {
            group: object.group().to_owned(),
            version: object.version().to_owned(),
            kind: object.kind.clone(),
            namespace: object.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            metadata_only: health::existence_only(object),
        };
        let watch = self.watch(key);
        *watch.last_used.locked() = Instant::now();
        let mut sync = watch.sync.clone();
        let settled = tokio::time::timeout(SYNC_WAIT, sync.wait_for(|sync| *sync != WatchState::Listing))
            .await
            .ok()
            .and_then(|sync| sync.ok().map(|sync| *sync));
        if settled != Some(WatchState::Listed) {
            return Lookup::Unknown;
        }
        let verdicts = watch.verdicts.locked();
        Lookup::Known(
            verdicts
                .get(&object.name)
                .cloned()
                .unwrap_or_else(|| Verdict::NotReady(health::NOT_FOUND.to_owned())),
        )
    }

    fn watch(&self, key: WatchKey) -> Arc<KindWatch> {
        let mut watches = self.watches.locked();
        if let Some(watch) = watches.get(&key) {
            return watch.clone();
        }
        let (sync_tx, sync) = watch::channel(WatchState::Listing);
        let watch = Arc::new(KindWatch {
            verdicts: Mutex::default(),
            sync,
            last_used: Mutex::new(Instant::now()),
            stop: self.shutdown.child_token(),
        });
        let feed = Feed {
            key: key.clone(),
            watch: watch.clone(),
            sync: sync_tx,
            changes: self.changes.clone(),
            restarts: self.restarts.clone(),
        };
        tokio::spawn(feed.run(self.client.clone()));
        watches.insert(key, watch.clone());
        self.running.set(i64::try_from(watches.len()).unwrap_or(i64::MAX));
        watch
    }
}

/// Feeds one [`KindWatch`].
struct Feed {
    key: WatchKey,
    watch: Arc<KindWatch>,
    sync: watch::Sender<WatchState>,
    changes: broadcast::Sender<Change>,
    restarts: Counter,
}

impl Feed {
    async fn run(self, client: kube::Client) {
        let stop = self.watch.stop.clone();
        let namespace = self.key.namespace.clone();
        tokio::select! {
            () = stop.cancelled() => {}
            () = async {
                match (self.key.group.as_str(), self.key.kind.as_str()) {
                    _ if self.key.metadata_only => self.metadata(client).await,
                    ("apps", "Deployment") => self.typed(Api::<Deployment>::namespaced(client, &namespace), health::typed(health::deployment)).await,
                    ("apps", "StatefulSet") => self.typed(Api::<StatefulSet>::namespaced(client, &namespace), health::typed(health::stateful_set)).await,
                    ("apps", "DaemonSet") => self.typed(Api::<DaemonSet>::namespaced(client, &namespace), health::typed(health::daemon_set)).await,
                    ("apps", "ReplicaSet") => self.typed(Api::<ReplicaSet>::namespaced(client, &namespace), health::typed(health::replica_set)).await,
                    ("batch", "Job") => self.typed(Api::<Job>::namespaced(client, &namespace), health::typed(health::job)).await,
                    ("", "Pod") => self.typed(Api::<Pod>::namespaced(client, &namespace), health::typed(health::pod)).await,
                    ("", "PersistentVolumeClaim") => {
                        self.typed(Api::<PersistentVolumeClaim>::namespaced(client, &namespace), health::typed(health::persistent_volume_claim)).await
                    }
                    ("", "Service") => self.typed(Api::<Service>::namespaced(client, &namespace), health::service).await,
                    _ => self.dynamic(client).await,
                }
            } => {}
        }
    }

    async fn typed<K>(&self, api: Api<K>, rule: impl Fn(&K) -> Verdict)
    where
        K: Resource + Clone + DeserializeOwned + serde::Serialize + Debug + Send + 'static,
    {
        self.follow(
            watcher(api, watcher::Config::default()).default_backoff(),
            |object: &K| health::judge(object, &rule),
        )
        .await;
    }

    /// The API of the watched kind (objects `K` of it: whole or metadata only), resolved by
    /// discovery; `None` (the watch failing) when it cannot be.
    async fn dynamic_api<K>(&self, client: kube::Client) -> Option<Api<K>>
    where
        K: Resource<DynamicType = ApiResource, Scope = kube::core::DynamicResourceScope>,
    {
        let gvk = GroupVersionKind::gvk(&self.key.group, &self.key.version, &self.key.kind);
        let (resource, capabilities) = match kube::discovery::pinned_kind(&client, &gvk).await {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(kind = %self.key.kind, %error, "cannot resolve a kind to watch; its objects are read directly");
                self.sync.send_replace(WatchState::Failing);
                return None;
            }
        };
        Some(match capabilities.scope {
            Scope::Cluster => Api::all_with(client, &resource),
            Scope::Namespaced => Api::namespaced_with(client, &self.key.namespace, &resource),
        })
    }

    async fn dynamic(&self, client: kube::Client) {
        let Some(api) = self.dynamic_api::<DynamicObject>(client).await else {
            return;
        };
        self.follow(
            watcher(api, watcher::Config::default()).default_backoff(),
            health::judge_dynamic,
        )
        .await;
    }

    /// Existence only: every object listed is ready.
    async fn metadata(&self, client: kube::Client) {
        // An `Api` of `PartialObjectMeta` makes metadata-only requests.
        let Some(api) = self.dynamic_api::<PartialObjectMeta<DynamicObject>>(client).await else {
            return;
        };
        self.follow(
            watcher(api, watcher::Config::default()).default_backoff(),
            |_: &PartialObjectMeta<DynamicObject>| Verdict::Ready,
        )
        .await;
    }

    async fn follow<K: Resource + Clone>(
        &self,
        stream: impl futures::Stream<Item = Result<Event<K>, watcher::Error>>,
        judge: impl Fn(&K) -> Verdict,
    ) {
        futures::pin_mut!(stream);
        let mut listing: Option<HashMap<String, Verdict>> = None;
        let mut failures = 0_u32;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listing = Some(HashMap::new()),
                Ok(Event::InitApply(object)) => {
                    if let Some(listing) = listing.as_mut() {
                        listing.insert(object.name_any(), judge(&object));
                    }
                }
                Ok(Event::InitDone) => {
                    failures = 0;
                    let fresh = listing.take().unwrap_or_default();
                    let old = std::mem::replace(&mut *self.verdicts(), fresh.clone());
                    for name in old.keys().chain(fresh.keys()) {
                        if old.get(name) != fresh.get(name) {
                            self.announce(name);
                        }
                    }
                    self.sync.send_replace(WatchState::Listed);
                }
                Ok(Event::Apply(object)) => {
                    let name = object.name_any();
                    let verdict = judge(&object);
                    let old = self.verdicts().insert(name.clone(), verdict.clone());
                    if old.as_ref() != Some(&verdict) {
                        self.announce(&name);
                    }
                }
                Ok(Event::Delete(object)) => {
                    let name = object.name_any();
                    if self.verdicts().remove(&name).is_some() {
                        self.announce(&name);
                    }
                }
                Err(error) => {
                    self.restarts.inc();
                    failures += 1;
                    // A watch that cannot even list (forbidden, kind gone) leaves the lookups
                    // to direct reads; it keeps trying with backoff.
                    // Until it lists, lookups read directly rather than wait.
                    self.sync.send_if_modified(|sync| {
                        let failing = *sync == WatchState::Listing;
                        if failing {
                            *sync = WatchState::Failing;
                        }
                        failing
                    });
                    if failures == 1 {
                        tracing::warn!(kind = %self.key.kind, namespace = %self.key.namespace, %error, "an object watch failed; it restarts");
                    }
                }
            }
        }
    }

    fn verdicts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Verdict>> {
        self.watch.verdicts.locked()
    }

    fn announce(&self, name: &str) {
        let _ = self.changes.send(Change::Object {
            namespace: self.key.namespace.clone(),
            kind: self.key.kind.clone(),
            name: name.to_owned(),
        });
    }
}

/// Keeps `store` to the problem pods of a Pod watch, until `shutdown`.
async fn follow_pods(api: Api<Pod>, store: Arc<PodProblems>, restarts: Counter, shutdown: CancellationToken) {
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Option<HashMap<String, ProblemPod>> = None;
    let problem = |pod: &Pod| health::pod_problem(pod).map(|problem| (pod.labels().clone(), problem));
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            () = shutdown.cancelled() => return,
        };
        let Some(event) = event else { return };
        let mut problems = store.problems.locked();
        match event {
            Ok(Event::Init) => listing = Some(HashMap::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(listing), Some(found)) = (listing.as_mut(), problem(&pod)) {
                    listing.insert(pod.name_any(), found);
                }
            }
            Ok(Event::InitDone) => {
                *problems = listing.take().unwrap_or_default();
                store.synced.store(true, Ordering::Release);
            }
            Ok(Event::Apply(pod)) => match problem(&pod) {
                Some(found) => {
                    problems.insert(pod.name_any(), found);
                }
                None => {
                    problems.remove(&pod.name_any());
                }
            },
            Ok(Event::Delete(pod)) => {
                problems.remove(&pod.name_any());
            }
            Err(_) => {
                restarts.inc();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::{
        api::apps::v1::{DeploymentSpec, DeploymentStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn web(ready: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(1),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                updated_replicas: Some(1),
                observed_generation: Some(1),
                ..Default::default()
            }),
        }
    }

    /// The index is fed events directly, with no API server: verdicts follow the objects,
    /// and only a verdict that changes is announced.
    #[tokio::test]
    async fn verdicts_follow_the_events_and_only_changes_are_announced() {
        let (changes, mut announced) = broadcast::channel(16);
        let (sync_tx, sync) = watch::channel(WatchState::Listing);
        let kind_watch = Arc::new(KindWatch {
            verdicts: Mutex::default(),
            sync,
            last_used: Mutex::new(Instant::now()),
            stop: CancellationToken::new(),
        });
        let feed = Feed {
            key: WatchKey {
                group: "apps".into(),
                version: "v1".into(),
                kind: "Deployment".into(),
                namespace: "apps".into(),
                metadata_only: false,
            },
            watch: kind_watch.clone(),
            sync: sync_tx,
            changes,
            restarts: Counter::default(),
        };
        let verdict = || kind_watch.verdicts.lock().unwrap().get("web").cloned();
        let events: Vec<Result<Event<Deployment>, watcher::Error>> = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(web(0))),
            Ok(Event::InitDone),
            // A status update that does not change the verdict is not announced.
            Ok(Event::Apply(web(0))),
            Ok(Event::Apply(web(1))),
        ];
        let rule = health::typed(health::deployment);
        feed.follow(futures::stream::iter(events), &rule).await;
        assert_eq!(*kind_watch.sync.borrow(), WatchState::Listed);
        assert_eq!(verdict(), Some(Verdict::Ready));
        let mut names = Vec::new();
        while let Ok(Change::Object { name, .. }) = announced.try_recv() {
            names.push(name);
        }
        assert_eq!(names, ["web", "web"], "listed, then ready");

        feed.follow(futures::stream::iter(vec![Ok(Event::Delete(web(1)))]), &rule)
            .await;
        assert_eq!(verdict(), None);
        assert!(matches!(announced.try_recv(), Ok(Change::Object { .. })));
    }
}
