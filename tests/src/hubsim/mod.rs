//! Hub simulator: a real HTTP server (axum on `127.0.0.1:0`) speaking the Hub side of
//! `hub-protocol.md`, for tests.
//!
//! - Targets with secrets ([`HubSim::add_target`], [`HubSim::set_secret`], [`HubSim::revoke`]).
//! - Login with Basic auth issuing HS256 JWTs (`exp`, `nbf`, `iat`, `sub`, `aud`, `org`, `jti`)
//!   of a configurable lifetime; 401 for a wrong secret, 400 for an id that is not a UUID, 429
//!   past the login rate limit. Every other route verifies the JWT (401 if expired, forged or
//!   revoked).
//! - Resources per target (agent version, namespace, deployments as raw JSON) that the test
//!   changes at any time; a manifest per target.
//! - Every request recorded in order ([`HubSim::requests`], [`HubSim::statuses`], ...). Status
//!   posts for a revision id the target never had answer 400; log routes answer 204.
//! - Failure switches ([`Failure`]) for one route or all: an HTTP status, a stall, malformed
//!   JSON, an oversized or truncated body, an empty deployment list.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use distr_agent_e2e::hubsim::{Failure, HubSim, HubSimOptions};
//! let sim = HubSim::start(HubSimOptions::default()).await?;
//! let (target, secret) = sim.add_target();
//! let env = sim.env(target, &secret); // DISTR_* for the poller
//! sim.set_deployments(target, vec![serde_json::json!({"id": "...", "revisionId": "..."})]);
//! sim.fail_resources(Failure::Status(500));
//! # Ok(()) }
//! ```

pub mod admin;
mod jwt;
mod routes;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::watch;
use uuid::Uuid;

pub use jwt::{AUDIENCE, Claims, JwtError};
use state::{Armed, SimState, Target};

/// A request budget: at most `max` requests per sliding window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub max: u32,
    /// The window.
    pub per: Duration,
}

/// How the simulator starts.
#[derive(Debug, Clone)]
pub struct HubSimOptions {
    /// Lifetime of issued tokens. Default 60 s.
    pub token_lifetime: Duration,
    /// Logins per target (per claimed id). Default 5 per minute, as the Hub; `None`: unlimited.
    pub login_rate_limit: Option<RateLimit>,
    /// Calls per target on the other routes. Default `None` (the Hub allows about 500 per
    /// minute; set it to test rate limiting).
    pub agent_rate_limit: Option<RateLimit>,
}

impl Default for HubSimOptions {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(60),
            login_rate_limit: Some(RateLimit {
                max: 5,
                per: Duration::from_secs(60),
            }),
            agent_rate_limit: None,
        }
    }
}

/// The Hub routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /api/v1/agent/login`
    Login,
    /// `GET /api/v1/agent/resources`
    Resources,
    /// `POST /api/v1/agent/status`
    Status,
    /// `GET /api/v1/agent/manifest`
    Manifest,
    /// `POST /api/v1/agent/metrics`
    Metrics,
    /// `PUT /api/v1/agent/logs`
    Logs,
    /// `PUT /api/v1/agent/deployment-target-logs`
    AgentLogs,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 7] = [
        Route::Login,
        Route::Resources,
        Route::Status,
        Route::Manifest,
        Route::Metrics,
        Route::Logs,
        Route::AgentLogs,
    ];

    /// The URL path.
    pub fn path(self) -> &'static str {
        match self {
            Route::Login => "/api/v1/agent/login",
            Route::Resources => "/api/v1/agent/resources",
            Route::Status => "/api/v1/agent/status",
            Route::Manifest => "/api/v1/agent/manifest",
            Route::Metrics => "/api/v1/agent/metrics",
            Route::Logs => "/api/v1/agent/logs",
            Route::AgentLogs => "/api/v1/agent/deployment-target-logs",
        }
    }

    /// The `DISTR_*` variable holding the route's URL.
    pub fn env_var(self) -> &'static str {
        match self {
            Route::Login => "DISTR_LOGIN_ENDPOINT",
            Route::Resources => "DISTR_RESOURCE_ENDPOINT",
            Route::Status => "DISTR_STATUS_ENDPOINT",
            Route::Manifest => "DISTR_MANIFEST_ENDPOINT",
            Route::Metrics => "DISTR_METRICS_ENDPOINT",
            Route::Logs => "DISTR_LOGS_ENDPOINT",
            Route::AgentLogs => "DISTR_AGENT_LOGS_ENDPOINT",
        }
    }
}

/// What a failure switch does to a request. Body failures (malformed, oversized, truncated)
/// replace the body of what would have been a 200 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Answer this HTTP status (with a short text body) without looking at the request.
    Status(u16),
    /// Hold the request for the duration, then answer normally. `None` holds it until the
    /// failure switches change (or the simulator is dropped).
    Stall(Option<Duration>),
    /// Answer 200 with a body that is not valid JSON.
    MalformedJson,
    /// Answer 200 with this many bytes, streamed without `Content-Length`.
    Oversized(usize),
    /// Announce a `Content-Length` larger than what is sent (half the real body), then break
    /// the connection.
    Truncated,
    /// Resources only: answer `"deployments": []` while keeping the configured list.
    EmptyDeployments,
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// Position in arrival order, from 0.
    pub seq: usize,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// The route.
    pub route: Route,
    /// The target: from a valid bearer token, or the Basic-auth user of a login.
    pub target: Option<Uuid>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
    /// The body, if it is JSON.
    pub body: Option<Value>,
    /// The status answered (`None` while the request is in flight).
    pub status: Option<u16>,
}

/// One `POST /status` with a parsable body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedStatus {
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// The target (from the token).
    pub target: Option<Uuid>,
    /// `revisionId`.
    pub revision_id: String,
    /// `type`.
    pub status_type: String,
    /// `message`.
    pub message: String,
    /// The status answered: 200 accepted, 400 unknown revision, ...
    pub http_status: Option<u16>,
}

impl RecordedStatus {
    /// Whether the simulator accepted it (200).
    pub fn accepted(&self) -> bool {
        self.http_status == Some(200)
    }
}

/// What the router and the test handle share.
pub(crate) struct Shared {
    state: Mutex<SimState>,
    /// HS256 signing key, random per simulator.
    key: Vec<u8>,
    org_id: Uuid,
    /// Bumped whenever the failure switches change (and on drop), to release stalls.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }
}

/// A running Hub simulator. Dropping it stops the server.
pub struct HubSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for HubSim {
    fn drop(&mut self) {
        self.server.abort();
        // Release requests stalled "forever".
        self.shared.bump();
    }
}

impl std::fmt::Debug for HubSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSim")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HubSim {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start(options: HubSimOptions) -> anyhow::Result<HubSim> {
        Self::start_on("127.0.0.1", options).await
    }

    /// Binds `<ip>:0` (the real node's pods reach the host at its bridge address) and serves
    /// until dropped.
    pub async fn start_on(ip: &str, options: HubSimOptions) -> anyhow::Result<HubSim> {
        let key: Vec<u8> = Uuid::new_v4()
            .as_bytes()
            .iter()
            .chain(Uuid::new_v4().as_bytes())
            .copied()
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(SimState {
                targets: Default::default(),
                token_lifetime: options.token_lifetime,
                login_rate_limit: options.login_rate_limit,
                agent_rate_limit: options.agent_rate_limit,
                login_limiter: Default::default(),
                agent_limiter: Default::default(),
                failures: HashMap::new(),
                requests: Vec::new(),
            }),
            key,
            org_id: Uuid::new_v4(),
            changes: watch::Sender::new(0),
        });
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let app = routes::router(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "hub simulator stopped");
            }
        });
        tracing::info!(%addr, "hub simulator listening");
        Ok(HubSim { addr, shared, server })
    }

    /// `http://<ip>:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The full URL of a route.
    pub fn url(&self, route: Route) -> String {
        format!("{}{}", self.base_url(), route.path())
    }

    /// The `DISTR_*_ENDPOINT` variables.
    pub fn endpoint_env(&self) -> HashMap<String, String> {
        Route::ALL
            .into_iter()
            .map(|route| (route.env_var().to_owned(), self.url(route)))
            .collect()
    }

    /// The endpoint variables plus `DISTR_TARGET_ID` and `DISTR_TARGET_SECRET`.
    pub fn env(&self, target: Uuid, secret: &str) -> HashMap<String, String> {
        let mut env = self.endpoint_env();
        env.insert("DISTR_TARGET_ID".to_owned(), target.to_string());
        env.insert("DISTR_TARGET_SECRET".to_owned(), secret.to_owned());
        env
    }

    /// The organization id put in every token.
    pub fn org_id(&self) -> Uuid {
        self.shared.org_id
    }

    // ----- targets -------------------------------------------------------------------------

    /// Creates a target with a random secret; returns its id and secret.
    pub fn add_target(&self) -> (Uuid, String) {
        let id = Uuid::new_v4();
        let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        if let Some(env) = crate::TestEnv::try_get() {
            env.record_secret(&secret);
        }
        self.shared.lock().targets.insert(id, Target::new(secret.clone()));
        (id, secret)
    }

    /// A target's current secret (to check that it never reaches a log).
    pub fn secret_of(&self, target: Uuid) -> Option<String> {
        self.shared.lock().targets.get(&target).and_then(|t| t.secret.clone())
    }

    /// Rotates a target's secret. Tokens already issued stay valid, as on the Hub.
    pub fn set_secret(&self, target: Uuid, secret: &str) {
        self.with_target(target, |t| t.secret = Some(secret.to_owned()));
    }

    /// Revokes a target's secret and every token issued so far: logins and calls answer 401
    /// until [`HubSim::set_secret`] gives it a new secret.
    pub fn revoke(&self, target: Uuid) {
        self.with_target(target, |t| {
            t.secret = None;
            t.revoked.extend(t.issued.iter().cloned());
        });
    }

    /// Revokes every token issued so far to `target`, keeping its secret.
    pub fn revoke_tokens(&self, target: Uuid) {
        self.with_target(target, |t| t.revoked.extend(t.issued.iter().cloned()));
    }

    /// A validly signed token for `target` expiring `lifetime_secs` from now (negative for an
    /// expired one), without a login.
    pub fn mint_token(&self, target: Uuid, lifetime_secs: i64) -> String {
        let shared = &self.shared;
        let mut state = shared.lock();
        let target_state = state
            .targets
            .get_mut(&target)
            .unwrap_or_else(|| panic!("unknown hub-sim target {target}"));
        shared.issue(target_state, target, lifetime_secs)
    }

    /// Changes the lifetime of tokens issued from now on.
    /// Makes every login of `target` answer `token` (from [`HubSim::mint_token`]), so a test
    /// can know the JWT the agent will hold, e.g. to use it as a registry password.
    pub fn set_fixed_token(&self, target: Uuid, token: Option<String>) {
        self.with_target(target, |t| t.fixed_token = token);
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = lifetime;
    }

    /// Changes the login rate limit (`None`: unlimited).
    pub fn set_login_rate_limit(&self, limit: Option<RateLimit>) {
        self.shared.lock().login_rate_limit = limit;
    }

    /// Changes the rate limit of the other routes (`None`: unlimited).
    pub fn set_agent_rate_limit(&self, limit: Option<RateLimit>) {
        self.shared.lock().agent_rate_limit = limit;
    }

    // ----- resources -----------------------------------------------------------------------

    /// Replaces the target's deployments (raw JSON, sent as given). Their `revisionId`s join
    /// the ones statuses may be reported for.
    pub fn set_deployments(&self, target: Uuid, deployments: Vec<Value>) {
        self.with_target(target, |t| t.set_deployments(deployments));
    }

    /// The deployments currently configured.
    pub fn deployments(&self, target: Uuid) -> Vec<Value> {
        self.with_target(target, |t| t.deployments.clone())
    }

    /// Sets `namespace` (`None`: the field is left out).
    pub fn set_namespace(&self, target: Uuid, namespace: Option<&str>) {
        self.with_target(target, |t| t.namespace = namespace.map(str::to_owned));
    }

    /// Sets `version` (the agent version the Hub wants the target to run).
    pub fn set_agent_version(&self, target: Uuid, id: Uuid, name: &str) {
        self.with_target(target, |t| {
            t.version_id = id;
            t.version_name = name.to_owned();
            t.version_created_at = Utc::now();
        });
    }

    /// The `version.id` currently announced.
    pub fn agent_version_id(&self, target: Uuid) -> Uuid {
        self.with_target(target, |t| t.version_id)
    }

    /// Sets `metricsEnabled`.
    pub fn set_metrics_enabled(&self, target: Uuid, enabled: bool) {
        self.with_target(target, |t| t.metrics_enabled = enabled);
    }

    /// Sets `deploymentLogsEnabled` and `deploymentLogsAfter`.
    pub fn set_deployment_logs(&self, target: Uuid, enabled: bool, after: Option<DateTime<Utc>>) {
        self.with_target(target, |t| {
            t.deployment_logs_enabled = enabled;
            t.deployment_logs_after = after;
        });
    }

    /// Extra top-level fields merged into the resources answer (e.g. unknown or Docker-only
    /// fields); they override the regular ones.
    pub fn set_extra_fields(&self, target: Uuid, fields: Map<String, Value>) {
        self.with_target(target, |t| t.extra_fields = fields);
    }

    /// The YAML answered by the manifest route (404 until set).
    pub fn set_manifest(&self, target: Uuid, yaml: &str) {
        self.with_target(target, |t| t.manifest = Some(yaml.to_owned()));
    }

    // ----- failure switches ----------------------------------------------------------------

    /// Applies `failure` to every request on `route` until cleared.
    pub fn fail(&self, route: Route, failure: Failure) {
        self.arm(Some(route), failure, None);
    }

    /// Applies `failure` to the next `times` requests on `route`.
    pub fn fail_times(&self, route: Route, failure: Failure, times: u32) {
        if times > 0 {
            self.arm(Some(route), failure, Some(times));
        }
    }

    /// Applies `failure` to the resources route until cleared.
    pub fn fail_resources(&self, failure: Failure) {
        self.fail(Route::Resources, failure);
    }

    /// Applies `failure` to every route (login included) until cleared; it takes precedence
    /// over per-route switches.
    pub fn fail_all(&self, failure: Failure) {
        self.arm(None, failure, None);
    }

    /// Clears the switch of one route.
    pub fn clear_failure(&self, route: Route) {
        self.shared.lock().failures.remove(&Some(route));
        self.shared.bump();
    }

    /// Clears every failure switch (and releases requests stalled until then).
    pub fn clear_failures(&self) {
        self.shared.lock().failures.clear();
        self.shared.bump();
    }

    fn arm(&self, route: Option<Route>, failure: Failure, remaining: Option<u32>) {
        self.shared.lock().failures.insert(route, Armed { failure, remaining });
        self.shared.bump();
    }

    // ----- records -------------------------------------------------------------------------

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The requests on one route.
    pub fn requests_on(&self, route: Route) -> Vec<RecordedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.route == route)
            .cloned()
            .collect()
    }

    /// Login attempts claiming `target`.
    pub fn logins(&self, target: Uuid) -> Vec<RecordedRequest> {
        self.requests_on(Route::Login)
            .into_iter()
            .filter(|r| r.target == Some(target))
            .collect()
    }

    /// Every status post with a parsable body, in order.
    pub fn statuses(&self) -> Vec<RecordedStatus> {
        self.requests_on(Route::Status)
            .into_iter()
            .filter_map(|request| {
                let body = request.body?;
                let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
                Some(RecordedStatus {
                    received_at: request.received_at,
                    target: request.target,
                    revision_id: text("revisionId")?,
                    status_type: text("type")?,
                    message: text("message").unwrap_or_default(),
                    http_status: request.status,
                })
            })
            .collect()
    }

    /// The status posts of one target.
    pub fn statuses_for(&self, target: Uuid) -> Vec<RecordedStatus> {
        self.statuses()
            .into_iter()
            .filter(|s| s.target == Some(target))
            .collect()
    }

    /// The latest accepted status of each revision id.
    pub fn latest_statuses(&self, target: Uuid) -> HashMap<String, RecordedStatus> {
        let mut latest = HashMap::new();
        for status in self.statuses_for(target).into_iter().filter(RecordedStatus::accepted) {
            latest.insert(status.revision_id.clone(), status);
        }
        latest
    }

    /// Every deployment log entry accepted so far, in order.
    pub fn logs(&self) -> Vec<Value> {
        self.accepted_entries(Route::Logs)
    }

    /// Every agent log entry accepted so far, in order.
    pub fn agent_logs(&self) -> Vec<Value> {
        self.accepted_entries(Route::AgentLogs)
    }

    /// Every accepted metrics body, in order.
    pub fn metrics(&self) -> Vec<Value> {
        self.requests_on(Route::Metrics)
            .into_iter()
            .filter(|r| r.status == Some(200))
            .filter_map(|r| r.body)
            .collect()
    }

    fn accepted_entries(&self, route: Route) -> Vec<Value> {
        self.requests_on(route)
            .into_iter()
            .filter(|r| r.status == Some(204))
            .filter_map(|r| match r.body {
                Some(Value::Array(entries)) => Some(entries),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Computes something from the request log without copying it (it grows long in the
    /// benchmark).
    pub fn with_requests<T>(&self, f: impl FnOnce(&[RecordedRequest]) -> T) -> T {
        f(&self.shared.lock().requests)
    }

    /// Waits until `check` holds for the request log, polling.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[RecordedRequest]) -> bool,
    ) -> anyhow::Result<()> {
        crate::wait::wait_for(what, timeout, || {
            let holds = check(&self.shared.lock().requests);
            async move { holds.then_some(()) }
        })
        .await
    }

    fn with_target<T>(&self, target: Uuid, f: impl FnOnce(&mut Target) -> T) -> T {
        let mut state = self.shared.lock();
        let target_state = state
            .targets
            .get_mut(&target)
            .unwrap_or_else(|| panic!("unknown hub-sim target {target}"));
        f(target_state)
    }
}

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod tests;
