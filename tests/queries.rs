//! SHOW QUERIES, the slow-statement log and the client span in log lines, against real
//! PostgreSQL: statements run through pgmux with tokio-postgres (simple and extended
//! protocol, transaction and session pooling), read back with psql on the console and from
//! pgmux's log.

mod common;

use common::{wait_until, PgCluster, Pgmux};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

const WAIT: Duration = Duration::from_secs(30);

fn start(dbs: &[(&str, &str)], general: &str) -> Pgmux {
    let pg = PgCluster::shared();
    let mut databases = String::new();
    for (db, mode) in dbs {
        pg.create_database(db, "app");
        databases += &format!(
            "[[databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\npool_mode = \"{mode}\"\n",
            pg.primary().port
        );
    }
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
metrics_listen_port = 0
admin_users = ["admin"]
{general}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "admin"
{databases}"#
    ))
}

async fn connect(px: &Pgmux, db: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(&px.conn_str("app", db, None), NoTls)
        .await
        .expect("connect through pgmux");
    tokio::spawn(conn);
    c
}

/// psql on the console: rows as `|`-separated fields.
fn console(px: &Pgmux, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("psql")
        .args(["-X", "-At", "-F", "|", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(px.conn_str("admin", "pgmux", None))
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect()
}

#[derive(Debug)]
struct Stmt {
    calls: u64,
    total: f64,
    mean: f64,
    max: f64,
    rows: u64,
}

/// SHOW QUERIES of one database, by query text; also checks the rows are sorted by
/// total_time, most first.
fn show_queries(px: &Pgmux, db: &str) -> HashMap<String, Stmt> {
    let rows = console(px, "SHOW QUERIES");
    let totals: Vec<f64> = rows.iter().map(|r| r[4].parse().unwrap()).collect();
    assert!(
        totals.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by total_time: {rows:?}"
    );
    rows.into_iter()
        .filter(|r| r[0] == db && r[1] == "app")
        .map(|r| {
            let s = Stmt {
                calls: r[3].parse().unwrap(),
                total: r[4].parse().unwrap(),
                mean: r[5].parse().unwrap(),
                max: r[6].parse().unwrap(),
                rows: r[7].parse().unwrap(),
            };
            (r[2].clone(), s)
        })
        .collect()
}

async fn run_workload(c: &Client) {
    for sql in [
        "SELECT 1 AS a",
        "SELECT 22 AS a",
        "select   333 as a -- third",
    ] {
        c.simple_query(sql).await.unwrap();
    }
    // extended protocol: tokio-postgres prepares a named statement, binds and executes it
    for v in [5i32, 6] {
        let row = c.query_one("SELECT $1::int + 1 AS b", &[&v]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), v + 1);
    }
    for sql in [
        "SELECT x FROM generate_series(1, 5) x WHERE x IN (1, 2, 3)",
        "SELECT x FROM generate_series(1, 5) x WHERE x IN (4)",
    ] {
        c.simple_query(sql).await.unwrap();
    }
    c.simple_query("SELECT pg_sleep(0.2)").await.unwrap();
}

fn check_workload(px: &Pgmux, db: &str) {
    let q = show_queries(px, db);
    let get = |text: &str| {
        q.get(text)
            .unwrap_or_else(|| panic!("{db}: no row {text:?} in {q:#?}"))
    };
    let simple = get("SELECT $1 AS a");
    assert_eq!((simple.calls, simple.rows), (3, 3), "{db}: {simple:?}");
    let extended = get("SELECT $1::int + $2 AS b");
    assert_eq!(
        (extended.calls, extended.rows),
        (2, 2),
        "{db}: {extended:?}"
    );
    let listed = get("SELECT x FROM generate_series($1, $2) x WHERE x IN ($3, ...)");
    assert_eq!((listed.calls, listed.rows), (2, 4), "{db}: {listed:?}");
    let sleep = get("SELECT pg_sleep($1)");
    assert_eq!(sleep.calls, 1);
    assert!(simple.total > 0.0 && simple.max > 0.0 && simple.mean <= simple.max);
    assert!(sleep.mean == sleep.max && sleep.total == sleep.max);
    for (text, s) in &q {
        if text != "SELECT pg_sleep($1)" {
            assert!(
                sleep.max > s.max,
                "{db}: {text} {s:?} slower than {sleep:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_queries_groups_statements_by_normalized_text() {
    let px = start(
        &[("queries_tx", "transaction"), ("queries_sess", "session")],
        "",
    );
    for db in ["queries_tx", "queries_sess"] {
        let c = connect(&px, db).await;
        run_workload(&c).await;
        drop(c);
        check_workload(&px, db);
    }
    // text logs name the client's address, database and user through the session's span
    let log = px.log();
    assert!(
        log.lines()
            .any(|l| l.contains("client{client_addr=127.0.0.1:")
                && l.contains("db=queries_tx user=app}")
                && l.contains("client connected")),
        "{log}"
    );
}

/// Lines of a json log, parsed.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_statements_are_logged_with_their_session() {
    let px = start(
        &[("queries_slow", "transaction")],
        "log_format = \"json\"\n",
    );
    let c = connect(&px, "queries_slow").await;
    // off by default: nothing is logged however slow
    c.simple_query("SELECT pg_sleep(0.2) AS before_set")
        .await
        .unwrap();
    console(&px, "SET log_min_duration_ms = 150");
    c.simple_query("SELECT 1 AS fast_one").await.unwrap();
    c.simple_query("SELECT pg_sleep(0.4) AS slow_one, 'x'")
        .await
        .unwrap();
    let slow = |log: &str| -> Vec<serde_json::Value> {
        json_lines(log)
            .into_iter()
            .filter(|v| v["fields"]["message"] == "slow statement")
            .collect()
    };
    wait_until("the slow statement in the log", WAIT, || {
        !slow(&px.log()).is_empty()
    });
    let lines = slow(&px.log());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    let f = &line["fields"];
    assert_eq!(f["query"], "SELECT pg_sleep($1) AS slow_one, $2", "{line}");
    assert_eq!(f["database"], "queries_slow");
    assert_eq!(f["user"], "app");
    let port = PgCluster::shared().primary().port;
    assert_eq!(f["host"], format!("127.0.0.1:{port}"), "{line}");
    assert!(f["duration_ms"].as_f64().unwrap() >= 150.0, "{line}");
    assert_eq!(line["level"], "WARN");
    // inside the client's span: its address, database and user as fields
    let span = &line["span"];
    assert_eq!(span["name"], "client", "{line}");
    assert_eq!(span["db"], "queries_slow");
    assert_eq!(span["user"], "app");
    assert!(
        span["client_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{line}"
    );
    // and so do the session's other lines
    let log = px.log();
    let connected = json_lines(&log)
        .into_iter()
        .find(|v| v["fields"]["message"] == "client connected")
        .unwrap_or_else(|| panic!("no client connected line: {log}"));
    assert_eq!(connected["span"]["db"], "queries_slow", "{connected}");
    assert_eq!(connected["span"]["user"], "app");
    assert_eq!(connected["span"]["client_addr"], span["client_addr"]);
}

/// A database with replicas has a pool per host, sharing one set of statistics: SHOW QUERIES
/// lists each statement once, with the calls of every host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_queries_lists_a_statement_once_across_replica_pools() {
    let pg = PgCluster::shared_with_replicas();
    let replicas = pg
        .replicas()
        .iter()
        .map(|r| format!("{{ host = \"127.0.0.1\", port = {} }}", r.port))
        .collect::<Vec<_>>()
        .join(", ");
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
metrics_listen_port = 0
admin_users = ["admin"]
[[users]]
name = "postgres"
[[users]]
name = "admin"
[[databases]]
name = "postgres"
host = "127.0.0.1"
port = {}
read_write_split = true
replicas = [ {replicas} ]
"#,
        pg.primary().port
    ));
    let (c, conn) = tokio_postgres::connect(&px.conn_str("postgres", "postgres", None), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..5 {
        c.simple_query("SELECT 4242 AS once").await.unwrap();
    }
    // a write too, so the primary's pool has been used as well as a replica's
    c.simple_query("CREATE TEMP TABLE IF NOT EXISTS once_t (a int)")
        .await
        .unwrap();
    let rows: Vec<_> = console(&px, "SHOW QUERIES")
        .into_iter()
        .filter(|r| r[2].contains("once") && r[2].to_lowercase().starts_with("select"))
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][3], "5", "{rows:?}");
}
