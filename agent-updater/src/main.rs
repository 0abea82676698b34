use clap::Parser;

// One thread is enough for a process that mostly waits on the network; each further thread
// would bring its own stack and malloc arena (see the README's "Benchmark" section).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    agent_runtime::install_crypto_provider();
    agent_updater::run(agent_updater::Args::parse()).await
}
