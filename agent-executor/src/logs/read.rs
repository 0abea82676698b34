//! Reading one container's log as it streams in: each line is parsed when it arrives, lines at
//! or before the watermark or after the cutoff are dropped at once, and the read stops when
//! the container's share of the batch is full. What is held is the lines kept, never the
//! whole log.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::io::{AsyncBufRead, AsyncBufReadExt as _};

use super::lines::{self, Line};

/// What a line costs besides its text (the `Line` and its share of the vector).
pub const LINE_OVERHEAD: usize = 64;

/// The bounds of one read.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Lines at or before it were shipped.
    pub watermark: DateTime<Utc>,
    /// Lines after it wait for the next collection.
    pub cutoff: DateTime<Utc>,
    /// Bytes of kept lines (text plus [`LINE_OVERHEAD`] each) at most.
    pub keep_bytes: usize,
    /// Lines kept at most: a release ships its oldest lines, so more lines of one container
    /// than the release may ship could never all go.
    pub keep_lines: usize,
    /// The `limitBytes` the log was requested with: the kubelet stops there.
    pub limit_bytes: u64,
    /// The collection's deadline: the read stops there, as if it had failed (with
    /// [`std::io::ErrorKind::TimedOut`]).
    pub deadline: tokio::time::Instant,
}

/// How a read ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Everything the kubelet had was read.
    Complete,
    /// The read stopped early (share full, byte limit, failure); every line of the container
    /// at or before the instant is among the kept ones or was shipped.
    CompleteUntil(DateTime<Utc>),
}

/// The lines kept of one container and how far they are complete.
#[derive(Debug)]
pub struct ContainerRead {
    pub lines: Vec<Line>,
    pub end: End,
    /// Bytes kept (text plus [`LINE_OVERHEAD`] each).
    pub kept_bytes: usize,
    /// The read failed part-way (after the lines kept).
    pub error: Option<std::io::Error>,
}

/// Reads `stream` within `bounds`. Lines come in time order (as the kubelet writes them); a
/// read cut short is complete up to just before the line it stopped at, so lines sharing
/// that line's instant all come in the next collection.
pub async fn read(mut stream: impl AsyncBufRead + Unpin, resource: &Arc<str>, bounds: Bounds) -> ContainerRead {
    let mut lines = Vec::new();
    let mut kept_bytes = 0;
    let mut read_bytes: u64 = 0;
    // The time of the last whole line read (kept or not).
    let mut last_seen: Option<DateTime<Utc>> = None;
    let mut buffer = Vec::new();
    let before = |time: DateTime<Utc>| time - chrono::Duration::nanoseconds(1);
    loop {
        buffer.clear();
        let next = tokio::time::timeout_at(bounds.deadline, stream.read_until(b'\n', &mut buffer)).await;
        let next = next.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the collection's deadline passed",
            ))
        });
        let count = match next {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) => {
                // What was read is complete up to the instant of the last whole line, less
                // its own instant (more lines of it may have followed).
                let until = last_seen.map_or(bounds.watermark, before);
                return ContainerRead {
                    lines,
                    end: End::CompleteUntil(until.max(bounds.watermark)),
                    kept_bytes,
                    error: Some(error),
                };
            }
        };
        read_bytes += count as u64;
        let text = String::from_utf8_lossy(&buffer);
        let whole = text.ends_with('\n');
        let Some((time, body)) = lines::split_line(text.trim_end_matches(['\n', '\r'])) else {
            continue;
        };
        if !whole {
            // The last line, cut at the byte limit: it comes whole next time.
            return cut_at_limit(lines, kept_bytes, Some(time), last_seen, resource, bounds);
        }
        last_seen = Some(time);
        if time <= bounds.watermark || time > bounds.cutoff {
            continue;
        }
        let cost = body.len() + LINE_OVERHEAD;
        if (kept_bytes + cost > bounds.keep_bytes || lines.len() >= bounds.keep_lines) && !lines.is_empty() {
            // The share is full: this line and the rest come next time.
            return ContainerRead {
                lines,
                end: End::CompleteUntil(before(time).max(bounds.watermark)),
                kept_bytes,
                error: None,
            };
        }
        kept_bytes += cost;
        lines.push(Line {
            timestamp: time,
            resource: resource.clone(),
            body: body.to_owned(),
        });
    }
    if read_bytes >= bounds.limit_bytes {
        return cut_at_limit(lines, kept_bytes, None, last_seen, resource, bounds);
    }
    ContainerRead {
        lines,
        end: End::Complete,
        kept_bytes,
        error: None,
    }
}

/// A read the kubelet stopped at `limitBytes`: complete up to just before `cut` (the line cut
/// in two) or the last line read. When that is not past the watermark, the byte limit filled
/// up within the watermark's second: a read starts at a whole second, so the rest of that
/// second cannot be read at all; it is skipped, and a line says so.
fn cut_at_limit(
    mut lines: Vec<Line>,
    kept_bytes: usize,
    cut: Option<DateTime<Utc>>,
    last_seen: Option<DateTime<Utc>>,
    resource: &Arc<str>,
    bounds: Bounds,
) -> ContainerRead {
    let before = |time: DateTime<Utc>| time - chrono::Duration::nanoseconds(1);
    let until = cut.or(last_seen).map_or(bounds.watermark, before);
    // Lines of the cut instant are not complete.
    lines.retain(|line| line.timestamp <= until);
    if until > bounds.watermark {
        return ContainerRead {
            lines,
            end: End::CompleteUntil(until),
            kept_bytes,
            error: None,
        };
    }
    let next_second = lines::next_second(bounds.watermark);
    lines.push(Line {
        timestamp: before(next_second),
        resource: resource.clone(),
        body: format!(
            "[distr agent] lines of {resource} past the first {} KiB logged within one second were skipped",
            bounds.limit_bytes / 1024
        ),
    });
    ContainerRead {
        lines,
        end: End::CompleteUntil(next_second),
        kept_bytes,
        error: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn bounds() -> Bounds {
        Bounds {
            watermark: at("2026-11-25T10:00:00.500Z"),
            cutoff: at("2026-11-25T10:00:09Z"),
            keep_bytes: 1 << 20,
            keep_lines: 1000,
            limit_bytes: 1 << 20,
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(60),
        }
    }

    async fn read_text(text: &str, bounds: Bounds) -> ContainerRead {
        read(
            futures::io::Cursor::new(text.as_bytes().to_vec()),
            &Arc::from("deployments/web"),
            bounds,
        )
        .await
    }

    fn bodies(read: &ContainerRead) -> Vec<&str> {
        read.lines.iter().map(|line| line.body.as_str()).collect()
    }

    #[tokio::test]
    async fn only_lines_after_the_watermark_and_not_after_the_cutoff_are_kept() {
        let text = "2026-11-25T10:00:00.100Z old\n2026-11-25T10:00:00.500Z shipped\nnot a line\n\
                    2026-11-25T10:00:01Z new\n2026-11-25T10:00:10Z later\n";
        let read = read_text(text, bounds()).await;
        assert_eq!(bodies(&read), ["new"]);
        assert_eq!(read.end, End::Complete);
    }

    #[tokio::test]
    async fn a_full_share_stops_the_read_before_an_instant() {
        let text = "2026-11-25T10:00:01Z a\n2026-11-25T10:00:02Z b1\n2026-11-25T10:00:02Z b2\n2026-11-25T10:00:03Z c\n";
        let bounds = Bounds {
            keep_bytes: 2 * (LINE_OVERHEAD + 2),
            ..bounds()
        };
        let read = read_text(text, bounds).await;
        assert_eq!(bodies(&read), ["a", "b1"]);
        assert_eq!(
            read.end,
            End::CompleteUntil(at("2026-11-25T10:00:02Z") - chrono::Duration::nanoseconds(1)),
            "b1 is kept but not complete: its instant comes again whole"
        );
    }

    #[tokio::test]
    async fn no_more_lines_are_kept_than_the_release_may_ship() {
        let text = "2026-11-25T10:00:01Z a\n2026-11-25T10:00:02Z b\n2026-11-25T10:00:03Z c\n";
        let read = read_text(
            text,
            Bounds {
                keep_lines: 2,
                ..bounds()
            },
        )
        .await;
        assert_eq!(bodies(&read), ["a", "b"]);
        assert_eq!(
            read.end,
            End::CompleteUntil(at("2026-11-25T10:00:03Z") - chrono::Duration::nanoseconds(1))
        );
    }

    #[tokio::test]
    async fn a_line_cut_at_the_byte_limit_comes_whole_next_time() {
        let text = "2026-11-25T10:00:01Z a\n2026-11-25T10:00:02Z b is cut";
        let bounds = Bounds {
            limit_bytes: text.len() as u64,
            ..bounds()
        };
        let read = read_text(text, bounds).await;
        assert_eq!(bodies(&read), ["a"]);
        assert_eq!(
            read.end,
            End::CompleteUntil(at("2026-11-25T10:00:02Z") - chrono::Duration::nanoseconds(1))
        );
    }

    #[tokio::test]
    async fn a_limit_filled_within_the_watermarks_second_skips_the_rest_of_it_and_says_so() {
        let text = "2026-11-25T10:00:00.100Z a\n2026-11-25T10:00:00.200Z b\n";
        let bounds = Bounds {
            limit_bytes: text.len() as u64,
            ..bounds()
        };
        let read = read_text(text, bounds).await;
        assert_eq!(read.end, End::CompleteUntil(at("2026-11-25T10:00:01Z")));
        assert_eq!(read.lines.len(), 1);
        assert!(read.lines[0].body.contains("were skipped"), "{:?}", read.lines);
    }

    /// A stream that yields `text`, then fails.
    struct FailsAfter(futures::io::Cursor<Vec<u8>>);

    impl futures::io::AsyncRead for FailsAfter {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            unreachable!("read through AsyncBufRead")
        }
    }

    impl AsyncBufRead for FailsAfter {
        fn poll_fill_buf(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<&[u8]>> {
            let this = self.get_mut();
            let position = this.0.position() as usize;
            let rest = &this.0.get_ref()[position..];
            if rest.is_empty() {
                return std::task::Poll::Ready(Err(std::io::Error::other("connection reset")));
            }
            std::task::Poll::Ready(Ok(rest))
        }

        fn consume(self: std::pin::Pin<&mut Self>, amount: usize) {
            let this = self.get_mut();
            let position = this.0.position();
            this.0.set_position(position + amount as u64);
        }
    }

    #[tokio::test]
    async fn a_read_that_fails_part_way_is_complete_before_its_last_instant() {
        let text = "2026-11-25T10:00:01Z a\n2026-11-25T10:00:02Z b\n";
        let stream = FailsAfter(futures::io::Cursor::new(text.as_bytes().to_vec()));
        let read = read(stream, &Arc::from("deployments/web"), bounds()).await;
        assert!(read.error.is_some());
        assert_eq!(bodies(&read), ["a", "b"]);
        assert_eq!(
            read.end,
            End::CompleteUntil(at("2026-11-25T10:00:02Z") - chrono::Duration::nanoseconds(1)),
            "b's instant may have had more lines"
        );
    }
}
