//! The shape of the agent's own objects, as the install template has them: what a new version
//! (or a roll-back) may change in each object the updater writes, and nothing more.
//!
//! The reference is the template itself, rendered (`deploy/examples/`, which an end-to-end test
//! keeps equal to `deploy/manifest.yaml.tmpl`). A Deployment's pod template may change only its
//! image tag (within the pinned repository, checked in [`crate::manifest`]), its resources,
//! probes that run no command, ports, scheduling (node selector, affinity, tolerations) and the
//! values of the environment variables listed in [`FREE_ENV`]; everything else (volumes, mounts,
//! `envFrom`, the other variables and their values, security contexts, host namespaces, commands,
//! containers) stays as the template has it. A Service keeps its type and selector, a
//! NetworkPolicy opens nothing the template's does not, a ServiceAccount keeps its token setting.
//!
//! The cluster-scoped install's admission policies pin the same environment, `envFrom` and
//! volumes: [`cel_tables`] gives their tables as the template writes them, and a unit test fails
//! when the template's policies hold other tables.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
};

use serde::Deserialize as _;
use serde_json::Value;

/// The template rendered for both scopes (a test keeps them equal to the template).
const EXAMPLES: [&str; 2] = [
    include_str!("../../deploy/examples/cluster.yaml"),
    include_str!("../../deploy/examples/namespace.yaml"),
];

/// The environment variables of the template whose values a new version may change, by
/// component; every other variable keeps the template's value (`AGENT_IMAGE_REPOSITORY`, the
/// addresses, the paths, the poller's config directories).
///
/// `AGENT_SCOPE` is free between the two scopes' values: the scope a version can act in is
/// bounded by the RBAC, which the updater never changes.
pub const FREE_ENV: [(&str, &str); 8] = [
    ("executor", "AGENT_LOG_FORMAT"),
    ("executor", "AGENT_SCOPE"),
    ("executor", "DISTR_AGENT_VERSION"),
    ("executor", "MALLOC_ARENA_MAX"),
    ("poller", "AGENT_LOG_FORMAT"),
    ("poller", "DISTR_AGENT_VERSION"),
    ("updater", "AGENT_LOG_FORMAT"),
    ("updater", "DISTR_AGENT_VERSION"),
];

/// The components, in the order of the admission policies' tables.
pub const COMPONENTS: [&str; 3] = ["executor", "poller", "updater"];

/// Pod-level fields a new version may set freely: scheduling, grace, DNS, and what the API
/// server fills in.
const FREE_POD: [&str; 13] = [
    "nodeSelector",
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "priorityClassName",
    "priority",
    "preemptionPolicy",
    "terminationGracePeriodSeconds",
    "dnsPolicy",
    "dnsConfig",
    "restartPolicy",
    "schedulerName",
    "enableServiceLinks",
];

/// Container fields a new version may set freely (probes too, unless they run a command).
const FREE_CONTAINER: [&str; 6] = [
    "resources",
    "ports",
    "imagePullPolicy",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "resizePolicy",
];

/// The Deployment of a component.
pub fn deployment_of(component: &str) -> String {
    match component {
        "poller" => "distr-agent".to_owned(),
        other => format!("distr-agent-{other}"),
    }
}

struct Reference {
    /// `Kind/name` to the object, from the cluster-scoped rendering first.
    objects: BTreeMap<String, Value>,
    /// The keys of `distr-agent-env` in either rendering.
    config_keys: BTreeSet<String>,
}

static REFERENCE: LazyLock<Reference> = LazyLock::new(|| {
    let mut objects = BTreeMap::new();
    let mut config_keys = BTreeSet::new();
    for text in EXAMPLES {
        for document in serde_norway::Deserializer::from_str(text) {
            let Ok(value) = Value::deserialize(document) else {
                continue;
            };
            let (Some(kind), Some(name)) = (value["kind"].as_str(), value["metadata"]["name"].as_str()) else {
                continue;
            };
            if kind == "ConfigMap" && name == "distr-agent-env" {
                config_keys.extend(value["data"].as_object().into_iter().flatten().map(|(k, _)| k.clone()));
            }
            objects.entry(format!("{kind}/{name}")).or_insert(value);
        }
    }
    Reference { objects, config_keys }
});

/// `kind` `name` as the template renders it (cluster scope first).
pub(crate) fn reference(kind: &str, name: &str) -> Option<&'static Value> {
    REFERENCE.objects.get(&format!("{kind}/{name}"))
}

/// A component's pod as the template has it: environment (name to pinned value, `*` when free,
/// `fieldRef:<path>` for the downward API), `envFrom` sources and volumes, each encoded as the
/// admission policies encode them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodShape {
    pub env: BTreeMap<String, String>,
    pub env_from: Vec<String>,
    pub volumes: Vec<String>,
}

/// The shape of `component`'s pod in the template.
pub fn pod_shape(component: &str) -> PodShape {
    let Some(deployment) = reference("Deployment", &deployment_of(component)) else {
        return PodShape::default();
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = items(&container["env"])
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = if FREE_ENV.contains(&(component, name.as_str())) {
                "*".to_owned()
            } else {
                env_value(e)
            };
            (name, value)
        })
        .collect();
    PodShape {
        env,
        env_from: items(&container["envFrom"]).map(env_from_source).collect(),
        volumes: items(&pod["volumes"])
            .filter(|v| !token_volume(v))
            .map(volume)
            .collect(),
    }
}

fn items(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// A variable's value as the tables encode it: its value, or `fieldRef:<path>`; `?` for any
/// other source.
fn env_value(e: &Value) -> String {
    match e.get("valueFrom") {
        None | Some(Value::Null) => text(&e["value"]).to_owned(),
        Some(from) if from["fieldRef"].is_object() => format!("fieldRef:{}", text(&from["fieldRef"]["fieldPath"])),
        Some(_) => "?".to_owned(),
    }
}

/// `secret:<name>` or `configMap:<name>`; `?` for a prefix or another source.
fn env_from_source(s: &Value) -> String {
    if !s["prefix"].is_null() {
        "?".to_owned()
    } else if s["secretRef"].is_object() {
        format!("secret:{}", text(&s["secretRef"]["name"]))
    } else if s["configMapRef"].is_object() {
        format!("configMap:{}", text(&s["configMapRef"]["name"]))
    } else {
        "?".to_owned()
    }
}

/// `<name>=emptyDir`, `<name>=secret:<secret>`, `<name>=configMap:<map>`; `<name>=?` otherwise.
fn volume(v: &Value) -> String {
    let source = if v["emptyDir"].is_object() {
        "emptyDir".to_owned()
    } else if v["secret"].is_object() {
        format!("secret:{}", text(&v["secret"]["secretName"]))
    } else if v["configMap"].is_object() {
        format!("configMap:{}", text(&v["configMap"]["name"]))
    } else {
        "?".to_owned()
    };
    format!("{}={source}", text(&v["name"]))
}

/// What the API server projects for a pod's ServiceAccount (its token, the cluster's CA, the
/// namespace), which the admission policies leave aside in pods.
fn token_volume(v: &Value) -> bool {
    v["projected"]["sources"].as_array().is_some_and(|sources| {
        sources.iter().all(|s| {
            s["serviceAccountToken"].is_object()
                || s["downwardAPI"].is_object()
                || (s["configMap"].is_object() && s["configMap"]["name"] == "kube-root-ca.crt")
        })
    })
}

/// A CEL string literal.
fn cel_string(s: &str) -> String {
    let escaped = s.replace('\\', "\\\\").replace('\'', "\\'").replace('\n', "\\n");
    format!("'{escaped}'")
}

fn cel_list(items: &[String]) -> String {
    format!(
        "[{}]",
        items.iter().map(|i| cel_string(i)).collect::<Vec<_>>().join(", ")
    )
}

/// The admission policies' variables `env`, `envFrom` and `volumes`, as CEL expressions: one
/// map by component, indexed by `variables.component`.
pub fn cel_tables() -> [(&'static str, String); 3] {
    let table = |entry: &dyn Fn(&PodShape) -> String| {
        let rows: Vec<String> = COMPONENTS
            .iter()
            .map(|c| format!("{}: {}", cel_string(c), entry(&pod_shape(c))))
            .collect();
        format!("{{{}}}[variables.component]", rows.join(", "))
    };
    [
        (
            "env",
            table(&|shape: &PodShape| {
                let pairs: Vec<String> = shape
                    .env
                    .iter()
                    .map(|(k, v)| format!("{}: {}", cel_string(k), cel_string(v)))
                    .collect();
                format!("{{{}}}", pairs.join(", "))
            }),
        ),
        ("envFrom", table(&|shape: &PodShape| cel_list(&shape.env_from))),
        ("volumes", table(&|shape: &PodShape| cel_list(&shape.volumes))),
    ]
}

/// Checks one object the updater is about to write (from a manifest, or recorded for a
/// roll-back) against the template's. `Err` says what it changes.
pub fn check(kind: &str, name: &str, body: &Value, image_repository: &str) -> Result<(), String> {
    match kind {
        "Deployment" => check_deployment(name, body, image_repository),
        "Service" => check_service(name, body),
        "NetworkPolicy" => check_network_policy(name, body),
        "ServiceAccount" => check_service_account(name, body),
        "ConfigMap" => check_config_map(body),
        "Secret" if name == "distr-agent-image-pull" => check_pull_secret(body),
        _ => Ok(()),
    }
}

fn want(kind: &str, name: &str) -> Result<&'static Value, String> {
    reference(kind, name).ok_or_else(|| "is not in the agent's template".to_owned())
}

/// Equal once server defaults that carry nothing (nulls, empty lists and maps) are left out.
fn same(a: &Value, b: &Value) -> bool {
    normalized(a) == normalized(b)
}

fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
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

fn keys<'a>(a: &'a Value, b: &'a Value) -> BTreeSet<&'a str> {
    a.as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|m| m.keys().map(String::as_str))
        .collect()
}

fn check_deployment(name: &str, body: &Value, image_repository: &str) -> Result<(), String> {
    let reference = want("Deployment", name)?;
    for key in ["replicas", "strategy"] {
        if !same(&body["spec"][key], &reference["spec"][key]) {
            return Err(format!("changes spec.{key}"));
        }
    }
    let component = crate::manifest::component(name);
    let pod = &body["spec"]["template"]["spec"];
    let template = &reference["spec"]["template"]["spec"];
    for key in keys(pod, template) {
        let (got, wanted) = (&pod[key], &template[key]);
        let ok = match key {
            "containers" => {
                check_container(component, got, wanted, image_repository)?;
                true
            }
            "volumes" => {
                let volumes: Vec<String> = items(got).filter(|v| !token_volume(v)).map(volume).collect();
                volumes == pod_shape(component).volumes
            }
            "imagePullSecrets" => empty(got) || same(got, &serde_json::json!([{"name": "distr-agent-image-pull"}])),
            // The deprecated alias the API server fills in.
            "serviceAccount" => got.is_null() || *got == pod["serviceAccountName"],
            "hostNetwork" | "hostPID" | "hostIPC" | "shareProcessNamespace" => {
                matches!(got, Value::Null | Value::Bool(false))
            }
            key if FREE_POD.contains(&key) => true,
            _ => same(got, wanted),
        };
        if !ok {
            return Err(format!("changes the pod's {key}, which only the agent's template sets"));
        }
    }
    Ok(())
}

fn check_container(component: &str, got: &Value, wanted: &Value, image_repository: &str) -> Result<(), String> {
    let (Some([got]), Some([wanted])) = (got.as_array().map(Vec::as_slice), wanted.as_array().map(Vec::as_slice))
    else {
        return Err("must run exactly the one container of its template".into());
    };
    let shape = pod_shape(component);
    for key in keys(got, wanted) {
        let ok = match key {
            // The repository is checked with the ServiceAccount; any tag passes.
            "image" => true,
            "env" => {
                check_env(&got["env"], &shape, image_repository)?;
                true
            }
            "envFrom" => items(&got["envFrom"]).map(env_from_source).collect::<Vec<_>>() == shape.env_from,
            "livenessProbe" | "readinessProbe" | "startupProbe" => got[key]["exec"].is_null(),
            key if FREE_CONTAINER.contains(&key) => true,
            _ => same(&got[key], &wanted[key]),
        };
        if !ok {
            return Err(format!(
                "changes the container's {key}, which only the agent's template sets"
            ));
        }
    }
    Ok(())
}

/// The environment: the template's variables, no other, each with its pinned value or source
/// (`AGENT_IMAGE_REPOSITORY`: the repository this updater checks images against).
fn check_env(env: &Value, shape: &PodShape, image_repository: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for e in items(env) {
        let name = text(&e["name"]);
        let Some(pinned) = shape.env.get(name) else {
            return Err(format!(
                "sets the environment variable {name}, which the template does not define"
            ));
        };
        let value = env_value(e);
        let ok = match pinned.as_str() {
            "*" => e["valueFrom"].is_null(),
            _ if name == "AGENT_IMAGE_REPOSITORY" => value == image_repository,
            pinned => value == pinned,
        };
        if !ok && pinned == "*" {
            return Err(format!("takes {name} from elsewhere than a value"));
        }
        if !ok {
            return Err(format!("changes the value of {name}, which the template pins"));
        }
        seen.insert(name);
    }
    if let Some(missing) = shape.env.keys().find(|k| !seen.contains(k.as_str())) {
        return Err(format!("drops the environment variable {missing}"));
    }
    Ok(())
}

fn check_service(name: &str, body: &Value) -> Result<(), String> {
    let reference = want("Service", name)?;
    let spec = &body["spec"];
    if !matches!(spec["type"].as_str(), None | Some("ClusterIP")) {
        return Err(format!("is of type {}, not ClusterIP", text(&spec["type"])));
    }
    for key in [
        "externalIPs",
        "externalName",
        "loadBalancerIP",
        "loadBalancerSourceRanges",
    ] {
        if !empty(&normalized(&spec[key])) {
            return Err(format!("sets spec.{key}"));
        }
    }
    if !same(&spec["selector"], &reference["spec"]["selector"]) {
        return Err("selects other pods than the template's".into());
    }
    Ok(())
}

/// The policy types in effect: as listed, or as the API server defaults them.
fn policy_types(spec: &Value) -> BTreeSet<String> {
    match spec["policyTypes"].as_array() {
        Some(types) => types.iter().map(|t| text(t).to_owned()).collect(),
        None => {
            let mut types = BTreeSet::from(["Ingress".to_owned()]);
            if !empty(&spec["egress"]) {
                types.insert("Egress".to_owned());
            }
            types
        }
    }
}

/// Opens nothing more: the same pods, every direction the template restricts still restricted,
/// and each of its rules one of the template's.
fn check_network_policy(name: &str, body: &Value) -> Result<(), String> {
    let reference = &want("NetworkPolicy", name)?["spec"];
    let spec = &body["spec"];
    if !same(&spec["podSelector"], &reference["podSelector"]) {
        return Err("applies to other pods than the template's".into());
    }
    let types = policy_types(spec);
    for (kind, rules) in [("Ingress", "ingress"), ("Egress", "egress")] {
        if !policy_types(reference).contains(kind) {
            continue;
        }
        if !types.contains(kind) {
            return Err(format!("no longer restricts {rules}"));
        }
        let allowed: Vec<Value> = items(&reference[rules]).map(normalized).collect();
        if let Some(rule) = items(&spec[rules]).find(|r| !allowed.contains(&normalized(r))) {
            return Err(format!("allows {rules} the template does not: {rule}"));
        }
    }
    Ok(())
}

fn check_service_account(name: &str, body: &Value) -> Result<(), String> {
    let reference = want("ServiceAccount", name)?;
    if body["automountServiceAccountToken"] != reference["automountServiceAccountToken"] {
        return Err("changes automountServiceAccountToken".into());
    }
    for key in ["secrets", "imagePullSecrets"] {
        if !empty(&normalized(&body[key])) {
            return Err(format!("lists {key}"));
        }
    }
    Ok(())
}

fn check_config_map(body: &Value) -> Result<(), String> {
    if let Some(key) = body["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| !REFERENCE.config_keys.contains(k.as_str()))
    {
        return Err(format!("sets {key}, which the template does not"));
    }
    if !empty(&normalized(&body["binaryData"])) {
        return Err("holds binaryData".into());
    }
    Ok(())
}

/// The agent's pull Secret stays a docker config.
fn check_pull_secret(body: &Value) -> Result<(), String> {
    if body["type"].as_str() != Some("kubernetes.io/dockerconfigjson") {
        return Err(format!(
            "is of type {}, not kubernetes.io/dockerconfigjson",
            text(&body["type"])
        ));
    }
    for field in ["data", "stringData"] {
        if let Some(key) = body[field]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .find(|k| *k != ".dockerconfigjson")
        {
            return Err(format!("holds {key} besides .dockerconfigjson"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const REPOSITORY: &str = "ghcr.io/distr-sh/distr-agent";

    fn example(kind: &str, name: &str) -> Value {
        reference(kind, name)
            .unwrap_or_else(|| panic!("{kind}/{name} in the examples"))
            .clone()
    }

    fn container(body: &mut Value) -> &mut Value {
        &mut body["spec"]["template"]["spec"]["containers"][0]
    }

    fn pod(body: &mut Value) -> &mut Value {
        &mut body["spec"]["template"]["spec"]
    }

    fn set_env(body: &mut Value, name: &str, entry: Value) {
        let env = container(body)["env"].as_array_mut().expect("env");
        match env.iter_mut().find(|e| e["name"] == name) {
            Some(e) => *e = entry,
            None => env.push(entry),
        }
    }

    type Change = fn(&mut Value);

    #[test]
    fn the_templates_own_objects_pass() {
        for (key, object) in &REFERENCE.objects {
            let (kind, name) = key.split_once('/').expect("Kind/name");
            assert_eq!(check(kind, name, object, REPOSITORY), Ok(()), "{key}");
        }
    }

    #[test]
    fn a_deployment_changes_only_tags_resources_scheduling_and_free_values() {
        let allowed: [(&str, &str, Change); 8] = [
            ("a new tag", "distr-agent", |d| {
                container(d)["image"] = json!("ghcr.io/distr-sh/distr-agent/poller:0.9.0")
            }),
            ("other resources", "distr-agent-executor", |d| {
                container(d)["resources"] = json!({"limits": {"memory": "2Gi"}})
            }),
            ("a node selector", "distr-agent-executor", |d| {
                pod(d)["nodeSelector"] = json!({"disk": "ssd"})
            }),
            ("another version name", "distr-agent", |d| {
                set_env(
                    d,
                    "DISTR_AGENT_VERSION",
                    json!({"name": "DISTR_AGENT_VERSION", "value": "0.9.0"}),
                )
            }),
            ("another log format", "distr-agent-updater", |d| {
                set_env(
                    d,
                    "AGENT_LOG_FORMAT",
                    json!({"name": "AGENT_LOG_FORMAT", "value": "plain"}),
                )
            }),
            ("slower probes", "distr-agent-updater", |d| {
                container(d)["livenessProbe"]["periodSeconds"] = json!(60)
            }),
            ("no pull Secret", "distr-agent", |d| {
                pod(d).as_object_mut().expect("pod").remove("imagePullSecrets");
            }),
            ("the server's defaults", "distr-agent", |d| {
                pod(d)["dnsPolicy"] = json!("ClusterFirst");
                pod(d)["serviceAccount"] = json!("distr-agent-poller");
                pod(d)["volumes"][0]["configMap"]["defaultMode"] = json!(420);
                container(d)["env"][2]["valueFrom"]["fieldRef"]["apiVersion"] = json!("v1");
                container(d)["terminationMessagePath"] = json!("/dev/termination-log");
            }),
        ];
        for (case, name, change) in allowed {
            let mut body = example("Deployment", name);
            change(&mut body);
            assert_eq!(check("Deployment", name, &body, REPOSITORY), Ok(()), "{case}");
        }
        let refused: [(&str, &str, Change, &str); 22] = [
            (
                "a hostPath volume",
                "distr-agent-executor",
                |d| {
                    pod(d)["volumes"]
                        .as_array_mut()
                        .expect("volumes")
                        .push(json!({"name": "host", "hostPath": {"path": "/"}}))
                },
                "changes the pod's volumes",
            ),
            (
                "another Secret mounted",
                "distr-agent-updater",
                |d| pod(d)["volumes"][0]["secret"]["secretName"] = json!("distr-agent-ca"),
                "changes the pod's volumes",
            ),
            (
                "a volume mounted elsewhere",
                "distr-agent-executor",
                |d| container(d)["volumeMounts"][0]["mountPath"] = json!("/usr/local/bin"),
                "changes the container's volumeMounts",
            ),
            (
                "host network",
                "distr-agent",
                |d| pod(d)["hostNetwork"] = json!(true),
                "hostNetwork",
            ),
            (
                "host PID",
                "distr-agent-executor",
                |d| pod(d)["hostPID"] = json!(true),
                "hostPID",
            ),
            (
                "privileged",
                "distr-agent-executor",
                |d| container(d)["securityContext"]["privileged"] = json!(true),
                "securityContext",
            ),
            (
                "an added capability",
                "distr-agent-updater",
                |d| container(d)["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"]),
                "securityContext",
            ),
            (
                "root",
                "distr-agent",
                |d| pod(d)["securityContext"]["runAsNonRoot"] = json!(false),
                "securityContext",
            ),
            (
                "a command",
                "distr-agent-executor",
                |d| container(d)["command"] = json!(["/usr/local/bin/helm", "install"]),
                "command",
            ),
            (
                "args",
                "distr-agent-executor",
                |d| container(d)["args"] = json!(["--help"]),
                "args",
            ),
            (
                "a probe running a command",
                "distr-agent-executor",
                |d| container(d)["livenessProbe"] = json!({"exec": {"command": ["/usr/local/bin/helm", "ls"]}}),
                "livenessProbe",
            ),
            (
                "a second container",
                "distr-agent",
                |d| {
                    let first = container(d).clone();
                    pod(d)["containers"].as_array_mut().expect("containers").push(first)
                },
                "exactly the one container",
            ),
            (
                "an init container",
                "distr-agent",
                |d| {
                    pod(d)["initContainers"] =
                        json!([{"name": "i", "image": "ghcr.io/distr-sh/distr-agent/poller:0.1.0"}])
                },
                "initContainers",
            ),
            (
                "a new variable",
                "distr-agent",
                |d| {
                    set_env(
                        d,
                        "DISTR_RESOURCE_ENDPOINT",
                        json!({"name": "DISTR_RESOURCE_ENDPOINT", "value": "https://evil.example"}),
                    )
                },
                "does not define",
            ),
            (
                "the updater's image repository",
                "distr-agent-updater",
                |d| {
                    set_env(
                        d,
                        "AGENT_IMAGE_REPOSITORY",
                        json!({"name": "AGENT_IMAGE_REPOSITORY", "value": "evil.example/agent"}),
                    )
                },
                "AGENT_IMAGE_REPOSITORY",
            ),
            (
                "the executor the poller calls",
                "distr-agent",
                |d| {
                    set_env(
                        d,
                        "AGENT_EXECUTOR_URL",
                        json!({"name": "AGENT_EXECUTOR_URL", "value": "https://evil.example:9443"}),
                    )
                },
                "AGENT_EXECUTOR_URL",
            ),
            (
                "a free variable from a Secret",
                "distr-agent",
                |d| {
                    set_env(
                        d,
                        "DISTR_AGENT_VERSION",
                        json!({"name": "DISTR_AGENT_VERSION",
                    "valueFrom": {"secretKeyRef": {"name": "distr-agent-ca", "key": "tls.key"}}}),
                    )
                },
                "DISTR_AGENT_VERSION",
            ),
            (
                "a dropped variable",
                "distr-agent",
                |d| {
                    container(d)["env"]
                        .as_array_mut()
                        .expect("env")
                        .retain(|e| e["name"] != "AGENT_EXECUTOR_URL")
                },
                "drops the environment variable AGENT_EXECUTOR_URL",
            ),
            (
                "envFrom on the executor",
                "distr-agent-executor",
                |d| container(d)["envFrom"] = json!([{"configMapRef": {"name": "distr-agent-env"}}]),
                "envFrom",
            ),
            (
                "two replicas",
                "distr-agent-executor",
                |d| d["spec"]["replicas"] = json!(2),
                "spec.replicas",
            ),
            (
                "the poller's token",
                "distr-agent",
                |d| pod(d)["automountServiceAccountToken"] = json!(true),
                "automountServiceAccountToken",
            ),
            (
                "another pull Secret",
                "distr-agent",
                |d| pod(d)["imagePullSecrets"] = json!([{"name": "distr-agent-ca"}]),
                "imagePullSecrets",
            ),
        ];
        for (case, name, change, expected) in refused {
            let mut body = example("Deployment", name);
            change(&mut body);
            let error = check("Deployment", name, &body, REPOSITORY).expect_err(case);
            assert!(error.contains(expected), "{case}: {error}");
        }
    }

    #[test]
    fn services_network_policies_accounts_and_configuration_open_nothing_more() {
        let cases: [(&str, &str, &str, Change, Option<&str>); 13] = [
            (
                "Service",
                "distr-agent-executor",
                "a NodePort",
                |s| s["spec"]["type"] = json!("NodePort"),
                Some("NodePort"),
            ),
            (
                "Service",
                "distr-agent-executor",
                "external IPs",
                |s| s["spec"]["externalIPs"] = json!(["203.0.113.9"]),
                Some("externalIPs"),
            ),
            (
                "Service",
                "distr-agent-updater",
                "another selector",
                |s| s["spec"]["selector"] = json!({"app": "web"}),
                Some("selects other pods"),
            ),
            (
                "Service",
                "distr-agent-updater",
                "the server's defaults",
                |s| {
                    s["spec"]["type"] = json!("ClusterIP");
                    s["spec"]["clusterIP"] = json!("10.0.0.7");
                },
                None,
            ),
            (
                "NetworkPolicy",
                "distr-agent-executor",
                "gRPC from anywhere",
                |n| {
                    n["spec"]["ingress"]
                        .as_array_mut()
                        .expect("rules")
                        .push(json!({"ports": [{"port": 9443, "protocol": "TCP"}]}))
                },
                Some("allows ingress"),
            ),
            (
                "NetworkPolicy",
                "distr-agent-executor",
                "no ingress restriction",
                |n| n["spec"]["policyTypes"] = json!(["Egress"]),
                Some("no longer restricts ingress"),
            ),
            (
                "NetworkPolicy",
                "distr-agent-updater",
                "other pods",
                |n| n["spec"]["podSelector"] = json!({"matchLabels": {"app": "web"}}),
                Some("other pods"),
            ),
            (
                "NetworkPolicy",
                "distr-agent-executor",
                "fewer rules and an egress restriction",
                |n| {
                    n["spec"]["ingress"].as_array_mut().expect("rules").pop();
                    n["spec"]["policyTypes"] = json!(["Ingress", "Egress"]);
                },
                None,
            ),
            (
                "ServiceAccount",
                "distr-agent-poller",
                "a token",
                |a| a["automountServiceAccountToken"] = json!(true),
                Some("automountServiceAccountToken"),
            ),
            (
                "ConfigMap",
                "distr-agent-env",
                "another Hub",
                |c| c["data"]["DISTR_LOGIN_ENDPOINT"] = json!("https://hub.example.org/login"),
                None,
            ),
            (
                "ConfigMap",
                "distr-agent-env",
                "an unknown key",
                |c| c["data"]["AGENT_EXECUTOR_URL"] = json!("https://evil.example"),
                Some("AGENT_EXECUTOR_URL"),
            ),
            (
                "Secret",
                "distr-agent-image-pull",
                "another type",
                |s| s["type"] = json!("Opaque"),
                Some("Opaque"),
            ),
            (
                "Secret",
                "distr-agent-image-pull",
                "another key",
                |s| s["data"]["token"] = json!("eA=="),
                Some("token"),
            ),
        ];
        for (kind, name, case, change, refused) in cases {
            let mut body = example(kind, name);
            change(&mut body);
            let result = check(kind, name, &body, REPOSITORY);
            match refused {
                None => assert_eq!(result, Ok(()), "{kind} {name}: {case}"),
                Some(expected) => {
                    let error = result.expect_err(case);
                    assert!(error.contains(expected), "{kind} {name}: {case}: {error}");
                }
            }
        }
    }

    #[test]
    fn the_admission_policies_hold_the_same_tables() {
        let text = include_str!("../../deploy/examples/cluster.yaml");
        let expected = cel_tables();
        let mut policies = 0;
        for document in serde_norway::Deserializer::from_str(text) {
            let policy = Value::deserialize(document).expect("YAML");
            let name = text_of(&policy["metadata"]["name"]);
            if policy["kind"] != "ValidatingAdmissionPolicy" || !(name.ends_with("-pin") || name.ends_with("-pods")) {
                continue;
            }
            policies += 1;
            for (variable, expression) in &expected {
                let found = items(&policy["spec"]["variables"])
                    .find(|v| v["name"] == *variable)
                    .map(|v| text_of(&v["expression"]));
                assert_eq!(
                    found.as_deref(),
                    Some(expression.as_str()),
                    "the variable {variable} of the policy {name} differs from the updater's table; \
                     the template's lines for it are (a folded scalar, one component a line):\n{}",
                    expression.replace("}, '", "},\n'").replace("], '", "],\n'")
                );
            }
        }
        assert_eq!(policies, 2, "the pin and pods policies");
    }

    fn text_of(value: &Value) -> String {
        value.as_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn the_updater_test_fixture_is_the_templates_poller() {
        let fixture: Value = serde_norway::from_str(include_str!("../testdata/poller-deployment.yaml")).expect("YAML");
        assert_eq!(check("Deployment", "distr-agent", &fixture, REPOSITORY), Ok(()));
    }

    #[test]
    fn cel_strings_escape_quotes_backslashes_and_newlines() {
        assert_eq!(cel_string("a'b\\c\nd"), r"'a\'b\\c\nd'");
    }
}
