//! Attention with AVX512-BF16 (`vdpbf16ps`) for CPUs that have it but no AMX (AMD Zen 4): the
//! same numbers as [`super::attention_bf16`]'s generic path (bf16 products, f32 accumulation and
//! softmax, P rounded to bf16, O divided by the row sum) in one pass per block of 8 query rows,
//! with [`super::avx512_bf16_tile::tile`] as the micro-kernel.
//!
//! Per (batch, head) task: K packed once as the weight of `S = Q K^T` (16 keys x one pair of
//! dims per 64-byte row) and V as the weight of `O = P V` (16 dims x one pair of keys). Per 8
//! query rows: their scores (`8 x S_k` f32, in L1 for DiT's sequences), the row softmax with
//! every key at hand, P rounded to bf16 as the next product's operand, and O written straight
//! into the output, then divided by the row sums. The generic path ran each product as a whole
//! GEMM call over 64 rows: the scores went through memory three times and every call paid
//! the GEMM's set-up; this path keeps a row block's work in L1.
//! Each output row is computed the same way whatever rows share its block, so a PipeFusion patch
//! attending a K/V buffer gets what the whole sequence would have.

use super::aligned::AlignedVec;
use super::attention::{for_each_head, scale_row, AttnDims, AttnInput, SendPtr};
use super::attention_bf16::{prefetch, PREFETCH_ROWS};
use super::avx512_bf16::dispatch;
use super::avx512_bf16_tile::{Tile, PAIR};
use super::bf16_gemm::{bf16_bits_into, BLOCK_N};
use super::f32_tile::Start;

/// Query rows per micro-kernel call (its largest `R`).
const ROWS: usize = 8;
/// Packed blocks (16 columns each) per micro-kernel call (its largest `NB`).
const NB: usize = 3;

/// [`super::attention::attention`] with bf16 products on AVX512-BF16 (see the module docs).
/// Requires [`super::avx512_bf16::available`] and at least one key ([`super::attention_bf16`]
/// handles `S_k = 0`).
pub(crate) fn attention(
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    q: AttnInput<'_>,
    k: AttnInput<'_>,
    v: AttnInput<'_>,
    key_bias: Option<&[f32]>,
    dims: AttnDims,
) {
    assert!(
        super::avx512_bf16::available(),
        "AVX512-BF16 attention without the CPU feature"
    );
    assert!(k.seq > 0, "AVX512-BF16 attention without keys");
    let AttnDims { batch, heads, .. } = dims;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| SendPtr(l.as_mut_ptr()));
    for_each_head(&SCRATCH, (batch, heads, k.seq), key_bias, |s, bias, bh| {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (asserted); each task writes only its
        // (batch, head) columns of `out` and `lse`, which lie inside them (the device checked
        // the views and sized the outputs).
        unsafe { head(s, (q, k, v), bias, dims, bh, (out_ptr, lse_ptr)) }
    });
}

/// One thread's buffers, kept across tasks and calls.
#[derive(Default)]
struct Scratch {
    keys: AlignedVec<u16>,
    values: AlignedVec<u16>,
    /// One row's inputs in bf16 while packing.
    bits: Vec<u16>,
    queries: AlignedVec<u16>,
    scores: Vec<f32>,
    probs: AlignedVec<u16>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// Attention of every query row of one (batch, head) `bh`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `out` (`[batch, seq_q, heads * head_dim]`) and `lse`
/// (`[batch, seq_q, heads]`) are valid, and nothing else accesses this head's columns of them.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn head<'a>(
    s: &mut Scratch,
    (q, k, v): (AttnInput<'a>, AttnInput<'a>, AttnInput<'a>),
    bias: Option<&[f32]>,
    AttnDims {
        heads,
        head_dim: dh,
        ..
    }: AttnDims,
    bh: usize,
    (out, lse): (SendPtr, Option<SendPtr>),
) {
    let (b, col) = (bh / heads, bh % heads * dh);
    let (sq, sk) = (q.seq, k.seq);
    let width = heads * dh;
    let row = |t: AttnInput<'a>, i: usize| -> &'a [f32] { &t.data[t.at(b, i, col)..][..dh] };
    // Pairs per query row (dims) and per P row (keys); the padding past dh and sk is zero.
    let (dim_pairs, key_pairs) = (dh.div_ceil(2), sk.div_ceil(2));
    pack_keys(s, sk, dh, |i| row(k, i));
    pack_values(s, sk, dh, |i| row(v, i));
    let (key_blocks, dim_blocks) = (sk.div_ceil(BLOCK_N), dh.div_ceil(BLOCK_N));
    let (keys, values) = (s.keys.as_ptr(), s.values.as_ptr());
    let key_block = |nb: usize| keys.wrapping_add(nb * dim_pairs * PAIR);
    let dim_block = |nb: usize| values.wrapping_add(nb * key_pairs * PAIR);
    s.queries.reuse_for(ROWS * 2 * dim_pairs);
    s.probs.reuse_for(ROWS * 2 * key_pairs);
    s.scores.resize(ROWS * sk, 0.0);
    let scale = 1.0 / (dh as f32).sqrt();
    for q0 in (0..sq).step_by(ROWS) {
        let rows = ROWS.min(sq - q0);
        for r in 0..rows {
            prefetch(row(q, (q0 + r + ROWS).min(sq - 1)));
            let dst = &mut s.queries[r * 2 * dim_pairs..][..2 * dim_pairs];
            bf16_bits_into(dst, row(q, q0 + r));
            dst[dh..].fill(0);
        }
        // S = Q K^T.
        let scores = s.scores.as_mut_ptr();
        // SAFETY: `queries` holds `rows` rows of dim_pairs pairs, the key blocks dim_pairs
        // pairs each; `scores` holds `rows` rows of sk.
        unsafe {
            product(
                rows,
                (s.queries.as_ptr(), 2 * dim_pairs),
                dim_pairs,
                key_block,
                key_blocks,
                (scores, sk),
                sk,
            )
        };
        // The row softmax, P rounded to bf16.
        let mut sums = [0f32; ROWS];
        let mut maxes = [f32::NEG_INFINITY; ROWS];
        for r in 0..rows {
            let scores = &mut s.scores[r * sk..][..sk];
            let (row_scale, m) = scale_row(scores, bias, scale);
            let p = &mut s.probs[r * 2 * key_pairs..][..2 * key_pairs];
            if m == f32::NEG_INFINITY {
                p.fill(0); // every key removed: zeros out, -inf log-sum-exp
                continue;
            }
            // SAFETY: AVX-512F and AVX512-BF16 (the caller's contract); p is as long as scores
            // plus the odd key's pad.
            sums[r] = unsafe { exp_sum_bf16(scores, p, row_scale, m) };
            maxes[r] = m;
            p[sk..].fill(0);
        }
        // O = P V, straight into the output rows.
        let o_row = |r: usize| out.get().wrapping_add((b * sq + q0 + r) * width + col);
        // SAFETY: `probs` holds `rows` rows of key_pairs pairs, the value blocks key_pairs pairs
        // each; the rows x dh at o_row(0) are this head's part of `out` (the caller's contract).
        unsafe {
            product(
                rows,
                (s.probs.as_ptr(), 2 * key_pairs),
                key_pairs,
                dim_block,
                dim_blocks,
                (o_row(0), width),
                dh,
            )
        };
        for r in 0..rows {
            let inv = if sums[r] > 0.0 { 1.0 / sums[r] } else { 0.0 };
            // SAFETY: this head's dh columns of output row q0 + r (the caller's contract).
            let o = unsafe { std::slice::from_raw_parts_mut(o_row(r), dh) };
            o.iter_mut().for_each(|x| *x *= inv);
            if let Some(l) = lse {
                let v = super::attention::log_sum_exp(maxes[r], sums[r]);
                // SAFETY: as for `out`.
                unsafe { *l.get().add((b * sq + q0 + r) * heads + bh % heads) = v };
            }
        }
    }
}

/// `c[rows, cols] = x · W^T` (bf16 products, f32 sums) over the packed blocks `block(0..blocks)`
/// (16 columns, `pairs` pairs each), 48 columns per micro-kernel call.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `x` holds `rows` rows of `pairs` pairs at stride `ldx` (u16), each
/// block `pairs * PAIR` u16 (64-byte aligned), `c` `rows` rows of `cols <= 16 * blocks` at stride
/// `ldc` that nothing else accesses.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn product(
    rows: usize,
    (x, ldx): (*const u16, usize),
    pairs: usize,
    block: impl Fn(usize) -> *const u16,
    blocks: usize,
    (c, ldc): (*mut f32, usize),
    cols: usize,
) {
    for t in 0..blocks.div_ceil(NB) {
        let c0 = NB * BLOCK_N * t;
        let tile = Tile {
            pairs,
            x,
            ldx,
            w: std::array::from_fn(|i| block(NB * t + i)),
            c: c.wrapping_add(c0),
            ldc,
            cols: (NB * BLOCK_N).min(cols - c0),
            next: (x, c.wrapping_add(c0 + NB * BLOCK_N).cast_const()),
            next_slab: [block(NB * (t + 1)); 3],
            slab_lines: 0,
        };
        // SAFETY: the caller's contract (the next call's addresses are only prefetched).
        unsafe { dispatch(rows, NB.min(blocks - NB * t), tile, Start::Zero) };
    }
}

/// Keys `[sk, dh]` (row `i` from `key`) into `s.keys` as the weight of `Q K^T`: block `nb`
/// (keys `16 nb..`) is `dh.div_ceil(2)` rows of 16 words, word `c` of row `p` = key `16 nb + c`'s
/// dims `(2p, 2p + 1)` in bf16; keys past `sk` and the dim past an odd `dh` are zero.
fn pack_keys<'a>(s: &mut Scratch, sk: usize, dh: usize, key: impl Fn(usize) -> &'a [f32]) {
    let pairs = dh.div_ceil(2);
    s.keys.reuse_for(sk.div_ceil(BLOCK_N) * pairs * PAIR);
    s.bits.resize(2 * pairs, 0);
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut s.keys);
    for (nb, block) in words.chunks_exact_mut(pairs * BLOCK_N).enumerate() {
        let keys = BLOCK_N.min(sk - nb * BLOCK_N);
        if keys < BLOCK_N {
            block.fill(0);
        }
        for c in 0..keys {
            let i = nb * BLOCK_N + c;
            prefetch(key((i + PREFETCH_ROWS).min(sk - 1)));
            bf16_bits_into(&mut s.bits, key(i));
            s.bits[dh..].fill(0);
            for (p, two) in s.bits.chunks_exact(2).enumerate() {
                block[p * BLOCK_N + c] = two[0] as u32 | (two[1] as u32) << 16;
            }
        }
    }
}

/// Values `[sk, dh]` (row `i` from `value`) into `s.values` as the weight of `P V`: block `nb`
/// (dims `16 nb..`) is `sk.div_ceil(2)` rows of 16 words, word `c` of row `j` = dim `16 nb + c`
/// of keys `(2j, 2j + 1)` in bf16; dims past `dh` and the key past an odd `sk` are zero.
fn pack_values<'a>(s: &mut Scratch, sk: usize, dh: usize, value: impl Fn(usize) -> &'a [f32]) {
    let (pairs, blocks) = (sk.div_ceil(2), dh.div_ceil(BLOCK_N));
    s.values.reuse_for(blocks * pairs * PAIR);
    s.bits.resize(2 * blocks * BLOCK_N, 0);
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut s.values);
    let (lo, hi) = s.bits.split_at_mut(blocks * BLOCK_N);
    for j in 0..pairs {
        prefetch(value((2 * j + PREFETCH_ROWS).min(sk - 1)));
        prefetch(value((2 * j + PREFETCH_ROWS + 1).min(sk - 1)));
        bf16_bits_into(lo, value(2 * j));
        lo[dh..].fill(0);
        if 2 * j + 1 < sk {
            bf16_bits_into(hi, value(2 * j + 1));
            hi[dh..].fill(0);
        } else {
            hi.fill(0);
        }
        for nb in 0..blocks {
            let dst = &mut words[(nb * pairs + j) * BLOCK_N..][..BLOCK_N];
            let (l, h) = (
                &lo[nb * BLOCK_N..][..BLOCK_N],
                &hi[nb * BLOCK_N..][..BLOCK_N],
            );
            for ((w, &l), &h) in dst.iter_mut().zip(l).zip(h) {
                *w = l as u32 | (h as u32) << 16;
            }
        }
    }
}

/// `e^x` per lane for `x <= 0` (the scaled scores less their max; -inf gives 0, NaN stays NaN,
/// as in the generic path) to a relative 6e-5, enough for P's bf16 (2^-9): `2^n e^r` with
/// `|r| <= ln2 / 2` and a degree-4 Taylor polynomial (relative error at most
/// `e^|r| r^5 / 120` = 5.6e-5), 10 vector ops where the f32 [`super::vector_math`] exp takes 17.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_nonpositive(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 24.0);
    for c in [1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // 2^n underflows to 0 far below; -inf makes r NaN, so lanes below -104 are zeroed (a NaN
    // lane is not below: it stays NaN).
    let y = _mm512_scalef_ps(p, n);
    _mm512_maskz_mov_ps(
        _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-104.0)),
        y,
    )
}

/// `p[i] = bf16(e^(x[i] * scale - m))` (round to nearest even) for every `i < x.len()`; returns
/// the sum of the f32 values (P is rounded for the product only, as the generic path does).
///
/// # Safety
/// AVX-512F and AVX512-BF16; `p.len() >= x.len()`.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn exp_sum_bf16(x: &[f32], p: &mut [u16], scale: f32, m: f32) -> f32 {
    use std::arch::x86_64::*;
    assert!(p.len() >= x.len());
    let (mv, sv) = (_mm512_set1_ps(m), _mm512_set1_ps(scale));
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let (src, dst) = (x.as_ptr(), p.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= x.len() {
        // SAFETY: i + 32 <= x.len() <= p.len().
        unsafe {
            let a = exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(src.add(i)), sv, mv));
            let b = exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(src.add(i + 16)), sv, mv));
            s0 = _mm512_add_ps(s0, a);
            s1 = _mm512_add_ps(s1, b);
            // Lanes 0..16 of the result come from the second operand.
            let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            _mm512_storeu_si512(dst.add(i).cast(), bits);
        }
        i += 32;
    }
    while i < x.len() {
        let n = (x.len() - i).min(16);
        let k: __mmask16 = ((1u32 << n) - 1) as u16;
        // SAFETY: the mask covers only elements below x.len(); n u16 stored at p[i..].
        unsafe {
            let v = _mm512_maskz_loadu_ps(k, src.add(i));
            let e = _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_fmsub_ps(v, sv, mv)));
            s0 = _mm512_add_ps(s0, e);
            let bits: [u16; 16] = std::mem::transmute(_mm512_cvtneps_pbh(e));
            std::ptr::copy_nonoverlapping(bits.as_ptr(), dst.add(i), n);
        }
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

#[cfg(test)]
mod tests {
    use super::super::bf16_gemm::{bf16_bits, bf16_to_f32};

    /// Against the f64 reference over the same bf16-rounded Q, K, V: relative L2 <= 4e-3 (P
    /// is rounded to bf16: up to 2^-9 per weight; measured ~1e-3), as
    /// `tests/attention_bf16.rs`; the log-sum-exp within 1e-4 of the tiled f32 path's over the
    /// rounded inputs (its degree-4 exp is within 6e-5 relative, so ln of the sum within
    /// 6e-5). Odd head dims and key counts, query counts that are not whole row blocks; the
    /// rest as
    /// [`super::super::attention_check::check_fused_attention`] says.
    #[test]
    fn fused_attention_matches_the_reference() {
        if !super::super::avx512_bf16::available() {
            assert!(!super::super::bf16_gemm::avx512_bf16_kernel());
            return;
        }
        super::super::attention_check::check_fused_attention(
            super::attention,
            |x| x.iter().map(|&v| bf16_to_f32(bf16_bits(v))).collect(),
            (4e-3, 1e-4),
            &[
                (2, 100, 100, 3, 72, false),
                (1, 37, 150, 2, 64, false),
                (3, 21, 45, 2, 9, true),
                (2, 13, 257, 1, 16, true),
                (1, 5, 1, 1, 2, false),
            ],
        );
    }
}
