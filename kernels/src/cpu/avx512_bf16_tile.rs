//! The micro-kernel of [`super::avx512_bf16`]: one call computes `R <= 8` rows x `NB <= 3`
//! packed blocks (16 output features each) of `y` over a run of input pairs, in `R * NB` zmm
//! accumulators. Per input pair: `NB` aligned 64-byte loads of the packed weight (one tile row:
//! 16 features x the pair) and, per row, one 32-bit broadcast of `x`'s pair against them with
//! `vdpbf16ps` (each f32 lane gains `x0 w0 + x1 w1`). It prefetches what the next call reads.

use std::arch::x86_64::*;

use super::bf16_gemm::BLOCK_N;
use super::f32_tile::{column_masks, start_accumulators, store_accumulators, Start};

/// u16 elements per input pair of one packed block (a tile row: 16 features x 2 inputs).
pub(super) const PAIR: usize = 2 * BLOCK_N;

/// Where one micro-kernel call reads and writes.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    /// Input pairs of this call.
    pub(super) pairs: usize,
    /// `R` rows of `2 * pairs` bf16 inputs at stride `ldx` (u16 elements; any alignment: the
    /// broadcasts need none, 4-byte aligned rows are a little faster).
    pub(super) x: *const u16,
    pub(super) ldx: usize,
    /// The `NB` blocks' weights from this call's first pair on, `pairs * PAIR` u16 each,
    /// 64-byte aligned.
    pub(super) w: [*const u16; 3],
    /// `R` rows of `cols <= 16 * NB` features at stride `ldc`.
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) cols: usize,
    /// The next call's `x` and `c` (prefetched into L1 during this one; any address).
    pub(super) next: (*const u16, *const f32),
    /// This call's share of the next blocks' weights: `slab_lines` lines from each of the
    /// three addresses are prefetched into L2 (any address).
    pub(super) next_slab: [*const u16; 3],
    pub(super) slab_lines: usize,
}

/// `acc[i] += x0 w[2i] + x1 w[2i + 1]` (bf16 products, f32 sums) for the input pair `(x0, x1)`
/// at `pair`: one `vdpbf16ps` with the pair broadcast from memory (`{1to16}`). In asm because
/// with the intrinsics LLVM loads the eight rows' broadcasts into registers of their own ahead
/// of the products, which with 24 accumulators and 3 weight vectors is more than the 32 zmm
/// registers: three accumulators lived on the stack (a store and a load per step each), and
/// the kernel ran at ~68% of the instruction's peak against ~90% this way. A macro, not a
/// function: rustc checks an asm block's zmm operands against the features of the function it
/// is written in, and only [`tile`] enables AVX-512 (the crate builds for AVX2-only CPUs too).
/// Use inside `unsafe`, with AVX512-BF16 present and 4 readable bytes at `pair`.
macro_rules! dot_broadcast {
    ($acc:expr, $w:expr, $pair:expr) => {
        std::arch::asm!(
            "vdpbf16ps {acc}, {w}, dword ptr [{x}]{{1to16}}",
            acc = inout(zmm_reg) $acc,
            w = in(zmm_reg) $w,
            x = in(reg) $pair,
            options(pure, readonly, nostack, preserves_flags),
        )
    };
}

/// `c[R, cols] = start + bf16 x[R, 2 pairs] · W^T` for the [`Tile`] `t`, f32 accumulation.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `t`'s pointers address what [`Tile`] says.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile<const R: usize, const NB: usize>(t: Tile, start: Start<'_>) {
    let Tile {
        pairs,
        x,
        ldx,
        w,
        c,
        ldc,
        cols,
        next,
        next_slab,
        slab_lines,
    } = t;
    let masks = column_masks::<NB>(cols);
    // SAFETY (whole body): the caller's contract; masked loads and stores touch only the tile's
    // `cols` columns; prefetches never fault.
    unsafe {
        let mut acc = start_accumulators::<R, NB>(start, &masks, c, ldc);
        // Prefetch schedule, one line per pair: the next tile's x (R rows x pairs * 4 bytes),
        // its y (R rows x NB lines), then this call's share of the next weights.
        let x_lines = R * pairs.div_ceil(16);
        let y_lines = R * NB;
        for kk in 0..pairs {
            if kk < x_lines {
                let (r, line) = (kk % R, kk / R);
                _mm_prefetch::<_MM_HINT_T0>(next.0.wrapping_add(r * ldx + 32 * line).cast());
            } else if kk - x_lines < y_lines {
                let (r, v) = ((kk - x_lines) / NB, (kk - x_lines) % NB);
                _mm_prefetch::<_MM_HINT_T0>(next.1.wrapping_add(r * ldc + 16 * v).cast());
            } else if kk - x_lines - y_lines < 3 * slab_lines {
                let s = kk - x_lines - y_lines;
                let p = next_slab[s % 3].wrapping_add(PAIR * (s / 3));
                _mm_prefetch::<_MM_HINT_T1>(p.cast());
            }
            let wv: [__m512i; NB] =
                std::array::from_fn(|v| _mm512_load_si512(w[v].add(kk * PAIR).cast()));
            for (r, row) in acc.iter_mut().enumerate() {
                let pair = x.add(r * ldx + 2 * kk);
                for v in 0..NB {
                    dot_broadcast!(row[v], wv[v], pair);
                }
            }
        }
        store_accumulators(&acc, &masks, c, ldc);
    }
}
