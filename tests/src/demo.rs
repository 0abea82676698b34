//! The README's first command (`demo/run.sh`), once the control plane runs: a Hub simulator of
//! its own with two sample deployments, the agent installed from `deploy/` and its three
//! processes run as the manifest's pods would run them, and a live view of what happens.

// The demo's output is for a person: its view goes to stdout by design.
#![allow(clippy::print_stdout)]

use std::{
    collections::{BTreeMap, VecDeque},
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{
    TestEnv, TestNamespace,
    agent::{Processes, registry_auth},
    charts,
    install::{self, Scope},
    tools,
};

/// How the demo runs.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "demo", about = "Runs the Distr agent against a local Hub simulator")]
pub struct DemoArgs {
    /// Run a scripted check instead of the live view: wait until both deployments are healthy
    /// on the Hub, carry out what the view suggests trying (new values, an upgrade, a broken
    /// version, an uninstall) and wait for each outcome, then stop everything.
    #[arg(long)]
    pub check: bool,
    /// Give up the check after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
}

const NAME: &str = "demo";
const RELEASES: [(&str, &str); 2] = [("web", "hello from web"), ("api", "hello from api")];

/// The running demo: the simulator process, the namespace, the agent's processes.
struct Demo {
    ns: TestNamespace,
    admin_url: String,
    processes: Processes,
    _hubsim: tokio::process::Child,
    http: reqwest::Client,
    helm_home: tempfile::TempDir,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let demo = start().await?;
    let result = if args.check {
        check(&demo, started, Duration::from_secs(args.timeout_seconds)).await
    } else {
        live(&demo).await
    };
    say("stopping the agent and the Hub simulator");
    drop(demo);
    result
}

fn say(what: &str) {
    eprintln!("==> {what}");
}

async fn start() -> anyhow::Result<Demo> {
    let env = TestEnv::get();
    let dir = env.test_dir(NAME);
    say("creating a namespace for the agent");
    let ns = TestNamespace::create(NAME).await?;

    say("starting the Hub simulator");
    let info_file = dir.join("hubsim.json");
    let _ = std::fs::remove_file(&info_file);
    let log = std::fs::File::create(dir.join("hubsim.log"))?;
    let hubsim = tokio::process::Command::new(env.agent_bin.join("hubsim"))
        .arg("--info-file")
        .arg(&info_file)
        .arg("--namespace")
        .arg(&ns.name)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting hubsim")?;
    if let Some(pid) = hubsim.id() {
        env.record_pid(pid, "hubsim");
    }
    let info: Value = crate::wait_for("the Hub simulator", Duration::from_secs(30), || async {
        serde_json::from_slice(&std::fs::read(&info_file).ok()?).ok()
    })
    .await?;
    let admin_url = info["adminUrl"].as_str().context("adminUrl")?.to_owned();

    say("pushing the sample chart demo-web (0.1.0, 0.2.0) to the local OCI registry");
    let chart_url = charts::push_web_chart(NAME, "demo-web", &["0.1.0", "0.2.0"]).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    for (release, message) in RELEASES {
        let deployment = json!({
            "releaseName": release,
            "chartUrl": chart_url,
            "chartVersion": "0.1.0",
            "values": {"message": message},
            "registryAuth": registry_auth(None),
        });
        let answer = http
            .post(format!("{admin_url}/deployments"))
            .json(&deployment)
            .send()
            .await?;
        anyhow::ensure!(answer.status().is_success(), "adding {release}: {}", answer.status());
    }

    say("rendering deploy/manifest.yaml.tmpl for this Hub and applying it");
    let endpoint = |key: &str| info["endpoints"][key].clone();
    let params = json!({
        "targetId": info["targetId"],
        "targetSecret": info["targetSecret"],
        "loginEndpoint": endpoint("DISTR_LOGIN_ENDPOINT"),
        "manifestEndpoint": endpoint("DISTR_MANIFEST_ENDPOINT"),
        "resourcesEndpoint": endpoint("DISTR_RESOURCE_ENDPOINT"),
        "statusEndpoint": endpoint("DISTR_STATUS_ENDPOINT"),
        "metricsEndpoint": endpoint("DISTR_METRICS_ENDPOINT"),
        "logsEndpoint": endpoint("DISTR_LOGS_ENDPOINT"),
        "agentLogsEndpoint": endpoint("DISTR_AGENT_LOGS_ENDPOINT"),
        "agentInterval": "2s",
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "agentVersionId": "",
        "registryEnabled": false, "registryHost": "", "registryPlainHttp": false,
        "agentDockerConfig": "",
        "targetScope": Scope::Namespace.as_str(),
        "targetNamespace": ns.name,
        "targetResources": null,
        "metricsEnabled": false, "autohealAll": false, "dockerSocketPath": "",
    });
    let manifest = install::render(&install::template_path(), &params, &dir).await?;
    std::fs::write(dir.join("manifest.yaml"), &manifest)?;
    install::apply(&ns.name, &manifest).await?;

    say("starting agent-executor, agent-updater and agent-poller as the manifest's pods would run");
    let processes = Processes::start(NAME, &ns, Vec::new(), Vec::new(), Vec::new()).await?;
    Ok(Demo {
        ns,
        admin_url,
        processes,
        _hubsim: hubsim,
        http,
        helm_home: tempfile::tempdir()?,
    })
}

/// The simulator's deployments, each with the latest status the Hub received.
async fn deployments(demo: &Demo) -> anyhow::Result<Vec<Value>> {
    let answer = demo.http.get(format!("{}/deployments", demo.admin_url)).send().await?;
    Ok(answer.json().await?)
}

/// Each deployment's release, chart version and latest status on the Hub.
async fn hub_view(demo: &Demo) -> anyhow::Result<Vec<(String, String, String, String)>> {
    Ok(deployments(demo)
        .await?
        .iter()
        .map(|d| {
            let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
            (
                text(&d["releaseName"]),
                text(&d["chartVersion"]),
                text(&d["status"]["type"]),
                text(&d["status"]["message"]),
            )
        })
        .collect())
}

fn all_healthy(view: &[(String, String, String, String)]) -> bool {
    view.len() == RELEASES.len() && view.iter().all(|(_, _, status, _)| status == "healthy")
}

async fn helm_ls(demo: &Demo) -> String {
    match tools::helm(demo.helm_home.path(), &["ls", "-n", &demo.ns.name]).await {
        Ok(run) => run.stdout,
        Err(error) => format!("helm ls failed: {error}\n"),
    }
}

/// The operator's grpcurl command for this demo.
fn grpcurl_args(demo: &Demo, method: &str) -> Vec<String> {
    let operator = install::OperatorCert {
        dir: demo.processes.tls_dirs["operator"].clone(),
    };
    let mut args = operator.grpcurl_flags(&demo.ns.name);
    args.extend([demo.processes.executor_addr.clone(), method.into()]);
    args
}

/// What the demo suggests trying, each a request to the simulator's admin interface: the live
/// view prints them as `curl` commands, and the check carries them out in this order.
struct Try {
    method: reqwest::Method,
    release: &'static str,
    /// The JSON body, if any.
    body: Option<&'static str>,
    comment: &'static str,
    /// What the Hub then receives for the release.
    expect: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Healthy,
    Error,
    Uninstalled,
}

fn tries() -> [Try; 4] {
    [
        Try {
            method: reqwest::Method::PATCH,
            release: "web",
            body: Some(r#"{"values":{"message":"changed"}}"#),
            comment: "new values",
            expect: Outcome::Healthy,
        },
        Try {
            method: reqwest::Method::PATCH,
            release: "api",
            body: Some(r#"{"chartVersion":"0.2.0"}"#),
            comment: "upgrade",
            expect: Outcome::Healthy,
        },
        Try {
            method: reqwest::Method::PATCH,
            release: "api",
            body: Some(r#"{"chartVersion":"9.9.9"}"#),
            comment: "break it (no such chart version)",
            expect: Outcome::Error,
        },
        Try {
            method: reqwest::Method::DELETE,
            release: "web",
            body: None,
            comment: "uninstall",
            expect: Outcome::Uninstalled,
        },
    ]
}

impl Try {
    fn curl(&self, admin: &str) -> String {
        let mut command = format!("curl -s -X {} {admin}/deployments/{}", self.method, self.release);
        if let Some(body) = self.body {
            command.push_str(&format!(" -H 'content-type: application/json' -d '{body}'"));
        }
        format!("{command}   # {}", self.comment)
    }
}

fn next_steps(demo: &Demo) -> String {
    let env = TestEnv::get();
    let admin = &demo.admin_url;
    let ns = &demo.ns.name;
    let grpcurl = grpcurl_args(demo, "distr.agent.v1.Executor/ListReleases").join(" ");
    let mut text = format!(
        "Try next, in another terminal:\n  curl -s {admin}/deployments   # what the Hub holds, with the statuses it received\n"
    );
    for one in tries() {
        text.push_str(&format!("  {}\n", one.curl(admin)));
    }
    text.push_str(&format!(
        "  {bin}/kubectl --kubeconfig {kubeconfig} -n {ns} get deployments,pods,secrets\n\
         \x20 {bin}/grpcurl {grpcurl}\n\
         Logs: {logs}\n",
        bin = env.bin.display(),
        kubeconfig = env.admin_kubeconfig.display(),
        logs = env.test_dir(NAME).display(),
    ));
    text
}

/// The notable lines of the agent's logs: everything at INFO and above, newest last.
fn notable_lines(demo: &Demo, keep: usize) -> Vec<String> {
    let mut lines = VecDeque::new();
    for process in [
        &demo.processes.executor,
        &demo.processes.updater,
        &demo.processes.poller,
    ] {
        for line in process.log_text().lines() {
            let plain = strip_ansi(line);
            if plain.contains(" DEBUG ") || plain.contains(" TRACE ") {
                continue;
            }
            let short = process.name.trim_start_matches("agent-");
            lines.push_back(format!("{short:<8} {}", plain.get(11..).unwrap_or(&plain)));
        }
    }
    let mut sorted: Vec<String> = lines.into_iter().collect();
    // Sort by the timestamp that follows the process name.
    sorted.sort_by(|a, b| a.get(9..).cmp(&b.get(9..)));
    let skip = sorted.len().saturating_sub(keep);
    sorted.into_iter().skip(skip).collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The live view, until Ctrl-C. On a terminal, a screen redrawn every second that fits the
/// terminal's size (read again each time); otherwise (piped into `tee`, say) a note of what
/// the view needs, the suggestions, then one line per status change.
async fn live(demo: &Demo) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let steps = next_steps(demo);
    let steps_file = TestEnv::get().test_dir(NAME).join("try-next.txt");
    std::fs::write(&steps_file, &steps)?;
    // Short enough for 80 columns: relative to the repository root, where demo/run.sh runs.
    let shown_file = std::env::current_dir()
        .ok()
        .and_then(|here| steps_file.strip_prefix(here).ok().map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| steps_file.clone());
    if !terminal {
        println!(
            "The live view needs a terminal (stdout is not one here): printing each status change \
             as a line instead. Ctrl-C stops everything.\n"
        );
        println!("{steps}(also in {})\n", steps_file.display());
    }
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    loop {
        let view = hub_view(demo).await.unwrap_or_default();
        if terminal {
            let (rows, cols) = terminal_size().await;
            let parts = Screen {
                namespace: &demo.ns.name,
                deployments: &view,
                releases: helm_releases(demo).await,
                log: notable_lines(demo, rows),
                steps: &steps,
                steps_file: &shown_file.display().to_string(),
            };
            let mut out = std::io::stdout().lock();
            out.write_all(format!("\x1b[2J\x1b[H{}", parts.render(rows, cols)).as_bytes())?;
            out.flush()?;
        } else {
            for (release, version, status, message) in &view {
                let line = format!("{release} {version} {status}: {message}");
                if last.get(release) != Some(&line) {
                    println!("{line}");
                    last.insert(release.clone(), line);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut ctrl_c => return Ok(()),
        }
    }
}

/// Rows and columns of the controlling terminal (`stty size`), or 24x80 when unknown.
async fn terminal_size() -> (usize, usize) {
    let asked = async {
        let tty = std::fs::File::open("/dev/tty").ok()?;
        let output = tokio::process::Command::new("stty")
            .arg("size")
            .stdin(tty)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        let mut numbers = text.split_whitespace().map(|n| n.parse::<usize>().ok());
        Some((numbers.next()??, numbers.next()??))
    };
    asked
        .await
        .filter(|&(rows, cols)| rows > 0 && cols > 0)
        .unwrap_or((24, 80))
}

/// `helm ls` in short columns: name, revision, status, chart.
async fn helm_releases(demo: &Demo) -> Vec<String> {
    let listed = tools::helm(demo.helm_home.path(), &["ls", "-n", &demo.ns.name, "-o", "json"]).await;
    let releases: Vec<Value> = match listed {
        Ok(run) => serde_json::from_str(&run.stdout).unwrap_or_default(),
        Err(error) => return vec![format!("helm ls failed: {error}")],
    };
    let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    releases
        .iter()
        .map(|r| {
            format!(
                "{:<6} rev {:<3} {:<10} {}",
                text(&r["name"]),
                text(&r["revision"]),
                text(&r["status"]),
                text(&r["chart"])
            )
        })
        .collect()
}

/// What one frame of the live view shows.
struct Screen<'a> {
    namespace: &'a str,
    deployments: &'a [(String, String, String, String)],
    releases: Vec<String>,
    /// The newest notable log lines, newest last (more than fit, maybe).
    log: Vec<String>,
    steps: &'a str,
    steps_file: &'a str,
}

impl Screen<'_> {
    /// The frame for a terminal of `rows` x `cols`: no line wraps (each is cut to the width)
    /// and the last row stays free. The suggestions are shown in full when they fit with a few
    /// log lines, otherwise as a pointer to the file that holds them; the log takes what is left.
    fn render(&self, rows: usize, cols: usize) -> String {
        let mut top = vec![
            format!(
                "distr-agent demo: namespace {}   (Ctrl-C stops everything)",
                self.namespace
            ),
            String::new(),
            "DEPLOYMENTS, as the Hub received their status".to_owned(),
        ];
        for (release, version, status, message) in self.deployments {
            top.push(format!("  {release:<6} {version:<7} {status:<12} {message}"));
        }
        top.extend([String::new(), "HELM RELEASES (helm ls)".to_owned()]);
        top.extend(self.releases.iter().map(|l| format!("  {l}")));
        let full: Vec<String> = self.steps.lines().map(str::to_owned).collect();
        let pointer = vec![format!("Try next, in another terminal: cat {}", self.steps_file)];
        let usable = rows.saturating_sub(1);
        // Log section: a blank line, its title, at least three lines; then a blank line.
        let fits_full = full.iter().all(|l| l.chars().count() < cols) && top.len() + 2 + 3 + 1 + full.len() <= usable;
        let steps = if fits_full { full } else { pointer };
        let log_rows = usable.saturating_sub(top.len() + 2 + 1 + steps.len());
        let mut lines = top;
        if log_rows > 0 {
            lines.extend([String::new(), "AGENT LOG, notable lines".to_owned()]);
            let skip = self.log.len().saturating_sub(log_rows);
            lines.extend(self.log.iter().skip(skip).map(|l| format!("  {l}")));
        }
        lines.push(String::new());
        lines.extend(steps);
        lines.truncate(usable);
        let width = cols.saturating_sub(1).max(1);
        lines.iter().map(|l| format!("{}\n", truncate_to(l, width))).collect()
    }
}

/// `text` cut to at most `max` characters (the last one an ellipsis when cut).
fn truncate_to(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// Sends one suggested request and waits for what the Hub then receives; returns the status
/// type and message (`uninstalled` once `helm ls` no longer lists the release).
async fn carry_out(demo: &Demo, one: &Try, deadline: Instant) -> anyhow::Result<(String, String)> {
    let url = format!("{}/deployments/{}", demo.admin_url, one.release);
    let mut request = demo.http.request(one.method.clone(), url);
    if let Some(body) = one.body {
        request = request.header("content-type", "application/json").body(body);
    }
    let answer = request.send().await?;
    anyhow::ensure!(
        answer.status().is_success(),
        "{}: {}",
        one.curl(&demo.admin_url),
        answer.status()
    );
    let revision = match one.expect {
        Outcome::Uninstalled => Value::Null,
        _ => answer.json::<Value>().await?["revisionId"].clone(),
    };
    loop {
        if one.expect == Outcome::Uninstalled {
            let names = tools::helm(demo.helm_home.path(), &["ls", "-q", "-n", &demo.ns.name])
                .await?
                .stdout;
            if !names.lines().any(|name| name == one.release) {
                return Ok(("uninstalled".into(), String::new()));
            }
        } else {
            let deployment = deployments(demo)
                .await?
                .into_iter()
                .find(|d| d["releaseName"] == one.release)
                .unwrap_or_default();
            let status = &deployment["status"];
            let wanted = match one.expect {
                Outcome::Healthy => "healthy",
                _ => "error",
            };
            if deployment["revisionId"] == revision && status["type"] == wanted {
                let message = status["message"].as_str().unwrap_or_default().to_owned();
                return Ok((wanted.into(), message));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: the Hub did not receive {:?} in time",
            one.curl(&demo.admin_url),
            one.expect
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The scripted check the test command runs.
async fn check(demo: &Demo, started: Instant, timeout: Duration) -> anyhow::Result<()> {
    let deadline = started + timeout;
    let wait_healthy = |what: &'static str| async move {
        loop {
            let view = hub_view(demo).await?;
            if all_healthy(&view) {
                return Ok::<_, anyhow::Error>(view);
            }
            anyhow::ensure!(Instant::now() < deadline, "{what}: not healthy in time: {view:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let view = wait_healthy("both deployments").await?;
    println!(
        "both deployments healthy on the Hub {:.1?} after the start",
        started.elapsed()
    );
    for (release, version, status, message) in &view {
        println!("  {release} {version} {status}: {message}");
    }
    print!("{}", helm_ls(demo).await);

    // What the demo suggests trying, request by request.
    for one in tries() {
        let sent = Instant::now();
        let (status, message) = carry_out(demo, &one, deadline).await?;
        println!(
            "{} {}: {status} {:.1?} after the request{}",
            one.comment,
            one.release,
            sent.elapsed(),
            if message.is_empty() {
                String::new()
            } else {
                format!(" ({})", truncate(&message, 160))
            },
        );
    }

    // The operator's view, with the command the demo prints.
    let args = grpcurl_args(demo, "distr.agent.v1.Executor/ListReleases");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let releases = tools::grpcurl(&args).await?.ok("grpcurl ListReleases")?;
    anyhow::ensure!(releases.stdout.contains("\"api\""), "{}", releases.stdout);
    println!("grpcurl ListReleases with the operator certificate answered");
    println!("{}", next_steps(demo));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(rows: usize, cols: usize) -> String {
        let deployments = [
            ("web", "0.1.0", "healthy", "status check passed. 1 resources healthy"),
            (
                "api",
                "0.2.0",
                "error",
                &*"helm upgrade failed: chart not found ".repeat(5),
            ),
        ]
        .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned()));
        let log: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    "executor 12:00:{i:02} INFO release {i} is healthy, and this line goes on well past eighty columns"
                )
            })
            .collect();
        let steps = format!(
            "Try next, in another terminal:\n{}",
            (0..9)
                .map(|i| format!(
                    "  curl -s http://127.0.0.1:41234/deployments/{i} -H 'content-type: application/json'\n"
                ))
                .collect::<String>()
        );
        Screen {
            namespace: "demo-1234abcd",
            deployments: &deployments,
            releases: vec![
                "web    rev 1   deployed   demo-web-0.1.0".into(),
                "api    rev 2   failed     demo-api-0.2.0".into(),
            ],
            log,
            steps: &steps,
            steps_file: "target/demo/tests/demo/try-next.txt",
        }
        .render(rows, cols)
    }

    #[test]
    fn the_live_view_fits_80_by_24() {
        let text = frame(24, 80);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() <= 23, "{} rows:\n{text}", lines.len());
        assert!(lines.iter().all(|l| l.chars().count() < 80), "{text}");
        for shown in [
            "web",
            "api",
            "HELM RELEASES",
            "AGENT LOG",
            "cat target/demo/tests/demo/try-next.txt",
            "release 39 is",
        ] {
            assert!(text.contains(shown), "{shown} missing:\n{text}");
        }
    }

    #[test]
    fn a_large_terminal_shows_the_suggestions_in_full_and_more_log() {
        let text = frame(60, 200);
        assert!(text.contains("/deployments/8 -H"), "{text}");
        assert!(!text.contains("try-next.txt"), "{text}");
        assert!(text.lines().count() <= 59);
        assert!(text.contains("release 20 is"), "{text}");
    }

    #[test]
    fn a_tiny_terminal_still_gets_a_frame() {
        let text = frame(5, 10);
        assert!(text.lines().count() <= 4, "{text}");
        assert!(text.lines().all(|l| l.chars().count() < 10), "{text}");
    }
}
