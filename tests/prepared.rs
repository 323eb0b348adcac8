//! Transaction pooling that clients cannot tell from PostgreSQL: named prepared statements
//! follow each client across servers (tokio-postgres, pgbench -M prepared), statements are
//! evicted within max_prepared_statements, and Close behaves as PostgreSQL's.

mod common;

use common::{PgCluster, Pgmux};
use std::sync::Arc;
use tokio_postgres::{types::Type, Client, NoTls, SimpleQueryMessage};

fn start(db: &str, pool_size: u32, extra: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
pool_mode = "transaction"
default_pool_size = {pool_size}
auth_type = "trust"
{extra}
[[users]]
name = "app"
password = "secret"
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
        .unwrap();
    tokio::spawn(conn);
    c
}

fn first(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_named_statements_move_between_servers() {
    let db = "prep_tp";
    let px = Arc::new(start(db, 2, ""));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let px = px.clone();
            tokio::spawn(async move {
                let c = connect(&px, db).await;
                // prepared once, executed many times, on whichever server is free
                let double = c.prepare("SELECT $1::int8 * 2").await.unwrap();
                let concat = c
                    .prepare_typed("SELECT $1 || $2", &[Type::TEXT, Type::TEXT])
                    .await
                    .unwrap();
                for j in 0..40i64 {
                    let v = i * 1000 + j;
                    assert_eq!(
                        c.query_one(&double, &[&v]).await.unwrap().get::<_, i64>(0),
                        v * 2
                    );
                    // query() prepares and binds in two round trips: a statement per call
                    let r = c
                        .query("SELECT $1::int8 + 1, $2::text", &[&v, &"x"])
                        .await
                        .unwrap();
                    assert_eq!(r[0].get::<_, i64>(0), v + 1);
                    let s: String = c
                        .query_one(&concat, &[&"a", &j.to_string()])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(s, format!("a{j}"));
                    let t = c
                        .query_typed("SELECT $1::int8", &[(&v, Type::INT8)])
                        .await
                        .unwrap();
                    assert_eq!(t[0].get::<_, i64>(0), v);
                    assert_eq!(
                        first(&c.simple_query(&format!("SELECT {v}")).await.unwrap()),
                        v.to_string()
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// A Bind with a large parameter streams through with only its head rewritten: pgmux never
/// holds the whole message (it held it all, so memory grew with the parameter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_bind_of_a_named_statement_streams_through() {
    let db = "prep_bigbind";
    let px = start(db, 1, "max_message_size = 134217728");
    let c = connect(&px, db).await;
    let stmt = c.prepare("SELECT length($1::bytea)").await.unwrap();
    // warm up: buffers, the statement on the server
    let small = vec![7u8; 1000];
    let n: i32 = c.query_one(&stmt, &[&small]).await.unwrap().get(0);
    assert_eq!(n, 1000);
    let before = common::probe::peak_rss_kib(px.pid());
    const BIG: usize = 64 * 1024 * 1024;
    let big = vec![7u8; BIG];
    for _ in 0..2 {
        let n: i32 = c.query_one(&stmt, &[&big]).await.unwrap().get(0);
        assert_eq!(n as usize, BIG);
    }
    let grew = common::probe::peak_rss_kib(px.pid()) - before;
    println!("PEAK RSS grew by {grew} KiB for two 64 MiB Binds");
    assert!(grew < 16 * 1024, "peak RSS grew by {grew} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_inside_transactions_and_after_errors() {
    let db = "prep_tx";
    let px = start(db, 1, "");
    let mut c = connect(&px, db).await;
    let stmt = c.prepare("SELECT $1::int / $2::int").await.unwrap();
    let tx = c.transaction().await.unwrap();
    assert_eq!(
        tx.query_one(&stmt, &[&10i32, &2i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        5
    );
    let err = tx.query_one(&stmt, &[&1i32, &0i32]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    tx.rollback().await.unwrap();
    // the statement still works afterwards, from another client's turn on the server too
    let other = connect(&px, db).await;
    let o = other.prepare("SELECT $1::int / $2::int").await.unwrap();
    assert_eq!(
        other
            .query_one(&o, &[&9i32, &3i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
    assert_eq!(
        c.query_one(&stmt, &[&8i32, &4i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    // a Parse that fails leaves nothing behind that later calls trip over
    assert!(c.prepare("SELECT * FROM no_such_table_here").await.is_err());
    assert_eq!(
        c.query_one(&stmt, &[&6i32, &3i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_name_means_different_queries_for_different_clients() {
    // both clients name their first statement s0; on the one shared server they must not mix
    let db = "prep_names";
    let px = start(db, 1, "");
    let a = connect(&px, db).await;
    let b = connect(&px, db).await;
    let sa = a.prepare("SELECT 'a:' || $1::text").await.unwrap();
    let sb = b.prepare("SELECT 'b:' || $1::text").await.unwrap();
    for i in 0..10 {
        let i = i.to_string();
        assert_eq!(
            a.query_one(&sa, &[&i]).await.unwrap().get::<_, String>(0),
            format!("a:{i}")
        );
        assert_eq!(
            b.query_one(&sb, &[&i]).await.unwrap().get::<_, String>(0),
            format!("b:{i}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_each_server_within_max_prepared_statements() {
    let db = "prep_evict";
    let px = start(db, 1, "max_prepared_statements = 3");
    let c = connect(&px, db).await;
    let mut stmts = Vec::new();
    for k in 0..8 {
        stmts.push(
            c.prepare_typed(&format!("SELECT $1::int + {k}"), &[Type::INT4])
                .await
                .unwrap(),
        );
    }
    for round in 0..3 {
        for (k, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[&round]).await.unwrap().get(0);
            assert_eq!(v, round + k as i32);
        }
    }
    let on_server = first(
        &c.simple_query("SELECT count(*) FROM pg_prepared_statements")
            .await
            .unwrap(),
    );
    assert!(
        on_server.parse::<u32>().unwrap() <= 3,
        "{on_server} statements on the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_statements_are_gone_for_that_client_only() {
    let db = "prep_close";
    let px = start(db, 1, "");
    let a = connect(&px, db).await;
    let b = connect(&px, db).await;
    let sa = a.prepare("SELECT 42").await.unwrap();
    let sb = b.prepare("SELECT 42").await.unwrap();
    drop(sa); // tokio-postgres sends Close for it
              // b's identical statement shares the server-side one and survives a's Close
    for _ in 0..3 {
        assert_eq!(b.query_one(&sb, &[]).await.unwrap().get::<_, i32>(0), 42);
        assert_eq!(first(&a.simple_query("SELECT 1").await.unwrap()), "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_through_the_extended_protocol_returns_the_server() {
    use futures_util::SinkExt;
    let db = "prep_copy";
    let pg = PgCluster::shared();
    let px = start(db, 1, "query_wait_timeout = 20");
    pg.psql(
        pg.primary(),
        db,
        "CREATE TABLE IF NOT EXISTS c(x int); GRANT ALL ON c TO app",
    );
    let a = connect(&px, db).await;
    // tokio-postgres sends Sync right after Execute; PostgreSQL ignores it in copy-in mode
    let sink = a.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    // the only server went back to the pool: another client gets it
    let b = connect(&px, db).await;
    assert_eq!(
        first(&b.simple_query("SELECT 'served'").await.unwrap()),
        "served"
    );
}

#[test]
fn pgbench_in_every_query_mode() {
    let db = "prep_bench";
    let pg = PgCluster::shared();
    let px = start(db, 4, "");
    pg.pgbench_init(db);
    pg.psql(
        pg.primary(),
        db,
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO app",
    );
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &[][..]] {
            let out = std::process::Command::new("pgbench")
                .args(["-n", "-M", mode, "-c", "20", "-j", "2", "-t", "50"])
                .args(script)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &px.port.to_string(),
                    "-U",
                    "app",
                    db,
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "-M {mode} {script:?}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains("number of transactions actually processed: 1000/1000"),
                "{text}"
            );
            assert!(text.contains("number of failed transactions: 0"), "{text}");
        }
    }
}

/// What a client sees for a batch: each message's tag, with the SQLSTATE of errors, the
/// status of ReadyForQuery and the first column of rows.
fn batch(s: &mut std::net::TcpStream, msgs: &[Vec<u8>]) -> Vec<String> {
    use std::io::Write;
    s.write_all(&msgs.concat()).unwrap();
    common::raw::until_ready(s)
        .iter()
        .map(|(tag, body)| match tag {
            b'E' => format!(
                "E{}",
                common::raw::error_code(&[(b'E', body.clone())]).unwrap()
            ),
            b'Z' => format!("Z{}", body[0] as char),
            b'D' => format!("D{}", String::from_utf8_lossy(&body[6..])),
            t => (*t as char).to_string(),
        })
        .collect()
}

/// Runs `script` on PostgreSQL directly, checks its answers there (that they show what the
/// test is about), then runs it through pgmux (database `db`, a pool of `pool`): the
/// answers must be the same.
fn same_as_postgresql(
    db: &str,
    pool: u32,
    script: impl Fn(&mut std::net::TcpStream) -> Vec<Vec<String>>,
    check: impl Fn(&Vec<Vec<String>>),
) {
    use common::raw::login;
    let pg = PgCluster::shared();
    let (mut direct, _) = login(pg.primary().port, "postgres", "postgres");
    let expected = script(&mut direct);
    check(&expected);
    let px = start(db, pool, "");
    let (mut through, _) = login(px.port, "app", db);
    assert_eq!(script(&mut through), expected);
}

/// A Parse of `sql` (no parameter types) named `name`.
fn parse(name: &str, sql: &str) -> Vec<u8> {
    common::raw::msg(
        b'P',
        &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
    )
}

/// A Bind of statement `stmt` to the unnamed portal, without parameters.
fn bind(stmt: &str) -> Vec<u8> {
    common::raw::msg(b'B', &[b"\0", stmt.as_bytes(), b"\0\0\0\0\0\0\0"].concat())
}

fn exec() -> Vec<u8> {
    common::raw::msg(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    common::raw::msg(b'S', b"")
}

/// Bind, Execute and Sync of statement `stmt`.
fn run(stmt: &str) -> Vec<Vec<u8>> {
    vec![bind(stmt), exec(), sync()]
}

#[test]
fn a_statement_name_in_use_is_refused_as_postgresql_refuses_it() {
    use common::raw::{msg, query};
    let script = |s: &mut std::net::TcpStream| {
        vec![
            batch(s, &[parse("s1", "select 1"), sync()]),
            // again, alone (pgmux may answer Parse-only batches without a server)
            batch(s, &[parse("s1", "select 1"), sync()]),
            // other text, with more behind it: all skipped to Sync
            batch(s, &[parse("s1", "select 2"), bind("s1"), exec(), sync()]),
            batch(s, &[query("begin")]),
            batch(s, &[parse("s1", "select 3"), bind("s1"), exec(), sync()]),
            batch(s, &[query("rollback")]),
            // the statement is still the first one
            batch(s, &[bind("s1"), exec(), sync()]),
            // Close frees the name
            batch(
                s,
                &[
                    msg(b'C', b"Ss1\0"),
                    parse("s1", "select 4"),
                    bind("s1"),
                    exec(),
                    sync(),
                ],
            ),
        ]
    };
    same_as_postgresql("prepdup", 2, script, |expected| {
        assert!(expected[1].contains(&"E42P05".to_string()), "{expected:?}");
    });
}

/// A statement parsed, run and closed in one unit whose Parse fails: the server skips the
/// Close, and the name is free, as it was before the Parse (pgmux put the failed statement
/// back under the name, and the next Parse of it was refused or ran the old text).
/// Found by tests/differential.rs.
#[test]
fn a_close_skipped_after_its_failed_parse_leaves_the_name_free() {
    use common::raw::msg;
    let script = |s: &mut std::net::TcpStream| {
        let close = || msg(b'C', b"Ss2\0");
        vec![
            batch(
                s,
                &[parse("s2", "selec 1"), bind("s2"), exec(), close(), sync()],
            ),
            batch(s, &[parse("s2", "select 2"), bind("s2"), exec(), sync()]),
            batch(s, &[bind("s2"), exec(), close(), sync()]),
            batch(s, &[parse("s2", ""), bind("s2"), exec(), sync()]),
        ]
    };
    same_as_postgresql("prepclosed", 1, script, |expected| {
        assert_eq!(expected[0], ["E42601", "ZI"], "{expected:?}");
        assert_eq!(expected[1], ["1", "2", "D2", "C", "ZI"], "{expected:?}");
    });
}

/// asyncpg's statement cache parses a text under a new name and closes the old name of the
/// same text in one batch. When an error earlier in the batch skips both, the closed name still exists on
/// PostgreSQL. pgmux shares definitions by text and took the skipped Parse's definition for
/// the closed statement's: it forgot the name, and the next Bind of it got 26000.
#[test]
fn a_close_skipped_beside_a_skipped_parse_of_the_same_text_keeps_its_name() {
    let script = |s: &mut std::net::TcpStream| {
        let close = || common::raw::msg(b'C', b"Sa\0");
        vec![
            batch(s, &[parse("a", "select 1"), sync()]),
            batch(
                s,
                &[
                    parse("", "select 1/0"),
                    bind(""),
                    exec(),
                    parse("b", "select 1"),
                    close(),
                    sync(),
                ],
            ),
            batch(s, &run("a")),
            batch(s, &run("b")),
        ]
    };
    same_as_postgresql("prepclosedsame", 1, script, |expected| {
        assert_eq!(expected[1], ["1", "E22012", "ZI"], "{expected:?}");
        assert_eq!(expected[2][..3], ["2", "D1", "C"], "{expected:?}");
    });
}

/// PostgreSQL checks a Parse's name only once its text has parsed and been analysed: a name
/// in use with a text it refuses gets the text's error (42601, 42P01), not 42P05, which pgmux
/// answered. Found by tests/differential.rs.
#[test]
fn a_name_in_use_with_a_bad_text_gets_the_text_error() {
    let script = |s: &mut std::net::TcpStream| {
        vec![
            batch(s, &[parse("s1", "select 1"), sync()]),
            batch(
                s,
                &[
                    parse("s1", "select * from no_such_table"),
                    bind("s1"),
                    exec(),
                    sync(),
                ],
            ),
            batch(s, &[parse("s1", "selec 1"), sync()]),
            batch(s, &[parse("s1", "select 2"), sync()]),
            batch(s, &run("s1")),
        ]
    };
    same_as_postgresql("prepbadtext", 1, script, |expected| {
        assert_eq!(expected[1], ["E42P01", "ZI"], "{expected:?}");
        assert_eq!(expected[2], ["E42601", "ZI"], "{expected:?}");
        assert_eq!(expected[3], ["E42P05", "ZI"], "{expected:?}");
    });
}

/// `DEALLOCATE ALL`, `DISCARD ALL` (also as a named prepared statement, as pgjdbc runs it)
/// and `DEALLOCATE name` (between transactions and inside a transaction block) free the client's statement names as PostgreSQL does (drivers such as
/// PHP's PDO and Rails deallocate with SQL), so the names can be prepared again; a refused
/// `DEALLOCATE ALL` frees nothing.
#[test]
fn deallocate_and_discard_free_names_as_on_postgresql() {
    use common::raw::query;
    let script = |s: &mut std::net::TcpStream| {
        let mut out = vec![batch(s, &[parse("s1", "select 1"), sync()])];
        for (sql, next) in [
            ("DEALLOCATE ALL", "select 2"),
            ("discard all", "select 3"),
            ("DEALLOCATE s1", "select 4"),
            ("deallocate prepare S1;", "select 5"),
        ] {
            out.push(batch(s, &run("s1")));
            out.push(batch(s, &[query(sql)]));
            out.push(batch(s, &run("s1")));
            out.push(batch(s, &[parse("s1", next), sync()]));
        }
        // as pgjdbc sends it once prepareThreshold is reached: a named statement
        out.push(batch(s, &[parse("s9", "select 9"), sync()]));
        out.push(batch(
            s,
            &[&[parse("S_1", "DISCARD ALL")][..], &run("S_1")].concat(),
        ));
        out.push(batch(s, &run("s9")));
        out.push(batch(s, &run("S_1")));
        out.push(batch(s, &[parse("s9", "select 9"), sync()]));
        out.push(batch(s, &run("s9")));
        out.push(batch(s, &[parse("Mixed", "select 6"), sync()]));
        out.push(batch(s, &[query("DEALLOCATE \"Mixed\"")]));
        out.push(batch(s, &run("Mixed")));
        out.push(batch(s, &[query("DEALLOCATE nosuch")]));
        // refused inside a failed transaction: the statements stay
        out.push(batch(s, &[query("begin")]));
        out.push(batch(s, &[query("select 1/0")]));
        out.push(batch(s, &[query("DEALLOCATE ALL")]));
        out.push(batch(s, &[query("rollback")]));
        out.push(batch(s, &run("s1")));
        // inside a transaction block; a rollback does not bring the statement back
        out.push(batch(s, &[query("begin")]));
        out.push(batch(s, &[query("DEALLOCATE s1")]));
        out.push(batch(s, &run("s1")));
        out.push(batch(s, &[query("rollback")]));
        out.push(batch(s, &run("s1")));
        out.push(batch(s, &[parse("s1", "select 7"), sync()]));
        out.push(batch(s, &run("s1")));
        out
    };
    same_as_postgresql("prepdealloc", 2, script, |expected| {
        assert_eq!(expected[3], ["E26000", "ZI"], "{expected:?}");
    });
}

/// `DEALLOCATE name` between transactions while the client still holds its server: after
/// a failed COPY whose next CopyData was half sent at the error's ReadyForQuery (pgx goes on
/// sending rows), the server stays until that ends; a pinned client (a temporary table)
/// keeps it. PostgreSQL frees the name. The server knows the statement by pgmux's name: the
/// DEALLOCATE passed on to it failed (26000, pgx's statement cache after a refused row).
#[test]
fn deallocate_between_transactions_on_a_kept_server() {
    use common::raw::{msg, query};
    let script = |s: &mut std::net::TcpStream| {
        let mut out = vec![batch(
            s,
            &[query(
                "CREATE TABLE IF NOT EXISTS dealloc_copy (a int NOT NULL); \
                 ALTER TABLE dealloc_copy OWNER TO app",
            )],
        )];
        out.push(batch(s, &[parse("s1", "select 1"), sync()]));
        // a refused row, and the start of the next CopyData in the same write
        let next = msg(b'd', b"2\n3\n");
        out.push(batch(
            s,
            &[
                query("COPY dealloc_copy (a) FROM STDIN"),
                msg(b'd', b"\\N\n"),
                next[..6].to_vec(),
            ],
        ));
        // the rest of it and CopyDone, which PostgreSQL ignores, then the DEALLOCATE
        out.push(batch(
            s,
            &[next[6..].to_vec(), msg(b'c', b""), query("DEALLOCATE s1")],
        ));
        out.push(batch(s, &run("s1")));
        out.push(batch(s, &[parse("s1", "select 2"), sync()]));
        out.push(batch(s, &run("s1")));
        out.push(batch(s, &[query("CREATE TEMP TABLE dealloc_pin (a int)")]));
        out.push(batch(s, &[parse("s2", "select 3"), sync()]));
        out.push(batch(s, &[query("DEALLOCATE s2")]));
        out.push(batch(s, &run("s2")));
        out.push(batch(s, &[parse("s2", "select 4"), sync()]));
        out.push(batch(s, &run("s2")));
        out
    };
    same_as_postgresql("prepdeallockept", 2, script, |expected| {
        assert_eq!(expected[2], ["G", "E23502", "ZI"], "{expected:?}");
        assert_eq!(expected[3], ["C", "ZI"], "{expected:?}");
        assert_eq!(expected[4], ["E26000", "ZI"], "{expected:?}");
    });
}

/// Every answer to a pipeline ending in `syncs` ReadyForQuery messages, as `batch` shows them.
fn pipeline(s: &mut std::net::TcpStream, msgs: &[Vec<u8>], syncs: usize) -> Vec<String> {
    let mut out = batch(s, msgs);
    for _ in 1..syncs {
        out.extend(batch(s, &[]));
    }
    out
}

/// `DEALLOCATE ALL` or `DISCARD ALL` sent in one write with the requests behind it: those see
/// the statements gone (the first Bind fails, the name can be prepared again and it stays
/// defined afterwards), as on PostgreSQL.
#[test]
fn a_pipelined_deallocate_all_applies_to_what_follows_it() {
    use common::raw::query;
    let script = |s: &mut std::net::TcpStream| {
        let mut out = Vec::new();
        for (i, sql) in ["DEALLOCATE ALL", "DISCARD ALL", "deallocate prepare all"]
            .iter()
            .enumerate()
        {
            let old = format!("select {i}");
            out.push(batch(s, &[parse("s5", &old), sync()]));
            out.push(batch(s, &run("s5")));
            let mut msgs = vec![query(sql)];
            msgs.extend(run("s5"));
            msgs.push(parse("s5", &format!("select {i} + 10")));
            msgs.extend(run("s5"));
            out.push(pipeline(s, &msgs, 3));
            out.push(batch(s, &run("s5")));
            out.push(batch(s, &[query("DEALLOCATE ALL")]));
        }
        out
    };
    same_as_postgresql("prepdeallocpipe", 2, script, |expected| {
        assert!(expected[2].contains(&"E26000".to_string()), "{expected:?}");
    });
}

/// pgmux's statement names (`pgmux_<id>`) show in pg_prepared_statements; a client that
/// deallocates one with SQL must not break the other clients' statements on that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocating_pgmuxs_own_statement_names_harms_no_other_client() {
    let db = "prepdeallocours";
    let px = start(db, 1, "");
    let a = connect(&px, db).await;
    let stmt = a.prepare("SELECT 40 + $1::int").await.unwrap();
    let row = a.query_one(&stmt, &[&2i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let b = connect(&px, db).await;
    for round in 0..2 {
        let names = b
            .simple_query("SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgmux%'")
            .await
            .unwrap();
        let names: Vec<String> = names
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        assert!(
            !names.is_empty(),
            "round {round}: none of pgmux's statements listed"
        );
        let drop_them: String = names.iter().map(|n| format!("DEALLOCATE {n};")).collect();
        b.batch_execute(&drop_them).await.unwrap();
        // the statement still runs for its client, on the one server
        let row = a.query_one(&stmt, &[&2i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42, "round {round}");
    }
    drop(b);
    let row = a.query_one(&stmt, &[&3i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 43);
}

/// After a schema change PostgreSQL refuses to run a statement prepared before it (0A000
/// "cached plan must not change result type") until it is prepared again. pgmux shares one
/// server statement among clients, so a client preparing the text again must be given a
/// fresh one, not the outdated one: the same answers as PostgreSQL, for this client and for
/// another one preparing the same text.
#[test]
fn a_statement_outdated_by_a_schema_change_is_prepared_again() {
    use common::raw::{login, msg, query};
    let script = |port: u16, user: &str, db: &str| {
        let (mut s, _) = login(port, user, db);
        let (mut other, _) = login(port, user, db);
        let s = &mut s;
        let mut out = vec![
            batch(
                s,
                &[query("drop table if exists sch; create table sch (a int)")],
            ),
            batch(s, &[query("insert into sch values (7)")]),
            batch(s, &[parse("s1", "select * from sch"), sync()]),
            batch(s, &run("s1")),
            batch(s, &[query("alter table sch add column b int")]),
            batch(s, &run("s1")),
            batch(
                s,
                &[
                    msg(b'C', b"Ss1\0"),
                    parse("s1", "select * from sch"),
                    sync(),
                ],
            ),
            batch(s, &run("s1")),
            batch(s, &[parse("s2", "select * from sch"), sync()]),
            batch(s, &run("s2")),
        ];
        let other = &mut other;
        out.push(batch(other, &[parse("o1", "select * from sch"), sync()]));
        out.push(batch(other, &run("o1")));
        out
    };
    let pg = PgCluster::shared();
    pg.create_database("prepschema_direct", "postgres");
    let expected = script(pg.primary().port, "postgres", "prepschema_direct");
    assert_eq!(expected[5], ["E0A000", "ZI"], "{expected:?}");
    // one server, so the statement prepared before the change is the one reused
    let px = start("prepschema", 1, "");
    assert_eq!(script(px.port, "app", "prepschema"), expected);
}

/// A named Parse the server refuses, or skips after an earlier error in its batch, defines
/// no name, as on PostgreSQL: the client can prepare the name again, and binding it fails.
#[test]
fn a_parse_that_failed_or_was_skipped_defines_no_name() {
    use common::raw::query;
    let script = |s: &mut std::net::TcpStream| {
        vec![
            batch(s, &[parse("a", "selec 1"), sync()]),
            batch(s, &[bind("a"), exec(), sync()]),
            batch(s, &[parse("a", "select 1"), bind("a"), exec(), sync()]),
            // skipped after an error: once with a statement a server already has (pgmux
            // would answer its ParseComplete), once with a new one
            batch(s, &[bind("nosuch"), parse("b", "select 1"), sync()]),
            batch(s, &[bind("nosuch"), parse("c", "select 3"), sync()]),
            batch(s, &[bind("b"), exec(), sync()]),
            batch(s, &[bind("c"), exec(), sync()]),
            batch(s, &[parse("b", "select 2"), parse("c", "select 4"), sync()]),
            batch(s, &[bind("b"), exec(), bind("c"), exec(), sync()]),
            // inside a failed transaction PostgreSQL refuses every Parse (25P02), also of a
            // statement a server already has, and the name stays free
            batch(s, &[query("begin")]),
            batch(s, &[query("select 1/0")]),
            batch(s, &[parse("d", "select 1"), sync()]),
            batch(s, &[parse("e", "select 1"), bind("e"), exec(), sync()]),
            batch(s, &[parse("f", "select 5"), sync()]),
            batch(s, &[query("rollback")]),
            batch(s, &[bind("d"), exec(), sync()]),
            batch(s, &[parse("d", "select 6"), parse("e", "select 7"), sync()]),
            batch(s, &[bind("d"), exec(), bind("e"), exec(), sync()]),
            batch(s, &[parse("f", "select 8"), bind("f"), exec(), sync()]),
            // except a statement that ends the transaction
            batch(s, &[parse("r0", "rollback"), sync()]),
            batch(s, &[query("begin")]),
            batch(s, &[query("select 1/0")]),
            batch(s, &[parse("r", "rollback"), bind("r"), exec(), sync()]),
            batch(s, &[bind("r"), exec(), sync()]),
        ]
    };
    same_as_postgresql("prepfailed", 1, script, |expected| {
        assert_eq!(expected[0], ["E42601", "ZI"], "{expected:?}");
    });
}

/// An error about a client's statement names it as the client does, not by pgmux's name for
/// it on the server, as PostgreSQL would.
#[test]
fn errors_name_the_clients_statement() {
    use common::raw::{login, msg, until_ready};
    use std::io::Write;
    let message = |s: &mut std::net::TcpStream| {
        s.write_all(
            &[
                msg(b'P', b"p1\0select $1::int\0\0\0"),
                msg(b'S', b""),
                msg(b'B', b"\0p1\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
            ]
            .concat(),
        )
        .unwrap();
        until_ready(s);
        let answer = until_ready(s);
        let (_, body) = answer.iter().find(|(t, _)| *t == b'E').expect("an error");
        body.split(|&b| b == 0)
            .find(|f| f.first() == Some(&b'M'))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap()
    };
    let pg = PgCluster::shared();
    let (mut direct, _) = login(pg.primary().port, "postgres", "postgres");
    let expected = message(&mut direct);
    assert!(expected.contains("\"p1\""), "{expected}");
    let px = start("preperrname", 1, "");
    let (mut through, _) = login(px.port, "app", "preperrname");
    assert_eq!(message(&mut through), expected);
}

/// Each client's unnamed statement is its own, as on PostgreSQL, although in transaction
/// mode its server serves other clients between its transactions (pgx without a statement
/// cache parses and describes in one unit and binds in the next). Three clients share one
/// server through pgmux; directly, each has its own backend. Before pgmux followed the
/// unnamed statement, a client bound whatever another client had parsed last, or got 26000.
#[test]
fn each_client_keeps_its_own_unnamed_statement() {
    use common::raw::{login, msg, query};
    let describe = || msg(b'D', b"S\0");
    let close = || msg(b'C', b"S\0");
    let script =
        |a: &mut std::net::TcpStream, b: &mut std::net::TcpStream, c: &mut std::net::TcpStream| {
            vec![
                batch(a, &[parse("", "select 'a1'"), describe(), sync()]),
                batch(b, &[parse("", "select 'b1'"), sync()]),
                batch(a, &[describe(), bind(""), exec(), sync()]),
                batch(b, &[bind(""), exec(), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
                // never parsed one: PostgreSQL has none for it
                batch(c, &[bind(""), exec(), sync()]),
                batch(c, &[describe(), sync()]),
                // in one unit, with another client's in between
                batch(a, &[parse("", "select 'a2'"), bind(""), exec(), sync()]),
                batch(b, &[parse("", "select 'b2'"), bind(""), exec(), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
                // a simple Query drops it
                batch(a, &[query("select 'q'")]),
                batch(b, &[parse("", "select 'b3'"), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
                batch(b, &[bind(""), exec(), sync()]),
                // so does a Parse that fails, and a Close
                batch(a, &[parse("", "select 'a4'"), sync()]),
                batch(a, &[parse("", "selec 'a5'"), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
                batch(b, &[close(), sync()]),
                batch(a, &[parse("", "select 'a6'"), sync()]),
                batch(b, &[bind(""), exec(), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
                // inside a transaction block, and after it
                batch(a, &[query("begin")]),
                batch(a, &[parse("", "select 'a7'"), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
                batch(a, &[query("commit")]),
                batch(b, &[parse("", "select 'b8'"), bind(""), exec(), sync()]),
                batch(a, &[bind(""), exec(), sync()]),
            ]
        };
    let pg = PgCluster::shared();
    let direct = |_| login(pg.primary().port, "postgres", "postgres").0;
    let (mut a, mut b, mut c) = (direct(0), direct(1), direct(2));
    let expected = script(&mut a, &mut b, &mut c);
    assert_eq!(
        expected[2],
        ["t", "T", "2", "Da1", "C", "ZI"],
        "{expected:?}"
    );
    assert_eq!(expected[5], ["E26000", "ZI"], "{expected:?}");
    let px = start("prepunnamed", 1, "");
    let through = |_| login(px.port, "app", "prepunnamed").0;
    let (mut a, mut b, mut c) = (through(0), through(1), through(2));
    assert_eq!(script(&mut a, &mut b, &mut c), expected);
}

/// An unnamed statement that changes a setting (`set_config(..., false)`), parsed in one
/// lending and bound in another, on another server: pgmux sends its Parse again there and
/// notes what it does to that server's session, so the setting follows its client and does
/// not stay behind for the next one. Pool of two; B's transaction holds the first server.
#[test]
fn an_unnamed_set_config_bound_on_another_server_does_not_leak() {
    use common::raw::{login, msg, query};
    let px = start("prepunnamedset", 2, "");
    let (mut a, _) = login(px.port, "app", "prepunnamedset");
    let (mut b, _) = login(px.port, "app", "prepunnamedset");
    let (mut c, _) = login(px.port, "app", "prepunnamedset");
    let set = "select set_config('myapp.tenant', 'a', false)";
    let show = "select current_setting('myapp.tenant', true)";
    assert_eq!(
        batch(&mut a, &[parse("", set), msg(b'D', b"S\0"), sync()]),
        ["1", "t", "T", "ZI"]
    );
    assert_eq!(batch(&mut b, &[query("begin")]), ["C", "ZT"]);
    assert_eq!(batch(&mut a, &run("")), ["2", "Da", "C", "ZI"]);
    // C gets the server A's statement ran on, the other one being B's
    let c_sees = batch(&mut c, &[query(show)]);
    assert!(
        !c_sees.contains(&"Da".to_string()),
        "A's setting leaked: {c_sees:?}"
    );
    assert_eq!(batch(&mut b, &[query("commit")]), ["C", "ZI"]);
    for _ in 0..2 {
        assert!(batch(&mut a, &[query(show)]).contains(&"Da".to_string()));
    }
}

/// After an error PostgreSQL skips what the client sends up to its next Sync, also what
/// arrives after the error was sent (psycopg's pipeline mode sends its next statements while
/// it reads the answers): those messages get no answer, a Parse among them defines no name,
/// a Close closes nothing. pgmux kept expecting answers for them, so its own answers for the
/// client's next requests (ParseComplete, CloseComplete) went missing and the client waited.
#[test]
fn messages_sent_after_an_error_before_the_sync_are_skipped_as_on_postgresql() {
    use common::raw::{login, msg, read_msg};
    use std::io::Write;
    let script = |s: &mut std::net::TcpStream| {
        // the error comes back (a Flush, no Sync) before the rest of the batch is sent
        s.write_all(&[parse("a", "select 1/0"), bind("a"), exec(), msg(b'H', b"")].concat())
            .unwrap();
        let mut first = Vec::new();
        while let Some((tag, _)) = read_msg(s) {
            first.push((tag as char).to_string());
            if tag == b'E' {
                break;
            }
        }
        vec![
            first,
            batch(
                s,
                &[
                    parse("b", "select 2"),
                    bind("b"),
                    exec(),
                    parse("s1", "select 1"),
                    msg(b'C', b"Sa\0"),
                    bind("a"),
                    exec(),
                    sync(),
                ],
            ),
            // b and s1 were never made, a never closed
            batch(s, &[parse("b", "select 3"), bind("b"), exec(), sync()]),
            batch(s, &[parse("s1", "select 4"), bind("s1"), exec(), sync()]),
            batch(s, &[bind("a"), exec(), sync()]),
            batch(s, &[msg(b'C', b"Sa\0"), sync()]),
            batch(s, &[parse("a", "select 5"), bind("a"), exec(), sync()]),
        ]
    };
    let pg = PgCluster::shared();
    let (mut direct, _) = login(pg.primary().port, "postgres", "postgres");
    // a statement the server already has, so that pgmux answers its ParseComplete itself
    batch(&mut direct, &[parse("warm", "select 1"), sync()]);
    let expected = script(&mut direct);
    assert_eq!(expected[1], ["ZI"], "{expected:?}");
    let px = start("prepskipped", 1, "");
    let (mut through, _) = login(px.port, "app", "prepskipped");
    batch(&mut through, &[parse("warm", "select 1"), sync()]);
    assert_eq!(script(&mut through), expected);
}

/// A simple Query sent after an extended-protocol message that fails, before the Sync, is
/// skipped by PostgreSQL like the rest: only the Sync is answered. pgmux must not wait for a
/// ReadyForQuery of the Query, which would keep the server from going back to the pool (its
/// one server, here), and must not lend a server that still skips to a Sync.
#[test]
fn a_query_inside_a_failed_extended_batch_is_skipped_as_on_postgresql() {
    use common::raw::{login, msg, query, read_msg};
    use std::io::Write;
    let failing = || [parse("", "select 1/0"), bind(""), exec()].concat();
    let script = |s: &mut std::net::TcpStream| {
        // the error and the Query in one write
        let mut out = vec![batch(s, &[failing(), query("select 2"), sync()])];
        // the Query and Sync sent once the error came back (a Flush, no Sync)
        s.write_all(&[failing(), msg(b'H', b"")].concat()).unwrap();
        let mut first = Vec::new();
        while let Some((tag, _)) = read_msg(s) {
            first.push((tag as char).to_string());
            if tag == b'E' {
                break;
            }
        }
        out.push(first);
        out.push(batch(s, &[query("select 3"), sync()]));
        out.push(batch(s, &[query("select 4")]));
        out
    };
    let pg = PgCluster::shared();
    let (mut direct, _) = login(pg.primary().port, "postgres", "postgres");
    let expected = script(&mut direct);
    assert_eq!(expected[0], ["1", "E22012", "ZI"], "{expected:?}");
    assert_eq!(expected[2], ["ZI"], "{expected:?}");
    let px = start("prepquerymid", 1, "query_wait_timeout = 20");
    let (mut through, _) = login(px.port, "app", "prepquerymid");
    assert_eq!(script(&mut through), expected);
    // the server went back: another client gets it
    let (mut other, _) = login(px.port, "app", "prepquerymid");
    assert_eq!(
        batch(&mut other, &[query("select 5")]),
        ["T", "D5", "C", "ZI"]
    );

    // the Query after the failure, and no Sync yet: the server still skips, so it stays
    // with this client while another waits for it
    through
        .write_all(&[failing(), query("select 6"), msg(b'H', b"")].concat())
        .unwrap();
    let mut seen = Vec::new();
    while let Some((tag, _)) = read_msg(&mut through) {
        seen.push(tag);
        if tag == b'E' {
            break;
        }
    }
    assert_eq!(seen, [b'1', b'E']);
    let waiter = std::thread::spawn(move || {
        assert_eq!(
            batch(&mut other, &[query("select 7")]),
            ["T", "D7", "C", "ZI"]
        );
        other
    });
    // answered only after the Sync below: the server skipped to it first
    assert_eq!(batch(&mut through, &[sync()]), ["ZI"]);
    let mut other = waiter
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));

    // the same, and the client leaves before its Sync: the server, still skipping, is not
    // lent again (the next client's Query would be skipped too)
    through
        .write_all(&[failing(), query("select 8"), msg(b'H', b"")].concat())
        .unwrap();
    while read_msg(&mut through).is_some_and(|(tag, _)| tag != b'E') {}
    drop(through);
    assert_eq!(
        batch(&mut other, &[query("select 9")]),
        ["T", "D9", "C", "ZI"]
    );
}

/// A client's statement tracker is made at its first extended-protocol message: simple
/// Queries pipelined ahead of it in the same lending are still answered in order, around
/// pgmux's own ParseComplete. And a DISCARD ALL sent as a simple Query by a client that never
/// prepared anything (so has no tracker) still tells pgmux its server's statements are gone:
/// the next client's Bind is prepared again there, not refused with 26000.
#[test]
fn queries_before_the_first_parse_and_a_discard_from_a_client_without_statements() {
    use common::raw::{login, query};
    let script = |s: &mut std::net::TcpStream| {
        let pipelined = [
            query("select 1"),
            parse("p", "select 2"),
            bind("p"),
            exec(),
            sync(),
            query("select 3"),
        ];
        vec![
            batch(s, &pipelined),
            batch(s, &[]),
            batch(s, &[]),
            batch(s, &[bind("p"), exec(), sync()]),
        ]
    };
    let pg = PgCluster::shared();
    let (mut direct, _) = login(pg.primary().port, "postgres", "postgres");
    // a statement the server already has, so that pgmux answers the Parse itself
    batch(&mut direct, &[parse("warm", "select 2"), sync()]);
    let expected = script(&mut direct);
    assert_eq!(expected[0], ["T", "D1", "C", "ZI"], "{expected:?}");
    let px = start("prepfirst", 1, "");
    let (mut warm, _) = login(px.port, "app", "prepfirst");
    batch(&mut warm, &[parse("warm", "select 2"), sync()]);
    let (mut through, _) = login(px.port, "app", "prepfirst");
    assert_eq!(script(&mut through), expected);

    // the pool's one server holds pgmux's statements for `select 2` and `select 42`
    let (mut a, _) = login(px.port, "app", "prepfirst");
    let prepared = [parse("d", "select 42"), bind("d"), exec(), sync()];
    assert_eq!(batch(&mut a, &prepared), ["1", "2", "D42", "C", "ZI"]);
    let (mut b, _) = login(px.port, "app", "prepfirst");
    assert_eq!(batch(&mut b, &[query("DISCARD ALL")]), ["C", "ZI"]);
    assert_eq!(
        batch(&mut a, &[bind("d"), exec(), sync()]),
        ["2", "D42", "C", "ZI"]
    );
}
