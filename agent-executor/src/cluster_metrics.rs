//! Cluster metrics for the Hub: node capacity (Nodes) and node usage (`metrics.k8s.io`
//! NodeMetrics, served by metrics-server), summed over the cluster, as the Go agent reports
//! them. LISTs in pages of [`PAGE`], not one GET per node, each call bounded by
//! [`kube_util::API_TIMEOUT`].

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectList},
};

use crate::cluster::kube_util::{self, ApiError};

/// Objects per LIST page.
pub const PAGE: u32 = 500;

/// Capacity and usage summed over the cluster's nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterMetrics {
    pub cpu_cores_millis: i64,
    /// Used over capacity, 0..1.
    pub cpu_usage: f64,
    pub memory_bytes: i64,
    /// Used over capacity, 0..1.
    pub memory_usage: f64,
}

/// Why there are no metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The executor may not read Nodes (a namespace-scoped agent) or node metrics.
    #[error("cluster metrics are unavailable: the executor may not read {0} (a namespace-scoped agent)")]
    Forbidden(&'static str),
    /// The cluster serves no `metrics.k8s.io` (no metrics-server).
    #[error("cluster metrics are unavailable: the cluster serves no metrics.k8s.io API (is metrics-server installed?)")]
    NoMetricsApi,
    /// The API failed or did not answer in time (retryable).
    #[error("cannot read {what}: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: ApiError,
    },
}

/// Reads the cluster's metrics for the gRPC service, which itself never calls the API.
#[derive(Clone)]
pub struct ClusterMetricsReader {
    client: kube::Client,
}

impl ClusterMetricsReader {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// Reads and sums the cluster's node capacity and usage.
    pub async fn read(&self) -> Result<ClusterMetrics, MetricsError> {
        read(&self.client).await
    }
}

/// Every object of `api`, page by page.
async fn list_all<K>(api: &Api<K>, what: &'static str) -> Result<Vec<K>, MetricsError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut items = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page: ObjectList<K> = kube_util::call(api.list(&params))
            .await
            .map_err(|source| classify(what, source))?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(items),
        }
    }
}

fn classify(what: &'static str, source: ApiError) -> MetricsError {
    match source.code() {
        Some(403) => MetricsError::Forbidden(what),
        Some(404) if what == "node metrics" => MetricsError::NoMetricsApi,
        _ => MetricsError::Api { what, source },
    }
}

/// Reads and sums the cluster's node capacity and usage.
pub async fn read(client: &kube::Client) -> Result<ClusterMetrics, MetricsError> {
    let nodes = list_all(&Api::<Node>::all(client.clone()), "nodes").await?;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "NodeMetrics"),
        "nodes",
    );
    let usage = list_all(
        &Api::<DynamicObject>::all_with(client.clone(), &resource),
        "node metrics",
    )
    .await?;
    Ok(sum(&nodes, &usage))
}

/// Capacity and usage of `nodes` and their `usage` (NodeMetrics) summed.
fn sum(nodes: &[Node], usage: &[DynamicObject]) -> ClusterMetrics {
    let (mut cpu_capacity, mut memory_capacity) = (0.0, 0.0);
    for node in nodes {
        let capacity = node.status.as_ref().and_then(|status| status.capacity.as_ref());
        let get = |name: &str| capacity.and_then(|c| c.get(name)).and_then(|q| parse_quantity(&q.0));
        cpu_capacity += get("cpu").unwrap_or_default();
        memory_capacity += get("memory").unwrap_or_default();
    }
    let (mut cpu_used, mut memory_used) = (0.0, 0.0);
    for metrics in usage {
        let get = |name: &str| metrics.data["usage"][name].as_str().and_then(parse_quantity);
        cpu_used += get("cpu").unwrap_or_default();
        memory_used += get("memory").unwrap_or_default();
    }
    ClusterMetrics {
        cpu_cores_millis: (cpu_capacity * 1000.0).round() as i64,
        cpu_usage: ratio(cpu_used, cpu_capacity),
        memory_bytes: memory_capacity.round() as i64,
        memory_usage: ratio(memory_used, memory_capacity),
    }
}

fn ratio(used: f64, capacity: f64) -> f64 {
    if capacity > 0.0 {
        (used / capacity).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// A Kubernetes quantity in base units (cores, bytes): a decimal number with an optional
/// binary suffix (`Ki` … `Ei`), decimal suffix (`n`, `u`, `m`, `k`, `M`, `G`, `T`, `P`, `E`) or
/// exponent (`e3`, `E-2`). `None` when it is not one.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            10.0_f64.powi(digits.parse().ok()?)
        }
    };
    let value = number * factor;
    value.is_finite().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_every_notation() {
        let cases = [
            ("2", 2.0),
            ("250m", 0.25),
            ("1.5", 1.5),
            ("100n", 100e-9),
            ("12u", 12e-6),
            ("128974848", 128_974_848.0),
            ("129e6", 129e6),
            ("1E3", 1000.0),
            ("123Mi", 123.0 * 1024.0 * 1024.0),
            ("16Gi", 16.0 * 1024.0 * 1024.0 * 1024.0),
            ("1Ki", 1024.0),
            ("5G", 5e9),
            ("1k", 1000.0),
        ];
        for (text, want) in cases {
            let got = parse_quantity(text).unwrap_or(f64::NAN);
            assert!((got - want).abs() <= want.abs() * 1e-12, "{text}: {got} != {want}");
        }
        for bad in ["", "Mi", "1.2.3", "12Q", "1e", "1ee3"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn capacity_and_usage_are_summed_over_the_nodes() {
        let node = |cpu: &str, memory: &str| -> Node {
            serde_json::from_value(serde_json::json!({"status": {"capacity": {"cpu": cpu, "memory": memory}}}))
                .unwrap_or_default()
        };
        let usage = |cpu: &str, memory: &str| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "metrics.k8s.io/v1beta1", "kind": "NodeMetrics", "metadata": {"name": "n"},
                "usage": {"cpu": cpu, "memory": memory}
            }))
            .unwrap_or_else(|error| panic!("{error}"))
        };
        let metrics = sum(
            &[node("2", "4Gi"), node("2", "4Gi")],
            &[usage("500m", "1Gi"), usage("1500m", "3Gi")],
        );
        assert_eq!(metrics.cpu_cores_millis, 4000);
        assert_eq!(metrics.memory_bytes, 8 * 1024 * 1024 * 1024);
        assert_eq!(metrics.cpu_usage, 0.5);
        assert_eq!(metrics.memory_usage, 0.5);
    }

    #[test]
    fn usage_is_a_ratio_of_capacity() {
        assert_eq!(ratio(1.0, 4.0), 0.25);
        assert_eq!(ratio(5.0, 4.0), 1.0, "metrics ahead of capacity are capped");
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
