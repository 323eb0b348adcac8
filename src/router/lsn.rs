//! PostgreSQL WAL positions (`pg_lsn`): parsing the `X/Y` text form servers print and clients
//! write in `SET pgmux.min_lsn`, ordering, and the byte distance between two positions (replica
//! lag). A plain `u64` underneath, as in PostgreSQL, so comparisons are free.

use std::fmt;
use std::str::FromStr;

/// A WAL position. `Lsn(0)` is `0/0`, which PostgreSQL uses for "invalid"; it orders before every
/// real position, so "replayed at least `0/0`" holds for any replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnError {
    #[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', as 0/16B3748")]
    Syntax(String),
}

impl Lsn {
    /// Bytes of WAL from `older` up to `self`; 0 when `older` is not older (a replica measured a
    /// moment after the primary can be ahead of the primary's figure, and that is no lag).
    pub fn bytes_since(self, older: Lsn) -> u64 {
        self.0.saturating_sub(older.0)
    }
}

impl FromStr for Lsn {
    type Err = LsnError;

    /// Accepts what PostgreSQL's `pg_lsn` input accepts: 1 to 8 hex digits, '/', 1 to 8 hex
    /// digits, either case, no surrounding spaces.
    fn from_str(s: &str) -> Result<Lsn, LsnError> {
        let bad = || LsnError::Syntax(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let half = |h: &str| -> Result<u64, LsnError> {
            // from_str_radix alone would accept a leading '+'.
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u64::from_str_radix(h, 16).map_err(|_| bad())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl fmt::Display for Lsn {
    /// The form PostgreSQL prints, so logs and errors can be pasted into SQL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_postgres() {
        let l: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(l, Lsn(0x16B3748));
        assert_eq!(l.to_string(), "0/16B3748");
        let h: Lsn = "1a/ff".parse().unwrap();
        assert_eq!(h, Lsn((0x1a << 32) | 0xff));
        assert_eq!(h.to_string(), "1A/FF");
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "",
            "/",
            "0/",
            "/1",
            "0x0/1",
            "0/+1",
            "1 /2",
            "0/123456789",
            "g/1",
            "0/1/2",
            "12",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn orders_and_subtracts() {
        let a: Lsn = "0/FFFFFFFF".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.bytes_since(a), 1);
        assert_eq!(a.bytes_since(b), 0);
        assert!(Lsn::default() <= a);
    }
}
