//! Network and server faults between pgmux and a real PostgreSQL, injected by the relay in
//! tests/common/faults.rs (pgmux's `[[databases]]` point at it), and clients that vanish
//! halfway through their work. Each scenario asserts what the client sees, that nothing
//! half-done is committed, and that pgmux recovers: afterwards its pool is at rest (no server
//! lent, logging in or leaked, no client waiting), PostgreSQL holds no backend for the pool
//! once pgmux closes its idle servers, and pgmux holds exactly the file descriptors it held
//! before. Recovery times are printed (`RECOVERY ...` lines), not asserted; see
//! docs/reliability.md.
//!
//! Replica partitions and a stalled primary behind a routed database: tests/replica_faults.rs.

mod common;

use common::faults::{Fault, FaultRelay};
use common::probe::{fd_count, rss_kib, wait_fds, Console};
use common::raw;
use common::{wait_until, wait_until_async, PgCluster, Pgmux};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

fn config(db: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
pool_mode = "transaction"
default_pool_size = 2
server_connect_timeout = 2
query_wait_timeout = 20
admin_users = ["admin"]
{extra}
[[users]]
name = "app"
[[users]]
name = "admin"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {port}
server_user = "postgres"
"#
    )
}

/// pgmux in front of a relay in front of the shared cluster, its pool warmed and emptied.
struct Scene {
    db: String,
    relay: FaultRelay,
    px: Pgmux,
    console: Console,
    fds: usize,
}

impl Scene {
    async fn start(db: &str) -> Scene {
        Scene::start_with(db, |port| config(db, port, "")).await
    }

    /// As `start`, with pgmux's configuration made from the relay's port.
    async fn start_with(db: &str, make_config: impl Fn(u16) -> String) -> Scene {
        let pg = PgCluster::shared();
        pg.create_database(db, "app");
        pg.primary().psql(
            db,
            "CREATE TABLE IF NOT EXISTS t (x int); GRANT ALL ON t TO app",
        );
        let relay = FaultRelay::start(pg.primary().port);
        let px = Pgmux::start(&make_config(relay.port()));
        let console = Console::connect(&px, "admin", None).await;
        // the pool exists (and knows its server parameters) from the first login on
        let c = client(&px, db).await;
        c.simple_query("SELECT 1").await.unwrap();
        drop(c);
        console.wait_idle(db, 0).await;
        console.empty_pool(db).await;
        wait_until("relay connections closed", Duration::from_secs(30), || {
            relay.open() == 0
        });
        let fds = fd_count(px.pid());
        Scene {
            db: db.to_string(),
            relay,
            px,
            console,
            fds,
        }
    }

    async fn client(&self) -> Client {
        client(&self.px, &self.db).await
    }

    /// Rows of t, read directly from PostgreSQL.
    fn rows(&self) -> i64 {
        let pg = PgCluster::shared();
        pg.primary()
            .psql(&self.db, "SELECT count(*) FROM t")
            .parse()
            .unwrap()
    }

    /// The idle baseline: no client, nothing lent or waiting, no server left once idle ones
    /// are closed, no backend left in PostgreSQL, no relay connection, fds as before.
    async fn settled(&self) {
        self.relay.clear();
        self.console.wait_idle(&self.db, 0).await;
        self.console.empty_pool(&self.db).await;
        let pg = PgCluster::shared();
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.db
        );
        wait_until_async(
            "no backend left for the pool",
            Duration::from_secs(30),
            || {
                let n = pg.primary().psql(&self.db, &sql);
                async move { n == "0" }
            },
        )
        .await;
        wait_until("relay connections closed", Duration::from_secs(30), || {
            self.relay.open() == 0
        });
        wait_fds(self.px.pid(), self.fds).await;
    }

    /// Time until a new client's query succeeds, from now.
    async fn recovery(&self, scenario: &str) -> Duration {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(60);
        loop {
            if let Ok(c) = try_client(&self.px, &self.db).await {
                if c.simple_query("SELECT 1").await.is_ok() {
                    let took = t0.elapsed();
                    println!("RECOVERY {scenario}: {} ms", took.as_millis());
                    return took;
                }
            }
            assert!(Instant::now() < deadline, "{scenario}: no recovery in 60 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn try_client(px: &Pgmux, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(&px.conn_str("app", db, None), NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

async fn client(px: &Pgmux, db: &str) -> Client {
    try_client(px, db).await.expect("client login")
}

/// SQLSTATE, or the driver's own words when the error is not from a server.
fn kind(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None => e.to_string(),
    }
}

/// What the client was told: severity, SQLSTATE and message, or the driver's words.
fn told(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {} {}", d.severity(), d.code().code(), d.message()),
        None => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_mid_query() {
    let s = Scene::start("flt_reset_query").await;
    // well inside the result set, in the middle of some DataRow
    s.relay.set_all(Fault::ResetAfter(100_003));
    let port = s.px.port;
    let db = s.db.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let (mut c, _) = raw::login(port, "app", &db);
        c.write_all(&raw::query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 5000)",
        ))
        .unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        all
    })
    .await
    .unwrap();
    // walk what arrived: whole messages, then perhaps the start of one cut off
    let (mut rows, mut tags, mut at) = (0, Vec::new(), 0);
    while bytes.len() - at >= 5 {
        let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
        if bytes.len() - at < len + 1 {
            break;
        }
        match bytes[at] {
            b'D' => rows += 1,
            t => tags.push(t as char),
        }
        at += len + 1;
    }
    println!(
        "CLIENT SEES reset mid-query: {rows} whole rows, messages {tags:?}, then {} bytes of a \
         cut DataRow and EOF",
        bytes.len() - at
    );
    assert!(
        !tags.contains(&'C') && !tags.contains(&'Z'),
        "a cut result must never look complete: {tags:?}"
    );
    assert!(rows < 5000);
    // the tail is the start of a DataRow (header, 1 column, length 1000, then 'x's) and
    // nothing else: no error appended inside it, which drivers would misread
    let tail = &bytes[at..];
    assert_eq!(tail.first(), Some(&b'D'), "{tail:?}");
    assert!(
        tail.len() <= 11 || tail[11..].iter().all(|&b| b == b'x'),
        "bytes that are not the row's appended after the cut: {:?}",
        String::from_utf8_lossy(&tail[11.min(tail.len())..])
    );
    s.relay.clear();
    s.recovery("server reset mid-query").await;
    s.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_mid_transaction_commits_nothing() {
    let s = Scene::start("flt_reset_xact").await;
    let port = s.px.port;
    let db = s.db.clone();
    let mut c = tokio::task::spawn_blocking(move || {
        let (mut c, _) = raw::login(port, "app", &db);
        c.write_all(&raw::query("BEGIN; INSERT INTO t VALUES (1)"))
            .unwrap();
        let msgs = raw::until_ready(&mut c);
        assert_eq!(msgs.last().map(|m| m.1.clone()), Some(b"T".to_vec()));
        c
    })
    .await
    .unwrap();
    let applied = s.relay.applied();
    s.relay.set_all(Fault::Reset);
    wait_until("the reset", Duration::from_secs(10), || {
        s.relay.applied() > applied
    });
    // the client learns at once, without sending anything: pgmux watches its server
    let msgs = tokio::task::block_in_place(|| raw::until_eof(&mut c));
    let code = raw::error_code(&msgs);
    println!("CLIENT SEES reset mid-transaction: {code:?} then EOF");
    assert_eq!(code.as_deref(), Some("08006"), "{msgs:?}");
    s.relay.clear();
    drop(c);
    s.recovery("server reset mid-transaction").await;
    assert_eq!(s.rows(), 0, "nothing of the transaction is committed");
    s.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stalled_mid_query_holds_only_its_client() {
    let s = Scene::start("flt_stall_query").await;
    let port = s.px.port;
    let db = s.db.clone();
    let (mut stuck, _) = tokio::task::spawn_blocking(move || raw::login(port, "app", &db))
        .await
        .unwrap();
    // a statement after the BEGIN: a lone BEGIN takes no server (`defer_begin`)
    stuck.write_all(&raw::query("BEGIN; SELECT 1")).unwrap();
    let mut stuck = tokio::task::spawn_blocking(move || {
        raw::until_ready(&mut stuck);
        stuck
    })
    .await
    .unwrap();
    let ids = s.relay.conn_ids();
    assert_eq!(
        ids.len(),
        1,
        "the pool was emptied: one server, the stuck client's"
    );
    s.relay.set_conn(ids[0], Fault::Stall);
    stuck.write_all(&raw::query("SELECT 1")).unwrap();
    // with no query_timeout in pgmux, only the client's own patience ends the wait
    stuck
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::task::block_in_place(|| stuck.read(&mut byte));
    assert!(
        waited.is_err(),
        "no answer through a stalled server: {waited:?}"
    );
    // others are served meanwhile, on another server
    let other = s.client().await;
    for _ in 0..20 {
        other.simple_query("SELECT 1").await.unwrap();
    }
    drop(other);
    // the stuck client gives up and closes its socket: its server is closed, never lent again
    drop(stuck);
    s.console.wait_idle(&s.db, 0).await;
    s.recovery("server stalled mid-query (client gave up)")
        .await;
    s.settled().await;
}

/// The primary stalls under a write: with query_timeout the client gets a clear error instead
/// of waiting forever, the stuck server is closed, and other clients keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_primary_write_hits_query_timeout() {
    let pg = PgCluster::shared();
    let db = "flt_query_timeout";
    pg.create_database(db, "app");
    pg.primary().psql(
        db,
        "CREATE TABLE IF NOT EXISTS t (x int); GRANT ALL ON t TO app",
    );
    let relay = FaultRelay::start(pg.primary().port);
    let px = Pgmux::start(&config(db, relay.port(), "query_timeout = 1"));
    let console = Console::connect(&px, "admin", None).await;
    let warm = client(&px, db).await;
    warm.simple_query("SELECT 1").await.unwrap();
    drop(warm);
    console.wait_idle(db, 0).await;
    console.empty_pool(db).await;
    wait_until("relay connections closed", Duration::from_secs(30), || {
        relay.open() == 0
    });
    let fds = fd_count(px.pid());
    let s = Scene {
        db: db.to_string(),
        relay,
        px,
        console,
        fds,
    };

    let c = s.client().await;
    c.simple_query("BEGIN; SELECT 1").await.unwrap();
    let ids = s.relay.conn_ids();
    assert_eq!(ids.len(), 1, "one server, the writer's");
    s.relay.set_conn(ids[0], Fault::Stall);
    let e = c
        .simple_query("INSERT INTO t VALUES (1)")
        .await
        .expect_err("a stalled server cannot answer");
    println!("CLIENT SEES primary stalled mid-write: {}", told(&e));
    assert_eq!(kind(&e), "08P01", "{e}");
    assert!(told(&e).contains("query_timeout"), "{e}");
    // others are served on another server meanwhile
    let other = s.client().await;
    other.simple_query("SELECT 1").await.unwrap();
    drop(other);
    // a query that is merely slow gets the same answer
    let slow = s.client().await;
    let e = slow
        .simple_query("SELECT pg_sleep(5)")
        .await
        .expect_err("slower than query_timeout");
    assert_eq!(kind(&e), "08P01", "{e}");
    drop((c, slow));
    s.console.wait_idle(&s.db, 0).await;
    s.relay.clear();
    s.recovery("primary stalled mid-write (query_timeout 1 s)")
        .await;
    assert_eq!(s.rows(), 0, "the stalled write is not committed");
    s.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_idle_servers_are_replaced_unseen() {
    let s = Scene::start("flt_idle").await;
    let c = s.client().await;
    for fault in [Fault::Reset, Fault::HalfClose] {
        c.simple_query("SELECT 1").await.unwrap();
        s.console.wait_idle(&s.db, 1).await;
        assert_eq!(s.relay.open(), 1, "one idle server in the pool");
        let applied = s.relay.applied();
        s.relay.set_all(fault);
        wait_until("the fault", Duration::from_secs(10), || {
            s.relay.applied() > applied
        });
        s.relay.clear();
        // noticed while idle, as PgBouncer notices: not listed once it is gone
        wait_until_async(
            "the dead idle server dropped",
            Duration::from_secs(10),
            || async {
                s.console
                    .pool(&s.db)
                    .await
                    .is_some_and(|p| p["sv_idle"] == 0)
            },
        )
        .await;
        // pgmux checks an idle server before lending it: the client sees nothing
        let t0 = Instant::now();
        let rows = c.simple_query("SELECT 2").await;
        assert!(rows.is_ok(), "{fault:?} of an idle server: {rows:?}");
        println!(
            "RECOVERY idle server {fault:?}: first query {} ms, no error",
            t0.elapsed().as_millis()
        );
    }
    drop(c);
    s.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_or_stalled_during_login() {
    let s = Scene::start("flt_login").await;
    // the server's login answer is cut a few bytes in, then the server does not answer at all
    for (fault, what) in [
        (Fault::ResetAfter(23), "reset during login"),
        (Fault::Stall, "stalled during login"),
    ] {
        // no idle server to fall back on: the query needs a new login through the fault
        s.console.empty_pool(&s.db).await;
        s.relay.set_new(fault);
        let c = s.client().await;
        let e = c
            .simple_query("SELECT 1")
            .await
            .expect_err("no server to run it");
        println!("CLIENT SEES {what}: {}", told(&e));
        assert_eq!(kind(&e), "08006", "{what}: {e}");
        drop(c);
        s.relay.clear();
        s.recovery(what).await;
        s.console.wait_idle(&s.db, 0).await;
    }
    s.settled().await;
}

/// A client that reads a 50 MB result slowly: pgmux's memory stays bounded (the relay stops
/// reading the server while 64 KiB wait for the client) and another client is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_of_a_huge_result_is_held_back() {
    let s = Scene::start("flt_slow_reader").await;
    let rss_before = rss_kib(s.px.pid());
    let port = s.px.port;
    let db = s.db.clone();
    let (mut slow, _) = tokio::task::spawn_blocking(move || raw::login(port, "app", &db))
        .await
        .unwrap();
    let rows = 50_000;
    slow.write_all(&raw::query(&format!(
        "SELECT repeat('x', 1000) FROM generate_series(1, {rows})"
    )))
    .unwrap();
    // PostgreSQL blocks writing to pgmux: the backpressure reached the server
    let pg = PgCluster::shared();
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event = 'ClientWrite'",
        s.db
    );
    wait_until_async(
        "the server blocked on writing",
        Duration::from_secs(30),
        || {
            let n = pg.primary().psql(&s.db, &sql);
            async move { n == "1" }
        },
    )
    .await;
    let rss_held = rss_kib(s.px.pid());
    let other = s.client().await;
    for _ in 0..50 {
        other.simple_query("SELECT 1").await.unwrap();
    }
    drop(other);
    // now read it all, in small bites, and check nothing was lost
    let pid = s.px.pid();
    let counted = tokio::task::spawn_blocking(move || {
        let mut data_rows = 0;
        let mut peak = 0;
        let mut buf = [0u8; 4096];
        let mut pending = Vec::new();
        loop {
            let n = slow.read(&mut buf).unwrap();
            assert!(n > 0, "closed before ReadyForQuery");
            pending.extend_from_slice(&buf[..n]);
            let mut at = 0;
            let mut done = false;
            while pending.len() - at >= 5 {
                let len = u32::from_be_bytes(pending[at + 1..at + 5].try_into().unwrap()) as usize;
                if pending.len() - at < len + 1 {
                    break;
                }
                match pending[at] {
                    b'D' => data_rows += 1,
                    b'Z' => done = true,
                    _ => {}
                }
                at += len + 1;
            }
            pending.drain(..at);
            if data_rows % 5000 == 0 {
                peak = peak.max(rss_kib(pid));
            }
            if done {
                return (data_rows, peak);
            }
        }
    });
    let (data_rows, peak) = counted.await.unwrap();
    println!(
        "SLOW READER: pgmux RSS {rss_before} KiB before, {rss_held} KiB while the server was \
         blocked, at most {peak} KiB while 50 MB were relayed"
    );
    assert_eq!(data_rows, rows, "every row arrives");
    // a whole result held in memory would be 50 MB; pgmux may hold a few buffers
    assert!(
        rss_held.max(peak) < rss_before + 16 * 1024,
        "pgmux's memory grew with the result: {rss_before} -> {rss_held} / {peak} KiB"
    );
    s.settled().await;
}

/// Clients that vanish mid-COPY (with or without a Terminate first, as pgx sends when a
/// context deadline cuts its CopyFrom short), mid-transaction and mid-extended-batch: nothing
/// they did is committed, and the server is closed rather than lent to the next client. (After
/// the Terminate pgmux waited for the server's answer, which in COPY FROM STDIN never comes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanishing_clients_leave_nothing_half_done() {
    let s = Scene::start("flt_vanish").await;
    let unsynced_insert = [
        raw::msg(b'P', b"\0INSERT INTO t VALUES (3)\0\0\0"),
        raw::msg(b'B', b"\0\0\0\0\0\0\0\0"),
        raw::msg(b'E', b"\0\0\0\0\0"),
        raw::msg(b'H', b""),
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        // (what, bytes, the message to wait for before vanishing)
        ("mid-COPY", raw::query("COPY t FROM STDIN"), b'G'),
        ("mid-COPY, Terminate", raw::query("COPY t FROM STDIN"), b'G'),
        (
            "mid-transaction",
            raw::query("BEGIN; INSERT INTO t VALUES (2)"),
            b'Z',
        ),
        ("mid-extended-batch", unsynced_insert, b'C'),
    ];
    for (what, bytes, wait_for) in cases {
        let port = s.px.port;
        let db = s.db.clone();
        tokio::task::spawn_blocking(move || {
            let (mut c, _) = raw::login(port, "app", &db);
            c.write_all(&bytes).unwrap();
            loop {
                let (tag, body) = raw::read_msg(&mut c).expect("an answer");
                assert_ne!(tag, b'E', "{what}: {}", String::from_utf8_lossy(&body));
                if tag == wait_for {
                    break;
                }
            }
            if wait_for == b'G' {
                // some rows, then gone without CopyDone
                c.write_all(&raw::msg(b'd', b"1\n2\n3\n")).unwrap();
                if what.ends_with("Terminate") {
                    c.write_all(&raw::msg(b'X', b"")).unwrap();
                }
            }
            // gone without Terminate
        })
        .await
        .unwrap();
        let row = s.console.wait_idle(&s.db, 0).await;
        assert_eq!(
            row["sv_idle"], 0,
            "{what}: the server was closed, not pooled"
        );
        // the next client gets a clean server: not in a transaction, not in COPY
        // (a simple Query: its transaction starts with its statement unless one was open)
        let c = s.client().await;
        let rows = c
            .simple_query("SELECT count(*), now() = statement_timestamp() FROM t")
            .await
            .unwrap();
        let Some(row) = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }) else {
            panic!("{what}: no row: {rows:?}");
        };
        assert_eq!(row.get(0), Some("0"), "{what}: nothing committed");
        assert_eq!(row.get(1), Some("t"), "{what}: no transaction left open");
        drop(c);
        assert_eq!(s.rows(), 0, "{what}: nothing committed");
        println!("CLIENT VANISHED {what}: nothing committed, server closed");
        s.settled().await;
    }
}

/// PostgreSQL stopped (fast, then immediate) and started again while clients keep working:
/// they see errors that name the shutdown or the lost connection, then work again, and the
/// pool comes back to rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load() {
    let pg = PgCluster::start(0);
    let db = "app";
    let px = Pgmux::start(&config(db, pg.primary().port, ""));
    let console = Console::connect(&px, "admin", None).await;
    let warm = client(&px, db).await;
    warm.simple_query("CREATE TABLE IF NOT EXISTS load (x int)")
        .await
        .unwrap();
    drop(warm);
    console.wait_idle(db, 0).await;
    console.empty_pool(db).await;
    let fds = fd_count(px.pid());

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    // ms since `base` of the first success after an outage began (u64::MAX: none yet)
    let base = Instant::now();
    let first_ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let mut workers = Vec::new();
    for i in 0..8 {
        let url = px.conn_str("app", db, None);
        let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
        let first_ok = first_ok.clone();
        workers.push(tokio::spawn(async move {
            let mut c: Option<Client> = None;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if c.as_ref().is_none_or(Client::is_closed) {
                    match tokio_postgres::connect(&url, NoTls).await {
                        Ok((client, conn)) => {
                            tokio::spawn(conn);
                            c = Some(client);
                        }
                        Err(e) => {
                            *errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let sql = if i % 2 == 0 {
                    "SELECT count(*) FROM load"
                } else {
                    "BEGIN; INSERT INTO load VALUES (1); COMMIT"
                };
                match c.as_ref().unwrap().simple_query(sql).await {
                    Ok(_) => {
                        ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let at = base.elapsed().as_millis() as u64;
                        first_ok.fetch_min(at, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) => {
                        *errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    let count_ok = || ok.load(std::sync::atomic::Ordering::SeqCst);
    for mode in ["fast", "immediate"] {
        let before = count_ok();
        wait_until_async("load running", Duration::from_secs(30), || {
            let n = count_ok();
            async move { n > before + 50 }
        })
        .await;
        let primary = pg.primary();
        let stopping = base.elapsed().as_millis() as u64;
        tokio::task::block_in_place(|| primary.stop(mode));
        let down = count_ok();
        // nothing can succeed while the server is down: the next success is the recovery
        first_ok.store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
        let starting = base.elapsed().as_millis() as u64;
        tokio::task::block_in_place(|| primary.start());
        let started = base.elapsed().as_millis() as u64;
        wait_until_async("load running again", Duration::from_secs(60), || {
            let n = count_ok();
            async move { n > down + 50 }
        })
        .await;
        let back = first_ok.load(std::sync::atomic::Ordering::SeqCst);
        println!(
            "RECOVERY postgres stop -m {mode} + start: stop took {} ms, start {} ms; first client \
             query ok {} ms after the stop began, {} ms after pg_ctl start began",
            starting - stopping,
            started - starting,
            back - stopping,
            back as i64 - starting as i64,
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    println!(
        "CLIENT SEES postgres restarts: {} queries ok, errors by kind {errors:?}",
        count_ok()
    );
    // 57P01: terminating connection due to administrator command (fast); 08006: pgmux's
    // server-lost or cannot-connect error; 57P03: the database system is starting up or
    // shutting down; the rest: the driver's words for a connection pgmux closed after a FATAL
    for k in errors.keys() {
        assert!(
            ["57P01", "57P02", "57P03", "08006", "08P01"].contains(&k.as_str())
                || k.contains("connection closed")
                || k.contains("error communicating with the server"),
            "an error the restart does not explain: {k} ({errors:?})"
        );
    }
    console.wait_idle(db, 0).await;
    console.empty_pool(db).await;
    wait_fds(px.pid(), fds).await;
}

/// One server (pool_size 1) and an advisory lock held directly in PostgreSQL that the
/// clients' queries wait on, so the test decides when each query ends.
struct LateCancel {
    s: Scene,
    locker: Client,
}

impl LateCancel {
    async fn start(db: &str) -> LateCancel {
        let s = Scene::start_with(db, |port| {
            config(db, port, "").replace("default_pool_size = 2", "default_pool_size = 1")
        })
        .await;
        let pg = PgCluster::shared();
        let (locker, conn) =
            tokio_postgres::connect(&pg.primary().conn_str("postgres", db, None), NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        LateCancel { s, locker }
    }

    async fn lock(&self) {
        self.locker
            .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(42)")
            .await
            .unwrap();
    }

    async fn unlock(&self) {
        self.locker.batch_execute("COMMIT").await.unwrap();
    }

    /// The locker leaves (its backend would count as one left behind), then the baseline.
    async fn settled(self) {
        drop(self.locker);
        self.s.settled().await;
    }

    /// Backends of the database waiting for a lock.
    fn lock_waiters(&self) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
            self.s.db
        );
        PgCluster::shared()
            .primary()
            .psql(&self.s.db, &sql)
            .parse()
            .unwrap()
    }

    /// Client A's query waits on the lock; A sends a cancel, whose connection from pgmux to
    /// PostgreSQL gets `fault` in the relay; then the lock is released and A's query ends
    /// normally, before its cancel reaches the server. Returns A's backend pid.
    async fn cancel_outlived(&self, fault: Fault) -> (Client, i32) {
        self.lock().await;
        let a = self.s.client().await;
        let token = a.cancel_token();
        let a_query = tokio::spawn(async move {
            let r = a
                .simple_query("SELECT pg_backend_pid(), pg_advisory_xact_lock(42)")
                .await;
            (a, r)
        });
        wait_until("A waits on the lock", Duration::from_secs(30), || {
            self.lock_waiters() == 1
        });
        let accepted = self.s.relay.accepted();
        self.s.relay.set_new(fault);
        tokio::spawn(async move { token.cancel_query(NoTls).await });
        wait_until(
            "pgmux opened the cancel connection",
            Duration::from_secs(30),
            || self.s.relay.accepted() > accepted,
        );
        // later server connections pass; the cancel's keeps its fault
        self.s.relay.set_new(Fault::Pass);
        self.unlock().await;
        let (a, r) = a_query.await.unwrap();
        let rows = r.expect("A's query ends before its cancel arrives");
        (a, first_int(&rows))
    }
}

fn first_int(rows: &[tokio_postgres::SimpleQueryMessage]) -> i32 {
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .expect("a row")
}

/// A cancel that reaches PostgreSQL after its query ended must not cancel the next query on
/// that server, which in transaction mode is another client's: the server is held back
/// (`sv_being_canceled`) until PostgreSQL has taken the cancel, then lent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_cancel_never_hits_the_next_client() {
    let lc = LateCancel::start("flt_late_cancel").await;
    let s = &lc.s;
    // the cancel's connection is stalled in the relay: it reaches PostgreSQL when lifted
    let (a, a_pid) = lc.cancel_outlived(Fault::Stall).await;
    // B's query waits on the lock too, if it gets a server
    lc.lock().await;
    let b = s.client().await;
    let b_query = tokio::spawn(async move {
        b.simple_query("SELECT pg_backend_pid(), pg_advisory_xact_lock(42)")
            .await
    });
    // either B runs on A's server while the cancel is on its way, or it waits for it
    let held = std::cell::Cell::new(false);
    wait_until_async(
        "B running or waiting for a server",
        Duration::from_secs(30),
        || {
            let running = lc.lock_waiters() == 1;
            let held = &held;
            async move {
                let row = s.console.pool(&s.db).await.unwrap();
                if row["cl_waiting"] == 1 && row["sv_being_canceled"] == 1 {
                    held.set(true);
                }
                running || held.get()
            }
        },
    )
    .await;
    let held = held.get();
    println!("LATE CANCEL: server held back while the cancel was on its way: {held}");
    // the cancel goes through; PostgreSQL closes its connection once it signalled the backend
    s.relay.clear();
    wait_until("the cancel delivered", Duration::from_secs(30), || {
        s.relay.open() == 1
    });
    // B now runs on the server (or was cancelled on it); then the lock goes
    wait_until("B's query under way", Duration::from_secs(30), || {
        b_query.is_finished() || lc.lock_waiters() == 1
    });
    lc.unlock().await;
    let rows = b_query
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("A's late cancel hit B's query: {}", told(&e)));
    assert_eq!(first_int(&rows), a_pid, "one server: B ran on A's");
    assert!(
        held,
        "the server was not held back while its cancel was on its way"
    );
    drop(a);
    lc.settled().await;
}

/// A cancel that cannot be delivered (its connection blackholed: neither refused nor
/// answered) is given up after server_connect_timeout; whether it reached the backend is
/// unknown, so the server is closed rather than lent, and a client waiting for it gets a
/// fresh one. The client that sent the cancel has left meanwhile: nothing is stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_cancel_closes_its_server() {
    let lc = LateCancel::start("flt_lost_cancel").await;
    let s = &lc.s;
    let (a, a_pid) = lc.cancel_outlived(Fault::Blackhole).await;
    drop(a);
    let b = s.client().await;
    let t0 = Instant::now();
    let rows = b
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap_or_else(|e| panic!("B after an undeliverable cancel: {}", told(&e)));
    println!(
        "LOST CANCEL: B served by a new server {} ms after asking (server_connect_timeout 2 s)",
        t0.elapsed().as_millis()
    );
    assert_ne!(
        first_int(&rows),
        a_pid,
        "the server whose cancel was lost was lent again"
    );
    drop(b);
    lc.settled().await;
}

/// A server idle in the pool whose peer vanished without FIN or RST (blackholed: whatever
/// is sent is swallowed, nothing comes back) looks alive to the idle socket check; with
/// server_check_delay = 0 every idle server runs server_check_query before it is lent, the
/// check times out (server_connect_timeout), the server is closed and a new one serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_idle_server_is_caught_by_server_check_query() {
    let db = "flt_idle_blackhole";
    let s = Scene::start_with(db, |port| {
        config(
            db,
            port,
            "server_check_delay = 0\nserver_check_query = \"select 1\"",
        )
    })
    .await;
    let c = s.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    s.console.wait_idle(&s.db, 1).await;
    assert_eq!(s.relay.open(), 1, "one idle server in the pool");
    s.relay.set_all(Fault::Blackhole);
    // the path to PostgreSQL works for new connections
    s.relay.set_new(Fault::Pass);
    let t0 = Instant::now();
    // without a check the query would wait forever: bounded here so the test fails instead
    let rows = tokio::time::timeout(Duration::from_secs(60), c.simple_query("SELECT 2"))
        .await
        .expect("the client hung on the blackholed idle server");
    assert!(rows.is_ok(), "{rows:?}");
    println!(
        "RECOVERY idle server blackholed: first query {} ms (server_check_query timed out \
         after server_connect_timeout = 2 s), no error",
        t0.elapsed().as_millis()
    );
    drop(c);
    s.settled().await;
}

/// Clients that give up while pgmux connects to an unresponsive server for their login leave
/// at once: their places under max_client_conn and the pool's connection slots are free again
/// (the connects are abandoned), not held until server_connect_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_during_a_stalled_server_login_free_everything() {
    const WAIT: Duration = Duration::from_secs(30);
    let db = "flt_gone";
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    let relay = FaultRelay::start(pg.primary().port);
    relay.set_new(Fault::Stall);
    let px = Pgmux::start(
        // three clients and the console (counted, though never refused)
        &config(db, relay.port(), "max_client_conn = 4")
            .replace("server_connect_timeout = 2", "server_connect_timeout = 300"),
    );
    let console = Console::connect(&px, "admin", None).await;
    let list = |rows: Vec<std::collections::HashMap<String, String>>, name: &str| -> i64 {
        rows.iter()
            .find(|r| r["list"] == name)
            .map(|r| r["items"].parse().unwrap())
            .unwrap()
    };
    let mut gone = Vec::new();
    for _ in 0..3 {
        let mut s = raw::connect(px.port);
        s.write_all(&raw::startup(&[("user", "app"), ("database", db)]))
            .unwrap();
        gone.push(s);
    }
    // logins waiting for the pool's first server are its waiting clients (as PgBouncer's
    // CL_WAITING_LOGIN): in used_clients and cl_waiting; the console is the one login client
    let waiting = || async {
        let pools = console.show("SHOW POOLS").await;
        let lists = console.show("SHOW LISTS").await;
        let cl_waiting: i64 = pools
            .iter()
            .filter(|r| r["database"] == db)
            .map(|r| r["cl_waiting"].parse::<i64>().unwrap())
            .sum();
        let used = list(lists.clone(), "used_clients");
        (cl_waiting, used, list(lists, "login_clients"))
    };
    wait_until_async("three logins waiting for the server", WAIT, || async {
        waiting().await == (3, 3, 1)
    })
    .await;
    wait_until("pgmux connecting to the server", WAIT, || relay.open() >= 1);
    drop(gone);
    wait_until_async("the logins gone", WAIT, || async {
        waiting().await == (0, 0, 1)
    })
    .await;
    wait_until_async("no server connection being opened", WAIT, || async {
        console
            .show("SHOW POOLS")
            .await
            .iter()
            .filter(|r| r["database"] == db)
            .all(|r| r["sv_login"] == "0")
    })
    .await;
    // the places and the slots are free: three new clients are let in and served (with the
    // slots lost, they would wait for query_wait_timeout)
    relay.clear();
    for _ in 0..3 {
        let c = client(&px, db).await;
        c.simple_query("SELECT 1").await.unwrap();
    }
}

/// A PostgreSQL restart between two queries costs a client a wait, not an error: queries
/// sent while the server is down wait in pgmux (the pool's size of them retrying the
/// server, the rest in line) and run once it is back. An outage longer than
/// server_login_retry fails at once with the server's error, not query_wait_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_wait_through_a_postgres_restart() {
    let pg = PgCluster::start(0);
    let db = "app";
    let px = Pgmux::start(&config(db, pg.primary().port, "server_login_retry = 60"));
    let console = Console::connect(&px, "admin", None).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = client(&px, db).await;
        c.simple_query("SELECT 1")
            .await
            .expect("before the restart");
        clients.push(c);
    }
    console.wait_idle(db, 3).await;
    let primary = pg.primary();
    tokio::task::block_in_place(|| primary.stop("fast"));
    console.empty_pool(db).await;

    let mut queries: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let r = c.simple_query("SELECT 42").await;
                (c, r.map(|m| first_int(&m)))
            })
        })
        .collect();
    // pool_size 2: two checkouts retry the server, the third waits in line
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(done) = queries.iter_mut().find(|q| q.is_finished()) {
            let (_, r) = done.await.unwrap();
            panic!(
                "a query ended while the server was down: {:?}",
                r.map_err(|e| told(&e))
            );
        }
        let pool = console.pool(db).await;
        if pool
            .as_ref()
            .is_some_and(|r| r["sv_login"] == 2 && r["cl_waiting"] == 3)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queries not held after 30 s: {pool:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // PAUSE (to restart the server) completes while they wait; they stay queued for RESUME
    console.client.simple_query("PAUSE app").await.unwrap();
    assert!(
        queries.iter().all(|q| !q.is_finished()),
        "a waiting query ended before PAUSE completed"
    );
    tokio::task::block_in_place(|| primary.start());
    console.client.simple_query("RESUME app").await.unwrap();
    let mut kept = Vec::new();
    for q in queries {
        let (c, r) = q.await.unwrap();
        assert_eq!(
            r.map_err(|e| told(&e)),
            Ok(42),
            "a query across the restart"
        );
        kept.push(c);
    }
    console.wait_idle(db, 3).await;

    // an outage longer than server_login_retry ends the wait with the server's error, even
    // with no query_wait_timeout to end it. The window is long enough for the restart
    // below to fit in it on a loaded machine (a PostgreSQL stop and start took 2 s there).
    for set in ["SET server_login_retry = 8", "SET query_wait_timeout = 0"] {
        console.client.simple_query(set).await.unwrap();
    }
    tokio::task::block_in_place(|| primary.stop("fast"));
    console.empty_pool(db).await;
    for c in &kept {
        let r = tokio::time::timeout(Duration::from_secs(30), c.simple_query("SELECT 1")).await;
        let e = r
            .expect("still waiting 30 s into the outage")
            .expect_err("server is down");
        assert_eq!(kind(&e), "08006", "{}", told(&e));
    }
    tokio::task::block_in_place(|| primary.start());
    let again = client(&px, db).await;
    // that outage ended unseen (no query while the server was back); a restart longer than
    // server_login_retry after it is a new outage, waited through again
    let quiet_until = Instant::now() + Duration::from_millis(9000);
    tokio::time::sleep_until(quiet_until.into()).await; // the scenario: time with no traffic
    tokio::task::block_in_place(|| primary.stop("fast"));
    let held = tokio::spawn(async move {
        let r = again.simple_query("SELECT 7").await;
        r.map(|m| first_int(&m)).map_err(|e| told(&e))
    });
    wait_until_async(
        "a query held in the new outage",
        Duration::from_secs(30),
        || async {
            assert!(
                !held.is_finished(),
                "the query ended while the server was down"
            );
            console.pool(db).await.is_some_and(|r| r["sv_login"] == 1)
        },
    )
    .await;
    tokio::task::block_in_place(|| primary.start());
    assert_eq!(
        held.await.unwrap(),
        Ok(7),
        "the query across the second restart"
    );
}
