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
