//! One client's routing: which server takes the work waiting in its buffer, decided once per
//! unit of work when the session needs a server (`Session::attach`), never per message.
//!
//! The waiting messages are walked once: the text of each simple Query and Parse, and for a
//! Bind of a named statement the text it was prepared with, goes through the classifier; the
//! most demanding answer wins, since everything buffered goes to the one server chosen.
//! Then: the database's `route`, a `/* pgmux:... */` hint, the connection's `pgmux.route`,
//! and finally the class decide between the primary and a replica (when in doubt: the
//! primary). Reads honour read-your-writes: after a write, a client's reads go only to
//! replicas that have replayed past a primary WAL position sampled after the write (see
//! docs/routing.md for the choice and its cost). `SET pgmux.*` is answered here and never
//! reaches a server.

use super::balance::{DbRouter, Lease, Reason, Target};
use super::classify::{classify, Class, Command, Hint, Route};
use super::config::{Consistency, PrimaryReads};
use super::lsn::Lsn;
use crate::config::DbRoute;
use crate::pool::{Pool, PoolError, PooledConn};
use crate::prepared::{self, ClientStatements};
use crate::protocol::messages::{self, take_cstr};
use crate::protocol::PgError;
use crate::relay::{Channel, Relay};
use crate::server::ServerError;
use crate::topology::Snapshot;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Instant;

/// What a client asked for at startup (`options='-c pgmux.route=replica'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupRoute {
    pub route: Route,
    pub min_lsn: Option<Lsn>,
}

impl Default for StartupRoute {
    fn default() -> Self {
        StartupRoute {
            route: Route::Auto,
            min_lsn: None,
        }
    }
}

/// Takes pgmux's own settings out of the startup settings (no server may see them).
pub fn take_startup(settings: &mut Vec<(String, String)>) -> Result<StartupRoute, String> {
    let mut out = StartupRoute::default();
    let mut err = None;
    settings.retain(|(k, v)| {
        let k = k.to_ascii_lowercase();
        if !k.starts_with("pgmux.") {
            return true;
        }
        match k.as_str() {
            "pgmux.route" => match v.to_ascii_lowercase().as_str() {
                "primary" => out.route = Route::Primary,
                "replica" => out.route = Route::Replica,
                "auto" | "default" => out.route = Route::Auto,
                _ => err = Some(format!("invalid value for pgmux.route: {v:?}")),
            },
            "pgmux.min_lsn" => match v.parse::<Lsn>() {
                Ok(l) => out.min_lsn = Some(l),
                Err(e) => err = Some(e.to_string()),
            },
            _ => err = Some(format!("unknown pgmux setting {k:?}")),
        }
        false
    });
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// What the waiting messages need.
#[derive(Debug, PartialEq)]
enum Need {
    /// The first message is a simple Query holding a pgmux command of `len` bytes.
    Pgmux {
        cmd: Command,
        len: usize,
        reset: bool,
    },
    /// Work for a server; `unit` is the byte length of the first whole unit (a Query, or
    /// extended messages through a Sync) when it is all buffered, so pgmux can answer it with
    /// an error instead of ending the session.
    Work {
        class: Class,
        hint: Option<Hint>,
        unit: Option<usize>,
    },
}

/// Order of demand, as the classifier combines statements.
fn rank(c: Class) -> u8 {
    match c {
        // below a read: a COMMIT or ROLLBACK from a client in no transaction reads
        // nothing, so a unit of nothing else may skip the read-your-writes floor
        Class::Transaction => 0,
        Class::Read => 1,
        Class::BeginReadOnly => 2,
        Class::Session => 3,
        Class::Begin => 4,
        Class::Write | Class::Pgmux(_) => 5,
    }
}

/// A C string at the start of `b` as UTF-8; None (treated as a write) otherwise.
fn text(mut b: &[u8]) -> Option<&str> {
    take_cstr(&mut b).and_then(|t| std::str::from_utf8(t).ok())
}

/// Walks the complete messages in `buf` (none of them scanned yet) once.
fn inspect(buf: &[u8], stmts: Option<&ClientStatements>, write_functions: &[String]) -> Need {
    // the lowest rank: a unit of nothing but COMMIT/ROLLBACK (or a lone Sync) reads nothing
    let mut class = Class::Transaction;
    let mut hint = None;
    let mut unit = None;
    // statements this batch parses (classified at their Parse): a Bind of one of them adds
    // nothing. A few names without allocating; past that, a Bind counts as unknown work.
    let mut parsed: [&[u8]; 4] = [b""; 4];
    let mut n_parsed = 0;
    let mut parsed_unnamed = false;
    let mut at = 0;
    let raise = |class: &mut Class, c: Class| {
        if rank(c) > rank(*class) {
            *class = c;
        }
    };
    while let Some(head) = buf.get(at..at + 5) {
        let tag = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(body) = buf.get(at + 5..at + 1 + len.max(4)) else {
            // the rest has not arrived: unknown work is primary work
            if !matches!(tag, b'S' | b'E' | b'D' | b'C' | b'H') {
                raise(&mut class, Class::Write);
            }
            break;
        };
        let sql = match tag {
            b'Q' => Some(text(body)),
            b'P' => prepared::split_parse(body).map(|(name, rest)| {
                if name.is_empty() {
                    parsed_unnamed = true;
                } else if n_parsed < parsed.len() {
                    parsed[n_parsed] = name;
                    n_parsed += 1;
                }
                text(rest)
            }),
            b'B' => match prepared::bind_names(body) {
                // parsed in this batch (classified then), or earlier: the tracker keeps it
                Some((_, b"", _)) => {
                    (!parsed_unnamed).then(|| stmts.and_then(|s| s.unnamed_body()).and_then(text))
                }
                Some((_, stmt, _)) if parsed[..n_parsed].contains(&stmt) => None,
                Some((_, stmt, _)) => {
                    Some(stmts.and_then(|s| s.get(stmt)).and_then(|d| text(&d.body)))
                }
                None => Some(None),
            },
            b'S' | b'E' | b'D' | b'C' | b'H' => None,
            // FunctionCall, stray COPY data, anything else
            _ => Some(None),
        };
        match sql {
            Some(Some(sql)) => {
                let mut c = classify(sql, write_functions);
                if rank(c.class) < rank(Class::Session)
                    && crate::router::memo::lexed(sql).1.pin.is_some()
                {
                    // state that pins its client (a WITH HOLD cursor, SQL PREPARE, a
                    // search_path naming pg_temp) is made where the client's writes can
                    // follow it: pinned on a replica, they would fail there
                    c.class = Class::Session;
                }
                if let (0, b'Q', Class::Pgmux(cmd)) = (at, tag, c.class) {
                    let reset = sql
                        .trim_start()
                        .get(..5)
                        .is_some_and(|w| w.eq_ignore_ascii_case("reset"));
                    return Need::Pgmux {
                        cmd,
                        len: len + 1,
                        reset,
                    };
                }
                raise(&mut class, c.class);
                hint = match (hint, c.hint) {
                    (Some(Hint::Primary), _) | (_, Some(Hint::Primary)) => Some(Hint::Primary),
                    (h, None) => h,
                    (None, h) => h,
                    (h, _) => h,
                };
            }
            Some(None) => raise(&mut class, Class::Write),
            None => {}
        }
        at += 1 + len;
        if unit.is_none() && (tag == b'S' || (tag == b'Q' && at == 1 + len)) {
            unit = Some(at);
        }
    }
    Need::Work { class, hint, unit }
}

/// A write this client completed on the primary, waiting for a primary WAL sample taken
/// after it: the primary's host index and its count of checks when the write completed.
#[derive(Debug, Clone, Copy)]
struct WriteMark {
    host: usize,
    checks: u64,
}

/// The routing state of one client session.
pub struct RouteState {
    pub router: Arc<DbRouter>,
    /// One pool per host, index = host index.
    pools: Vec<Arc<Pool>>,
    session_mode: bool,
    /// `pgmux.route` for this connection.
    pub route: Route,
    /// `pgmux.min_lsn`: a floor the client set.
    pub min_lsn: Option<Lsn>,
    /// The startup packet's values: what RESET goes back to.
    startup: StartupRoute,
    /// Read-your-writes floor from samples taken after this client's writes.
    floor: Option<Lsn>,
    mark: Option<WriteMark>,
    /// The host of the server lent now, and whether the work may have written.
    lease: Option<(Lease, bool)>,
    /// The server lent now is a replica serving an autocommit read: if it fails before
    /// answering, the read may be sent again elsewhere (`relay::retry`).
    retryable: bool,
    /// The server lent now is a replica serving a unit outside any transaction (a read, or
    /// a lone COMMIT, ROLLBACK or Sync): what the client sends after that unit is routed on
    /// its own (`Relay::serve_one_unit`).
    one_unit: bool,
    /// The server lent now is a replica serving a read-only transaction (`BEGIN READ
    /// ONLY`): each unit goes once the one before is answered, so that what the client
    /// pipelines after the transaction's end is routed on its own
    /// (`Relay::serve_unit_at_a_time`).
    one_at_a_time: bool,
    /// The client's `default_transaction_isolation` is serializable: a hot standby refuses
    /// every statement then (0A000), so its reads go to the primary.
    pub serializable: bool,
}

/// How a unit of work ends up on a server.
struct Choice {
    target: Target,
    reason: Reason,
    may_write: bool,
    /// Reads nothing (a COMMIT or ROLLBACK outside a transaction): any replica will do, the
    /// client's read-your-writes floor does not apply.
    reads_nothing: bool,
}

impl RouteState {
    pub fn new(
        router: Arc<DbRouter>,
        pools: Vec<Arc<Pool>>,
        session_mode: bool,
        startup: StartupRoute,
    ) -> RouteState {
        RouteState {
            router,
            pools,
            session_mode,
            route: startup.route,
            min_lsn: startup.min_lsn,
            startup,
            floor: None,
            mark: None,
            lease: None,
            retryable: false,
            one_unit: false,
            one_at_a_time: false,
            serializable: false,
        }
    }

    /// The host of the server lent now.
    pub fn current_host(&self) -> Option<usize> {
        self.lease.as_ref().map(|(l, _)| l.host)
    }

    /// Whether the unit on the server lent now is a replica read that may be retried.
    pub fn retryable(&self) -> bool {
        self.retryable && self.lease.is_some()
    }

    /// Whether the server lent now serves one unit only (see `one_unit`).
    pub fn serves_one_unit(&self) -> bool {
        self.one_unit && self.lease.is_some()
    }

    /// Whether the server lent now takes one unit at a time (see `one_at_a_time`).
    pub fn serves_one_at_a_time(&self) -> bool {
        self.one_at_a_time && self.lease.is_some()
    }

    /// Whether `buf` (complete client messages) holds nothing but autocommit reads.
    pub fn is_read(&self, buf: &[u8], stmts: Option<&ClientStatements>) -> bool {
        !self.session_mode
            && matches!(
                inspect(buf, stmts, &self.router.routing.write_functions),
                Need::Work {
                    class: Class::Read,
                    ..
                }
            )
    }

    /// The server lent now failed (before answering anything the client saw): its host is
    /// banned and its lease dropped, so the work can be routed again elsewhere.
    pub fn server_failed(&mut self, why: &str) {
        self.retryable = false;
        self.one_unit = false;
        self.one_at_a_time = false;
        let Some((lease, _)) = self.lease.take() else {
            return;
        };
        let h = &self.router.hosts[lease.host];
        tracing::warn!(db = %self.router.name, host = %h.host, port = h.port,
            "replica failed under a read, sending it again elsewhere: {why}");
        self.router.topology.ban(lease.host, why);
        self.router
            .stats
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// pgmux's settings as the server holds them after a unit of work that changed settings
    /// (read back from `pg_settings`): a value set there is taken; a setting the unit reset
    /// (`effects::PGMUX_ROUTE`...) and that the server no longer holds goes back to its
    /// startup value. PostgreSQL has applied its own rules: a SET in a transaction that
    /// rolled back, or a SET LOCAL, left nothing. PostgreSQL accepts any text for these
    /// placeholders, so a value pgmux cannot use is logged and ignored.
    pub fn adopt(&mut self, route: Option<&str>, min_lsn: Option<&str>, reset: u8) {
        use super::effects::{PGMUX_MIN_LSN, PGMUX_ROUTE};
        match route {
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "primary" => self.route = Route::Primary,
                "replica" => self.route = Route::Replica,
                "auto" | "default" | "" => self.route = Route::Auto,
                _ => tracing::warn!(value = v, "ignoring invalid pgmux.route"),
            },
            None if reset & PGMUX_ROUTE != 0 => self.route = self.startup.route,
            None => {}
        }
        match min_lsn {
            Some("") => self.min_lsn = None,
            Some(v) => match v.parse::<Lsn>() {
                Ok(l) => self.min_lsn = Some(l),
                Err(_) => tracing::warn!(value = v, "ignoring invalid pgmux.min_lsn"),
            },
            None if reset & PGMUX_MIN_LSN != 0 => self.min_lsn = self.startup.min_lsn,
            None => {}
        }
    }

    /// The server went back to its pool: a unit that may have written on the primary now
    /// counts for read-your-writes.
    pub fn released(&mut self) {
        self.retryable = false;
        self.one_unit = false;
        self.one_at_a_time = false;
        let Some((lease, may_write)) = self.lease.take() else {
            return;
        };
        if may_write && self.router.routing.consistency == Consistency::ReadYourWrites {
            let snap = self.router.topology.snapshot();
            self.mark = Some(WriteMark {
                host: lease.host,
                checks: snap.hosts[lease.host].checks,
            });
        }
    }

    /// Chooses a server for the work waiting in `relay`'s client buffer and checks one out.
    /// Ok(None): pgmux answered the work itself (its own SET, or an error for the unit).
    pub async fn checkout(&mut self, relay: &mut Relay) -> Result<Option<PooledConn>, PgError> {
        let need = if self.session_mode {
            Need::Work {
                class: Class::Write,
                hint: None,
                unit: None,
            }
        } else {
            let stmts = relay.tracker.as_ref().map(|t| &t.stmts);
            inspect(&relay.c2s.buf, stmts, &self.router.routing.write_functions)
        };
        let (class, hint, unit) = match need {
            Need::Pgmux { cmd, len, reset } => {
                self.command(cmd, reset, len, &mut relay.c2s, &mut relay.s2c);
                return Ok(None);
            }
            Need::Work { class, hint, unit } => (class, hint, unit),
        };
        // as `BEGIN ISOLATION LEVEL SERIALIZABLE`: a standby cannot run it
        let class = match class {
            Class::Read | Class::BeginReadOnly | Class::Transaction if self.serializable => {
                Class::Begin
            }
            c => c,
        };
        let choice = self.choose(class, hint);
        let snap = self.settled_snapshot().await;
        let result = match choice.target {
            Target::Primary => self.primary(&snap, choice.reason).await,
            Target::Replica => self.reader(&snap, &choice).await,
        };
        match result {
            Ok((conn, host, target, reason)) => {
                self.router.stats.count(target, reason);
                let may_write = choice.may_write && target == Target::Primary;
                self.lease = Some((self.router.lease(host), may_write));
                // only replicas: the primary is never banned away, so a retry could loop
                self.retryable = class == Class::Read && target == Target::Replica;
                self.one_unit =
                    target == Target::Replica && matches!(class, Class::Read | Class::Transaction);
                self.one_at_a_time = target == Target::Replica && class == Class::BeginReadOnly;
                Ok(Some(conn))
            }
            Err(e) => {
                self.router
                    .stats
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match unit {
                    // the whole unit is here: answer it and keep the session (not behind a
                    // BEGIN pgmux answered: the client's transaction would fail unseen)
                    Some(len) if e.severity == "ERROR" && !relay.begin_answered => {
                        relay.c2s.consume_unscanned(len);
                        let mut out = BytesMut::new();
                        e.encode(&mut out);
                        messages::ready_for_query(&mut out, b'I');
                        relay.s2c.insert(out.freeze());
                        Ok(None)
                    }
                    _ => Err(PgError {
                        severity: "FATAL",
                        ..e
                    }),
                }
            }
        }
    }

    /// Primary or replica for this unit, before looking at hosts.
    fn choose(&self, class: Class, hint: Option<Hint>) -> Choice {
        // Session commands (SET, RESET ALL, UNLISTEN *, CLOSE ALL, advisory unlocks: what
        // pools and drivers send at every hand-back or login) change no data: they leave a
        // client's reads on the replicas.
        let may_write = matches!(class, Class::Write | Class::Begin);
        let at = |target, reason| Choice {
            target,
            reason,
            may_write,
            reads_nothing: class == Class::Transaction,
        };
        match self.router.route {
            DbRoute::Replica => return at(Target::Replica, Reason::Alias),
            DbRoute::Primary => return at(Target::Primary, Reason::Alias),
            DbRoute::Auto => {}
        }
        // Work a client forces onto the primary counts as a write for read-your-writes:
        // that is often why it was sent there (a function the classifier cannot see into).
        let forced = |reason| Choice {
            target: Target::Primary,
            reason,
            may_write: true,
            reads_nothing: false,
        };
        if let Some(h) = hint.filter(|_| !self.session_mode) {
            return match h {
                Hint::Primary => forced(Reason::Hint),
                Hint::Replica => at(Target::Replica, Reason::Hint),
            };
        }
        match self.route {
            Route::Primary => return forced(Reason::Setting),
            Route::Replica => return at(Target::Replica, Reason::Setting),
            Route::Auto => {}
        }
        if self.session_mode {
            return at(Target::Primary, Reason::SessionMode);
        }
        if !self.router.routing.read_write_split {
            return at(Target::Primary, Reason::SplitOff);
        }
        match class {
            // A detached client is in no transaction (one in a transaction keeps its server):
            // its COMMIT or ROLLBACK only draws PostgreSQL's warning, which any server gives,
            // so a failover does not fail drivers' and pools' clean-up ROLLBACKs.
            Class::Read | Class::Transaction => at(Target::Replica, Reason::Read),
            Class::BeginReadOnly => at(Target::Replica, Reason::ReadOnlyTransaction),
            _ => at(Target::Primary, Reason::Write),
        }
    }

    /// The latest snapshot; right after start, waits (bounded) until every host has been
    /// checked once, so the first clients are not told there is no primary.
    async fn settled_snapshot(&self) -> Arc<Snapshot> {
        let snap = self.router.topology.snapshot();
        let unchecked = |s: &Snapshot| s.hosts.iter().any(|h| h.checks == 0 && h.failures == 0);
        if snap.primary.is_some() || !unchecked(&snap) {
            return snap;
        }
        let mut rx = self.router.topology.subscribe();
        let wait = async {
            loop {
                let s = rx.borrow_and_update().clone();
                if s.primary.is_some() || !unchecked(&s) {
                    return s;
                }
                if rx.changed().await.is_err() {
                    return s;
                }
            }
        };
        let bound = self.pools[0].settings().connect_timeout;
        tokio::time::timeout(bound, wait)
            .await
            .unwrap_or_else(|_| self.router.topology.snapshot())
    }

    /// Until when work for the primary waits for one through a restart or a failover: for
    /// server_login_retry from when the primary went (or from now, if it has not been seen
    /// to go), within query_wait_timeout. None: no wait (the outage is older, there was
    /// never a primary, or server_login_retry is 0).
    fn hold_until(&self, snap: &Snapshot) -> Option<Instant> {
        let settings = self.pools[0].settings();
        let now = Instant::now();
        let since = match (snap.primary, snap.primary_lost_at) {
            // none since pgmux started: no restart to wait through
            (None, None) => return None,
            // the last primary refuses the monitor's login (a changed password): no restart
            (None, Some(_)) if last_primaries(snap).any(|h| h.refused) => return None,
            (_, lost) => lost.unwrap_or(now),
        };
        let until = since + settings.login_retry?;
        let until = match settings.query_wait_timeout {
            Some(q) => until.min(now + q),
            None => until,
        };
        (until > now).then_some(until)
    }

    /// The first snapshot that `ready` accepts, or the latest one at `until`.
    async fn snapshot_when(
        &self,
        until: Instant,
        ready: impl Fn(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        let mut rx = self.router.topology.subscribe();
        let wait = async {
            loop {
                let s = rx.borrow_and_update().clone();
                if ready(&s) || rx.changed().await.is_err() {
                    return s;
                }
            }
        };
        match tokio::time::timeout_at(until.into(), wait).await {
            Ok(s) => s,
            Err(_) => self.router.topology.snapshot(),
        }
    }

    /// A server of the primary. While there is none, or it cannot be reached as a restart
    /// makes it unreachable, the work waits (`hold_until`) for the host monitor to find a
    /// primary answering again, the same host or a promoted one, rather than failing: a
    /// restart or failover costs the client a wait, as a restart of a single server does
    /// (`Pool::checkout`).
    async fn primary(
        &mut self,
        snap: &Snapshot,
        reason: Reason,
    ) -> Result<(PooledConn, usize, Target, Reason), PgError> {
        let mut latest: Option<Arc<Snapshot>> = None;
        // how long to wait, settled at the first setback
        let mut hold: Option<Option<Instant>> = None;
        loop {
            let snap = latest.as_deref().unwrap_or(snap);
            let (p, e) = match snap.primary {
                Some(p) => match self.pools[p].checkout_or_fail().await {
                    Ok(c) => return Ok((c, p, Target::Primary, reason)),
                    Err(e) => (Some(p), Some(e)),
                },
                None => (None, None),
            };
            if let (Some(p), Some(e)) = (p, &e) {
                if is_host_failure(e) {
                    self.router.topology.ban(p, &e.to_string());
                }
            }
            let until = *hold.get_or_insert_with(|| self.hold_until(snap));
            let waits = e.as_ref().is_none_or(crate::pool::is_transient);
            let Some(until) = until.filter(|u| waits && *u > Instant::now()) else {
                return Err(match e {
                    Some(e) => {
                        let host_failed = is_host_failure(&e);
                        unavailable(e, host_failed, "primary")
                    }
                    None => no_primary(snap),
                });
            };
            // a primary checked healthy since: another host, or this one back
            let checks = p.map(|p| snap.hosts[p].checks);
            let back = move |s: &Snapshot| {
                s.primary
                    .is_some_and(|q| Some(q) != p || Some(s.hosts[q].checks) > checks)
            };
            latest = Some(self.snapshot_when(until, back).await);
        }
    }

    /// A read: a replica that qualifies, another one if its checkout fails, then the primary
    /// as `primary_reads` allows. Work sent to replicas that may write (a replica-only alias,
    /// a hint or `pgmux.route = replica` over a write) never falls back to the primary: there
    /// it would write where the client asked for a replica only.
    async fn reader(
        &mut self,
        snap: &Snapshot,
        choice: &Choice,
    ) -> Result<(PooledConn, usize, Target, Reason), PgError> {
        let (reason, may_write) = (choice.reason, choice.may_write);
        let overridden = choice.reads_nothing
            || (reason != Reason::Read && reason != Reason::ReadOnlyTransaction);
        let floor = match self.read_floor(snap) {
            Some(f) => f,
            // a write of this client is not yet sampled on the primary
            None if overridden => self.min_lsn,
            None => return self.primary(snap, Reason::ReadYourWrites).await,
        };
        let mut failed: Vec<usize> = Vec::new();
        if may_write {
            // not even as a replica's share (primary_reads = "always")
            failed.extend(snap.primary);
        }
        let mut fell_back = Reason::NoReplica;
        loop {
            let pick = self
                .router
                .pick_reader(snap, floor, &failed)
                // an explicit request for a replica takes a lagging one over the primary
                .or_else(|| {
                    overridden
                        .then(|| self.router.pick_reader(snap, None, &failed))
                        .flatten()
                });
            let Some(i) = pick else {
                if floor.is_some() && self.router.pick_reader(snap, None, &failed).is_some() {
                    fell_back = Reason::ReadYourWrites;
                }
                break;
            };
            match self.pools[i].checkout_or_fail().await {
                Ok(c) => {
                    let (target, reason) = if snap.primary == Some(i) {
                        (Target::Primary, Reason::PrimaryShare)
                    } else {
                        (Target::Replica, reason)
                    };
                    return Ok((c, i, target, reason));
                }
                Err(e) if is_host_failure(&e) => {
                    tracing::warn!(db = %self.router.name, host = %self.router.hosts[i].host,
                        port = self.router.hosts[i].port, "replica checkout failed, trying another host: {e}");
                    self.router.topology.ban(i, &e.to_string());
                    self.router
                        .stats
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    failed.push(i);
                }
                Err(e) => return Err(unavailable(e, false, "replica")),
            }
        }
        if self.router.routing.primary_reads == PrimaryReads::Never
            && fell_back == Reason::NoReplica
        {
            return Err(PgError::error(
                "57P03",
                "no replica is available for this read (primary_reads = never)",
            ));
        }
        if may_write {
            return Err(PgError::error(
                "57P03",
                "no replica is available, and this work may write: pgmux does not send it to \
                 the primary in place of a replica",
            ));
        }
        if failed.iter().any(|&i| snap.primary == Some(i)) {
            return Err(PgError::error(
                "57P03",
                "no server is available for this read",
            ));
        }
        self.primary(snap, fell_back).await
    }

    /// The lowest replay position a replica needs to serve this client's reads, or None when
    /// only the primary will do (a write not yet covered by a primary sample).
    fn read_floor(&mut self, snap: &Snapshot) -> Option<Option<Lsn>> {
        if let Some(m) = self.mark {
            let p = snap.primary?;
            let h = &snap.hosts[p];
            // A check counted later than checks+1 started after the write completed (the one
            // counted as checks+1 may have been running during it), so its position covers
            // the write. After a promotion the new primary holds whatever survived.
            if p == m.host && h.checks < m.checks + 2 {
                return None;
            }
            self.floor = self.floor.max(h.lsn);
            self.mark = None;
        }
        Some(self.floor.max(self.min_lsn))
    }

    /// Answers `SET`/`RESET pgmux.*` in place of a server.
    fn command(
        &mut self,
        cmd: Command,
        reset: bool,
        len: usize,
        c2s: &mut Channel,
        s2c: &mut Channel,
    ) {
        c2s.consume_unscanned(len);
        let mut out = BytesMut::new();
        match cmd {
            Command::Route(r) => self.route = r,
            Command::MinLsn(l) => self.min_lsn = l,
            Command::ResetRoute => self.route = self.startup.route,
            Command::ResetMinLsn => self.min_lsn = self.startup.min_lsn,
            Command::Invalid(m) => PgError::error("22023", m).encode(&mut out),
        }
        if !matches!(cmd, Command::Invalid(_)) {
            messages::message(&mut out, b'C', |b| {
                messages::put_cstr(b, if reset { b"RESET" } else { b"SET" })
            });
        }
        messages::ready_for_query(&mut out, b'I');
        s2c.insert(Bytes::from(out));
    }
}

/// Hosts last seen as the primary (their role is kept while they are down).
fn last_primaries(snap: &Snapshot) -> impl Iterator<Item = &crate::topology::HostState> {
    snap.hosts
        .iter()
        .filter(|h| h.role == crate::topology::Role::Primary)
}

/// No primary: why, with the monitor's last error for the host that was primary (a refused
/// login is the operator's to fix, and the client's only clue).
fn no_primary(snap: &Snapshot) -> PgError {
    let mut message = String::from(
        "no primary server is available (failover in progress?); the statement was not run",
    );
    if let Some(h) = last_primaries(snap).find(|h| h.last_error.is_some()) {
        let why = h.last_error.as_deref().unwrap_or_default();
        message.push_str(&format!(" (last check of {}: {why})", h.addr()));
    }
    PgError::error("57P03", message)
}

/// The host, not the request, failed: ban it and try elsewhere.
fn is_host_failure(e: &PoolError) -> bool {
    match e {
        PoolError::Server(ServerError::Refused(f)) => {
            // shutting down, starting up, too many connections
            f.code.starts_with("57P") || f.code == "53300" || f.code.starts_with("08")
        }
        PoolError::Server(ServerError::Auth(_)) => false,
        PoolError::Server(_) => true,
        PoolError::WaitTimeout | PoolError::Closed | PoolError::Cancelled => false,
    }
}

/// The error for a failed checkout: a host failure is an ERROR the session survives.
fn unavailable(e: PoolError, host_failed: bool, what: &str) -> PgError {
    if host_failed {
        return PgError::error(
            "08006",
            format!("pgmux could not connect to the {what}: {e}; the statement was not run"),
        );
    }
    crate::client::login::server_unavailable(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_u32(body.len() as u32 + 4);
        v.extend_from_slice(body);
        v
    }

    fn q(sql: &str) -> Vec<u8> {
        msg(b'Q', format!("{sql}\0").as_bytes())
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(stmt: &str) -> Vec<u8> {
        msg(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
    }

    fn work(class: Class, unit: Option<usize>) -> Need {
        Need::Work {
            class,
            hint: None,
            unit,
        }
    }

    #[test]
    fn simple_queries_and_batches_are_classified_together() {
        let b = q("SELECT 1");
        assert_eq!(inspect(&b, None, &[]), work(Class::Read, Some(b.len())));
        let mut b = q("SELECT 1");
        b.extend(q("DELETE FROM t"));
        assert_eq!(inspect(&b, None, &[]), work(Class::Write, Some(14)));
        let mut b = parse("", "SELECT $1");
        b.extend(bind(""));
        b.extend(msg(b'E', b"\0\0\0\0\0"));
        b.extend(msg(b'S', b""));
        assert_eq!(inspect(&b, None, &[]), work(Class::Read, Some(b.len())));
        // an unnamed Bind without its Parse: unknown, primary
        let b = bind("");
        assert_eq!(inspect(&b, None, &[]), work(Class::Write, None));
        // a named statement this client never prepared
        let b = bind("s1");
        assert_eq!(inspect(&b, None, &[]), work(Class::Write, None));
        // half a query: primary
        let b = q("SELECT 1");
        assert_eq!(inspect(&b[..7], None, &[]), work(Class::Write, None));
    }

    #[test]
    fn named_statements_are_routed_by_their_text() {
        let reg = crate::prepared::Registry::default();
        let mut stmts = ClientStatements::default();
        stmts.insert(b"r", reg.intern(b"SELECT 1\0\0\0", None));
        stmts.insert(b"w", reg.intern(b"UPDATE t SET a = 1\0\0\0", None));
        let mut b = bind("r");
        b.extend(msg(b'S', b""));
        assert_eq!(
            inspect(&b, Some(&stmts), &[]),
            work(Class::Read, Some(b.len()))
        );
        let mut b = bind("w");
        b.extend(msg(b'S', b""));
        assert_eq!(
            inspect(&b, Some(&stmts), &[]),
            work(Class::Write, Some(b.len()))
        );
        // the unnamed statement parsed in an earlier unit, by its text
        let mut b = bind("");
        b.extend(msg(b'S', b""));
        assert_eq!(
            inspect(&b, Some(&stmts), &[]),
            work(Class::Write, Some(b.len()))
        );
        stmts.set_unnamed(&parse("", "SELECT 2"));
        assert_eq!(
            inspect(&b, Some(&stmts), &[]),
            work(Class::Read, Some(b.len()))
        );
        stmts.set_unnamed(&parse("", "DELETE FROM t"));
        assert_eq!(
            inspect(&b, Some(&stmts), &[]),
            work(Class::Write, Some(b.len()))
        );
        stmts.drop_unnamed();
        assert_eq!(
            inspect(&b, Some(&stmts), &[]),
            work(Class::Write, Some(b.len()))
        );
    }

    #[test]
    fn pgmux_commands_and_hints() {
        let b = q("SET pgmux.route = replica");
        assert!(matches!(
            inspect(&b, None, &[]),
            Need::Pgmux {
                cmd: Command::Route(Route::Replica),
                reset: false,
                ..
            }
        ));
        let b = q("RESET pgmux.route");
        assert!(matches!(
            inspect(&b, None, &[]),
            Need::Pgmux { reset: true, .. }
        ));
        let b = q("/* pgmux:primary */ SELECT 1");
        assert_eq!(
            inspect(&b, None, &[]),
            Need::Work {
                class: Class::Read,
                hint: Some(Hint::Primary),
                unit: Some(b.len())
            }
        );
    }

    #[test]
    fn startup_settings_are_taken_out() {
        let mut s = vec![
            ("application_name".to_string(), "x".to_string()),
            ("pgmux.route".to_string(), "replica".to_string()),
        ];
        let r = take_startup(&mut s).unwrap();
        assert_eq!(r.route, Route::Replica);
        assert_eq!(s.len(), 1);
        let mut s = vec![("pgmux.route".to_string(), "sideways".to_string())];
        assert!(take_startup(&mut s).is_err());
        let mut s = vec![("pgmux.min_lsn".to_string(), "0/16B3748".to_string())];
        assert_eq!(take_startup(&mut s).unwrap().min_lsn, Some(Lsn(0x16B3748)));
    }
}
