//! The `pgmux` command: parse arguments, load and check the configuration, set up logging,
//! and run.

use clap::Parser;
use pgmux::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// Small over-aligned blocks (tokio's tasks and socket registrations) from slabs; see
/// `pgmux::alloc`.
#[global_allocator]
static ALLOCATOR: pgmux::alloc::Allocator = pgmux::alloc::Allocator::new();

#[derive(Parser)]
#[command(
    name = "pgmux",
    version,
    about = "A PostgreSQL connection-pooling proxy"
)]
struct Args {
    /// Configuration file (TOML)
    #[arg(short, long, default_value = "config/pgmux.toml")]
    config: PathBuf,
    /// Validate the configuration and exit
    #[arg(long)]
    check: bool,
}

/// `workers = 1`: one thread runs everything, as PgBouncer does, with no wake-ups between
/// threads (the cheapest per transaction, docs/performance.md); otherwise a work-stealing
/// pool of that many threads (0: one per core).
fn runtime(workers: u32) -> tokio::runtime::Builder {
    match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n as usize);
            b
        }
    }
}

fn main() -> ExitCode {
    pgmux::alloc::configure();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgmux: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        println!("pgmux: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    pgmux::logging::init(&config);
    if config.pgmux.sched_batch {
        if let Err(e) = pgmux::sched::use_batch_policy() {
            tracing::warn!(
                "sched_batch: cannot use SCHED_BATCH ({e}); running under the default policy"
            );
        }
    }
    let runtime = match runtime(config.pgmux.workers).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgmux: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(pgmux::run::run(config, Some(args.config))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pgmux: {e}");
            ExitCode::FAILURE
        }
    }
}
