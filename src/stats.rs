//! The shared counters behind both the admin console and `/metrics`: one `PoolStats` per
//! pool (client counts by state, transactions, queries, bytes, wait/query/transaction time
//! and their histograms), the relay's `Meter` that feeds them, and the registry of live
//! clients (`ClientRegistry`, one entry per logged-in client) that SHOW CLIENTS lists.
//!
//! Recording is a handful of relaxed atomic adds on the pool's own counters: no lock shared
//! by all connections, no allocation per message. Readers (SHOW, scrape) load the same
//! atomics, so the console and the metrics cannot disagree about what was counted.

use crate::cancel::{Cancel, CancelKey, CancelTarget};
use crate::clock::Mono;
use crate::endpoint::ClientAddr;
use crate::router::effects::PinReason;
use prometheus::{Histogram, HistogramOpts};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, SystemTime};

/// Bucket bounds (seconds) of the wait, query and transaction histograms.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static EPOCH: LazyLock<Mono> = LazyLock::new(Mono::now);
/// Wall-clock time at EPOCH, so a monotonic reading also gives the time of day without a
/// second clock read (SHOW CLIENTS' request_time is taken once per transaction).
static EPOCH_UNIX_US: LazyLock<u64> = LazyLock::new(|| {
    let mono = mono_us();
    unix_us(SystemTime::now()).saturating_sub(mono)
});

/// Microseconds on a monotonic clock since the process's first use of it.
pub fn mono_us() -> u64 {
    mono_us_at(Mono::now())
}

/// `t` on the clock of `mono_us` (0 if before its start).
pub fn mono_us_at(t: Mono) -> u64 {
    t.micros_since(*EPOCH)
}

pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A client's state as PgBouncer names it: `active` holds a server, `waiting` waits for one,
/// `idle` holds none and wants none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl ClientState {
    pub fn name(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }

    fn from_u8(v: u8) -> ClientState {
        match v {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }
}

/// Totals of one pool since it was created. Counts, bytes and microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub server_assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
    /// Named statements: Parses from clients, Parses sent to servers, Binds (`PREPARED_*`).
    pub prepared: [u64; 3],
}

/// Indexes of `Totals::prepared`, as PgBouncer counts them: a client's named Parse, a Parse
/// sent to a server (the statement missing there), a Bind of a named statement.
pub const CLIENT_PARSES: usize = 0;
pub const SERVER_PARSES: usize = 1;
pub const BINDS: usize = 2;

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.server_assignments += o.server_assignments;
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_time_us += o.xact_time_us;
        self.query_time_us += o.query_time_us;
        self.wait_time_us += o.wait_time_us;
        for (a, b) in self.prepared.iter_mut().zip(o.prepared) {
            *a += b;
        }
    }
}

/// PgBouncer's `avg_*` columns: rates per second over the last `stats_period`, and mean
/// durations (microseconds) of what finished in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Averages {
    pub server_assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
    /// Per second, as `Totals::prepared`.
    pub prepared: [u64; 3],
}

impl Averages {
    /// Averages between two snapshots of totals taken `period` apart.
    pub fn between(old: &Totals, new: &Totals, period: Duration) -> Averages {
        let secs = period.as_secs_f64().max(1e-6);
        let rate = |a: u64, b: u64| ((b.saturating_sub(a)) as f64 / secs).round() as u64;
        let mean = |t0: u64, t1: u64, n0: u64, n1: u64| {
            t1.saturating_sub(t0)
                .checked_div(n1.saturating_sub(n0))
                .unwrap_or(0)
        };
        Averages {
            server_assignments: rate(old.server_assignments, new.server_assignments),
            xacts: rate(old.xacts, new.xacts),
            queries: rate(old.queries, new.queries),
            recv: rate(old.received, new.received),
            sent: rate(old.sent, new.sent),
            xact_time_us: mean(old.xact_time_us, new.xact_time_us, old.xacts, new.xacts),
            query_time_us: mean(
                old.query_time_us,
                new.query_time_us,
                old.queries,
                new.queries,
            ),
            wait_time_us: mean(
                old.wait_time_us,
                new.wait_time_us,
                old.server_assignments,
                new.server_assignments,
            ),
            prepared: std::array::from_fn(|i| rate(old.prepared[i], new.prepared[i])),
        }
    }
}

/// Counters of one pool (database, user).
pub struct PoolStats {
    pub db: String,
    pub user: String,
    clients: [AtomicI64; 3],
    server_assignments: AtomicU64,
    xacts: AtomicU64,
    queries: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_time_us: AtomicU64,
    query_time_us: AtomicU64,
    wait_time_us: AtomicU64,
    prepared: [AtomicU64; 3],
    /// Clients that became pinned to their server in transaction mode.
    pub pins: AtomicU64,
    pub wait_hist: Histogram,
    pub query_hist: Histogram,
    pub xact_hist: Histogram,
    /// Written by the stats ticker every stats_period, read by SHOW STATS.
    averages: Mutex<(Totals, Averages)>,
    /// ErrorResponses relayed from servers, by SQLSTATE class (errors are rare: a lock is
    /// fine here, and the map holds at most the few dozen classes PostgreSQL defines).
    errors: Mutex<BTreeMap<[u8; 2], u64>>,
    /// Statements run, by normalized text (SHOW QUERIES).
    pub statements: crate::queries::QueryTable,
}

fn histogram(name: &str, help: &str, db: &str, user: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help)
        .buckets(DURATION_BUCKETS.to_vec())
        .const_label("database", db)
        .const_label("user", user);
    Histogram::with_opts(opts).expect("valid histogram options")
}

impl PoolStats {
    pub fn new(db: &str, user: &str) -> Arc<PoolStats> {
        Arc::new(PoolStats {
            db: db.to_string(),
            user: user.to_string(),
            clients: Default::default(),
            server_assignments: AtomicU64::new(0),
            xacts: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            xact_time_us: AtomicU64::new(0),
            query_time_us: AtomicU64::new(0),
            wait_time_us: AtomicU64::new(0),
            prepared: Default::default(),
            pins: AtomicU64::new(0),
            wait_hist: histogram(
                "pgmux_client_wait_seconds",
                "Time clients waited for a server connection",
                db,
                user,
            ),
            query_hist: histogram(
                "pgmux_query_duration_seconds",
                "Time from a request to its ReadyForQuery while a server was attached",
                db,
                user,
            ),
            xact_hist: histogram(
                "pgmux_transaction_duration_seconds",
                "Time from a transaction's first request to the ReadyForQuery that ends it",
                db,
                user,
            ),
            averages: Mutex::new(Default::default()),
            errors: Mutex::new(BTreeMap::new()),
            statements: Default::default(),
        })
    }

    /// Clients of this pool in `state` now.
    pub fn clients(&self, state: ClientState) -> u64 {
        self.clients[state as usize].load(Ordering::Relaxed).max(0) as u64
    }

    pub fn client_total(&self) -> u64 {
        self.clients
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<i64>()
            .max(0) as u64
    }

    fn move_client(&self, from: Option<ClientState>, to: Option<ClientState>) {
        if let Some(f) = from {
            self.clients[f as usize].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(t) = to {
            self.clients[t as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn totals(&self) -> Totals {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            server_assignments: l(&self.server_assignments),
            xacts: l(&self.xacts),
            queries: l(&self.queries),
            received: l(&self.received),
            sent: l(&self.sent),
            xact_time_us: l(&self.xact_time_us),
            query_time_us: l(&self.query_time_us),
            wait_time_us: l(&self.wait_time_us),
            prepared: std::array::from_fn(|i| l(&self.prepared[i])),
        }
    }

    /// Server errors relayed so far, by SQLSTATE class ("42", "23", ...).
    pub fn errors_by_class(&self) -> Vec<(String, u64)> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(c, n)| (String::from_utf8_lossy(c).into_owned(), *n))
            .collect()
    }

    pub fn averages(&self) -> Averages {
        self.averages.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Called every stats_period: the averages now cover the period that just ended.
    pub fn roll_averages(&self, period: Duration) {
        let now = self.totals();
        let mut a = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        a.1 = Averages::between(&a.0, &now, period);
        a.0 = now;
    }

    fn record_wait(&self, waited: Duration) {
        self.server_assignments.fetch_add(1, Ordering::Relaxed);
        self.wait_time_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.wait_hist.observe(waited.as_secs_f64());
    }
}

/// The relay's hook into its pool's counters: bytes as they are read, and the clocks of the
/// running query and transaction. A default `Meter` (no pool) records nothing.
#[derive(Default)]
pub struct Meter {
    stats: Option<Arc<PoolStats>>,
    query_start: Option<Mono>,
    xact_start: Option<Mono>,
    /// Which statement each request in flight runs (SHOW QUERIES, slow log).
    pub statements: crate::queries::Recorder,
}

impl Meter {
    pub fn new(stats: Arc<PoolStats>) -> Meter {
        Meter {
            stats: Some(stats),
            query_start: None,
            xact_start: None,
            statements: Default::default(),
        }
    }

    /// No clock running and no request in flight.
    pub fn is_idle(&self) -> bool {
        self.query_start.is_none() && self.xact_start.is_none() && self.statements.is_idle()
    }

    /// Named statements parsed and bound since the last call (`Tracker::counts`).
    pub fn count_prepared(&self, counts: [u32; 3]) {
        if let Some(s) = &self.stats {
            for (total, n) in s.prepared.iter().zip(counts) {
                if n > 0 {
                    total.fetch_add(u64::from(n), Ordering::Relaxed);
                }
            }
        }
    }

    /// Bytes read from the client.
    #[inline]
    pub fn received(&self, n: usize) {
        if let Some(s) = &self.stats {
            s.received.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Bytes read from the server, on their way to the client.
    #[inline]
    pub fn sent(&self, n: usize) {
        if let Some(s) = &self.stats {
            s.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// A Query, Sync or FunctionCall running statement `fp` (0: none known, see
    /// `statement`), read from the client at `now`: starts the query clock (and the
    /// transaction's) unless one is running.
    #[inline]
    pub fn request(&mut self, fp: u64, now: Mono) {
        if self.stats.is_some() {
            self.statements.request(fp);
        }
        if self.query_start.is_none() {
            self.query_start = Some(now);
            self.xact_start.get_or_insert(now);
        }
    }

    /// A ReadyForQuery with transaction status `status`, read at `now`; `more` when other
    /// requests are still in flight (pipelining), whose clock starts then.
    #[inline]
    pub fn ready(&mut self, status: u8, more: bool, now: Mono) {
        let Some(s) = &self.stats else { return };
        s.queries.fetch_add(1, Ordering::Relaxed);
        let took = self.query_start.take().map(|t| {
            let d = now.since(t);
            s.query_time_us
                .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
            s.query_hist.observe(d.as_secs_f64());
            d
        });
        self.statements.ready(&s.statements, &s.db, &s.user, took);
        if more {
            self.query_start = Some(now);
        }
        if status == b'I' {
            s.xacts.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = self.xact_start.take() {
                let d = now.since(t);
                s.xact_time_us
                    .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
                s.xact_hist.observe(d.as_secs_f64());
            }
            if more {
                self.xact_start = Some(now);
            }
        }
    }

    /// The fingerprint of a statement about to run (its text goes into the pool's table if
    /// new); 0 when there is nothing to record. Through `router::memo`: most texts recur, as
    /// they are or with other numbers.
    pub fn statement(&mut self, sql: &str) -> u64 {
        match &self.stats {
            Some(s) => {
                let fp = crate::router::memo::lexed(sql).0;
                self.statements.fingerprinted(&s.statements, sql, fp)
            }
            None => 0,
        }
    }

    /// [`Meter::statement`] with the fingerprint of `sql` already computed.
    pub fn fingerprinted(&mut self, sql: &str, fp: u64) -> u64 {
        match &self.stats {
            Some(s) => self.statements.fingerprinted(&s.statements, sql, fp),
            None => 0,
        }
    }

    /// The fingerprint of a prepared statement about to run, its text read only if the
    /// pool's table may lack it.
    pub fn prepared(&mut self, d: &crate::prepared::StmtDef) -> u64 {
        match &self.stats {
            Some(s) => self
                .statements
                .fingerprinted_with(&s.statements, d.fingerprint, || {
                    crate::prepared::query_text(&d.body)
                }),
            None => 0,
        }
    }

    /// An ErrorResponse body on its way to the client: counted by SQLSTATE class.
    pub fn error(&self, body: &[u8]) {
        let Some(s) = &self.stats else { return };
        let Some(class) = sqlstate_class(body) else {
            return;
        };
        *s.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(class)
            .or_insert(0) += 1;
    }

    /// A server was just attached at `now`: time spent waiting for it is not query time.
    pub fn attached(&mut self, now: Mono) {
        if self.query_start.is_some() {
            self.query_start = Some(now);
        }
        if self.xact_start.is_some() {
            self.xact_start = Some(now);
        }
    }
}

/// The first two characters of the `C` (SQLSTATE) field of an ErrorResponse body.
fn sqlstate_class(mut body: &[u8]) -> Option<[u8; 2]> {
    while let Some((&tag, rest)) = body.split_first() {
        if tag == 0 {
            return None;
        }
        let end = rest.iter().position(|&b| b == 0)?;
        if tag == b'C' {
            let code = &rest[..end];
            let class = [*code.first()?, *code.get(1)?];
            return class.iter().all(u8::is_ascii_alphanumeric).then_some(class);
        }
        body = &rest[end + 1..];
    }
    None
}

/// One logged-in client as SHOW CLIENTS lists it, and its cancel key.
/// Kept small: an idle client's memory is mostly this, its task, its session and its socket
/// (see the size test below and benches/idle-memory.sh).
pub struct ClientInfo {
    pub id: u64,
    /// unix_us() when it logged in.
    connect_us: u64,
    /// Its address and the one it connected to, as shown (an IPv6 flow and scope are not).
    addr: ClientAddr,
    local: Option<(IpAddr, u16)>,
    /// Shared by the clients with the same name (see `Clients::names`).
    pub application_name: Arc<str>,
    /// Its pool's counters, which also name its database and user.
    pub stats: Arc<PoolStats>,
    /// The registry it is in, which its handle leaves when dropped.
    registry: Weak<ClientRegistry>,
    /// The key pgmux gave it and where its cancels go; the registry is keyed by its pid.
    pub cancel: CancelKey,
    state: AtomicU8,
    /// mono_us() when the client started waiting (valid while waiting).
    wait_since: AtomicU64,
    /// unix_us() of the client's last request for a server.
    request_time: AtomicU64,
    /// Id of the server connection lent to it, 0 for none.
    server: AtomicU64,
    /// Why the client keeps its server in transaction mode (a PinReason), empty if it does not.
    pinned: AtomicU8,
    /// KILL (or a safe shutdown) asked the session to end.
    killed: AtomicBool,
    /// A CancelRequest came while the client waited for a server, or while its query waited
    /// behind another in a batch.
    cancel_asked: AtomicBool,
    /// Its query is in a batch, behind another client's (`batch::drive`).
    batch_queued: AtomicBool,
    /// CancelRequests with its key so far (wrapping): a request sent again after its server
    /// failed is answered as cancelled if one came since it was first sent (`relay::retry`).
    cancels: AtomicU16,
    /// The session's task, woken by KILL, a safe shutdown and a cancel while it waits. Kept
    /// once registered (waking does not take it), so the session registers once rather than
    /// at every poll: two atomic read-modify-writes per poll of every session otherwise.
    waker: Mutex<Option<Waker>>,
}

impl ClientInfo {
    pub fn addr(&self) -> ClientAddr {
        self.addr
    }

    pub fn local(&self) -> Option<SocketAddr> {
        self.local.map(|(ip, port)| SocketAddr::new(ip, port))
    }

    pub fn connect_time_us(&self) -> u64 {
        self.connect_us
    }

    /// Why the client is pinned to its server ("" when it is not).
    pub fn pinned(&self) -> &'static str {
        match self.pinned.load(Ordering::Relaxed) {
            0 => "",
            n => PinReason::ALL
                .get(usize::from(n) - 1)
                .map_or("", |p| p.as_str()),
        }
    }

    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// How long the client has been waiting, if it is.
    pub fn waiting_for(&self) -> Option<Duration> {
        (self.state() == ClientState::Waiting).then(|| {
            Duration::from_micros(mono_us().saturating_sub(self.wait_since.load(Ordering::Relaxed)))
        })
    }

    pub fn request_time_us(&self) -> u64 {
        self.request_time.load(Ordering::Relaxed)
    }

    pub fn server_id(&self) -> Option<u64> {
        match self.server.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    pub fn db(&self) -> &str {
        &self.stats.db
    }

    pub fn user(&self) -> &str {
        &self.stats.user
    }

    /// Asks the client's session to end (KILL).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.wake();
    }

    /// A CancelRequest for a client waiting for a server: its session takes it out of line.
    /// A client doing anything else is not told (an idle one has nothing to cancel).
    fn ask_cancel(&self) {
        if self.state() == ClientState::Waiting {
            self.cancel_asked.store(true, Ordering::Release);
            self.wake();
        }
    }

    /// Its batched query now waits behind another (true), or runs (false).
    pub fn set_batch_queued(&self, queued: bool) {
        self.batch_queued.store(queued, Ordering::Release);
    }

    /// The cancel to send for a cancel asked while the client's query waited (in line or in
    /// a batch), if the query runs now. The kept request is taken back first, so of two
    /// callers racing (the batch starting the query, a CancelRequest arriving) only one
    /// sends it; an unsent `Cancel` would count as failed.
    pub fn cancel_if_running(&self) -> Option<Cancel> {
        // the common case (nothing asked) costs one load, not the key's lock
        if !self.cancel_asked.load(Ordering::Acquire) {
            return None;
        }
        if !self.cancel.has_target() || !self.cancel_asked.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.cancel.start_cancel(self.cancel.secret)
    }

    /// CancelRequests with its key so far (wrapping).
    pub fn cancels(&self) -> u16 {
        self.cancels.load(Ordering::Acquire)
    }

    /// Takes a cancel asked while the client waited and not acted on yet.
    pub fn take_cancel_asked(&self) -> bool {
        // the common case (nothing asked) costs one load, not a swap
        self.cancel_asked.load(Ordering::Acquire) && self.cancel_asked.swap(false, Ordering::AcqRel)
    }

    /// Forgets a cancel asked before the wait that is about to begin.
    pub fn forget_cancel(&self) {
        self.cancel_asked.store(false, Ordering::Relaxed);
    }

    /// Ready when a cancel was asked (kept until taken or forgotten: a seat in a batch
    /// handed over just before it passes it on); otherwise the task is woken by
    /// `ask_cancel`.
    pub fn poll_cancel_asked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.watch(cx.waker());
        if self.cancel_asked.load(Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Wakes the session's task (the one `watch` keeps): for KILL, a cancel while it waits,
    /// or a safe shutdown, whose stage it then reads.
    pub fn wake(&self) {
        let task = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(task) = task {
            task.wake();
        }
    }

    /// Has `kill`, `ask_cancel` and `wake` wake `task` from now on. Each of them wakes
    /// whichever task registered last, so every caller must be the session's own task (whose
    /// waker is the same at every poll).
    fn watch(&self, task: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(task)) {
            *slot = Some(task.clone());
        }
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Ready once KILL was asked; otherwise the task is woken by `kill` and `wake`.
    pub fn poll_killed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // registered before the flag is read, so a kill in between still wakes the task
        self.watch(cx.waker());
        if self.is_killed() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// All logged-in clients, by cancel key. Locked once at login and once at logout, and by a
/// CancelRequest; never per message.
#[derive(Default)]
pub struct ClientRegistry {
    map: Mutex<Clients>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Clients {
    by_pid: HashSet<ByPid>,
    /// Application names in use, shared by the clients that give the same one (most do).
    names: HashSet<Arc<str>>,
}

/// A registry entry, found by its cancel pid: the set holds one pointer per client.
struct ByPid(Arc<ClientInfo>);

impl std::hash::Hash for ByPid {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.cancel.pid.hash(h)
    }
}

impl PartialEq for ByPid {
    fn eq(&self, o: &Self) -> bool {
        self.0.cancel.pid == o.0.cancel.pid
    }
}

impl Eq for ByPid {}

impl std::borrow::Borrow<i32> for ByPid {
    fn borrow(&self) -> &i32 {
        &self.0.cancel.pid
    }
}

impl Clients {
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        // names of clients gone while their entry was still referenced (a SHOW) linger:
        // swept here once they could outnumber the clients
        if self.names.len() >= 2 * self.by_pid.len() + 64 {
            self.names.retain(|n| Arc::strong_count(n) > 1);
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        n
    }
}

impl ClientRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.lock().by_pid.iter().map(|c| c.0.clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn len(&self) -> usize {
        self.lock().by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every session (a safe shutdown began: each looks at the stage).
    pub fn wake_all(&self) {
        for c in self.snapshot() {
            c.wake();
        }
    }

    /// A CancelRequest: a cancel to send, if the key is a client's and that client's work
    /// runs on a server now. A client still waiting for a server is told instead; for one
    /// whose query waits behind another in a batch, the cancel is kept until it runs.
    pub fn cancel(&self, pid: i32, secret: i32) -> Option<Cancel> {
        let client = self.lock().by_pid.get(&pid)?.0.clone();
        if client.cancel.matches(secret) {
            client.cancels.fetch_add(1, Ordering::AcqRel);
        }
        let cancel = client.cancel.start_cancel(secret);
        if cancel.is_some() || !client.cancel.matches(secret) {
            return cancel;
        }
        if !client.batch_queued.load(Ordering::Acquire) {
            client.ask_cancel();
            return None;
        }
        // Queued in a batch: left for the batch to send when the query runs, unless it
        // started meanwhile
        client.cancel_asked.store(true, Ordering::Release);
        client.cancel_if_running()
    }

    /// Registers a client (idle) under a fresh random cancel key until the returned handle
    /// is dropped.
    pub fn register(
        self: &Arc<Self>,
        stats: Arc<PoolStats>,
        addr: ClientAddr,
        local: Option<SocketAddr>,
        application_name: &str,
    ) -> ClientHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now();
        let mut clients = self.lock();
        let pid = loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid != 0 && !clients.by_pid.contains(&pid) {
                break pid;
            }
        };
        let info = Arc::new(ClientInfo {
            id,
            addr,
            local: local.map(|a| (a.ip(), a.port())),
            connect_us: unix_us(now),
            application_name: clients.name(application_name),
            stats: stats.clone(),
            registry: Arc::downgrade(self),
            cancel: CancelKey::new(pid, rand::random()),
            state: AtomicU8::new(ClientState::Idle as u8),
            wait_since: AtomicU64::new(0),
            request_time: AtomicU64::new(unix_us(now)),
            server: AtomicU64::new(0),
            pinned: AtomicU8::new(0),
            killed: AtomicBool::new(false),
            cancel_asked: AtomicBool::new(false),
            cancels: AtomicU16::new(0),
            batch_queued: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        stats.move_client(None, Some(ClientState::Idle));
        clients.by_pid.insert(ByPid(info.clone()));
        drop(clients);
        ClientHandle { info }
    }
}

/// A session's entry in the registry; state changes keep its pool's client counts in step,
/// and dropping it takes the client out of both.
pub struct ClientHandle {
    info: Arc<ClientInfo>,
}

impl ClientHandle {
    pub fn info(&self) -> &Arc<ClientInfo> {
        &self.info
    }

    fn set_state(&self, to: ClientState) {
        let from = ClientState::from_u8(self.info.state.swap(to as u8, Ordering::Relaxed));
        if from != to {
            self.info.stats.move_client(Some(from), Some(to));
        }
    }

    /// The client asks for a server; returns when it started waiting (one clock read serves
    /// the wait, SHOW CLIENTS' request_time and the caller).
    pub fn waiting(&self) -> Mono {
        let now = Mono::now();
        let mono = mono_us_at(now);
        self.info.wait_since.store(mono, Ordering::Relaxed);
        self.info
            .request_time
            .store(*EPOCH_UNIX_US + mono, Ordering::Relaxed);
        self.set_state(ClientState::Waiting);
        now
    }

    /// The client got server `server_id` after waiting since `since`.
    pub fn active(&self, since: Mono, server_id: u64, meter: &mut Meter) {
        self.active_at(since, Mono::now(), server_id, meter);
    }

    /// `active`, with the clock read at `now` (a server lent at once: the wait's own start).
    pub fn active_at(&self, since: Mono, now: Mono, server_id: u64, meter: &mut Meter) {
        self.info.stats.record_wait(now.since(since));
        self.info.server.store(server_id, Ordering::Relaxed);
        self.set_state(ClientState::Active);
        meter.attached(now);
    }

    /// The client keeps its server (transaction mode) for `pin`, or no longer (None).
    pub fn set_pinned(&self, pin: Option<PinReason>) {
        let code = pin.and_then(|p| PinReason::ALL.iter().position(|a| *a == p));
        let code = code.map_or(0, |i| i as u8 + 1);
        if self.info.pinned.swap(code, Ordering::Relaxed) == 0 && code != 0 {
            self.info.stats.pins.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The client's server went back to the pool.
    pub fn idle(&self) {
        self.info.server.store(0, Ordering::Relaxed);
        self.set_state(ClientState::Idle);
    }

    /// Where the client's cancels go now (its server's key), or nowhere.
    pub fn set_cancel_target(&self, t: Option<CancelTarget>) {
        self.info.cancel.set_target(t);
    }

    /// Resolves when KILL (or a removed database) asks this session to end.
    pub async fn killed(&self) {
        std::future::poll_fn(|cx| self.info.poll_killed(cx)).await
    }

    pub fn poll_killed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.info.poll_killed(cx)
    }

    /// `poll_killed` in two steps, for the session's own polls: `watch` once (the task is
    /// kept), then `is_killed` at each poll, a plain load.
    pub fn watch(&self, cx: &mut std::task::Context<'_>) {
        self.info.watch(cx.waker());
    }

    pub fn is_killed(&self) -> bool {
        self.info.is_killed()
    }

    pub fn poll_cancel_asked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.info.poll_cancel_asked(cx)
    }

    pub fn forget_cancel(&self) {
        self.info.forget_cancel();
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        let state = self.info.state();
        self.info.stats.move_client(Some(state), None);
        let Some(registry) = self.info.registry.upgrade() else {
            return;
        };
        let mut clients = registry.lock();
        clients.by_pid.remove(&self.info.cancel.pid);
        // the set's and this entry's: no other client has the name
        if Arc::strong_count(&self.info.application_name) == 2 {
            clients.names.remove(&self.info.application_name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_states_move_between_counts_and_leave_with_the_handle() {
        let reg = Arc::new(ClientRegistry::default());
        let stats = PoolStats::new("db", "u");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let h = reg.register(stats.clone(), ClientAddr::from(addr), None, "");
        assert_eq!(stats.clients(ClientState::Idle), 1);
        let since = h.waiting();
        assert_eq!(stats.clients(ClientState::Waiting), 1);
        assert_eq!(stats.clients(ClientState::Idle), 0);
        assert!(h.info().waiting_for().is_some());
        let mut m = Meter::new(stats.clone());
        h.active(since, 7, &mut m);
        assert_eq!(stats.clients(ClientState::Active), 1);
        assert_eq!(h.info().server_id(), Some(7));
        assert_eq!(stats.totals().server_assignments, 1);
        assert_eq!(reg.len(), 1);
        drop(h);
        assert_eq!(stats.client_total(), 0);
        assert!(reg.is_empty());
    }

    #[test]
    fn clients_are_found_by_cancel_key_and_share_names() {
        let reg = Arc::new(ClientRegistry::default());
        let stats = PoolStats::new("db", "u");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = reg.register(stats.clone(), ClientAddr::from(addr), None, "app");
        let b = reg.register(stats.clone(), ClientAddr::from(addr), Some(addr), "app");
        assert!(Arc::ptr_eq(
            &a.info().application_name,
            &b.info().application_name
        ));
        assert_ne!(a.info().cancel.pid, b.info().cancel.pid);
        assert_eq!((a.info().local(), b.info().local()), (None, Some(addr)));
        let (pid, secret) = (a.info().cancel.pid, a.info().cancel.secret);
        assert!(
            reg.cancel(pid, secret).is_none(),
            "no server: nothing to cancel"
        );
        let flight = Arc::new(crate::cancel::CancelFlight::new(
            crate::endpoint::Dial::Tcp("127.0.0.1:5".parse().unwrap()),
            9,
            10,
        ));
        a.set_cancel_target(Some(flight.clone()));
        assert!(reg.cancel(pid, secret ^ 1).is_none(), "wrong secret");
        assert!(reg
            .cancel(b.info().cancel.pid, b.info().cancel.secret)
            .is_none());
        let c = reg.cancel(pid, secret).expect("a's server");
        assert_eq!(c.to.to_string(), "127.0.0.1:5");
        assert!(flight.pending());
        drop(c);
        drop(a);
        assert!(reg.cancel(pid, secret).is_none(), "gone with its client");
        let name = Arc::downgrade(&b.info().application_name);
        drop(b);
        assert!(reg.is_empty() && reg.lock().names.is_empty());
        assert!(
            name.upgrade().is_none(),
            "the name went with its last client"
        );
        // with its Arc header, one 192-byte block of glibc's malloc (benches/idle-memory.sh)
        assert!(
            std::mem::size_of::<ClientInfo>() <= 168,
            "{}",
            std::mem::size_of::<ClientInfo>()
        );
    }

    #[test]
    fn meter_counts_queries_and_transactions() {
        let stats = PoolStats::new("db", "u");
        let mut m = Meter::new(stats.clone());
        // autocommit query
        m.request(0, Mono::now());
        m.ready(b'I', false, Mono::now());
        // BEGIN; SELECT; COMMIT as three round trips
        m.request(0, Mono::now());
        m.ready(b'T', false, Mono::now());
        m.request(0, Mono::now());
        m.ready(b'T', false, Mono::now());
        m.request(0, Mono::now());
        m.ready(b'I', false, Mono::now());
        let t = stats.totals();
        assert_eq!(t.queries, 4);
        assert_eq!(t.xacts, 2);
        assert_eq!(stats.query_hist.get_sample_count(), 4);
        assert_eq!(stats.xact_hist.get_sample_count(), 2);
        m.received(10);
        m.sent(20);
        let t = stats.totals();
        assert_eq!((t.received, t.sent), (10, 20));
    }

    #[test]
    fn errors_count_by_sqlstate_class() {
        let stats = PoolStats::new("db", "u");
        let m = Meter::new(stats.clone());
        m.error(b"SERROR\0VERROR\0C42P01\0Mrelation does not exist\0\0");
        m.error(b"SERROR\0C42601\0Msyntax\0\0");
        m.error(b"SERROR\0C23505\0\0");
        m.error(b"SERROR\0Mno code\0\0");
        m.error(b"C4");
        assert_eq!(
            stats.errors_by_class(),
            vec![("23".to_string(), 1), ("42".to_string(), 2)]
        );
    }

    #[test]
    fn averages_are_rates_and_means() {
        let old = Totals::default();
        let new = Totals {
            xacts: 120,
            xact_time_us: 1200,
            queries: 60,
            query_time_us: 600,
            ..Default::default()
        };
        let a = Averages::between(&old, &new, Duration::from_secs(60));
        assert_eq!(a.xacts, 2);
        assert_eq!(a.queries, 1);
        assert_eq!(a.xact_time_us, 10);
        assert_eq!(a.query_time_us, 10);
        assert_eq!(a.wait_time_us, 0);
    }
}
