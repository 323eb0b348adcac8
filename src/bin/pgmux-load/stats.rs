//! What a run counts: connections, transactions, latency histograms (HDR, microseconds),
//! errors by SQLSTATE or kind; the once-a-second progress snapshot; the summary, its merge
//! across processes, and how it is printed (human table, JSON line).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latencies up to an hour, three significant digits.
const HIST_MAX_US: u64 = 3_600_000_000;
/// Shards of the transaction histogram, so thousands of clients do not queue on one lock.
const SHARDS: usize = 16;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters shared by every client task of one process.
pub struct Stats {
    pub attempted: AtomicU64,
    pub made: AtomicU64,
    pub failed: AtomicU64,
    pub open: AtomicU64,
    pub peak_open: AtomicU64,
    pub transactions: AtomicU64,
    pub errors: AtomicU64,
    tx_hist: Vec<Mutex<Histogram<u64>>>,
    connect_hist: Mutex<Histogram<u64>>,
    by_kind: Mutex<BTreeMap<String, ErrorCount>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ErrorCount {
    pub count: u64,
    /// The first message seen of this kind.
    pub example: String,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            attempted: AtomicU64::new(0),
            made: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            tx_hist: (0..SHARDS).map(|_| Mutex::new(new_hist())).collect(),
            connect_hist: Mutex::new(new_hist()),
            by_kind: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn connected(&self, took: Duration) {
        self.made.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
        lock(&self.connect_hist).saturating_record(micros(took));
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn transaction(&self, client: u64, took: Duration) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        lock(&self.tx_hist[client as usize % SHARDS]).saturating_record(micros(took));
    }

    pub fn error(&self, kind: String, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut map = lock(&self.by_kind);
        let e = map.entry(kind).or_insert_with(|| ErrorCount {
            count: 0,
            example: message,
        });
        e.count += 1;
    }

    pub fn progress(&self) -> Progress {
        Progress {
            attempted: self.attempted.load(Ordering::Relaxed),
            made: self.made.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    pub fn summary(&self, requested: u64, elapsed: Duration) -> Summary {
        let mut tx = new_hist();
        for shard in &self.tx_hist {
            tx.add(&*lock(shard))
                .expect("histograms of equal bounds add");
        }
        let p = self.progress();
        let mut s = Summary {
            processes: 1,
            requested,
            attempted: p.attempted,
            made: p.made,
            failed: p.failed,
            peak_open: self.peak_open.load(Ordering::Relaxed),
            transactions: p.transactions,
            elapsed_s: elapsed.as_secs_f64(),
            tps: 0.0,
            latency_us: Latency::default(),
            connect_latency_us: Latency::default(),
            errors: p.errors,
            errors_by_kind: lock(&self.by_kind).clone(),
            server_connections_peak: None,
            server_connections_before: None,
            latency_hist: pairs(&tx),
            connect_hist: pairs(&lock(&self.connect_hist)),
        };
        s.finish();
        s
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn from_pairs(p: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = new_hist();
    for &(v, n) in p {
        h.saturating_record_n(v, n);
    }
    h
}

/// Cumulative counts, sent once a second by each process.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default)]
pub struct Progress {
    pub attempted: u64,
    pub made: u64,
    pub failed: u64,
    pub open: u64,
    pub transactions: u64,
    pub errors: u64,
}

impl Progress {
    pub fn add(&mut self, o: &Progress) {
        self.attempted += o.attempted;
        self.made += o.made;
        self.failed += o.failed;
        self.open += o.open;
        self.transactions += o.transactions;
        self.errors += o.errors;
    }

    /// One stderr line: `[  12s] conns 4800/5000 open (0 failed) | 31234 tps | 0 errors | ...`
    pub fn line(&self, secs: u64, requested: u64, tps: u64, server: Option<u64>) -> String {
        let mut s = format!(
            "[{secs:>5}s] conns {}/{requested} open ({} failed) | {tps} tps | {} errors",
            self.open, self.failed, self.errors
        );
        if let Some(n) = server {
            s.push_str(&format!(" | server conns {n}"));
        }
        s
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// The end of a run: what the final JSON line holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Summary {
    pub processes: u32,
    /// Connections asked for.
    pub requested: u64,
    /// Connection attempts started before the run ended.
    pub attempted: u64,
    pub made: u64,
    pub failed: u64,
    /// Most connections open at once (summed over processes, so an upper bound for several).
    pub peak_open: u64,
    pub transactions: u64,
    pub elapsed_s: f64,
    pub tps: f64,
    /// Per transaction, microseconds.
    pub latency_us: Latency,
    /// Per connection (TCP connect and login), microseconds.
    pub connect_latency_us: Latency,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, ErrorCount>,
    /// Peak server connections seen through --admin or --direct; null when not measured.
    pub server_connections_peak: Option<u64>,
    /// The first count, taken as the run began: connections that were there before it (a
    /// pooler's idle servers, other sessions).
    #[serde(default)]
    pub server_connections_before: Option<u64>,
    /// Raw histograms (value, count), for merging children's summaries; not in the final line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_hist: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_hist: Vec<(u64, u64)>,
}

impl Summary {
    /// Derives TPS and percentiles from the counts and raw histograms.
    fn finish(&mut self) {
        self.tps = if self.elapsed_s > 0.0 {
            (self.transactions as f64 / self.elapsed_s * 10.0).round() / 10.0
        } else {
            0.0
        };
        self.latency_us = Latency::of(&from_pairs(&self.latency_hist));
        self.connect_latency_us = Latency::of(&from_pairs(&self.connect_hist));
    }

    /// Sums the summaries of the processes of one run.
    pub fn merge(parts: &[Summary], requested: u64) -> Summary {
        let mut lat = new_hist();
        let mut conn = new_hist();
        let mut by_kind: BTreeMap<String, ErrorCount> = BTreeMap::new();
        let mut s = Summary {
            processes: parts.len() as u32,
            requested,
            attempted: 0,
            made: 0,
            failed: 0,
            peak_open: 0,
            transactions: 0,
            elapsed_s: 0.0,
            tps: 0.0,
            latency_us: Latency::default(),
            connect_latency_us: Latency::default(),
            errors: 0,
            errors_by_kind: BTreeMap::new(),
            server_connections_peak: None,
            server_connections_before: None,
            latency_hist: Vec::new(),
            connect_hist: Vec::new(),
        };
        for p in parts {
            s.attempted += p.attempted;
            s.made += p.made;
            s.failed += p.failed;
            s.peak_open += p.peak_open;
            s.transactions += p.transactions;
            s.errors += p.errors;
            s.elapsed_s = s.elapsed_s.max(p.elapsed_s);
            lat.add(from_pairs(&p.latency_hist)).expect("equal bounds");
            conn.add(from_pairs(&p.connect_hist)).expect("equal bounds");
            for (k, e) in &p.errors_by_kind {
                let t = by_kind.entry(k.clone()).or_insert_with(|| ErrorCount {
                    count: 0,
                    example: e.example.clone(),
                });
                t.count += e.count;
            }
        }
        s.errors_by_kind = by_kind;
        s.latency_hist = pairs(&lat);
        s.connect_hist = pairs(&conn);
        s.finish();
        s
    }

    /// The summary without its raw histograms, as one JSON line.
    pub fn json_line(&self) -> String {
        let mut s = self.clone();
        s.latency_hist.clear();
        s.connect_hist.clear();
        serde_json::to_string(&s).expect("summary serialises")
    }

    pub fn human(&self) -> String {
        let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "connections: {} made, {} failed, {} not attempted (of {}); peak {} open{}",
            self.made,
            self.failed,
            self.requested.saturating_sub(self.attempted),
            self.requested,
            self.peak_open,
            if self.processes > 1 {
                format!(" (sum over {} processes)", self.processes)
            } else {
                String::new()
            }
        ));
        let c = &self.connect_latency_us;
        if c.count > 0 {
            line(format!(
                "connect latency: p50 {}  p90 {}  p99 {}  max {}",
                ms(c.p50),
                ms(c.p90),
                ms(c.p99),
                ms(c.max)
            ));
        }
        line(format!(
            "transactions: {} in {:.2} s = {:.1} tps",
            self.transactions, self.elapsed_s, self.tps
        ));
        let l = &self.latency_us;
        if l.count > 0 {
            line(format!(
                "latency: p50 {}  p90 {}  p99 {}  max {}  mean {}",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max),
                ms(l.mean as u64)
            ));
        }
        line(format!("errors: {}", self.errors));
        for (k, e) in &self.errors_by_kind {
            line(format!("  {k}: {} (e.g. {})", e.count, e.example));
        }
        match (self.server_connections_peak, self.server_connections_before) {
            (Some(n), Some(b)) => line(format!(
                "server connections at peak: {n} ({b} already open as the run began)"
            )),
            (Some(n), None) => line(format!("server connections at peak: {n}")),
            (None, _) => line("server connections at peak: not measured".into()),
        }
        out
    }
}

/// Groups an error: its SQLSTATE when the server sent one, else a short kind.
pub fn classify(e: &tokio_postgres::Error) -> (String, String) {
    if let Some(db) = e.as_db_error() {
        return (
            db.code().code().to_string(),
            format!("{}: {}", db.severity(), db.message()),
        );
    }
    if e.is_closed() {
        return ("connection closed".into(), e.to_string());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return (format!("io: {:?}", io.kind()), e.to_string());
        }
        source = s.source();
    }
    ("protocol".into(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_histograms() {
        let a = Stats::new();
        let b = Stats::new();
        for i in 1..=100u64 {
            a.transaction(i, Duration::from_micros(i * 10));
        }
        b.transaction(0, Duration::from_millis(50));
        b.error("53300".into(), "FATAL: too many".into());
        b.error("53300".into(), "FATAL: other text".into());
        let m = Summary::merge(
            &[
                a.summary(10, Duration::from_secs(2)),
                b.summary(5, Duration::from_secs(4)),
            ],
            15,
        );
        assert_eq!(m.transactions, 101);
        assert_eq!(m.latency_us.count, 101);
        assert_eq!(m.elapsed_s, 4.0);
        assert!((m.tps - 101.0 / 4.0).abs() < 0.06, "{}", m.tps);
        assert!(m.latency_us.max >= 49_000, "{:?}", m.latency_us);
        // the 51st of 101 values: 10, 20, ..., 1000 us and 50 ms
        assert_eq!(m.latency_us.p50, 510, "{:?}", m.latency_us);
        assert_eq!(m.latency_us.p99, 1000, "{:?}", m.latency_us);
        assert_eq!(m.errors, 2);
        assert_eq!(m.errors_by_kind["53300"].count, 2);
        assert_eq!(m.errors_by_kind["53300"].example, "FATAL: too many");
        let line = m.json_line();
        assert!(!line.contains("latency_hist"), "{line}");
        let back: Summary = serde_json::from_str(&line).unwrap();
        assert_eq!(back.transactions, 101);
    }
}
