//! Result sets as the console sends them: RowDescription with PgBouncer's column types,
//! DataRows in text format, CommandComplete. Built into one buffer per command.

use crate::protocol::messages::{message, put_cstr};
use bytes::{BufMut, BytesMut};

/// Column types the console uses (PostgreSQL type OIDs and sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    Int4,
    Int8,
    /// numeric: PgBouncer's type for statistics counters, sent as text like every value.
    Numeric,
    /// float8 (milliseconds in SHOW QUERIES), sent as text like every value.
    Float8,
}

impl Type {
    fn oid(self) -> i32 {
        match self {
            Type::Text => 25,
            Type::Int4 => 23,
            Type::Int8 => 20,
            Type::Numeric => 1700,
            Type::Float8 => 701,
        }
    }

    fn len(self) -> i16 {
        match self {
            Type::Text | Type::Numeric => -1,
            Type::Int4 => 4,
            Type::Int8 | Type::Float8 => 8,
        }
    }
}

/// A value in a row; `Null` is SQL NULL.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
    /// Microseconds since the Unix epoch, in a text column as PgBouncer sends times
    /// (`2026-11-26 18:19:17 UTC`); 0 is shown as NULL.
    Time(u64),
    Null,
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v.min(i64::MAX as u64) as i64)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(v as i64)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(v as i64)
    }
}

impl From<u16> for Value {
    fn from(v: u16) -> Value {
        Value::Int(v as i64)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// One result set under construction.
pub struct ResultSet {
    out: BytesMut,
    columns: usize,
    rows: usize,
    scratch: String,
}

impl ResultSet {
    pub fn new(columns: &[(&str, Type)]) -> ResultSet {
        let mut out = BytesMut::with_capacity(1024);
        message(&mut out, b'T', |b| {
            b.put_i16(columns.len() as i16);
            for (name, ty) in columns {
                put_cstr(b, name.as_bytes());
                b.put_i32(0);
                b.put_i16(0);
                b.put_i32(ty.oid());
                b.put_i16(ty.len());
                b.put_i32(-1);
                b.put_i16(0);
            }
        });
        ResultSet {
            out,
            columns: columns.len(),
            rows: 0,
            scratch: String::new(),
        }
    }

    pub fn row(&mut self, values: Vec<Value>) {
        debug_assert_eq!(values.len(), self.columns, "row width");
        let scratch = &mut self.scratch;
        message(&mut self.out, b'D', |b| {
            b.put_i16(values.len() as i16);
            for v in &values {
                scratch.clear();
                let text: &str = match v {
                    Value::Null | Value::Time(0) => {
                        b.put_i32(-1);
                        continue;
                    }
                    Value::Text(s) => s,
                    Value::Int(i) => {
                        use std::fmt::Write;
                        let _ = write!(scratch, "{i}");
                        scratch
                    }
                    Value::Time(us) => {
                        format_timestamp(scratch, *us);
                        scratch
                    }
                };
                b.put_i32(text.len() as i32);
                b.put_slice(text.as_bytes());
            }
        });
        self.rows += 1;
    }

    /// The finished bytes: description, rows and `CommandComplete` with `tag`.
    pub fn finish(mut self, tag: &str) -> BytesMut {
        command_complete(&mut self.out, tag);
        self.out
    }
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |b| put_cstr(b, tag.as_bytes()));
}

pub fn notice(out: &mut BytesMut, text: &str) {
    message(out, b'N', |b| {
        for (tag, v) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', text),
        ] {
            b.put_u8(tag);
            put_cstr(b, v.as_bytes());
        }
        b.put_u8(0);
    });
}

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer prints times (in UTC, as pgmux logs).
pub fn format_timestamp(out: &mut String, unix_us: u64) {
    use std::fmt::Write;
    let secs = (unix_us / 1_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_text() {
        let mut s = String::new();
        format_timestamp(&mut s, 0);
        assert_eq!(s, "1970-01-01 00:00:00 UTC");
        s.clear();
        // 2024-02-29 12:34:56 UTC
        format_timestamp(&mut s, 1_709_210_096_000_000);
        assert_eq!(s, "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn rows_are_framed() {
        let mut rs = ResultSet::new(&[("a", Type::Text), ("b", Type::Int4)]);
        rs.row(vec!["x".into(), Value::Null]);
        let out = rs.finish("SHOW");
        assert_eq!(out[0], b'T');
        let tlen = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        let d = &out[1 + tlen..];
        assert_eq!(d[0], b'D');
        // two columns: "x" (len 1) and NULL (-1)
        assert_eq!(&d[5..7], &[0, 2]);
        assert_eq!(&d[7..11], &1i32.to_be_bytes());
        assert_eq!(d[11], b'x');
        assert_eq!(&d[12..16], &(-1i32).to_be_bytes());
        assert_eq!(d[16], b'C');
    }
}
