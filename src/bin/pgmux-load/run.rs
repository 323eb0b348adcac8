//! One process's share of a run: one task per client connection (paced by --rate, at most
//! --connect-concurrency logins at once), the workload loop or idle hold, the stop at
//! --duration / --transactions / --hold / Ctrl-C, and the once-a-second progress report.

use crate::cli::Args;
use crate::net::{self, NetError, Target};
use crate::observe::Observed;
use crate::stats::{classify, Progress, Stats, Summary};
use crate::workload::Workload;
use serde::{Deserialize, Serialize};
use std::io::Write;
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
/// After the stop, how long a running transaction may take before it is cancelled.
const CANCEL_AFTER: Duration = Duration::from_millis(500);
/// Exit status after a second Ctrl-C, as a shell reports death by SIGINT.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "{connections} connections in {processes} process(es) need about {need} open files \
         each, but a process may hold {limit}: split the run with --processes {suggest}"
    )]
    FdLimit {
        connections: u32,
        processes: u32,
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

impl Ctx {
    /// Returns once every connection attempt has ended (made or failed).
    async fn wait_settled(&self) {
        loop {
            let notified = self.all_settled.notified();
            if self.settled.load(Ordering::Acquire) >= self.requested {
                return;
            }
            notified.await;
        }
    }
}

/// Writes --ready-file: the number of connections made.
pub fn write_ready_file(path: &std::path::Path, made: u64) {
    if let Err(e) = std::fs::write(path, format!("{made}\n")) {
        eprintln!("pgmux-load: cannot write {}: {e}", path.display());
    }
}

/// Checks that `connections` sockets spread over `processes` fit under the open-file limit
/// of each (raising the soft limit to the hard one first).
pub fn check_fd_limit(connections: u32, processes: u32) -> Result<(), RunError> {
    let limit = net::raise_nofile_limit()?;
    let need = u64::from(connections.div_ceil(processes.max(1))) + FD_MARGIN;
    if need > limit {
        let per = limit.saturating_sub(FD_MARGIN).max(1);
        return Err(RunError::FdLimit {
            connections,
            processes,
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
    // (a child's share passes: its parent checked the largest share)
    check_fd_limit(args.connections, 1)?;
    let target = args.target().await?;
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
            t0 + Duration::from_secs_f64(args.rate_offset + i as f64 / args.rate)
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
            None,
        ))
    };
    // the ready file as soon as every connection has been attempted, not at the next tick:
    // a run may end before it
    let ready = args.ready_file.clone().map(|path| {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            ctx.wait_settled().await;
            write_ready_file(&path, ctx.stats.progress().made);
        })
    });
    let hold = async {
        match args.hold {
            Some(h) => {
                ctx.wait_settled().await;
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
        _ = tokio::signal::ctrl_c() => {
            eprintln!("pgmux-load: interrupted; finishing (Ctrl-C again to quit at once)");
            tokio::spawn(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(EXIT_INTERRUPTED);
                }
            });
        }
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
    if let Some(r) = ready {
        r.abort();
    }
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
    let login = async {
        match ctx.connect_timeout {
            // 0: no limit, as libpq's connect_timeout=0
            Duration::ZERO => Ok(ctx.target.connect(source).await),
            t => tokio::time::timeout(t, ctx.target.connect(source)).await,
        }
    };
    // the end of the run also ends a login that is still waiting for the server
    let outcome = tokio::select! {
        o = login => Some(o),
        _ = stop.wait_for(|s| *s) => None,
    };
    drop(permit);
    let settle = || {
        if ctx.settled.fetch_add(1, Ordering::AcqRel) + 1 == ctx.requested {
            ctx.all_settled.notify_waiters();
        }
    };
    let Some(outcome) = outcome else {
        ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
        ctx.stats.error(
            "connect".into(),
            "the run ended before the login completed".into(),
        );
        settle();
        return;
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
                    Ok(Err(e)) => match classify(&e) {
                        (code, msg) if e.as_db_error().is_some() => format!("{code} {msg}"),
                        (_, msg) => msg,
                    },
                    _ => "the server closed the connection".to_string(),
                };
                ctx.stats.error("closed while idle".into(), msg);
                ctx.stats.closed();
                return;
            }
        }
    } else {
        run_transactions(&ctx, &pg, id, &mut stop).await;
    }
    drop(pg);
    let _ = tokio::time::timeout(GRACE, conn).await;
    ctx.stats.closed();
}

/// The workload loop of one connection, until the stop, its --transactions or a lost
/// connection.
async fn run_transactions(
    ctx: &Ctx,
    pg: &tokio_postgres::Client,
    id: u64,
    stop: &mut watch::Receiver<bool>,
) {
    let mut done = 0u64;
    while !*stop.borrow() && ctx.transactions.is_none_or(|t| done < t) {
        let began = Instant::now();
        let one = ctx.workload.run_one(pg);
        tokio::pin!(one);
        let result = tokio::select! {
            r = &mut one => r,
            _ = async { drop(stop.wait_for(|s| *s).await) } => {
                // the run is over: a transaction still running after a moment is cancelled,
                // not left running on the server after this program exits
                if tokio::time::timeout(CANCEL_AFTER, &mut one).await.is_err() {
                    let _ = ctx.target.cancel(&pg.cancel_token()).await;
                    let _ = tokio::time::timeout(GRACE, one).await;
                }
                return;
            }
        };
        match result {
            Ok(()) => ctx.stats.transaction(id, began.elapsed()),
            Err(e) => {
                let (kind, msg) = classify(&e);
                ctx.stats.error(kind, msg);
                // one error for a lost connection: a FATAL is followed by the close
                let fatal = e
                    .as_db_error()
                    .is_some_and(|d| matches!(d.severity(), "FATAL" | "PANIC"));
                if fatal || e.is_closed() || pg.is_closed() {
                    return;
                }
            }
        }
        done += 1;
    }
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
            Report::Child => {
                // the parent may be gone: nothing to report to, and no reason to panic
                let line =
                    serde_json::to_string(&ChildMsg::Progress(p)).expect("progress serialises");
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            Report::Quiet => {}
        }
        if p.made + p.failed >= requested {
            if let Some(path) = ready_file.take() {
                write_ready_file(&path, p.made);
            }
        }
    }
}
