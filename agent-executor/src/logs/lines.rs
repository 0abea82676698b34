//! The pure part of deployment log collection: which workloads of a release have pods, how a
//! kubelet log line splits into time and text, and which lines a collection takes.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::resources::manifest::ManifestObject;

/// A workload whose pods' logs are collected, named as the Go agent names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `deployments/web`
    pub resource: String,
    /// How its pods are found.
    pub pods: PodSelector,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSelector {
    /// A label selector in the API's query syntax (`app=web,tier in (a,b)`).
    Labels(String),
    /// A bare Pod of the release.
    Name(String),
}

/// The workloads among a release's objects: Deployments, StatefulSets, DaemonSets,
/// ReplicaSets and Jobs by their `spec.selector`, and bare Pods by name. Objects without a
/// usable selector are skipped (an empty selector would match every pod of the namespace).
pub fn workloads(objects: &[ManifestObject]) -> Vec<Workload> {
    objects
        .iter()
        .filter_map(|object| {
            let plural = match object.kind.as_str() {
                "Deployment" => "deployments",
                "StatefulSet" => "statefulsets",
                "DaemonSet" => "daemonsets",
                "ReplicaSet" => "replicasets",
                "Job" => "jobs",
                "Pod" => {
                    return Some(Workload {
                        resource: format!("pods/{}", object.name),
                        pods: PodSelector::Name(object.name.clone()),
                    });
                }
                _ => return None,
            };
            let selector = label_selector(object.selector.as_ref()?)?;
            Some(Workload {
                resource: format!("{plural}/{}", object.name),
                pods: PodSelector::Labels(selector),
            })
        })
        .collect()
}

/// A `LabelSelector` (matchLabels and matchExpressions) as a query string; `None` when it
/// selects nothing in particular or cannot be expressed.
fn label_selector(selector: &serde_json::Value) -> Option<String> {
    let mut terms = Vec::new();
    if let Some(labels) = selector["matchLabels"].as_object() {
        for (key, value) in labels {
            terms.push(format!("{key}={}", value.as_str()?));
        }
    }
    if let Some(expressions) = selector["matchExpressions"].as_array() {
        for expression in expressions {
            let key = expression["key"].as_str()?;
            let values = || -> Option<String> {
                let values: Option<Vec<&str>> = expression["values"].as_array()?.iter().map(|v| v.as_str()).collect();
                Some(values?.join(","))
            };
            terms.push(match expression["operator"].as_str()? {
                "In" => format!("{key} in ({})", values()?),
                "NotIn" => format!("{key} notin ({})", values()?),
                "Exists" => key.to_owned(),
                "DoesNotExist" => format!("!{key}"),
                _ => return None,
            });
        }
    }
    (!terms.is_empty()).then(|| terms.join(","))
}

/// A log line as the kubelet returns it with `timestamps=true`: an RFC 3339 time with
/// nanoseconds, a space, the text. Lines without a readable time are skipped (`None`).
pub fn split_line(line: &str) -> Option<(DateTime<Utc>, &str)> {
    let (time, text) = line.split_once(' ').unwrap_or((line, ""));
    let time = DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc);
    Some((time, text))
}

/// The start of the second after `time`.
pub fn next_second(time: DateTime<Utc>) -> DateTime<Utc> {
    let whole = time.timestamp();
    DateTime::from_timestamp(whole + 1, 0).unwrap_or(time)
}

/// One collected line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub timestamp: DateTime<Utc>,
    /// The workload, shared by all its lines.
    pub resource: Arc<str>,
    pub body: String,
}

/// What a collection of one release returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub lines: Vec<Line>,
    /// Where the next collection starts: every line at or before it is shipped once these
    /// are. `None` when nothing moved.
    pub cursor: Option<DateTime<Utc>>,
}

/// Of `lines` (any order), those after `watermark` and at or before `cutoff`, oldest first, at
/// most `budget` of them, cut between two timestamps so that lines of the same instant are
/// never split across collections (the API's `sinceTime` has whole seconds; the filter is at
/// the exact watermark). The cursor is `cutoff` when everything fit, otherwise the time of the
/// last line taken.
pub fn take(mut lines: Vec<Line>, watermark: DateTime<Utc>, cutoff: DateTime<Utc>, budget: usize) -> Taken {
    lines.retain(|line| line.timestamp > watermark && line.timestamp <= cutoff);
    lines.sort_by_key(|line| line.timestamp);
    if lines.len() <= budget {
        return Taken {
            lines,
            cursor: (cutoff > watermark).then_some(cutoff),
        };
    }
    let boundary = lines[budget].timestamp;
    let mut end = budget;
    while end > 0 && lines[end - 1].timestamp == boundary {
        end -= 1;
    }
    if end == 0 {
        // More than the budget share one instant: take that instant whole.
        end = lines.iter().take_while(|line| line.timestamp == boundary).count();
    }
    lines.truncate(end);
    let cursor = lines.last().map(|line| line.timestamp);
    Taken { lines, cursor }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resources::manifest;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn line(time: &str, body: &str) -> Line {
        Line {
            timestamp: at(time),
            resource: Arc::from("deployments/web"),
            body: body.into(),
        }
    }

    #[test]
    fn workloads_are_named_as_the_go_agent_names_them() {
        let objects = manifest::parse(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector:\n    matchLabels: {app: web}\n    matchExpressions: [{key: tier, operator: In, values: [a, b]}]\n---\n\
             apiVersion: batch/v1\nkind: Job\nmetadata: {name: migrate}\nspec: {selector: {matchLabels: {job: m}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: debug}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}}\n---\n\
             apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec: {selector: {}}\n",
        )
        .unwrap();
        assert_eq!(
            workloads(&objects),
            [
                Workload {
                    resource: "deployments/web".into(),
                    pods: PodSelector::Labels("app=web,tier in (a,b)".into())
                },
                Workload {
                    resource: "jobs/migrate".into(),
                    pods: PodSelector::Labels("job=m".into())
                },
                Workload {
                    resource: "pods/debug".into(),
                    pods: PodSelector::Name("debug".into())
                },
            ],
            "no Service, and no workload whose selector would match every pod"
        );
    }

    #[test]
    fn kubelet_lines_split_into_time_and_text() {
        let (time, text) = split_line("2026-11-25T10:00:00.123456789Z GET /health 200").unwrap();
        assert_eq!(time, at("2026-11-25T10:00:00.123456789Z"));
        assert_eq!(text, "GET /health 200");
        assert_eq!(split_line("2026-11-25T10:00:00Z").unwrap().1, "");
        assert_eq!(split_line("not a time at all"), None);
    }

    #[test]
    fn lines_of_the_same_second_are_neither_lost_nor_repeated() {
        let watermark = at("2026-11-25T10:00:00.500Z");
        // The API returns the whole second of the watermark: the filter is exact.
        let lines = vec![
            line("2026-11-25T10:00:00.100Z", "shipped last time"),
            line("2026-11-25T10:00:00.500Z", "shipped last time too"),
            line("2026-11-25T10:00:00.700Z", "new"),
            line("2026-11-25T10:00:03Z", "after the cutoff"),
        ];
        let taken = take(lines, watermark, at("2026-11-25T10:00:02Z"), 100);
        assert_eq!(taken.lines, [line("2026-11-25T10:00:00.700Z", "new")]);
        assert_eq!(taken.cursor, Some(at("2026-11-25T10:00:02Z")));
    }

    #[test]
    fn a_flood_is_taken_a_budget_at_a_time_cut_between_instants() {
        let watermark = at("2026-11-25T10:00:00Z");
        let cutoff = at("2026-11-25T11:00:00Z");
        let lines = vec![
            line("2026-11-25T10:00:03Z", "c"),
            line("2026-11-25T10:00:01Z", "a"),
            line("2026-11-25T10:00:02Z", "b1"),
            line("2026-11-25T10:00:02Z", "b2"),
        ];
        let first = take(lines.clone(), watermark, cutoff, 2);
        assert_eq!(
            first.lines,
            [line("2026-11-25T10:00:01Z", "a")],
            "b1 and b2 stay together"
        );
        assert_eq!(first.cursor, Some(at("2026-11-25T10:00:01Z")));
        let second = take(lines.clone(), first.cursor.unwrap(), cutoff, 2);
        assert_eq!(
            second.lines.iter().map(|l| l.body.as_str()).collect::<Vec<_>>(),
            ["b1", "b2"]
        );
        let third = take(lines, second.cursor.unwrap(), cutoff, 2);
        assert_eq!(third.lines, [line("2026-11-25T10:00:03Z", "c")]);
        assert_eq!(third.cursor, Some(cutoff));
    }

    #[test]
    fn the_next_second_starts_at_a_whole_second() {
        assert_eq!(next_second(at("2026-11-25T10:00:00.700Z")), at("2026-11-25T10:00:01Z"));
        assert_eq!(next_second(at("2026-11-25T10:00:01Z")), at("2026-11-25T10:00:02Z"));
    }

    #[test]
    fn more_lines_of_one_instant_than_the_budget_go_together() {
        let watermark = at("2026-11-25T10:00:00Z");
        let lines: Vec<Line> = (0..5).map(|n| line("2026-11-25T10:00:01Z", &n.to_string())).collect();
        let taken = take(lines, watermark, at("2026-11-25T10:00:09Z"), 2);
        assert_eq!(taken.lines.len(), 5);
        assert_eq!(taken.cursor, Some(at("2026-11-25T10:00:01Z")));
    }
}
