//! agent-updater: applies new agent manifests to the agent's own objects (self-update).

pub mod apply;
pub mod cluster;
pub mod engine;
pub mod gate;
pub mod grpc;
pub mod lease;
pub mod manifest;
pub mod shape;
pub mod state;

use std::{net::SocketAddr, time::Duration};

use agent_runtime::{
    Runtime, RuntimeArgs, TlsArgs,
    grpc::{GrpcServer, ServerTls},
    tls::{Role, server::Policy},
};
use distr_agent_proto::v1::updater_server::UpdaterServer;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "agent-updater",
    version,
    about = "Distr agent updater: applies new agent manifests"
)]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Address of the gRPC server.
    #[arg(long, env = "AGENT_GRPC_ADDR", default_value = "0.0.0.0:9444")]
    pub grpc_addr: SocketAddr,

    /// Images of the agent must come from `<repository>/<component>`; a manifest with other
    /// images is refused.
    #[arg(long, env = "AGENT_IMAGE_REPOSITORY", default_value = "ghcr.io/distr-sh/distr-agent")]
    pub image_repository: String,

    /// How long the agent's Deployments get to roll out before the update is rolled back, in
    /// seconds.
    #[arg(long, env = "AGENT_UPDATE_TIMEOUT_SECONDS", default_value_t = 300)]
    pub update_timeout_seconds: u64,

    /// How often the updater acting on an update renews its heartbeat in the state, in
    /// seconds; another updater takes the update over once the heartbeat has not moved for
    /// three periods.
    #[arg(long, env = "AGENT_UPDATE_HEARTBEAT_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub update_heartbeat_seconds: u64,

    /// gRPC connections older than this are closed gracefully, in seconds, so that clients
    /// reconnect with their current certificates.
    #[arg(long, env = "AGENT_GRPC_MAX_CONNECTION_AGE_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub grpc_max_connection_age_seconds: u64,
}

/// Who may call what on the updater: only the poller hands over manifests; an operator may
/// read the update's state.
pub fn policy() -> Policy {
    const SERVICE: &str = "distr.agent.v1.Updater";
    Policy::new()
        .allow(SERVICE, "ApplyAgentManifest", &[Role::Poller])
        .allow(SERVICE, "UpdateStatus", &[Role::Poller, Role::Operator])
        .allow_agent_logs()
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = Runtime::start(&args.runtime, "agent-updater").await?;
    let grpc_ready = runtime.readiness.gate("grpc");
    let certified = runtime.readiness.gate("certificates");
    let credentials = agent_runtime::tls::reload::watch_dir(
        args.tls.tls_dir.clone(),
        args.tls.namespace.clone(),
        args.tls.reload_interval(),
        runtime.shutdown.clone(),
    );
    runtime.watch_certificate(credentials.clone());
    {
        let mut credentials = credentials.clone();
        let shutdown = runtime.shutdown.clone();
        tokio::spawn(async move {
            if agent_runtime::tls::reload::first(&mut credentials, &shutdown)
                .await
                .is_some()
            {
                certified.open();
            }
        });
    }
    let client = kube::Client::try_default()
        .await
        .map_err(|error| anyhow::anyhow!("cannot configure the Kubernetes client: {error}"))?;
    let engine = engine::Engine::new(
        std::sync::Arc::new(cluster::Kube::new(client, &args.tls.namespace)),
        manifest::Rules {
            namespace: args.tls.namespace.clone(),
            image_repository: args.image_repository.clone(),
        },
        Duration::from_secs(args.update_timeout_seconds),
        Duration::from_secs(args.update_heartbeat_seconds),
    );
    // The state is read before any update is taken (ApplyAgentManifest answers UNAVAILABLE
    // until then, and readiness waits for it); an update a previous updater left half-way is
    // finished (or rolled back) once no other live updater acts on it.
    let state_ready = runtime.readiness.gate("state");
    tokio::spawn(engine.clone().run(runtime.shutdown.clone(), move || state_ready.open()));
    let mut server = GrpcServer::bind(args.grpc_addr, &[distr_agent_proto::FILE_DESCRIPTOR_SET]).await?;
    server
        .add_service(
            UpdaterServer::new(grpc::UpdaterService::new(engine.clone()))
                .max_decoding_message_size(agent_runtime::grpc::MAX_MESSAGE_BYTES),
        )
        .await;
    server
        .add_service(agent_runtime::logging::service::AgentLogsService::server(
            runtime.agent_logs.clone(),
        ))
        .await;
    tracing::info!(addr = %server.local_addr()?, "gRPC server listening");
    grpc_ready.open();
    let tls = ServerTls {
        credentials,
        namespace: args.tls.namespace.clone(),
        policy: policy(),
        max_connection_age: Duration::from_secs(args.grpc_max_connection_age_seconds),
    };
    let served = server.serve(tls, runtime.shutdown.clone()).await;
    // The next updater (this pod's successor) takes over an update under way at once.
    engine.release().await;
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
