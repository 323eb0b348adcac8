//! Autocommit reads survive the loss of their replica: a read whose replica fails before any
//! of its answer reached the client is sent again on another replica or the primary, and the
//! client sees no error (issue 3). Where each read ran is proven by the server's own answer
//! (`inet_server_port()`), never by pgmux's logs.

mod common;

use common::faults::{Fault, FaultRelay};
use common::probe::Console;
use common::{cancel_and_wait, wait_until_async, PgCluster, Pgmux};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(60);

fn config(primary: u16, replicas: &[u16], extra: &str) -> String {
    config_with_metrics(primary, replicas, extra, 0)
}

fn config_with_metrics(primary: u16, replicas: &[u16], extra: &str, metrics: u16) -> String {
    let replicas = replicas
        .iter()
        .map(|p| format!("{{ host = \"127.0.0.1\", port = {p} }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
admin_users = ["postgres"]
max_client_conn = 300
server_connect_timeout = 5
metrics_listen_port = {metrics}
[[users]]
name = "app"
password = "secret"
[[users]]
name = "postgres"
[[databases]]
name = "app"
host = "127.0.0.1"
port = {primary}
read_write_split = true
consistency = "eventual"
replicas = [ {replicas} ]
lag_check_interval = 0.1
ban_time = 1
pool_size = 30
{extra}
"#
    )
}

async fn connect(px: &Pgmux) -> Client {
    let s = px.conn_str("app", "app", Some("secret"));
    let (c, conn) = tokio_postgres::connect(&s, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {s}: {e}"));
    tokio::spawn(conn);
    c
}

async fn port_of(c: &Client) -> Result<u16, tokio_postgres::Error> {
    simple_port(c, "SELECT inet_server_port()").await
}

async fn simple_port(c: &Client, sql: &str) -> Result<u16, tokio_postgres::Error> {
    let msgs = c.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|p| p.parse().unwrap()),
            _ => None,
        })
        .expect("a row"))
}

/// The monitor's view of `port` for database `app` in SHOW HOSTS.
async fn host_row(admin: &Console, port: u16) -> HashMap<String, String> {
    admin
        .show("SHOW HOSTS")
        .await
        .into_iter()
        .find(|r| r["database"] == "app" && r["port"] == port.to_string())
        .unwrap_or_else(|| panic!("no SHOW HOSTS row for {port}"))
}

/// `pgmux_route_retries_total` of database `app`, from /metrics on `port`.
fn retries(port: u16) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find(|l| l.starts_with("pgmux_route_retries_total{database=\"app\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retries metric in {resp}"))
}

/// Waits until a server connection of database `app` to `port` is lent (active).
async fn holds_active_server(admin: &Console, port: &str, what: &str) {
    wait_until_async(what, WAIT, || async {
        admin
            .show("SHOW SERVERS")
            .await
            .iter()
            .any(|s| s["port"] == port && s["state"] == "active" && s["database"] == "app")
    })
    .await;
}

/// One replica, reached through a fault-injecting relay: its connection is broken while a
/// read waits for its answer (reset before any answer, reset after part of it). Each time the
/// read is answered by the primary (`primary_reads = "fallback"`), without an error; a named
/// prepared statement is prepared again on the server that takes it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_replica_breaks_before_answering_is_sent_again() {
    let cluster = PgCluster::shared_with_replicas();
    let primary = cluster.primary().port;
    let replica = cluster.replicas()[0].port;
    let relay = FaultRelay::start(replica);
    let metrics = common::free_port();
    let px = Pgmux::start(&config_with_metrics(primary, &[relay.port()], "", metrics));
    let admin = Console::connect(&px, "postgres", None).await;
    let c = connect(&px).await;
    let back_on_replica = || async {
        wait_until_async("reads to reach the replica", WAIT, || async {
            port_of(&c).await.unwrap() == replica
        })
        .await;
    };
    back_on_replica().await;
    let before = retries(metrics);

    // 1. simple Query; the connection is reset while the request waits in a stalled path
    relay.set_all(Fault::Stall);
    let q = {
        let c2 = connect(&px).await;
        tokio::spawn(async move { port_of(&c2).await })
    };
    let relay_port = relay.port().to_string();
    holds_active_server(&admin, &relay_port, "the read to hold a replica connection").await;
    relay.set_all(Fault::Reset);
    let got = q.await.unwrap();
    relay.clear();
    assert_eq!(
        got.expect("the read failed"),
        primary,
        "the read was not sent again to the primary"
    );
    assert!(retries(metrics) > before, "no retry was counted");
    assert_eq!(host_row(&admin, relay.port()).await["banned"], "1");

    // 2. a named prepared statement executed when its replica breaks after sending part of
    //    the answer: nothing reached the client yet, so it is run again on the primary, where
    //    pgmux must prepare it first
    back_on_replica().await;
    let stmt = c
        .prepare("SELECT inet_server_port() AS retried_prepared")
        .await
        .unwrap();
    // (the host may still flap back out for a moment after its ban: until it has run there)
    wait_until_async("the statement to run on the replica", WAIT, || async {
        let p: i32 = c.query_one(&stmt, &[]).await.unwrap().get(0);
        p as u16 == replica
    })
    .await;
    relay.set_all(Fault::ResetAfter(8));
    let p: i32 = c
        .query_one(&stmt, &[])
        .await
        .expect("the prepared read failed")
        .get(0);
    relay.clear();
    assert_eq!(p as u16, primary);
    // and the statement still works everywhere afterwards
    back_on_replica().await;
    wait_until_async(
        "the statement to run on the replica again",
        WAIT,
        || async {
            let p: i32 = c.query_one(&stmt, &[]).await.unwrap().get(0);
            p as u16 == replica
        },
    )
    .await;

    // 3. a statement being prepared when its replica breaks: the Parse is sent again
    //    elsewhere, and pgmux must not take its own replayed Parse for the client defining
    //    the name twice (42P05)
    back_on_replica().await;
    relay.set_all(Fault::Stall);
    let prep = {
        let c3 = connect(&px).await;
        tokio::spawn(async move {
            let stmt = c3
                .prepare("SELECT inet_server_port() AS replayed_parse")
                .await?;
            let p: i32 = c3.query_one(&stmt, &[]).await?.get(0);
            Ok::<_, tokio_postgres::Error>(p as u16)
        })
    };
    holds_active_server(
        &admin,
        &relay_port,
        "the Parse to hold a replica connection",
    )
    .await;
    relay.set_all(Fault::Reset);
    let got = prep.await.unwrap();
    relay.clear();
    assert_eq!(got.expect("the replayed prepare failed"), primary);

    // 4. with primary_reads = never and no replica left, the client gets a clear error
    //    rather than a hang, and the session goes on
    let never = Pgmux::start(&config(
        primary,
        &[relay.port()],
        "primary_reads = \"never\"",
    ));
    let n = connect(&never).await;
    wait_until_async("reads to reach the replica", WAIT, || async {
        port_of(&n).await.is_ok_and(|p| p == replica)
    })
    .await;
    relay.set_all(Fault::ResetAfter(8));
    let err = port_of(&n).await.expect_err("a read with no server left");
    relay.clear();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57P03"),
        "{err:?}"
    );
    wait_until_async("the session to read again", WAIT, || async {
        port_of(&n).await.is_ok()
    })
    .await;
}

/// What the load saw: errors, and reads per server port.
#[derive(Default)]
struct Seen {
    errors: Mutex<Vec<String>>,
    ports: Mutex<HashMap<u16, u64>>,
    reads: AtomicU64,
}

impl Seen {
    fn read(&self, r: Result<u16, String>) {
        match r {
            Ok(p) => {
                *self.ports.lock().unwrap().entry(p).or_default() += 1;
                self.reads.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => self.errors.lock().unwrap().push(e),
        }
    }
    fn failed(&self) -> bool {
        !self.errors.lock().unwrap().is_empty()
    }
    fn assert_no_errors(&self) {
        let errors = self.errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "readers saw errors: {errors:?}");
    }
    fn on(&self, port: u16) -> u64 {
        self.ports.lock().unwrap().get(&port).copied().unwrap_or(0)
    }
}

/// A read whose client cancelled it while it was on its replica, and whose replica then
/// failed, is answered as cancelled (57014), not sent again elsewhere. The cancel reaches the
/// replica's postmaster (new connections pass the relay) while the request itself waits in a
/// stalled path, so the backend had nothing to cancel; then the replica's connection is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cancelled_before_its_replica_fails_is_answered_cancelled_not_sent_again() {
    let cluster = PgCluster::shared_with_replicas();
    let primary = cluster.primary().port;
    let replica = cluster.replicas()[0].port;
    let relay = FaultRelay::start(replica);
    let px = Pgmux::start(&config(primary, &[relay.port()], ""));
    let admin = Console::connect(&px, "postgres", None).await;
    let c = connect(&px).await;
    wait_until_async("reads to reach the replica", WAIT, || async {
        port_of(&c).await.unwrap() == replica
    })
    .await;

    relay.set_all(Fault::Stall);
    relay.set_new(Fault::Pass);
    let reader = connect(&px).await;
    let token = reader.cancel_token();
    let q = tokio::spawn(async move { port_of(&reader).await.map(|p| (p, reader)) });
    let relay_port = relay.port().to_string();
    holds_active_server(&admin, &relay_port, "the read to hold a replica connection").await;
    cancel_and_wait(&token, px.port).await;
    relay.set_all(Fault::Reset);
    let got = q.await.unwrap();
    relay.clear();
    match got {
        Ok((p, _)) => panic!("the cancelled read was sent again and answered by {p}"),
        Err(e) => assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}"),
    }
    // the others go on
    let p = port_of(&c).await.expect("a read after it");
    assert!(p == primary || p == replica, "{p}");
}

/// A read that takes long enough (20 ms, interrupted by a shutdown) for the stop to find
/// reads in flight on the replica.
const SLOW_READ: &str = "SELECT inet_server_port() FROM pg_sleep(0.02)";

/// Readers of three kinds until `stop`: simple queries, `query` with a string (tokio-postgres
/// prepares it each time) and a statement prepared once.
fn spawn_readers(px: &Arc<Pgmux>, per_kind: usize, stop: &Arc<AtomicBool>, seen: &Arc<Seen>) {
    for kind in 0..3 {
        for _ in 0..per_kind {
            let (px, stop, seen) = (px.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let c = connect(&px).await;
                let stmt = c.prepare(&format!("{SLOW_READ} /* once */")).await.unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let r = match kind {
                        0 => simple_port(&c, SLOW_READ)
                            .await
                            .map_err(|e| format!("simple_query: {e:?}")),
                        1 => c
                            .query(SLOW_READ, &[])
                            .await
                            .map(|rows| rows[0].get::<_, i32>(0) as u16)
                            .map_err(|e| format!("query: {e:?}")),
                        _ => c
                            .query_one(&stmt, &[])
                            .await
                            .map(|row| row.get::<_, i32>(0) as u16)
                            .map_err(|e| format!("prepared: {e:?}")),
                    };
                    let failed = r.is_err();
                    seen.read(r);
                    if failed {
                        // a broken connection fails at once: stop rather than spin
                        break;
                    }
                }
            });
        }
    }
}

/// A replica stopped (`pg_ctl stop -m <mode>`) under many concurrent readers of every kind
/// and `pgbench -S -M prepared`: no reader sees an error, the replica is banned, the reads go
/// on elsewhere, and once it is back it serves reads again.
async fn replica_stopped_under_load(mode: &str) {
    let cluster = PgCluster::start(2);
    cluster.pgbench_init("app");
    cluster
        .primary()
        .psql("app", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app");
    cluster.wait_replicas_caught_up();
    let primary = cluster.primary().port;
    let replicas: Vec<u16> = cluster.replicas().iter().map(|r| r.port).collect();
    let metrics = common::free_port();
    let px = Arc::new(Pgmux::start(&config_with_metrics(
        primary, &replicas, "", metrics,
    )));
    let admin = Console::connect(&px, "postgres", None).await;
    // the monitor runs from pgmux's start: both replicas healthy without any client
    wait_until_async("both replicas to be seen healthy", WAIT, || async {
        let hosts = admin.show("SHOW HOSTS").await;
        replicas.iter().all(|p| {
            hosts.iter().any(|r| {
                r["database"] == "app"
                    && r["port"] == p.to_string()
                    && r["role"] == "replica"
                    && r["health"] == "up"
            })
        })
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    spawn_readers(&px, 6, &stop, &seen);
    // pgbench's select-only transactions, prepared, paced so the run spans the stop
    let script = cluster.dir().join(format!("select_only_{mode}.sql"));
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\\sleep 2 ms\n",
    )
    .unwrap();
    let mut bench = std::process::Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-c", "8", "-j", "2", "-t", "4000"])
        .arg("-f")
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "app",
            "-p",
            &px.port.to_string(),
            "app",
        ])
        .env("PGPASSWORD", "secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pgbench");

    let victim = &cluster.replicas()[1];
    let other = replicas[0];
    wait_until_async("reads on both replicas", WAIT, || async {
        seen.on(victim.port) > 20 && seen.on(other) > 20
    })
    .await;
    assert!(
        bench.try_wait().unwrap().is_none(),
        "pgbench ended before the stop: lengthen its run"
    );
    victim.stop(mode);
    let after_stop = seen.reads.load(Ordering::SeqCst);
    let victim_port = victim.port.to_string();
    wait_until_async("the stopped replica to be banned", WAIT, || async {
        admin
            .show("SHOW HOSTS")
            .await
            .iter()
            .any(|r| r["database"] == "app" && r["port"] == victim_port && r["banned"] == "1")
    })
    .await;
    // reads go on without the replica
    wait_until_async("reads to go on after the stop", WAIT, || async {
        seen.failed() || seen.reads.load(Ordering::SeqCst) > after_stop + 200
    })
    .await;
    seen.assert_no_errors();
    assert!(
        bench.try_wait().unwrap().is_none(),
        "pgbench ended before the replica came back: lengthen its run"
    );
    victim.start();
    let on_victim = seen.on(victim.port);
    wait_until_async(
        "the restarted replica to serve reads again",
        WAIT,
        || async { seen.failed() || seen.on(victim.port) > on_victim + 20 },
    )
    .await;
    seen.assert_no_errors();
    stop.store(true, Ordering::SeqCst);
    let out = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    seen.assert_no_errors();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("error"),
        "pgbench saw errors: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "{mode}: reads per port {:?}, retries {}",
        seen.ports.lock().unwrap(),
        retries(metrics)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_fast_under_load_costs_no_read_an_error() {
    replica_stopped_under_load("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_immediate_under_load_costs_no_read_an_error() {
    replica_stopped_under_load("immediate").await;
}
