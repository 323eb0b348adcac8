//! Faults between pgmux and a primary with two streaming replicas: a fault relay
//! (tests/common/faults.rs) sits in front of each server, so pgmux's pools and its topology
//! monitor reach every host through one. A replica partitioned away under read load is banned
//! and reads carry on elsewhere, then it is used again once healed; a stalled primary makes
//! writes fail with a clear error within the timeouts while reads carry on on the replicas.
//! After each: every host's pool is at rest, and pgmux holds the fds it held before.
//! Recovery times are printed, not asserted (see docs/reliability.md).

mod common;

use common::faults::{Fault, FaultRelay};
use common::probe::{fd_count, wait_fds, Console};
use common::{wait_until_async, PgCluster, Pgmux};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(60);

/// pgmux in front of relays in front of the primary and both replicas.
struct Cluster {
    db: String,
    /// Real ports of the primary and the replicas: what `inet_server_port()` answers.
    primary: u16,
    replicas: Vec<u16>,
    primary_relay: FaultRelay,
    replica_relays: Vec<FaultRelay>,
    px: Arc<Pgmux>,
    console: Console,
    fds: usize,
}

impl Cluster {
    async fn start(db: &str) -> Cluster {
        let pg = PgCluster::shared_with_replicas();
        pg.create_database(db, "app");
        pg.primary().psql(
            db,
            "CREATE TABLE IF NOT EXISTS w (x int); GRANT ALL ON w TO app",
        );
        pg.wait_replicas_caught_up();
        let primary_relay = FaultRelay::start(pg.primary().port);
        let replica_relays: Vec<FaultRelay> = pg
            .replicas()
            .iter()
            .map(|r| FaultRelay::start(r.port))
            .collect();
        let replicas_cfg = replica_relays
            .iter()
            .map(|r| format!("{{ host = \"127.0.0.1\", port = {} }}", r.port()))
            .collect::<Vec<_>>()
            .join(", ");
        let px = Pgmux::start(&format!(
            r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
pool_mode = "transaction"
default_pool_size = 4
# 4 s: the host monitor checks within server_connect_timeout, and a machine busy with other
# tests and these tests' own read loops can stall a healthy replica's answer for over a second
# (both replicas banned at once, seen once; a read on a replica given query_timeout at 2 s,
# seen in CI once, cause not shown)
server_connect_timeout = 4
query_timeout = 4
query_wait_timeout = 20
admin_users = ["admin"]
[[users]]
name = "app"
[[users]]
name = "admin"
[[databases]]
name = "{db}"
host = "127.0.0.1"
port = {}
server_user = "postgres"
read_write_split = true
consistency = "eventual"
max_replica_lag_bytes = 0
max_replica_lag_ms = 0
replicas = [ {replicas_cfg} ]
lag_check_interval = 0.1
ban_time = 1
"#,
            primary_relay.port()
        ));
        let console = Console::connect(&px, "admin", None).await;
        let c = Self::client_of(&px, db).await;
        // the monitor starts with the first client: wait until reads reach both replicas
        let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
        wait_until_async("reads on both replicas", WAIT, || {
            let (c, seen) = (&c, &seen);
            async move {
                let p = port_of(c).await.unwrap();
                seen.borrow_mut().insert(p);
                pg.replicas()
                    .iter()
                    .all(|r| seen.borrow().contains(&r.port))
            }
        })
        .await;
        drop(c);
        console.wait_idle(db, 0).await;
        console.empty_pool(db).await;
        // the monitor keeps one connection per host; nothing else is open
        wait_until_async("only the monitor's connections", WAIT, || async {
            primary_relay.open() == 1 && replica_relays.iter().all(|r| r.open() == 1)
        })
        .await;
        let fds = fd_count(px.pid());
        Cluster {
            db: db.to_string(),
            primary: pg.primary().port,
            replicas: pg.replicas().iter().map(|r| r.port).collect(),
            primary_relay,
            replica_relays,
            px: Arc::new(px),
            console,
            fds,
        }
    }

    async fn client_of(px: &Pgmux, db: &str) -> Client {
        try_client(px, db).await.expect("client login")
    }

    async fn client(&self) -> Client {
        Self::client_of(&self.px, &self.db).await
    }

    /// SHOW HOSTS' row for the host behind `relay_port`: (health, banned).
    async fn host(&self, relay_port: u16) -> (String, String) {
        let rows = self.console.show("SHOW HOSTS").await;
        let r = rows
            .iter()
            .find(|r| r["port"] == relay_port.to_string() && r["database"] == self.db)
            .unwrap_or_else(|| panic!("no SHOW HOSTS row for port {relay_port}: {rows:?}"));
        (r["health"].clone(), r["banned"].clone())
    }

    /// The idle baseline: no client, every host's pool at rest and emptied, only the
    /// monitor's connection left in each relay, fds as before.
    async fn settled(&self) {
        self.primary_relay.clear();
        for r in &self.replica_relays {
            r.clear();
        }
        self.console.wait_idle(&self.db, 0).await;
        self.console.empty_pool(&self.db).await;
        wait_until_async("only the monitor's connections", WAIT, || async {
            self.primary_relay.open() == 1 && self.replica_relays.iter().all(|r| r.open() == 1)
        })
        .await;
        wait_fds(self.px.pid(), self.fds).await;
    }
}

async fn try_client(px: &Pgmux, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(&px.conn_str("app", db, None), NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Which server answered.
async fn port_of(c: &Client) -> Result<u16, tokio_postgres::Error> {
    let rows = c.simple_query("SELECT inet_server_port()").await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|p| p.parse().unwrap()),
            _ => None,
        })
        .expect("a row"))
}

/// What the client was told: SQLSTATE and message, or the driver's words.
fn told(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {} {}", d.severity(), d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// Clients reading in a loop, reconnecting after an error; reads per server and errors.
struct ReadLoad {
    stop: Arc<AtomicBool>,
    reads: Arc<Mutex<BTreeMap<u16, u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ReadLoad {
    fn start(px: &Arc<Pgmux>, db: &str, clients: usize) -> ReadLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(Mutex::new(BTreeMap::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (px, db) = (px.clone(), db.to_string());
                let (stop, reads, errors) = (stop.clone(), reads.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut c: Option<Client> = None;
                    while !stop.load(Ordering::SeqCst) {
                        if c.as_ref().is_none_or(Client::is_closed) {
                            c = Some(try_client(&px, &db).await.expect("login"));
                        }
                        // bounded so a hang fails the test rather than stalling it
                        let r = tokio::time::timeout(WAIT, port_of(c.as_ref().unwrap())).await;
                        match r.expect("a read hung") {
                            Ok(p) => *reads.lock().unwrap().entry(p).or_insert(0) += 1,
                            Err(e) => errors.lock().unwrap().push(told(&e)),
                        }
                    }
                })
            })
            .collect();
        ReadLoad {
            stop,
            reads,
            errors,
            tasks,
        }
    }

    fn reads_on(&self, port: u16) -> u64 {
        self.reads.lock().unwrap().get(&port).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.reads.lock().unwrap().values().sum()
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    async fn stop(self) -> (BTreeMap<u16, u64>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let reads = self.reads.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        (reads, errors)
    }
}

/// A replica partitioned away (blackholed: no RST, no answer) under read load: the monitor's
/// check times out and bans it, reads carry on on the other replica; reads that were already
/// on it get query_timeout. Healed, it takes reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_partitioned_under_read_load_then_healed() {
    let cl = Cluster::start("rflt_partition").await;
    let load = ReadLoad::start(&cl.px, &cl.db, 6);
    let (victim, victim_relay) = (cl.replicas[0], &cl.replica_relays[0]);
    wait_until_async("reads on the victim replica", WAIT, || async {
        load.reads_on(victim) > 20
    })
    .await;

    let t0 = Instant::now();
    victim_relay.set_all(Fault::Blackhole);
    wait_until_async("the partitioned replica banned", WAIT, || async {
        let (health, banned) = cl.host(victim_relay.port()).await;
        health == "down" && banned == "1"
    })
    .await;
    let banned_after = t0.elapsed();
    // reads carry on elsewhere: from now on none reaches the victim
    let (on_victim, total) = (load.reads_on(victim), load.total());
    wait_until_async("reads continuing elsewhere", WAIT, || async {
        load.total() > total + 200
    })
    .await;
    let errors_partitioned = load.errors();
    // a new client sees no error and is served by the other replica or the primary
    let c = cl.client().await;
    for _ in 0..30 {
        let p = port_of(&c)
            .await
            .expect("a read while a replica is partitioned");
        assert_ne!(p, victim, "a read reached the partitioned replica");
    }
    drop(c);
    assert!(
        load.reads_on(victim) <= on_victim,
        "reads on the victim after it was banned"
    );
    println!(
        "PARTITION: replica banned {} ms after the blackhole began (server_connect_timeout 4 s); \
         reads meanwhile: {:?}; clients saw {:?}",
        banned_after.as_millis(),
        load.reads.lock().unwrap(),
        errors_partitioned
    );

    let t1 = Instant::now();
    victim_relay.clear();
    let before = load.reads_on(victim);
    wait_until_async("the healed replica taking reads again", WAIT, || async {
        load.reads_on(victim) > before + 20
    })
    .await;
    println!(
        "RECOVERY replica healed: reads on it again {} ms after the partition ended (ban_time 1 s)",
        t1.elapsed().as_millis()
    );
    let (reads, errors) = load.stop().await;
    println!("PARTITION: reads by server {reads:?}; errors {errors:?}");
    // the only errors: reads already on the replica's blackholed servers, freed by
    // query_timeout (pgmux's FATAL, then the driver's words for the closed connection)
    for e in &errors {
        assert!(
            e.contains("08P01 query_timeout") || e.contains("connection closed"),
            "an error the partition does not explain: {e} ({errors:?})"
        );
    }
    assert!(
        errors.iter().filter(|e| e.contains("08P01")).count() <= 12,
        "more reads timed out than were on the replica when it vanished: {errors:?}"
    );
    cl.settled().await;
}

/// The primary stalls (accepts bytes, answers nothing) under reads and writes: writes end with
/// a clear error within query_timeout / server_connect_timeout (never a hang), reads carry on
/// on the replicas without an error; once the stall is lifted writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_primary_fails_writes_clearly_while_reads_continue() {
    let cl = Cluster::start("rflt_primary_stall").await;
    // a pooled primary server, so the first write meets a stalled lent server
    let w = cl.client().await;
    w.simple_query("INSERT INTO w VALUES (0)").await.unwrap();
    let load = ReadLoad::start(&cl.px, &cl.db, 4);
    wait_until_async("read load running", WAIT, || async { load.total() > 50 }).await;

    cl.primary_relay.set_all(Fault::Stall);
    let t0 = Instant::now();
    let mut seen = BTreeMap::<String, u32>::new();
    // writes until the monitor has marked the primary down, and a few more after
    let mut after_down = 0;
    while after_down < 3 {
        assert!(t0.elapsed() < WAIT, "the primary was never marked down");
        let c = match try_client(&cl.px, &cl.db).await {
            Ok(c) => c,
            Err(e) => panic!("login while the primary is stalled: {}", told(&e)),
        };
        let started = Instant::now();
        let r = tokio::time::timeout(WAIT, c.simple_query("INSERT INTO w VALUES (1)"))
            .await
            .expect("a write hung on the stalled primary");
        let e = r.expect_err("a write cannot succeed on a stalled primary");
        let what = told(&e);
        println!(
            "CLIENT SEES write on a stalled primary after {} ms: {what}",
            started.elapsed().as_millis()
        );
        assert!(
            what.contains("08P01 query_timeout")
                || what.contains("08006")
                || what.contains("57P03"),
            "not a clear error: {what}"
        );
        *seen
            .entry(what.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .or_default() += 1;
        if cl.host(cl.primary_relay.port()).await.0 == "down" {
            after_down += 1;
        }
    }
    // reads never touched the primary: they carried on without an error
    let total = load.total();
    wait_until_async("reads continuing on the replicas", WAIT, || async {
        load.total() > total + 200
    })
    .await;
    if !load.errors().is_empty() {
        // the Arc'd pgmux outlives a panic here: its warnings would not be printed
        let warned: Vec<String> = cl
            .px
            .log()
            .lines()
            .filter(|l| l.contains("WARN"))
            .map(str::to_string)
            .collect();
        println!("pgmux's warnings:\n{}", warned.join("\n"));
    }
    // A few reads have been seen to wait out query_timeout (two in one CI run of 2026-11-29,
    // no replica banned). The cause is the replica, not the stall or pgmux: the same happens
    // with no fault injected and no relay (a read load straight at the replicas while this
    // binary's other tests run), and when it did, a direct connection to that replica, not
    // through pgmux, took over 4 s to run `SELECT ... FROM pg_stat_activity` at the same
    // moment, and the stuck read's backend started its query only as pgmux gave up. With
    // query_timeout = 4 such a read is ended as PgBouncer would: tolerated and printed; any
    // other error, or more of them, fail the test.
    let errors = load.errors();
    println!("READS FAILED during the primary stall: {errors:?}");
    assert!(
        errors.len() <= 4
            && errors
                .iter()
                .all(|e| e.contains("08P01 query_timeout") || e.contains("connection closed")),
        "reads failed while only the primary was stalled: {errors:?}"
    );
    assert_eq!(load.reads_on(cl.primary), 0, "a read went to the primary");
    println!("PRIMARY STALL: write errors by kind {seen:?}");
    drop(w);

    let t1 = Instant::now();
    cl.primary_relay.clear();
    let c = cl.client().await;
    wait_until_async("writes working again", WAIT, || async {
        c.simple_query("INSERT INTO w VALUES (2)").await.is_ok()
    })
    .await;
    println!(
        "RECOVERY primary stall lifted: first write ok {} ms later",
        t1.elapsed().as_millis()
    );
    drop(c);
    let (reads, later) = load.stop().await;
    println!("PRIMARY STALL: reads by server {reads:?}");
    assert_eq!(later, errors, "reads failed after the stall was lifted");
    assert!(reads.keys().all(|p| cl.replicas.contains(p)), "{reads:?}");
    cl.settled().await;
}
