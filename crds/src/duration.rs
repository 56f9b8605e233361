//! Go-style durations (`1h30m`, `250ms`), as written in the CRDs and understood by CEL.

use std::time::Duration;

/// Why a duration was refused (the text quoted in each message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing to parse.
    #[error("empty duration")]
    Empty,
    /// A number without its unit.
    #[error("{0:?}: missing unit (ms, s, m or h)")]
    MissingUnit(String),
    /// Not a number where one belongs.
    #[error("{0:?}: {1:?} is not a number")]
    NotANumber(String, String),
    /// A unit other than `ms`, `s`, `m` and `h`.
    #[error("{0:?}: unknown unit; use ms, s, m or h")]
    UnknownUnit(String),
    /// More than a year.
    #[error("{0:?}: longer than a year")]
    TooLong(String),
}

/// Parses a duration made of `<number><unit>` groups with units `ms`, `s`, `m`, `h`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| DurationError::MissingUnit(text.to_owned()))?;
        let (number, tail) = rest.split_at(digits);
        let value: f64 = number
            .parse()
            .map_err(|_| DurationError::NotANumber(text.to_owned(), number.to_owned()))?;
        let (scale, tail) = if let Some(t) = tail.strip_prefix("ms") {
            (0.001, t)
        } else if let Some(t) = tail.strip_prefix('s') {
            (1.0, t)
        } else if let Some(t) = tail.strip_prefix('m') {
            (60.0, t)
        } else if let Some(t) = tail.strip_prefix('h') {
            (3600.0, t)
        } else {
            return Err(DurationError::UnknownUnit(text.to_owned()));
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > 366.0 * 24.0 * 3600.0 {
        return Err(DurationError::TooLong(text.to_owned()));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a duration and returns whole milliseconds.
pub fn parse_millis(text: &str) -> Result<u64, DurationError> {
    parse(text).map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_combinations() {
        assert_eq!(parse_millis("250ms"), Ok(250));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("5m"), Ok(300_000));
        assert_eq!(parse_millis("1h30m"), Ok(5_400_000));
        assert_eq!(parse_millis("1.5s"), Ok(1_500));
        assert_eq!(parse_millis("0s"), Ok(0));
        assert_eq!(parse_millis("1m30s500ms"), Ok(90_500));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in ["", "10", "s", "10d", "1h 30m", "-1s", "1..5s", "9999999h"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
