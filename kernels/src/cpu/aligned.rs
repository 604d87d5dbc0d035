//! Zero-initialised buffers aligned to 64-byte cache lines. AMX tile loads and stores run about
//! 2.5x slower when their 64-byte rows straddle two cache lines (measured on Emerald Rapids:
//! 2300 vs 900 GFLOP/s per core for the bf16 kernel with its operands in L1), and a plain
//! `Vec<u16>` is only as aligned as the allocator makes it.

use std::ops::{Deref, DerefMut};

use bytemuck::{Pod, Zeroable};

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);
// SAFETY: 64 plain bytes, no padding (size 64 = alignment), every bit pattern valid.
unsafe impl Zeroable for Line {}
// SAFETY: as above.
unsafe impl Pod for Line {}

/// `len` elements of `T`, starting on a cache-line boundary.
#[derive(Clone)]
pub(crate) struct AlignedVec<T> {
    lines: Vec<Line>,
    len: usize,
    _elem: std::marker::PhantomData<T>,
}

impl<T: Pod> AlignedVec<T> {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        AlignedVec {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _elem: std::marker::PhantomData,
        }
    }
}

impl<T: Pod> AlignedVec<T> {
    /// Makes the buffer `len` elements long, keeping its allocation when it is large enough:
    /// the contents are then unspecified (earlier values), so the caller writes every element.
    /// For scratch buffers reused across calls (a fresh allocation of megabytes costs a page
    /// fault per 4 KiB on first touch).
    pub(crate) fn reuse_for(&mut self, len: usize) {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if self.lines.len() < lines {
            self.lines = vec![Line([0; 64]); lines];
        }
        self.len = len;
    }
}

impl<T> Default for AlignedVec<T> {
    fn default() -> Self {
        AlignedVec {
            lines: Vec::new(),
            len: 0,
            _elem: std::marker::PhantomData,
        }
    }
}

impl<T: Pod> Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &bytemuck::cast_slice::<Line, T>(&self.lines)[..self.len]
    }
}

impl<T: Pod> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut::<Line, T>(&mut self.lines)[..self.len]
    }
}

/// `s` as memory to be written (every `f32` is valid, so writing through this view keeps `s`
/// initialised): for kernels that also fill uninitialised outputs.
pub(crate) fn as_uninit(s: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: same layout; the view only allows writes of valid f32s and reads of what was
    // written (MaybeUninit never de-initialises what it points at).
    unsafe { &mut *(s as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

#[cfg(test)]
mod tests {
    use super::AlignedVec;

    #[test]
    fn starts_on_a_cache_line_and_has_the_length_asked() {
        for len in [0, 1, 31, 32, 33, 1000] {
            let v = AlignedVec::<u16>::zeroed(len);
            assert_eq!(v.len(), len);
            assert_eq!(v.as_ptr() as usize % 64, 0);
            assert!(v.iter().all(|&x| x == 0));
            let f = AlignedVec::<f32>::zeroed(len);
            assert_eq!((f.len(), f.as_ptr() as usize % 64), (len, 0));
        }
    }

    #[test]
    fn reuse_keeps_a_large_enough_allocation() {
        let mut v = AlignedVec::<u16>::default();
        v.reuse_for(100);
        v.fill(7);
        let ptr = v.as_ptr();
        v.reuse_for(40);
        assert_eq!((v.len(), v.as_ptr()), (40, ptr));
        v.reuse_for(5000);
        assert_eq!((v.len(), v.as_ptr() as usize % 64), (5000, 0));
    }
}
