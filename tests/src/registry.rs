//! A private OCI registry for one test (Debian's docker-registry with its own htpasswd), for
//! tests that need credentials other than the shared registry's.

use std::time::Duration;

use anyhow::Context as _;

use crate::{TestEnv, process::free_port, wait_for};

/// A running registry; stopped when dropped.
pub struct Registry {
    pub host: String,
    _process: tokio::process::Child,
}

impl Registry {
    /// Starts a registry on loopback that admits only `user`/`password`.
    pub async fn start(test: &str, user: &str, password: &str) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1", test, user, password).await
    }

    /// Starts a registry on `ip` (the real node's pods reach the host at its bridge address)
    /// that admits only `user`/`password`.
    pub async fn start_on(ip: &str, test: &str, user: &str, password: &str) -> anyhow::Result<Self> {
        TestEnv::get().record_secret(password);
        let env = TestEnv::get();
        let dir = env
            .test_dir(test)
            .join(format!("registry-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        // bcrypt reads only the first 72 bytes of a password (the registry compares the same
        // way), and htpasswd refuses passwords longer than 255: hash the prefix, which lets a
        // long JWT serve as the password.
        let hashed: String = password.chars().take(72).collect();
        let htpasswd = tokio::process::Command::new("htpasswd")
            .args(["-Bbn", user, &hashed])
            .output()
            .await
            .context("running htpasswd")?;
        anyhow::ensure!(
            htpasswd.status.success(),
            "htpasswd failed: {}",
            String::from_utf8_lossy(&htpasswd.stderr)
        );
        std::fs::write(dir.join("htpasswd"), &htpasswd.stdout)?;
        let port = free_port()?;
        let host = format!("{ip}:{port}");
        let config = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {root}}}\nhttp:\n  addr: {host}\n\
             auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n",
            root = dir.join("data").display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let process = tokio::process::Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting docker-registry")?;
        if let Some(pid) = process.id() {
            env.record_pid(pid, "registry");
        }
        let url = format!("http://{host}/v2/");
        wait_for("test registry", Duration::from_secs(20), || async {
            reqwest::get(&url).await.ok().map(|_| ())
        })
        .await?;
        Ok(Self {
            host,
            _process: process,
        })
    }
}
