//! Restart without dropping clients: two pgmux processes share one port with SO_REUSEPORT,
//! the old one is sent SIGTERM under a load of short-lived connections, and no client may see
//! an error while the old process drains and exits.
//!
//! Linux resets connections still queued on a closing SO_REUSEPORT listener unless
//! `net.ipv4.tcp_migrate_req = 1` (a network-namespace sysctl) moves them to a sibling
//! listener; the test sets it when it runs as root and refuses to run without it, since the
//! rolling-restart procedure in docs/deployment.md depends on it.

mod common;

use common::{wait_until_async, PgCluster, Pgmux};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::NoTls;

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
/// Concurrent connect-query-disconnect loops.
const WORKERS: usize = 8;
/// Upper bound on connections per worker, so the load stops by itself whatever happens.
const MAX_PER_WORKER: u64 = 5_000;
const DEADLINE: Duration = Duration::from_secs(60);

fn ensure_migrate_req() {
    let current = std::fs::read_to_string(MIGRATE_REQ)
        .unwrap_or_else(|e| panic!("{MIGRATE_REQ}: {e} (needs Linux 5.14 or later)"));
    if current.trim() == "1" {
        return;
    }
    std::fs::write(MIGRATE_REQ, "1").unwrap_or_else(|e| {
        panic!(
            "cannot set net.ipv4.tcp_migrate_req = 1 ({e}); without it Linux resets connections \
             queued on the old listener. Run as root or `sysctl -w net.ipv4.tcp_migrate_req=1`"
        )
    });
}

fn config() -> String {
    format!(
        "[pgmux]\nlisten_port = {{port}}\nso_reuseport = true\nauth_type = \"trust\"\n\
         pool_mode = \"transaction\"\nshutdown_timeout = 60\n\
         [[users]]\nname = \"postgres\"\n\
         [[databases]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {}\n",
        PgCluster::shared().primary().port
    )
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// One connection's life: connect, one query, Terminate.
async fn one_client(url: &str) -> Result<(), String> {
    let connect =
        tokio::time::timeout(Duration::from_secs(20), tokio_postgres::connect(url, NoTls));
    let (client, conn) = connect
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let conn = tokio::spawn(conn);
    let rows = client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| format!("query: {e}"))?;
    let one = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    if one.as_deref() != Some("1") {
        return Err(format!("SELECT 1 gave {one:?}"));
    }
    drop(client);
    match conn.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("connection: {e}")),
        Err(e) => Err(format!("connection task: {e}")),
    }
}

async fn worker(url: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    for _ in 0..MAX_PER_WORKER {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match one_client(&url).await {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tally.errors.lock().unwrap().push(e),
        }
    }
}

/// Waits until the load has completed `n` more connections than it had at the call.
async fn more_connections(tally: &Tally, n: u64, what: &str) {
    let target = tally.ok.load(Ordering::Relaxed) + n;
    wait_until_async(what, DEADLINE, || async {
        tally.ok.load(Ordering::Relaxed) >= target || !tally.errors.lock().unwrap().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_port_to_a_second_process_without_a_client_error() {
    ensure_migrate_req();
    let mut old = Pgmux::start(&config());
    let url = old.conn_str("postgres", "app", None);

    // Clients connected before the new process exists are certainly the old one's.
    let mut lingering = Vec::new();
    for _ in 0..3 {
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.unwrap();
        lingering.push(c);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(worker(url.clone(), stop.clone(), tally.clone())))
        .collect();
    more_connections(&tally, 100, "load through the old process").await;

    let new = Pgmux::start_beside(&old, &config());
    more_connections(&tally, 200, "load through both processes").await;

    old.signal(libc::SIGTERM);
    more_connections(&tally, 300, "load during the handover").await;
    // The old process still serves the clients it has, transactions included...
    for c in &lingering {
        c.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    }
    assert!(
        old.wait_exit(Duration::ZERO).is_none(),
        "the old process exited while clients remained"
    );
    // ...and exits once they have left.
    drop(lingering);
    let status = old
        .wait_exit(DEADLINE)
        .expect("the old process exits once its clients left");
    assert!(status.success(), "old pgmux: {status:?}\n{}", old.log());

    // Now every connection reaches the new process.
    more_connections(&tally, 200, "load through the new process alone").await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let errors = tally.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} of {} clients saw an error, first: {:?}\nnew pgmux log tail:\n{}",
        errors.len(),
        errors.len() as u64 + tally.ok.load(Ordering::Relaxed),
        errors.iter().take(5).collect::<Vec<_>>(),
        new.log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(tally.ok.load(Ordering::Relaxed) >= 800);
}
