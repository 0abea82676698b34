//! The test environment is real: a Deployment becomes Available on a kwok node, Helm installs
//! from the authenticated OCI registry, RBAC is enforced, the executor binary serves gRPC
//! with reflection and health, turns ready and stops cleanly on SIGTERM, pods on the kwok node
//! have logs (from files the test writes) through `pods/log`, and metrics-server reports the
//! configured usage through `metrics.k8s.io`.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use distr_agent_e2e::{
    AgentProcess, TestEnv, TestNamespace, charts, cluster, install,
    kwok::{self, LogFile, NodeUsage, Stream},
    process::free_port,
    tools, wait_for,
};
use futures::{AsyncBufReadExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Node, Pod},
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, LogParams, PostParams},
};

#[tokio::test]
async fn deployment_becomes_available_with_pods_running_on_a_kwok_node() -> anyhow::Result<()> {
    let ns = TestNamespace::create("env-deploy").await?;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]}
            }
        }
    }))?;
    let deployments = ns.api::<Deployment>();
    deployments.create(&PostParams::default(), &deployment).await?;

    wait_for("Deployment web Available", Duration::from_secs(60), || async {
        let d = deployments.get("web").await.ok()?;
        let available = d
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True");
        available.then_some(())
    })
    .await?;

    let pods = ns.api::<Pod>().list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(pods.items.len(), 2, "two replicas");
    for pod in pods.items {
        let spec = pod.spec.unwrap_or_default();
        assert_eq!(
            spec.node_name.as_deref(),
            Some("kwok-node-0"),
            "scheduled on the kwok node"
        );
        assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    }
    Ok(())
}

#[tokio::test]
async fn helm_installs_a_chart_from_the_authenticated_oci_registry() -> anyhow::Result<()> {
    let env = TestEnv::get();
    let ns = TestNamespace::create("env-helm").await?;
    let work = tempfile::tempdir()?;
    let chart = charts::write_web_chart(work.path(), "env-web", "0.1.0")?;
    let oci = charts::push_chart(&chart).await?;

    let home = tempfile::tempdir()?;
    tools::helm(
        home.path(),
        &[
            "install",
            "env-web",
            &oci,
            "--version",
            "0.1.0",
            "-n",
            &ns.name,
            "--username",
            &env.registry_user,
            "--password",
            &env.registry_password,
            "--wait=watcher",
            "--timeout",
            "60s",
        ],
    )
    .await?
    .ok("helm install")?;

    // Helm v4 lists releases in every status by default (v3's `ls -a`).
    let list = tools::helm(home.path(), &["ls", "-n", &ns.name, "-o", "json"])
        .await?
        .ok("helm ls")?;
    let releases: serde_json::Value = serde_json::from_str(&list.stdout)?;
    let release = &releases[0];
    assert_eq!(release["name"], "env-web");
    assert_eq!(release["status"], "deployed");
    assert_eq!(release["chart"], "env-web-0.1.0");

    // The same pull without credentials is refused by the registry.
    let anonymous = tempfile::tempdir()?;
    let pull = tools::helm(anonymous.path(), &["pull", &oci, "--version", "0.1.0", "-d", "/tmp"]).await?;
    assert!(!pull.success, "an anonymous pull must fail");
    let url = format!("https://{}/v2/charts/env-web/tags/list", env.registry);
    assert_eq!(
        tools::http_status(&url).await?,
        401,
        "registry answers 401 without credentials"
    );
    // Helm (oras) answers the registry's 401 challenge by looking for a credential it lacks.
    let stderr = pull.stderr.to_lowercase();
    assert!(
        stderr.contains("401") || stderr.contains("unauthorized") || stderr.contains("basic credential not found"),
        "helm reports the refusal: {}",
        pull.stderr
    );
    Ok(())
}

#[tokio::test]
async fn a_namespace_scoped_token_is_forbidden_elsewhere() -> anyhow::Result<()> {
    let own = TestNamespace::create("env-rbac").await?;
    let other = TestNamespace::create("env-other").await?;
    let identity = own.service_account("scoped", cluster::namespace_admin_rules()).await?;
    let client = cluster::client_from_kubeconfig(&identity.kubeconfig).await?;

    let config_map = |name: &str| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), &own.name)
        .create(&PostParams::default(), &config_map("allowed"))
        .await?;
    let denied = Api::<ConfigMap>::namespaced(client, &other.name)
        .create(&PostParams::default(), &config_map("denied"))
        .await;
    match denied {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
    // The kubectl the harness built sees the same.
    let kubectl = tools::kubectl(&identity.kubeconfig, &["-n", &other.name, "create", "configmap", "x"]).await?;
    assert!(
        !kubectl.success && kubectl.stderr.contains("forbidden"),
        "{}",
        kubectl.stderr
    );
    Ok(())
}

#[tokio::test]
async fn executor_serves_reflection_and_health_and_stops_on_sigterm() -> anyhow::Result<()> {
    let ns = TestNamespace::create("env-exec").await?;
    let identity = ns.service_account("executor", cluster::namespace_admin_rules()).await?;
    let grpc_port = free_port()?;
    let mut executor = AgentProcess::start(
        "env-exec",
        "agent-executor",
        &[
            ("AGENT_GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
            ("AGENT_NAMESPACE", ns.name.clone()),
            ("KUBECONFIG", identity.kubeconfig.display().to_string()),
            ("AGENT_HELM_BIN", TestEnv::get().bin.join("helm").display().to_string()),
        ],
    )
    .await?;
    executor.wait_ready(Duration::from_secs(30)).await?;
    assert_eq!(executor.admin_status("/livez").await, Some(200));
    let metrics = reqwest::get(executor.admin_url("/metrics")).await?.text().await?;
    assert!(metrics.contains("distr_agent_build_info"), "{metrics}");

    // Every call needs a client certificate of the agent's CA: the operator's, as a person
    // who may read Secrets in the namespace takes it.
    let addr = format!("127.0.0.1:{grpc_port}");
    let operator = install::OperatorCert::fetch(&ns, TestEnv::get().test_dir("env-exec").join("operator")).await?;
    let tls = operator.grpcurl_flags(&ns.name);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let list = tools::grpcurl(&[&tls[..], &[&addr, "list"]].concat())
        .await?
        .ok("grpcurl list")?;
    let services: Vec<&str> = list.stdout.lines().collect();
    assert!(services.contains(&"distr.agent.v1.Executor"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    let health = tools::grpcurl(
        &[
            &tls[..],
            &[
                "-d",
                r#"{"service":"distr.agent.v1.Executor"}"#,
                &addr,
                "grpc.health.v1.Health/Check",
            ],
        ]
        .concat(),
    )
    .await?
    .ok("health check")?;
    assert!(health.stdout.contains("SERVING"), "{}", health.stdout);

    let (code, took) = executor.terminate(Duration::from_secs(5)).await?;
    assert_eq!(code, Some(0), "exit code after SIGTERM; log:\n{}", executor.log_text());
    eprintln!("executor stopped {took:?} after SIGTERM");
    Ok(())
}

/// Creates a Deployment of `replicas` pods labelled `app=<name>` with the given containers and
/// pod annotations, and waits until it is Available; returns its pods' names.
async fn deploy(
    ns: &TestNamespace,
    name: &str,
    replicas: i32,
    containers: &[&str],
    annotations: serde_json::Value,
) -> anyhow::Result<Vec<String>> {
    let containers: Vec<serde_json::Value> = containers
        .iter()
        .map(|c| serde_json::json!({"name": c, "image": format!("registry.example/{c}:1")}))
        .collect();
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {"containers": containers}
            }
        }
    }))?;
    let deployments = ns.api::<Deployment>();
    deployments.create(&PostParams::default(), &deployment).await?;
    wait_for(
        &format!("Deployment {name} Available"),
        Duration::from_secs(60),
        || async {
            let d = deployments.get(name).await.ok()?;
            let status = d.status?;
            (status.available_replicas == Some(replicas)).then_some(())
        },
    )
    .await?;
    let pods = ns
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={name}")))
        .await?;
    Ok(pods.items.into_iter().filter_map(|p| p.metadata.name).collect())
}

/// kube's `LogParams` takes jiff's timestamps.
fn jiff(time: DateTime<Utc>) -> anyhow::Result<k8s_openapi::jiff::Timestamp> {
    Ok(k8s_openapi::jiff::Timestamp::new(
        time.timestamp(),
        time.timestamp_subsec_nanos().try_into()?,
    )?)
}

/// The time a log line carries in `timestamps=true` output: RFC 3339 with nine fraction digits.
fn stamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

#[tokio::test]
async fn pod_logs_come_from_a_file_through_the_apiserver() -> anyhow::Result<()> {
    let ns = TestNamespace::create("env-logs").await?;
    let web = deploy(&ns, "web", 1, &["web", "sidecar"], serde_json::json!({})).await?;
    let web = &web[0];
    let file = LogFile::serve_namespace(&ns, "web").await?;

    // Three lines in three consecutive seconds, ten seconds ago, one of them on stderr.
    let base = DateTime::from_timestamp(Utc::now().timestamp() - 10, 0).context("time")?;
    let at = |ms: i64| base + chrono::Duration::milliseconds(ms);
    file.append_at(at(100), Stream::Stdout, "first line")?;
    file.append_at(at(1_200), Stream::Stderr, "second line, on stderr")?;
    file.append_at(at(2_900), Stream::Stdout, "third line")?;
    let expected = format!(
        "{} first line\n{} second line, on stderr\n{} third line\n",
        stamp(at(100)),
        stamp(at(1_200)),
        stamp(at(2_900))
    );

    // kwok learns about the ClusterLogs object through a watch: wait for it once.
    let log = |query: String| {
        let client = ns.client.clone();
        let namespace = ns.name.clone();
        let pod = web.clone();
        async move { kwok::pod_log(&client, &namespace, &pod, &query).await }
    };
    let served = wait_for("kwok serves the log file", Duration::from_secs(20), || async {
        log("container=web&timestamps=true".into()).await.ok()
    })
    .await?;
    assert_eq!(served, expected, "every line, stdout and stderr, with its own time");
    // Without timestamps, the bare lines; the file serves every container of the pod.
    assert_eq!(
        log("container=sidecar".into()).await?,
        "first line\nsecond line, on stderr\nthird line\n"
    );

    // A line appended now is in the next answer: kwok reads the file on every request.
    let fourth = file.append("fourth line, appended later")?;
    let served = log("container=web&timestamps=true".into()).await?;
    assert_eq!(
        served,
        format!("{expected}{} fourth line, appended later\n", stamp(fourth))
    );

    // sinceTime keeps the lines at or after it, in whole seconds: kube-apiserver passes the
    // time on without its fraction, so …:01.900 filters like …:01 and keeps the line of …:01.200.
    let since = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    let lines = |text: String| text.lines().map(str::to_owned).collect::<Vec<_>>();
    let whole = lines(log(format!("container=web&sinceTime={}", since(at(1_000)))).await?);
    assert_eq!(
        whole,
        ["second line, on stderr", "third line", "fourth line, appended later"]
    );
    let fraction = lines(log(format!("container=web&sinceTime={}", since(at(1_900)))).await?);
    assert_eq!(fraction, whole, "the fraction of sinceTime is cut off");
    let later = lines(log(format!("container=web&sinceTime={}", since(at(2_000)))).await?);
    assert_eq!(later, ["third line", "fourth line, appended later"]);
    // kube's LogParams sends whole seconds too (rounded): the same filter through the typed API.
    let params = LogParams {
        container: Some("web".into()),
        since_time: Some(jiff(at(2_000))?),
        ..Default::default()
    };
    assert_eq!(
        lines(ns.api::<Pod>().logs(web, &params).await?),
        ["third line", "fourth line, appended later"]
    );

    // follow=true streams lines appended while the request is open.
    let follow = LogParams {
        container: Some("web".into()),
        follow: true,
        since_time: Some(jiff(at(2_000))?),
        ..Default::default()
    };
    let mut stream = ns.api::<Pod>().log_stream(web, &follow).await?.lines();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(stream.try_next().await?.context("stream ended")?);
    }
    file.append("fifth line, while following")?;
    let next = tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await??;
    assert_eq!(next.as_deref(), Some("fifth line, while following"));
    Ok(())
}

#[tokio::test]
async fn per_pod_log_files_take_precedence_over_the_namespace_file() -> anyhow::Result<()> {
    let ns = TestNamespace::create("env-podlogs").await?;
    let web = deploy(&ns, "web", 1, &["web"], serde_json::json!({})).await?;
    let api = deploy(&ns, "api", 2, &["api"], serde_json::json!({})).await?;
    let namespace_file = LogFile::serve_namespace(&ns, "all").await?;
    let api_file = LogFile::serve_pods_matching(&ns, "api", "app=api").await?;
    namespace_file.append("from the namespace file")?;
    api_file.append_lines(&["from the api file", "second api line"])?;

    for (pod, want) in [
        (&web[0], "from the namespace file\n"),
        (&api[0], "from the api file\nsecond api line\n"),
        (&api[1], "from the api file\nsecond api line\n"),
    ] {
        let got = wait_for(&format!("the log of {pod}"), Duration::from_secs(20), || async {
            let text = kwok::pod_log(&ns.client, &ns.name, pod, "").await.ok()?;
            (text == want).then_some(text)
        })
        .await;
        got.with_context(|| format!("pod {pod}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn metrics_server_reports_the_configured_usage() -> anyhow::Result<()> {
    let ns = TestNamespace::create("env-metrics").await?;
    // Each container of these pods uses 250m and 64Mi.
    let annotations = serde_json::to_value(kwok::usage_annotations("250m", "64Mi"))?;
    let pods = deploy(&ns, "busy", 1, &["main", "helper"], annotations).await?;
    let client = ns.client.clone();

    // The node: its capacity is in its status, its usage is the constant start.sh configured.
    let node = Api::<Node>::all(client.clone()).get("kwok-node-0").await?;
    let capacity = node.status.and_then(|s| s.capacity).unwrap_or_default();
    assert_eq!(capacity.get("cpu").map(|q| q.0.as_str()), Some("32"));
    assert_eq!(capacity.get("memory").map(|q| q.0.as_str()), Some("256Gi"));
    let want = NodeUsage::get()?;
    let node_metrics = Api::<DynamicObject>::all_with(client.clone(), &metrics_resource("NodeMetrics", "nodes"));
    // metrics-server needs two scrapes, 10 s apart, for a CPU rate.
    let usage = wait_for("NodeMetrics of kwok-node-0", Duration::from_secs(60), || async {
        let list = node_metrics.list(&ListParams::default()).await.ok()?;
        let node = list
            .items
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some("kwok-node-0"))?;
        Some(node.data["usage"].clone())
    })
    .await?;
    let cpu = kwok::parse_quantity(usage["cpu"].as_str().unwrap_or_default()).context("cpu")?;
    let memory = kwok::parse_quantity(usage["memory"].as_str().unwrap_or_default()).context("memory")?;
    eprintln!("kwok-node-0 usage: {usage}");
    // The CPU figure is a rate over two scrapes, timed by metrics-server: close, not exact.
    assert!(
        (cpu - want.cpu_cores).abs() < want.cpu_cores * 0.02,
        "node CPU {cpu} cores, configured {}",
        want.cpu_cores
    );
    assert_eq!(memory, want.memory_bytes, "node memory");

    // The pod: one entry per container with the annotated usage.
    let pod_metrics = Api::<DynamicObject>::namespaced_with(client, &ns.name, &metrics_resource("PodMetrics", "pods"));
    let containers = wait_for("PodMetrics of the pod", Duration::from_secs(60), || async {
        let metrics = pod_metrics.get(&pods[0]).await.ok()?;
        let containers = metrics.data["containers"].as_array()?.clone();
        (containers.len() == 2).then_some(containers)
    })
    .await?;
    for container in containers {
        let cpu = kwok::parse_quantity(container["usage"]["cpu"].as_str().unwrap_or_default()).context("cpu")?;
        let memory =
            kwok::parse_quantity(container["usage"]["memory"].as_str().unwrap_or_default()).context("memory")?;
        assert!((cpu - 0.25).abs() < 0.25 * 0.02, "container CPU {cpu}: {container}");
        assert_eq!(memory, 64.0 * 1024.0 * 1024.0, "container memory: {container}");
    }
    Ok(())
}

fn metrics_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", kind), plural)
}
