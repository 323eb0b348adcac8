//! pgmux-load: a load tool for PostgreSQL endpoints (pgmux, PgBouncer, PostgreSQL). Opens N
//! client connections at a given rate, holds them idle or runs a workload, prints progress
//! every second and a summary (connections, TPS, latency percentiles, errors by SQLSTATE, peak
//! server connections). This file wires the modules under src/bin/pgmux-load/ together (a
//! binary's root in src/bin/ looks for modules beside itself, hence the #[path]s).

#[path = "pgmux-load/children.rs"]
mod children;
#[path = "pgmux-load/cli.rs"]
mod cli;
#[path = "pgmux-load/net.rs"]
mod net;
#[path = "pgmux-load/observe.rs"]
mod observe;
#[path = "pgmux-load/run.rs"]
mod run;
#[path = "pgmux-load/stats.rs"]
mod stats;
#[path = "pgmux-load/workload.rs"]
mod workload;

use anyhow::Context;
use clap::Parser;
use cli::{Args, WorkloadKind};
use observe::{Observed, Source};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use workload::Workload;

/// How long the last server-connection count may take after the run.
const FINAL_POLL: Duration = Duration::from_secs(5);

/// Exit status of a run in which a connection failed or a transaction or connection had an
/// error (1 is for bad arguments and runs that could not start).
const EXIT_ERRORS: u8 = 2;

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse().validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let summary = rt.block_on(run_all(&args))?;
    let had_errors = summary.failed > 0 || summary.errors > 0;
    // a closed stdout or stderr (a parent gone, `| head`) must not turn into a panic
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    if args.child {
        let msg = serde_json::to_string(&run::ChildMsg::Summary(Box::new(summary)))?;
        let _ = writeln!(out, "{msg}");
    } else if args.json {
        let _ = write!(err, "{}", summary.human());
        let _ = writeln!(out, "{}", summary.json_line());
    } else {
        let _ = write!(out, "{}", summary.human());
    }
    let _ = out.flush();
    // Idle client tasks abandoned at the grace limit must not hold the process open.
    rt.shutdown_background();
    Ok(if !args.child && had_errors {
        ExitCode::from(EXIT_ERRORS)
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_all(args: &Args) -> anyhow::Result<stats::Summary> {
    let scale = match (args.workload, args.scale) {
        (WorkloadKind::Select | WorkloadKind::Tpcb, None) => {
            let bound = match args.connect_timeout() {
                Duration::ZERO => args.duration(),
                t => t,
            };
            tokio::time::timeout(bound, detect_scale(args))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no answer from {}:{} within {bound:?} while reading the pgbench scale \
                         (give --scale to skip it)",
                        args.host,
                        args.port
                    )
                })??
        }
        (_, s) => s,
    };
    run_with_scale(args, scale).await
}

/// The pgbench scale of the target (count of pgbench_branches).
async fn detect_scale(args: &Args) -> anyhow::Result<Option<u32>> {
    let target = args.target().await?;
    let (client, conn) = target
        .connect(None)
        .await
        .context("cannot connect to find the pgbench scale")?;
    let conn = tokio::spawn(conn);
    let scale = workload::detect_scale(&client).await?;
    drop(client);
    let _ = conn.await;
    Ok(Some(scale))
}

async fn run_with_scale(args: &Args, scale: Option<u32>) -> anyhow::Result<stats::Summary> {
    // Observers run in the top process only; prefer PostgreSQL's own count when both given.
    if args.direct.is_some() && args.admin.is_some() && !args.child {
        eprintln!("pgmux-load: both --direct and --admin given: counting with --direct only");
    }
    let mut observed: Option<Arc<Observed>> = None;
    let source = if let Some(conn) = &args.direct {
        Some(Source::Direct {
            conn: conn.clone(),
            dbname: args.server_dbname().to_string(),
        })
    } else {
        args.admin.as_ref().map(|conn| Source::Admin {
            conn: conn.clone(),
            dbname: args.dbname.clone(),
        })
    };
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let watcher = match source {
        Some(src) if !args.child => {
            let o = Arc::new(Observed::default());
            observed = Some(o.clone());
            Some(tokio::spawn(observe::watch(src, o, done_rx)))
        }
        _ => None,
    };

    let mut summary = if args.processes > 1 {
        children::run(args, scale, observed.clone()).await?
    } else {
        let workload = Workload::build(args.workload, args.query_mode, scale, args.sql.as_deref())?;
        run::run_local(args, workload, observed.clone()).await?
    };
    if let Some(mut w) = watcher {
        let _ = done_tx.send(true);
        if tokio::time::timeout(FINAL_POLL, &mut w).await.is_err() {
            w.abort();
            eprintln!(
                "pgmux-load: the server connection count did not answer within {FINAL_POLL:?}"
            );
        }
    }
    summary.server_connections_peak = observed.as_ref().and_then(|o| o.peak());
    summary.server_connections_before = observed.and_then(|o| o.before.get().copied());
    Ok(summary)
}
