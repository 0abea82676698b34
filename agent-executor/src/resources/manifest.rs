//! The objects of a release manifest (Helm's rendered multi-document YAML).

use serde::Deserialize;

/// Errors parsing a release manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("release manifest is not valid YAML: {0}")]
    Yaml(#[source] serde_norway::Error),
}

/// One object of a manifest: enough to find it in the API and judge its health.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestObject {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// `metadata.namespace` when the manifest sets one.
    pub namespace: Option<String>,
    /// `spec.type` (for Services).
    pub spec_type: Option<String>,
    /// `spec.selector` when it is a label selector object (workloads; a Service's selector
    /// is a plain map and not kept).
    pub selector: Option<serde_json::Value>,
    /// It declares Helm's readiness annotations (both of them).
    pub custom_readiness: bool,
    /// A Job with `ttlSecondsAfterFinished`: deleted once it finished.
    pub deleted_when_finished: bool,
}

impl ManifestObject {
    /// API group of the object (`""` for the core group).
    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(group, _)| group)
    }

    /// API version without the group.
    pub fn version(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map_or(self.api_version.as_str(), |(_, version)| version)
    }
}

/// Parses every document of `manifest`; empty documents (comments only) and documents
/// without kind or name are skipped. A list (a kind ending in `List`, with `items` and no name)
/// contributes its items.
pub fn parse(manifest: &str) -> Result<Vec<ManifestObject>, ManifestError> {
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(manifest) {
        let value = serde_json::Value::deserialize(document).map_err(ManifestError::Yaml)?;
        collect(&value, &mut objects);
    }
    Ok(objects)
}

fn collect(value: &serde_json::Value, objects: &mut Vec<ManifestObject>) {
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let (Some(api_version), Some(kind)) = (text("/apiVersion"), text("/kind")) else {
        return;
    };
    // A list (`v1/List`, `ConfigMapList`, ...) has `items` and no name of its own; a custom
    // resource whose kind merely ends in `List` (`IPAllowList`) is an object like any other.
    if kind.ends_with("List")
        && text("/metadata/name").is_none()
        && let Some(items) = value.get("items").and_then(serde_json::Value::as_array)
    {
        items.iter().for_each(|item| collect(item, objects));
        return;
    }
    let Some(name) = text("/metadata/name") else {
        return;
    };
    objects.push(ManifestObject {
        api_version,
        kind: kind.clone(),
        name,
        namespace: text("/metadata/namespace").filter(|namespace| !namespace.is_empty()),
        spec_type: text("/spec/type"),
        selector: value
            .pointer("/spec/selector")
            .filter(|selector| selector.get("matchLabels").is_some() || selector.get("matchExpressions").is_some())
            .cloned(),
        custom_readiness: value
            .pointer("/metadata/annotations")
            .and_then(|annotations| serde_json::from_value(annotations.clone()).ok())
            .is_some_and(|annotations| crate::resources::readiness::declared(&annotations)),
        deleted_when_finished: kind == "Job" && value.pointer("/spec/ttlSecondsAfterFinished").is_some(),
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_parsed_in_order() {
        let manifest = r"---
# Source: web/templates/sa.yaml
apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
---
# Source: web/templates/svc.yaml
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: other
spec:
  type: LoadBalancer
---
# Source: web/templates/empty.yaml
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
";
        let objects = parse(manifest).unwrap();
        assert_eq!(objects.len(), 3);
        assert_eq!(objects[0].kind, "ServiceAccount");
        assert_eq!(objects[1].namespace.as_deref(), Some("other"));
        assert_eq!(objects[1].spec_type.as_deref(), Some("LoadBalancer"));
        assert_eq!(objects[2].group(), "apps");
        assert_eq!(objects[2].version(), "v1");
        assert_eq!(objects[0].group(), "");
    }

    #[test]
    fn only_lists_are_lists_whatever_the_kind_ends_with() {
        let manifest = r"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ConfigMap
    metadata:
      name: one
  - apiVersion: v1
    kind: ConfigMap
    metadata:
      name: two
---
apiVersion: networking.example.com/v1
kind: IPAllowList
metadata:
  name: office
spec:
  cidrs: [10.0.0.0/8]
---
apiVersion: networking.example.com/v1
kind: IPAllowList
metadata:
  name: with-items
items: []
";
        let objects = parse(manifest).unwrap();
        let names: Vec<(&str, &str)> = objects
            .iter()
            .map(|object| (object.kind.as_str(), object.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("ConfigMap", "one"),
                ("ConfigMap", "two"),
                ("IPAllowList", "office"),
                ("IPAllowList", "with-items")
            ]
        );
    }

    #[test]
    fn readiness_annotations_and_job_ttls_are_noted() {
        let manifest = r#"
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  annotations:
    helm.sh/readiness-success: '["{.succeeded} >= 1"]'
    helm.sh/readiness-failure: '["{.failed} >= 1"]'
spec:
  ttlSecondsAfterFinished: 60
---
apiVersion: batch/v1
kind: Job
metadata:
  name: seed
  annotations:
    helm.sh/readiness-success: '["{.succeeded} >= 1"]'
"#;
        let objects = parse(manifest).unwrap();
        assert!(objects[0].custom_readiness && objects[0].deleted_when_finished);
        assert!(!objects[1].custom_readiness, "one annotation alone does not count");
        assert!(!objects[1].deleted_when_finished);
    }

    #[test]
    fn lists_contribute_their_items() {
        let manifest =
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: a\n";
        assert_eq!(parse(manifest).unwrap()[0].name, "a");
    }

    #[test]
    fn empty_manifests_have_no_objects() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("---\n# nothing\n").unwrap().is_empty());
    }

    #[test]
    fn broken_yaml_is_an_error() {
        assert!(parse("kind: [unclosed").is_err());
    }
}
