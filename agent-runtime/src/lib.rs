//! Process plumbing shared by `agent-poller`, `agent-executor` and `agent-updater`: command-line
//! arguments common to all three, `tracing` set-up, the admin HTTP server (`/livez`, `/readyz`,
//! `/metrics`), signal handling with one shared shutdown token, the gRPC server set-up with
//! health and reflection, and the periodic return of freed heap memory to the system.

pub mod admin;
pub mod args;
pub mod duration;
pub mod grpc;
pub mod logging;
pub mod memory;
pub mod readiness;
pub mod shutdown;
pub mod sync;
pub mod tls;

use crate::sync::MutexExt as _;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub use args::{LogFormat, RuntimeArgs, TlsArgs};
pub use readiness::{Readiness, ReadyGate};

/// The bound on every call of the agent to the Kubernetes API (the executor's and the
/// updater's): one that has not answered by then failed, and is retried as any transient
/// error is.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Installs ring as the process-wide rustls crypto provider. Call once, first thing in `main`.
pub fn install_crypto_provider() {
    // An error only means a provider was installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What every binary gets from [`Runtime::start`].
pub struct Runtime {
    /// Cancelled on the first SIGTERM or SIGINT; every task watches it.
    pub shutdown: CancellationToken,
    /// `/readyz` answers 200 once every gate is open and shutdown has not begun.
    pub readiness: Readiness,
    /// Metrics served on `/metrics`.
    pub metrics: Arc<Mutex<Registry>>,
    /// The process's own log lines (info and above), for the Hub's agent-logs view.
    pub agent_logs: logging::LogBuffer,
    admin: tokio::task::JoinHandle<()>,
}

impl Runtime {
    /// Sets up logging, installs the signal handler and binds the admin server.
    pub async fn start(args: &RuntimeArgs, component: &'static str) -> anyhow::Result<Self> {
        let agent_logs = logging::LogBuffer::new(component.strip_prefix("agent-").unwrap_or(component));
        logging::init(args.log_format, &args.log_filter, agent_logs.clone())?;
        let shutdown = shutdown::on_signals();
        let readiness = Readiness::new(shutdown.clone());
        let mut registry = Registry::with_prefix("distr_agent");
        admin::register_build_info(&mut registry, component, &args.agent_version);
        registry.register(
            "agent_log_lines_dropped",
            "Own log lines dropped before the Hub took them (the buffer was full)",
            agent_logs.dropped_total.clone(),
        );
        let metrics = Arc::new(Mutex::new(registry));
        tokio::spawn(memory::trim_periodically(memory::TRIM_PERIOD, shutdown.clone()));
        let admin = admin::serve(args.admin_addr, readiness.clone(), metrics.clone(), shutdown.clone()).await?;
        tracing::info!(component, version = %args.agent_version, admin = %args.admin_addr, "starting");
        Ok(Self {
            shutdown,
            readiness,
            metrics,
            agent_logs,
            admin,
        })
    }

    /// Serves the expiry of the process's own certificate on `/metrics`.
    pub fn watch_certificate(&self, credentials: tls::CredentialsWatch) {
        self.metrics
            .locked()
            .register_collector(Box::new(tls::reload::CertificateExpiry(credentials)));
    }

    /// Waits for the admin server to stop after shutdown.
    pub async fn finish(self) {
        self.shutdown.cancel();
        let _ = self.admin.await;
        tracing::info!("stopped");
    }
}
