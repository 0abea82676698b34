//! An agent manifest as the Hub serves it, checked before anything is applied: every object is
//! one of the agent's own (by kind and name), in the agent's namespace, the Deployments keep
//! their ServiceAccounts and run images of the agent's repository, every object keeps the shape
//! of the agent's template ([`crate::shape`]), and RBAC and admission objects are only compared,
//! never written (the updater holds no power to grant any).

use std::fmt;

use serde::Deserialize as _;
use serde_json::Value;

/// Bound on a manifest. The updater records the manifest and the objects as they were in its
/// state Secret, which holds at most 1 MiB; today's manifests are about 25 KB. The poller
/// fetches no larger manifest from the Hub.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

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
    #[error("{object} {reason}; a version that changes it must be applied with kubectl")]
    Shape { object: String, reason: String },
    #[error("the manifest holds no Deployment of the agent")]
    NoDeployment,
    #[error("the API server refuses {object} (dry run): {reason}")]
    DryRun { object: String, reason: String },
    #[error(
        "the update cannot be recorded: with the objects as they are now it takes {bytes} bytes, over the {limit}-byte bound of the updater's state Secret"
    )]
    TooLargeToRecord { bytes: usize, limit: usize },
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
        check_fields(&object, rules)?;
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
        .filter(|(_, kind, _)| deletable(kind))
        .flat_map(|(_, kind, names)| names.iter().map(move |name| (*kind, *name)))
        .collect()
}

/// Whether the updater may delete objects of `kind` (its Role allows `delete` on these only).
pub fn deletable(kind: &str) -> bool {
    matches!(kind, "Service" | "NetworkPolicy")
}

/// The component a Deployment runs.
pub fn component(deployment: &str) -> &str {
    match deployment {
        "distr-agent" => "poller",
        other => other.trim_start_matches("distr-agent-"),
    }
}

/// The fields of one object the updater is about to write: a Deployment's ServiceAccount and
/// image repository, and the template's shape for every kind.
fn check_fields(object: &Object, rules: &Rules) -> Result<(), Refusal> {
    if object.kind == "Deployment" {
        check_deployment(object, rules)?;
    }
    crate::shape::check(&object.kind, &object.name, &object.body, &rules.image_repository).map_err(|reason| {
        Refusal::Shape {
            object: object.to_string(),
            reason,
        }
    })
}

/// Checks an object recorded before an update, as a roll-back is about to write it again, with
/// the rules a manifest's objects pass (anyone who could write the updater's state Secret chose
/// it).
pub fn recheck(kind: &str, name: &str, recorded: &serde_json::Value, rules: &Rules) -> Result<(), String> {
    let ours = WRITABLE.iter().any(|(_, k, names)| *k == kind && names.contains(&name));
    let object = Object {
        api_version: recorded["apiVersion"].as_str().unwrap_or_default().to_owned(),
        kind: kind.to_owned(),
        name: name.to_owned(),
        body: recorded.clone(),
    };
    if !ours {
        return Err(format!(
            "not re-applied: {}",
            Refusal::NotOurs {
                object: object.to_string()
            }
        ));
    }
    check_fields(&object, rules).map_err(|refusal| format!("not re-applied: {refusal}"))
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
/// rules, subjects, role reference or policy, as the API server stores them (see
/// [`SERVER_DEFAULTS`]).
pub fn same_grant(wanted: &Value, live: &Value) -> bool {
    ["rules", "subjects", "roleRef", "spec"]
        .iter()
        .all(|key| normalized(&wanted[key]) == normalized(&live[key]))
}

/// Fields the API server fills in when a manifest leaves them out, with the value it fills
/// (`admissionregistration.k8s.io/v1` defaulting: a policy's `failurePolicy`, the
/// `matchPolicy` and selectors of its match constraints and its bindings' match resources,
/// each resource rule's `scope`, a parameter reference's `parameterNotFoundAction`). A field
/// holding its default is compared as absent, so that a manifest and the object the cluster
/// stored from it compare equal; any other value still differs.
const SERVER_DEFAULTS: [(&str, &str); 4] = [
    ("failurePolicy", "Fail"),
    ("matchPolicy", "Equivalent"),
    ("scope", "*"),
    ("parameterNotFoundAction", "Deny"),
];

/// `value` with what the API server fills in removed: nulls, empty lists and maps (empty
/// selectors, an empty `resourceNames`), and fields at their [`SERVER_DEFAULTS`].
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(key, v)| !SERVER_DEFAULTS.iter().any(|(k, d)| k == key && v.as_str() == Some(d)))
                .map(|(k, v)| (k.clone(), normalized(v)))
                .filter(|(_, v)| !empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

fn empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        _ => false,
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

    /// The template's `kind` `name`, as YAML; a Deployment runs version 0.2.0.
    fn templates(kind: &str, name: &str) -> String {
        let mut body = crate::shape::reference(kind, name).expect("in the template").clone();
        if kind == "Deployment" {
            let component = component(name);
            body["spec"]["template"]["spec"]["containers"][0]["image"] =
                format!("ghcr.io/distr-sh/distr-agent/{component}:0.2.0").into();
        }
        serde_norway::to_string(&body).expect("YAML")
    }

    fn ours() -> String {
        [
            templates("Deployment", "distr-agent-updater"),
            templates("Deployment", "distr-agent"),
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
            "metadata:\n  name: distr-agent-env\n",
            "metadata:\n  name: distr-agent-env\n  namespace: kube-system\n",
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
    fn fields_beyond_the_templates_shape_are_refused_and_a_roll_back_rechecks_what_it_writes() {
        let privileged = ours().replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true");
        assert_ne!(privileged, ours());
        let error = check(&privileged, &rules()).expect_err("privileged");
        assert!(matches!(error, Refusal::Shape { .. }), "{error}");
        assert!(error.to_string().contains("securityContext"), "{error}");

        let recorded = crate::shape::reference("Deployment", "distr-agent")
            .expect("poller")
            .clone();
        assert_eq!(recheck("Deployment", "distr-agent", &recorded, &rules()), Ok(()));
        let mut host = recorded.clone();
        host["spec"]["template"]["spec"]["hostNetwork"] = true.into();
        let refused = recheck("Deployment", "distr-agent", &host, &rules()).expect_err("host network");
        assert!(
            refused.starts_with("not re-applied: Deployment distr-agent changes the pod's hostNetwork"),
            "{refused}"
        );
        let role = recheck("Role", "distr-agent", &serde_json::json!({"rules": []}), &rules()).expect_err("a Role");
        assert!(role.contains("not one of the agent's own objects"), "{role}");
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

    /// The cluster-scope policies as the template has them, and as the API server stores them
    /// (its defaults filled in): the same grant. A real change still differs.
    #[test]
    fn admission_policies_compare_equal_to_what_the_api_server_stored() {
        let text = std::fs::read_to_string(format!(
            "{}/../deploy/examples/cluster.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("the example");
        let checked = check(
            &text
                .split("\n---")
                .filter(|doc| !doc.contains("name: distr-agent-auth\n"))
                .collect::<Vec<_>>()
                .join("\n---"),
            &Rules {
                namespace: "distr".into(),
                ..rules()
            },
        )
        .expect("valid");
        let policies: Vec<&Object> = checked
            .compare
            .iter()
            .filter(|o| o.kind.starts_with("ValidatingAdmissionPolicy"))
            .collect();
        assert_eq!(policies.len(), 8, "four policies and their bindings");
        for policy in policies {
            let mut stored = policy.body.clone();
            stored["metadata"]["uid"] = serde_json::json!("u");
            let spec = &mut stored["spec"];
            let constraints = if spec["matchConstraints"].is_object() {
                spec["failurePolicy"] = serde_json::json!("Fail");
                "matchConstraints"
            } else {
                "matchResources"
            };
            let matching = &mut spec[constraints];
            matching["matchPolicy"] = serde_json::json!("Equivalent");
            matching["objectSelector"] = serde_json::json!({});
            if !matching["namespaceSelector"].is_object() {
                matching["namespaceSelector"] = serde_json::json!({});
            }
            if let Some(rules) = matching["resourceRules"].as_array_mut() {
                for rule in rules {
                    rule["scope"] = serde_json::json!("*");
                }
            }
            assert!(same_grant(&policy.body, &stored), "{policy}: {stored:#}");
            let mut exact = stored.clone();
            exact["spec"][constraints]["matchPolicy"] = serde_json::json!("Exact");
            assert!(!same_grant(&policy.body, &exact), "{policy}: another matchPolicy");
            let mut ignored = stored.clone();
            ignored["spec"]["failurePolicy"] = serde_json::json!("Ignore");
            assert!(!same_grant(&policy.body, &ignored), "{policy}: failures ignored");
            let mut narrower = stored;
            narrower["spec"][constraints]["objectSelector"] = serde_json::json!({"matchLabels": {"a": "b"}});
            assert!(!same_grant(&policy.body, &narrower), "{policy}: another selector");
        }
    }

    #[test]
    fn grants_compare_without_server_defaults() {
        let wanted = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]});
        let live = serde_json::json!({"metadata": {"uid": "x"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": []}]});
        assert!(same_grant(&wanted, &live));
        let wider = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]});
        assert!(!same_grant(&wider, &live));
        let more = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]});
        assert!(!same_grant(&more, &live), "a rule more");
        // An admission policy as the API server returns it: defaults filled in.
        let policy = serde_json::json!({"spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]}}});
        let stored = serde_json::json!({"spec": {"failurePolicy": "Fail", "matchConstraints": {"matchPolicy": "Equivalent",
            "namespaceSelector": {}, "objectSelector": {}, "resourceRules": [
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "*"}]}}});
        assert!(same_grant(&policy, &stored));
        let weaker = serde_json::json!({"spec": {"failurePolicy": "Ignore"}});
        assert!(!same_grant(&weaker, &stored));
        let any_name =
            serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]});
        let by_name = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["a"]}]});
        assert!(!same_grant(&any_name, &by_name), "a rule without its names grants more");
    }
}
