//! Log sequence numbers: byte addresses in the WAL, printed as `X/Y` (high and low 32 bits in
//! hex) exactly as `pg_lsn` does (`src/backend/utils/adt/pg_lsn.c`).

use std::fmt;
use std::str::FromStr;

use super::PgWireError;

/// A byte position in the write-ahead log. Ordering is WAL order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL's "no position".
    pub const INVALID: Lsn = Lsn(0);

    /// The raw 64-bit address, as sent on the wire.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether this is `0/0`, which PostgreSQL uses for "unknown".
    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// Moves forward by `bytes`, refusing to wrap around the address space.
    pub fn checked_add(self, bytes: u64) -> Result<Lsn, PgWireError> {
        self.0
            .checked_add(bytes)
            .map(Lsn)
            .ok_or_else(|| PgWireError::LsnOverflow(format!("{self} + {bytes}")))
    }

    /// Bytes from `earlier` to `self`, or `None` if `earlier` is actually later.
    pub fn bytes_since(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// Parses `X/Y`; same as [`FromStr`], named for call sites that read better this way.
    pub fn parse(text: &str) -> Result<Lsn, PgWireError> {
        text.parse()
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PgWireError;

    fn from_str(text: &str) -> Result<Lsn, PgWireError> {
        let bad = || PgWireError::InvalidLsn {
            text: text.chars().take(64).collect(),
        };
        let (hi, lo) = text.split_once('/').ok_or_else(bad)?;
        let half = |s: &str| -> Result<u64, PgWireError> {
            if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u64::from_str_radix(s, 16).map_err(|_| bad())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl From<u64> for Lsn {
    fn from(raw: u64) -> Lsn {
        Lsn(raw)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_formats_like_pg_lsn() {
        assert_eq!(Lsn::parse("0/0").unwrap(), Lsn(0));
        assert_eq!(Lsn::parse("16/B374D848").unwrap(), Lsn(0x16_B374_D848));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
        assert_eq!(Lsn::parse("ffffffff/ffffffff").unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn rejects_malformed_lsns() {
        for bad in [
            "",
            "0",
            "/0",
            "0/",
            "1/2/3",
            "G/0",
            "123456789/0",
            "0/ 1",
            "-1/0",
            "+1/0",
        ] {
            assert!(Lsn::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn arithmetic_and_order() {
        let a = Lsn::parse("0/FFFFFFFF").unwrap();
        let b = a.checked_add(1).unwrap();
        assert_eq!(b.to_string(), "1/0");
        assert!(a < b);
        assert_eq!(b.bytes_since(a), Some(1));
        assert_eq!(a.bytes_since(b), None);
        assert!(Lsn(u64::MAX).checked_add(1).is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(raw: u64) {
            prop_assert_eq!(Lsn::parse(&Lsn(raw).to_string()).unwrap(), Lsn(raw));
        }

        #[test]
        fn never_panics_on_garbage(text in "\\PC{0,24}") {
            let _ = Lsn::parse(&text);
        }
    }
}
