//! The pgmux process under test: config file, spawn, readiness, signals, exit, logs, and making
//! sure no pgmux outlives the test that started it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use super::util::{
    conn_str, ensure_exit_hook, free_port, identity_alive, lock, process_identity, reap_orphans,
    tail, temp_base, warnings, write_owner,
};

const DIR_PREFIX: &str = "pgmux-proc-";
const CHILD_FILE: &str = "child";
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
const PORT_ATTEMPTS: u32 = 3;

/// Pgmux children not yet reaped (pid, temp dir), for the exit hook.
static LIVE_CHILDREN: Mutex<BTreeMap<u32, PathBuf>> = Mutex::new(BTreeMap::new());

/// A running pgmux, killed and reaped on drop.
#[derive(Debug)]
pub struct Pgmux {
    pub port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Child,
    /// Set once the child has been waited for: its pid may then belong to someone else.
    reaped: AtomicBool,
    /// Holds config and log; removed on drop.
    dir: tempfile::TempDir,
}

enum Startup {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

impl Pgmux {
    /// Start the crate's own `pgmux` binary; see [`start_with_binary`](Self::start_with_binary).
    /// `option_env!` rather than `env!` so this file also compiles in crates without that binary
    /// (they call `start_with_binary` with their own).
    pub fn start(config: &str) -> Pgmux {
        match option_env!("CARGO_BIN_EXE_pgmux") {
            Some(bin) => Self::start_with_binary(Path::new(bin), config),
            None => panic!("CARGO_BIN_EXE_pgmux is only set for the pgmux crate's own tests"),
        }
    }

    /// Run `bin --config <file>` where the file is `config` with `{port}` replaced by a free
    /// port; returns once that port accepts TCP connections. Panics with the log if the process
    /// exits or is not listening within 20 s.
    pub fn start_with_binary(bin: &Path, config: &str) -> Pgmux {
        assert!(
            config.contains("{port}"),
            "pgmux config needs a {{port}} placeholder for the listen port:\n{config}"
        );
        let config = &without_default_metrics_port(config);
        static REAP: Once = Once::new();
        REAP.call_once(|| reap_orphans(DIR_PREFIX, reap_orphan));
        ensure_exit_hook();

        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(temp_base())
            .expect("create pgmux temp dir");
        write_owner(dir.path());
        let config_path = dir.path().join("pgmux.toml");
        let log_path = dir.path().join("pgmux.log");

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            fs::write(&config_path, config.replace("{port}", &port.to_string()))
                .expect("write pgmux config");
            let log_before = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0) as usize;
            let mut child = spawn(bin, &config_path, &log_path);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let failure = match wait_ready(&mut child, addr) {
                Startup::Ready => {
                    return Pgmux {
                        port,
                        config_path,
                        log_path,
                        child,
                        reaped: AtomicBool::new(false),
                        dir,
                    }
                }
                Startup::Exited(status) => format!("exited during startup with {status}"),
                Startup::TimedOut => {
                    let _ = child.kill();
                    let _ = child.wait();
                    format!("not accepting on {addr} after {STARTUP_DEADLINE:?}")
                }
            };
            lock(&LIVE_CHILDREN).remove(&child.id());
            let log =
                String::from_utf8_lossy(&fs::read(&log_path).unwrap_or_default()).into_owned();
            let fresh = log.get(log_before..).unwrap_or(&log);
            // The port was only probed, not held: someone may have taken it since.
            if fresh.to_lowercase().contains("address already in use") && attempt < PORT_ATTEMPTS {
                continue;
            }
            panic!("pgmux ({}) {failure}; log:\n{log}", bin.display());
        }
    }

    /// Everything pgmux has written to stdout/stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// "127.0.0.1:<port>"
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Send a signal (libc::SIGTERM, SIGINT, SIGHUP, ...). A no-op once the process has been
    /// reaped, since its pid may have been reused.
    pub fn signal(&self, sig: i32) {
        if self.reaped.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: plain kill(2) on our own unreaped child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.child.id(),
            std::io::Error::last_os_error()
        );
    }

    /// Wait up to `timeout` for pgmux to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on pgmux") {
                self.mark_reaped();
                return Some(status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            wait_for_exit_event(self.child.id(), left);
        }
    }

    pub fn conn_str(&self, user: &str, db: &str, password: Option<&str>) -> String {
        conn_str(self.port, user, db, password)
    }

    fn mark_reaped(&self) {
        self.reaped.store(true, Ordering::SeqCst);
        lock(&LIVE_CHILDREN).remove(&self.child.id());
    }
}

impl Drop for Pgmux {
    fn drop(&mut self) {
        if !self.reaped.load(Ordering::SeqCst) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.mark_reaped();
        }
        // The temp dir (and the log) goes with us; a failing test is the one time it matters.
        if std::thread::panicking() {
            eprintln!(
                "--- pgmux log ({}), last warnings ---\n{}\n--- pgmux log, last lines ---\n{}",
                self.log_path.display(),
                warnings(&self.log_path, 30),
                tail(&self.log_path, 60)
            );
        }
    }
}

/// Tests run many pgmux processes at once: unless a config chooses its metrics port, the
/// metrics listener (default 9930, which they would all fight over) is turned off.
fn without_default_metrics_port(config: &str) -> String {
    if config.contains("metrics_listen_port") {
        return config.to_string();
    }
    match config.find("[pgmux]") {
        Some(at) => {
            let end = at + "[pgmux]".len();
            format!(
                "{}\nmetrics_listen_port = 0{}",
                &config[..end],
                &config[end..]
            )
        }
        None => format!("[pgmux]\nmetrics_listen_port = 0\n{config}"),
    }
}

fn wait_ready(child: &mut Child, addr: SocketAddr) -> Startup {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Startup::Exited(status);
        }
        // The child's own listening socket, not a connect: until pgmux binds, the port is
        // free for another test process to take a moment (free_port binds port 0 and lets
        // go), and a connect would reach that socket and count it as pgmux.
        if listens_on(child.id(), addr.port()) {
            return Startup::Ready;
        }
        if Instant::now() >= deadline {
            return Startup::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(bin: &Path, config_path: &Path, log_path: &Path) -> Child {
    // A file, not a pipe: nobody would drain a pipe, and a full one blocks pgmux.
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open pgmux log");
    let log_err = log.try_clone().expect("clone log handle");
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "debug");
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let dir = config_path
        .parent()
        .expect("config lives in the pgmux temp dir");
    lock(&LIVE_CHILDREN).insert(child.id(), dir.to_path_buf());
    let _ = fs::write(dir.join(CHILD_FILE), process_identity(child.id()));
    child
}

/// Block until `pid` exits or `timeout` passes, without polling: poll(2) on a pidfd. Falls back
/// to a short sleep on kernels without pidfd_open (< 5.3).
fn wait_for_exit_event(pid: u32, timeout: Duration) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        std::thread::sleep(timeout.min(Duration::from_millis(10)));
        return;
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd; the fd is ours and closed right after. EINTR just returns early
    // and the caller loops.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
        libc::close(fd);
    }
}

/// Called from the exit hook: a Pgmux held in a static or leaked by a test is never dropped.
pub(crate) fn kill_live_children() {
    let children = std::mem::take(&mut *lock(&LIVE_CHILDREN));
    for (pid, dir) in children {
        // SAFETY: these are our own children, still unreaped, so their pids cannot be reused.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        let _ = fs::remove_dir_all(dir);
    }
}

/// A pgmux left behind by a killed test run: kill it if it is still that same process, then
/// delete its dir.
fn reap_orphan(dir: &Path) {
    if let Ok(identity) = fs::read_to_string(dir.join(CHILD_FILE)) {
        if identity_alive(&identity) {
            if let Some(Ok(pid)) = identity.split_whitespace().next().map(str::parse::<i32>) {
                // SAFETY: plain kill(2); the start-time check above guards against pid reuse.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let _ = fs::remove_dir_all(dir);
}

/// A second process on a port that is already taken, for SO_REUSEPORT handovers.
impl Pgmux {
    /// Start another pgmux of the same binary on this one's port, with `config`'s `{port}`
    /// replaced by that port (both configs need `so_reuseport = true`). Probing the port would
    /// reach either process, so the new one counts as ready once it holds a listening socket on
    /// the port itself. Panics with its log if it exits or is not listening within 20 s.
    pub fn start_beside(&self, config: &str) -> Pgmux {
        assert!(
            config.contains("{port}"),
            "pgmux config needs a {{port}} placeholder for the listen port:\n{config}"
        );
        let bin = fs::read_link(format!("/proc/{}/exe", self.pid())).expect("read pgmux's exe");
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(temp_base())
            .expect("create pgmux temp dir");
        write_owner(dir.path());
        let config_path = dir.path().join("pgmux.toml");
        let log_path = dir.path().join("pgmux.log");
        let config = without_default_metrics_port(config);
        fs::write(
            &config_path,
            config.replace("{port}", &self.port.to_string()),
        )
        .expect("write pgmux config");
        let mut child = spawn(&bin, &config_path, &log_path);
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let failure = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("exited during startup with {status}");
            }
            if listens_on(child.id(), self.port) {
                return Pgmux {
                    port: self.port,
                    config_path,
                    log_path,
                    child,
                    reaped: AtomicBool::new(false),
                    dir,
                };
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break format!(
                    "not listening on port {} after {STARTUP_DEADLINE:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        lock(&LIVE_CHILDREN).remove(&child.id());
        let log = String::from_utf8_lossy(&fs::read(&log_path).unwrap_or_default()).into_owned();
        panic!("second pgmux ({}) {failure}; log:\n{log}", bin.display());
    }
}

/// Whether process `pid` holds a TCP socket listening on `port`: the LISTEN entries of
/// /proc/net/tcp{,6} on that port, matched by inode against the process's open fds.
fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next());
            if f.get(3) == Some(&"0A")
                && local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
            {
                if let Some(inode) = f.get(9) {
                    inodes.push(format!("socket:[{inode}]"));
                }
            }
        }
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}
