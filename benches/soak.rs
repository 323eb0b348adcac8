//! Soak: thousands of clients run a mixed workload through pgmux for a long time while the
//! fault relay (tests/common/faults.rs) breaks server connections at random. It reports
//! throughput, errors by kind, pgmux's RSS and open fds over time, and fails (exit 1) if
//! memory or fds grow without bound, if pgmux does not come back to its idle baseline, or if
//! a client sees an error the injected faults do not explain.
//!
//! Not part of `cargo bench` by default (it would run for ten minutes): it only runs with
//! `--run`.
//!
//! ```sh
//! cargo bench --bench soak -- --run                      # 2,000 clients, 10 minutes
//! cargo bench --bench soak -- --run --secs 150 --clients 2000 --sample 10
//! ```
//!
//! Each client loops over: a read by primary key (extended protocol), an autocommit write,
//! a transaction (UPDATE + INSERT), a named prepared statement (pgmux tracks it across
//! servers), a query cancelled while it runs, and a reconnect; then it thinks for a random
//! time up to `--think-ms`. Faults, one every `--fault-every` seconds on average: reset one
//! server connection, reset one mid-response, stall one for 2 s, half-close one, blackhole one
//! (pgmux's `query_timeout = 10` frees its client), or 20 ms of latency on all of them for 3 s.

#[path = "../tests/common/mod.rs"]
mod common;

use common::faults::{Fault, FaultRelay};
use common::probe::{fd_count, rss_kib, Console};
use common::{PgCluster, Pgmux};
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

struct Opts {
    secs: u64,
    clients: usize,
    think_ms: u64,
    fault_every: f64,
    sample: u64,
}

fn opts() -> Option<Opts> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--run") {
        return None;
    }
    let get = |name: &str, default: f64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number"))
            })
            .unwrap_or(default)
    };
    Some(Opts {
        secs: get("--secs", 600.0) as u64,
        clients: get("--clients", 2000.0) as usize,
        think_ms: get("--think-ms", 500.0) as u64,
        fault_every: get("--fault-every", 5.0),
        sample: get("--sample", 30.0) as u64,
    })
}

/// Whether the faults injected so far explain an error kind: a server connection lost (pgmux's
/// FATAL 08006, and the driver's words for the connection pgmux closes after it), or a
/// blackholed server that never answers (FATAL 08P01 query_timeout).
fn explained(kind: &str, injected: &BTreeMap<&str, u64>) -> bool {
    let lost = ["reset", "reset mid-response", "half-close", "blackhole"]
        .iter()
        .any(|f| injected.contains_key(f));
    let timed_out = injected.contains_key("blackhole");
    (lost
        && (kind == "08006"
            || kind.contains("connection closed")
            || kind.contains("error communicating with the server")))
        || (timed_out && kind == "08P01")
}

fn kind(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None => e.to_string(),
    }
}

#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    cancels: AtomicU64,
    reconnects: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, k: String) {
        *self.errors.lock().unwrap().entry(k).or_default() += 1;
    }
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// One client's life: connect, then random actions until `stop`.
async fn client_loop(url: String, think_ms: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => match connect(&url).await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    tally.error(format!("connect: {}", kind(&e)));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let (action, aid, delta) = {
            let mut r = rand::thread_rng();
            (
                r.gen_range(0..100u32),
                r.gen_range(1..=10_000i32),
                r.gen_range(-50..50i32),
            )
        };
        let result = match action {
            0..=44 => c
                .query_opt(
                    "SELECT abalance FROM soak_accounts WHERE aid = $1",
                    &[&aid],
                )
                .await
                .map(drop),
            45..=64 => c
                .execute(
                    "UPDATE soak_accounts SET abalance = abalance + $1 WHERE aid = $2",
                    &[&delta, &aid],
                )
                .await
                .map(drop),
            65..=79 => {
                c.batch_execute(&format!(
                    "BEGIN; UPDATE soak_accounts SET abalance = abalance + {delta} WHERE aid = {aid}; \
                     INSERT INTO soak_history (aid, delta) VALUES ({aid}, {delta}); COMMIT"
                ))
                .await
            }
            80..=93 => match c
                .prepare("SELECT count(*) FROM soak_history WHERE aid = $1")
                .await
            {
                Ok(st) => c.query_one(&st, &[&aid]).await.map(drop),
                Err(e) => Err(e),
            },
            94..=96 => {
                // a query cancelled while it runs: 57014 is the expected answer
                let token = c.cancel_token();
                let canceller = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    token.cancel_query(NoTls).await
                });
                let r = c.simple_query("SELECT pg_sleep(0.5)").await;
                let _ = canceller.await;
                match r {
                    Err(e) if kind(&e) == "57014" => {
                        tally.cancels.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    // the cancel may arrive before the query reaches a server: it then runs
                    other => other.map(drop),
                }
            }
            _ => {
                client = None;
                tally.reconnects.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        };
        match result {
            Ok(()) => {
                tally.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tally.error(kind(&e)),
        }
        let think = rand::thread_rng().gen_range(0..=think_ms);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

/// Injects a random fault every `every` seconds on average until `stop`; counts them by kind.
async fn fault_loop(
    relay: Arc<FaultRelay>,
    every: f64,
    stop: Arc<AtomicBool>,
    injected: Arc<Mutex<BTreeMap<&'static str, u64>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (wait, pick, which) = {
            let mut r = rand::thread_rng();
            (
                r.gen_range(0.0..2.0 * every),
                r.gen_range(0..6u32),
                r.gen::<usize>(),
            )
        };
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        let ids = relay.conn_ids();
        if ids.is_empty() {
            continue;
        }
        let id = ids[which % ids.len()];
        let name = match pick {
            0 => {
                relay.set_conn(id, Fault::Reset);
                "reset"
            }
            1 => {
                relay.set_conn(id, Fault::ResetAfter(1 + which % 200));
                "reset mid-response"
            }
            2 => {
                relay.set_conn(id, Fault::Stall);
                tokio::time::sleep(Duration::from_secs(2)).await;
                relay.set_conn(id, Fault::Pass);
                "stall 2 s"
            }
            3 => {
                relay.set_conn(id, Fault::HalfClose);
                "half-close"
            }
            4 => {
                // the server vanishes without a reset: only query_timeout frees its client
                relay.set_conn(id, Fault::Blackhole);
                "blackhole"
            }
            _ => {
                relay.set_all(Fault::Latency(Duration::from_millis(20)));
                tokio::time::sleep(Duration::from_secs(3)).await;
                relay.clear();
                "latency 20 ms for 3 s"
            }
        };
        *injected.lock().unwrap().entry(name).or_default() += 1;
    }
}

fn main() {
    let Some(o) = opts() else {
        eprintln!("soak: skipped (run with `cargo bench --bench soak -- --run [--secs N]`)");
        return;
    };
    // pgmux logs at warn: at debug, thousands of clients would write gigabytes
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(soak(o));
    std::process::exit(i32::from(failed));
}

/// Returns true when the soak failed.
async fn soak(o: Opts) -> bool {
    let pg = PgCluster::start(0);
    pg.primary().psql(
        "app",
        "CREATE TABLE soak_accounts (aid int PRIMARY KEY, abalance int NOT NULL DEFAULT 0);
         INSERT INTO soak_accounts (aid) SELECT generate_series(1, 10000);
         CREATE TABLE soak_history (aid int, delta int, at timestamptz DEFAULT now());
         CREATE INDEX ON soak_history (aid);
         GRANT ALL ON soak_accounts, soak_history TO app",
    );
    let relay = Arc::new(FaultRelay::start(pg.primary().port));
    let px = Pgmux::start(&format!(
        r#"
[pgmux]
listen_port = {{port}}
auth_type = "trust"
pool_mode = "transaction"
default_pool_size = 40
max_client_conn = {}
query_wait_timeout = 60
server_connect_timeout = 5
query_timeout = 10
admin_users = ["admin"]
[[users]]
name = "app"
[[users]]
name = "admin"
[[databases]]
name = "app"
host = "127.0.0.1"
port = {}
server_user = "postgres"
"#,
        o.clients + 100,
        relay.port()
    ));
    let pid = px.pid();
    let console = Console::connect(&px, "admin", None).await;
    // idle baseline: the pool exists, holds no server; only the console is connected
    let warm = connect(&px.conn_str("app", "app", None)).await.unwrap();
    warm.simple_query("SELECT 1").await.unwrap();
    drop(warm);
    console.wait_idle("app", 0).await;
    console.empty_pool("app").await;
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
    println!(
        "soak: {} clients, {} s, think up to {} ms, a fault every ~{} s; pgmux pid {pid}: {fds0} fds, {rss0} KiB idle",
        o.clients, o.secs, o.think_ms, o.fault_every
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let injected = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for i in 0..o.clients {
        tasks.push(tokio::spawn(client_loop(
            px.conn_str("app", "app", None),
            o.think_ms,
            stop.clone(),
            tally.clone(),
        )));
        // spread the logins over the first seconds
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let faults = tokio::spawn(fault_loop(
        relay.clone(),
        o.fault_every,
        stop.clone(),
        injected.clone(),
    ));

    println!("\n| t (s) | ops/s | errors | clients | servers | RSS (KiB) | fds |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let start = Instant::now();
    let (mut last_ops, mut last_t) = (0u64, start);
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    while start.elapsed() < Duration::from_secs(o.secs) {
        tokio::time::sleep(Duration::from_secs(o.sample).min(
            Duration::from_secs(o.secs).saturating_sub(start.elapsed()) + Duration::from_millis(1),
        ))
        .await;
        let ops = tally.ops.load(Ordering::Relaxed);
        let rate = (ops - last_ops) as f64 / last_t.elapsed().as_secs_f64();
        (last_ops, last_t) = (ops, Instant::now());
        let errors: u64 = tally.errors.lock().unwrap().values().sum();
        let pool = console.pool("app").await.unwrap_or_default();
        let clients = pool.get("cl_active").copied().unwrap_or(0)
            + pool.get("cl_waiting").copied().unwrap_or(0);
        let servers =
            pool.get("sv_active").copied().unwrap_or(0) + pool.get("sv_idle").copied().unwrap_or(0);
        let (rss, fds) = (rss_kib(pid), fd_count(pid));
        let t = start.elapsed().as_secs();
        samples.push((t, rss, fds));
        println!("| {t} | {rate:.0} | {errors} | {clients} | {servers} | {rss} | {fds} |");
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let _ = faults.await;
    relay.clear();

    let mut failures = Vec::new();
    // back to the idle baseline: no client, nothing lent or waiting, same fds
    console.wait_idle("app", 0).await;
    console.empty_pool("app").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fd_count(pid) != fds0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fds_end, rss_end) = (fd_count(pid), rss_kib(pid));
    if fds_end != fds0 {
        failures.push(format!("fds {fds0} at rest before, {fds_end} after"));
    }
    // memory: the second half of the run must not keep climbing past the first half's peak
    let half = samples.len() / 2;
    let first_peak = samples[..half.max(1)]
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    let second_peak = samples[half..].iter().map(|s| s.1).max().unwrap_or(0);
    if samples.len() >= 4 && second_peak > first_peak + first_peak / 4 + 8 * 1024 {
        failures.push(format!(
            "RSS still growing: peak {first_peak} KiB in the first half, {second_peak} KiB in the second"
        ));
    }
    let errors = tally.errors.lock().unwrap().clone();
    let injected = injected.lock().unwrap().clone();
    for (k, n) in &errors {
        if !explained(k, &injected) {
            failures.push(format!("{n} errors the faults do not explain: {k}"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let ops = tally.ops.load(Ordering::Relaxed);
    println!(
        "\nsoak: {ops} operations in {secs:.0} s ({:.0}/s), {} cancels answered 57014, {} reconnects",
        ops as f64 / secs,
        tally.cancels.load(Ordering::Relaxed),
        tally.reconnects.load(Ordering::Relaxed)
    );
    println!(
        "faults injected: {} {injected:?}",
        injected.values().sum::<u64>()
    );
    println!("errors by kind: {errors:?}");
    println!(
        "pgmux at rest: {fds0} fds / {rss0} KiB before, {fds_end} fds / {rss_end} KiB after; RSS peak {first_peak} KiB (first half), {second_peak} KiB (second half)"
    );
    for f in &failures {
        println!("FAIL: {f}");
    }
    if failures.is_empty() {
        println!("soak: PASS");
    }
    !failures.is_empty()
}
