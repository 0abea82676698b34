//! The whole agent under test, installed as a customer installs it: the manifest rendered from
//! `deploy/` for the Hub simulator and applied, then the three binaries run on the host the way
//! the manifest's pods would run them: each with a token of its own ServiceAccount (none for the
//! poller), its environment from the manifest, and its certificate Secret mounted as the
//! kubelet mounts it.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    AgentProcess, TestEnv, TestNamespace,
    hubsim::{HubSim, HubSimOptions, RecordedStatus},
    install::{self, KubeletVolume, Scope, VolumeSource},
    process::free_port,
    tools, wait_for,
};

/// How the agent is started.
pub struct AgentOptions {
    /// `DISTR_INTERVAL`.
    pub interval: &'static str,
    pub hub: HubSimOptions,
    /// `targetScope` of the manifest.
    pub scope: Scope,
    /// Extra environment of the poller.
    pub poller_env: Vec<(&'static str, String)>,
    /// Extra environment of the executor.
    pub executor_env: Vec<(&'static str, String)>,
    /// Extra environment of the updater.
    pub updater_env: Vec<(&'static str, String)>,
    /// `agentVersionId` of the manifest (empty: self-update off).
    pub version_id: String,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            interval: "1s",
            hub: HubSimOptions::default(),
            scope: Scope::Namespace,
            poller_env: vec![("AGENT_HUB_TIMEOUT_SECONDS", "3".to_owned())],
            executor_env: Vec::new(),
            updater_env: Vec::new(),
            version_id: String::new(),
        }
    }
}

pub struct Agent {
    pub test: String,
    pub ns: TestNamespace,
    pub hub: HubSim,
    pub target: Uuid,
    /// The manifest as applied.
    pub manifest: String,
    /// The three processes (`agent.executor`, `agent.poller`, ... through `Deref`).
    pub processes: Processes,
    helm_home: tempfile::TempDir,
}

impl std::ops::Deref for Agent {
    type Target = Processes;

    fn deref(&self) -> &Processes {
        &self.processes
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Processes {
        &mut self.processes
    }
}

impl Agent {
    pub async fn start(test: &str, mut options: AgentOptions) -> anyhow::Result<Self> {
        let env = TestEnv::get();
        let ns = TestNamespace::create(test).await?;
        let hub = HubSim::start(std::mem::take(&mut options.hub)).await?;
        let (target, secret) = hub.add_target();
        hub.set_namespace(target, Some(&ns.name));

        let mut params = install::hub_params(&hub, target, Some(&secret), &ns.name, options.scope);
        params["agentInterval"] = json!(options.interval);
        params["agentVersionId"] = json!(options.version_id);
        // The Hub names the version the agent runs, until a test switches it.
        if let Ok(id) = options.version_id.parse::<Uuid>() {
            hub.set_agent_version(target, id, "0.1.0");
        }
        let manifest = install::render(&install::template_path(), &params, &env.test_dir(test)).await?;
        install::apply(&ns.name, &manifest).await?;
        Self::run(test, ns, hub, target, manifest, options).await
    }

    /// Runs the three processes for an agent whose manifest is applied in `ns` already.
    pub async fn run(
        test: &str,
        ns: TestNamespace,
        hub: HubSim,
        target: Uuid,
        manifest: String,
        options: AgentOptions,
    ) -> anyhow::Result<Self> {
        let processes =
            Processes::start(test, &ns, options.executor_env, options.poller_env, options.updater_env).await?;
        Ok(Self {
            test: test.to_owned(),
            ns,
            hub,
            target,
            manifest,
            processes,
            helm_home: tempfile::tempdir()?,
        })
    }

    /// Replaces the Hub's deployment list.
    pub fn set_deployments(&self, deployments: Vec<Value>) {
        self.hub.set_deployments(self.target, deployments);
    }

    /// Waits for a status of `revision` of type `kind` whose message contains `contains`.
    pub async fn wait_status(
        &self,
        revision: &str,
        kind: &str,
        contains: &str,
        timeout: Duration,
    ) -> anyhow::Result<RecordedStatus> {
        let what = format!("status {kind} containing {contains:?} for revision {revision}");
        let found = wait_for(&what, timeout, || async {
            self.statuses(revision)
                .into_iter()
                .find(|s| s.status_type == kind && s.message.contains(contains))
        })
        .await;
        found.map_err(|error| {
            let seen: Vec<String> = self
                .statuses(revision)
                .iter()
                .map(|s| format!("{}: {}", s.status_type, s.message))
                .collect();
            anyhow::anyhow!("{error}; statuses seen: {seen:#?}")
        })
    }

    /// Every status the Hub received for `revision`, in order.
    pub fn statuses(&self, revision: &str) -> Vec<RecordedStatus> {
        self.hub
            .statuses_for(self.target)
            .into_iter()
            .filter(|s| s.revision_id == revision)
            .collect()
    }

    /// `helm <args> -n <ns> -o json` as the admin, parsed.
    pub async fn helm_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-n", &self.ns.name, "-o", "json"]);
        let run = tools::helm(self.helm_home.path(), &all).await?.ok("helm")?;
        Ok(serde_json::from_str(&run.stdout)?)
    }

    /// Names of the Secrets in the namespace.
    pub async fn secret_names(&self) -> anyhow::Result<Vec<String>> {
        let secrets = self
            .ns
            .api::<k8s_openapi::api::core::v1::Secret>()
            .list(&Default::default())
            .await?;
        Ok(secrets.items.into_iter().filter_map(|s| s.metadata.name).collect())
    }
}

/// The three processes of an installed agent, run on the host as the manifest's pods would
/// run them: each with a token of its own ServiceAccount (none for the poller), its
/// environment from the manifest (ConfigMap and Secret included), and its certificate Secret,
/// ConfigMap and Secret volumes kept current as the kubelet keeps them.
pub struct Processes {
    pub executor: AgentProcess,
    pub updater: AgentProcess,
    pub poller: AgentProcess,
    pub executor_addr: String,
    pub updater_addr: String,
    /// Mounted certificate Secrets: poller, updater, operator.
    pub tls_dirs: HashMap<&'static str, PathBuf>,
    /// A directory listed last in the poller's `DISTR_AGENT_CONFIG_DIRS`.
    pub config_dir: PathBuf,
    pub volumes: Vec<KubeletVolume>,
    test: String,
    namespace: String,
    /// How the executor and the updater were started, to start them again.
    executor_env: std::collections::BTreeMap<String, String>,
    updater_env: std::collections::BTreeMap<String, String>,
}

impl Processes {
    /// Starts them for the manifest applied in `ns`; logs go to the test directory of `test`.
    pub async fn start(
        test: &str,
        ns: &TestNamespace,
        extra_executor_env: Vec<(&'static str, String)>,
        extra_poller_env: Vec<(&'static str, String)>,
        extra_updater_env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let env = TestEnv::get();
        let dir = env.test_dir(test);
        let executor_port = free_port()?;

        let mut executor_env = own_env(ns, "distr-agent-executor").await?;
        executor_env.extend([
            ("AGENT_GRPC_ADDR".into(), format!("127.0.0.1:{executor_port}")),
            ("AGENT_HELM_BIN".into(), env.bin.join("helm").display().to_string()),
            ("AGENT_SCRATCH_DIR".into(), dir.join("scratch").display().to_string()),
            // Helm trusts the environment's CA, which signed the registry's certificate.
            ("SSL_CERT_FILE".into(), env.ca_file.display().to_string()),
            ("AGENT_TLS_CHECK_SECONDS".into(), "1".into()),
        ]);
        executor_env.extend(extra_executor_env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        executor_env.insert(
            "KUBECONFIG".into(),
            ns.token_kubeconfig("distr-agent-executor").await?.display().to_string(),
        );
        let mut executor = AgentProcess::start(test, "agent-executor", &pairs(&executor_env)).await?;
        executor.wait_ready(Duration::from_secs(30)).await?;

        let mut volumes = Vec::new();
        let mut tls_dirs = HashMap::new();
        // The tests' operator asks for a certificate, as the README has a person do it.
        install::OperatorCert::request(&ns.name).await?;
        for role in ["poller", "updater", "operator"] {
            let mount = dir.join("volumes").join(format!("{role}-tls"));
            let secret = format!("distr-agent-{role}-tls");
            volumes.push(KubeletVolume::mount(
                ns.client.clone(),
                &ns.name,
                VolumeSource::Secret(secret),
                mount.clone(),
            )?);
            tls_dirs.insert(role, mount);
        }

        let updater_port = free_port()?;
        let mut updater_env = own_env(ns, "distr-agent-updater").await?;
        updater_env.extend([
            ("AGENT_GRPC_ADDR".into(), format!("127.0.0.1:{updater_port}")),
            ("AGENT_TLS_DIR".into(), tls_dirs["updater"].display().to_string()),
            ("AGENT_TLS_RELOAD_SECONDS".into(), "1".into()),
            (
                "KUBECONFIG".into(),
                ns.token_kubeconfig("distr-agent-updater").await?.display().to_string(),
            ),
        ]);
        updater_env.extend(extra_updater_env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let mut updater = AgentProcess::start(test, "agent-updater", &pairs(&updater_env)).await?;

        let env_dir = dir.join("volumes").join("env");
        let auth_dir = dir.join("volumes").join("auth");
        volumes.push(KubeletVolume::mount(
            ns.client.clone(),
            &ns.name,
            VolumeSource::ConfigMap("distr-agent-env".into()),
            env_dir.clone(),
        )?);
        volumes.push(KubeletVolume::mount(
            ns.client.clone(),
            &ns.name,
            VolumeSource::Secret("distr-agent-auth".into()),
            auth_dir.clone(),
        )?);
        let config_dir = dir.join("config");
        // A config file left by an earlier run of the same test (a rotated secret) must not
        // reach this one.
        let _ = std::fs::remove_dir_all(&config_dir);
        std::fs::create_dir_all(&config_dir)?;
        let mut poller_env = own_env(ns, "distr-agent").await?;
        poller_env.extend([
            (
                "DISTR_AGENT_CONFIG_DIRS".into(),
                format!(
                    "{}\n{}\n{}",
                    env_dir.display(),
                    auth_dir.display(),
                    config_dir.display()
                ),
            ),
            (
                "AGENT_EXECUTOR_URL".into(),
                format!("https://127.0.0.1:{executor_port}"),
            ),
            ("AGENT_UPDATER_URL".into(), format!("https://127.0.0.1:{updater_port}")),
            ("AGENT_TLS_DIR".into(), tls_dirs["poller"].display().to_string()),
            ("AGENT_TLS_RELOAD_SECONDS".into(), "1".into()),
        ]);
        poller_env.extend(extra_poller_env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let mut poller = AgentProcess::start(test, "agent-poller", &pairs(&poller_env)).await?;
        updater.wait_ready(Duration::from_secs(30)).await?;
        poller.wait_ready(Duration::from_secs(30)).await?;
        Ok(Self {
            test: test.to_owned(),
            namespace: ns.name.clone(),
            executor_env,
            updater_env,
            executor,
            updater,
            poller,
            executor_addr: format!("127.0.0.1:{executor_port}"),
            updater_addr: format!("127.0.0.1:{updater_port}"),
            tls_dirs,
            config_dir,
            volumes,
        })
    }
}

impl Processes {
    /// Kills the executor (SIGKILL) and starts it again as before; waits until it is ready
    /// (its start-up recovery done).
    pub async fn restart_executor(&mut self) -> anyhow::Result<()> {
        self.executor.kill().await?;
        self.start_executor_again().await
    }

    /// Starts the executor again (after it stopped or was killed) as before; waits until it is
    /// ready.
    pub async fn start_executor_again(&mut self) -> anyhow::Result<()> {
        self.executor = AgentProcess::start(&self.test, "agent-executor", &pairs(&self.executor_env)).await?;
        self.executor.wait_ready(Duration::from_secs(30)).await
    }

    /// Kills the updater (SIGKILL) and starts it again as before.
    pub async fn restart_updater(&mut self) -> anyhow::Result<()> {
        self.updater.kill().await?;
        self.updater = AgentProcess::start(&self.test, "agent-updater", &pairs(&self.updater_env)).await?;
        self.updater.wait_ready(Duration::from_secs(30)).await
    }

    /// Starts another updater as the first was started, on a port of its own (a second pod of
    /// the updater's Deployment during a surge); returns it and its address.
    pub async fn start_another_updater(&self) -> anyhow::Result<(AgentProcess, String)> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut env = self.updater_env.clone();
        env.insert("AGENT_GRPC_ADDR".into(), addr.clone());
        let mut updater = AgentProcess::start(&self.test, "agent-updater", &pairs(&env)).await?;
        updater.wait_ready(Duration::from_secs(30)).await?;
        Ok((updater, addr))
    }

    /// Starts the updater again (after it was killed) as before; waits until it is ready.
    pub async fn start_updater_again(&mut self) -> anyhow::Result<()> {
        self.updater = AgentProcess::start(&self.test, "agent-updater", &pairs(&self.updater_env)).await?;
        self.updater.wait_ready(Duration::from_secs(30)).await
    }

    /// A gRPC client of the updater listening on `addr`, with the certificate mounted for
    /// `client`.
    pub fn updater_client_at(
        &self,
        client: &str,
        addr: &str,
    ) -> anyhow::Result<
        distr_agent_proto::v1::updater_client::UpdaterClient<agent_runtime::tls::client::ReloadingChannel>,
    > {
        let channel = self.channel(client, addr, agent_runtime::tls::Role::Updater)?;
        Ok(distr_agent_proto::v1::updater_client::UpdaterClient::new(channel))
    }

    /// A channel to `addr`, which must present `server`'s identity, with the certificate
    /// mounted for `client` (`"poller"`, `"updater"` or `"operator"`).
    pub fn channel(
        &self,
        client: &str,
        addr: &str,
        server: agent_runtime::tls::Role,
    ) -> anyhow::Result<agent_runtime::tls::client::ReloadingChannel> {
        use agent_runtime::tls::{Credentials, TlsFiles, client::MtlsChannel};
        let files = TlsFiles::read_dir(&self.tls_dirs[client])?;
        let credentials = Credentials::from_files(files, &self.namespace)?;
        let (_keep, watch) = tokio::sync::watch::channel(Some(std::sync::Arc::new(credentials)));
        let channel = MtlsChannel::new(
            &format!("https://{addr}"),
            server.identity(&self.namespace),
            watch,
            Duration::from_secs(5),
            Duration::from_secs(60),
        )?;
        Ok(agent_runtime::tls::client::ReloadingChannel::new(channel))
    }

    /// A gRPC client of the executor with the operator's certificate (the operator API).
    pub async fn executor_client(
        &self,
    ) -> anyhow::Result<
        distr_agent_proto::v1::executor_client::ExecutorClient<agent_runtime::tls::client::ReloadingChannel>,
    > {
        let channel = self.channel("operator", &self.executor_addr, agent_runtime::tls::Role::Executor)?;
        Ok(distr_agent_proto::v1::executor_client::ExecutorClient::new(channel))
    }

    /// A gRPC client of the updater with the certificate mounted for `client`.
    pub fn updater_client(
        &self,
        client: &str,
    ) -> anyhow::Result<
        distr_agent_proto::v1::updater_client::UpdaterClient<agent_runtime::tls::client::ReloadingChannel>,
    > {
        let channel = self.channel(client, &self.updater_addr, agent_runtime::tls::Role::Updater)?;
        Ok(distr_agent_proto::v1::updater_client::UpdaterClient::new(channel))
    }
}

/// The environment the manifest gives a Deployment's container, minus what only makes sense in
/// a pod (the admin address and log format are the harness's).
async fn own_env(ns: &TestNamespace, deployment: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut env = install::container_env(&ns.client, &ns.name, deployment).await?;
    env.remove("AGENT_ADMIN_ADDR");
    env.remove("AGENT_LOG_FORMAT");
    Ok(env)
}

fn pairs(env: &std::collections::BTreeMap<String, String>) -> Vec<(&str, String)> {
    env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

/// A Hub deployment entry with fresh ids, pulling with the shared registry's credentials.
pub fn deployment(release: &str, chart_url: &str, version: &str, values: Value) -> Value {
    json!({
        "registryAuth": registry_auth(None),
        "id": Uuid::new_v4(),
        "revisionId": Uuid::new_v4(),
        "releaseName": release,
        "chartUrl": chart_url,
        "chartVersion": version,
        "values": values,
        "logsEnabled": false,
        "forceRestart": false,
        "ignoreRevisionSkew": false,
        // Docker-only fields the agent must ignore.
        "dockerType": "compose",
        "composeFile": null,
    })
}

/// The same deployment with a new revision.
pub fn revise(deployment: &Value, changes: Value) -> Value {
    let mut next = deployment.clone();
    next["revisionId"] = json!(Uuid::new_v4());
    if let (Some(next), Value::Object(changes)) = (next.as_object_mut(), changes) {
        next.extend(changes);
    }
    next
}

pub fn revision(deployment: &Value) -> String {
    deployment["revisionId"].as_str().unwrap_or_default().to_owned()
}

/// Registry credentials for the shared test registry, as a Hub `registryAuth` map.
pub fn registry_auth(password: Option<&str>) -> Value {
    let env = TestEnv::get();
    let mut auth = HashMap::new();
    auth.insert(
        env.registry.clone(),
        json!({"username": env.registry_user, "password": password.unwrap_or(&env.registry_password)}),
    );
    json!(auth)
}
