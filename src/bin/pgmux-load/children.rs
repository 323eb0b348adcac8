//! --processes K: re-run this program K times, each with its share of the connections, read
//! their JSON progress and summary lines, print the combined progress, and merge the summaries.

use crate::cli::Args;
use crate::observe::Observed;
use crate::run::{report, write_ready_file, ChildMsg, Report, GRACE};
use crate::stats::{Progress, Summary};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot find this program to re-run it: {0}")]
    Exe(std::io::Error),
    #[error("cannot start child process {0}: {1}")]
    Spawn(u32, std::io::Error),
    #[error("child process {0} ended ({1}) without a summary")]
    NoSummary(u32, String),
    #[error("child process {0} did not finish in time and was killed")]
    Timeout(u32),
    #[error(transparent)]
    Limit(#[from] crate::run::RunError),
}

#[derive(Default)]
struct Slot {
    progress: Progress,
    summary: Option<Summary>,
}

/// Ctrl-C: the children finish and report; a second one ends them and this process.
/// SIGTERM (`timeout`, `kill`) ends them at once: in their own process group, they would
/// otherwise outlive this process until --duration.
async fn pass_on_interrupts(pids: Vec<i32>) {
    let signal_all = |sig| {
        for &pid in &pids {
            // SAFETY: kill(2) with a pid this process started and has not yet reaped
            unsafe { libc::kill(pid, sig) };
        }
    };
    let terminated = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => drop(term.recv().await),
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => if r.is_err() {
            return;
        },
        _ = terminated => {
            signal_all(libc::SIGTERM);
            std::process::exit(EXIT_TERMINATED);
        }
    }
    eprintln!("pgmux-load: interrupted; finishing (Ctrl-C again to quit at once)");
    signal_all(libc::SIGINT);
    if tokio::signal::ctrl_c().await.is_ok() {
        signal_all(libc::SIGKILL);
        std::process::exit(crate::run::EXIT_INTERRUPTED);
    }
}

/// Exit status after SIGTERM, as a shell reports death by it.
const EXIT_TERMINATED: i32 = 143;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The children started and not yet reaped, killed if this process gives up on them (an
/// error starting a later one, a child past its time). std's processes, each waited for on
/// a thread of its own: tokio's `process` feature would reap orphans at every park of the
/// runtime, pgmux's own included (the feature is crate-wide), about 60 instructions a park.
#[derive(Default)]
struct Unreaped(Mutex<Vec<u32>>);

impl Unreaped {
    fn kill(&self, pid: u32) {
        if lock(&self.0).contains(&pid) {
            // SAFETY: kill(2) of a child this process started and has not reaped
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Drop for Unreaped {
    fn drop(&mut self) {
        for &pid in lock(&self.0).iter() {
            // SAFETY: as in `kill`
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

pub async fn run(
    args: &Args,
    scale: Option<u32>,
    observed: Option<Arc<Observed>>,
) -> Result<Summary, ChildError> {
    crate::run::check_fd_limit(args.connections, args.processes)?;
    let exe = std::env::current_exe().map_err(ChildError::Exe)?;
    let slots: Arc<Vec<Mutex<Slot>>> =
        Arc::new((0..args.processes).map(|_| Mutex::default()).collect());
    let unreaped = Arc::new(Unreaped::default());
    let mut children = Vec::new();
    for i in 0..args.processes {
        let (child_args, _) = args.child_args(i, scale);
        let mut cmd = Command::new(&exe);
        cmd.args(child_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // its own process group: a terminal's Ctrl-C reaches the parent alone, which
            // passes it on once (a second one would make a child quit without its summary)
            .process_group(0);
        match &args.password {
            Some(pw) => cmd.env("PGPASSWORD", pw),
            None => cmd.env_remove("PGPASSWORD"),
        };
        let mut child = cmd.spawn().map_err(|e| ChildError::Spawn(i, e))?;
        let pid = child.id();
        lock(&unreaped.0).push(pid);
        let stdout = child.stdout.take().expect("piped stdout");
        let slots2 = slots.clone();
        let reader = tokio::task::spawn_blocking(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ChildMsg>(&line) {
                    Ok(ChildMsg::Progress(p)) => lock(&slots2[i as usize]).progress = p,
                    Ok(ChildMsg::Summary(s)) => lock(&slots2[i as usize]).summary = Some(*s),
                    Err(_) => eprintln!("pgmux-load[{i}]: {line}"),
                }
            }
        });
        let unreaped2 = unreaped.clone();
        let waited = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            lock(&unreaped2.0).retain(|&p| p != pid);
            status
        });
        children.push((pid, waited, reader));
    }

    let pids: Vec<i32> = children.iter().map(|(p, _, _)| *p as i32).collect();
    let interrupt = tokio::spawn(pass_on_interrupts(pids));
    let requested = u64::from(args.connections);
    let reporter = {
        let slots = slots.clone();
        let out = if args.quiet {
            Report::Quiet
        } else {
            Report::Stderr
        };
        tokio::spawn(report(
            move || {
                let mut sum = Progress::default();
                for s in slots.iter() {
                    sum.add(&lock(s).progress);
                }
                sum
            },
            requested,
            out,
            observed,
            args.ready_file.clone(),
        ))
    };

    // Children stop by themselves at --duration plus the grace for closing; this is the
    // backstop against a wedged one.
    let limit = args.duration() + args.connect_timeout() + GRACE + Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    let mut parts = Vec::new();
    let mut failure = None;
    for (i, (pid, mut waited, reader)) in children.into_iter().enumerate() {
        let i = i as u32;
        let status = match tokio::time::timeout_at(deadline, &mut waited).await {
            Ok(Ok(s)) => s.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => {
                unreaped.kill(pid);
                let _ = waited.await;
                failure.get_or_insert(ChildError::Timeout(i));
                continue;
            }
        };
        let _ = reader.await;
        match lock(&slots[i as usize]).summary.take() {
            Some(s) => parts.push(s),
            None => {
                failure.get_or_insert(ChildError::NoSummary(i, status));
            }
        }
    }
    reporter.abort();
    interrupt.abort();
    if let Some(e) = failure {
        return Err(e);
    }
    let summary = Summary::merge(&parts, requested);
    // a run shorter than the once-a-second progress still leaves the file a script waits for
    if let Some(path) = args.ready_file.as_deref().filter(|p| !p.exists()) {
        write_ready_file(path, summary.made);
    }
    Ok(summary)
}
