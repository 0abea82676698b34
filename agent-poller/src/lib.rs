//! agent-poller: the only agent process that talks to the Distr Hub. It holds the Hub
//! credentials and no Kubernetes access at all.

use agent_runtime::{Runtime, RuntimeArgs};

#[derive(Clone, Debug, clap::Parser)]
#[command(name = "agent-poller", version, about = "Distr agent poller: talks to the Hub")]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = Runtime::start(&args.runtime, "agent-poller").await?;
    runtime.readiness.gate("loop").open();
    runtime.shutdown.cancelled().await;
    runtime.finish().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Args::command().debug_assert();
    }
}
