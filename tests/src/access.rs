//! What a ServiceAccount may do, asked of the API server itself: SubjectAccessReviews for a
//! matrix of requests, the rules a SelfSubjectRulesReview lists, and the bindings naming it.

use anyhow::Context as _;
use k8s_openapi::api::{
    authorization::v1::{
        ResourceAttributes, SelfSubjectRulesReview, SelfSubjectRulesReviewSpec, SubjectAccessReview,
        SubjectAccessReviewSpec,
    },
    rbac::v1::{ClusterRoleBinding, RoleBinding},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

use crate::TestNamespace;

/// One request to ask about.
#[derive(Clone, Debug)]
pub struct Probe {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    /// `None`: cluster-wide.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Probe {
    pub fn label(&self) -> String {
        let group = if self.group.is_empty() { "" } else { "." };
        format!(
            "{} {}{group}{}{} in {}",
            self.verb,
            self.resource,
            self.group,
            self.name.as_deref().map(|n| format!("/{n}")).unwrap_or_default(),
            self.namespace.as_deref().unwrap_or("the cluster")
        )
    }
}

/// Whether `system:serviceaccount:<namespace>:<service_account>` may do `probe`.
pub async fn allowed(admin: &Client, namespace: &str, service_account: &str, probe: &Probe) -> anyhow::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{namespace}:{service_account}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(probe.verb.into()),
                group: Some(probe.group.into()),
                resource: Some(probe.resource.into()),
                namespace: probe.namespace.clone(),
                name: probe.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .context("SubjectAccessReview")?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// The rules the API server lists for `service_account` in its namespace, as it sees them
/// itself (a token is minted for the question only), sorted for comparison.
pub async fn own_rules(ns: &TestNamespace, service_account: &str) -> anyhow::Result<Vec<String>> {
    let kubeconfig = ns.token_kubeconfig(service_account).await?;
    let client = crate::cluster::client_from_kubeconfig(&kubeconfig).await?;
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(ns.name.clone()),
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectRulesReview>::all(client)
        .create(&PostParams::default(), &review)
        .await
        .context("SelfSubjectRulesReview")?;
    let status = answer.status.context("no status")?;
    let mut rules: Vec<String> = status
        .resource_rules
        .iter()
        .map(|r| {
            format!(
                "{:?} {:?} {:?} {:?}",
                r.verbs, r.api_groups, r.resources, r.resource_names
            )
        })
        .chain(
            status
                .non_resource_rules
                .iter()
                .map(|r| format!("{:?} {:?}", r.verbs, r.non_resource_urls)),
        )
        .collect();
    rules.sort();
    Ok(rules)
}

/// Every RoleBinding (any namespace) and ClusterRoleBinding that names the ServiceAccount.
pub async fn bindings_naming(admin: &Client, namespace: &str, service_account: &str) -> anyhow::Result<Vec<String>> {
    let names = |subjects: Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.unwrap_or_default().iter().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == service_account
                && s.namespace.as_deref().unwrap_or(namespace) == namespace
        })
    };
    let mut found = Vec::new();
    for binding in Api::<RoleBinding>::all(admin.clone())
        .list(&ListParams::default())
        .await?
    {
        let binding_ns = binding.metadata.namespace.clone().unwrap_or_default();
        // A subject without a namespace means the binding's own.
        let subjects = binding.subjects.map(|subjects| {
            subjects
                .into_iter()
                .map(|mut s| {
                    s.namespace.get_or_insert(binding_ns.clone());
                    s
                })
                .collect()
        });
        if names(subjects) {
            found.push(format!(
                "RoleBinding {binding_ns}/{}",
                binding.metadata.name.unwrap_or_default()
            ));
        }
    }
    for binding in Api::<ClusterRoleBinding>::all(admin.clone())
        .list(&ListParams::default())
        .await?
    {
        if names(binding.subjects) {
            found.push(format!(
                "ClusterRoleBinding {}",
                binding.metadata.name.unwrap_or_default()
            ));
        }
    }
    Ok(found)
}
