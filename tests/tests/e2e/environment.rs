//! The test environment is real: a Deployment becomes Available on a kwok node, Helm installs
//! from the authenticated OCI registry, RBAC is enforced, and the executor binary serves gRPC
//! with reflection and health, turns ready and stops cleanly on SIGTERM.

use std::time::Duration;

use distr_agent_e2e::{
    AgentProcess, TestEnv, TestNamespace, charts, cluster, install, process::free_port, tools, wait_for,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
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
