//! One process's share of a run: one task per client connection (paced by --rate, at most
//! --connect-concurrency logins at once), the workload loop or idle hold, the stop at
//! --duration / --transactions / --hold / Ctrl-C, and the once-a-second progress report.

use crate::cli::Args;
use crate::net::{self, NetError, Target};
use crate::observe::Observed;
use crate::stats::{classify, Progress, Stats, Summary};
use crate::workload::Workload;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Open files a process needs besides its client sockets.
const FD_MARGIN: u64 = 64;
/// After the stop, how long clients may take to finish their transaction and close.
pub const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "{connections} connections need about {need} open files, but this process may hold \
         {limit}: split the run with --processes {suggest}"
    )]
    FdLimit {
        connections: u32,
        need: u64,
        limit: u64,
        suggest: u64,
    },
    #[error(transparent)]
    Net(#[from] NetError),
}

/// What a child process of --processes writes on stdout, one JSON object a line.
#[derive(Serialize, Deserialize, Debug)]
pub enum ChildMsg {
    Progress(Progress),
    Summary(Box<Summary>),
}

/// Shared by the client tasks of this process.
struct Ctx {
    target: Target,
    workload: Workload,
    stats: Stats,
    stop: watch::Receiver<bool>,
    connecting: Semaphore,
    connect_timeout: Duration,
    transactions: Option<u64>,
    sources: Vec<IpAddr>,
    /// Clients whose connection attempt has ended (made or failed).
    settled: AtomicU64,
    all_settled: Notify,
    requested: u64,
}

/// Checks that `connections` sockets fit under the open-file limit (raising the soft limit
/// to the hard one first).
pub fn check_fd_limit(connections: u32) -> Result<(), RunError> {
    let limit = net::raise_nofile_limit()?;
    let need = u64::from(connections) + FD_MARGIN;
    if need > limit {
        let per = limit.saturating_sub(FD_MARGIN).max(1);
        return Err(RunError::FdLimit {
            connections,
            need,
            limit,
            suggest: u64::from(connections).div_ceil(per),
        });
    }
    Ok(())
}

/// Runs this process's connections; returns its summary.
pub async fn run_local(
    args: &Args,
    workload: Workload,
    observed: Option<Arc<Observed>>,
) -> Result<Summary, RunError> {
    check_fd_limit(args.connections)?;
    let target = Target::resolve(
        &args.host,
        args.port,
        &args.user,
        args.password.as_deref(),
        &args.dbname,
    )
    .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let requested = u64::from(args.connections);
    let ctx = Arc::new(Ctx {
        target,
        workload,
        stats: Stats::new(),
        stop: stop_rx,
        connecting: Semaphore::new(args.connect_concurrency as usize),
        connect_timeout: args.connect_timeout(),
        transactions: args.transactions,
        sources: args.source_addrs.clone(),
        settled: AtomicU64::new(0),
        all_settled: Notify::new(),
        requested,
    });

    let t0 = Instant::now();
    let deadline = t0 + args.duration();
    let mut clients = JoinSet::new();
    for i in 0..requested {
        let start_at = if args.rate > 0.0 {
            t0 + Duration::from_secs_f64(i as f64 / args.rate)
        } else {
            t0
        };
        let source = (!ctx.sources.is_empty())
            .then(|| ctx.sources[((args.first_index + i) % ctx.sources.len() as u64) as usize]);
        clients.spawn(client(ctx.clone(), i, start_at, source));
    }

    let reporter = {
        let ctx = ctx.clone();
        let out = if args.child {
            Report::Child
        } else if args.quiet {
            Report::Quiet
        } else {
            Report::Stderr
        };
        tokio::spawn(report(
            move || ctx.stats.progress(),
            requested,
            out,
            observed,
            args.ready_file.clone(),
        ))
    };
    let hold = async {
        match args.hold {
            Some(h) => {
                loop {
                    let notified = ctx.all_settled.notified();
                    if ctx.settled.load(Ordering::Acquire) >= requested {
                        break;
                    }
                    notified.await;
                }
                tokio::time::sleep(Duration::from_secs_f64(h)).await;
            }
            None => std::future::pending().await,
        }
    };

    let mut end = None;
    let all_done = async { while clients.join_next().await.is_some() {} };
    tokio::select! {
        _ = all_done => end = Some(Instant::now()),
        _ = tokio::time::sleep_until(deadline) => {}
        _ = hold => {}
        _ = tokio::signal::ctrl_c() => eprintln!("pgmux-load: interrupted; finishing"),
    }
    let end = end.unwrap_or_else(Instant::now);
    let _ = stop_tx.send(true);
    let finish = async { while clients.join_next().await.is_some() {} };
    if tokio::time::timeout(GRACE, finish).await.is_err() {
        eprintln!(
            "pgmux-load: {} client(s) still busy {GRACE:?} after the stop; abandoning them",
            clients.len()
        );
        clients.abort_all();
    }
    reporter.abort();
    Ok(ctx.stats.summary(requested, end - t0))
}

/// One client connection's life.
async fn client(ctx: Arc<Ctx>, id: u64, start_at: Instant, source: Option<IpAddr>) {
    let mut stop = ctx.stop.clone();
    let permit = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => return,
        p = async {
            tokio::time::sleep_until(start_at).await;
            ctx.connecting.acquire().await
        } => p.expect("semaphore never closed"),
    };
    ctx.stats.attempted.fetch_add(1, Ordering::Relaxed);
    let began = Instant::now();
    let outcome = tokio::time::timeout(ctx.connect_timeout, ctx.target.connect(source)).await;
    drop(permit);
    let settle = || {
        if ctx.settled.fetch_add(1, Ordering::AcqRel) + 1 == ctx.requested {
            ctx.all_settled.notify_waiters();
        }
    };
    let (pg, conn) = match outcome {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            let (kind, msg) = match &e {
                NetError::Postgres(pe) => classify(pe),
                other => ("connect".to_string(), other.to_string()),
            };
            ctx.stats.error(kind, msg);
            settle();
            return;
        }
        Err(_) => {
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(
                "connect timeout".into(),
                format!("no login within {:?}", ctx.connect_timeout),
            );
            settle();
            return;
        }
    };
    ctx.stats.connected(began.elapsed());
    settle();
    let mut conn = tokio::spawn(conn);

    if matches!(ctx.workload, Workload::Idle) {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            r = &mut conn => {
                let msg = match r {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the server closed the connection".to_string(),
                };
                ctx.stats.error("closed while idle".into(), msg);
                ctx.stats.closed();
                return;
            }
        }
    } else {
        let mut done = 0u64;
        while !*stop.borrow() && ctx.transactions.is_none_or(|t| done < t) {
            let began = Instant::now();
            match ctx.workload.run_one(&pg).await {
                Ok(()) => ctx.stats.transaction(id, began.elapsed()),
                Err(e) => {
                    let (kind, msg) = classify(&e);
                    ctx.stats.error(kind, msg);
                    if pg.is_closed() {
                        break;
                    }
                }
            }
            done += 1;
        }
    }
    drop(pg);
    let _ = tokio::time::timeout(GRACE, conn).await;
    ctx.stats.closed();
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Human progress lines on stderr.
    Stderr,
    /// JSON progress lines on stdout, for the parent process.
    Child,
    Quiet,
}

/// Once a second: the progress line (with TPS over that second and the server connection
/// count), and the ready file once every connection has been attempted and settled.
pub async fn report(
    progress: impl Fn() -> Progress,
    requested: u64,
    out: Report,
    observed: Option<Arc<Observed>>,
    mut ready_file: Option<PathBuf>,
) {
    let t0 = Instant::now();
    let mut tick = tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tx = 0;
    let mut last_at = t0;
    loop {
        let now = tick.tick().await;
        let p = progress();
        let secs = (now - last_at).as_secs_f64();
        let tps = if secs > 0.0 {
            ((p.transactions - last_tx) as f64 / secs).round() as u64
        } else {
            0
        };
        (last_tx, last_at) = (p.transactions, now);
        match out {
            Report::Stderr => eprintln!(
                "{}",
                p.line(
                    (now - t0).as_secs(),
                    requested,
                    tps,
                    observed.as_ref().and_then(|o| o.current())
                )
            ),
            Report::Child => println!(
                "{}",
                serde_json::to_string(&ChildMsg::Progress(p)).expect("progress serialises")
            ),
            Report::Quiet => {}
        }
        if p.made + p.failed >= requested {
            if let Some(path) = ready_file.take() {
                if let Err(e) = std::fs::write(&path, format!("{}\n", p.made)) {
                    eprintln!("pgmux-load: cannot write {}: {e}", path.display());
                }
            }
        }
    }
}
