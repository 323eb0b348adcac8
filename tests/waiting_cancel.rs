//! A cancel for a query still waiting for a server (the pool full): the client gets `57014`
//! at once, as from PostgreSQL, its request never reaches a server, and it keeps its
//! connection; the clients waiting with it are untouched. PgBouncer leaves such a client
//! waiting (pgbouncer/pgbouncer#1222).
//!
//! Each test holds the pool's only server in a transaction, so the line is made
//! deterministically, and waits on SHOW POOLS.

mod common;

use common::probe::Console;
use common::raw;
use common::{cancel_and_wait, wait_until_async, PgCluster, Pgmux};
use std::io::Write;
use std::time::Duration;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    px: Pgmux,
    url: String,
    console: Console,
    db: String,
}

async fn start(db: &str, batch_size: u32) -> Setup {
    start_on(
        PgCluster::shared(),
        db,
        &format!("server_batch_size = {batch_size}"),
        "",
    )
    .await
}

/// pgmux in front of `pg` (a pool of one server per host), `general` and `database` added to
/// its sections.
async fn start_on(pg: &PgCluster, db: &str, general: &str, database: &str) -> Setup {
    pg.create_database(db, "app");
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
admin_users = ["admin"]
default_pool_size = 1
{general}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "admin"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
{database}
"#,
        pg.primary().port
    ));
    let console = Console::connect(&px, "admin", None).await;
    let url = px.conn_str("app", db, Some("secret"));
    let s = Setup {
        px,
        url,
        console,
        db: db.to_string(),
    };
    s.client()
        .await
        .batch_execute("CREATE TABLE IF NOT EXISTS t (x int)")
        .await
        .unwrap();
    s
}

impl Setup {
    async fn client(&self) -> Client {
        let (c, conn) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("connect through pgmux");
        tokio::spawn(conn);
        c
    }

    /// Waits until `n` clients wait in line (the rows of a database with replicas, one per
    /// host, count its clients once between them).
    async fn wait_waiting(&self, n: i64) {
        wait_until_async(&format!("{n} clients waiting"), WAIT, || async {
            let rows = self.console.pools(&self.db).await;
            !rows.is_empty() && rows.iter().map(|p| p["cl_waiting"]).sum::<i64>() == n
        })
        .await;
    }

    async fn count(&self, c: &Client) -> i64 {
        c.query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// A cancelled request's outcome; bounded, so a cancel that does nothing fails the test
/// instead of hanging it (the pool stays held until the test releases it).
async fn answered<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("no answer to the cancelled request")
        .unwrap()
}

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

fn one_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// simple_query and query (extended protocol), with and without batches: the cancelled
/// insert never runs, the client works afterwards, and a client behind it in line is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_waiting_for_a_server_is_cancelled_at_once() {
    for (batch_size, db) in [(16, "wcancel_batch"), (0, "wcancel_plain")] {
        let s = start(db, batch_size).await;
        let holder = s.client().await;
        holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

        let simple = s.client().await;
        let token = simple.cancel_token();
        let waiting =
            tokio::spawn(async move { (simple.simple_query("INSERT INTO t VALUES (1)").await,) });
        s.wait_waiting(1).await;
        let behind = s.client().await;
        let behind_q = tokio::spawn(async move { behind.simple_query("SELECT 'behind'").await });
        s.wait_waiting(2).await;

        token.cancel_query(NoTls).await.unwrap();
        let e = answered(waiting)
            .await
            .0
            .expect_err("the insert was cancelled");
        assert_eq!(code(&e), Some("57014"), "{e}");
        s.wait_waiting(1).await;

        // extended protocol: the cancel ends the unit it waits with
        let extended = s.client().await;
        let token = extended.cancel_token();
        let waiting = tokio::spawn(async move {
            let r = extended
                .execute("INSERT INTO t VALUES ($1)", &[&2i32])
                .await;
            (extended, r)
        });
        s.wait_waiting(2).await;
        token.cancel_query(NoTls).await.unwrap();
        let (extended, r) = answered(waiting).await;
        let e = r.expect_err("the extended insert was cancelled");
        assert_eq!(code(&e), Some("57014"), "{e}");
        s.wait_waiting(1).await;

        holder.batch_execute("COMMIT").await.unwrap();
        let served = behind_q
            .await
            .unwrap()
            .expect("the client behind was served");
        assert_eq!(one_value(&served).as_deref(), Some("behind"));
        // neither insert reached a server, and the cancelled client goes on
        assert_eq!(s.count(&extended).await, 0, "a cancelled insert ran ({db})");
        assert_eq!(
            extended
                .query_one("SELECT $1::int + 1", &[&41i32])
                .await
                .unwrap()
                .get::<_, i32>(0),
            42
        );
        s.console.wait_idle(db, 2).await;
    }
}

/// A cancel for a client that waits with only part of a unit (no Sync yet) does nothing, as
/// PostgreSQL ignores a cancel when nothing runs: the unit, once whole, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_for_an_unfinished_unit_or_an_idle_client_does_nothing() {
    let s = start("wcancel_idle", 16).await;
    let idle = s.client().await;
    // nothing runs: no error later either (the cancel acted on before the next query)
    cancel_and_wait(&idle.cancel_token(), s.px.port).await;
    let holder = s.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let token = idle.cancel_token();
    let waiting = tokio::spawn(async move {
        let r = idle.simple_query("SELECT 'after'").await;
        (idle, r)
    });
    s.wait_waiting(1).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (idle, r) = waiting.await.unwrap();
    assert_eq!(one_value(&r.unwrap()).as_deref(), Some("after"));
    // a cancel sent while the client was idle did not linger to hit this later wait
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = tokio::spawn(async move { idle.simple_query("SELECT 'later'").await });
    s.wait_waiting(1).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        one_value(&waiting.await.unwrap().unwrap()).as_deref(),
        Some("later")
    );
    drop(token);

    // Parse, Bind, Execute without their Sync: the cancel finds no whole request to end
    let (mut unit, (pid, secret)) = raw::login(s.px.port, "app", "wcancel_idle");
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut head = raw::msg(b'P', b"\0SELECT 'unit'\0\0\0");
    head.extend(raw::msg(b'B', b"\0\0\0\0\0\0\0\0"));
    head.extend(raw::msg(b'E', b"\0\0\0\0\0"));
    unit.write_all(&head).unwrap();
    s.wait_waiting(1).await;
    let mut c = raw::connect(s.px.port);
    c.write_all(&raw::cancel_request(pid, secret)).unwrap();
    raw::until_eof(&mut c);
    unit.write_all(&raw::msg(b'S', b"")).unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    let answer = raw::until_ready(&mut unit);
    let tags: Vec<u8> = answer.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"12DCZ", "{answer:?}");
    drop(unit);
    s.console.wait_idle("wcancel_idle", 1).await;
}

/// A database with replicas: a write waiting for the primary's only server is cancelled in
/// line the same way, and never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_the_primary_is_cancelled_at_once() {
    let pg = PgCluster::shared_with_replicas();
    let replicas: Vec<String> = pg
        .replicas()
        .iter()
        .map(|r| format!("{{ host = \"127.0.0.1\", port = {} }}", r.port))
        .collect();
    let db = "wcancel_routed";
    let s = start_on(
        pg,
        db,
        "",
        &format!(
            "read_write_split = true\nreplicas = [ {} ]\nlag_check_interval = 0.1",
            replicas.join(", ")
        ),
    )
    .await;
    let holder = s.client().await;
    holder
        .batch_execute("BEGIN; INSERT INTO t VALUES (0)")
        .await
        .unwrap();
    let writer = s.client().await;
    let token = writer.cancel_token();
    let waiting = tokio::spawn(async move {
        let r = writer.simple_query("INSERT INTO t VALUES (1)").await;
        (writer, r)
    });
    s.wait_waiting(1).await;
    token.cancel_query(NoTls).await.unwrap();
    let (mut writer, r) = answered(waiting).await;
    let e = r.expect_err("the write was cancelled");
    assert_eq!(code(&e), Some("57014"), "{e}");
    s.wait_waiting(0).await;
    holder.batch_execute("COMMIT").await.unwrap();
    // on the primary (a transaction), only the holder's row
    let tx = writer.transaction().await.unwrap();
    let n: i64 = tx
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert_eq!(n, 1, "the cancelled write ran");
}

/// A PostgreSQL backend stopped (SIGSTOP) until dropped, continued then: a test that fails
/// midway must not leave the shared cluster with a backend that cannot shut down.
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        // SAFETY: kill(2) on a backend of the test's own cluster
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "stop backend {pid}"
        );
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A cancel that comes while a server is being handed to the client, after its wait and
/// before its request goes (pgmux brings the server's settings in step with the client's, a
/// round trip, first): the request must still be cancelled, not run. The server's backend is
/// stopped during that step, so the cancel comes then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_a_server_is_handed_over_cancels_the_request() {
    let db = "wcancel_handoff";
    let s = start(db, 0).await;
    let pg = PgCluster::shared();
    // the pool's only server (start_on used it): its backend, idle with default settings
    let pid: i32 = pg
        .psql(
            pg.primary(),
            "postgres",
            &format!(
                "SELECT pid FROM pg_stat_activity WHERE datname = '{db}' AND usename = 'app' \
                 AND backend_type = 'client backend'"
            ),
        )
        .parse()
        .expect("one server backend");
    let mut other: tokio_postgres::Config = s.url.parse().unwrap();
    other.application_name("handed_over");
    let (client, conn) = other.connect(NoTls).await.expect("connect through pgmux");
    tokio::spawn(conn);
    let token = client.cancel_token();
    let stopped = Stopped::stop(pid);
    let sleeping = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(60)").await;
        (client, r)
    });
    // the server taken, its application_name being set: the client still counts as waiting
    wait_until_async("the server handed over", WAIT, || async {
        s.console
            .pool(db)
            .await
            .is_some_and(|p| p["cl_waiting"] == 1 && p["sv_idle"] == 0)
    })
    .await;
    cancel_and_wait(&token, s.px.port).await;
    drop(stopped);
    let (client, r) = answered(sleeping).await;
    let e = r.expect_err("the request was cancelled");
    assert_eq!(code(&e), Some("57014"), "{e}");
    let after = client
        .simple_query("SELECT current_setting('application_name')")
        .await;
    assert_eq!(one_value(&after.unwrap()).as_deref(), Some("handed_over"));
    s.console.wait_idle(db, 1).await;
}

/// A client waiting for RESUME (the pool paused) is cancelled in line too, and works after
/// RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_waiting_for_resume_is_cancelled_at_once() {
    let s = start("wcancel_pause", 16).await;
    let c = s.client().await;
    s.console
        .client
        .simple_query("PAUSE wcancel_pause")
        .await
        .unwrap();
    let token = c.cancel_token();
    let waiting = tokio::spawn(async move {
        let r = c.simple_query("INSERT INTO t VALUES (1)").await;
        (c, r)
    });
    s.wait_waiting(1).await;
    token.cancel_query(NoTls).await.unwrap();
    let (c, r) = answered(waiting).await;
    let e = r.expect_err("the insert was cancelled");
    assert_eq!(code(&e), Some("57014"), "{e}");
    s.console
        .client
        .simple_query("RESUME wcancel_pause")
        .await
        .unwrap();
    assert_eq!(s.count(&c).await, 0, "the cancelled insert ran");
}

/// PAUSE lends nothing more, not even to clients already in line when it came: it completes
/// once the running transaction ends, with those clients still waiting (as with PgBouncer),
/// and RESUME serves them. With and without batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_the_clients_already_in_line() {
    for (batch_size, db) in [(16, "wpause_line_batch"), (0, "wpause_line_plain")] {
        let s = start(db, batch_size).await;
        let holder = s.client().await;
        holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let mut line = Vec::new();
        for i in 0..3 {
            let c = s.client().await;
            line.push(tokio::spawn(async move {
                c.simple_query("INSERT INTO t VALUES (1)").await
            }));
            s.wait_waiting(i + 1).await;
        }
        let admin = Console::connect(&s.px, "admin", None).await;
        let pause = tokio::spawn(async move {
            let r = admin.client.simple_query(&format!("PAUSE {db}")).await;
            (admin, r)
        });
        // PAUSE waits for the transaction; the line waits with it
        wait_until_async("the database paused", WAIT, || async {
            let dbs = s.console.show("SHOW DATABASES").await;
            dbs.iter().any(|d| d["name"] == db && d["paused"] == "1")
        })
        .await;
        holder.batch_execute("COMMIT").await.unwrap();
        let (_admin, r) = tokio::time::timeout(WAIT, pause)
            .await
            .expect("PAUSE did not complete")
            .unwrap();
        r.expect("PAUSE");
        assert!(
            line.iter().all(|q| !q.is_finished()),
            "a client in line was served during PAUSE"
        );
        s.wait_waiting(3).await;
        s.console
            .client
            .simple_query(&format!("RESUME {db}"))
            .await
            .unwrap();
        for q in line {
            answered(q).await.expect("served after RESUME");
        }
        assert_eq!(s.count(&holder).await, 3);
        // the three in line have left; the holder stays, with the server back in the pool
        s.console.wait_idle(db, 1).await;
    }
}
