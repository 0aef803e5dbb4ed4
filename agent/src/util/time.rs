//! The one time syntax of every `--to-time` (PostgreSQL and Redis restores alike) and of
//! the times the agent records in manifests.
//!
//! Accepted: RFC 3339 (`2026-02-12T10:00:00Z`, `2026-02-12T11:00:00.25+01:00`), the same
//! with a space instead of `T` as PostgreSQL prints it (`2026-02-12 10:00:00`,
//! `2026-02-12 10:00:00.5+01`, `… UTC`), minutes precision (`2026-02-12 10:00`), and
//! `@<unix milliseconds>`. A time without a zone is **UTC** (not the server's or the
//! machine's zone), so the same command means the same moment everywhere. Offsets are
//! `Z`, `±HH`, `±HHMM` or `±HH:MM` up to ±15:59, PostgreSQL's own limit
//! (`MAX_TZDISP_HOUR` in src/include/datatype/timestamp.h); `+25:00` is refused.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};

/// The forms, for messages.
pub const FORMS: &str =
    "RFC 3339 (2026-02-12T10:00:00Z), YYYY-MM-DD HH:MM[:SS[.ffffff]][±HH[:MM]] (UTC when no zone is given) or @<unix ms>";

/// Largest offset accepted, in hours (PostgreSQL's `MAX_TZDISP_HOUR`).
const MAX_OFFSET_HOURS: i32 = 15;

/// Parses a point in time (see the module docs for the forms).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    let t = text.trim();
    if let Some(ms) = t.strip_prefix('@') {
        let ms: i64 = ms
            .parse()
            .ok()
            .filter(|ms| *ms >= 0)
            .with_context(|| format!("{text:?}: expected @<unix milliseconds>"))?;
        return DateTime::from_timestamp_millis(ms)
            .with_context(|| format!("{text:?} is out of range"));
    }
    let bad = || format!("{text:?} is not a time: use {FORMS}");
    // "YYYY-MM-DD" then 'T', 't' or ' ', then the clock and an optional zone.
    let (date, rest) = match (t.get(..10), t.get(10..11), t.get(11..)) {
        (Some(d), Some("T" | "t" | " "), Some(r)) => (d, r),
        _ => bail!(bad()),
    };
    let (clock, offset_secs) = split_zone(rest).with_context(bad)?;
    let stamp = format!("{date} {clock}");
    let naive = NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%d %H:%M"))
        .with_context(bad)?;
    let offset = FixedOffset::east_opt(offset_secs).with_context(bad)?;
    let local = offset
        .from_local_datetime(&naive)
        .single()
        .with_context(bad)?;
    Ok(local.with_timezone(&Utc))
}

/// Splits `10:00:00.5+01:00` into the clock and the offset east of UTC in seconds.
fn split_zone(rest: &str) -> Result<(&str, i32)> {
    let rest = rest.trim_end();
    for utc in [" UTC", "UTC", "Z", "z"] {
        if let Some(clock) = rest.strip_suffix(utc) {
            return Ok((clock.trim_end(), 0));
        }
    }
    // The clock has neither '+' nor '-', so the first one starts the zone.
    let Some(at) = rest.find(['+', '-']) else {
        return Ok((rest, 0));
    };
    let (clock, zone) = rest.split_at(at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let body = &zone[1..];
    let (h, m) = match (body.len(), body.as_bytes().get(2)) {
        (2, _) => (body, "00"),
        (4, _) => (&body[..2], &body[2..]),
        (5, Some(b':')) => (&body[..2], &body[3..]),
        _ => bail!("time zone {zone:?}: expected ±HH, ±HHMM or ±HH:MM"),
    };
    let digits = |s: &str| -> Result<i32> {
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            bail!("time zone {zone:?}: expected ±HH, ±HHMM or ±HH:MM");
        }
        Ok(s.parse()?)
    };
    let (h, m) = (digits(h)?, digits(m)?);
    if h > MAX_OFFSET_HOURS || m > 59 {
        bail!(
            "impossible time zone offset {zone:?}: offsets go from -{MAX_OFFSET_HOURS}:59 to +{MAX_OFFSET_HOURS}:59"
        );
    }
    Ok((clock.trim_end(), sign * (h * 3600 + m * 60)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 2, 12, h, mi, s).unwrap()
    }

    #[test]
    fn every_form_means_the_same_moment() {
        for t in [
            "2026-02-12T10:00:00Z",
            "2026-02-12t10:00:00z",
            "2026-02-12T11:00:00+01:00",
            "2026-02-12T08:30:00-01:30",
            "2026-02-12 10:00:00",
            "2026-02-12 10:00:00 UTC",
            "2026-02-12 10:00:00Z",
            "2026-02-12 12:00:00+02",
            "2026-02-12 12:00:00 +02:00",
            "2026-02-12 08:00:00-0200",
            "2026-02-12 10:00",
            "@1770890400000",
            " 2026-02-12T10:00:00Z ",
        ] {
            assert_eq!(parse_time(t).unwrap(), at(10, 0, 0), "{t}");
        }
        assert_eq!(
            parse_time("2026-02-12 10:00:00.25").unwrap(),
            at(10, 0, 0) + chrono::Duration::milliseconds(250)
        );
        assert_eq!(
            parse_time("2026-02-12T10:00:00.123456Z").unwrap(),
            at(10, 0, 0) + chrono::Duration::microseconds(123_456)
        );
        assert_eq!(
            parse_time("2026-02-13 01:59:00+15:59").unwrap(),
            at(10, 0, 0)
        );
    }

    #[test]
    fn refusals() {
        for bad in [
            "2026-02-12T10:00:00+25:00",
            "2026-02-12 10:00:00+16",
            "2026-02-12 10:00:00+01:60",
            "2026-02-12 10:00:00+2",
            "2026-02-12 10:00:00+0a",
            "2026-02-12 10:00:00+01:00:00",
            "2026-02-30 10:00:00",
            "2026-02-12 24:00:00",
            "2026-02-12",
            "yesterday",
            "",
            "@",
            "@-5",
            "@12x",
            "2026-02-12X10:00:00",
            "2026-02-12 10:00:00 CET",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
        let e = format!("{:#}", parse_time("2026-02-12T10:00:00+25:00").unwrap_err());
        assert!(e.contains("impossible time zone offset"), "{e}");
    }
}
