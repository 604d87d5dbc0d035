//! The f32 linear `y = x · W^T (+ b)` on CPUs with AVX2 + FMA and no AVX-512 kernel (AMD Zen 3
//! and older Intel), over weights packed once at load into panels of [`NR`] = 16 output features
//! (k-major, zero-padded: [`super::f32_gemm::PackedF32`]).
//!
//! BLIS-style: per call `x` is packed too, into panels of [`MR`] = 6 rows, k-major (zero rows
//! pad the last), so the micro-kernel reads both operands as contiguous streams. The
//! micro-kernel keeps a 6 x 16 tile of `y` in 12 ymm accumulators; each step loads two vectors
//! of the weight panel and broadcasts six `x` values (15 of the 16 ymm registers).
//!
//! Loops, per task (a contiguous range of weight panels, and of rows where there are fewer
//! panels than threads): `k` in blocks of [`KC`]; panels (a panel's `KC x 16` slab, 36 KiB,
//! is read once per block and stays near the core while every row panel passes over it); row
//! panels. `y` tiles are re-read once per `k` block (the first starts from the bias); each call
//! prefetches the next tile of `y`: without that, waiting for those lines cost ~8% (Zen 3).
//!
//! Every output's sum runs over `k` in order, one fused multiply-add per step, starting from
//! its bias, whatever the shape of the call: a row's result does not depend on which rows share
//! the call, nor on the thread count.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::aligned::AlignedVec;
use super::attention::SendPtr;
use super::f32_tile::Start;

/// Output features per weight panel (two ymm vectors).
const NR: usize = super::f32_gemm::AVX2_NR;
/// Rows of `x` per packed panel and micro-kernel call.
const MR: usize = 6;
/// `k` per block. Zen 3, DiT-XL/2's four products (m = 510, 8 layers of cold weights), 2
/// threads, variants interleaved (2026-12-08): 256 -> 1.17x the gemm crate, 576 -> 1.30x,
/// 1152 -> 1.24x; 1 thread 576 and 1152 alike, 256 4% slower. A second sweep (256 and 320
/// with row groups in L2, 384, 768) stayed within 3% of 576.
const KC: usize = 576;

/// Most rows packed at once: the packed copy of `x` is at most `ROW_CHUNK * k` floats (18.9 MB
/// for k = 4608).
const ROW_CHUNK: usize = 1024;

thread_local! {
    /// The packed `x` of the calling thread's last product, kept for the next one (a fresh
    /// buffer would be page-faulted in on every call); at most `ROW_CHUNK * k` floats.
    static PACKED_X: RefCell<AlignedVec<f32>> = RefCell::new(AlignedVec::zeroed(0));
}

/// `y[m, n] = x[m, k] · W^T + b`, then `gelu_tanh` if `gelu`, written to `y` (every element
/// once; `y` may be uninitialised). `panels` holds `n.div_ceil(NR)` panels of `k * NR`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `y` addresses `m * n` writable floats that nothing else accesses;
/// `x.len() == m * k`, `panels.len() == n.div_ceil(NR) * NR * k`, `b` has `n` values; `k > 0`.
pub(crate) unsafe fn linear(
    y: *mut f32,
    x: &[f32],
    panels: &[f32],
    b: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    threads: usize,
    gelu: bool,
) {
    assert!(
        k > 0 && x.len() == m * k && panels.len() == n.div_ceil(NR) * NR * k,
        "fma_gemm::linear: operand lengths"
    );
    if n == 0 {
        return;
    }
    // The packed copy of x is taken out of the thread-local, not borrowed: while this thread
    // waits for the tasks, rayon may run another product's job on it, which then finds an
    // empty buffer. Row chunks bound that copy (PixArt-alpha-1024's fc2 input is 75 MB); each
    // chunk re-reads the weight.
    let mut packed = PACKED_X.take();
    for r0 in (0..m).step_by(ROW_CHUNK) {
        let rows = ROW_CHUNK.min(m - r0);
        let (y, xp) = (
            SendPtr(y.wrapping_add(r0 * n)),
            pack_rows(&mut packed, &x[r0 * k..][..rows * k], k),
        );
        let (w_panels, row_panels) = (n.div_ceil(NR), rows.div_ceil(MR));
        super::f32_gemm::for_each_part(threads, w_panels, row_panels, |w_panels, row_panels| {
            let part = Task {
                y,
                xp,
                panels,
                b,
                shape: (rows, k, n),
                row_panels,
                w_panels,
                gelu,
            };
            // SAFETY: AVX2 + FMA and rows r0..r0 + rows of y, per the caller's contract; the
            // parts write disjoint (row, panel) ranges.
            unsafe { part.run() };
        });
    }
    PACKED_X.set(packed);
}

/// `x` (`m` rows of `k`) packed into `packed` (grown if short): row panel `i` at `i * MR * k`,
/// element `(kk, r)` at `kk * MR + r`, zero rows padding the last panel.
fn pack_rows<'a>(packed: &'a mut AlignedVec<f32>, x: &[f32], k: usize) -> &'a [f32] {
    let m = x.len() / k;
    let len = m.div_ceil(MR) * MR * k;
    if packed.len() < len {
        *packed = AlignedVec::zeroed(len);
    }
    let xp = &mut packed[..len];
    xp.par_chunks_mut(MR * k)
        .enumerate()
        .for_each(|(i, panel)| {
            let rows = MR.min(m - i * MR);
            if rows == MR {
                // Step by step through six source rows, each step's six values one contiguous
                // store: ~2.5x faster than a row at a time (its stores stride by MR).
                let src: [&[f32]; MR] = std::array::from_fn(|r| &x[(i * MR + r) * k..][..k]);
                for (kk, step) in panel.chunks_exact_mut(MR).enumerate() {
                    for (r, v) in step.iter_mut().enumerate() {
                        *v = src[r][kk];
                    }
                }
            } else {
                for (kk, step) in panel.chunks_exact_mut(MR).enumerate() {
                    for (r, v) in step.iter_mut().enumerate() {
                        *v = if r < rows {
                            x[(i * MR + r) * k + kk]
                        } else {
                            0.0
                        };
                    }
                }
            }
        });
    xp
}

/// One task: row panels `row_panels` x weight panels `w_panels` of `y`.
#[derive(Clone, Copy)]
struct Task<'a> {
    y: SendPtr,
    /// `x` packed: row panel `i` at `i * MR * k`, element `(kk, r)` at `kk * MR + r`.
    xp: &'a [f32],
    panels: &'a [f32],
    b: Option<&'a [f32]>,
    shape: (usize, usize, usize),
    row_panels: (usize, usize),
    w_panels: (usize, usize),
    gelu: bool,
}

impl Task<'_> {
    /// # Safety
    /// AVX2 + FMA; `y` as [`linear`] says; no other task writes this task's region.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run(self) {
        let (m, k, n) = self.shape;
        let (i0, i1) = self.row_panels;
        let (p0, p1) = self.w_panels;
        // One row panel (DiT's modulation: m = batch): the product is bound by reading the
        // weight, which whole-k blocks read as one sequential stream (DiT-XL/2's modulation
        // 48-49 -> 43-44.5 ms per forward, Zen 3, alternating runs).
        let block = if i1 - i0 <= 1 { k } else { KC };
        for k0 in (0..k).step_by(block) {
            let kc = block.min(k - k0);
            let last = k0 + kc == k;
            for p in p0..p1 {
                let cols = NR.min(n - p * NR);
                let slab = &self.panels[p * NR * k + k0 * NR..][..kc * NR];
                let start = match (k0, self.b) {
                    (0, Some(b)) => Start::Bias(&b[p * NR..][..cols]),
                    (0, None) => Start::Zero,
                    _ => Start::Load,
                };
                for i in i0..i1 {
                    let rows = MR.min(m - i * MR);
                    // The next tile: the next row panel, or the first one of the next panel.
                    let (ni, np) = if i + 1 < i1 { (i + 1, p) } else { (i0, p + 1) };
                    let a = &self.xp[i * MR * k + k0 * MR..][..kc * MR];
                    // SAFETY: the tile (rows x cols at (i * MR, p * NR)) lies in y's m x n
                    // elements and belongs to this task; `next` is only prefetched.
                    unsafe {
                        let c = self.y.get().add(i * MR * n + p * NR);
                        let next = self.y.get().wrapping_add(ni * MR * n + np * NR);
                        tile(
                            a,
                            slab,
                            Out {
                                c,
                                ldc: n,
                                rows,
                                cols,
                            },
                            start,
                            next,
                        );
                        if last && self.gelu {
                            super::vector_math::gelu_tanh_rows_in_place(c, n, (rows, cols));
                        }
                    }
                }
            }
        }
    }
}

/// Where a micro-kernel call writes: `rows <= MR` rows of `cols <= NR` floats at stride `ldc`.
#[derive(Clone, Copy)]
struct Out {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
}

/// `c[..rows][..cols] = start + a · slab` over `kc = slab.len() / NR` steps: `a` is one packed
/// row panel (`kc x MR`, k-major), `slab` the weight panel's `kc x NR` (32-byte aligned).
/// Prefetches the `MR` rows of `y` at `next` (two lines each: 16 floats may straddle them).
///
/// # Safety
/// AVX2 + FMA; `out` addresses what [`Out`] says; `slab` is 32-byte aligned and
/// `a.len() / MR == slab.len() / NR`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(a: &[f32], slab: &[f32], out: Out, start: Start<'_>, next: *const f32) {
    let Out { c, ldc, rows, cols } = out;
    let kc = slab.len() / NR;
    debug_assert_eq!(a.len(), kc * MR);
    let masks = [
        super::fma_tile::lane_mask(cols),
        super::fma_tile::lane_mask(cols.saturating_sub(8)),
    ];
    // SAFETY (whole body): the caller's contract; masked loads and stores touch only the
    // tile's `cols` columns, `r < rows` only its rows; prefetches never fault.
    unsafe {
        for r in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * ldc + NR - 1).cast());
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        match start {
            Start::Zero => {}
            Start::Bias(b) => {
                let bias = [
                    _mm256_maskload_ps(b.as_ptr(), masks[0]),
                    _mm256_maskload_ps(b.as_ptr().wrapping_add(8), masks[1]),
                ];
                acc.iter_mut().for_each(|row| *row = bias);
            }
            Start::Load => {
                for (r, row) in acc.iter_mut().enumerate() {
                    if r < rows {
                        for (v, lane) in row.iter_mut().enumerate() {
                            *lane = _mm256_maskload_ps(c.wrapping_add(r * ldc + 8 * v), masks[v]);
                        }
                    }
                }
            }
        }
        let (mut pa, mut pw) = (a.as_ptr(), slab.as_ptr());
        for _ in 0..kc {
            let w0 = _mm256_load_ps(pw);
            let w1 = _mm256_load_ps(pw.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*pa.add(r));
                row[0] = _mm256_fmadd_ps(xv, w0, row[0]);
                row[1] = _mm256_fmadd_ps(xv, w1, row[1]);
            }
            pa = pa.add(MR);
            pw = pw.add(NR);
        }
        for (r, row) in acc.iter().enumerate() {
            if r < rows {
                let dst = c.wrapping_add(r * ldc);
                if cols == NR {
                    _mm256_storeu_ps(dst, row[0]);
                    _mm256_storeu_ps(dst.add(8), row[1]);
                } else {
                    _mm256_maskstore_ps(dst, masks[0], row[0]);
                    _mm256_maskstore_ps(dst.wrapping_add(8), masks[1], row[1]);
                }
            }
        }
    }
}
