//! The `pgmux` process's allocator: the system's malloc, except for small over-aligned blocks.
//!
//! tokio allocates each task and each socket's registration in the reactor 128-byte aligned
//! (256 bytes each on x86_64): two such blocks per client, living as long as the client.
//! glibc's malloc serves an aligned request by cutting an aligned chunk out of a larger one
//! and freeing the pieces around it, and pieces wedged between long-lived blocks are seldom
//! reused: about 200 bytes per idle client (benches/idle-memory.sh, docs/performance.md).
//! Here such blocks come from slabs of equal slots instead, one free list per slot size.
//! Slots are reused, but slabs are never given back to the system (as glibc's heap mostly
//! is not either). Blocks of `MID` bytes and more go to mimalloc (see `MID`); everything else
//! goes to the system's allocator unchanged.

use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// The largest alignment served from slabs (tokio's cache-line padding on x86_64); slot
/// sizes are multiples of it, so every slot of a slab aligned to it is aligned too.
const ALIGN: usize = 128;
/// Slot sizes 128, 256, 384 and 512 bytes.
const CLASSES: usize = 4;
/// Bytes asked of the system at a time for one slot size.
const SLAB: usize = 64 * 1024;

/// See the module documentation; `const`, for a `#[global_allocator]` static.
pub struct Allocator {
    classes: [Mutex<Class>; CLASSES],
}

/// One slot size: freed slots (each holding a pointer to the next) and the unused rest of
/// its newest slab.
struct Class {
    free: *mut u8,
    next: *mut u8,
    end: *mut u8,
}

// The pointers are the allocator's own memory, only touched under the class's lock.
unsafe impl Send for Class {}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

impl Allocator {
    pub const fn new() -> Allocator {
        Allocator {
            classes: [const {
                Mutex::new(Class {
                    free: ptr::null_mut(),
                    next: ptr::null_mut(),
                    end: ptr::null_mut(),
                })
            }; CLASSES],
        }
    }

    /// The slot size class of a layout served from slabs, or None for the system's.
    fn class(layout: Layout) -> Option<usize> {
        let (size, align) = (layout.size(), layout.align());
        // malloc's own alignment is 16: only stricter layouts pay for alignment there
        if align <= 16 || align > ALIGN || size == 0 || size > ALIGN * CLASSES {
            return None;
        }
        Some(size.div_ceil(ALIGN) - 1)
    }

    fn take(&self, c: usize) -> *mut u8 {
        let mut class = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        if !class.free.is_null() {
            let p = class.free;
            // SAFETY: a freed slot holds the next free slot's address (see `give`)
            class.free = unsafe { p.cast::<*mut u8>().read() };
            return p;
        }
        let size = (c + 1) * ALIGN;
        if class.next.is_null() || (class.end as usize - class.next as usize) < size {
            // SAFETY: a valid non-zero layout; the rest of the previous slab (less than one
            // slot) is left unused
            let slab = unsafe { System.alloc(Layout::from_size_align_unchecked(SLAB, ALIGN)) };
            if slab.is_null() {
                return slab;
            }
            class.next = slab;
            // SAFETY: one past the end of the slab just allocated
            class.end = unsafe { slab.add(SLAB) };
        }
        let p = class.next;
        // SAFETY: `size` bytes from `p` lie within the slab (checked above)
        class.next = unsafe { p.add(size) };
        p
    }

    /// # Safety
    /// `p` came from `take(c)` and is not used after this.
    unsafe fn give(&self, c: usize, p: *mut u8) {
        let mut class = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the slot is at least 128 bytes, 128-aligned, and now ours
        unsafe { p.cast::<*mut u8>().write(class.free) };
        class.free = p;
    }
}

/// Blocks from this size up (a waiting client's future, a batch's seat...) come from
/// mimalloc: glibc serves them from bins it sorts and merges, several hundred instructions
/// each where a transaction makes a few; small blocks, which idle clients hold, stay with
/// glibc (mimalloc's size classes and pages held 1.45 KiB per idle client against 0.92).
const MID: usize = 1024;

fn mid(layout: Layout) -> bool {
    layout.size() >= MID && layout.align() <= 16
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h): milliseconds before memory freed in
/// mimalloc goes back to the system. At its default (10) the blocks of 10,000 logins stayed
/// resident: 1.09 KiB per idle client against 0.93 at 0 (benches/idle-memory.sh).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Settings of the allocator, made at the start of `main`.
pub fn configure() {
    // SAFETY: sets one of mimalloc's options, which it reads atomically
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::class(layout) {
            Some(c) => self.take(c),
            // SAFETY: the caller's layout, as GlobalAlloc requires
            None if mid(layout) => unsafe { MiMalloc.alloc(layout) },
            // SAFETY: the caller's layout, as GlobalAlloc requires
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::class(layout) {
            Some(c) => {
                let p = self.take(c);
                if !p.is_null() {
                    // SAFETY: the slot holds at least layout.size() bytes
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // SAFETY: as in `alloc`
            None if mid(layout) => unsafe { MiMalloc.alloc_zeroed(layout) },
            // SAFETY: as in `alloc`
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // the layout is the one the block was allocated with: it names the same allocator
        match Self::class(layout) {
            // SAFETY: allocated by `take(c)` for this layout
            Some(c) => unsafe { self.give(c, p) },
            // SAFETY: allocated by mimalloc for this layout
            None if mid(layout) => unsafe { MiMalloc.dealloc(p, layout) },
            // SAFETY: allocated by the system for this layout
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: GlobalAlloc::realloc's contract: new_size, rounded to the alignment, fits
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::class(layout), Self::class(new)) {
            // SAFETY: a mimalloc block, staying with mimalloc
            (None, None) if mid(layout) && mid(new) => unsafe {
                MiMalloc.realloc(p, layout, new_size)
            },
            // SAFETY: a system block, staying with the system
            (None, None) if !mid(layout) && !mid(new) => unsafe {
                System.realloc(p, layout, new_size)
            },
            (Some(a), Some(b)) if a == b => p,
            _ => {
                // SAFETY: `new` is valid; both blocks hold min(old, new) bytes
                unsafe {
                    let q = self.alloc(new);
                    if !q.is_null() {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                    q
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK: Layout = match Layout::from_size_align(256, 128) {
        Ok(l) => l,
        Err(_) => panic!(),
    };

    #[test]
    fn only_small_over_aligned_blocks_use_slabs() {
        let class = |size, align| Allocator::class(Layout::from_size_align(size, align).unwrap());
        assert_eq!(class(256, 128), Some(1));
        assert_eq!(class(216, 128), Some(1));
        assert_eq!(class(257, 128), Some(2));
        assert_eq!(class(40, 32), Some(0));
        assert_eq!(class(512, 64), Some(3));
        assert_eq!(class(513, 128), None);
        assert_eq!(class(256, 16), None);
        assert_eq!(class(256, 8), None);
        assert_eq!(class(256, 256), None);
    }

    #[test]
    fn slots_are_aligned_distinct_and_reused() {
        let a = Allocator::new();
        unsafe {
            let blocks: Vec<*mut u8> = (0..600).map(|_| a.alloc(TASK)).collect();
            for (i, &p) in blocks.iter().enumerate() {
                assert!(!p.is_null());
                assert_eq!(p as usize % 128, 0);
                ptr::write_bytes(p, i as u8, 256);
            }
            let mut sorted = blocks.clone();
            sorted.sort();
            for w in sorted.windows(2) {
                assert!(w[1] as usize - w[0] as usize >= 256, "overlapping slots");
            }
            for (i, &p) in blocks.iter().enumerate() {
                let s = std::slice::from_raw_parts(p, 256);
                assert!(s.iter().all(|&b| b == i as u8), "slot {i} overwritten");
            }
            let freed = blocks[17];
            a.dealloc(freed, TASK);
            assert_eq!(a.alloc(TASK), freed, "a freed slot is reused");
            let z = a.alloc_zeroed(TASK);
            assert!(std::slice::from_raw_parts(z, 256).iter().all(|&b| b == 0));
            a.dealloc(z, TASK);
            for p in blocks {
                a.dealloc(p, TASK);
            }
        }
    }

    #[test]
    fn realloc_moves_between_slabs_and_the_system_keeping_the_bytes() {
        let a = Allocator::new();
        unsafe {
            let p = a.alloc(TASK);
            ptr::write_bytes(p, 7, 256);
            // to a bigger slot, then beyond the slabs, then back
            let q = a.realloc(p, TASK, 300);
            assert_eq!(q as usize % 128, 0);
            let big = Layout::from_size_align(300, 128).unwrap();
            let r = a.realloc(q, big, 4096);
            assert_eq!(r as usize % 128, 0);
            assert!(std::slice::from_raw_parts(r, 256).iter().all(|&b| b == 7));
            let huge = Layout::from_size_align(4096, 128).unwrap();
            let s = a.realloc(r, huge, 200);
            assert!(std::slice::from_raw_parts(s, 200).iter().all(|&b| b == 7));
            assert_eq!(
                a.realloc(s, Layout::from_size_align(200, 128).unwrap(), 250),
                s
            );
            a.dealloc(s, Layout::from_size_align(250, 128).unwrap());
            // ordinary layouts are the system's
            let l = Layout::from_size_align(64, 8).unwrap();
            let m = a.alloc(l);
            let m = a.realloc(m, l, 1000);
            a.dealloc(m, Layout::from_size_align(1000, 8).unwrap());
        }
    }

    #[test]
    fn threads_share_the_slabs_safely() {
        let a = std::sync::Arc::new(Allocator::new());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || unsafe {
                    for round in 0..50u8 {
                        let blocks: Vec<usize> = (0..200).map(|_| a.alloc(TASK) as usize).collect();
                        for &p in &blocks {
                            ptr::write_bytes(p as *mut u8, t ^ round, 256);
                        }
                        for &p in &blocks {
                            let s = std::slice::from_raw_parts(p as *const u8, 256);
                            assert!(s.iter().all(|&b| b == t ^ round));
                            a.dealloc(p as *mut u8, TASK);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn blocks_from_mid_size_up_go_to_mimalloc_and_realloc_crosses_over() {
        let a = Allocator::new();
        let l = |size| Layout::from_size_align(size, 8).unwrap();
        assert!(!mid(l(MID - 1)) && mid(l(MID)) && mid(l(1 << 20)));
        assert!(
            !mid(Layout::from_size_align(MID, 64).unwrap()),
            "over-aligned: system"
        );
        unsafe {
            // system -> mimalloc -> mimalloc (bigger) -> system, the bytes kept
            let p = a.alloc(l(100));
            ptr::write_bytes(p, 3, 100);
            let q = a.realloc(p, l(100), 5000);
            assert!(std::slice::from_raw_parts(q, 100).iter().all(|&b| b == 3));
            ptr::write_bytes(q, 4, 5000);
            let r = a.realloc(q, l(5000), 70_000);
            assert!(std::slice::from_raw_parts(r, 5000).iter().all(|&b| b == 4));
            let s = a.realloc(r, l(70_000), 50);
            assert!(std::slice::from_raw_parts(s, 50).iter().all(|&b| b == 4));
            a.dealloc(s, l(50));
            let z = a.alloc_zeroed(l(MID * 3));
            assert!(std::slice::from_raw_parts(z, MID * 3)
                .iter()
                .all(|&b| b == 0));
            a.dealloc(z, l(MID * 3));
        }
    }
}
