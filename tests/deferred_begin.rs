//! `defer_begin`: in transaction mode pgmux answers a client's lone plain BEGIN itself and
//! sends it to a server in front of the client's next request. What is proven here: the
//! BEGIN takes no server (SHOW POOLS, and a pool of one held by another client), what
//! follows it runs in one transaction on one server (rollback, txid, error semantics) over
//! the simple, extended and typed protocol paths and from psql, and a client that leaves
//! after its BEGIN leaves nothing behind.

mod common;

use common::probe::Console;
use common::raw;
use common::{wait_until_async, PgCluster, Pgmux};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_postgres::{types::Type, Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(30);

/// A pgmux in transaction mode with one database `db` (made on the shared cluster) whose
/// pool holds `pool` servers; `general` goes to [pgmux].
fn start(db: &str, pool: u32, general: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
pool_mode = "transaction"
default_pool_size = {pool}
admin_users = ["postgres"]
{general}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "postgres"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
"#,
        pg.primary().port
    ))
}

async fn connect(px: &Pgmux, db: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(&px.conn_str("app", db, Some("secret")), NoTls)
        .await
        .expect("connect through pgmux");
    tokio::spawn(conn);
    c
}

async fn one(c: &Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Servers of `db` lent to clients now (SHOW POOLS sv_active).
async fn lent(console: &Console, db: &str) -> i64 {
    console.pool(db).await.map_or(0, |p| p["sv_active"])
}

async fn wait_lent(console: &Console, db: &str, n: i64) {
    wait_until_async(&format!("{n} servers of {db} lent"), WAIT, || async {
        lent(console, db).await == n
    })
    .await;
}

fn count_rows(db: &str, table: &str) -> i64 {
    let pg = PgCluster::shared();
    pg.psql(pg.primary(), db, &format!("SELECT count(*) FROM {table}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_begin_is_answered_while_another_client_holds_the_only_server() {
    let db = "defer_one_server";
    let px = start(db, 1, "");
    let console = Console::connect(&px, "postgres", None).await;
    let a = connect(&px, db).await;
    a.simple_query("CREATE TABLE IF NOT EXISTS t (who text)")
        .await
        .unwrap();
    // a holds the pool's one server, in a transaction
    a.simple_query("BEGIN").await.unwrap();
    a.simple_query("INSERT INTO t VALUES ('a')").await.unwrap();
    wait_lent(&console, db, 1).await;

    // b's BEGIN needs none: answered while a still holds it (a deadline, not a timing)
    let b = connect(&px, db).await;
    tokio::time::timeout(WAIT, b.simple_query("BEGIN"))
        .await
        .expect("BEGIN waited for a server")
        .unwrap();
    assert!(!b.is_closed());
    let pool = console.pool(db).await.unwrap();
    assert_eq!(pool["sv_active"], 1, "{pool:?}");
    assert_eq!(pool["cl_waiting"], 0, "{pool:?}");

    // b's next statement waits for the server, then runs in b's transaction
    let waiting = tokio::spawn(async move {
        b.simple_query("INSERT INTO t VALUES ('b')").await.unwrap();
        b
    });
    wait_until_async("b waiting for the server", WAIT, || async {
        console.pool(db).await.is_some_and(|p| p["cl_waiting"] == 1)
    })
    .await;
    a.simple_query("COMMIT").await.unwrap();
    let b = waiting.await.unwrap();
    assert_eq!(
        one(&b, "SELECT count(*) FROM t WHERE who = 'b'").await,
        "1",
        "b's insert is not visible in its own transaction"
    );
    b.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(
        count_rows(db, "t WHERE who = 'b'"),
        0,
        "b's rollback undid nothing"
    );
    assert_eq!(count_rows(db, "t WHERE who = 'a'"), 1);
    console.wait_idle(db, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_a_deferred_begin_run_in_one_transaction_on_every_protocol_path() {
    let db = "defer_paths";
    let px = start(db, 2, "");
    let c = connect(&px, db).await;
    c.simple_query("CREATE TABLE IF NOT EXISTS t (n int)")
        .await
        .unwrap();
    for commit in [false, true] {
        // tokio-postgres' transaction() sends a lone simple-query BEGIN
        let mut c2 = connect(&px, db).await;
        let tx = c2.transaction().await.unwrap();
        let xid1: i64 = tx
            .query_one("SELECT txid_current()", &[])
            .await
            .unwrap()
            .get(0);
        tx.execute("INSERT INTO t VALUES ($1)", &[&1i32])
            .await
            .unwrap();
        let rows = tx
            .query_typed(
                "INSERT INTO t VALUES ($1) RETURNING txid_current()",
                &[(&2i32, Type::INT4)],
            )
            .await
            .unwrap();
        let xid2: i64 = rows[0].get(0);
        let xid3: i64 = tx
            .simple_query("SELECT txid_current()")
            .await
            .unwrap()
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .expect("a row");
        assert_eq!(
            (xid1, xid1),
            (xid2, xid3),
            "statements ran in different transactions"
        );
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        assert_eq!(
            count_rows(db, "t"),
            if commit { 2 } else { 0 },
            "commit = {commit}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_a_deferred_begin_aborts_the_transaction_as_postgresql_does() {
    let db = "defer_errors";
    let px = start(db, 2, "");
    let c = connect(&px, db).await;
    c.simple_query("START TRANSACTION").await.unwrap();
    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e}");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e}");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(one(&c, "SELECT 1").await, "1");
    // a BEGIN inside the transaction draws PostgreSQL's warning, and the transaction goes on
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(one(&c, "SELECT 2").await, "2");
    c.simple_query("COMMIT").await.unwrap();
    // options go to a server as they are: an invalid one is PostgreSQL's error
    let e = c
        .simple_query("BEGIN ISOLATION LEVEL NONSENSE")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"), "{e}");
    assert_eq!(one(&c, "SELECT 3").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_transactions_keep_their_meaning() {
    let db = "defer_psql";
    let px = start(db, 2, "");
    let script = "CREATE TABLE IF NOT EXISTS t (n int);\n\
                  BEGIN;\nINSERT INTO t VALUES (1);\nSELECT count(*) AS inside FROM t;\nROLLBACK;\n\
                  SELECT count(*) AS after_rollback FROM t;\n\
                  BEGIN;\nINSERT INTO t VALUES (2);\nCOMMIT;\n\
                  SELECT count(*) AS after_commit FROM t;\n";
    let mut child = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &px.addr().port().to_string(),
            "-U",
            "app",
            db,
        ])
        .env("PGPASSWORD", "secret")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines,
        [
            "CREATE TABLE",
            "BEGIN",
            "INSERT 0 1",
            "1",
            "ROLLBACK",
            "0",
            "BEGIN",
            "INSERT 0 1",
            "COMMIT",
            "1"
        ],
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_after_its_begin_leaves_nothing_behind() {
    let db = "defer_leave";
    let px = start(db, 1, "");
    let console = Console::connect(&px, "postgres", None).await;
    // one server in the pool, made by a first query
    let warm = connect(&px, db).await;
    assert_eq!(one(&warm, "SELECT 1").await, "1");
    drop(warm);
    console.wait_idle(db, 0).await;
    for _ in 0..3 {
        let c = connect(&px, db).await;
        c.simple_query("BEGIN").await.unwrap();
        assert_eq!(lent(&console, db).await, 0);
        drop(c);
    }
    let pool = console.wait_idle(db, 0).await;
    assert_eq!(pool["sv_idle"], 1, "{pool:?}");
    // the server was never dirtied: the next client finds it in no transaction
    let c = connect(&px, db).await;
    assert_eq!(
        one(
            &c,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in%'"
        )
        .await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_defer_begin_off_a_begin_takes_a_server() {
    let db = "defer_off";
    let px = start(db, 2, "defer_begin = false");
    let console = Console::connect(&px, "postgres", None).await;
    let c = connect(&px, db).await;
    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(lent(&console, db).await, 1);
    c.simple_query("COMMIT").await.unwrap();
    console.wait_idle(db, 1).await;
    // and back on at a RELOAD-free SET from the console, for the next transaction
    console
        .client
        .simple_query("SET defer_begin = true")
        .await
        .unwrap();
    let c2 = connect(&px, db).await;
    c2.simple_query("BEGIN").await.unwrap();
    assert_eq!(lent(&console, db).await, 0);
    c2.simple_query("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_applies_from_a_deferred_begin() {
    let db = "defer_idle";
    let px = start(db, 1, "idle_transaction_timeout = 0.5");
    let (c, conn) = tokio_postgres::connect(&px.conn_str("app", db, Some("secret")), NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    c.simple_query("BEGIN").await.unwrap();
    // pgmux ends the session, with PostgreSQL's SQLSTATE for it
    let ended = tokio::time::timeout(WAIT, conn)
        .await
        .expect("the idle transaction was not ended")
        .unwrap();
    let e = ended.expect_err("the session ended without an error");
    assert_eq!(e.code().map(|c| c.code()), Some("25P03"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deallocate_right_after_a_deferred_begin_is_answered_in_its_transaction() {
    // pgx evicts a cached statement with a DEALLOCATE right after its BEGIN: the server
    // knows the statement by pgmux's name, so pgmux answers it, as it does between
    // transactions
    let db = "defer_dealloc";
    let px = start(db, 2, "");
    let port = px.addr().port();
    tokio::task::spawn_blocking(move || {
        let (mut s, _) = raw::login(port, "app", db);
        let parse = |name: &str, sql: &str| {
            let body = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
            raw::msg(b'P', &body)
        };
        let run = |name: &str| {
            let bind = [b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat();
            [
                raw::msg(b'B', &bind),
                raw::msg(b'E', b"\0\0\0\0\0"),
                raw::msg(b'S', b""),
            ]
            .concat()
        };
        let status = |msgs: &[(u8, Vec<u8>)]| msgs.last().unwrap().1[0];
        s.write_all(
            &[
                parse("evicted", "SELECT 41 + 1"),
                parse("kept", "SELECT 43 - 1"),
                raw::msg(b'S', b""),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(raw::tags(&raw::until_ready(&mut s)), "11Z");
        s.write_all(&raw::query("BEGIN")).unwrap();
        let m = raw::until_ready(&mut s);
        assert_eq!((raw::tags(&m).as_str(), status(&m)), ("CZ", b'T'));
        s.write_all(&raw::query("DEALLOCATE evicted")).unwrap();
        let m = raw::until_ready(&mut s);
        assert_eq!((raw::tags(&m).as_str(), status(&m)), ("CZ", b'T'), "{m:?}");
        s.write_all(&run("kept")).unwrap();
        let m = raw::until_ready(&mut s);
        assert_eq!(
            (raw::tags(&m).as_str(), status(&m)),
            ("2DCZ", b'T'),
            "{m:?}"
        );
        s.write_all(&run("evicted")).unwrap();
        let m = raw::until_ready(&mut s);
        assert_eq!(raw::error_code(&m).as_deref(), Some("26000"), "{m:?}");
        assert_eq!(status(&m), b'E');
        s.write_all(&raw::query("ROLLBACK")).unwrap();
        let m = raw::until_ready(&mut s);
        assert_eq!(status(&m), b'I');
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_behind_a_deferred_begin_is_refused_and_harms_no_one() {
    let db = "defer_malformed";
    let px = start(db, 1, "");
    let console = Console::connect(&px, "postgres", None).await;
    let port = px.addr().port();
    for bad in [
        // a length below the header's own four bytes
        vec![b'Q', 0, 0, 0, 2],
        // a length past max_message_size
        vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
    ] {
        let msgs = tokio::task::spawn_blocking(move || {
            let (mut s, _) = raw::login(port, "app", db);
            s.write_all(&raw::query("BEGIN")).unwrap();
            let m = raw::until_ready(&mut s);
            assert_eq!(m.last().unwrap().1[0], b'T');
            s.write_all(&bad).unwrap();
            raw::until_eof(&mut s)
        })
        .await
        .unwrap();
        assert_eq!(raw::error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    }
    // the pool's one server is whole and in no transaction: the next client is served
    console.wait_idle(db, 0).await;
    let c = connect(&px, db).await;
    assert_eq!(one(&c, "SELECT 1").await, "1");
    assert_eq!(
        one(
            &c,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in%'"
        )
        .await,
        "0"
    );
}
