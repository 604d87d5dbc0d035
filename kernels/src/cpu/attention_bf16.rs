//! Attention with its two products in bf16 on AMX tiles (f32 accumulation), for CPU devices
//! that compute in bf16 ([`crate::Device::with_compute_dtype`]): what PyTorch's bf16 SDPA does
//! with bf16 inputs. Per (batch, head): K packed once as the "weight" of `S = Q K^T` and V^T as
//! the weight of `O = P V`; per tile of query rows: S on AMX, the scaled scores plus the key
//! bias, a row softmax in f32 (every key of the row is at hand, so no running rescale), P
//! rounded to bf16 by the product, O divided by the row sum. Memory: one tile's scores,
//! `Q_TILE x S_k` f32, never `S x S`. Each output row is computed the same way whatever rows
//! share its tile, so a PipeFusion patch attending a K/V buffer gets what the whole sequence
//! would have.

use rayon::prelude::*;

use super::aligned::{as_uninit, AlignedVec};
use super::attention::{AttnDims, AttnInput};
use super::bf16_gemm::{bf16_bits, Epilogue, PackedBf16, BLOCK_N, CHUNK_K, TILE};
use super::math::max_lanes;
use super::vector_math::exp_sub_sum;

/// Query rows per tile (scores: `Q_TILE x S_k` f32).
const Q_TILE: usize = 64;

/// [`super::attention::attention`] with bf16 products (see the module docs). Requires AMX
/// ([`super::bf16_gemm::bf16_gemm_path`] is `amx-bf16`).
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
    let scale = 1.0 / (dh as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| SendPtr(l.as_mut_ptr()));
    (0..batch * heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        let col = h * dh;
        fn row<'a>(t: &AttnInput<'a>, b: usize, s: usize, col: usize, dh: usize) -> &'a [f32] {
            &t.data[t.at(b, s, col)..][..dh]
        }
        let gather = |t: &AttnInput<'_>, seq: std::ops::Range<usize>| {
            let mut m = Vec::with_capacity(seq.len() * dh);
            seq.for_each(|s| m.extend_from_slice(row(t, b, s, col, dh)));
            m
        };
        // K [sk, dh] is the weight of S = Q K^T; V^T [dh, sk] that of O = P V: both packed
        // straight from their strided rows into AMX's B-tile layout.
        let kp = pack_keys(sk, dh, |s| row(&k, b, s, col, dh));
        let vp = pack_values_t(sk, dh, |s| row(&v, b, s, col, dh));
        let bias = key_bias.map(|kb| &kb[b * sk..(b + 1) * sk]);
        let mut scores = vec![0f32; Q_TILE * sk];
        let mut o = vec![0f32; Q_TILE * dh];
        let mut sums = [0f32; Q_TILE];
        for q0 in (0..sq).step_by(Q_TILE) {
            let rows = Q_TILE.min(sq - q0);
            let qr = gather(&q, q0..q0 + rows);
            let s = &mut scores[..rows * sk];
            super::amx::linear(as_uninit(s), &qr, &kp, None, rows, 1, Epilogue::Bias);
            let mut maxes = [f32::NEG_INFINITY; Q_TILE];
            for (r, row) in s.chunks_mut(sk).enumerate() {
                match bias {
                    Some(bb) => row
                        .iter_mut()
                        .zip(bb)
                        .for_each(|(x, b)| *x = *x * scale + b),
                    None => row.iter_mut().for_each(|x| *x *= scale),
                }
                let m = max_lanes(row);
                if m == f32::NEG_INFINITY {
                    row.fill(0.0); // every key removed: zeros out, -inf log-sum-exp
                    sums[r] = 0.0;
                    continue;
                }
                sums[r] = exp_sub_sum(row, m);
                maxes[r] = m;
            }
            let o = &mut o[..rows * dh];
            super::amx::linear(as_uninit(o), s, &vp, None, rows, 1, Epilogue::Bias);
            for r in 0..rows {
                let inv = if sums[r] > 0.0 { 1.0 / sums[r] } else { 0.0 };
                let dst = (b * sq + q0 + r) * width + col;
                for j in 0..dh {
                    // SAFETY: each (b, query row, head) block is written by exactly one task.
                    unsafe { *out_ptr.get().add(dst + j) = o[r * dh + j] * inv };
                }
                if let Some(l) = lse_ptr {
                    let v = if sums[r] > 0.0 {
                        maxes[r] + sums[r].ln()
                    } else {
                        f32::NEG_INFINITY
                    };
                    // SAFETY: as for `out`.
                    unsafe { *l.get().add((b * sq + q0 + r) * heads + h) = v };
                }
            }
        }
    });
}

/// Words (bf16 pairs) per packed tile: 16 rows of 16 columns.
const TILE_WORDS: usize = TILE / 2;

/// Two bf16 values as one little-endian word: `lo` at the lower address (a tile's element
/// pair `(r, c, 0..2)`).
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// Keys `[sk, dh]` (row `s` from `key`) as the packed weight of `Q K^T`: tile `(nb, kc)` holds
/// keys `16 nb..` as columns and dims `32 kc..` as 16 rows of pairs.
fn pack_keys<'a>(sk: usize, dh: usize, key: impl Fn(usize) -> &'a [f32]) -> PackedBf16 {
    let chunks = dh.div_ceil(CHUNK_K);
    let mut data = AlignedVec::<u16>::zeroed(sk.div_ceil(2 * BLOCK_N) * 2 * chunks * TILE);
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut data);
    for s in 0..sk {
        let (nb, c, kr) = (s / BLOCK_N, s % BLOCK_N, key(s));
        for (p, two) in kr.chunks(2).enumerate() {
            let (kc, r) = (p / (CHUNK_K / 2), p % (CHUNK_K / 2));
            let hi = two.get(1).copied().unwrap_or(0.0);
            words[(nb * chunks + kc) * TILE_WORDS + r * BLOCK_N + c] = pair(two[0], hi);
        }
    }
    PackedBf16::from_tiles(sk, dh, data)
}

/// Values `[sk, dh]` (row `s` from `value`) as the packed weight `V^T [dh, sk]` of `P V`: tile
/// `(nb, kc)` holds dims `16 nb..` as columns and keys `32 kc..` as 16 rows of key pairs.
fn pack_values_t<'a>(sk: usize, dh: usize, value: impl Fn(usize) -> &'a [f32]) -> PackedBf16 {
    let chunks = sk.div_ceil(CHUNK_K);
    let mut data = AlignedVec::<u16>::zeroed(dh.div_ceil(2 * BLOCK_N) * 2 * chunks * TILE);
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut data);
    let zeros = vec![0f32; dh];
    for s0 in (0..sk).step_by(2) {
        let (kc, r) = (s0 / CHUNK_K, (s0 % CHUNK_K) / 2);
        let (v0, v1) = (
            value(s0),
            if s0 + 1 < sk {
                value(s0 + 1)
            } else {
                &zeros[..]
            },
        );
        for (nb, (c0, c1)) in v0.chunks(BLOCK_N).zip(v1.chunks(BLOCK_N)).enumerate() {
            let dst = &mut words[(nb * chunks + kc) * TILE_WORDS + r * BLOCK_N..][..c0.len()];
            for ((w, &lo), &hi) in dst.iter_mut().zip(c0).zip(c1) {
                *w = pair(lo, hi);
            }
        }
    }
    PackedBf16::from_tiles(dh, sk, data)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint regions (see `attention_bf16`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
