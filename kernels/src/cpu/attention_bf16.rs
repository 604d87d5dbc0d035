//! Attention with its two products in bf16 (f32 accumulation; AMX tiles or AVX512-BF16's
//! `vdpbf16ps`, whichever [`super::bf16_gemm`] runs), for CPU devices
//! that compute in bf16 ([`crate::Device::with_compute_dtype`]): what PyTorch's bf16 SDPA does
//! with bf16 inputs. Per (batch, head): K packed once as the "weight" of `S = Q K^T` and V^T as
//! the weight of `O = P V`; per tile of query rows: S in bf16, the scaled scores plus the key
//! bias, a row softmax in f32 (every key of the row is at hand, so no running rescale), P
//! rounded to bf16 by the product, O divided by the row sum. Memory: one tile's scores,
//! `Q_TILE x S_k` f32, never `S x S`. Each output row is computed the same way whatever rows
//! share its tile, so a PipeFusion patch attending a K/V buffer gets what the whole sequence
//! would have.
//!
//! Where the bf16 kernel is AVX512-BF16's (no AMX), [`super::avx512_bf16_attention`] runs
//! instead: the same numbers, fused per block of 8 query rows.

use rayon::prelude::*;

use super::aligned::{as_uninit, AlignedVec};
use super::attention::{AttnDims, AttnInput, SendPtr};
use super::bf16_gemm::{
    bf16_bits_into, linear_packed_tiles, Epilogue, PackedBf16, BLOCK_N, CHUNK_K, TILE,
};
use super::bf16_io::{Input, Output};
use super::vector_math::exp_scaled_sub_sum;

/// Query rows per tile (scores: `Q_TILE x S_k` f32).
const Q_TILE: usize = 64;

/// [`super::attention::attention`] with bf16 products (see the module docs). Requires a bf16
/// kernel ([`super::bf16_gemm::bf16_kernel`]).
pub(crate) fn attention_bf16(
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    q: AttnInput<'_>,
    k: AttnInput<'_>,
    v: AttnInput<'_>,
    key_bias: Option<&[f32]>,
    dims: AttnDims,
) {
    let AttnDims {
        batch,
        heads,
        head_dim: dh,
    } = dims;
    let width = heads * dh;
    let (sq, sk) = (q.seq, k.seq);
    if sk == 0 {
        // No keys: every row attends nothing (zeros, log-sum-exp -inf), as the f32 kernel.
        out.fill(0.0);
        lse.into_iter().for_each(|l| l.fill(f32::NEG_INFINITY));
        return;
    }
    if super::bf16_gemm::avx512_bf16_kernel() {
        return super::avx512_bf16_attention::attention(out, lse, q, k, v, key_bias, dims);
    }
    let scale = 1.0 / (dh as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| SendPtr(l.as_mut_ptr()));
    (0..batch * heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        let col = h * dh;
        fn row<'a>(t: &AttnInput<'a>, b: usize, s: usize, col: usize, dh: usize) -> &'a [f32] {
            &t.data[t.at(b, s, col)..][..dh]
        }
        // This thread's buffers, kept across tasks and calls (a fresh zeroed allocation per
        // (batch, head) cost more than the packing itself).
        let mut scratch = SCRATCH.take();
        // K [sk, dh] is the weight of S = Q K^T; V^T [dh, sk] that of O = P V: both packed
        // straight from their strided rows into AMX's B-tile layout.
        let kp = pack_keys(sk, dh, |s| row(&k, b, s, col, dh), scratch.keys);
        let vp = pack_values_t(sk, dh, |s| row(&v, b, s, col, dh), scratch.values);
        let bias = key_bias.map(|kb| &kb[b * sk..(b + 1) * sk]);
        scratch.scores.resize(Q_TILE * sk, 0.0);
        scratch.o.resize(Q_TILE * dh, 0.0);
        let mut sums = [0f32; Q_TILE];
        for q0 in (0..sq).step_by(Q_TILE) {
            let rows = Q_TILE.min(sq - q0);
            let qr = &mut scratch.q;
            qr.clear();
            for s in q0..q0 + rows {
                prefetch(row(&q, b, (s + PREFETCH_ROWS).min(sq - 1), col, dh));
                qr.extend_from_slice(row(&q, b, s, col, dh));
            }
            let s = &mut scratch.scores[..rows * sk];
            let (out, x) = (Output::F32(as_uninit(s)), Input::F32(qr));
            linear_packed_tiles(out, x, &kp, None, rows, 1, Epilogue::Bias);
            let mut maxes = [f32::NEG_INFINITY; Q_TILE];
            for (r, row) in s.chunks_mut(sk).enumerate() {
                let (row_scale, m) = super::attention::scale_row(row, bias, scale);
                if m == f32::NEG_INFINITY {
                    row.fill(0.0); // every key removed: zeros out, -inf log-sum-exp
                    sums[r] = 0.0;
                    continue;
                }
                sums[r] = exp_scaled_sub_sum(row, row_scale, m);
                maxes[r] = m;
            }
            let o = &mut scratch.o[..rows * dh];
            let (out, x) = (Output::F32(as_uninit(o)), Input::F32(s));
            linear_packed_tiles(out, x, &vp, None, rows, 1, Epilogue::Bias);
            for r in 0..rows {
                let inv = if sums[r] > 0.0 { 1.0 / sums[r] } else { 0.0 };
                let dst = (b * sq + q0 + r) * width + col;
                // SAFETY: each (b, query row, head) block of `out` is written by exactly one
                // task, and lies inside `out` (batch * sq rows of width).
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(dst), dh) };
                for (d, &x) in dst.iter_mut().zip(&o[r * dh..(r + 1) * dh]) {
                    *d = x * inv;
                }
                if let Some(l) = lse_ptr {
                    let v = super::attention::log_sum_exp(maxes[r], sums[r]);
                    // SAFETY: as for `out`.
                    unsafe { *l.get().add((b * sq + q0 + r) * heads + h) = v };
                }
            }
        }
        scratch.keys = kp.into_tiles();
        scratch.values = vp.into_tiles();
        SCRATCH.set(scratch);
    });
}

/// One thread's buffers for [`attention_bf16`] (taken for a task, put back after it; a task
/// that rayon runs nested inside another finds the slot empty and allocates its own).
#[derive(Default)]
struct Scratch {
    keys: AlignedVec<u16>,
    values: AlignedVec<u16>,
    q: Vec<f32>,
    scores: Vec<f32>,
    o: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// Rows ahead that the packing loops prefetch: rows of one head are a token's width apart in
/// Q, K and V, too far for the hardware prefetcher, and each is only a few cache lines.
pub(super) const PREFETCH_ROWS: usize = 6;

/// Prefetches the cache lines of `row` into L1.
#[inline]
pub(super) fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = row.as_ptr();
        // Every line the row touches: one per 16 floats from the first, and the last element's.
        for i in (0..row.len()).step_by(16).chain(row.len().checked_sub(1)) {
            // SAFETY: prefetching never faults; the address is inside `row` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i).cast()) };
        }
    }
}

/// Words (bf16 pairs) per packed tile: 16 rows of 16 columns.
const TILE_WORDS: usize = TILE / 2;

/// Keys `[sk, dh]` (row `s` from `key`) as the packed weight of `Q K^T`: tile `(nb, kc)` holds
/// keys `16 nb..` as columns and dims `32 kc..` as 16 rows of pairs.
fn pack_keys<'a>(
    sk: usize,
    dh: usize,
    key: impl Fn(usize) -> &'a [f32],
    mut data: AlignedVec<u16>,
) -> PackedBf16 {
    let chunks = dh.div_ceil(CHUNK_K);
    data.reuse_for(sk.div_ceil(2 * BLOCK_N) * 2 * chunks * TILE);
    data.fill(0); // the padding (keys past sk, dims past dh) must be zero
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut data);
    let mut bits = vec![0u16; 2 * dh.div_ceil(2)]; // one key's dims in bf16, an even count
    for s in 0..sk {
        let (nb, c) = (s / BLOCK_N, s % BLOCK_N);
        prefetch(key((s + PREFETCH_ROWS).min(sk - 1)));
        bf16_bits_into(&mut bits, key(s));
        for (p, two) in bits.chunks_exact(2).enumerate() {
            let (kc, r) = (p / (CHUNK_K / 2), p % (CHUNK_K / 2));
            words[(nb * chunks + kc) * TILE_WORDS + r * BLOCK_N + c] =
                two[0] as u32 | (two[1] as u32) << 16;
        }
    }
    PackedBf16::from_tiles(sk, dh, data)
}

/// Values `[sk, dh]` (row `s` from `value`) as the packed weight `V^T [dh, sk]` of `P V`: tile
/// `(nb, kc)` holds dims `16 nb..` as columns and keys `32 kc..` as 16 rows of key pairs.
fn pack_values_t<'a>(
    sk: usize,
    dh: usize,
    value: impl Fn(usize) -> &'a [f32],
    mut data: AlignedVec<u16>,
) -> PackedBf16 {
    let chunks = sk.div_ceil(CHUNK_K);
    data.reuse_for(dh.div_ceil(2 * BLOCK_N) * 2 * chunks * TILE);
    data.fill(0); // the padding (dims past dh, keys past sk) must be zero
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut data);
    let (mut lo, mut hi) = (vec![0u16; dh], vec![0u16; dh]);
    for s0 in (0..sk).step_by(2) {
        let (kc, r) = (s0 / CHUNK_K, (s0 % CHUNK_K) / 2);
        prefetch(value((s0 + PREFETCH_ROWS).min(sk - 1)));
        prefetch(value((s0 + PREFETCH_ROWS + 1).min(sk - 1)));
        bf16_bits_into(&mut lo, value(s0));
        if s0 + 1 < sk {
            bf16_bits_into(&mut hi, value(s0 + 1));
        } else {
            hi.fill(0);
        }
        for (nb, (c0, c1)) in lo.chunks(BLOCK_N).zip(hi.chunks(BLOCK_N)).enumerate() {
            let dst = &mut words[(nb * chunks + kc) * TILE_WORDS + r * BLOCK_N..][..c0.len()];
            for ((w, &l), &h) in dst.iter_mut().zip(c0).zip(c1) {
                *w = l as u32 | (h as u32) << 16;
            }
        }
    }
    PackedBf16::from_tiles(dh, sk, data)
}
