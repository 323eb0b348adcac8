//! One client's session: login, then a loop that lends the client a server when it sends
//! work and, in transaction mode, takes the server back at the end of each transaction.
//! Timeouts, shutdown and every way a session can end (Terminate, disconnect, a broken
//! server, bad input) are decided here; the bytes themselves move in `relay`.

pub mod login;

use crate::app::{App, Shutdown};
use crate::batch::{self, Seat, Ticket, Unrun};
use crate::clock::Mono;
use crate::config::PoolMode;
use crate::endpoint::{ClientAddr, ClientSocket};
use crate::logging::{ClientTag, WithClient};
use crate::params;
use crate::pool::{Lease, PoolError, PooledConn, TryCheckout};
use crate::protocol::{messages, PgError};
use crate::relay::statements::Tracker;
use crate::relay::{Event, Relay, ServerSide, Tracking};
use crate::router::effects::PinReason;
use crate::router::session::{RouteState, StartupRoute};
use crate::stats::{self, Meter};
use crate::tls::{ClientStream, Opened};
use bytes::{Bytes, BytesMut};
use futures_util::future::OptionFuture;
use login::{Entry, LoggedIn, Refusal};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

/// Bound on writing a last message to a client that may have stopped reading.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the reset query run before a server goes back to its pool.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection to its end; `guard` is dropped with the task. Everything
/// it logs carries the client's address, and its database and user once logged in
/// (`logging::ClientTag`).
///
/// A task is as large as its future's largest state, and an idle client's task lives as
/// long as the client: so the future holds little more than a pointer to the session, and
/// every step before and after the session (TLS, login, the last words) runs boxed.
pub fn serve<G: Send + 'static>(
    app: Arc<App>,
    stream: ClientSocket,
    peer: ClientAddr,
    over_limit: bool,
    guard: G,
) -> impl std::future::Future<Output = ()> + Send {
    let start = Box::new(Start {
        app,
        stream,
        peer,
        over_limit,
    });
    let tag = ClientTag::new(peer);
    WithClient::new(tag, async move {
        let _guard = guard;
        let Some(mut session) = Box::pin(begin(start)).await else {
            return;
        };
        let error = session.run().await;
        Box::pin(session.end(error)).await;
    })
}

struct Start {
    app: Arc<App>,
    stream: ClientSocket,
    peer: ClientAddr,
    over_limit: bool,
}

/// Encryption, login and the client's registration; None when no session follows.
async fn begin(start: Box<Start>) -> Option<Box<Session>> {
    let Start {
        app,
        stream: socket,
        peer,
        over_limit,
    } = *start;
    let local = match &socket {
        ClientSocket::Tcp(tcp) => {
            let _ = tcp.set_nodelay(true);
            crate::sockopts::apply(tcp);
            tcp.local_addr().ok()
        }
        ClientSocket::Unix(_) => None,
    };
    let (stream, login, route) = enter(&app, socket, peer, over_limit, local).await?;
    crate::logging::set_client_names(login.log_names());
    if app.config().pgmux.log_connections {
        info!("client connected");
    }
    // the session holds no buffer while the client idles (see `Session::park`)
    Some(Box::new(Session::new(app, stream, login, route)))
}

/// Settles encryption and logs the client in; None when the client was refused, left, or
/// was served by the admin console.
async fn enter(
    app: &Arc<App>,
    socket: ClientSocket,
    peer: ClientAddr,
    over_limit: bool,
    local: Option<SocketAddr>,
) -> Option<(ClientStream, LoggedIn, StartupRoute)> {
    // settling encryption and logging in share one auth_timeout
    let deadline = app
        .config()
        .pgmux
        .auth_timeout
        .get()
        .map(|t| Instant::now() + t);
    let security = app.config().security.clone();
    let opened = Box::pin(crate::tls::open(&security, socket, peer, deadline)).await;
    let Opened {
        mut stream,
        first,
        peer: conn,
    } = match opened {
        Ok(o) => o,
        // an operator needs to see why a TLS client could not get in (unknown CA, no
        // common protocol), but it is no warning: scanners fail handshakes all day
        Err(e @ crate::tls::OpenError::Handshake(_)) => {
            info!(%peer, "{e}");
            return None;
        }
        Err(e) if e.is_quiet() => {
            debug!(%peer, "connection ended before startup: {e}");
            return None;
        }
        Err(e) => {
            warn!(%peer, "login refused: {e}");
            return None;
        }
    };
    let logging_in = Box::pin(login::login(
        app,
        &mut stream,
        over_limit,
        first,
        &conn,
        local,
    ));
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
    let (login, route) = match login {
        Ok(Entry::Pool(l, r)) => (l, r),
        Ok(Entry::Console(c)) => {
            crate::logging::set_client_names(crate::logging::Names::new("pgmux", &c.user));
            Box::pin(crate::admin::serve(app.clone(), stream, peer, c)).await;
            return None;
        }
        Err(r) => {
            if let Some(e) = &r.error {
                warn!("login refused: {}", r.log);
                Box::pin(farewell(&mut stream, &[], Some(e))).await;
            } else {
                debug!("login ended: {}", r.log);
            }
            return None;
        }
    };
    Some((stream, login, route))
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
    /// The relay while the client has a server, work or bytes in flight; None while it
    /// idles without a server (parked), so an idle client holds no relay state or buffer.
    relay: Option<Box<Relay>>,
    parked: Parked,
    server: Option<PooledConn>,
    /// In place of a server: the client's query runs in a batch (`batch`).
    seat: Option<Box<Seat>>,
    mode: PoolMode,
    closing: bool,
    /// The task is registered for KILL and shutdown wake-ups (`ClientHandle::watch`): once
    /// is enough, the registration stays.
    watching: bool,
    /// Pin reason last shown in the client registry.
    pinned: Option<PinReason>,
    /// Read/write routing, for a database with replicas (see `router::session`).
    route: Option<Box<RouteState>>,
    /// The idle or query timeout running now, if one applies.
    timer: Option<Pin<Box<Sleep>>>,
    /// This client keeps its relay while it idles (`KeptRelay`).
    kept: Option<KeptRelay>,
}

/// Relays that idle clients keep rather than drop, process-wide. Dropping a relay when its
/// client goes idle and making it again at the next request cost about a tenth of a
/// transaction's instructions (benches/instructions.sh); a busy client idles between every
/// two. So the first clients to idle keep theirs: as many as are busy at a time in a typical
/// pool, few enough (a relay idles without buffers) that 10,000 idle clients hold about the
/// same memory as without. The environment variable `PGMUX_KEPT_RELAYS` sets another number
/// (0: every idle client drops its relay, as the test suite runs once to cover that path).
fn max_kept_relays() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("PGMUX_KEPT_RELAYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    })
}

static KEPT_RELAYS: AtomicUsize = AtomicUsize::new(0);

/// One of the `max_kept_relays`, held by a session until it ends.
struct KeptRelay(());

impl KeptRelay {
    fn take() -> Option<KeptRelay> {
        let max = max_kept_relays();
        if KEPT_RELAYS.load(Ordering::Relaxed) >= max {
            return None;
        }
        if KEPT_RELAYS.fetch_add(1, Ordering::Relaxed) >= max {
            KEPT_RELAYS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(KeptRelay(()))
    }
}

impl Drop for KeptRelay {
    fn drop(&mut self) {
        KEPT_RELAYS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a parked client keeps of its relay.
struct Parked {
    /// Last client input or server ReadyForQuery.
    idle_since: Mono,
    /// The client's named prepared statements (transaction mode), if it has any.
    tracker: Option<Box<Tracker>>,
}

impl Session {
    fn new(app: Arc<App>, stream: ClientStream, login: LoggedIn, start: StartupRoute) -> Session {
        let mode = login.pool.settings().mode;
        let route = route_state(&app, &login, mode, start).map(Box::new);
        let mut session = Session {
            app,
            stream,
            login,
            relay: None,
            parked: Parked {
                idle_since: Mono::now(),
                tracker: None,
            },
            server: None,
            seat: None,
            mode,
            closing: false,
            watching: false,
            pinned: None,
            route,
            timer: None,
            kept: None,
        };
        if !session.can_park() {
            session.relay_mut();
        }
        session
    }

    /// Only a plain client parks: its socket says when it has something to read. A TLS
    /// stream may hold decrypted bytes the socket no longer shows.
    fn can_park(&self) -> bool {
        matches!(self.stream, ClientStream::Plain(_) | ClientStream::Unix(_))
    }

    /// The relay, made anew if the client was parked.
    fn relay_mut(&mut self) -> &mut Relay {
        let relay = match self.relay.take() {
            Some(r) => r,
            None => self.unpark(),
        };
        self.relay.insert(relay)
    }

    /// A new relay, with the limits configured now (read here rather than kept: every byte
    /// of an idle session counts, see the test below).
    fn unpark(&mut self) -> Box<Relay> {
        let limits = &self.app.limits;
        let (max_message, max_prepared) =
            (limits.max_message_size(), limits.max_prepared_statements());
        let transaction_mode = self.mode == PoolMode::Transaction;
        let idle_since = self.parked.idle_since;
        let mut relay = Box::new(Relay::bare(max_message, transaction_mode, idle_since));
        relay.tracker = self.parked.tracker.take().map(|mut t| {
            t.unshed();
            *t
        });
        relay.tracking = Tracking::when(transaction_mode, self.app.statements, max_prepared);
        relay.meter = Meter::new(self.login.pool.stats.clone());
        relay.whole_units = self.route.is_some();
        relay.defers_begin = transaction_mode && limits.defer_begin();
        if transaction_mode && startup_temp_path(&self.login.wants) {
            relay.session.pin = Some(PinReason::TempObject);
            relay.session.startup_pin = relay.session.pin;
        }
        relay
    }

    /// Drops the relay if nothing in it outlives this idle moment: no server, nothing
    /// buffered or owed, no state a later request needs (except prepared statements).
    fn park(&mut self) {
        if self.has_server() || !self.can_park() {
            return;
        }
        let Some(r) = self.relay.as_deref_mut() else {
            return;
        };
        let idle = r.c2s.is_idle()
            && r.s2c.is_idle()
            && r.flow.quiet()
            && !r.flow.terminated
            && r.flow.status == b'I'
            && r.session.pin.is_none()
            && !r.session.settings_changed
            && r.is_parkable()
            && r.tracker.as_ref().is_none_or(Tracker::is_settled);
        if !idle {
            return;
        }
        // kept while it is as unpark would make it now (limits can be changed at runtime)
        let limits = &self.app.limits;
        let max_prepared = r.tracking.map_or(0, |t| t.max_prepared);
        let current = r.max_message == limits.max_message_size()
            && (!r.transaction_mode
                || (max_prepared == limits.max_prepared_statements()
                    && r.defers_begin == limits.defer_begin()));
        if current && self.kept.is_none() {
            self.kept = KeptRelay::take();
        }
        if current && self.kept.is_some() {
            return;
        }
        self.kept = None;
        self.parked.idle_since = r.flow.idle_since;
        self.parked.tracker = r
            .tracker
            .take()
            .filter(|t| !t.stmts.is_empty())
            .map(|mut t| {
                t.shed();
                Box::new(t)
            });
        self.relay = None;
    }

    /// After the session: its server and last words settled, its cancel key dropped.
    async fn end(mut self: Box<Self>, error: Option<PgError>) {
        let log = self.app.config().pgmux.log_disconnections;
        if let (true, Some(e)) = (log, &error) {
            info!("closing client: {e}");
        }
        self.finish(error).await;
        if log {
            info!("client disconnected");
        }
    }

    /// Runs until the client leaves (None) or must be told why it is disconnected.
    async fn run(&mut self) -> Option<PgError> {
        loop {
            if !self.closing && self.app.shutdown_stage() == Shutdown::Safe {
                if let Some(e) = self.begin_closing() {
                    return Some(e);
                }
            }
            // the awaits below hold only a box: the task's future stays small
            // (serverwards, and for a server going back: whether the client keeps it)
            let (serverwards, keep) = match self.next().await {
                Wake::Relay(Event::NeedServer) => (true, false),
                Wake::Relay(Event::Release) => (false, false),
                Wake::Relay(Event::Resync) => (false, true),
                Wake::Relay(ev) => match self.on_event(ev) {
                    Some(end) => return end,
                    None => continue,
                },
                Wake::Timer => match self.expired() {
                    Some(e) => return Some(e),
                    None => continue,
                },
                Wake::Shutdown => {
                    if let Some(e) = self.begin_closing() {
                        return Some(e);
                    }
                    continue;
                }
                Wake::Killed => return Some(shutdown_error()),
            };
            if serverwards {
                // the future is boxed only when there is something to wait for (and made
                // outside the await, so the task keeps no room for what it captures)
                let attaching = self
                    .attach_now()
                    .map(|(since, conn, ticket)| Box::pin(self.attach(since, conn, ticket)));
                match OptionFuture::from(attaching).await {
                    Some(Err(AttachError::Refused(e))) => return Some(e),
                    Some(Err(AttachError::Left)) => return None,
                    _ => {}
                }
            } else {
                let conn = match keep {
                    true => self.server.take(),
                    false => self.detach(),
                };
                let after = conn.map(|conn| Box::pin(self.after_unit(conn, keep)));
                if let Some(Some(e)) = OptionFuture::from(after).await {
                    return Some(e);
                }
                if self.closing {
                    return Some(shutdown_error());
                }
            }
        }
    }

    /// Events that need no waiting (server lending and return are `attach` and `detach`);
    /// Some(outcome) ends the session.
    fn on_event(&mut self, ev: Event) -> Option<Option<PgError>> {
        match ev {
            Event::NeedServer | Event::Release | Event::Resync => None,
            // a batched query cannot leave a transaction or state behind (`batch::eligible`)
            Event::Quiet if self.seat.is_some() => Some(Some(PgError::fatal(
                "08P01",
                "a batched query left its session in a transaction",
            ))),
            Event::Quiet => {
                self.show_pin();
                None
            }
            Event::ClientClosed | Event::Terminated => Some(None),
            Event::ClientIo(e) => {
                debug!("client i/o error: {e}");
                Some(None)
            }
            Event::ServerClosed | Event::ServerIo(_) | Event::ServerFailed(_) => {
                let why = match &ev {
                    Event::ServerIo(e) => format!("server i/o error: {e}"),
                    Event::ServerFailed(e) => format!("server failed: {e}"),
                    _ => "server closed the connection".to_string(),
                };
                // a request cancelled for another client is sent again as it is: its server
                // did not fail
                if self.send_again_unrun(Unrun::CancelledForAnother)
                    || self.replay(&why)
                    || self.send_again_unrun(Unrun::ServerLost)
                {
                    // routed again as soon as the session loop polls the relay
                    return None;
                }
                if matches!(ev, Event::ServerIo(_) | Event::ServerFailed(_)) {
                    warn!(db = %self.login.db(), "{why}");
                }
                // the server's own last words (if any) are already queued for the client
                self.server = None;
                self.seat = None;
                Some(Some(PgError::fatal(
                    "08006",
                    "server closed the connection unexpectedly",
                )))
            }
            Event::Protocol(e) => Some(Some(PgError::fatal("08P01", e.to_string()))),
        }
    }

    async fn next(&mut self) -> Wake {
        match self.deadline() {
            Some(d) => match self.timer.as_mut() {
                Some(t) if t.deadline() == d => {}
                Some(t) => t.as_mut().reset(d),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(d))),
            },
            None => self.timer = None,
        }
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// One look at everything a session waits for. KILL and a safe shutdown wake the task
    /// through the client registry, so an idle session waits on its socket alone.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        // registered before the flag is read, so a kill in between still wakes the task
        if !self.watching {
            self.login.client.watch(cx);
            self.watching = true;
        }
        if self.login.client.is_killed() {
            return Poll::Ready(Wake::Killed);
        }
        // the stage is read, not subscribed to: a safe shutdown wakes every session
        if !self.closing && self.app.shutdown_stage() == Shutdown::Safe {
            return Poll::Ready(Wake::Shutdown);
        }
        if let Some(t) = self.timer.as_mut() {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        if self.relay.is_none() {
            let ready = match &self.stream {
                ClientStream::Plain(tcp) => tcp.poll_read_ready(cx),
                ClientStream::Unix(unix) => unix.poll_read_ready(cx),
                ClientStream::Tls(_) => Poll::Ready(Ok(())),
            };
            match ready {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Wake::Relay(Event::ClientIo(e))),
                Poll::Ready(Ok(())) => {}
            }
            self.relay_mut();
        }
        let Session {
            relay: Some(relay),
            stream,
            server,
            seat,
            login,
            app,
            pinned,
            ..
        } = self
        else {
            return Poll::Pending;
        };
        // read at every poll: a timeout set from the console applies from the next answer
        relay.quiet_wanted = seat.is_some() || app.timeouts.any();
        relay.pin_shown = *pinned;
        if let Some(seat) = seat.as_deref_mut() {
            let side = ServerSide {
                stream: &mut seat.pipe,
                params: &mut seat.params,
                statements: &mut seat.statements,
            };
            return relay
                .poll(cx, stream, Some(side), &mut login.wants)
                .map(Wake::Relay);
        }
        let side = server.as_deref_mut().map(|s| ServerSide {
            stream: &mut s.stream,
            params: &mut s.params,
            statements: &mut s.statements,
        });
        match relay.poll(cx, stream, side, &mut login.wants) {
            Poll::Ready(ev) => Poll::Ready(Wake::Relay(ev)),
            Poll::Pending => {
                self.park();
                Poll::Pending
            }
        }
    }

    /// When the client's idleness runs out, if a timeout applies now.
    fn deadline(&self) -> Option<Instant> {
        let g = &self.app.timeouts;
        if !g.any() {
            // the usual case, twice a transaction: none of the three is set
            return None;
        }
        let Some(f) = self.relay.as_deref().map(|r| &r.flow) else {
            // parked: no server, nothing owed
            return g
                .client_idle()
                .map(|t| (self.parked.idle_since + t).instant());
        };
        let attached = self.has_server();
        let in_transaction = self.relay.as_deref().is_some_and(|r| r.begin_answered);
        let timeout = match attached {
            // a request unanswered since the client last sent: query_timeout
            true if !f.quiet() => g.query(),
            true if f.status != b'I' => g.idle_transaction(),
            // in the transaction of a BEGIN pgmux answered, which waits for the next request
            false if in_transaction => g.idle_transaction(),
            _ => g.client_idle(),
        };
        let idle = timeout.map(|t| (f.idle_since + t).instant());
        // The relay starts requests without waking the session, so with a server attached
        // and quiet, look again within query_timeout to time a request begun meanwhile.
        let recheck = match attached {
            true if f.quiet() => g.query().map(|t| Instant::now() + t),
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
        let flow = self.relay.as_deref().map(|r| &r.flow);
        let busy = self.has_server() && flow.is_some_and(|f| !f.quiet());
        let in_transaction = (self.has_server() && flow.is_some_and(|f| f.status != b'I'))
            || self.relay.as_deref().is_some_and(|r| r.begin_answered);
        Some(if busy {
            // which server did not answer: a slow or stalled host shows in the log
            let server = (self.server.as_ref().map(|c| c.addr))
                .or_else(|| self.seat.as_ref().map(|s| s.addr));
            if let Some(server) = server {
                info!(%server, "query_timeout: no answer from the server");
            }
            // PgBouncer's answer; the server, still busy, is closed rather than pooled
            PgError::fatal("08P01", "query_timeout")
        } else if in_transaction {
            PgError::fatal(
                "25P03",
                "terminating connection due to idle-in-transaction timeout",
            )
        } else {
            PgError::fatal("57P05", "terminating connection due to client_idle_timeout")
        })
    }

    /// A replica failed under an autocommit read before any of the answer reached the client
    /// (`relay::retry`): the host is banned, the connection dropped (never pooled) and the
    /// request put back to be routed again, on another replica or the primary. False when
    /// the unit cannot be retried (not armed, or more than a read was sent meanwhile).
    fn replay(&mut self, why: &str) -> bool {
        let (Some(route), Some(relay)) = (self.route.as_deref_mut(), self.relay.as_deref_mut())
        else {
            return false;
        };
        let Some(request) = relay.retry.request() else {
            return false;
        };
        let stmts = relay.tracker.as_ref().map(|t| &t.stmts);
        if !route.is_read(request, stmts) {
            return false;
        }
        route.server_failed(why);
        let replayed = relay.take_for_replay().is_some();
        self.server = None;
        self.login.client.set_cancel_target(None);
        self.login.client.idle();
        replayed
    }

    /// The client's request in a batch did not take effect, for the reason given: its
    /// server was lost before it ran, or a cancel meant for a request ahead of it reached it.
    /// It goes back in line, as if just sent, instead of failing; or, if its client cancelled
    /// it meanwhile (a cancel kept for when it ran), it is answered as cancelled.
    fn send_again_unrun(&mut self, why: Unrun) -> bool {
        let Some(relay) = self.relay.as_deref_mut() else {
            return false;
        };
        let Some(seat) = self.seat.take_if(|s| s.pipe.unrun() == Some(why)) else {
            return false;
        };
        relay.put_back(&seat.request);
        self.login.client.set_cancel_target(None);
        self.login.client.idle();
        if self.login.client.info().take_cancel_asked() {
            // cancelled while it waited in the batch, for when it ran: it never did
            self.answer_cancelled(seat.request.len());
            return true;
        }
        debug!(db = %self.login.db(), "batched request did not take effect ({why:?}): in line again");
        true
    }

    /// Safe shutdown: a client without a server leaves now, others after their transaction.
    fn begin_closing(&mut self) -> Option<PgError> {
        self.closing = true;
        let no_input = self.relay.as_deref().is_none_or(|r| r.c2s.buf.is_empty());
        (!self.has_server() && no_input).then(shutdown_error)
    }

    /// A server, or a seat in a batch, serves the client's work now.
    fn has_server(&self) -> bool {
        self.server.is_some() || self.seat.is_some()
    }

    /// Lends the client a server without waiting when its pool has one idle, in step with
    /// the client's settings and due no check; otherwise returns when the client started
    /// waiting, and the server already taken if it only needs its settings brought in step,
    /// for `attach`.
    ///
    /// Under pressure the request's batch ticket is made here and goes along (`Some`), to
    /// gather with others (`TryCheckout::Gather`); `None` leaves it to `attach`.
    #[allow(clippy::type_complexity)]
    fn attach_now(&mut self) -> Option<(Mono, Option<PooledConn>, Option<Option<Ticket>>)> {
        let waiting_since = self.login.client.waiting();
        if self.route.is_some() {
            return Some((waiting_since, None, None));
        }
        let pool = &self.login.pool;
        let conn = match pool.try_checkout(waiting_since, true) {
            TryCheckout::Lent(conn) => conn,
            TryCheckout::Wait => return Some((waiting_since, None, None)),
            TryCheckout::Gather => {
                let relay = self.relay.as_deref_mut();
                let ticket = relay.and_then(|r| batch_ticket(r, &self.login));
                if ticket.is_some() {
                    return Some((waiting_since, None, Some(ticket)));
                }
                match pool.try_checkout(waiting_since, false) {
                    TryCheckout::Lent(conn) => conn,
                    _ => return Some((waiting_since, None, Some(None))),
                }
            }
        };
        if !in_step(&conn, &self.login.wants) {
            return Some((waiting_since, Some(conn), None));
        }
        // lent at once: the wait began and ended at this reading of the clock
        self.attached(conn, waiting_since, waiting_since);
        None
    }

    async fn attach(
        &mut self,
        waiting_since: Mono,
        taken: Option<PooledConn>,
        ticket: Option<Option<Ticket>>,
    ) -> Result<(), AttachError> {
        self.relay_mut();
        let Session {
            route,
            relay: Some(relay),
            login,
            stream,
            app,
            ..
        } = self
        else {
            return Ok(());
        };
        let said_bye = whole_messages(&relay.c2s.buf[relay.c2s.scanned..]);
        if let Some(r) = route.as_deref_mut() {
            r.serializable = login
                .wants
                .get("default_transaction_isolation")
                .is_some_and(|v| v.eq_ignore_ascii_case("serializable"));
        }
        let (pool, client) = (&login.pool, &login.client);
        let ticket = match (&taken, &route) {
            (None, None) => ticket.unwrap_or_else(|| batch_ticket(&mut *relay, login)),
            _ => None,
        };
        // a cancel sent before this wait began was for nothing running (PostgreSQL ignores it)
        client.forget_cancel();
        // behind a BEGIN pgmux answered, a cancelled request would leave its transaction
        // failed, which no server knows of yet: it is sent, and runs
        let cancellable = cancellable_request(&relay.c2s).filter(|_| !relay.begin_answered);
        if let (true, Some(len)) = (
            relay.retry.cancelled_since_sent(client.info().cancels()),
            cancellable,
        ) {
            self.answer_cancelled(len);
            return Ok(());
        }
        let checkout = async {
            match (taken, route) {
                (Some(c), _) => Ok(Some(Lease::Conn(c))),
                // which server: decided from the waiting work (router::session)
                // a server the router got just as the cancel came is closed, not lent: it
                // has run nothing of this client's
                (None, Some(r)) => tokio::select! {
                    // boxed, as the pool's rare waits are: this future is allocated for
                    // every client that waits
                    c = Box::pin(r.checkout(relay)) => c.map(|c| c.map(Lease::Conn)).map_err(Some),
                    _ = cancel_asked(client, cancellable.is_some()) => Err(None),
                },
                (None, None) => match pool
                    .checkout_or_batch(ticket, cancel_asked(client, cancellable.is_some()))
                    .await
                {
                    Ok(lease) => Ok(Some(lease)),
                    Err(PoolError::Cancelled) => Err(None),
                    Err(e) => Err(Some(login::server_unavailable(e))),
                },
            }
        };
        let conn = tokio::select! {
            r = checkout => match r {
                Ok(conn) => conn,
                Err(Some(e)) => return Err(e.into()),
                Err(None) => {
                    if let Some(len) = cancellable {
                        self.answer_cancelled(len);
                    }
                    return Ok(());
                }
            },
            // KILL reaches clients waiting for a (paused) pool too, and a safe shutdown
            // closes them (they hold no server), as it closes idle ones
            _ = stopped(client, app) => return Err(shutdown_error().into()),
            // one that left is taken out of the line, not handed a server
            _ = stream.hangup(said_bye) => return Err(AttachError::Left),
        };
        let mut conn = match conn {
            Some(Lease::Conn(c)) => c,
            Some(Lease::Seat(seat)) => {
                // a cancel that came as the seat was given: the batch sends it when the
                // query runs, or this does if it runs already
                if let Some(c) = self.login.client.info().cancel_if_running() {
                    self.cancel_abandoned(c);
                }
                return self.seated(seat, waiting_since);
            }
            None => {
                // pgmux answered the work itself
                self.login.client.idle();
                return Ok(());
            }
        };
        let wants = &self.login.wants;
        let retryable = self.route.as_ref().is_some_and(|r| r.retryable());
        let in_step = in_step(&conn, wants);
        let sync = match in_step {
            true => None,
            false => params::sync_statement(wants, &conn.params, &conn.extras),
        };
        if let Some(sql) = sync {
            // taken before the run: the server reports some settings as it changes them
            // (default_transaction_read_only), and that updates conn.params under us
            let applied = params::untracked_sets(wants, &conn.params);
            let synced = Box::pin(conn.run_internal(&sql)).await;
            let failed = match &synced {
                Err(e) => Some(e.to_string()),
                Ok(Some(e)) if e.code.starts_with("57P") || e.code.starts_with("08") => {
                    Some(format!("{}: {}", e.code, e.message))
                }
                _ => None,
            };
            if let (true, Some(why), Some(r)) = (retryable, failed, self.route.as_mut()) {
                // nothing was sent for the client yet: route its work again
                r.server_failed(&why);
                if let Some(relay) = self.relay.as_deref_mut() {
                    relay.retry.route_again();
                }
                drop(conn);
                self.login.client.idle();
                return Ok(());
            }
            match synced {
                Ok(None) => note_applied(&mut conn, wants, applied),
                Ok(Some(e)) => {
                    conn.release();
                    return Err(PgError {
                        severity: "FATAL",
                        code: e.code,
                        message: e.message,
                    }
                    .into());
                }
                Err(e) => {
                    return Err(
                        PgError::fatal("08006", format!("server connection failed: {e}")).into(),
                    );
                }
            }
        }
        if !in_step {
            conn.synced = Some((Arc::downgrade(wants), conn.params.changes()));
        }
        // The wait is over: the client's timers (client_idle_timeout, query_timeout) count
        // from here, not from its request, or a long wait would end it at the hand-off.
        let now = Mono::now();
        if let Some(relay) = self.relay.as_deref_mut() {
            relay.flow.idle_since = now;
        }
        if let Some(len) = cancellable.filter(|_| self.cancelled_in_hand_off(&conn)) {
            // none of the request reached the server: answered as one cancelled in line
            conn.release();
            self.answer_cancelled(len);
            return Ok(());
        }
        self.attached(conn, waiting_since, now);
        Ok(())
    }

    /// Points the client's cancels at the server it is being lent, and says whether a cancel
    /// came before that: from the end of the wait to here (its settings brought in step on
    /// the server, a round trip) the client still counts as waiting with no server, so such a
    /// cancel was kept for the wait (`ask_cancel`), which is over. Its request is still all
    /// here. A cancel after this goes to the server.
    fn cancelled_in_hand_off(&self, conn: &PooledConn) -> bool {
        let client = &self.login.client;
        client.set_cancel_target(Some(conn.cancel_target()));
        if !client.info().take_cancel_asked() {
            return false;
        }
        client.set_cancel_target(None);
        true
    }

    /// Answers the request at the front of the input, cancelled while it waited for a
    /// server, as PostgreSQL answers a cancelled query; none of it reached a server.
    fn answer_cancelled(&mut self, len: usize) {
        self.login.client.idle();
        let Some(relay) = self.relay.as_deref_mut() else {
            return;
        };
        relay.prescanned = None;
        relay.c2s.consume_unscanned(len);
        let mut out = BytesMut::new();
        PgError::error("57014", "canceling statement due to user request").encode(&mut out);
        messages::ready_for_query(&mut out, b'I');
        relay.s2c.insert(Bytes::from(out));
    }

    /// The server is the client's now.
    fn attached(&mut self, conn: PooledConn, waiting_since: Mono, now: Mono) {
        let retryable = self.route.as_ref().is_some_and(|r| r.retryable());
        let one_unit = self.route.as_ref().is_some_and(|r| r.serves_one_unit());
        let at_a_time = self
            .route
            .as_ref()
            .is_some_and(|r| r.serves_one_at_a_time());
        self.login
            .client
            .set_cancel_target(Some(conn.cancel_target()));
        self.relay_mut();
        let Session {
            relay: Some(relay),
            login,
            ..
        } = self
        else {
            return;
        };
        let client = &login.client;
        relay.meter.statements.server = Some(conn.addr);
        relay.attached(&conn.statements);
        client.active_at(waiting_since, now, conn.id, &mut relay.meter);
        if one_unit {
            relay.serve_one_unit();
        }
        if at_a_time {
            relay.serve_unit_at_a_time();
        }
        if retryable {
            relay.arm_retry();
        }
        self.server = Some(conn);
    }

    /// The client's request went to a server in a batch: its answer comes through the seat.
    fn seated(&mut self, mut seat: Box<Seat>, waiting_since: Mono) -> Result<(), AttachError> {
        self.relay_mut();
        let Session {
            relay: Some(relay),
            login,
            ..
        } = self
        else {
            return Ok(());
        };
        relay.meter.statements.server = Some(seat.addr);
        relay.attached(&seat.statements);
        // the request is the whole unit: what the client sends next is routed on its own
        relay.serve_one_unit();
        relay.flow.idle_since = Mono::now();
        login
            .client
            .active(waiting_since, seat.conn_id, &mut relay.meter);
        // The batch sent the request already, and its answer may come before the relay would
        // look at the request: counted now, or the answer would seem to be owed nothing and
        // the request would be sent again.
        let mut side = ServerSide {
            stream: &mut seat.pipe,
            params: &mut seat.params,
            statements: &mut seat.statements,
        };
        if let Err(e) = relay.scan_client(&mut side, &login.wants) {
            return Err(PgError::fatal("08P01", e.to_string()).into());
        }
        self.seat = Some(seat);
        Ok(())
    }

    /// Transaction mode: the server is idle and clean; back to the pool. Most returns need
    /// no waiting and are done here; the rest (settings to read back, a reset query) give
    /// the server back for `detach_after_queries`.
    fn detach(&mut self) -> Option<PooledConn> {
        if let Some(r) = self.relay.as_deref_mut() {
            // after a DISCARD ALL: the client's startup search_path names pg_temp again
            r.session.pin = r.session.startup_pin;
        }
        if self.seat.take().is_some() {
            // the batch gives the server back; it also pointed the client's cancels at it
            self.login.client.idle();
            self.login.client.set_cancel_target(None);
            return None;
        }
        let conn = self.server.take()?;
        self.login.client.idle();
        self.show_pin();
        self.login.client.set_cancel_target(None);
        if let Some(r) = self.route.as_mut() {
            r.released();
        }
        let settings_changed = self.relay_mut().session.settings_changed;
        if settings_changed || conn.statements.unsure || self.app.limits.server_reset_query_always()
        {
            return Some(conn);
        }
        conn.release();
        None
    }

    async fn detach_after_queries(&mut self, mut conn: PooledConn) {
        if !cancels_settled(&conn).await {
            warn!(db = %self.login.db(), "closing server: a cancel sent to it was not delivered");
            return;
        }
        if std::mem::take(&mut self.relay_mut().session.settings_changed) {
            if let Err(e) = self.read_back_settings(&mut conn).await {
                // the server's session state is unknown: it must not serve anyone else
                warn!(db = %self.login.db(), "reading back session settings failed: {e}");
                return;
            }
        }
        if self.app.limits.server_reset_query_always() {
            self.reset_and_release(conn).await;
        } else {
            self.reset_with(conn, "").await;
        }
    }

    /// After a unit: the server goes back (`detach_after_queries`), or, for a pinned client
    /// that reset settings (`keep`), which on its server went to the server's defaults where
    /// PostgreSQL gives the client's startup values, it is read back and brought in step
    /// with the client again, and kept. If that fails, the server's state is unknown and the
    /// client, which cannot move, is disconnected.
    async fn after_unit(&mut self, mut conn: PooledConn, keep: bool) -> Option<PgError> {
        if !keep {
            self.detach_after_queries(conn).await;
            return None;
        }
        match self.resync_on(&mut conn).await {
            Ok(()) => {
                self.server = Some(conn);
                None
            }
            Err(e) => {
                warn!(db = %self.login.db(), "bringing a pinned server back to its client's settings failed: {e}");
                Some(PgError::fatal(
                    "08006",
                    format!("pgmux lost the session's settings: {e}"),
                ))
            }
        }
    }

    async fn resync_on(&mut self, conn: &mut PooledConn) -> Result<(), String> {
        if std::mem::take(&mut self.relay_mut().session.settings_changed) {
            self.read_back_settings(conn).await?;
        }
        let wants = &self.login.wants;
        let Some(sql) = params::sync_statement(wants, &conn.params, &conn.extras) else {
            return Ok(());
        };
        let applied = params::untracked_sets(wants, &conn.params);
        match conn.run_internal(&sql).await {
            Ok(None) => {
                note_applied(conn, wants, applied);
                Ok(())
            }
            Ok(Some(e)) => Err(format!("{}: {}", e.code, e.message)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The client changed settings (SET, RESET, set_config...): what the server now holds
    /// becomes what the client expects on any server, and what this server must shed before
    /// it serves another client.
    async fn read_back_settings(&mut self, conn: &mut PooledConn) -> Result<(), String> {
        let mut rows = Vec::new();
        let named = self
            .relay
            .as_deref_mut()
            .map(|r| std::mem::take(&mut r.session.custom_settings))
            .unwrap_or_default();
        let sql = read_back_statement(&named, &conn.extras, &self.login.wants);
        // its first, quick statement runs under the client's statement_timeout (the rest
        // without): a very short one may cancel it, and a retry may well pass
        let mut tries = 5;
        loop {
            rows.clear();
            match conn.query_internal(&sql, Some(&mut rows)).await {
                Ok(None) => break,
                Ok(Some(e)) if e.code == "57014" && tries > 1 => tries -= 1,
                Ok(Some(e)) => return Err(e.message),
                Err(e) => return Err(e.to_string()),
            }
        }
        let timeout = rows.first().and_then(|r| r.first()).cloned();
        let (Some(timeout), Some(rest)) = (timeout, rows.get(1..)) else {
            return Err("no statement_timeout read back".into());
        };
        let mut rows = rest.to_vec();
        take_statement_timeout(&mut rows, timeout);
        let (wants, startup) = self.login.wants_mut();
        wants.retain(params::is_tracked);
        for name in std::mem::take(&mut conn.extras) {
            conn.params.remove(&name);
        }
        let mut ours = PgmuxSettings::default();
        let mut seen: Vec<&str> = Vec::with_capacity(rows.len());
        for row in &rows {
            let [name, value] = &row[..] else {
                return Err("unexpected pg_settings row".into());
            };
            // a custom setting may be both listed (defined by a module) and asked by name
            if params::is_tracked(name) || seen.iter().any(|s| s.eq_ignore_ascii_case(name)) {
                continue;
            }
            seen.push(name);
            if is_unset(name, value) {
                continue;
            }
            // pgmux's own settings, run by the server (in a transaction, among other
            // statements, over the extended protocol): pgmux takes them, and they never
            // follow the client to other servers; this one sheds them before its next use
            match ours.take(name, value) {
                Ours::No => wants.set(name, value),
                Ours::Set => {}
                // not set on this server (NULL, or '' once reset or rolled back)
                Ours::Unset => continue,
            }
            conn.params.set(name, value);
            conn.extras.push(name.clone());
        }
        // pgmux gave the server the client's startup settings with set_config, so a RESET
        // (RESET ALL, DISCARD ALL) there went to the server's default; on PostgreSQL it goes
        // back to the startup value, which the client's next unit gets wherever it runs. A
        // startup setting the session no longer holds was reset.
        for (name, value) in startup {
            let held = rows
                .iter()
                .any(|row| row[0].eq_ignore_ascii_case(name) && !is_unset(&row[0], &row[1]));
            if !held {
                wants.set(name, value);
            }
        }
        let reset = self
            .relay
            .as_deref_mut()
            .map(|r| std::mem::take(&mut r.session.pgmux_reset))
            .unwrap_or_default();
        if let Some(r) = self.route.as_mut() {
            r.adopt(ours.route.as_deref(), ours.min_lsn.as_deref(), reset);
        }
        Ok(())
    }

    /// Shows in SHOW CLIENTS and the metrics whether the client keeps its server.
    fn show_pin(&mut self) {
        let pin = self.relay.as_deref().and_then(|r| r.session.pin);
        if pin != self.pinned {
            let reason = pin.map_or("", |p| p.as_str());
            if !reason.is_empty() {
                info!(db = %self.login.db(), user = %self.login.user(), "client pinned to its server ({reason})");
            }
            self.login.client.set_pinned(pin);
            self.pinned = pin;
        }
    }

    async fn reset_and_release(&self, conn: PooledConn) {
        let config = self.app.config_arc();
        self.reset_with(conn, config.pgmux.server_reset_query.trim())
            .await;
    }

    async fn reset_with(&self, mut conn: PooledConn, sql: &str) {
        if conn.statements.unsure && !drop_statements(&mut conn).await {
            return warn!(db = %self.login.db(), "closing server: deallocating its statements failed");
        }
        if sql.is_empty() {
            return conn.release();
        }
        match tokio::time::timeout(RESET_TIMEOUT, conn.run_internal(sql)).await {
            Ok(Ok(None)) => {
                let upper = sql.to_ascii_uppercase();
                if upper.contains("DISCARD ALL") || upper.contains("RESET ALL") {
                    forget_reset_settings(&mut conn, &upper);
                }
                if upper.contains("DISCARD ALL") || upper.contains("DEALLOCATE ALL") {
                    conn.statements.clear();
                }
                conn.release();
            }
            Ok(Ok(Some(e))) => {
                warn!(db = %self.login.db(), "server_reset_query failed: {}", e.message)
            }
            Ok(Err(e)) => warn!(db = %self.login.db(), "server_reset_query failed: {e}"),
            Err(_) => warn!(db = %self.login.db(), "server_reset_query timed out"),
        }
    }

    /// The server is closed while it still runs the client's work (the client left, or a
    /// timeout ended the session). PostgreSQL would run that work to its end, unaware of the
    /// closed socket until it next writes, while the pool opens another server in its place:
    /// so it is cancelled (in the background, bounded like a client's cancel).
    fn cancel_abandoned(&self, c: crate::cancel::Cancel) {
        let timeout = self
            .app
            .config()
            .pgmux
            .server_connect_timeout
            .get()
            .unwrap_or(crate::cancel::DEFAULT_TIMEOUT);
        tokio::spawn(async move {
            let to = c.to.clone();
            if let Err(e) = crate::cancel::send_cancel(c, timeout).await {
                tracing::debug!("cancelling abandoned work on {to} failed: {e}");
            }
        });
    }

    /// After the session: the server goes back only if idle and clean, else it is closed.
    async fn finish(&mut self, error: Option<PgError>) {
        if self.seat.take().is_some() {
            // the batch reads the rest of the answer and drops it; a query still running
            // (the batch points the client's cancels at the server only while its query
            // runs) is cancelled, so the clients behind it in the batch need not wait it out
            let busy = self.relay.as_deref().is_some_and(|r| !r.flow.quiet());
            let key = &self.login.client.info().cancel;
            if let Some(c) = busy.then(|| key.start_cancel(key.secret)).flatten() {
                self.cancel_abandoned(c);
            }
            self.login.client.set_cancel_target(None);
        }
        if let Some(conn) = self.server.take() {
            self.login.client.set_cancel_target(None);
            let relay = self.relay_mut();
            let (clean, pinned, changed, busy) = (
                relay.server_clean(),
                relay.session.pin.is_some(),
                relay.session.settings_changed,
                !relay.flow.quiet(),
            );
            let reset = self.mode == PoolMode::Session
                || pinned
                || self.app.limits.server_reset_query_always();
            if !clean || ((reset || changed) && !cancels_settled(&conn).await) {
                if busy {
                    self.cancel_abandoned(conn.cancel_target().cancel());
                }
                drop(conn);
            } else if reset {
                // what pinned the client (temporary tables, LISTEN...) goes with DISCARD ALL
                self.reset_and_release(conn).await;
            } else if changed {
                // RESET ALL leaves a SET ROLE alone
                self.reset_with(conn, "RESET ALL; RESET ROLE").await;
            } else {
                self.reset_with(conn, "").await;
            }
        }
        let (pending, at_boundary) = match self.relay.as_deref_mut() {
            Some(r) => (r.s2c.take_ready(), r.s2c.scanner.at_boundary()),
            None => (BytesMut::new(), true),
        };
        // A server lost in the middle of a message leaves the client inside it: an error
        // appended there would be read as that message's bytes (drivers report a parse error),
        // so such a client gets the cut bytes and EOF.
        let error = error.filter(|_| at_boundary);
        if error.is_some() || !pending.is_empty() {
            farewell(&mut self.stream, &pending, error.as_ref()).await;
        }
    }
}

/// Values of pgmux's settings a server holds after a unit of work.
#[derive(Default)]
struct PgmuxSettings {
    route: Option<String>,
    min_lsn: Option<String>,
}

enum Ours {
    No,
    Set,
    Unset,
}

impl PgmuxSettings {
    /// Keeps `name` if it is one of pgmux's settings.
    fn take(&mut self, name: &str, value: &str) -> Ours {
        let slot = if name.eq_ignore_ascii_case("pgmux.route") {
            &mut self.route
        } else if name.eq_ignore_ascii_case("pgmux.min_lsn") {
            &mut self.min_lsn
        } else if name.len() > 6 && name[..6].eq_ignore_ascii_case("pgmux.") {
            return Ours::Set;
        } else {
            return Ours::No;
        };
        if value.is_empty() {
            return Ours::Unset;
        }
        *slot = Some(value.to_string());
        Ours::Set
    }
}

/// The client's request, if a batch may take it while the client waits for a server: one
/// standalone simple query (`batch::eligible`) from a client with nothing else going on.
fn batch_ticket(relay: &mut Relay, login: &LoggedIn) -> Option<Ticket> {
    if login.pool.settings().batch_size < 2 {
        return None;
    }
    let idle = relay.c2s.scanned == 0
        && relay.flow.quiet()
        && !relay.flow.terminated
        && relay.flow.status == b'I'
        && relay.session.pin.is_none()
        && !relay.session.settings_changed
        && relay.tracker.as_ref().is_none_or(Tracker::is_settled);
    if !idle {
        return None;
    }
    let query = relay.c2s.buf.first() == Some(&b'Q');
    let mut pre = None;
    let eligible = batch::eligible(&relay.c2s.buf, |text| {
        let (fp, fx) = crate::router::memo::lexed(text);
        // the relay's scan of this very Query needs the same pass: it keeps this one
        pre = query.then_some((fp, fx));
        fx
    });
    relay.prescanned = pre;
    eligible.then(|| Ticket {
        query: bytes::Bytes::copy_from_slice(&relay.c2s.buf),
        wants: login.wants.clone(),
        client: login.client.info().clone(),
    })
}

/// The server was last brought in step with these very settings and has not changed since
/// (see `ServerConn::synced`).
fn in_step(conn: &PooledConn, wants: &Arc<params::Params>) -> bool {
    conn.in_step_with(wants)
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
fn route_state(
    app: &App,
    login: &LoggedIn,
    mode: PoolMode,
    start: StartupRoute,
) -> Option<RouteState> {
    let config = app.config_arc();
    let db = config.database(login.db())?;
    let router = app.router(db, login.user())?;
    let pools = app.host_pools(db, login.user());
    Some(RouteState::new(
        router,
        pools,
        mode == PoolMode::Session,
        start,
    ))
}

/// Why a client waiting for a server got none.
enum AttachError {
    /// It is told why, and disconnected.
    Refused(PgError),
    /// It hung up while waiting.
    Left,
}

impl From<PgError> for AttachError {
    fn from(e: PgError) -> Self {
        AttachError::Refused(e)
    }
}

/// The length of the request at the front of the client's input when a cancel can end it
/// before it reaches a server: whole messages up to its Query, Sync or FunctionCall, as
/// PostgreSQL skips a cancelled unit's messages up to its Sync. None for anything else (an
/// unfinished unit, COPY data, a Terminate), which the cancel leaves waiting.
fn cancellable_request(c2s: &crate::relay::channel::Channel) -> Option<usize> {
    if c2s.scanned != 0 || !c2s.scanner.at_boundary() {
        return None;
    }
    let b = &c2s.buf[..];
    let mut at = 0;
    while b.len() >= at + 5 {
        let len = u32::from_be_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as usize;
        let end = at.checked_add(1 + len).filter(|_| len >= 4)?;
        if end > b.len() {
            return None;
        }
        match b[at] {
            b'Q' | b'S' | b'F' => return Some(end),
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => at = end,
            _ => return None,
        }
    }
    None
}

/// Resolves when a CancelRequest for the waiting client arrives, if `armed`; else never.
async fn cancel_asked(client: &stats::ClientHandle, armed: bool) {
    if !armed {
        return std::future::pending().await;
    }
    poll_fn(|cx| client.poll_cancel_asked(cx)).await
}

/// The bytes hold whole messages only: what comes next on the socket starts a message.
fn whole_messages(mut b: &[u8]) -> bool {
    while b.len() >= 5 {
        let total = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize + 1;
        if total > b.len() {
            return false;
        }
        b = &b[total..];
    }
    b.is_empty()
}

/// KILL, or a safe shutdown (whose `wake_all` wakes the task `poll_killed` registered).
async fn stopped(client: &stats::ClientHandle, app: &App) {
    poll_fn(|cx| {
        if client.poll_killed(cx).is_ready() || app.shutdown_stage() == Shutdown::Safe {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

fn shutdown_error() -> PgError {
    PgError::fatal(
        "57P01",
        "terminating connection due to administrator command",
    )
}

/// What the read-back asks the server: its settings with a session source, and those
/// pg_settings does not list, by name: `role` (SET ROLE, which RESET ALL leaves alone too),
/// pgmux's own, and the custom ones (`myapp.tenant`) the unit named, the server was given
/// or the client expects.
///
/// The client's statement_timeout would apply to the read-back too, and one of a few
/// milliseconds cancels it: so a first statement, quick enough to pass, reads it and then
/// sets it to 0 for the rest (`set_config(..., true)`, local to the implicit transaction of
/// the one Query; `OFFSET 0` keeps the read first); the value is then compared with its
/// default (`take_statement_timeout`).
fn read_back_statement(named: &[String], extras: &[String], wants: &params::Params) -> String {
    let mut sql = String::from(
        "SELECT v, pg_catalog.set_config('statement_timeout', '0', true) FROM \
         (SELECT pg_catalog.current_setting('statement_timeout') AS v OFFSET 0) s; \
         SELECT name, setting FROM pg_catalog.pg_settings \
         WHERE source = 'session' AND name <> 'statement_timeout' \
         UNION ALL SELECT '', reset_val FROM pg_catalog.pg_settings \
         WHERE name = 'statement_timeout' \
         UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
         UNION ALL SELECT 'pgmux.route', pg_catalog.current_setting('pgmux.route', true) \
         UNION ALL SELECT 'pgmux.min_lsn', pg_catalog.current_setting('pgmux.min_lsn', true)",
    );
    let custom = named
        .iter()
        .map(String::as_str)
        .chain(extras.iter().map(String::as_str))
        .chain(wants.iter().map(|(n, _)| n))
        .filter(|n| n.contains('.') && !n.to_ascii_lowercase().starts_with("pgmux."));
    let mut asked: Vec<&str> = Vec::new();
    for name in custom {
        if asked.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            continue;
        }
        asked.push(name);
        sql.push_str(" UNION ALL SELECT ");
        params::quote_literal(&mut sql, name);
        sql.push_str(", pg_catalog.current_setting(");
        params::quote_literal(&mut sql, name);
        sql.push_str(", true)");
    }
    sql
}

/// The read-back's statement_timeout: `value` as the session holds it (`30s`, `1min`), and a
/// row named '' with its default in milliseconds, which becomes the setting's row when the
/// two differ (a value equal to the default needs no following).
fn take_statement_timeout(rows: &mut Vec<Vec<String>>, value: String) {
    let Some(at) = rows
        .iter()
        .position(|r| r.first().is_some_and(|n| n.is_empty()))
    else {
        return;
    };
    let default = rows.remove(at).pop().unwrap_or_default();
    if milliseconds(&value).is_none_or(|ms| default.parse::<i64>().ok() != Some(ms)) {
        rows.push(vec!["statement_timeout".to_string(), value]);
    }
}

/// A time setting as PostgreSQL shows it (`0`, `250ms`, `30s`, `5min`, `2h`, `1d`), in ms.
fn milliseconds(shown: &str) -> Option<i64> {
    let digits = shown
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(shown.len());
    let n: i64 = shown[..digits].parse().ok()?;
    let unit = match &shown[digits..] {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// A startup search_path that names pg_temp: an unqualified CREATE may make a temporary
/// object, which must not outlive the client's use of the server (one set later is seen by
/// `router::effects`).
fn startup_temp_path(wants: &params::Params) -> bool {
    wants
        .get("search_path")
        .is_some_and(|p| p.to_ascii_lowercase().contains("pg_temp"))
}

/// A read-back value that means the session does not hold the setting: no role set, or a
/// custom setting never set (NULL) or reset ('').
fn is_unset(name: &str, value: &str) -> bool {
    (name == "role" && value == "none") || (name.contains('.') && value.is_empty())
}

/// A client's query may have dropped some of pgmux's statements on the server
/// (`ServerStatements::unsure`): it drops them all, so that pgmux knows what it holds.
/// Returns whether it did.
async fn drop_statements(conn: &mut PooledConn) -> bool {
    let dropped = tokio::time::timeout(RESET_TIMEOUT, conn.run_internal("DEALLOCATE ALL")).await;
    if !matches!(dropped, Ok(Ok(None))) {
        return false;
    }
    conn.statements.clear();
    conn.statements.unsure = false;
    true
}

/// The server ran RESET ALL or DISCARD ALL: the settings pgmux applied that the server does
/// not report back are at their defaults again, so the next client's are sent whatever they
/// are. RESET ALL alone leaves a role set by SET ROLE.
fn forget_reset_settings(conn: &mut PooledConn, upper_sql: &str) {
    let role_reset = upper_sql.contains("DISCARD ALL") || upper_sql.contains("RESET ROLE");
    let mut kept = Vec::new();
    for name in std::mem::take(&mut conn.extras) {
        if name.eq_ignore_ascii_case("role") && !role_reset {
            kept.push(name);
        } else {
            conn.params.remove(&name);
        }
    }
    conn.extras = kept;
    conn.synced = None;
}

/// After a successful sync the server holds the client's values, reported or not; the
/// untracked ones it was given (`applied`) must be reset before it serves a client that
/// does not expect them.
fn note_applied(conn: &mut PooledConn, wants: &params::Params, applied: Vec<String>) {
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
        }
    }
    for n in applied {
        if !conn.extras.iter().any(|e| e.eq_ignore_ascii_case(&n)) {
            conn.extras.push(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle client costs its task (tokio's header, core and trailer, 104 bytes, plus the
    /// future, rounded up to 128: 256 bytes with a future up to 152), its boxed session (152
    /// bytes: one 160-byte block of glibc's malloc), its socket's registration and its
    /// registry entry. These bounds keep the first two from growing unnoticed; see
    /// benches/idle-memory.sh for the whole figure.
    #[tokio::test]
    async fn an_idle_client_holds_a_small_task_and_session() {
        let config = crate::config::Config::parse(
            "[pgmux]\nlisten_port = 1\n[[databases]]\nname = \"d\"\nhost = \"127.0.0.1\"\n",
            "test",
        )
        .unwrap();
        let app = App::new(config);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let task = serve(app, ClientSocket::Tcp(c), ClientAddr::from(addr), false, ());
        assert!(
            std::mem::size_of_val(&task) <= 144,
            "{}",
            std::mem::size_of_val(&task)
        );
        assert!(
            std::mem::size_of::<Session>() <= 152,
            "{}",
            std::mem::size_of::<Session>()
        );
        assert!(std::mem::size_of::<PooledConn>() <= 16);
    }

    #[test]
    fn a_statement_timeout_is_followed_only_when_not_its_default() {
        let row = |n: &str, v: &str| vec![n.to_string(), v.to_string()];
        let read = |value: &str, default: &str| {
            let mut rows = vec![row("search_path", "a"), row("", default)];
            take_statement_timeout(&mut rows, value.to_string());
            rows
        };
        assert_eq!(read("0", "0"), [row("search_path", "a")]);
        assert_eq!(read("30s", "30000"), [row("search_path", "a")]);
        assert_eq!(read("2min", "120000"), [row("search_path", "a")]);
        assert_eq!(
            read("1ms", "0"),
            [row("search_path", "a"), row("statement_timeout", "1ms")]
        );
        assert_eq!(
            read("0", "30000"),
            [row("search_path", "a"), row("statement_timeout", "0")]
        );
        assert_eq!(milliseconds("1d"), Some(86_400_000));
        assert_eq!(milliseconds("5x"), None);
    }
}
