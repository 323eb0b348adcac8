//! Session state under transaction pooling: settings a client changes (SET, RESET,
//! set_config) follow it to whichever server it is lent and never leak to other clients,
//! and state that cannot move (LISTEN, temporary tables, SQL PREPARE, advisory locks,
//! WITH HOLD cursors) pins the client to its server, visibly, until it leaves or runs
//! DISCARD ALL.

mod common;

use common::{raw, wait_until_async, PgCluster, Pgmux};
use futures_util::StreamExt;
use std::io::Write;
use std::time::Duration;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

fn start(db: &str, pool_size: u32) -> Pgmux {
    start_with(db, "transaction", pool_size, "")
}

fn start_with(db: &str, mode: &str, pool_size: u32, general: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
pool_mode = "{mode}"
{general}
default_pool_size = {pool_size}
auth_type = "trust"
admin_users = ["postgres"]
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

async fn connect(px: &Pgmux, user: &str, db: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(&px.conn_str(user, db, Some("secret")), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

async fn one(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The `pinned` column of SHOW CLIENTS for clients of `db`.
async fn pinned(admin: &Client, db: &str) -> Vec<String> {
    let msgs = admin.simple_query("SHOW CLIENTS").await.unwrap();
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("database") == Some(db) => {
                Some(r.get("pinned").unwrap_or("").to_string())
            }
            _ => None,
        })
        .collect()
}

/// The reasons of the pinned clients of `db` (the last test round's client may still be
/// listed, unpinned, while pgmux ends its session).
async fn pins_shown(admin: &Client, db: &str) -> Vec<String> {
    let mut pins = pinned(admin, db).await;
    pins.retain(|p| !p.is_empty());
    pins
}

/// pgmux skips comparing settings when a server was last brought in step with the very
/// settings the next client expects (clients with the same startup settings share them);
/// a SET on that server in between must still be undone for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_right_after_a_shared_sync_does_not_leak() {
    let db = "ss_shared_sync";
    let px = start(db, 1);
    let a = connect(&px, "app", db).await;
    let b = connect(&px, "app", db).await;
    for round in 0..3 {
        // b's query brings the only server in step with the settings a and b share
        assert_eq!(one(&b, "SHOW work_mem").await, "4MB", "round {round}");
        let value = format!("{}MB", 5 + round);
        a.simple_query(&format!("SET work_mem = '{value}'"))
            .await
            .unwrap();
        assert_eq!(one(&b, "SHOW work_mem").await, "4MB", "round {round}");
        assert_eq!(one(&a, "SHOW work_mem").await, value, "round {round}");
        a.simple_query("RESET work_mem").await.unwrap();
    }
}

/// PostgreSQL reports some settings as they change (`default_transaction_read_only`, since
/// 14; pgjdbc's `setReadOnly(true)` with readOnlyMode=always sets it with SET SESSION
/// CHARACTERISTICS): the report of pgmux's own set_config, bringing the server to one
/// client's value, must not make pgmux forget to undo it for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_setting_applied_by_pgmux_does_not_leak() {
    let db = "ss_reported";
    let px = start(db, 1);
    let a = connect(&px, "app", db).await;
    let b = connect(&px, "app", db).await;
    a.simple_query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .unwrap();
    for round in 0..3 {
        // b's turn resets the only server; a's brings it back to read only
        assert_eq!(
            one(&b, "SHOW default_transaction_read_only").await,
            "off",
            "round {round}"
        );
        assert_eq!(
            one(&a, "SHOW default_transaction_read_only").await,
            "on",
            "round {round}"
        );
        assert_eq!(
            one(&b, "SHOW transaction_read_only").await,
            "off",
            "round {round}"
        );
    }
    a.simple_query("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        .await
        .unwrap();
    assert_eq!(one(&a, "SHOW default_transaction_read_only").await, "off");
    assert_eq!(one(&b, "SHOW default_transaction_read_only").await, "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_the_client_and_never_leak() {
    let db = "ss_settings";
    let px = start(db, 1);
    let a = connect(&px, "app", db).await;
    let b = connect(&px, "app", db).await;
    let default_path = one(&b, "SHOW search_path").await;
    a.simple_query("SET search_path = pg_catalog, public")
        .await
        .unwrap();
    a.simple_query("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    a.simple_query("SELECT set_config('work_mem', '7MB', false)")
        .await
        .unwrap();
    for _ in 0..3 {
        // one server shared by both: each sees only its own settings
        assert_eq!(one(&a, "SHOW search_path").await, "pg_catalog, public");
        assert_eq!(one(&a, "SHOW statement_timeout").await, "1234ms");
        assert_eq!(one(&a, "SHOW work_mem").await, "7MB");
        assert_eq!(one(&b, "SHOW search_path").await, default_path);
        assert_eq!(one(&b, "SHOW statement_timeout").await, "0");
        assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    }
    // SET LOCAL and a SET rolled back with its transaction leave nothing behind
    a.simple_query("BEGIN; SET LOCAL work_mem = '9MB'; COMMIT")
        .await
        .unwrap();
    a.simple_query("BEGIN; SET search_path = public; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(one(&a, "SHOW work_mem").await, "7MB");
    assert_eq!(one(&a, "SHOW search_path").await, "pg_catalog, public");
    // RESET and RESET ALL are followed too
    a.simple_query("RESET search_path").await.unwrap();
    assert_eq!(one(&a, "SHOW search_path").await, default_path);
    assert_eq!(one(&a, "SHOW statement_timeout").await, "1234ms");
    a.simple_query("RESET ALL").await.unwrap();
    assert_eq!(one(&a, "SHOW statement_timeout").await, "0");
    // a client that leaves with settings changed hands back a clean server
    a.simple_query("SET statement_timeout = '55s'")
        .await
        .unwrap();
    drop(a);
    let c = connect(&px, "app", db).await;
    assert_eq!(one(&c, "SHOW statement_timeout").await, "0");
}

/// `SET ROLE` and custom settings (`myapp.tenant`, as row-level security setups use) are not
/// listed in pg_settings, and RESET ALL leaves the role alone: they must still follow their
/// client and never reach another one sharing the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_custom_settings_follow_the_client_and_never_leak() {
    let db = "ss_roles";
    let px = start(db, 1);
    let pg = PgCluster::shared();
    pg.psql(
        pg.primary(),
        "postgres",
        "DO $$ BEGIN CREATE ROLE ss_r1; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
         GRANT ss_r1 TO app",
    );
    let a = connect(&px, "app", db).await;
    let b = connect(&px, "app", db).await;
    a.simple_query("SET ROLE ss_r1; SET myapp.tenant = '42'")
        .await
        .unwrap();
    // through the extended protocol: a named statement, so pgmux's tracker sees it
    a.query("SELECT set_config('myapp.user', $1, false)", &[&"alice"])
        .await
        .unwrap();
    let a_sees =
        "SELECT current_user || '/' || coalesce(current_setting('myapp.tenant', true), '') \
                  || '/' || coalesce(current_setting('myapp.user', true), '')";
    for _ in 0..3 {
        // one server shared by both: each sees only its own
        assert_eq!(one(&a, a_sees).await, "ss_r1/42/alice");
        assert_eq!(one(&b, a_sees).await, "app//");
    }
    a.simple_query("RESET ROLE; RESET myapp.tenant")
        .await
        .unwrap();
    assert_eq!(one(&a, a_sees).await, "app//alice");
    assert_eq!(one(&b, a_sees).await, "app//");
    // a client that leaves with a role set hands back a server without it
    a.simple_query("SET ROLE ss_r1").await.unwrap();
    drop(a);
    let c = connect(&px, "app", db).await;
    assert_eq!(one(&c, a_sees).await, "app//");
}

/// A custom setting set through the unnamed statement (Parse, Bind and Execute before one
/// Sync: tokio-postgres `query_typed`, psycopg's parameters, asyncpg without a statement
/// cache), or named with quotes (`"set_config"(...)`, `SET "myapp"."x"`), follows its client
/// like any other and never reaches another client of the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_settings_through_the_unnamed_statement_or_quoted_follow_the_client() {
    let db = "ss_unnamed_custom";
    let px = start(db, 1);
    let a = connect(&px, "app", db).await;
    let b = connect(&px, "app", db).await;
    a.query_typed(
        "SELECT set_config('myapp.tenant', $1, false)",
        &[(&"alice", Type::TEXT)],
    )
    .await
    .unwrap();
    a.simple_query("SELECT \"set_config\"('work_mem', '9MB', false)")
        .await
        .unwrap();
    a.simple_query("SET \"myapp\".\"quoted\" = 'q'")
        .await
        .unwrap();
    a.simple_query("SELECT pg_catalog.\"set_config\"('myapp.catalog', 'k', false)")
        .await
        .unwrap();
    let seen = "SELECT coalesce(current_setting('myapp.tenant', true), '') || '/' \
                || current_setting('work_mem') || '/' \
                || coalesce(current_setting('myapp.quoted', true), '') || '/' \
                || coalesce(current_setting('myapp.catalog', true), '')";
    for _ in 0..3 {
        // one server shared by both: each sees only its own
        assert_eq!(one(&a, seen).await, "alice/9MB/q/k");
        assert_eq!(one(&b, seen).await, "/4MB//");
    }
    // set again through the unnamed statement, after a simple SET of the same name
    a.simple_query("SET myapp.tenant = 'other'").await.unwrap();
    let rows = a
        .query_typed(
            "SELECT set_config('myapp.tenant', $1, false)",
            &[(&"bob", Type::TEXT)],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "bob");
    assert_eq!(one(&a, seen).await, "bob/9MB/q/k");
    assert_eq!(one(&b, seen).await, "/4MB//");
    drop(a);
    let c = connect(&px, "app", db).await;
    assert_eq!(one(&c, seen).await, "/4MB//");

    // Parse and Sync, then Bind, Execute and Sync: the set_config runs in the second unit
    let (mut r, _) = raw::login(px.port, "app", db);
    let mut parse = b"\0SELECT set_config('myapp.split', 'v', false)\0".to_vec();
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut out = raw::msg(b'P', &parse);
    out.extend(raw::msg(b'S', &[]));
    r.write_all(&out).unwrap();
    raw::until_ready(&mut r);
    let mut out = raw::msg(b'B', b"\0\0\0\0\0\0\0\0");
    out.extend(raw::msg(b'E', b"\0\0\0\0\0"));
    out.extend(raw::msg(b'S', &[]));
    r.write_all(&out).unwrap();
    let answers = raw::until_ready(&mut r);
    assert_eq!(raw::error_code(&answers), None, "{answers:?}");
    let split = "SELECT coalesce(current_setting('myapp.split', true), '')";
    r.write_all(&raw::query(split)).unwrap();
    let rows: Vec<_> = raw::until_ready(&mut r)
        .into_iter()
        .filter(|(t, _)| *t == b'D')
        .collect();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].1.ends_with(b"v"), "{rows:?}");
    assert_eq!(one(&c, split).await, "");
}

/// With the statement tracking off (`max_prepared_statements = 0`), what a Parse's text does
/// to the session is still followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_through_the_extended_protocol_follow_without_statement_tracking() {
    let db = "ss_untracked";
    let px = start_with(db, "transaction", 1, "max_prepared_statements = 0");
    let a = connect(&px, "app", db).await;
    let b = connect(&px, "app", db).await;
    for (sql, value) in [
        ("SELECT set_config('work_mem', $1, false)", "9MB"),
        ("SELECT set_config('myapp.tenant', $1, false)", "alice"),
    ] {
        a.query_typed(sql, &[(&value, Type::TEXT)]).await.unwrap();
    }
    let seen = "SELECT current_setting('work_mem') || '/' \
                || coalesce(current_setting('myapp.tenant', true), '')";
    for _ in 0..3 {
        assert_eq!(one(&a, seen).await, "9MB/alice");
        assert_eq!(one(&b, seen).await, "4MB/");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_move_between_servers_under_load() {
    let db = "ss_moving";
    let px = std::sync::Arc::new(start(db, 2));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let px = px.clone();
            tokio::spawn(async move {
                let c = connect(&px, "app", db).await;
                c.simple_query(&format!("SET application_name = 'c{i}'; SET statement_timeout = '{}ms'", 1001 + i))
                    .await
                    .unwrap();
                for _ in 0..30 {
                    let got = one(&c, "SELECT current_setting('application_name') || '/' || current_setting('statement_timeout')").await;
                    assert_eq!(got, format!("c{i}/{}ms", 1001 + i));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_the_client_and_notifications_arrive() {
    let db = "ss_listen";
    let px = start(db, 2);
    let admin = connect(&px, "postgres", "pgmux").await;
    let (listener, mut conn) =
        tokio_postgres::connect(&px.conn_str("app", db, Some("secret")), NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    let pid = one(&listener, "SELECT pg_backend_pid()").await;
    listener.simple_query("LISTEN ss_chan").await.unwrap();
    assert_eq!(pinned(&admin, db).await, vec!["listen".to_string()]);
    let other = connect(&px, "app", db).await;
    for n in 0..3 {
        other
            .simple_query(&format!("NOTIFY ss_chan, 'n{n}'"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, format!("n{n}"));
        // the listener keeps its server, transaction after transaction
        assert_eq!(one(&listener, "SELECT pg_backend_pid()").await, pid);
    }
    let metrics = admin.simple_query("SHOW CLIENTS").await.unwrap();
    assert!(!metrics.is_empty());
    // DISCARD ALL lets go of everything that pinned it
    listener.simple_query("DISCARD ALL").await.unwrap();
    wait_until_async("unpinned", Duration::from_secs(10), || async {
        pinned(&admin, db).await.iter().all(String::is_empty)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_prepare_cursors_and_locks_pin_until_the_client_leaves() {
    let db = "ss_pins";
    let px = start(db, 1);
    let admin = connect(&px, "postgres", "pgmux").await;
    let cases = [
        (
            "CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1)",
            "SELECT count(*) FROM t",
            "temp_object",
        ),
        ("PREPARE p AS SELECT 41 + 1", "EXECUTE p", "prepare"),
        (
            "SELECT pg_advisory_lock(4242)",
            "SELECT pg_advisory_unlock(4242)",
            "advisory_lock",
        ),
        (
            "BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT 7; COMMIT",
            "FETCH cur",
            "hold_cursor",
        ),
        // temporary tables made without saying TEMP
        (
            "SET search_path = pg_temp, public; CREATE TABLE t(x int); INSERT INTO t VALUES (1)",
            "SELECT count(*) FROM t",
            "temp_object",
        ),
        (
            "SELECT 1 AS x INTO pg_temp.t",
            "SELECT count(*) FROM t",
            "temp_object",
        ),
        (
            "SELECT set_config('search_path', 'pg_temp', false); CREATE TABLE t(x int)",
            "SELECT count(*) + 1 FROM t",
            "temp_object",
        ),
        // a setting's name quoted is the same setting
        (
            "SET \"search_path\" = pg_temp, public; CREATE TABLE t(x int)",
            "SELECT count(*) + 1 FROM t",
            "temp_object",
        ),
        // a custom setting whose name is computed cannot be read back by name
        (
            "SELECT set_config('myapp.' || 'computed', 'c', false)",
            "SELECT current_setting('myapp.computed', true)",
            "settings",
        ),
        // what a DO block runs through EXECUTE cannot be read
        (
            "DO $$ BEGIN EXECUTE 'SELECT pg_advisory_lock(' || 4242 || ')'; END $$",
            "SELECT pg_advisory_unlock(4242)",
            "dynamic_sql",
        ),
    ];
    for (setup, again, reason) in cases {
        let a = connect(&px, "app", db).await;
        let pid = one(&a, "SELECT pg_backend_pid()").await;
        a.simple_query(setup).await.unwrap();
        assert_eq!(pins_shown(&admin, db).await, [reason], "{setup}");
        // works across transactions: the state stayed where it was made
        let first = one(&a, again).await;
        assert!(!first.is_empty(), "{again}");
        assert_eq!(one(&a, "SELECT pg_backend_pid()").await, pid);
        drop(a);
        // the server went back cleaned: no temporary table, prepared statement or lock left
        let b = connect(&px, "app", db).await;
        assert_eq!(one(&b, "SELECT pg_backend_pid()").await, pid, "pool of one");
        assert_eq!(
            one(&b, "SELECT to_regclass('pg_temp.t') IS NULL").await,
            "t"
        );
        assert_eq!(
            one(
                &b,
                "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'"
            )
            .await,
            "0"
        );
        assert_eq!(
            one(
                &b,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            )
            .await,
            "0"
        );
        assert_eq!(one(&b, "SELECT count(*) FROM pg_cursors").await, "0");
        assert!(pinned(&admin, db).await.iter().all(String::is_empty));
    }
    // the pin lines carry fields (db, user); a log file gets them without colour codes
    let log = px.log();
    assert!(
        log.lines()
            .any(|l| l.contains("pinned to its server") && l.contains("db=ss_pins")),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log}");
}

/// A client with startup settings (`options=-c ...`) connecting with the same connection string.
async fn connect_with_options(px: &Pgmux, db: &str) -> Client {
    connect_with(
        px,
        db,
        "options='-c search_path=tenant1 -c statement_timeout=1234ms'",
    )
    .await
}

/// The app user's client, with `extra` added to its connection string.
async fn connect_with(px: &Pgmux, db: &str, extra: &str) -> Client {
    let conn = format!("{} {extra}", px.conn_str("app", db, Some("secret")));
    let (c, conn) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// The server_reset_query (DISCARD ALL) takes back the settings pgmux applied: clients after
/// it get theirs again, even when they equal the previous client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_survive_the_reset_query_between_clients() {
    let shown =
        "SELECT current_setting('search_path') || ' ' || current_setting('statement_timeout')";
    let want = "tenant1 1234ms";
    // session mode, one server: every client after the first gets it after DISCARD ALL
    let px = start_with("st_reset_session", "session", 1, "");
    for i in 0..3 {
        let c = connect_with_options(&px, "st_reset_session").await;
        assert_eq!(one(&c, shown).await, want, "session client {i}");
    }
    // transaction mode, reset after every transaction: the client's own SET too
    let px = start_with(
        "st_reset_always",
        "transaction",
        1,
        "server_reset_query_always = true",
    );
    let c = connect_with_options(&px, "st_reset_always").await;
    c.simple_query("SET work_mem = '5MB'").await.unwrap();
    for i in 0..3 {
        assert_eq!(one(&c, shown).await, want, "transaction {i}");
        assert_eq!(one(&c, "SHOW work_mem").await, "5MB", "transaction {i}");
    }
}

/// On PostgreSQL, RESET, RESET ALL and DISCARD ALL go back to what the client's startup
/// packet set, not to the server's default; pgmux applies startup settings with
/// `set_config(..., false)`, so on the server they go to its default, and pgmux must bring
/// the client back to its startup values (`application_name` too, which the server reports).
/// Found with pgjdbc (`setSchema`, then `RESET search_path`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_goes_back_to_the_startup_value() {
    let db = "ss_reset_startup";
    let px = start(db, 1);
    let conn = format!(
        "{} application_name=startup_app options='-c search_path=tenant1 -c work_mem=7MB'",
        px.conn_str("app", db, Some("secret"))
    );
    let (c, conn) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query("SET search_path = public; SET work_mem = '9MB'")
        .await
        .unwrap();
    c.simple_query("RESET search_path").await.unwrap();
    assert_eq!(one(&c, "SHOW search_path").await, "tenant1");
    c.simple_query("RESET ALL").await.unwrap();
    assert_eq!(one(&c, "SHOW work_mem").await, "7MB");
    assert_eq!(one(&c, "SHOW search_path").await, "tenant1");
    c.simple_query("RESET application_name").await.unwrap();
    assert_eq!(one(&c, "SHOW application_name").await, "startup_app");
    c.simple_query("SET work_mem = '9MB'").await.unwrap();
    c.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(one(&c, "SHOW work_mem").await, "7MB");
    // and another client on the same server keeps the server's defaults
    let b = connect(&px, "app", db).await;
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&b, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(one(&c, "SHOW search_path").await, "tenant1");
}

/// A server_reset_query that leaves a transaction open (here BEGIN) must not hand that
/// transaction to the next client: the server is closed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_query_that_leaves_a_transaction_open_closes_the_server() {
    let px = start_with(
        "st_reset_begin",
        "session",
        1,
        "server_reset_query = \"BEGIN\"",
    );
    for i in 0..3 {
        let c = connect(&px, "app", "st_reset_begin").await;
        // the first statement of a transaction of its own: now() is its start
        assert_eq!(
            one(&c, "SELECT (now() = statement_timestamp())::text").await,
            "true",
            "client {i} ran inside a transaction left open"
        );
    }
}

/// A database in SQL_ASCII takes query texts that are not UTF-8. pgmux cannot read what such
/// a text does to the session, so its client keeps its server (pinned "unreadable") rather
/// than handing on a server whose settings it changed unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_text_that_is_not_utf8_pins_its_client() {
    use std::io::Write;
    let db = "ss_sql_ascii";
    let pg = PgCluster::shared();
    let exists = format!("select count(*) from pg_database where datname = '{db}'");
    if pg.primary().psql("postgres", &exists) != "1" {
        pg.primary().psql(
            "postgres",
            &format!(
                "CREATE DATABASE {db} OWNER app ENCODING 'SQL_ASCII' LC_COLLATE 'C' \
                 LC_CTYPE 'C' TEMPLATE template0"
            ),
        );
    }
    let px = start(db, 2);
    let admin = connect(&px, "postgres", "pgmux").await;
    let (mut s, _) = common::raw::login(px.port, "app", db);
    // a setting changed in a statement with a byte that is not UTF-8 (in a comment)
    let sql = b"SET search_path = pg_catalog /* \xff */\0";
    s.write_all(&common::raw::msg(b'Q', sql)).unwrap();
    let answer = common::raw::until_ready(&mut s);
    assert_eq!(common::raw::error_code(&answer), None, "{answer:?}");
    wait_until_async("the client pinned", Duration::from_secs(30), || async {
        pinned(&admin, db).await == vec!["unreadable".to_string()]
    })
    .await;
}

/// A search_path naming pg_temp in the startup options makes plain CREATE TABLE make a
/// temporary table: the client keeps its server, which the next client gets without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_search_path_of_pg_temp_pins() {
    let db = "ss_temp_path";
    let px = start(db, 1);
    let admin = connect(&px, "postgres", "pgmux").await;
    let a = connect_with(&px, db, "options='-c search_path=pg_temp,public'").await;
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    a.simple_query("CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert_eq!(one(&a, "SELECT count(*) FROM pg_temp.t").await, "1");
    assert_eq!(pins_shown(&admin, db).await, ["temp_object"]);
    // DISCARD ALL goes back to the startup search_path: the client stays pinned
    a.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(one(&a, "SHOW search_path").await, "pg_temp,public");
    assert_eq!(pins_shown(&admin, db).await, ["temp_object"]);
    a.simple_query("CREATE TABLE zz(x int)").await.unwrap();
    assert_eq!(
        one(&a, "SELECT to_regclass('pg_temp.zz') IS NOT NULL").await,
        "t"
    );
    drop(a);
    let b = connect(&px, "app", db).await;
    assert_eq!(one(&b, "SELECT pg_backend_pid()").await, pid, "pool of one");
    assert_eq!(one(&b, "SELECT to_regclass('pg_temp.t')").await, "");
    assert_eq!(one(&b, "SELECT to_regclass('pg_temp.zz')").await, "");
}

/// A pinned client that resets settings gets its startup values back, as on PostgreSQL,
/// though its server (kept) had them from pgmux's set_config, whose reset is the server's
/// default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_that_resets_gets_its_startup_settings() {
    let db = "ss_pinned_reset";
    let px = start(db, 2);
    let admin = connect(&px, "postgres", "pgmux").await;
    let startup = "application_name=fromstartup options='-c search_path=public -c work_mem=3MB'";
    let a = connect_with(&px, db, startup).await;
    a.simple_query("LISTEN x").await.unwrap();
    assert_eq!(pins_shown(&admin, db).await, ["listen"]);
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    a.simple_query("SET application_name = 'changed'; SET work_mem = '5MB'")
        .await
        .unwrap();
    a.simple_query("RESET ALL").await.unwrap();
    assert_eq!(one(&a, "SHOW application_name").await, "fromstartup");
    assert_eq!(one(&a, "SHOW search_path").await, "public");
    assert_eq!(one(&a, "SHOW work_mem").await, "3MB");
    a.simple_query("SET work_mem = '5MB'").await.unwrap();
    a.simple_query("SET work_mem TO DEFAULT").await.unwrap();
    assert_eq!(one(&a, "SHOW work_mem").await, "3MB");
    a.simple_query("SET work_mem = '6MB'").await.unwrap();
    a.simple_query("RESET work_mem").await.unwrap();
    assert_eq!(one(&a, "SHOW work_mem").await, "3MB");
    assert_eq!(
        one(&a, "SELECT pg_backend_pid()").await,
        pid,
        "kept its server"
    );
    assert_eq!(pins_shown(&admin, db).await, ["listen"]);
}

/// PostgreSQL refuses DISCARD ALL in a transaction block, among other statements and in a
/// pipeline, and then discards nothing: the client keeps its pin and its prepared
/// statements, and what pinned it does not reach the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_all_that_postgresql_refuses_keeps_the_pin() {
    let db = "ss_discard_refused";
    let px = start(db, 1);
    let admin = connect(&px, "postgres", "pgmux").await;
    let a = connect(&px, "app", db).await;
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    let st = a.prepare("SELECT 7").await.unwrap();
    a.simple_query("CREATE TEMP TABLE tt(x int); SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let refused = |r: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>, how: &str| {
        let e = r.expect_err(how);
        assert_eq!(e.code().map(|c| c.code()), Some("25001"), "{how}: {e}");
    };
    a.simple_query("BEGIN").await.unwrap();
    refused(a.simple_query("DISCARD ALL").await, "in a block");
    a.simple_query("ROLLBACK").await.unwrap();
    refused(
        a.simple_query("SELECT 1; DISCARD ALL").await,
        "with another",
    );
    refused(
        a.simple_query("DISCARD ALL; SELECT 1").await,
        "before another",
    );
    a.simple_query("BEGIN").await.unwrap();
    let e = a
        .execute("DISCARD ALL", &[])
        .await
        .expect_err("extended, in a block");
    assert_eq!(e.code().map(|c| c.code()), Some("25001"), "{e}");
    a.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(pins_shown(&admin, db).await, ["temp_object"]);
    let row = a
        .query_one(&st, &[])
        .await
        .expect("the statement is still there");
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(one(&a, "SELECT count(*) FROM tt").await, "0");
    drop(a);
    let b = connect(&px, "app", db).await;
    assert_eq!(one(&b, "SELECT pg_backend_pid()").await, pid, "pool of one");
    assert_eq!(one(&b, "SELECT to_regclass('pg_temp.tt')").await, "");
    let locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242";
    assert_eq!(one(&b, locks).await, "0");
    // one PostgreSQL runs lets go of everything
    b.simple_query("CREATE TEMP TABLE t2(x int)").await.unwrap();
    assert_eq!(pins_shown(&admin, db).await, ["temp_object"]);
    b.simple_query("DISCARD ALL").await.unwrap();
    assert!(pins_shown(&admin, db).await.is_empty());
}

/// `q` run until it is not cancelled by the client's own very short statement_timeout.
async fn past_timeout(c: &Client, q: &str) -> String {
    loop {
        match c.simple_query(q).await {
            Ok(m) => {
                return m
                    .iter()
                    .find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
                        _ => None,
                    })
                    .unwrap_or_default()
            }
            Err(e) if e.code().map(|c| c.code()) == Some("57014") => continue,
            Err(e) => panic!("{q}: {e}"),
        }
    }
}

/// pgmux reads a client's settings back after a unit that changed them; a statement_timeout
/// of 1ms must not cancel that read-back (which would lose the client's settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_very_short_statement_timeout_is_kept() {
    let db = "ss_short_timeout";
    let px = start(db, 1);
    let a = connect(&px, "app", db).await;
    for i in 0..40 {
        let value = if i % 2 == 0 { "1ms" } else { "2ms" };
        past_timeout(&a, &format!("SET statement_timeout = '{value}'")).await;
        assert_eq!(
            past_timeout(&a, "SHOW statement_timeout").await,
            value,
            "round {i}"
        );
    }
    past_timeout(&a, "RESET statement_timeout").await;
    assert_eq!(past_timeout(&a, "SHOW statement_timeout").await, "0");
    let log = px.log();
    assert!(
        !log.contains("reading back session settings failed"),
        "{log}"
    );
}

/// Clients with different search_paths (a schema per tenant) prepare the same text, which
/// names tables of another shape in each schema: each gets its own table's rows, every
/// time, as on PostgreSQL, and never `0A000 cached plan must not change result type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_under_different_search_paths_is_not_shared() {
    let db = "ss_tenants";
    let px = start(db, 1);
    let pg = PgCluster::shared();
    pg.psql(
        pg.primary(),
        db,
        "DROP SCHEMA IF EXISTS ta CASCADE; DROP SCHEMA IF EXISTS tb CASCADE; \
         CREATE SCHEMA ta; CREATE SCHEMA tb; \
         CREATE TABLE ta.t (a text); INSERT INTO ta.t VALUES ('a'); \
         CREATE TABLE tb.t (a text, b text); INSERT INTO tb.t VALUES ('x', 'y'); \
         GRANT USAGE ON SCHEMA ta, tb TO app; GRANT SELECT ON ta.t, tb.t TO app",
    );
    let tenant = |schema: &str| {
        format!(
            "{} options='-c search_path={schema}'",
            px.conn_str("app", db, Some("secret"))
        )
    };
    let mut clients = Vec::new();
    for schema in ["ta", "tb"] {
        let (c, conn) = tokio_postgres::connect(&tenant(schema), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let st = c.prepare("SELECT * FROM t").await.unwrap();
        clients.push((c, st));
    }
    for _ in 0..3 {
        for (i, (c, st)) in clients.iter().enumerate() {
            let rows = c.query(st, &[]).await.unwrap();
            assert_eq!(rows[0].len(), i + 1, "client {i}");
        }
    }
}
