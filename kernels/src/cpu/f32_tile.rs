//! The micro-kernel of [`super::f32_gemm`]: one call computes `R <= 8` rows x 48 features of
//! `y` over a run of `k`, in 24 zmm accumulators, from an 8-row block of `x` (one broadcast per
//! row and step) and the packed weight's slab (three aligned vectors per step), prefetching
//! what the next call reads.

use std::arch::x86_64::*;

use super::f32_gemm::NR;

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
            // Spread over the loop: the next tile's x (first), its y (R rows x 3 lines, after
            // that), then this call's share of the next slab.
            if kk < half {
                let (r, col) = (kk % R, kk / R * 16);
                _mm_prefetch::<_MM_HINT_T0>(next.0.wrapping_add(r * ldx + col).cast());
            } else if kk - half < 4 * R {
                if (kk - half) % 4 != 3 {
                    let (r, v) = ((kk - half) / 4, (kk - half) % 4);
                    _mm_prefetch::<_MM_HINT_T0>(next.1.wrapping_add(r * ldc + 16 * v).cast());
                }
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
