//! SHOW QUERIES and the slow-statement log: per pool, the statements clients ran, grouped by
//! normalized text (`router::normalize`), with calls, time and rows.
//!
//! Cost per statement executed: one lexer pass over its text to fingerprint it (no
//! allocation), and at its ReadyForQuery one short hold of the pool's own table lock (never a
//! lock shared by all pools). The text is normalized (allocated) only the first time a pool
//! sees a statement; a small per-client memo of fingerprints already in the table skips the
//! lock at request time.
//!
//! Bound: at most [`MAX_STATEMENTS`] distinct statements per pool, each text at most
//! `normalize::MAX_TEXT` bytes. When a new statement finds the table full, the tenth of the
//! table with the fewest calls is evicted at once (so eviction is rare, not one scan per new
//! statement), and the pool's `evicted` count grows.

use crate::fasthash::U64Map;
use crate::router::normalize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Distinct statements kept per pool.
pub const MAX_STATEMENTS: usize = 1000;

/// `log_min_duration_ms` in microseconds (0: off). Process-wide and read once per
/// ReadyForQuery: written only at start and on reload, so the cache line is never contended.
static SLOW_US: AtomicU64 = AtomicU64::new(0);

/// Puts `log_min_duration_ms` in force (start, RELOAD, SIGHUP, SET).
pub fn set_log_min_duration_ms(ms: u64) {
    SLOW_US.store(ms.saturating_mul(1000), Ordering::Relaxed);
}

/// One statement's figures (times in microseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub text: Box<str>,
    pub calls: u64,
    pub total_us: u64,
    pub max_us: u64,
    pub rows: u64,
}

/// One pool's statements.
#[derive(Default)]
pub struct QueryTable {
    map: Mutex<U64Map<Entry>>,
    /// Moves whenever statements are evicted: per-client memos of what is in the table are
    /// stale after that.
    generation: AtomicU64,
    evicted: AtomicU64,
}

impl QueryTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, U64Map<Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure statement `fp` has its text in the table.
    fn ensure(&self, fp: u64, sql: &str) {
        if self.lock().contains_key(&fp) {
            return;
        }
        // normalized outside the lock: other clients of the pool are not held up by it
        let text = normalize::normalize(sql).into_boxed_str();
        let mut map = self.lock();
        if map.len() >= MAX_STATEMENTS && !map.contains_key(&fp) {
            self.evict(&mut map);
        }
        map.entry(fp).or_insert_with(|| Entry {
            text,
            ..Entry::default()
        });
    }

    fn evict(&self, map: &mut U64Map<Entry>) {
        let mut by_use: Vec<(u64, u64, u64)> =
            map.iter().map(|(k, e)| (e.calls, e.total_us, *k)).collect();
        let n = (MAX_STATEMENTS / 10).max(1).min(by_use.len());
        by_use.select_nth_unstable(n - 1);
        for (_, _, k) in &by_use[..n] {
            map.remove(k);
        }
        self.evicted.fetch_add(n as u64, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Adds one call; returns the statement's text when `want_text` (for the slow log).
    fn record(&self, fp: u64, us: u64, rows: u64, want_text: bool) -> Option<Box<str>> {
        let mut map = self.lock();
        // absent only if evicted since its request: that one call is not counted
        let e = map.get_mut(&fp)?;
        e.calls += 1;
        e.total_us += us;
        e.max_us = e.max_us.max(us);
        e.rows += rows;
        want_text.then(|| e.text.clone())
    }

    /// Statements run at least once, for SHOW QUERIES.
    pub fn snapshot(&self) -> Vec<Entry> {
        self.lock()
            .values()
            .filter(|e| e.calls > 0)
            .cloned()
            .collect()
    }

    /// Statements evicted to keep the table within bounds.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// Fingerprints a client's statements are known to have text in the table, as of `generation`.
const MEMO: usize = 16;

/// One client's side of the recording: the statements of requests in flight, rows of the
/// running one, and the server that runs them. Lives in the relay's `stats::Meter`.
#[derive(Default)]
pub struct Recorder {
    /// Fingerprint per request in flight (0: no statement text, e.g. a FunctionCall).
    pending: VecDeque<u64>,
    rows: u64,
    pub server: Option<crate::endpoint::ServerAddr>,
    memo: [u64; MEMO],
    memo_next: usize,
    memo_generation: u64,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        crate::spares::give(std::mem::take(&mut self.pending));
    }
}

impl Recorder {
    /// The fingerprint of `sql`, with its text in `table` (0: nothing to record).
    #[cfg(test)]
    pub fn statement(&mut self, table: &QueryTable, sql: &str) -> u64 {
        self.fingerprinted(table, sql, normalize::fingerprint(sql))
    }

    /// [`Recorder::statement`] with the fingerprint of `sql` already computed.
    pub fn fingerprinted(&mut self, table: &QueryTable, sql: &str, fp: u64) -> u64 {
        self.fingerprinted_with(table, fp, || sql)
    }

    /// [`Recorder::fingerprinted`] reading the text only if the table may lack it.
    pub fn fingerprinted_with<'a>(
        &mut self,
        table: &QueryTable,
        fp: u64,
        sql: impl FnOnce() -> &'a str,
    ) -> u64 {
        if fp == 0 {
            return 0;
        }
        let generation = table.generation.load(Ordering::Acquire);
        if generation != self.memo_generation {
            self.memo = [0; MEMO];
            self.memo_generation = generation;
        } else if self.memo.contains(&fp) {
            return fp;
        }
        table.ensure(fp, sql());
        self.memo[self.memo_next] = fp;
        self.memo_next = (self.memo_next + 1) % MEMO;
        fp
    }

    /// No request in flight and no rows counted.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.rows == 0
    }

    /// A request went to the server.
    pub fn request(&mut self, fp: u64) {
        if self.pending.capacity() == 0 {
            self.pending = crate::spares::take();
        }
        self.pending.push_back(fp);
    }

    /// The server was lost before answering; its requests are sent again elsewhere.
    pub fn forget_pending(&mut self) {
        self.pending.clear();
        self.rows = 0;
    }

    /// Requests after the first that the server will never answer (Syncs during COPY IN).
    pub fn ignored(&mut self, n: u32) {
        for _ in 0..n {
            if self.pending.len() < 2 {
                break;
            }
            self.pending.remove(1);
        }
    }

    /// Rows from a CommandComplete body ("SELECT 5", "INSERT 0 3"...).
    pub fn command_complete(&mut self, body: &[u8]) {
        let tag = body.strip_suffix(&[0]).unwrap_or(body);
        let last = tag.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
        if !last.is_empty() && last.iter().all(u8::is_ascii_digit) && last.len() < 20 {
            self.rows += last.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        }
    }

    /// The oldest request got its ReadyForQuery after `took` (None: its clock never ran).
    pub fn ready(&mut self, table: &QueryTable, db: &str, user: &str, took: Option<Duration>) {
        let fp = self.pending.pop_front().unwrap_or(0);
        let rows = std::mem::take(&mut self.rows);
        let Some(took) = took else { return };
        let us = took.as_micros() as u64;
        let slow = SLOW_US.load(Ordering::Relaxed);
        let slow = slow > 0 && us >= slow;
        let text = if fp != 0 {
            table.record(fp, us, rows, slow)
        } else {
            None
        };
        if slow {
            tracing::warn!(
                duration_ms = us as f64 / 1000.0,
                database = db,
                user = user,
                host = %self.server.map_or_else(String::new, |a| a.to_string()),
                query = text.as_deref().unwrap_or(""),
                "slow statement"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_group_by_normalized_text() {
        let t = QueryTable::default();
        let mut r = Recorder::default();
        let a = r.statement(&t, "SELECT 1");
        let b = r.statement(&t, "select 2");
        let c = r.statement(&t, "SELECT 'x', 3");
        assert_eq!(a, b);
        for fp in [a, b, c] {
            r.request(fp);
        }
        r.command_complete(b"SELECT 1\0");
        r.ready(&t, "d", "u", Some(Duration::from_millis(2)));
        r.command_complete(b"SELECT 1\0");
        r.ready(&t, "d", "u", Some(Duration::from_millis(4)));
        r.ready(&t, "d", "u", Some(Duration::from_millis(1)));
        let mut s = t.snapshot();
        s.sort_by_key(|e| e.calls);
        assert_eq!(s.len(), 2);
        assert_eq!(&*s[1].text, "SELECT $1");
        assert_eq!(
            (s[1].calls, s[1].total_us, s[1].max_us, s[1].rows),
            (2, 6000, 4000, 2)
        );
        assert_eq!(
            (&*s[0].text, s[0].calls, s[0].rows),
            ("SELECT $1, $2", 1, 0)
        );
    }

    #[test]
    fn unrun_and_textless_requests_are_not_listed() {
        let t = QueryTable::default();
        let mut r = Recorder::default();
        r.statement(&t, "SELECT 1");
        r.request(0);
        r.ready(&t, "d", "u", Some(Duration::from_millis(1)));
        assert!(t.snapshot().is_empty());
        assert_eq!(r.statement(&t, " -- nothing"), 0);
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_busy_statements() {
        let t = QueryTable::default();
        let mut r = Recorder::default();
        let busy = r.statement(&t, "SELECT busy");
        for _ in 0..3 {
            r.request(busy);
            r.ready(&t, "d", "u", Some(Duration::from_micros(1)));
        }
        for i in 0..(MAX_STATEMENTS * 3) {
            let fp = r.statement(&t, &format!("SELECT c{i}"));
            r.request(fp);
            r.ready(&t, "d", "u", Some(Duration::from_micros(1)));
        }
        let s = t.snapshot();
        assert!(s.len() <= MAX_STATEMENTS);
        assert!(t.evicted() >= (MAX_STATEMENTS * 2) as u64);
        assert!(s.iter().any(|e| &*e.text == "SELECT busy" && e.calls == 3));
        // the memo does not vouch for an evicted statement: it is recorded again
        let old = r.statement(&t, "SELECT c0");
        r.request(old);
        r.ready(&t, "d", "u", Some(Duration::from_micros(1)));
        assert!(t.snapshot().iter().any(|e| &*e.text == "SELECT c0"));
    }

    #[test]
    fn rows_come_from_command_tags() {
        let mut r = Recorder::default();
        r.command_complete(b"INSERT 0 3\0");
        r.command_complete(b"UPDATE 2\0");
        r.command_complete(b"BEGIN\0");
        r.command_complete(b"SELECT 99999999999999999999999\0");
        assert_eq!(r.rows, 5);
    }
}
