//! The benchmark's figures, kept as JSON per run, and their markdown tables.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Everything one run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub releases: usize,
    pub window_seconds: u64,
    pub install: InstallFigures,
    pub upgrade: UpgradeFigures,
    pub ready: ReadyFigures,
    /// kube-apiserver requests of the agent's ServiceAccounts in the window.
    pub api: Vec<ApiRate>,
    /// Hub requests in the window.
    pub hub: Vec<HubRate>,
    /// Statuses other than `healthy` the Hub accepted in the window (0 if steady).
    pub not_healthy_in_window: usize,
    pub processes: Vec<ProcessFigures>,
    pub executor_install_peak_mib: f64,
    /// The executor and its helm processes (its process group), summed per sample.
    pub executor_group_install_peak_mib: f64,
}

/// Seconds from setting the deployments on the Hub to their first `healthy` status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstallFigures {
    pub first_healthy_seconds: f64,
    pub median_healthy_seconds: f64,
    pub all_healthy_seconds: f64,
}

/// Seconds from the Hub change of one upgrade to what followed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeFigures {
    pub changed_at: DateTime<Utc>,
    /// To the poller's next resources fetch.
    pub poll_wait_seconds: Option<f64>,
    /// The type of the first status of the new revision.
    pub first_status: String,
    pub first_status_seconds: f64,
    /// To the first `progressing` status, if there was one.
    pub progressing_seconds: Option<f64>,
    /// To kube-apiserver receiving the `create` of Helm's release Secret of the new revision.
    pub helm_secret_seconds: Option<f64>,
    pub healthy_seconds: f64,
}

/// One Deployment made unready, then Ready.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadyFigures {
    /// From scaling it up (the new pod unschedulable) to the Hub's first other status.
    pub unready_to_hub_seconds: f64,
    pub unready_status: String,
    /// From the Deployment reporting every replica ready to the Hub's next `healthy`.
    pub ready_to_healthy_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiRate {
    pub component: String,
    pub verb: String,
    pub resource: String,
    pub per_minute: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HubRate {
    pub route: String,
    pub per_minute: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessFigures {
    pub name: String,
    pub rss_steady_mib: f64,
    pub rss_peak_mib: f64,
    pub cpu_seconds_per_minute: f64,
}

const WATCH: &str = "watch (opened)";

impl Results {
    /// API requests per minute, watches left out.
    pub fn api_per_minute(&self) -> f64 {
        total(self.api.iter().filter(|r| r.verb != WATCH).map(|r| r.per_minute))
    }

    /// Watches opened per minute.
    pub fn watches_per_minute(&self) -> f64 {
        total(self.api.iter().filter(|r| r.verb == WATCH).map(|r| r.per_minute))
    }

    pub fn hub_per_minute(&self) -> f64 {
        total(self.hub.iter().map(|r| r.per_minute))
    }

    fn process(&self, name: &str) -> Option<&ProcessFigures> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// This run's section of the report.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let n = self.releases;
        let _ = writeln!(out, "## N = {n} releases ({} Deployments, {} pods)\n", 3 * n, 3 * n);
        let _ = writeln!(out, "| measure | seconds |\n|---|---:|");
        let install = &self.install;
        let rows = [
            (
                format!("install: all {n} `healthy` on the Hub (first / median)"),
                format!(
                    "{:.1} ({:.1} / {:.1})",
                    install.all_healthy_seconds, install.first_healthy_seconds, install.median_healthy_seconds
                ),
            ),
            (
                "upgrade: Hub change → poller's next Hub fetch".to_owned(),
                opt(self.upgrade.poll_wait_seconds),
            ),
            (
                format!("upgrade: Hub change → first status (`{}`)", self.upgrade.first_status),
                format!("{:.1}", self.upgrade.first_status_seconds),
            ),
            (
                "upgrade: Hub change → first `progressing`".to_owned(),
                opt(self.upgrade.progressing_seconds),
            ),
            (
                "upgrade: Hub change → Helm release Secret v2 created".to_owned(),
                opt(self.upgrade.helm_secret_seconds),
            ),
            (
                "upgrade: Hub change → `healthy`".to_owned(),
                format!("{:.1}", self.upgrade.healthy_seconds),
            ),
            (
                format!("pod unschedulable → Hub hears `{}`", self.ready.unready_status),
                format!("{:.1}", self.ready.unready_to_hub_seconds),
            ),
            (
                "pods Ready → `healthy` on the Hub".to_owned(),
                format!("{:.1}", self.ready.ready_to_healthy_seconds),
            ),
        ];
        for (what, value) in rows {
            let _ = writeln!(out, "| {what} | {value} |");
        }

        let _ = writeln!(
            out,
            "\n### Steady state ({} s window; statuses other than `healthy` in it: {})\n",
            self.window_seconds, self.not_healthy_in_window
        );
        let _ = writeln!(
            out,
            "| process | RSS steady (MiB) | RSS peak (MiB) | CPU s/min |\n|---|---:|---:|---:|"
        );
        for p in &self.processes {
            let name = if p.name == "executor" {
                "executor (+ helm children for CPU)"
            } else {
                &p.name
            };
            let _ = writeln!(
                out,
                "| {name} | {:.1} | {:.1} | {:.2} |",
                p.rss_steady_mib, p.rss_peak_mib, p.cpu_seconds_per_minute
            );
        }
        let _ = writeln!(
            out,
            "\nExecutor peak RSS during the install: {:.1} MiB alone, {:.1} MiB with its helm processes.",
            self.executor_install_peak_mib, self.executor_group_install_peak_mib
        );

        let _ = writeln!(
            out,
            "\n### kube-apiserver requests per minute by the agent's ServiceAccounts\n"
        );
        let _ = writeln!(out, "| account | verb | resource | per minute |\n|---|---|---|---:|");
        let mut api = self.api.clone();
        api.sort_by(|a, b| b.per_minute.total_cmp(&a.per_minute));
        for r in &api {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} |",
                r.component, r.verb, r.resource, r.per_minute
            );
        }
        let _ = writeln!(
            out,
            "| **all** | (watches apart) | | **{:.1}** (+ {:.1} watches opened) |",
            self.api_per_minute(),
            self.watches_per_minute()
        );

        let _ = writeln!(out, "\n### Hub requests per minute\n");
        let _ = writeln!(out, "| route | per minute |\n|---|---:|");
        for r in &self.hub {
            let _ = writeln!(out, "| {} | {:.1} |", r.route, r.per_minute);
        }
        let _ = writeln!(out, "| **all** | **{:.1}** |", self.hub_per_minute());
        out
    }
}

/// A sum that is 0, not -0 (`Iterator::sum` of no floats), when there is nothing to add.
fn total(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |sum, value| sum + value)
}

fn opt(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"))
}

/// The table comparing runs, one row per N.
pub fn summary(runs: &[Results]) -> String {
    let mut out = String::from("## Summary\n\n");
    out.push_str(
        "| N | install all (s) | change → first status (s) | change → Helm Secret (s) | Ready → healthy (s) \
         | API req/min | watches/min | Hub req/min | RSS steady MiB (poller / executor / updater) \
         | executor install peak MiB (alone / +helm) | CPU s/min (poller / executor+helm / updater) |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n");
    for run in runs {
        let per = |f: fn(&ProcessFigures) -> f64, digits: usize| {
            ["poller", "executor", "updater"]
                .map(|name| {
                    run.process(name)
                        .map_or_else(|| "–".to_owned(), |p| format!("{:.digits$}", f(p)))
                })
                .join(" / ")
        };
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} ({}) | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} / {:.1} | {} |",
            run.releases,
            run.install.all_healthy_seconds,
            run.upgrade.first_status_seconds,
            run.upgrade.first_status,
            opt(run.upgrade.helm_secret_seconds),
            run.ready.ready_to_healthy_seconds,
            run.api_per_minute(),
            run.watches_per_minute(),
            run.hub_per_minute(),
            per(|p| p.rss_steady_mib, 1),
            run.executor_install_peak_mib,
            run.executor_group_install_peak_mib,
            per(|p| p.cpu_seconds_per_minute, 2),
        );
    }
    out
}
