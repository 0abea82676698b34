use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    agent_runtime::install_crypto_provider();
    agent_executor::run(agent_executor::Args::parse()).await
}
