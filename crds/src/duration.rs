//! Go-style durations (`1h30m`, `250ms`), as written in the CRDs and understood by CEL.

use std::time::Duration;

/// Parses a duration made of `<number><unit>` groups with units `ms`, `s`, `m`, `h`.
pub fn parse(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: missing unit (ms, s, m or h)"))?;
        let (number, tail) = rest.split_at(digits);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let (scale, tail) = if let Some(t) = tail.strip_prefix("ms") {
            (0.001, t)
        } else if let Some(t) = tail.strip_prefix('s') {
            (1.0, t)
        } else if let Some(t) = tail.strip_prefix('m') {
            (60.0, t)
        } else if let Some(t) = tail.strip_prefix('h') {
            (3600.0, t)
        } else {
            return Err(format!("{text:?}: unknown unit; use ms, s, m or h"));
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > 366.0 * 24.0 * 3600.0 {
        return Err(format!("{text:?}: longer than a year"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a duration and returns whole milliseconds.
pub fn parse_millis(text: &str) -> Result<u64, String> {
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
