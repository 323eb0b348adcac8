//! One server connection: connect, authenticate (trust, cleartext, md5, SCRAM-SHA-256), the
//! parameters the server reported, its cancel key, and the internal queries pgmux runs on it
//! (parameter sync, reset) whose results no client sees.

use crate::auth::channel_binding;
use crate::auth::password::{md5_response, Secret};
use crate::auth::scram_client::KeyedScramClient;
use crate::cancel::{CancelFlight, CancelTarget};
use crate::clock::Mono;
use crate::endpoint::{ServerAddr, TcpOrUnix};
use crate::params::Params;
use crate::protocol::messages::{self, parse_error_fields, parse_parameter_status, ErrorFields};
use crate::tls::ServerStream;
use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest message pgmux reads whole from a server outside the relay (login, internal queries).
const MAX_INTERNAL_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    #[error("server refused: {} ({})", .0.message, .0.code)]
    Refused(ErrorFields),
    /// A refusal of a login made over TLS under server_tls_sslmode = prefer, which is made
    /// again in plain text; `Refused` if that fails too.
    #[error("server refused over TLS: {} ({})", .0.message, .0.code)]
    RefusedOverTls(ErrorFields),
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("server protocol violation: {0}")]
    Protocol(&'static str),
    #[error("cannot authenticate to server: {0}")]
    Auth(&'static str),
    #[error("SCRAM login to server: {0}")]
    Scram(crate::auth::scram_client::ScramClientError),
    #[error("TLS to server: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl ServerError {
    /// A failure a restarting or briefly unreachable server causes: the connection refused
    /// or cut, or the server saying it is starting up or shutting down (class 57P) or failing
    /// the connection (class 08). Not a timeout, nor a refusal of the login itself
    /// (password, database, TLS). A connection cut around the TLS handshake is transient
    /// too: a server shutting down resets it before it can answer.
    pub fn is_transient(&self) -> bool {
        use crate::tls::TlsError;
        match self {
            ServerError::Connect { .. } | ServerError::Io(_) => true,
            ServerError::Tls(TlsError::Io(_)) => true,
            ServerError::Tls(TlsError::Handshake(e)) => is_cut(e),
            ServerError::Refused(f) => {
                f.code.starts_with("57P") || (f.code.starts_with("08") && f.code != "08P01")
            }
            _ => false,
        }
    }

    /// A TLS connection made because server_tls_sslmode prefers it failed at the handshake
    /// or the login: libpq then tries once more in plain text.
    fn tls_preferred_failed(&self) -> bool {
        match self {
            ServerError::RefusedOverTls(_) => true,
            ServerError::Tls(crate::tls::TlsError::Handshake(_)) => {
                crate::tls::server_tls_preferred()
            }
            _ => false,
        }
    }
}

/// The connection was closed or reset under us, as opposed to a certificate or protocol
/// failure the handshake reports as invalid data.
fn is_cut(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
    )
}

/// The error of a preferred TLS login and of its plain-text retry, both refused: both
/// reasons, as libpq reports them (a wrong password over TLS is not hidden behind the
/// pg_hba.conf line that refuses plain text). The SQLSTATE is the plain attempt's, unless
/// that is pg_hba.conf's 28000.
fn both_refusals(tls: ServerError, plain: ServerError) -> ServerError {
    match (tls, plain) {
        (ServerError::RefusedOverTls(t), ServerError::Refused(p)) => {
            ServerError::Refused(ErrorFields {
                code: if p.code == "28000" { t.code } else { p.code },
                message: format!("{} (in plain text); over TLS: {}", p.message, t.message),
                severity: p.severity,
            })
        }
        (_, plain) => plain,
    }
}

/// Where and as whom a pool's connections log in.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub secret: Option<Secret>,
}

impl ServerTarget {
    pub fn addr_string(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct ServerConn {
    pub id: u64,
    pub stream: ServerStream,
    pub addr: ServerAddr,
    pub pid: i32,
    pub secret: i32,
    /// Values the server reported through ParameterStatus, or pgmux set on it.
    pub params: Params,
    /// Non-reported settings pgmux applied for a client, to reset for the next one.
    pub extras: Vec<String>,
    /// The client settings (a shared `Params`, see `Pool::share_wants`) this server was last
    /// brought in step with, and `params.changes()` then: while both hold, the next client
    /// expecting the same settings needs no comparison. The weak pointer keeps the address
    /// from being reused, and a `Params` with weak pointers is never changed in place
    /// (`Arc::make_mut` moves it).
    pub synced: Option<(std::sync::Weak<Params>, u32)>,
    pub created: Mono,
    pub last_used: Mono,
    /// Statements pgmux prepared here under its own names (transaction mode).
    pub statements: crate::prepared::ServerStatements,
    /// A share of the database's max_db_connections, held while the connection lives.
    pub db_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// This connection's cancel key and the cancels on their way to its backend (see `cancel`).
    pub cancels: std::sync::Arc<CancelFlight>,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerConn#{}({}, pid {})", self.id, self.addr, self.pid)
    }
}

impl ServerConn {
    pub async fn connect(
        target: &ServerTarget,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(timeout, Self::connect_inner(target)).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::ConnectTimeout(target.addr_string())),
        }
    }

    async fn connect_inner(target: &ServerTarget) -> Result<ServerConn, ServerError> {
        match Self::connect_once(target, false).await {
            Err(e) if e.tls_preferred_failed() => {
                tracing::debug!(server = %target.addr_string(), "TLS preferred but failed ({e}): trying plain text");
                Self::connect_once(target, true)
                    .await
                    .map_err(|plain| both_refusals(e, plain))
            }
            r => r,
        }
    }

    async fn connect_once(target: &ServerTarget, plain: bool) -> Result<ServerConn, ServerError> {
        let (socket, addr, dial) = crate::endpoint::open(&target.host, target.port)
            .await
            .map_err(|source| ServerError::Connect {
                addr: target.addr_string(),
                source,
            })?;
        let stream = match socket {
            TcpOrUnix::Tcp(tcp) => crate::tls::connect_server(tcp, &target.host, plain).await?,
            unix => unix.plain(),
        };
        let tls = stream.is_tls();
        let now = Mono::now();
        let mut conn = ServerConn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            addr,
            pid: 0,
            secret: 0,
            params: Params::default(),
            extras: Vec::new(),
            synced: None,
            created: now,
            last_used: now,
            statements: Default::default(),
            db_permit: None,
            cancels: Default::default(),
        };
        conn.login(target).await.map_err(|e| match e {
            // the server refused the login over TLS: under prefer, libpq tries plain text
            ServerError::Refused(f) if tls && crate::tls::server_tls_preferred() => {
                ServerError::RefusedOverTls(f)
            }
            e => e,
        })?;
        // the key is known once logged in: clients' cancels reach this backend through it
        let tls_host = conn.stream.is_tls().then(|| target.host.as_str().into());
        conn.cancels = std::sync::Arc::new(
            CancelFlight::new(dial, conn.pid, conn.secret).with_tls_host(tls_host),
        );
        Ok(conn)
    }

    async fn login(&mut self, target: &ServerTarget) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        let params = [
            ("user", target.user.as_str()),
            ("database", target.dbname.as_str()),
        ];
        frontend::startup_message(params, &mut out)?;
        self.stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut scram: Option<ScramLogin> = None;
        loop {
            let (tag, body) = self.read_message(&mut buf).await?;
            match tag {
                b'R' => self.auth_step(target, &body, &mut scram).await?,
                b'S' => self.note_parameter(&body),
                b'K' if body.len() == 8 => {
                    self.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    self.secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                }
                b'E' => return Err(ServerError::Refused(parse_error_fields(&body))),
                b'Z' => return Ok(()),
                b'N' | b'v' => {}
                _ => return Err(ServerError::Protocol("unexpected message during login")),
            }
        }
    }

    async fn auth_step(
        &mut self,
        target: &ServerTarget,
        body: &[u8],
        scram: &mut Option<ScramLogin>,
    ) -> Result<(), ServerError> {
        if body.len() < 4 {
            return Err(ServerError::Protocol("short authentication message"));
        }
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let data = &body[4..];
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => {
                let Some(Secret::Plain(pw)) = &target.secret else {
                    return Err(ServerError::Auth(
                        "server asks for a password; plain text password needed",
                    ));
                };
                frontend::password_message(pw.as_bytes(), &mut out)?;
            }
            5 => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| ServerError::Protocol("bad md5 salt"))?;
                let response = match &target.secret {
                    Some(Secret::Plain(pw)) => postgres_protocol::authentication::md5_hash(
                        target.user.as_bytes(),
                        pw.as_bytes(),
                        salt,
                    ),
                    Some(Secret::Md5(digest)) => md5_response(digest, salt),
                    _ => return Err(ServerError::Auth("server asks for md5; no usable password")),
                };
                frontend::password_message(response.as_bytes(), &mut out)?;
            }
            10 => {
                // bind to the server's certificate when it offers to, as libpq's default
                // channel_binding=prefer does
                let binding = self
                    .stream
                    .tls_end_point()
                    .filter(|_| sasl_offers(data, channel_binding::MECHANISM_PLUS));
                let mechanism = match binding {
                    Some(_) => channel_binding::MECHANISM_PLUS,
                    None if sasl_offers(data, "SCRAM-SHA-256") => "SCRAM-SHA-256",
                    None => {
                        return Err(ServerError::Auth(
                            "server offers no supported SASL mechanism",
                        ))
                    }
                };
                let s = ScramLogin::start(target.secret.as_ref(), binding)?;
                frontend::sasl_initial_response(mechanism, &s.first_message(), &mut out)?;
                *scram = Some(s);
            }
            11 => {
                let s = scram
                    .as_mut()
                    .ok_or(ServerError::Protocol("SASL continue out of order"))?;
                let reply = s.server_first(data)?;
                frontend::sasl_response(&reply, &mut out)?;
            }
            12 => {
                let s = scram
                    .as_mut()
                    .ok_or(ServerError::Protocol("SASL final out of order"))?;
                s.server_final(data)?;
                return Ok(());
            }
            _ => return Err(ServerError::Auth("server asks for an unsupported method")),
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Records a ParameterStatus body.
    pub fn note_parameter(&mut self, body: &[u8]) {
        if let Some((k, v)) = parse_parameter_status(body) {
            if let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) {
                self.params.set(k, v);
            }
        }
    }

    /// Reads one whole message, returning its tag and body.
    async fn read_message(&mut self, buf: &mut BytesMut) -> Result<(u8, Bytes), ServerError> {
        loop {
            if buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if !(4..=MAX_INTERNAL_MESSAGE).contains(&len) {
                    return Err(ServerError::Protocol("bad message length"));
                }
                if buf.len() > len {
                    let tag = buf[0];
                    let mut msg = buf.split_to(len + 1);
                    msg.advance(5);
                    return Ok((tag, msg.freeze()));
                }
                buf.reserve(len + 1 - buf.len());
            } else {
                buf.reserve(1024);
            }
            if self.stream.read_buf(buf).await? == 0 {
                return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs a simple query whose results nobody sees; returns the server's first error.
    /// The connection is idle again afterwards unless an I/O error is returned.
    pub async fn run_internal(&mut self, sql: &str) -> Result<Option<ErrorFields>, ServerError> {
        self.query_internal(sql, None).await
    }

    /// Like `run_internal`, collecting the rows (text columns, NULL as empty) into `rows`.
    pub async fn query_internal(
        &mut self,
        sql: &str,
        rows: Option<&mut Vec<Vec<String>>>,
    ) -> Result<Option<ErrorFields>, ServerError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.exchange_internal(&out, rows).await
    }

    /// Runs one statement with text parameters ($1, ...) through the extended protocol, so
    /// values never need quoting; rows as `query_internal`.
    pub async fn query_params_internal(
        &mut self,
        sql: &str,
        params: &[&str],
        rows: &mut Vec<Vec<String>>,
    ) -> Result<Option<ErrorFields>, ServerError> {
        let mut out = BytesMut::new();
        let bad = |_| ServerError::Protocol("internal statement too large to encode");
        frontend::parse("", sql, std::iter::empty(), &mut out).map_err(bad)?;
        frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut out,
        )
        .map_err(|_| ServerError::Protocol("internal statement too large to encode"))?;
        frontend::execute("", 0, &mut out).map_err(bad)?;
        frontend::sync(&mut out);
        self.exchange_internal(&out, Some(rows)).await
    }

    /// Sends `request` and reads the answers up to ReadyForQuery.
    async fn exchange_internal(
        &mut self,
        request: &[u8],
        mut rows: Option<&mut Vec<Vec<String>>>,
    ) -> Result<Option<ErrorFields>, ServerError> {
        self.stream.write_all(request).await?;
        let mut buf = BytesMut::with_capacity(512);
        let mut error = None;
        loop {
            let (tag, body) = self.read_message(&mut buf).await?;
            match tag {
                b'S' => self.note_parameter(&body),
                b'E' if error.is_none() => error = Some(parse_error_fields(&body)),
                b'D' => {
                    if let Some(rows) = rows.as_deref_mut() {
                        rows.push(data_row(&body).ok_or(ServerError::Protocol("bad DataRow"))?);
                    }
                }
                b'Z' => {
                    if !buf.is_empty() {
                        return Err(ServerError::Protocol("data after ReadyForQuery"));
                    }
                    // pgmux's own statements run between transactions and must end there (a
                    // server_reset_query such as BEGIN would hand the next client a transaction)
                    if body.first() != Some(&b'I') {
                        return Err(ServerError::Protocol(
                            "the statement left a transaction open",
                        ));
                    }
                    return Ok(error);
                }
                _ => {}
            }
        }
    }

    /// True when the server closed the connection or sent something unprompted (such as a
    /// FATAL error before a shutdown) while it sat idle: either way it cannot be lent.
    pub fn is_broken(&self) -> bool {
        self.stream.is_broken()
    }

    /// Last brought in step with these very settings (a shared `Params`, see
    /// `Pool::share_wants`) and unchanged since: a client expecting them needs no SET.
    pub fn in_step_with(&self, wants: &std::sync::Arc<Params>) -> bool {
        self.synced.as_ref().is_some_and(|(w, changes)| {
            std::ptr::eq(w.as_ptr(), std::sync::Arc::as_ptr(wants))
                && *changes == self.params.changes()
        })
    }

    pub fn cancel_target(&self) -> CancelTarget {
        self.cancels.clone()
    }

    /// Says goodbye without waiting: a Terminate if the socket takes it now.
    pub fn close(mut self) {
        self.stream.write_now(&[b'X', 0, 0, 0, 4]);
    }
}

/// A DataRow's columns as text.
fn data_row(body: &[u8]) -> Option<Vec<String>> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut at = 2usize;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            cols.push(String::new());
            continue;
        }
        let v = body.get(at..at + len as usize)?;
        cols.push(String::from_utf8_lossy(v).into_owned());
        at += len as usize;
    }
    Some(cols)
}

/// pgmux's side of a SCRAM login: with the password, or with a ClientKey a client proved.
enum ScramLogin {
    Password(ScramSha256),
    Keys(KeyedScramClient),
}

impl ScramLogin {
    /// `binding`: the server's certificate hash when the exchange is to be bound.
    fn start(secret: Option<&Secret>, binding: Option<Vec<u8>>) -> Result<ScramLogin, ServerError> {
        match secret {
            Some(Secret::Plain(pw)) => {
                let cb = match binding {
                    Some(hash) => ChannelBinding::tls_server_end_point(hash),
                    None => ChannelBinding::unsupported(),
                };
                Ok(ScramLogin::Password(ScramSha256::new(pw.as_bytes(), cb)))
            }
            Some(Secret::ScramKeys {
                verifier,
                client_key,
            }) => Ok(ScramLogin::Keys(KeyedScramClient::new(
                verifier.clone(),
                *client_key,
                binding,
            ))),
            _ => Err(ServerError::Auth(
                "server asks for SCRAM; pgmux has neither the password nor a client's proof",
            )),
        }
    }

    fn first_message(&self) -> Vec<u8> {
        match self {
            ScramLogin::Password(s) => s.message().to_vec(),
            ScramLogin::Keys(k) => k.client_first(),
        }
    }

    fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ServerError> {
        match self {
            ScramLogin::Password(s) => {
                s.update(data)
                    .map_err(|_| ServerError::Auth("SCRAM exchange failed"))?;
                Ok(s.message().to_vec())
            }
            ScramLogin::Keys(k) => k.server_first(data).map_err(ServerError::Scram),
        }
    }

    fn server_final(&mut self, data: &[u8]) -> Result<(), ServerError> {
        match self {
            ScramLogin::Password(s) => s
                .finish(data)
                .map_err(|_| ServerError::Auth("server's SCRAM signature is invalid")),
            ScramLogin::Keys(k) => k.server_final(data).map_err(ServerError::Scram),
        }
    }
}

fn sasl_offers(mut data: &[u8], mechanism: &str) -> bool {
    while let Some(m) = messages::take_cstr(&mut data) {
        if m.is_empty() {
            break;
        }
        if m == mechanism.as_bytes() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsError;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_connection_cut_around_tls_is_transient_but_a_bad_certificate_is_not() {
        let reset = || Error::new(ErrorKind::ConnectionReset, "reset");
        assert!(ServerError::Tls(TlsError::Io(reset())).is_transient());
        assert!(ServerError::Tls(TlsError::Handshake(reset())).is_transient());
        let cert = Error::new(ErrorKind::InvalidData, "invalid peer certificate");
        assert!(!ServerError::Tls(TlsError::Handshake(cert)).is_transient());
        assert!(!ServerError::Tls(TlsError::ServerRefusedSsl).is_transient());
    }
}
