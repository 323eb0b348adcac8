//! Host-based authentication rules (`auth_hba_file`), in pg_hba.conf's format: lines of
//! `type database user address method`, the first line that matches a connection decides its
//! method, and a connection no line matches is refused, as PostgreSQL does.
//!
//! Supported: types `local` (clients of the Unix socket in `unix_socket_dir`), `host`,
//! `hostssl`, `hostnossl` (TCP clients), and `hostgssenc`, `hostnogssenc`, accepted so that a
//! copied pg_hba.conf loads: pgmux has no GSSAPI, so the first never matches and the second
//! is `host`; database `all`,
//! `sameuser` or names; user `all` or names (comma lists and double quotes as in PostgreSQL);
//! address `all`, a CIDR block, or an address followed by a mask; methods `trust`, `reject`,
//! `md5`, `scram-sha-256`, `cert`. Group (`+`) and file (`@`) references, host names and
//! options are refused when the file is loaded rather than misread.

use crate::config::AuthType;
use crate::protocol::PgError;
use crate::tls::Peer;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Trust,
    Reject,
    Md5,
    ScramSha256,
    Cert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnType {
    /// TLS or not
    Host,
    HostSsl,
    HostNoSsl,
    /// a Unix-socket client
    Local,
    /// never matches: pgmux has no GSSAPI
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    All,
    SameUser,
    Is(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    All,
    Net(IpAddr, u8),
}

#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    conn: ConnType,
    databases: Vec<Name>,
    users: Vec<Name>,
    address: Address,
    method: Method,
}

#[derive(Debug, Clone, Default)]
pub struct Hba {
    rules: Vec<Rule>,
}

/// How a client is to be authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run this exchange.
    Exchange(AuthType),
    /// The client's verified certificate names the user: nothing more to ask.
    Certified,
}

impl Hba {
    pub fn load(path: &str) -> Result<Hba, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("auth_hba_file: cannot read {path}: {e}"))?;
        Hba::parse(&text).map_err(|e| format!("auth_hba_file {path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Hba, String> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let fields = tokenize(line).map_err(|e| format!("line {n}: {e}"))?;
            if fields.is_empty() {
                continue;
            }
            rules.push(parse_rule(n, &fields).map_err(|e| format!("line {n}: {e}"))?);
        }
        Ok(Hba { rules })
    }

    /// The method of the first rule that matches, and its line; None when no rule does. `ip`
    /// is None for a Unix-socket client.
    pub fn find(
        &self,
        tls: bool,
        db: &str,
        user: &str,
        ip: Option<IpAddr>,
    ) -> Option<(Method, usize)> {
        let ip = ip.map(|ip| ip.to_canonical());
        self.rules
            .iter()
            .find(|r| {
                let conn = match (r.conn, ip) {
                    (ConnType::Local, None) => true,
                    (ConnType::Host, Some(_)) => true,
                    (ConnType::HostSsl, Some(_)) => tls,
                    (ConnType::HostNoSsl, Some(_)) => !tls,
                    _ => false,
                };
                conn && r.databases.iter().any(|d| match d {
                    Name::All => true,
                    Name::SameUser => db == user,
                    Name::Is(name) => name == db,
                }) && r.users.iter().any(|u| match u {
                    Name::Is(name) => name == user,
                    _ => true,
                }) && ip.is_none_or(|ip| r.address.contains(ip))
            })
            .map(|r| (r.method, r.line))
    }
}

/// The method for this connection: the hba file's when there is one, else `auth_type`.
pub fn decide(
    hba: Option<&Hba>,
    auth_type: AuthType,
    peer: &Peer,
    db: &str,
    user: &str,
) -> Result<Decision, PgError> {
    let Some(hba) = hba else {
        return Ok(Decision::Exchange(auth_type));
    };
    let ip = peer.addr.ip().map(|ip| ip.to_canonical());
    // as PostgreSQL names a Unix-socket client in these messages
    let host = ip.map_or_else(|| "[local]".to_string(), |ip| ip.to_string());
    let encryption = if peer.tls {
        "SSL encryption"
    } else {
        "no encryption"
    };
    match hba.find(peer.tls, db, user, ip) {
        None => Err(PgError::fatal(
            "28000",
            format!(
                "no pg_hba.conf entry for host \"{host}\", user \"{user}\", database \"{db}\", {encryption}"
            ),
        )),
        Some((Method::Reject, _)) => Err(PgError::fatal(
            "28000",
            format!(
                "pg_hba.conf rejects connection for host \"{host}\", user \"{user}\", database \"{db}\", {encryption}"
            ),
        )),
        Some((Method::Trust, _)) => Ok(Decision::Exchange(AuthType::Trust)),
        Some((Method::Md5, _)) => Ok(Decision::Exchange(AuthType::Md5)),
        Some((Method::ScramSha256, _)) => Ok(Decision::Exchange(AuthType::ScramSha256)),
        Some((Method::Cert, _)) if peer.cert_cn.as_deref() == Some(user) => {
            Ok(Decision::Certified)
        }
        Some((Method::Cert, _)) => Err(PgError::fatal(
            "28000",
            format!("certificate authentication failed for user \"{user}\""),
        )),
    }
}

impl Address {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Address::All, _) => true,
            (Address::Net(IpAddr::V4(net), bits), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), *bits)
            }
            (Address::Net(IpAddr::V6(net), bits), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), *bits)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = bits as usize;
    let whole = bits / 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// One field: its comma-separated items, each with whether it was quoted (a quoted `all` is
/// a name, not the keyword).
type Field = Vec<(String, bool)>;

fn tokenize(line: &str) -> Result<Vec<Field>, String> {
    let mut fields: Vec<Field> = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return Ok(fields),
            _ => {}
        }
        let mut field: Field = Vec::new();
        loop {
            let (mut item, mut quoted) = (String::new(), false);
            while let Some(&c) = chars.peek() {
                if c == '"' {
                    chars.next();
                    quoted = true;
                    loop {
                        match chars.next() {
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                item.push('"');
                            }
                            Some('"') => break,
                            Some(c) => item.push(c),
                            None => return Err("unterminated quoted string".into()),
                        }
                    }
                } else if c == ',' || c == '#' || c.is_whitespace() {
                    break;
                } else {
                    item.push(c);
                    chars.next();
                }
            }
            field.push((item, quoted));
            if chars.peek() == Some(&',') {
                chars.next();
                continue;
            }
            break;
        }
        fields.push(field);
    }
}

fn single<'a>(field: &'a Field, what: &str) -> Result<&'a str, String> {
    match field.as_slice() {
        [(s, false)] => Ok(s),
        _ => Err(format!("{what} must be a single keyword")),
    }
}

fn names(field: &Field, what: &str, keywords: &[&str]) -> Result<Vec<Name>, String> {
    field
        .iter()
        .map(|(s, quoted)| match (s.as_str(), quoted) {
            ("", _) => Err(format!("empty {what} name")),
            ("all", false) => Ok(Name::All),
            ("sameuser", false) if keywords.contains(&"sameuser") => Ok(Name::SameUser),
            (k @ ("samerole" | "samegroup" | "replication" | "sameuser"), false) => {
                Err(format!("{what} keyword {k:?} is not supported by pgmux"))
            }
            (s, false) if s.starts_with('+') || s.starts_with('@') => Err(format!(
                "{what} {s:?}: group and file references are not supported by pgmux"
            )),
            (s, _) => Ok(Name::Is(s.to_string())),
        })
        .collect()
}

fn parse_rule(line: usize, fields: &[Field]) -> Result<Rule, String> {
    let conn = match single(&fields[0], "connection type")? {
        "host" | "hostnogssenc" => ConnType::Host,
        "hostssl" => ConnType::HostSsl,
        "hostnossl" => ConnType::HostNoSsl,
        "local" => ConnType::Local,
        "hostgssenc" => ConnType::Never,
        other => return Err(format!("invalid connection type {other:?}")),
    };
    // local lines have no address field
    let need = if fields[0][0].0 == "local" { 4 } else { 5 };
    if fields.len() < need {
        return Err("too few fields (type, database, user, address, method)".into());
    }
    let databases = names(&fields[1], "database", &["sameuser"])?;
    let users = names(&fields[2], "user", &[])?;
    let (address, rest) = if need == 4 {
        (Address::All, &fields[3..])
    } else {
        parse_address(&fields[3..])?
    };
    let method = match single(&rest[0], "authentication method")? {
        "trust" => Method::Trust,
        "reject" => Method::Reject,
        "md5" => Method::Md5,
        "scram-sha-256" => Method::ScramSha256,
        "cert" => Method::Cert,
        other => {
            return Err(format!(
                "authentication method {other:?} is not supported by pgmux"
            ))
        }
    };
    if rest.len() > 1 {
        return Err("authentication options are not supported by pgmux".into());
    }
    Ok(Rule {
        line,
        conn,
        databases,
        users,
        address,
        method,
    })
}

/// The address field (and a separate mask field if one follows); returns what is left.
fn parse_address(fields: &[Field]) -> Result<(Address, &[Field]), String> {
    let addr = single(&fields[0], "address")?;
    if addr == "all" {
        return Ok((Address::All, &fields[1..]));
    }
    if let Some((ip, bits)) = addr.split_once('/') {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid address {addr:?} (host names are not supported)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let bits: u8 = bits
            .parse()
            .ok()
            .filter(|b| *b <= max)
            .ok_or_else(|| format!("invalid CIDR mask in {addr:?}"))?;
        return Ok((Address::Net(ip, bits), &fields[1..]));
    }
    let ip: IpAddr = addr.parse().map_err(|_| {
        format!("invalid address {addr:?} (a CIDR block, an address and mask, or all)")
    })?;
    let mask: IpAddr = fields
        .get(1)
        .and_then(|f| single(f, "mask").ok())
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("address {addr:?} needs a /bits suffix or a mask field"))?;
    let (bits, ok) = match (ip, mask) {
        (IpAddr::V4(_), IpAddr::V4(m)) => {
            let m = u32::from(m);
            (
                m.leading_ones() as u8,
                m.leading_ones() + m.trailing_zeros() == 32,
            )
        }
        (IpAddr::V6(_), IpAddr::V6(m)) => {
            let m = u128::from(m);
            (
                m.leading_ones() as u8,
                m.leading_ones() + m.trailing_zeros() == 128,
            )
        }
        _ => (0, false),
    };
    if !ok {
        return Err(format!("invalid mask for {addr:?}"));
    }
    Ok((Address::Net(ip, bits), &fields[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn first_match_wins() {
        let hba = Hba::parse(
            "# comment\n\
             hostssl all cert_user 0.0.0.0/0 cert\n\
             hostnossl app,\"all\" plain 127.0.0.1/32 md5   # trailing comment\n\
             host sameuser all 10.0.0.0 255.0.0.0 trust\n\
             host all evil ::1/128 reject\n\
             host all all 127.0.0.0/8 scram-sha-256\n\
             local all all trust\n",
        )
        .unwrap();
        let l = ip("127.0.0.1");
        assert_eq!(
            hba.find(true, "app", "cert_user", l),
            Some((Method::Cert, 2))
        );
        assert_eq!(
            hba.find(false, "app", "cert_user", l),
            Some((Method::ScramSha256, 6))
        );
        assert_eq!(hba.find(false, "app", "plain", l), Some((Method::Md5, 3)));
        // "all" in quotes is a database named all
        assert_eq!(hba.find(false, "all", "plain", l), Some((Method::Md5, 3)));
        assert_eq!(
            hba.find(true, "app", "plain", l),
            Some((Method::ScramSha256, 6))
        );
        assert_eq!(
            hba.find(false, "bob", "bob", ip("10.1.2.3")),
            Some((Method::Trust, 4))
        );
        assert_eq!(hba.find(false, "app", "bob", ip("10.1.2.3")), None);
        assert_eq!(
            hba.find(false, "app", "evil", ip("::1")),
            Some((Method::Reject, 5))
        );
        // an IPv4 client seen through an IPv6 socket is matched as IPv4
        assert_eq!(
            hba.find(false, "app", "x", ip("::ffff:127.0.0.1")),
            Some((Method::ScramSha256, 6))
        );
        assert_eq!(hba.find(false, "app", "x", ip("192.168.0.1")), None);
        // a Unix-socket client matches local lines only
        assert_eq!(
            hba.find(false, "app", "cert_user", None),
            Some((Method::Trust, 7))
        );
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (text, want) in [
            (
                "host all all 127.0.0.1/32 password",
                "line 1: authentication method",
            ),
            ("\nhost all all 127.0.0.1/33 trust", "line 2: invalid CIDR"),
            ("host all all example.com trust", "line 1: invalid address"),
            ("host all +admins all trust", "group and file"),
            ("host all all all trust clientcert=verify-full", "options"),
            ("host all all all", "too few fields"),
            ("hosts all all all trust", "invalid connection type"),
            ("host all all 10.0.0.0 255.0.255.0 trust", "invalid mask"),
            ("host \"all all all trust", "unterminated"),
        ] {
            let e = Hba::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn decisions_and_messages() {
        let hba = Hba::parse(
            "hostssl all certy all cert\nhost all nobody all reject\nhost all app all md5\n",
        )
        .unwrap();
        let mut peer = Peer {
            addr: crate::endpoint::ClientAddr::from(
                "127.0.0.1:5000".parse::<std::net::SocketAddr>().unwrap(),
            ),
            tls: false,
            cert_cn: None,
            tls_end_point: None,
        };
        let d = |peer: &Peer, user: &str| decide(Some(&hba), AuthType::Trust, peer, "db", user);
        assert_eq!(d(&peer, "app"), Ok(Decision::Exchange(AuthType::Md5)));
        let e = d(&peer, "nobody").unwrap_err();
        assert_eq!(e.code, "28000");
        assert!(e.message.contains("rejects connection"), "{e}");
        let e = d(&peer, "certy").unwrap_err();
        assert_eq!(
            e.message,
            "no pg_hba.conf entry for host \"127.0.0.1\", user \"certy\", database \"db\", no encryption"
        );
        peer.tls = true;
        assert!(d(&peer, "certy")
            .unwrap_err()
            .message
            .contains("certificate authentication failed"));
        peer.cert_cn = Some("certy".into());
        assert_eq!(d(&peer, "certy"), Ok(Decision::Certified));
        assert_eq!(
            decide(None, AuthType::Md5, &peer, "db", "x"),
            Ok(Decision::Exchange(AuthType::Md5))
        );
    }
}
