//! The admin console: a client that logs in to the virtual database `pgmux` (or
//! `pgbouncer`) as one of `admin_users` or `stats_users` talks to pgmux itself over the
//! simple query protocol. SHOW commands (`show`) read the same counters as `/metrics`;
//! control commands (PAUSE, RESUME, RELOAD, KILL, RECONNECT, SHUTDOWN, SET) act on the
//! shared `App`. Extended-protocol messages are refused with an error, and messages
//! PostgreSQL would refuse are refused as it does.

mod settings;
mod show;
pub mod wire;

pub use show::probe;

use crate::app::{App, Shutdown};
use crate::endpoint::ClientAddr;
use crate::protocol::messages;
use crate::protocol::PgError;
use crate::tls::ClientStream;
use bytes::{Buf, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// Largest console message accepted; commands are short.
const MAX_MESSAGE: usize = 64 * 1024;
/// Input kept while a command waits; past it the console is not read until the command ends.
const MAX_PENDING: usize = 64 * 1024;

/// How often PAUSE checks whether the paused pools have given back their servers.
const PAUSE_POLL: Duration = Duration::from_millis(20);

/// The names of the console's virtual database.
pub fn is_console_db(name: &str) -> bool {
    name == "pgmux" || name == "pgbouncer"
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every command.
    Admin,
    /// SHOW only.
    Stats,
}

/// A client admitted to the console.
#[derive(Debug)]
pub struct Console {
    pub user: String,
    pub role: Role,
}

/// Whether `user` may open the console; anyone else gets 42501 (as PgBouncer refuses).
pub fn admit(app: &App, user: &str) -> Result<Console, PgError> {
    match app.console_role(user) {
        Some(role) => Ok(Console {
            user: user.to_string(),
            role,
        }),
        None => Err(PgError::fatal(
            "42501",
            format!("user \"{user}\" is not allowed to use the admin console"),
        )),
    }
}

/// Serves a console session after AuthenticationOk has been sent.
pub async fn serve(app: Arc<App>, mut stream: ClientStream, peer: ClientAddr, console: Console) {
    info!(%peer, user = %console.user, "admin console connected");
    let mut out = BytesMut::new();
    for (k, v) in [
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), "/pgmux"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        messages::parameter_status(&mut out, k.as_bytes(), v.as_bytes());
    }
    messages::backend_key_data(
        &mut out,
        rand::random::<i32>() & 0x7fff_ffff,
        rand::random(),
    );
    messages::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let mut session = Session {
        app: app.clone(),
        console,
        skipping: false,
    };
    let mut shutdown = app.shutdown_signal();
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match next_message(&mut buf) {
            Err(e) => {
                let mut out = BytesMut::new();
                e.encode(&mut out);
                let _ = stream.write_all(&out).await;
                break;
            }
            Ok(Some((tag, body))) => {
                if tag == b'X' {
                    break;
                }
                // A command that waits (PAUSE, WAIT_CLOSE) ends with its console: what the
                // client sends meanwhile is kept for after it, and its hangup ends the wait.
                let work = session.handle(tag, &body);
                tokio::pin!(work);
                let out = loop {
                    tokio::select! {
                        out = &mut work => break Some(out),
                        r = stream.read_buf(&mut buf), if buf.len() < MAX_PENDING => match r {
                            Ok(0) | Err(_) => break None,
                            Ok(_) => {}
                        },
                    }
                };
                let Some(out) = out else { break };
                if stream.write_all(&out).await.is_err() {
                    break;
                }
                continue;
            }
            Ok(None) => {}
        }
        tokio::select! {
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow_and_update() >= Shutdown::Safe {
                    let mut out = BytesMut::new();
                    PgError::fatal("57P01", "terminating connection due to administrator command")
                        .encode(&mut out);
                    let _ = stream.write_all(&out).await;
                    break;
                }
            }
        }
    }
    info!(%peer, "admin console disconnected");
}

/// Splits one whole message off the buffer. A type PostgreSQL would not accept ends the
/// session, as there: nothing after it can be framed with confidence.
fn next_message(buf: &mut BytesMut) -> Result<Option<(u8, BytesMut)>, PgError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if !messages::is_frontend_type(buf[0]) {
        return Err(PgError::fatal(
            "08P01",
            format!("invalid frontend message type {}", buf[0]),
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(PgError::fatal("08P01", "invalid message length"));
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    let mut msg = buf.split_to(len + 1);
    msg.advance(5);
    Ok(Some((tag, msg)))
}

struct Session {
    app: Arc<App>,
    console: Console,
    /// After an extended-protocol message: everything up to Sync is ignored.
    skipping: bool,
}

impl Session {
    async fn handle(&mut self, tag: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        match tag {
            b'Q' => {
                match query_text(body) {
                    Ok(sql) => self.query(&String::from_utf8_lossy(sql), &mut out).await,
                    Err(e) => e.encode(&mut out),
                }
                messages::ready_for_query(&mut out, b'I');
            }
            b'S' if self.skipping => {
                self.skipping = false;
                messages::ready_for_query(&mut out, b'I');
            }
            b'S' => messages::ready_for_query(&mut out, b'I'),
            _ if self.skipping => {}
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' => {
                self.skipping = tag != b'F';
                PgError::error(
                    "0A000",
                    "the admin console supports only the simple query protocol",
                )
                .encode(&mut out);
                if tag == b'F' {
                    messages::ready_for_query(&mut out, b'I');
                }
            }
            // CopyData, CopyDone, CopyFail: ignored outside COPY, as PostgreSQL ignores them
            // (every other type was refused by `next_message`)
            _ => {}
        }
        out
    }

    /// Runs each statement of a query string; the first error ends it.
    async fn query(&mut self, sql: &str, out: &mut BytesMut) {
        let statements = split_statements(sql);
        if statements.is_empty() {
            messages::message(out, b'I', |_| {});
            return;
        }
        for stmt in statements {
            match self.command(&stmt).await {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(e) => {
                    warn!(user = %self.console.user, "admin command {stmt:?} failed: {}", e.message);
                    e.encode(out);
                    return;
                }
            }
        }
    }

    async fn command(&mut self, stmt: &str) -> Result<BytesMut, PgError> {
        // a SET's value is a '...' string, which may hold anything: read by `parse_set`
        let first = stmt.split_whitespace().next().unwrap_or_default();
        if first.eq_ignore_ascii_case("SET") {
            return self.set(stmt);
        }
        let words = words(stmt).ok_or_else(|| syntax(stmt))?;
        // a keyword is never quoted: `"SHOW" POOLS` is no command
        let keyword = |i: usize| {
            words
                .get(i)
                .filter(|w| !w.quoted)
                .map(|w| w.text.to_ascii_uppercase())
        };
        let verb = keyword(0).ok_or_else(|| syntax(stmt))?;
        if verb == "SHOW" {
            let what = keyword(1);
            if words.len() > 1 && what.is_none() {
                return Err(syntax(stmt));
            }
            let arg = words.get(2).map(|w| w.text.clone());
            if words.len() > 3 {
                return Err(syntax(stmt));
            }
            let what = what.as_deref().unwrap_or("");
            // only the STATS family takes an argument (a database), as in PgBouncer
            if arg.is_some() && !what.starts_with("STATS") {
                return Err(syntax(stmt));
            }
            return show::run(&self.app, what, arg.as_deref())
                .await
                .ok_or_else(|| syntax(stmt));
        }
        if self.console.role != Role::Admin {
            return Err(PgError::error("42501", "admin access needed"));
        }
        let arg = words.get(1).map(|w| w.text.clone());
        let one_arg = words.len() <= 2;
        let done = |tag: &str| {
            let mut b = BytesMut::new();
            wire::command_complete(&mut b, tag);
            b
        };
        match verb.as_str() {
            "PAUSE" if one_arg => {
                self.pause(arg.as_deref()).await?;
                Ok(done("PAUSE"))
            }
            "RESUME" if one_arg => {
                self.known_db(arg.as_deref())?;
                if !self.app.resume(arg.as_deref()) {
                    // as PgBouncer: a RESUME that resumes nothing is a mistake worth hearing of
                    return Err(PgError::error(
                        "55000",
                        match arg.as_deref() {
                            None => "pooler is not paused".to_string(),
                            Some(d) => format!("database {d} is not paused"),
                        },
                    ));
                }
                info!(user = %self.console.user, db = ?arg, "RESUME");
                Ok(done("RESUME"))
            }
            "RELOAD" if words.len() == 1 => {
                self.app
                    .reload()
                    .map_err(|e| PgError::error("F0000", format!("RELOAD failed: {e}")))?;
                Ok(done("RELOAD"))
            }
            "DISABLE" | "ENABLE" if words.len() == 2 => {
                let db = arg.as_deref().unwrap_or_default();
                self.known_db(Some(db))?;
                self.app.set_disabled(db, verb == "DISABLE");
                info!(user = %self.console.user, db, "{verb}");
                Ok(done(&verb))
            }
            "KILL" if words.len() == 2 => {
                let db = arg.as_deref().unwrap_or_default();
                self.known_db(Some(db))?;
                self.kill(db);
                Ok(done("KILL"))
            }
            "KILL_CLIENT" if words.len() == 2 => {
                let id = words[1].text.parse().map_err(|_| syntax(stmt))?;
                self.kill_client(id)?;
                Ok(done("KILL_CLIENT"))
            }
            "WAIT_CLOSE" if one_arg => {
                self.known_db(arg.as_deref())?;
                self.wait_close(arg.as_deref()).await?;
                Ok(done("WAIT_CLOSE"))
            }
            "RECONNECT" if one_arg => {
                self.known_db(arg.as_deref())?;
                for p in self.app.all_pools() {
                    if arg.as_deref().is_none_or(|d| p.db == d) {
                        p.reconnect();
                    }
                }
                info!(user = %self.console.user, db = ?arg, "RECONNECT");
                Ok(done("RECONNECT"))
            }
            "SHUTDOWN" if one_arg => {
                // as PgBouncer 1.23: WAIT_FOR_CLIENTS is SIGTERM's drain, WAIT_FOR_SERVERS
                // SIGINT's safe shutdown; bare SHUTDOWN is pgmux's safe shutdown too
                let stage = match keyword(1).as_deref() {
                    None | Some("WAIT_FOR_SERVERS") => Shutdown::Safe,
                    Some("WAIT_FOR_CLIENTS") => Shutdown::Drain,
                    Some(_) => return Err(syntax(stmt)),
                };
                warn!(user = %self.console.user, "{stmt} from the admin console");
                self.app.request_shutdown(stage);
                Ok(done("SHUTDOWN"))
            }
            _ => Err(syntax(stmt)),
        }
    }

    /// `SET key = value`: a setting of pgmux (admin_users only), or a client parameter a
    /// driver sets, acknowledged and ignored (any console user).
    fn set(&self, stmt: &str) -> Result<BytesMut, PgError> {
        if let Some(ignored) = client_parameter_set(stmt) {
            return Ok(ignored);
        }
        if self.console.role != Role::Admin {
            return Err(PgError::error("42501", "admin access needed"));
        }
        let (key, value) = parse_set(stmt).ok_or_else(|| syntax(stmt))?;
        settings::set(&self.app, &key, &value).map_err(|m| PgError::error("22023", m))?;
        info!(user = %self.console.user, "SET {key} = {value:?}");
        let mut b = BytesMut::new();
        wire::command_complete(&mut b, "SET");
        Ok(b)
    }

    /// A database the command may name: one in the configuration, or one a reload removed
    /// that still has clients or a pause (so RESUME and KILL reach the clients it strands).
    fn known_db(&self, db: Option<&str>) -> Result<(), PgError> {
        match db {
            Some(d) if !self.app.knows_db(d) => Err(PgError::error(
                "3D000",
                format!("database \"{d}\" does not exist"),
            )),
            _ => Ok(()),
        }
    }

    /// PAUSE: new checkouts wait; returns once no server of the paused pools is lent, and
    /// their idle servers are closed (so the database can be restarted).
    async fn pause(&self, db: Option<&str>) -> Result<(), PgError> {
        self.known_db(db)?;
        if self.app.already_paused(db) {
            // as PgBouncer: a PAUSE that pauses nothing new is a mistake worth hearing of
            return Err(PgError::error(
                "55000",
                match db {
                    None => "already suspended/paused".to_string(),
                    Some(d) => format!("database {d} is already paused"),
                },
            ));
        }
        info!(user = %self.console.user, db = ?db, "PAUSE: waiting for running transactions");
        let pools = self.app.pause(db);
        let mut tick = tokio::time::interval(PAUSE_POLL);
        loop {
            tick.tick().await;
            // counted before closing idle ones: once nothing is lent, nothing can come back
            let busy = pools.iter().any(|p| {
                let c = p.counts();
                c.active > 0 || c.connecting > 0
            });
            pools.iter().for_each(|p| p.close_idle());
            if !busy {
                return Ok(());
            }
            if self.app.shutdown_stage() >= Shutdown::Safe {
                return Err(PgError::error("57P01", "shutting down"));
            }
            if !pools.iter().any(|p| p.is_paused()) {
                return Err(PgError::error(
                    "57014",
                    "PAUSE was resumed before it completed",
                ));
            }
        }
    }

    /// KILL_CLIENT id (the `id` of SHOW CLIENTS): that client is disconnected now, as by
    /// KILL, and a server it held in a transaction is closed; nothing else is paused.
    fn kill_client(&self, id: u64) -> Result<(), PgError> {
        let client = self
            .app
            .registry
            .snapshot()
            .into_iter()
            .find(|c| c.id == id);
        let Some(client) = client else {
            return Err(PgError::error("42704", format!("client {id} not found")));
        };
        warn!(user = %self.console.user, id, db = client.db(), "KILL_CLIENT");
        client.kill();
        Ok(())
    }

    /// WAIT_CLOSE: returns once no server of the database (of every database without an
    /// argument) is marked close_needed (RECONNECT, or a RELOAD that changed its target),
    /// so a switchover script knows the old connections are gone.
    async fn wait_close(&self, db: Option<&str>) -> Result<(), PgError> {
        let mut tick = tokio::time::interval(PAUSE_POLL);
        let mut said = false;
        loop {
            tick.tick().await;
            let pending = self
                .app
                .all_pools()
                .iter()
                .any(|p| db.is_none_or(|d| p.db == d) && p.has_close_needed());
            if !pending {
                return Ok(());
            }
            if !said {
                info!(user = %self.console.user, db = ?db, "WAIT_CLOSE: waiting for servers marked close_needed");
                said = true;
            }
            if self.app.shutdown_stage() >= Shutdown::Safe {
                return Err(PgError::error("57P01", "shutting down"));
            }
        }
    }

    /// KILL db: its clients are disconnected now, its servers closed, and new clients wait
    /// for RESUME.
    fn kill(&self, db: &str) {
        warn!(user = %self.console.user, db, "KILL");
        let pools = self.app.pause(Some(db));
        for c in self.app.registry.snapshot() {
            if c.db() == db {
                c.kill();
            }
        }
        for p in pools {
            p.reconnect();
        }
    }
}

/// A Query's text: one NUL-terminated string filling the body, else PostgreSQL's ERROR for
/// the malformed message (a pooled client gets the same from its server).
fn query_text(body: &[u8]) -> Result<&[u8], PgError> {
    match body.iter().position(|&b| b == 0) {
        None => Err(PgError::error("08P01", "invalid string in message")),
        Some(end) if end + 1 != body.len() => {
            Err(PgError::error("08P01", "invalid message format"))
        }
        Some(end) => Ok(&body[..end]),
    }
}

fn syntax(stmt: &str) -> PgError {
    PgError::error("42601", format!("invalid command '{stmt}', use SHOW HELP;"))
}

/// Statements separated by `;` outside single quotes and double-quoted names, trimmed, empty
/// ones dropped.
fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    // the quote character open now, if any ('' and "" inside close and reopen it: the same)
    let mut open: Option<char> = None;
    for c in sql.chars() {
        match (c, open) {
            ('\'' | '"', None) => {
                open = Some(c);
                cur.push(c);
            }
            (c, Some(q)) if c == q => {
                open = None;
                cur.push(c);
            }
            (';', None) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// One word of a console command: a keyword or a name.
#[derive(Debug, PartialEq)]
struct Word {
    /// As written, or for a quoted name its content (`""` read as `"`).
    text: String,
    /// It was a double-quoted name, which may hold spaces, `;` and quotes.
    quoted: bool,
}

/// The words of a command, separated by whitespace; a double-quoted name is one word (as
/// PgBouncer reads it). Names match the configuration exactly, quoted or not. None for an
/// unterminated quote or a quote that does not stand alone (`a"b"`).
fn words(stmt: &str) -> Option<Vec<Word>> {
    let mut out = Vec::new();
    let mut chars = stmt.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Some(out);
        };
        let mut text = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.next_if_eq(&'"').is_some() => text.push('"'),
                    '"' => break,
                    c => text.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return None;
            }
            out.push(Word { text, quoted: true });
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '"' {
                    return None;
                }
                text.push(c);
            }
            out.push(Word {
                text,
                quoted: false,
            });
        }
    }
}

/// `SET key = value` or `SET key TO value`; value a word or a '...' string.
/// The parameters drivers set on any connection (as PgBouncer tracks them): a console SET of
/// one is acknowledged with a notice and changes nothing, as PgBouncer answers it, so a
/// driver's session setup does not fail on the console.
const CLIENT_PARAMETERS: &[&str] = &[
    "client_encoding",
    "datestyle",
    "timezone",
    "standard_conforming_strings",
];

fn client_parameter_set(stmt: &str) -> Option<BytesMut> {
    let (key, _) = parse_set(stmt)?;
    if !CLIENT_PARAMETERS.contains(&key.as_str()) {
        return None;
    }
    let mut b = BytesMut::new();
    wire::notice(&mut b, "SET ignored");
    wire::command_complete(&mut b, "SET");
    Some(b)
}

fn parse_set(stmt: &str) -> Option<(String, String)> {
    let rest = stmt.get(3..)?.trim_start();
    if !stmt[..3].eq_ignore_ascii_case("set") {
        return None;
    }
    let key_end = rest.find(|c: char| c.is_whitespace() || c == '=')?;
    let key = rest[..key_end].to_ascii_lowercase();
    let rest = rest[key_end..].trim_start();
    let rest = if let Some(r) = rest.strip_prefix('=') {
        r
    } else if rest.len() > 2 && rest[..2].eq_ignore_ascii_case("to") {
        &rest[2..]
    } else {
        return None;
    };
    let v = rest.trim();
    let value = if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        inner.replace("''", "'")
    } else if v.is_empty() || v.contains(char::is_whitespace) {
        return None;
    } else {
        v.to_string()
    };
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(
            split_statements("show pools; set a = 'x;y';;"),
            vec!["show pools", "set a = 'x;y'"]
        );
        assert!(split_statements(" ; ").is_empty());
    }

    #[test]
    fn set_forms() {
        assert_eq!(
            parse_set("SET default_pool_size = 5"),
            Some(("default_pool_size".into(), "5".into()))
        );
        assert_eq!(
            parse_set("set server_reset_query TO 'DISCARD ALL'"),
            Some(("server_reset_query".into(), "DISCARD ALL".into()))
        );
        assert_eq!(
            parse_set("set q='it''s'"),
            Some(("q".into(), "it's".into()))
        );
        assert_eq!(parse_set("set x"), None);
        assert_eq!(parse_set("set x = a b"), None);
    }

    #[test]
    fn query_text_is_one_terminated_string() {
        assert_eq!(query_text(b"show pools\0").unwrap(), b"show pools");
        assert_eq!(query_text(b"\0").unwrap(), b"");
        for (body, why) in [
            (&b"show pools"[..], "invalid string in message"),
            (b"", "invalid string in message"),
            (b"show pools\0show state\0", "invalid message format"),
        ] {
            let e = query_text(body).unwrap_err();
            assert_eq!((e.severity, e.code.as_str()), ("ERROR", "08P01"));
            assert_eq!(e.message, why);
        }
    }

    #[test]
    fn unknown_types_end_the_session() {
        for t in [b'Y', 0, b'p'] {
            let mut buf = BytesMut::from(&[t, 0, 0, 0, 4][..]);
            let e = next_message(&mut buf).unwrap_err();
            assert_eq!((e.severity, e.code.as_str()), ("FATAL", "08P01"));
            assert_eq!(e.message, format!("invalid frontend message type {t}"));
        }
    }

    fn texts(stmt: &str) -> Option<Vec<(String, bool)>> {
        words(stmt).map(|w| w.into_iter().map(|w| (w.text, w.quoted)).collect())
    }

    #[test]
    fn identifiers() {
        let plain = |t: &str| (t.to_string(), false);
        let quoted = |t: &str| (t.to_string(), true);
        assert_eq!(texts("PAUSE App"), Some(vec![plain("PAUSE"), plain("App")]));
        assert_eq!(
            texts("PAUSE \"App\""),
            Some(vec![plain("PAUSE"), quoted("App")])
        );
        assert_eq!(
            texts("  KILL\t\"my db\"  "),
            Some(vec![plain("KILL"), quoted("my db")])
        );
        assert_eq!(
            texts("RESUME \"a \"\"b\"\"; c\""),
            Some(vec![plain("RESUME"), quoted("a \"b\"; c")])
        );
        assert_eq!(texts("PAUSE \"\""), Some(vec![plain("PAUSE"), quoted("")]));
        for bad in [
            "PAUSE \"my db",
            "PAUSE \"a\"b",
            "PAUSE a\"b\"",
            "PAUSE \"a\"\"",
        ] {
            assert_eq!(texts(bad), None, "{bad}");
        }
        assert_eq!(
            split_statements("PAUSE \"a;b\"; RESUME \"it's\"; show pools"),
            vec!["PAUSE \"a;b\"", "RESUME \"it's\"", "show pools"]
        );
    }
}
