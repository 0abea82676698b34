//! Reads Helm's own release storage (driver `secret`) straight from the API, so the
//! executor learns a release's latest revision, status and manifest without running `helm`.
//!
//! Each revision is a Secret `sh.helm.release.v1.<name>.v<N>` labelled `owner=helm`,
//! `name=<name>`, `version=<N>`, `status=<status>`. Its data key `release` holds base64 text
//! (on top of the Secret's own base64) of a gzip stream of the release JSON; releases written
//! before Helm compressed them are plain JSON after the base64 step.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::Read,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{ListParams, ObjectMeta},
};
use serde::Deserialize;

use crate::cluster::kube_util::{self, ApiError};

/// Upper bound on a decompressed release (a guard against a gzip bomb in a Secret).
pub const MAX_RELEASE_BYTES: u64 = 64 * 1024 * 1024;

/// Errors reading Helm's storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Listing or reading release Secrets failed (retryable).
    #[error("cannot {action} helm release Secrets of {what}: {source}")]
    Api {
        action: &'static str,
        what: String,
        #[source]
        source: ApiError,
    },
    /// A release Secret has no `release` key.
    #[error("helm release Secret {secret} has no release data")]
    MissingData { secret: String },
    /// The payload is not base64.
    #[error("helm release data is not base64: {0}")]
    Base64(#[source] base64::DecodeError),
    /// The gzip stream is broken.
    #[error("helm release data is not valid gzip: {0}")]
    Gzip(#[source] std::io::Error),
    /// The payload unpacks to more than [`MAX_RELEASE_BYTES`] (a gzip bomb, or not Helm's).
    #[error("helm release data unpacks to more than {} MiB", MAX_RELEASE_BYTES / (1024 * 1024))]
    TooLarge,
    /// The release JSON does not parse.
    #[error("helm release data is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A release Secret named in the error could not be decoded.
    #[error("cannot decode helm release Secret {secret}: {source}")]
    Decode {
        secret: String,
        #[source]
        source: Box<StorageError>,
    },
}

/// Status of one Helm revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseStatus {
    Deployed,
    Failed,
    PendingInstall,
    PendingUpgrade,
    PendingRollback,
    Superseded,
    Uninstalled,
    Uninstalling,
    /// Anything else Helm may write (`unknown`, future states).
    Other(String),
}

impl ReleaseStatus {
    pub fn parse(value: &str) -> Self {
        match value {
            "deployed" => Self::Deployed,
            "failed" => Self::Failed,
            "pending-install" => Self::PendingInstall,
            "pending-upgrade" => Self::PendingUpgrade,
            "pending-rollback" => Self::PendingRollback,
            "superseded" => Self::Superseded,
            "uninstalled" => Self::Uninstalled,
            "uninstalling" => Self::Uninstalling,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Deployed => "deployed",
            Self::Failed => "failed",
            Self::PendingInstall => "pending-install",
            Self::PendingUpgrade => "pending-upgrade",
            Self::PendingRollback => "pending-rollback",
            Self::Superseded => "superseded",
            Self::Uninstalled => "uninstalled",
            Self::Uninstalling => "uninstalling",
            Self::Other(other) => other,
        }
    }

    /// An operation started and has not finished (or its process died).
    pub fn is_pending(&self) -> bool {
        matches!(
            self,
            Self::PendingInstall | Self::PendingUpgrade | Self::PendingRollback
        )
    }
}

impl fmt::Display for ReleaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the executor needs from one stored Helm revision.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRelease {
    pub name: String,
    pub namespace: String,
    pub revision: u32,
    pub status: ReleaseStatus,
    pub chart_name: String,
    pub chart_version: String,
    pub app_version: String,
    pub description: String,
    pub manifest: String,
    /// When this revision was started (Helm's `info.last_deployed`).
    pub last_deployed: Option<DateTime<Utc>>,
}

impl StoredRelease {
    /// Revision `revision` of release `web` in `apps`, chart `web-1.0.0`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(revision: u32, status: ReleaseStatus) -> Self {
        Self {
            name: "web".into(),
            namespace: "apps".into(),
            revision,
            status,
            chart_name: "web".into(),
            chart_version: "1.0.0".into(),
            app_version: String::new(),
            description: String::new(),
            manifest: String::new(),
            last_deployed: None,
        }
    }

    /// `name-version` of the chart, as `helm list` shows it.
    pub fn chart(&self) -> String {
        if self.chart_name.is_empty() {
            String::new()
        } else {
            format!("{}-{}", self.chart_name, self.chart_version)
        }
    }
}

#[derive(Deserialize)]
struct RawRelease {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    version: u32,
    #[serde(default)]
    info: Option<RawInfo>,
    #[serde(default)]
    chart: Option<RawChart>,
    #[serde(default)]
    manifest: String,
}

#[derive(Deserialize)]
struct RawInfo {
    #[serde(default)]
    status: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    last_deployed: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct RawChart {
    #[serde(default)]
    metadata: Option<RawMetadata>,
}

#[derive(Deserialize)]
struct RawMetadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default, rename = "appVersion")]
    app_version: String,
}

/// Decodes the `release` data of a Helm release Secret (the bytes after Kubernetes' own
/// base64): base64 → gzip (if compressed) → JSON.
pub fn decode_release(data: &[u8]) -> Result<StoredRelease, StorageError> {
    let trimmed = data.trim_ascii();
    let bytes = STANDARD.decode(trimmed).map_err(StorageError::Base64)?;
    let json = if bytes.starts_with(&[0x1f, 0x8b, 0x08]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .take(MAX_RELEASE_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(StorageError::Gzip)?;
        if out.len() as u64 > MAX_RELEASE_BYTES {
            return Err(StorageError::TooLarge);
        }
        out
    } else {
        bytes
    };
    parse_release_json(&json)
}

/// Parses a release JSON document (also what `helm status -o json` prints).
pub fn parse_release_json(json: &[u8]) -> Result<StoredRelease, StorageError> {
    let raw: RawRelease = serde_json::from_slice(json).map_err(StorageError::Json)?;
    let info = raw.info.unwrap_or(RawInfo {
        status: String::new(),
        description: String::new(),
        last_deployed: None,
    });
    let metadata = raw.chart.and_then(|chart| chart.metadata);
    let (chart_name, chart_version, app_version) = match metadata {
        Some(metadata) => (metadata.name, metadata.version, metadata.app_version),
        None => Default::default(),
    };
    Ok(StoredRelease {
        name: raw.name,
        namespace: raw.namespace,
        revision: raw.version,
        status: ReleaseStatus::parse(&info.status),
        chart_name,
        chart_version,
        app_version,
        description: info.description,
        manifest: raw.manifest,
        last_deployed: info.last_deployed,
    })
}

/// Revision number of a release Secret, from its `version` label or its `.v<N>` name suffix.
fn revision_of(meta: &ObjectMeta) -> Option<u32> {
    let labels = meta.labels.as_ref();
    labels
        .and_then(|labels| labels.get("version"))
        .and_then(|version| version.parse().ok())
        .or_else(|| meta.name.as_deref()?.rsplit_once(".v")?.1.parse().ok())
}

fn decode_secret(secret: &Secret) -> Result<StoredRelease, StorageError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let data = secret
        .data
        .as_ref()
        .and_then(|data| data.get("release"))
        .ok_or_else(|| StorageError::MissingData { secret: name.clone() })?;
    decode_release(&data.0).map_err(|source| StorageError::Decode {
        secret: name,
        source: Box::new(source),
    })
}

/// Read access to Helm's release Secrets in one namespace.
#[derive(Clone)]
pub struct HelmStorage {
    api: Api<Secret>,
}

impl HelmStorage {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }

    /// Metadata of the release Secrets matching `selector` (no payloads: cheap).
    async fn list_metadata(&self, selector: &str, what: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let list = kube_util::call(self.api.list_metadata(&ListParams::default().labels(selector)))
            .await
            .map_err(|source| StorageError::Api {
                action: "list",
                what: what.to_owned(),
                source,
            })?;
        Ok(list.items.into_iter().map(|item| item.metadata).collect())
    }

    /// Reads and decodes one release Secret; `None` when it vanished meanwhile.
    async fn read(&self, name: &str) -> Result<Option<StoredRelease>, StorageError> {
        let secret = kube_util::call_opt(self.api.get(name))
            .await
            .map_err(|source| StorageError::Api {
                action: "read",
                what: name.to_owned(),
                source,
            })?;
        secret.as_ref().map(decode_secret).transpose()
    }

    /// The latest revision of `release`, or `None` when Helm has no record of it. Lists
    /// metadata only and reads just the latest Secret.
    pub async fn latest(&self, release: &str) -> Result<Option<StoredRelease>, StorageError> {
        let metas = self
            .list_metadata(&format!("owner=helm,name={release}"), release)
            .await?;
        match latest_of(metas.iter()).and_then(|meta| meta.name.as_deref()) {
            Some(name) => self.read(name).await,
            None => Ok(None),
        }
    }

    /// Every stored revision of `release`, oldest first.
    pub async fn history(&self, release: &str) -> Result<Vec<StoredRelease>, StorageError> {
        let list = kube_util::call(
            self.api
                .list(&ListParams::default().labels(&format!("owner=helm,name={release}"))),
        )
        .await
        .map_err(|source| StorageError::Api {
            action: "list",
            what: release.to_owned(),
            source,
        })?;
        let mut releases = list.items.iter().map(decode_secret).collect::<Result<Vec<_>, _>>()?;
        releases.sort_by_key(|release| release.revision);
        Ok(releases)
    }

    /// Revision number and status of every stored revision of `release`, oldest first, from
    /// the Secrets' labels alone (no payload is decoded, so a corrupt one does not matter).
    pub async fn revision_statuses(&self, release: &str) -> Result<Vec<(u32, ReleaseStatus)>, StorageError> {
        let metas = self
            .list_metadata(&format!("owner=helm,name={release}"), release)
            .await?;
        let mut statuses: Vec<(u32, ReleaseStatus)> = metas
            .iter()
            .filter_map(|meta| {
                let status = meta.labels.as_ref()?.get("status")?;
                Some((revision_of(meta)?, ReleaseStatus::parse(status)))
            })
            .collect();
        statuses.sort_by_key(|(revision, _)| *revision);
        Ok(statuses)
    }

    /// Latest revision number and status of every release in the namespace, from the
    /// Secrets' labels alone.
    pub async fn latest_statuses(&self) -> Result<BTreeMap<String, (u32, ReleaseStatus)>, StorageError> {
        let metas = self.list_metadata("owner=helm", "all releases").await?;
        Ok(latest_by_release(&metas)
            .into_iter()
            .filter_map(|(release, meta)| {
                let status = meta.labels.as_ref()?.get("status")?;
                Some((release, (revision_of(meta)?, ReleaseStatus::parse(status))))
            })
            .collect())
    }

    /// The latest revision of each of `releases` that Helm has, by release name. Only the
    /// latest Secret of each is read, and one that cannot be read or decoded is an error of
    /// that release alone: a corrupt Secret of one release (managed by the agent or not)
    /// must not hide the others.
    pub async fn latest_of_each(&self, releases: &BTreeSet<String>) -> Result<LatestByRelease, StorageError> {
        let metas = self.list_metadata("owner=helm", "all releases").await?;
        let mut latest = BTreeMap::new();
        for (release, meta) in latest_by_release(&metas) {
            if !releases.contains(&release) {
                continue;
            }
            let Some(name) = meta.name.as_deref() else { continue };
            match self.read(name).await {
                Ok(Some(stored)) => {
                    latest.insert(release, Ok(stored));
                }
                Ok(None) => {}
                Err(error) => {
                    latest.insert(release, Err(error));
                }
            }
        }
        Ok(latest)
    }
}

/// Latest revision per release, or why it could not be read.
pub type LatestByRelease = BTreeMap<String, Result<StoredRelease, StorageError>>;

/// The metadata of the newest revision Secret of each release.
fn latest_by_release(metas: &[ObjectMeta]) -> BTreeMap<String, &ObjectMeta> {
    let mut by_release: BTreeMap<String, Vec<&ObjectMeta>> = BTreeMap::new();
    for meta in metas {
        if let Some(name) = meta.labels.as_ref().and_then(|labels| labels.get("name")) {
            by_release.entry(name.clone()).or_default().push(meta);
        }
    }
    by_release
        .into_iter()
        .filter_map(|(release, metas)| Some((release, latest_of(metas.into_iter())?)))
        .collect()
}

fn latest_of<'a>(metas: impl Iterator<Item = &'a ObjectMeta>) -> Option<&'a ObjectMeta> {
    metas
        .filter_map(|meta| Some((revision_of(meta)?, meta)))
        .max_by_key(|(revision, _)| *revision)
        .map(|(_, meta)| meta)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::io::Write;

    use k8s_openapi::ByteString;

    use super::*;

    /// Encodes a release JSON the way Helm stores it: gzip, then base64 (the Secret's data
    /// bytes, before Kubernetes' own base64).
    pub(crate) fn encode(json: &serde_json::Value) -> Vec<u8> {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&serde_json::to_vec(json).unwrap()).unwrap();
        STANDARD.encode(gzip.finish().unwrap()).into_bytes()
    }

    #[test]
    fn a_gzip_bomb_is_refused_past_the_bound() {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![b' '; 1024 * 1024];
        for _ in 0..=MAX_RELEASE_BYTES / (1024 * 1024) {
            gzip.write_all(&zeros).unwrap();
        }
        let bomb = STANDARD.encode(gzip.finish().unwrap());
        assert!(bomb.len() < 1024 * 1024, "a small Secret");
        assert!(matches!(decode_release(bomb.as_bytes()), Err(StorageError::TooLarge)));
    }

    pub(crate) fn release_json(name: &str, version: u32, status: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name,
            "namespace": "apps",
            "version": version,
            "info": {
                "first_deployed": "2025-01-02T03:04:05.123456789Z",
                "last_deployed": "2025-01-02T03:04:05.123456789Z",
                "description": "Install complete",
                "status": status,
            },
            "chart": {
                "metadata": {"name": "web-chart", "version": "1.4.0", "appVersion": "2.0", "apiVersion": "v2"},
                "templates": [],
                "values": {"replicas": 1},
            },
            "config": {"password": "secret"},
            "manifest": "---\n# Source: web/templates/deploy.yaml\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n",
            "apply_method": "ssa",
        })
    }

    #[test]
    fn gzip_releases_decode() {
        let release = decode_release(&encode(&release_json("web", 3, "deployed"))).unwrap();
        assert_eq!(release.name, "web");
        assert_eq!(release.namespace, "apps");
        assert_eq!(release.revision, 3);
        assert_eq!(release.status, ReleaseStatus::Deployed);
        assert_eq!(release.chart(), "web-chart-1.4.0");
        assert_eq!(release.app_version, "2.0");
        assert_eq!(release.description, "Install complete");
        assert!(release.manifest.contains("kind: Deployment"));
        assert_eq!(
            release.last_deployed.unwrap().to_rfc3339(),
            "2025-01-02T03:04:05.123456789+00:00"
        );
    }

    #[test]
    fn uncompressed_releases_decode() {
        let plain = STANDARD.encode(serde_json::to_vec(&release_json("old", 1, "superseded")).unwrap());
        let release = decode_release(plain.as_bytes()).unwrap();
        assert_eq!(release.status, ReleaseStatus::Superseded);
    }

    #[test]
    fn pending_statuses_are_pending() {
        for status in ["pending-install", "pending-upgrade", "pending-rollback"] {
            let release = decode_release(&encode(&release_json("web", 2, status))).unwrap();
            assert!(release.status.is_pending(), "{status}");
            assert_eq!(release.status.as_str(), status);
        }
        assert!(!ReleaseStatus::parse("failed").is_pending());
        assert_eq!(ReleaseStatus::parse("weird"), ReleaseStatus::Other("weird".into()));
    }

    #[test]
    fn broken_data_gives_errors() {
        assert!(matches!(decode_release(b"%%%"), Err(StorageError::Base64(_))));
        let not_json = STANDARD.encode(b"not json");
        assert!(matches!(
            decode_release(not_json.as_bytes()),
            Err(StorageError::Json(_))
        ));
        let broken_gzip = STANDARD.encode([0x1f, 0x8b, 0x08, 0, 1, 2, 3]);
        assert!(matches!(
            decode_release(broken_gzip.as_bytes()),
            Err(StorageError::Gzip(_))
        ));
    }

    fn secret(name: &str, version: Option<&str>, data: Vec<u8>) -> Secret {
        let mut labels = BTreeMap::from([("owner".to_owned(), "helm".to_owned())]);
        if let Some(version) = version {
            labels.insert("version".to_owned(), version.to_owned());
        }
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("release".to_owned(), ByteString(data))])),
            ..Default::default()
        }
    }

    #[test]
    fn latest_revision_is_picked_by_number_not_by_name_order() {
        let secrets = [
            secret("sh.helm.release.v1.web.v9", Some("9"), Vec::new()),
            secret(
                "sh.helm.release.v1.web.v10",
                Some("10"),
                encode(&release_json("web", 10, "deployed")),
            ),
            secret("sh.helm.release.v1.web.v2", None, Vec::new()),
        ];
        let metas: Vec<ObjectMeta> = secrets.iter().map(|secret| secret.metadata.clone()).collect();
        let latest = latest_of(metas.iter()).unwrap();
        assert_eq!(latest.name.as_deref(), Some("sh.helm.release.v1.web.v10"));
        assert_eq!(decode_secret(&secrets[1]).unwrap().revision, 10);
        assert_eq!(revision_of(&metas[2]), Some(2), "name suffix when the label is missing");
        let mut labelled = metas.clone();
        for meta in &mut labelled {
            meta.labels.get_or_insert_default().insert("name".into(), "web".into());
        }
        let by_release = latest_by_release(&labelled);
        assert_eq!(by_release["web"].name.as_deref(), Some("sh.helm.release.v1.web.v10"));
    }
}
