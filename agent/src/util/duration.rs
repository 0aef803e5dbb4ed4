//! The one duration syntax of every flag (`--max-lag`, `--status-interval`,
//! `--snapshot-every`, `--start-timeout`, …): humantime's (`1.5s`, `500ms`, `2m`, `1h30m`,
//! `14d`, `8w`), plus a bare number meaning seconds as earlier releases accepted.

use std::time::Duration;

/// Longest duration accepted: a century, far beyond any sane setting, and small enough
/// that adding it to an `Instant` cannot overflow.
const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a positive duration: `1.5s`, `500ms`, `2m`, `1h30m`, `14d`, `8w`, or plain
/// seconds (`10`, `0.5`). Zero is refused: a flag that can be disabled takes `off`
/// ([`parse_duration_or_off`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let d = match t.parse::<f64>() {
        // A bare number is seconds; humantime needs a unit.
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            if secs > MAX.as_secs_f64() {
                return Err(format!("{text:?} is too long (at most 100 years)"));
            }
            Duration::from_secs_f64(secs)
        }
        _ => humantime::parse_duration(t).map_err(|e| {
            format!("{text:?} is not a duration like 1.5s, 500ms, 2m, 1h30m, 14d or 8w: {e}")
        })?,
    };
    if d.is_zero() {
        return Err(format!("{text:?}: the duration must be positive"));
    }
    if d > MAX {
        return Err(format!("{text:?} is too long (at most 100 years)"));
    }
    Ok(d)
}

/// Like [`parse_duration`], and `off` (or `0`) for "disabled", returned as zero.
pub fn parse_duration_or_off(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "off" | "0" => Ok(Duration::ZERO),
        _ => parse_duration(text),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn humantime_forms() {
        let cases = [
            ("1.5s", Duration::from_millis(1500)),
            ("500ms", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1h30m", Duration::from_secs(5400)),
            ("14d", Duration::from_secs(14 * 86_400)),
            ("8w", Duration::from_secs(8 * 7 * 86_400)),
            ("10", Duration::from_secs(10)),
            ("0.25", Duration::from_millis(250)),
            (" 1s ", Duration::from_secs(1)),
            ("600s", Duration::from_secs(600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "0",
            "0s",
            "-1s",
            "-1",
            "1x",
            "s",
            "1.5.2s",
            "yesterday",
            "inf",
            "NaN",
            "1e30",
            "off",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_duration("1x").unwrap_err();
        assert!(e.contains("1.5s"), "{e}");
    }

    #[test]
    fn off() {
        assert_eq!(parse_duration_or_off("off").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration_or_off("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration_or_off("15m").unwrap(),
            Duration::from_secs(900)
        );
        assert!(parse_duration_or_off("never").is_err());
    }
}
