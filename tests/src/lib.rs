//! End-to-end test harness for the Distr agent.
//!
//! `tests/run.sh` builds and starts the real test environment (etcd, kube-apiserver with RBAC,
//! controller manager, scheduler, kwok, metrics-server, an authenticated OCI registry) once per run and points
//! `DISTR_TESTENV` at its description. Each test then takes what it needs from here: an admin
//! client for the harness itself, a fresh namespace, ServiceAccount tokens with exact RBAC,
//! the registry, helm/kubectl, the agent binaries, and the Hub simulator.

pub mod access;
pub mod agent;
pub mod bench;
pub mod chart_repo;
pub mod charts;
pub mod cluster;
pub mod demo;
pub mod env;
pub mod guide;
pub mod hubsim;
pub mod install;
pub mod kwok;
pub mod process;
pub mod real_node;
pub mod registry;
pub mod tools;
pub mod wait;

pub use cluster::{Identity, TestNamespace};
pub use env::TestEnv;
pub use process::AgentProcess;
pub use wait::wait_for;

/// Sets up test logging (once) and the rustls crypto provider.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
}
