//! [`HubClient`]: the agent side of the Hub protocol over HTTP.
//!
//! - Logs in with Basic auth (`targetId:targetSecret`) and keeps the JWT until about 30 s
//!   before its `exp`; a failed refresh keeps the old token while it is still valid.
//! - Sends `Authorization: Bearer <JWT>` and `User-Agent: DistrAgentClient/<version>` on every
//!   call; on a 401 it drops the token, logs in again and retries the call once with the same
//!   body.
//! - Reads the configuration from a [`ConfigSource`] before every call, so a rotated secret or
//!   a moved endpoint takes effect on the next call (and the next login).
//! - Bounds every call in time (connect and total timeouts) and every response body in size,
//!   while streaming.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{HubError, excerpt};
use super::metrics::HubMetrics;
use super::token::{LoginIdentity, Token, jwt_expiry};
use super::types::{AgentLogEntry, AgentMetrics, LogEntry, LoginResponse, Resources, StatusReport};
use crate::config::{
    AGENT_LOGS_ENDPOINT, ConfigError, ConfigSource, HubConfig, LOGS_ENDPOINT, METRICS_ENDPOINT, Secret,
};

/// How much of an error body is read for the excerpt.
const ERROR_BODY_PEEK: usize = 4096;

/// Tunables of [`HubClient`]; [`ClientOptions::default`] gives production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// TCP + TLS connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Whole-call timeout, from connecting until the body is read. Default 30 s.
    pub request_timeout: Duration,
    /// Log in again this long before the token expires. Default 30 s.
    pub refresh_before: Duration,
    /// After a failed login (a refresh or not), wait this long before the next one, doubling
    /// with each further failure up to `max_login_backoff`, and at least as long as a 429's
    /// `Retry-After` (the Hub allows only about 5 logins per minute). Default 10 s.
    pub refresh_retry_after: Duration,
    /// Longest wait between two failed logins. Default 5 minutes.
    pub max_login_backoff: Duration,
    /// Bound on the resources body. Default 8 MiB.
    pub max_resources_body: usize,
    /// Bound on the manifest body. Default 256 KiB, the updater's bound on a manifest (it
    /// must fit in its state Secret).
    pub max_manifest_body: usize,
    /// Bound on every other body (login, status, metrics, logs). Default 64 KiB.
    pub max_body: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            refresh_before: Duration::from_secs(30),
            refresh_retry_after: Duration::from_secs(10),
            max_login_backoff: Duration::from_secs(300),
            max_resources_body: 8 * 1024 * 1024,
            max_manifest_body: 256 * 1024,
            max_body: 64 * 1024,
        }
    }
}

/// The Hub endpoints other than login.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Resources,
    Status,
    Manifest,
    Metrics,
    Logs,
    AgentLogs,
}

impl Endpoint {
    /// The route's name in metrics.
    fn name(self) -> &'static str {
        match self {
            Endpoint::Resources => "resources",
            Endpoint::Status => "status",
            Endpoint::Manifest => "manifest",
            Endpoint::Metrics => "metrics",
            Endpoint::Logs => "logs",
            Endpoint::AgentLogs => "agent_logs",
        }
    }

    fn url(self, config: &HubConfig) -> Result<Url, ConfigError> {
        let optional = |url: &Option<Url>, name| url.clone().ok_or(ConfigError::Missing(name));
        match self {
            Endpoint::Resources => Ok(config.resource_endpoint.clone()),
            Endpoint::Status => Ok(config.status_endpoint.clone()),
            Endpoint::Manifest => Ok(config.manifest_endpoint.clone()),
            Endpoint::Metrics => optional(&config.metrics_endpoint, METRICS_ENDPOINT),
            Endpoint::Logs => optional(&config.logs_endpoint, LOGS_ENDPOINT),
            Endpoint::AgentLogs => optional(&config.agent_logs_endpoint, AGENT_LOGS_ENDPOINT),
        }
    }
}

/// A client for the Hub's agent API. Cheap to clone; clones share the token.
#[derive(Clone)]
pub struct HubClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: Arc<ConfigSource>,
    options: ClientOptions,
    user_agent: String,
    /// Held across a login, so concurrent calls wait for one login instead of each doing one.
    token: tokio::sync::Mutex<TokenSlot>,
    metrics: HubMetrics,
}

#[derive(Default)]
struct TokenSlot {
    token: Option<Token>,
    /// Set after a failed login: no login before `until`.
    backoff: Option<LoginBackoff>,
}

struct LoginBackoff {
    until: Instant,
    /// Failed logins in a row.
    failures: u32,
    /// The last failure, as displayed.
    last_error: String,
}

/// The wait after the `failures`-th failed login in a row: `first`, doubling, at most `max`,
/// and never shorter than the Hub's `Retry-After`.
pub(super) fn login_backoff(first: Duration, max: Duration, failures: u32, retry_after: Option<Duration>) -> Duration {
    let doubled = first
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    retry_after.map_or(doubled, |retry_after| doubled.max(retry_after))
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("user_agent", &self.inner.user_agent)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl HubClient {
    /// A client with the default [`ClientOptions`]. `agent_version` is the version name sent
    /// in the `User-Agent`.
    pub fn new(config: Arc<ConfigSource>, agent_version: &str) -> Result<Self, HubError> {
        Self::with_options(config, agent_version, ClientOptions::default())
    }

    /// A client with the given options.
    pub fn with_options(
        config: Arc<ConfigSource>,
        agent_version: &str,
        options: ClientOptions,
    ) -> Result<Self, HubError> {
        // Idempotent; makes the client usable even where `main` has not installed it yet.
        agent_runtime::install_crypto_provider();
        let user_agent = format!("DistrAgentClient/{agent_version}");
        let http = reqwest::Client::builder()
            .user_agent(user_agent.clone())
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .build()
            .map_err(HubError::Client)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                config,
                options,
                user_agent,
                token: tokio::sync::Mutex::new(TokenSlot::default()),
                metrics: HubMetrics::default(),
            }),
        })
    }

    /// The `User-Agent` sent on every call.
    pub fn user_agent(&self) -> &str {
        &self.inner.user_agent
    }

    /// The current configuration (re-read from the config directories if they changed).
    pub fn config(&self) -> Result<Arc<HubConfig>, HubError> {
        Ok(self.inner.config.current()?)
    }

    /// `GET DISTR_RESOURCE_ENDPOINT`.
    pub async fn resources(&self) -> Result<Resources, HubError> {
        let limit = self.inner.options.max_resources_body;
        let (path, body) = self
            .call(Endpoint::Resources, Method::GET, None, "application/json", limit)
            .await?;
        parse_json(&Method::GET, &path, &body)
    }

    /// `POST DISTR_STATUS_ENDPOINT`. A 400 means the Hub does not know the revision.
    pub async fn post_status(&self, report: &StatusReport) -> Result<(), HubError> {
        self.send_json(Endpoint::Status, Method::POST, report).await
    }

    /// `GET DISTR_MANIFEST_ENDPOINT`: the agent install manifest (multi-document YAML).
    pub async fn manifest(&self) -> Result<String, HubError> {
        let limit = self.inner.options.max_manifest_body;
        let (path, body) = self
            .call(Endpoint::Manifest, Method::GET, None, "application/yaml", limit)
            .await?;
        String::from_utf8(body).map_err(|_| HubError::Malformed {
            method: Method::GET,
            path,
            message: "the manifest is not UTF-8 text".into(),
        })
    }

    /// `POST DISTR_METRICS_ENDPOINT`.
    pub async fn post_metrics(&self, metrics: &AgentMetrics) -> Result<(), HubError> {
        self.send_json(Endpoint::Metrics, Method::POST, metrics).await
    }

    /// `PUT DISTR_LOGS_ENDPOINT`. A 400 ([`HubError::status`]) means the batch is rejected for
    /// good.
    pub async fn put_logs(&self, entries: &[LogEntry]) -> Result<(), HubError> {
        self.send_json(Endpoint::Logs, Method::PUT, entries).await
    }

    /// `PUT DISTR_AGENT_LOGS_ENDPOINT`. A 400 means the batch is rejected for good.
    pub async fn put_agent_logs(&self, entries: &[AgentLogEntry]) -> Result<(), HubError> {
        self.send_json(Endpoint::AgentLogs, Method::PUT, entries).await
    }

    /// A valid JWT, logging in first if needed (the password for the Hub's registry).
    pub async fn current_token(&self) -> Result<Secret, HubError> {
        let config = self.config()?;
        self.bearer(&config).await
    }

    async fn send_json<T: Serialize + ?Sized>(
        &self,
        endpoint: Endpoint,
        method: Method,
        body: &T,
    ) -> Result<(), HubError> {
        let body = serde_json::to_vec(body).map_err(HubError::Encode)?;
        let limit = self.inner.options.max_body;
        self.call(endpoint, method, Some(body), "application/json", limit)
            .await
            .map(drop)
    }

    /// The client's figures, to register with the process's metrics.
    pub fn metrics(&self) -> &HubMetrics {
        &self.inner.metrics
    }

    /// One authenticated call, with one re-login and retry on a 401. Returns the endpoint's
    /// path (for messages) and the body of the 2xx answer.
    async fn call(
        &self,
        endpoint: Endpoint,
        method: Method,
        body: Option<Vec<u8>>,
        accept: &'static str,
        limit: usize,
    ) -> Result<(String, Vec<u8>), HubError> {
        let started = Instant::now();
        let result = self.call_unmeasured(endpoint, method, body, accept, limit).await;
        self.inner.metrics.observe(endpoint.name(), &result, started.elapsed());
        result
    }

    async fn call_unmeasured(
        &self,
        endpoint: Endpoint,
        method: Method,
        body: Option<Vec<u8>>,
        accept: &'static str,
        limit: usize,
    ) -> Result<(String, Vec<u8>), HubError> {
        let config = self.config()?;
        let url = endpoint.url(&config)?;
        let path = url.path().to_owned();
        let token = self.bearer(&config).await?;
        let mut response = self.send(&method, &url, &path, &token, body.clone(), accept).await?;
        let mut used = token;
        if response.status() == StatusCode::UNAUTHORIZED {
            tracing::info!(%method, %path, "hub answered 401; logging in again and retrying once");
            self.drop_token(&used).await;
            used = self.bearer(&config).await?;
            response = self.send(&method, &url, &path, &used, body, accept).await?;
        }
        let secrets = [&used, &config.target_secret];
        let body = self.read_success(&method, &path, response, limit, &secrets).await?;
        tracing::debug!(%method, %path, bytes = body.len(), "hub call succeeded");
        Ok((path, body))
    }

    async fn send(
        &self,
        method: &Method,
        url: &Url,
        path: &str,
        token: &Secret,
        body: Option<Vec<u8>>,
        accept: &'static str,
    ) -> Result<Response, HubError> {
        let mut request = self
            .inner
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(token.expose())
            .header(ACCEPT, HeaderValue::from_static(accept));
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body);
        }
        request.send().await.map_err(|e| HubError::transport(method, path, e))
    }

    /// The body of a 2xx answer, or the error the status calls for.
    async fn read_success(
        &self,
        method: &Method,
        path: &str,
        mut response: Response,
        limit: usize,
        secrets: &[&Secret],
    ) -> Result<Vec<u8>, HubError> {
        let status = response.status();
        if status.is_success() {
            return read_bounded(method, path, &mut response, limit).await;
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(HubError::RateLimited {
                method: method.clone(),
                path: path.to_owned(),
                retry_after: retry_after(&response),
            });
        }
        let peek = peek_body(&mut response).await;
        Err(HubError::Status {
            method: method.clone(),
            path: path.to_owned(),
            status,
            excerpt: excerpt(&peek, secrets),
        })
    }

    /// A token good for the next call: the cached one while fresh, otherwise a new login;
    /// if that login fails while the cached token is still valid, the cached token.
    async fn bearer(&self, config: &HubConfig) -> Result<Secret, HubError> {
        let options = &self.inner.options;
        let mut slot = self.inner.token.lock().await;
        let identity = LoginIdentity::of(config);
        let now = SystemTime::now();
        if let Some(token) = &slot.token
            && token.is_fresh(&identity, now, options.refresh_before)
        {
            return Ok(token.jwt.clone());
        }
        let usable = slot
            .token
            .as_ref()
            .filter(|token| token.is_usable(&identity, now))
            .map(|token| token.jwt.clone());
        if let Some(backoff) = &slot.backoff {
            let left = backoff.until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                return usable.ok_or_else(|| HubError::LoginBackoff {
                    retry_in: left,
                    last_error: backoff.last_error.clone(),
                });
            }
        }
        match self.login(config, identity).await {
            Ok(token) => {
                let jwt = token.jwt.clone();
                slot.token = Some(token);
                slot.backoff = None;
                Ok(jwt)
            }
            Err(error) => {
                let failures = slot.backoff.as_ref().map_or(0, |b| b.failures).saturating_add(1);
                let retry_after = match &error {
                    HubError::RateLimited { retry_after, .. } => *retry_after,
                    _ => None,
                };
                let wait = login_backoff(
                    options.refresh_retry_after,
                    options.max_login_backoff,
                    failures,
                    retry_after,
                );
                slot.backoff = Some(LoginBackoff {
                    until: Instant::now() + wait,
                    failures,
                    last_error: error.to_string(),
                });
                match usable {
                    Some(jwt) => {
                        tracing::warn!(%error, ?wait, "refreshing the hub token failed; using the current token until it expires");
                        Ok(jwt)
                    }
                    None => {
                        tracing::warn!(%error, ?wait, "hub login failed; backing off");
                        slot.token = None;
                        Err(error)
                    }
                }
            }
        }
    }

    /// Forgets `used` (the Hub refused it) unless another call already replaced it.
    async fn drop_token(&self, used: &Secret) {
        let mut slot = self.inner.token.lock().await;
        if slot.token.as_ref().is_some_and(|token| token.jwt == *used) {
            slot.token = None;
        }
    }

    /// `POST DISTR_LOGIN_ENDPOINT` with Basic auth and no body.
    async fn login(&self, config: &HubConfig, identity: LoginIdentity) -> Result<Token, HubError> {
        let started = Instant::now();
        let result = self.login_unmeasured(config, identity).await;
        self.inner.metrics.observe("login", &result, started.elapsed());
        result
    }

    async fn login_unmeasured(&self, config: &HubConfig, identity: LoginIdentity) -> Result<Token, HubError> {
        let method = Method::POST;
        let path = config.login_endpoint.path().to_owned();
        tracing::debug!(target_id = %config.target_id, "logging in to the hub");
        let response = self
            .inner
            .http
            .post(config.login_endpoint.clone())
            .basic_auth(&config.target_id, Some(config.target_secret.expose()))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            // No body, but a length, as the Go agent sends (a strict proxy answers 411).
            .header(CONTENT_LENGTH, HeaderValue::from_static("0"))
            .body(Vec::new())
            .send()
            .await
            .map_err(|e| HubError::transport(&method, &path, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(HubError::LoginRejected {
                target_id: config.target_id.clone(),
                status,
            });
        }
        let body = self
            .read_success(
                &method,
                &path,
                response,
                self.inner.options.max_body,
                &[&config.target_secret],
            )
            .await?;
        let login: LoginResponse = parse_json(&method, &path, &body)?;
        let expires_at = jwt_expiry(login.token.expose())?;
        if expires_at <= SystemTime::now() {
            tracing::warn!("the hub issued a token that is already expired; check the clocks");
        }
        tracing::info!(target_id = %config.target_id, "logged in to the hub");
        Ok(Token {
            jwt: login.token,
            expires_at,
            identity,
        })
    }
}

/// Reads a body, failing as soon as it exceeds `limit` (announced or actual).
async fn read_bounded(method: &Method, path: &str, response: &mut Response, limit: usize) -> Result<Vec<u8>, HubError> {
    let too_large = || HubError::BodyTooLarge {
        method: method.clone(),
        path: path.to_owned(),
        limit,
    };
    let announced = response.content_length();
    if announced.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(announced.map_or(0, |len| len as usize));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| HubError::transport(method, path, e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first few KiB of an error body, ignoring read errors.
async fn peek_body(response: &mut Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_PEEK {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_PEEK);
    body
}

fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn parse_json<T: DeserializeOwned>(method: &Method, path: &str, body: &[u8]) -> Result<T, HubError> {
    serde_json::from_slice(body).map_err(|e| {
        let mut message = e.to_string();
        if message.len() > 300 {
            let cut = (0..=300).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        HubError::Malformed {
            method: method.clone(),
            path: path.to_owned(),
            message,
        }
    })
}
