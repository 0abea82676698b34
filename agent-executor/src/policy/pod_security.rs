//! The checks of the Kubernetes Pod Security Standards (`baseline`, and `restricted` on top
//! of it) over one pod spec, as the standards document them for Kubernetes 1.35. Each
//! finding names the field and the value that breaks the level.

use serde_json::Value;

use super::document::PodSecurityLevel;

/// Capabilities `baseline` lets a container add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The sysctls `baseline` allows.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// SELinux types `baseline` allows (besides none).
const SELINUX_TYPES: &[&str] = &[
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// Volume types `restricted` allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";

/// Containers, init containers and ephemeral containers of a pod spec.
pub fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["containers", "initContainers", "ephemeralContainers"]
        .into_iter()
        .filter_map(|field| spec.get(field).and_then(Value::as_array))
        .flatten()
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(key))
}

fn is_true(value: Option<&Value>) -> bool {
    value.and_then(Value::as_bool) == Some(true)
}

fn text(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str)
}

fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Every finding of `spec` (with the pod's `annotations`) under `level`; empty when it meets
/// the level.
pub fn check(level: PodSecurityLevel, spec: &Value, annotations: Option<&Value>) -> Vec<String> {
    let mut findings = Vec::new();
    if level >= PodSecurityLevel::Baseline {
        baseline(spec, annotations, &mut findings);
    }
    if level >= PodSecurityLevel::Restricted {
        restricted(spec, &mut findings);
    }
    findings
}

fn baseline(spec: &Value, annotations: Option<&Value>, findings: &mut Vec<String>) {
    let pod = spec.get("securityContext");
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if is_true(spec.get(field)) {
            findings.push(format!("spec.{field}=true"));
        }
    }
    if let Some(pod) = pod {
        security_context_baseline("spec.securityContext", pod, findings);
        for sysctl in pod.get("sysctls").and_then(Value::as_array).into_iter().flatten() {
            let name = text(sysctl.get("name")).unwrap_or("");
            if !SAFE_SYSCTLS.contains(&name) {
                findings.push(format!("spec.securityContext.sysctls: {name}"));
            }
        }
    }
    for volume in spec.get("volumes").and_then(Value::as_array).into_iter().flatten() {
        if volume.get("hostPath").is_some() {
            let name = text(volume.get("name")).unwrap_or("<unnamed>");
            findings.push(format!("volume {name}: hostPath"));
        }
    }
    if let Some(annotations) = annotations.and_then(Value::as_object) {
        for (key, value) in annotations {
            if let Some(container) = key.strip_prefix(APPARMOR_ANNOTATION) {
                let value = value.as_str().unwrap_or("");
                if value != "runtime/default" && !value.starts_with("localhost/") {
                    findings.push(format!("container {container}: AppArmor profile {value}"));
                }
            }
        }
    }
    for container in containers(spec) {
        let name = text(container.get("name")).unwrap_or("<unnamed>");
        let prefix = format!("container {name}: securityContext");
        if let Some(context) = container.get("securityContext") {
            security_context_baseline(&prefix, context, findings);
            if is_true(context.get("privileged")) {
                findings.push(format!("{prefix}.privileged=true"));
            }
            for capability in strings(at(context, &["capabilities", "add"])) {
                if !BASELINE_CAPABILITIES.contains(&capability) {
                    findings.push(format!("{prefix}.capabilities.add: {capability}"));
                }
            }
            if let Some(mount) = text(context.get("procMount")).filter(|mount| *mount != "Default") {
                findings.push(format!("{prefix}.procMount={mount}"));
            }
        }
        for port in container.get("ports").and_then(Value::as_array).into_iter().flatten() {
            if let Some(host_port) = port.get("hostPort").and_then(Value::as_i64).filter(|port| *port != 0) {
                findings.push(format!("container {name}: hostPort {host_port}"));
            }
        }
        let handlers = [
            ("livenessProbe", &["livenessProbe"][..]),
            ("readinessProbe", &["readinessProbe"]),
            ("startupProbe", &["startupProbe"]),
            ("lifecycle.postStart", &["lifecycle", "postStart"]),
            ("lifecycle.preStop", &["lifecycle", "preStop"]),
        ];
        for (label, path) in handlers {
            let Some(handler) = at(container, path) else { continue };
            for action in ["httpGet", "tcpSocket"] {
                if let Some(host) = text(at(handler, &[action, "host"])).filter(|host| !host.is_empty()) {
                    findings.push(format!("container {name}: {label}.{action}.host={host}"));
                }
            }
        }
    }
}

/// The checks that apply alike to the pod's and to a container's security context.
fn security_context_baseline(prefix: &str, context: &Value, findings: &mut Vec<String>) {
    if is_true(at(context, &["windowsOptions", "hostProcess"])) {
        findings.push(format!("{prefix}.windowsOptions.hostProcess=true"));
    }
    if let Some(kind) =
        text(at(context, &["appArmorProfile", "type"])).filter(|kind| !matches!(*kind, "RuntimeDefault" | "Localhost"))
    {
        findings.push(format!("{prefix}.appArmorProfile.type={kind}"));
    }
    if let Some(options) = context.get("seLinuxOptions") {
        if let Some(kind) = text(options.get("type")).filter(|kind| !kind.is_empty() && !SELINUX_TYPES.contains(kind)) {
            findings.push(format!("{prefix}.seLinuxOptions.type={kind}"));
        }
        for field in ["user", "role"] {
            if let Some(value) = text(options.get(field)).filter(|value| !value.is_empty()) {
                findings.push(format!("{prefix}.seLinuxOptions.{field}={value}"));
            }
        }
    }
    if text(at(context, &["seccompProfile", "type"])) == Some("Unconfined") {
        findings.push(format!("{prefix}.seccompProfile.type=Unconfined"));
    }
}

fn restricted(spec: &Value, findings: &mut Vec<String>) {
    let pod = spec.get("securityContext");
    let windows = text(at(spec, &["os", "name"])) == Some("windows");
    for volume in spec.get("volumes").and_then(Value::as_array).into_iter().flatten() {
        let name = text(volume.get("name")).unwrap_or("<unnamed>");
        let kinds = volume.as_object().into_iter().flatten().map(|(key, _)| key.as_str());
        for kind in kinds.filter(|kind| *kind != "name" && *kind != "hostPath") {
            if !RESTRICTED_VOLUMES.contains(&kind) {
                findings.push(format!("volume {name}: {kind}"));
            }
        }
    }
    let pod_non_root = pod.and_then(|pod| pod.get("runAsNonRoot")).and_then(Value::as_bool);
    if pod_non_root == Some(false) {
        findings.push("spec.securityContext.runAsNonRoot=false".to_owned());
    }
    if pod.and_then(|pod| pod.get("runAsUser")).and_then(Value::as_i64) == Some(0) {
        findings.push("spec.securityContext.runAsUser=0".to_owned());
    }
    let pod_seccomp = text(pod.and_then(|pod| at(pod, &["seccompProfile", "type"])));
    let pod_seccomp_ok = matches!(pod_seccomp, Some("RuntimeDefault" | "Localhost"));
    for container in containers(spec) {
        let name = text(container.get("name")).unwrap_or("<unnamed>");
        let prefix = format!("container {name}: securityContext");
        let context = container.get("securityContext");
        let field = |path: &[&str]| context.and_then(|context| at(context, path));
        match field(&["runAsNonRoot"]).and_then(Value::as_bool) {
            Some(false) => findings.push(format!("{prefix}.runAsNonRoot=false")),
            None if pod_non_root != Some(true) => findings.push(format!("{prefix}.runAsNonRoot is not true")),
            _ => {}
        }
        if field(&["runAsUser"]).and_then(Value::as_i64) == Some(0) {
            findings.push(format!("{prefix}.runAsUser=0"));
        }
        if windows {
            continue;
        }
        if field(&["allowPrivilegeEscalation"]).and_then(Value::as_bool) != Some(false) {
            findings.push(format!("{prefix}.allowPrivilegeEscalation is not false"));
        }
        match text(field(&["seccompProfile", "type"])) {
            Some("RuntimeDefault" | "Localhost") => {}
            // Unconfined is a baseline finding already.
            Some("Unconfined") => {}
            Some(other) => findings.push(format!("{prefix}.seccompProfile.type={other}")),
            None if !pod_seccomp_ok => findings.push(format!("{prefix}.seccompProfile.type is not set")),
            None => {}
        }
        if !strings(field(&["capabilities", "drop"])).any(|capability| capability == "ALL") {
            findings.push(format!("{prefix}.capabilities.drop does not include ALL"));
        }
        for capability in strings(field(&["capabilities", "add"])) {
            if capability != "NET_BIND_SERVICE" && BASELINE_CAPABILITIES.contains(&capability) {
                findings.push(format!("{prefix}.capabilities.add: {capability}"));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A pod spec that meets `restricted`, with `change` merged into its first container's
    /// security context (or into the spec when `pod` is true).
    fn spec(pod: bool, change: Value) -> Value {
        let mut spec = json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "web", "image": "nginx",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }],
            "volumes": [{"name": "data", "emptyDir": {}}]
        });
        let target = if pod {
            &mut spec
        } else {
            &mut spec["containers"][0]["securityContext"]
        };
        for (key, value) in change.as_object().unwrap() {
            target[key] = value.clone();
        }
        spec
    }

    #[test]
    fn the_levels_refuse_what_the_standards_say() {
        use PodSecurityLevel::{Baseline, Restricted};
        let cases: Vec<(PodSecurityLevel, bool, Value, Vec<&str>)> = vec![
            (Restricted, false, json!({}), vec![]),
            (
                Baseline,
                false,
                json!({"privileged": true}),
                vec!["container web: securityContext.privileged=true"],
            ),
            (
                Baseline,
                true,
                json!({"hostNetwork": true, "hostPID": true}),
                vec!["spec.hostNetwork=true", "spec.hostPID=true"],
            ),
            (
                Baseline,
                true,
                json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                vec!["volume root: hostPath"],
            ),
            (
                Baseline,
                false,
                json!({"capabilities": {"add": ["NET_ADMIN", "CHOWN"]}}),
                vec!["container web: securityContext.capabilities.add: NET_ADMIN"],
            ),
            (
                Baseline,
                false,
                json!({"seccompProfile": {"type": "Unconfined"}}),
                vec!["container web: securityContext.seccompProfile.type=Unconfined"],
            ),
            (
                Baseline,
                false,
                json!({"procMount": "Unmasked"}),
                vec!["container web: securityContext.procMount=Unmasked"],
            ),
            (
                Baseline,
                false,
                json!({"seLinuxOptions": {"type": "spc_t", "user": "root"}}),
                vec![
                    "container web: securityContext.seLinuxOptions.type=spc_t",
                    "container web: securityContext.seLinuxOptions.user=root",
                ],
            ),
            (
                Baseline,
                true,
                json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}, {"name": "net.ipv4.tcp_syncookies", "value": "1"}]}}),
                vec!["spec.securityContext.sysctls: kernel.msgmax"],
            ),
            (
                Baseline,
                false,
                json!({"windowsOptions": {"hostProcess": true}}),
                vec!["container web: securityContext.windowsOptions.hostProcess=true"],
            ),
            (
                Baseline,
                false,
                json!({"appArmorProfile": {"type": "Unconfined"}}),
                vec!["container web: securityContext.appArmorProfile.type=Unconfined"],
            ),
            // Restricted-only findings pass baseline.
            (
                Baseline,
                false,
                json!({"allowPrivilegeEscalation": true, "runAsUser": 0}),
                vec![],
            ),
            (
                Restricted,
                false,
                json!({"allowPrivilegeEscalation": true}),
                vec!["container web: securityContext.allowPrivilegeEscalation is not false"],
            ),
            (
                Restricted,
                false,
                json!({"runAsUser": 0}),
                vec!["container web: securityContext.runAsUser=0"],
            ),
            (
                Restricted,
                false,
                json!({"runAsNonRoot": false}),
                vec!["container web: securityContext.runAsNonRoot=false"],
            ),
            (
                Restricted,
                true,
                json!({"securityContext": {}}),
                vec![
                    "container web: securityContext.runAsNonRoot is not true",
                    "container web: securityContext.seccompProfile.type is not set",
                ],
            ),
            (
                Restricted,
                false,
                json!({"capabilities": {"drop": ["NET_RAW"]}}),
                vec!["container web: securityContext.capabilities.drop does not include ALL"],
            ),
            (
                Restricted,
                false,
                json!({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}),
                vec![],
            ),
            (
                Restricted,
                false,
                json!({"capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}}),
                vec!["container web: securityContext.capabilities.add: CHOWN"],
            ),
            (
                Restricted,
                true,
                json!({"volumes": [{"name": "sock", "nfs": {"server": "x", "path": "/"}}]}),
                vec!["volume sock: nfs"],
            ),
        ];
        for (level, pod, change, expected) in cases {
            let spec = spec(pod, change.clone());
            assert_eq!(check(level, &spec, None), expected, "{level:?} {change}");
        }
    }

    #[test]
    fn host_ports_probe_hosts_and_apparmor_annotations_are_baseline_findings() {
        let spec = json!({"initContainers": [{
            "name": "init",
            "ports": [{"containerPort": 80, "hostPort": 8080}],
            "livenessProbe": {"httpGet": {"host": "10.0.0.1", "port": 80}}
        }]});
        let annotations = json!({"container.apparmor.security.beta.kubernetes.io/init": "unconfined"});
        assert_eq!(
            check(PodSecurityLevel::Baseline, &spec, Some(&annotations)),
            [
                "container init: AppArmor profile unconfined",
                "container init: hostPort 8080",
                "container init: livenessProbe.httpGet.host=10.0.0.1",
            ]
        );
        assert!(check(PodSecurityLevel::Privileged, &spec, Some(&annotations)).is_empty());
    }
}
