//! Real clients through pgmux against a real PostgreSQL: tokio-postgres on its three paths,
//! psql, multi-statement queries, COPY both ways, LISTEN/NOTIFY, cancel, errors in
//! transactions, and session parameters kept per client.

mod common;

use common::{cancel_and_wait, wait_until_async, PgCluster, Pgmux};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_postgres::{types::Type, AsyncMessage, Client, NoTls, SimpleQueryMessage};

fn start(mode: &str, pool_size: u32, extra: &str) -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
pool_mode = "{mode}"
default_pool_size = {pool_size}
auth_type = "scram-sha-256"
{extra}
[[users]]
name = "app"
password = "secret"
[[databases]]
name = "app"
host = "127.0.0.1"
port = {}
"#,
        pg.primary().port
    ))
}

async fn connect(px: &Pgmux) -> Client {
    connect_str(&px.conn_str("app", "app", Some("secret"))).await
}

async fn connect_str(s: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(s, NoTls)
        .await
        .expect("connect through pgmux");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn rows_of(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_and_query_typed_in_transaction_mode() {
    let px = start("transaction", 2, "");
    let c = connect(&px).await;
    let msgs = c
        .simple_query("BEGIN; SELECT 1; SELECT 'two'; COMMIT;")
        .await
        .unwrap();
    assert_eq!(rows_of(&msgs), vec!["1", "two"]);
    let complete = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
        .count();
    assert_eq!(complete, 4, "BEGIN, two SELECTs and COMMIT each complete");

    let rows = c
        .query_typed(
            "SELECT $1::int + 1, $2::text",
            &[(&41i32, Type::INT4), (&"x", Type::TEXT)],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    assert_eq!(rows[0].get::<_, &str>(1), "x");
    // many round trips interleave with other clients on two servers
    let others: Vec<_> = futures_util::future::join_all((0..8).map(|_| connect(&px))).await;
    let work = others.iter().enumerate().map(|(i, o)| async move {
        for j in 0..20i32 {
            let r = o
                .query_typed("SELECT $1::int * 2", &[(&(i as i32 * 100 + j), Type::INT4)])
                .await
                .unwrap();
            assert_eq!(r[0].get::<_, i32>(0), (i as i32 * 100 + j) * 2);
        }
    });
    futures_util::future::join_all(work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_with_named_statements_in_session_mode() {
    let px = start("session", 2, "");
    let c = connect(&px).await;
    for i in 0..10i64 {
        let rows = c
            .query("SELECT $1::int8 * 3, current_database()", &[&i])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), i * 3);
        assert_eq!(rows[0].get::<_, &str>(1), "app");
    }
    let stmt = c.prepare("SELECT $1::text || '!'").await.unwrap();
    let row = c.query_one(&stmt, &[&"hi"]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "hi!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_transactions_and_recovery() {
    let px = start("transaction", 1, "");
    let mut c = connect(&px).await;
    let tx = c.transaction().await.unwrap();
    let err = tx.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    let err = tx.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        err.code().unwrap().code(),
        "25P02",
        "aborted transaction refuses more"
    );
    tx.rollback().await.unwrap();
    let msgs = c.simple_query("SELECT 'ok'").await.unwrap();
    assert_eq!(rows_of(&msgs), vec!["ok"]);
    // an error outside a transaction leaves the connection usable, with a pool of one
    let err = c
        .query_typed("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42P01");
    let other = connect(&px).await;
    assert_eq!(
        rows_of(&other.simple_query("SELECT 5").await.unwrap()),
        vec!["5"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_100k_rows() {
    let pg = PgCluster::shared();
    pg.psql(pg.primary(), "app", "CREATE TABLE IF NOT EXISTS copy_t (id int, v text); GRANT ALL ON copy_t TO app; TRUNCATE copy_t");
    let px = start("transaction", 2, "");
    let c = connect(&px).await;
    let sink = c.copy_in("COPY copy_t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tvalue {i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100_000);

    let stream = c.copy_out("COPY copy_t TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut bytes = Vec::new();
    while let Some(b) = stream.next().await {
        bytes.extend_from_slice(&b.unwrap());
    }
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.lines().count(), 100_000);
    assert!(text.contains("99999\tvalue 99999\n"));
    let sum = c
        .query_typed("SELECT sum(id)::int8 FROM copy_t", &[])
        .await
        .unwrap();
    assert_eq!(sum[0].get::<_, i64>(0), (0..100_000i64).sum::<i64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_in_session_mode() {
    let px = start("session", 3, "");
    let (listener, mut conn) =
        tokio_postgres::connect(&px.conn_str("app", "app", Some("secret")), NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.simple_query("LISTEN pgmux_chan").await.unwrap();
    let sender = connect(&px).await;
    sender
        .simple_query("NOTIFY pgmux_chan, 'hello'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ("pgmux_chan".to_string(), "hello".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let px = start("transaction", 2, "");
    let c = connect(&px).await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await });
    let pg = PgCluster::shared();
    wait_until_async("pg_sleep to run", Duration::from_secs(10), || async {
        pg.psql(pg.primary(), "postgres", "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'") == "1"
    })
    .await;
    token.cancel_query(NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014");
    // a cancel for a client with no query running does nothing harmful (acted on before
    // its next query: one arriving while that query waited for a server would cancel it)
    let idle = connect(&px).await;
    cancel_and_wait(&idle.cancel_token(), px.port).await;
    assert_eq!(
        rows_of(&idle.simple_query("SELECT 7").await.unwrap()),
        vec!["7"]
    );
}

async fn show(c: &Client) -> Vec<String> {
    rows_of(
        &c.simple_query(
            "SELECT current_setting('TimeZone') || ' ' || current_setting('application_name')",
        )
        .await
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_the_client_across_servers() {
    // one server: every client's settings must be applied on it before each use
    let px = start("transaction", 1, "");
    let base = px.conn_str("app", "app", Some("secret"));
    let paris = connect_str(&format!(
        "{base} application_name=paris options='-c TimeZone=Europe/Paris'"
    ))
    .await;
    let plain = connect_str(&format!("{base} application_name=plain")).await;
    let default_tz = show(&plain).await[0].split(' ').next().unwrap().to_string();
    assert_ne!(default_tz, "Europe/Paris");
    for _ in 0..3 {
        assert_eq!(show(&paris).await, vec!["Europe/Paris paris"]);
        assert_eq!(show(&plain).await, vec![format!("{default_tz} plain")]);
    }
    plain
        .simple_query("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(show(&paris).await, vec!["Europe/Paris paris"]);
    assert_eq!(show(&plain).await, vec!["Asia/Tokyo plain"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_reports_a_real_servers_parameters() {
    let px = start("transaction", 2, "");
    let c = connect_str(&format!(
        "{} application_name=probe",
        px.conn_str("app", "app", Some("secret"))
    ))
    .await;
    // tokio-postgres exposes what it was told through SHOW-equivalents; compare with the server
    let rows = rows_of(&c.simple_query("SHOW server_version").await.unwrap());
    let pg = PgCluster::shared();
    assert_eq!(
        rows[0],
        pg.psql(pg.primary(), "postgres", "SHOW server_version")
    );
    // psql prints the ParameterStatus-reported values in \conninfo-like variables
    let out = std::process::Command::new("psql")
        .arg(format!(
            "{} application_name=probe",
            px.conn_str("app", "app", Some("secret"))
        ))
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "\\echo :SERVER_VERSION_NAME :ENCODING",
            "-c",
            "SELECT current_setting('application_name')",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), format!("{} UTF8", rows[0]));
    assert_eq!(lines.next().unwrap(), "probe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_run_through_pgmux() {
    let px = start("transaction", 2, "");
    let out = std::process::Command::new("psql")
        .arg(px.conn_str("app", "app", Some("secret")))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "SELECT 0; SELECT sum(a) FROM (VALUES (1), (2)) v(a);"])
        .args(["-c", "BEGIN", "-c", "SELECT 40 + 2", "-c", "COMMIT"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l == "3"), "{text}");
    assert!(text.lines().any(|l| l == "42"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_and_notices_on_one_connection() {
    let px = start("transaction", 1, "");
    let (c, mut conn) = tokio_postgres::connect(&px.conn_str("app", "app", Some("secret")), NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    // tokio-postgres pipelines concurrent queries: many Syncs in flight on one server
    let queries = (0..50i32).map(|i| {
        let c = &c;
        async move {
            let r = c
                .query_typed("SELECT $1::int * 10", &[(&i, Type::INT4)])
                .await
                .unwrap();
            r[0].get::<_, i32>(0)
        }
    });
    let got = futures_util::future::join_all(queries).await;
    assert_eq!(got, (0..50).map(|i| i * 10).collect::<Vec<_>>());
    c.simple_query("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notice, "hello from plpgsql");
}

#[test]
fn function_calls_through_psql_large_objects() {
    // psql's \lo_import and \lo_export use libpq's fast-path FunctionCall messages
    let px = start("transaction", 2, "");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let psql = |cmd: &str| {
        let out = std::process::Command::new("psql")
            .arg(px.conn_str("app", "app", Some("secret")))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let imported = psql(&format!("\\lo_import {}", src.display()));
    let oid = imported.rsplit(' ').next().unwrap().to_string();
    psql(&format!("\\lo_export {oid} {}", dst.display()));
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    psql(&format!("\\lo_unlink {oid}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_the_server_for_the_next_client() {
    let px = start("session", 1, "");
    let first = connect(&px).await;
    first
        .simple_query(
            "SET search_path = pg_catalog; PREPARE p AS SELECT 1; CREATE TEMP TABLE tmp_x(a int)",
        )
        .await
        .unwrap();
    let pid = rows_of(&first.simple_query("SELECT pg_backend_pid()").await.unwrap());
    drop(first);
    let second = connect(&px).await;
    // the same server (a pool of one), wiped by DISCARD ALL
    assert_eq!(
        rows_of(
            &second
                .simple_query("SELECT pg_backend_pid()")
                .await
                .unwrap()
        ),
        pid
    );
    assert_eq!(
        rows_of(&second.simple_query("SHOW search_path").await.unwrap()),
        vec!["\"$user\", public"]
    );
    assert_eq!(
        rows_of(
            &second
                .simple_query("SELECT count(*) FROM pg_prepared_statements")
                .await
                .unwrap()
        ),
        vec!["0"]
    );
    assert_eq!(
        rows_of(
            &second
                .simple_query("SELECT count(*) FROM pg_class WHERE relname = 'tmp_x'")
                .await
                .unwrap()
        ),
        vec!["0"]
    );
}
