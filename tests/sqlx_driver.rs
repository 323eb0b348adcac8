//! Rust's sqlx (Postgres) through pgmux in transaction mode with a small pool: one `PgPool` of
//! many connections used by many tasks at once, so statements really move between servers.
//! Each of sqlx's protocol paths is driven and its results checked: the statement cache
//! (named `sqlx_s_N` statements, evicted and Closed), multi-statement simple queries
//! (`raw_sql`, `execute` of a string), row streams dropped halfway, transactions and
//! savepoints, COPY in and out, errors, a custom type sqlx looks up in `pg_type`, startup and
//! `SET` settings of two pools sharing servers, and `PgListener` through a session-mode
//! database. Each runs against a primary alone and with reads split off to two streaming
//! replicas. Unnamed statements (`persistent(false)`) are checked too, and sqlx's
//! lone-Sync pings.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::probe::Console;
use common::{PgCluster, Pgmux};
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArgumentBuffer, PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions,
    PgQueryResult, PgSslMode, PgTypeInfo, PgValueRef, Postgres,
};
use sqlx::{Connection, Decode, Encode, Executor, Row, Statement};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// sqlx connections (pgmux clients) per pool; pgmux lends them 3 servers.
const CONNS: u32 = 20;
/// Tasks sharing the pool, so connections also move between tasks.
const TASKS: i64 = 40;

fn config(port: u16, database_extra: &str) -> String {
    format!(
        "[pgmux]\nlisten_port = {{port}}\npool_mode = \"transaction\"\ndefault_pool_size = 3\nauth_type = \"scram-sha-256\"\n\
         admin_users = [\"app\"]\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\
         [[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {port}\n{database_extra}\n\
         [[databases]]\nname = \"app_session\"\ndbname = \"app\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         pool_mode = \"session\"\n"
    )
}

/// A pgmux in front of one of the shared clusters, and that cluster (for setup and for
/// counting rows on the primary behind pgmux's back).
struct Target {
    px: Pgmux,
    cluster: &'static PgCluster,
}

impl Target {
    fn alone() -> Target {
        let cluster = PgCluster::shared();
        Target {
            px: Pgmux::start(&config(cluster.primary().port, "")),
            cluster,
        }
    }

    /// Reads split off to two streaming replicas: the same checks, their statements now
    /// moving between servers of different kinds as well.
    fn split() -> Target {
        let cluster = PgCluster::shared_with_replicas();
        Target {
            px: Pgmux::start(&config(cluster.primary().port, &cluster.split_settings())),
            cluster,
        }
    }

    /// A pool of `CONNS` connections to database `db` through pgmux, each caching at most
    /// `cache` statements.
    async fn pool(&self, db: &str, cache: usize) -> PgPool {
        pool_on(self.px.port, db, cache).await
    }

    /// DDL as postgres on the primary, replayed on every replica by the time this returns (a
    /// read of the table through pgmux may reach either).
    fn setup(&self, sql: &str) {
        self.cluster.primary().psql("app", sql);
        self.cluster.wait_replicas_caught_up();
    }

    /// A query's answer from the primary itself, bypassing pgmux.
    fn on_primary(&self, sql: &str) -> String {
        self.cluster.primary().psql("app", sql)
    }
}

async fn pool_on(port: u16, db: &str, cache: usize) -> PgPool {
    pool_options()
        .connect_with(connect_options(port, db).statement_cache_capacity(cache))
        .await
        .expect("connect sqlx's pool")
}

fn connect_options(port: u16, db: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("app")
        .password("secret")
        .database(db)
        .ssl_mode(PgSslMode::Disable)
}

fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(CONNS)
        // 20 connections share 3 servers, and some tasks hold one through a transaction
        .acquire_timeout(Duration::from_secs(120))
}

/// The reads of a split pgmux reached the replicas: among its own servers (SHOW SERVERS, so no
/// other test's pgmux on the shared cluster counts) on a replica, one last ran a statement of
/// a client's. A server lent for nothing else does not count: sqlx pings (a lone Sync) on
/// every acquire and release, and pgmux lends a replica for that too, after bringing it to
/// the client's settings with `set_config`.
async fn assert_replicas_served(t: &Target) {
    let console = Console::connect(&t.px, "app", Some("secret")).await;
    let servers = console.show("SHOW SERVERS").await;
    let mut last = Vec::new();
    for r in t.cluster.replicas() {
        let pids: Vec<&str> = servers
            .iter()
            .filter(|s| s["port"] == r.port.to_string())
            .map(|s| s["remote_pid"].as_str())
            .collect();
        if pids.is_empty() {
            continue;
        }
        let queries = r.psql(
            "postgres",
            &format!(
                "SELECT query FROM pg_stat_activity WHERE pid IN ({})",
                pids.join(", ")
            ),
        );
        last.extend(queries.lines().map(str::to_string));
    }
    assert!(
        last.iter()
            .any(|q| !q.is_empty() && !q.contains("pg_catalog.set_config")),
        "no client statement on a replica server of pgmux's: {last:?}"
    );
}

/// A check against a primary alone and against one with replicas. Its reads must reach the
/// replicas, unless it says `no_replica_check`: its reads are inside transactions, right
/// behind the client's own writes, or none (what it shows then is that writes still reach the
/// primary), or it checks that for itself.
macro_rules! both_topologies {
    ($alone:ident, $split:ident, $check:ident) => {
        both_topologies!($alone, $split, $check, true);
    };
    ($alone:ident, $split:ident, $check:ident, no_replica_check) => {
        both_topologies!($alone, $split, $check, false);
    };
    ($alone:ident, $split:ident, $check:ident, $replicas_read:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $alone() {
            $check(&Target::alone()).await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $split() {
            let t = Target::split();
            $check(&t).await.unwrap();
            if $replicas_read {
                assert_replicas_served(&t).await;
            }
        }
    };
}

/// Runs `TASKS` copies of `task` at once, failing with the first error to happen (a task
/// that fails inside a transaction block may hold its server, and the others would then wait
/// for one until pgmux's query_wait_timeout). They run interleaved on the test's own task
/// rather than spawned: rustc cannot prove such futures `Send` when they borrow sqlx
/// connections (`Executor is not general enough`, rust-lang/rust#102211), and interleaving is
/// all pgmux can tell apart anyway.
async fn in_tasks<Fut>(task: impl Fn(i64) -> Fut) -> Result<()>
where
    Fut: Future<Output = Result<()>>,
{
    let task = &task;
    let mut running: FuturesUnordered<_> = (0..TASKS)
        .map(|i| async move { task(i).await.with_context(|| format!("task {i}")) })
        .collect();
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(())
}

/// The SQLSTATE of a failed query (or what came instead).
fn sqlstate<T: std::fmt::Debug>(r: Result<T, sqlx::Error>) -> String {
    match r {
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()).unwrap_or_default(),
        other => format!("not a database error: {other:?}"),
    }
}

both_topologies!(
    named_statements_through_a_small_cache,
    named_statements_through_a_small_cache_through_replicas,
    named_statements_through_a_small_cache_on
);

/// The cache holds 4 statements and each task cycles through 10, so nearly every query
/// Parses a new `sqlx_s_N` and Closes the oldest (Close, Sync), on whichever server is free.
async fn named_statements_through_a_small_cache_on(t: &Target) -> Result<()> {
    let pool = t.pool("app", 4).await;
    let p = pool.clone();
    in_tasks(move |i| {
        let pool = p.clone();
        async move {
            let mut conn = pool.acquire().await?;
            // an explicit prepare, evicted below and then run again: sqlx Parses it anew
            // without Describe, trusting the columns it kept
            let kept = conn.prepare("SELECT $1::int8 * 7 AS seven").await?;
            for round in 0..4i64 {
                for k in 0..10i64 {
                    let v = i * 1000 + round * 10 + k;
                    let sql = format!("SELECT $1::int8 * {k}, $2::text || '-{k}'");
                    let row = sqlx::query(&sql)
                        .bind(v)
                        .bind(format!("t{i}"))
                        .fetch_one(&mut *conn)
                        .await?;
                    ensure!(row.get::<i64, _>(0) == v * k, "{sql} with {v}");
                    ensure!(row.get::<String, _>(1) == format!("t{i}-{k}"));
                }
                let seven: i64 = kept.query().bind(i).fetch_one(&mut *conn).await?.get(0);
                ensure!(seven == i * 7, "kept statement gave {seven}");
            }
            ensure!(
                conn.cached_statements_size() == 4,
                "the cache holds {}",
                conn.cached_statements_size()
            );
            drop(conn);

            // types in and out, binary both ways, through the pool (a connection per query)
            for j in 0..10i32 {
                let row = sqlx::query(
                    "SELECT $1::text, $2::int4 + 1, $3::float8 * 2, $4::bytea, $5::int8[], \
                     NOT $6::bool, $7::int4",
                )
                .bind(format!("héllo {i}"))
                .bind(j)
                .bind(1.25f64)
                .bind(vec![0u8, 1, 255, j as u8])
                .bind(vec![i, -1, i64::MAX])
                .bind(j % 2 == 0)
                .bind(None::<i32>)
                .fetch_one(&pool)
                .await?;
                ensure!(row.get::<String, _>(0) == format!("héllo {i}"));
                ensure!(row.get::<i32, _>(1) == j + 1);
                ensure!(row.get::<f64, _>(2) == 2.5);
                ensure!(row.get::<Vec<u8>, _>(3) == vec![0u8, 1, 255, j as u8]);
                ensure!(row.get::<Vec<i64>, _>(4) == vec![i, -1, i64::MAX]);
                ensure!(row.get::<bool, _>(5) == (j % 2 != 0));
                ensure!(row.get::<Option<i32>, _>(6).is_none());
            }
            Ok(())
        }
    })
    .await
}

/// sqlx checks a connection with a lone Sync each time the pool lends it and takes it back:
/// pgmux answers those itself (the client holds no server then), so each query takes one
/// server, not three (100 queries took 301 before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_take_no_server() {
    let t = Target::alone();
    let pool = pool_options()
        .max_connections(1)
        .connect_with(connect_options(t.px.port, "app"))
        .await
        .expect("connect sqlx's pool");
    const QUERIES: i64 = 100;
    for i in 0..QUERIES {
        let row = sqlx::query("SELECT $1::int8 + 1")
            .bind(i)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(row.get::<i64, _>(0), i + 1);
    }
    let console = Console::connect(&t.px, "app", Some("secret")).await;
    let stats = console.show("SHOW STATS").await;
    let app = stats
        .iter()
        .find(|r| r["database"] == "app")
        .expect("app's row");
    let assigned: i64 = app["total_server_assignment_count"].parse().unwrap();
    // the pool's own setup takes a few
    assert!(
        assigned < QUERIES + 10,
        "{assigned} server assignments for {QUERIES} queries"
    );
}

/// `persistent(false)`: sqlx parses and describes the unnamed statement in one unit and binds
/// it in the next. Before pgmux kept each client's unnamed Parse, that Bind ran on whichever
/// server pgmux lent, whose unnamed statement was another client's (a wrong answer,
/// silently) or none (`26000`); with replicas it failed every time, the Parse going to a
/// replica and the Bind to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements() {
    let t = Target::alone();
    unnamed_statements_on(&t.pool("app", 100).await)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_through_replicas() {
    let t = Target::split();
    unnamed_statements_on(&t.pool("app", 100).await)
        .await
        .unwrap();
    assert_replicas_served(&t).await;
}

/// The same check straight to PostgreSQL, without pgmux: the check itself is sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_straight_to_postgres() {
    let port = PgCluster::shared().primary().port;
    unnamed_statements_on(&pool_on(port, "app", 100).await)
        .await
        .unwrap();
}

/// `persistent(false)`: sqlx Parses and Describes the unnamed statement and Syncs, then, in a
/// second round trip, Binds and Executes it. Each task's statement text is its own, so a Bind
/// that ran another client's unnamed statement would show in the values.
async fn unnamed_statements_on(pool: &PgPool) -> Result<()> {
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let sql = format!("SELECT $1::int8 + {i}, $2::text");
            for j in 0..20i64 {
                let row = sqlx::query(&sql)
                    .persistent(false)
                    .bind(j)
                    .bind(format!("u{i}"))
                    .fetch_one(&pool)
                    .await
                    .with_context(|| format!("query {j}"))?;
                let got: (i64, String) = (row.get(0), row.get(1));
                ensure!(
                    got == (j + i, format!("u{i}")),
                    "{sql} with {j} gave {got:?}"
                );
            }
            // in a transaction the server is the client's between the two round trips
            let mut tx = pool.begin().await?;
            let v: i64 = sqlx::query(&sql)
                .persistent(false)
                .bind(5i64)
                .bind("x")
                .fetch_one(&mut *tx)
                .await?
                .get(0);
            ensure!(v == 5 + i);
            tx.commit().await?;
            Ok(())
        }
    })
    .await
}

both_topologies!(
    multi_statement_simple_queries,
    multi_statement_simple_queries_through_replicas,
    multi_statement_simple_queries_on,
    no_replica_check
);

/// `raw_sql` and `execute(&str)` send a simple Query; several statements in one are one
/// implicit transaction, so an error in the middle undoes the statements before it.
async fn multi_statement_simple_queries_on(t: &Target) -> Result<()> {
    t.setup(
        "DROP TABLE IF EXISTS sqlx_multi; CREATE TABLE sqlx_multi (task int, k int); \
         ALTER TABLE sqlx_multi OWNER TO app",
    );
    let pool = t.pool("app", 100).await;
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await?;
            let done = simple(
                &mut conn,
                &format!(
                    "INSERT INTO sqlx_multi VALUES ({i}, 1); \
                         INSERT INTO sqlx_multi VALUES ({i}, 2), ({i}, 3); \
                     UPDATE sqlx_multi SET k = k + 10 WHERE task = {i} AND k = 1"
                ),
            )
            .await?;
            ensure!(done.rows_affected() == 4, "{done:?}");

            // rows from each statement that returns some, in order
            let sql = format!(
                "SELECT k FROM sqlx_multi WHERE task = {i} ORDER BY k; SELECT -1; \
                 SELECT count(*)::int4 FROM sqlx_multi WHERE task = {i}"
            );
            let rows = sqlx::raw_sql(&sql).fetch_all(&mut *conn).await?;
            let got: Vec<i32> = rows.iter().map(|r| r.get::<i32, _>(0)).collect();
            ensure!(got == vec![2, 3, 11, -1, 3], "{got:?}");

            let sql = format!(
                "INSERT INTO sqlx_multi VALUES ({i}, 100); SELECT 1 / 0; \
                 INSERT INTO sqlx_multi VALUES ({i}, 101)"
            );
            let code = sqlstate(sqlx::raw_sql(&sql).execute(&mut *conn).await);
            ensure!(code == "22012", "{code}");
            let sql = format!("SELECT count(*) FROM sqlx_multi WHERE task = {i}; SELECT 'after'");
            let rows = sqlx::raw_sql(&sql).fetch_all(&mut *conn).await?;
            ensure!(rows.len() == 2);
            ensure!(rows[0].get::<i64, _>(0) == 3, "the failed batch left rows");
            ensure!(rows[1].get::<String, _>(0) == "after");

            // a transaction block opened by one simple query and closed by another
            simple(
                &mut conn,
                &format!("BEGIN; INSERT INTO sqlx_multi VALUES ({i}, 200)"),
            )
            .await?;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlx_multi WHERE task = $1")
                .bind(i as i32)
                .fetch_one(&mut *conn)
                .await?;
            ensure!(n == 4);
            simple(&mut conn, "ROLLBACK; SELECT 1").await?;
            Ok(())
        }
    })
    .await?;
    let n = t.on_primary("SELECT count(*) FROM sqlx_multi");
    ensure!(n == (TASKS * 3).to_string(), "{n} rows on the primary");
    Ok(())
}

/// `Executor::execute` of a string: sqlx sends it as a simple Query.
async fn simple(conn: &mut PgConnection, sql: &str) -> Result<PgQueryResult, sqlx::Error> {
    conn.execute(sql).await
}

both_topologies!(
    streams_dropped_halfway,
    streams_dropped_halfway_through_replicas,
    streams_dropped_halfway_on
);

const STREAM_ROWS: i32 = 5000;

/// A stream dropped halfway leaves the rest of the answer unread: sqlx reads it up to
/// ReadyForQuery before the connection's next query, and pings (a lone Sync) on release.
async fn streams_dropped_halfway_on(t: &Target) -> Result<()> {
    let pool = t.pool("app", 100).await;
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await?;
            {
                let mut rows =
                    sqlx::query("SELECT g, repeat('x', 100) FROM generate_series(1, $1::int4) g")
                        .bind(STREAM_ROWS)
                        .fetch(&mut *conn);
                for k in 1..=100 {
                    let row = rows.try_next().await?.context("stream ended early")?;
                    ensure!(row.get::<i32, _>(0) == k);
                }
            }
            let v: i64 = sqlx::query_scalar("SELECT $1::int8 + 1")
                .bind(i)
                .fetch_one(&mut *conn)
                .await?;
            ensure!(v == i + 1, "after a dropped stream: {v}");

            // the same with a simple query of two statements
            {
                let mut rows = sqlx::raw_sql(
                    "SELECT g FROM generate_series(1, 5000) g; SELECT 'second'::text",
                )
                .fetch(&mut *conn);
                for k in 1..=10 {
                    let row = rows.try_next().await?.context("stream ended early")?;
                    ensure!(row.get::<i32, _>(0) == k);
                }
            }
            let s: String = sqlx::query_scalar("SELECT $1::text")
                .bind(format!("t{i}"))
                .fetch_one(&mut *conn)
                .await?;
            ensure!(s == format!("t{i}"));
            drop(conn);

            // dropped while the pool holds the connection: the release ping drains it
            {
                let mut rows = sqlx::query("SELECT g FROM generate_series(1, $1::int4) g")
                    .bind(STREAM_ROWS)
                    .fetch(&pool);
                ensure!(rows.try_next().await?.context("no row")?.get::<i32, _>(0) == 1);
            }
            // and streams read to the end
            let (n, sum) = sqlx::query("SELECT g FROM generate_series(1, $1::int4) g")
                .bind(STREAM_ROWS)
                .fetch(&pool)
                .try_fold((0i64, 0i64), |(n, sum), row| async move {
                    Ok((n + 1, sum + row.get::<i32, _>(0) as i64))
                })
                .await?;
            let rows = STREAM_ROWS as i64;
            ensure!(
                n == rows && sum == rows * (rows + 1) / 2,
                "{n} rows, sum {sum}"
            );
            Ok(())
        }
    })
    .await
}

both_topologies!(
    transactions_and_savepoints,
    transactions_and_savepoints_through_replicas,
    transactions_and_savepoints_on,
    no_replica_check
);

/// Each task writes keys 1..=10 in transactions that commit, roll back, are dropped, fail, and
/// nest savepoints; exactly the committed keys remain.
async fn transactions_and_savepoints_on(t: &Target) -> Result<()> {
    t.setup(
        "DROP TABLE IF EXISTS sqlx_tx; CREATE TABLE sqlx_tx (task int8, k int4); \
         ALTER TABLE sqlx_tx OWNER TO app",
    );
    let pool = t.pool("app", 100).await;
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            tx_insert(&mut tx, i, 1).await?;
            tx_insert(&mut tx, i, 2).await?;
            ensure!(tx_count(&mut tx, i).await? == 2);
            tx.commit().await?;

            let mut tx = pool.begin().await?;
            tx_insert(&mut tx, i, 3).await?;
            tx.rollback().await?;

            {
                // dropped: sqlx queues a ROLLBACK, sent when the pool takes the connection back
                let mut tx = pool.begin().await?;
                tx_insert(&mut tx, i, 4).await?;
            }

            let mut tx = pool.begin().await?;
            tx_insert(&mut tx, i, 5).await?;
            let code = sqlstate(
                sqlx::query("SELECT 1 / $1::int4")
                    .bind(0)
                    .fetch_one(&mut *tx)
                    .await,
            );
            ensure!(code == "22012", "{code}");
            let code = sqlstate(tx_count(&mut tx, i).await);
            ensure!(code == "25P02", "in the failed transaction: {code}");
            tx.rollback().await?;

            let mut tx = pool.begin().await?;
            tx_insert(&mut tx, i, 6).await?;
            {
                let mut sp = tx.begin().await?;
                tx_insert(&mut sp, i, 7).await?;
                sp.commit().await?;
            }
            {
                let mut sp = tx.begin().await?;
                tx_insert(&mut sp, i, 8).await?;
                sp.rollback().await?;
            }
            {
                // an error inside a savepoint: rolling back to it saves the transaction
                let mut sp = tx.begin().await?;
                tx_insert(&mut sp, i, 9).await?;
                let code = sqlstate(sqlx::raw_sql("SELECT 1/0").execute(&mut *sp).await);
                ensure!(code == "22012", "{code}");
                sp.rollback().await?;
            }
            {
                let mut sp = tx.begin().await?;
                {
                    let mut inner = sp.begin().await?;
                    tx_insert(&mut inner, i, 10).await?;
                    inner.commit().await?;
                }
                sp.commit().await?;
            }
            ensure!(tx_count(&mut tx, i).await? == 5);
            tx.commit().await?;

            // read back in a transaction: on the primary whatever the topology
            let mut tx = pool.begin().await?;
            let keys: Vec<i32> =
                sqlx::query_scalar("SELECT k FROM sqlx_tx WHERE task = $1 ORDER BY k")
                    .bind(i)
                    .fetch_all(&mut *tx)
                    .await?;
            tx.commit().await?;
            ensure!(keys == vec![1, 2, 6, 7, 10], "{keys:?}");
            Ok(())
        }
    })
    .await?;
    let n = t.on_primary("SELECT count(*) FROM sqlx_tx");
    ensure!(n == (TASKS * 5).to_string(), "{n} rows on the primary");
    Ok(())
}

async fn tx_insert(conn: &mut PgConnection, i: i64, k: i32) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO sqlx_tx VALUES ($1, $2)")
        .bind(i)
        .bind(k)
        .execute(conn)
        .await
        .map(drop)
}

/// Rows of task `i` in sqlx_tx, as the transaction sees them.
async fn tx_count(tx: &mut PgConnection, i: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM sqlx_tx WHERE task = $1")
        .bind(i)
        .fetch_one(tx)
        .await
}

both_topologies!(
    copy_in_and_out,
    copy_in_and_out_through_replicas,
    copy_in_and_out_on,
    no_replica_check
);

/// `copy_in_raw` (COPY FROM STDIN in chunks, also aborted and refused) and `copy_out_raw`.
async fn copy_in_and_out_on(t: &Target) -> Result<()> {
    t.setup(
        "DROP TABLE IF EXISTS sqlx_copy; CREATE TABLE sqlx_copy (task int8, k int4, s text); \
         ALTER TABLE sqlx_copy OWNER TO app",
    );
    const ROWS: i64 = 500;
    let pool = t.pool("app", 100).await;
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await?;
            let data: String = (0..ROWS).map(|k| format!("{i}\t{k}\tline {k}\n")).collect();
            let mut copy = conn
                .copy_in_raw("COPY sqlx_copy (task, k, s) FROM STDIN")
                .await?;
            for chunk in data.as_bytes().chunks(1000) {
                copy.send(chunk).await?;
            }
            ensure!(copy.finish().await? == ROWS as u64);

            // aborted by the client: nothing lands
            let mut copy = conn
                .copy_in_raw("COPY sqlx_copy (task, k, s) FROM STDIN")
                .await?;
            copy.send(format!("{i}\t-1\taborted\n").as_bytes()).await?;
            copy.abort("changed my mind").await?;

            // refused by the server (a bad integer): nothing lands
            let mut copy = conn
                .copy_in_raw("COPY sqlx_copy (task, k, s) FROM STDIN")
                .await?;
            copy.send(format!("{i}\t-2\tfine\n{i}\tnope\tbad\n").as_bytes())
                .await?;
            let code = sqlstate(copy.finish().await);
            ensure!(code == "22P02", "{code}");

            let (n, sum): (i64, i64) =
                sqlx::query_as("SELECT count(*), sum(k) FROM sqlx_copy WHERE task = $1")
                    .bind(i)
                    .fetch_one(&mut *conn)
                    .await?;
            ensure!(
                n == ROWS && sum == ROWS * (ROWS - 1) / 2,
                "{n} rows, sum {sum}"
            );

            let out: Vec<u8> = conn
                .copy_out_raw(&format!(
                    "COPY (SELECT task, k, s FROM sqlx_copy WHERE task = {i} ORDER BY k) TO STDOUT"
                ))
                .await?
                .try_fold(Vec::new(), |mut all, chunk| async move {
                    all.extend_from_slice(&chunk);
                    Ok(all)
                })
                .await?;
            ensure!(
                out == data.as_bytes(),
                "COPY TO STDOUT gave {} bytes",
                out.len()
            );
            Ok(())
        }
    })
    .await?;
    let n = t.on_primary("SELECT count(*) FROM sqlx_copy");
    ensure!(n == (TASKS * ROWS).to_string(), "{n} rows on the primary");
    Ok(())
}

both_topologies!(
    errors_leave_connections_usable,
    errors_leave_connections_usable_through_replicas,
    errors_leave_connections_usable_on
);

/// Errors at Parse (syntax, unknown table), at Execute (division by zero, a bad cast, a
/// unique violation) and in a simple query: each reaches sqlx with its SQLSTATE and the same
/// connection goes on.
async fn errors_leave_connections_usable_on(t: &Target) -> Result<()> {
    t.setup(
        "DROP TABLE IF EXISTS sqlx_uniq; CREATE TABLE sqlx_uniq (k int8 PRIMARY KEY); \
         ALTER TABLE sqlx_uniq OWNER TO app",
    );
    let pool = t.pool("app", 100).await;
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await?;
            for round in 0..3i64 {
                let code = sqlstate(
                    sqlx::query("SELECT 1 / $1::int4")
                        .bind(0)
                        .fetch_one(&mut *conn)
                        .await,
                );
                ensure!(code == "22012", "{code}");
                ensure!(plus_one(&mut conn, i).await? == i + 1);

                let code = sqlstate(
                    sqlx::query("SELEC $1::int4")
                        .bind(1)
                        .fetch_one(&mut *conn)
                        .await,
                );
                ensure!(code == "42601", "{code}");
                let code = sqlstate(
                    sqlx::query("SELECT * FROM sqlx_no_such_table")
                        .fetch_all(&mut *conn)
                        .await,
                );
                ensure!(code == "42P01", "{code}");
                ensure!(plus_one(&mut conn, round).await? == round + 1);

                let code = sqlstate(
                    sqlx::query("SELECT $1::text::int4")
                        .bind("x")
                        .fetch_one(&mut *conn)
                        .await,
                );
                ensure!(code == "22P02", "{code}");

                let key = i * 10 + round;
                sqlx::query("INSERT INTO sqlx_uniq VALUES ($1)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
                let code = sqlstate(
                    sqlx::query("INSERT INTO sqlx_uniq VALUES ($1)")
                        .bind(key)
                        .execute(&mut *conn)
                        .await,
                );
                ensure!(code == "23505", "{code}");

                let code = sqlstate(
                    sqlx::raw_sql("SELECT 1; SELECT 1/0")
                        .execute(&mut *conn)
                        .await,
                );
                ensure!(code == "22012", "{code}");
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlx_uniq WHERE k / 10 = $1")
                    .bind(i)
                    .fetch_one(&mut *conn)
                    .await?;
                ensure!(n == round + 1, "{n} keys");
            }
            Ok(())
        }
    })
    .await?;
    let n = t.on_primary("SELECT count(*) FROM sqlx_uniq");
    ensure!(n == (TASKS * 3).to_string(), "{n} rows on the primary");
    Ok(())
}

async fn plus_one(conn: &mut PgConnection, v: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT $1::int8 + 1")
        .bind(v)
        .fetch_one(conn)
        .await
}

both_topologies!(
    settings_follow_each_connection,
    settings_follow_each_connection_through_replicas,
    settings_follow_each_connection_on,
    no_replica_check
);

/// Two pools share pgmux's 3 servers: one whose connections set `application_name` and a
/// `statement_timeout` in their startup packet, one whose connections `SET` theirs in
/// `after_connect`. Every query, on whichever server, sees its own connection's settings and
/// sqlx's startup ones (`TimeZone` UTC, `DateStyle` ISO).
async fn settings_follow_each_connection_on(t: &Target) -> Result<()> {
    let started = pool_options()
        .connect_with(
            connect_options(t.px.port, "app")
                .application_name("sqlx_started")
                .options([("statement_timeout", "1234ms")]),
        )
        .await?;
    let set = pool_options()
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET application_name = 'sqlx_set'; SET statement_timeout = '4321ms'")
                    .await
                    .map(drop)
            })
        })
        .connect_with(connect_options(t.px.port, "app"))
        .await?;
    // reads on a replica, where there are any: a server lent to the other pool's
    // connections in between must be brought back to this one's settings
    let on_replicas = &AtomicU32::new(0);
    in_tasks(|i| {
        let (pool, want) = if i % 2 == 0 {
            (started.clone(), ("sqlx_started", "1234ms"))
        } else {
            (set.clone(), ("sqlx_set", "4321ms"))
        };
        async move {
            for _ in 0..10 {
                let row = sqlx::query(
                    "SELECT current_setting('application_name'), \
                     current_setting('statement_timeout'), current_setting('TimeZone'), \
                     current_setting('DateStyle'), pg_is_in_recovery()",
                )
                .fetch_one(&pool)
                .await?;
                if row.get::<bool, _>(4) {
                    on_replicas.fetch_add(1, Ordering::Relaxed);
                }
                let got: (String, String, String, String) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let want = (
                    want.0.into(),
                    want.1.into(),
                    "UTC".into(),
                    "ISO, MDY".into(),
                );
                ensure!(got == want, "settings {got:?}, wanted {want:?}");
            }
            Ok(())
        }
    })
    .await?;
    let on_replicas = on_replicas.load(Ordering::Relaxed);
    ensure!(
        t.cluster.replicas().is_empty() || on_replicas > 0,
        "no read reached a replica"
    );
    Ok(())
}

/// A Postgres enum that sqlx knows only by name: binding it makes sqlx ask for its OID
/// (`SELECT $1::regtype::oid`), and a column of it makes sqlx read `pg_type` and `pg_enum`,
/// each a query of its own in the middle of the user's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mood {
    Sad,
    Ok,
    Happy,
}

impl Mood {
    fn label(self) -> &'static str {
        match self {
            Mood::Sad => "sad",
            Mood::Ok => "ok",
            Mood::Happy => "happy",
        }
    }
}

impl sqlx::Type<Postgres> for Mood {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("sqlx_mood")
    }
}

impl Encode<'_, Postgres> for Mood {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <&str as Encode<Postgres>>::encode_by_ref(&self.label(), buf)
    }
}

impl<'r> Decode<'r, Postgres> for Mood {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match <&str as Decode<Postgres>>::decode(value)? {
            "sad" => Ok(Mood::Sad),
            "ok" => Ok(Mood::Ok),
            "happy" => Ok(Mood::Happy),
            other => Err(format!("not a mood: {other}").into()),
        }
    }
}

both_topologies!(
    a_custom_type_from_pg_type,
    a_custom_type_from_pg_type_through_replicas,
    a_custom_type_from_pg_type_on
);

async fn a_custom_type_from_pg_type_on(t: &Target) -> Result<()> {
    t.setup(
        "DROP TABLE IF EXISTS sqlx_moods; DROP TYPE IF EXISTS sqlx_mood; \
         CREATE TYPE sqlx_mood AS ENUM ('sad', 'ok', 'happy'); ALTER TYPE sqlx_mood OWNER TO app; \
         CREATE TABLE sqlx_moods (task int8, m sqlx_mood); ALTER TABLE sqlx_moods OWNER TO app",
    );
    let pool = t.pool("app", 100).await;
    in_tasks(move |i| {
        let pool = pool.clone();
        async move {
            let moods = [Mood::Sad, Mood::Ok, Mood::Happy];
            let mut conn = pool.acquire().await?;
            for (j, m) in moods.iter().enumerate() {
                let row = sqlx::query("SELECT $1 AS m, 'happy'::sqlx_mood AS h, $1 > 'sad' AS gt")
                    .bind(*m)
                    .fetch_one(&mut *conn)
                    .await?;
                ensure!(row.get::<Mood, _>("m") == *m);
                ensure!(row.get::<Mood, _>("h") == Mood::Happy);
                ensure!(row.get::<bool, _>("gt") == (j > 0));
                sqlx::query("INSERT INTO sqlx_moods VALUES ($1, $2)")
                    .bind(i)
                    .bind(*m)
                    .execute(&mut *conn)
                    .await?;
            }
            let got: Vec<Mood> =
                sqlx::query_scalar("SELECT m FROM sqlx_moods WHERE task = $1 ORDER BY m DESC")
                    .bind(i)
                    .fetch_all(&mut *conn)
                    .await?;
            ensure!(got == vec![Mood::Happy, Mood::Ok, Mood::Sad], "{got:?}");
            Ok(())
        }
    })
    .await
}

both_topologies!(
    listen_notify_in_session_mode,
    listen_notify_in_session_mode_through_replicas,
    listen_notify_in_session_mode_on,
    no_replica_check
);

/// `PgListener` keeps its connection for LISTEN: through the session-mode database, and
/// through the transaction-mode one, where LISTEN pins the client to its server. Notifications
/// come from other connections through the transaction-mode database, by NOTIFY (simple query)
/// and pg_notify (a named statement).
async fn listen_notify_in_session_mode_on(t: &Target) -> Result<()> {
    let notifier = t.pool("app", 100).await;
    for db in ["app_session", "app"] {
        let channel = format!("sqlx_chan_{db}");
        let listening = pool_on(t.px.port, db, 100).await;
        let mut listener = PgListener::connect_with(&listening).await?;
        listener.listen(&channel).await?;
        for k in 0..5 {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(format!("n{k}"))
                .execute(&notifier)
                .await?;
        }
        sqlx::raw_sql(&format!("NOTIFY {channel}, 'simple'"))
            .execute(&notifier)
            .await?;
        // the listener's connection also answers queries between notifications
        let v: i32 = sqlx::query_scalar("SELECT $1::int4 * 2")
            .bind(21)
            .fetch_one(&mut listener)
            .await?;
        ensure!(v == 42);
        for want in ["n0", "n1", "n2", "n3", "n4", "simple"] {
            let n = tokio::time::timeout(Duration::from_secs(30), listener.recv())
                .await
                .with_context(|| format!("{db}: no notification {want}"))??;
            ensure!(n.channel() == channel, "{db}: {n:?}");
            if n.payload() != want {
                bail!("{db}: got {:?}, wanted {want}", n.payload());
            }
        }
        listener.unlisten(&channel).await?;
    }
    Ok(())
}
