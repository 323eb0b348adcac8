//! Batches (`server_batch_size`): clients waiting in line with one standalone simple query
//! each get their queries sent to a freed server together. Each client must get its own
//! answer, whole and in order (errors, large and multi-statement answers included); work that
//! cannot be batched keeps its place in line; a client that leaves or stops reading, a cancel,
//! and a server that dies mid-batch must leave the pool as it was.
//!
//! Every test makes the line deterministically: a pool of one server, held by a client in a
//! transaction until the waiting clients show in SHOW POOLS, then released. The gathering
//! tests (`server_batch_gather_ms`) stop pgmux while two requests reach it instead.

mod common;

use common::probe::{metric, scrape, Console};
use common::raw;
use common::{cancel_and_wait, conn_str, free_port, wait_until_async, PgCluster, Pgmux};
use std::io::Write;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    px: Pgmux,
    metrics_port: u16,
    console: Console,
    db: String,
}

async fn start(db: &str, batch_size: u32) -> Setup {
    start_with(db, batch_size, "default_pool_size = 1").await
}

/// `start` with other settings (`extra`, which sets the pool size).
async fn start_with(db: &str, batch_size: u32, extra: &str) -> Setup {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    let metrics_port = free_port();
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
metrics_listen_port = {metrics_port}
admin_users = ["admin"]
server_batch_size = {batch_size}
{extra}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "admin"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
"#,
        pg.primary().port
    ));
    let console = Console::connect(&px, "admin", None).await;
    Setup {
        px,
        metrics_port,
        console,
        db: db.to_string(),
    }
}

impl Setup {
    async fn client(&self) -> Client {
        let (c, conn) =
            tokio_postgres::connect(&self.px.conn_str("app", &self.db, Some("secret")), NoTls)
                .await
                .expect("connect through pgmux");
        tokio::spawn(conn);
        c
    }

    /// Batches and batched queries so far.
    fn batches(&self) -> (f64, f64) {
        let m = scrape(self.metrics_port);
        let l = [("database", self.db.as_str())];
        (
            metric(&m, "pgmux_server_batches_total", &l),
            metric(&m, "pgmux_batched_queries_total", &l),
        )
    }

    async fn wait_waiting(&self, n: i64) {
        wait_until_async(&format!("{n} clients waiting"), WAIT, || async {
            self.console
                .pool(&self.db)
                .await
                .is_some_and(|p| p["cl_waiting"] == n)
        })
        .await;
    }

    async fn wait_batches(&self, n: f64) {
        wait_until_async(&format!("{n} batches"), WAIT, || async {
            self.batches().0 >= n
        })
        .await;
    }
}

/// A client holding the pool's only server inside a transaction (a lone BEGIN takes none:
/// `defer_begin`).
async fn hold(s: &Setup) -> Client {
    let holder = s.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    holder
}

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn spawn_simple(
    c: Client,
    sql: &'static str,
) -> JoinHandle<(
    Client,
    Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>,
)> {
    tokio::spawn(async move {
        let r = c.simple_query(sql).await;
        (c, r)
    })
}

const BIG: &str = "SELECT string_agg(x::text, ',') FROM generate_series(1, 40000) x";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batched_query_gets_its_own_answer() {
    let pg = PgCluster::shared();
    for size in [16u32, 0] {
        let db = format!("batch_answers_{size}");
        let s = start(&db, size).await;
        pg.psql(
            pg.primary(),
            &db,
            "CREATE TABLE t (x int); GRANT ALL ON t TO app",
        );
        let queries: [&'static str; 6] = [
            "SELECT 1 AS one",
            "SELECT 1/0",
            BIG,
            "SELECT x FROM generate_series(1, 5000) x",
            "INSERT INTO t VALUES (4)",
            "SELECT 5; SELECT 6",
        ];
        let mut clients = Vec::new();
        for _ in queries {
            clients.push(s.client().await);
        }
        let holder = hold(&s).await;
        let mut tasks = Vec::new();
        for (i, (c, q)) in clients.into_iter().zip(queries).enumerate() {
            tasks.push(spawn_simple(c, q));
            s.wait_waiting(i as i64 + 1).await;
        }
        holder.batch_execute("COMMIT").await.unwrap();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let ok = |i: usize| answers[i].1.as_ref().unwrap_or_else(|e| panic!("{i}: {e}"));
        assert_eq!(rows(ok(0)), vec![vec!["1".to_string()]]);
        let e = answers[1].1.as_ref().expect_err("division by zero");
        assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e}");
        let big = &rows(ok(2))[0][0];
        let expected: Vec<String> = (1..=40000).map(|x| x.to_string()).collect();
        assert_eq!(big, &expected.join(","), "the large answer, whole");
        let series = rows(ok(3));
        assert_eq!(series.len(), 5000);
        assert_eq!(series[4999], vec!["5000".to_string()]);
        assert!(matches!(ok(4)[0], SimpleQueryMessage::CommandComplete(1)));
        assert_eq!(
            rows(ok(5)),
            vec![vec!["5".to_string()], vec!["6".to_string()]]
        );
        assert_eq!(
            pg.psql(pg.primary(), &db, "SELECT count(*) FROM t"),
            "1",
            "the insert ran once"
        );
        // batched or not as configured: one batch of all six, or none
        let expected = if size > 1 { (1.0, 6.0) } else { (0.0, 0.0) };
        assert_eq!(s.batches(), expected, "server_batch_size = {size}");
        // every client goes on as before, and the server is back in the pool
        for (i, (c, _)) in answers.into_iter().enumerate() {
            let r = c.simple_query(&format!("SELECT {i}")).await.unwrap();
            assert_eq!(rows(&r), vec![vec![i.to_string()]]);
        }
        s.console.wait_idle(&db, 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_cannot_be_batched_keeps_its_place_in_line() {
    let s = start("batch_line", 16).await;
    let (a, b, tx, ext, typed, c) = (
        s.client().await,
        s.client().await,
        s.client().await,
        s.client().await,
        s.client().await,
        s.client().await,
    );
    let holder = hold(&s).await;
    let first = spawn_simple(a, "SELECT 'a'");
    s.wait_waiting(1).await;
    let second = spawn_simple(b, "SELECT 'b'");
    s.wait_waiting(2).await;
    // a transaction, then a named prepared statement (query): not batched; then the unnamed
    // statement of query_typed, which is
    let in_tx = tokio::spawn(async move {
        tx.batch_execute("BEGIN").await?;
        let r = tx.simple_query("SELECT 'tx'").await?;
        tx.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>(rows(&r))
    });
    s.wait_waiting(3).await;
    let extended = tokio::spawn(async move {
        let r = ext.query("SELECT $1::int + 1", &[&41i32]).await?;
        Ok::<i32, tokio_postgres::Error>(r[0].get(0))
    });
    s.wait_waiting(4).await;
    let typed_q = tokio::spawn(async move {
        let r = typed
            .query_typed(
                "SELECT $1::text",
                &[(&"typed", tokio_postgres::types::Type::TEXT)],
            )
            .await?;
        Ok::<String, tokio_postgres::Error>(r[0].get(0))
    });
    s.wait_waiting(5).await;
    let last = spawn_simple(c, "SELECT 'c'");
    s.wait_waiting(6).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows(&first.await.unwrap().1.unwrap()), vec![vec!["a"]]);
    assert_eq!(rows(&second.await.unwrap().1.unwrap()), vec![vec!["b"]]);
    assert_eq!(in_tx.await.unwrap().unwrap(), vec![vec!["tx"]]);
    assert_eq!(extended.await.unwrap().unwrap(), 42);
    assert_eq!(typed_q.await.unwrap().unwrap(), "typed");
    assert_eq!(rows(&last.await.unwrap().1.unwrap()), vec![vec!["c"]]);
    // a and b went together, stopping at the transaction; the prepared statement's Parse came
    // alone; then query_typed's unit and c went together
    assert_eq!(s.batches(), (2.0, 4.0));
    s.console.wait_idle("batch_line", 1).await;
}

/// A `DEALLOCATE ALL` drops every statement pgmux prepared on its server (psycopg sends one
/// after a ROLLBACK it ran as a statement): pgmux must know, or the next client's Bind of a
/// statement it believes the server holds fails with 26000. So it never runs in a batch, whose
/// client is lent a stand-in for the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deallocate_all_is_not_batched_and_statements_are_prepared_again() {
    let s = start("batch_deallocate", 16).await;
    let (user, dealloc, other) = (s.client().await, s.client().await, s.client().await);
    // the pool's only server now holds the statement
    let stmt = user.prepare("SELECT $1::int * 2").await.unwrap();
    let r = user.query_one(&stmt, &[&21i32]).await.unwrap();
    assert_eq!(r.get::<_, i32>(0), 42);
    let holder = hold(&s).await;
    let dropped = spawn_simple(dealloc, "DEALLOCATE ALL");
    s.wait_waiting(1).await;
    let after = spawn_simple(other, "SELECT 'after'");
    s.wait_waiting(2).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (_, r) = dropped.await.unwrap();
    assert!(
        matches!(r.unwrap()[..], [SimpleQueryMessage::CommandComplete(0)]),
        "DEALLOCATE ALL"
    );
    assert_eq!(rows(&after.await.unwrap().1.unwrap()), vec![vec!["after"]]);
    // the server lost the statement: pgmux prepares it again
    let r = user.query_one(&stmt, &[&5i32]).await.unwrap();
    assert_eq!(r.get::<_, i32>(0), 10);
    // user and holder stay connected
    s.console.wait_idle("batch_deallocate", 2).await;
}

/// A raw session logged in as app (all of them share their settings, so one server in step
/// with one is in step with all).
fn raw_login(s: &Setup) -> std::net::TcpStream {
    raw::login(s.px.addr().port(), "app", &s.db).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_up_its_batch_only_until_it_leaves() {
    let s = start("batch_stalled", 16).await;
    let mut holder = raw_login(&s);
    holder.write_all(&raw::query("BEGIN; SELECT 1")).unwrap();
    raw::until_ready(&mut holder);
    // its answer (tens of megabytes) fills every buffer on the way, and it never reads it
    let mut stalled = raw_login(&s);
    stalled
        .write_all(&raw::query(
            "SELECT repeat('x', 1000000) FROM generate_series(1, 50)",
        ))
        .unwrap();
    s.wait_waiting(1).await;
    let mut behind = Vec::new();
    for i in 0..3 {
        let mut c = raw_login(&s);
        c.write_all(&raw::query(&format!("SELECT {i}"))).unwrap();
        s.wait_waiting(i as i64 + 2).await;
        behind.push(c);
    }
    holder.write_all(&raw::query("COMMIT")).unwrap();
    raw::until_ready(&mut holder);
    s.wait_batches(1.0).await;
    assert_eq!(s.batches(), (1.0, 4.0));
    // the clients behind it wait for their answers while it stalls; once it is gone, they
    // get them
    drop(stalled);
    for (i, c) in behind.iter_mut().enumerate() {
        let msgs = raw::until_ready(c);
        let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a row");
        assert!(row.1.ends_with(i.to_string().as_bytes()), "{msgs:?}");
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));
    }
    s.console.wait_idle("batch_stalled", 4).await;
    // and the server still serves
    holder.write_all(&raw::query("SELECT 'after'")).unwrap();
    let msgs = raw::until_ready(&mut holder);
    assert!(raw::error_code(&msgs).is_none(), "{msgs:?}");
}

/// Waits until PostgreSQL runs `sql` for this database, and returns its backend's pid.
async fn running(db: &str, sql: &str) -> String {
    let pg = PgCluster::shared();
    let q = format!(
        "SELECT pid FROM pg_stat_activity WHERE datname = '{db}' AND state = 'active' \
         AND query = '{sql}'"
    );
    let mut pid = String::new();
    wait_until_async(&format!("{sql} running"), WAIT, || {
        pid = pg.psql(pg.primary(), "postgres", &q);
        let found = !pid.is_empty();
        async move { found }
    })
    .await;
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_batched_query_running_now() {
    let s = start("batch_cancel", 16).await;
    let (sleeper, next) = (s.client().await, s.client().await);
    let holder = hold(&s).await;
    let token = sleeper.cancel_token();
    let slow = spawn_simple(sleeper, "SELECT pg_sleep(60)");
    s.wait_waiting(1).await;
    let fast = spawn_simple(next, "SELECT 'next'");
    s.wait_waiting(2).await;
    holder.batch_execute("COMMIT").await.unwrap();
    running("batch_cancel", "SELECT pg_sleep(60)").await;
    assert_eq!(s.batches(), (1.0, 2.0));
    token.cancel_query(NoTls).await.unwrap();
    let e = slow.await.unwrap().1.expect_err("cancelled");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert_eq!(rows(&fast.await.unwrap().1.unwrap()), vec![vec!["next"]]);
    s.console.wait_idle("batch_cancel", 1).await;
}

/// Every thread of process `pid` is stopped (state `T` in /proc).
fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // the state follows the command name, which is in parentheses
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// A client of `db` straight on PostgreSQL, for the advisory locks that hold a batch's
/// queries where a test wants them.
async fn straight(db: &str) -> Client {
    let pg = PgCluster::shared();
    let (c, conn) = tokio_postgres::connect(
        &conn_str(pg.primary().port, "app", db, Some("secret")),
        NoTls,
    )
    .await
    .expect("connect straight to PostgreSQL");
    tokio::spawn(conn);
    c
}

/// A cancel for a query that waits behind another in its batch is sent when that query
/// starts: the query ahead is held on an advisory lock (taken straight on PostgreSQL) while
/// the cancel comes, then released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_for_a_query_queued_in_its_batch_reaches_it_when_it_runs() {
    let s = start("batch_qcancel", 16).await;
    let (ahead, queued) = (s.client().await, s.client().await);
    let locker = straight("batch_qcancel").await;
    locker
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(42)")
        .await
        .unwrap();
    let holder = hold(&s).await;
    let token = queued.cancel_token();
    let first = spawn_simple(ahead, "SELECT pg_advisory_xact_lock(42)");
    s.wait_waiting(1).await;
    let slow = spawn_simple(queued, "SELECT pg_sleep(60)");
    s.wait_waiting(2).await;
    holder.batch_execute("COMMIT").await.unwrap();
    running("batch_qcancel", "SELECT pg_advisory_xact_lock(42)").await;
    assert_eq!(s.batches(), (1.0, 2.0));
    // the sleep waits behind the lock: the cancel must wait for it to start
    token.cancel_query(NoTls).await.unwrap();
    locker.batch_execute("COMMIT").await.unwrap();
    let e = tokio::time::timeout(WAIT, slow)
        .await
        .expect("the queued query was not cancelled when it ran")
        .unwrap()
        .1
        .expect_err("cancelled");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert!(first.await.unwrap().1.is_ok());
    s.console.wait_idle("batch_qcancel", 1).await;
}

/// A cancel goes to the server while pgmux reads the answer of the request it is meant for;
/// PostgreSQL, which runs a batch's requests back to back, may run the next one by then,
/// another client's. Here the cancel is one asked while its quick query waited in the batch,
/// sent when pgmux sees that query start. pgmux is stopped (SIGSTOP) while PostgreSQL answers
/// the query ahead and the quick one and goes on to the request behind them, which waits on
/// an advisory lock: so the cancel lands on that request. It must not fail for a cancel its
/// client never asked for: it is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_reaches_the_request_behind_its_own_does_not_fail_it() {
    let s = start("batch_xcancel", 16).await;
    let (ahead, asker, behind) = (s.client().await, s.client().await, s.client().await);
    let locker = straight("batch_xcancel").await;
    locker
        .batch_execute("SELECT pg_advisory_lock(42), pg_advisory_lock(43)")
        .await
        .unwrap();
    let holder = hold(&s).await;
    let token = asker.cancel_token();
    let first = spawn_simple(ahead, "SELECT pg_advisory_xact_lock(42)");
    s.wait_waiting(1).await;
    let quick = spawn_simple(asker, "SELECT 'quick'");
    s.wait_waiting(2).await;
    const BEHIND: &str = "SELECT pg_advisory_xact_lock(43) AS behind";
    let victim = spawn_simple(behind, BEHIND);
    s.wait_waiting(3).await;
    holder.batch_execute("COMMIT").await.unwrap();
    running("batch_xcancel", "SELECT pg_advisory_xact_lock(42)").await;
    assert_eq!(s.batches(), (1.0, 3.0));
    // kept until pgmux sees the quick query start, then sent
    cancel_and_wait(&token, s.px.port).await;
    s.px.signal(libc::SIGSTOP);
    // a process stops once each of its threads has taken the signal, which under load may
    // be after kill(2) returned
    wait_until_async("pgmux stopped", WAIT, || async { stopped(s.px.pid()) }).await;
    locker
        .batch_execute("SELECT pg_advisory_unlock(42)")
        .await
        .unwrap();
    running("batch_xcancel", BEHIND).await;
    s.px.signal(libc::SIGCONT);
    assert!(first.await.unwrap().1.is_ok());
    assert_eq!(rows(&quick.await.unwrap().1.unwrap()), vec![vec!["quick"]]);
    // either its client got the cancel's error, or pgmux sent the request again
    wait_until_async("the cancel reached the request behind", WAIT, || async {
        victim.is_finished() || s.px.log().contains("CancelledForAnother")
    })
    .await;
    locker
        .batch_execute("SELECT pg_advisory_unlock(43)")
        .await
        .unwrap();
    let answer = victim
        .await
        .unwrap()
        .1
        .expect("not failed by another's cancel");
    assert_eq!(rows(&answer), vec![vec![""]]);
    s.console.wait_idle("batch_xcancel", 1).await;
}

/// A server lost in the middle of a batch fails the request it was running, as it fails any
/// client's; the requests behind it never ran (PostgreSQL runs a pipeline in turn) and are
/// sent again on another server: a write among them is done once. One whose client cancelled
/// it while it waited is answered as cancelled instead, and never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_mid_batch_fails_the_running_request_and_sends_the_rest_again() {
    let pg = PgCluster::shared();
    let s = start("batch_lost", 16).await;
    pg.psql(
        pg.primary(),
        "batch_lost",
        "DROP TABLE IF EXISTS lost_t; CREATE TABLE lost_t(n int); GRANT ALL ON lost_t TO app",
    );
    let sleeper = s.client().await;
    let behind = [s.client().await, s.client().await, s.client().await];
    let token = behind[1].cancel_token();
    let holder = hold(&s).await;
    let slow = spawn_simple(sleeper, "SELECT pg_sleep(60)");
    s.wait_waiting(1).await;
    let inserts = [
        "INSERT INTO lost_t VALUES (1)",
        "INSERT INTO lost_t VALUES (2)",
        "SELECT 'behind'",
    ];
    let mut handles = Vec::new();
    for (i, (c, sql)) in behind.into_iter().zip(inserts).enumerate() {
        handles.push(spawn_simple(c, sql));
        s.wait_waiting(i as i64 + 2).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let pid = running("batch_lost", "SELECT pg_sleep(60)").await;
    assert_eq!(s.batches(), (1.0, 4.0));
    // kept for the second insert, which waits in the batch, until it runs: it never does
    cancel_and_wait(&token, s.px.port).await;
    pg.psql(
        pg.primary(),
        "postgres",
        &format!("SELECT pg_terminate_backend({pid})"),
    );
    let e = slow.await.unwrap().1.expect_err("the running query fails");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    let mut answers = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (c, r) = h.await.unwrap();
        if i == 1 {
            let e = r.expect_err("the request cancelled while it waited is not sent again");
            assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
        } else {
            answers.push(rows(
                &r.expect("a request behind the lost one is sent again"),
            ));
        }
        // and the client goes on
        assert_eq!(
            rows(&c.simple_query("SELECT 'on'").await.unwrap()),
            vec![vec!["on"]]
        );
    }
    assert_eq!(answers[1], vec![vec!["behind"]]);
    assert_eq!(
        pg.psql(
            pg.primary(),
            "batch_lost",
            "SELECT string_agg(n::text, ',' ORDER BY n) FROM lost_t"
        ),
        "1"
    );
    s.console.wait_idle("batch_lost", 1).await;
}

/// A `BEGIN` behind a `--` comment that a carriage return ends (as PostgreSQL ends it) is
/// seen, so that request is not batched: batched, the requests behind it would run inside
/// its transaction, and a write among them would be lost with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_after_a_comment_ended_by_a_carriage_return_is_not_batched() {
    let pg = PgCluster::shared();
    let s = start("batch_cr", 16).await;
    pg.psql(
        pg.primary(),
        "batch_cr",
        "DROP TABLE IF EXISTS cr_t; CREATE TABLE cr_t(n int); GRANT ALL ON cr_t TO app",
    );
    let (opener, writer) = (s.client().await, s.client().await);
    let holder = hold(&s).await;
    let begins = spawn_simple(opener, "SELECT 1; -- note\rBEGIN");
    s.wait_waiting(1).await;
    let insert = spawn_simple(writer, "INSERT INTO cr_t VALUES (1)");
    s.wait_waiting(2).await;
    holder.batch_execute("COMMIT").await.unwrap();
    // the opener holds the only server in its transaction; the write waits for it
    let (opener, r) = begins.await.unwrap();
    r.expect("SELECT 1; BEGIN answered");
    opener.batch_execute("ROLLBACK").await.unwrap();
    insert.await.unwrap().1.expect("the write is done");
    assert_eq!(
        pg.psql(pg.primary(), "batch_cr", "SELECT count(*) FROM cr_t"),
        "1"
    );
    assert_eq!(s.batches(), (0.0, 0.0));
}

/// Gathering (`server_batch_gather_ms`): two requests that come in one turn of pgmux's
/// runtime. pgmux is stopped (SIGSTOP) while both reach its sockets, so that it sees them
/// together when it goes on; one thread (`workers = 1`), so both clients' tasks run in that
/// turn. The pool has three servers: one held in a transaction, two idle.
struct Gathering {
    s: Setup,
    holder: std::net::TcpStream,
}

impl Gathering {
    /// `pressure`: a client waits in line once (the pool ran out of servers) before the
    /// two idle servers are left; otherwise they are opened and left without any wait.
    /// `gather_ms`: server_batch_gather_ms, a window no test outlasts unless 0 (off).
    async fn start(db: &str, pressure: bool, gather_ms: u64) -> Gathering {
        let extra =
            format!("default_pool_size = 3\nworkers = 1\nserver_batch_gather_ms = {gather_ms}");
        let s = start_with(db, 16, &extra).await;
        let mut held: Vec<_> = (0..3).map(|_| raw_login(&s)).collect();
        for c in &mut held {
            c.write_all(&raw::query("BEGIN; SELECT 1")).unwrap();
            raw::until_ready(c);
        }
        if pressure {
            let mut waiter = raw_login(&s);
            waiter.write_all(&raw::query("SELECT 'waited'")).unwrap();
            s.wait_waiting(1).await;
            held[0].write_all(&raw::query("COMMIT")).unwrap();
            raw::until_ready(&mut held[0]);
            let msgs = raw::until_ready(&mut waiter);
            assert!(raw::error_code(&msgs).is_none(), "{msgs:?}");
        }
        for c in &mut held[..2] {
            c.write_all(&raw::query("COMMIT")).unwrap();
            raw::until_ready(c);
        }
        let holder = held.pop().unwrap();
        wait_until_async("two idle servers", WAIT, || async {
            s.console
                .pool(db)
                .await
                .is_some_and(|p| p["sv_idle"] == 2 && p["sv_active"] == 1)
        })
        .await;
        Gathering { s, holder }
    }

    /// The backend pids that answer two clients' `SELECT pg_backend_pid()`, sent while
    /// pgmux is stopped.
    async fn two_together(&mut self) -> (String, String) {
        let s = &self.s;
        let mut two = [raw_login(s), raw_login(s)];
        s.px.signal(libc::SIGSTOP);
        wait_until_async("pgmux stopped", WAIT, || async { stopped(s.px.pid()) }).await;
        for c in &mut two {
            c.write_all(&raw::query("SELECT pg_backend_pid()")).unwrap();
        }
        let ports: Vec<u16> = two.iter().map(|c| c.local_addr().unwrap().port()).collect();
        wait_until_async("both requests at pgmux's sockets", WAIT, || async {
            ports.iter().all(|&p| queued_at(s.px.addr().port(), p))
        })
        .await;
        s.px.signal(libc::SIGCONT);
        let [a, b] = two.map(|mut c| {
            let msgs = raw::until_ready(&mut c);
            let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a row");
            // DataRow: column count (2 bytes), length (4), the text
            String::from_utf8_lossy(&row.1[6..]).into_owned()
        });
        (a, b)
    }

    async fn finish(mut self, db: &str) {
        self.holder.write_all(&raw::query("COMMIT")).unwrap();
        raw::until_ready(&mut self.holder);
        self.s.console.wait_idle(db, 1).await;
    }
}

/// Whether the connection from local port `client` to pgmux's `port` has bytes pgmux has
/// not read yet (/proc/net/tcp, pgmux's side: local `port`, remote `client`, rx_queue > 0).
fn queued_at(port: u16, client: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let (local, remote) = (format!(":{port:04X}"), format!(":{client:04X}"));
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 4
            && f[1].ends_with(&local)
            && f[2].ends_with(&remote)
            && f[4]
                .split_once(':')
                .is_some_and(|(_, rx)| u64::from_str_radix(rx, 16).unwrap_or(0) > 0)
    })
}

/// Under pressure (the pool ran out of servers a moment ago), two requests that come
/// together go to one idle server in one write, though two are idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_come_together_under_pressure_go_to_one_idle_server() {
    let mut g = Gathering::start("batch_gather", true, 3_600_000).await;
    let before = g.s.batches();
    let (a, b) = g.two_together().await;
    assert_eq!(a, b, "one server answered both");
    let after = g.s.batches();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1.0, 2.0));
    g.finish("batch_gather").await;
}

/// Without pressure (the pool never ran out of servers), two requests that come together
/// take an idle server each: gathering never holds up a pool that has servers to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_come_together_without_pressure_take_a_server_each() {
    spread(
        Gathering::start("batch_spread", false, 3_600_000).await,
        "batch_spread",
    )
    .await;
}

/// `server_batch_gather_ms = 0`: under pressure too, each takes an idle server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_gathering_off_requests_under_pressure_take_a_server_each() {
    spread(
        Gathering::start("batch_nogather", true, 0).await,
        "batch_nogather",
    )
    .await;
}

async fn spread(mut g: Gathering, db: &str) {
    let before = g.s.batches();
    let (a, b) = g.two_together().await;
    assert_ne!(a, b, "each had a server of its own");
    assert_eq!(g.s.batches(), before);
    g.finish(db).await;
}
