//! Helm operations that take long or are not the agent's (issue 7: 1g, 1i, 1m): releases in a
//! long wait do not hold back the others, an operator's own `helm upgrade` is reported and never
//! rolled back under them, and an uninstall waits for its objects to be gone before the release
//! is installed again.

use std::{io::Read as _, io::Write as _, time::Duration};

use base64::Engine as _;
use distr_agent_e2e::{
    TestEnv,
    agent::{Agent, AgentOptions, deployment, revise, revision},
    charts::{self, push_web_chart},
    wait_for,
};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::reliability::{helm_reaches, history, local_web_chart, wait_cycles};

const MINUTE: Duration = Duration::from_secs(60);

/// With one Helm slot, two releases waiting for pods that never become ready (with a Hub
/// timeout of a day, capped and said so) do not stop a third release from being installed and
/// uninstalled.
#[tokio::test]
async fn releases_in_a_long_wait_do_not_hold_back_the_others() -> anyhow::Result<()> {
    let test = "long-waits";
    let agent = Agent::start(
        test,
        AgentOptions {
            executor_env: vec![
                ("AGENT_MAX_CONCURRENT_HELM", "1".into()),
                ("AGENT_HELM_ACTIVE_PHASE_SECONDS", "2".into()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let chart = push_web_chart(test, "long-web", &["0.1.0"]).await?;
    let slow = |release: &str| {
        revise(
            &deployment(release, &chart, "0.1.0", json!({"neverReady": true})),
            json!({"helmOptions": {"timeout": "24h", "waitStrategy": "watcher", "rollbackOnFailure": true, "cleanupOnFailure": true, "forceConflicts": false}}),
        )
    };
    let (slow_a, slow_b) = (slow("slow-a"), slow("slow-b"));
    agent.set_deployments(vec![slow_a.clone(), slow_b.clone()]);
    for (release, slow) in [("slow-a", &slow_a), ("slow-b", &slow_b)] {
        agent
            .wait_status(
                &revision(slow),
                "progressing",
                "capped at the agent's maximum of 3600s",
                MINUTE,
            )
            .await?;
        // Both are inside Helm at once, although there is one slot.
        helm_reaches(&agent, release, "pending-install").await?;
    }

    let fast = deployment("fast", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![slow_a.clone(), slow_b.clone(), fast.clone()]);
    agent
        .wait_status(&revision(&fast), "running", "helm install succeeded", MINUTE)
        .await?;
    agent.set_deployments(vec![slow_a.clone(), slow_b.clone()]);
    wait_for("the fast release to be uninstalled", MINUTE, || async {
        let helm_secrets = agent
            .ns
            .api::<Secret>()
            .list(&ListParams::default().labels("owner=helm,name=fast"))
            .await
            .ok()?;
        helm_secrets.items.is_empty().then_some(())
    })
    .await?;
    for slow in [&slow_a, &slow_b] {
        let statuses = agent.statuses(&revision(slow));
        assert!(
            statuses.iter().all(|s| s.status_type == "progressing"),
            "still waiting, never failed: {statuses:#?}"
        );
    }
    Ok(())
}

/// An operator's own `helm upgrade`, still running, of a release the agent manages: the
/// pending revision is not the agent's, so it is reported (an error: the Hub's change cannot
/// be applied) and left alone even when it looks
/// older than any timeout; the agent never rolls it back under the operator.
#[tokio::test]
async fn an_operators_pending_upgrade_is_reported_and_never_rolled_back() -> anyhow::Result<()> {
    let test = "foreign-pending";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "foreign-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;

    // The operator upgrades by hand to pods that never become ready, waiting for ten minutes.
    let local = local_web_chart(test, "foreign-web", "0.1.0")?;
    let operator = {
        let agent_ns = agent.ns.name.clone();
        let home = TestEnv::get().test_dir(test).join("operator-helm");
        tokio::spawn(async move {
            let args = [
                "upgrade",
                "web",
                &local,
                "--set",
                "neverReady=true",
                "--wait",
                "--timeout",
                "10m",
                "-n",
                &agent_ns,
            ];
            distr_agent_e2e::tools::helm(&home, &args).await
        })
    };
    helm_reaches(&agent, "web", "pending-upgrade").await?;
    // Make the pending revision look a day old, past any timeout the agent would wait out.
    backdate(&agent, "sh.helm.release.v1.web.v2", chrono::Duration::days(1)).await?;

    // The Hub asks for a change, so the agent wants to act on the release.
    let changed = revise(
        &web,
        json!({"revisionId": uuid::Uuid::new_v4(), "values": {"message": "changed"}}),
    );
    agent.set_deployments(vec![changed.clone()]);
    let reported = agent
        .wait_status(&revision(&changed), "error", "started outside the agent", MINUTE)
        .await?;
    eprintln!("reported: {}", reported.message);
    wait_cycles(&agent, 3).await?;
    let after = history(&agent, "web").await?;
    assert_eq!(after.len(), 2, "no rollback nor upgrade by the agent: {after:#?}");
    assert_eq!(after[1].1, "pending-upgrade", "{after:#?}");
    assert!(!operator.is_finished(), "the operator's helm is still waiting");
    operator.abort();
    Ok(())
}

/// Rewrites the `info.last_deployed` of a Helm release Secret (base64, gzip, JSON) to `age` ago.
async fn backdate(agent: &Agent, secret: &str, age: chrono::Duration) -> anyhow::Result<()> {
    let api = agent.ns.api::<Secret>();
    let data = api.get(secret).await?.data.unwrap_or_default();
    let stored = data.get("release").map(|b| b.0.clone()).unwrap_or_default();
    let gzipped = base64::engine::general_purpose::STANDARD.decode(stored)?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(gzipped.as_slice()).read_to_string(&mut text)?;
    let mut release: Value = serde_json::from_str(&text)?;
    release["info"]["last_deployed"] = json!((chrono::Utc::now() - age).to_rfc3339());
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(serde_json::to_string(&release)?.as_bytes())?;
    let stored = base64::engine::general_purpose::STANDARD.encode(encoder.finish()?);
    let patch = json!({"data": {"release": ByteString(stored.into_bytes())}});
    api.patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// A chart whose only object is a ConfigMap with a finalizer nobody removes but the test:
/// deleting it leaves it terminating until the test lets it go.
fn held_chart(test: &str) -> anyhow::Result<std::path::PathBuf> {
    let chart = charts::chart_dir(
        &TestEnv::get().test_dir(test).join("charts"),
        "held",
        "0.1.0",
        "message: hello\n",
    )?;
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-data\n  finalizers: [distr.test/hold]\ndata:\n  message: {{ .Values.message | quote }}\n",
    )?;
    Ok(chart)
}

/// A replaced deployment (same release name, new id): the uninstall waits while an object of
/// the old release is still terminating, and the install follows once it is gone, with no
/// error on the way (the install would otherwise run into the terminating object).
#[tokio::test]
async fn an_uninstall_waits_for_its_objects_before_the_release_is_installed_again() -> anyhow::Result<()> {
    let test = "uninstall-waits";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = charts::push_chart(&held_chart(test)?).await?;
    let old = deployment("held", &chart, "0.1.0", json!({"message": "old"}));
    agent.set_deployments(vec![old.clone()]);
    agent
        .wait_status(&revision(&old), "healthy", "status check passed", 2 * MINUTE)
        .await?;

    let new = deployment("held", &chart, "0.1.0", json!({"message": "new"}));
    agent.set_deployments(vec![new.clone()]);
    helm_reaches(&agent, "held", "uninstalling").await?;
    wait_cycles(&agent, 3).await?;
    let configmaps = agent.ns.api::<ConfigMap>();
    let held = configmaps.get("held-data").await?;
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "the old object is terminating"
    );
    let statuses = agent.statuses(&revision(&new));
    assert!(
        statuses.iter().all(|s| s.status_type != "error"),
        "no install ran into the terminating object: {statuses:#?}"
    );

    let release = json!({"metadata": {"finalizers": null}});
    configmaps
        .patch("held-data", &PatchParams::default(), &Patch::Merge(&release))
        .await?;
    agent
        .wait_status(&revision(&new), "running", "helm install succeeded", MINUTE)
        .await?;
    let fresh = configmaps.get("held-data").await?;
    assert_eq!(fresh.data.unwrap_or_default()["message"], "new");
    let statuses = agent.statuses(&revision(&new));
    assert!(statuses.iter().all(|s| s.status_type != "error"), "{statuses:#?}");
    // Let the test namespace go: the new object holds the same finalizer.
    configmaps
        .patch("held-data", &PatchParams::default(), &Patch::Merge(&release))
        .await?;
    Ok(())
}
