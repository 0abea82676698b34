//! agent-executor: holds the cluster RBAC, reconciles Helm releases and reports their status.
//! The gRPC service in [`grpc`] only validates and converts; the domain code knows no tonic.
//!
//! Modules, grouped by what they do:
//! - [`model`]: desired state, Helm options, statuses; [`validate`]: checks on Hub input.
//! - [`helm`]: the `helm` subprocess driver, its arguments, Helm's release storage and the
//!   docker configs it reads.
//! - [`cluster`]: what the executor knows of the cluster: the watch-fed index, tracking and
//!   pull Secrets, API call helpers.
//! - [`resources`]: the objects of a release: manifest, health, restart.
//! - [`release`]: the reconciliation: plan, recovery, the per-release workers, the status
//!   board, and the reconciler that drives them.
//! - [`policy`]: the customer's policy, read from a ConfigMap and checked before Helm writes.
//! - [`grpc`]: the gRPC service (transport only); [`logs`], [`cluster_metrics`], [`pki`].
//! - [`fence`]: the Lease that lets one executor act at a time.

pub mod cluster;
pub mod cluster_metrics;
pub mod fence;
pub mod grpc;
pub mod helm;
pub mod logs;
pub mod model;
pub mod pki;
pub mod policy;
pub mod release;
pub mod resources;
pub mod validate;

use agent_runtime::sync::MutexExt as _;
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use agent_runtime::{
    Runtime, RuntimeArgs,
    grpc::{GrpcServer, MAX_MESSAGE_BYTES, ServerTls},
    logging::service::AgentLogsService,
    tls::{Role, server::Policy},
};
use distr_agent_proto::v1::executor_server::ExecutorServer;

/// Time Helm operations in flight get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "agent-executor",
    version,
    about = "Distr agent executor: runs Helm for the poller"
)]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,

    /// Address of the gRPC server.
    #[arg(long, env = "AGENT_GRPC_ADDR", default_value = "0.0.0.0:9443")]
    pub grpc_addr: SocketAddr,

    /// The agent's own namespace (that of the releases until the Hub names another).
    #[arg(long, env = "AGENT_NAMESPACE")]
    pub namespace: String,

    /// Where the executor may deploy (the manifest's `targetScope`): `namespace`, only to its
    /// own namespace; `cluster`, to the namespace the Hub names.
    #[arg(long, env = "AGENT_SCOPE", value_enum, default_value_t = release::namespace::Scope::Namespace)]
    pub scope: release::namespace::Scope,

    /// The helm v4 binary.
    #[arg(long, env = "AGENT_HELM_BIN", default_value = "helm")]
    pub helm_bin: PathBuf,

    /// Writable directory for Helm's config, cache and per-operation files
    /// [default: $TMPDIR/distr-agent].
    #[arg(long, env = "AGENT_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,

    /// Helm operations (install, upgrade, uninstall, rollback) run at the same time at most.
    #[arg(long, env = "AGENT_MAX_CONCURRENT_HELM", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_helm: u16,

    /// Seconds a Helm operation counts against `--max-concurrent-helm`: after its busy start
    /// (download, render, apply) it is mostly waiting for resources, and its slot passes on.
    #[arg(long, env = "AGENT_HELM_ACTIVE_PHASE_SECONDS", default_value_t = release::slots::ACTIVE_PHASE.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub helm_active_phase_seconds: u64,

    /// Helm processes alive at once, waiting ones included: the executor's memory bound (a
    /// `helm` process holds 60 to 70 MiB; the default fits the 512 MiB limit in `deploy/`).
    #[arg(long, env = "AGENT_MAX_HELM_PROCESSES", default_value_t = release::slots::MAX_HELM_PROCESSES as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_helm_processes: u16,

    /// Accept chart repositories on plain `http://` URLs.
    #[arg(long, env = "AGENT_ALLOW_HTTP_CHARTS", default_value_t = false)]
    pub allow_http_charts: bool,

    /// Lifetime of the agent's CA, in seconds (renewed at two thirds).
    #[arg(long, env = "AGENT_TLS_CA_LIFETIME_SECONDS", default_value_t = 365 * 86_400, value_parser = clap::value_parser!(u64).range(60..))]
    pub tls_ca_lifetime_seconds: u64,

    /// Lifetime of the components' certificates, in seconds (renewed at two thirds).
    #[arg(long, env = "AGENT_TLS_LEAF_LIFETIME_SECONDS", default_value_t = 7 * 86_400, value_parser = clap::value_parser!(u64).range(30..))]
    pub tls_leaf_lifetime_seconds: u64,

    /// Lifetime of the operator's certificate, in seconds. It is issued only on request (an
    /// empty Secret `distr-agent-operator-tls`), never renewed, and its Secret is deleted once
    /// it has expired.
    #[arg(long, env = "AGENT_TLS_OPERATOR_LIFETIME_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(30..))]
    pub tls_operator_lifetime_seconds: u64,

    /// How long a new CA is trusted before it signs, in seconds: longer than the kubelet
    /// takes to update a mounted Secret.
    #[arg(long, env = "AGENT_TLS_CA_PROPAGATION_SECONDS", default_value_t = 600)]
    pub tls_ca_propagation_seconds: u64,

    /// How often the certificates are checked, in seconds.
    #[arg(long, env = "AGENT_TLS_CHECK_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_check_seconds: u64,

    /// gRPC connections older than this are closed gracefully, in seconds, so that clients
    /// reconnect with their current certificates.
    #[arg(long, env = "AGENT_GRPC_MAX_CONNECTION_AGE_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub grpc_max_connection_age_seconds: u64,
}

impl Args {
    fn pki_config(&self) -> anyhow::Result<pki::PkiConfig> {
        anyhow::ensure!(
            self.tls_leaf_lifetime_seconds < self.tls_ca_lifetime_seconds,
            "AGENT_TLS_LEAF_LIFETIME_SECONDS must be shorter than AGENT_TLS_CA_LIFETIME_SECONDS"
        );
        Ok(pki::PkiConfig {
            ca_lifetime: Duration::from_secs(self.tls_ca_lifetime_seconds),
            leaf_lifetime: Duration::from_secs(self.tls_leaf_lifetime_seconds),
            operator_lifetime: Duration::from_secs(self.tls_operator_lifetime_seconds),
            ca_propagation: Duration::from_secs(self.tls_ca_propagation_seconds),
            check_interval: Duration::from_secs(self.tls_check_seconds),
        })
    }
}

/// Who may call what on the executor: the poller drives it, an operator may look and roll
/// back.
pub fn policy() -> Policy {
    const SERVICE: &str = "distr.agent.v1.Executor";
    Policy::new()
        .allow(SERVICE, "Sync", &[Role::Poller])
        .allow(SERVICE, "Statuses", &[Role::Poller, Role::Operator])
        .allow(SERVICE, "WatchStatuses", &[Role::Poller, Role::Operator])
        .allow(SERVICE, "CollectLogs", &[Role::Poller])
        .allow(SERVICE, "AckLogs", &[Role::Poller])
        .allow(SERVICE, "ClusterMetrics", &[Role::Poller])
        .allow(SERVICE, "ListReleases", &[Role::Poller, Role::Operator])
        .allow(SERVICE, "GetRelease", &[Role::Poller, Role::Operator])
        .allow(SERVICE, "Rollback", &[Role::Operator])
        .allow_agent_logs()
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = Runtime::start(&args.runtime, "agent-executor").await?;
    let grpc_ready = runtime.readiness.gate("grpc");
    let recovered = runtime.readiness.gate("recovery");
    let certified = runtime.readiness.gate("certificates");
    let watching = runtime.readiness.gate("watches");
    validate::namespace(&args.namespace)?;
    let pki_config = args.pki_config()?;
    let client = kube::Client::try_default()
        .await
        .map_err(|error| anyhow::anyhow!("cannot configure the Kubernetes client: {error}"))?;
    // One executor acts at a time: in a container (the executor its first process, so that
    // its helm children die with it), nothing below runs before this one holds the Lease. A
    // host process (the end-to-end tests run the binaries so) runs unfenced, as before.
    let fence = if std::process::id() == 1 {
        match fence::hold(client.clone(), &args.namespace, runtime.shutdown.clone()).await {
            Ok(held) => Some(held),
            Err(fence::FenceError::Cancelled) => {
                runtime.finish().await;
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        }
    } else {
        None
    };
    let pki = pki::Pki::new(client.clone(), &args.namespace, pki_config);
    let own_credentials = pki.own_credentials();
    runtime.watch_certificate(own_credentials.clone());
    let pki_task = tokio::spawn(pki.run(runtime.shutdown.clone()));
    {
        let mut own = own_credentials.clone();
        let shutdown = runtime.shutdown.clone();
        tokio::spawn(async move {
            if agent_runtime::tls::reload::first(&mut own, &shutdown).await.is_some() {
                certified.open();
            }
        });
    }
    let scratch_dir = args
        .scratch_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("distr-agent"));
    let helm = helm::HelmDriver::new(helm::HelmConfig {
        bin: args.helm_bin.clone(),
        scratch_dir,
        allow_http_charts: args.allow_http_charts,
    })?
    .with_policy(policy::Gate::new(
        policy::watch::start(client.clone(), &args.namespace, runtime.shutdown.clone()),
        Some(client.clone()),
        &args.namespace,
    ));
    let metrics_client = client.clone();
    let logs_client = client.clone();
    let reconciler = release::reconciler::Reconciler::new(
        client,
        helm,
        args.namespace.clone(),
        args.scope,
        release::slots::HelmLimits {
            concurrent: usize::from(args.max_concurrent_helm),
            active_phase: Duration::from_secs(args.helm_active_phase_seconds),
            processes: usize::from(args.max_helm_processes),
        },
    );

    let log_collector = std::sync::Arc::new(logs::LogCollector::new(logs::KubeSource::new(
        logs_client,
        reconciler.cluster(),
    )));
    {
        let mut registry = runtime.metrics.locked();
        reconciler.register_metrics(&mut registry);
        log_collector.register_metrics(&mut registry);
    }

    let mut server = GrpcServer::bind(args.grpc_addr, &[distr_agent_proto::FILE_DESCRIPTOR_SET]).await?;
    server
        .add_service(
            ExecutorServer::new(grpc::ExecutorService::new(
                reconciler.clone(),
                log_collector,
                cluster_metrics::ClusterMetricsReader::new(metrics_client),
                runtime.shutdown.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .await;
    server
        .add_service(AgentLogsService::server(runtime.agent_logs.clone()))
        .await;
    tracing::info!(addr = %server.local_addr()?, namespace = %args.namespace, scope = ?args.scope, "gRPC server listening");
    grpc_ready.open();

    {
        let reconciler = reconciler.clone();
        tokio::spawn(async move {
            reconciler.watches_listed().await;
            watching.open();
        });
    }

    // Recovery runs beside the server: workers and recovery take the same per-release lock,
    // and readiness (hence traffic through the Service) waits for it.
    let recovery = {
        let reconciler = reconciler.clone();
        tokio::spawn(async move {
            reconciler.recover_on_startup().await;
            recovered.open();
        })
    };

    let tls = ServerTls {
        credentials: own_credentials,
        namespace: args.namespace.clone(),
        policy: policy(),
        max_connection_age: Duration::from_secs(args.grpc_max_connection_age_seconds),
    };
    let served = server.serve(tls, runtime.shutdown.clone()).await;
    recovery.abort();
    pki_task.abort();
    if let (true, Some(fence)) = (reconciler.shutdown(SHUTDOWN_GRACE).await, &fence) {
        // Every helm ended: the next executor may start at once.
        fence.release().await;
    }
    runtime.finish().await;
    served
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Args::command().debug_assert();
    }
}
