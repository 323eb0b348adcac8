//! The `pgmux` command: parse arguments, load and check the configuration, set up logging,
//! and run.

use clap::Parser;
use pgmux::config::{Config, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

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

fn main() -> ExitCode {
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
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.pgmux.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // colour codes only for a terminal: log files and collectors get plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.pgmux.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
