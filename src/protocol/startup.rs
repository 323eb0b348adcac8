//! The first packet a client sends (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest): reading it within bounds and turning its parameters into a typed form.

use tokio::io::{AsyncRead, AsyncReadExt};

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
/// PostgreSQL refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The one protocol version pgmux speaks, as the startup packet and NegotiateProtocolVersion
/// write it (major in the high 16 bits: PostgreSQL's PG_PROTOCOL_LATEST).
pub const PROTOCOL_3_0: i32 = 3 << 16;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("connection closed during startup")]
    Closed,
    #[error("i/o error during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid startup packet length {0}")]
    BadLength(i32),
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedProtocol(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

impl StartupError {
    /// The SQLSTATE PostgreSQL refuses such a packet with.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedProtocol(..) => "0A000",
            _ => "08P01",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Initial {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(StartupPacket),
}

#[derive(Debug, PartialEq, Eq, Default)]
pub struct StartupPacket {
    pub minor: u16,
    /// Parameters in the order sent, `_pq_.` protocol options excluded.
    pub params: Vec<(String, String)>,
    /// `_pq_.` options, which 3.0 does not know: reported in NegotiateProtocolVersion.
    pub protocol_options: Vec<String>,
}

impl StartupPacket {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one initial packet. An EOF before any byte is `Closed`.
pub async fn read_initial<S: AsyncRead + Unpin>(s: &mut S) -> Result<Initial, StartupError> {
    let mut head = [0u8; 4];
    match s.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(head);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).await?;
    parse_initial(&body)
}

/// Parses the body of an initial packet (after its length word).
pub fn parse_initial(body: &[u8]) -> Result<Initial, StartupError> {
    let code = i32::from_be_bytes(
        body.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(StartupError::Malformed("too short"))?,
    );
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(Initial::SslRequest),
        GSSENC_REQUEST if rest.is_empty() => Ok(Initial::GssEncRequest),
        CANCEL_REQUEST if rest.len() == 8 => Ok(Initial::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            Err(StartupError::Malformed("request of wrong length"))
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            parse_params(rest).map(|(params, protocol_options)| {
                Initial::Startup(StartupPacket {
                    minor,
                    params,
                    protocol_options,
                })
            })
        }
    }
}

type Params = (Vec<(String, String)>, Vec<String>);

fn parse_params(mut b: &[u8]) -> Result<Params, StartupError> {
    let mut params = Vec::new();
    let mut options = Vec::new();
    loop {
        let name = super::messages::take_cstr(&mut b)
            .ok_or(StartupError::Malformed("missing terminator"))?;
        if name.is_empty() {
            if !b.is_empty() {
                return Err(StartupError::Malformed("bytes after the terminator"));
            }
            return Ok((params, options));
        }
        let value = super::messages::take_cstr(&mut b)
            .ok_or(StartupError::Malformed("parameter without a value"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("_pq_.") {
            options.push(name);
        } else {
            params.push((name, String::from_utf8_lossy(value).into_owned()));
        }
    }
}

/// Splits a startup `options` value into `name=value` settings (`-c name=value` or
/// `--name=value`, with backslash escaping spaces as libpq does). Anything else is refused.
///
/// ```
/// use pgmux::protocol::startup::parse_options;
/// let s = parse_options("-c search_path=a\\ b --work-mem=4MB").unwrap();
/// assert_eq!(s[0], ("search_path".to_string(), "a b".to_string()));
/// assert_eq!(s[1], ("work_mem".to_string(), "4MB".to_string()));
/// assert!(parse_options("-x").is_err());
/// ```
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_words(options);
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| "option -c needs name=value".to_string())?
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else {
            return Err(format!("unsupported startup option {w:?}"));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("option {setting:?} needs name=value"))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)], code: i32) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn startup_parses() {
        let b = startup(&[("user", "app"), ("_pq_.x", "1")], 196608 + 2);
        let Initial::Startup(p) = parse_initial(&b).unwrap() else {
            panic!()
        };
        assert_eq!(p.minor, 2);
        assert_eq!(p.get("user"), Some("app"));
        assert_eq!(p.protocol_options, vec!["_pq_.x".to_string()]);
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_initial(&SSL_REQUEST.to_be_bytes()).unwrap(),
            Initial::SslRequest
        );
        let mut c = CANCEL_REQUEST.to_be_bytes().to_vec();
        c.extend(7i32.to_be_bytes());
        c.extend(9i32.to_be_bytes());
        assert_eq!(
            parse_initial(&c).unwrap(),
            Initial::Cancel { pid: 7, secret: 9 }
        );
    }

    #[test]
    fn malformed_is_refused() {
        assert!(parse_initial(b"").is_err());
        assert!(parse_initial(&startup(&[], 2 << 16)).is_err());
        let mut b = startup(&[("user", "a")], 196608);
        b.pop();
        assert!(parse_initial(&b).is_err());
        let mut b = 196608i32.to_be_bytes().to_vec();
        b.extend(b"user\0");
        assert!(parse_initial(&b).is_err());
    }

    #[test]
    fn other_major_versions_are_refused_as_postgresql_does() {
        for (code, text) in [
            (
                4 << 16,
                "unsupported frontend protocol 4.0: server supports 3.0 to 3.0",
            ),
            (
                2 << 16,
                "unsupported frontend protocol 2.0: server supports 3.0 to 3.0",
            ),
        ] {
            let e = parse_initial(&startup(&[("user", "a")], code)).unwrap_err();
            assert_eq!((e.sqlstate(), e.to_string().as_str()), ("0A000", text));
        }
        let mut b = startup(&[("user", "a")], 196608);
        b.pop();
        assert_eq!(parse_initial(&b).unwrap_err().sqlstate(), "08P01");
    }

    #[test]
    fn options() {
        assert_eq!(
            parse_options("-c search_path=a\\ b --statement-timeout=5 -cwork_mem=1MB").unwrap(),
            vec![
                ("search_path".to_string(), "a b".to_string()),
                ("statement_timeout".to_string(), "5".to_string()),
                ("work_mem".to_string(), "1MB".to_string())
            ]
        );
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
    }
}
