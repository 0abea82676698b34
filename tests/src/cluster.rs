//! Cluster access for tests: the admin client, per-test namespaces, and ServiceAccounts with
//! exact RBAC whose tokens are minted with the TokenRequest API.

use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::TestEnv;

/// A client authenticated with the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &std::path::Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The harness's own admin client (system:masters). Never hand it to a process under test.
pub async fn admin_client() -> anyhow::Result<Client> {
    client_from_kubeconfig(&TestEnv::get().admin_kubeconfig).await
}

/// A namespace created for one test.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

/// Credentials of a ServiceAccount: what a process under test runs with.
#[derive(Clone, Debug)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    pub token: String,
    /// A kubeconfig holding only this token.
    pub kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>`.
    pub async fn create(prefix: &str) -> anyhow::Result<Self> {
        crate::init();
        let client = admin_client().await?;
        let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self { name, client })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// A ServiceAccount bound to a Role with `rules` in this namespace, and a token for it.
    pub async fn service_account(&self, name: &str, rules: Vec<PolicyRule>) -> anyhow::Result<Identity> {
        let meta = |n: &str| ObjectMeta {
            name: Some(n.to_owned()),
            namespace: Some(self.name.clone()),
            ..Default::default()
        };
        let pp = PostParams::default();
        self.api::<ServiceAccount>()
            .create(
                &pp,
                &ServiceAccount {
                    metadata: meta(name),
                    ..Default::default()
                },
            )
            .await
            .context("creating the ServiceAccount")?;
        self.api::<Role>()
            .create(
                &pp,
                &Role {
                    metadata: meta(name),
                    rules: Some(rules),
                },
            )
            .await
            .context("creating the Role")?;
        let binding = RoleBinding {
            metadata: meta(name),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.into(),
                namespace: Some(self.name.clone()),
                ..Default::default()
            }]),
        };
        self.api::<RoleBinding>()
            .create(&pp, &binding)
            .await
            .context("creating the RoleBinding")?;
        let token = self.mint_token(name).await?;
        let kubeconfig = write_token_kubeconfig(&format!("{}-{name}", self.name), &self.name, &token)?;
        Ok(Identity {
            namespace: self.name.clone(),
            service_account: name.into(),
            token,
            kubeconfig,
        })
    }

    /// A kubeconfig holding a freshly minted token of an existing ServiceAccount.
    pub async fn token_kubeconfig(&self, service_account: &str) -> anyhow::Result<PathBuf> {
        let token = self.mint_token(service_account).await?;
        write_token_kubeconfig(&format!("{}-{service_account}", self.name), &self.name, &token)
    }

    /// Mints a token for a ServiceAccount with the TokenRequest API.
    pub async fn mint_token(&self, service_account: &str) -> anyhow::Result<String> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                audiences: vec![],
                ..Default::default()
            },
            ..Default::default()
        };
        let minted: TokenRequest = self
            .api::<ServiceAccount>()
            .create_subresource("token", service_account, &PostParams::default(), &request)
            .await
            .context("TokenRequest")?;
        minted
            .status
            .map(|s| s.token)
            .context("TokenRequest answered without a token")
    }
}

/// Rules allowing everything in a namespace (what a namespace-admin Role grants).
pub fn namespace_admin_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec!["*".into()]),
        resources: Some(vec!["*".into()]),
        verbs: vec!["*".into()],
        ..Default::default()
    }]
}

/// Writes a kubeconfig that authenticates with `token` only.
pub fn write_token_kubeconfig(file_name: &str, namespace: &str, token: &str) -> anyhow::Result<PathBuf> {
    let env = TestEnv::get();
    let path = env.test_dir("kubeconfigs").join(format!("{file_name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: testenv, user: sa, namespace: {namespace}}}\n\
         current-context: sa\n",
        env.apiserver,
        env.ca_file.display(),
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
