//! Reading kube-apiserver's audit log (`DISTR_TESTENV_AUDIT=1`, see `tests/env/start.sh`): the
//! requests the agent's ServiceAccounts made.

use std::{collections::BTreeMap, io::BufRead as _, path::Path};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Deserialize;

/// The fields of an audit event the benchmark reads.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub stage: String,
    pub verb: String,
    pub user: User,
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub request_received_timestamp: DateTime<Utc>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct User {
    pub username: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub resource: Option<String>,
    pub subresource: Option<String>,
    pub name: Option<String>,
}

impl Event {
    /// `secrets`, `pods/log`, or the path of a non-resource request (`/apis`); Secrets with
    /// what they are (`secrets (helm release)`), as far as the name or selector tells.
    pub fn resource(&self) -> String {
        let resource = self.plain_resource();
        match self.secret_kind() {
            Some(kind) if resource == "secrets" => format!("secrets ({kind})"),
            _ => resource,
        }
    }

    /// What the Secret (or the Secrets listed) is: Helm's, the agent's tracking, pull or own.
    fn secret_kind(&self) -> Option<&'static str> {
        let name = self.object_ref.as_ref().and_then(|o| o.name.as_deref());
        match name {
            Some(name) if name.starts_with("sh.helm.release.v1.") => Some("helm release"),
            Some(name) if name.starts_with("sh.distr.agent.v1.") && name.ends_with(".pull") => Some("pull"),
            Some(name) if name.starts_with("sh.distr.agent.v1.") => Some("tracking"),
            Some(name) if name.starts_with("distr-agent-") => Some("agent's certificates"),
            Some(_) => None,
            None if self.request_uri.contains("owner%3Dhelm") => Some("helm release"),
            None => None,
        }
    }

    fn plain_resource(&self) -> String {
        match &self.object_ref {
            Some(ObjectRef {
                resource: Some(resource),
                subresource,
                ..
            }) => match subresource {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.clone(),
            },
            _ => self.request_uri.split('?').next().unwrap_or_default().to_owned(),
        }
    }

    /// The requests that ended: each request is counted once, by its `ResponseComplete` event.
    pub fn completed(&self) -> bool {
        self.stage == "ResponseComplete"
    }

    /// A watch that opened (its `ResponseStarted` event; it completes when it closes).
    pub fn watch_opened(&self) -> bool {
        self.stage == "ResponseStarted" && self.verb == "watch"
    }
}

/// The events of the ServiceAccounts of the agent in `namespace` (`distr-agent-executor`,
/// `distr-agent-updater`, ...) in the audit logs of `dir` (`audit.log`, and any file
/// kube-apiserver rotated it to, `audit-<time>.log`), in time order.
pub fn agent_events(dir: &Path, namespace: &str) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("audit") && name.ends_with(".log") {
            read_events(&path, namespace, &mut events)?;
        }
    }
    events.sort_by_key(|e| e.request_received_timestamp);
    Ok(events)
}

fn read_events(log: &Path, namespace: &str, events: &mut Vec<Event>) -> anyhow::Result<()> {
    let prefix = format!("system:serviceaccount:{namespace}:");
    let file = std::fs::File::open(log).with_context(|| format!("opening {}", log.display()))?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        // Cheap filter first: most of the log is the control plane's own traffic.
        if !line.contains(&prefix) {
            continue;
        }
        let event: Event = serde_json::from_str(&line).context("parsing an audit event")?;
        if event.user.username.starts_with(&prefix) {
            events.push(event);
        }
    }
    Ok(())
}

/// The agent component an event's user is: `distr-agent-executor` → `executor`.
pub fn component(event: &Event) -> &str {
    let account = event.user.username.rsplit(':').next().unwrap_or_default();
    account.strip_prefix("distr-agent-").unwrap_or(account)
}

/// Requests per (component, verb, resource) from `from` to `to`: completed requests, watches
/// apart (verb `watch (opened)`, counted when they open).
pub fn count_requests(
    events: &[Event],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> BTreeMap<(String, String, String), usize> {
    let mut counts = BTreeMap::new();
    for event in events
        .iter()
        .filter(|e| e.request_received_timestamp >= from && e.request_received_timestamp < to)
    {
        let verb = if event.watch_opened() {
            "watch (opened)".to_owned()
        } else if event.completed() && event.verb != "watch" {
            event.verb.clone()
        } else {
            continue;
        };
        *counts
            .entry((component(event).to_owned(), verb, event.resource()))
            .or_default() += 1;
    }
    counts
}

/// When kube-apiserver received the request creating Secret `name` (the first, completed).
pub fn created_at(events: &[Event], resource: &str, name: &str) -> Option<DateTime<Utc>> {
    events
        .iter()
        .find(|e| {
            e.completed()
                && e.verb == "create"
                && e.plain_resource() == resource
                && e.object_ref.as_ref().and_then(|o| o.name.as_deref()) == Some(name)
        })
        .map(|e| e.request_received_timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"kind":"Event","level":"Metadata","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/b/secrets?labelSelector=owner%3Dhelm","verb":"list","user":{"username":"system:serviceaccount:b:distr-agent-executor"},"objectRef":{"resource":"secrets","namespace":"b","apiVersion":"v1"},"requestReceivedTimestamp":"2026-01-01T00:00:01.000001Z"}
{"kind":"Event","level":"Metadata","stage":"ResponseStarted","requestURI":"/api/v1/namespaces/b/pods?watch=true","verb":"watch","user":{"username":"system:serviceaccount:b:distr-agent-executor"},"objectRef":{"resource":"pods","namespace":"b","apiVersion":"v1"},"requestReceivedTimestamp":"2026-01-01T00:00:02Z"}
{"kind":"Event","level":"Metadata","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/b/pods?watch=true","verb":"watch","user":{"username":"system:serviceaccount:b:distr-agent-executor"},"objectRef":{"resource":"pods","namespace":"b","apiVersion":"v1"},"requestReceivedTimestamp":"2026-01-01T00:00:02Z"}
{"kind":"Event","level":"Metadata","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/b/secrets","verb":"create","user":{"username":"system:serviceaccount:b:distr-agent-executor"},"objectRef":{"resource":"secrets","namespace":"b","name":"sh.helm.release.v1.x.v2","apiVersion":"v1"},"requestReceivedTimestamp":"2026-01-01T00:00:03.5Z"}
{"kind":"Event","level":"Metadata","stage":"ResponseComplete","requestURI":"/apis","verb":"get","user":{"username":"system:serviceaccount:b:distr-agent-updater"},"requestReceivedTimestamp":"2026-01-01T00:00:04Z"}
{"kind":"Event","level":"Metadata","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/c/secrets","verb":"list","user":{"username":"system:serviceaccount:c:distr-agent-executor"},"objectRef":{"resource":"secrets"},"requestReceivedTimestamp":"2026-01-01T00:00:04Z"}
"#;

    fn time(text: &str) -> DateTime<Utc> {
        text.parse().expect("a time")
    }

    #[test]
    fn counts_each_request_once_and_watches_apart() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Rotated in the middle, as kube-apiserver does at its maximum size.
        let (older, newer) = LINES.split_at(LINES.find("{\"kind\":\"Event\",\"level\":\"Metadata\",\"stage\":\"ResponseComplete\",\"requestURI\":\"/api/v1/namespaces/b/secrets\"").expect("a line"));
        std::fs::write(dir.path().join("audit-2026-01-01T00-00-03.000.log"), older)?;
        std::fs::write(dir.path().join("audit.log"), newer)?;
        std::fs::write(dir.path().join("kwok.log"), "not an audit log")?;
        let events = agent_events(dir.path(), "b")?;
        assert_eq!(events.len(), 5, "namespace c is another agent's");
        let counts = count_requests(&events, time("2026-01-01T00:00:00Z"), time("2026-01-01T00:01:00Z"));
        let key = |c: &str, v: &str, r: &str| (c.to_owned(), v.to_owned(), r.to_owned());
        assert_eq!(counts.get(&key("executor", "list", "secrets (helm release)")), Some(&1));
        assert_eq!(counts.get(&key("executor", "watch (opened)", "pods")), Some(&1));
        assert_eq!(
            counts.get(&key("executor", "create", "secrets (helm release)")),
            Some(&1)
        );
        assert_eq!(counts.get(&key("updater", "get", "/apis")), Some(&1));
        assert_eq!(counts.len(), 4);
        assert_eq!(
            created_at(&events, "secrets", "sh.helm.release.v1.x.v2"),
            Some(time("2026-01-01T00:00:03.5Z"))
        );
        Ok(())
    }
}
