//! The whole agent under test: the executor (with a namespace-admin ServiceAccount token) and
//! the poller (with only its Hub configuration), wired to a Hub simulator.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    AgentProcess, TestEnv, TestNamespace, cluster,
    hubsim::{HubSim, HubSimOptions, RecordedStatus},
    process::free_port,
    tools, wait_for,
};

/// How the agent is started.
pub struct AgentOptions {
    /// `DISTR_INTERVAL`.
    pub interval: &'static str,
    pub hub: HubSimOptions,
    /// Extra environment of the poller.
    pub poller_env: Vec<(&'static str, String)>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            interval: "1s",
            hub: HubSimOptions::default(),
            poller_env: vec![("AGENT_HUB_TIMEOUT_SECONDS", "3".to_owned())],
        }
    }
}

pub struct Agent {
    pub test: String,
    pub ns: TestNamespace,
    pub hub: HubSim,
    pub target: Uuid,
    /// A directory listed in the poller's `DISTR_AGENT_CONFIG_DIRS`.
    pub config_dir: PathBuf,
    pub executor: AgentProcess,
    pub poller: AgentProcess,
    helm_home: tempfile::TempDir,
    /// How the executor was started, to start it again ([`Agent::restart_executor`]).
    executor_env: Vec<(&'static str, String)>,
    /// The executor's gRPC port.
    grpc_port: u16,
}

impl Agent {
    pub async fn start(test: &str, options: AgentOptions) -> anyhow::Result<Self> {
        let env = TestEnv::get();
        let ns = TestNamespace::create(test).await?;
        let identity = ns
            .service_account("distr-agent-executor", cluster::namespace_admin_rules())
            .await?;
        let grpc_port = free_port()?;
        let executor_env = vec![
            ("AGENT_GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
            ("AGENT_NAMESPACE", ns.name.clone()),
            ("KUBECONFIG", identity.kubeconfig.display().to_string()),
            ("AGENT_HELM_BIN", env.bin.join("helm").display().to_string()),
            (
                "AGENT_SCRATCH_DIR",
                env.test_dir(test).join("scratch").display().to_string(),
            ),
            // Helm trusts the environment's CA, which signed the registry's certificate.
            ("SSL_CERT_FILE", env.ca_file.display().to_string()),
        ];
        let mut executor = AgentProcess::start(test, "agent-executor", &executor_env).await?;
        executor.wait_ready(Duration::from_secs(30)).await?;

        let hub = HubSim::start(options.hub).await?;
        let (target, secret) = hub.add_target();
        hub.set_namespace(target, Some(&ns.name));
        let config_dir = env.test_dir(test).join("config");
        std::fs::create_dir_all(&config_dir)?;
        let hub_env = hub.env(target, &secret);
        let mut poller_env: Vec<(&str, String)> = hub_env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        poller_env.push(("DISTR_INTERVAL", options.interval.to_owned()));
        poller_env.push(("DISTR_AGENT_CONFIG_DIRS", config_dir.display().to_string()));
        poller_env.push(("AGENT_EXECUTOR_URL", format!("http://127.0.0.1:{grpc_port}")));
        poller_env.extend(options.poller_env);
        let mut poller = AgentProcess::start(test, "agent-poller", &poller_env).await?;
        poller.wait_ready(Duration::from_secs(30)).await?;
        Ok(Self {
            test: test.to_owned(),
            ns,
            hub,
            target,
            config_dir,
            executor,
            poller,
            helm_home: tempfile::tempdir()?,
            executor_env,
            grpc_port,
        })
    }

    /// Kills the executor (SIGKILL) and starts it again with the same configuration; waits
    /// until it is ready (its start-up recovery done).
    pub async fn restart_executor(&mut self) -> anyhow::Result<()> {
        self.executor.kill().await?;
        self.start_executor_again().await
    }

    /// Starts the executor again (after it stopped or was killed) with the same configuration;
    /// waits until it is ready.
    pub async fn start_executor_again(&mut self) -> anyhow::Result<()> {
        self.executor = AgentProcess::start(&self.test, "agent-executor", &self.executor_env).await?;
        self.executor.wait_ready(Duration::from_secs(30)).await
    }

    /// A gRPC client of the executor (the operator API).
    pub async fn executor_client(
        &self,
    ) -> anyhow::Result<distr_agent_proto::v1::executor_client::ExecutorClient<tonic::transport::Channel>> {
        let url = format!("http://127.0.0.1:{}", self.grpc_port);
        Ok(distr_agent_proto::v1::executor_client::ExecutorClient::connect(url).await?)
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
