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
use crate::router::session::RouteState;
use crate::stats::{ClientHandle, Meter};
use crate::tls::{ClientStream, Opened};
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
use tracing::{debug, info, warn, Instrument};

/// Bound on writing a last message to a client that may have stopped reading.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the reset query run before a server goes back to its pool.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection to its end. Everything it logs is inside a `client` span
/// carrying the client's address, and its database and user once logged in.
pub async fn serve(app: Arc<App>, stream: TcpStream, peer: SocketAddr, over_limit: bool) {
    let span = tracing::info_span!(
        "client",
        client_addr = %peer,
        db = tracing::field::Empty,
        user = tracing::field::Empty
    );
    serve_in_span(app, stream, peer, over_limit)
        .instrument(span)
        .await
}

async fn serve_in_span(app: Arc<App>, tcp: TcpStream, peer: SocketAddr, over_limit: bool) {
    let _ = tcp.set_nodelay(true);
    crate::sockopts::apply(&tcp);
    let local = tcp.local_addr().ok();
    // settling encryption and logging in share one auth_timeout
    let deadline = app
        .config()
        .pgmux
        .auth_timeout
        .get()
        .map(|t| Instant::now() + t);
    let security = app.config().security.clone();
    let opened = Box::pin(crate::tls::open(&security, tcp, peer, deadline)).await;
    let Opened {
        mut stream,
        first,
        peer: conn,
    } = match opened {
        Ok(o) => o,
        Err(e) if e.is_quiet() => return debug!(%peer, "connection ended before startup: {e}"),
        Err(e) => return warn!(%peer, "login refused: {e}"),
    };
    // rarely-run steps are boxed: an idle client's task is as large as its largest state
    let logging_in = Box::pin(login::login(&app, &mut stream, over_limit, first, &conn));
    let login = match deadline {
        Some(d) => tokio::time::timeout_at(d, logging_in)
            .await
            .unwrap_or_else(|_| {
                Err(Refusal {
                    error: Some(PgError::fatal("08P01", "authentication timeout")),
                    log: "authentication timeout".into(),
                })
            }),
        None => logging_in.await,
    };
    let login = match login {
        Ok(Entry::Pool(l)) => l,
        Ok(Entry::Console(c)) => {
            let span = tracing::Span::current();
            span.record("db", tracing::field::display("pgmux"));
            span.record("user", tracing::field::display(&c.user));
            return Box::pin(crate::admin::serve(app, stream, peer, c)).await;
        }
        Err(r) => {
            if let Some(e) = &r.error {
                warn!("login refused: {}", r.log);
                Box::pin(farewell(&mut stream, &[], Some(e))).await;
            } else {
                debug!("login ended: {}", r.log);
            }
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("db", tracing::field::display(&login.db));
    span.record("user", tracing::field::display(&login.user));
    info!("client connected");
    let pid = login.cancel.pid;
    // registry entry for SHOW CLIENTS and the pool's client counts, until the session ends
    let client = app.registry.register(
        login.pool.stats.clone(),
        peer,
        local,
        login.wants.get("application_name").unwrap_or(""),
    );
    let mut session = Session::new(app.clone(), stream, login, client);
    let error = session.run().await;
    if let Some(e) = &error {
        info!("closing client: {e}");
    }
    Box::pin(session.finish(error)).await;
    app.cancels.unregister(pid);
    info!("client disconnected");
}

/// Writes what is left for the client and a last error, within a bound.
async fn farewell(stream: &mut ClientStream, pending: &[u8], error: Option<&PgError>) {
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
    stream: ClientStream,
    login: LoggedIn,
    relay: Relay,
    server: Option<PooledConn>,
    mode: PoolMode,
    shutdown: watch::Receiver<Shutdown>,
    closing: bool,
    /// Pin reason last shown in the client registry.
    pinned: &'static str,
    client: ClientHandle,
    /// Read/write routing, for a database with replicas (see `router::session`).
    route: Option<RouteState>,
}

impl Session {
    fn new(app: Arc<App>, stream: ClientStream, login: LoggedIn, client: ClientHandle) -> Session {
        let mode = login.pool.settings().mode;
        let mut relay = Relay::new(
            app.config().pgmux.max_message_size as usize,
            mode == PoolMode::Transaction,
            app.statements.clone(),
            app.config().pgmux.max_prepared_statements as usize,
        );
        relay.meter = Meter::new(login.pool.stats.clone());
        let shutdown = app.shutdown_signal();
        let route = route_state(&app, &login, mode);
        Session {
            app,
            stream,
            login,
            relay,
            server: None,
            mode,
            shutdown,
            closing: false,
            pinned: "",
            client,
            route,
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
            Event::NeedServer => Box::pin(self.attach()).await.err().map(Some),
            Event::Release => {
                Box::pin(self.detach()).await;
                self.closing.then(shutdown_error).map(Some)
            }
            Event::Quiet => {
                self.show_pin();
                None
            }
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
        let Session {
            route,
            relay,
            login,
            client,
            ..
        } = self;
        let checkout = async {
            match route {
                // which server: decided from the waiting work (router::session)
                Some(r) => r.checkout(relay).await,
                None => login
                    .pool
                    .checkout()
                    .await
                    .map(Some)
                    .map_err(login::server_unavailable),
            }
        };
        let conn = tokio::select! {
            r = checkout => r?,
            // KILL reaches clients waiting for a (paused) pool too
            _ = client.killed() => return Err(shutdown_error()),
        };
        let Some(mut conn) = conn else {
            // pgmux answered the work itself
            self.client.idle();
            return Ok(());
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
        self.relay.meter.statements.server = Some(conn.addr);
        self.relay.attached(&conn.statements);
        self.server = Some(conn);
        Ok(())
    }

    /// Transaction mode: the server is idle and clean; back to the pool.
    async fn detach(&mut self) {
        let Some(mut conn) = self.server.take() else {
            return;
        };
        self.client.idle();
        self.show_pin();
        self.login.cancel.set_target(None);
        if let Some(r) = self.route.as_mut() {
            r.released();
        }
        let runs_queries = self.relay.session.settings_changed
            || self.app.config().pgmux.server_reset_query_always;
        if runs_queries && !cancels_settled(&conn).await {
            warn!(db = %self.login.db, "closing server: a cancel sent to it was not delivered");
            return;
        }
        if std::mem::take(&mut self.relay.session.settings_changed) {
            if let Err(e) = self.read_back_settings(&mut conn).await {
                // the server's session state is unknown: it must not serve anyone else
                warn!(db = %self.login.db, "reading back session settings failed: {e}");
                return;
            }
        }
        if self.app.config().pgmux.server_reset_query_always {
            self.reset_and_release(conn).await;
        } else {
            conn.release();
        }
    }

    /// The client changed settings (SET, RESET, set_config...): what the server now holds
    /// becomes what the client expects on any server, and what this server must shed before
    /// it serves another client.
    async fn read_back_settings(&mut self, conn: &mut PooledConn) -> Result<(), String> {
        let mut rows = Vec::new();
        let sql = "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'";
        match conn.query_internal(sql, Some(&mut rows)).await {
            Ok(None) => {}
            Ok(Some(e)) => return Err(e.message),
            Err(e) => return Err(e.to_string()),
        }
        let wants = &mut self.login.wants;
        wants.retain(params::is_tracked);
        for name in std::mem::take(&mut conn.extras) {
            conn.params.remove(&name);
        }
        for row in rows {
            let [name, value] = &row[..] else {
                return Err("unexpected pg_settings row".into());
            };
            if params::is_tracked(name) {
                continue;
            }
            wants.set(name, value);
            conn.params.set(name, value);
            conn.extras.push(name.clone());
        }
        Ok(())
    }

    /// Shows in SHOW CLIENTS and the metrics whether the client keeps its server.
    fn show_pin(&mut self) {
        let reason = self.relay.session.pin.map_or("", |p| p.as_str());
        if reason != self.pinned {
            if !reason.is_empty() {
                info!(db = %self.login.db, user = %self.login.user, "client pinned to its server ({reason})");
            }
            self.client.set_pinned(reason);
            self.pinned = reason;
        }
    }

    async fn reset_and_release(&self, conn: PooledConn) {
        let config = self.app.config_arc();
        self.reset_with(conn, config.pgmux.server_reset_query.trim())
            .await;
    }

    async fn reset_with(&self, mut conn: PooledConn, sql: &str) {
        if sql.is_empty() {
            return conn.release();
        }
        match tokio::time::timeout(RESET_TIMEOUT, conn.run_internal(sql)).await {
            Ok(Ok(None)) => {
                let upper = sql.to_ascii_uppercase();
                if upper.contains("DISCARD ALL") || upper.contains("RESET ALL") {
                    conn.extras.clear();
                }
                if upper.contains("DISCARD ALL") || upper.contains("DEALLOCATE ALL") {
                    conn.statements.clear();
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
            let session = &self.relay.session;
            let reset = self.mode == PoolMode::Session
                || session.pin.is_some()
                || self.app.config().pgmux.server_reset_query_always;
            if !self.relay.server_clean()
                || ((reset || session.settings_changed) && !cancels_settled(&conn).await)
            {
                drop(conn);
            } else if reset {
                // what pinned the client (temporary tables, LISTEN...) goes with DISCARD ALL
                self.reset_and_release(conn).await;
            } else if session.settings_changed {
                self.reset_with(conn, "RESET ALL").await;
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

/// Waits until no cancel is on its way to the server, before pgmux runs its own queries on it
/// (a late cancel would hit them); false if one was not delivered: the server must be closed.
async fn cancels_settled(conn: &PooledConn) -> bool {
    let flight = conn.cancels.clone();
    if !flight.pending() {
        return !flight.failed();
    }
    // the cancel itself is bounded by server_connect_timeout; this is a backstop
    let bound = conn.pool().settings().connect_timeout + Duration::from_secs(5);
    tokio::time::timeout(bound, flight.settled())
        .await
        .unwrap_or(false)
}

/// Routing state for a database with replicas: its router and a pool per host.
fn route_state(app: &App, login: &LoggedIn, mode: PoolMode) -> Option<RouteState> {
    let config = app.config_arc();
    let db = config.database(&login.db)?;
    let router = app.router(db, &login.user)?;
    let pools = app.host_pools(db, &login.user);
    Some(RouteState::new(
        router,
        pools,
        mode == PoolMode::Session,
        login.route,
    ))
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
