//! The policy document: what the customer's cluster admin writes under the key
//! [`KEY`] of the ConfigMap [`CONFIG_MAP`] in the agent's namespace, as YAML (or JSON).
//!
//! Every field is optional; a field that is absent does not restrict anything, a field that
//! is present restricts exactly to what it lists (an empty list allows nothing). Unknown
//! fields are refused, so a misspelt rule never silently allows everything.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Name of the ConfigMap that holds the policy.
pub const CONFIG_MAP: &str = "distr-agent-policy";
/// Key of the policy document in the ConfigMap.
pub const KEY: &str = "policy.yaml";
/// Longest pattern accepted (patterns are matched against every image and object).
const MAX_PATTERN_LEN: usize = 512;

/// Errors reading a policy document: each names what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not YAML, or not the document's shape (an unknown field, a wrong type).
    #[error("{CONFIG_MAP}/{KEY} does not parse: {0}")]
    Syntax(String),
    /// The key is missing, blank or only comments.
    #[error("{CONFIG_MAP} has no {KEY} (write `{{}}` for a policy that restricts nothing)")]
    Missing,
    /// A value that parses but cannot be meant.
    #[error("{CONFIG_MAP}/{KEY}: {0}")]
    Invalid(String),
}

/// The customer's policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Chart sources a release may come from: `oci://` references and classic repository
    /// URLs, by prefix (at a `/`) or glob.
    pub chart_sources: Option<Vec<String>>,
    /// Namespaces a release, and every namespaced object it renders, may be in.
    pub namespaces: Option<Vec<String>>,
    /// Cluster-scoped kinds a release may create (Argo CD's `clusterResourceWhitelist`).
    pub cluster_resource_whitelist: Option<Vec<GroupKind>>,
    /// Namespaced kinds a release may not create (Argo CD's `namespaceResourceBlacklist`).
    #[serde(default)]
    pub namespace_resource_blacklist: Vec<GroupKind>,
    /// Image repositories (`registry/path`, by prefix at a `/` or glob) every container,
    /// init container and ephemeral container must come from.
    pub images: Option<Vec<String>>,
    /// The Pod Security Standard every rendered pod template must meet.
    pub pod_security: Option<PodSecurityLevel>,
    /// Per release namespace, the ServiceAccount (of that namespace) Helm runs as.
    #[serde(default)]
    pub service_accounts: BTreeMap<String, String>,
}

/// An API group and kind; `*` and `?` are wildcards in both, `""` is the core group.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupKind {
    pub group: String,
    pub kind: String,
}

/// A level of the Kubernetes Pod Security Standards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    /// No restriction (the same as leaving the field out).
    Privileged,
    Baseline,
    Restricted,
}

impl PodSecurityLevel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

impl Policy {
    /// The ServiceAccount Helm runs as in `namespace`, as Helm's `--kube-as-user` value.
    pub fn impersonation(&self, namespace: &str) -> Option<String> {
        self.service_accounts
            .get(namespace)
            .map(|account| format!("system:serviceaccount:{namespace}:{account}"))
    }
}

/// Parses the document found under [`KEY`] (`None`: the key is absent).
pub fn parse(text: Option<&str>) -> Result<Policy, PolicyError> {
    let text = text
        .filter(|text| !text.trim().is_empty())
        .ok_or(PolicyError::Missing)?;
    // Comments only (or `null`) would read as a policy that allows everything: refused as
    // missing, so that an accident never lifts every rule.
    if matches!(
        serde_norway::from_str::<serde_norway::Value>(text),
        Ok(serde_norway::Value::Null)
    ) {
        return Err(PolicyError::Missing);
    }
    let policy: Policy = serde_norway::from_str(text).map_err(|error| PolicyError::Syntax(error.to_string()))?;
    validate(&policy)?;
    Ok(policy)
}

fn validate(policy: &Policy) -> Result<(), PolicyError> {
    let lists = [
        ("chartSources", &policy.chart_sources),
        ("namespaces", &policy.namespaces),
        ("images", &policy.images),
    ];
    for (field, patterns) in lists {
        for pattern in patterns.iter().flatten() {
            check_pattern(field, pattern)?;
        }
    }
    let kinds = policy
        .cluster_resource_whitelist
        .iter()
        .flatten()
        .map(|kind| ("clusterResourceWhitelist", kind))
        .chain(
            policy
                .namespace_resource_blacklist
                .iter()
                .map(|kind| ("namespaceResourceBlacklist", kind)),
        );
    for (field, kind) in kinds {
        if kind.kind.is_empty() || kind.kind.len() > MAX_PATTERN_LEN || kind.group.len() > MAX_PATTERN_LEN {
            return Err(PolicyError::Invalid(format!(
                "{field}: an entry needs a kind (use \"*\" for any) and at most {MAX_PATTERN_LEN} characters"
            )));
        }
    }
    for (namespace, account) in &policy.service_accounts {
        for (what, name) in [("namespace", namespace), ("ServiceAccount name", account)] {
            if !is_dns_subdomain(name) {
                return Err(PolicyError::Invalid(format!(
                    "serviceAccounts: {what} {name:?} is not a valid Kubernetes name"
                )));
            }
        }
    }
    Ok(())
}

fn check_pattern(field: &str, pattern: &str) -> Result<(), PolicyError> {
    if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
        return Err(PolicyError::Invalid(format!(
            "{field}: patterns must have 1 to {MAX_PATTERN_LEN} characters"
        )));
    }
    Ok(())
}

/// A DNS-1123 subdomain (the names of namespaces and ServiceAccounts).
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `value` is allowed by `pattern`: with `*` (any characters, `/` included) or `?`
/// (one character) the pattern must match the whole value; without, the value must equal
/// the pattern or continue it after a `/` (`registry.example.com` allows
/// `registry.example.com/team/app`, not `registry.example.com.evil.io`).
pub fn allows(pattern: &str, value: &str) -> bool {
    if pattern.contains(['*', '?']) {
        return glob(pattern, value);
    }
    let pattern = pattern.trim_end_matches('/');
    value == pattern || value.strip_prefix(pattern).is_some_and(|rest| rest.starts_with('/'))
}

/// Wildcard match of the whole `value` (`*`: any run of characters, `?`: one character), in
/// time proportional to the product of the lengths at worst.
pub fn glob(pattern: &str, value: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let value: Vec<char> = value.chars().collect();
    let (mut p, mut v) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == value[v]) {
            p += 1;
            v += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, v));
            p += 1;
        } else if let Some((star_p, star_v)) = star {
            p = star_p + 1;
            v = star_v + 1;
            star = Some((star_p, star_v + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_full_document_parses() {
        let policy = parse(Some(
            r#"
chartSources: ["oci://registry.example.com/vendor/", "https://charts.example.com/*"]
namespaces: [apps, "team-*"]
clusterResourceWhitelist:
  - {group: "", kind: Namespace}
namespaceResourceBlacklist:
  - {group: "", kind: ResourceQuota}
images: [registry.example.com/vendor]
podSecurity: restricted
serviceAccounts:
  apps: deployer
"#,
        ))
        .unwrap();
        assert_eq!(policy.pod_security, Some(PodSecurityLevel::Restricted));
        assert_eq!(policy.namespaces.as_deref().unwrap(), ["apps", "team-*"]);
        assert_eq!(policy.cluster_resource_whitelist.as_ref().unwrap()[0].kind, "Namespace");
        assert_eq!(
            policy.impersonation("apps").as_deref(),
            Some("system:serviceaccount:apps:deployer")
        );
        assert_eq!(policy.impersonation("other"), None);
    }

    #[test]
    fn json_and_the_empty_policy_parse() {
        assert_eq!(parse(Some("{}")).unwrap(), Policy::default());
        let policy = parse(Some(r#"{"images": []}"#)).unwrap();
        assert_eq!(policy.images, Some(Vec::new()));
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let cases = [
            (None, "has no policy.yaml"),
            (Some("  \n# nothing\n"), "has no policy.yaml"),
            (Some("null"), "has no policy.yaml"),
            (Some(""), "has no policy.yaml"),
            (Some("image: [a]"), "unknown field `image`"),
            (Some("podSecurity: strict"), "unknown variant `strict`"),
            (Some("namespaces: apps"), "invalid type"),
            (Some("images: [\"\"]"), "images: patterns must have"),
            (Some("clusterResourceWhitelist: [{group: ''}]"), "missing field `kind`"),
            (
                Some("clusterResourceWhitelist: [{group: '', kind: ''}]"),
                "needs a kind",
            ),
            (Some("serviceAccounts: {apps: Deployer}"), "\"Deployer\" is not a valid"),
            (Some(": : :"), "does not parse"),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn patterns_match_by_prefix_at_a_slash_or_by_glob() {
        let cases = [
            ("registry.example.com", "registry.example.com", true),
            ("registry.example.com", "registry.example.com/team/app", true),
            ("registry.example.com/", "registry.example.com/team/app", true),
            ("registry.example.com", "registry.example.com.evil.io/app", false),
            ("registry.example.com/team", "registry.example.com/teams/app", false),
            ("registry.example.com/*/app", "registry.example.com/a/b/app", true),
            ("*.example.com/*", "eu.example.com/app", true),
            ("*.example.com/*", "example.com/app", false),
            ("team-?", "team-a", true),
            ("team-?", "team-ab", false),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(allows(pattern, value), expected, "{pattern} ~ {value}");
        }
    }
}
