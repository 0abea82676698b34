//! The agent demo (`demo/run.sh` starts the control plane, then this).

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    distr_agent_e2e::demo::run(distr_agent_e2e::demo::DemoArgs::parse()).await
}
