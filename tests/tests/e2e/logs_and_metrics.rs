//! Logs and metrics (issue 10): the agent's own log lines of all three processes and the pod
//! logs of releases reach the Hub once, through Hub failures and restarts; cluster metrics
//! are posted under cluster scope only; every process serves Prometheus metrics that move
//! when the agent works.

use std::{collections::HashSet, time::Duration};

use distr_agent_e2e::{
    AgentProcess,
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts::push_web_chart,
    hubsim::{Failure, Route},
    install::Scope,
    kwok, wait_for,
};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// The value of the first sample of `/metrics` text whose name and labels start with `series`
/// (`distr_agent_releases{status="healthy"}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', ',', '}']) || series.ends_with('}'))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn scrape(process: &AgentProcess) -> anyhow::Result<String> {
    Ok(reqwest::get(process.admin_url("/metrics")).await?.text().await?)
}

fn bodies(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|entry| entry["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_agents_own_logs_reach_the_hub_once_and_metrics_move() -> anyhow::Result<()> {
    let test = "agent-logs";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    // A Hub whose log store is down answers 500: the lines wait and come later, once.
    agent.hub.fail(Route::AgentLogs, Failure::Status(500));
    let chart = push_web_chart(test, "agent-logs-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    wait_for("the Hub to refuse agent logs", MINUTE, || async {
        let refused = agent.hub.requests_on(Route::AgentLogs);
        refused.iter().any(|r| r.status == Some(500)).then_some(())
    })
    .await?;
    let install_line = "helm succeeded release=\"web\" operation=\"install\"";
    assert!(
        !bodies(&agent.hub.agent_logs()).iter().any(|b| b.contains(install_line)),
        "the install, logged while the Hub failed, is not shipped yet"
    );
    agent.hub.clear_failure(Route::AgentLogs);

    let wanted = ["poller: ", "updater: ", "executor: ", install_line];
    let entries = wait_for("agent logs of all three processes", MINUTE, || async {
        let entries = agent.hub.agent_logs();
        let bodies = bodies(&entries);
        wanted
            .iter()
            .all(|want| bodies.iter().any(|body| body.contains(want)))
            .then_some(entries)
    })
    .await?;
    let lines = bodies(&entries);
    eprintln!(
        "{} agent log lines, e.g.:\n{}",
        lines.len(),
        lines[..lines.len().min(8)].join("\n")
    );
    let mut seen = HashSet::new();
    for entry in &entries {
        let key = (entry["timestamp"].to_string(), entry["body"].to_string());
        assert!(seen.insert(key), "a line arrived twice: {entry}");
        let severity = entry["severity"].as_str().unwrap_or_default();
        assert!(["info", "warn", "error"].contains(&severity), "{entry}");
    }
    let secret = agent.hub.secret_of(agent.target).unwrap_or_default();
    for body in &lines {
        assert!(!body.contains(&secret) && !body.contains("eyJ"), "a secret in {body}");
    }

    // Every process serves its figures, and they moved with the work just done.
    let executor = scrape(&agent.executor).await?;
    assert!(
        sample(
            &executor,
            "distr_agent_helm_operations_total{operation=\"install\",outcome=\"ok\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &executor,
            "distr_agent_helm_operation_duration_seconds_count{operation=\"install\"}"
        ) >= Some(1.0)
    );
    assert_eq!(sample(&executor, "distr_agent_releases{status=\"healthy\"}"), Some(1.0));
    assert_eq!(
        sample(
            &executor,
            "distr_agent_helm_operations_in_flight{operation=\"install\"}"
        ),
        Some(0.0)
    );
    let now = chrono::Utc::now().timestamp() as f64;
    for process in [&agent.executor, &agent.updater, &agent.poller] {
        let text = scrape(process).await?;
        let expiry = sample(&text, "distr_agent_tls_certificate_expiry_timestamp_seconds");
        assert!(expiry > Some(now), "a certificate that expires later: {expiry:?}");
    }
    let poller = scrape(&agent.poller).await?;
    assert!(
        sample(
            &poller,
            "distr_agent_hub_requests_total{route=\"resources\",outcome=\"ok\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &poller,
            "distr_agent_hub_requests_total{route=\"agent_logs\",outcome=\"server_error\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &poller,
            "distr_agent_hub_request_duration_seconds_count{route=\"status\"}"
        ) >= Some(1.0)
    );
    assert!(
        sample(
            &poller,
            "distr_agent_agent_log_lines_shipped_total{component=\"executor\"}"
        ) >= Some(1.0)
    );
    assert!(sample(&poller, "distr_agent_oldest_unposted_status_age_seconds").is_some());
    Ok(())
}

/// How often each body appears among the Hub's accepted deployment log entries.
fn deployment_log_counts(agent: &Agent) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for body in bodies(&agent.hub.logs()) {
        *counts.entry(body).or_insert(0) += 1;
    }
    counts
}

/// Waits until every line of `lines` reached the Hub.
async fn hub_has_lines(agent: &Agent, lines: &[&str]) -> anyhow::Result<()> {
    wait_for(&format!("the Hub to have {lines:?}"), MINUTE, || async {
        let counts = deployment_log_counts(agent);
        lines.iter().all(|line| counts.contains_key(*line)).then_some(())
    })
    .await
}

/// Pod logs of a release reach the Hub with the workload's name and the lines' own times;
/// a batch the Hub fails with 500 arrives later, once; one it refuses with 400 is dropped;
/// an executor restart neither repeats nor loses lines.
#[tokio::test]
async fn pod_logs_reach_the_hub_once_through_failures_and_restarts() -> anyhow::Result<()> {
    let test = "deployment-logs";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let file = kwok::LogFile::serve_namespace(&agent.ns, "web").await?;
    agent.hub.set_deployment_logs(agent.target, true, None);
    let chart = push_web_chart(test, "logs-web", &["0.1.0"]).await?;
    let web = revise(
        &deployment("web", &chart, "0.1.0", json!({})),
        json!({"logsEnabled": true}),
    );
    agent.set_deployments(vec![web.clone()]);
    let first_at = file.append_lines(&["first line", "second line"])?;
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    hub_has_lines(&agent, &["first line", "second line"]).await?;
    let entry = agent
        .hub
        .logs()
        .into_iter()
        .find(|e| e["body"] == "first line")
        .unwrap_or_default();
    assert_eq!(entry["resource"], "deployments/web-web", "{entry}");
    assert_eq!(entry["deploymentId"], web["id"], "{entry}");
    assert_eq!(entry["deploymentRevisionId"], web["revisionId"], "{entry}");
    let stamped: chrono::DateTime<chrono::Utc> = serde_json::from_value(entry["timestamp"].clone())?;
    assert_eq!(stamped, first_at, "the line's own time");

    // A Hub failing with 500: the lines wait, then arrive once.
    agent.hub.fail(Route::Logs, Failure::Status(500));
    file.append("during the outage")?;
    wait_for("the Hub to fail a batch of logs", MINUTE, || async {
        let failed = agent.hub.requests_on(Route::Logs);
        failed.iter().any(|r| r.status == Some(500)).then_some(())
    })
    .await?;
    agent.hub.clear_failure(Route::Logs);
    hub_has_lines(&agent, &["during the outage"]).await?;

    // A 400 drops the batch for good; the next lines flow.
    agent.hub.fail(Route::Logs, Failure::Status(400));
    file.append("refused for good")?;
    wait_for("the Hub to refuse a batch of logs", MINUTE, || async {
        let refused = agent.hub.requests_on(Route::Logs);
        refused.iter().any(|r| r.status == Some(400)).then_some(())
    })
    .await?;
    agent.hub.clear_failure(Route::Logs);
    file.append("after the refusal")?;
    hub_has_lines(&agent, &["after the refusal"]).await?;

    // An executor restart: the watermark comes back from the tracking Secret. Delivery is at
    // least once: a line the Hub took but whose acknowledgement had not reached the tracking
    // Secret when the executor stopped is sent again. So the restart waits for the watermark
    // to pass the line; nothing acknowledged may come twice.
    let before_restart = file.append("before the restart")?;
    hub_has_lines(&agent, &["before the restart"]).await?;
    let tracking = agent.ns.api::<k8s_openapi::api::core::v1::Secret>();
    wait_for("the watermark to pass the line", MINUTE, || async {
        let secret = tracking.get("sh.distr.agent.v1.web").await.ok()?;
        let stamp = secret.data?.get("lastLogTimestamp")?.0.clone();
        let stamp: chrono::DateTime<chrono::Utc> = String::from_utf8(stamp).ok()?.parse().ok()?;
        (stamp >= before_restart).then_some(())
    })
    .await?;
    agent.restart_executor().await?;
    file.append("after the restart")?;
    hub_has_lines(&agent, &["after the restart"]).await?;
    wait_cycles_on(&agent, 3).await?;

    let counts = deployment_log_counts(&agent);
    assert!(!counts.contains_key("refused for good"), "{counts:?}");
    for (body, count) in &counts {
        assert_eq!(*count, 1, "{body:?} arrived {count} times");
    }
    let secret = agent
        .ns
        .api::<k8s_openapi::api::core::v1::Secret>()
        .get("sh.distr.agent.v1.web")
        .await?;
    let managers: Vec<String> = secret
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.iter().any(|m| m == "distr-agent-logs"), "{managers:?}");
    assert!(secret.data.unwrap_or_default().contains_key("lastLogTimestamp"));
    Ok(())
}

/// A pod whose log cannot be read for a while (kwok answers 400 while its file is gone, as a
/// kubelet answers 5xx while it restarts): the lines it logged meanwhile arrive once it can be
/// read again, and every line comes once (issue 19, item 7). The failed reads are counted.
#[tokio::test]
async fn a_pod_whose_log_read_fails_loses_no_line() -> anyhow::Result<()> {
    let test = "log-read-fails";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    agent.hub.set_deployment_logs(agent.target, true, None);
    let chart = push_web_chart(test, "failing-read-web", &["0.1.0"]).await?;
    let web = revise(
        &deployment("web", &chart, "0.1.0", json!({"replicas": 2})),
        json!({"logsEnabled": true}),
    );
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    let pods: Vec<String> = agent
        .ns
        .api::<k8s_openapi::api::core::v1::Pod>()
        .list(&kube::api::ListParams::default().labels("app=web-web"))
        .await?
        .items
        .into_iter()
        .filter_map(|pod| pod.metadata.name)
        .collect();
    anyhow::ensure!(pods.len() == 2, "two pods: {pods:?}");
    let steady = kwok::LogFile::serve_pods(&agent.ns, "steady", &pods[..1]).await?;
    let failing = kwok::LogFile::serve_pods(&agent.ns, "failing", &pods[1..]).await?;
    steady.append("steady 1")?;
    failing.append("failing 1")?;
    hub_has_lines(&agent, &["steady 1", "failing 1"]).await?;

    // The second pod's log cannot be read; both pods go on logging.
    let away = failing.path().with_extension("away");
    std::fs::rename(failing.path(), &away)?;
    steady.append("steady 2")?;
    let mut file = std::fs::OpenOptions::new().append(true).open(&away)?;
    std::io::Write::write_all(
        &mut file,
        format!(
            "{} stdout F failing 2\n",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        )
        .as_bytes(),
    )?;
    drop(file);
    let before = failures(&agent).await;
    wait_for("a failed log read, counted", MINUTE, || async {
        (failures(&agent).await > before).then_some(())
    })
    .await?;
    wait_cycles_on(&agent, 2).await?;

    std::fs::rename(&away, failing.path())?;
    steady.append("steady 3")?;
    hub_has_lines(&agent, &["failing 2", "steady 2", "steady 3"]).await?;
    wait_cycles_on(&agent, 3).await?;
    let counts = deployment_log_counts(&agent);
    for (body, count) in &counts {
        assert_eq!(*count, 1, "{body:?} arrived {count} times: {counts:?}");
    }
    Ok(())
}

/// `distr_agent_log_read_failures_total` of the executor.
async fn failures(agent: &Agent) -> f64 {
    let text = scrape(&agent.executor).await.unwrap_or_default();
    sample(&text, "distr_agent_log_read_failures_total").unwrap_or(0.0)
}

async fn wait_cycles_on(agent: &Agent, cycles: usize) -> anyhow::Result<()> {
    let seen = agent.hub.requests_on(Route::Resources).len();
    wait_for(&format!("{cycles} more poll cycles"), MINUTE, || async {
        (agent.hub.requests_on(Route::Resources).len() >= seen + cycles).then_some(())
    })
    .await
}

/// Cluster metrics: a cluster-scoped agent posts the node figures of the cluster (capacity
/// from the Node, usage from metrics-server); a namespace-scoped one posts none and says why
/// once.
#[tokio::test]
async fn cluster_metrics_are_posted_under_cluster_scope_only() -> anyhow::Result<()> {
    let test = "cluster-metrics";
    let cluster = Agent::start(
        test,
        AgentOptions {
            scope: Scope::Cluster,
            ..Default::default()
        },
    )
    .await?;
    let namespaced = Agent::start("namespace-metrics", AgentOptions::default()).await?;
    cluster.hub.set_metrics_enabled(cluster.target, true);
    namespaced.hub.set_metrics_enabled(namespaced.target, true);

    let nodes = kube::Api::<k8s_openapi::api::core::v1::Node>::all(distr_agent_e2e::cluster::admin_client().await?)
        .list(&Default::default())
        .await?;
    let (mut cpu, mut memory) = (0.0, 0.0);
    for node in &nodes.items {
        let capacity = node.status.clone().and_then(|s| s.capacity).unwrap_or_default();
        cpu += capacity
            .get("cpu")
            .and_then(|q| kwok::parse_quantity(&q.0))
            .unwrap_or_default();
        memory += capacity
            .get("memory")
            .and_then(|q| kwok::parse_quantity(&q.0))
            .unwrap_or_default();
    }
    let usage = kwok::NodeUsage::get()?;
    // Only the kwok nodes report usage (metrics-server scrapes `type=kwok`; the real node of
    // tests/env/node.sh, when it runs, has capacity but no NodeMetrics).
    let kwok_nodes = nodes
        .items
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("type"))
                .map(String::as_str)
                == Some("kwok")
        })
        .count() as f64;
    let posted = wait_for("cluster metrics on the Hub", 2 * MINUTE, || async {
        cluster.hub.metrics().into_iter().next()
    })
    .await?;
    eprintln!("posted: {posted}");
    assert_eq!(posted["cpuCoresMillis"].as_f64(), Some((cpu * 1000.0).round()));
    assert_eq!(posted["memoryBytes"].as_f64(), Some(memory.round()));
    let expected_memory = usage.memory_bytes * kwok_nodes / memory;
    let memory_usage = posted["memoryUsage"].as_f64().unwrap_or_default();
    assert!(
        (memory_usage - expected_memory).abs() < 1e-9,
        "{memory_usage} vs {expected_memory}"
    );
    let cpu_usage = posted["cpuUsage"].as_f64().unwrap_or_default();
    let expected_cpu = usage.cpu_cores * kwok_nodes / cpu;
    assert!(
        (cpu_usage - expected_cpu).abs() <= expected_cpu * 0.05,
        "{cpu_usage} vs {expected_cpu}"
    );

    wait_cycles_on(&namespaced, 3).await?;
    assert!(
        namespaced.hub.metrics().is_empty(),
        "nothing posted under namespace scope"
    );
    let said = namespaced
        .poller
        .log_text()
        .matches("no cluster metrics are posted")
        .count();
    assert_eq!(said, 1, "said once, not every cycle");
    Ok(())
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Not a test: figures for pods that flood their logs (run with `--ignored --nocapture`).
/// Prints the lines per second the pipeline ships and the executor's and poller's memory.
///
/// `FLOOD_LINES` (30,000) lines of backlog in each of `FLOOD_PODS` (1) pods of one release (the
/// pods share one log file); `FLOOD_MEASURE_SECONDS` stops after that long instead of waiting
/// for every line (the peak memory comes in the first collections).
#[tokio::test]
#[ignore = "a benchmark: prints figures, asserts nothing about time"]
async fn flood_figures() -> anyhow::Result<()> {
    use std::io::Write as _;
    let test = "log-flood";
    let setting = |name: &str, default: usize| std::env::var(name).ok().and_then(|n| n.parse().ok()).unwrap_or(default);
    let lines = setting("FLOOD_LINES", 30_000);
    let pods = setting("FLOOD_PODS", 1);
    let measure = std::env::var("FLOOD_MEASURE_SECONDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .map(Duration::from_secs);
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let file = kwok::LogFile::serve_namespace(&agent.ns, "flood").await?;
    agent.hub.set_deployment_logs(agent.target, true, None);
    let chart = push_web_chart(test, "flood-web", &["0.1.0"]).await?;
    let web = revise(
        &deployment("web", &chart, "0.1.0", json!({"replicas": pods})),
        json!({"logsEnabled": true}),
    );
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 5 * MINUTE)
        .await?;
    let rss_before = (
        agent.executor.pid().and_then(rss_kib),
        agent.poller.pid().and_then(rss_kib),
    );
    // 5,000 lines a second of the pods' time (about 650 KB/s), all written at once: a backlog
    // of pods that flood their logs.
    let spacing = chrono::Duration::microseconds(200);
    let base = chrono::Utc::now() - spacing * i32::try_from(lines).unwrap_or(i32::MAX);
    let mut out = std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(file.path())?);
    for n in 0..lines {
        let time = base + spacing * i32::try_from(n).unwrap_or(i32::MAX);
        writeln!(
            out,
            "{} stdout F flood line {n} with some text to make it about a hundred bytes long, as log lines are",
            time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        )?;
    }
    out.flush()?;
    let total = lines * pods;
    let started = std::time::Instant::now();
    let peak = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );
    let limit = measure.unwrap_or(30 * MINUTE);
    let waited = wait_for("every flood line on the Hub", limit, || async {
        let ordering = std::sync::atomic::Ordering::Relaxed;
        peak.0
            .fetch_max(agent.executor.pid().and_then(rss_kib).unwrap_or(0), ordering);
        peak.1
            .fetch_max(agent.poller.pid().and_then(rss_kib).unwrap_or(0), ordering);
        (agent.hub.logs().len() >= total).then_some(())
    })
    .await;
    if measure.is_none() {
        waited?;
    }
    let shipped = agent.hub.logs().len();
    let peak = (peak.0.into_inner(), peak.1.into_inner());
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "flood: {pods} pods x {lines} lines; {shipped} of {total} lines shipped in {seconds:.1} s = {:.0} lines/s; executor RSS {:?} KiB before, {} KiB peak; poller RSS {:?} KiB before, {} KiB peak",
        shipped as f64 / seconds,
        rss_before.0,
        peak.0,
        rss_before.1,
        peak.1
    );
    Ok(())
}
