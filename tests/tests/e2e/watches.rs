//! The watch-driven executor (issue 8): a stuck pod is named in the status, and a release
//! whose pods become ready reaches `healthy` on the Hub without waiting for a timer.

use std::time::Duration;

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts::push_web_chart,
    wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_stuck_pod_is_named_and_readiness_reaches_the_hub_at_once() -> anyhow::Result<()> {
    let test = "watch-health";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "watch-web", &["0.1.0"]).await?;
    // Helm does not wait (no rollback on failure either, which would make it wait): the
    // release is installed at once and its pod stays unschedulable.
    let web = revise(
        &deployment("web", &chart, "0.1.0", json!({"neverReady": true})),
        json!({"helmOptions": {"timeout": "1m", "waitStrategy": "hookOnly", "rollbackOnFailure": false, "cleanupOnFailure": true, "forceConflicts": false}}),
    );
    agent.set_deployments(vec![web.clone()]);
    let stuck = agent
        .wait_status(&revision(&web), "error", "is unschedulable", MINUTE)
        .await?;
    eprintln!("stuck: {}", stuck.message);
    assert!(
        stuck.message.contains("Deployment web-web"),
        "names the workload: {}",
        stuck.message
    );
    assert!(
        stuck.message.contains("pod web-web-"),
        "names the pod: {}",
        stuck.message
    );

    // Let the pod be scheduled: kwok makes it ready; the Hub hears of it from the watch.
    let deployments = agent.ns.api::<Deployment>();
    let unpin = json!({"spec": {"template": {"spec": {"nodeSelector": null}}}});
    deployments
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&unpin))
        .await?;
    let ready_at = wait_for("the workload to be ready", MINUTE, || async {
        let ready = deployments
            .get("web-web")
            .await
            .ok()?
            .status?
            .ready_replicas
            .unwrap_or(0);
        (ready >= 1).then(chrono::Utc::now)
    })
    .await?;
    let healthy = agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;
    eprintln!(
        "pods ready -> healthy on the Hub: {} ms (seen ready by the test, polling every 100 ms)",
        (healthy.received_at - ready_at).num_milliseconds()
    );
    Ok(())
}

/// kstatus's Deployment rule (issue 19: 5): a rollout whose new pod never becomes ready while
/// the old one still serves (an out-of-band `kubectl` change, `waitStrategy: hookOnly`) is not
/// healthy, although as many replicas are ready and updated as desired; it is again once the
/// rollout completes.
#[tokio::test]
async fn a_rollout_whose_new_pod_never_becomes_ready_beside_the_old_one_is_not_healthy() -> anyhow::Result<()> {
    let test = "watch-rollout";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "rollout-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", MINUTE)
        .await?;

    // A new pod template whose pod is never scheduled: the old pod stays (maxUnavailable 0 for
    // one replica), so ready 1, updated 1, available 1 of 1, and 2 replicas.
    let deployments = agent.ns.api::<Deployment>();
    let pin = json!({"spec": {"template": {"spec": {"nodeSelector": {"distr.test/no-such-node": "true"}}}}});
    deployments
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&pin))
        .await?;
    let settled = wait_for("the rollout stuck with the old pod serving", MINUTE, || async {
        let deployment = deployments.get("web-web").await.ok()?;
        let generation = deployment.metadata.generation;
        let status = deployment.status?;
        let stuck = status.observed_generation == generation
            && (
                status.replicas,
                status.ready_replicas,
                status.updated_replicas,
                status.available_replicas,
            ) == (Some(2), Some(1), Some(1), Some(1));
        stuck.then(chrono::Utc::now)
    })
    .await?;
    // The first status after that (a change is posted at once, an unchanged one every 30 s):
    // not healthy (the old rule said healthy: ready, updated and available were all 1 of 1).
    let stuck = wait_for("a status after the rollout got stuck", MINUTE, || async {
        agent
            .statuses(&revision(&web))
            .into_iter()
            .find(|s| s.received_at > settled)
    })
    .await?;
    assert_eq!(stuck.status_type, "error", "{}", stuck.message);
    assert!(
        stuck.message.contains("Deployment web-web status check failed"),
        "{}",
        stuck.message
    );
    eprintln!("stuck rollout: {}", stuck.message);

    // The template back as it was: the rollout completes, and the status says so.
    let unpin = json!({"spec": {"template": {"spec": {"nodeSelector": null}}}});
    deployments
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&unpin))
        .await?;
    wait_for("healthy again after the rollout", MINUTE, || async {
        agent
            .statuses(&revision(&web))
            .into_iter()
            .find(|s| s.received_at > stuck.received_at && s.status_type == "healthy")
    })
    .await?;
    Ok(())
}

/// Helm's readiness rules where the Go agent's users expect them: a chart's
/// `helm.sh/readiness-success`/`-failure` annotations judge a custom resource (through the
/// dynamic watch of its kind), a Job deleted by its TTL once finished is not "not found", a
/// LoadBalancer without an address (no load-balancer controller here, as on bare metal) is
/// reported in a healthy status, not failed, and a ConfigMap is healthy while it exists.
#[tokio::test]
async fn readiness_annotations_finished_jobs_and_load_balancers_are_judged_as_helm_does() -> anyhow::Result<()> {
    use k8s_openapi::{
        api::batch::v1::Job, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    use kube::{
        Api,
        api::{ApiResource, DynamicObject, PostParams},
        core::GroupVersionKind,
    };

    let test = "watch-rules";
    let admin = distr_agent_e2e::cluster::admin_client().await?;
    // A namespaced kind with a status subresource; a leftover from an earlier run is reused.
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "webs.readiness.distr.test"},
        "spec": {
            "group": "readiness.distr.test",
            "scope": "Namespaced",
            "names": {"plural": "webs", "singular": "web", "kind": "Web"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    }))?;
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error.into()),
    }
    wait_for("the CRD to be established", MINUTE, || async {
        let crd = crds.get("webs.readiness.distr.test").await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await?;

    let agent = Agent::start(test, AgentOptions::default()).await?;
    let dir = distr_agent_e2e::TestEnv::get().test_dir(test).join("charts");
    let chart = distr_agent_e2e::charts::chart_dir(&dir, "rules", "0.1.0", "{}\n")?;
    std::fs::write(
        chart.join("templates/objects.yaml"),
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-config
data:
  greeting: hello
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}-lb
spec:
  type: LoadBalancer
  ports: [{port: 80}]
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .Release.Name }}-migrate
spec:
  ttlSecondsAfterFinished: 1
  template:
    spec:
      restartPolicy: Never
      containers: [{name: migrate, image: registry.example/migrate:1}]
---
apiVersion: readiness.distr.test/v1
kind: Web
metadata:
  name: {{ .Release.Name }}-site
  annotations:
    helm.sh/readiness-success: '["{.phase} == \"Serving\""]'
    helm.sh/readiness-failure: '["{.phase} == \"Broken\""]'
"#,
    )?;
    let chart = distr_agent_e2e::charts::push_chart(&chart).await?;
    let rules = revise(
        &deployment("rules", &chart, "0.1.0", json!({})),
        json!({"helmOptions": {"timeout": "1m", "waitStrategy": "hookOnly", "rollbackOnFailure": false, "cleanupOnFailure": true, "forceConflicts": false}}),
    );
    agent.set_deployments(vec![rules.clone()]);

    // The Job runs to completion on kwok and the TTL controller deletes it.
    let jobs = agent.ns.api::<Job>();
    wait_for("the Job to be created", MINUTE, || async {
        jobs.get_opt("rules-migrate").await.ok()?.map(|_| ())
    })
    .await?;
    wait_for("the finished Job to be deleted by its TTL", 2 * MINUTE, || async {
        jobs.get_opt("rules-migrate").await.ok()?.is_none().then_some(())
    })
    .await?;
    // The first resource in error is now the custom resource (Helm orders it after the Job):
    // the deleted Job is not reported missing.
    let waiting = agent
        .wait_status(
            &revision(&rules),
            "error",
            "Web rules-site status check failed: it has no status yet",
            MINUTE,
        )
        .await?;
    eprintln!("waiting: {}", waiting.message);

    let gvk = GroupVersionKind::gvk("readiness.distr.test", "v1", "Web");
    let webs: Api<DynamicObject> = Api::namespaced_with(admin, &agent.ns.name, &ApiResource::from_gvk(&gvk));
    let set_phase = |phase: &'static str| {
        let webs = webs.clone();
        async move {
            webs.patch_status(
                "rules-site",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": phase}})),
            )
            .await
        }
    };
    set_phase("Serving").await?;
    let healthy = agent
        .wait_status(
            &revision(&rules),
            "healthy",
            "(note: Service rules-lb: LoadBalancer has no ingress address yet)",
            MINUTE,
        )
        .await?;
    eprintln!("healthy: {}", healthy.message);

    set_phase("Broken").await?;
    agent
        .wait_status(
            &revision(&rules),
            "error",
            r#"Web rules-site status check failed: readiness failure condition met: {.phase} == "Broken""#,
            MINUTE,
        )
        .await?;

    // A kind without readiness of its own is healthy when it exists, not whatever happens:
    // someone deletes the release's ConfigMap (the first object Helm orders).
    agent
        .ns
        .api::<k8s_openapi::api::core::v1::ConfigMap>()
        .delete("rules-config", &Default::default())
        .await?;
    agent
        .wait_status(
            &revision(&rules),
            "error",
            "ConfigMap rules-config status check failed: resource not found",
            MINUTE,
        )
        .await?;
    Ok(())
}
