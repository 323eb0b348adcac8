//! Counting server connections during a run, once a second: pgmux's admin console (SHOW POOLS,
//! summing the sv_* columns of the target database) or PostgreSQL itself (client backends of
//! the database in pg_stat_activity). Keeps the current count and the peak.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const POLL: Duration = Duration::from_secs(1);
/// How long the observer's own login may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot connect: {}", describe(.0))]
    Connect(tokio_postgres::Error),
    #[error("{}", describe(.0))]
    Query(tokio_postgres::Error),
    #[error("no sv_* columns in SHOW POOLS")]
    NoColumns,
    #[error("unexpected answer to the count query")]
    Unexpected,
}

#[derive(Debug, Clone)]
pub enum Source {
    /// pgmux's (or PgBouncer's) admin console; the client-facing database name.
    Admin { conn: String, dbname: String },
    /// PostgreSQL; the database name on the server.
    Direct { conn: String, dbname: String },
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Admin { .. } => "--admin (SHOW POOLS)",
            Source::Direct { .. } => "--direct (pg_stat_activity)",
        }
    }
}

/// The latest and highest count; `measured` stays false until one poll succeeded.
#[derive(Default)]
pub struct Observed {
    pub current: AtomicU64,
    pub peak: AtomicU64,
    pub measured: AtomicBool,
    /// The first count.
    pub before: std::sync::OnceLock<u64>,
}

impl Observed {
    pub fn peak(&self) -> Option<u64> {
        self.measured
            .load(Ordering::Relaxed)
            .then(|| self.peak.load(Ordering::Relaxed))
    }

    pub fn current(&self) -> Option<u64> {
        self.measured
            .load(Ordering::Relaxed)
            .then(|| self.current.load(Ordering::Relaxed))
    }

    fn record(&self, n: u64) {
        let _ = self.before.set(n);
        self.current.store(n, Ordering::Relaxed);
        self.peak.fetch_max(n, Ordering::Relaxed);
        self.measured.store(true, Ordering::Relaxed);
    }
}

/// Polls `source` once a second, and once more when `done` turns true (so a run shorter than a
/// second is still measured, by the connections its pools hold at the end). A failure (no admin
/// console yet, wrong password, ...) prints one warning and ends the polling; the run goes on.
pub async fn watch(source: Source, observed: Arc<Observed>, mut done: watch::Receiver<bool>) {
    let client = match tokio::time::timeout(CONNECT_LIMIT, connect(&source)).await {
        Ok(Ok(c)) => c,
        Err(_) => {
            eprintln!(
                "pgmux-load: {}: no login within {CONNECT_LIMIT:?}; server connections not measured",
                source.name()
            );
            return;
        }
        Ok(Err(e)) => {
            eprintln!(
                "pgmux-load: {}: {e}; server connections not measured",
                source.name()
            );
            return;
        }
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = done.wait_for(|d| *d) => true,
        };
        match count(&client, &source).await {
            Ok(n) => observed.record(n),
            Err(e) if last => {
                eprintln!("pgmux-load: {}: {e}", source.name());
            }
            Err(e) => {
                eprintln!(
                    "pgmux-load: {}: {e}; stopped measuring server connections",
                    source.name()
                );
                return;
            }
        }
        if last {
            return;
        }
    }
}

async fn connect(source: &Source) -> Result<Client, ObserveError> {
    let conn = match source {
        Source::Admin { conn, .. } | Source::Direct { conn, .. } => conn,
    };
    let (client, connection) = tokio_postgres::connect(conn, NoTls)
        .await
        .map_err(ObserveError::Connect)?;
    tokio::spawn(connection);
    Ok(client)
}

/// The server's own message when there is one ("db error" alone says little).
fn describe(e: &tokio_postgres::Error) -> String {
    crate::stats::classify(e).1
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn count(c: &Client, source: &Source) -> Result<u64, ObserveError> {
    match source {
        Source::Direct { dbname, .. } => {
            let sql = format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = {} \
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                quote_literal(dbname)
            );
            let msgs = c.simple_query(&sql).await.map_err(ObserveError::Query)?;
            msgs.iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(|s| s.parse().ok()),
                    _ => None,
                })
                .ok_or(ObserveError::Unexpected)
        }
        Source::Admin { dbname, .. } => {
            let msgs = c
                .simple_query("SHOW POOLS")
                .await
                .map_err(ObserveError::Query)?;
            // No row for the database yet means no pool yet: no server connections.
            let mut total = 0;
            for m in &msgs {
                let SimpleQueryMessage::Row(r) = m else {
                    continue;
                };
                let cols = r.columns();
                let db_col = cols.iter().position(|c| c.name() == "database");
                if let Some(i) = db_col {
                    if r.get(i) != Some(dbname.as_str()) {
                        continue;
                    }
                }
                let sv: Vec<usize> = (0..cols.len())
                    .filter(|&i| cols[i].name().starts_with("sv_"))
                    .collect();
                if sv.is_empty() {
                    return Err(ObserveError::NoColumns);
                }
                total += sv
                    .iter()
                    .filter_map(|&i| r.get(i).and_then(|v| v.parse::<u64>().ok()))
                    .sum::<u64>();
            }
            Ok(total)
        }
    }
}
