//! The poller's client for the Distr Hub's agent API (`hub-protocol.md`): login and token
//! refresh, the resources, status, manifest, metrics and log endpoints, and their bodies.

mod client;
mod error;
mod metrics;
mod token;
pub mod types;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

pub use client::{ClientOptions, HubClient};
pub use error::HubError;
pub use metrics::HubMetrics;
pub use token::{TokenError, jwt_expiry};
pub use types::{
    AgentLogEntry, AgentMetrics, AgentVersion, Deployment, DiskMetric, EffectiveHelmOptions, HelmOptions, LogEntry,
    RegistryAuth, Resources, StatusReport, StatusType,
};

pub use crate::config::Secret;
