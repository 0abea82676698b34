//! An agent manifest as the Hub serves it, checked before anything is applied: every object is
//! one of the agent's own (by kind and name), in the agent's namespace, the Deployments keep
//! their ServiceAccounts and run images of the agent's repository, and RBAC and admission
//! objects are only compared, never written (the updater holds no power to grant any).

use std::fmt;

use serde::Deserialize as _;
use serde_json::Value;

/// Bound on a manifest (the poller's bound on the Hub's manifest body).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// The kinds the updater writes, in the order it applies them (its own Deployment last).
const WRITABLE: [(&str, &str, &[&str]); 6] = [
    (
        "v1",
        "ServiceAccount",
        &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
    ),
    ("v1", "ConfigMap", &["distr-agent-env"]),
    ("v1", "Secret", &["distr-agent-image-pull"]),
    ("v1", "Service", &["distr-agent-executor", "distr-agent-updater"]),
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
    ),
    (
        "apps/v1",
        "Deployment",
        &["distr-agent-executor", "distr-agent", "distr-agent-updater"],
    ),
];

/// The updater's own state Secret, which the install manifest creates empty (the updater may
/// not create Secrets). A new version's manifest holds it too: the updater leaves it out, never
/// applying, recording or pruning it, so that a self-update never overwrites its record.
pub const STATE_SECRET: &str = "distr-agent-updater-state";

/// Kinds that grant rights: they must be exactly what the cluster has already.
const COMPARED: [(&str, &str); 6] = [
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"),
];

/// Why a manifest is refused, whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the manifest is {0} bytes, over the {MAX_MANIFEST_BYTES}-byte bound")]
    TooLarge(usize),
    #[error("the manifest is not valid YAML: {0}")]
    Yaml(String),
    #[error("document {index} is not a Kubernetes object: {reason}")]
    NotAnObject { index: usize, reason: String },
    #[error("{object} is in namespace {namespace}, not the agent's namespace {expected}")]
    OtherNamespace {
        object: String,
        namespace: String,
        expected: String,
    },
    #[error("{object} is not one of the agent's own objects; the updater changes nothing else")]
    NotOurs { object: String },
    #[error("{object} {reason}")]
    Deployment { object: String, reason: String },
    #[error("the manifest holds no Deployment of the agent")]
    NoDeployment,
    #[error("the API server refuses {object} (dry run): {reason}")]
    DryRun { object: String, reason: String },
    #[error(
        "{object} differs from what the cluster has: this version needs other rights, which the updater cannot grant; apply it with kubectl"
    )]
    RbacChange { object: String },
}

/// One object of the manifest. Its `Debug` leaves the body out: it may be a Secret.
#[derive(Clone, PartialEq)]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub body: Value,
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Object")
            .field("api_version", &self.api_version)
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// A checked manifest: what to apply, in order, and what to compare with the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub apply: Vec<Object>,
    pub compare: Vec<Object>,
}

/// The rules a manifest is checked against.
#[derive(Clone, Debug)]
pub struct Rules {
    pub namespace: String,
    /// Images must come from `<repository>/<component>`.
    pub image_repository: String,
}

/// Parses and checks `text`. Nothing is applied when this fails.
pub fn check(text: &str, rules: &Rules) -> Result<Checked, Refusal> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(Refusal::TooLarge(text.len()));
    }
    let mut apply = Vec::new();
    let mut compare = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| Refusal::Yaml(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let object = object(index, value)?;
        if let Some(namespace) = object.body["metadata"]["namespace"].as_str()
            && namespace != rules.namespace
        {
            return Err(Refusal::OtherNamespace {
                object: object.to_string(),
                namespace: namespace.to_owned(),
                expected: rules.namespace.clone(),
            });
        }
        if (object.api_version.as_str(), object.kind.as_str(), object.name.as_str()) == ("v1", "Secret", STATE_SECRET) {
            continue;
        }
        if COMPARED.contains(&(object.api_version.as_str(), object.kind.as_str())) {
            compare.push(object);
            continue;
        }
        let ours = WRITABLE.iter().any(|(api, kind, names)| {
            *api == object.api_version && *kind == object.kind && names.contains(&object.name.as_str())
        });
        if !ours {
            return Err(Refusal::NotOurs {
                object: object.to_string(),
            });
        }
        if object.kind == "Deployment" {
            check_deployment(&object, rules)?;
        }
        apply.push(object);
    }
    if !apply.iter().any(|o| o.kind == "Deployment") {
        return Err(Refusal::NoDeployment);
    }
    apply.sort_by_key(order);
    Ok(Checked { apply, compare })
}

fn object(index: usize, body: Value) -> Result<Object, Refusal> {
    let text = |v: &Value, what: &str| {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| Refusal::NotAnObject {
                index,
                reason: format!("no {what}"),
            })
    };
    Ok(Object {
        api_version: text(&body["apiVersion"], "apiVersion")?,
        kind: text(&body["kind"], "kind")?,
        name: text(&body["metadata"]["name"], "metadata.name")?,
        body,
    })
}

/// Position in the apply order: by kind as listed, Deployments executor, poller, updater.
fn order(object: &Object) -> (usize, usize) {
    position(&object.kind, &object.name)
}

/// Position of `kind` `name` in the apply order (dependencies first, the updater's own
/// Deployment last); unknown kinds after all others.
pub fn position(kind: &str, name: &str) -> (usize, usize) {
    WRITABLE
        .iter()
        .enumerate()
        .find(|(_, (_, k, _))| *k == kind)
        .map(|(k, (_, _, names))| (k, names.iter().position(|n| *n == name).unwrap_or(0)))
        .unwrap_or((usize::MAX, 0))
}

/// The agent's objects that a new version may drop, and the updater then deletes: Services and
/// NetworkPolicies (never a ServiceAccount, the ConfigMap the poller reads, a Secret or a
/// Deployment, which the agent cannot run without).
pub fn prunable() -> Vec<(&'static str, &'static str)> {
    WRITABLE
        .iter()
        .filter(|(_, kind, _)| matches!(*kind, "Service" | "NetworkPolicy"))
        .flat_map(|(_, kind, names)| names.iter().map(move |name| (*kind, *name)))
        .collect()
}

/// The component a Deployment runs.
pub fn component(deployment: &str) -> &str {
    match deployment {
        "distr-agent" => "poller",
        other => other.trim_start_matches("distr-agent-"),
    }
}

fn check_deployment(object: &Object, rules: &Rules) -> Result<(), Refusal> {
    let refuse = |reason: String| Refusal::Deployment {
        object: object.to_string(),
        reason,
    };
    let component = component(&object.name);
    let pod = &object.body["spec"]["template"]["spec"];
    let account = format!("distr-agent-{component}");
    if pod["serviceAccountName"].as_str() != Some(account.as_str()) {
        return Err(refuse(format!("must run under the ServiceAccount {account}")));
    }
    let image = format!("{}/{component}", rules.image_repository);
    let containers = pod["containers"].as_array().into_iter().flatten();
    let init = pod["initContainers"].as_array().into_iter().flatten();
    for container in containers.chain(init) {
        let found = container["image"].as_str().unwrap_or_default();
        let ok = found
            .strip_prefix(&image)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'));
        if !ok {
            return Err(refuse(format!("runs image {found:?}, not one of {image}")));
        }
    }
    Ok(())
}

/// Whether `live` (from the cluster) grants what `wanted` (from the manifest) grants: the same
/// rules, subjects, role reference or policy.
pub fn same_grant(wanted: &Value, live: &Value) -> bool {
    ["rules", "subjects", "roleRef", "spec"]
        .iter()
        .all(|key| normalized(&wanted[key]) == normalized(&live[key]))
}

/// Defaults the API server fills in, removed so that a manifest compares equal to its object.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null() && *v != &Value::Array(Vec::new()))
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            namespace: "agent".into(),
            image_repository: "ghcr.io/distr-sh/distr-agent".into(),
        }
    }

    fn deployment(name: &str, account: &str, image: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  template:\n    spec:\n      serviceAccountName: {account}\n      containers:\n        - name: c\n          image: {image}\n"
        )
    }

    fn ours() -> String {
        [
            deployment(
                "distr-agent-updater",
                "distr-agent-updater",
                "ghcr.io/distr-sh/distr-agent/updater:0.2.0",
            ),
            deployment(
                "distr-agent",
                "distr-agent-poller",
                "ghcr.io/distr-sh/distr-agent/poller:0.2.0",
            ),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\ndata: {}\n".into(),
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: distr-agent\n".into(),
        ]
        .join("---\n")
    }

    #[test]
    fn the_agents_own_objects_are_applied_in_order_and_rbac_only_compared() {
        let checked = check(&ours(), &rules()).expect("valid");
        let order: Vec<String> = checked.apply.iter().map(ToString::to_string).collect();
        assert_eq!(
            order,
            [
                "ConfigMap distr-agent-env",
                "Deployment distr-agent",
                "Deployment distr-agent-updater"
            ]
        );
        assert_eq!(checked.compare.len(), 1);
    }

    #[test]
    fn foreign_objects_namespaces_accounts_and_images_are_refused() {
        let other_ns = ours().replace(
            "name: distr-agent-env",
            "name: distr-agent-env\n  namespace: kube-system",
        );
        assert!(matches!(
            check(&other_ns, &rules()),
            Err(Refusal::OtherNamespace { .. })
        ));
        let foreign = format!("{}---\n{}", ours(), deployment("web", "default", "nginx"));
        assert!(matches!(check(&foreign, &rules()), Err(Refusal::NotOurs { .. })));
        let account = ours().replace(
            "serviceAccountName: distr-agent-poller",
            "serviceAccountName: distr-agent-executor",
        );
        let error = check(&account, &rules()).expect_err("account");
        assert!(
            error
                .to_string()
                .contains("must run under the ServiceAccount distr-agent-poller"),
            "{error}"
        );
        let image = ours().replace(
            "ghcr.io/distr-sh/distr-agent/poller:0.2.0",
            "ghcr.io/distr-sh/distr-agent/poller-evil:1",
        );
        assert!(matches!(check(&image, &rules()), Err(Refusal::Deployment { .. })));
        let crb = format!(
            "{}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: x\n",
            ours()
        );
        assert_eq!(check(&crb, &rules()).expect("compared").compare.len(), 2);
        assert!(matches!(check("a: [", &rules()), Err(Refusal::Yaml(_))));
        assert!(matches!(
            check("kind: ConfigMap\n", &rules()),
            Err(Refusal::NotAnObject { .. })
        ));
        let state_configmap = format!(
            "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {STATE_SECRET}\n",
            ours()
        );
        assert!(matches!(
            check(&state_configmap, &rules()),
            Err(Refusal::NotOurs { .. })
        ));
        let no_deployment = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\n";
        assert_eq!(check(no_deployment, &rules()), Err(Refusal::NoDeployment));
    }

    #[test]
    fn the_updaters_state_secret_in_a_new_version_is_left_alone() {
        let with_state = format!(
            "{}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {STATE_SECRET}\ntype: Opaque\ndata:\n  state.json: e30=\n",
            ours()
        );
        assert_eq!(check(&with_state, &rules()), check(&ours(), &rules()));
    }

    #[test]
    fn the_rendered_install_manifests_pass_without_their_state_secret() {
        for scope in ["namespace", "cluster"] {
            let path = format!("{}/../deploy/examples/{scope}.yaml", env!("CARGO_MANIFEST_DIR"));
            // As the manifest endpoint serves it for a self-update: without the target secret.
            let text: String = std::fs::read_to_string(&path)
                .expect("the example")
                .split("\n---")
                .filter(|doc| !doc.contains("name: distr-agent-auth\n"))
                .collect::<Vec<_>>()
                .join("\n---");
            let rules = Rules {
                namespace: "distr".into(),
                ..rules()
            };
            let checked = check(&text, &rules).unwrap_or_else(|e| panic!("{scope}: {e}"));
            assert!(text.contains(&format!("name: {STATE_SECRET}\n")), "{scope}");
            assert!(
                checked
                    .apply
                    .iter()
                    .chain(&checked.compare)
                    .all(|o| o.name != STATE_SECRET),
                "{scope}: the state Secret is left out"
            );
        }
    }

    #[test]
    fn grants_compare_without_server_defaults() {
        let wanted = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]});
        let live = serde_json::json!({"metadata": {"uid": "x"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": []}]});
        assert!(same_grant(&wanted, &live));
        let wider = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]});
        assert!(!same_grant(&wider, &live));
    }
}
