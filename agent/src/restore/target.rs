//! Recovery targets: parsing what the user asked for and turning it into PostgreSQL's
//! `recovery_target_*` settings (PostgreSQL docs, "Recovery Target").

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use wire::pg::Lsn;

/// Where recovery should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Replay all archived WAL.
    Latest,
    /// Stop after the last transaction committed at or before this time.
    Time(DateTime<Utc>),
    /// Stop at this WAL position.
    Lsn(Lsn),
    /// Stop after this transaction.
    Xid(u64),
}

impl Target {
    /// From the command line's mutually exclusive options.
    pub fn from_args(time: Option<&str>, lsn: Option<&str>, xid: Option<u64>) -> Result<Target> {
        Ok(match (time, lsn, xid) {
            (Some(t), _, _) => Target::Time(parse_target_time(t)?),
            (_, Some(l), _) => {
                Target::Lsn(Lsn::parse(l).with_context(|| format!("--to-lsn {l:?}: expected X/Y"))?)
            }
            (_, _, Some(x)) => Target::Xid(x),
            _ => Target::Latest,
        })
    }

    /// The `recovery_target_*` lines for `postgresql.auto.conf`.
    pub fn settings(&self) -> Vec<String> {
        match self {
            Target::Latest => Vec::new(),
            Target::Time(t) => vec![
                format!(
                    "recovery_target_time = '{}'",
                    t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                ),
                "recovery_target_inclusive = on".into(),
            ],
            Target::Lsn(l) => vec![
                format!("recovery_target_lsn = '{l}'"),
                "recovery_target_inclusive = on".into(),
            ],
            Target::Xid(x) => vec![
                format!("recovery_target_xid = '{x}'"),
                "recovery_target_inclusive = on".into(),
            ],
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Target::Latest => "the latest archived point".into(),
            Target::Time(t) => format!("time {}", t.format("%Y-%m-%d %H:%M:%S%.6f UTC")),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Xid(x) => format!("transaction {x}"),
        }
    }
}

/// Parses `--to-time` in the one syntax of every `--to-time` ([`crate::util::time`]).
pub fn parse_target_time(text: &str) -> Result<DateTime<Utc>> {
    crate::util::time::parse_time(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn time_formats() {
        let want = Utc.with_ymd_and_hms(2026, 11, 27, 16, 7, 0).unwrap();
        for t in [
            "2026-11-27T16:07:00Z",
            "2026-11-27T18:07:00+02:00",
            "2026-11-27 16:07:00",
            "2026-11-27 16:07:00 UTC",
            "2026-11-27 18:07:00+02",
            "2026-11-27 14:07:00-0200",
            "2026-11-27 16:07",
        ] {
            assert_eq!(parse_target_time(t).unwrap(), want, "{t}");
        }
        assert_eq!(
            parse_target_time("2026-11-27 16:07:00.25").unwrap(),
            want + chrono::Duration::milliseconds(250)
        );
        assert!(parse_target_time("yesterday").is_err());
        assert!(parse_target_time("2026-11-27 16:07:00+2").is_err());
    }

    #[test]
    fn settings() {
        let t = Target::from_args(Some("2026-11-27 16:07:00.5"), None, None).unwrap();
        assert_eq!(
            t.settings()[0],
            "recovery_target_time = '2026-11-27 16:07:00.500000+00'"
        );
        assert!(Target::from_args(None, Some("0/3000000"), None)
            .unwrap()
            .settings()[0]
            .contains("0/3000000"));
        assert_eq!(Target::from_args(None, None, None).unwrap(), Target::Latest);
    }
}
