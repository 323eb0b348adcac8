//! The few messages pgmux itself writes (to clients: errors, authentication, status; to
//! servers: queries) and the few bodies it reads (ErrorResponse, ParameterStatus).

use bytes::{BufMut, BytesMut};

/// An error pgmux reports to a client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: &'static str,
    pub code: String,
    pub message: String,
}

impl PgError {
    pub fn fatal(code: &str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "FATAL",
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn error(code: &str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "ERROR",
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        message(out, b'E', |b| {
            field(b, b'S', self.severity);
            field(b, b'V', self.severity);
            field(b, b'C', &self.code);
            field(b, b'M', &self.message);
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)
    }
}

fn field(b: &mut BytesMut, tag: u8, value: &str) {
    b.put_u8(tag);
    // a NUL would end the field early and the rest would be read as more fields: text from
    // a client that slipped into a message must not break the framing
    for (i, part) in value.split('\0').enumerate() {
        if i > 0 {
            b.put_slice(b"\\0");
        }
        b.put_slice(part.as_bytes());
    }
    b.put_u8(0);
}

pub fn put_cstr(b: &mut BytesMut, s: &[u8]) {
    b.put_slice(s);
    b.put_u8(0);
}

/// Writes a tagged message, filling in its length after the body is written.
pub fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

pub fn parameter_status(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    message(out, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub fn auth_md5(out: &mut BytesMut, salt: [u8; 4]) {
    message(out, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    message(out, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// `newest` is a whole version (major << 16 | minor), as PostgreSQL sends it and libpq reads
/// it, although the protocol's documentation speaks of a minor version alone.
pub fn negotiate_protocol_version(out: &mut BytesMut, newest: i32, unrecognized: &[String]) {
    message(out, b'v', |b| {
        b.put_i32(newest);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o.as_bytes());
        }
    });
}

pub fn query(out: &mut BytesMut, sql: &str) {
    message(out, b'Q', |b| put_cstr(b, sql.as_bytes()));
}

pub fn terminate(out: &mut BytesMut) {
    message(out, b'X', |_| {});
}

/// Whether a logged-in client may send this message type (PostgreSQL's list; `p` belongs to
/// authentication only).
pub fn is_frontend_type(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X'
    )
}

/// Splits a NUL-terminated string off the front of `b`.
pub fn take_cstr<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = &b[..end];
    *b = &b[end + 1..];
    Some(s)
}

/// (name, value) of a ParameterStatus body.
pub fn parse_parameter_status(mut body: &[u8]) -> Option<(&[u8], &[u8])> {
    let name = take_cstr(&mut body)?;
    let value = take_cstr(&mut body)?;
    Some((name, value))
}

/// The fields pgmux cares about in an ErrorResponse or NoticeResponse body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error_fields(mut body: &[u8]) -> ErrorFields {
    let mut f = ErrorFields::default();
    while let Some((&tag, rest)) = body.split_first() {
        if tag == 0 {
            break;
        }
        body = rest;
        let Some(value) = take_cstr(&mut body) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match tag {
            b'V' => f.severity = value,
            b'S' if f.severity.is_empty() => f.severity = value,
            b'C' => f.code = value,
            b'M' => f.message = value,
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let mut out = BytesMut::new();
        PgError::fatal("28P01", "password authentication failed for user \"x\"").encode(&mut out);
        assert_eq!(out[0], b'E');
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
        let f = parse_error_fields(&out[5..]);
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.code, "28P01");
        assert!(f.message.contains("password"));
    }

    #[test]
    fn a_nul_in_an_error_text_keeps_the_framing() {
        let mut out = BytesMut::new();
        PgError::error("08P01", "bad \0 byte").encode(&mut out);
        let f = parse_error_fields(&out[5..]);
        assert_eq!(
            (f.code.as_str(), f.message.as_str()),
            ("08P01", "bad \\0 byte")
        );
        assert_eq!(out[5..].iter().filter(|&&b| b == 0).count(), 5, "{out:?}");
    }

    #[test]
    fn parameter_status_round_trip() {
        let mut out = BytesMut::new();
        parameter_status(&mut out, b"TimeZone", b"UTC");
        assert_eq!(
            parse_parameter_status(&out[5..]),
            Some((&b"TimeZone"[..], &b"UTC"[..]))
        );
        assert_eq!(parse_parameter_status(b"no-nul"), None);
    }

    #[test]
    fn truncated_error_fields_do_not_panic() {
        let f = parse_error_fields(b"SERR");
        assert_eq!(f, ErrorFields::default());
        let _ = parse_error_fields(b"C");
        let _ = parse_error_fields(b"");
    }
}
