//! The state shared by every task: configuration, pools, cancel keys, client counts and the
//! shutdown signal.

use crate::auth::password::Secret;
use crate::auth::VerifierCache;
use crate::cancel::CancelRegistry;
use crate::config::{Config, Database};
use crate::pool::{DbLimit, Pool, PoolSettings};
use crate::server::ServerTarget;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Shutdown stages, in order. SIGTERM drains: no new clients, connected ones are served
/// until they leave. SIGINT is safe shutdown: each client is also closed as soon as it
/// holds no server (in transaction mode, after its current transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shutdown {
    Running,
    Drain,
    Safe,
}

pub struct App {
    pub config: Arc<Config>,
    pub cancels: CancelRegistry,
    pub verifiers: VerifierCache,
    /// Every distinct named statement clients prepared (transaction mode).
    pub statements: Arc<crate::prepared::Registry>,
    /// Connected clients (counted from accept, so max_client_conn holds during login too).
    pub clients: AtomicUsize,
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    db_limits: Mutex<HashMap<String, Arc<DbLimit>>>,
    shutdown: watch::Sender<Shutdown>,
    /// Woken when the last client leaves.
    pub no_clients: tokio::sync::Notify,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        Arc::new(App {
            config: Arc::new(config),
            cancels: CancelRegistry::default(),
            verifiers: VerifierCache::default(),
            statements: Arc::default(),
            clients: AtomicUsize::new(0),
            pools: Mutex::new(HashMap::new()),
            db_limits: Mutex::new(HashMap::new()),
            shutdown: watch::channel(Shutdown::Running).0,
            no_clients: tokio::sync::Notify::new(),
        })
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
            }
            later
        });
    }

    pub fn shutdown_stage(&self) -> Shutdown {
        *self.shutdown.borrow()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    pub fn all_pools(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// The pool serving `user` on `db`, created on first use.
    pub fn pool(&self, db: &Database, user: &str) -> Arc<Pool> {
        let target = self.target(db, user);
        let key = (db.name.clone(), target.user.clone());
        if let Some(p) = lock(&self.pools).get(&key) {
            return p.clone();
        }
        let settings = self.pool_settings(db, user);
        let limit = self.db_limit(db);
        let mut pools = lock(&self.pools);
        pools
            .entry(key)
            .or_insert_with(|| {
                Pool::new(
                    db.name.clone(),
                    target.user.clone(),
                    target,
                    settings,
                    limit,
                )
            })
            .clone()
    }

    fn target(&self, db: &Database, user: &str) -> ServerTarget {
        let (server_user, secret) = match &db.server_user {
            Some(u) => (u.clone(), db.server_password.as_deref().map(Secret::parse)),
            None => (
                user.to_string(),
                self.config
                    .user(user)
                    .and_then(|u| u.password.as_deref())
                    .map(Secret::parse),
            ),
        };
        ServerTarget {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone().unwrap_or_else(|| db.name.clone()),
            user: server_user,
            secret,
        }
    }

    fn pool_settings(&self, db: &Database, user: &str) -> PoolSettings {
        let g = &self.config.pgmux;
        let u = self.config.user(user);
        PoolSettings {
            mode: u
                .and_then(|u| u.pool_mode)
                .or(db.pool_mode)
                .unwrap_or(g.pool_mode),
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
            idle_timeout: g.server_idle_timeout.get(),
            lifetime: g.server_lifetime.get(),
        }
    }

    fn db_limit(&self, db: &Database) -> Option<Arc<DbLimit>> {
        let max = db
            .max_db_connections
            .unwrap_or(self.config.pgmux.max_db_connections);
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
