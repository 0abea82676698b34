//! The paths that hurt users when something goes wrong (issue 7): bad cluster state, crashes
//! and restarts of the executor. Each test runs the real binaries against the Hub simulator,
//! the real control plane, helm v4 and the registry.

use std::{collections::BTreeMap, time::Duration};

use base64::Engine as _;
use distr_agent_e2e::{
    TestEnv,
    agent::{Agent, AgentOptions, deployment, revision},
    charts, wait_for,
};
use distr_agent_proto::v1 as pb;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// Pushes the sample web chart as `<name>` at each version and returns its `oci://` URL.
async fn push_web_chart(test: &str, name: &str, versions: &[&str]) -> anyhow::Result<String> {
    let dir = TestEnv::get().test_dir(test).join("charts");
    let mut url = String::new();
    for version in versions {
        url = charts::push_chart(&charts::write_web_chart(&dir, name, version)?).await?;
    }
    Ok(url)
}

fn tracking_secret(release: &str) -> String {
    format!("sh.distr.agent.v1.{release}")
}

/// The JSON record of a release's tracking Secret.
async fn tracking_record(agent: &Agent, release: &str) -> anyhow::Result<Value> {
    let secret = agent.ns.api::<Secret>().get(&tracking_secret(release)).await?;
    let data = secret.data.unwrap_or_default();
    let record = data
        .get("release")
        .ok_or_else(|| anyhow::anyhow!("no release key in the tracking Secret of {release}"))?;
    Ok(serde_json::from_slice(&record.0)?)
}

/// Replaces the JSON record of a release's tracking Secret.
async fn write_tracking_record(agent: &Agent, release: &str, record: &Value) -> anyhow::Result<()> {
    let patch = json!({"data": {"release": ByteString(serde_json::to_vec(record)?)}});
    agent
        .ns
        .api::<Secret>()
        .patch(
            &tracking_secret(release),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// Names of the releases `helm ls` shows.
async fn helm_releases(agent: &Agent) -> anyhow::Result<Vec<String>> {
    let list = agent.helm_json(&["ls"]).await?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|release| release["name"].as_str().map(str::to_owned))
        .collect())
}

/// Overwrites a Helm release Secret's payload with something that does not decode.
async fn corrupt_helm_secret(agent: &Agent, name: &str) -> anyhow::Result<()> {
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"this is not a helm release");
    let patch = json!({"data": {"release": ByteString(garbage.into_bytes())}});
    agent
        .ns
        .api::<Secret>()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The name of the latest Helm release Secret of `release`.
async fn latest_helm_secret(agent: &Agent, release: &str) -> anyhow::Result<String> {
    let history = agent.helm_json(&["history", release]).await?;
    let latest = history
        .as_array()
        .and_then(|history| history.iter().filter_map(|entry| entry["revision"].as_u64()).max())
        .ok_or_else(|| anyhow::anyhow!("no history for {release}: {history}"))?;
    Ok(format!("sh.helm.release.v1.{release}.v{latest}"))
}

async fn list_releases(agent: &Agent) -> anyhow::Result<BTreeMap<String, pb::Release>> {
    let mut client = agent.executor_client().await?;
    let releases = client
        .list_releases(pb::ListReleasesRequest {})
        .await
        .map_err(|status| anyhow::anyhow!("ListReleases failed: {status}"))?
        .into_inner()
        .releases;
    Ok(releases
        .into_iter()
        .map(|release| (release.release_name.clone(), release))
        .collect())
}

/// Bad cluster state is an error of the release it concerns, never of another release nor of
/// the executor (issue 7: 1a, 1f, 1k, 2i).
#[tokio::test]
async fn bad_cluster_state_is_an_error_for_that_release_only() -> anyhow::Result<()> {
    let test = "bad-state";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "bad-state-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    let db = deployment("db", &chart, "0.1.0", json!({}));
    let other = deployment("other", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone(), db.clone(), other.clone()]);
    for d in [&web, &db, &other] {
        agent
            .wait_status(&revision(d), "healthy", "status check passed", 2 * MINUTE)
            .await?;
    }
    let db_history = agent.helm_json(&["history", "db"]).await?;

    // A corrupt Helm Secret of a release the agent does not manage.
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("sh.helm.release.v1.foreign.v1".into()),
            labels: Some(
                [
                    ("owner", "helm"),
                    ("name", "foreign"),
                    ("status", "deployed"),
                    ("version", "1"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("helm.sh/release.v1".into()),
        data: Some(BTreeMap::from([(
            "release".to_owned(),
            ByteString(b"bm90IGEgcmVsZWFzZQ==".to_vec()),
        )])),
        ..Secret::default()
    };
    agent
        .ns
        .api::<Secret>()
        .create(&PostParams::default(), &foreign)
        .await?;

    // 1a: the tracking Secret of web holds a record naming db.
    let mut record = tracking_record(&agent, "web").await?;
    record["releaseName"] = json!("db");
    write_tracking_record(&agent, "web", &record).await?;
    let error = agent
        .wait_status(&revision(&web), "error", "does not match", MINUTE)
        .await?;
    assert!(error.message.contains("sh.distr.agent.v1.web"), "{}", error.message);

    // 1k: ListReleases answers despite the corrupt Secrets and shows the broken record.
    let releases = list_releases(&agent).await?;
    assert_eq!(releases["web"].phase, "invalid", "{releases:#?}");
    assert_eq!(releases["db"].phase, "ready", "{releases:#?}");
    assert_eq!(releases["db"].helm_status, "deployed", "{releases:#?}");
    assert!(!releases.contains_key("foreign"), "{releases:#?}");

    // 1a: web removed from the Hub. Its worker must not uninstall db, the release its record
    // names: it refuses and retries later.
    agent.set_deployments(vec![db.clone(), other.clone()]);
    wait_for("the uninstall of web refused, or db touched", MINUTE, || async {
        let refused = agent
            .executor
            .log_text()
            .contains("cannot uninstall the release; retrying later");
        let db_gone = !agent.secret_names().await.ok()?.contains(&tracking_secret("db"));
        (refused || db_gone).then_some(())
    })
    .await?;
    assert!(
        agent.secret_names().await?.contains(&tracking_secret("db")),
        "the tracking Secret of db is still there"
    );
    assert!(
        helm_releases(&agent).await?.contains(&"db".to_owned()),
        "db still installed"
    );
    assert_eq!(agent.helm_json(&["history", "db"]).await?, db_history, "db untouched");

    // 1k: the latest Helm Secret of a tracked release does not decode: ListReleases still
    // answers, and only that release reports an error.
    corrupt_helm_secret(&agent, &latest_helm_secret(&agent, "other").await?).await?;
    agent
        .wait_status(&revision(&other), "error", "cannot decode helm release Secret", MINUTE)
        .await?;
    let releases = list_releases(&agent).await?;
    assert_eq!(releases["other"].helm_status, "unreadable", "{releases:#?}");
    assert_eq!(releases["db"].helm_status, "deployed", "{releases:#?}");

    // 1f: the same release interrupted (phase progressing) when the executor restarts: the
    // start-up recovery fails for it alone, and the executor becomes ready.
    let mut record = tracking_record(&agent, "other").await?;
    record["phase"] = json!("progressing");
    write_tracking_record(&agent, "other", &record).await?;
    agent.restart_executor().await?;
    let restarted = chrono::Utc::now();
    agent
        .wait_status(&revision(&other), "error", "cannot decode helm release Secret", MINUTE)
        .await?;
    // db is still served after the restart: checked again and healthy.
    wait_for("a fresh healthy status of db after the restart", MINUTE, || async {
        agent
            .statuses(&revision(&db))
            .into_iter()
            .find(|s| s.received_at > restarted && s.status_type == "healthy")
    })
    .await?;
    Ok(())
}

/// Helm revisions of `release`: (revision, status, description).
async fn history(agent: &Agent, release: &str) -> anyhow::Result<Vec<(u64, String, String)>> {
    let history = agent.helm_json(&["history", release]).await?;
    Ok(history
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            (
                entry["revision"].as_u64().unwrap_or_default(),
                entry["status"].as_str().unwrap_or_default().to_owned(),
                entry["description"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// A SIGTERM during an upgrade stops Helm gracefully: Helm records the cut-short revision
/// (failed, rolled back), nothing is left `pending-*`, and the next executor redoes the
/// upgrade at once instead of waiting out a pending revision (issue 7: 1h).
#[tokio::test]
async fn a_shutdown_during_an_upgrade_stops_helm_gracefully_and_the_next_executor_redoes_it() -> anyhow::Result<()> {
    let test = "graceful-stop";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "graceful-web", &["0.1.0", "0.2.0"]).await?;
    let v1 = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "running", "helm install succeeded", MINUTE)
        .await?;
    // An upgrade that waits (its pods never become ready) for up to a minute.
    let v2 = distr_agent_e2e::agent::revise(
        &v1,
        json!({
            "chartVersion": "0.2.0",
            "values": {"neverReady": true},
            "helmOptions": {"timeout": "60s", "rollbackOnFailure": true, "waitStrategy": "watcher",
                            "cleanupOnFailure": true, "forceConflicts": false}
        }),
    );
    agent.set_deployments(vec![v2.clone()]);
    wait_for("helm's pending upgrade", MINUTE, || async {
        history(&agent, "web")
            .await
            .ok()?
            .into_iter()
            .find(|(_, status, _)| status == "pending-upgrade")
    })
    .await?;

    let (code, took) = agent.executor.terminate(MINUTE).await?;
    eprintln!("executor stopped {took:?} after SIGTERM during an upgrade");
    assert_eq!(code, Some(0), "{}", agent.executor.log_text());
    let after_stop = history(&agent, "web").await?;
    assert!(
        after_stop.iter().all(|(_, status, _)| !status.starts_with("pending")),
        "nothing left pending: {after_stop:#?}"
    );
    assert!(
        after_stop
            .iter()
            .any(|(_, status, description)| status == "failed" && description.contains("context canceled")),
        "helm recorded the cancelled upgrade: {after_stop:#?}"
    );
    let record = tracking_record(&agent, "web").await?;
    assert_eq!(record["phase"], "ready", "{record}");
    assert_eq!(record["revisionId"], "00000000-0000-0000-0000-000000000000", "{record}");
    assert_eq!(
        record["helmRevision"].as_u64(),
        after_stop.iter().map(|(revision, _, _)| *revision).max(),
        "{record}"
    );

    // The next executor redoes the upgrade at once (no wait for a pending revision).
    let restarted = std::time::Instant::now();
    agent.restart_executor().await?;
    wait_for("the upgrade redone", MINUTE, || async {
        let now = history(&agent, "web").await.ok()?;
        (now.len() > after_stop.len()).then_some(())
    })
    .await?;
    eprintln!("upgrade redone {:?} after the restart", restarted.elapsed());
    assert!(
        restarted.elapsed() < Duration::from_secs(45),
        "{:?}",
        restarted.elapsed()
    );
    // It ends as this revision should: it fails (pods never ready) and is reported once.
    let error = agent
        .wait_status(&revision(&v2), "error", "upgrade error", 2 * MINUTE)
        .await?;
    eprintln!(
        "interrupted upgrade converged {:?} after the restart",
        restarted.elapsed()
    );
    assert!(
        !error.message.contains("different from latest deployed"),
        "{}",
        error.message
    );
    let statuses = agent.statuses(&revision(&v2));
    assert!(
        statuses
            .iter()
            .all(|s| !s.message.contains("is different from latest deployed by agent")),
        "{statuses:#?}"
    );
    Ok(())
}

/// Bad input from the Hub is an error of that deployment alone: every other release installs
/// and stays healthy, untouched (issue 7: 2h; duplicate release names in a changing order, 1l).
#[tokio::test]
async fn bad_input_from_the_hub_fails_only_that_deployment() -> anyhow::Result<()> {
    let test = "bad-input";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "bad-input-web", &["0.1.0"]).await?;
    let good = deployment("good", &chart, "0.1.0", json!({}));
    let bad_name = deployment("Bad_Name", &chart, "0.1.0", json!({}));
    let not_an_object = deployment("not-an-object", &chart, "0.1.0", json!([1, 2, 3]));
    let bad_timeout = distr_agent_e2e::agent::revise(
        &deployment("bad-timeout", &chart, "0.1.0", json!({})),
        json!({"helmOptions": {"timeout": "forever", "waitStrategy": "watcher", "rollbackOnFailure": true,
                               "cleanupOnFailure": true, "forceConflicts": false}}),
    );
    // A field of the wrong JSON type (a number of seconds where the Hub sends a Go duration
    // string): before the fix the poller rejected the whole Hub response.
    let numeric_timeout = distr_agent_e2e::agent::revise(
        &deployment("numeric-timeout", &chart, "0.1.0", json!({})),
        json!({"helmOptions": {"timeout": 300, "waitStrategy": "watcher", "rollbackOnFailure": true,
                               "cleanupOnFailure": true, "forceConflicts": false}}),
    );
    let file_url = deployment("file-url", "file:///etc/passwd", "0.1.0", json!({}));
    let script_url = deployment("script-url", "javascript:alert(1)", "0.1.0", json!({}));
    // Several MiB of values (a big embedded file, say).
    let big = deployment("big", &chart, "0.1.0", json!({"blob": "x".repeat(3 << 20)}));
    let dup_a = deployment("dup", &chart, "0.1.0", json!({"message": "a"}));
    let dup_b = deployment("dup", &chart, "0.1.0", json!({"message": "b"}));
    let all = vec![
        good.clone(),
        bad_name.clone(),
        not_an_object.clone(),
        bad_timeout.clone(),
        numeric_timeout.clone(),
        file_url.clone(),
        script_url.clone(),
        big.clone(),
        dup_a.clone(),
        dup_b.clone(),
    ];
    agent.set_deployments(all.clone());
    agent
        .wait_status(&revision(&good), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    agent
        .wait_status(&revision(&big), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    for (d, expected) in [
        (&bad_name, "invalid release name"),
        (&not_an_object, "values"),
        (&bad_timeout, "forever"),
        (
            &numeric_timeout,
            "invalid deployment from the Hub: helmOptions.timeout is a number, expected a string",
        ),
        (&file_url, "must start with oci:// or https://"),
        (&script_url, "must start with oci:// or https://"),
    ] {
        agent.wait_status(&revision(d), "error", expected, MINUTE).await?;
    }

    // The duplicate release name: one deployment owns it, whatever the order of the list.
    let mut flipped = all.clone();
    let (a, b) = (flipped.len() - 2, flipped.len() - 1);
    flipped.swap(a, b);
    for round in 0..6 {
        agent.set_deployments(if round % 2 == 0 { flipped.clone() } else { all.clone() });
        // Two poll cycles (1 s each) per order.
        let seen = agent.hub.requests_on(distr_agent_e2e::hubsim::Route::Resources).len();
        wait_for("two more cycles", MINUTE, || async {
            (agent.hub.requests_on(distr_agent_e2e::hubsim::Route::Resources).len() >= seen + 2).then_some(())
        })
        .await?;
    }
    let dup_history = history(&agent, "dup").await?;
    assert_eq!(dup_history.len(), 1, "installed once, never replaced: {dup_history:#?}");
    let owner = tracking_record(&agent, "dup").await?["id"].clone();
    let (winner, loser) = if owner == dup_a["id"] {
        (&dup_a, &dup_b)
    } else {
        (&dup_b, &dup_a)
    };
    assert_eq!(owner, winner["id"]);
    agent
        .wait_status(
            &revision(loser),
            "error",
            "release name dup is used by another deployment",
            MINUTE,
        )
        .await?;
    let winner_statuses = agent.statuses(&revision(winner));
    assert!(
        winner_statuses.iter().all(|s| s.status_type != "error"),
        "{winner_statuses:#?}"
    );

    // Every good release untouched: one Helm revision each, and still healthy.
    for release in ["good", "big"] {
        assert_eq!(history(&agent, release).await?.len(), 1, "{release}");
    }
    let releases = helm_releases(&agent).await?;
    let mut sorted = releases.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["big", "dup", "good"], "{releases:?}");
    Ok(())
}

/// No secret reaches a log line or a status message: not the target secret, not a Hub JWT, not
/// a registry or chart repository password (in `registryAuth` or in a chart URL), not a value
/// (issue 7: 1n, 2l). The poller logs everything at debug level, dependencies included.
#[tokio::test]
async fn no_secret_reaches_a_log_or_the_hub() -> anyhow::Result<()> {
    let test = "no-leaks";
    let env = TestEnv::get();
    let agent = Agent::start(
        test,
        AgentOptions {
            poller_env: vec![
                ("AGENT_HUB_TIMEOUT_SECONDS", "3".to_owned()),
                ("AGENT_LOG", "debug".to_owned()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let chart = push_web_chart(test, "no-leaks-web", &["0.1.0"]).await?;
    const VALUE_SECRET: &str = "value-secret-5b9f0c";
    const URL_PASSWORD: &str = "url-password-2d7e41";
    const AUTH_PASSWORD: &str = "auth-password-8a3c6f";
    let web = deployment("web", &chart, "0.1.0", json!({"database": {"password": VALUE_SECRET}}));
    // Classic repositories that cannot be reached: their errors quote the URL.
    let in_url = distr_agent_e2e::agent::revise(
        &deployment(
            "in-url",
            &format!("https://vendor:{URL_PASSWORD}@127.0.0.1:9/charts"),
            "1.0.0",
            json!({}),
        ),
        json!({"chartName": "app"}),
    );
    let in_auth = distr_agent_e2e::agent::revise(
        &deployment("in-auth", "https://127.0.0.1:9/charts", "1.0.0", json!({})),
        json!({"chartName": "app", "registryAuth": {"127.0.0.1:9": {"username": "vendor", "password": AUTH_PASSWORD}}}),
    );
    agent.set_deployments(vec![web.clone(), in_url.clone(), in_auth.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    for d in [&in_url, &in_auth] {
        agent
            .wait_status(&revision(d), "error", "install error", MINUTE)
            .await?;
    }
    // A Hub failure and a new login on the way.
    agent.hub.fail_resources(distr_agent_e2e::hubsim::Failure::Status(500));
    let before = agent.statuses(&revision(&web)).len();
    wait_for("a cycle with the Hub failing", MINUTE, || async {
        agent
            .poller
            .log_text()
            .contains("cannot fetch the desired state from the Hub")
            .then_some(())
    })
    .await?;
    agent.hub.clear_failures();
    agent.hub.revoke_tokens(agent.target);
    wait_for("a status after a new login", MINUTE, || async {
        (agent.statuses(&revision(&web)).len() > before).then_some(())
    })
    .await?;

    let target_secret = agent.hub.secret_of(agent.target).unwrap_or_default();
    let secrets = [
        ("target secret", target_secret.as_str()),
        ("registry password", env.registry_password.as_str()),
        ("value", VALUE_SECRET),
        ("password in a chart URL", URL_PASSWORD),
        ("registryAuth password", AUTH_PASSWORD),
        // Every JWT starts with the base64 of `{"alg`.
        ("JWT", "eyJhbGci"),
    ];
    let messages: String = agent
        .hub
        .statuses_for(agent.target)
        .iter()
        .map(|s| format!("{}\n", s.message))
        .collect();
    for (source, text) in [
        ("executor log", agent.executor.log_text()),
        ("poller log", agent.poller.log_text()),
        ("status messages", messages),
    ] {
        for (what, secret) in secrets {
            assert!(!secret.is_empty(), "{what} known");
            if let Some(at) = text.find(secret) {
                let line = text[..at].rsplit('\n').next().unwrap_or_default();
                panic!("the {source} holds the {what}: {line}…");
            }
        }
    }
    Ok(())
}

/// The executor dies with its `helm` (SIGKILL of the whole process group, as when its
/// container dies) in the middle of an upgrade: the next executor takes the pending revision
/// over once no live `helm` can still own it, and the release converges to what the Hub wants,
/// with nothing left `pending-*` (issue 7: 2e; the time to converge is printed).
#[tokio::test]
async fn a_crash_during_an_upgrade_converges() -> anyhow::Result<()> {
    let test = "crash-upgrade";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "crash-web", &["0.1.0", "0.2.0"]).await?;
    let v1 = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "running", "helm install succeeded", MINUTE)
        .await?;
    let options = json!({"timeout": "20s", "rollbackOnFailure": true, "waitStrategy": "watcher",
                         "cleanupOnFailure": true, "forceConflicts": false});
    let v2 = distr_agent_e2e::agent::revise(
        &v1,
        json!({"chartVersion": "0.2.0", "values": {"neverReady": true}, "helmOptions": options}),
    );
    agent.set_deployments(vec![v2.clone()]);
    wait_for("helm's pending upgrade", MINUTE, || async {
        history(&agent, "web")
            .await
            .ok()?
            .into_iter()
            .find(|(_, status, _)| status == "pending-upgrade")
    })
    .await?;
    agent.executor.kill_group().await?;
    let crashed = std::time::Instant::now();
    let left = history(&agent, "web").await?;
    assert!(
        left.iter().any(|(_, status, _)| status == "pending-upgrade"),
        "the crash left the upgrade pending: {left:#?}"
    );

    // Meanwhile the Hub wants a revision that works; the next executor gets there.
    let v3 = distr_agent_e2e::agent::revise(
        &v1,
        json!({"chartVersion": "0.2.0", "values": {"message": "three"}, "helmOptions": options}),
    );
    agent.set_deployments(vec![v3.clone()]);
    agent.start_executor_again().await?;
    agent
        .wait_status(&revision(&v3), "running", "helm upgrade succeeded", 5 * MINUTE)
        .await?;
    eprintln!(
        "crashed upgrade (helm timeout 20s) converged {:?} after the crash",
        crashed.elapsed()
    );
    // Nothing pending above the deployed revision. (Helm's rollback leaves the interrupted
    // revision labelled `pending-upgrade` in the history below it; only the latest counts for
    // Helm's next operation.)
    let end = history(&agent, "web").await?;
    let deployed = end
        .iter()
        .filter(|(_, status, _)| status == "deployed")
        .map(|(revision, _, _)| *revision)
        .max();
    assert_eq!(
        deployed,
        end.iter().map(|(revision, _, _)| *revision).max(),
        "the latest revision is deployed: {end:#?}"
    );
    agent
        .wait_status(&revision(&v3), "healthy", "status check passed", MINUTE)
        .await?;
    Ok(())
}
