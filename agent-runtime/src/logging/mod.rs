//! `tracing` subscriber set-up.

pub mod capture;
pub mod service;

use tracing_subscriber::{
    Layer as _,
    filter::{LevelFilter, Targets},
    fmt,
    prelude::*,
};

pub use capture::LogBuffer;

use crate::LogFormat;

/// Installs the global subscriber. Logs go to stderr, coloured only when it is a terminal
/// (never in a file or `kubectl logs`); lines at info and above also go to `capture`, for the
/// Hub (debug output never leaves the process).
pub fn init(format: LogFormat, filter: &str, capture: LogBuffer) -> anyhow::Result<()> {
    // `Targets` (`target=level` directives) rather than `EnvFilter`: the latter compiles regular
    // expressions to parse its directives, which keeps the regex engine's code resident in
    // every process for a feature (span and field filters) the agent does not need.
    let filter: Targets = filter
        .parse()
        .map_err(|error| anyhow::anyhow!("invalid log filter {filter:?}: {error}"))?;
    let captured = fmt::layer()
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_writer(capture)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(filter).with(captured);
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
