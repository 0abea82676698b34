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
    let filter = parse_filter(filter)?;
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

/// Parses `AGENT_LOG`: comma-separated `target=level` directives and one bare default level.
///
/// `Targets` rather than `EnvFilter`: the latter compiles regular expressions to parse its
/// directives, which brings the regex engine's code into every process at start-up (and so
/// into its resident memory) for span and field filters the agent does not need.
fn parse_filter(filter: &str) -> anyhow::Result<Targets> {
    filter
        .parse()
        .map_err(|error| anyhow::anyhow!("invalid log filter {filter:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn the_log_filter_takes_a_default_level_and_per_target_levels() {
        let filter = parse_filter("agent_executor::helm=debug,kube=warn,info").expect("valid filter");
        assert!(filter.would_enable("agent_executor::helm::storage", &Level::DEBUG));
        assert!(!filter.would_enable("agent_executor::release", &Level::DEBUG));
        assert!(filter.would_enable("agent_executor::release", &Level::INFO));
        assert!(!filter.would_enable("kube_runtime::watcher", &Level::INFO));
        assert!(filter.would_enable("kube_runtime::watcher", &Level::WARN));
    }

    #[test]
    fn an_invalid_log_filter_is_refused_with_its_text() {
        let error = parse_filter("agent_executor=loud").expect_err("not a level");
        assert!(
            error.to_string().contains("invalid log filter \"agent_executor=loud\""),
            "{error}"
        );
    }
}
