//! Parsing of Go duration strings (`time.ParseDuration`), the format the Hub uses for
//! `DISTR_INTERVAL` and `helmOptions.timeout`.
//!
//! Accepted: an optional `+` sign, then one or more `<number><unit>` components, where the
//! number may have a fraction (`1.5h`, `.5s`, `5.s`) and the unit is one of `ns`, `us`, `µs`,
//! `μs`, `ms`, `s`, `m`, `h`; or the bare `0`. Negative durations parse in Go but mean nothing
//! for a period or a timeout, so they are rejected here. As in Go, the total must fit in an
//! `i64` of nanoseconds (about 292 years).

use std::time::Duration;

/// Why a duration string was rejected. Displays as one line quoting the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    /// The string that was given (durations are never secret).
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 60 * 60 * 1_000_000_000),
];

/// Parses a Go duration string such as `5s`, `1m30s`, `1h2m3.5s`, `500ms` or `0`.
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    let mut rest = input;
    if let Some(stripped) = rest.strip_prefix('-') {
        if stripped == "0" {
            return Ok(Duration::ZERO);
        }
        return Err(fail("negative durations are not allowed"));
    }
    if let Some(stripped) = rest.strip_prefix('+') {
        rest = stripped;
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(fail("empty duration"));
    }

    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (whole, after_whole) = split_digits(rest);
        let (fraction, after_fraction) = match after_whole.strip_prefix('.') {
            Some(after_dot) => split_digits(after_dot),
            None => ("", after_whole),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(fail("expected a number"));
        }
        let unit_len = after_fraction
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after_fraction.len(), |(i, _)| i);
        let (unit, next) = after_fraction.split_at(unit_len);
        if unit.is_empty() {
            return Err(fail("missing unit (one of ns, us, ms, s, m, h)"));
        }
        let scale = NANOS_PER_UNIT
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| fail("unknown unit (expected one of ns, us, ms, s, m, h)"))?;

        let whole_value = parse_bounded(whole).ok_or_else(|| fail("number out of range"))?;
        let mut component = whole_value
            .checked_mul(scale)
            .ok_or_else(|| fail("duration out of range"))?;
        if !fraction.is_empty() {
            // 18 fraction digits are more than nanosecond precision needs for any unit (an hour
            // is 3.6e12 ns), and keep `numerator * scale` far from overflowing.
            let digits = &fraction[..fraction.len().min(18)];
            let numerator = parse_bounded(digits).ok_or_else(|| fail("number out of range"))?;
            let denominator = 10u128.pow(u32::try_from(digits.len()).unwrap_or(18));
            component += numerator * scale / denominator;
        }
        total = total
            .checked_add(component)
            .ok_or_else(|| fail("duration out of range"))?;
        if total > i64::MAX as u128 {
            return Err(fail("duration out of range"));
        }
        rest = next;
    }

    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| fail("duration out of range"))?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| fail("duration out of range"))?;
    Ok(Duration::new(secs, nanos))
}

/// Splits off the leading ASCII digits.
fn split_digits(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s.split_at(end)
}

/// Parses a run of digits, or `None` when it is too long to matter (more than 30 digits).
fn parse_bounded(digits: &str) -> Option<u128> {
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 30 {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> Duration {
        parse_go_duration(input).unwrap_or_else(|e| panic!("{input:?} should parse: {e}"))
    }

    #[test]
    fn parses_go_examples() {
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("90s"), Duration::from_secs(90));
        assert_eq!(ok("1h2m3.5s"), Duration::from_millis(3_723_500));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("-0"), Duration::ZERO);
        assert_eq!(ok("+0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("5m0s"), Duration::from_secs(300));
        assert_eq!(ok("+5s"), Duration::from_secs(5));
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(ok("7us"), Duration::from_micros(7));
        assert_eq!(ok("7µs"), Duration::from_micros(7));
        assert_eq!(ok("7μs"), Duration::from_micros(7));
        assert_eq!(ok("7ms"), Duration::from_millis(7));
        assert_eq!(ok("7s"), Duration::from_secs(7));
        assert_eq!(ok("7m"), Duration::from_secs(420));
        assert_eq!(ok("7h"), Duration::from_secs(25_200));
    }

    #[test]
    fn parses_fractions() {
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("5.s"), Duration::from_secs(5));
        assert_eq!(ok("1.000000001s"), Duration::new(1, 1));
        assert_eq!(ok("0.1234567891s"), Duration::from_nanos(123_456_789));
        assert_eq!(ok("2h45m"), Duration::from_secs(9900));
        assert_eq!(ok("1h1h"), Duration::from_secs(7200));
        let long_fraction = format!("1.{}h", "9".repeat(60));
        assert_eq!(ok(&long_fraction), Duration::from_nanos(7_199_999_999_999));
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        for (input, reason) in [
            ("", "empty duration"),
            ("5", "missing unit (one of ns, us, ms, s, m, h)"),
            ("1m30", "missing unit (one of ns, us, ms, s, m, h)"),
            ("5x", "unknown unit (expected one of ns, us, ms, s, m, h)"),
            ("5 s", "unknown unit (expected one of ns, us, ms, s, m, h)"),
            ("s", "expected a number"),
            (".s", "expected a number"),
            ("-5s", "negative durations are not allowed"),
            ("3000000h", "duration out of range"),
            ("9223372036854775808ns", "duration out of range"),
        ] {
            let error = parse_go_duration(input).expect_err(input);
            assert_eq!(error.reason, reason, "for {input:?}");
        }
        let error = parse_go_duration("5x").expect_err("5x");
        assert_eq!(
            error.to_string(),
            "invalid duration \"5x\": unknown unit (expected one of ns, us, ms, s, m, h)"
        );
    }

    #[test]
    fn accepts_the_largest_go_duration() {
        assert_eq!(ok("9223372036854775807ns"), Duration::from_nanos(i64::MAX as u64));
        assert_eq!(ok("2562047h"), Duration::from_secs(2_562_047 * 3600));
    }
}
