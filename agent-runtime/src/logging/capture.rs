//! The process's own log lines, kept for the Hub's agent-logs view.
//!
//! A second `fmt` layer (info and above, no colours, no time) writes each event into a
//! [`LogBuffer`]: a bounded queue of lines numbered in order. The poller collects the lines
//! after the last one it shipped and acknowledges them once the Hub accepted them; until then
//! they stay, so a lost batch is collected again. When the Hub is away long enough to fill the
//! buffer, the oldest unshipped lines are dropped and counted, never memory grown.
//!
//! Nothing here emits `tracing` events: a log line about capturing a log line would loop.

use crate::sync::MutexExt as _;
use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use prometheus_client::metrics::counter::Counter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Lines kept at most (about 2,000 × a few hundred bytes).
pub const CAPACITY: usize = 2000;
/// Longest body kept; longer lines are cut (on a character boundary) and marked.
pub const MAX_LINE_BYTES: usize = 4096;

/// One captured log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedLine {
    /// Position in the process's stream, from 1.
    pub sequence: u64,
    pub timestamp: SystemTime,
    /// `error`, `warn` or `info`.
    pub severity: &'static str,
    pub body: String,
}

/// What [`LogBuffer::collect`] returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub lines: Vec<CapturedLine>,
    /// Lines dropped (buffer full) between the caller's cursor and the first line returned.
    pub dropped: u64,
}

/// A bounded, numbered buffer of log lines with an acknowledged cursor. Cheap to clone.
#[derive(Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<Ring>>,
    component: &'static str,
    instance: Arc<str>,
    /// Lines dropped because the buffer was full (`distr_agent_agent_log_lines_dropped_total`).
    pub dropped_total: Counter,
}

struct Ring {
    lines: VecDeque<CapturedLine>,
    capacity: usize,
    /// Sequence number of the last line pushed.
    last: u64,
    /// Every line up to this one was acknowledged (and removed).
    acked: u64,
}

impl LogBuffer {
    /// An empty buffer for `component`'s lines (the component prefixes each body).
    pub fn new(component: &'static str) -> Self {
        Self::with_capacity(component, CAPACITY)
    }

    pub fn with_capacity(component: &'static str, capacity: usize) -> Self {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            inner: Arc::new(Mutex::new(Ring {
                lines: VecDeque::new(),
                capacity: capacity.max(1),
                last: 0,
                acked: 0,
            })),
            component,
            instance: format!("{component}-{}-{started:x}", std::process::id()).into(),
            dropped_total: Counter::default(),
        }
    }

    /// The component whose lines these are (`executor`).
    pub fn component(&self) -> &'static str {
        self.component
    }

    /// Identifies this process's stream: sequence numbers restart with a new instance.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Appends a line, dropping the oldest one when full.
    pub fn push(&self, severity: &'static str, body: &str) {
        let body = format!("{}: {}", self.component, bounded(body.trim_end()));
        let mut ring = self.ring();
        ring.last += 1;
        let line = CapturedLine {
            sequence: ring.last,
            timestamp: SystemTime::now(),
            severity,
            body,
        };
        if ring.lines.len() == ring.capacity {
            ring.lines.pop_front();
            self.dropped_total.inc();
        }
        ring.lines.push_back(line);
    }

    /// Up to `max` lines after sequence number `after` (0: from the oldest kept).
    pub fn collect(&self, after: u64, max: usize) -> Collected {
        let ring = self.ring();
        let after = after.max(ring.acked);
        let lines: Vec<CapturedLine> = ring
            .lines
            .iter()
            .filter(|line| line.sequence > after)
            .take(max)
            .cloned()
            .collect();
        let next = lines.first().map_or(ring.last + 1, |line| line.sequence);
        Collected {
            dropped: next.saturating_sub(after + 1),
            lines,
        }
    }

    /// Releases every line up to and including `through`.
    pub fn ack(&self, through: u64) {
        let mut ring = self.ring();
        let through = through.min(ring.last);
        while ring.lines.front().is_some_and(|line| line.sequence <= through) {
            ring.lines.pop_front();
        }
        ring.acked = ring.acked.max(through);
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.inner.locked()
    }
}

/// `text` cut to [`MAX_LINE_BYTES`] on a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_LINE_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_LINE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut)", &text[..end])
}

fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Hands `fmt`'s formatted events to the buffer, one line per event.
impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            buffer: self.clone(),
            severity: "info",
            bytes: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            buffer: self.clone(),
            severity: severity(meta.level()),
            bytes: Vec::new(),
        }
    }
}

/// Collects the bytes of one event; pushes them as a line when dropped.
pub struct LineWriter {
    buffer: LogBuffer,
    severity: &'static str,
    bytes: Vec<u8>,
}

impl io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One event is one line; a writer that grows past the bound only loses the tail.
        let room = (MAX_LINE_BYTES + 8).saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.bytes.is_empty() {
            self.buffer.push(self.severity, &String::from_utf8_lossy(&self.bytes));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bodies(collected: &Collected) -> Vec<&str> {
        collected.lines.iter().map(|line| line.body.as_str()).collect()
    }

    #[test]
    fn lines_stay_until_acknowledged() {
        let buffer = LogBuffer::with_capacity("executor", 10);
        buffer.push("info", "one\n");
        buffer.push("warn", "two");
        let first = buffer.collect(0, 10);
        assert_eq!(bodies(&first), ["executor: one", "executor: two"]);
        assert_eq!(first.dropped, 0);
        // Lost on the way: collected again.
        assert_eq!(buffer.collect(0, 10), first);
        buffer.ack(1);
        buffer.push("info", "three");
        let next = buffer.collect(0, 10);
        assert_eq!(bodies(&next), ["executor: two", "executor: three"]);
        assert_eq!(next.dropped, 0, "acknowledged lines are not drops");
        assert_eq!(bodies(&buffer.collect(2, 1)), ["executor: three"]);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_says_how_many() {
        let buffer = LogBuffer::with_capacity("poller", 3);
        for n in 1..=5 {
            buffer.push("info", &n.to_string());
        }
        let collected = buffer.collect(0, 10);
        assert_eq!(bodies(&collected), ["poller: 3", "poller: 4", "poller: 5"]);
        assert_eq!(collected.dropped, 2);
        assert_eq!(buffer.dropped_total.get(), 2);
        buffer.ack(5);
        let empty = buffer.collect(5, 10);
        assert_eq!(empty, Collected::default());
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let buffer = LogBuffer::with_capacity("updater", 2);
        buffer.push("info", &"é".repeat(MAX_LINE_BYTES));
        let line = &buffer.collect(0, 1).lines[0];
        assert!(line.body.len() <= MAX_LINE_BYTES + 32);
        assert!(line.body.ends_with("… (cut)"));
    }

    #[test]
    fn the_fmt_layer_writes_one_line_per_event_at_info_and_above() {
        use tracing_subscriber::{filter::LevelFilter, prelude::*};
        let buffer = LogBuffer::with_capacity("executor", 10);
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_level(false)
            .with_writer(buffer.clone())
            .with_filter(LevelFilter::INFO);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(release = "web", "helm operation succeeded");
            tracing::debug!("not shipped");
            tracing::warn!("careful");
        });
        let collected = buffer.collect(0, 10);
        assert_eq!(
            bodies(&collected),
            [
                "executor: agent_runtime::logging::capture::tests: helm operation succeeded release=\"web\"",
                "executor: agent_runtime::logging::capture::tests: careful"
            ]
        );
        assert_eq!(collected.lines[1].severity, "warn");
    }
}
