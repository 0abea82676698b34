//! The cluster as the updater sees it: the agent's own objects, by kind and name, read,
//! server-side applied (or dry-run) and deleted, through the [`AgentObjects`] trait. [`Kube`]
//! is the real one; the engine's unit tests use one in memory that allows what the updater's
//! Role allows.

use std::time::Duration;

use k8s_openapi::api::{
    admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
};
use serde_json::Value;

/// The field manager of every write of the updater.
pub const FIELD_MANAGER: &str = "distr-agent-updater";

/// A failed call to the Kubernetes API, by what a caller can do about it: [`ApiError::retryable`]
/// says whether the same call may succeed later.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The object does not exist (404).
    #[error("{what}: not found")]
    NotFound { what: String },
    /// Someone else wrote the object since it was read (409): the write is lost; read again.
    #[error("{what}: changed by someone else meanwhile ({message})")]
    Conflict { what: String, message: String },
    /// The updater's RBAC does not allow the call (403): trying again changes nothing.
    #[error("{what}: forbidden: {message}")]
    Forbidden { what: String, message: String },
    /// The API server refused the request itself (another 4xx: an invalid object, an
    /// immutable field): trying the same again changes nothing.
    #[error("{what}: {message} ({code})")]
    Refused { what: String, code: u16, message: String },
    /// The API server failed, asked to slow down (5xx, 408, 429), or the request failed on
    /// the way: retryable.
    #[error("{what}: {message}")]
    Unavailable { what: String, message: String },
    /// No answer within [`agent_runtime::API_TIMEOUT`]: retryable.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    /// A kind the updater does not handle (a bug, not the cluster's doing).
    #[error("{kind} is no kind the updater knows")]
    UnknownKind { kind: String },
}

impl ApiError {
    /// Whether the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, ApiError::Unavailable { .. } | ApiError::Timeout { .. })
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::NotFound { .. })
    }

    /// An answer of the API server about the object itself (its content or the updater's
    /// rights), as opposed to a failure to get an answer.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ApiError::Forbidden { .. } | ApiError::Refused { .. })
    }

    /// The error of `call` on `what`.
    pub fn from_kube(what: String, error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => {
                let message = status.message.clone();
                match status.code {
                    404 => ApiError::NotFound { what },
                    409 => ApiError::Conflict { what, message },
                    403 => ApiError::Forbidden { what, message },
                    408 | 429 => ApiError::Unavailable { what, message },
                    code @ 400..=499 => ApiError::Refused { what, code, message },
                    code => ApiError::Unavailable {
                        what,
                        message: format!("{message} ({code})"),
                    },
                }
            }
            other => ApiError::Unavailable {
                what,
                message: other.to_string(),
            },
        }
    }
}

/// The agent's own objects in the cluster.
#[tonic::async_trait]
pub trait AgentObjects: Send + Sync {
    /// The object as the cluster has it; `None` when it does not exist.
    async fn get(&self, kind: &str, name: &str) -> Result<Option<Value>, ApiError>;
    /// Server-side applies `body` (forced, field manager [`FIELD_MANAGER`]), or asks the API
    /// server whether it would (`dry_run`); the object as it is (or would be) stored.
    async fn apply(&self, kind: &str, name: &str, body: &Value, dry_run: bool) -> Result<Value, ApiError>;
    /// Deletes the object; done when it does not exist.
    async fn delete(&self, kind: &str, name: &str) -> Result<(), ApiError>;
}

/// The agent's objects through the Kubernetes API, each call bounded by
/// [`agent_runtime::API_TIMEOUT`].
pub struct Kube {
    client: kube::Client,
    namespace: String,
}

impl Kube {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
        }
    }

    fn api(&self, kind: &str) -> Result<Api<DynamicObject>, ApiError> {
        let resource = resource(kind).ok_or_else(|| ApiError::UnknownKind { kind: kind.to_owned() })?;
        Ok(
            if kind.starts_with("Cluster") || kind.starts_with("ValidatingAdmission") {
                Api::all_with(self.client.clone(), &resource)
            } else {
                Api::namespaced_with(self.client.clone(), &self.namespace, &resource)
            },
        )
    }
}

/// Runs `call` within [`agent_runtime::API_TIMEOUT`].
async fn timed<T>(what: String, call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, ApiError> {
    match tokio::time::timeout(agent_runtime::API_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(ApiError::from_kube(what, error)),
        Err(_) => Err(ApiError::Timeout {
            what,
            timeout: agent_runtime::API_TIMEOUT,
        }),
    }
}

fn to_value(what: &str, object: DynamicObject) -> Result<Value, ApiError> {
    serde_json::to_value(object).map_err(|error| ApiError::Unavailable {
        what: what.to_owned(),
        message: format!("the answer cannot be read: {error}"),
    })
}

#[tonic::async_trait]
impl AgentObjects for Kube {
    async fn get(&self, kind: &str, name: &str) -> Result<Option<Value>, ApiError> {
        let what = format!("reading {kind} {name}");
        match timed(what.clone(), self.api(kind)?.get(name)).await {
            Ok(object) => to_value(&what, object).map(Some),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn apply(&self, kind: &str, name: &str, body: &Value, dry_run: bool) -> Result<Value, ApiError> {
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        let what = if dry_run {
            params = params.dry_run();
            format!("dry run of {kind} {name}")
        } else {
            format!("applying {kind} {name}")
        };
        let stored = timed(what.clone(), self.api(kind)?.patch(name, &params, &Patch::Apply(body))).await?;
        to_value(&what, stored)
    }

    async fn delete(&self, kind: &str, name: &str) -> Result<(), ApiError> {
        let what = format!("deleting {kind} {name}");
        match timed(what, self.api(kind)?.delete(name, &DeleteParams::default())).await {
            Err(error) if !error.is_not_found() => Err(error),
            _ => Ok(()),
        }
    }
}

/// The API resource of `kind`, one of the kinds a manifest may hold.
fn resource(kind: &str) -> Option<ApiResource> {
    Some(match kind {
        "ServiceAccount" => ApiResource::erase::<ServiceAccount>(&()),
        "ConfigMap" => ApiResource::erase::<ConfigMap>(&()),
        "Secret" => ApiResource::erase::<Secret>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "NetworkPolicy" => ApiResource::erase::<NetworkPolicy>(&()),
        "Deployment" => ApiResource::erase::<Deployment>(&()),
        "Role" => ApiResource::erase::<Role>(&()),
        "RoleBinding" => ApiResource::erase::<RoleBinding>(&()),
        "ClusterRole" => ApiResource::erase::<ClusterRole>(&()),
        "ClusterRoleBinding" => ApiResource::erase::<ClusterRoleBinding>(&()),
        "ValidatingAdmissionPolicy" => ApiResource::erase::<ValidatingAdmissionPolicy>(&()),
        "ValidatingAdmissionPolicyBinding" => ApiResource::erase::<ValidatingAdmissionPolicyBinding>(&()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("from the test", "Reason")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn errors_are_told_apart_by_what_can_be_done_about_them() {
        let of = |code| ApiError::from_kube("reading ConfigMap x".into(), api_error(code));
        assert!(of(404).is_not_found());
        assert!(matches!(of(409), ApiError::Conflict { .. }));
        assert!(matches!(of(403), ApiError::Forbidden { .. }) && of(403).is_refusal());
        assert!(matches!(of(422), ApiError::Refused { code: 422, .. }) && !of(422).retryable());
        for transient in [408, 429, 500, 503] {
            assert!(of(transient).retryable(), "{transient}");
            assert!(!of(transient).is_refusal(), "{transient}");
        }
        let timeout = ApiError::Timeout {
            what: "x".into(),
            timeout: agent_runtime::API_TIMEOUT,
        };
        assert!(timeout.retryable());
    }
}

/// An in-memory cluster for unit tests: the objects by kind and name, answering only what the
/// updater's Role and ClusterRole (`deploy/manifest.yaml.tmpl`) allow, with failures and delays
/// on demand.
#[cfg(test)]
pub mod fake {
    use agent_runtime::sync::MutexExt as _;
    use std::{
        collections::BTreeMap,
        sync::{
            Mutex, MutexGuard,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use serde_json::{Value, json};

    use super::{AgentObjects, ApiError};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Call {
        Get,
        Apply,
        DryRun,
        Delete,
    }

    type Rollout = Box<dyn Fn(&Value) -> bool + Send + Sync>;

    #[derive(Default)]
    pub struct FakeObjects {
        objects: Mutex<BTreeMap<(String, String), Value>>,
        /// Calls to fail, once each, after letting that many matching calls through.
        failures: Mutex<Vec<(Call, String, String, usize)>>,
        delays: Mutex<Vec<(Call, String, Duration)>>,
        calls: Mutex<Vec<(Call, String, String)>>,
        rollout: Mutex<Option<Rollout>>,
        /// Every body written (not dry runs), in order.
        written: Mutex<Vec<(String, String, Value)>>,
        version: AtomicU64,
    }

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.locked()
    }

    /// What the updater's Role and ClusterRole allow: `verb` on `kind` `name`.
    fn role_allows(verb: &str, kind: &str, name: &str) -> bool {
        let (names, verbs): (&[&str], &[&str]) = match kind {
            "Deployment" => (
                &["distr-agent", "distr-agent-executor", "distr-agent-updater"],
                &["get", "create", "patch"],
            ),
            "ConfigMap" => (&["distr-agent-env"], &["get", "create", "patch"]),
            "Service" => (
                &["distr-agent-executor", "distr-agent-updater"],
                &["get", "create", "patch", "delete"],
            ),
            "ServiceAccount" => (
                &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
                &["get", "create", "patch"],
            ),
            "NetworkPolicy" => (
                &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
                &["get", "create", "patch", "delete"],
            ),
            "Secret" => (
                &["distr-agent-image-pull", "distr-agent-updater-state"],
                &["get", "patch"],
            ),
            _ => (&[name], &["get"]),
        };
        names.contains(&name) && verbs.contains(&verb)
    }

    impl FakeObjects {
        pub fn put(&self, kind: &str, name: &str, mut object: Value) {
            object["metadata"]["resourceVersion"] = json!(self.version.fetch_add(1, Ordering::SeqCst).to_string());
            lock(&self.objects).insert((kind.to_owned(), name.to_owned()), object);
        }

        /// The object as stored, without asking as the updater.
        pub fn get_now(&self, kind: &str, name: &str) -> Option<Value> {
            lock(&self.objects).get(&(kind.to_owned(), name.to_owned())).cloned()
        }

        /// The next `call` on `kind` `name` fails with a 500.
        pub fn fail_once(&self, call: Call, kind: &str, name: &str) {
            self.fail_once_after(call, kind, name, 0);
        }

        /// The `call` on `kind` `name` after the next `skip` ones fails with a 500.
        pub fn fail_once_after(&self, call: Call, kind: &str, name: &str, skip: usize) {
            lock(&self.failures).push((call, kind.to_owned(), name.to_owned(), skip));
        }

        /// Every `call` on objects of `kind` answers after `delay`.
        pub fn delay(&self, call: Call, kind: &str, delay: Duration) {
            lock(&self.delays).push((call, kind.to_owned(), delay));
        }

        /// Deployments roll out when `rolls_out` says so of what they run.
        pub fn rollout(&self, rolls_out: impl Fn(&Value) -> bool + Send + Sync + 'static) {
            *lock(&self.rollout) = Some(Box::new(rolls_out));
        }

        pub fn calls(&self) -> Vec<(Call, String, String)> {
            lock(&self.calls).clone()
        }

        /// Every body written to `kind` `name`, in order.
        pub fn written(&self, kind: &str, name: &str) -> Vec<Value> {
            lock(&self.written)
                .iter()
                .filter(|(k, n, _)| k == kind && n == name)
                .map(|(_, _, body)| body.clone())
                .collect()
        }

        async fn enter(&self, call: Call, kind: &str, name: &str) -> Result<(), ApiError> {
            lock(&self.calls).push((call, kind.to_owned(), name.to_owned()));
            let delay = lock(&self.delays)
                .iter()
                .find(|(c, k, _)| *c == call && k == kind)
                .map(|(_, _, delay)| *delay);
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let what = format!("{call:?} {kind} {name}");
            let verb = match call {
                Call::Get => "get",
                Call::Apply | Call::DryRun if self.get_now(kind, name).is_none() => "create",
                Call::Apply | Call::DryRun => "patch",
                Call::Delete => "delete",
            };
            if !role_allows(verb, kind, name) {
                return Err(ApiError::Forbidden {
                    what,
                    message: format!("the updater may not {verb} it"),
                });
            }
            let mut failures = lock(&self.failures);
            if let Some(at) = failures
                .iter()
                .position(|(c, k, n, _)| *c == call && k == kind && n == name)
            {
                if failures[at].3 > 0 {
                    failures[at].3 -= 1;
                    return Ok(());
                }
                failures.remove(at);
                return Err(ApiError::Unavailable {
                    what,
                    message: "the fake failed as asked (500)".into(),
                });
            }
            Ok(())
        }
    }

    #[tonic::async_trait]
    impl AgentObjects for FakeObjects {
        async fn get(&self, kind: &str, name: &str) -> Result<Option<Value>, ApiError> {
            self.enter(Call::Get, kind, name).await?;
            let mut object = self.get_now(kind, name);
            if kind == "Deployment"
                && let Some(deployment) = object.as_mut()
            {
                let done = lock(&self.rollout)
                    .as_ref()
                    .is_some_and(|rolls_out| rolls_out(deployment));
                let n = i64::from(done);
                deployment["status"] =
                    json!({"replicas": 1, "updatedReplicas": 1, "readyReplicas": n, "availableReplicas": n});
            }
            Ok(object)
        }

        async fn apply(&self, kind: &str, name: &str, body: &Value, dry_run: bool) -> Result<Value, ApiError> {
            self.enter(if dry_run { Call::DryRun } else { Call::Apply }, kind, name)
                .await?;
            let stored = self.get_now(kind, name);
            if let Some(wanted) = body["metadata"]["resourceVersion"].as_str()
                && stored.as_ref().map(|s| &s["metadata"]["resourceVersion"]) != Some(&json!(wanted))
            {
                return Err(ApiError::Conflict {
                    what: format!("applying {kind} {name}"),
                    message: "the object has been modified".into(),
                });
            }
            if dry_run {
                return Ok(body.clone());
            }
            lock(&self.written).push((kind.to_owned(), name.to_owned(), body.clone()));
            self.put(kind, name, body.clone());
            Ok(self.get_now(kind, name).unwrap_or_default())
        }

        async fn delete(&self, kind: &str, name: &str) -> Result<(), ApiError> {
            self.enter(Call::Delete, kind, name).await?;
            lock(&self.objects).remove(&(kind.to_owned(), name.to_owned()));
            Ok(())
        }
    }
}
