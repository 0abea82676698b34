//! What a release's worker does to the cluster and to Helm, as a trait: [`KubeOps`] reads and
//! writes through the API server and runs `helm`; the worker's unit tests use a fake in
//! memory, so its decisions are tested without either.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::Utc;

use crate::{
    cluster::{
        Cluster,
        pull_secret::{PullSecretError, PullSecrets},
        tracking::{Tracked, TrackingError, TrackingRecord, TrackingStore},
    },
    helm::{
        ChartRequest, HelmDriver, HelmError,
        storage::{HelmStorage, StorageError, StoredRelease},
    },
    release::recovery::{self, Outcome, RecoveryError},
    resources::{
        health::{HealthChecker, ResourceHealth},
        manifest::ManifestObject,
        restart,
    },
};

/// The Kubernetes-side stores of one namespace.
pub(crate) struct Stores {
    pub(crate) tracking: TrackingStore,
    pub(crate) storage: HelmStorage,
    pub(crate) pull_secrets: PullSecrets,
}

impl Stores {
    pub(crate) fn new(client: &kube::Client, namespace: &str) -> Self {
        Self {
            tracking: TrackingStore::new(client.clone(), namespace),
            storage: HelmStorage::new(client.clone(), namespace),
            pull_secrets: PullSecrets::new(client.clone(), namespace),
        }
    }
}

/// The effects of one release's worker, in the release's namespace.
pub(crate) trait ReleaseOps: Send + Sync + 'static {
    /// The release's tracking record (or the adoption request for it).
    fn find_tracked(&self, release: &str) -> impl Future<Output = Result<Option<Tracked>, TrackingError>> + Send;
    fn save_tracked(&self, record: &TrackingRecord) -> impl Future<Output = Result<(), TrackingError>> + Send;
    fn delete_tracked(&self, secret: &str) -> impl Future<Output = Result<(), TrackingError>> + Send;
    /// Helm's latest revision of the release.
    fn latest(&self, release: &str) -> impl Future<Output = Result<Option<StoredRelease>, StorageError>> + Send;
    /// Helm's revisions of the release, oldest first.
    fn history(&self, release: &str) -> impl Future<Output = Result<Vec<StoredRelease>, StorageError>> + Send;
    fn apply_pull_secret(
        &self,
        release: &str,
        docker_config: Vec<u8>,
    ) -> impl Future<Output = Result<(), PullSecretError>> + Send;
    fn delete_pull_secret(&self, release: &str) -> impl Future<Output = Result<(), PullSecretError>> + Send;
    fn install(&self, request: &ChartRequest<'_>) -> impl Future<Output = Result<(), HelmError>> + Send;
    fn upgrade(&self, request: &ChartRequest<'_>) -> impl Future<Output = Result<(), HelmError>> + Send;
    fn uninstall(&self, release: &str, timeout: Duration) -> impl Future<Output = Result<(), HelmError>> + Send;
    /// Settles an interrupted operation (see [`recovery::recover`]).
    fn recover(
        &self,
        tracked: &Tracked,
        latest: Option<StoredRelease>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Outcome, RecoveryError>> + Send;
    fn check_health(&self, objects: &[ManifestObject]) -> impl Future<Output = Vec<ResourceHealth>> + Send;
    /// Restarts the workloads among `objects`; how many.
    fn restart(&self, objects: &[ManifestObject]) -> impl Future<Output = Result<usize, String>> + Send;
    /// A digest of the release's Secrets from the watches; `None` until they listed.
    fn fingerprint(&self, release: &str) -> Option<u64>;
}

/// The real effects: the API server and `helm`.
pub(crate) struct KubeOps {
    client: kube::Client,
    helm: HelmDriver,
    health: Arc<HealthChecker>,
    cluster: Cluster,
    namespace: String,
    stores: Stores,
}

impl KubeOps {
    pub(crate) fn new(
        client: kube::Client,
        helm: HelmDriver,
        health: Arc<HealthChecker>,
        cluster: Cluster,
        namespace: &str,
    ) -> Self {
        Self {
            stores: Stores::new(&client, namespace),
            client,
            helm,
            health,
            cluster,
            namespace: namespace.to_owned(),
        }
    }
}

impl ReleaseOps for KubeOps {
    async fn find_tracked(&self, release: &str) -> Result<Option<Tracked>, TrackingError> {
        self.stores.tracking.find(release).await
    }

    async fn save_tracked(&self, record: &TrackingRecord) -> Result<(), TrackingError> {
        self.stores.tracking.save(record).await
    }

    async fn delete_tracked(&self, secret: &str) -> Result<(), TrackingError> {
        self.stores.tracking.delete(secret).await
    }

    async fn latest(&self, release: &str) -> Result<Option<StoredRelease>, StorageError> {
        self.stores.storage.latest(release).await
    }

    async fn history(&self, release: &str) -> Result<Vec<StoredRelease>, StorageError> {
        self.stores.storage.history(release).await
    }

    async fn apply_pull_secret(&self, release: &str, docker_config: Vec<u8>) -> Result<(), PullSecretError> {
        self.stores.pull_secrets.apply(release, docker_config).await
    }

    async fn delete_pull_secret(&self, release: &str) -> Result<(), PullSecretError> {
        self.stores.pull_secrets.delete(release).await
    }

    async fn install(&self, request: &ChartRequest<'_>) -> Result<(), HelmError> {
        self.helm.install(request).await
    }

    async fn upgrade(&self, request: &ChartRequest<'_>) -> Result<(), HelmError> {
        self.helm.upgrade(request).await
    }

    async fn uninstall(&self, release: &str, timeout: Duration) -> Result<(), HelmError> {
        self.helm.uninstall(&self.namespace, release, timeout).await
    }

    async fn recover(
        &self,
        tracked: &Tracked,
        latest: Option<StoredRelease>,
        timeout: Duration,
    ) -> Result<Outcome, RecoveryError> {
        recovery::recover(
            &self.helm,
            &self.stores.tracking,
            &self.stores.storage,
            tracked,
            latest,
            timeout,
        )
        .await
    }

    async fn check_health(&self, objects: &[ManifestObject]) -> Vec<ResourceHealth> {
        self.health.check(&self.namespace, objects).await
    }

    async fn restart(&self, objects: &[ManifestObject]) -> Result<usize, String> {
        restart::restart_workloads(&self.client, &self.namespace, objects, Utc::now())
            .await
            .map_err(|error| error.to_string())
    }

    fn fingerprint(&self, release: &str) -> Option<u64> {
        self.cluster.secrets(&self.namespace).fingerprint(release)
    }
}
