//! The rendered manifest applied with `kubectl apply -n <ns>` into a namespace that enforces
//! the restricted Pod Security Standard: three pods Ready through their own probes, the poller
//! reaching the executor and the updater by their Service names over mutual TLS, a release
//! installed, upgraded and uninstalled by the pods; and the security context as it holds in
//! the running containers.

use std::time::{Duration, Instant};

use distr_agent_e2e::{
    agent::{revise, revision},
    real_node::{self, PodAgent, PodAgentOptions},
    wait_for,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_manifest_runs_as_pods_that_install_upgrade_and_uninstall() -> anyhow::Result<()> {
    let test = "rn-lifecycle";
    let applied = Instant::now();
    let agent = PodAgent::install(test, PodAgentOptions::default()).await?;
    eprintln!("kubectl apply -> three pods Ready: {:?}", applied.elapsed());
    for (app, time) in agent.start_to_ready().await? {
        eprintln!("{app}: pod created -> Ready {time:?}");
    }
    // Each pod on the real node, its container started once and Ready by its probe.
    for app in real_node::AGENT_APPS {
        let pod = agent.pod(app).await?;
        let spec = pod.spec.clone().unwrap_or_default();
        assert_eq!(spec.node_name.as_deref(), Some(agent.node.name.as_str()), "{app}");
        let status = pod.status.clone().unwrap_or_default();
        let container = &status.container_statuses.unwrap_or_default()[0];
        assert!(container.ready, "{app} ready");
        assert_eq!(container.restart_count, 0, "{app} never restarted");
        assert!(real_node::container_id(&pod, &container.name).is_ok());
    }

    // The poller reaches the executor and the updater through their Services by name
    // (https://distr-agent-executor:9443, https://distr-agent-updater:9444, as the manifest
    // says), over mutual TLS: the lines of both, collected through their AgentLogs services,
    // reach the Hub.
    assert!(agent.manifest.contains("https://distr-agent-executor:9443"));
    assert!(agent.manifest.contains("https://distr-agent-updater:9444"));
    wait_for(
        "agent logs of the executor and the updater on the Hub",
        MINUTE,
        || async {
            let bodies: Vec<String> = agent
                .hub
                .agent_logs()
                .iter()
                .filter_map(|entry| entry["body"].as_str().map(str::to_owned))
                .collect();
            let from = |who: &str| bodies.iter().any(|b| b.contains(who));
            (from("executor: ") && from("updater: ")).then_some(())
        },
    )
    .await?;

    // A release installed, upgraded and uninstalled by the pods; its own pod runs on the node.
    let chart = agent.push_pause_chart("rn-web", &["0.1.0", "0.2.0"]).await?;
    let v1 = agent.deployment("web", &chart, "0.1.0", json!({"message": "one"}));
    let started = Instant::now();
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    eprintln!(
        "hub change -> running (install, pod Ready on the node): {:?}",
        started.elapsed()
    );
    let releases = agent.helm_json(&["ls"]).await?;
    assert_eq!(releases[0]["status"], "deployed", "{releases}");
    let pods: kube::Api<Pod> = agent.ns.api();
    let web = pods.list(&ListParams::default().labels("app=web-pause")).await?;
    assert_eq!(web.items.len(), 1);
    assert_eq!(
        web.items[0].spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(agent.node.name.as_str())
    );

    let v2 = revise(&v1, json!({"chartVersion": "0.2.0", "values": {"message": "two"}}));
    let started = Instant::now();
    agent.set_deployments(vec![v2.clone()]);
    agent
        .wait_status(&revision(&v2), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    eprintln!("hub change -> running (upgrade): {:?}", started.elapsed());
    let releases = agent.helm_json(&["ls"]).await?;
    assert_eq!(releases[0]["chart"], "rn-web-0.2.0", "{releases}");
    agent
        .wait_status(&revision(&v2), "healthy", "status check passed", MINUTE)
        .await?;

    let started = Instant::now();
    agent.set_deployments(vec![]);
    wait_for("release uninstalled", MINUTE, || async {
        let releases = agent.helm_json(&["ls"]).await.ok()?;
        let pods = pods.list(&ListParams::default().labels("app=web-pause")).await.ok()?;
        (releases.as_array().is_some_and(|r| r.is_empty()) && pods.items.is_empty()).then_some(())
    })
    .await?;
    eprintln!("hub change -> uninstalled, its pod gone: {:?}", started.elapsed());

    // Still the same three containers: nothing restarted on the way.
    for app in real_node::AGENT_APPS {
        let pod = agent.pod(app).await?;
        let restarts = pod
            .status
            .and_then(|s| s.container_statuses)
            .map(|c| c[0].restart_count)
            .unwrap_or(-1);
        assert_eq!(restarts, 0, "{app} restarts");
    }
    agent.remove().await?;
    Ok(())
}

/// One line of `/proc/<pid>/status`, by its key.
fn proc_status(pid: u32, key: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow::anyhow!("no {key} in /proc/{pid}/status"))
}

/// The mount options of `target` in the process's mount namespace.
fn mount_options(pid: u32, target: &str) -> anyhow::Result<Option<String>> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // The last mount at a path is the one in effect.
    Ok(info
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4) == Some(&target)).then(|| fields.get(5).map(|o| o.to_string()))
        })
        .flatten())
}

#[tokio::test]
async fn the_security_context_holds_in_the_running_containers() -> anyhow::Result<()> {
    let test = "rn-security";
    let agent = PodAgent::install(test, PodAgentOptions::default()).await?;
    // Helm has written what it writes (an install through the executor) before the checks.
    let chart = agent.push_pause_chart("rn-sec", &["0.1.0"]).await?;
    let web = agent.deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;

    let token = "var/run/secrets/kubernetes.io/serviceaccount/token";
    for (app, container) in [
        ("distr-agent", "poller"),
        ("distr-agent-executor", "executor"),
        ("distr-agent-updater", "updater"),
    ] {
        let pod = agent.pod(app).await?;
        let pid = agent.container_pid(&pod, container).await?;
        // The numeric user and group of the manifest, no capability, no privilege gain,
        // the runtime's default seccomp filter.
        let uids = proc_status(pid, "Uid")?;
        assert!(uids.split_whitespace().all(|u| u == "65532"), "{app} Uid: {uids}");
        let gids = proc_status(pid, "Gid")?;
        assert!(gids.split_whitespace().all(|g| g == "65532"), "{app} Gid: {gids}");
        assert_eq!(proc_status(pid, "CapEff")?, "0000000000000000", "{app}");
        assert_eq!(proc_status(pid, "CapPrm")?, "0000000000000000", "{app}");
        assert_eq!(proc_status(pid, "NoNewPrivs")?, "1", "{app}");
        assert_eq!(proc_status(pid, "Seccomp")?, "2", "{app}: seccomp filter mode");
        // The root file system is read-only; a write into it fails in the container's view.
        let root = mount_options(pid, "/")?.unwrap_or_default();
        assert!(root.split(',').any(|o| o == "ro"), "{app} root mounted {root}");
        let probe = std::path::PathBuf::from(format!("/proc/{pid}/root/usr/local/bin"));
        let write = std::fs::write(probe.join("written-by-test"), b"x");
        assert!(write.is_err(), "{app}: the root file system took a write");
        // The ServiceAccount token: none in the poller's pod, the executor's own in its pod.
        let has_token = std::path::Path::new(&format!("/proc/{pid}/root/{token}")).exists();
        match app {
            "distr-agent" => assert!(!has_token, "the poller's pod holds a ServiceAccount token"),
            "distr-agent-executor" => assert!(has_token, "the executor runs with its token"),
            _ => {}
        }
        eprintln!("{app}: uid/gid 65532, no capabilities, seccomp on, root {root}, token {has_token}");
    }
    // Helm ran inside the executor's container and wrote only to the emptyDir at /tmp: the
    // only writable mount besides the kubelet's own files.
    let pod = agent.pod("distr-agent-executor").await?;
    let pid = agent.container_pid(&pod, "executor").await?;
    let tmp = mount_options(pid, "/tmp")?.unwrap_or_default();
    assert!(tmp.split(',').any(|o| o == "rw"), "/tmp mounted {tmp}");
    let scratch = std::fs::read_dir(format!("/proc/{pid}/root/tmp"))?.count();
    assert!(scratch > 0, "helm's scratch files are in the emptyDir");
    agent.remove().await?;
    Ok(())
}
