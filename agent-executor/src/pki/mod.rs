//! The executor's certificate authority: a private CA kept in the Secret `distr-agent-ca` and
//! a leaf certificate per component, each in a Secret of its own that only that component's
//! pod mounts (`distr-agent-poller-tls`, `distr-agent-updater-tls`). The executor's own
//! serving certificate never leaves its memory. People get a certificate only when they ask:
//! an empty Secret `distr-agent-operator-tls` (made by someone who may create Secrets in the
//! namespace) is filled with a short-lived operator certificate, which is never renewed; once
//! it has expired the Secret is deleted, and asking again means creating it again.
//!
//! A check runs when a watch sees one of these Secrets change (so a deleted or altered
//! Secret is put right at once) and each [`PkiConfig::check_interval`]; it reads the Secrets
//! from the watches, so in steady state it makes no API request. Each check: the CA exists (created create-only, so
//! two executors cannot mint two), and each leaf is issued by the current CA, carries the
//! current trust bundle, and is not past two thirds of its lifetime; anything else is
//! re-issued. A CA past two thirds of its lifetime gets a successor that is published in the
//! trust bundle first and signs only after [`PkiConfig::ca_propagation`], so every pod trusts
//! the new CA before it meets a certificate signed by it. Old CAs leave the bundle when they
//! expire.

pub mod authority;
mod ca_secret;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_runtime::tls::{Credentials, Role, TlsFiles};
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::runtime::{
    WatchStreamExt as _,
    reflector::{self, ObjectRef, Store},
    watcher,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use self::{
    authority::{Authority, CertError, Issued, LeafSpec, Validity},
    ca_secret::{CA_SECRET, CaPlan, CaSecret, plan_ca},
};
use crate::cluster::kube_util::{self, ApiError};

/// Lifetimes and timings of the agent's certificates.
#[derive(Clone, Copy, Debug)]
pub struct PkiConfig {
    pub ca_lifetime: Duration,
    pub leaf_lifetime: Duration,
    /// Lifetime of an operator certificate issued on request.
    pub operator_lifetime: Duration,
    /// How long a new CA sits in the trust bundle before it signs.
    pub ca_propagation: Duration,
    pub check_interval: Duration,
}

/// The components whose leaves are delivered as Secrets.
pub const SECRET_ROLES: [Role; 3] = [Role::Poller, Role::Updater, Role::Operator];

/// Name of the Secret holding `role`'s leaf.
pub fn leaf_secret_name(role: Role) -> String {
    format!("distr-agent-{role}-tls")
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("Secret {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: ApiError,
    },
    #[error("Secret {name} was changed by someone else meanwhile; trying again")]
    Conflict { name: String },
}

impl PkiError {
    /// A benign race with another writer, which the next check resolves: not an error worth
    /// an operator's attention.
    pub fn is_race(&self) -> bool {
        matches!(self, PkiError::Conflict { .. })
    }
}

/// Keeps the CA and the leaves current.
pub struct Pki {
    secrets: Api<Secret>,
    namespace: String,
    config: PkiConfig,
    own: watch::Sender<Option<Arc<Credentials>>>,
    /// The PKI's Secrets as the watches see them, once [`Pki::run`] started them.
    watched: BTreeMap<String, Store<Secret>>,
}

impl Pki {
    pub fn new(client: kube::Client, namespace: &str, config: PkiConfig) -> Self {
        Self {
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            config,
            own: watch::channel(None).0,
            watched: BTreeMap::new(),
        }
    }

    /// The executor's own serving credentials, as they are re-issued.
    pub fn own_credentials(&self) -> agent_runtime::tls::CredentialsWatch {
        self.own.subscribe()
    }

    /// Checks until `shutdown`, on each change of its Secrets and each check interval;
    /// failures are logged and retried at the next check.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let changed = Arc::new(Notify::new());
        let names = std::iter::once(CA_SECRET.to_owned()).chain(SECRET_ROLES.into_iter().map(leaf_secret_name));
        for name in names {
            let (store, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(
                    self.secrets.clone(),
                    watcher::Config::default().fields(&format!("metadata.name={name}")),
                ),
            )
            .default_backoff();
            let (changed, shutdown) = (changed.clone(), shutdown.clone());
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                loop {
                    let event = tokio::select! {
                        event = stream.next() => event,
                        () = shutdown.cancelled() => return,
                    };
                    match event {
                        None => return,
                        Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => changed.notify_one(),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => tracing::debug!(%error, "the certificate Secret watch failed; it restarts"),
                    }
                }
            });
            self.watched.insert(name, store);
        }
        loop {
            match self.check().await {
                Ok(()) => {}
                // Another writer (a second executor at start-up, or its own watch running
                // ahead) won a race: the next check reads what it wrote. No fault.
                Err(error) if error.is_race() => {
                    tracing::info!(%error, "a certificate Secret changed while it was being written")
                }
                Err(error) => tracing::error!(%error, "cannot keep the agent's certificates current"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.check_interval) => {}
                () = changed.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The Secret `name`: from its watch once that has listed, otherwise from the API.
    async fn read(&self, name: &str) -> Result<Option<Secret>, ApiError> {
        if let Some(store) = self.watched.get(name)
            && store.wait_until_ready().now_or_never().is_some()
        {
            let key = ObjectRef::new(name).within(&self.namespace);
            return Ok(store.get(&key).map(|secret| (*secret).clone()));
        }
        kube_util::call_opt(self.secrets.get(name)).await
    }

    /// One pass: the CA, the executor's own certificate, then each component's Secret.
    pub async fn check(&self) -> Result<(), PkiError> {
        let now = SystemTime::now();
        let (signing, bundle) = self.current_ca(now).await?;
        self.check_own(&signing, &bundle, now)?;
        for role in SECRET_ROLES {
            self.check_leaf(role, &signing, &bundle, now).await?;
        }
        Ok(())
    }

    async fn current_ca(&self, now: SystemTime) -> Result<(Authority, String), PkiError> {
        let api_error = |source| PkiError::Api {
            name: CA_SECRET.to_owned(),
            source,
        };
        let stored = self.read(CA_SECRET).await.map_err(api_error)?;
        let current = stored.as_ref().map(CaSecret::from_secret);
        let ca = match plan_ca(current.as_ref(), &self.namespace, &self.config, now)? {
            CaPlan::Keep(ca) => ca,
            CaPlan::Write { ca, reason } => {
                let mut secret = ca.to_secret(&self.namespace);
                let written = match &stored {
                    // Create-only: when another executor created it first, use theirs.
                    None => kube_util::call(self.secrets.create(&PostParams::default(), &secret)).await,
                    Some(stored) => {
                        secret.metadata.resource_version = stored.metadata.resource_version.clone();
                        kube_util::call(self.secrets.replace(CA_SECRET, &PostParams::default(), &secret)).await
                    }
                };
                match written {
                    Ok(_) => tracing::info!(reason, "wrote the agent's CA"),
                    Err(error) if error.is_conflict() => {
                        return Err(PkiError::Conflict {
                            name: CA_SECRET.to_owned(),
                        });
                    }
                    Err(error) => return Err(api_error(error)),
                }
                ca
            }
        };
        let (cert, key) = ca
            .signing
            .as_ref()
            .ok_or_else(|| CertError::Parse("no signing CA".into()))?;
        Ok((Authority::from_pem(cert, key)?, ca.bundle_pem()))
    }

    fn check_own(&self, signing: &Authority, bundle: &str, now: SystemTime) -> Result<(), PkiError> {
        let current = self.own.borrow().clone();
        if let Some(current) = current
            && leaf_is_current(&current.files, signing, bundle, now)
        {
            return Ok(());
        }
        let leaf = signing.issue(
            &LeafSpec::for_role(Role::Executor, &self.namespace),
            self.config.leaf_lifetime,
            now,
        )?;
        let credentials = Credentials::from_files(files(&leaf, bundle), &self.namespace)
            .map_err(|e| CertError::Parse(e.to_string()))?;
        tracing::info!(serial = %credentials.serial, "issued the executor's serving certificate");
        self.own.send_replace(Some(Arc::new(credentials)));
        Ok(())
    }

    async fn check_leaf(&self, role: Role, signing: &Authority, bundle: &str, now: SystemTime) -> Result<(), PkiError> {
        let name = leaf_secret_name(role);
        let api_error = |source| PkiError::Api {
            name: name.clone(),
            source,
        };
        let stored = self.read(&name).await.map_err(api_error)?;
        let lifetime = if role == Role::Operator {
            match operator_plan(stored.as_ref(), bundle, now) {
                OperatorPlan::Nothing => return Ok(()),
                OperatorPlan::Issue => self.config.operator_lifetime,
                OperatorPlan::Remove { resource_version } => {
                    let params = kube::api::DeleteParams {
                        preconditions: Some(kube::api::Preconditions {
                            resource_version: Some(resource_version),
                            uid: None,
                        }),
                        ..Default::default()
                    };
                    return match kube_util::call(self.secrets.delete(&name, &params)).await {
                        Ok(_) => {
                            tracing::info!(secret = %name, "the operator certificate expired; removed its Secret");
                            Ok(())
                        }
                        Err(error) if error.is_conflict() || error.is_not_found() => Ok(()),
                        Err(error) => Err(api_error(error)),
                    };
                }
            }
        } else {
            if let Some(files) = stored.as_ref().and_then(files_of)
                && leaf_is_current(&files, signing, bundle, now)
            {
                return Ok(());
            }
            self.config.leaf_lifetime
        };
        let leaf = signing.issue(&LeafSpec::for_role(role, &self.namespace), lifetime, now)?;
        let mut secret = leaf_secret(&name, &self.namespace, &leaf, bundle);
        if role == Role::Operator
            && let Some(stored) = &stored
        {
            // The request keeps its type (`kubectl create secret generic` makes it Opaque) and
            // its labels: replacing the object would make the request vanish for a moment.
            secret.type_.clone_from(&stored.type_);
            let mut labels = stored.metadata.labels.clone().unwrap_or_default();
            labels.extend(managed_labels());
            secret.metadata.labels = Some(labels);
        }
        let written = match &stored {
            None => kube_util::call(self.secrets.create(&PostParams::default(), &secret)).await,
            Some(stored) if stored.type_.as_deref() == secret.type_.as_deref() => {
                secret.metadata.resource_version = stored.metadata.resource_version.clone();
                kube_util::call(self.secrets.replace(&name, &PostParams::default(), &secret)).await
            }
            // The type of a Secret cannot change: replace the object.
            Some(_) => {
                kube_util::call(self.secrets.delete(&name, &Default::default()))
                    .await
                    .map_err(api_error)?;
                kube_util::call(self.secrets.create(&PostParams::default(), &secret)).await
            }
        };
        match written {
            Ok(_) => {
                let validity = Validity::of_pem(&leaf.cert_pem)?;
                let lifetime = validity.not_after.duration_since(now).unwrap_or_default();
                tracing::info!(secret = %name, %role, lifetime_seconds = lifetime.as_secs(), "issued a certificate");
                Ok(())
            }
            Err(error) if error.is_conflict() => Err(PkiError::Conflict { name }),
            Err(error) => Err(api_error(error)),
        }
    }
}

/// What the operator's Secret asks for.
#[derive(Debug, PartialEq, Eq)]
enum OperatorPlan {
    /// No Secret (nobody asked), or a certificate that is still valid: leave it alone.
    Nothing,
    /// A Secret without a certificate: a request.
    Issue,
    /// A certificate that has expired, that no CA of the trust bundle vouches for any more (the
    /// CA was replaced to revoke it), or that cannot be read: delete the Secret of this version.
    Remove { resource_version: String },
}

fn operator_plan(stored: Option<&Secret>, bundle: &str, now: SystemTime) -> OperatorPlan {
    let Some(secret) = stored else {
        return OperatorPlan::Nothing;
    };
    let cert = secret.data.as_ref().and_then(|data| data.get("tls.crt"));
    let Some(cert) = cert.filter(|cert| !cert.0.is_empty()) else {
        return OperatorPlan::Issue;
    };
    let unexpired = std::str::from_utf8(&cert.0)
        .ok()
        .and_then(|pem| Validity::of_pem(pem).ok())
        .is_some_and(|validity| !validity.expired(now));
    let trusted = files_of(secret).is_some_and(|files| {
        let by_bundle = TlsFiles {
            ca_bundle: bundle.as_bytes().to_vec(),
            ..files
        };
        // Any namespace will do: only the chain and the key are checked here.
        match Credentials::from_files(by_bundle, "-") {
            Ok(_) => true,
            Err(error) => error.depends_on_time(),
        }
    });
    match (unexpired && trusted, secret.metadata.resource_version.clone()) {
        (false, Some(resource_version)) => OperatorPlan::Remove { resource_version },
        _ => OperatorPlan::Nothing,
    }
}

fn files(leaf: &Issued, bundle: &str) -> TlsFiles {
    TlsFiles {
        cert_chain: leaf.cert_pem.clone().into_bytes(),
        key: leaf.key_pem.clone().into_bytes(),
        ca_bundle: bundle.as_bytes().to_vec(),
    }
}

/// The leaf in `files` was issued by `signing`, carries `bundle`, and is not due for renewal.
fn leaf_is_current(files: &TlsFiles, signing: &Authority, bundle: &str, now: SystemTime) -> bool {
    if files.ca_bundle != bundle.as_bytes() {
        return false;
    }
    let Ok(cert) = std::str::from_utf8(&files.cert_chain) else {
        return false;
    };
    let Ok(validity) = Validity::of_pem(cert) else {
        return false;
    };
    if validity.renewal_due(now) {
        return false;
    }
    let by_signing = TlsFiles {
        ca_bundle: signing.cert_pem.clone().into_bytes(),
        ..files.clone()
    };
    // Any namespace will do: only the chain and the key are checked here.
    Credentials::from_files(by_signing, "-").is_ok()
}

fn files_of(secret: &Secret) -> Option<TlsFiles> {
    let data = secret.data.as_ref()?;
    let get = |key: &str| data.get(key).map(|v| v.0.clone());
    Some(TlsFiles {
        cert_chain: get("tls.crt")?,
        key: get("tls.key")?,
        ca_bundle: get("ca.crt")?,
    })
}

/// Labels on every Secret the executor's CA writes.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/part-of".to_owned(), "distr-agent".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "distr-agent-executor".to_owned(),
        ),
    ])
}

fn leaf_secret(name: &str, namespace: &str, leaf: &Issued, bundle: &str) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), bytes(&leaf.cert_pem)),
            ("tls.key".to_owned(), bytes(&leaf.key_pem)),
            ("ca.crt".to_owned(), bytes(bundle)),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn secret(data: Option<BTreeMap<String, ByteString>>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(leaf_secret_name(Role::Operator)),
                resource_version: Some("42".into()),
                ..Default::default()
            },
            data,
            ..Default::default()
        }
    }

    /// An operator's Secret filled by a new CA, and that CA's bundle.
    fn with_cert(lifetime: Duration, now: SystemTime) -> (Secret, String) {
        let ca = Authority::generate("ns1", 24 * HOUR, now).expect("CA");
        let leaf = ca
            .issue(&LeafSpec::for_role(Role::Operator, "ns1"), lifetime, now)
            .expect("leaf");
        let mut secret = leaf_secret("distr-agent-operator-tls", "ns1", &leaf, &ca.cert_pem);
        secret.metadata.resource_version = Some("42".into());
        (secret, ca.cert_pem)
    }

    #[test]
    fn an_operator_certificate_is_issued_only_on_request() {
        let now = SystemTime::now();
        assert_eq!(operator_plan(None, "", now), OperatorPlan::Nothing, "nobody asked");
        // `kubectl create secret generic distr-agent-operator-tls` makes a Secret without data.
        assert_eq!(operator_plan(Some(&secret(None)), "", now), OperatorPlan::Issue);
        assert_eq!(
            operator_plan(Some(&secret(Some(BTreeMap::new()))), "", now),
            OperatorPlan::Issue
        );
    }

    #[test]
    fn an_operator_certificate_is_not_renewed_and_removed_once_expired() {
        let issued_at = SystemTime::now() - 2 * HOUR;
        let (mut stored, bundle) = with_cert(HOUR, issued_at);
        stored.metadata.resource_version = Some("7".into());
        // Past two thirds of its lifetime: a component's leaf would be renewed; this one is not.
        let at_three_quarters = issued_at + HOUR * 3 / 4;
        assert_eq!(
            operator_plan(Some(&stored), &bundle, at_three_quarters),
            OperatorPlan::Nothing
        );
        assert_eq!(
            operator_plan(Some(&stored), &bundle, issued_at + 2 * HOUR),
            OperatorPlan::Remove {
                resource_version: "7".into()
            }
        );
    }

    #[test]
    fn an_unreadable_operator_certificate_is_removed() {
        let garbage = secret(Some(BTreeMap::from([(
            "tls.crt".to_owned(),
            ByteString(b"not a certificate".to_vec()),
        )])));
        assert_eq!(
            operator_plan(Some(&garbage), "", SystemTime::now()),
            OperatorPlan::Remove {
                resource_version: "42".into()
            }
        );
    }

    #[test]
    fn an_operator_certificate_of_a_replaced_ca_is_removed() {
        let now = SystemTime::now();
        let (stored, _) = with_cert(HOUR, now);
        let (_, new_bundle) = with_cert(HOUR, now);
        assert_eq!(
            operator_plan(Some(&stored), &new_bundle, now),
            OperatorPlan::Remove {
                resource_version: "42".into()
            }
        );
    }

    #[test]
    fn leaves_are_backdated_for_clocks_that_lag() {
        let now = SystemTime::now();
        let ca = Authority::generate("ns1", 24 * HOUR, now).expect("CA");
        let leaf = ca
            .issue(&LeafSpec::for_role(Role::Poller, "ns1"), 7 * 24 * HOUR, now)
            .expect("leaf");
        let validity = Validity::of_pem(&leaf.cert_pem).expect("validity");
        let backdated = now
            .duration_since(validity.not_before)
            .expect("not_before is in the past");
        assert!(backdated >= Duration::from_secs(299), "{backdated:?}");
    }

    #[test]
    fn a_lost_race_for_a_certificate_secret_is_no_error() {
        let race = PkiError::Conflict {
            name: leaf_secret_name(Role::Poller),
        };
        assert!(race.is_race(), "{race}");
        assert!(!PkiError::Cert(CertError::Parse("bad".into())).is_race());
    }
}
