//! The check of a release against the policy: pure code over the release's source and
//! namespace and its rendered objects (parsed YAML, hooks included). No I/O: what the API
//! server knows of kinds the check cannot tell (custom resources defined elsewhere) comes in
//! as a table.

use std::{collections::BTreeMap, fmt};

use serde_json::Value;

use super::{
    document::{CONFIG_MAP, GroupKind, PodSecurityLevel, Policy, allows, glob},
    pod_security,
};

/// One thing the policy refuses: the rule, the object and the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The rule, as the document names it (`images`, `podSecurity=baseline`, ...).
    pub rule: String,
    /// `Kind namespace/name`, `Kind name` for a cluster-scoped object, or `release <name>`.
    pub object: String,
    pub value: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {} refuses {}: {}", self.rule, self.object, self.value)
    }
}

/// The refusal of a release: every violation found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub Vec<Violation>);

/// At most this many violations are spelt out in a message.
const SHOWN: usize = 3;

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused by the agent policy: ")?;
        for (index, violation) in self.0.iter().take(SHOWN).enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{violation}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, "; and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// What the check knows of a release before rendering it.
#[derive(Clone, Copy, Debug)]
pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// The chart source as the policy sees it: the `oci://` reference, or the classic
    /// repository's URL (without credentials).
    pub source: &'a str,
}

/// Whether kinds are namespaced, as the API server says, for kinds neither built in nor
/// defined by the release's own CustomResourceDefinitions: `(group, kind) -> namespaced`.
pub type Scopes = BTreeMap<(String, String), bool>;

/// Checks what can be checked before rendering: the chart source and the namespace.
pub fn check_release(policy: &Policy, release: &Release<'_>) -> Vec<Violation> {
    let mut violations = Vec::new();
    let object = format!("release {}", release.name);
    if let Some(sources) = &policy.chart_sources {
        let source = release.source.trim_end_matches('/');
        if !sources.iter().any(|pattern| allows(pattern, source)) {
            violations.push(Violation {
                rule: "chartSources".into(),
                object: object.clone(),
                value: source.to_owned(),
            });
        }
    }
    if let Some(namespaces) = &policy.namespaces
        && !namespaces.iter().any(|pattern| allows(pattern, release.namespace))
    {
        violations.push(Violation {
            rule: "namespaces".into(),
            object,
            value: release.namespace.to_owned(),
        });
    }
    violations
}

/// The API group of an `apiVersion` (`""` for the core group).
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

/// Group and kind of every object whose scope the check cannot tell by itself (neither a
/// built-in kind nor one the objects' own CustomResourceDefinitions define), with its
/// `apiVersion`: the executor asks the API server about these.
pub fn unknown_kinds(objects: &[Value]) -> Vec<(String, String)> {
    let defined = defined_scopes(objects);
    let mut unknown: Vec<(String, String)> = objects
        .iter()
        .filter_map(|object| {
            let (api_version, kind) = (text(object, "/apiVersion")?, text(object, "/kind")?);
            let key = (group_of(api_version).to_owned(), kind.to_owned());
            (builtin_namespaced(&key.0, kind).is_none() && !defined.contains_key(&key))
                .then(|| (api_version.to_owned(), kind.to_owned()))
        })
        .collect();
    unknown.sort();
    unknown.dedup();
    unknown
}

/// Checks every rendered object (manifest and hooks) of a release in `namespace`; the agent
/// runs in `agent_namespace`, where no release may render the policy's own ConfigMap.
pub fn check_objects(
    policy: &Policy,
    namespace: &str,
    agent_namespace: &str,
    objects: &[Value],
    scopes: &Scopes,
) -> Vec<Violation> {
    let defined = defined_scopes(objects);
    let mut violations = Vec::new();
    for object in objects {
        let (Some(api_version), Some(kind)) = (text(object, "/apiVersion"), text(object, "/kind")) else {
            continue;
        };
        let group = group_of(api_version);
        let name = text(object, "/metadata/name").unwrap_or("<unnamed>");
        let explicit_namespace = text(object, "/metadata/namespace").filter(|ns| !ns.is_empty());
        let key = (group.to_owned(), kind.to_owned());
        // Unknown everywhere: namespaced if it names a namespace, else treated as
        // cluster-scoped (the stricter reading).
        let namespaced = builtin_namespaced(group, kind)
            .or_else(|| defined.get(&key).copied())
            .or_else(|| scopes.get(&key).copied())
            .unwrap_or(explicit_namespace.is_some());
        let object_namespace = explicit_namespace.unwrap_or(namespace);
        let id = if namespaced {
            format!("{kind} {object_namespace}/{name}")
        } else {
            format!("{kind} {name}")
        };
        let mut refuse = |rule: &str, value: String| {
            violations.push(Violation {
                rule: rule.to_owned(),
                object: id.clone(),
                value,
            });
        };
        if (group, kind, name, object_namespace) == ("", "ConfigMap", CONFIG_MAP, agent_namespace) {
            refuse(
                "(the policy itself)",
                format!("{CONFIG_MAP} cannot be written by a release"),
            );
        }
        if namespaced {
            if let Some(namespaces) = &policy.namespaces
                && !namespaces.iter().any(|pattern| allows(pattern, object_namespace))
            {
                refuse("namespaces", object_namespace.to_owned());
            }
            if policy
                .namespace_resource_blacklist
                .iter()
                .any(|entry| kind_matches(entry, group, kind))
            {
                refuse("namespaceResourceBlacklist", group_kind(group, kind));
            }
        } else if let Some(whitelist) = &policy.cluster_resource_whitelist
            && !whitelist.iter().any(|entry| kind_matches(entry, group, kind))
        {
            refuse("clusterResourceWhitelist", group_kind(group, kind));
        }
        let Some(pointer) = pod_spec_pointer(group, kind) else {
            continue;
        };
        let Some(spec) = object.pointer(pointer) else {
            continue;
        };
        let annotations = object
            .pointer(&template_metadata_pointer(pointer))
            .and_then(|metadata| metadata.get("annotations"));
        if let Some(images) = &policy.images {
            for (container, image) in container_images(spec) {
                let repository = image_repository(image);
                if !images.iter().any(|pattern| allows(pattern, &repository)) {
                    refuse("images", format!("container {container}: {image}"));
                }
            }
        }
        if let Some(level) = policy
            .pod_security
            .filter(|level| *level > PodSecurityLevel::Privileged)
        {
            for finding in pod_security::check(level, spec, annotations) {
                refuse(&format!("podSecurity={}", level.name()), finding);
            }
        }
    }
    violations
}

fn text<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

fn group_kind(group: &str, kind: &str) -> String {
    if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    }
}

fn kind_matches(entry: &GroupKind, group: &str, kind: &str) -> bool {
    glob(&entry.group, group) && glob(&entry.kind, kind)
}

/// Scopes the release's own CustomResourceDefinitions declare (`spec.scope`).
fn defined_scopes(objects: &[Value]) -> Scopes {
    objects
        .iter()
        .filter(|object| {
            text(object, "/kind") == Some("CustomResourceDefinition")
                && text(object, "/apiVersion").is_some_and(|v| group_of(v) == "apiextensions.k8s.io")
        })
        .filter_map(|crd| {
            let group = text(crd, "/spec/group")?;
            let kind = text(crd, "/spec/names/kind")?;
            let namespaced = text(crd, "/spec/scope")? == "Namespaced";
            Some(((group.to_owned(), kind.to_owned()), namespaced))
        })
        .collect()
}

/// Cluster-scoped kinds of Kubernetes itself.
const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("", "ComponentStatus"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ("apiregistration.k8s.io", "APIService"),
    ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration"),
    ("admissionregistration.k8s.io", "MutatingWebhookConfiguration"),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicyBinding"),
    ("admissionregistration.k8s.io", "MutatingAdmissionPolicy"),
    ("admissionregistration.k8s.io", "MutatingAdmissionPolicyBinding"),
    ("storage.k8s.io", "StorageClass"),
    ("storage.k8s.io", "CSIDriver"),
    ("storage.k8s.io", "CSINode"),
    ("storage.k8s.io", "VolumeAttachment"),
    ("storage.k8s.io", "VolumeAttributesClass"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("node.k8s.io", "RuntimeClass"),
    ("networking.k8s.io", "IngressClass"),
    ("networking.k8s.io", "IPAddress"),
    ("networking.k8s.io", "ServiceCIDR"),
    ("certificates.k8s.io", "CertificateSigningRequest"),
    ("certificates.k8s.io", "ClusterTrustBundle"),
    ("flowcontrol.apiserver.k8s.io", "FlowSchema"),
    ("flowcontrol.apiserver.k8s.io", "PriorityLevelConfiguration"),
    ("resource.k8s.io", "DeviceClass"),
    ("resource.k8s.io", "ResourceSlice"),
    ("authentication.k8s.io", "TokenReview"),
    ("authentication.k8s.io", "SelfSubjectReview"),
    ("authorization.k8s.io", "SubjectAccessReview"),
    ("authorization.k8s.io", "SelfSubjectAccessReview"),
    ("authorization.k8s.io", "SelfSubjectRulesReview"),
];

/// Namespaced kinds of Kubernetes itself that charts commonly render.
const NAMESPACED: &[(&str, &str)] = &[
    ("", "ConfigMap"),
    ("", "Secret"),
    ("", "Service"),
    ("", "ServiceAccount"),
    ("", "Pod"),
    ("", "PodTemplate"),
    ("", "PersistentVolumeClaim"),
    ("", "ReplicationController"),
    ("", "Endpoints"),
    ("", "LimitRange"),
    ("", "ResourceQuota"),
    ("", "Event"),
    ("apps", "Deployment"),
    ("apps", "StatefulSet"),
    ("apps", "DaemonSet"),
    ("apps", "ReplicaSet"),
    ("apps", "ControllerRevision"),
    ("batch", "Job"),
    ("batch", "CronJob"),
    ("autoscaling", "HorizontalPodAutoscaler"),
    ("policy", "PodDisruptionBudget"),
    ("networking.k8s.io", "Ingress"),
    ("networking.k8s.io", "NetworkPolicy"),
    ("discovery.k8s.io", "EndpointSlice"),
    ("rbac.authorization.k8s.io", "Role"),
    ("rbac.authorization.k8s.io", "RoleBinding"),
    ("coordination.k8s.io", "Lease"),
    ("events.k8s.io", "Event"),
    ("storage.k8s.io", "CSIStorageCapacity"),
    ("authorization.k8s.io", "LocalSubjectAccessReview"),
    ("resource.k8s.io", "ResourceClaim"),
    ("resource.k8s.io", "ResourceClaimTemplate"),
];

/// Whether a built-in kind is namespaced; `None` for a kind not in the tables.
fn builtin_namespaced(group: &str, kind: &str) -> Option<bool> {
    let is = |table: &[(&str, &str)]| table.iter().any(|(g, k)| *g == group && *k == kind);
    if is(CLUSTER_SCOPED) {
        Some(false)
    } else if is(NAMESPACED) {
        Some(true)
    } else {
        None
    }
}

/// Where a workload keeps its pod spec (JSON pointer), for the kinds that have one.
fn pod_spec_pointer(group: &str, kind: &str) -> Option<&'static str> {
    match (group, kind) {
        ("", "Pod") => Some("/spec"),
        ("", "PodTemplate") => Some("/template/spec"),
        ("", "ReplicationController")
        | ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => Some("/spec/template/spec"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

/// The pod metadata beside a pod spec (`/spec` -> `/metadata`, `.../template/spec` ->
/// `.../template/metadata`).
fn template_metadata_pointer(spec_pointer: &str) -> String {
    match spec_pointer.strip_suffix("spec") {
        Some(prefix) => format!("{prefix}metadata"),
        None => spec_pointer.to_owned(),
    }
}

/// Every container of a pod spec (containers, init and ephemeral containers) with its image:
/// `(name, image)`; a container without an image has `""`.
pub fn container_images(spec: &Value) -> Vec<(String, &str)> {
    pod_security::containers(spec)
        .map(|container| {
            let name = container.get("name").and_then(Value::as_str).unwrap_or("<unnamed>");
            let image = container.get("image").and_then(Value::as_str).unwrap_or("");
            (name.to_owned(), image)
        })
        .collect()
}

/// The repository of an image reference, registry included and without tag or digest, as a
/// container runtime reads it: `nginx:1.27` is `docker.io/library/nginx`,
/// `ghcr.io/org/app@sha256:...` is `ghcr.io/org/app`.
pub fn image_repository(image: &str) -> String {
    let without_digest = image.split_once('@').map_or(image, |(name, _)| name);
    let last_slash = without_digest.rfind('/').map_or(0, |index| index + 1);
    let name = match without_digest[last_slash..].rfind(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    };
    match name.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => name.to_owned(),
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::document::parse;

    fn policy(text: &str) -> Policy {
        parse(Some(text)).unwrap()
    }

    fn deployment(image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}}
        })
    }

    #[test]
    fn image_repositories_are_normalised() {
        let cases = [
            ("nginx", "docker.io/library/nginx"),
            ("nginx:1.27", "docker.io/library/nginx"),
            ("bitnami/redis:7", "docker.io/bitnami/redis"),
            ("ghcr.io/org/app@sha256:abc", "ghcr.io/org/app"),
            ("registry:5000/team/app:v1", "registry:5000/team/app"),
            ("localhost/app", "localhost/app"),
            ("127.0.0.1:5000/app:1@sha256:x", "127.0.0.1:5000/app"),
        ];
        for (image, repository) in cases {
            assert_eq!(image_repository(image), repository, "{image}");
        }
    }

    #[test]
    fn sources_and_namespaces_before_rendering() {
        let policy = policy("{chartSources: [oci://registry.example.com/vendor], namespaces: [apps]}");
        let cases = [
            ("oci://registry.example.com/vendor/web", "apps", vec![]),
            (
                "oci://registry.example.com/other/web",
                "apps",
                vec!["chartSources: oci://registry.example.com/other/web"],
            ),
            (
                "oci://registry.example.com/vendor/web",
                "kube-system",
                vec!["namespaces: kube-system"],
            ),
        ];
        for (source, namespace, expected) in cases {
            let release = Release {
                name: "web",
                namespace,
                source,
            };
            let found: Vec<String> = check_release(&policy, &release)
                .iter()
                .map(|v| format!("{}: {}", v.rule, v.value))
                .collect();
            assert_eq!(found, expected, "{source} in {namespace}");
        }
    }

    #[test]
    fn objects_are_checked_rule_by_rule() {
        let cluster_role_binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "web-admin"}});
        let quota = json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q"}});
        let elsewhere =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "kube-system"}});
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "extra"}});
        let hook_job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "annotations": {"helm.sh/hook": "pre-install"}},
            "spec": {"template": {"spec": {
                "initContainers": [{"name": "wait", "image": "busybox"}],
                "containers": [{"name": "migrate", "image": "registry.example.com/vendor/migrate:1"}]
            }}}
        });
        let cron = json!({
            "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {
                "containers": [{"name": "c", "image": "evil.io/miner"}],
                "ephemeralContainers": [{"name": "debug", "image": "registry.example.com/vendor/debug"}]
            }}}}}
        });
        let custom = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "gadgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced", "names": {"kind": "Gadget"}}});
        let gadget = json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}});
        let cases: Vec<(&str, Vec<Value>, Vec<&str>)> = vec![
            (
                "{}",
                vec![cluster_role_binding.clone(), deployment("evil.io/x")],
                vec![],
            ),
            (
                "clusterResourceWhitelist: []",
                vec![cluster_role_binding.clone(), quota.clone()],
                vec![
                    "clusterResourceWhitelist|ClusterRoleBinding web-admin|ClusterRoleBinding.rbac.authorization.k8s.io",
                ],
            ),
            (
                "clusterResourceWhitelist: [{group: rbac.authorization.k8s.io, kind: '*'}]",
                vec![cluster_role_binding.clone(), namespace.clone()],
                vec!["clusterResourceWhitelist|Namespace extra|Namespace"],
            ),
            (
                "clusterResourceWhitelist: [{group: '*', kind: '*'}]",
                vec![cluster_role_binding.clone(), namespace.clone()],
                vec![],
            ),
            (
                "namespaceResourceBlacklist: [{group: '', kind: ResourceQuota}]",
                vec![quota.clone(), elsewhere.clone()],
                vec!["namespaceResourceBlacklist|ResourceQuota apps/q|ResourceQuota"],
            ),
            (
                "namespaces: [apps]",
                vec![quota.clone(), elsewhere.clone(), cluster_role_binding.clone()],
                vec!["namespaces|ConfigMap kube-system/c|kube-system"],
            ),
            (
                "images: [registry.example.com/vendor]",
                vec![
                    deployment("registry.example.com/vendor/web:1.0"),
                    hook_job.clone(),
                    cron.clone(),
                ],
                vec![
                    "images|Job apps/migrate|container wait: busybox",
                    "images|CronJob apps/nightly|container c: evil.io/miner",
                ],
            ),
            (
                "images: ['docker.io/library/*']",
                vec![deployment("nginx:1.27"), deployment("docker.io/bitnami/nginx")],
                vec!["images|Deployment apps/web|container web: docker.io/bitnami/nginx"],
            ),
            // A kind the check does not know, without a namespace: cluster-scoped unless the
            // API server or the chart's own CRDs say otherwise.
            (
                "clusterResourceWhitelist: []",
                vec![custom.clone(), crd.clone(), gadget.clone()],
                vec![
                    "clusterResourceWhitelist|Widget w|Widget.example.com",
                    "clusterResourceWhitelist|CustomResourceDefinition gadgets.example.com|CustomResourceDefinition.apiextensions.k8s.io",
                ],
            ),
        ];
        for (text, objects, expected) in cases {
            let found: Vec<String> = check_objects(&policy(text), "apps", "agent", &objects, &Scopes::new())
                .iter()
                .map(|v| format!("{}|{}|{}", v.rule, v.object, v.value))
                .collect();
            assert_eq!(found, expected, "{text}");
        }
    }

    #[test]
    fn the_api_servers_scopes_are_used_for_unknown_kinds() {
        let custom = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
        let objects = [custom];
        assert_eq!(
            unknown_kinds(&objects),
            [("example.com/v1".to_owned(), "Widget".to_owned())]
        );
        let scopes = Scopes::from([(("example.com".to_owned(), "Widget".to_owned()), true)]);
        let policy = policy("{clusterResourceWhitelist: [], namespaces: [apps]}");
        assert!(check_objects(&policy, "apps", "agent", &objects, &scopes).is_empty());
    }

    #[test]
    fn the_time_to_check_a_thousand_objects_is_printed() {
        let policy = policy(
            "{namespaces: [apps], clusterResourceWhitelist: [], namespaceResourceBlacklist: [{group: '', kind: ResourceQuota}], \
             images: ['registry.example.com/*'], podSecurity: restricted}",
        );
        let manifest: String = (0..500)
            .map(|i| {
                format!(
                    "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\ndata: {{a: b}}\n---\n\
                     apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d{i}}}\nspec:\n  template:\n    spec:\n      \
                     containers: [{{name: web, image: registry.example.com/web:{i}}}]\n"
                )
            })
            .collect();
        let started = std::time::Instant::now();
        let mut objects = Vec::new();
        crate::policy::manifest_objects(&manifest, &mut objects).unwrap();
        let parsed = started.elapsed();
        let violations = check_objects(&policy, "apps", "agent", &objects, &Scopes::new());
        eprintln!(
            "{} objects ({} KiB of YAML): parsed in {parsed:?}, checked in {:?}, {} findings",
            objects.len(),
            manifest.len() / 1024,
            started.elapsed() - parsed,
            violations.len()
        );
        assert_eq!(objects.len(), 1000);
        // The pod templates set no security context: restricted finds four things in each.
        assert_eq!(violations.len(), 500 * 4);
    }

    #[test]
    fn no_release_may_write_the_policy() {
        let own = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distr-agent-policy"}});
        let found = check_objects(
            &policy("{}"),
            "agent",
            "agent",
            std::slice::from_ref(&own),
            &Scopes::new(),
        );
        assert_eq!(found[0].rule, "(the policy itself)");
        assert_eq!(found[0].object, "ConfigMap agent/distr-agent-policy");
        assert!(check_objects(&policy("{}"), "apps", "agent", &[own], &Scopes::new()).is_empty());
    }

    #[test]
    fn a_refusal_names_rule_object_and_value() {
        let policy = policy("images: [registry.example.com]");
        let objects: Vec<Value> = (0..5).map(|_| deployment("evil.io/miner:1")).collect();
        let refusal = Refusal(check_objects(&policy, "apps", "agent", &objects, &Scopes::new()));
        let message = refusal.to_string();
        assert!(
            message.starts_with(
                "refused by the agent policy: rule images refuses Deployment apps/web: container web: evil.io/miner:1; "
            ),
            "{message}"
        );
        assert!(message.ends_with("; and 2 more"), "{message}");
    }
}
