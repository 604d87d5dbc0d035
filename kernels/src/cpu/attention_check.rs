//! The test that every fused attention kernel passes (the AVX2/FMA f32 one and the
//! AVX512-BF16 one), run on the kernel directly so that a host whose dispatch picks another
//! path tests it too.

use super::attention::{attention, attention_slow, AttnDims, AttnInput};

/// A kernel with [`super::attention::attention`]'s signature.
pub(super) type Kernel = fn(
    &mut [f32],
    Option<&mut [f32]>,
    AttnInput<'_>,
    AttnInput<'_>,
    AttnInput<'_>,
    Option<&[f32]>,
    AttnDims,
);

/// `[b, seq, stride]` data from column `col`.
fn view(data: &[f32], seq: usize, stride: usize, col: usize) -> AttnInput<'_> {
    AttnInput {
        data,
        seq,
        batch_stride: seq * stride,
        row_stride: stride,
        col_offset: col,
    }
}

/// Q as the second half of `[b, sq, 2d]` rows whose first half is NaN (as Q sits in a fused
/// QKV buffer; a read outside the view would poison the output).
fn strided_queries(q: &[f32], (b, sq, d): (usize, usize, usize)) -> Vec<f32> {
    let mut buf = vec![f32::NAN; b * sq * 2 * d];
    for (dst, src) in buf.chunks_exact_mut(2 * d).zip(q.chunks_exact(d)) {
        dst[d..].copy_from_slice(src);
    }
    buf
}

/// Runs `kernel` on random Q, K, V for each case `(batch, seq_q, seq_k, heads, head_dim,
/// masked)` and checks:
/// - the output against the f64 reference over the inputs as `round` gives them (the kernel's
///   own input rounding): relative L2 <= `tol`;
/// - each log-sum-exp against the tiled f32 path's over the rounded inputs, within
///   `lse_tol * (1 + |lse|)`;
/// - masked cases: every third key of batch 0 removed, every key of the last batch (zeros out,
///   log-sum-exp -inf);
/// - unmasked: a NaN key gives NaN rows and NaN log-sum-exps (as the tiled path does);
/// - Q read as a strided column slice of wider rows (a fused QKV buffer);
/// - a patch of query rows (rows 3.. of every batch: a PipeFusion patch of a batched tensor)
///   gives bitwise the rows the whole sequence gave.
pub(super) fn check_fused_attention(
    kernel: Kernel,
    round: fn(&[f32]) -> Vec<f32>,
    (tol, lse_tol): (f64, f32),
    cases: &[(usize, usize, usize, usize, usize, bool)],
) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut randn = |len: usize| super::test_values(&mut seed, len, 3.0);
    for &(b, sq, sk, heads, dh, masked) in cases {
        let d = heads * dh;
        let (q, kv) = (randn(b * sq * d), randn(b * sk * 2 * d));
        let bias: Option<Vec<f32>> = masked.then(|| {
            (0..b * sk)
                .map(|i| match (i / sk, i % sk) {
                    (0, s) if s % 3 == 1 => f32::NEG_INFINITY,
                    (bb, _) if bb == b - 1 && b > 1 => f32::NEG_INFINITY,
                    _ => 0.5,
                })
                .collect()
        });
        let dims = AttnDims {
            batch: b,
            heads,
            head_dim: dh,
        };
        let (k, v) = (view(&kv, sk, 2 * d, 0), view(&kv, sk, 2 * d, d));
        let run = |q: AttnInput<'_>| {
            let mut out = vec![f32::NAN; b * q.seq * d];
            let mut lse = vec![f32::NAN; b * q.seq * heads];
            kernel(&mut out, Some(&mut lse), q, k, v, bias.as_deref(), dims);
            (out, lse)
        };
        let (got, lse) = run(view(&q, sq, d, 0));
        let qs = strided_queries(&q, (b, sq, d));
        let (got_strided, lse_strided) = run(view(&qs, sq, 2 * d, d));
        assert_eq!(got_strided, got, "strided Q: the same rows");
        assert_eq!(lse_strided, lse, "strided Q: the same log-sum-exps");
        let (qr, kvr) = (round(&q), round(&kv));
        let (kr, vr) = (view(&kvr, sk, 2 * d, 0), view(&kvr, sk, 2 * d, d));
        let want = attention_slow(view(&qr, sq, d, 0), kr, vr, bias.as_deref(), b, heads, dh);
        let (mut e, mut n) = (0f64, 0f64);
        for (&g, &w) in got.iter().zip(&want) {
            e += (g as f64 - w as f64).powi(2);
            n += (w as f64).powi(2);
        }
        let shape = format!("[{b}, {sq}] over [{b}, {sk}], {heads} heads of {dh}");
        assert!((e / n).sqrt() <= tol, "{shape}: rel L2 {}", (e / n).sqrt());
        let mut tiled = (vec![0f32; got.len()], vec![0f32; lse.len()]);
        let qv = view(&qr, sq, d, 0);
        attention(
            &mut tiled.0,
            Some(&mut tiled.1),
            qv,
            kr,
            vr,
            bias.as_deref(),
            dims,
        );
        for (i, (&g, &w)) in lse.iter().zip(&tiled.1).enumerate() {
            assert!(
                g == w || (g - w).abs() <= lse_tol * (1.0 + w.abs()),
                "{shape}: log-sum-exp [{i}] {g} vs the tiled path's {w}"
            );
        }
        if masked && b > 1 {
            let last = (b - 1) * sq;
            assert!(got[last * d..].iter().all(|&x| x == 0.0), "{shape}");
            assert!(lse[last * heads..].iter().all(|&l| l == f32::NEG_INFINITY));
        }
        // A NaN key poisons every row that attends it, as in the tiled path (a mask that
        // dropped NaN lanes once turned it into a zero weight).
        if !masked && sk > 1 {
            let mut bad = kv.clone();
            bad[0] = f32::NAN; // key 0, head 0, dim 0 of batch 0
            let mut out = vec![0f32; b * sq * d];
            let mut lse = vec![0f32; b * sq * heads];
            let (k, v) = (view(&bad, sk, 2 * d, 0), view(&bad, sk, 2 * d, d));
            kernel(
                &mut out,
                Some(&mut lse),
                view(&q, sq, d, 0),
                k,
                v,
                None,
                dims,
            );
            assert!((0..sq).all(|i| out[i * d..i * d + dh].iter().all(|x| x.is_nan())));
            assert!(
                (0..sq).all(|i| lse[i * heads].is_nan()),
                "{shape}: NaN log-sum-exp"
            );
        }
        // Rows 3.. of every batch: the patch's view keeps the whole sequence's batch stride.
        if sq > 3 {
            let patch = AttnInput {
                data: &qs[3 * 2 * d..],
                seq: sq - 3,
                batch_stride: sq * 2 * d,
                row_stride: 2 * d,
                col_offset: d,
            };
            let (p, pl) = run(patch);
            for bb in 0..b {
                let (rows, whole) = (&p[bb * (sq - 3) * d..][..(sq - 3) * d], bb * sq + 3);
                assert_eq!(
                    rows,
                    &got[whole * d..][..(sq - 3) * d],
                    "{shape}: patch rows"
                );
                let lses = &pl[bb * (sq - 3) * heads..][..(sq - 3) * heads];
                assert_eq!(
                    lses,
                    &lse[whole * heads..][..(sq - 3) * heads],
                    "{shape}: patch lse"
                );
            }
        }
    }
}

/// A NaN row (NaN output and log-sum-exp, what every attention path gives for a NaN score)
/// stays NaN through a Ring merge, into a finite accumulator and into an empty one (`-inf`:
/// all keys so far removed), in the fast merge and its reference.
#[test]
fn a_nan_block_is_not_merged_away() {
    use super::attention::{merge_partial, merge_partial_slow};
    let dh = 3;
    let part = vec![f32::NAN; 2 * dh];
    let lse_part = [f32::NAN, f32::NAN];
    let acc0 = vec![0.5f32; 2 * dh];
    let lse0 = [1.0, f32::NEG_INFINITY]; // row 0 finite, row 1 empty
    let (mut acc, mut lse) = (acc0.clone(), lse0);
    merge_partial(&mut acc, &mut lse, &part, &lse_part, dh);
    let (ref_acc, ref_lse) = merge_partial_slow(&acc0, &lse0, &part, &lse_part, dh);
    for (a, l) in [(&acc, &lse.to_vec()), (&ref_acc, &ref_lse)] {
        assert!(a.iter().all(|x| x.is_nan()), "{a:?}");
        assert!(l.iter().all(|x| x.is_nan()), "{l:?}");
    }
}
