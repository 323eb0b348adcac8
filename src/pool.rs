//! Bounded pools of server connections, one per (database, user): checkout with first-in
//! first-out waiting, a reserve after reserve_pool_timeout, max_db_connections across a
//! database's pools, and upkeep (min_pool_size, server_idle_timeout, server_lifetime).
//! A checked-out connection is a guard: released explicitly when clean, closed on drop.
//! Settings and target can be swapped live (reload); PAUSE holds checkouts; RECONNECT
//! retires connections opened before it. The pool keeps a small record of each open
//! connection for SHOW SERVERS, and its `PoolStats` for the console and metrics.
//! A released connection with a cancel still on its way to it is held back until the cancel
//! has been delivered, so the cancel cannot hit another client's query (see `cancel`).
//! A released connection that finds clients in line with standalone requests may go to
//! several of them at once, as a batch (see `batch`).

use crate::batch::{self, Batch, Seat, Ticket};
use crate::clock::Mono;
use crate::config::PoolMode;
use crate::params::Params;
use crate::server::{ServerConn, ServerError, ServerTarget};
use crate::stats::PoolStats;
use arc_swap::ArcSwap;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;

/// The first pause before a checkout tries a restarting server again; it doubles up to
/// `HOLD_MAX_PAUSE`.
const HOLD_FIRST_PAUSE: Duration = Duration::from_millis(100);
const HOLD_MAX_PAUSE: Duration = Duration::from_secs(1);

/// Added to server_connect_timeout (which bounds a cancel) for how long a released server
/// waits for its cancels before it is closed instead.
const CANCEL_SETTLE_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("query_wait_timeout")]
    WaitTimeout,
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("pool is closed")]
    Closed,
    /// The client cancelled its query while it waited for a server (`checkout_or_batch`).
    #[error("canceling statement due to user request")]
    Cancelled,
}

impl PoolError {
    /// The server refused a new connection for lack of connection slots (53300: too many
    /// clients, or only reserved slots left): one of the pool's own may free one.
    fn server_full(&self) -> bool {
        matches!(self, PoolError::Server(ServerError::Refused(f)) if f.code == "53300")
    }
}

/// A failure a restart causes (`ServerError::is_transient`). Not a timeout: the client has
/// waited server_connect_timeout already.
pub fn is_transient(e: &PoolError) -> bool {
    matches!(e, PoolError::Server(se) if se.is_transient())
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: u32,
    pub min_size: u32,
    pub reserve_size: u32,
    pub reserve_timeout: Option<Duration>,
    pub query_wait_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// server_login_retry: None when 0.
    pub login_retry: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub lifetime: Option<Duration>,
    /// server_check_query / server_check_delay: None when checks are off.
    pub check: Option<ServerCheck>,
    /// server_batch_size: most waiting clients' queries sent to a server in one write;
    /// below 2, none are batched.
    pub batch_size: u32,
    /// server_batch_gather_ms (None when 0): for this long after the pool last ran out of
    /// servers, requests a batch may take that come in one turn of the runtime go to an idle
    /// server together (`State::gathers`).
    pub gather: Option<Duration>,
}

/// What `Pool::try_checkout` found.
pub enum TryCheckout {
    /// An idle server, lent.
    Lent(PooledConn),
    /// The pool is under pressure: a request a batch may take gathers with others in
    /// `checkout_or_batch`; any other asks again with `gather` false.
    Gather,
    /// Nothing to lend at once: `checkout_or_batch` waits, opens or checks one.
    Wait,
}

/// A server idle at least `delay` runs `query` before it is lent (PgBouncer's
/// server_check_query and server_check_delay): the check catches a server whose peer
/// vanished without FIN or RST, which the idle socket alone does not show.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerCheck {
    pub query: String,
    pub delay: Duration,
}

/// Connections are boxed once when opened: lending one moves a pointer, and a client's
/// session stays small while it holds none.
type Conn = Box<ServerConn>;

fn close(c: Conn) {
    c.close()
}

/// What a checkout does after its new connection failed.
enum Then {
    Fail,
    /// The server has no slot for it, but the pool has connections: wait for one of them.
    WaitInLine,
    /// The pool was paused while the checkout waited through a restart.
    AfterResume,
}

enum Grant {
    Conn(Conn),
    /// Permission to open one connection, counted in `open` already.
    Slot,
    /// query_wait_timeout passed (found by `maintain`).
    Expired,
    /// A place in a batch: the client's query was sent with others (`batch`).
    Seat(Box<Seat>),
}

/// What a checkout gets: a server of its own, or a seat in a batch when it offered a
/// `Ticket`.
pub enum Lease {
    Conn(PooledConn),
    Seat(Box<Seat>),
}

/// A checkout in line. Its deadlines are kept by `maintain`, which runs every half second,
/// rather than by a timer per waiting checkout: at hundreds of clients per server, every
/// transaction waits, and a timer set and cleared each time costs more than the wait.
struct Waiter {
    tx: oneshot::Sender<Grant>,
    /// query_wait_timeout runs out
    deadline: Option<Instant>,
    /// reserve_pool_timeout runs out: a reserve connection may be opened for it
    reserve_at: Option<Instant>,
    /// The client's query, if a batch may take it.
    ticket: Option<Ticket>,
}

#[derive(Default)]
struct State {
    /// The settings of every checkout and release, kept with what they guard.
    hot: Hot,
    idle: Vec<Conn>,
    /// Idle, lent and being opened.
    open: u32,
    connecting: u32,
    /// Released, held back until a cancel on its way to it is delivered.
    being_canceled: u32,
    waiters: VecDeque<Waiter>,
    baseline: Option<Arc<Params>>,
    closed: bool,
    /// Every open connection (idle or lent), for SHOW SERVERS.
    servers: crate::fasthash::U64Map<ServerInfo>,
    /// Bumped by RECONNECT and target changes: older connections close when released.
    generation: u64,
    /// The last failed connection or login, while no connection has succeeded since:
    /// min_pool_size waits server_login_retry after it, so a refused login is not retried
    /// twice a second.
    failed_at: Option<Instant>,
    /// The first failure of the current outage (cleared by a success): checkouts hold
    /// through a restart only while the outage is younger than server_login_retry.
    down_since: Option<Instant>,
    /// When a checkout last found no server to lend and had to wait in line.
    exhausted_at: Option<Mono>,
}

impl State {
    /// Servers lent to clients or batches now.
    fn lent(&self) -> u32 {
        self.open
            .saturating_sub(self.idle.len() as u32 + self.connecting + self.being_canceled)
    }

    /// Whether a request a batch may take should gather with others for an idle server
    /// rather than take one of its own: the pool ran out of servers within
    /// server_batch_gather_ms, so its clients send more requests at a time than it has
    /// servers, and sending those that come together in one write spares the servers a
    /// wake-up each. Some server must be lent (a lone client is never held up) and one must
    /// be idle (or the request waits in line anyway). The window is long enough to span the
    /// stretches in which gathering itself keeps servers free.
    fn gathers(&self, now: Mono) -> bool {
        let (Some(window), Some(at)) = (self.hot.gather, self.exhausted_at) else {
            return false;
        };
        !self.idle.is_empty() && self.lent() > 0 && !now.at_least(at, window)
    }
}

/// What a checkout and a release read of `Pool::settings`, copied into `State` when they
/// change: both take the state's lock anyway, where loading the `ArcSwap` cost about 90
/// instructions each, twice a transaction.
#[derive(Clone, Copy, Default)]
struct Hot {
    lifetime: Option<Duration>,
    check_delay: Option<Duration>,
    /// pool_size + reserve_pool_size: beyond it, released connections close.
    max_open: u32,
    batch_size: u32,
    /// server_batch_gather_ms, when batches are on.
    gather: Option<Duration>,
}

impl Hot {
    fn of(s: &PoolSettings) -> Hot {
        Hot {
            lifetime: s.lifetime,
            check_delay: s.check.as_ref().map(|k| k.delay),
            max_open: s.size + s.reserve_size,
            batch_size: s.batch_size,
            gather: s.gather.filter(|_| s.batch_size >= 2),
        }
    }

    /// Past server_lifetime at `now`.
    fn too_old(&self, c: &ServerConn, now: Mono) -> bool {
        self.lifetime.is_some_and(|l| now.at_least(c.created, l))
    }

    /// An idle server that may be lent without a check query and is not past its lifetime.
    fn lendable(&self, c: &ServerConn, now: Mono) -> bool {
        let check_due = self
            .check_delay
            .is_some_and(|d| now.at_least(c.last_used, d));
        !check_due && !self.too_old(c, now)
    }
}

/// What SHOW SERVERS shows of one server connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub id: u64,
    pub addr: crate::endpoint::ServerAddr,
    pub local: Option<SocketAddr>,
    pub pid: i32,
    pub connect_time: SystemTime,
    pub generation: u64,
    /// In the idle list (as opposed to lent to a client).
    pub idle: bool,
    pub close_needed: bool,
}

/// Counts as the admin console and metrics show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub idle: u32,
    pub active: u32,
    pub connecting: u32,
    /// Released with a cancel on its way: lent to no one until it is delivered.
    pub being_canceled: u32,
    pub waiting: u32,
}

/// max_db_connections: a semaphore shared by the pools of one database.
pub struct DbLimit {
    sem: Arc<Semaphore>,
    pools: Mutex<Vec<Weak<Pool>>>,
    /// Pools waiting for a share: idle connections are closed rather than kept for them.
    waiting: std::sync::atomic::AtomicUsize,
}

impl DbLimit {
    pub fn new(max: u32) -> Arc<DbLimit> {
        Arc::new(DbLimit {
            sem: Arc::new(Semaphore::new(max as usize)),
            pools: Mutex::new(Vec::new()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

pub struct Pool {
    pub db: String,
    pub user: String,
    /// The two again, for its clients' log lines.
    pub log_names: crate::logging::Names,
    target: ArcSwap<ServerTarget>,
    settings: ArcSwap<PoolSettings>,
    state: Mutex<State>,
    db_limit: Option<Arc<DbLimit>>,
    pub stats: Arc<PoolStats>,
    paused: AtomicBool,
    resumed: Notify,
    /// The pool's database left the configuration: it serves its clients until they leave.
    retired: AtomicBool,
    /// Settings clients of this pool expect, shared by the clients that expect the same.
    wants: crate::interned::Interned<Params>,
    /// Server connections opened, and attempts that failed: per pool, so per host (`stats`
    /// is shared by the hosts of a database).
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Batches sent to this pool's servers, and the queries they carried (`batch`).
    pub batches: AtomicU64,
    pub batched_queries: AtomicU64,
}

/// A checkout's place in line. Dropped before its grant was taken (its client left, a timeout
/// ended the wait), it passes on what was already sent to it: a connection to the next in
/// line or the idle list, a slot to the next waiter. Otherwise they would be lost to the pool.
struct InLine<'a> {
    pool: &'a Arc<Pool>,
    rx: oneshot::Receiver<Grant>,
}

impl InLine<'_> {
    /// Steps out of line for a cancel: what was sent before it could is passed on (a
    /// connection to the next in line, a slot freed), except a seat in a batch, which has
    /// sent the client's query already and is returned to be taken.
    fn leave(&mut self) -> Option<Box<Seat>> {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Seat(seat)) => Some(seat),
            Ok(Grant::Conn(c)) => {
                self.pool.put(c);
                None
            }
            Ok(Grant::Slot) => {
                self.pool.slot_freed();
                None
            }
            Ok(Grant::Expired) | Err(_) => None,
        }
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Conn(c)) => self.pool.put(c),
            Ok(Grant::Slot) => self.pool.slot_freed(),
            _ => {}
        }
    }
}

/// A connection being opened in a slot counted in `open`. Dropped unsettled (its checkout
/// abandoned mid-connect), it frees the slot; `connecting` goes down either way.
struct Opening<'a> {
    pool: &'a Pool,
    settled: bool,
}

impl Opening<'_> {
    /// Settles the slot after the attempt. A failure frees it for the next in line, except
    /// a refusal for lack of server slots while the pool has connections of its own: the
    /// next in line would be refused too, so the slot is only given up, and the returned
    /// true tells the checkout to wait for one of those connections.
    fn settle(&mut self, opened: bool, server_full: bool) -> bool {
        self.settled = true;
        let mut s = lock(&self.pool.state);
        s.connecting -= 1;
        if opened {
            return false;
        }
        // open connections besides this slot and the ones still being opened
        let wait = server_full && s.open > s.connecting + 1;
        if wait {
            s.open -= 1;
        } else {
            drop(s);
            self.pool.slot_freed();
        }
        wait
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(false, false);
        }
    }
}

/// Distinct client settings a pool keeps for sharing; a client with others gets its own.
const SHARED_WANTS: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(
        db: String,
        user: String,
        target: ServerTarget,
        settings: PoolSettings,
        db_limit: Option<Arc<DbLimit>>,
    ) -> Arc<Pool> {
        let stats = PoolStats::new(&db, &user);
        Pool::with_stats(db, user, target, settings, db_limit, stats)
    }

    /// A pool counting into `stats`: the pools of one (database, user) on several hosts
    /// (read replicas) share one set of statistics, as they serve the same clients.
    pub fn with_stats(
        db: String,
        user: String,
        target: ServerTarget,
        settings: PoolSettings,
        db_limit: Option<Arc<DbLimit>>,
        stats: Arc<PoolStats>,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            log_names: crate::logging::Names::new(&db, &user),
            db,
            user,
            target: ArcSwap::from_pointee(target),
            settings: ArcSwap::from_pointee(settings.clone()),
            state: Mutex::new(State {
                hot: Hot::of(&settings),
                ..State::default()
            }),
            db_limit,
            stats,
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            retired: AtomicBool::new(false),
            wants: crate::interned::Interned::new(SHARED_WANTS),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batched_queries: AtomicU64::new(0),
        });
        if let Some(l) = &pool.db_limit {
            lock(&l.pools).push(Arc::downgrade(&pool));
        }
        pool
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    pub fn target(&self) -> Arc<ServerTarget> {
        self.target.load_full()
    }

    /// New settings (reload, SET) for checkouts and upkeep from now on.
    pub fn set_settings(&self, settings: PoolSettings) {
        if *self.settings.load_full() == settings {
            return;
        }
        let size = settings.size;
        let hot = Hot::of(&settings);
        self.settings.store(Arc::new(settings));
        // a bigger pool serves clients already in line at once, not at the next release
        let mut s = lock(&self.state);
        s.hot = hot;
        while s.open < size && !self.is_paused() {
            let Some(w) = s.waiters.pop_front() else {
                break;
            };
            if w.tx.send(Grant::Slot).is_ok() {
                s.open += 1;
            }
        }
    }

    /// A new server address or login: connections made the old way close as they come back.
    /// `force`: even to the same address and user (a new password, new TLS settings).
    pub fn set_target(&self, target: ServerTarget, force: bool) {
        let old = self.target.load_full();
        let same = old.host == target.host
            && old.port == target.port
            && old.dbname == target.dbname
            && old.user == target.user
            && !force;
        if !same {
            self.target.store(Arc::new(target));
            self.reconnect();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// PAUSE: checkouts wait until resume(); running transactions go on.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.resumed.notify_waiters();
        self.serve_line();
    }

    /// After a PAUSE: clients that were already in line when it came were lent nothing
    /// meanwhile (`put`, `slot_freed`); they get idle servers, then free slots, in turn.
    fn serve_line(&self) {
        let size = self.settings.load().size;
        let mut s = lock(&self.state);
        while let Some(w) = s.waiters.pop_front() {
            if let Some(c) = s.idle.pop() {
                if let Err(Grant::Conn(back)) = w.tx.send(Grant::Conn(c)) {
                    s.idle.push(back);
                }
            } else if s.open < size {
                if w.tx.send(Grant::Slot).is_ok() {
                    s.open += 1;
                }
            } else {
                s.waiters.push_front(w);
                break;
            }
        }
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// RECONNECT: idle connections close now, lent ones when they are released.
    pub fn reconnect(&self) {
        let idle = {
            let mut s = lock(&self.state);
            s.generation += 1;
            let idle = std::mem::take(&mut s.idle);
            s.open -= idle.len() as u32;
            for c in &idle {
                s.servers.remove(&c.id);
            }
            idle
        };
        idle.into_iter().for_each(close);
    }

    /// Closes idle connections (PAUSE, so the server can restart); lent ones stay.
    pub fn close_idle(&self) {
        let idle = {
            let mut s = lock(&self.state);
            let idle = std::mem::take(&mut s.idle);
            s.open -= idle.len() as u32;
            for c in &idle {
                s.servers.remove(&c.id);
            }
            idle
        };
        idle.into_iter().for_each(close);
    }

    /// Whether an open connection is marked to close once it is released (WAIT_CLOSE).
    pub fn has_close_needed(&self) -> bool {
        let s = lock(&self.state);
        s.servers.values().any(|i| i.generation < s.generation)
    }

    /// Open connections as SHOW SERVERS lists them.
    pub fn servers(&self) -> Vec<ServerInfo> {
        let s = lock(&self.state);
        let idle: std::collections::HashSet<u64> = s.idle.iter().map(|c| c.id).collect();
        let mut v: Vec<ServerInfo> = s
            .servers
            .values()
            .map(|i| ServerInfo {
                idle: idle.contains(&i.id),
                close_needed: i.generation < s.generation,
                ..i.clone()
            })
            .collect();
        v.sort_by_key(|i| i.id);
        v
    }

    pub fn counts(&self) -> PoolCounts {
        let s = lock(&self.state);
        let idle = s.idle.len() as u32;
        PoolCounts {
            idle,
            active: s.open - idle - s.connecting - s.being_canceled,
            connecting: s.connecting,
            being_canceled: s.being_canceled,
            waiting: s.waiters.len() as u32,
        }
    }

    /// The parameters a fresh server connection reported, once one has logged in.
    pub fn baseline(&self) -> Option<Arc<Params>> {
        lock(&self.state).baseline.clone()
    }

    /// The settings a client expects, shared with the clients that expect the same (most
    /// clients of a pool do): an idle client holds a pointer instead of a copy. A client
    /// that changes its settings gets its own copy then (`Arc::make_mut`).
    pub fn share_wants(&self, wants: Params) -> Arc<Params> {
        self.wants.share(wants)
    }

    /// Lends a connection: an idle one, a new one while under size, else waits in line. A
    /// new connection that fails as a restarting server fails (see `Pool::holds`) is tried
    /// again, within query_wait_timeout, while the outage is younger than server_login_retry:
    /// a restart costs clients a wait, not an error, as behind PgBouncer.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        self.checkout_with(true, None, std::future::pending())
            .await
            .map(Lease::into_conn)?
    }

    /// `checkout` for a client whose query a batch may take, if it has to wait (`batch`).
    /// When `cancel` completes while the client waits (in line, for a new connection, for
    /// RESUME), the wait ends with `PoolError::Cancelled`, and a server or a slot handed to
    /// it meanwhile goes to the next in line; a seat in a batch, whose query the server has
    /// already, is taken instead (the caller passes the cancel on to the batch).
    pub async fn checkout_or_batch(
        self: &Arc<Self>,
        ticket: Option<Ticket>,
        cancel: impl Future<Output = ()>,
    ) -> Result<Lease, PoolError> {
        self.checkout_with(true, ticket, cancel).await
    }

    /// `checkout`, failing at once when the server cannot be reached: for a caller that has
    /// another host to try.
    pub async fn checkout_or_fail(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        self.checkout_with(false, None, std::future::pending())
            .await
            .map(Lease::into_conn)?
    }

    async fn checkout_with(
        self: &Arc<Self>,
        hold: bool,
        mut ticket: Option<Ticket>,
        cancel: impl Future<Output = ()>,
    ) -> Result<Lease, PoolError> {
        let deadline = self
            .settings
            .load()
            .query_wait_timeout
            .map(|d| Instant::now() + d);
        tokio::pin!(cancel);
        // The rare waits (RESUME, a new connection, a check query) are boxed where they
        // happen: inline, they made every checkout's future several KiB, allocated and
        // copied for each client that waits in line.
        if self.is_paused() {
            tokio::select! {
                r = Box::pin(self.wait_resumed(deadline)) => r?,
                _ = &mut cancel => return Err(PoolError::Cancelled),
            }
        }
        // set once the server refused a connection for lack of slots while this pool had
        // others: from then on this checkout waits for one of those, as PgBouncer's clients
        // wait, instead of failing (or trying again at once)
        let mut in_line_only = false;
        loop {
            let grant = match self.take(deadline, in_line_only, &mut ticket)? {
                Ok(g) => g,
                Err((rx, gathered)) => {
                    let mut line = InLine { pool: self, rx };
                    if gathered {
                        // every client whose request came in this turn of the runtime
                        // joins the line first; then idle servers take them in batches
                        tokio::task::yield_now().await;
                        self.serve_idle();
                    }
                    let granted = tokio::select! {
                        g = &mut line.rx => g,
                        _ = &mut cancel => match line.leave() {
                            Some(seat) => Ok(Grant::Seat(seat)),
                            None => return Err(PoolError::Cancelled),
                        },
                    };
                    match granted {
                        Ok(Grant::Expired) => return Err(PoolError::WaitTimeout),
                        Ok(g) => g,
                        Err(_) => return Err(PoolError::Closed),
                    }
                }
            };
            match grant {
                Grant::Conn(c) if c.is_broken() => self.discard(c),
                Grant::Conn(c) => {
                    let c = match self.check_due(&c) {
                        false => Some(self.guard(c)),
                        true => Box::pin(self.checked(c)).await,
                    };
                    if let Some(c) = c {
                        return Ok(Lease::Conn(c));
                    }
                }
                Grant::Seat(seat) => return Ok(Lease::Seat(seat)),
                Grant::Slot => match tokio::select! {
                    r = Box::pin(self.open_slot_or_wait(deadline, hold)) => r,
                    // an unfinished connection gives its slot back (`Opening`)
                    _ = &mut cancel => return Err(PoolError::Cancelled),
                } {
                    Ok(c) => return Ok(Lease::Conn(c)),
                    Err((e, Then::WaitInLine)) => {
                        tracing::debug!(db = %self.db, user = %self.user, "server full, waiting for a connection of the pool: {e}");
                        in_line_only = true;
                    }
                    // PAUSE came while this waited through a restart: wait for RESUME
                    // without a slot, so the PAUSE completes
                    Err((_, Then::AfterResume)) => tokio::select! {
                        r = Box::pin(self.wait_resumed(deadline)) => r?,
                        _ = &mut cancel => return Err(PoolError::Cancelled),
                    },
                    Err((e, Then::Fail)) => return Err(e),
                },
                Grant::Expired => return Err(PoolError::WaitTimeout),
            }
        }
    }

    /// The most recently used idle connection, when one is ready to lend right now: not
    /// paused, not past server_lifetime, no check query due, not broken. `Wait` sends the
    /// caller to `checkout`, which handles everything else (and waits). `now`: the caller's
    /// reading of the clock, a moment ago; `gather`: the caller's request may be one a batch
    /// takes (`TryCheckout::Gather`).
    pub fn try_checkout(self: &Arc<Self>, now: Mono, gather: bool) -> TryCheckout {
        if self.is_paused() {
            return TryCheckout::Wait;
        }
        let c = {
            let mut s = lock(&self.state);
            if s.closed {
                return TryCheckout::Wait;
            }
            if gather && s.gathers(now) {
                return TryCheckout::Gather;
            }
            let Some(c) = s.idle.pop() else {
                return TryCheckout::Wait;
            };
            if !s.hot.lendable(&c, now) {
                s.idle.push(c);
                return TryCheckout::Wait;
            }
            c
        };
        if c.is_broken() {
            self.discard(c);
            return TryCheckout::Wait;
        }
        TryCheckout::Lent(self.guard(c))
    }

    /// Lends idle servers to the clients in line, a batch to each where they offered their
    /// queries (`put`): after requests gathered for a turn of the runtime (`take`). A server
    /// due its check query goes alone to the first in line, whose checkout runs the check.
    fn serve_idle(self: &Arc<Self>) {
        // a PAUSE meanwhile: `put` would keep the server idle, and this would take it again
        while !self.is_paused() {
            let mut s = lock(&self.state);
            if s.waiters.is_empty() {
                return;
            }
            let Some(mut c) = s.idle.pop() else { return };
            let now = Mono::now();
            if s.hot.lendable(&c, now) || s.hot.too_old(&c, now) {
                drop(s);
                // `put` closes one past its lifetime
                match c.is_broken() {
                    true => self.discard(c),
                    false => self.put(c),
                }
                continue;
            }
            loop {
                let Some(w) = s.waiters.pop_front() else {
                    s.idle.push(c);
                    return;
                };
                match w.tx.send(Grant::Conn(c)) {
                    Ok(()) => break,
                    Err(Grant::Conn(back)) => c = back,
                    Err(_) => unreachable!("sent a connection"),
                }
            }
        }
    }

    /// Whether server_check_query is due on `c` (idle since server_check_delay).
    fn check_due(&self, c: &ServerConn) -> bool {
        let settings = self.settings.load();
        settings
            .check
            .as_ref()
            .is_some_and(|k| c.last_used.elapsed() >= k.delay)
    }

    /// Runs server_check_query on a connection idle since server_check_delay, bounded by
    /// server_connect_timeout; None (the connection closed, its slot passed on) if it fails.
    async fn checked(self: &Arc<Self>, c: Conn) -> Option<PooledConn> {
        let settings = self.settings.load_full();
        let check = match &settings.check {
            Some(k) if c.last_used.elapsed() >= k.delay => k,
            _ => return Some(self.guard(c)),
        };
        // guarded first: a checkout abandoned during the check closes the connection
        let mut conn = self.guard(c);
        let r = tokio::time::timeout(settings.connect_timeout, conn.run_internal(&check.query));
        match r.await {
            Ok(Ok(None)) => {
                conn.last_used = Mono::now();
                Some(conn)
            }
            Ok(Ok(Some(e))) => {
                tracing::warn!(db = %self.db, user = %self.user, "server_check_query failed: {}", e.message);
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(db = %self.db, user = %self.user, "server_check_query failed: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(db = %self.db, user = %self.user, "server_check_query timed out: closing the server");
                None
            }
        }
    }

    /// While paused, waits for RESUME (bounded by query_wait_timeout like any wait).
    async fn wait_resumed(&self, deadline: Option<Instant>) -> Result<(), PoolError> {
        loop {
            let resumed = self.resumed.notified();
            if !self.is_paused() {
                return Ok(());
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, resumed).await.is_err() {
                        return Err(PoolError::WaitTimeout);
                    }
                }
                None => resumed.await,
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn take(
        &self,
        deadline: Option<Instant>,
        in_line_only: bool,
        ticket: &mut Option<Ticket>,
    ) -> Result<Result<Grant, (oneshot::Receiver<Grant>, bool)>, PoolError> {
        let mut expired = Vec::new();
        let mut s = lock(&self.state);
        if s.closed {
            return Err(PoolError::Closed);
        }
        let now = Mono::now();
        let size = self.settings.load().size;
        let mut found = None;
        let gather = ticket.is_some() && s.gathers(now);
        while let Some(c) = (!gather).then(|| s.idle.pop()).flatten() {
            if s.hot.too_old(&c, now) {
                s.open -= 1;
                s.servers.remove(&c.id);
                expired.push(c);
            } else {
                found = Some(c);
                break;
            }
        }
        let r = if let Some(c) = found {
            Ok(Grant::Conn(c))
        } else if s.open < size && !in_line_only && !gather {
            s.open += 1;
            Ok(Grant::Slot)
        } else {
            // gathering, it joins the line though a server is idle (and is not opened one)
            let (tx, rx) = oneshot::channel();
            let settings = self.settings.load();
            let reserve_at = match (settings.reserve_size, settings.reserve_timeout) {
                (0, _) => None,
                (_, t) => Some((now + t.unwrap_or_default()).instant()),
            };
            s.waiters.push_back(Waiter {
                tx,
                deadline,
                reserve_at,
                ticket: ticket.take(),
            });
            if !gather {
                s.exhausted_at = Some(now);
            }
            Err((rx, gather))
        };
        drop(s);
        expired.into_iter().for_each(close);
        Ok(r)
    }

    /// Opens a connection in a slot already counted in `open`.
    async fn open_slot(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> Result<PooledConn, PoolError> {
        self.open_slot_or_wait(deadline, false)
            .await
            .map_err(|(e, _)| e)
    }

    /// Opens a connection in a slot already counted in `open`; on failure, what the
    /// checkout does next (see `Opening::settle`). With `hold`, failures of a restarting
    /// server are retried, the slot kept, so that at most the pool's size of checkouts knock
    /// on the server while the others wait in line.
    async fn open_slot_or_wait(
        self: &Arc<Self>,
        deadline: Option<Instant>,
        hold: bool,
    ) -> Result<PooledConn, (PoolError, Then)> {
        lock(&self.state).connecting += 1;
        let mut opening = Opening {
            pool: self,
            settled: false,
        };
        let mut pause = HOLD_FIRST_PAUSE;
        let mut paused = false;
        let r = loop {
            let r = self.open_conn(deadline).await;
            match &r {
                Err(e) if hold && is_transient(e) && self.is_paused() => {
                    paused = true;
                    break r;
                }
                Err(e) if hold && self.holds(e, deadline) => {
                    // the last try at query_wait_timeout itself
                    let next = Instant::now() + pause;
                    tokio::time::sleep_until(deadline.map_or(next, |d| d.min(next))).await;
                    pause = (pause * 2).min(HOLD_MAX_PAUSE);
                }
                _ => break r,
            }
        };
        let full = matches!(&r, Err(e) if e.server_full());
        let wait = opening.settle(r.is_ok(), full);
        match r {
            Ok(c) => Ok(self.guard(Box::new(c))),
            Err(e) if wait => Err((e, Then::WaitInLine)),
            Err(e) if paused => Err((e, Then::AfterResume)),
            Err(e) => Err((e, Then::Fail)),
        }
    }

    /// Whether a checkout whose new connection failed with `e` tries again: the failure is
    /// one a restart causes (`is_transient`) of a server this pool has reached before, the
    /// outage began less than server_login_retry ago, and query_wait_timeout has not passed.
    /// After that window clients fail at once (PgBouncer's fast-fail), each still trying
    /// once, so the server's return is seen by the first client after it.
    fn holds(&self, e: &PoolError, deadline: Option<Instant>) -> bool {
        let Some(window) = self.settings.load().login_retry else {
            return false;
        };
        let now = Instant::now();
        let s = lock(&self.state);
        is_transient(e)
            && !s.closed
            // it was up once: a restart, not a server that was never there (a wrong port)
            && s.baseline.is_some()
            && s.down_since.is_none_or(|d| now.duration_since(d) < window)
            && deadline.is_none_or(|d| now < d)
    }

    async fn open_conn(&self, deadline: Option<Instant>) -> Result<ServerConn, PoolError> {
        let permit = match &self.db_limit {
            Some(l) => Some(self.db_permit(l, deadline).await?),
            None => None,
        };
        let target = self.target.load_full();
        let connect_timeout = self.settings.load().connect_timeout;
        let mut c = match ServerConn::connect(&target, connect_timeout).await {
            Ok(c) => c,
            Err(e) => {
                self.connect_failures.fetch_add(1, Ordering::Relaxed);
                let window = self.settings.load().login_retry.unwrap_or_default();
                let first = {
                    let mut s = lock(&self.state);
                    let now = Instant::now();
                    // no failure for longer than server_login_retry: the server was back in
                    // between (unseen, without a login here), and this is a new outage
                    let new = s.failed_at.is_none_or(|f| now.duration_since(f) > window);
                    if new {
                        s.down_since = Some(now);
                    }
                    s.failed_at = Some(now);
                    new
                };
                // once per outage at warn: what the operator must fix (a stale server
                // password reads "server login failed", not like a client's wrong password)
                if first {
                    tracing::warn!(db = %self.db, user = %self.user, server = %target.addr_string(), "server login failed: {e}");
                } else {
                    tracing::debug!(db = %self.db, user = %self.user, server = %target.addr_string(), "server login failed again: {e}");
                }
                return Err(e.into());
            }
        };
        let was_down = {
            let mut s = lock(&self.state);
            s.down_since = None;
            s.failed_at.take().is_some()
        };
        if was_down {
            tracing::info!(db = %self.db, user = %self.user, server = %target.addr_string(), "server login works again");
        }
        self.connects.fetch_add(1, Ordering::Relaxed);
        c.db_permit = permit;
        let mut s = lock(&self.state);
        if s.baseline.is_none() {
            s.baseline = Some(Arc::new(c.params.clone()));
        }
        let generation = s.generation;
        s.servers.insert(
            c.id,
            ServerInfo {
                id: c.id,
                addr: c.addr,
                local: c.stream.local_addr(),
                pid: c.pid,
                connect_time: SystemTime::now(),
                generation,
                idle: false,
                close_needed: false,
            },
        );
        Ok(c)
    }

    async fn db_permit(
        &self,
        l: &Arc<DbLimit>,
        deadline: Option<Instant>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, PoolError> {
        if let Ok(p) = l.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        // an idle connection of another pool of this database makes room
        let siblings: Vec<_> = lock(&l.pools).iter().filter_map(Weak::upgrade).collect();
        for p in siblings {
            if let Some(c) = p.evict_idle() {
                c.close();
                if let Ok(p) = l.sem.clone().try_acquire_owned() {
                    return Ok(p);
                }
            }
        }
        let acquire = l.sem.clone().acquire_owned();
        l.waiting.fetch_add(1, Ordering::AcqRel);
        let r = match deadline {
            Some(d) => tokio::time::timeout_at(d, acquire).await,
            None => Ok(acquire.await),
        };
        l.waiting.fetch_sub(1, Ordering::AcqRel);
        r.map_err(|_| PoolError::WaitTimeout)?
            .map_err(|_| PoolError::Closed)
    }

    fn evict_idle(&self) -> Option<Conn> {
        let mut s = lock(&self.state);
        if s.idle.is_empty() {
            return None;
        }
        s.open -= 1;
        let c = s.idle.remove(0);
        s.servers.remove(&c.id);
        Some(c)
    }

    fn guard(self: &Arc<Self>, c: Conn) -> PooledConn {
        PooledConn {
            conn: Some(c),
            pool: self.clone(),
        }
    }

    /// Takes back a clean, idle connection.
    fn put(self: &Arc<Self>, mut c: Conn) {
        let now = Mono::now();
        let mut s = lock(&self.state);
        if s.hot.too_old(&c, now) {
            drop(s);
            return self.discard(c);
        }
        c.last_used = now;
        let stale = s
            .servers
            .get(&c.id)
            .is_none_or(|i| i.generation < s.generation);
        if s.closed || stale {
            drop(s);
            return self.discard(c);
        }
        if oversized(&s) {
            // the pool was made smaller (RELOAD, SET): closed without passing its slot on, so
            // the pool shrinks under load too
            s.servers.remove(&c.id);
            s.open -= 1;
            drop(s);
            return c.close();
        }
        if self.is_paused() {
            // PAUSE: nothing more is lent, not even to clients already in line
            // (`serve_line` at RESUME)
            s.idle.push(c);
            return;
        }
        let batch_size = s.hot.batch_size as usize;
        if let Some(batch) = self.batch_for(&mut s, &c, batch_size) {
            drop(s);
            tokio::spawn(batch::drive(self.guard(c), batch));
            return;
        }
        while let Some(w) = s.waiters.pop_front() {
            match w.tx.send(Grant::Conn(c)) {
                Ok(()) => return,
                Err(Grant::Conn(back)) => c = back,
                Err(_) => unreachable!("sent a connection"),
            }
        }
        let db_wants = self
            .db_limit
            .as_ref()
            .is_some_and(|l| l.waiting.load(Ordering::Acquire) > 0);
        if db_wants {
            // another pool of this database waits for a connection share: free ours
            drop(s);
            return self.discard(c);
        }
        s.idle.push(c);
    }

    /// A batch for the connection, when at least two clients at the front of the line
    /// offered their query and are in step with it: each is given a seat, and the batch
    /// goes to `batch::drive` with the connection.
    fn batch_for(&self, s: &mut State, c: &ServerConn, max: usize) -> Option<Batch> {
        if max < 2 {
            return None;
        }
        while s.waiters.front().is_some_and(|w| w.tx.is_closed()) {
            s.waiters.pop_front();
        }
        let fits = |w: &Waiter| {
            w.ticket
                .as_ref()
                .is_some_and(|t| c.in_step_with(&t.wants) && !w.tx.is_closed())
        };
        let n = s.waiters.iter().take(max).take_while(|w| fits(w)).count();
        if n < 2 {
            return None;
        }
        let first = s.waiters.front().and_then(|w| w.ticket.as_ref())?;
        let mut batch = Batch::with_capacity(n, first);
        for w in s.waiters.drain(..n) {
            let Some(t) = w.ticket.as_ref() else { continue };
            let (seat, key) = batch.seat(c.id, c.addr, t);
            if w.tx.send(Grant::Seat(Box::new(seat))).is_ok() {
                batch.add(key);
            }
        }
        if batch.is_empty() {
            return None;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_queries
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Some(batch)
    }

    /// More connections open than the pool may keep (its size and reserve), as after a
    /// RELOAD or SET made it smaller.
    /// A released connection with a cancel on its way: held (counted in `open`, lent to no
    /// one) until the cancel is delivered, then taken back; closed if the cancel failed or
    /// does not settle in time. The wait is the pool's, not the client's, so a client that
    /// leaves meanwhile strands nothing.
    fn hold_until_cancelled(self: &Arc<Self>, c: Conn) {
        lock(&self.state).being_canceled += 1;
        // the cancel itself is bounded by server_connect_timeout; this is a backstop
        let bound = self.settings.load().connect_timeout + CANCEL_SETTLE_MARGIN;
        let pool = self.clone();
        tokio::spawn(async move {
            let flight = c.cancels.clone();
            let delivered = tokio::time::timeout(bound, flight.settled())
                .await
                .unwrap_or(false);
            lock(&pool.state).being_canceled -= 1;
            if delivered {
                pool.put(c);
            } else {
                tracing::warn!(db = %pool.db, user = %pool.user, "closing server {}: a cancel sent to it was not delivered", c.pid);
                pool.discard(c);
            }
        });
    }

    /// Closes a connection and hands its slot to the first waiter, if any.
    fn discard(&self, c: Conn) {
        lock(&self.state).servers.remove(&c.id);
        c.close();
        self.slot_freed();
    }

    fn slot_freed(&self) {
        let mut s = lock(&self.state);
        // PAUSE: the slot is not passed on (`serve_line` at RESUME)
        while !self.is_paused() {
            let Some(w) = s.waiters.pop_front() else {
                break;
            };
            if w.tx.send(Grant::Slot).is_ok() {
                return;
            }
        }
        s.open -= 1;
    }

    /// Periodic upkeep: close idle connections past server_idle_timeout (down to
    /// min_pool_size) or server_lifetime, or found closed by the server, and open connections up to min_pool_size.
    pub fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let mono = Mono::now();
        let settings = self.settings.load_full();
        let mut closing = Vec::new();
        let need;
        {
            let mut s = lock(&self.state);
            let mut i = 0;
            while i < s.idle.len() {
                let c = &s.idle[i];
                let idle_for = mono.since(c.last_used);
                let stale = settings.idle_timeout.is_some_and(|t| idle_for >= t)
                    && s.open > settings.min_size;
                let stale = stale || oversized(&s);
                // A server that closed (restart, administrator's terminate) or spoke unprompted
                // while idle goes now, as PgBouncer's would, not when next lent: SHOW SERVERS
                // and the counts stay true. (A non-blocking peek, no I/O wait under the lock.)
                if stale || s.hot.too_old(c, mono) || c.is_broken() {
                    let c = s.idle.remove(i);
                    s.servers.remove(&c.id);
                    closing.push(c);
                    s.open -= 1;
                } else {
                    i += 1;
                }
            }
            self.sweep_waiters(&mut s, &settings, now);
            let backing_off = s
                .failed_at
                .zip(settings.login_retry)
                .is_some_and(|(at, retry)| now.duration_since(at) < retry);
            need = if s.closed
                || !s.waiters.is_empty()
                || self.is_retired()
                || self.is_paused()
                || backing_off
            {
                0
            } else {
                settings.min_size.min(settings.size).saturating_sub(s.open)
            };
            s.open += need;
        }
        closing.into_iter().for_each(close);
        for _ in 0..need {
            let pool = self.clone();
            tokio::spawn(async move {
                match pool.open_slot(None).await {
                    Ok(c) => c.release(),
                    Err(e) => {
                        tracing::debug!(db = %pool.db, user = %pool.user, "min_pool_size connect failed: {e}")
                    }
                }
            });
        }
    }

    /// The deadlines of checkouts in line: past reserve_pool_timeout, the oldest get
    /// reserve connections while the reserve lasts; past query_wait_timeout, they fail.
    /// Checkouts given up (their client left) are dropped.
    fn sweep_waiters(&self, s: &mut State, settings: &PoolSettings, now: Instant) {
        let waiters = std::mem::take(&mut s.waiters);
        for w in waiters {
            if w.tx.is_closed() {
                continue;
            }
            let reserve = w.reserve_at.is_some_and(|r| now >= r)
                && s.open < settings.size + settings.reserve_size
                && !self.is_paused();
            if reserve {
                if w.tx.send(Grant::Slot).is_ok() {
                    s.open += 1;
                }
            } else if w.deadline.is_some_and(|d| now >= d) {
                let _ = w.tx.send(Grant::Expired);
            } else {
                s.waiters.push_back(w);
            }
        }
    }

    /// Closes idle connections and refuses new checkouts (shutdown, removed database).
    pub fn close(&self) {
        let idle = {
            let mut s = lock(&self.state);
            s.closed = true;
            s.open -= s.idle.len() as u32;
            s.waiters.clear();
            let idle = std::mem::take(&mut s.idle);
            for c in &idle {
                s.servers.remove(&c.id);
            }
            idle
        };
        // paused checkouts must see the pool closed rather than wait for a RESUME
        self.resume();
        idle.into_iter().for_each(close);
    }
}

/// A lent connection. `release` returns it (it must be idle and clean); dropping it
/// otherwise closes it, so a connection in an unknown state is never lent again.
pub struct PooledConn {
    conn: Option<Conn>,
    pool: Arc<Pool>,
}

impl Lease {
    /// A checkout that offered no ticket gets a connection.
    fn into_conn(self) -> Result<PooledConn, PoolError> {
        match self {
            Lease::Conn(c) => Ok(c),
            Lease::Seat(_) => Err(PoolError::Closed),
        }
    }
}

impl PooledConn {
    /// The settings of the pool the connection belongs to.
    pub fn pool_settings(&self) -> Arc<PoolSettings> {
        self.pool.settings()
    }

    /// Back to the pool; held back first while a cancel is on its way to it. The client's
    /// cancel target must already be cleared (`ClientHandle::set_cancel_target(None)`), so no new
    /// cancel can start after the check here.
    pub fn release(mut self) {
        if let Some(c) = self.conn.take() {
            if c.cancels.failed() {
                self.pool.discard(c);
            } else if c.cancels.pending() {
                self.pool.hold_until_cancelled(c);
            } else {
                self.pool.put(c);
            }
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl std::ops::Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("connection present until release")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("connection present until release")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.discard(c);
        }
    }
}

/// More connections open than the pool's size and reserve (made smaller by RELOAD or SET).
fn oversized(s: &State) -> bool {
    s.open > s.hot.max_open
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolMode;

    /// Every client that waits in line allocates its checkout future: kept within what
    /// glibc's per-thread cache serves (1,032 bytes) by boxing the rare waits inside it. It was
    /// 2,760 bytes with them inline.
    #[test]
    fn a_waiting_checkout_is_a_small_future() {
        let settings = PoolSettings {
            mode: PoolMode::Transaction,
            size: 1,
            min_size: 0,
            reserve_size: 0,
            reserve_timeout: None,
            query_wait_timeout: None,
            connect_timeout: Duration::from_secs(1),
            login_retry: None,
            idle_timeout: None,
            lifetime: None,
            check: None,
            batch_size: 0,
            gather: None,
        };
        let target = ServerTarget {
            host: "127.0.0.1".into(),
            port: 1,
            dbname: "d".into(),
            user: "u".into(),
            secret: None,
        };
        let pool = Pool::new("d".into(), "u".into(), target, settings, None);
        let f = pool.checkout_or_batch(None, std::future::pending());
        let size = std::mem::size_of_val(&f);
        assert!(size <= 640, "checkout future of {size} bytes");
    }
}
