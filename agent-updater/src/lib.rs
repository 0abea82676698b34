//! agent-updater: applies new agent manifests to the agent's own objects (self-update).

pub mod grpc;

use std::net::SocketAddr;

use agent_runtime::{Runtime, RuntimeArgs, grpc::GrpcServer};
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

    /// Address of the gRPC server.
    #[arg(long, env = "AGENT_GRPC_ADDR", default_value = "0.0.0.0:9444")]
    pub grpc_addr: SocketAddr,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = Runtime::start(&args.runtime, "agent-updater").await?;
    let grpc_ready = runtime.readiness.gate("grpc");
    let mut server = GrpcServer::bind(args.grpc_addr, &[distr_agent_proto::FILE_DESCRIPTOR_SET]).await?;
    server
        .add_service(UpdaterServer::new(grpc::UpdaterService::default()))
        .await;
    tracing::info!(addr = %server.local_addr()?, "gRPC server listening");
    grpc_ready.open();
    let served = server.serve(runtime.shutdown.clone()).await;
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
