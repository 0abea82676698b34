//! The running test environment, as `tests/env/start.sh` described it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::LazyLock,
};

use anyhow::Context as _;

/// Where everything of the test environment lives.
#[derive(Clone, Debug)]
pub struct TestEnv {
    /// State directory of this run (logs, certificates, kubeconfigs).
    pub state: PathBuf,
    /// Directory of etcd, kube-*, kubectl, kwok, helm, grpcurl.
    pub bin: PathBuf,
    /// Admin kubeconfig: for the harness only, never for a process under test.
    pub admin_kubeconfig: PathBuf,
    pub apiserver: String,
    pub ca_file: PathBuf,
    /// host:port of the OCI registry (plain HTTP on loopback, htpasswd auth).
    pub registry: String,
    pub registry_user: String,
    pub registry_password: String,
    /// Directory for the log files kwok serves as container logs (see `kwok::LogFile`).
    pub kwok_logs_dir: PathBuf,
    /// The constant usage of the node `kwok-node-0` in `metrics.k8s.io`, as quantities.
    pub node_cpu_usage: String,
    pub node_memory_usage: String,
    /// Directory of the agent binaries (target/debug).
    pub agent_bin: PathBuf,
    /// The host's address as pods on the real node reach it (the bridge's), where kube-apiserver
    /// and the registry listen; 127.0.0.1 when the environment runs without a real node.
    pub host_ip: String,
    /// Name of the real node (kubelet, containerd), if the environment runs one
    /// (`DISTR_TESTENV_REAL_NODE=1`, see `tests/env/node.sh`).
    pub real_node: Option<String>,
    /// The real node's containerd socket.
    pub containerd_socket: Option<PathBuf>,
}

static ENV: LazyLock<Result<TestEnv, String>> = LazyLock::new(|| TestEnv::load().map_err(|e| format!("{e:#}")));

impl TestEnv {
    /// The environment of this run. Panics with instructions when the tests were not started by
    /// `tests/run.sh` (end-to-end tests must never pass without a real environment).
    pub fn get() -> &'static TestEnv {
        match &*ENV {
            Ok(env) => env,
            Err(error) => panic!("no test environment ({error}); run the end-to-end tests with `tests/run.sh`"),
        }
    }

    /// The environment of this run, if the tests were started by `tests/run.sh`.
    pub fn try_get() -> Option<&'static TestEnv> {
        ENV.as_ref().ok()
    }

    /// Records a secret the harness made (a target secret, a JWT, a registry password), so the
    /// test command's last step can check that no log of the run holds it.
    pub fn record_secret(&self, secret: &str) {
        use std::io::Write as _;
        if secret.len() < 12 {
            return;
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("secrets"))
        {
            // One write per line: `writeln!` would write the secret and the newline apart, and
            // two tests appending at once could interleave them into a blank line, which
            // `grep -f` reads as a pattern that matches everything.
            let _ = file.write_all(format!("{secret}\n").as_bytes());
        }
    }

    fn load() -> anyhow::Result<Self> {
        let file = std::env::var("DISTR_TESTENV").context("DISTR_TESTENV is not set")?;
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?;
        let vars: HashMap<&str, &str> = text.lines().filter_map(|line| line.split_once('=')).collect();
        let get = |key: &str| {
            vars.get(key)
                .map(|v| v.to_string())
                .with_context(|| format!("{file} has no {key}"))
        };
        let optional = |key: &str| vars.get(key).filter(|v| !v.is_empty()).map(|v| v.to_string());
        let agent_bin = match std::env::var("DISTR_AGENT_BIN_DIR") {
            Ok(dir) => PathBuf::from(dir),
            Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
        };
        Ok(Self {
            state: get("DISTR_TESTENV_STATE")?.into(),
            bin: get("DISTR_TESTENV_BIN")?.into(),
            admin_kubeconfig: get("DISTR_TESTENV_KUBECONFIG")?.into(),
            apiserver: get("DISTR_TESTENV_APISERVER")?,
            ca_file: get("DISTR_TESTENV_CA")?.into(),
            registry: get("DISTR_TESTENV_REGISTRY")?,
            registry_user: get("DISTR_TESTENV_REGISTRY_USER")?,
            registry_password: get("DISTR_TESTENV_REGISTRY_PASSWORD")?,
            kwok_logs_dir: get("DISTR_TESTENV_KWOK_LOGS_DIR")?.into(),
            node_cpu_usage: get("DISTR_TESTENV_NODE_CPU_USAGE")?,
            node_memory_usage: get("DISTR_TESTENV_NODE_MEMORY_USAGE")?,
            agent_bin,
            host_ip: optional("DISTR_TESTENV_HOST_IP").unwrap_or_else(|| "127.0.0.1".to_owned()),
            real_node: optional("DISTR_TESTENV_REAL_NODE"),
            containerd_socket: optional("DISTR_TESTENV_CONTAINERD_SOCKET").map(PathBuf::from),
        })
    }

    /// A directory for one test's files (kubeconfigs, logs, charts), kept after the run.
    pub fn test_dir(&self, name: &str) -> PathBuf {
        let dir = self.state.join("tests").join(name);
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    /// Records a process the harness started so that `tests/env/stop.sh` stops it even when the
    /// test process dies without running destructors.
    pub fn record_pid(&self, pid: u32, name: &str) {
        use std::io::Write as _;
        if let Ok(mut pids) = std::fs::OpenOptions::new().append(true).open(self.state.join("pids")) {
            let _ = writeln!(pids, "{pid} {name}");
        }
    }
}
