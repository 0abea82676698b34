//! The paths that hurt users when something goes wrong (issue 7): bad cluster state, crashes
//! and restarts of the executor. Each test runs the real binaries against the Hub simulator,
//! the real control plane, helm v4 and the registry.

use std::{collections::BTreeMap, time::Duration};

use base64::Engine as _;
use distr_agent_e2e::{
    TestEnv,
    agent::{Agent, AgentOptions, deployment, revision},
    charts::{self, push_web_chart},
    wait_for,
};
use distr_agent_proto::v1 as pb;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

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
pub(crate) async fn history(agent: &Agent, release: &str) -> anyhow::Result<Vec<(u64, String, String)>> {
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

/// Waits (a minute at most) until Helm's history of `release` shows a revision in `status`,
/// such as `pending-install` or `uninstalling`: an operation under way.
pub(crate) async fn helm_reaches(agent: &Agent, release: &str, status: &str) -> anyhow::Result<()> {
    wait_for(&format!("helm's {release} to show {status}"), MINUTE, || async {
        history(agent, release)
            .await
            .ok()?
            .into_iter()
            .find(|(_, found, _)| found == status)
    })
    .await?;
    Ok(())
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
    helm_reaches(&agent, "web", "pending-upgrade").await?;

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
    helm_reaches(&agent, "web", "pending-upgrade").await?;
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
    let latest = end.iter().max_by_key(|(revision, _, _)| *revision);
    assert!(
        latest.is_some_and(|(revision, status, _)| *revision >= 3 && status == "deployed"),
        "the latest revision (after the install, the crashed upgrade and its repair) is deployed: {end:#?}"
    );
    agent
        .wait_status(&revision(&v3), "healthy", "status check passed", MINUTE)
        .await?;
    Ok(())
}

/// `helm <args> -n <ns>` as the cluster's admin (an operator acting by hand); its stdout.
pub(crate) async fn admin_helm(agent: &Agent, args: &[&str]) -> anyhow::Result<String> {
    let home = TestEnv::get().test_dir(&agent.test).join("admin-helm");
    let mut all = args.to_vec();
    all.extend(["-n", &agent.ns.name]);
    Ok(distr_agent_e2e::tools::helm(&home, &all)
        .await?
        .ok(&format!("helm {}", args.join(" ")))?
        .stdout)
}

/// The sample web chart written locally (not pushed), for an operator's `helm install`.
pub(crate) fn local_web_chart(test: &str, name: &str, version: &str) -> anyhow::Result<String> {
    let dir = charts::write_web_chart(&TestEnv::get().test_dir(test).join("local-charts"), name, version)?;
    Ok(dir.display().to_string())
}

/// Creates an adoption request for `release` as hub-protocol.md describes it: the tracking
/// Secret of the release, labelled for it, whose record has the nil UUID as its id.
async fn request_adoption(agent: &Agent, release: &str) -> anyhow::Result<()> {
    let record = json!({
        "id": "00000000-0000-0000-0000-000000000000",
        "revisionId": "00000000-0000-0000-0000-000000000000",
        "releaseName": release,
    });
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(tracking_secret(release)),
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

/// An annotation of the Deployment `name`: on the object itself, or with `template` on its pod
/// template.
async fn deployment_annotation(agent: &Agent, name: &str, template: bool, key: &str) -> anyhow::Result<Option<String>> {
    let deployment = agent
        .ns
        .api::<k8s_openapi::api::apps::v1::Deployment>()
        .get(name)
        .await?;
    let annotations = if template {
        deployment
            .spec
            .and_then(|spec| spec.template.metadata)
            .and_then(|metadata| metadata.annotations)
    } else {
        deployment.metadata.annotations
    };
    Ok(annotations.unwrap_or_default().get(key).cloned())
}

/// Waits until the poller fetched the Hub's resources `cycles` more times.
pub(crate) async fn wait_cycles(agent: &Agent, cycles: usize) -> anyhow::Result<()> {
    let route = distr_agent_e2e::hubsim::Route::Resources;
    let seen = agent.hub.requests_on(route).len();
    wait_for(&format!("{cycles} more poll cycles"), 2 * MINUTE, || async {
        (agent.hub.requests_on(route).len() >= seen + cycles).then_some(())
    })
    .await
}

/// Releases an operator installed by hand: the Hub's deployments of the same names are refused
/// with the Go agent's wording and the releases left untouched (issue 7: 2c); once an adoption
/// request (a nil-id tracking Secret) exists for each, the agent adopts and upgrades them, several
/// at once, while an adoption request for a release the Hub does not list is left alone (2a).
#[tokio::test]
async fn releases_installed_by_hand_are_refused_until_adopted() -> anyhow::Result<()> {
    let test = "adoption";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "adopt-web", &["0.2.0"]).await?;
    let local = local_web_chart(test, "adopt-web", "0.1.0")?;
    for release in ["a", "b", "c"] {
        admin_helm(
            &agent,
            &["install", release, local.as_str(), "--set", "message=by-hand"],
        )
        .await?;
    }
    let by_hand = history(&agent, "a").await?;
    let a = deployment("a", &chart, "0.2.0", json!({"message": "hub"}));
    let b = deployment("b", &chart, "0.2.0", json!({"message": "hub"}));
    agent.set_deployments(vec![a.clone(), b.clone()]);

    // 2c: not the agent's; refused, untouched.
    for (d, release) in [(&a, "a"), (&b, "b")] {
        let error = agent
            .wait_status(
                &revision(d),
                "error",
                &format!("helm release {release} already exists but was not created by the agent"),
                MINUTE,
            )
            .await?;
        assert_eq!(
            error.message,
            format!("helm release {release} already exists but was not created by the agent")
        );
    }
    wait_cycles(&agent, 3).await?;
    for release in ["a", "b", "c"] {
        assert_eq!(history(&agent, release).await?, by_hand, "{release} untouched");
        assert_eq!(
            deployment_annotation(&agent, &format!("{release}-web"), false, "distr.test/message")
                .await?
                .as_deref(),
            Some("by-hand")
        );
    }
    let names = agent.secret_names().await?;
    assert!(
        !names.iter().any(|name| name.starts_with("sh.distr.agent.v1.")),
        "nothing tracked, no pull Secret: {names:?}"
    );

    // 2a: three adoption requests at once; the Hub lists two of the releases.
    for release in ["a", "b", "c"] {
        request_adoption(&agent, release).await?;
    }
    let requested = agent.hub.requests_on(distr_agent_e2e::hubsim::Route::Resources).len();
    for d in [&a, &b] {
        agent
            .wait_status(&revision(d), "running", "helm upgrade succeeded", 2 * MINUTE)
            .await?;
        agent
            .wait_status(&revision(d), "healthy", "status check passed", MINUTE)
            .await?;
    }
    for (d, release) in [(&a, "a"), (&b, "b")] {
        let after = history(&agent, release).await?;
        assert_eq!(after.len(), 2, "upgraded once from the release by hand: {after:#?}");
        assert_eq!(after[1].1, "deployed", "{after:#?}");
        let chart_of = agent.helm_json(&["history", release]).await?;
        assert_eq!(chart_of[1]["chart"], "adopt-web-0.2.0", "{chart_of}");
        assert_eq!(
            deployment_annotation(&agent, &format!("{release}-web"), false, "distr.test/message")
                .await?
                .as_deref(),
            Some("hub")
        );
        let record = tracking_record(&agent, release).await?;
        assert_eq!(record["id"], d["id"], "{record}");
        assert_eq!(record["revisionId"], d["revisionId"], "{record}");
        assert_eq!(record["helmRevision"], 2, "{record}");
        assert_eq!(record["phase"], "ready", "{record}");
    }

    // c: the Hub does not list it. Its request stays, the release untouched, after more than
    // two scans for releases to uninstall (one every 15 s) since the requests were made.
    let route = distr_agent_e2e::hubsim::Route::Resources;
    wait_for("35 poll cycles since the adoption requests", 2 * MINUTE, || async {
        (agent.hub.requests_on(route).len() >= requested + 35).then_some(())
    })
    .await?;
    assert_eq!(history(&agent, "c").await?, by_hand, "c untouched");
    let record = tracking_record(&agent, "c").await?;
    assert_eq!(record["id"], "00000000-0000-0000-0000-000000000000", "{record}");
    assert!(helm_releases(&agent).await?.contains(&"c".to_owned()));
    Ok(())
}

/// A manual `helm upgrade` of a release the agent deployed is refused with the Go agent's
/// revision-skew error; a Hub revision with `ignoreRevisionSkew` overwrites it; after another
/// manual upgrade, the documented reset (the real revision written to `helmRevision` in the
/// tracking Secret) lets the agent deploy again and report healthy (issue 7: 2b).
#[tokio::test]
async fn revision_skew_is_refused_until_ignored_or_reset() -> anyhow::Result<()> {
    let test = "skew";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "skew-web", &["0.1.0"]).await?;
    let local = local_web_chart(test, "skew-web", "0.1.0")?;
    let message = || async { deployment_annotation(&agent, "web-web", false, "distr.test/message").await };
    let v1 = deployment("web", &chart, "0.1.0", json!({"message": "one"}));
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "healthy", "status check passed", 2 * MINUTE)
        .await?;

    admin_helm(
        &agent,
        &[
            "upgrade",
            "web",
            local.as_str(),
            "--reuse-values",
            "--set",
            "message=manual",
        ],
    )
    .await?;
    let skew = "actual helm revision for web (2) is different from latest deployed by agent (1)";
    let error = agent.wait_status(&revision(&v1), "error", skew, MINUTE).await?;
    assert_eq!(error.message, skew);
    assert_eq!(history(&agent, "web").await?.len(), 2, "the agent did not touch it");
    assert_eq!(message().await?.as_deref(), Some("manual"));

    // The vendor's next revision ignores the skew: it overwrites the manual change.
    let v2 = distr_agent_e2e::agent::revise(&v1, json!({"values": {"message": "two"}, "ignoreRevisionSkew": true}));
    agent.set_deployments(vec![v2.clone()]);
    agent
        .wait_status(&revision(&v2), "running", "helm upgrade succeeded", MINUTE)
        .await?;
    agent
        .wait_status(&revision(&v2), "healthy", "status check passed", MINUTE)
        .await?;
    assert_eq!(message().await?.as_deref(), Some("two"));
    assert_eq!(tracking_record(&agent, "web").await?["helmRevision"], 3);

    // Another manual upgrade, and a revision that does not ignore the skew: refused again.
    admin_helm(
        &agent,
        &[
            "upgrade",
            "web",
            local.as_str(),
            "--reuse-values",
            "--set",
            "message=manual",
        ],
    )
    .await?;
    let v3 = distr_agent_e2e::agent::revise(
        &v2,
        json!({"values": {"message": "three"}, "ignoreRevisionSkew": false}),
    );
    agent.set_deployments(vec![v3.clone()]);
    let skew = "actual helm revision for web (4) is different from latest deployed by agent (3)";
    agent.wait_status(&revision(&v3), "error", skew, MINUTE).await?;
    assert_eq!(history(&agent, "web").await?.len(), 4, "the agent did not touch it");

    // The reset: the operator records the real revision in the tracking Secret.
    let mut record = tracking_record(&agent, "web").await?;
    record["helmRevision"] = json!(4);
    write_tracking_record(&agent, "web", &record).await?;
    agent
        .wait_status(&revision(&v3), "running", "helm upgrade succeeded", MINUTE)
        .await?;
    agent
        .wait_status(&revision(&v3), "healthy", "status check passed", MINUTE)
        .await?;
    assert_eq!(message().await?.as_deref(), Some("three"));
    assert_eq!(tracking_record(&agent, "web").await?["helmRevision"], 5);
    Ok(())
}

/// The Hub replaces a deployment by another of the same release name (a new deployment id):
/// the old release is uninstalled, then the new one installed from scratch (issue 7: 2d).
#[tokio::test]
async fn a_replaced_deployment_is_uninstalled_then_installed() -> anyhow::Result<()> {
    let test = "replaced";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "replaced-web", &["0.1.0"]).await?;
    let old = deployment("web", &chart, "0.1.0", json!({"message": "old"}));
    agent.set_deployments(vec![old.clone()]);
    agent
        .wait_status(&revision(&old), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    let old_uid = agent
        .ns
        .api::<k8s_openapi::api::apps::v1::Deployment>()
        .get("web-web")
        .await?
        .metadata
        .uid;

    let new = deployment("web", &chart, "0.1.0", json!({"message": "new"}));
    agent.set_deployments(vec![new.clone()]);
    agent
        .wait_status(&revision(&new), "running", "helm install succeeded", 2 * MINUTE)
        .await?;
    agent
        .wait_status(&revision(&new), "healthy", "status check passed", MINUTE)
        .await?;
    let after = history(&agent, "web").await?;
    assert_eq!(after.len(), 1, "a fresh install, not an upgrade: {after:#?}");
    assert_eq!(after[0].1, "deployed", "{after:#?}");
    let record = tracking_record(&agent, "web").await?;
    assert_eq!(record["id"], new["id"], "{record}");
    assert_eq!(record["helmRevision"], 1, "{record}");
    let workload = agent
        .ns
        .api::<k8s_openapi::api::apps::v1::Deployment>()
        .get("web-web")
        .await?;
    assert_ne!(workload.metadata.uid, old_uid, "the old workload was deleted");
    assert_eq!(
        workload.metadata.annotations.unwrap_or_default()["distr.test/message"],
        "new"
    );
    assert!(
        agent
            .executor
            .log_text()
            .contains("release belongs to a replaced deployment; reinstalling")
    );
    Ok(())
}

/// `forceRestart`: each upgrade restarts the workloads (a new `restartedAt` on the pod
/// template, as `kubectl rollout restart` sets) and the message says so (issue 7: 2f).
#[tokio::test]
async fn force_restart_restarts_the_workloads_on_each_upgrade() -> anyhow::Result<()> {
    let test = "force-restart";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "restart-web", &["0.1.0"]).await?;
    let restarted_at =
        || async { deployment_annotation(&agent, "web-web", true, "kubectl.kubernetes.io/restartedAt").await };
    let v1 = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![v1.clone()]);
    agent
        .wait_status(&revision(&v1), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    assert_eq!(restarted_at().await?, None);

    let v2 = distr_agent_e2e::agent::revise(&v1, json!({"forceRestart": true, "values": {"message": "two"}}));
    agent.set_deployments(vec![v2.clone()]);
    let running = agent
        .wait_status(&revision(&v2), "running", "helm upgrade succeeded", MINUTE)
        .await?;
    assert_eq!(running.message, "helm upgrade succeeded; force restart succeeded");
    let first = restarted_at().await?;
    assert!(first.is_some(), "restarted");

    let v3 = distr_agent_e2e::agent::revise(&v2, json!({"values": {"message": "three"}}));
    agent.set_deployments(vec![v3.clone()]);
    let running = agent
        .wait_status(&revision(&v3), "running", "helm upgrade succeeded", MINUTE)
        .await?;
    assert_eq!(running.message, "helm upgrade succeeded; force restart succeeded");
    let second = restarted_at().await?;
    assert!(second.is_some() && second != first, "{first:?} then {second:?}");
    agent
        .wait_status(&revision(&v3), "healthy", "status check passed", MINUTE)
        .await?;
    Ok(())
}

/// `grpcurl` of an operator API method on the executor with the operator's certificate, as the
/// README shows it; the reply parsed, or the failure's stderr.
async fn operator_call(agent: &Agent, method: &str, body: &Value) -> anyhow::Result<Result<Value, String>> {
    let operator = distr_agent_e2e::install::OperatorCert {
        dir: agent.tls_dirs["operator"].clone(),
    };
    let mut args = operator.grpcurl_flags(&agent.ns.name);
    args.extend([
        "-d".to_owned(),
        body.to_string(),
        agent.executor_addr.clone(),
        format!("distr.agent.v1.Executor/{method}"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = distr_agent_e2e::tools::grpcurl(&args).await?;
    Ok(if run.success {
        Ok(serde_json::from_str(&run.stdout)?)
    } else {
        Err(run.stderr)
    })
}

/// The operator API through `grpcurl`: `GetRelease` shows the Helm history and the health of
/// each resource; `Rollback` to a chosen revision is recorded, so no revision-skew error follows,
/// and the Hub is told that an operator rolled back and which revision runs (issue 7: 2j,
/// issue 19: 6).
#[tokio::test]
async fn the_operator_reads_a_release_and_rolls_it_back_through_grpcurl() -> anyhow::Result<()> {
    let test = "operator-api";
    let agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "operator-web", &["0.1.0", "0.2.0", "0.3.0"]).await?;
    let mut current = deployment("web", &chart, "0.1.0", json!({}));
    for version in ["0.1.0", "0.2.0", "0.3.0"] {
        if version != "0.1.0" {
            current = distr_agent_e2e::agent::revise(&current, json!({"chartVersion": version}));
        }
        agent.set_deployments(vec![current.clone()]);
        agent
            .wait_status(&revision(&current), "healthy", "status check passed", 2 * MINUTE)
            .await?;
    }

    let release = operator_call(&agent, "GetRelease", &json!({"releaseName": "web"}))
        .await?
        .map_err(|stderr| anyhow::anyhow!("GetRelease failed: {stderr}"))?;
    eprintln!("GetRelease: {release:#}");
    assert_eq!(release["release"]["releaseName"], "web", "{release:#}");
    assert_eq!(release["release"]["revisionId"], current["revisionId"], "{release:#}");
    let revisions: Vec<(i64, String, String)> = release["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            (
                entry["revision"].as_i64().unwrap_or_default(),
                entry["status"].as_str().unwrap_or_default().to_owned(),
                entry["chart"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut sorted = revisions.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            (1, "superseded".to_owned(), "operator-web-0.1.0".to_owned()),
            (2, "superseded".to_owned(), "operator-web-0.2.0".to_owned()),
            (3, "deployed".to_owned(), "operator-web-0.3.0".to_owned()),
        ],
        "{release:#}"
    );
    let resources = release["resources"].as_array().cloned().unwrap_or_default();
    assert_eq!(resources.len(), 1, "{release:#}");
    assert_eq!(resources[0]["resource"], "Deployment/web-web", "{release:#}");
    assert_eq!(resources[0]["healthy"], true, "{release:#}");

    let missing = operator_call(&agent, "GetRelease", &json!({"releaseName": "nope"})).await?;
    assert!(
        missing.as_ref().is_err_and(|stderr| stderr.contains("NotFound")),
        "{missing:?}"
    );

    // Back to revision 1 (chart 0.1.0), the operator's choice.
    let rolled_back_at = chrono::Utc::now();
    let rollback = operator_call(&agent, "Rollback", &json!({"releaseName": "web", "revision": 1}))
        .await?
        .map_err(|stderr| anyhow::anyhow!("Rollback failed: {stderr}"))?;
    assert_eq!(rollback["newRevision"], 4, "{rollback}");
    let chart_of = agent.helm_json(&["history", "web"]).await?;
    let latest = chart_of
        .as_array()
        .and_then(|history| history.iter().find(|entry| entry["revision"] == 4))
        .cloned()
        .unwrap_or_default();
    assert_eq!(latest["chart"], "operator-web-0.1.0", "{chart_of}");
    assert_eq!(latest["status"], "deployed", "{chart_of}");
    assert_eq!(tracking_record(&agent, "web").await?["helmRevision"], 4);

    // The next check of the release tells the Hub what runs: the operator's roll-back and the
    // revision, not "status check passed" for the Hub's revision, which no longer runs. No
    // revision skew, no upgrade back.
    let told = agent
        .wait_status(
            &revision(&current),
            "healthy",
            "rolled back by an operator: helm revision 4 (operator-web-0.1.0) runs, not this revision; status check passed",
            2 * MINUTE,
        )
        .await?;
    assert!(told.received_at > rolled_back_at);
    assert_eq!(tracking_record(&agent, "web").await?["rolledBackTo"], 4);
    let since: Vec<_> = agent
        .statuses(&revision(&current))
        .into_iter()
        .filter(|s| s.received_at > rolled_back_at)
        .collect();
    assert!(since.iter().all(|s| s.status_type == "healthy"), "{since:#?}");
    assert_eq!(history(&agent, "web").await?.len(), 4, "no upgrade after the rollback");
    let release = operator_call(&agent, "GetRelease", &json!({"releaseName": "web"}))
        .await?
        .map_err(|stderr| anyhow::anyhow!("GetRelease failed: {stderr}"))?;
    assert_eq!(release["release"]["trackedRevision"], 4, "{release:#}");
    // ListReleases agrees: tracked and real revision equal, ready, deployed.
    let list = operator_call(&agent, "ListReleases", &json!({}))
        .await?
        .map_err(|stderr| anyhow::anyhow!("ListReleases failed: {stderr}"))?;
    let web = list["releases"]
        .as_array()
        .and_then(|releases| releases.iter().find(|r| r["releaseName"] == "web"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(web["trackedRevision"], 4, "{list:#}");
    assert_eq!(web["helmRevision"], 4, "{list:#}");
    assert_eq!(web["helmStatus"], "deployed", "{list:#}");
    assert_eq!(web["phase"], "ready", "{list:#}");
    assert_eq!(web["chart"], "operator-web-0.1.0", "{list:#}");

    // The Hub's next revision is deployed as usual, and its status no longer names a roll-back.
    let next = distr_agent_e2e::agent::revise(&current, json!({"chartVersion": "0.3.0"}));
    agent.set_deployments(vec![next.clone()]);
    let healthy = agent
        .wait_status(&revision(&next), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    assert!(
        healthy.message.starts_with("status check passed"),
        "{}",
        healthy.message
    );
    let record = tracking_record(&agent, "web").await?;
    assert!(record.get("rolledBackTo").is_none(), "{record}");
    assert_eq!(record["helmRevision"], 5, "{record}");
    Ok(())
}

/// The executor dies with its `helm` (SIGKILL of the process group) in the middle of an
/// install: the next executor takes the pending install over and the release converges to the
/// Hub's next revision, with nothing left `pending-*` (issue 7: 2e).
#[tokio::test]
async fn a_crash_during_an_install_converges() -> anyhow::Result<()> {
    let test = "crash-install";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "crash-install-web", &["0.1.0"]).await?;
    let options = json!({"timeout": "20s", "rollbackOnFailure": true, "waitStrategy": "watcher",
                         "cleanupOnFailure": true, "forceConflicts": false});
    // An install that waits (its pods never become ready).
    let v1 = distr_agent_e2e::agent::revise(
        &deployment("web", &chart, "0.1.0", json!({"neverReady": true})),
        json!({"helmOptions": options}),
    );
    agent.set_deployments(vec![v1.clone()]);
    helm_reaches(&agent, "web", "pending-install").await?;
    agent.executor.kill_group().await?;
    let crashed = std::time::Instant::now();
    let left = history(&agent, "web").await?;
    assert!(
        left.iter().any(|(_, status, _)| status == "pending-install"),
        "the crash left the install pending: {left:#?}"
    );
    assert_eq!(tracking_record(&agent, "web").await?["phase"], "progressing");

    // Meanwhile the Hub wants a revision that works; the next executor gets there.
    let v2 = distr_agent_e2e::agent::revise(&v1, json!({"values": {"message": "two"}}));
    agent.set_deployments(vec![v2.clone()]);
    agent.start_executor_again().await?;
    let running = wait_for("the next revision deployed", 5 * MINUTE, || async {
        agent
            .statuses(&revision(&v2))
            .into_iter()
            .find(|s| s.status_type == "running" && s.message.ends_with("succeeded"))
    })
    .await?;
    eprintln!(
        "crashed install (helm timeout 20s) converged {:?} after the crash: {}",
        crashed.elapsed(),
        running.message
    );
    agent
        .wait_status(&revision(&v2), "healthy", "status check passed", MINUTE)
        .await?;
    let end = history(&agent, "web").await?;
    let latest = end.iter().max_by_key(|(revision, _, _)| *revision).cloned();
    assert_eq!(
        latest.map(|(_, status, _)| status).as_deref(),
        Some("deployed"),
        "{end:#?}"
    );
    let record = tracking_record(&agent, "web").await?;
    assert_eq!(record["revisionId"], v2["revisionId"], "{record}");
    assert_eq!(record["phase"], "ready", "{record}");
    assert_eq!(
        deployment_annotation(&agent, "web-web", false, "distr.test/message")
            .await?
            .as_deref(),
        Some("two")
    );
    Ok(())
}

/// The executor dies with its `helm` in the middle of an uninstall (held up by a finalizer on
/// the release's Deployment): the next executor finishes it: the release, its tracking Secret
/// and its pull Secret are gone (issue 7: 2e).
#[tokio::test]
async fn a_crash_during_an_uninstall_converges() -> anyhow::Result<()> {
    let test = "crash-uninstall";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "crash-uninstall-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    let other = deployment("other", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone(), other.clone()]);
    for d in [&web, &other] {
        agent
            .wait_status(&revision(d), "healthy", "status check passed", 2 * MINUTE)
            .await?;
    }
    let workloads = agent.ns.api::<k8s_openapi::api::apps::v1::Deployment>();
    let hold = json!({"metadata": {"finalizers": ["distr.test/hold"]}});
    workloads
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&hold))
        .await?;

    agent.set_deployments(vec![other.clone()]);
    helm_reaches(&agent, "web", "uninstalling").await?;
    agent.executor.kill_group().await?;
    let crashed = std::time::Instant::now();
    assert!(
        helm_releases(&agent).await?.contains(&"web".to_owned()),
        "the crash left the uninstall unfinished"
    );
    let release = json!({"metadata": {"finalizers": null}});
    workloads
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&release))
        .await?;

    agent.start_executor_again().await?;
    wait_for("the uninstall finished", 3 * MINUTE, || async {
        let names = agent.secret_names().await.ok()?;
        let gone = !helm_releases(&agent).await.ok()?.contains(&"web".to_owned())
            && !names.contains(&tracking_secret("web"))
            && !names.contains(&format!("{}.pull", tracking_secret("web")))
            && !names.iter().any(|name| name.starts_with("sh.helm.release.v1.web."));
        gone.then_some(())
    })
    .await?;
    eprintln!("crashed uninstall converged {:?} after the crash", crashed.elapsed());
    assert!(
        workloads.get_opt("web-web").await?.is_none(),
        "the release's workload is gone"
    );
    // The other release was never touched.
    assert_eq!(history(&agent, "other").await?.len(), 1);
    let restarted = chrono::Utc::now();
    wait_for("a fresh healthy status of other", MINUTE, || async {
        agent
            .statuses(&revision(&other))
            .into_iter()
            .find(|s| s.received_at > restarted && s.status_type == "healthy")
    })
    .await?;
    Ok(())
}

/// A SIGTERM during an install stops Helm gracefully: nothing is left `pending-*`, and the next
/// executor deploys the Hub's revision at once, without waiting out a pending revision (issue
/// 7: 2e with SIGTERM).
#[tokio::test]
async fn a_shutdown_during_an_install_is_redone_by_the_next_executor() -> anyhow::Result<()> {
    let test = "graceful-install";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "graceful-install-web", &["0.1.0"]).await?;
    let options = json!({"timeout": "60s", "rollbackOnFailure": true, "waitStrategy": "watcher",
                         "cleanupOnFailure": true, "forceConflicts": false});
    let v1 = distr_agent_e2e::agent::revise(
        &deployment("web", &chart, "0.1.0", json!({"neverReady": true})),
        json!({"helmOptions": options}),
    );
    agent.set_deployments(vec![v1.clone()]);
    helm_reaches(&agent, "web", "pending-install").await?;
    let (code, took) = agent.executor.terminate(MINUTE).await?;
    eprintln!("executor stopped {took:?} after SIGTERM during an install");
    assert_eq!(code, Some(0), "{}", agent.executor.log_text());
    // Helm's `--rollback-on-failure` may have removed the release: `helm ls` shows it in any
    // other state (Helm 4 lists every status).
    let after_stop = agent.helm_json(&["ls"]).await?;
    assert!(
        after_stop
            .as_array()
            .into_iter()
            .flatten()
            .all(|release| !release["status"].as_str().unwrap_or_default().starts_with("pending")),
        "nothing left pending: {after_stop:#}"
    );

    let v2 = distr_agent_e2e::agent::revise(&v1, json!({"values": {"message": "two"}}));
    agent.set_deployments(vec![v2.clone()]);
    let restarted = std::time::Instant::now();
    agent.start_executor_again().await?;
    // The install's own status, or already the health that follows it: a quick install
    // may be healthy by the time the poller reads the statuses again.
    let running = wait_for("the next revision deployed", 2 * MINUTE, || async {
        agent
            .statuses(&revision(&v2))
            .into_iter()
            .find(|s| (s.status_type == "running" && s.message.ends_with("succeeded")) || s.status_type == "healthy")
    })
    .await?;
    eprintln!(
        "install redone {:?} after the restart: {}",
        restarted.elapsed(),
        running.message
    );
    assert!(
        restarted.elapsed() < Duration::from_secs(45),
        "{:?}",
        restarted.elapsed()
    );
    agent
        .wait_status(&revision(&v2), "healthy", "status check passed", MINUTE)
        .await?;
    let end = history(&agent, "web").await?;
    let latest = end.iter().max_by_key(|(revision, _, _)| *revision).cloned();
    assert_eq!(
        latest.map(|(_, status, _)| status).as_deref(),
        Some("deployed"),
        "{end:#?}"
    );
    // While the executor was down the poller truthfully reports it unreachable for the Hub's
    // revision (when a cycle falls in that gap); no other error may come from the redo.
    let errors: Vec<_> = agent
        .statuses(&revision(&v2))
        .into_iter()
        .filter(|s| s.status_type == "error" && !s.message.starts_with("agent executor unreachable"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    Ok(())
}

/// A SIGTERM during an uninstall (held up by a finalizer on the release's Deployment): the
/// executor stops in time, and the next one finishes the uninstall (issue 7: 2e with SIGTERM).
#[tokio::test]
async fn a_shutdown_during_an_uninstall_is_finished_by_the_next_executor() -> anyhow::Result<()> {
    let test = "graceful-uninstall";
    let mut agent = Agent::start(test, AgentOptions::default()).await?;
    let chart = push_web_chart(test, "graceful-uninstall-web", &["0.1.0"]).await?;
    let web = deployment("web", &chart, "0.1.0", json!({}));
    agent.set_deployments(vec![web.clone()]);
    agent
        .wait_status(&revision(&web), "healthy", "status check passed", 2 * MINUTE)
        .await?;
    let workloads = agent.ns.api::<k8s_openapi::api::apps::v1::Deployment>();
    let hold = json!({"metadata": {"finalizers": ["distr.test/hold"]}});
    workloads
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&hold))
        .await?;
    agent.set_deployments(vec![]);
    helm_reaches(&agent, "web", "uninstalling").await?;
    let (code, took) = agent.executor.terminate(MINUTE).await?;
    eprintln!("executor stopped {took:?} after SIGTERM during an uninstall");
    assert_eq!(code, Some(0), "{}", agent.executor.log_text());
    assert!(
        helm_releases(&agent).await?.contains(&"web".to_owned()),
        "the uninstall was cut short"
    );
    let release = json!({"metadata": {"finalizers": null}});
    workloads
        .patch("web-web", &PatchParams::default(), &Patch::Merge(&release))
        .await?;

    let restarted = std::time::Instant::now();
    agent.start_executor_again().await?;
    wait_for("the uninstall finished", 2 * MINUTE, || async {
        let names = agent.secret_names().await.ok()?;
        let gone = !helm_releases(&agent).await.ok()?.contains(&"web".to_owned())
            && !names.contains(&tracking_secret("web"))
            && !names.contains(&format!("{}.pull", tracking_secret("web")))
            && !names.iter().any(|name| name.starts_with("sh.helm.release.v1.web."));
        gone.then_some(())
    })
    .await?;
    eprintln!("uninstall finished {:?} after the restart", restarted.elapsed());
    assert!(workloads.get_opt("web-web").await?.is_none());
    Ok(())
}
