//! Which namespace the releases live in, and what a change of the Hub's `namespace` may do.
//!
//! A change of namespace never uninstalls anything:
//! - A namespace-scoped agent deploys only to its own namespace: the Hub naming another is an
//!   error on every deployment, and nothing is touched.
//! - A cluster-scoped agent follows the Hub to a new namespace only once the releases it
//!   installed in the old one are gone: the Hub undeploys them explicitly, by naming the old
//!   namespace without them. Until then every deployment reports the move as an error naming
//!   the releases left behind, and nothing is touched.
//! - The Hub naming no namespace means "unchanged": the namespace in use (the agent's own at
//!   first), never a fall-back that would move every release.
//!
//! A cluster-scoped executor records the namespace in use in the ConfigMap [`RECORD_NAME`] of
//! its own namespace, so that a restart changes nothing of the above.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams},
};

use crate::cluster::kube_util::{self, ApiError};

/// The ConfigMap (in the agent's namespace) where a cluster-scoped executor records the
/// namespace of its releases.
pub const RECORD_NAME: &str = "distr-agent-executor-state";
/// Its key holding the namespace.
const NAMESPACE_KEY: &str = "namespace";
const FIELD_MANAGER: &str = "distr-agent-executor";

/// What the executor may deploy to (`AGENT_SCOPE`, the manifest's `targetScope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Scope {
    /// Only the agent's own namespace (a namespace-admin Role).
    #[default]
    Namespace,
    /// Any namespace the Hub names (cluster-admin).
    Cluster,
}

/// What a `sync` naming `named` does, given the namespace in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Go on in this namespace, which is the one in use.
    Keep(String),
    /// Go on in `to` once the releases of `from` are gone (`from` is `None` when no namespace
    /// was recorded yet: nothing to check); `to` becomes the namespace in use.
    Move { from: Option<String>, to: String },
    /// Touch nothing; every deployment gets this error.
    Refused(String),
}

/// Decides from the scope, the agent's own namespace, the namespace in use (`None`: none
/// recorded yet) and the one the Hub names (`None`: absent).
pub fn resolve(scope: Scope, own: &str, in_use: Option<&str>, named: Option<&str>) -> Resolved {
    match scope {
        Scope::Namespace => match named {
            Some(named) if named != own => Resolved::Refused(format!(
                "the agent is namespace-scoped: it deploys only to its own namespace {own}, not to {named}"
            )),
            _ => Resolved::Keep(own.to_owned()),
        },
        Scope::Cluster => {
            let to = named.or(in_use).unwrap_or(own);
            match in_use {
                Some(current) if current == to => Resolved::Keep(to.to_owned()),
                _ => Resolved::Move {
                    from: in_use.map(str::to_owned),
                    to: to.to_owned(),
                },
            }
        }
    }
}

/// The error every deployment reports while the releases of the old namespace are installed.
pub fn move_refused(from: &str, to: &str, left: &[String]) -> String {
    format!(
        "the Hub moved the deployments from namespace {from} to {to}, but the agent installed {} in {from}; \
         a change of namespace uninstalls nothing: undeploy them in {from} first (the Hub naming {from} \
         without them), then name {to} again",
        left.join(", ")
    )
}

/// The record of the namespace in use, in the agent's own namespace.
#[derive(Clone)]
pub struct NamespaceRecord {
    api: Api<ConfigMap>,
}

impl NamespaceRecord {
    pub fn new(client: kube::Client, own: &str) -> Self {
        Self {
            api: Api::namespaced(client, own),
        }
    }

    /// The recorded namespace, if any.
    pub async fn load(&self) -> Result<Option<String>, ApiError> {
        let found = kube_util::call_opt(self.api.get(RECORD_NAME)).await?;
        Ok(found
            .and_then(|config| config.data)
            .and_then(|mut data| data.remove(NAMESPACE_KEY))
            .filter(|namespace| !namespace.is_empty()))
    }

    /// Records `namespace` as the one in use.
    pub async fn save(&self, namespace: &str) -> Result<(), ApiError> {
        let config = ConfigMap {
            metadata: ObjectMeta {
                name: Some(RECORD_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(NAMESPACE_KEY.to_owned(), namespace.to_owned())])),
            ..ConfigMap::default()
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        kube_util::call(self.api.patch(RECORD_NAME, &params, &Patch::Apply(&config)))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_scoped_agent_refuses_any_other_namespace_and_keeps_its_own() {
        let own = "agent";
        assert_eq!(
            resolve(Scope::Namespace, own, None, Some("agent")),
            Resolved::Keep("agent".into())
        );
        assert_eq!(
            resolve(Scope::Namespace, own, None, None),
            Resolved::Keep("agent".into()),
            "absent: unchanged"
        );
        assert_eq!(
            resolve(Scope::Namespace, own, None, Some("other")),
            Resolved::Refused(
                "the agent is namespace-scoped: it deploys only to its own namespace agent, not to other".into()
            )
        );
    }

    #[test]
    fn a_cluster_scoped_agent_keeps_the_namespace_in_use_unless_the_hub_names_another() {
        let own = "agent";
        assert_eq!(
            resolve(Scope::Cluster, own, Some("apps"), Some("apps")),
            Resolved::Keep("apps".into())
        );
        assert_eq!(
            resolve(Scope::Cluster, own, Some("apps"), None),
            Resolved::Keep("apps".into()),
            "absent means unchanged, not the agent's namespace"
        );
        assert_eq!(
            resolve(Scope::Cluster, own, Some("apps"), Some("moved")),
            Resolved::Move {
                from: Some("apps".into()),
                to: "moved".into()
            }
        );
        assert_eq!(
            resolve(Scope::Cluster, own, None, Some("apps")),
            Resolved::Move {
                from: None,
                to: "apps".into()
            },
            "nothing recorded yet"
        );
        assert_eq!(
            resolve(Scope::Cluster, own, None, None),
            Resolved::Move {
                from: None,
                to: "agent".into()
            },
            "nothing named, nothing recorded: the agent's own, recorded from now on"
        );
    }

    #[test]
    fn the_refused_move_names_the_releases_and_what_to_do() {
        let message = move_refused("apps", "moved", &["db".into(), "web".into()]);
        assert!(message.contains("installed db, web in apps"), "{message}");
        assert!(message.contains("undeploy them in apps first"), "{message}");
    }
}
