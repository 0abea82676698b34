//! agent-poller: the only agent process that talks to the Distr Hub. It holds the Hub
//! credentials and no Kubernetes access at all: every `DISTR_INTERVAL` it fetches the desired
//! deployments, hands them to the executor over gRPC, and posts the statuses back.

pub mod agent_logs;
pub mod cluster_metrics;
pub mod config;
pub mod deployment_logs;
pub mod desired;
pub use agent_runtime::duration;
pub mod hub;
pub mod poll;
pub mod report;
pub mod selfupdate;

use agent_runtime::sync::MutexExt as _;
use std::{sync::Arc, time::Duration};

use agent_runtime::{
    Runtime, RuntimeArgs, TlsArgs,
    grpc::MAX_MESSAGE_BYTES,
    tls::{
        Role,
        client::{MtlsChannel, ReloadingChannel},
    },
};
use anyhow::Context as _;
use distr_agent_proto::v1::{agent_logs_client::AgentLogsClient, executor_client::ExecutorClient};

use crate::{
    config::ConfigSource,
    hub::{ClientOptions, HubClient},
    poll::Poller,
};

/// Command-line flags. The Hub connection itself is configured by the Hub's `DISTR_*`
/// variables and the files in `DISTR_AGENT_CONFIG_DIRS` (see [`config`]), re-read every cycle.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "agent-poller", version, about = "Distr agent poller: talks to the Hub")]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// URL of the executor's gRPC server (mutual TLS; the executor must present the executor
    /// identity of the namespace, whatever address it is reached at).
    #[arg(
        long,
        env = "AGENT_EXECUTOR_URL",
        default_value = "https://distr-agent-executor:9443"
    )]
    pub executor_url: String,

    /// URL of the updater's gRPC server (mutual TLS, the updater identity of the namespace).
    #[arg(long, env = "AGENT_UPDATER_URL", default_value = "https://distr-agent-updater:9444")]
    pub updater_url: String,

    /// Deadline of each call to the executor, in seconds (Sync never waits for Helm).
    #[arg(long, env = "AGENT_EXECUTOR_TIMEOUT_SECONDS", default_value_t = 10)]
    pub executor_timeout_seconds: u64,

    /// How long the executor may be unreachable (restarting) before every deployment is
    /// reported as an error, in seconds; the Hub keeps the last statuses meanwhile.
    #[arg(long, env = "AGENT_EXECUTOR_GRACE_SECONDS", default_value_t = 30)]
    pub executor_grace_seconds: u64,

    /// Deadline of each call to the Hub, in seconds, from connecting until the body is read.
    #[arg(long, env = "AGENT_HUB_TIMEOUT_SECONDS", default_value_t = 30)]
    pub hub_timeout_seconds: u64,

    /// How often an unchanged status is posted again, in seconds (the Hub calls statuses
    /// older than 60 s stale).
    #[arg(long, env = "AGENT_STATUS_REFRESH_SECONDS", default_value_t = 30)]
    pub status_refresh_seconds: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime = Runtime::start(&args.runtime, "agent-poller").await?;
    let ready = runtime.readiness.gate("first cycle");
    let credentials = agent_runtime::tls::reload::watch_dir(
        args.tls.tls_dir.clone(),
        args.tls.namespace.clone(),
        args.tls.reload_interval(),
        runtime.shutdown.clone(),
    );
    runtime.watch_certificate(credentials.clone());

    let ship_metrics = agent_logs::ShipMetrics::default();
    let config = Arc::new(ConfigSource::from_process_env());
    let options = ClientOptions {
        request_timeout: Duration::from_secs(args.hub_timeout_seconds),
        ..Default::default()
    };
    let hub = HubClient::with_options(config.clone(), &args.runtime.agent_version, options)
        .context("creating the Hub client")?;
    let hub_metrics = hub.metrics().clone();
    let updater = MtlsChannel::new(
        &args.updater_url,
        Role::Updater.identity(&args.tls.namespace),
        credentials.clone(),
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .context("configuring the updater client")?;
    let updater_channel = ReloadingChannel::new(updater);
    let updater = distr_agent_proto::v1::updater_client::UpdaterClient::new(updater_channel.clone())
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let executor_channel = |timeout| {
        MtlsChannel::new(
            &args.executor_url,
            Role::Executor.identity(&args.tls.namespace),
            credentials.clone(),
            Duration::from_secs(5),
            timeout,
        )
        .map(ReloadingChannel::new)
        .context("configuring the executor client")
    };
    let channel = executor_channel(Duration::from_secs(args.executor_timeout_seconds))?;
    // The status stream lives long: its calls get no short deadline.
    let stream_channel = executor_channel(Duration::from_secs(86_400))?;
    let shipper = agent_logs::Shipper::new(
        hub.clone(),
        vec![
            agent_logs::Source::Local(runtime.agent_logs.clone()),
            agent_logs::Source::Remote {
                component: "executor",
                client: AgentLogsClient::new(channel.clone()),
            },
            agent_logs::Source::Remote {
                component: "updater",
                client: AgentLogsClient::new(updater_channel.clone()),
            },
        ],
        ship_metrics.clone(),
    );
    let follower_client = ExecutorClient::new(stream_channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let executor = ExecutorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut poller = Poller::new(
        hub,
        executor,
        Duration::from_secs(args.status_refresh_seconds),
        Duration::from_secs(args.executor_grace_seconds),
    )
    .with_self_update(selfupdate::SelfUpdate::new(updater));
    {
        let mut registry = runtime.metrics.locked();
        poller.register_metrics(&mut registry);
        ship_metrics.register(&mut registry);
        hub_metrics.register(&mut registry);
    }
    let shipping = tokio::spawn(shipper.run(runtime.shutdown.clone()));
    let following = tokio::spawn(poller.status_follower(follower_client).run(runtime.shutdown.clone()));
    // Liveness follows the loop: a cycle that never ends gets the container restarted.
    let heartbeat = runtime.readiness.heartbeat("poll loop", poll::MAX_CYCLE);

    loop {
        heartbeat.beat(poll::MAX_CYCLE);
        // A cycle in flight is abandoned on shutdown: nothing it does needs finishing here.
        tokio::select! {
            _ = poller.cycle() => {}
            _ = runtime.shutdown.cancelled() => break,
        }
        ready.open();
        let interval = match config.current() {
            Ok(config) => config.interval,
            Err(error) => {
                tracing::error!(%error, "invalid Hub configuration");
                Duration::from_secs(5)
            }
        };
        heartbeat.beat(interval + poll::MAX_CYCLE);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = runtime.shutdown.cancelled() => break,
        }
    }
    let _ = shipping.await;
    let _ = following.await;
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
