//! The AVX-512 f32 linear of [`super::f32_gemm`]: its loops ([`task`]) and micro-kernel
//! ([`tile`]). One call computes `R <= 8` rows x 48 features of `y` over a run of `k`, in 24 zmm
//! accumulators, from an 8-row block of `x` (one broadcast per row and step) and the packed
//! weight's slab (three aligned vectors per step), prefetching what the next call reads.
//!
//! The loops (per task: a contiguous range of panels): groups of [`MC`] rows (their `y`
//! tiles stay in L2), `k` in blocks of [`KC`], panels (a panel's 72 KiB slab stays in L2 while
//! the group's 8-row blocks of `x` pass over it), row blocks. `y` tiles are re-read once per `k`
//! block (the first starts from the bias); each call prefetches the next call's `x` rows and `y`
//! tile.

use std::arch::x86_64::*;

use super::attention::SendPtr;
use super::f32_gemm::{PackedF32, NR};

/// Rows of `x` per micro-kernel call.
pub(super) const MR: usize = 8;
/// `k` per block: a panel's slab is `KC * NR * 4` = 72 KiB (in L2). Against 128 (a 24 KiB slab
/// in L1, the `y` tiles re-read three times as often): 3-7% faster on DiT-XL/2's products with
/// 2 threads, 2% with 1; 256 to 1152 all alike (Zen 4, one process, variants interleaved,
/// 2026-12-07).
const KC: usize = 384;
/// Rows per group: a group's `y` tiles (`MC` x a task's panels) stay in L2 across `k` blocks,
/// and each slab is reused by `MC / MR` micro-kernel calls.
const MC: usize = 128;

/// One task: rows `r0..r1` x panels `p0..p1` of `y`.
///
/// # Safety
/// AVX-512F; `y` has `m * n` elements (checked by the caller) and no other task writes this
/// region.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn task(
    y: SendPtr,
    x: &[f32],
    w: &PackedF32,
    b: Option<&[f32]>,
    (r0, r1): (usize, usize),
    (p0, p1): (usize, usize),
    gelu: bool,
) {
    let (n, k) = (w.n, w.k);
    for g0 in (r0..r1).step_by(MC) {
        let g1 = (g0 + MC).min(r1);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let last = k0 + kc == k;
            for p in p0..p1 {
                let cols = NR.min(n - p * NR);
                let slab = &w.panels[p * NR * k + k0 * NR..][..kc * NR];
                let start = match (k0, b) {
                    (0, Some(b)) => Start::Bias(&b[p * NR..][..cols]),
                    (0, None) => Start::Zero,
                    _ => Start::Load,
                };
                // Each call of the group prefetches its share of the next panel's slab.
                let slab_lines = (kc * NR / 16).div_ceil((g1 - g0).div_ceil(MR));
                for (share, i) in (g0..g1).step_by(MR).enumerate() {
                    let rows = MR.min(g1 - i);
                    // The next tile's rows of x and of y, for prefetching (the next row block,
                    // or the group's first one in the next panel).
                    let (ni, np) = if i + MR < g1 {
                        (i + MR, p)
                    } else {
                        (g0, p + 1)
                    };
                    let next = (
                        x.as_ptr().wrapping_add(ni * k + k0),
                        y.get().wrapping_add(ni * n + np * NR).cast_const(),
                    );
                    // SAFETY: rows i..i+rows of x hold k elements each; the tile (rows x cols
                    // at (i, p*NR)) lies in y; AVX-512F per the caller. `next` is only
                    // prefetched (never dereferenced).
                    unsafe {
                        let xs = x.as_ptr().add(i * k + k0);
                        let c = y.get().add(i * n + p * NR);
                        let t = Tile {
                            kc,
                            x: xs,
                            ldx: k,
                            c,
                            ldc: n,
                            cols,
                            next,
                            next_slab: w
                                .panels
                                .as_ptr()
                                .wrapping_add((p + 1) * NR * k + k0 * NR + share * 16 * slab_lines),
                            slab_lines,
                        };
                        match rows {
                            8 => tile::<8>(t, slab, start),
                            7 => tile::<7>(t, slab, start),
                            6 => tile::<6>(t, slab, start),
                            5 => tile::<5>(t, slab, start),
                            4 => tile::<4>(t, slab, start),
                            3 => tile::<3>(t, slab, start),
                            2 => tile::<2>(t, slab, start),
                            _ => tile::<1>(t, slab, start),
                        }
                        // GELU on the finished tile (in L1); applying it to the
                        // accumulators before the store slowed every call by ~10% (codegen).
                        if last && gelu {
                            super::vector_math::gelu_tanh_rows_in_place(c, n, (rows, cols));
                        }
                    }
                }
            }
        }
    }
}

/// Where one micro-kernel call reads `x` and writes `y`.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    pub(super) kc: usize,
    /// `R` rows of `kc` elements at stride `ldx`.
    pub(super) x: *const f32,
    pub(super) ldx: usize,
    /// `R` rows of `cols <= NR` elements at stride `ldc`.
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) cols: usize,
    /// The next call's `x` and `c` (prefetched into L1 during this one; any address).
    pub(super) next: (*const f32, *const f32),
    /// This call's share of the next panel's slab: `slab_lines` lines from here are
    /// prefetched into L2 (any address).
    pub(super) next_slab: *const f32,
    pub(super) slab_lines: usize,
}

/// What a tile's accumulators start from.
#[derive(Clone, Copy)]
pub(super) enum Start<'a> {
    Zero,
    /// The bias of the tile's columns.
    Bias(&'a [f32]),
    /// The tile's current values (a later `k` block).
    Load,
}

/// `c[R, cols] = start + x[R, kc] · slab[kc, NR][.., ..cols]` for the [`Tile`] `t`.
///
/// # Safety
/// AVX-512F; `t.x` and `t.c` address what [`Tile`] says; `slab.len() == t.kc * NR`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile<const R: usize>(t: Tile, slab: &[f32], start: Start<'_>) {
    let Tile {
        kc,
        x,
        ldx,
        c,
        ldc,
        cols,
        next,
        next_slab,
        slab_lines,
    } = t;
    debug_assert_eq!(slab.len(), kc * NR);
    let masks = column_masks::<3>(cols);
    // SAFETY (whole body): the caller's contract; masked loads and stores touch only the tile's
    // `cols` columns; prefetches never fault.
    unsafe {
        let mut acc = start_accumulators::<R, 3>(start, &masks, c, ldc);
        let w = slab.as_ptr();
        // The next tile's x lines: R rows x kc / 16. Products of fewer than 8 rows (DiT's
        // modulation: 2) used to prefetch 8 rows, most of them addresses past x.
        let half = R * kc.div_ceil(16);
        for kk in 0..kc {
            // Spread over the loop: the next tile's x (first), its y (R rows x 4 lines, after
            // that: 48 floats span four lines where y is not 64-byte aligned, as a fresh Vec
            // is not), then this call's share of the next slab.
            if kk < half {
                let (r, col) = (kk % R, kk / R * 16);
                _mm_prefetch::<_MM_HINT_T0>(next.0.wrapping_add(r * ldx + col).cast());
            } else if kk - half < 4 * R {
                let (r, v) = ((kk - half) / 4, (kk - half) % 4);
                let col = (16 * v).min(NR - 1);
                _mm_prefetch::<_MM_HINT_T0>(next.1.wrapping_add(r * ldc + col).cast());
            } else if kk - half - 4 * R < slab_lines {
                let line = kk - half - 4 * R;
                _mm_prefetch::<_MM_HINT_T1>(next_slab.wrapping_add(16 * line).cast());
            }
            let b0 = _mm512_load_ps(w.add(kk * NR));
            let b1 = _mm512_load_ps(w.add(kk * NR + 16));
            let b2 = _mm512_load_ps(w.add(kk * NR + 32));
            for (r, row) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*x.add(r * ldx + kk));
                row[0] = _mm512_fmadd_ps(a, b0, row[0]);
                row[1] = _mm512_fmadd_ps(a, b1, row[1]);
                row[2] = _mm512_fmadd_ps(a, b2, row[2]);
            }
        }
        store_accumulators(&acc, &masks, c, ldc);
    }
}

/// The masks of a tile's `NB` vectors of 16 columns when it has `cols` columns.
#[inline]
pub(super) fn column_masks<const NB: usize>(cols: usize) -> [__mmask16; NB] {
    std::array::from_fn(|v| {
        let have = cols.saturating_sub(16 * v).min(16);
        ((1u32 << have) - 1) as __mmask16
    })
}

/// A tile's `R` x `NB` accumulators at `start` (`Load`: from `c`, `R` rows at stride `ldc`),
/// each vector masked to the tile's columns. Shared by the f32 and AVX512-BF16 micro-kernels.
///
/// # Safety
/// AVX-512F; with `Start::Load`, `c` addresses the tile's rows within `masks`' columns.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn start_accumulators<const R: usize, const NB: usize>(
    start: Start<'_>,
    masks: &[__mmask16; NB],
    c: *const f32,
    ldc: usize,
) -> [[__m512; NB]; R] {
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    // SAFETY: masked loads read only the columns `masks` allow, where the caller says.
    unsafe {
        match start {
            Start::Zero => {}
            Start::Bias(b) => {
                for v in 0..NB {
                    let bv = _mm512_maskz_loadu_ps(masks[v], b.as_ptr().add(16 * v));
                    for row in acc.iter_mut() {
                        row[v] = bv;
                    }
                }
            }
            Start::Load => {
                for (r, row) in acc.iter_mut().enumerate() {
                    for v in 0..NB {
                        row[v] = _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + 16 * v));
                    }
                }
            }
        }
    }
    acc
}

/// Stores a tile's accumulators to `c` (`R` rows at stride `ldc`), masked to its columns.
///
/// # Safety
/// AVX-512F; `c` addresses the tile's rows within `masks`' columns.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_accumulators<const R: usize, const NB: usize>(
    acc: &[[__m512; NB]; R],
    masks: &[__mmask16; NB],
    c: *mut f32,
    ldc: usize,
) {
    for (r, row) in acc.iter().enumerate() {
        for v in 0..NB {
            // SAFETY: a masked store to the columns `masks` allow, where the caller says.
            unsafe { _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], row[v]) };
        }
    }
}
