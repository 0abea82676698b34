use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    agent_runtime::install_crypto_provider();
    agent_poller::run(agent_poller::Args::parse()).await
}
