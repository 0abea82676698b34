//! The Hub client's figures on `/metrics`: requests by route and outcome, and their latency.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use super::HubError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// Counters and latencies of the calls to the Hub. Cheap to clone (clones share the figures).
#[derive(Clone, Debug)]
pub struct HubMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
}

impl Default for HubMetrics {
    fn default() -> Self {
        fn buckets() -> Histogram {
            // 5 ms to about 40 s.
            Histogram::new(exponential_buckets(0.005, 2.5, 11))
        }
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(buckets),
        }
    }
}

impl HubMetrics {
    /// Registers `distr_agent_hub_requests_total` and `distr_agent_hub_request_duration_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hub_requests",
            "Calls to the Hub by route and outcome (ok, rejected, rate_limited, server_error, failed)",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "hub_request_duration",
            "Time calls to the Hub took, by route",
            Unit::Seconds,
            self.latency.clone(),
        );
    }

    pub(crate) fn observe<T>(&self, route: &'static str, result: &Result<T, HubError>, elapsed: Duration) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(error) => match error.status() {
                Some(status) if status.as_u16() == 429 => "rate_limited",
                Some(status) if status.is_server_error() => "server_error",
                Some(_) => "rejected",
                None => "failed",
            },
        };
        self.requests.get_or_create(&RequestLabels { route, outcome }).inc();
        self.latency
            .get_or_create(&RouteLabel { route })
            .observe(elapsed.as_secs_f64());
    }
}
