//! Real drivers in other languages through pgmux in transaction mode with a small pool, many
//! clients each, so statements really move between servers: psycopg 3 (prepare thresholds 0,
//! 5 and none with a small prepared_max, executemany, pipeline mode with errors, server-side
//! and binary cursors, COPY, savepoints, cancels, notices, AsyncConnection, psycopg_pool),
//! asyncpg (small and no statement caches, prepare, cursors, COPY helpers, isolation levels,
//! type codecs and introspection, timeouts, its pool's reset), node-postgres (named queries),
//! pgjdbc (every prepareThreshold and preferQueryMode, an evicting statement cache, batches,
//! fetch sizes, savepoints and autosave, isolation levels, read-only sessions, COPY, cancels,
//! startup settings, short-lived connections), PHP's PDO (server-side prepares, deallocated
//! with SQL), Go's pgx v4 (its prepare and describe caches, no cache, simple protocol,
//! batches, COPY). Each script checks results, not only the absence of errors. Each runs
//! twice: against a primary alone, and with reads split off to two streaming replicas.
//! Their error paths too: COPYs refused early in a large stream or given up by the client,
//! batches, pipelines and executemany failing in the middle, cancels and statement_timeout
//! on reads and COPY TO, connections closed in the middle of a statement; after the pgx,
//! psycopg, asyncpg and pgjdbc scripts every server is back in the pool and nothing they
//! abandoned still runs (`assert_nothing_left`). asyncpg clients cancelling short sleeps that
//! wait in batches with others' `SELECT 1`: no bystander is ever cancelled.
//! LISTEN/NOTIFY (asyncpg, psycopg) runs through pgmux in session mode.
//! `.ci/run` installs the drivers; tests/drivers/ holds the scripts.

mod common;

use common::probe::Console;
use common::{wait_until, PgCluster, Pgmux};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CLIENTS: &str = "20";

/// A deadline for waits on a condition; never reached when all is well.
const WAIT: Duration = Duration::from_secs(60);

fn start() -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&config(pg.primary().port, ""))
}

/// pgmux in front of a primary with two streaming replicas, reads split off to them: the
/// same scripts, their statements now moving between servers of different kinds as well.
fn start_split() -> Pgmux {
    let cluster = PgCluster::shared_with_replicas();
    Pgmux::start(&config(cluster.primary().port, &cluster.split_settings()))
}

/// The reads of a `start_split` pgmux reached the replicas: its pooled connections to them
/// are still open (server_idle_timeout is long); the host monitor's, which also log in as
/// app, last ran its check.
fn assert_replicas_served() {
    let cluster = PgCluster::shared_with_replicas();
    let backends: u32 = cluster
        .replicas()
        .iter()
        .map(|r| {
            r.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app' \
                 AND query NOT LIKE '%pg_is_in_recovery%'",
            )
            .parse::<u32>()
            .unwrap()
        })
        .sum();
    assert!(backends > 0, "no connection of app's on a replica");
}

/// A driver's test against a primary alone (`start`) and against one with replicas
/// (`start_split`), where its reads must reach the replicas.
macro_rules! both_topologies {
    ($alone:ident, $split:ident, $check:ident) => {
        #[test]
        fn $alone() {
            $check(&start(), PgCluster::shared());
        }

        #[test]
        fn $split() {
            let px = start_split();
            $check(&px, PgCluster::shared_with_replicas());
            assert_replicas_served();
        }
    };
}

fn config(port: u16, database_extra: &str) -> String {
    format!(
        "[pgmux]\nlisten_port = {{port}}\npool_mode = \"transaction\"\ndefault_pool_size = 3\nauth_type = \"scram-sha-256\"\n\
         admin_users = [\"admin\"]\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\
         [[users]]\nname = \"admin\"\npassword = \"secret\"\n\
         [[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {port}\n{database_extra}"
    )
}

/// After a driver has gone, having abandoned statements (closed its connection in the middle
/// of one, or timed one out): every server it was lent is back in the pool, none left with a
/// session that lost its client, and nothing it marked with `marker` still runs on a server
/// (pgmux cancelled what its client left behind).
fn assert_nothing_left(px: &Pgmux, cluster: &PgCluster, marker: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let console = Console::connect(px, "admin", Some("secret")).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let pools = console.show("SHOW POOLS").await;
            let app: Vec<_> = pools.iter().filter(|r| r["database"] == "app").collect();
            let back = app.iter().all(|r| {
                r["sv_active"] == "0" && r["cl_active"] == "0" && r["cl_waiting"] == "0"
            });
            if !app.is_empty() && back {
                break;
            }
            if Instant::now() > deadline {
                let busy: Vec<String> = std::iter::once(cluster.primary())
                    .chain(cluster.replicas())
                    .map(|s| {
                        s.psql(
                            "postgres",
                            "SELECT string_agg(pid || ' ' || state || ' ' || coalesce(wait_event, '') \
                             || ' ' || left(query, 120), ' | ') FROM pg_stat_activity \
                             WHERE usename = 'app' AND state <> 'idle'",
                        )
                    })
                    .collect();
                let servers = console.show("SHOW SERVERS").await;
                let lent: Vec<_> = servers.iter().filter(|r| !r["link"].is_empty()).collect();
                panic!("servers not back in the pool: {app:?}\nlent: {lent:?}\nbusy: {busy:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
         AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    for server in std::iter::once(cluster.primary()).chain(cluster.replicas()) {
        wait_until("no abandoned statement running", WAIT, || {
            server.psql("postgres", &running) == "0"
        });
    }
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Runs a driver script to its end (bounded), asserting success and its closing line.
fn run(mut cmd: Command, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .current_dir(drivers_dir())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (run .ci/run's install step)"));
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{cmd:?} did not finish: {}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "{cmd:?} failed:\n{text}");
    assert!(text.contains(expect), "{text}");
}

/// psycopg_check.py's tables.
const PSYCOPG_SCHEMA: &str = "DROP TABLE IF EXISTS py_psy_items, py_psy_copy, py_psy_uniq; \
    CREATE TABLE py_psy_items (c int, k int, v text, PRIMARY KEY (c, k)); \
    CREATE TABLE py_psy_copy (c int, k int, t text, b bytea); \
    CREATE TABLE py_psy_uniq (id int PRIMARY KEY)";

#[test]
fn psycopg3_prepares_pipelines_copies_and_cancels() {
    psycopg3_on(&start(), PgCluster::shared(), "alone");
}

#[test]
fn psycopg3_prepares_pipelines_copies_and_cancels_through_replicas() {
    let px = start_split();
    psycopg3_on(&px, PgCluster::shared_with_replicas(), "split");
    assert_replicas_served();
}

fn psycopg3_on(px: &Pgmux, cluster: &PgCluster, topology: &str) {
    python_schema(cluster, PSYCOPG_SCHEMA);
    let mut cmd = Command::new("python3");
    cmd.arg("psycopg_check.py")
        .arg(px.conn_str("app", "app", Some("secret")))
        .args([CLIENTS, topology]);
    run(cmd, "clients ok");
    assert_nothing_left(px, cluster, "psycopg_check_abandoned");
}

/// asyncpg_check.py's tables and types.
const ASYNCPG_SCHEMA: &str = "DROP TABLE IF EXISTS py_apg_items, py_apg_copy, py_apg_uniq; \
    DROP TYPE IF EXISTS py_apg_mood, py_apg_pair; \
    CREATE TABLE py_apg_items (c int, k int, v text, PRIMARY KEY (c, k)); \
    CREATE TABLE py_apg_copy (c int, k int, t text); \
    CREATE TABLE py_apg_uniq (id int PRIMARY KEY); \
    CREATE TYPE py_apg_mood AS ENUM ('sad', 'ok', 'happy'); \
    CREATE TYPE py_apg_pair AS (a int, b text)";

#[test]
fn asyncpg_caches_cursors_copies_and_pools() {
    asyncpg_on(&start(), PgCluster::shared(), "alone");
}

#[test]
fn asyncpg_caches_cursors_copies_and_pools_through_replicas() {
    let px = start_split();
    asyncpg_on(&px, PgCluster::shared_with_replicas(), "split");
    assert_replicas_served();
}

fn asyncpg_on(px: &Pgmux, cluster: &PgCluster, topology: &str) {
    python_schema(cluster, ASYNCPG_SCHEMA);
    run_asyncpg("asyncpg_check.py", px, topology);
    assert_nothing_left(px, cluster, "apg_abandoned");
}

/// Runs `sql` as app on `cluster`'s primary (the objects it creates are app's) and waits
/// until every replica has it: a script's first read may reach either.
fn python_schema(cluster: &PgCluster, sql: &str) {
    cluster
        .primary()
        .psql("app", &format!("SET ROLE app; {sql}"));
    cluster.wait_replicas_caught_up();
}

/// LISTEN/NOTIFY with asyncpg and psycopg 3, through pgmux in session mode, where listeners
/// belong (in transaction mode a LISTEN pins its client to its server).
#[test]
fn python_listen_notify_in_session_mode() {
    let pg = PgCluster::shared();
    let session = config(pg.primary().port, "")
        .replace("pool_mode = \"transaction\"", "pool_mode = \"session\"")
        .replace("default_pool_size = 3", "default_pool_size = 6");
    let px = Pgmux::start(&session);
    // four listeners and a notifier, each holding one of the 6 servers for its session
    run_python("python_listen_check.py", &px, &["4"]);
}

/// An asyncpg script, given HOST PORT USER PASSWORD DATABASE CLIENTS TOPOLOGY (`alone` or
/// `split`).
fn run_asyncpg(script: &str, px: &Pgmux, topology: &str) {
    run_python(script, px, &[CLIENTS, topology]);
}

/// A Python script given HOST PORT USER PASSWORD DATABASE (app's, through `px`) and `rest`,
/// run to its end, which must say "clients ok".
fn run_python(script: &str, px: &Pgmux, rest: &[&str]) {
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["127.0.0.1", &px.port.to_string(), "app", "secret", "app"])
        .args(rest);
    run(cmd, "clients ok");
}

/// Cancels among batches: asyncpg clients time out short sleeps (a CancelRequest each, some
/// reaching the server as the query ends and the next of its batch runs) while others run
/// `SELECT 1`, which must never be cancelled (tests/drivers/asyncpg_cancel_storm.py). Then
/// every server is back, none still running a sleep.
#[test]
fn asyncpg_cancels_reach_no_bystander_in_a_batch() {
    let pg = PgCluster::shared();
    let px = Pgmux::start(&config(pg.primary().port, ""));
    run_python("asyncpg_cancel_storm.py", &px, &["10"]);
    assert_nothing_left(&px, pg, "pg_sleep(0.02)");
}

/// asyncpg's `copy_records_to_table` prepares a `SELECT` of the table (a read, so a
/// replica's) and then sends its `COPY` as a Query: through a database with replicas the
/// COPY must still reach the primary.
#[test]
fn asyncpg_copy_through_replicas() {
    fresh_table("asyncpg_copy", "c int, r int, k int");
    run_asyncpg("asyncpg_copy_check.py", &start_split(), "split");
}

/// psycopg's pipeline mode fetches a read's result (a Flush) before it sends the write
/// behind it, in the same unit: the write must still reach the primary.
#[test]
fn psycopg3_pipeline_writes_through_replicas() {
    fresh_table("psycopg_rw", "c int, n int");
    let px = start_split();
    let mut cmd = Command::new("python3");
    cmd.arg("psycopg_pipeline_rw.py")
        .arg(px.conn_str("app", "app", Some("secret")))
        .arg(CLIENTS);
    run(cmd, "clients ok");
}

/// An empty table of app's on the primary, there on every replica by the time this returns
/// (a driver's read of it may reach either).
fn fresh_table(name: &str, columns: &str) {
    let cluster = PgCluster::shared_with_replicas();
    cluster.primary().psql(
        "app",
        &format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns}); \
             ALTER TABLE {name} OWNER TO app"
        ),
    );
    for r in cluster.replicas() {
        common::wait_until("the table on the replica", Duration::from_secs(60), || {
            r.try_psql("app", &format!("SELECT 1 FROM {name}")).is_ok()
        });
    }
}

both_topologies!(
    node_postgres_named_queries,
    node_postgres_named_queries_through_replicas,
    node_postgres_named_queries_on
);

fn node_postgres_named_queries_on(px: &Pgmux, _cluster: &PgCluster) {
    let mut cmd = Command::new("node");
    cmd.arg("node_pg_check.js")
        .arg(format!("postgresql://app:secret@127.0.0.1:{}/app", px.port))
        .arg(CLIENTS);
    run(cmd, "clients ok");
}

#[test]
fn pgjdbc_query_modes_batches_cursors_copy_and_cancels() {
    pgjdbc_tables(PgCluster::shared());
    let px = start();
    pgjdbc_check(&px, "alone");
    assert_nothing_left(&px, PgCluster::shared(), "jdbc_check_abandoned");
}

#[test]
fn pgjdbc_query_modes_batches_cursors_copy_and_cancels_through_replicas() {
    pgjdbc_tables(PgCluster::shared_with_replicas());
    let px = start_split();
    pgjdbc_check(&px, "split");
    assert_nothing_left(
        &px,
        PgCluster::shared_with_replicas(),
        "jdbc_check_abandoned",
    );
    assert_replicas_served();
}

/// tests/drivers/JdbcCheck.java; `topology` tells it whether read-only transactions must run
/// on a replica.
fn pgjdbc_check(px: &Pgmux, topology: &str) {
    let mut cmd = Command::new("java");
    cmd.args(["-cp", "/usr/share/java/postgresql.jar", "JdbcCheck.java"])
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/app?user=app&password=secret",
            px.port
        ))
        .args([CLIENTS, topology]);
    run(cmd, "clients ok");
}

/// JdbcCheck.java's tables, empty, on the primary and (its reads may reach them) on every
/// replica by the time this returns.
fn pgjdbc_tables(cluster: &PgCluster) {
    cluster.primary().psql(
        "app",
        "DROP TABLE IF EXISTS jdbc_items, jdbc_types, jdbc_keys, jdbc_copy, jdbc_where; \
         DROP SCHEMA IF EXISTS jdbc_s CASCADE; \
         CREATE TABLE jdbc_items (c int, k int, v text, PRIMARY KEY (c, k)); \
         CREATE TABLE jdbc_types (id serial PRIMARY KEY, c int, n numeric, ts timestamptz, \
           b bytea, ia int[], ta text[], j json, jb jsonb, u uuid, f float8); \
         CREATE TABLE jdbc_keys (id bigserial PRIMARY KEY, c int, v text); \
         CREATE TABLE jdbc_copy (c int, n int, s text NOT NULL); \
         CREATE TABLE jdbc_where (s text); INSERT INTO jdbc_where VALUES ('public'); \
         CREATE SCHEMA jdbc_s AUTHORIZATION app; \
         CREATE TABLE jdbc_s.jdbc_where (s text); INSERT INTO jdbc_s.jdbc_where VALUES ('jdbc_s'); \
         ALTER TABLE jdbc_items OWNER TO app; ALTER TABLE jdbc_types OWNER TO app; \
         ALTER TABLE jdbc_keys OWNER TO app; ALTER TABLE jdbc_copy OWNER TO app; \
         ALTER TABLE jdbc_where OWNER TO app; ALTER TABLE jdbc_s.jdbc_where OWNER TO app",
    );
    cluster.wait_replicas_caught_up();
}

both_topologies!(
    php_pdo_deallocates_with_sql,
    php_pdo_deallocates_with_sql_through_replicas,
    php_pdo_deallocates_with_sql_on
);

fn php_pdo_deallocates_with_sql_on(px: &Pgmux, _cluster: &PgCluster) {
    let mut cmd = Command::new("php");
    cmd.arg("pdo_check.php")
        .arg(format!("pgsql:host=127.0.0.1;port={};dbname=app", px.port))
        .args(["app", "secret", CLIENTS]);
    run(cmd, "clients ok");
}

both_topologies!(
    pgx_statement_caches_batches_and_copy,
    pgx_statement_caches_batches_and_copy_through_replicas,
    pgx_statement_caches_batches_and_copy_on
);

fn pgx_statement_caches_batches_and_copy_on(px: &Pgmux, cluster: &PgCluster) {
    let mut cmd = Command::new(pgx_check_binary());
    cmd.arg(px.conn_str("app", "app", Some("secret")))
        .arg(CLIENTS);
    run(cmd, "clients ok");
    assert_nothing_left(px, cluster, "pgx_abandoned");
}

/// tests/drivers/pgx_check.go, built once per run. In GOPATH mode, against the sources of
/// Debian's golang-github-jackc-pgx-v4-dev under /usr/share/gocode: CI cannot reach the Go
/// module proxy, and this build needs nothing from the network.
fn pgx_check_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pgx_check");
        let bin = dir.join("pgx_check");
        let mut go = Command::new("go");
        go.args(["build", "-o"])
            .arg(&bin)
            .arg("pgx_check.go")
            // the caller's Go settings (modules, vendoring, a proxy) must not change the build
            .env("GOENV", "off")
            .env("GOFLAGS", "")
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", dir.join("cache"));
        // go build prints nothing when it succeeds
        run(go, "");
        bin
    })
}
