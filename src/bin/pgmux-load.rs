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
use std::sync::Arc;
use std::time::Duration;
use workload::Workload;

/// How long the last server-connection count may take after the run.
const FINAL_POLL: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let args = Args::parse().validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let summary = rt.block_on(run_all(&args))?;
    if args.child {
        println!(
            "{}",
            serde_json::to_string(&run::ChildMsg::Summary(Box::new(summary)))?
        );
    } else if args.json {
        eprint!("{}", summary.human());
        println!("{}", summary.json_line());
    } else {
        print!("{}", summary.human());
    }
    // Idle client tasks abandoned at the grace limit must not hold the process open.
    rt.shutdown_background();
    Ok(())
}

async fn run_all(args: &Args) -> anyhow::Result<stats::Summary> {
    let scale = match (args.workload, args.scale) {
        (WorkloadKind::Select | WorkloadKind::Tpcb, None) => {
            let target = net::Target::resolve(
                &args.host,
                args.port,
                &args.user,
                args.password.as_deref(),
                &args.dbname,
            )
            .await?;
            let (client, conn) = target
                .connect(None)
                .await
                .context("cannot connect to find the pgbench scale")?;
            let conn = tokio::spawn(conn);
            let scale = workload::detect_scale(&client).await?;
            drop(client);
            let _ = conn.await;
            Some(scale)
        }
        (_, s) => s,
    };

    // Observers run in the top process only; prefer PostgreSQL's own count when both given.
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
        }
    }
    summary.server_connections_peak = observed.and_then(|o| o.peak());
    Ok(summary)
}
