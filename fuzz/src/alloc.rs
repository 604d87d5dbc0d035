//! A global allocator that remembers the largest single allocation made by the thread while a
//! decoder runs (armed), so that a length field that makes a decoder reserve gigabytes is a
//! finding, not an abort or a swapping machine. Above 4 GiB it refuses (the process would die
//! anyway; this way the allocation error names the size).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Install with `#[global_allocator] static A: GuardedAlloc = GuardedAlloc;` in the binary or
/// test that fuzzes.
pub struct GuardedAlloc;

const REFUSE_ABOVE: usize = 4 << 30;

fn note(size: usize) -> bool {
    let armed = ARMED.try_with(Cell::get).unwrap_or(false);
    if armed {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        return size <= REFUSE_ABOVE;
    }
    true
}

// SAFETY: every call is forwarded to `System` unchanged, or refused with null (allowed by the
// `GlobalAlloc` contract).
unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// While the returned guard lives, this thread's allocations are measured.
pub(crate) fn arm(_limit: usize) -> Armed {
    ARMED.with(|a| a.set(true));
    Armed
}

/// Disarms on drop.
pub(crate) struct Armed;

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.with(|a| a.set(false));
    }
}

/// The largest allocation measured since the last call (0 when [`GuardedAlloc`] is not the
/// global allocator).
pub fn take_largest_allocation() -> usize {
    LARGEST.with(|l| l.replace(0))
}
