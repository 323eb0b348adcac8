//! The CPU scheduling policy of pgmux's threads (`sched_batch`).
//!
//! Under Linux's default policy a woken thread may preempt the task running on its core at
//! once. pgmux is woken by nearly every message, so on a busy machine it took the core for
//! each event alone, one turn of its loop per event, and the switches cost more than the
//! work (docs/performance.md). A woken `SCHED_BATCH` thread does not preempt: it runs when
//! the running task's turn ends, by which time more of its sockets are ready, and handles
//! them all in one turn. Any user may choose the policy for its own threads; threads started
//! later inherit it, so it is set once, first thing in `main`. The gain was large where
//! pgmux shared its session (its autogroup's one share of the CPU) with the load, and small
//! where it ran in a session of its own (docs/performance.md).

use std::io;

/// Puts the calling thread (and the threads it starts from now on) under `SCHED_BATCH`.
#[cfg(target_os = "linux")]
pub fn use_batch_policy() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Other systems have no such policy: pgmux runs under the default one.
#[cfg(not(target_os = "linux"))]
pub fn use_batch_policy() -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_thread_and_those_it_starts_run_under_sched_batch() {
        let policy = std::thread::spawn(|| {
            use_batch_policy().expect("SCHED_BATCH is open to any user");
            std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) })
                .join()
                .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH);
        // the test harness's own thread is untouched
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}
