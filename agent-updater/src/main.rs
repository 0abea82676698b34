use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    agent_runtime::install_crypto_provider();
    agent_updater::run(agent_updater::Args::parse()).await
}
