//! The engine's decisions, over the Kubernetes API as the updater's client speaks it (a
//! fake HTTP API that answers what the updater's Role allows) and over the in-memory
//! [`FakeObjects`].

use agent_runtime::sync::MutexExt as _;
use chrono::Utc;
use k8s_openapi::ByteString;
use serde_json::json;

use super::*;
use crate::{
    apply::{APPLIED_BY, APPLIED_BY_VALUE, labelled},
    cluster::{
        Kube,
        fake::{Call, FakeObjects},
    },
    state::{MAX_STATE_BYTES, STATE_MISSING, STATE_SECRET},
};

const PART_OF: &str = "app.kubernetes.io/part-of";

/// A Kubernetes API answering from `answer(method, path, dry_run)`; every request is
/// recorded. What the updater's Role (`deploy/manifest.yaml.tmpl`) does not allow is
/// refused with 403 before `answer` is asked, as the real API server would.
struct FakeApi {
    client: kube::Client,
    requests: Arc<Mutex<Vec<(String, String, Value)>>>,
}

type Answer = dyn Fn(&str, &str, bool) -> (u16, Value) + Send + Sync;
type Delay = dyn Fn(&str, &str, bool) -> Duration + Send + Sync;

/// Whether the updater's Role and ClusterRole allow `method` on `path`.
fn role_allows(method: &str, path: &str) -> bool {
    let verb = match method {
        "GET" => "get",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" => "delete",
        "POST" => "create",
        _ => return false,
    };
    let mut segments = path.rsplit('/');
    let (Some(name), Some(resource)) = (segments.next(), segments.next()) else {
        return false;
    };
    let (names, verbs): (&[&str], &[&str]) = match resource {
        "deployments" => (
            &["distr-agent", "distr-agent-executor", "distr-agent-updater"],
            &["get", "patch", "update"],
        ),
        "configmaps" => (&["distr-agent-env"], &["get", "patch", "update"]),
        "services" => (
            &["distr-agent-executor", "distr-agent-updater"],
            &["get", "patch", "update", "delete"],
        ),
        "serviceaccounts" => (
            &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
            &["get", "patch", "update"],
        ),
        "networkpolicies" => (
            &["distr-agent-poller", "distr-agent-executor", "distr-agent-updater"],
            &["get", "patch", "update", "delete"],
        ),
        "secrets" if name == STATE_SECRET => (&[STATE_SECRET], &["get", "patch", "update"]),
        "secrets" => (&["distr-agent-image-pull"], &["get", "patch"]),
        "roles" | "rolebindings" | "clusterroles" | "clusterrolebindings" => (&[name], &["get"]),
        "validatingadmissionpolicies" | "validatingadmissionpolicybindings" => (&[name], &["get"]),
        _ => return false,
    };
    names.contains(&name) && verbs.contains(&verb)
}

fn fake_api(answer: impl Fn(&str, &str, bool) -> (u16, Value) + Send + Sync + 'static) -> FakeApi {
    fake_api_delayed(answer, |_, _, _| Duration::ZERO)
}

/// The same, each answer given after `delay(method, path, dry_run)`.
fn fake_api_delayed(
    answer: impl Fn(&str, &str, bool) -> (u16, Value) + Send + Sync + 'static,
    delay: impl Fn(&str, &str, bool) -> Duration + Send + Sync + 'static,
) -> FakeApi {
    let answer: Arc<Answer> = Arc::new(answer);
    let delay: Arc<Delay> = Arc::new(delay);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let recorded = requests.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let (answer, delay) = (answer.clone(), delay.clone());
        let recorded = recorded.clone();
        async move {
            let method = request.method().to_string();
            let path = request.uri().path().to_owned();
            let dry_run = request.uri().query().unwrap_or_default().contains("dryRun=All");
            let body = request.into_body().collect_bytes().await.unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            recorded.locked().push((
                method.clone(),
                if dry_run {
                    format!("{path} (dry run)")
                } else {
                    path.clone()
                },
                body,
            ));
            tokio::time::sleep(delay(&method, &path, dry_run)).await;
            let (code, answer) = if role_allows(&method, &path) {
                answer(&method, &path, dry_run)
            } else {
                status(403)
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(
                        serde_json::to_vec(&answer).unwrap_or_default(),
                    ))
                    .expect("a response"),
            )
        }
    });
    FakeApi {
        client: kube::Client::new(service, "agent"),
        requests,
    }
}

fn status(code: u16) -> (u16, Value) {
    let reason = match code {
        404 => "NotFound",
        403 => "Forbidden",
        409 => "Conflict",
        _ => "InternalError",
    };
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "from the fake", "reason": reason, "code": code}),
    )
}

fn dry_run_answer() -> (u16, Value) {
    (
        200,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "distr-agent"}}),
    )
}

fn engine_on(api: &FakeApi) -> Engine {
    Engine::new(
        Arc::new(Kube::new(api.client.clone(), "agent")),
        Rules {
            namespace: "agent".into(),
            image_repository: "ghcr.io/distr-sh/distr-agent".into(),
        },
        Duration::from_secs(1),
        Duration::from_millis(100),
    )
    .with_rollback_retry(Duration::from_millis(50), Duration::from_millis(200))
}

/// The poller's Deployment as the cluster has it, in the template's shape (so that a
/// roll-back's re-check passes), running `image`: rolled out when `rolled_out`.
fn poller_deployment(image: &str, rolled_out: bool) -> (u16, Value) {
    let ready = i64::from(rolled_out);
    let mut body: Value = serde_norway::from_str(MANIFEST).expect("the fixture is YAML");
    body["metadata"]["namespace"] = json!("agent");
    body["metadata"]["generation"] = json!(2);
    body["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
    body["status"] = json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
        "readyReplicas": ready, "availableReplicas": ready});
    (200, body)
}

/// Waits until the engine's phase is `phase`.
async fn wait_phase(engine: &Engine, phase: Phase) -> State {
    for _ in 0..200 {
        let state = engine.status();
        if state.phase == phase {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("phase {phase:?} not reached: {:?}", engine.status());
}

/// Every state the updater wrote to its Secret, in order.
fn written_states(api: &FakeApi) -> Vec<State> {
    api.requests
        .locked()
        .iter()
        .filter(|(method, path, _)| method == "PATCH" && path.ends_with(STATE_SECRET))
        .filter_map(|(_, _, body)| written_state(body))
        .collect()
}

/// The poller's Deployment of the template (the shape every version must keep).
const MANIFEST: &str = include_str!("../../testdata/poller-deployment.yaml");

fn state_secret(state: &State) -> (u16, Value) {
    let data = serde_json::to_value(ByteString(serde_json::to_vec(state).unwrap_or_default())).unwrap_or_default();
    (
        200,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": STATE_SECRET, "namespace": "agent", "resourceVersion": "7"},
            "data": {"state.json": data}}),
    )
}

/// The answer to a write of the state Secret.
fn written_answer() -> (u16, Value) {
    (
        200,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": STATE_SECRET, "resourceVersion": "8"}}),
    )
}

/// The state a write of the state Secret carries.
fn written_state(body: &Value) -> Option<State> {
    let bytes: ByteString = serde_json::from_value(body["data"]["state.json"].clone()).ok()?;
    serde_json::from_slice(&bytes.0).ok()
}

async fn active(engine: &Engine) -> CancellationToken {
    let shutdown = CancellationToken::new();
    tokio::spawn(engine.clone().run(shutdown.clone(), || {}));
    for _ in 0..100 {
        if engine.mode() == Mode::Active {
            return shutdown;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not active: {:?}", engine.mode());
}

#[tokio::test]
async fn no_update_is_taken_before_the_state_is_loaded_and_the_loaded_state_is_kept() {
    let stored = State {
        phase: Phase::Failed,
        target_version_id: "v9".into(),
        failed_version_ids: vec!["v9".into()],
        ..Default::default()
    };
    let api = fake_api(move |method, path, _| match (method, path.ends_with(STATE_SECRET)) {
        ("GET", true) => state_secret(&stored),
        _ => status(500),
    });
    let engine = engine_on(&api);
    let early = engine.start(MANIFEST.into(), "v10".into()).await;
    assert!(matches!(early, Err(StartError::NotReady(_))), "{early:?}");
    let shutdown = active(&engine).await;
    let again = engine.start(MANIFEST.into(), "v9".into()).await;
    assert!(matches!(again, Err(StartError::FailedBefore(_))), "{again:?}");
    assert_eq!(engine.status().failed_version_ids, ["v9"]);
    shutdown.cancel();
}

#[tokio::test]
async fn an_attempt_that_cannot_read_or_record_ends_failed_and_is_tried_again() {
    // The read before the first write fails.
    let api = fake_api(|method, path, dry_run| match (method, path.ends_with(STATE_SECRET)) {
        _ if dry_run => dry_run_answer(),
        ("GET", true) => state_secret(&State::default()),
        ("PATCH", true) => written_answer(),
        _ => status(500),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let started = engine.start(MANIFEST.into(), "v2".into()).await;
    assert!(matches!(started, Err(StartError::Cluster(_))), "{started:?}");
    let state = engine.status();
    assert_eq!(state.phase, Phase::Failed, "{state:?}");
    assert!(state.message.contains("tried again"), "{}", state.message);
    assert!(
        state.failed_version_ids.is_empty(),
        "a transient error blacklists nothing"
    );
    shutdown.cancel();

    // The state cannot be recorded before the first write.
    let api = fake_api(|method, path, dry_run| match method {
        _ if dry_run => dry_run_answer(),
        "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
        "GET" => status(404),
        _ => status(500),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let started = engine.start(MANIFEST.into(), "v2".into()).await;
    assert!(matches!(started, Err(StartError::Cluster(_))), "{started:?}");
    assert_eq!(engine.status().phase, Phase::Failed);
    assert!(engine.status().failed_version_ids.is_empty());
    let writes: Vec<String> = api
        .requests
        .locked()
        .iter()
        .filter(|(method, path, _)| method == "PATCH" && !path.ends_with(STATE_SECRET) && !path.ends_with("(dry run)"))
        .map(|(_, path, _)| path.clone())
        .collect();
    assert!(writes.is_empty(), "nothing applied: {writes:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_transient_error_comparing_rbac_is_no_refusal() {
    let manifest = format!(
        "{MANIFEST}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: distr-agent\nrules: []\n"
    );
    let api = fake_api(|method, path, _| match (method, path.ends_with(STATE_SECRET)) {
        ("GET", true) => state_secret(&State::default()),
        ("PATCH", true) => written_answer(),
        _ => status(503),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let started = engine.start(manifest, "v2".into()).await;
    assert!(matches!(started, Err(StartError::Cluster(_))), "{started:?}");
    let state = engine.status();
    assert_eq!(state.phase, Phase::Failed);
    assert!(state.failed_version_ids.is_empty(), "not blacklisted: {state:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn another_live_updater_is_left_alone_until_its_heartbeat_stops() {
    let holder = Arc::new(Mutex::new(State {
        phase: Phase::Waiting,
        target_version_id: "v2".into(),
        holder: "other-pod/1".into(),
        heartbeat: Some(Utc::now()),
        manifest: MANIFEST.into(),
        ..Default::default()
    }));
    let stored = holder.clone();
    let api = fake_api(move |method, path, _| match (method, path.ends_with(STATE_SECRET)) {
        ("GET", true) => state_secret(&stored.locked()),
        ("PATCH", true) => written_answer(),
        _ => status(404),
    });
    let engine = engine_on(&api);
    let shutdown = CancellationToken::new();
    tokio::spawn(engine.clone().run(shutdown.clone(), || {}));
    // The other updater renews its heartbeat: this one stands by and takes nothing.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder.locked().heartbeat = Some(Utc::now());
        assert_eq!(engine.mode(), Mode::Standby("other-pod/1".into()));
    }
    let refused = engine.start(MANIFEST.into(), "v3".into()).await;
    assert!(matches!(refused, Err(StartError::NotReady(_))), "{refused:?}");
    let written = |api: &FakeApi| {
        api.requests
            .locked()
            .iter()
            .filter(|(method, _, _)| method != "GET")
            .count()
    };
    assert_eq!(written(&api), 0, "a standby writes nothing");
    // The heartbeat stops: after three periods this one takes the update over.
    for _ in 0..20 {
        if engine.mode() == Mode::Active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(engine.mode(), Mode::Active);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let requests = api.requests.locked().clone();
    let takeover = requests
        .iter()
        .find(|(method, _, _)| method == "PATCH")
        .expect("the take-over is written");
    let state = written_state(&takeover.2).expect("a state");
    assert_eq!(state.holder, engine.identity);
    assert_eq!(
        takeover.2["metadata"]["resourceVersion"], "7",
        "conditional on the version read"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_conflicting_write_stops_the_updater_from_acting() {
    let api = fake_api(|method, path, dry_run| match (method, path.ends_with(STATE_SECRET)) {
        _ if dry_run => dry_run_answer(),
        ("GET", true) => state_secret(&State::default()),
        ("PATCH", true) => status(409),
        _ => status(404),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let started = engine.start(MANIFEST.into(), "v2".into()).await;
    assert!(matches!(started, Err(StartError::NotReady(_))), "{started:?}");
    assert_eq!(engine.mode(), Mode::Lost);
    let applied = api
        .requests
        .locked()
        .iter()
        .any(|(method, path, _)| method == "PATCH" && path.contains("deployments") && !path.ends_with("(dry run)"));
    assert!(!applied, "nothing applied after losing the state");
    shutdown.cancel();
}

#[tokio::test]
async fn the_updater_labels_what_it_applies_and_prunes_only_that() {
    let api = fake_api(|method, path, _| match method {
        "GET" if path.ends_with("networkpolicies/distr-agent-poller") => (
            200,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "distr-agent-poller", "labels": {PART_OF: "distr-agent", APPLIED_BY: APPLIED_BY_VALUE}}}),
        ),
        "GET" if path.ends_with("networkpolicies/distr-agent-executor") => (
            200,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "distr-agent-executor", "labels": {PART_OF: "distr-agent"}}}),
        ),
        "DELETE" => (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
        _ => status(404),
    });
    let engine = engine_on(&api);
    let checked = manifest::check(MANIFEST, &engine.rules).expect("valid");
    let body = labelled(&checked.apply[0], "agent");
    assert_eq!(body["metadata"]["labels"][APPLIED_BY], APPLIED_BY_VALUE);
    assert_eq!(body["metadata"]["namespace"], "agent");
    apply::prune(&Kube::new(api.client.clone(), "agent"), &checked.apply).await;
    let deleted: Vec<String> = api
        .requests
        .locked()
        .iter()
        .filter(|(method, _, _)| method == "DELETE")
        .map(|(_, path, _)| path.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(deleted, ["distr-agent-poller"], "only what the updater applied");
}

#[tokio::test]
async fn a_manifest_the_api_server_refuses_in_a_dry_run_is_refused_whole_before_any_write() {
    let api = fake_api(
        |method, path, dry_run| match (method, path.ends_with(STATE_SECRET), dry_run) {
            ("GET", true, _) => state_secret(&State::default()),
            ("GET", _, _) => status(404),
            ("PATCH", true, false) => written_answer(),
            ("PATCH", false, true) => (
                422,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                "message": "Deployment.apps \"distr-agent\" is invalid: spec.selector: field is immutable", "code": 422}),
            ),
            _ => status(500),
        },
    );
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let started = engine.start(MANIFEST.into(), "v2".into()).await;
    assert!(
        matches!(started, Err(StartError::Refused(Refusal::DryRun { .. }))),
        "{started:?}"
    );
    let state = engine.status();
    assert_eq!(state.phase, Phase::Failed);
    assert!(state.message.contains("field is immutable"), "{}", state.message);
    assert_eq!(state.failed_version_ids, ["v2"]);
    let requests = api.requests.locked().clone();
    let state_writes: Vec<State> = requests
        .iter()
        .filter(|(method, path, _)| method == "PATCH" && path.ends_with(STATE_SECRET))
        .filter_map(|(_, _, body)| written_state(body))
        .collect();
    assert!(
        state_writes.iter().all(|s| s.phase != Phase::Applying),
        "no intent recorded, nothing applied"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn without_its_state_secret_the_updater_applies_nothing_and_says_how_to_fix_it() {
    let exists = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let present = exists.clone();
    let api = fake_api(
        move |method, path, dry_run| match (method, path.ends_with(STATE_SECRET)) {
            _ if dry_run => dry_run_answer(),
            ("GET", true) if present.load(std::sync::atomic::Ordering::SeqCst) => state_secret(&State::default()),
            ("GET", _) => status(404),
            ("PATCH", true) => written_answer(),
            ("PATCH", false) => dry_run_answer(),
            _ => status(500),
        },
    );
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let started = engine.start(MANIFEST.into(), "v2".into()).await;
    match &started {
        Err(StartError::Cluster(message)) => assert_eq!(message, STATE_MISSING),
        other => panic!("{other:?}"),
    }
    let state = engine.status();
    assert_eq!(state.phase, Phase::Failed);
    assert!(state.message.contains(STATE_MISSING), "{}", state.message);
    assert!(state.message.contains("tried again"), "{}", state.message);
    assert!(state.failed_version_ids.is_empty(), "not the version's fault");
    let written: Vec<String> = api
        .requests
        .locked()
        .iter()
        .filter(|(method, _, _)| method != "GET")
        .map(|(method, path, _)| format!("{method} {path}"))
        .collect();
    assert!(written.is_empty(), "nothing applied, nothing created: {written:?}");

    // Once the manifest was applied again, the next attempt goes ahead.
    exists.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = engine.start(MANIFEST.into(), "v2".into()).await;
    assert!(started.is_ok(), "{started:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_roll_back_restores_a_recorded_secret_with_its_data() {
    const PULL: &str = "/api/v1/namespaces/agent/secrets/distr-agent-image-pull";
    let api = fake_api(|method, path, dry_run| match method {
        _ if dry_run => dry_run_answer(),
        "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
        "GET" if path == PULL => (
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                "metadata": {"name": "distr-agent-image-pull", "namespace": "agent", "uid": "u", "resourceVersion": "3",
                    "labels": {PART_OF: "distr-agent"}},
                "data": {".dockerconfigjson": "b2xkLXB1bGwtc2VjcmV0"}}),
        ),
        // The new Deployment never rolls out (it did not exist before: deleted again).
        "GET" => status(404),
        "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
        "PATCH" => dry_run_answer(),
        "DELETE" => (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
        _ => status(500),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let manifest = format!(
        "{MANIFEST}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: distr-agent-image-pull\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: bmV3LXB1bGwtc2VjcmV0\n"
    );
    engine.start(manifest, "v2".into()).await.expect("applied");
    for _ in 0..100 {
        if engine.status().phase == Phase::Failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = engine.status();
    assert_eq!(state.phase, Phase::Failed, "{state:?}");
    assert!(
        state.message.contains("rolled back to the previous version"),
        "{}",
        state.message
    );
    let requests = api.requests.locked().clone();
    let pull_data: Vec<Value> = requests
        .iter()
        .filter(|(method, path, _)| method == "PATCH" && path == PULL)
        .map(|(_, _, body)| body["data"][".dockerconfigjson"].clone())
        .collect();
    assert_eq!(
        pull_data,
        [json!("bmV3LXB1bGwtc2VjcmV0"), json!("b2xkLXB1bGwtc2VjcmV0")],
        "applied, then restored as it was"
    );
    let restored = requests
        .iter()
        .rfind(|(method, path, _)| method == "PATCH" && path == PULL)
        .map(|(_, _, body)| body.clone())
        .unwrap_or_default();
    assert_eq!(restored["type"], "kubernetes.io/dockerconfigjson");
    assert!(restored["metadata"]["uid"].is_null() && restored["metadata"]["resourceVersion"].is_null());
    // The intent recorded before the first write holds the Secret as it was, data included.
    let intent = requests
        .iter()
        .filter(|(method, path, _)| method == "PATCH" && path.ends_with(STATE_SECRET))
        .filter_map(|(_, _, body)| written_state(body))
        .find(|s| s.phase == Phase::Applying)
        .expect("the intent");
    assert_eq!(
        intent.previous["Secret/distr-agent-image-pull"]["data"][".dockerconfigjson"],
        "b2xkLXB1bGwtc2VjcmV0"
    );
    assert!(intent.previous["Deployment/distr-agent"].is_null());
    // Neither the state's nor an object's Debug shows a Secret's data or the manifest.
    let shown = format!(
        "{state:?} {intent:?} {:?}",
        manifest::check(&intent.manifest, &engine.rules).expect("valid")
    );
    for secret in ["b2xkLXB1bGwtc2VjcmV0", "bmV3LXB1bGwtc2VjcmV0", "dockerconfigjson"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    shutdown.cancel();
}

/// The RPC that started an update may be dropped (its client gave up) once the intent is
/// recorded: the update still runs to its end, instead of staying `Applying` with nobody
/// running the gate.
#[tokio::test]
async fn an_update_whose_caller_gives_up_still_runs_to_its_end() {
    let api = fake_api_delayed(
        |method, path, dry_run| match method {
            _ if dry_run => dry_run_answer(),
            "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
            "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
            "GET" if path.ends_with("deployments/distr-agent") => {
                poller_deployment("ghcr.io/distr-sh/distr-agent/poller:0.2.0", true)
            }
            "PATCH" => dry_run_answer(),
            _ => status(404),
        },
        // The API server is slow to take the new Deployment.
        |method, path, dry_run| {
            if method == "PATCH" && path.contains("/deployments/") && !dry_run {
                Duration::from_millis(300)
            } else {
                Duration::ZERO
            }
        },
    );
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    {
        let start = engine.start(MANIFEST.into(), "v2".into());
        tokio::pin!(start);
        loop {
            tokio::select! {
                answered = &mut start => panic!("answered before the caller gave up: {answered:?}"),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if engine.status().phase == Phase::Applying {
                break;
            }
        }
        // The caller gives up here: the call is dropped.
    }
    let done = wait_phase(&engine, Phase::Done).await;
    assert!(done.message.contains("rolled out"), "{}", done.message);
    shutdown.cancel();
}

/// One object that cannot be restored at the first attempt: the roll-back says so and
/// tries again, and only once everything is back is the version recorded as failed.
#[tokio::test]
async fn a_roll_back_that_fails_part_way_is_tried_again_until_everything_is_back() {
    const OLD: &str = "ghcr.io/distr-sh/distr-agent/poller:0.1.0";
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let config_patches = Arc::new(AtomicUsize::new(0));
    let deployment_patches = Arc::new(AtomicUsize::new(0));
    let (configs, deployments) = (config_patches.clone(), deployment_patches.clone());
    let api = fake_api(move |method, path, dry_run| match method {
        _ if dry_run => dry_run_answer(),
        "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
        "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
        "GET" if path.ends_with("configmaps/distr-agent-env") => (
            200,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "distr-agent-env", "namespace": "agent"},
                "data": {"DISTR_AGENT_VERSION_ID": "v1"}}),
        ),
        // The new version (the first write) never comes up; the old one (before, and
        // restored by the later writes) does.
        "GET" if path.ends_with("deployments/distr-agent") => match deployments.load(SeqCst) {
            1 => poller_deployment("ghcr.io/distr-sh/distr-agent/poller:0.2.0", false),
            _ => poller_deployment(OLD, true),
        },
        "PATCH" if path.ends_with("deployments/distr-agent") => {
            deployments.fetch_add(1, SeqCst);
            dry_run_answer()
        }
        // The ConfigMap's restore (its second write) fails once.
        "PATCH" if path.ends_with("configmaps/distr-agent-env") => {
            if configs.fetch_add(1, SeqCst) == 1 {
                status(500)
            } else {
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distr-agent-env"}}),
                )
            }
        }
        _ => status(404),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let manifest = format!(
        "{MANIFEST}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\ndata:\n  DISTR_AGENT_VERSION_ID: v2\n"
    );
    engine.start(manifest, "v2".into()).await.expect("applied");
    let failed = wait_phase(&engine, Phase::Failed).await;
    assert!(
        failed.message.contains("rolled back to the previous version"),
        "{}",
        failed.message
    );
    assert_eq!(failed.failed_version_ids, ["v2"]);
    let states = written_states(&api);
    let retrying = states
        .iter()
        .find(|s| s.message.contains("the roll-back did not complete"))
        .expect("the failed attempt is recorded while the roll-back goes on");
    assert_eq!(retrying.phase, Phase::RollingBack, "{retrying:?}");
    assert!(retrying.failed_version_ids.is_empty(), "not failed yet: {retrying:?}");
    assert!(
        retrying.message.contains("ConfigMap distr-agent-env"),
        "{}",
        retrying.message
    );
    assert!(config_patches.load(SeqCst) >= 3, "restored at the next attempt");
    let last_image = api
        .requests
        .locked()
        .iter()
        .rfind(|(method, path, _)| method == "PATCH" && path.ends_with("deployments/distr-agent"))
        .map(|(_, _, body)| body["spec"]["template"]["spec"]["containers"][0]["image"].clone());
    assert_eq!(last_image, Some(json!(OLD)), "the previous Deployment is back");
    let deletes: Vec<String> = api
        .requests
        .locked()
        .iter()
        .filter(|(method, _, _)| method == "DELETE")
        .map(|(_, path, _)| path.clone())
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");
    shutdown.cancel();
}

/// The state holds the manifest and the objects as they were: one that would not fit in
/// its Secret is refused before any write, instead of failing every cycle.
#[tokio::test]
async fn an_update_too_large_to_record_is_refused_before_any_write() {
    let api = fake_api(|method, path, dry_run| match method {
        _ if dry_run => dry_run_answer(),
        "GET" if path.ends_with(STATE_SECRET) => state_secret(&State::default()),
        "PATCH" if path.ends_with(STATE_SECRET) => written_answer(),
        "GET" if path.ends_with("configmaps/distr-agent-env") => (
            200,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distr-agent-env"},
                "data": {"big": "x".repeat(MAX_STATE_BYTES)}}),
        ),
        _ => status(404),
    });
    let engine = engine_on(&api);
    let shutdown = active(&engine).await;
    let manifest =
        format!("{MANIFEST}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: distr-agent-env\ndata: {{}}\n");
    let started = engine.start(manifest, "v2".into()).await;
    assert!(
        matches!(started, Err(StartError::Refused(Refusal::TooLargeToRecord { .. }))),
        "{started:?}"
    );
    let state = engine.status();
    assert_eq!(state.phase, Phase::Failed);
    assert_eq!(state.failed_version_ids, ["v2"]);
    assert!(
        written_states(&api).iter().all(|s| s.phase != Phase::Applying),
        "no intent recorded"
    );
    shutdown.cancel();
}

/// An engine over `objects`, which hold the install's state Secret (empty) and the poller's
/// Deployment of version 0.1.0.
async fn engine_over(objects: &Arc<FakeObjects>) -> (Engine, CancellationToken) {
    objects.put(
        "Secret",
        STATE_SECRET,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": STATE_SECRET}}),
    );
    // The previous version: the template's poller running 0.1.0.
    let (_, previous) = poller_deployment("ghcr.io/distr-sh/distr-agent/poller:0.1.0", true);
    objects.put("Deployment", "distr-agent", previous);
    let engine = Engine::new(
        objects.clone(),
        Rules {
            namespace: "agent".into(),
            image_repository: "ghcr.io/distr-sh/distr-agent".into(),
        },
        Duration::from_millis(300),
        Duration::from_millis(100),
    )
    .with_rollback_retry(Duration::from_millis(20), Duration::from_millis(100));
    let shutdown = active(&engine).await;
    (engine, shutdown)
}

fn image(deployment: &Value) -> &str {
    deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

/// The same decision over the trait: the call that started an update is dropped after the
/// intent was recorded, while the Deployment's write is slow; the update still ends.
#[tokio::test]
async fn over_the_trait_a_cancelled_start_still_ends() {
    let objects = Arc::new(FakeObjects::default());
    objects.delay(Call::Apply, "Deployment", Duration::from_millis(200));
    objects.rollout(|_| true);
    let (engine, shutdown) = engine_over(&objects).await;
    let given_up = tokio::time::timeout(Duration::from_millis(100), engine.start(MANIFEST.into(), "v2".into())).await;
    assert!(given_up.is_err(), "answered before the caller gave up: {given_up:?}");
    assert_eq!(engine.status().phase, Phase::Applying, "the intent was recorded");
    let done = wait_phase(&engine, Phase::Done).await;
    assert!(done.failed_version_ids.is_empty());
    let deployment = objects.get_now("Deployment", "distr-agent").unwrap_or_default();
    assert_eq!(image(&deployment), "ghcr.io/distr-sh/distr-agent/poller:0.2.0");
    shutdown.cancel();
}

/// A roll-back whose first pass fails on one object stays `RollingBack`, saying so, and
/// completes on a later pass; only then is the version failed.
#[tokio::test]
async fn over_the_trait_a_partial_roll_back_is_retried_until_it_completes() {
    let objects = Arc::new(FakeObjects::default());
    // Only the previous version comes up.
    objects.rollout(|deployment| image(deployment).ends_with(":0.1.0"));
    let (engine, shutdown) = engine_over(&objects).await;
    // The Deployment's restore (its second write) fails once: the first pass does not
    // complete.
    objects.fail_once_after(Call::Apply, "Deployment", "distr-agent", 1);
    engine.start(MANIFEST.into(), "v2".into()).await.expect("applied");
    let failed = wait_phase(&engine, Phase::Failed).await;
    let states: Vec<State> = objects
        .written("Secret", STATE_SECRET)
        .iter()
        .filter_map(written_state)
        .collect();
    let retrying = states
        .iter()
        .find(|s| s.message.contains("the roll-back did not complete"))
        .expect("the incomplete roll-back is recorded");
    assert_eq!(retrying.phase, Phase::RollingBack);
    assert!(
        retrying.message.contains("Deployment distr-agent"),
        "{}",
        retrying.message
    );
    assert!(retrying.failed_version_ids.is_empty(), "not failed while retrying");
    assert!(
        failed.message.starts_with("rolled back to the previous version"),
        "{}",
        failed.message
    );
    assert_eq!(failed.failed_version_ids, ["v2"]);
    let deployment = objects.get_now("Deployment", "distr-agent").unwrap_or_default();
    assert_eq!(image(&deployment), "ghcr.io/distr-sh/distr-agent/poller:0.1.0");
    shutdown.cancel();
}
