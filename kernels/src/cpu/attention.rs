//! Multi-head softmax attention, tiled with an online softmax: never materialises more than a
//! `Q_TILE x K_TILE` block of scores per task, so memory stays O(S) for any sequence length.
//!
//! Queries and keys/values are separate strided views, so a subset of query rows (one PipeFusion
//! patch) can attend a full-sequence K/V buffer, and a fused `[.., 3d]` QKV projection can be read
//! without copies.

use rayon::prelude::*;

use super::math::{exp_fast, max_lanes};
use super::matmul::{matmul_strided, MatRef};
use super::vector_math::exp_sub_sum;

const Q_TILE: usize = 64;
const K_TILE: usize = 256;

/// A `[batch, seq, heads, head_dim]` view into a larger buffer: element `(b, s, h, j)` lives at
/// `data[b * batch_stride + s * row_stride + col_offset + h * head_dim + j]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnInput<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Sequence length of this view.
    pub seq: usize,
    /// Elements between batches.
    pub batch_stride: usize,
    /// Elements between consecutive tokens.
    pub row_stride: usize,
    /// Offset of head 0 within a token row.
    pub col_offset: usize,
}

impl AttnInput<'_> {
    /// The largest index the view touches plus one (`None` on overflow), for bounds checks.
    pub(crate) fn extent(&self, batch: usize, width: usize) -> Option<usize> {
        if batch == 0 || self.seq == 0 {
            return Some(0);
        }
        (batch - 1)
            .checked_mul(self.batch_stride)?
            .checked_add((self.seq - 1).checked_mul(self.row_stride)?)?
            .checked_add(self.col_offset)?
            .checked_add(width)
    }
    pub(crate) fn at(&self, b: usize, s: usize, col: usize) -> usize {
        b * self.batch_stride + s * self.row_stride + self.col_offset + col
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
}

/// `out[b, i, h*dh..] = softmax(q_i · K^T * scale + bias[b]) · V` for every batch, head and query.
/// `key_bias` (`[batch, seq_k]`) is added to every query's scores; `-inf` removes a key. A query
/// whose keys are all removed gets zeros. `out` is `[batch, seq_q, heads * head_dim]`. With `lse`
/// (`[batch, seq_q, heads]`), also writes each row's log-sum-exp of the scaled scores (`-inf` when
/// every key is removed): what [`merge_partial`] needs to combine attention over key blocks.
pub(crate) fn attention(
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
    let q_tiles = sq.div_ceil(Q_TILE);
    let scale = 1.0 / (dh as f32).sqrt();
    // One task per (batch, head, query tile); each writes a disjoint block of `out`.
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| SendPtr(l.as_mut_ptr()));
    (0..batch * heads * q_tiles)
        .into_par_iter()
        .for_each(|task| {
            let (bh, qt) = (task / q_tiles, task % q_tiles);
            let (b, h) = (bh / heads, bh % heads);
            let q0 = qt * Q_TILE;
            let rows = Q_TILE.min(sq - q0);
            let bias = key_bias.map(|kb| &kb[b * sk..(b + 1) * sk]);
            let mut acc = vec![0f32; rows * dh];
            let mut scores = vec![0f32; rows * K_TILE];
            let mut row_max = vec![f32::NEG_INFINITY; rows];
            let mut row_sum = vec![0f32; rows];
            for k0 in (0..sk).step_by(K_TILE) {
                let cols = K_TILE.min(sk - k0);
                let lhs = MatRef {
                    ptr: q.data[q.at(b, q0, h * dh)..].as_ptr(),
                    rs: q.row_stride as isize,
                    cs: 1,
                };
                // rhs[j][c] = K[k0 + c][j]
                let rhs = MatRef {
                    ptr: k.data[k.at(b, k0, h * dh)..].as_ptr(),
                    rs: 1,
                    cs: k.row_stride as isize,
                };
                // SAFETY: q rows q0..q0+rows and k rows k0..k0+cols exist (checked by the caller via
                // `extent`); `scores` holds rows x K_TILE.
                unsafe {
                    matmul_strided(
                        scores.as_mut_ptr(),
                        K_TILE as isize,
                        rows,
                        cols,
                        dh,
                        lhs,
                        rhs,
                        false,
                    )
                };
                for r in 0..rows {
                    let s = &mut scores[r * K_TILE..r * K_TILE + cols];
                    match bias {
                        Some(bb) => s
                            .iter_mut()
                            .zip(&bb[k0..k0 + cols])
                            .for_each(|(x, b)| *x = *x * scale + b),
                        None => s.iter_mut().for_each(|x| *x *= scale),
                    }
                    let new_max = row_max[r].max(max_lanes(s));
                    if new_max == f32::NEG_INFINITY {
                        s.iter_mut().for_each(|x| *x = 0.0);
                        continue;
                    }
                    let tile_sum = exp_sub_sum(s, new_max);
                    let correction = exp_fast(row_max[r] - new_max);
                    row_sum[r] = row_sum[r] * correction + tile_sum;
                    row_max[r] = new_max;
                    if correction != 1.0 {
                        acc[r * dh..(r + 1) * dh]
                            .iter_mut()
                            .for_each(|a| *a *= correction);
                    }
                }
                let p = MatRef {
                    ptr: scores.as_ptr(),
                    rs: K_TILE as isize,
                    cs: 1,
                };
                let vv = MatRef {
                    ptr: v.data[v.at(b, k0, h * dh)..].as_ptr(),
                    rs: v.row_stride as isize,
                    cs: 1,
                };
                // SAFETY: as above for v; `acc` holds rows x dh.
                unsafe {
                    matmul_strided(acc.as_mut_ptr(), dh as isize, rows, dh, cols, p, vv, true)
                };
            }
            for r in 0..rows {
                let inv = if row_sum[r] > 0.0 {
                    1.0 / row_sum[r]
                } else {
                    0.0
                };
                if let Some(l) = lse_ptr {
                    let v = log_sum_exp(row_max[r], row_sum[r]);
                    // SAFETY: one task per (b, query row, head), as for `out`.
                    unsafe { *l.get().add((b * sq + q0 + r) * heads + h) = v };
                }
                let dst = ((b * sq + q0 + r) * width + h * dh) as isize;
                for j in 0..dh {
                    // SAFETY: each (b, query row, head) block is written by exactly one task.
                    unsafe { *out_ptr.get().offset(dst + j as isize) = acc[r * dh + j] * inv };
                }
            }
        });
}

/// Which path runs f32 attention on this CPU, for benchmark headers.
pub fn f32_attention_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if super::fma_attention::chosen() {
        return "fused AVX2/FMA";
    }
    "tiled on the gemm crate"
}

/// The first step of a row's softmax, shared by the paths that hold a whole row of scores:
/// with a key bias, `scores = scores * scale + bias` in place and the row scale is 1; without
/// one the scale goes into the exponent (the max of the scaled scores is the scaled max, the
/// scale being positive), saving a pass over the row. Returns `(row_scale, m)`: `e^(x * row_scale - m)` are the
/// row's unnormalised probabilities; `m` is `-inf` when every key is removed.
pub(crate) fn scale_row(scores: &mut [f32], bias: Option<&[f32]>, scale: f32) -> (f32, f32) {
    let row_scale = match bias {
        Some(bb) => {
            scores
                .iter_mut()
                .zip(bb)
                .for_each(|(x, b)| *x = *x * scale + b);
            1.0
        }
        None => scale,
    };
    (row_scale, max_lanes(scores) * row_scale)
}

/// Runs `head(scratch, bias, bh)` for every (batch, head) `bh` in parallel, with this thread's
/// `scratch` (taken from the thread-local `cell` and put back, so buffers are kept across tasks
/// and calls) and the batch's row of `key_bias` (`[batch, seq_k]`): the driver of the fused
/// attention kernels.
pub(crate) fn for_each_head<S: Default>(
    cell: &'static std::thread::LocalKey<std::cell::Cell<S>>,
    (batch, heads, seq_k): (usize, usize, usize),
    key_bias: Option<&[f32]>,
    head: impl Fn(&mut S, Option<&[f32]>, usize) + Sync,
) {
    (0..batch * heads).into_par_iter().for_each(|bh| {
        let mut scratch = cell.take();
        let bias = key_bias.map(|kb| &kb[bh / heads * seq_k..][..seq_k]);
        head(&mut scratch, bias, bh);
        cell.set(scratch);
    });
}

/// A row's log-sum-exp from its max `m` and its sum of `e^(s - m)`: `-inf` when every key was
/// removed (sum 0), NaN when a score was NaN (so that a Ring merge of the row, whose output is
/// NaN, does not drop it as an empty block), else `m + ln(sum)`. Shared by every attention path.
pub(crate) fn log_sum_exp(m: f32, sum: f32) -> f32 {
    if sum > 0.0 {
        m + sum.ln()
    } else if sum.is_nan() {
        f32::NAN
    } else {
        f32::NEG_INFINITY
    }
}

/// An output pointer shared by attention tasks that write disjoint rows x heads of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint regions (see `attention`, `attention_bf16::attention_bf16` and
// `f32_gemm::linear_packed`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Merges the attention of the same queries over another block of keys into an accumulator
/// (the Ring attention step, ALGORITHMS.md section 4): with `l = ln(e^lse_acc + e^lse_part)`,
/// `acc = e^(lse_acc - l) acc + e^(lse_part - l) part` and `lse_acc = l`, per (row, head).
/// `acc`/`part` are `[rows, heads * head_dim]`, `lse_*` `[rows, heads]`; a block whose keys were
/// all masked (`-inf`) leaves the accumulator as it is; a NaN log-sum-exp (a NaN score) makes
/// the row NaN, also into an empty accumulator.
pub(crate) fn merge_partial(
    acc: &mut [f32],
    lse_acc: &mut [f32],
    part: &[f32],
    lse_part: &[f32],
    head_dim: usize,
) {
    acc.par_chunks_mut(head_dim)
        .zip(lse_acc.par_iter_mut())
        .zip(part.par_chunks(head_dim).zip(lse_part.par_iter()))
        .for_each(|((a, la), (p, &lp))| {
            // `f32::max` ignores a NaN operand: keep it, so NaN stays NaN.
            let m = if lp.is_nan() { lp } else { la.max(lp) };
            if m == f32::NEG_INFINITY {
                return;
            }
            let (wa, wp) = ((*la - m).exp(), (lp - m).exp());
            let z = wa + wp;
            let (wa, wp) = (wa / z, wp / z);
            a.iter_mut().zip(p).for_each(|(x, y)| *x = wa * *x + wp * y);
            *la = m + z.ln();
        });
}

/// Reference of [`merge_partial`] in f64, for tests.
pub fn merge_partial_slow(
    acc: &[f32],
    lse_acc: &[f32],
    part: &[f32],
    lse_part: &[f32],
    head_dim: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut out = acc.to_vec();
    let mut lse = lse_acc.to_vec();
    for (i, (&la, &lp)) in lse_acc.iter().zip(lse_part).enumerate() {
        let (la, lp) = (la as f64, lp as f64);
        let m = if lp.is_nan() { lp } else { la.max(lp) };
        if m == f64::NEG_INFINITY {
            continue;
        }
        let (wa, wp) = ((la - m).exp(), (lp - m).exp());
        for j in 0..head_dim {
            let k = i * head_dim + j;
            out[k] = ((wa * acc[k] as f64 + wp * part[k] as f64) / (wa + wp)) as f32;
        }
        lse[i] = (m + (wa + wp).ln()) as f32;
    }
    (out, lse)
}

/// Reference attention: materialises the whole score matrix, f64 softmax.
pub fn attention_slow(
    q: AttnInput<'_>,
    k: AttnInput<'_>,
    v: AttnInput<'_>,
    key_bias: Option<&[f32]>,
    batch: usize,
    heads: usize,
    dh: usize,
) -> Vec<f32> {
    let (sq, sk) = (q.seq, k.seq);
    let mut out = vec![0f32; batch * sq * heads * dh];
    let scale = 1.0 / (dh as f64).sqrt();
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..sq {
                let s: Vec<f64> = (0..sk)
                    .map(|c| {
                        let dot: f64 = (0..dh)
                            .map(|j| {
                                q.data[q.at(b, i, h * dh + j)] as f64
                                    * k.data[k.at(b, c, h * dh + j)] as f64
                            })
                            .sum();
                        dot * scale + key_bias.map_or(0.0, |kb| kb[b * sk + c] as f64)
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..dh {
                    let o: f64 = (0..sk)
                        .map(|c| e[c] * v.data[v.at(b, c, h * dh + j)] as f64)
                        .sum();
                    out[(b * sq + i) * heads * dh + h * dh + j] = (o / z) as f32;
                }
            }
        }
    }
    out
}
