//! pgmux-load's command line: the target endpoint, the bounds of a run (connections, duration,
//! transactions), the workload, how connections are spread (rate, processes, source
//! addresses) and what is reported (progress, JSON summary, server connections).

use clap::{Parser, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Largest run one invocation accepts, across all its processes.
pub const MAX_CONNECTIONS: u32 = 1_000_000;
pub const MAX_PROCESSES: u32 = 64;
pub const MAX_DURATION_SECS: f64 = 86_400.0;
/// Above this, 100,000 accounts per branch overflow an int4 aid.
pub const MAX_SCALE: u32 = 21_474;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pgmux-load",
    version,
    about = "Open many PostgreSQL client connections against any endpoint, hold them idle or run \
             a workload, and report connections, TPS, latency percentiles and errors",
    after_help = "Every run is bounded by --connections and --duration. Examples:\n  \
        pgmux-load -c 5000 --rate 1000 -T 60 --hold 30          # 5,000 idle clients\n  \
        pgmux-load -c 50 -w select -t 1000 -d bench --json       # 50 clients x 1,000 SELECTs\n  \
        pgmux-load -c 30000 --processes 2 --source-addrs 127.0.0.2,127.0.0.3 -T 120"
)]
pub struct Args {
    /// Host name or IP address of the endpoint (pgmux, PgBouncer or PostgreSQL)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port of the endpoint
    #[arg(short, long, default_value_t = 6432)]
    pub port: u16,
    /// User name
    #[arg(short = 'U', long, default_value = "postgres")]
    pub user: String,
    /// Password (also read from PGPASSWORD)
    #[arg(long, env = "PGPASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Database name
    #[arg(short = 'd', long, default_value = "postgres")]
    pub dbname: String,

    /// Client connections to open, in all (split over --processes)
    #[arg(short = 'c', long)]
    pub connections: u32,
    /// New connections per second, in all; 0 opens them as fast as --connect-concurrency allows
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Connection attempts in flight at once, per process
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: u32,
    /// Seconds one connection attempt may take before it counts as failed
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// Longest run, in seconds: connecting stops, workloads stop, idle connections close
    #[arg(short = 'T', long, default_value_t = 60.0)]
    pub duration: f64,
    /// Transactions per connection; the run ends when every connection has run them
    #[arg(short = 't', long)]
    pub transactions: Option<u64>,
    /// Idle mode: seconds to hold the connections once all are open (default: until --duration)
    #[arg(long)]
    pub hold: Option<f64>,

    /// idle: connect and hold. select: `SELECT abalance FROM pgbench_accounts WHERE aid = $1`.
    /// tpcb: pgbench's TPC-B-like update transaction. sql: the statements of --sql FILE
    #[arg(short = 'w', long, value_enum, default_value_t = WorkloadKind::Idle)]
    pub workload: WorkloadKind,
    /// SQL file run as one simple-protocol Query per transaction (implies -w sql); :aid, :bid,
    /// :tid and :delta are replaced by random values as in pgbench (scale 1 unless --scale)
    #[arg(long)]
    pub sql: Option<PathBuf>,
    /// extended: unnamed statements with typed parameters (no prepared statements, so fine for
    /// transaction pooling). simple: literal values in simple Query messages
    #[arg(long, value_enum, default_value_t = QueryMode::Extended)]
    pub query_mode: QueryMode,
    /// pgbench scale factor of the tables (default: count of pgbench_branches)
    #[arg(long)]
    pub scale: Option<u32>,

    /// Re-run this program K times, each with its share of the connections (one process may
    /// hold only as many sockets as its open-file limit allows)
    #[arg(long, default_value_t = 1)]
    pub processes: u32,
    /// Bind client sockets to these local addresses in turn (e.g. 127.0.0.2,127.0.0.3): each
    /// offers its own ~28,000 ephemeral ports towards one endpoint
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,

    /// Connection string of pgmux's admin console: poll SHOW POOLS once a second for the peak
    /// of server connections (skipped with a warning if it fails)
    #[arg(long)]
    pub admin: Option<String>,
    /// Connection string straight to PostgreSQL: poll pg_stat_activity once a second for the
    /// peak of client backends in the target database
    #[arg(long)]
    pub direct: Option<String>,
    /// Database name on the server for --direct (default: --dbname)
    #[arg(long)]
    pub server_dbname: Option<String>,

    /// Print the summary as one JSON line on stdout (the human summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr
    #[arg(short, long)]
    pub quiet: bool,
    /// Create this file once every connection has been attempted (for scripts that measure
    /// something while the connections are held)
    #[arg(long)]
    pub ready_file: Option<PathBuf>,

    /// Internal: run as one of --processes, reporting JSON lines to the parent
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: global index of this process's first connection (spreads source addresses)
    #[arg(long, hide = true, default_value_t = 0)]
    pub first_index: u64,
    /// Internal: seconds after the start at which this process's --rate schedule begins, so
    /// the processes' schedules interleave instead of each opening one at time 0
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub rate_offset: f64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Idle,
    Select,
    Tpcb,
    Sql,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    Extended,
    Simple,
}

#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--connections must be between 1 and {MAX_CONNECTIONS}")]
    Connections,
    #[error("--duration must be more than 0 and at most {MAX_DURATION_SECS} seconds")]
    Duration,
    #[error("--processes must be between 1 and {MAX_PROCESSES} (and at most --connections)")]
    Processes,
    #[error("--{0} must be a finite number of at least 0")]
    Negative(&'static str),
    #[error("--connect-concurrency must be at least 1")]
    Concurrency,
    #[error(
        "--scale must be between 1 and {MAX_SCALE} (aid stays an int4, as pgbench's accounts)"
    )]
    Scale,
    #[error("-w sql needs --sql FILE")]
    SqlWithoutFile,
    #[error("--sql FILE runs the sql workload; drop -w {0:?}")]
    SqlWithOtherWorkload(WorkloadKind),
    #[error("--hold applies to the idle workload only")]
    HoldWithWorkload,
    #[error("--transactions needs a workload (-w select, tpcb or --sql); idle runs use --hold")]
    TransactionsWhenIdle,
}

impl Args {
    /// Checks the bounds and settles the workload (`--sql` implies `-w sql`).
    pub fn validate(mut self) -> Result<Args, ArgsError> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(ArgsError::Connections);
        }
        if !(self.duration > 0.0 && self.duration <= MAX_DURATION_SECS) {
            return Err(ArgsError::Duration);
        }
        if self.processes == 0
            || self.processes > MAX_PROCESSES
            || self.processes > self.connections
        {
            return Err(ArgsError::Processes);
        }
        for (name, v) in [
            ("rate", Some(self.rate)),
            ("rate-offset", Some(self.rate_offset)),
            ("connect-timeout", Some(self.connect_timeout)),
            ("hold", self.hold),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(ArgsError::Negative(name));
                }
            }
        }
        if self.connect_concurrency == 0 {
            return Err(ArgsError::Concurrency);
        }
        if self.scale.is_some_and(|s| s == 0 || s > MAX_SCALE) {
            return Err(ArgsError::Scale);
        }
        match (self.sql.is_some(), self.workload) {
            (true, WorkloadKind::Idle | WorkloadKind::Sql) => self.workload = WorkloadKind::Sql,
            (true, other) => return Err(ArgsError::SqlWithOtherWorkload(other)),
            (false, WorkloadKind::Sql) => return Err(ArgsError::SqlWithoutFile),
            (false, _) => {}
        }
        if self.hold.is_some() && self.workload != WorkloadKind::Idle {
            return Err(ArgsError::HoldWithWorkload);
        }
        if self.transactions.is_some() && self.workload == WorkloadKind::Idle {
            return Err(ArgsError::TransactionsWhenIdle);
        }
        Ok(self)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout)
    }

    /// The endpoint and login of the run.
    pub async fn target(&self) -> Result<crate::net::Target, crate::net::NetError> {
        crate::net::Target::resolve(
            &self.host,
            self.port,
            &self.user,
            self.password.as_deref(),
            &self.dbname,
        )
        .await
    }

    /// The database whose server connections --direct counts.
    pub fn server_dbname(&self) -> &str {
        self.server_dbname.as_deref().unwrap_or(&self.dbname)
    }

    /// Arguments for child `index` of `--processes`: the same run with its share of the
    /// connections and rate, no observers, reporting JSON lines. The password travels in the
    /// environment, not on the command line.
    pub fn child_args(&self, index: u32, scale: Option<u32>) -> (Vec<String>, u32) {
        let k = self.processes;
        let share = self.connections / k + u32::from(index < self.connections % k);
        let first: u64 = (0..index)
            .map(|i| u64::from(self.connections / k + u32::from(i < self.connections % k)))
            .sum();
        let mut a: Vec<String> = vec![
            "--child".into(),
            "--host".into(),
            self.host.clone(),
            "--port".into(),
            self.port.to_string(),
            "--user".into(),
            self.user.clone(),
            "--dbname".into(),
            self.dbname.clone(),
            "--connections".into(),
            share.to_string(),
            "--first-index".into(),
            first.to_string(),
            "--rate".into(),
            (self.rate / f64::from(k)).to_string(),
            "--rate-offset".into(),
            if self.rate > 0.0 {
                f64::from(index) / self.rate
            } else {
                0.0
            }
            .to_string(),
            "--connect-concurrency".into(),
            self.connect_concurrency.to_string(),
            "--connect-timeout".into(),
            self.connect_timeout.to_string(),
            "--duration".into(),
            self.duration.to_string(),
            "--workload".into(),
            format!("{:?}", self.workload).to_lowercase(),
            "--query-mode".into(),
            format!("{:?}", self.query_mode).to_lowercase(),
        ];
        if let Some(t) = self.transactions {
            a.extend(["--transactions".into(), t.to_string()]);
        }
        if let Some(h) = self.hold {
            a.extend(["--hold".into(), h.to_string()]);
        }
        if let Some(s) = scale.or(self.scale) {
            a.extend(["--scale".into(), s.to_string()]);
        }
        if let Some(sql) = &self.sql {
            a.extend(["--sql".into(), sql.to_string_lossy().into_owned()]);
        }
        if !self.source_addrs.is_empty() {
            let list: Vec<String> = self.source_addrs.iter().map(|a| a.to_string()).collect();
            a.extend(["--source-addrs".into(), list.join(",")]);
        }
        (a, share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, ArgsError> {
        Args::try_parse_from(std::iter::once("pgmux-load").chain(args.iter().copied()))
            .expect("clap accepts")
            .validate()
    }

    #[test]
    fn children_split_connections_and_rate_and_get_no_observers() {
        let a = parse(&[
            "-c",
            "10",
            "--processes",
            "3",
            "--rate",
            "300",
            "--admin",
            "host=x",
            "--source-addrs",
            "127.0.0.2,127.0.0.3",
        ])
        .unwrap();
        let mut total = 0;
        for i in 0..3 {
            let (child, share) = a.child_args(i, Some(4));
            let c = Args::try_parse_from(std::iter::once("x".to_string()).chain(child))
                .unwrap()
                .validate()
                .unwrap();
            assert!(c.child && c.processes == 1 && c.admin.is_none() && !c.json);
            assert_eq!(c.connections, share);
            assert_eq!(c.first_index, u64::from(total));
            assert_eq!(c.rate, 100.0);
            // child i's n-th connection at (3n + i) / 300 s: one every 1/300 s in all
            assert_eq!(c.rate_offset, f64::from(i) / 300.0);
            assert_eq!(c.scale, Some(4));
            assert_eq!(c.source_addrs.len(), 2);
            total += share;
        }
        assert_eq!(total, 10);
    }

    #[test]
    fn bounds_and_workload_rules() {
        assert!(matches!(parse(&["-c", "0"]), Err(ArgsError::Connections)));
        assert!(matches!(
            parse(&["-c", "5", "-T", "0"]),
            Err(ArgsError::Duration)
        ));
        assert!(matches!(
            parse(&["-c", "2", "--processes", "3"]),
            Err(ArgsError::Processes)
        ));
        assert!(matches!(
            parse(&["-c", "2", "-w", "sql"]),
            Err(ArgsError::SqlWithoutFile)
        ));
        for bad in ["0", "21475"] {
            assert!(matches!(
                parse(&["-c", "2", "-w", "select", "--scale", bad]),
                Err(ArgsError::Scale)
            ));
        }
        assert!(matches!(
            parse(&["-c", "2", "-w", "select", "--hold", "1"]),
            Err(ArgsError::HoldWithWorkload)
        ));
        assert!(matches!(
            parse(&["-c", "2", "-t", "5"]),
            Err(ArgsError::TransactionsWhenIdle)
        ));
        let a = parse(&["-c", "2", "--sql", "f.sql", "-t", "5"]).unwrap();
        assert_eq!(a.workload, WorkloadKind::Sql);
    }
}
