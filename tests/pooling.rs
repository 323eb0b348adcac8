//! Pools under real load: multiplexing many clients onto few servers, waiting and its
//! timeouts, reserve and limits, lifetimes, and clean-up when clients or servers vanish.

mod common;

use common::probe::Console;
use common::{wait_until, wait_until_async, PgCluster, Pgmux};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{types::Type, Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(30);

/// A pgmux with one database `db` (created on the shared cluster) and users app and app2.
fn start(db: &str, general: &str, db_extra: &str) -> Pgmux {
    let pg = PgCluster::shared();
    pg.create_database(db, "app");
    Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
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
{db_extra}
"#,
        pg.primary().port
    ))
}

fn server_conns(db: &str) -> usize {
    let pg = PgCluster::shared();
    pg.psql(
        pg.primary(),
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"),
    )
    .parse()
    .unwrap()
}

fn sql(db: &str, q: &str) -> String {
    let pg = PgCluster::shared();
    pg.psql(pg.primary(), db, q)
}

async fn connect(px: &Pgmux, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(&px.conn_str("app", db, Some("secret")), NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

fn first(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .expect("a row")
}

/// Highest server connection count seen for `db` while `stop` is not set.
fn watch_max(db: &str, stop: Arc<AtomicUsize>) -> std::thread::JoinHandle<usize> {
    let db = db.to_string();
    std::thread::spawn(move || {
        let mut max = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            max = max.max(server_conns(&db));
        }
        max
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_ten_servers() {
    let db = "mux500";
    let px = start(
        db,
        "pool_mode = \"transaction\"\ndefault_pool_size = 10\nmax_client_conn = 1000",
        "",
    );
    let stop = Arc::new(AtomicUsize::new(0));
    let watcher = watch_max(db, stop.clone());
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let url = px.conn_str("app", db, Some("secret"));
            let ok = ok.clone();
            tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
                tokio::spawn(conn);
                for j in 0..5i32 {
                    let v = i * 10 + j;
                    let r = c
                        .query_typed("SELECT $1::int + 1", &[(&v, Type::INT4)])
                        .await
                        .unwrap();
                    assert_eq!(r[0].get::<_, i32>(0), v + 1);
                    let m = c
                        .simple_query(&format!("BEGIN; SELECT {v}; COMMIT"))
                        .await
                        .unwrap();
                    assert_eq!(first(&m), v.to_string());
                }
                ok.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    stop.store(1, Ordering::Relaxed);
    let max = watcher.join().unwrap();
    assert_eq!(ok.load(Ordering::Relaxed), 500);
    assert!(max <= 10, "saw {max} server connections for a pool of 10");
    assert!(max >= 1);
}

#[test]
fn pgbench_two_hundred_clients_on_ten_servers() {
    let db = "muxbench";
    let px = start(
        db,
        "pool_mode = \"transaction\"\ndefault_pool_size = 10",
        "",
    );
    let pg = PgCluster::shared();
    if sql(
        db,
        "SELECT count(*) FROM pg_class WHERE relname = 'pgbench_accounts'",
    ) == "0"
    {
        pg.pgbench_init(db);
    }
    let stop = Arc::new(AtomicUsize::new(0));
    let watcher = watch_max(db, stop.clone());
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-c",
            "200",
            "-j",
            "2",
            "-t",
            "20",
            "-h",
            "127.0.0.1",
            "-p",
            &px.port.to_string(),
            "-U",
            "postgres",
            db,
        ])
        .output()
        .unwrap();
    stop.store(1, Ordering::Relaxed);
    let max = watcher.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("number of transactions actually processed: 4000/4000"),
        "{text}"
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(max <= 10, "saw {max} server connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_errors_the_waiter_and_the_pool_recovers() {
    let db = "muxwait";
    let px = start(db, "default_pool_size = 1\nquery_wait_timeout = 0.5", "");
    let holder = connect(&px, db).await.unwrap();
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiter = connect(&px, db).await.unwrap();
    let err = tokio::time::timeout(WAIT, waiter.simple_query("SELECT 1"))
        .await
        .expect("query_wait_timeout came")
        .unwrap_err();
    let db_err = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.message(), "query_wait_timeout");
    assert_eq!(db_err.code().code(), "08P01");
    holder.simple_query("COMMIT").await.unwrap();
    let next = connect(&px, db).await.unwrap();
    assert_eq!(
        first(&next.simple_query("SELECT 'served'").await.unwrap()),
        "served"
    );
    assert_eq!(server_conns(db), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_closes_client_and_server() {
    let db = "muxidletx";
    let px = start(
        db,
        "default_pool_size = 2\nidle_transaction_timeout = 0.3",
        "",
    );
    let c = connect(&px, db).await.unwrap();
    c.simple_query("BEGIN; SELECT 1").await.unwrap();
    wait_until_async("client closed", WAIT, || async { c.is_closed() }).await;
    wait_until("no server idle in transaction", WAIT, || {
        sql("postgres", &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in transaction%'")) == "0"
    });
    // a client that keeps working inside its transaction is not cut off
    let busy = connect(&px, db).await.unwrap();
    busy.simple_query("BEGIN").await.unwrap();
    for _ in 0..3 {
        busy.simple_query("SELECT pg_sleep(0.1)").await.unwrap();
    }
    busy.simple_query("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_disconnects_idle_clients() {
    let db = "muxidle";
    let px = start(db, "client_idle_timeout = 0.3", "");
    let c = connect(&px, db).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    wait_until_async("idle client closed", WAIT, || async { c.is_closed() }).await;
    assert!(c.simple_query("SELECT 1").await.is_err());
}

/// Timeouts set at run time (console SET, as RELOAD does) apply to the sessions already
/// connected, from their next wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_set_from_the_console_applies() {
    let db = "muxidleset";
    let px = start(db, "admin_users = [\"postgres\"]", "");
    let console = Console::connect(&px, "postgres", None).await;
    let idle = connect(&px, db).await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let in_tx = connect(&px, db).await.unwrap();
    in_tx.simple_query("BEGIN").await.unwrap();
    console
        .client
        .simple_query("SET client_idle_timeout = 0.3")
        .await
        .unwrap();
    console
        .client
        .simple_query("SET idle_transaction_timeout = 0.3")
        .await
        .unwrap();
    // each wakes once more (a statement) and then times out at the new limit
    idle.simple_query("SELECT 2").await.unwrap();
    in_tx.simple_query("SELECT 2").await.unwrap();
    wait_until_async("idle client closed", WAIT, || async { idle.is_closed() }).await;
    wait_until_async("idle-in-transaction client closed", WAIT, || async {
        in_tx.is_closed()
    })
    .await;
}

/// A client that waited for a server longer than client_idle_timeout was not idle: it is
/// served when the server comes, not disconnected with 57P05 at the hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_wait_for_a_server_is_not_idleness() {
    let db = "muxidlewait";
    let px = start(
        db,
        "client_idle_timeout = 0.3\nadmin_users = [\"postgres\"]",
        "pool_size = 1",
    );
    let holder = connect(&px, db).await.unwrap();
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiter = connect(&px, db).await.unwrap();
    let waiting = tokio::spawn(async move {
        waiter
            .simple_query("SELECT 'served'")
            .await
            .map(|rows| first(&rows))
    });
    let console = Console::connect(&px, "postgres", None).await;
    wait_until_async("the waiter past client_idle_timeout", WAIT, || async {
        console.pool(db).await.is_some_and(|p| {
            p["cl_waiting"] == 1 && p["maxwait_us"] + p["maxwait"] * 1_000_000 > 400_000
        })
    })
    .await;
    holder.simple_query("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), "served");
}

/// A pool made smaller (SET default_pool_size, as RELOAD does) closes what it no longer
/// may keep as it comes back, also while clients wait, and serves within the new size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_pool_size_applies_to_the_running_pool() {
    let db = "muxshrink";
    let px = start(
        db,
        "default_pool_size = 3\nadmin_users = [\"postgres\"]",
        "",
    );
    let console = Console::connect(&px, "postgres", None).await;
    let mut holders = Vec::new();
    for _ in 0..3 {
        let c = connect(&px, db).await.unwrap();
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    assert_eq!(server_conns(db), 3);
    console
        .client
        .simple_query("SET default_pool_size = 1")
        .await
        .unwrap();
    // a client waiting meanwhile is served by the one server the pool keeps
    let waiter = connect(&px, db).await.unwrap();
    let waiting = tokio::spawn(async move {
        let r = waiter
            .simple_query("SELECT pg_backend_pid()")
            .await
            .map(|rows| first(&rows));
        (waiter, r)
    });
    wait_until_async("the waiter in line", WAIT, || async {
        console.pool(db).await.is_some_and(|p| p["cl_waiting"] == 1)
    })
    .await;
    for c in &holders {
        c.simple_query("COMMIT").await.unwrap();
    }
    let (_waiter, served) = waiting.await.unwrap();
    let pid = served.unwrap();
    let p = console.wait_idle(db, 4).await;
    assert_eq!(p["sv_idle"], 1, "{p:?}");
    wait_until("the servers closed", WAIT, || server_conns(db) == 1);
    // the one kept is the one the waiter was served on
    let pg = PgCluster::shared();
    let left = pg.psql(
        pg.primary(),
        "postgres",
        &format!("SELECT pid FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"),
    );
    assert_eq!(left.trim(), pid);
}

/// A client that hangs up while waiting for a server (closes, or says Terminate) leaves the
/// line at once: it is not counted as waiting, nor handed a server later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_that_hangs_up_leaves_the_line() {
    use std::io::Write;
    let db = "muxhangup";
    let px = start(db, "admin_users = [\"postgres\"]", "pool_size = 1");
    let console = Console::connect(&px, "postgres", None).await;
    let holder = connect(&px, db).await.unwrap();
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiting = |n: i64| {
        let console = &console;
        async move { console.pool(db).await.is_some_and(|p| p["cl_waiting"] == n) }
    };
    for terminate in [false, true] {
        let (mut s, _) = common::raw::login(px.port, "app", db);
        s.write_all(&common::raw::query("SELECT 1")).unwrap();
        wait_until_async("the raw client in line", WAIT, || waiting(1)).await;
        if terminate {
            // says goodbye, leaves the socket open
            s.write_all(&common::raw::msg(b'X', b"")).unwrap();
            wait_until_async("the goodbye taken", WAIT, || waiting(0)).await;
            drop(s);
        } else {
            drop(s);
            wait_until_async("the hang-up noticed", WAIT, || waiting(0)).await;
        }
    }
    holder.simple_query("COMMIT").await.unwrap();
    let p = console.wait_idle(db, 1).await;
    assert_eq!(p["sv_idle"], 1, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_with_53300() {
    let db = "muxmax";
    let px = start(db, "max_client_conn = 3\nadmin_users = [\"postgres\"]", "");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&px, db).await.unwrap());
    }
    let Err(err) = connect(&px, db).await else {
        panic!("fourth client admitted")
    };
    assert_eq!(err.code().unwrap().code(), "53300");
    // the console is exempt, as PgBouncer's admin database is: an operator gets in
    let console = Console::connect(&px, "postgres", None).await;
    let rows = console.show("SHOW CLIENTS").await;
    assert!(rows.len() >= 3, "{rows:?}");
    drop(console);
    drop(held.pop());
    wait_until_async("a slot frees up", WAIT, || async {
        connect(&px, db).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_old_connections() {
    let db = "muxlife";
    let px = start(db, "default_pool_size = 1\nserver_lifetime = 0.3", "");
    let c = connect(&px, db).await.unwrap();
    let pid = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    wait_until_async("a new server connection", WAIT, || async {
        first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap()) != pid
    })
    .await;
    wait_until("old server closed", WAIT, || {
        sql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        ) == "0"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_timeout_and_min_pool_size() {
    let db = "muxmin";
    let _px = start(
        db,
        "default_pool_size = 5\nmin_pool_size = 3\nserver_idle_timeout = 0.2",
        "",
    );
    // warm connections appear once the pool exists; the pool is created by the first login
    let c = connect(&_px, db).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    wait_until("min_pool_size connections open", WAIT, || {
        server_conns(db) == 3
    });
    // and idle timeouts never take it below min_pool_size
    let db2 = "muxidleserver";
    let px2 = start(db2, "default_pool_size = 4\nserver_idle_timeout = 0.2", "");
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| connect(&px2, db2))).await;
    let txs: Vec<_> = clients.into_iter().map(|c| c.unwrap()).collect();
    for c in &txs {
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
    }
    assert_eq!(server_conns(db2), 4);
    for c in &txs {
        c.simple_query("COMMIT").await.unwrap();
    }
    wait_until("idle servers closed", WAIT, || server_conns(db2) == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_serves_a_client_that_waited() {
    let db = "muxreserve";
    let px = start(
        db,
        "default_pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = 0.2",
        "",
    );
    let a = connect(&px, db).await.unwrap();
    a.simple_query("BEGIN; SELECT 1").await.unwrap();
    let b = connect(&px, db).await.unwrap();
    // served from the reserve while a still holds the only regular connection
    let served = tokio::time::timeout(WAIT, b.simple_query("SELECT 'reserve'"))
        .await
        .expect("served from the reserve");
    assert_eq!(first(&served.unwrap()), "reserve");
    assert_eq!(server_conns(db), 2);
    a.simple_query("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_bounds_all_pools_of_a_database() {
    let db = "muxdblimit";
    let px = start(
        db,
        "default_pool_size = 5\nquery_wait_timeout = 20",
        "max_db_connections = 2",
    );
    let a = connect(&px, db).await.unwrap();
    let (p, conn) = tokio_postgres::connect(&px.conn_str("postgres", db, None), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    a.simple_query("BEGIN; SELECT 1").await.unwrap();
    p.simple_query("BEGIN; SELECT 1").await.unwrap();
    assert_eq!(server_conns(db), 2);
    let a2 = connect(&px, db).await.unwrap();
    let waiting =
        tokio::spawn(async move { first(&a2.simple_query("SELECT 'third'").await.unwrap()) });
    // the third can only run once one of the two ends
    p.simple_query("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), "third");
    assert!(server_conns(db) <= 2);
    a.simple_query("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_transaction_leaves_nothing_behind() {
    let db = "muxvanish";
    let px = start(db, "default_pool_size = 1", "");
    sql(
        db,
        "CREATE TABLE IF NOT EXISTS v(x int); GRANT ALL ON v TO app; TRUNCATE v",
    );
    for _ in 0..3 {
        let c = connect(&px, db).await.unwrap();
        c.simple_query("BEGIN; INSERT INTO v VALUES (1)")
            .await
            .unwrap();
        drop(c);
        // the only server must come back clean and usable
        let next = connect(&px, db).await.unwrap();
        assert_eq!(
            first(&next.simple_query("SELECT count(*) FROM v").await.unwrap()),
            "0"
        );
        assert_eq!(first(&next.simple_query("SELECT current_setting('transaction_isolation') || txid_current_if_assigned() IS NULL").await.unwrap()), "t");
    }
    wait_until("nothing idle in transaction", WAIT, || {
        sql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state <> 'idle'"
            ),
        ) == "0"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_servers_are_replaced() {
    let db = "muxbroken";
    let px = start(db, "pool_mode = \"transaction\"\ndefault_pool_size = 1", "");
    let c = connect(&px, db).await.unwrap();
    let pid = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    sql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    // transaction mode: the dead idle server is noticed at checkout and replaced unseen
    wait_until("old backend gone", WAIT, || {
        sql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        ) == "0"
    });
    let pid2 = first(&c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(pid, pid2);

    // session mode: the client holding the server sees PostgreSQL's error, others go on
    let db2 = "muxbroken2";
    let px2 = start(db2, "pool_mode = \"session\"\ndefault_pool_size = 2", "");
    let s = connect(&px2, db2).await.unwrap();
    let spid = first(&s.simple_query("SELECT pg_backend_pid()").await.unwrap());
    sql("postgres", &format!("SELECT pg_terminate_backend({spid})"));
    let err = s.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.as_db_error()
            .map(|e| e.code().code() == "57P01")
            .unwrap_or(true),
        "{err}"
    );
    let fresh = connect(&px2, db2).await.unwrap();
    assert_eq!(
        first(&fresh.simple_query("SELECT 'alive'").await.unwrap()),
        "alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_first_in_first_out() {
    use pgmux::config::PoolMode;
    use pgmux::pool::{Pool, PoolSettings};
    use pgmux::server::ServerTarget;
    let pg = PgCluster::shared();
    let target = ServerTarget {
        host: "127.0.0.1".into(),
        port: pg.primary().port,
        dbname: "app".into(),
        user: "postgres".into(),
        secret: None,
    };
    let settings = PoolSettings {
        mode: PoolMode::Transaction,
        size: 1,
        min_size: 0,
        reserve_size: 0,
        reserve_timeout: None,
        query_wait_timeout: Some(WAIT),
        connect_timeout: WAIT,
        login_retry: None,
        idle_timeout: None,
        lifetime: None,
        check: None,
        batch_size: 0,
        gather: None,
    };
    let pool = Pool::new("app".into(), "postgres".into(), target, settings, None);
    let held = pool.checkout().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5 {
        let (p, tx) = (pool.clone(), tx.clone());
        tokio::spawn(async move {
            let c = p.checkout().await.unwrap();
            tx.send(i).unwrap();
            c.release();
        });
        wait_until_async("waiter queued", WAIT, || async {
            pool.counts().waiting == i + 1
        })
        .await;
    }
    held.release();
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(rx.recv().await.unwrap());
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    wait_until_async("connection back in the pool", WAIT, || async {
        pool.counts().idle == 1
    })
    .await;
}

/// A query whose client vanished, or whose session `query_timeout` ended, is cancelled on
/// its server: PostgreSQL would otherwise run it to its end while the pool opens another
/// server in its place (more work on PostgreSQL than the pool's size allows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_left_running_on_a_closed_server_is_cancelled() {
    use std::io::Write;
    let running = |db: &str, tag: &str| {
        sql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
                 AND state = 'active' AND query LIKE '%/*{tag}*/%' AND pid <> pg_backend_pid()"
            ),
        )
    };
    for mode in ["session", "transaction"] {
        let db = format!("muxabandon_{mode}");
        let px = start(
            &db,
            &format!("pool_mode = \"{mode}\"\ndefault_pool_size = 2"),
            "",
        );
        let (mut s, _) = common::raw::login(px.port, "app", &db);
        s.write_all(&common::raw::query("SELECT pg_sleep(600) /*left*/"))
            .unwrap();
        wait_until("the query to run", WAIT, || running(&db, "left") == "1");
        drop(s);
        wait_until("the vanished client's query to be cancelled", WAIT, || {
            running(&db, "left") == "0"
        });
        let next = connect(&px, &db).await.unwrap();
        assert_eq!(
            first(&next.simple_query("SELECT 'served'").await.unwrap()),
            "served"
        );
    }

    let db = "muxabandon_timeout";
    let px = start(db, "pool_mode = \"transaction\"\nquery_timeout = 1", "");
    let c = connect(&px, db).await.unwrap();
    let err = c
        .simple_query("SELECT pg_sleep(600) /*timed*/")
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.message()),
        Some("query_timeout"),
        "{err}"
    );
    wait_until("the timed-out query to be cancelled", WAIT, || {
        running(db, "timed") == "0"
    });
}

/// The server refuses a new connection for lack of slots (53300, here the role's CONNECTION
/// LIMIT): a client waits for one of the pool's connections to come back, as PgBouncer's
/// clients wait, rather than getting the refusal as a FATAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_connection_slots_makes_clients_wait_not_fail() {
    let db = "pool_full_server";
    let pg = PgCluster::shared();
    pg.primary().psql(
        "postgres",
        "DO $$ BEGIN CREATE ROLE pool_limited LOGIN CONNECTION LIMIT 1; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    let px = start(
        db,
        "pool_mode = \"transaction\"\ndefault_pool_size = 3\nadmin_users = [\"postgres\"]",
        "server_user = \"pool_limited\"",
    );
    let holder = connect(&px, db).await.unwrap();
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiter = connect(&px, db).await.unwrap();
    let q = tokio::spawn(async move { waiter.simple_query("SELECT 'served'").await });
    let console = common::probe::Console::connect(&px, "postgres", None).await;
    wait_until_async("the second client waiting", WAIT, || async {
        let pools = console.show("SHOW POOLS").await;
        pools
            .iter()
            .any(|r| r["database"] == db && r["cl_waiting"] == "1")
    })
    .await;
    holder.simple_query("COMMIT").await.unwrap();
    let rows = q
        .await
        .unwrap()
        .expect("served once the first server came back");
    assert_eq!(first(&rows), "served");
    // the pool's count is right: one server, idle
    wait_until_async("one idle server", WAIT, || async {
        let pools = console.show("SHOW POOLS").await;
        pools
            .iter()
            .any(|r| r["database"] == db && r["sv_idle"] == "1" && r["sv_active"] == "0")
    })
    .await;
}

/// A Sync or a Flush from a client that holds no server is answered by pgmux as PostgreSQL
/// would (ReadyForQuery, idle; nothing): sqlx sends a lone Sync to check each pooled
/// connection when it takes it and when it gives it back, which took a server each time.
/// The pool's only server is held by a transaction here, so a Sync that needed a server
/// would wait, then fail with query_wait_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_sync_is_answered_without_a_server() {
    use common::raw::{login, msg, query, until_ready};
    use std::io::Write;
    let db = "pool_lone_sync";
    let px = start(
        db,
        "pool_mode = \"transaction\"\ndefault_pool_size = 1\nquery_wait_timeout = 2",
        "",
    );
    let holder = connect(&px, db).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (mut s, _) = login(px.port, "app", db);
    s.write_all(&[msg(b'S', b""), msg(b'H', b""), msg(b'S', b"")].concat())
        .unwrap();
    let idle = vec![(b'Z', b"I".to_vec())];
    assert_eq!(until_ready(&mut s), idle);
    assert_eq!(until_ready(&mut s), idle);
    holder.batch_execute("COMMIT").await.unwrap();
    s.write_all(&query("SELECT 41 + 1")).unwrap();
    let answer = until_ready(&mut s);
    let row = answer.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert_eq!(&row.1[6..], b"42", "{answer:?}");
}
