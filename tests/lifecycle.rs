//! The process: --check, --version, `workers` (its threads), and shutdown on SIGTERM that
//! lets a running transaction finish while refusing new clients.

mod common;

use common::{wait_until_async, PgCluster, Pgmux};
use std::process::Command;
use std::time::Duration;
use tokio_postgres::NoTls;

fn pgmux_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgmux"))
}

#[test]
fn check_validates_and_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[pgmux]\nlisten_port = 7000\n[[databases]]\nname = \"a\"\nhost = \"h\"\n",
    )
    .unwrap();
    let out = pgmux_cmd()
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[pgmux]\nlisten_port = 7000\n\ndefault_pool_sise = 3\n",
    )
    .unwrap();
    let out = pgmux_cmd()
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("default_pool_sise") && err.contains("line 4") && err.contains("column 1"),
        "{err}"
    );

    // a negative duration would read as "off": refused, naming the key
    let negative = dir.path().join("negative.toml");
    std::fs::write(&negative, "[pgmux]\nquery_wait_timeout = -1.0\n").unwrap();
    let out = pgmux_cmd()
        .arg("--config")
        .arg(&negative)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("query_wait_timeout"), "{err}");

    let missing = pgmux_cmd()
        .args(["--config", "/nonexistent/pgmux.toml", "--check"])
        .output()
        .unwrap();
    assert!(!missing.status.success());

    let v = pgmux_cmd().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
    assert!(pgmux_cmd().arg("--help").output().unwrap().status.success());
}

fn start_trust(shutdown_timeout: u32) -> Pgmux {
    let pg = PgCluster::shared();
    Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nshutdown_timeout = {shutdown_timeout}\n[[users]]\nname = \"postgres\"\n[[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.primary().port
    ))
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_lets_the_running_transaction_finish_then_closes() {
    let pg = PgCluster::shared();
    let mut px = start_trust(60);
    let url = px.conn_str("postgres", "app", None);
    let c = connect(&url).await;
    let idle = connect(&url).await;
    idle.simple_query("SELECT 1").await.unwrap();
    c.simple_query(
        "CREATE TABLE IF NOT EXISTS shutdown_t(x int); BEGIN; INSERT INTO shutdown_t VALUES (1)",
    )
    .await
    .unwrap();
    px.signal(libc::SIGINT);
    // new clients are turned away, a client between transactions is closed...
    wait_until_async("listener closed", Duration::from_secs(20), || async {
        tokio_postgres::connect(&url, NoTls).await.is_err()
    })
    .await;
    wait_until_async("idle client closed", Duration::from_secs(20), || async {
        idle.is_closed()
    })
    .await;
    // ...and the one inside a transaction finishes it, then is closed
    c.simple_query("INSERT INTO shutdown_t VALUES (2); COMMIT")
        .await
        .unwrap();
    let status = px.wait_exit(Duration::from_secs(30)).expect("pgmux exits");
    assert!(status.success(), "{status:?}");
    assert!(c.is_closed() || c.simple_query("SELECT 1").await.is_err());
    let n = pg.psql(pg.primary(), "app", "SELECT count(*) >= 2 FROM shutdown_t");
    assert_eq!(n, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_serving_connected_clients_until_they_leave() {
    let mut px = start_trust(60);
    let url = px.conn_str("postgres", "app", None);
    let a = connect(&url).await;
    let b = connect(&url).await;
    px.signal(libc::SIGTERM);
    wait_until_async("listener closed", Duration::from_secs(20), || async {
        tokio_postgres::connect(&url, NoTls).await.is_err()
    })
    .await;
    // connected clients keep working, transactions included
    for c in [&a, &b] {
        c.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    }
    drop(a);
    b.simple_query("SELECT 2").await.unwrap();
    assert!(
        px.wait_exit(Duration::from_millis(1)).is_none(),
        "exited while a client remained"
    );
    drop(b);
    let status = px
        .wait_exit(Duration::from_secs(30))
        .expect("pgmux exits once the last client left");
    assert!(status.success(), "{status:?}");
}

/// Threads of a process, from /proc.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sets_the_threads_and_one_thread_serves_everything() {
    let pg = PgCluster::shared();
    let config = |workers: u32| {
        format!(
            "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nworkers = {workers}\n\
             default_pool_size = 2\n[[users]]\nname = \"postgres\"\n[[databases]]\n\
             name = \"app\"\nhost = \"127.0.0.1\"\nport = {}\n",
            pg.primary().port
        )
    };
    let three = Pgmux::start(&config(3));
    assert!(threads(three.pid()) >= 4, "{}", threads(three.pid()));
    drop(three);

    // one thread: more clients than servers, on all three query paths, and a cancel
    let px = Pgmux::start(&config(1));
    let url = px.conn_str("postgres", "app", None);
    let mut tasks = Vec::new();
    for i in 0..12i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            for _ in 0..20 {
                let r = c.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), i + 1);
                let r = c
                    .query_typed("SELECT $1::int", &[(&i, tokio_postgres::types::Type::INT4)])
                    .await
                    .unwrap();
                assert_eq!(r[0].get::<_, i32>(0), i);
                c.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = connect(&url).await;
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await });
    wait_until_async("the sleep runs", Duration::from_secs(20), || async {
        pg.primary().psql(
            "app",
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
        ) == "1"
    })
    .await;
    token.cancel_query(NoTls).await.unwrap();
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    assert_eq!(threads(px.pid()), 1);
}

/// Scheduling policy of each thread of a process (field 41 of /proc/PID/task/TID/stat:
/// 0 SCHED_OTHER, 3 SCHED_BATCH).
fn policies(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sched_batch_puts_the_threads_that_serve_under_sched_batch() {
    let pg = PgCluster::shared();
    let config = |line: &str| {
        format!(
            "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\nworkers = 2\n{line}\n\
             [[users]]\nname = \"postgres\"\n[[databases]]\n\
             name = \"app\"\nhost = \"127.0.0.1\"\nport = {}\n",
            pg.primary().port
        )
    };
    for (line, policy) in [("", 3), ("sched_batch = false", 0)] {
        let px = Pgmux::start(&config(line));
        let c = connect(&px.conn_str("postgres", "app", None)).await;
        let r = c.query_one("SELECT 1::int", &[]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), 1);
        let seen = policies(px.pid());
        assert!(seen.len() >= 3, "main thread and two workers: {seen:?}");
        assert!(seen.iter().all(|p| *p == policy), "{line:?}: {seen:?}");
    }
}

/// At shutdown_timeout a client still inside a transaction is told why it is closed (FATAL
/// 57P01, as PostgreSQL's own shutdown tells it), not just cut off; its transaction is rolled
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_tells_the_clients_it_closes() {
    let pg = PgCluster::shared();
    let mut px = start_trust(1);
    let url = px.conn_str("postgres", "app", None);
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    c.simple_query("CREATE TABLE IF NOT EXISTS shutdown_cut(x int)")
        .await
        .unwrap();
    c.simple_query("BEGIN; INSERT INTO shutdown_cut VALUES (1)")
        .await
        .unwrap();
    px.signal(libc::SIGTERM);
    let ended = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("the connection ends at shutdown_timeout")
        .unwrap();
    let e = ended.expect_err("closed with an error");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    let status = px.wait_exit(Duration::from_secs(30)).expect("pgmux exits");
    assert!(status.success(), "{status:?}");
    let n = pg.psql(pg.primary(), "app", "SELECT count(*) FROM shutdown_cut");
    assert_eq!(n, "0");
}

/// SIGINT closes a client waiting for a server at once (it holds none), as it closes idle
/// ones, while the client inside a transaction finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_clients_waiting_for_a_server() {
    let pg = PgCluster::shared();
    let mut px = Pgmux::start(&format!(
        "[pgmux]\nlisten_port = {{port}}\nauth_type = \"trust\"\ndefault_pool_size = 1\nadmin_users = [\"postgres\"]\n[[users]]\nname = \"postgres\"\n[[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.primary().port
    ));
    let url = px.conn_str("postgres", "app", None);
    let holder = connect(&url).await;
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiter = connect(&url).await;
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 2").await });
    let console = common::probe::Console::connect(&px, "postgres", None).await;
    wait_until_async(
        "the second client waiting",
        Duration::from_secs(20),
        || async {
            console
                .pool("app")
                .await
                .is_some_and(|r| r["cl_waiting"] == 1)
        },
    )
    .await;
    px.signal(libc::SIGINT);
    let e = waiting.await.unwrap().expect_err("closed, not served");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    // the transaction still finishes
    holder.simple_query("COMMIT").await.unwrap();
    let status = px.wait_exit(Duration::from_secs(30)).expect("pgmux exits");
    assert!(status.success(), "{status:?}");
}

/// As PgBouncer 1.23: a second SIGTERM or SIGINT while a shutdown (drain or safe) is under way
/// ends it at once: the clients it waited for are told (FATAL 57P01) and pgmux exits, long
/// before shutdown_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_a_shutdown_exits_at_once() {
    for (first, second) in [
        (libc::SIGTERM, libc::SIGTERM),
        (libc::SIGINT, libc::SIGINT),
        (libc::SIGTERM, libc::SIGINT),
    ] {
        let mut px = start_trust(600);
        let url = px.conn_str("postgres", "app", None);
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        // inside a transaction: neither shutdown closes it before it ends
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
        px.signal(first);
        wait_until_async("the shutdown began", Duration::from_secs(20), || async {
            px.log().contains("shutting down (")
        })
        .await;
        c.simple_query("SELECT 2")
            .await
            .expect("served during the shutdown");
        px.signal(second);
        let ended = tokio::time::timeout(Duration::from_secs(30), conn)
            .await
            .expect("the connection ends at the second signal")
            .unwrap();
        let e = ended.expect_err("closed with an error");
        assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
        let status = px
            .wait_exit(Duration::from_secs(30))
            .expect("pgmux exits at the second signal");
        assert!(status.success(), "{status:?}");
        assert!(px.log().contains("during the shutdown: closing"));
    }
}
