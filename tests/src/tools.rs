//! The command-line tools of the test environment (helm, kubectl, grpcurl), each run with an
//! isolated home so tests never share Helm caches or registry logins.

use std::{path::Path, process::Output};

use anyhow::Context as _;

use crate::TestEnv;

/// Output of a finished command, with its stdout and stderr as text.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Fails with the command's stderr when it did not succeed.
    pub fn ok(self, what: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(self.success, "{what} failed: {}{}", self.stderr, self.stdout);
        Ok(self)
    }
}

/// Runs `helm` as the admin (for checks and set-up), with `home` holding its config and caches.
pub async fn helm(home: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let env = TestEnv::get();
    let output = tokio::process::Command::new(env.bin.join("helm"))
        .args(args)
        .env("KUBECONFIG", &env.admin_kubeconfig)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        // Trust the environment's CA (the registry's TLS certificate), as the executor does.
        .env("SSL_CERT_FILE", &env.ca_file)
        .kill_on_drop(true)
        .output()
        .await
        .context("running helm")?;
    Ok(output.into())
}

/// Runs `kubectl` with the given kubeconfig.
pub async fn kubectl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let output = tokio::process::Command::new(TestEnv::get().bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("running kubectl")?;
    Ok(output.into())
}

/// HTTP status of a GET with curl, trusting the environment's CA.
pub async fn http_status(url: &str) -> anyhow::Result<u16> {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&TestEnv::get().ca_file)
        .arg(url)
        .output()
        .await
        .context("running curl")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

/// Runs `grpcurl`.
pub async fn grpcurl(args: &[&str]) -> anyhow::Result<Run> {
    let output = tokio::process::Command::new(TestEnv::get().bin.join("grpcurl"))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("running grpcurl")?;
    Ok(output.into())
}
