//! Per-thread spares of emptied buffers and queues. A transaction-mode client's relay gives
//! up its buffers and is dropped after each transaction (an idle client holds none of it),
//! and the buffers and queues it filled would be allocated anew for the next transaction:
//! they are kept here instead, for the next relay of the same thread. Bounded in number and
//! size per thread.

use bytes::BytesMut;
use std::cell::RefCell;
use std::collections::VecDeque;

/// Buffers, or queues of one element type, kept per thread: more than the clients of a busy
/// thread that end and begin a transaction between two polls.
const KEEP: usize = 32;
/// Largest queue kept, in elements.
const MAX_CAPACITY: usize = 16;
/// Largest buffer kept, in bytes: a read and a half.
pub const MAX_BUF: usize = 24 * 1024;

thread_local! {
    static BUFS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer, if this thread has a spare.
pub fn take_buf() -> Option<BytesMut> {
    BUFS.try_with(|s| s.borrow_mut().pop()).ok().flatten()
}

/// Keeps an emptied buffer for `take_buf` if it has, or can take back without allocating,
/// room for `min` bytes. The caller vouches that its allocation is at most MAX_BUF
/// (`relay::channel`): a small view of a large one would keep all of it alive, as an
/// earlier version of these spares did (50 MB of RSS against 17 MB in the soak,
/// docs/performance.md).
pub fn give_buf(mut buf: BytesMut, min: usize) {
    if !buf.is_empty() || !buf.try_reclaim(min) {
        return;
    }
    // a thread being torn down keeps nothing
    let _ = BUFS.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(buf);
        }
    });
}

/// An element type with its own spares.
pub trait Spare: Sized + 'static {
    /// Runs `f` on this thread's spares (None while the thread is torn down).
    fn with_spares<R>(f: impl FnOnce(&mut Vec<VecDeque<Self>>) -> R) -> Option<R>;
}

/// Gives `$t` its per-thread spares.
#[macro_export]
macro_rules! spares_of {
    ($t:ty) => {
        impl $crate::spares::Spare for $t {
            fn with_spares<R>(
                f: impl FnOnce(&mut Vec<std::collections::VecDeque<$t>>) -> R,
            ) -> Option<R> {
                thread_local! {
                    static SPARES: std::cell::RefCell<Vec<std::collections::VecDeque<$t>>> =
                        const { std::cell::RefCell::new(Vec::new()) };
                }
                SPARES.try_with(|s| f(&mut s.borrow_mut())).ok()
            }
        }
    };
}

spares_of!(u64);

/// An empty queue: a spare if this thread has one.
pub fn take<T: Spare>() -> VecDeque<T> {
    T::with_spares(|s| s.pop()).flatten().unwrap_or_default()
}

/// Keeps `q`'s memory, emptied, for `take`, unless it has none or is large.
pub fn give<T: Spare>(mut q: VecDeque<T>) {
    if q.capacity() == 0 || q.capacity() > MAX_CAPACITY {
        return;
    }
    q.clear();
    T::with_spares(|s| {
        if s.len() < KEEP {
            s.push(q);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_given_back_is_taken_again_empty_and_large_ones_are_not_kept() {
        while take::<u64>().capacity() > 0 {}
        let mut q = take::<u64>();
        q.extend([1, 2, 3]);
        let cap = q.capacity();
        give(q);
        let q = take::<u64>();
        assert!(q.is_empty());
        assert_eq!(q.capacity(), cap);
        assert_eq!(take::<u64>().capacity(), 0, "only one was kept");
        give(VecDeque::<u64>::with_capacity(MAX_CAPACITY * 2));
        assert_eq!(take::<u64>().capacity(), 0);
    }
}
