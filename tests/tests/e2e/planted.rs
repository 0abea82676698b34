//! Destructive actions only from the agent's own records: a Secret someone else created with
//! the tracking label (whoever may create Secrets in the namespace, or a chart that renders
//! one) never makes the executor uninstall or recover a release it did not install.

use std::{collections::BTreeMap, time::Duration};

use distr_agent_e2e::{
    agent::{Agent, AgentOptions, deployment, revision},
    charts::push_web_chart,
    wait_for,
};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{ObjectMeta, PostParams};
use serde_json::json;
use uuid::Uuid;

use crate::reliability::{admin_helm, history, local_web_chart, wait_cycles};

const MINUTE: Duration = Duration::from_secs(60);

/// A Secret named `name`, labelled for `release`, whose record claims a deployment of the Hub
/// (a real id, not an adoption request) in `phase`.
async fn plant(agent: &Agent, name: &str, release: &str, phase: &str) -> anyhow::Result<()> {
    let record = json!({
        "id": Uuid::new_v4(),
        "revisionId": Uuid::new_v4(),
        "releaseName": release,
        "helmRevision": 1,
        "phase": phase,
        "logsEnabled": false,
    });
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "agent.distr.sh/deployment".to_owned(),
                release.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            "release".to_owned(),
            ByteString(serde_json::to_vec(&record)?),
        )])),
        ..Secret::default()
    };
    agent.ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
    Ok(())
}

#[tokio::test]
async fn a_planted_secret_never_makes_the_executor_uninstall_a_release_it_did_not_install() -> anyhow::Result<()> {
    let test = "planted";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "planted-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent.wait_status(&revision(&web), "healthy", "", MINUTE).await?;

    // Two releases an operator installed by hand, each with a Secret of another name that
    // claims it for a Hub deployment: one `ready` (the uninstall of releases no longer
    // desired), one `progressing` (the start-up recovery).
    let local = local_web_chart(test, "planted-web", "0.1.0")?;
    for release in ["manual", "pending"] {
        admin_helm(&agent, &["install", release, local.as_str()]).await?;
    }
    let by_hand = [history(&agent, "manual").await?, history(&agent, "pending").await?];
    plant(&agent, "planted-manual", "manual", "ready").await?;
    plant(&agent, "planted-pending", "pending", "progressing").await?;

    // The Hub drops web while the executor is down: only the scan of tracking Secrets after the
    // restart finds it, in the same pass that reads the planted ones; the start-up recovery
    // reads them before.
    agent.executor.kill().await?;
    agent.set_deployments(Vec::new());
    agent.start_executor_again().await?;
    wait_for("web uninstalled", MINUTE, || async {
        let listed = agent.helm_json(&["ls"]).await.ok()?;
        let names: Vec<&str> = listed
            .as_array()?
            .iter()
            .filter_map(|release| release["name"].as_str())
            .collect();
        (!names.contains(&"web")).then_some(())
    })
    .await?;
    wait_cycles(&agent, 3).await?;

    let log = agent.executor.log_text();
    let acted: Vec<&str> = log
        .lines()
        .filter(|line| {
            (line.contains("release=manual") || line.contains("release=pending"))
                && (line.contains("uninstall") || line.contains("recover"))
        })
        .collect();
    assert!(acted.is_empty(), "the executor acted on a planted Secret: {acted:#?}");
    assert_eq!(history(&agent, "manual").await?, by_hand[0], "manual untouched");
    assert_eq!(history(&agent, "pending").await?, by_hand[1], "pending untouched");
    let names = agent.secret_names().await?;
    for release in ["manual", "pending"] {
        assert!(
            !names.contains(&format!("sh.distr.agent.v1.{release}")),
            "no record of {release} was made from the planted Secret: {names:?}"
        );
    }
    Ok(())
}
