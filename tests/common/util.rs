//! Process-wide plumbing shared by the cluster and pgmux halves of the harness: port allocation,
//! polling helpers, temp-dir ownership markers, and the exit hook that tears down whatever the
//! test binary still holds when it exits.

use std::collections::BTreeSet;
use std::fs;
use std::future::Future;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// Name of the marker file recording which test process owns a temp dir.
const OWNER_FILE: &str = "owner";

/// A port on 127.0.0.1 that was free a moment ago and has not been handed out before by this
/// process. Another process may still grab it before our server binds, which is why the cluster
/// and pgmux starters retry on "address in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if lock(&HANDED_OUT).insert(port) {
            return port;
        }
    }
}

/// Poll `cond` until it holds; panics naming `what` once `timeout` has passed. Blocks the thread,
/// so inside an async test prefer [`wait_until_async`].
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Async twin of [`wait_until`]: sleeps on the tokio timer so the runtime keeps driving the
/// connections the condition may depend on.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// libpq/tokio-postgres key=value connection string for 127.0.0.1:`port`.
pub fn conn_str(port: u16, user: &str, db: &str, password: Option<&str>) -> String {
    let mut s = format!(
        "host=127.0.0.1 port={port} user={} dbname={}",
        conn_value(user),
        conn_value(db)
    );
    if let Some(pw) = password {
        s.push_str(" password=");
        s.push_str(&conn_value(pw));
    }
    s
}

/// Quote a connection-string value only when it needs it, so the common case stays readable in
/// failure messages.
fn conn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A test that panicked while holding one of our registries must not wedge teardown.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where harness temp dirs go. As root the dirs end up owned by `postgres`, which must be able
/// to traverse every ancestor; a TMPDIR that it cannot reach falls back to /tmp.
pub(crate) fn temp_base() -> PathBuf {
    let base = std::env::temp_dir();
    if !is_root() {
        return base;
    }
    let traversable = base.ancestors().all(|dir| {
        fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    });
    if traversable {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

/// Start time of `pid` in clock ticks since boot; together with the pid it identifies a process
/// across pid reuse.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3; starttime is field 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// "pid starttime" of a process, the format of owner markers and child pid files.
pub(crate) fn process_identity(pid: u32) -> String {
    format!("{pid} {}", process_start_time(pid).unwrap_or(0))
}

/// Whether a "pid starttime" identity still names a live process.
pub(crate) fn identity_alive(identity: &str) -> bool {
    let mut parts = identity.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        parts.next().map(str::parse::<u32>),
        parts.next().map(str::parse::<u64>),
    ) else {
        return false;
    };
    process_start_time(pid) == Some(start)
}

/// Mark `dir` as belonging to this test process, so a later run can tell it was orphaned.
pub(crate) fn write_owner(dir: &Path) {
    fs::write(dir.join(OWNER_FILE), process_identity(std::process::id()))
        .unwrap_or_else(|e| panic!("write owner marker in {}: {e}", dir.display()));
}

/// Hand every `prefix*` temp dir whose owning test process is gone to `reap`. SIGKILL or Ctrl-C
/// skip the exit hook, and without this their servers would hold ports and memory until reboot.
/// Dirs without a marker are skipped: they may belong to a process that is still creating them.
pub(crate) fn reap_orphans(prefix: &str, reap: impl Fn(&Path)) {
    let Ok(entries) = fs::read_dir(temp_base()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if !identity_alive(&owner) {
            reap(&dir);
        }
    }
}

/// Install the process-exit cleanup once. Statics (the shared clusters) are never dropped, but
/// libtest ends with exit(), which runs atexit handlers.
pub(crate) fn ensure_exit_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a plain extern "C" fn with no captured state.
        let rc = unsafe { libc::atexit(on_exit) };
        assert_eq!(rc, 0, "atexit registration failed");
    });
}

extern "C" fn on_exit() {
    // Unwinding out of an extern "C" fn aborts the process; a failed cleanup must not.
    let _ = std::panic::catch_unwind(|| {
        // pgmux first: it would otherwise log a storm of backend errors while the servers go.
        super::pgmux::kill_live_children();
        super::cluster::teardown_live_clusters();
    });
}

/// Last `n` lines of a log file, for failure messages that stay readable.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a pgmux log at WARN or ERROR: what went wrong earlier in a test,
/// which the debug lines of its last moments push out of [`tail`].
pub(crate) fn warnings(path: &Path, n: usize) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends the token's cancel to pgmux on `port` and waits until pgmux closes the cancel
/// connection, which it does once it has acted on the cancel. (`cancel_query` returns once
/// the request is written, so a query the client sends next may overtake the cancel and be
/// the one it cancels, as with PostgreSQL.)
pub async fn cancel_and_wait(token: &tokio_postgres::CancelToken, port: u16) {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to pgmux for a cancel");
    token
        .cancel_query_raw(&mut s, tokio_postgres::NoTls)
        .await
        .expect("send the cancel");
    let mut buf = [0u8; 64];
    while s.read(&mut buf).await.unwrap_or(0) > 0 {}
}
