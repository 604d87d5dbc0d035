//! f32 attention with AVX2 + FMA in one pass per block of query rows, for CPUs whose f32
//! products are not AVX-512's (AMD Zen 3): [`super::attention::attention`]'s tiled path calls
//! the GEMM crate for every 64 x 256 block of scores and again for `P V`, and ran DiT-XL/2's
//! attention at ~40 GFLOP/s on Zen 3 against ~130 for its linears.
//!
//! Per (batch, head) task: K packed once as the panels of `S = Q K^T` (24 keys per panel,
//! `head_dim` rows) and V as the panels of `O = P V` (24 dims per panel, `S_k` rows), both
//! zero-padded. Per block of query rows: their scores (`rows x S_k`, sized to stay in L1/L2),
//! the row softmax with every key at hand (the scores become P in place), and O written
//! straight into the output, already divided by the row sums. Q is read in place.
//! A row's numbers do not depend on the rows that share its block (the micro-kernel sums each
//! row in key order, the softmax is per row), so a PipeFusion patch attending a K/V buffer gets
//! exactly what the whole sequence would.

use super::aligned::AlignedVec;
use super::attention::{for_each_head, scale_row, AttnDims, AttnInput, SendPtr};
use super::attention_bf16::{prefetch, PREFETCH_ROWS};
use super::fma_tile::{tile_rows, Tile, MR, NR};

/// Floats of scores per query-row block (64 KiB): DiT's 256 keys give blocks of 60 rows,
/// PixArt-alpha-512's 1024 keys 12 rows.
const BLOCK_SCORES: usize = 16 * 1024;
/// Most query rows per block.
const MAX_BLOCK_ROWS: usize = 64;

/// Whether f32 attention runs here by default: CPUs with AVX2 and FMA whose f32 linears are not
/// the AVX-512 kernel's (there the tiled path's GEMM calls use AVX-512; this path is measured
/// on Zen 3 only). `PIPEFUSE_F32_ATTENTION=fused` or `=tiled` picks either where AVX2 and FMA
/// exist, to compare them.
pub(crate) fn chosen() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let has = super::fma_math::available();
        let on = match std::env::var("PIPEFUSE_F32_ATTENTION").as_deref() {
            Ok("fused") => has,
            Ok("tiled") => false,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "PIPEFUSE_F32_ATTENTION: expected fused or tiled; choosing by the CPU"
                );
                has && !super::f32_gemm::f32_gemm_avx512()
            }
            _ => has && !super::f32_gemm::f32_gemm_avx512(),
        };
        tracing::debug!(fused = on, "f32 attention path");
        on
    })
}

/// [`super::attention::attention`] on this path (see the module docs). Requires
/// [`super::fma_math::available`] and at least one key.
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
        super::fma_math::available(),
        "AVX2/FMA attention without the CPU features"
    );
    assert!(k.seq > 0, "AVX2/FMA attention without keys");
    let AttnDims {
        batch,
        heads,
        head_dim,
    } = dims;
    // The kernel reads and writes through raw pointers: the shapes the device checked, once
    // more here, so that this function is sound on its own.
    let width = heads * head_dim;
    assert!(
        head_dim > 0
            && out.len() == batch * q.seq * width
            && lse
                .as_ref()
                .is_none_or(|l| l.len() == batch * q.seq * heads)
            && key_bias.is_none_or(|kb| kb.len() == batch * k.seq)
            && [q, k, v]
                .iter()
                .all(|t| t.extent(batch, width).is_some_and(|e| e <= t.data.len())),
        "AVX2/FMA attention: operand shapes"
    );
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| SendPtr(l.as_mut_ptr()));
    for_each_head(&SCRATCH, (batch, heads, k.seq), key_bias, |s, bias, bh| {
        // SAFETY: the CPU has AVX2 and FMA (asserted); each task writes only its (batch, head)
        // columns of `out` and `lse`, which lie inside them (checked above).
        unsafe { head(s, (q, k, v), bias, dims, bh, (out_ptr, lse_ptr)) }
    });
}

/// One thread's buffers, kept across tasks and calls.
#[derive(Default)]
struct Scratch {
    keys: AlignedVec<f32>,
    values: AlignedVec<f32>,
    scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// Attention of every query row of one (batch, head) `bh`.
///
/// # Safety
/// AVX2 and FMA; `out` (`[batch, seq_q, heads * head_dim]`) and `lse` (`[batch, seq_q,
/// heads]`) are valid, and nothing else accesses this head's columns of them.
#[target_feature(enable = "avx2,fma")]
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
    let (key_panels, dim_panels) = (sk.div_ceil(NR), dh.div_ceil(NR));
    pack_keys(&mut s.keys, sk, dh, |i| row(k, i));
    pack_values(&mut s.values, sk, dh, |i| row(v, i));
    // Scores rows span whole key panels (the padding keys' scores are written, never read).
    let lds = key_panels * NR;
    let block_rows = (BLOCK_SCORES / lds / MR * MR).clamp(MR, MAX_BLOCK_ROWS);
    s.scores.resize(block_rows * lds, 0.0);
    let scale = 1.0 / (dh as f32).sqrt();
    let ones = [1f32; MR];
    let mut inv = vec![0f32; block_rows];
    for q0 in (0..sq).step_by(block_rows) {
        let rows = block_rows.min(sq - q0);
        let q_rows = q.data[q.at(b, q0, col)..].as_ptr();
        // S = Q K^T, one key panel at a time (in L1 while the block's rows pass over it).
        for p in 0..key_panels {
            for r0 in (0..rows).step_by(MR) {
                let t = Tile {
                    kc: dh,
                    a: q_rows.wrapping_add(r0 * q.row_stride),
                    lda: q.row_stride,
                    b: s.keys.as_ptr().wrapping_add(p * dh * NR),
                    c: s.scores.as_mut_ptr().wrapping_add(r0 * lds + p * NR),
                    ldc: lds,
                    cols: NR,
                };
                // SAFETY: rows q0 + r0.. of q hold dh floats at its row stride (the device
                // checked the view); panel p holds dh x NR floats; the scores block is rows x lds.
                unsafe { tile_rows(MR.min(rows - r0), t, &ones) };
            }
        }
        // The row softmax: scores become P in place.
        for (r, inv) in inv[..rows].iter_mut().enumerate() {
            prefetch(row(q, (q0 + rows + r).min(sq - 1)));
            let scores = &mut s.scores[r * lds..][..sk];
            let (row_scale, m) = scale_row(scores, bias, scale);
            *inv = 0.0;
            let mut log_sum = f32::NEG_INFINITY;
            if m == f32::NEG_INFINITY {
                scores.fill(0.0); // every key removed: zeros out, -inf log-sum-exp
            } else {
                // SAFETY: AVX2 and FMA (the caller's contract).
                let sum = unsafe { super::fma_math::exp_scaled_sub_sum(scores, row_scale, m) };
                // A NaN score makes the sum NaN: NaN out (P V has it too) and NaN log-sum-exp.
                *inv = if sum > 0.0 || sum.is_nan() {
                    1.0 / sum
                } else {
                    0.0
                };
                log_sum = super::attention::log_sum_exp(m, sum);
            }
            if let Some(l) = lse {
                // SAFETY: this head's entry of row q0 + r (the caller's contract).
                unsafe { *l.get().add((b * sq + q0 + r) * heads + bh % heads) = log_sum };
            }
        }
        // O = P V / sums, straight into the output rows.
        for p in 0..dim_panels {
            for r0 in (0..rows).step_by(MR) {
                let t = Tile {
                    kc: sk,
                    a: s.scores.as_ptr().wrapping_add(r0 * lds),
                    lda: lds,
                    b: s.values.as_ptr().wrapping_add(p * sk * NR),
                    c: out
                        .get()
                        .wrapping_add((b * sq + q0 + r0) * width + col + p * NR),
                    ldc: width,
                    cols: NR.min(dh - p * NR),
                };
                // SAFETY: P holds rows x sk at stride lds; panel p holds sk x NR floats; the
                // output rows' dims p * NR.. of this head are the caller's.
                unsafe { tile_rows(MR.min(rows - r0), t, &inv[r0..]) };
            }
        }
    }
}

/// Keys `[sk, dh]` (row `i` from `key`) as the panels of `Q K^T`: panel `p` (keys `24 p..`)
/// is `dh` rows of 24 floats, float `c` of row `j` = dim `j` of key `24 p + c`; keys past `sk`
/// are zero.
fn pack_keys<'a>(
    dst: &mut AlignedVec<f32>,
    sk: usize,
    dh: usize,
    key: impl Fn(usize) -> &'a [f32],
) {
    dst.reuse_for(sk.div_ceil(NR) * dh * NR);
    for (p, panel) in dst.chunks_exact_mut(dh * NR).enumerate() {
        let keys = NR.min(sk - p * NR);
        if keys < NR {
            panel.fill(0.0);
        }
        for c in 0..keys {
            let i = p * NR + c;
            prefetch(key((i + PREFETCH_ROWS).min(sk - 1)));
            for (j, &x) in key(i).iter().enumerate() {
                panel[j * NR + c] = x;
            }
        }
    }
}

/// Values `[sk, dh]` (row `i` from `value`) as the panels of `P V`: panel `p` (dims `24 p..`)
/// is `sk` rows of 24 floats, row `i` = value `i`'s dims `24 p..`; dims past `dh` are zero.
fn pack_values<'a>(
    dst: &mut AlignedVec<f32>,
    sk: usize,
    dh: usize,
    value: impl Fn(usize) -> &'a [f32],
) {
    dst.reuse_for(dh.div_ceil(NR) * sk * NR);
    for i in 0..sk {
        prefetch(value((i + PREFETCH_ROWS).min(sk - 1)));
        let row = value(i);
        for (p, dims) in row.chunks(NR).enumerate() {
            let dst = &mut dst[(p * sk + i) * NR..][..NR];
            dst[..dims.len()].copy_from_slice(dims);
            dst[dims.len()..].fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Against the f64 reference: relative L2 <= 1e-5 (f32 products of up to 128 terms and
    /// exp_fast's ~2 ulp; measured 3e-7..1e-6); head dims and key counts that are not whole
    /// panels, PixArt-like 1030 keys (blocks of 12 rows), query counts that are not whole
    /// blocks; the rest as [`super::super::attention_check::check_fused_attention`] says.
    #[test]
    fn fma_attention_matches_the_reference() {
        if !super::super::fma_math::available() {
            eprintln!("no AVX2/FMA on this CPU: nothing to run");
            return;
        }
        super::super::attention_check::check_fused_attention(
            super::attention,
            <[f32]>::to_vec,
            (1e-5, 1e-5),
            &[
                (2, 100, 100, 3, 72, false),
                (1, 37, 1030, 2, 64, false),
                (3, 21, 45, 2, 9, true),
                (2, 13, 257, 1, 16, true),
                (1, 70, 24, 1, 128, false),
                (1, 5, 1, 1, 2, false),
            ],
        );
    }
}
