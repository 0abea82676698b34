//! `tracing` subscriber set-up.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::LogFormat;

/// Installs the global subscriber. Logs go to stderr, coloured only when it is a terminal
/// (never in a file or `kubectl logs`).
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).map_err(|error| anyhow::anyhow!("invalid log filter {filter:?}: {error}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Plain => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
            .try_init(),
    };
    result.map_err(|error| anyhow::anyhow!("cannot install the log subscriber: {error}"))
}
