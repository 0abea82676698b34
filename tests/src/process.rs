//! Starting one of the agent binaries for a test, and stopping it.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::process::{Child, Command};

use crate::TestEnv;

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An agent binary running for a test. Killed when dropped, with every process of its
/// process group (the `helm` processes the executor started), so a test leaves nothing
/// running; its log is printed when the test fails (drop while panicking), so a failure shows
/// what the process saw.
pub struct AgentProcess {
    pub name: String,
    pub admin_port: u16,
    pub log: PathBuf,
    child: Child,
    /// Its process group (its own pid), kept after the process itself is reaped: children it
    /// left behind still belong to it.
    group: Option<u32>,
}

impl AgentProcess {
    /// Starts `target/debug/<binary>` with `envs` (and nothing inherited but PATH and HOME),
    /// an admin port of its own and JSON-free plain logs at debug level for our crates.
    pub async fn start(test: &str, binary: &str, envs: &[(&str, String)]) -> anyhow::Result<Self> {
        let env = TestEnv::get();
        let admin_port = free_port()?;
        let log = env.test_dir(test).join(format!("{binary}-{admin_port}.log"));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(env.agent_bin.join(binary));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("AGENT_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env(
                "AGENT_LOG",
                "info,agent_executor=debug,agent_poller=debug,agent_runtime=debug",
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            // Its own process group, with its `helm` children: a test can kill them all at
            // once, as a container's death does ([`AgentProcess::kill_group`]).
            .process_group(0);
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command.spawn().with_context(|| format!("starting {binary}"))?;
        if let Some(pid) = child.id() {
            env.record_pid(pid, binary);
        }
        Ok(Self {
            name: binary.to_owned(),
            admin_port,
            log,
            group: child.id(),
            child,
        })
    }

    /// The process id (also its process group id: see [`AgentProcess::start`]), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// HTTP status of an admin endpoint, or None when nothing answers.
    pub async fn admin_status(&self, path: &str) -> Option<u16> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        client
            .get(self.admin_url(path))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.admin_status("/readyz").await == Some(200) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not ready after {timeout:?}:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code and how long it took.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<(Option<i32>, Duration)> {
        let pid = self.child.id().context("process already reaped")?;
        let started = Instant::now();
        let kill = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(kill.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} still running {timeout:?} after SIGTERM", self.name))??;
        Ok((status.code(), started.elapsed()))
    }

    /// Kills the process and its children (its process group) with SIGKILL, as a container's
    /// death does, and waits for the exit. A `helm` child left running would finish its
    /// operation by itself and hide what a real crash leaves behind.
    pub async fn kill_group(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        let kill = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .await?;
        anyhow::ensure!(kill.success(), "kill -KILL -{pid} failed");
        self.child.wait().await?;
        Ok(())
    }

    /// Sends SIGKILL and waits for the exit. Its children keep running until the
    /// `AgentProcess` is dropped (see [`AgentProcess::kill_group`] for a container's death).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("killing {}", self.name))
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The processes of its process group that still run (the process itself included while
    /// it runs; zombies excluded).
    pub fn group_members(&self) -> Vec<u32> {
        self.group.map(group_members).unwrap_or_default()
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // The group first: a `helm` child of an executor killed earlier (or of this one) must
        // not outlive the test, waiting out a timeout of an hour.
        if let Some(group) = self.group {
            kill_group_now(group);
        }
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(300)..];
            eprintln!(
                "----- {} log ({}) -----\n{}\n-----",
                self.name,
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Sends SIGKILL to every process of group `group`, at once (a destructor cannot await).
fn kill_group_now(group: u32) {
    if group_members(group).is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The running processes of process group `group` (from `/proc/<pid>/stat`, Linux); zombies,
/// which have ended already, are left out.
pub fn group_members(group: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the command name (in parentheses, which may hold anything): state, ppid,
            // pgrp.
            let fields: Vec<&str> = stat
                .rfind(')')
                .map(|end| stat[end + 1..].split_whitespace().collect())
                .unwrap_or_default();
            fields.first().is_some_and(|state| *state != "Z")
                && fields.get(2).and_then(|pgrp| pgrp.parse::<u32>().ok()) == Some(group)
        })
        .collect()
}
