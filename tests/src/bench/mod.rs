//! The agent's benchmark (`bench/run.sh`): N releases of a chart with three Deployments, set at
//! once on the Hub simulator, against the real control plane started with an audit log
//! (`DISTR_TESTENV_AUDIT=1`) and the release binaries. It measures:
//!
//! - **install**: from setting the N deployments on the Hub to the first accepted `healthy`
//!   status of each (first, median, last);
//! - **Hub change → Helm started**, for one upgrade (new values, new revision): to the first
//!   status of the new revision on the Hub (and its type: `progressing` when the agent saw Helm
//!   still running), to kube-apiserver receiving the `create` of Helm's release Secret of the
//!   new revision (audit log), and to `healthy`; plus the part of it spent waiting for the
//!   poller's next Hub fetch (5 s interval);
//! - **pods Ready → healthy**: one Deployment of one release is scaled to 2 replicas while every
//!   node is cordoned, so its new pod cannot start; once the Hub heard that the release is not
//!   healthy, the nodes are uncordoned; from the moment the Deployment reports 2 ready replicas
//!   (read every 250 ms) to the first `healthy` status the Hub received after the unready one
//!   (negative when the Hub heard it before the 250 ms read did);
//! - **steady state**, once everything is healthy and no status but `healthy` came for a while,
//!   over a fixed window: kube-apiserver requests per minute of the agent's ServiceAccounts by
//!   verb and resource (audit log), Hub requests per minute by route (the simulator's record),
//!   each process's resident memory (steady: median over the window; peak: over the whole run)
//!   and CPU seconds per minute (executor with its `helm` children).
//!
//! The executor's resident memory is also sampled during the install, alone and with its whole
//! process group (the `helm` processes it runs).

// The benchmark's tables are its output: they go to stdout by design.
#![allow(clippy::print_stdout)]

pub mod audit;
pub mod procfs;
pub mod report;

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Node};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{
    TestEnv,
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts,
    cluster::admin_client,
    hubsim::{HubSim, RecordedRequest, Route},
    wait_for,
};
pub use report::Results;
use report::{ApiRate, HubRate, InstallFigures, ProcessFigures, ReadyFigures, UpgradeFigures};

/// The chart's workloads: one single-replica Deployment each.
const WORKLOADS: [&str; 3] = ["a", "b", "c"];
/// Pods a kwok node takes (`status.allocatable.pods`), as `kwok-node-0` of `tests/env/start.sh`.
const PODS_PER_NODE: usize = 1000;
/// How long no status other than `healthy` must have come before the state counts as steady.
/// Longer than the executor's health check interval (10 s) plus a poll interval.
const QUIET: Duration = Duration::from_secs(20);
const MIB: f64 = 1024.0;

/// How one benchmark run goes.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Releases to set on the Hub at once (each with 3 Deployments of 1 replica).
    #[arg(long)]
    pub releases: usize,
    /// The steady-state observation window.
    #[arg(long, env = "BENCH_WINDOW_SECONDS", default_value_t = 180)]
    pub window_seconds: u64,
    /// Give up waiting for the install (or the steady state) after this many seconds.
    #[arg(long, env = "BENCH_INSTALL_TIMEOUT_SECONDS", default_value_t = 1800)]
    pub install_timeout_seconds: u64,
}

/// Runs the benchmark for `args.releases` releases in the running test environment.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Results> {
    let n = args.releases;
    let install_timeout = Duration::from_secs(args.install_timeout_seconds);
    let test = format!("bench-{n}");
    progress(&format!("{n} releases: kwok nodes for {} pods", WORKLOADS.len() * n));
    ensure_nodes(WORKLOADS.len() * n + 10).await?;

    let chart_dir = TestEnv::get().test_dir(&test).join("charts");
    let chart = charts::push_chart(&charts::write_workloads_chart(
        &chart_dir, "bench", "0.1.0", &WORKLOADS,
    )?)
    .await?;
    let info = |value: &str| ("AGENT_LOG", value.to_owned());
    let agent = Agent::start(
        &test,
        AgentOptions {
            interval: "5s",
            poller_env: vec![info("info")],
            // The harness checks the certificates every second (tests wait for renewals); 30 s
            // is the default, and what a cluster sees: 4 Secret reads per check.
            executor_env: vec![info("info"), ("AGENT_TLS_CHECK_SECONDS", "30".to_owned())],
            updater_env: vec![info("info")],
            ..Default::default()
        },
    )
    .await?;
    let pids = [&agent.executor, &agent.poller, &agent.updater]
        .map(|process| process.pid().context("an agent process is gone"))
        .into_iter()
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let sampler = procfs::Sampler::start(pids.clone(), Duration::from_millis(250));
    let run_started = Instant::now();

    let mut deployments: Vec<Value> = (0..n)
        .map(|i| deployment(&release_name(i), &chart, "0.1.0", json!({})))
        .collect();
    progress(&format!("installing {n} releases"));
    let install_started = Instant::now();
    let install = install(&agent, &deployments, install_timeout).await?;
    let install_samples = sampler.between(install_started, Instant::now());

    wait_steady(&agent.hub, &deployments, install_timeout).await?;
    progress("upgrading one release");
    let (upgrade, upgraded_release) = upgrade(&agent, &mut deployments).await?;

    wait_steady(&agent.hub, &deployments, install_timeout).await?;
    progress("pods Ready -> healthy");
    let ready = ready_to_healthy(&agent, &deployments[n - 1]).await?;

    wait_steady(&agent.hub, &deployments, install_timeout).await?;
    let window = Duration::from_secs(args.window_seconds);
    progress(&format!("steady state: observing for {window:?}"));
    let cpu_before = cpu_readings(&pids);
    let (from, window_started) = (Utc::now(), Instant::now());
    tokio::time::sleep(window).await;
    let (to, window_ended) = (Utc::now(), Instant::now());
    let cpu_after = cpu_readings(&pids);
    let minutes = (to - from).as_seconds_f64() / 60.0;

    let events = audit::agent_events(&TestEnv::get().state.join("logs"), &agent.ns.name)?;
    let helm_secret = audit::created_at(&events, "secrets", &format!("sh.helm.release.v1.{upgraded_release}.v2"));
    let window_samples = sampler.between(window_started, window_ended);
    let all_samples = sampler.between(run_started, Instant::now());
    Ok(Results {
        releases: n,
        window_seconds: window.as_secs(),
        install,
        upgrade: UpgradeFigures {
            helm_secret_seconds: helm_secret.map(|at| seconds(upgrade.changed_at, at)),
            ..upgrade
        },
        ready,
        api: audit::count_requests(&events, from, to)
            .into_iter()
            .map(|((component, verb, resource), count)| ApiRate {
                component,
                verb,
                resource,
                per_minute: count as f64 / minutes,
            })
            .collect(),
        hub: hub_rates(&agent.hub, from, to, minutes),
        not_healthy_in_window: not_healthy_between(&agent.hub, from, to),
        processes: ["executor", "poller", "updater"]
            .iter()
            .enumerate()
            .map(|(i, name)| ProcessFigures {
                name: (*name).to_owned(),
                rss_steady_mib: median(window_samples.iter().map(|s| s.rss[i])) / MIB,
                rss_peak_mib: max(all_samples.iter().map(|s| s.rss[i])) / MIB,
                cpu_seconds_per_minute: (cpu_after[i] - cpu_before[i]) / minutes,
            })
            .collect(),
        executor_install_peak_mib: max(install_samples.iter().map(|s| s.rss[0])) / MIB,
        executor_group_install_peak_mib: max(install_samples.iter().map(|s| s.group_rss)) / MIB,
    })
}

fn progress(what: &str) {
    eprintln!("==> [bench] {what}");
}

fn release_name(i: usize) -> String {
    format!("r{i:04}")
}

/// Seconds from `from` to `to`.
fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).as_seconds_f64()
}

fn median(values: impl Iterator<Item = u64>) -> f64 {
    let mut values: Vec<u64> = values.collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0) as f64
}

fn max(values: impl Iterator<Item = u64>) -> f64 {
    values.max().unwrap_or(0) as f64
}

/// CPU seconds of each process so far; the first (the executor) with its children.
fn cpu_readings(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .enumerate()
        .map(|(i, pid)| procfs::cpu_seconds(*pid, i == 0).unwrap_or(0.0))
        .collect()
}

/// Adds kwok nodes (`kwok-node-1`, ...) until the nodes take `pods` pods, and waits until they
/// are Ready. kwok manages every node (`--manage-all-nodes`).
async fn ensure_nodes(pods: usize) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(admin_client().await?);
    let wanted = pods.div_ceil(PODS_PER_NODE);
    for i in 1..wanted {
        let name = format!("kwok-node-{i}");
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
            },
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": PODS_PER_NODE.to_string()},
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": PODS_PER_NODE.to_string()},
            },
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        wait_for(&format!("node {name} Ready"), Duration::from_secs(60), || async {
            let node = nodes.get(&name).await.ok()?;
            let ready = node
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        })
        .await?;
    }
    Ok(())
}

/// The `revisionId` and `type` of an accepted status post.
fn accepted_status(request: &RecordedRequest) -> Option<(&str, &str)> {
    if request.route != Route::Status || request.status != Some(200) {
        return None;
    }
    let body = request.body.as_ref()?;
    Some((body.get("revisionId")?.as_str()?, body.get("type")?.as_str()?))
}

/// When the Hub first accepted a status of each revision at or after `since` that `matches` its
/// type.
fn first_statuses(
    hub: &HubSim,
    since: DateTime<Utc>,
    matches: impl Fn(&str) -> bool,
) -> HashMap<String, (String, DateTime<Utc>)> {
    hub.with_requests(|requests| {
        let mut first = HashMap::new();
        for request in requests.iter().filter(|r| r.received_at >= since) {
            if let Some((revision, kind)) = accepted_status(request).filter(|(_, kind)| matches(kind)) {
                first
                    .entry(revision.to_owned())
                    .or_insert_with(|| (kind.to_owned(), request.received_at));
            }
        }
        first
    })
}

/// Sets every deployment at once and waits until each is `healthy` on the Hub.
async fn install(agent: &Agent, deployments: &[Value], timeout: Duration) -> anyhow::Result<InstallFigures> {
    let started = Utc::now();
    agent.set_deployments(deployments.to_vec());
    let mut reported = Instant::now();
    let healthy = wait_for("every release healthy on the Hub", timeout, || {
        let healthy = first_statuses(&agent.hub, started, |kind| kind == "healthy");
        if reported.elapsed() >= Duration::from_secs(30) {
            progress(&format!("{} of {} healthy", healthy.len(), deployments.len()));
            reported = Instant::now();
        }
        let done = deployments.iter().all(|d| healthy.contains_key(&revision(d)));
        async move { done.then_some(healthy) }
    })
    .await?;
    let mut times: Vec<f64> = healthy.values().map(|(_, at)| seconds(started, *at)).collect();
    times.sort_by(f64::total_cmp);
    Ok(InstallFigures {
        first_healthy_seconds: times.first().copied().unwrap_or_default(),
        median_healthy_seconds: times.get(times.len() / 2).copied().unwrap_or_default(),
        all_healthy_seconds: times.last().copied().unwrap_or_default(),
    })
}

/// Waits until the latest status of every deployment is `healthy` and no other status came
/// for [`QUIET`].
async fn wait_steady(hub: &HubSim, deployments: &[Value], timeout: Duration) -> anyhow::Result<()> {
    let revisions: Vec<String> = deployments.iter().map(revision).collect();
    wait_for("a steady state (all healthy, quiet)", timeout, || {
        let quiet_since = Utc::now() - QUIET;
        let steady = hub.with_requests(|requests| {
            let mut latest: HashMap<&str, &str> = HashMap::new();
            let mut last_change = None;
            for request in requests {
                if let Some((revision, kind)) = accepted_status(request) {
                    latest.insert(revision, kind);
                    if kind != "healthy" {
                        last_change = Some(request.received_at);
                    }
                }
            }
            let all_healthy = revisions.iter().all(|r| latest.get(r.as_str()) == Some(&"healthy"));
            all_healthy && last_change.is_none_or(|at| at < quiet_since)
        });
        async move { steady.then_some(()) }
    })
    .await
}

/// Upgrades the first release (new values, so a new Helm revision) and times it. Returns the
/// figures and the release's name.
async fn upgrade(agent: &Agent, deployments: &mut [Value]) -> anyhow::Result<(UpgradeFigures, String)> {
    let next = revise(&deployments[0], json!({"values": {"message": "upgraded"}}));
    deployments[0] = next.clone();
    let new_revision = revision(&next);
    let changed_at = Utc::now();
    agent.set_deployments(deployments.to_vec());

    let timeout = Duration::from_secs(300);
    let of_revision = |statuses: HashMap<String, (String, DateTime<Utc>)>| statuses.get(&new_revision).cloned();
    let (first_kind, first_at) = wait_for("a status of the upgrade", timeout, || {
        let first = of_revision(first_statuses(&agent.hub, changed_at, |_| true));
        async move { first }
    })
    .await?;
    let (_, healthy_at) = wait_for("the upgrade healthy", timeout, || {
        let healthy = of_revision(first_statuses(&agent.hub, changed_at, |kind| kind == "healthy"));
        async move { healthy }
    })
    .await?;
    let progressing = of_revision(first_statuses(&agent.hub, changed_at, |kind| kind == "progressing"));
    let fetched_at = agent.hub.with_requests(|requests| {
        requests
            .iter()
            .find(|r| r.route == Route::Resources && r.received_at >= changed_at)
            .map(|r| r.received_at)
    });
    let figures = UpgradeFigures {
        changed_at,
        poll_wait_seconds: fetched_at.map(|at| seconds(changed_at, at)),
        first_status: first_kind,
        first_status_seconds: seconds(changed_at, first_at),
        progressing_seconds: progressing.map(|(_, at)| seconds(changed_at, at)),
        helm_secret_seconds: None,
        healthy_seconds: seconds(changed_at, healthy_at),
    };
    let release = next["releaseName"].as_str().unwrap_or_default().to_owned();
    Ok((figures, release))
}

/// Marks every node (un)schedulable.
async fn set_schedulable(nodes: &Api<Node>, schedulable: bool) -> anyhow::Result<()> {
    for node in nodes.list(&Default::default()).await? {
        let name = node.metadata.name.unwrap_or_default();
        let patch = json!({"spec": {"unschedulable": !schedulable}});
        nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

async fn scale(deployments: &Api<Deployment>, name: &str, replicas: i32) -> anyhow::Result<()> {
    let patch = json!({"spec": {"replicas": replicas}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Makes one Deployment of `release` wait for a pod that cannot be scheduled until the Hub
/// hears the release is not healthy, then lets the pod start, and times how long after its
/// Deployment reports it ready the Hub receives `healthy`. Scales back afterwards.
async fn ready_to_healthy(agent: &Agent, release: &Value) -> anyhow::Result<ReadyFigures> {
    let nodes: Api<Node> = Api::all(admin_client().await?);
    let deployments: Api<Deployment> = Api::namespaced(admin_client().await?, &agent.ns.name);
    let name = format!(
        "{}-{}",
        release["releaseName"].as_str().unwrap_or_default(),
        WORKLOADS[0]
    );
    let rev = revision(release);
    let timeout = Duration::from_secs(300);

    set_schedulable(&nodes, false).await?;
    scale(&deployments, &name, 2).await?;
    let scaled_at = Utc::now();
    let (unhealthy, unhealthy_at) = wait_for("the Hub to hear of the unready pod", timeout, || {
        let status = first_statuses(&agent.hub, scaled_at, |kind| kind != "healthy").remove(&rev);
        async move { status }
    })
    .await?;
    set_schedulable(&nodes, true).await?;
    let ready_at = wait_for("the second pod Ready", timeout, || async {
        let status = deployments.get(&name).await.ok()?.status?;
        (status.ready_replicas.unwrap_or(0) >= 2).then(Utc::now)
    })
    .await?;
    // The first `healthy` after the unready status: it may reach the Hub before this loop,
    // reading every 250 ms, sees the Deployment ready (the figure is then negative, i.e. below
    // the read granularity); looking only after `ready_at` would find the next 30 s refresh.
    let (_, healthy_at) = wait_for("healthy again on the Hub", timeout, || {
        let status = first_statuses(&agent.hub, unhealthy_at, |kind| kind == "healthy").remove(&rev);
        async move { status }
    })
    .await?;
    scale(&deployments, &name, 1).await?;
    Ok(ReadyFigures {
        unready_to_hub_seconds: seconds(scaled_at, unhealthy_at),
        unready_status: unhealthy,
        ready_to_healthy_seconds: seconds(ready_at, healthy_at),
    })
}

/// Hub requests per minute from `from` to `to`, by route.
fn hub_rates(hub: &HubSim, from: DateTime<Utc>, to: DateTime<Utc>, minutes: f64) -> Vec<HubRate> {
    let counts = hub.with_requests(|requests| {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for request in requests.iter().filter(|r| r.received_at >= from && r.received_at < to) {
            *counts
                .entry(format!("{} {}", request.method, request.route.path()))
                .or_default() += 1;
        }
        counts
    });
    counts
        .into_iter()
        .map(|(route, count)| HubRate {
            route,
            per_minute: count as f64 / minutes,
        })
        .collect()
}

/// Accepted statuses other than `healthy` from `from` to `to` (0 in a steady state).
fn not_healthy_between(hub: &HubSim, from: DateTime<Utc>, to: DateTime<Utc>) -> usize {
    hub.with_requests(|requests| {
        requests
            .iter()
            .filter(|r| r.received_at >= from && r.received_at < to)
            .filter_map(accepted_status)
            .filter(|(_, kind)| *kind != "healthy")
            .count()
    })
}

/// Where a run's files go: `<out>/n<releases>.md` and `.json`.
pub fn result_files(out_dir: &std::path::Path, releases: usize) -> (PathBuf, PathBuf) {
    (
        out_dir.join(format!("n{releases}.md")),
        out_dir.join(format!("n{releases}.json")),
    )
}
