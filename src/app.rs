//! The state shared by every task: the live configuration (swapped whole on reload), pools,
//! client counts and registry (with their cancel keys), pause state and the shutdown signal.

use crate::auth::lookup::SecretCache;
use crate::auth::password::Secret;
use crate::auth::VerifierCache;
use crate::config::{Config, ConfigError, Database, General, Seconds};
use crate::pool::{DbLimit, Pool, PoolSettings};
use crate::router::balance::DbRouter;
use crate::server::ServerTarget;
use crate::stats::ClientRegistry;
use crate::topology::{HostConfig, Topology, TopologyConfig};
use arc_swap::{ArcSwap, Guard};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Shutdown stages, in order. SIGTERM drains: no new clients, connected ones are served
/// until they leave. SIGINT is safe shutdown: each client is also closed as soon as it
/// holds no server (in transaction mode, after its current transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shutdown {
    Running,
    Drain,
    Safe,
}

impl Shutdown {
    fn from_u8(v: u8) -> Shutdown {
        match v {
            0 => Shutdown::Running,
            1 => Shutdown::Drain,
            _ => Shutdown::Safe,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload from")]
    NoPath,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Settings that only take effect at start: a reload keeps the running values.
pub const RESTART_ONLY: &[&str] = &[
    "listen_addr",
    "listen_port",
    "so_reuseport",
    "workers",
    "sched_batch",
    "unix_socket_dir",
    "unix_socket_mode",
    "metrics_listen_addr",
    "metrics_listen_port",
    "log_level",
    "log_format",
    "max_db_connections",
];

#[derive(Default)]
struct PauseState {
    all: bool,
    dbs: HashSet<String>,
}

pub struct App {
    config: ArcSwap<Config>,
    /// The client timeouts of `config`, read at every wake-up of every session.
    pub timeouts: ClientTimeouts,
    /// The limits of `config` a session reads at each transaction.
    pub limits: SessionLimits,
    /// Where the configuration came from, for SIGHUP and RELOAD.
    pub config_path: Option<PathBuf>,
    pub verifiers: VerifierCache,
    /// Secrets of users not in the config, found by auth_query.
    pub auth_lookups: SecretCache,
    /// Server login secrets clients taught pgmux, by (database, user): databases may be
    /// different clusters whose same-named roles have different secrets
    /// (see `learn_server_secret`).
    learned: Mutex<HashMap<(String, String), Secret>>,
    /// Every distinct named statement clients prepared (transaction mode).
    /// Lives as long as the process: each client's tracker holds it without a count.
    pub statements: &'static crate::prepared::Registry,
    /// Connected clients (counted from accept, so max_client_conn holds during login too).
    pub clients: AtomicUsize,
    /// Logged-in clients, for SHOW CLIENTS and KILL.
    pub registry: Arc<ClientRegistry>,
    /// Keyed by (database, user, host index): a database with replicas has a pool per host.
    pools: Mutex<HashMap<(String, String, usize), Arc<Pool>>>,
    /// Read/write routing of the databases with replicas (topology monitor, balancing).
    routers: Mutex<HashMap<String, Arc<DbRouter>>>,
    /// Pools whose database (or user) left the configuration, serving their last clients.
    retired: Mutex<Vec<Arc<Pool>>>,
    db_limits: Mutex<HashMap<String, Arc<DbLimit>>>,
    pause: Mutex<PauseState>,
    /// Databases refused to new clients (console DISABLE), until ENABLE.
    disabled: Mutex<HashSet<String>>,
    /// Serialises reloads (SIGHUP, RELOAD, SET) so none is lost.
    reloading: Mutex<()>,
    shutdown: watch::Sender<Shutdown>,
    /// The stage as a plain atomic: every session reads it on every wake-up, and a watch
    /// channel's read takes its lock.
    stage: std::sync::atomic::AtomicU8,
    /// SHUTDOWN from the admin console: `run` begins (or escalates to) the stage it asked
    /// for, kept in `requested` (the latest stage asked so far).
    pub shutdown_requested: Notify,
    requested: std::sync::atomic::AtomicU8,
    /// Woken when the last client leaves.
    pub no_clients: tokio::sync::Notify,
    pub started: SystemTime,
    /// Clients refused for a wrong password or unknown user.
    pub auth_failures: AtomicU64,
}

/// The client timeouts in force, as plain atomics (nanoseconds, 0: off). Every session reads
/// them at every wake-up (`client::Session::deadline`): from the configuration, a load and a
/// float conversion of each cost more than the rest of that check.
#[derive(Default)]
pub struct ClientTimeouts {
    query: AtomicU64,
    idle_transaction: AtomicU64,
    client_idle: AtomicU64,
}

impl ClientTimeouts {
    fn set(&self, g: &General) {
        let nanos = |s: Seconds| s.get().map_or(0, |d| d.as_nanos() as u64);
        // config checks bound them (MAX_SECONDS), far below u64 nanoseconds
        self.query.store(nanos(g.query_timeout), Ordering::Relaxed);
        self.idle_transaction
            .store(nanos(g.idle_transaction_timeout), Ordering::Relaxed);
        self.client_idle
            .store(nanos(g.client_idle_timeout), Ordering::Relaxed);
    }

    fn get(a: &AtomicU64) -> Option<Duration> {
        match a.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// `query_timeout`.
    pub fn query(&self) -> Option<Duration> {
        Self::get(&self.query)
    }

    /// `idle_transaction_timeout`.
    pub fn idle_transaction(&self) -> Option<Duration> {
        Self::get(&self.idle_transaction)
    }

    /// `client_idle_timeout`.
    pub fn client_idle(&self) -> Option<Duration> {
        Self::get(&self.client_idle)
    }

    /// Whether any of the three is set.
    pub fn any(&self) -> bool {
        [&self.query, &self.idle_transaction, &self.client_idle]
            .iter()
            .any(|a| a.load(Ordering::Relaxed) != 0)
    }
}

/// What a session reads of the configuration at each transaction, as plain atomics: it
/// makes a relay (message and statement limits) and gives its server back
/// (`server_reset_query_always`), and loading the configuration for each cost about 90
/// instructions.
#[derive(Default)]
pub struct SessionLimits {
    max_message_size: AtomicUsize,
    max_prepared_statements: AtomicUsize,
    server_reset_query_always: AtomicBool,
    defer_begin: AtomicBool,
}

impl SessionLimits {
    fn set(&self, g: &General) {
        self.max_message_size
            .store(g.max_message_size as usize, Ordering::Relaxed);
        self.max_prepared_statements
            .store(g.max_prepared_statements as usize, Ordering::Relaxed);
        self.server_reset_query_always
            .store(g.server_reset_query_always, Ordering::Relaxed);
        self.defer_begin.store(g.defer_begin, Ordering::Relaxed);
    }

    pub fn max_message_size(&self) -> usize {
        self.max_message_size.load(Ordering::Relaxed)
    }

    pub fn max_prepared_statements(&self) -> usize {
        self.max_prepared_statements.load(Ordering::Relaxed)
    }

    pub fn server_reset_query_always(&self) -> bool {
        self.server_reset_query_always.load(Ordering::Relaxed)
    }

    pub fn defer_begin(&self) -> bool {
        self.defer_begin.load(Ordering::Relaxed)
    }
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        App::with_path(config, None)
    }

    pub fn with_path(config: Config, config_path: Option<PathBuf>) -> Arc<App> {
        crate::tls::install(&config.security);
        crate::queries::set_log_min_duration_ms(config.pgmux.log_min_duration_ms);
        crate::sockopts::configure(crate::sockopts::TcpOptions::from_config(&config.pgmux));
        let timeouts = ClientTimeouts::default();
        timeouts.set(&config.pgmux);
        let limits = SessionLimits::default();
        limits.set(&config.pgmux);
        Arc::new(App {
            config: ArcSwap::from_pointee(config),
            timeouts,
            limits,
            config_path,
            verifiers: VerifierCache::default(),
            auth_lookups: SecretCache::default(),
            learned: Mutex::new(HashMap::new()),
            statements: Box::leak(Box::default()),
            clients: AtomicUsize::new(0),
            registry: Arc::new(ClientRegistry::default()),
            pools: Mutex::new(HashMap::new()),
            routers: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            db_limits: Mutex::new(HashMap::new()),
            pause: Mutex::new(PauseState::default()),
            disabled: Mutex::new(HashSet::new()),
            reloading: Mutex::new(()),
            shutdown: watch::channel(Shutdown::Running).0,
            stage: std::sync::atomic::AtomicU8::new(Shutdown::Running as u8),
            shutdown_requested: Notify::new(),
            requested: std::sync::atomic::AtomicU8::new(Shutdown::Running as u8),
            no_clients: tokio::sync::Notify::new(),
            started: SystemTime::now(),
            auth_failures: AtomicU64::new(0),
        })
    }

    /// The configuration in force. Cheap (no reference count is touched); do not hold it
    /// for long, take `config_arc` for that.
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    pub fn config_arc(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<Shutdown> {
        self.shutdown.subscribe()
    }

    /// Moves to a later shutdown stage; never back.
    pub fn begin_shutdown(&self, stage: Shutdown) {
        self.shutdown.send_if_modified(|s| {
            let later = stage > *s;
            if later {
                *s = stage;
                self.stage.store(stage as u8, Ordering::Release);
            }
            later
        });
        if stage == Shutdown::Safe {
            // sessions wait on their sockets, not on the signal: each looks at the stage
            self.registry.wake_all();
        }
    }

    pub fn shutdown_stage(&self) -> Shutdown {
        Shutdown::from_u8(self.stage.load(Ordering::Acquire))
    }

    /// SHUTDOWN from the console: asks `run` for `stage` (Drain: WAIT_FOR_CLIENTS, Safe:
    /// WAIT_FOR_SERVERS or bare SHUTDOWN). A later stage than one asked before wins.
    pub fn request_shutdown(&self, stage: Shutdown) {
        self.requested.fetch_max(stage as u8, Ordering::AcqRel);
        self.shutdown_requested.notify_one();
    }

    /// The latest stage the console asked for (`request_shutdown`).
    pub fn requested_shutdown(&self) -> Shutdown {
        Shutdown::from_u8(self.requested.load(Ordering::Acquire))
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Every pool, the retired ones (still serving their last clients) included.
    pub fn all_pools(&self) -> Vec<Arc<Pool>> {
        // in host order within a database (the first host's pool first), then the retired
        let mut live: Vec<_> = lock(&self.pools)
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        live.sort_by(|a, b| a.0.cmp(&b.0));
        let mut v: Vec<Arc<Pool>> = live.into_iter().map(|(_, p)| p).collect();
        v.extend(lock(&self.retired).iter().cloned());
        v.sort_by(|a, b| (&a.db, &a.user).cmp(&(&b.db, &b.user)));
        v
    }

    /// The pool serving `user` on `db`, created on first use. With replicas: the pool of the
    /// current primary (of the first host until the monitor has found one).
    pub fn pool(&self, db: &Database, user: &str) -> Arc<Pool> {
        let pools = self.host_pools(db, user);
        let primary = self
            .router(db, user)
            .and_then(|r| r.topology.snapshot().primary)
            .unwrap_or(0);
        pools[primary.min(pools.len() - 1)].clone()
    }

    /// One pool per server of `db` for `user`, in host order (`Database::server_hosts`);
    /// they share one `PoolStats`, since they serve the same clients.
    pub fn host_pools(&self, db: &Database, user: &str) -> Vec<Arc<Pool>> {
        let config = self.config_arc();
        let hosts = if db.has_replicas() {
            db.server_hosts()
        } else {
            Vec::new()
        };
        let n = hosts.len().max(1);
        // the user pgmux logs in to servers as (see `target`)
        let server_user = db.server_user.clone().unwrap_or_else(|| user.to_string());
        let mut key = (db.name.clone(), server_user, 0);
        {
            let pools = lock(&self.pools);
            let mut found = Vec::with_capacity(n);
            for i in 0..n {
                key.2 = i;
                match pools.get(&key) {
                    Some(p) => found.push(p.clone()),
                    None => break,
                }
            }
            if found.len() == n {
                return found;
            }
        }
        let (_, server_user, _) = key;
        let settings = pool_settings(&config, db, user);
        let limit = self.db_limit(&config, db);
        let mut pools = lock(&self.pools);
        let mut stats = None;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let key = (db.name.clone(), server_user.clone(), i);
            let p = pools
                .entry(key)
                .or_insert_with(|| {
                    let t = target(&config, self.learned(db, user), db, user, hosts.get(i));
                    let p = match &stats {
                        None => Pool::new(
                            db.name.clone(),
                            server_user.clone(),
                            t,
                            settings.clone(),
                            limit.clone(),
                        ),
                        Some(s) => Pool::with_stats(
                            db.name.clone(),
                            server_user.clone(),
                            t,
                            settings.clone(),
                            limit.clone(),
                            Arc::clone(s),
                        ),
                    };
                    if self.is_paused(&db.name) {
                        p.pause();
                    }
                    p
                })
                .clone();
            stats.get_or_insert_with(|| p.stats.clone());
            out.push(p);
        }
        out
    }

    /// Starts the router (and topology monitor) of every database with replicas that has
    /// none, so reads find their replicas from the first query on. Called at start and after
    /// every reload (which drops the routers of removed or changed databases). The monitor
    /// logs in as the database's `server_user`, else as the first `[[users]]` entry; when
    /// that login never works, the first client's login takes over (`router`).
    pub fn start_monitors(&self) {
        let config = self.config_arc();
        let Some(user) = config.users.first().map(|u| u.name.clone()) else {
            return;
        };
        for db in config.databases.iter().filter(|d| d.has_replicas()) {
            let mut routers = lock(&self.routers);
            if !routers.contains_key(&db.name) {
                info!(db = %db.name, "starting the host monitor");
                routers.insert(db.name.clone(), self.new_router(&config, db, &user, false));
            }
        }
    }

    /// The router of a database with replicas, its topology monitor started on first use
    /// (logging in as this user's server login).
    pub fn router(&self, db: &Database, user: &str) -> Option<Arc<DbRouter>> {
        if !db.has_replicas() {
            return None;
        }
        let mut routers = lock(&self.routers);
        if let Some(r) = routers.get(&db.name) {
            if r.from_client || db.server_user.is_some() || !r.never_answered() {
                return Some(r.clone());
            }
            // started for a guessed login that no host has accepted: use this client's
            warn!(db = %db.name, user, "host monitor never logged in; restarting it as this client's login");
        }
        let config = self.config_arc();
        let r = self.new_router(&config, db, user, true);
        routers.insert(db.name.clone(), r.clone());
        Some(r)
    }

    fn new_router(
        &self,
        config: &Config,
        db: &Database,
        user: &str,
        from_client: bool,
    ) -> Arc<DbRouter> {
        let hosts = db.server_hosts();
        let t = target(config, self.learned(db, user), db, user, hosts.first());
        let g = &config.pgmux;
        let topology = Topology::start(TopologyConfig {
            hosts: hosts.clone(),
            dbname: t.dbname,
            user: t.user,
            secret: t.secret,
            check_interval: db
                .lag_check_interval
                .get()
                .unwrap_or(Duration::from_secs(1)),
            ban_time: Duration::from_secs_f64(db.ban_time.0.max(0.0)),
            timeout: g
                .server_connect_timeout
                .get()
                .unwrap_or(Duration::from_secs(15)),
        });
        let mut r = DbRouter::new(db.name.clone(), topology, db.routing(), db.route, hosts);
        r.from_client = from_client;
        Arc::new(r)
    }

    fn learned(&self, db: &Database, user: &str) -> Option<Secret> {
        lock(&self.learned)
            .get(&(db.name.clone(), user.to_string()))
            .cloned()
    }

    /// A client of `db` proved a login secret for `user` that the config does not hold (a
    /// SCRAM ClientKey, or the secret auth_query found): that user's pools of `db` log in with
    /// it from now on. A changed secret (the role's password changed) retargets them, so
    /// connections made with the old one close as they come back. Unknown databases teach
    /// nothing (the map stays bounded by the configuration).
    pub fn learn_server_secret(&self, db_name: &str, user: &str, secret: Secret) {
        let config = self.config_arc();
        let Some(db) = config.database(db_name) else {
            return;
        };
        if db.server_user.is_some() {
            return;
        }
        {
            let mut learned = lock(&self.learned);
            let key = (db.name.clone(), user.to_string());
            if learned.get(&key) == Some(&secret) {
                return;
            }
            learned.insert(key, secret.clone());
        }
        let pools = lock(&self.pools);
        for ((pool_db, pool_user, i), pool) in pools.iter() {
            if pool_db != db_name || pool_user != user {
                continue;
            }
            let hosts = if db.has_replicas() {
                db.server_hosts()
            } else {
                Vec::new()
            };
            let t = target(&config, Some(secret.clone()), db, user, hosts.get(*i));
            pool.set_target(t, true);
        }
    }

    /// Routers in use, for SHOW HOSTS and the metrics.
    pub fn routers(&self) -> Vec<Arc<DbRouter>> {
        let mut v: Vec<_> = lock(&self.routers).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn db_limit(&self, config: &Config, db: &Database) -> Option<Arc<DbLimit>> {
        let max = db
            .max_db_connections
            .unwrap_or(config.pgmux.max_db_connections);
        if max == 0 {
            return None;
        }
        Some(
            lock(&self.db_limits)
                .entry(db.name.clone())
                .or_insert_with(|| DbLimit::new(max))
                .clone(),
        )
    }

    /// DISABLE db (`on`) or ENABLE db: whether new clients of `db` are refused.
    pub fn set_disabled(&self, db: &str, on: bool) {
        let mut d = lock(&self.disabled);
        if on {
            d.insert(db.to_string());
        } else {
            d.remove(db);
        }
    }

    pub fn is_disabled(&self, db: &str) -> bool {
        lock(&self.disabled).contains(db)
    }

    /// Whether a console command may name `db`: it is in the configuration, or a reload
    /// removed it while it still has pools (serving their last clients) or is paused.
    pub fn knows_db(&self, db: &str) -> bool {
        self.config().database(db).is_some()
            || lock(&self.pause).dbs.contains(db)
            || lock(&self.retired).iter().any(|p| p.db == db)
            || lock(&self.pools).values().any(|p| p.db == db)
    }

    pub fn is_paused(&self, db: &str) -> bool {
        let p = lock(&self.pause);
        p.all || p.dbs.contains(db)
    }

    /// Whether PAUSE [db] would pause nothing new: all pools, or that database's, already are.
    pub fn already_paused(&self, db: Option<&str>) -> bool {
        let p = lock(&self.pause);
        p.all || db.is_some_and(|d| p.dbs.contains(d))
    }

    /// PAUSE [db]: new checkouts wait; returns the pools now paused.
    pub fn pause(&self, db: Option<&str>) -> Vec<Arc<Pool>> {
        {
            let mut p = lock(&self.pause);
            match db {
                None => p.all = true,
                Some(d) => {
                    p.dbs.insert(d.to_string());
                }
            }
        }
        let pools: Vec<_> = self
            .all_pools()
            .into_iter()
            .filter(|p| db.is_none_or(|d| p.db == d))
            .collect();
        pools.iter().for_each(|p| p.pause());
        pools
    }

    /// RESUME [db]. Resuming everything also clears per-database pauses. Returns whether
    /// anything was paused: everything, or some database (bare RESUME), or `db` itself.
    pub fn resume(&self, db: Option<&str>) -> bool {
        let was_paused = {
            let mut p = lock(&self.pause);
            match db {
                None => {
                    let any = p.all || !p.dbs.is_empty();
                    p.all = false;
                    p.dbs.clear();
                    any
                }
                Some(d) => p.dbs.remove(d),
            }
        };
        for p in self.all_pools() {
            if !self.is_paused(&p.db) {
                p.resume();
            }
        }
        was_paused
    }

    /// Re-reads the configuration file and applies it; on error the running one stays.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoPath)?;
        let new = Config::load(path)?;
        self.apply(new);
        info!("configuration reloaded from {}", path.display());
        Ok(())
    }

    /// Puts a validated configuration in force: settings and targets of existing pools are
    /// updated in place (their clients stay connected), pools of removed databases retire.
    pub fn apply(&self, mut new: Config) {
        let _serial = lock(&self.reloading);
        let old = self.config_arc();
        keep_restart_only(&old, &mut new);
        let new = Arc::new(new);
        crate::tls::install(&new.security);
        self.config.store(new.clone());
        self.timeouts.set(&new.pgmux);
        self.limits.set(&new.pgmux);
        crate::queries::set_log_min_duration_ms(new.pgmux.log_min_duration_ms);
        crate::sockopts::configure(crate::sockopts::TcpOptions::from_config(&new.pgmux));

        // servers connected under other TLS settings (plaintext before `require`, a CA no
        // longer trusted) must not go on serving
        let (o, n) = (&old.pgmux, &new.pgmux);
        let server_tls_changed = o.server_tls_sslmode != n.server_tls_sslmode
            || o.server_tls_ca_file != n.server_tls_ca_file
            || o.server_tls_cert_file != n.server_tls_cert_file
            || o.server_tls_key_file != n.server_tls_key_file;
        let mut pools = lock(&self.pools);
        let mut retire = Vec::new();
        for (key, pool) in pools.iter() {
            let Some(db) = new.database(&pool.db) else {
                retire.push(key.clone());
                continue;
            };
            // the pool's user: the server_user everyone shares, or the client's own
            let (still_valid, client_user) = match &db.server_user {
                Some(su) => (*su == pool.user, pool.user.clone()),
                None => {
                    let was_shared = old
                        .database(&pool.db)
                        .is_some_and(|d| d.server_user.is_some());
                    let known = new.user(&pool.user).is_some() || new.auth_user_for(db).is_some();
                    (!was_shared && known, pool.user.clone())
                }
            };
            if !still_valid {
                retire.push(key.clone());
                continue;
            }
            let hosts = if db.has_replicas() {
                db.server_hosts()
            } else {
                Vec::new()
            };
            if key.2 >= hosts.len().max(1) {
                retire.push(key.clone());
                continue;
            }
            let reconnect = server_tls_changed
                || secret_source(&old, old.database(&pool.db), &pool.user)
                    != secret_source(&new, Some(db), &pool.user);
            pool.set_target(
                target(
                    &new,
                    self.learned(db, &client_user),
                    db,
                    &client_user,
                    hosts.get(key.2),
                ),
                reconnect,
            );
            pool.set_settings(pool_settings(&new, db, &client_user));
        }
        // changed routing settings: sessions that start from now on get a new router (and
        // monitor); running ones keep theirs until they end
        lock(&self.routers).retain(|name, r| {
            new.database(name)
                .is_some_and(|d| d.has_replicas() && d.routing() == r.routing && d.route == r.route)
        });
        let mut retired = lock(&self.retired);
        for key in retire {
            if let Some(p) = pools.remove(&key) {
                info!(db = %p.db, user = %p.user, "pool retired by reload: serving its clients until they leave");
                p.retire();
                retired.push(p);
            }
        }
        drop(retired);
        drop(pools);
        // monitors of added or changed databases start now, not with their first client
        if tokio::runtime::Handle::try_current().is_ok() {
            self.start_monitors();
        }
    }

    /// Upkeep of retired pools: closed and forgotten once their last client has left.
    pub fn sweep_retired(&self) {
        let done: Vec<Arc<Pool>> = {
            let mut r = lock(&self.retired);
            let (done, keep) = r
                .drain(..)
                .partition(|p| p.stats.client_total() == 0 && p.counts().active == 0);
            *r = keep;
            done
        };
        for p in done {
            info!(db = %p.db, user = %p.user, "retired pool closed");
            p.close();
        }
    }

    /// Every stats_period: SHOW STATS averages move on.
    pub fn roll_stats(&self, period: Duration) {
        for p in self.all_pools() {
            p.stats.roll_averages(period);
        }
    }

    /// Whether `user` may use the console, and with which rights.
    pub fn console_role(&self, user: &str) -> Option<crate::admin::Role> {
        let c = self.config();
        if c.pgmux.admin_users.iter().any(|u| u == user) {
            Some(crate::admin::Role::Admin)
        } else if c.pgmux.stats_users.iter().any(|u| u == user) {
            Some(crate::admin::Role::Stats)
        } else {
            None
        }
    }
}

/// Restart-only settings keep their running values, with a warning when the file differs.
fn keep_restart_only(old: &Config, new: &mut Config) {
    let (o, n) = (&old.pgmux, &mut new.pgmux);
    macro_rules! keep {
        ($($f:ident),*) => {$(
            if o.$f != n.$f {
                warn!(concat!(stringify!($f), " changed: takes effect at restart; keeping the running value"));
                n.$f = o.$f.clone();
            }
        )*};
    }
    keep!(
        listen_addr,
        listen_port,
        so_reuseport,
        workers,
        sched_batch,
        unix_socket_dir,
        unix_socket_mode,
        metrics_listen_addr,
        metrics_listen_port,
        log_level,
        log_format,
        max_db_connections
    );
    for d in &mut new.databases {
        let before = old.database(&d.name).and_then(|od| od.max_db_connections);
        if old.database(&d.name).is_some() && d.max_db_connections != before {
            warn!(db = %d.name, "max_db_connections changed: takes effect at restart");
            d.max_db_connections = before;
        }
    }
}

/// The configured text a pool's server login secret comes from.
fn secret_source(config: &Config, db: Option<&Database>, user: &str) -> Option<String> {
    match db.and_then(|d| d.server_user.as_ref()) {
        Some(_) => db.and_then(|d| d.server_password.clone()),
        None => config.user(user).and_then(|u| u.password.clone()),
    }
}

/// Where `user`'s connections to `db` go: `host` (one of several servers), else the
/// database's own host and port.
/// `learned`: a login secret clients taught pgmux for `user` (see `App::learn_server_secret`),
/// used unless the config holds the plain password.
fn target(
    config: &Config,
    learned: Option<Secret>,
    db: &Database,
    user: &str,
    host: Option<&HostConfig>,
) -> ServerTarget {
    let (server_user, secret) = match &db.server_user {
        Some(u) => (u.clone(), db.server_password.as_deref().map(Secret::parse)),
        None => {
            let configured = config
                .user(user)
                .and_then(|u| u.password.as_deref())
                .map(Secret::parse);
            let secret = match configured {
                Some(Secret::Plain(pw)) => Some(Secret::Plain(pw)),
                other => learned.or(other),
            };
            (user.to_string(), secret)
        }
    };
    ServerTarget {
        host: host.map_or_else(|| db.host.clone(), |h| h.host.clone()),
        port: host.map_or(db.port, |h| h.port),
        dbname: db.dbname.clone().unwrap_or_else(|| db.name.clone()),
        user: server_user,
        secret,
    }
}

pub fn pool_settings(config: &Config, db: &Database, user: &str) -> PoolSettings {
    let g = &config.pgmux;
    let u = config.user(user);
    let mode = u
        .and_then(|u| u.pool_mode)
        .or(db.pool_mode)
        .unwrap_or(g.pool_mode);
    // a batch returns its server without the reset query, and only transaction mode lends
    // a server per query
    let batches = mode == crate::config::PoolMode::Transaction && !g.server_reset_query_always;
    PoolSettings {
        mode,
        size: u
            .and_then(|u| u.pool_size)
            .or(db.pool_size)
            .unwrap_or(g.default_pool_size),
        min_size: db.min_pool_size.unwrap_or(g.min_pool_size),
        reserve_size: db.reserve_pool_size.unwrap_or(g.reserve_pool_size),
        reserve_timeout: g.reserve_pool_timeout.get(),
        query_wait_timeout: g.query_wait_timeout.get(),
        connect_timeout: g
            .server_connect_timeout
            .get()
            .unwrap_or(Duration::from_secs(15)),
        login_retry: g.server_login_retry.get(),
        idle_timeout: g.server_idle_timeout.get(),
        lifetime: g.server_lifetime.get(),
        check: server_check(g),
        batch_size: if batches { g.server_batch_size } else { 0 },
        gather: (g.server_batch_gather_ms > 0)
            .then(|| Duration::from_millis(g.server_batch_gather_ms)),
    }
}

/// server_check_query / server_check_delay; None when the query is empty (checks off).
fn server_check(g: &crate::config::General) -> Option<crate::pool::ServerCheck> {
    let query = g.server_check_query.trim();
    (!query.is_empty()).then(|| crate::pool::ServerCheck {
        query: query.into(),
        delay: Duration::from_secs_f64(g.server_check_delay.0.max(0.0)),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::Value;

    fn pgmux_table(c: &Config) -> toml::Table {
        match Value::try_from(&c.pgmux) {
            Ok(Value::Table(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    /// Every [pgmux] key that SHOW CONFIG calls restart-only keeps its running value on a
    /// reload, whatever the file says now.
    #[test]
    fn a_reload_keeps_every_restart_only_setting() {
        let old = Config::parse("[pgmux]\n", "old").unwrap();
        let mut changed = pgmux_table(&old);
        for key in RESTART_ONLY {
            let v = changed.get_mut(*key).unwrap_or_else(|| panic!("{key}"));
            *v = match v {
                Value::Boolean(b) => Value::Boolean(!*b),
                Value::Integer(i) => Value::Integer(*i + 1),
                Value::String(_) if *key == "log_level" => Value::String("debug".into()),
                Value::String(_) if *key == "log_format" => Value::String("json".into()),
                Value::String(_) if *key == "unix_socket_mode" => Value::String("0700".into()),
                Value::String(_) if *key == "unix_socket_dir" => Value::String("/tmp".into()),
                Value::String(s) => Value::String(format!("{s}1")),
                other => panic!("{key}: {other:?}"),
            };
        }
        let text = format!("[pgmux]\n{}", toml::to_string(&changed).unwrap());
        let mut new = Config::parse(&text, "new").unwrap();
        let file = pgmux_table(&new);
        keep_restart_only(&old, &mut new);
        let (before, after) = (pgmux_table(&old), pgmux_table(&new));
        for key in RESTART_ONLY {
            assert_ne!(file.get(*key), before.get(*key), "{key} was not changed");
            assert_eq!(after.get(*key), before.get(*key), "{key}");
        }
    }
}
