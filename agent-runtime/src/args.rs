//! Arguments every binary accepts (flatten [`RuntimeArgs`] into its own).

use std::net::SocketAddr;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct RuntimeArgs {
    /// Log format.
    #[arg(long, env = "AGENT_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` directive syntax (`info`, `agent_executor=debug,info`, ...).
    #[arg(long, env = "AGENT_LOG", default_value = "info")]
    pub log_filter: String,

    /// Address of the admin HTTP server (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "AGENT_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,
}
