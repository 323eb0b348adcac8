//! One client's session: login, then a loop that lends the client a server when it sends
//! work and, in transaction mode, takes the server back at the end of each transaction.
//! Timeouts, shutdown and every way a session can end (Terminate, disconnect, a broken
//! server, bad input) are decided here; the bytes themselves move in `relay`.

pub mod login;

use crate::app::{App, Shutdown};
use crate::config::PoolMode;
use crate::params;
use crate::pool::PooledConn;
use crate::protocol::PgError;
use crate::relay::{Event, Relay, ServerSide};
use crate::stats::{ClientHandle, Meter};
use bytes::BytesMut;
use login::{Entry, LoggedIn, Refusal};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Bound on writing a last message to a client that may have stopped reading.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the reset query run before a server goes back to its pool.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection to its end.
pub async fn serve(app: Arc<App>, mut stream: TcpStream, peer: SocketAddr, over_limit: bool) {
    let _ = stream.set_nodelay(true);
    let auth_timeout = app.config().pgmux.auth_timeout.get();
    let login = match auth_timeout {
        Some(t) => tokio::time::timeout(t, login::login(&app, &mut stream, over_limit))
            .await
            .unwrap_or_else(|_| {
                Err(Refusal {
                    error: Some(PgError::fatal("08P01", "authentication timeout")),
                    log: "authentication timeout".into(),
                })
            }),
        None => login::login(&app, &mut stream, over_limit).await,
    };
    let login = match login {
        Ok(Entry::Pool(l)) => l,
        Ok(Entry::Console(c)) => return crate::admin::serve(app, stream, peer, c).await,
        Err(r) => {
            if let Some(e) = &r.error {
                warn!(%peer, "login refused: {}", r.log);
                farewell(&mut stream, &[], Some(e)).await;
            } else {
                debug!(%peer, "login ended: {}", r.log);
            }
            return;
        }
    };
    info!(%peer, db = %login.db, user = %login.user, "client connected");
    let pid = login.cancel.pid;
    // registry entry for SHOW CLIENTS and the pool's client counts, until the session ends
    let client = app.registry.register(
        login.pool.stats.clone(),
        peer,
        stream.local_addr().ok(),
        login.wants.get("application_name").unwrap_or(""),
    );
    let mut session = Session::new(app.clone(), stream, login, client);
    let error = session.run().await;
    if let Some(e) = &error {
        info!(%peer, db = %session.login.db, user = %session.login.user, "closing client: {e}");
    }
    session.finish(error).await;
    app.cancels.unregister(pid);
    info!(%peer, db = %session.login.db, user = %session.login.user, "client disconnected");
}

/// Writes what is left for the client and a last error, within a bound.
async fn farewell(stream: &mut TcpStream, pending: &[u8], error: Option<&PgError>) {
    let mut out = BytesMut::from(pending);
    if let Some(e) = error {
        e.encode(&mut out);
    }
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

enum Wake {
    Relay(Event),
    Timer,
    Shutdown,
    /// KILL on the admin console.
    Killed,
}

struct Session {
    app: Arc<App>,
    stream: TcpStream,
    login: LoggedIn,
    relay: Relay,
    server: Option<PooledConn>,
    mode: PoolMode,
    shutdown: watch::Receiver<Shutdown>,
    closing: bool,
    client: ClientHandle,
}

impl Session {
    fn new(app: Arc<App>, stream: TcpStream, login: LoggedIn, client: ClientHandle) -> Session {
        let mode = login.pool.settings().mode;
        let mut relay = Relay::new(
            app.config().pgmux.max_message_size as usize,
            mode == PoolMode::Transaction,
            app.statements.clone(),
            app.config().pgmux.max_prepared_statements as usize,
        );
        relay.meter = Meter::new(login.pool.stats.clone());
        let shutdown = app.shutdown_signal();
        Session {
            app,
            stream,
            login,
            relay,
            server: None,
            mode,
            shutdown,
            closing: false,
            client,
        }
    }

    /// Runs until the client leaves (None) or must be told why it is disconnected.
    async fn run(&mut self) -> Option<PgError> {
        loop {
            if !self.closing && *self.shutdown.borrow() == Shutdown::Safe {
                if let Some(e) = self.begin_closing() {
                    return Some(e);
                }
            }
            match self.next().await {
                Wake::Relay(ev) => {
                    if let Some(end) = self.on_event(ev).await {
                        return end;
                    }
                }
                Wake::Timer => {
                    if let Some(e) = self.expired() {
                        return Some(e);
                    }
                }
                Wake::Shutdown => {
                    if *self.shutdown.borrow_and_update() == Shutdown::Safe {
                        if let Some(e) = self.begin_closing() {
                            return Some(e);
                        }
                    }
                }
                Wake::Killed => return Some(shutdown_error()),
            }
        }
    }

    /// Some(outcome) ends the session.
    async fn on_event(&mut self, ev: Event) -> Option<Option<PgError>> {
        match ev {
            Event::NeedServer => self.attach().await.err().map(Some),
            Event::Release => {
                self.detach().await;
                self.closing.then(shutdown_error).map(Some)
            }
            Event::Quiet => None,
            Event::ClientClosed | Event::Terminated => Some(None),
            Event::ClientIo(e) => {
                debug!("client i/o error: {e}");
                Some(None)
            }
            Event::ServerClosed | Event::ServerIo(_) => {
                if let Event::ServerIo(e) = &ev {
                    warn!(db = %self.login.db, "server i/o error: {e}");
                }
                // the server's own last words (if any) are already queued for the client
                self.server = None;
                Some(Some(PgError::fatal(
                    "08006",
                    "server closed the connection unexpectedly",
                )))
            }
            Event::Protocol(m) => Some(Some(PgError::fatal("08P01", m))),
        }
    }

    async fn next(&mut self) -> Wake {
        let deadline = self.deadline();
        let Session {
            relay,
            stream,
            server,
            login,
            shutdown,
            closing,
            client,
            ..
        } = self;
        let pump = poll_fn(|cx| {
            let side = server.as_deref_mut().map(|s| ServerSide {
                stream: &mut s.stream,
                params: &mut s.params,
                statements: &mut s.statements,
            });
            relay.poll(cx, stream, side, &mut login.wants)
        });
        tokio::select! {
            ev = pump => Wake::Relay(ev),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => Wake::Timer,
            _ = shutdown.changed(), if !*closing => Wake::Shutdown,
            _ = client.killed() => Wake::Killed,
        }
    }

    /// When the client's idleness runs out, if a timeout applies now.
    fn deadline(&self) -> Option<Instant> {
        let config = self.app.config();
        let g = &config.pgmux;
        let f = &self.relay.flow;
        let timeout = match &self.server {
            // a request unanswered since the client last sent: query_timeout
            Some(_) if !f.quiet() => g.query_timeout.get(),
            Some(_) if f.status != b'I' => g.idle_transaction_timeout.get(),
            _ => g.client_idle_timeout.get(),
        };
        let idle = timeout.map(|t| f.idle_since + t);
        // The relay starts requests without waking the session, so with a server attached
        // and quiet, look again within query_timeout to time a request begun meanwhile.
        let recheck = match &self.server {
            Some(_) if f.quiet() => g.query_timeout.get().map(|t| Instant::now() + t),
            _ => None,
        };
        match (idle, recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn expired(&self) -> Option<PgError> {
        let deadline = self.deadline()?;
        if Instant::now() < deadline {
            return None;
        }
        Some(if self.server.is_some() && !self.relay.flow.quiet() {
            // PgBouncer's answer; the server, still busy, is closed rather than pooled
            PgError::fatal("08P01", "query_timeout")
        } else if self.server.is_some() && self.relay.flow.status != b'I' {
            PgError::fatal(
                "25P03",
                "terminating connection due to idle-in-transaction timeout",
            )
        } else {
            PgError::fatal("57P05", "terminating connection due to client_idle_timeout")
        })
    }

    /// Safe shutdown: a client without a server leaves now, others after their transaction.
    fn begin_closing(&mut self) -> Option<PgError> {
        self.closing = true;
        (self.server.is_none() && self.relay.c2s.buf.is_empty()).then(shutdown_error)
    }

    async fn attach(&mut self) -> Result<(), PgError> {
        let waiting_since = self.client.waiting();
        let mut conn = tokio::select! {
            r = self.login.pool.checkout() => r.map_err(login::server_unavailable)?,
            // KILL reaches clients waiting for a (paused) pool too
            _ = self.client.killed() => return Err(shutdown_error()),
        };
        let wants = &self.login.wants;
        if let Some(sql) = params::sync_statement(wants, &conn.params, &conn.extras) {
            match conn.run_internal(&sql).await {
                Ok(None) => note_applied(&mut conn, wants),
                Ok(Some(e)) => {
                    conn.release();
                    return Err(PgError {
                        severity: "FATAL",
                        code: e.code,
                        message: e.message,
                    });
                }
                Err(e) => {
                    return Err(PgError::fatal(
                        "08006",
                        format!("server connection failed: {e}"),
                    ));
                }
            }
        }
        self.login.cancel.set_target(Some(conn.cancel_target()));
        self.client
            .active(waiting_since, conn.id, &mut self.relay.meter);
        self.relay.attached(&conn.statements);
        self.server = Some(conn);
        Ok(())
    }

    /// Transaction mode: the server is idle and clean; back to the pool.
    async fn detach(&mut self) {
        let Some(conn) = self.server.take() else {
            return;
        };
        self.client.idle();
        self.login.cancel.set_target(None);
        if self.app.config().pgmux.server_reset_query_always {
            self.reset_and_release(conn).await;
        } else {
            conn.release();
        }
    }

    async fn reset_and_release(&self, mut conn: PooledConn) {
        let config = self.app.config_arc();
        let sql = config.pgmux.server_reset_query.trim();
        if sql.is_empty() {
            return conn.release();
        }
        match tokio::time::timeout(RESET_TIMEOUT, conn.run_internal(sql)).await {
            Ok(Ok(None)) => {
                let upper = sql.to_ascii_uppercase();
                if upper.contains("DISCARD ALL") || upper.contains("RESET ALL") {
                    conn.extras.clear();
                }
                conn.release();
            }
            Ok(Ok(Some(e))) => {
                warn!(db = %self.login.db, "server_reset_query failed: {}", e.message)
            }
            Ok(Err(e)) => warn!(db = %self.login.db, "server_reset_query failed: {e}"),
            Err(_) => warn!(db = %self.login.db, "server_reset_query timed out"),
        }
    }

    /// After the session: the server goes back only if idle and clean, else it is closed.
    async fn finish(&mut self, error: Option<PgError>) {
        if let Some(conn) = self.server.take() {
            self.login.cancel.set_target(None);
            if !self.relay.server_clean() {
                drop(conn);
            } else if self.mode == PoolMode::Session
                || self.app.config().pgmux.server_reset_query_always
            {
                self.reset_and_release(conn).await;
            } else {
                conn.release();
            }
        }
        let pending = self.relay.s2c.take_ready();
        // A server lost in the middle of a message leaves the client inside it: an error
        // appended there would be read as that message's bytes (drivers report a parse error),
        // so such a client gets the cut bytes and EOF.
        let error = error.filter(|_| self.relay.s2c.scanner.at_boundary());
        if error.is_some() || !pending.is_empty() {
            farewell(&mut self.stream, &pending, error.as_ref()).await;
        }
    }
}

fn shutdown_error() -> PgError {
    PgError::fatal(
        "57P01",
        "terminating connection due to administrator command",
    )
}

/// After a successful sync the server holds the client's values, reported or not.
fn note_applied(conn: &mut PooledConn, wants: &params::Params) {
    let stale: Vec<String> = conn
        .extras
        .iter()
        .filter(|n| wants.get(n).is_none())
        .cloned()
        .collect();
    for n in &stale {
        conn.params.remove(n);
    }
    conn.extras.retain(|n| wants.get(n).is_some());
    for (n, v) in wants.iter() {
        if conn.params.get(n) != Some(v) {
            conn.params.set(n, v);
            if !params::is_tracked(n) && !conn.extras.iter().any(|e| e.eq_ignore_ascii_case(n)) {
                conn.extras.push(n.to_string());
            }
        }
    }
}
