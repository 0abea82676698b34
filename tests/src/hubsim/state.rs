//! The simulator's in-memory state: targets, issued tokens, rate limiters, failure switches
//! and the request log. Plain data behind one mutex; no I/O.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{Failure, RateLimit, RecordedRequest, Route};

/// One deployment target as the Hub knows it.
pub(crate) struct Target {
    /// `None` once revoked: every login fails.
    pub(crate) secret: Option<String>,
    /// Token ids issued to this target.
    pub(crate) issued: Vec<String>,
    /// Token ids no longer accepted.
    pub(crate) revoked: HashSet<String>,
    pub(crate) version_id: Uuid,
    pub(crate) version_name: String,
    pub(crate) version_created_at: DateTime<Utc>,
    pub(crate) namespace: Option<String>,
    pub(crate) metrics_enabled: bool,
    pub(crate) deployment_logs_enabled: bool,
    pub(crate) deployment_logs_after: Option<DateTime<Utc>>,
    pub(crate) deployments: Vec<Value>,
    /// Every `revisionId` ever listed, current or past: statuses for others get a 400.
    pub(crate) known_revisions: HashSet<String>,
    /// Extra top-level fields merged into the resources answer.
    pub(crate) extra_fields: Map<String, Value>,
    pub(crate) manifest: Option<String>,
    /// When set, every successful login answers this token instead of a fresh one.
    pub(crate) fixed_token: Option<String>,
}

impl Target {
    pub(crate) fn new(secret: String) -> Self {
        Self {
            fixed_token: None,
            secret: Some(secret),
            issued: Vec::new(),
            revoked: HashSet::new(),
            version_id: Uuid::new_v4(),
            version_name: "1.0.0".to_owned(),
            version_created_at: Utc::now(),
            namespace: None,
            metrics_enabled: false,
            deployment_logs_enabled: false,
            deployment_logs_after: None,
            deployments: Vec::new(),
            known_revisions: HashSet::new(),
            extra_fields: Map::new(),
            manifest: None,
        }
    }

    pub(crate) fn set_deployments(&mut self, deployments: Vec<Value>) {
        for deployment in &deployments {
            if let Some(revision) = deployment.get("revisionId").and_then(Value::as_str) {
                self.known_revisions.insert(revision.to_owned());
            }
        }
        self.deployments = deployments;
    }

    /// The resources answer; `empty_deployments` sends `[]` without touching the list.
    pub(crate) fn resources(&self, empty_deployments: bool) -> Value {
        let mut body = Map::new();
        body.insert(
            "version".into(),
            json!({"id": self.version_id, "createdAt": self.version_created_at, "name": self.version_name}),
        );
        if let Some(namespace) = &self.namespace {
            body.insert("namespace".into(), json!(namespace));
        }
        body.insert("metricsEnabled".into(), json!(self.metrics_enabled));
        body.insert("deploymentLogsEnabled".into(), json!(self.deployment_logs_enabled));
        if let Some(after) = self.deployment_logs_after {
            body.insert("deploymentLogsAfter".into(), json!(after));
        }
        let deployments = if empty_deployments {
            Vec::new()
        } else {
            self.deployments.clone()
        };
        body.insert("deployments".into(), Value::Array(deployments));
        for (key, value) in &self.extra_fields {
            body.insert(key.clone(), value.clone());
        }
        Value::Object(body)
    }
}

/// A failure switch: what to do and how many more times (`None`: until cleared).
#[derive(Debug, Clone)]
pub(crate) struct Armed {
    pub(crate) failure: Failure,
    pub(crate) remaining: Option<u32>,
}

/// A sliding-window limiter keyed by target (or by the claimed login user).
#[derive(Default)]
pub(crate) struct Limiter {
    hits: HashMap<String, VecDeque<Instant>>,
}

impl Limiter {
    /// Admits one request for `key`, or returns how long until one would be admitted.
    pub(crate) fn admit(&mut self, key: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let hits = self.hits.entry(key.to_owned()).or_default();
        while hits.front().is_some_and(|t| now.duration_since(*t) >= limit.per) {
            hits.pop_front();
        }
        if hits.len() >= limit.max as usize {
            let oldest = hits.front().copied().unwrap_or(now);
            return Err(limit.per.saturating_sub(now.duration_since(oldest)));
        }
        hits.push_back(now);
        Ok(())
    }
}

/// Everything mutable, behind the simulator's mutex.
pub(crate) struct SimState {
    pub(crate) targets: BTreeMap<Uuid, Target>,
    pub(crate) token_lifetime: Duration,
    pub(crate) login_rate_limit: Option<RateLimit>,
    pub(crate) agent_rate_limit: Option<RateLimit>,
    pub(crate) login_limiter: Limiter,
    pub(crate) agent_limiter: Limiter,
    /// Per route; `None` key = all routes (checked first).
    pub(crate) failures: HashMap<Option<Route>, Armed>,
    pub(crate) requests: Vec<RecordedRequest>,
}

impl SimState {
    /// The failure to apply to a request on `route`, consuming one use of a counted switch.
    pub(crate) fn take_failure(&mut self, route: Route) -> Option<Failure> {
        let key = [None, Some(route)]
            .into_iter()
            .find(|key| self.failures.contains_key(key))?;
        let armed = self.failures.get_mut(&key)?;
        let failure = armed.failure.clone();
        if let Some(remaining) = armed.remaining.as_mut() {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.failures.remove(&key);
            }
        }
        Some(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_uses_a_sliding_window() {
        let limit = RateLimit {
            max: 2,
            per: Duration::from_secs(60),
        };
        let mut limiter = Limiter::default();
        let start = Instant::now();
        assert!(limiter.admit("a", limit, start).is_ok());
        assert!(limiter.admit("a", limit, start + Duration::from_secs(10)).is_ok());
        let wait = limiter
            .admit("a", limit, start + Duration::from_secs(20))
            .expect_err("third in a minute");
        assert_eq!(wait, Duration::from_secs(40));
        assert!(
            limiter.admit("b", limit, start + Duration::from_secs(20)).is_ok(),
            "per key"
        );
        assert!(
            limiter.admit("a", limit, start + Duration::from_secs(61)).is_ok(),
            "window slid"
        );
    }

    #[test]
    fn resources_keep_the_list_when_sending_an_empty_one() {
        let mut target = Target::new("s".into());
        target.namespace = Some("ns".into());
        target.set_deployments(vec![json!({"revisionId": "r1", "releaseName": "a"})]);
        assert_eq!(target.resources(true)["deployments"], json!([]));
        assert_eq!(target.resources(false)["deployments"][0]["releaseName"], "a");
        assert_eq!(target.resources(false)["namespace"], "ns");
        target.set_deployments(vec![json!({"revisionId": "r2"})]);
        assert!(target.known_revisions.contains("r1") && target.known_revisions.contains("r2"));
    }
}
