//! One function per parser of untrusted input, calling the agent's own parsing code the way
//! production does. `fuzz/` drives them with libFuzzer (`cargo fuzz`); the replay test in
//! `tests/` runs every committed corpus and crash file through them on stable Rust, so a fixed
//! finding stays fixed.
//!
//! Each function must never panic; where something must hold besides that, it asserts it.

use std::collections::BTreeMap;

use agent_executor::{
    cluster::{pull_secret, tracking},
    helm::{docker_config, storage as helm_storage},
    model::{RegistryCredentials, RegistryLogin, SecretString},
    resources::{manifest, readiness},
};
use k8s_openapi::{ByteString, api::core::v1::Secret};

/// A fuzz target: takes any bytes, never panics.
pub type Target = fn(&[u8]);

/// The targets by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: [(&str, Target); 11] = [
    ("hub_resources", hub_resources),
    ("jwt_expiry", jwt_expiry),
    ("tracking_record", tracking_record),
    ("helm_release", helm_release),
    ("release_manifest", release_manifest),
    ("go_duration", go_duration),
    ("docker_config", docker_config),
    ("agent_manifest", agent_manifest),
    ("config_dir", config_dir),
    ("readiness", readiness),
    ("policy", policy),
];

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The Hub's resources answer (with Docker-only and unknown fields), as the poller parses it
/// and turns it into the executor's desired state.
pub fn hub_resources(data: &[u8]) {
    if let Ok(resources) = serde_json::from_slice::<agent_poller::hub::Resources>(data) {
        let request = agent_poller::desired::sync_request(&resources, None);
        assert_eq!(request.deployments.len(), resources.deployments.len());
    }
}

/// The `exp` of a JWT from the login answer.
pub fn jwt_expiry(data: &[u8]) {
    if let Some(token) = text(data) {
        let _ = agent_poller::hub::jwt_expiry(token);
    }
}

/// A tracking Secret's `release` record: what decodes re-encodes to the same record.
pub fn tracking_record(data: &[u8]) {
    let secret = |bytes: Vec<u8>| Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("sh.distr.agent.v1.web".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("release".to_owned(), ByteString(bytes))])),
        ..Default::default()
    };
    if let Ok(record) = tracking::decode(&secret(data.to_vec())) {
        let again = tracking::decode(&secret(record.to_json())).expect("a record it wrote decodes");
        assert_eq!(again, record, "a decoded record re-encodes to the same fields");
    }
}

/// Helm's release storage: base64, then gzip (bounded), then JSON.
pub fn helm_release(data: &[u8]) {
    let _ = helm_storage::decode_release(data);
}

/// A release manifest split into objects.
pub fn release_manifest(data: &[u8]) {
    if let Some(text) = text(data) {
        let _ = manifest::parse(text);
    }
}

/// A Go duration (`helmOptions.timeout`, `DISTR_INTERVAL`).
pub fn go_duration(data: &[u8]) {
    if let Some(text) = text(data) {
        let _ = agent_runtime::duration::parse_go_duration(text);
    }
}

/// The docker config built from the Hub's registry logins, and the pull Secret injected into
/// values: the config is JSON, and the values stay JSON.
pub fn docker_config(data: &[u8]) {
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let mut auth = BTreeMap::new();
    if let Some(entries) = input["registryAuth"].as_object() {
        for (host, login) in entries {
            auth.insert(
                host.clone(),
                RegistryCredentials {
                    username: login["username"].as_str().unwrap_or_default().to_owned(),
                    password: SecretString::new(login["password"].as_str().unwrap_or_default()),
                },
            );
        }
    }
    let hub = input["hubRegistry"].as_str().map(|host| RegistryLogin {
        host: host.to_owned(),
        username: "-".into(),
        password: SecretString::new("jwt"),
        plain_http: false,
    });
    let config = docker_config::build(hub.as_ref(), &auth);
    // Checked for JSON syntax, not parsed into a `Value`: with serde_json's `raw_value`
    // feature on (through a dependency), an object whose first key is serde_json's private
    // raw-value token does not read back as a `Value`, although it is valid JSON (and Go,
    // which reads the pull Secret, has no such token). Found by this target.
    assert!(
        serde_json::from_slice::<serde::de::IgnoredAny>(&config).is_ok(),
        "the docker config is JSON"
    );
    let mut values = input["values"].clone();
    pull_secret::inject(&mut values, "sh.distr.agent.v1.web.pull");
}

/// A new agent manifest as the updater checks it.
pub fn agent_manifest(data: &[u8]) {
    if let Some(text) = text(data) {
        let rules = agent_updater::manifest::Rules {
            namespace: "distr".into(),
            image_repository: "ghcr.io/distr-sh/distr-agent".into(),
        };
        let _ = agent_updater::manifest::check(text, &rules);
    }
}

/// The poller's config directories (mounted ConfigMap and Secret): each `NAME=value` line of the
/// input becomes a file, read as production reads it, over a valid environment.
pub fn config_dir(data: &[u8]) {
    thread_local! {
        // One directory per thread, emptied after each input: creating and removing a
        // directory per input made this the slowest target by far.
        static DIR: Option<tempfile::TempDir> = tempfile::tempdir().ok();
    }
    let Some(text) = text(data) else { return };
    DIR.with(|dir| {
        if let Some(dir) = dir {
            config_dir_in(dir.path(), text);
        }
    });
}

fn config_dir_in(dir: &std::path::Path, text: &str) {
    let mut written = Vec::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let plain = !name.is_empty() && name.len() <= 200 && !name.contains(['/', '\0']) && name != "." && name != "..";
        if plain && std::fs::write(dir.join(name), value).is_ok() {
            written.push(name);
        }
    }
    let hub = "https://hub.example.com/api/v1/agent";
    let mut env: std::collections::HashMap<String, String> = [
        ("DISTR_TARGET_ID", "21749b03-a27c-4c90-b805-2e89cab143d2".to_owned()),
        ("DISTR_TARGET_SECRET", "secret".to_owned()),
        ("DISTR_LOGIN_ENDPOINT", format!("{hub}/login")),
        ("DISTR_RESOURCE_ENDPOINT", format!("{hub}/resources")),
        ("DISTR_STATUS_ENDPOINT", format!("{hub}/status")),
        ("DISTR_MANIFEST_ENDPOINT", format!("{hub}/manifest")),
        ("DISTR_INTERVAL", "5s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.insert("DISTR_AGENT_CONFIG_DIRS".into(), dir.display().to_string());
    let _ = agent_poller::config::ConfigSource::from_env(env).current();
    for name in written {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

/// Helm's readiness annotations (from a chart, or from anyone who may edit the live object)
/// judged against an object's status: the input is three lines, the success annotation, the
/// failure annotation, and the status as JSON. Never panics; a verdict names what it found.
pub fn readiness(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let mut lines = text.splitn(3, '\n');
    let (Some(success), Some(failure)) = (lines.next(), lines.next()) else {
        return;
    };
    let status = lines
        .next()
        .and_then(|status| serde_json::from_str::<serde_json::Value>(status).ok());
    let annotations = BTreeMap::from([
        (readiness::SUCCESS_ANNOTATION.to_owned(), success.to_owned()),
        (readiness::FAILURE_ANNOTATION.to_owned(), failure.to_owned()),
    ]);
    let verdict = readiness::evaluate(&annotations, status.as_ref());
    assert!(verdict.is_some(), "both annotations are present");
    if let Some(Err(why)) = verdict {
        assert!(!why.is_empty(), "a verdict says why");
    }
}

/// The customer's policy and the check of a rendered release against it: the input is the
/// policy document, a line `%%`, and the rendered manifest (multi-document YAML). Without the
/// separator the whole input is both, checked against a policy that uses every rule. The
/// check never panics, and a refusal always names its rule and object.
pub fn policy(data: &[u8]) {
    use agent_executor::policy::{check, document};
    let Some(text) = text(data) else { return };
    const EVERY_RULE: &str = "{chartSources: [oci://r.example.com], namespaces: ['a*'], \
        clusterResourceWhitelist: [{group: '*', kind: 'Cluster*'}], \
        namespaceResourceBlacklist: [{group: '', kind: ResourceQuota}], images: ['r.example.com/*'], \
        podSecurity: restricted, serviceAccounts: {apps: deployer}}";
    let (policy_text, manifest) = text.split_once("\n%%\n").unwrap_or((EVERY_RULE, text));
    let Ok(policy) = document::parse(Some(policy_text)) else {
        return;
    };
    let mut objects = Vec::new();
    if agent_executor::policy::manifest_objects(manifest, &mut objects).is_err() {
        return;
    }
    let release = check::Release {
        name: "web",
        namespace: "apps",
        source: "oci://r.example.com/web",
    };
    let _ = check::check_release(&policy, &release);
    let _ = check::unknown_kinds(&objects);
    for violation in check::check_objects(&policy, "apps", "agent", &objects, &check::Scopes::new()) {
        assert!(
            !violation.rule.is_empty() && !violation.object.is_empty(),
            "{violation}"
        );
    }
}
