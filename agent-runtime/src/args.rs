//! Arguments every binary accepts (flatten [`RuntimeArgs`] into its own).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

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

    /// Log filter: a default level and `target=level` directives (`info`, `agent_executor=debug,info`, ...).
    #[arg(long, env = "AGENT_LOG", default_value = "info")]
    pub log_filter: String,

    /// Address of the admin HTTP server (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "AGENT_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,

    /// The agent's version name, as the Hub knows it (the manifest sets it for every
    /// component): announced at start-up, served on `/metrics`, and sent to the Hub in the
    /// User-Agent.
    #[arg(long, env = "DISTR_AGENT_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pub agent_version: String,
}

/// Where a process finds its mounted TLS Secret (`tls.crt`, `tls.key`, `ca.crt`).
#[derive(Clone, Debug, clap::Args)]
pub struct TlsArgs {
    /// Directory of the mounted TLS Secret; re-read when its files change.
    #[arg(long, env = "AGENT_TLS_DIR", default_value = "/var/run/secrets/distr-agent/tls")]
    pub tls_dir: PathBuf,

    /// How often the TLS directory is checked for new files, in seconds.
    #[arg(long, env = "AGENT_TLS_RELOAD_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_reload_seconds: u64,

    /// The agent's namespace, which the identities in certificates are named in (the pod's
    /// own namespace, from the downward API).
    #[arg(long, env = "AGENT_NAMESPACE")]
    pub namespace: String,
}

impl TlsArgs {
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.tls_reload_seconds)
    }
}
