//! Sample charts written on the fly, and pushing them to the test registry.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::{TestEnv, tools};

/// A chart with one Deployment (`<release>-web`) whose replicas, image and readiness come
/// from the values. Pods on kwok nodes become Ready unless `neverReady` is set, which gives
/// them a node selector no node matches (a workload that never becomes ready; kwok marks every
/// scheduled pod Ready, readiness gates included).
pub fn write_web_chart(dir: &Path, name: &str, version: &str) -> anyhow::Result<PathBuf> {
    let chart = chart_dir(
        dir,
        name,
        version,
        "replicas: 1\nimage: registry.example/web:1\nmessage: hello\nneverReady: false\nimagePullSecrets: []\n",
    )?;
    std::fs::write(
        chart.join("templates/deployment.yaml"),
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-web
  labels: {app: {{ .Release.Name }}-web}
  annotations:
    distr.test/message: {{ .Values.message | quote }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels: {app: {{ .Release.Name }}-web}
  template:
    metadata:
      labels: {app: {{ .Release.Name }}-web}
    spec:
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets: {{ toJson . }}
      {{- end }}
      {{- if .Values.neverReady }}
      nodeSelector:
        distr.test/no-such-node: "true"
      {{- end }}
      containers:
        - name: web
          image: {{ .Values.image }}
"#,
    )?;
    Ok(chart)
}

/// Packages `chart_dir` and pushes it to the test registry under `charts/`. Returns the chart's
/// `oci://<registry>/charts/<name>` reference, the form the Hub sends as `chartUrl`.
pub async fn push_chart(chart_dir: &Path) -> anyhow::Result<String> {
    let env = TestEnv::get();
    let target = PushTarget {
        host: &env.registry,
        user: &env.registry_user,
        password: &env.registry_password,
        plain_http: false,
    };
    push_chart_to(chart_dir, &target).await
}

/// A registry to push charts to.
pub struct PushTarget<'a> {
    /// host:port
    pub host: &'a str,
    pub user: &'a str,
    pub password: &'a str,
    pub plain_http: bool,
}

/// Packages `chart_dir` and pushes it to `target` under `charts/`; returns the `oci://` reference.
pub async fn push_chart_to(chart_dir: &Path, target: &PushTarget<'_>) -> anyhow::Result<String> {
    let work = tempfile::tempdir()?;
    let package = tools::helm(work.path(), &["package", path(chart_dir)?, "-d", path(work.path())?])
        .await?
        .ok("helm package")?;
    let archive = package
        .stdout
        .rsplit(": ")
        .next()
        .map(|s| s.trim().to_owned())
        .context("helm package printed no archive path")?;
    let repo = format!("oci://{}/charts", target.host);
    let mut args = vec![
        "push",
        &archive,
        &repo,
        "--username",
        target.user,
        "--password",
        target.password,
    ];
    if target.plain_http {
        args.push("--plain-http");
    }
    tools::helm(work.path(), &args).await?.ok("helm push")?;
    let name = chart_name(chart_dir)?;
    Ok(format!("{repo}/{name}"))
}

fn chart_name(chart_dir: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(chart_dir.join("Chart.yaml"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("name: "))
        .map(|name| name.trim().to_owned())
        .context("Chart.yaml has no name")
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Writes the sample web chart as `<name>` at each version, pushes each to the test registry
/// (as files of `test`), and returns its `oci://` URL.
pub async fn push_web_chart(test: &str, name: &str, versions: &[&str]) -> anyhow::Result<String> {
    let dir = TestEnv::get().test_dir(test).join("charts");
    let mut url = String::new();
    for version in versions {
        url = push_chart(&write_web_chart(&dir, name, version)?).await?;
    }
    Ok(url)
}

/// A chart with one single-replica Deployment per name in `workloads` (`<release>-<workload>`),
/// each with the pod template of [`write_web_chart`] (Ready on a kwok node at once).
pub fn write_workloads_chart(dir: &Path, name: &str, version: &str, workloads: &[&str]) -> anyhow::Result<PathBuf> {
    let chart = chart_dir(
        dir,
        name,
        version,
        "image: registry.example/app:1\nmessage: hello\nimagePullSecrets: []\n",
    )?;
    for workload in workloads {
        std::fs::write(
            chart.join(format!("templates/{workload}.yaml")),
            format!(
                r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{{{ .Release.Name }}}}-{workload}
  labels: {{app: {{{{ .Release.Name }}}}-{workload}}}
  annotations:
    distr.test/message: {{{{ .Values.message | quote }}}}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: {{{{ .Release.Name }}}}-{workload}}}
  template:
    metadata:
      labels: {{app: {{{{ .Release.Name }}}}-{workload}}}
    spec:
      {{{{- with .Values.imagePullSecrets }}}}
      imagePullSecrets: {{{{ toJson . }}}}
      {{{{- end }}}}
      containers:
        - name: {workload}
          image: {{{{ .Values.image }}}}
"#
            ),
        )?;
    }
    Ok(chart)
}

/// Creates `<dir>/<name>-<version>/` with its `Chart.yaml`, `values.yaml` and an empty
/// `templates/`; returns the chart directory.
pub fn chart_dir(dir: &Path, name: &str, version: &str, values: &str) -> anyhow::Result<PathBuf> {
    let chart = dir.join(format!("{name}-{version}"));
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        format!("apiVersion: v2\nname: {name}\nversion: {version}\nappVersion: \"{version}\"\ntype: application\n"),
    )?;
    std::fs::write(chart.join("values.yaml"), values)?;
    Ok(chart)
}
