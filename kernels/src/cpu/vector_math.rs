//! The element-wise hot loops of softmax and GELU written with AVX-512 intrinsics (chosen at run
//! time; the scalar [`super::math`] functions elsewhere). Auto-vectorised, the same loops ran at
//! about 0.7 ns per `exp` on Emerald Rapids: 256-bit vectors, one dependent polynomial chain at
//! a time. Here two 16-lane vectors are in flight per step, `vscalefps` applies `2^n`, and the
//! tail is a masked load / store. Same range reduction and polynomial as
//! [`super::math::exp_fast`] (a few ulp apart: the FMAs round once where the scalar code may
//! round twice).

use super::math::{exp_fast, gelu_tanh_scalar};

/// `x[i] = e^(x[i] - m)` in place; returns the sum of the new values. `-inf` gives 0.
pub(crate) fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    exp_scaled_sub_sum(x, 1.0, m)
}

/// `x[i] = e^(x[i] * scale - m)` in place (one rounding for `x * scale - m`); returns the sum
/// of the new values. `-inf` gives 0.
pub(crate) fn exp_scaled_sub_sum(x: &mut [f32], scale: f32, m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { avx512::exp_scaled_sub_sum(x, scale, m) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::fma_math::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { super::fma_math::exp_scaled_sub_sum(x, scale, m) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        // `mul_add(1, -m)` is `v - m` exactly; without FMA in the build, `mul_add` is a libm call.
        *v = exp_fast(if scale == 1.0 {
            *v - m
        } else {
            v.mul_add(scale, -m)
        });
        sum += *v;
    }
    sum
}

/// `out[i] = gelu_tanh(acc[i] + bias[i])` (no bias: `acc[i]`); the slices have one length;
/// `out` may be uninitialised.
pub(crate) fn gelu_tanh_bias(
    out: &mut [std::mem::MaybeUninit<f32>],
    acc: &[f32],
    bias: Option<&[f32]>,
) {
    assert!(acc.len() == out.len() && bias.is_none_or(|b| b.len() == out.len()));
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        let (o, b) = (out.as_mut_ptr().cast::<f32>(), bias.map(|b| b.as_ptr()));
        // SAFETY: the CPU has AVX-512F (checked); every pointer covers out.len() elements.
        return unsafe { avx512::gelu_tanh_bias_rows(o, 0, acc.as_ptr(), 0, b, 1, out.len()) };
    }
    for (i, o) in out.iter_mut().enumerate() {
        o.write(gelu_tanh_scalar(acc[i] + bias.map_or(0.0, |b| b[i])));
    }
}

/// [`gelu_tanh_bias`] over a block: row `r` of the result (`cols` values) goes to
/// `out + r * ldo`, from `acc[r * lda..][..cols]` plus `bias[..cols]`. One call per GEMM block:
/// called row by row (two vectors each), every call waited out its vectors' long dependency
/// chain; over a block, the core overlaps independent rows.
///
/// # Safety
/// `out` addresses `rows` rows of `cols` at stride `ldo` (may be uninitialised) that nothing
/// else accesses during the call; `acc` holds `rows` rows of `cols` at stride `lda`; `bias`
/// holds `cols` values.
pub(crate) unsafe fn gelu_tanh_bias_rows(
    out: *mut f32,
    ldo: usize,
    acc: &[f32],
    lda: usize,
    bias: Option<&[f32]>,
    (rows, cols): (usize, usize),
) {
    assert!(
        (rows == 0 || acc.len() >= (rows - 1) * lda + cols) && bias.is_none_or(|b| b.len() >= cols)
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        let (a, b) = (acc.as_ptr(), bias.map(|b| b.as_ptr()));
        // SAFETY: the CPU has AVX-512F (checked); the extents are the caller's contract and the
        // assertion above.
        return unsafe { avx512::gelu_tanh_bias_rows(out, ldo, a, lda, b, rows, cols) };
    }
    for r in 0..rows {
        // SAFETY: row r of out is cols values the caller lets us write.
        let o = unsafe {
            std::slice::from_raw_parts_mut(
                out.add(r * ldo).cast::<std::mem::MaybeUninit<f32>>(),
                cols,
            )
        };
        gelu_tanh_bias(o, &acc[r * lda..][..cols], bias.map(|b| &b[..cols]));
    }
}

/// `rows` x `cols` at `p` (row stride `ld`) replaced by their GELU-tanh, in one call (a GEMM's
/// finished tile: see [`gelu_tanh_bias_rows`] on why one call per block).
///
/// # Safety
/// `p` addresses `rows` rows of `cols` initialised values at stride `ld` that nothing else
/// accesses during the call.
pub(crate) unsafe fn gelu_tanh_rows_in_place(p: *mut f32, ld: usize, (rows, cols): (usize, usize)) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked); in place (each 16 lanes are loaded before
        // they are stored); extents per the caller.
        return unsafe { avx512::gelu_tanh_bias_rows(p, ld, p, ld, None, rows, cols) };
    }
    for r in 0..rows {
        // SAFETY: row r holds cols values the caller lets us rewrite.
        gelu_tanh_in_place(unsafe { std::slice::from_raw_parts_mut(p.add(r * ld), cols) });
    }
}

/// `x[i] = gelu_tanh(x[i])` in place.
pub(crate) fn gelu_tanh_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        let p = x.as_mut_ptr();
        // SAFETY: the CPU has AVX-512F (checked); in place: each lane is read before written.
        return unsafe { avx512::gelu_tanh_bias_rows(p, 0, p, 0, None, 1, x.len()) };
    }
    x.iter_mut().for_each(|v| *v = gelu_tanh_scalar(*v));
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    // std caches the detection: one relaxed load per call.
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `e^x` per lane: [`super::exp_fast`]'s range reduction and polynomial, 0 below -87.3.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let xc = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.3),
        );
        let t = _mm512_fmadd_ps(
            xc,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_2e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let y = _mm512_scalef_ps(y, n);
        // Below the range (and -inf): exactly 0, as exp_fast.
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.3));
        _mm512_maskz_mov_ps(!below, y)
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_scaled_sub_sum(x: &mut [f32], scale: f32, m: f32) -> f32 {
        let (mv, sv) = (_mm512_set1_ps(m), _mm512_set1_ps(scale));
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let p = x.as_mut_ptr();
        let whole = x.len() / 32 * 32;
        let mut i = 0;
        while i < whole {
            // SAFETY: i + 32 <= x.len().
            unsafe {
                let a = exp(_mm512_fmsub_ps(_mm512_loadu_ps(p.add(i)), sv, mv));
                let b = exp(_mm512_fmsub_ps(_mm512_loadu_ps(p.add(i + 16)), sv, mv));
                _mm512_storeu_ps(p.add(i), a);
                _mm512_storeu_ps(p.add(i + 16), b);
                s0 = _mm512_add_ps(s0, a);
                s1 = _mm512_add_ps(s1, b);
            }
            i += 32;
        }
        while i < x.len() {
            let k: __mmask16 = (((1u32 << (x.len() - i).min(16)) - 1) & 0xffff) as u16;
            // SAFETY: the mask covers only elements below x.len().
            unsafe {
                let v = _mm512_maskz_loadu_ps(k, p.add(i));
                let e = _mm512_maskz_mov_ps(k, exp(_mm512_fmsub_ps(v, sv, mv)));
                _mm512_mask_storeu_ps(p.add(i), k, e);
                s0 = _mm512_add_ps(s0, e);
            }
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    /// `x / (1 + e^(-2u))`, `u = sqrt(2/pi) (x + 0.044715 x^3)`: GELU-tanh per lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu(x: __m512) -> __m512 {
        let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        let u = _mm512_mul_ps(
            _mm512_set1_ps(0.797_884_6),
            _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044_715), x),
        );
        let e = exp(_mm512_mul_ps(u, _mm512_set1_ps(-2.0)));
        let d = _mm512_add_ps(e, _mm512_set1_ps(1.0));
        // x / d as x * (1 / d): `vdivps` issues one zmm per ~10-16 cycles (in the forward the
        // share of GELU did not move with this; its calls' granularity did, see write_block).
        // The 14-bit estimate plus one Newton step is within ~2 ulp of 1 / d for d in
        // [1, e^88.3] (e is finite: exp_fast saturates); where 1 / d is subnormal (x below
        // about -10) both steps stay exact without FTZ, only slower.
        let r = _mm512_rcp14_ps(d);
        let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)));
        _mm512_mul_ps(x, r)
    }

    /// `rows` x `cols` of `gelu_tanh(acc + bias)`: row `r` from `acc + r * lda` to
    /// `out + r * ldo` (with one row: [`super::gelu_tanh_bias`] and the in-place form).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` and `acc` address `rows` rows of `cols` at their strides,
    /// `bias` (when given) `cols` values; `out` may be `acc` (each 16 lanes are loaded before
    /// they are stored).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_tanh_bias_rows(
        out: *mut f32,
        ldo: usize,
        acc: *const f32,
        lda: usize,
        bias: Option<*const f32>,
        rows: usize,
        cols: usize,
    ) {
        let mut i = 0;
        while i < cols {
            let k: __mmask16 = (((1u32 << (cols - i).min(16)) - 1) & 0xffff) as u16;
            // SAFETY: the mask covers only columns below cols; rows and strides per the caller.
            unsafe {
                let b = bias.map(|b| _mm512_maskz_loadu_ps(k, b.add(i)));
                for r in 0..rows {
                    let mut v = _mm512_maskz_loadu_ps(k, acc.add(r * lda + i));
                    if let Some(b) = b {
                        v = _mm512_add_ps(v, b);
                    }
                    _mm512_mask_storeu_ps(out.add(r * ldo + i), k, gelu(v));
                }
            }
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        exp_scaled_sub_sum, exp_sub_sum, gelu_tanh_bias, gelu_tanh_bias_rows, gelu_tanh_in_place,
    };
    use crate::cpu::math::{exp_fast, gelu_tanh_scalar};

    fn close(a: f32, b: f32, tol: f32) -> bool {
        a == b || (a - b).abs() <= tol * a.abs().max(b.abs()).max(f32::MIN_POSITIVE)
    }

    /// Every length's tail, the clamp's edges, -inf (masked keys), against the scalar code.
    #[test]
    fn exp_sub_sum_equals_exp_fast_elementwise() {
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 100, 257] {
            let x: Vec<f32> = (0..len)
                .map(|i| match i % 7 {
                    0 => f32::NEG_INFINITY,
                    1 => -100.0,
                    2 => 95.0,
                    _ => (i as f32 * 0.37).sin() * 20.0,
                })
                .collect();
            let m = 3.5;
            let mut got = x.clone();
            let sum = exp_sub_sum(&mut got, m);
            let want: Vec<f32> = x.iter().map(|&v| exp_fast(v - m)).collect();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(close(g, w, 4e-7), "len {len} [{i}] x {}: {g} vs {w}", x[i]);
            }
            let want_sum: f64 = want.iter().map(|&v| v as f64).sum();
            assert!(
                close(sum, want_sum as f32, 1e-5),
                "len {len}: sum {sum} vs {want_sum}"
            );
            // Scaled: e^(x * 0.125 - m), against the scalar with the same fused rounding.
            let mut got = x.clone();
            let sum = exp_scaled_sub_sum(&mut got, 0.125, m);
            let want: Vec<f32> = x.iter().map(|&v| exp_fast(v.mul_add(0.125, -m))).collect();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    close(g, w, 4e-7),
                    "scaled, len {len} [{i}] x {}: {g} vs {w}",
                    x[i]
                );
            }
            let want_sum: f64 = want.iter().map(|&v| v as f64).sum();
            assert!(
                close(sum, want_sum as f32, 1e-5),
                "scaled, len {len}: sum {sum}"
            );
        }
    }

    #[test]
    fn gelu_tanh_bias_equals_the_scalar_gelu() {
        for len in [0, 1, 16, 31, 32, 77] {
            let acc: Vec<f32> = (0..len).map(|i| (i as f32 * 0.61).cos() * 6.0).collect();
            let bias: Vec<f32> = (0..len).map(|i| i as f32 * 0.01 - 0.3).collect();
            for b in [None, Some(&bias[..])] {
                let mut got = vec![f32::NAN; len];
                gelu_tanh_bias(crate::cpu::aligned::as_uninit(&mut got), &acc, b);
                if b.is_none() {
                    let mut in_place = acc.clone();
                    gelu_tanh_in_place(&mut in_place);
                    assert_eq!(in_place, got, "len {len}: in place");
                }
                for i in 0..len {
                    let want = gelu_tanh_scalar(acc[i] + b.map_or(0.0, |b| b[i]));
                    assert!(
                        close(got[i], want, 4e-6),
                        "len {len} [{i}]: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }

    /// The block form gives bitwise what the row form gives, into strided rows, touching
    /// nothing past each row's columns.
    #[test]
    fn gelu_tanh_bias_rows_equals_the_row_form() {
        let (rows, cols, lda, ldo) = (5, 21, 32, 40);
        let acc: Vec<f32> = (0..rows * lda)
            .map(|i| (i as f32 * 0.37).sin() * 5.0)
            .collect();
        let bias: Vec<f32> = (0..cols).map(|j| j as f32 * 0.1 - 1.0).collect();
        for b in [None, Some(&bias[..])] {
            let mut out = vec![f32::NAN; rows * ldo];
            // SAFETY: out holds rows x ldo >= cols; acc rows x lda; bias cols.
            unsafe { gelu_tanh_bias_rows(out.as_mut_ptr(), ldo, &acc, lda, b, (rows, cols)) };
            for r in 0..rows {
                let mut want = vec![0f32; cols];
                gelu_tanh_bias(
                    crate::cpu::aligned::as_uninit(&mut want),
                    &acc[r * lda..][..cols],
                    b,
                );
                assert_eq!(&out[r * ldo..][..cols], &want[..], "row {r}");
                assert!(out[r * ldo + cols..(r + 1) * ldo]
                    .iter()
                    .all(|v| v.is_nan()));
            }
        }
    }

    /// The reciprocal's edges: large negative inputs (1 / d subnormal), infinities and NaN
    /// give what the scalar's division gives. In the far negative tail the two round the
    /// exponent's argument differently (e^-2u with |2u| ~ 87 amplifies an ulp of u to ~1e-5
    /// relative), hence 2e-5 there.
    #[test]
    fn gelu_tanh_keeps_the_edges_of_the_division() {
        let x = [
            -9.9f32,
            -10.5,
            -20.0,
            -1e6,
            f32::NEG_INFINITY,
            f32::INFINITY,
            1e6,
            0.0,
        ];
        let mut got = x.to_vec();
        gelu_tanh_in_place(&mut got);
        for (&v, &g) in x.iter().zip(&got) {
            let want = gelu_tanh_scalar(v);
            assert!(close(g, want, 2e-5), "gelu({v}): {g} vs {want}");
        }
        let mut nan = [f32::NAN];
        gelu_tanh_in_place(&mut nan);
        assert!(nan[0].is_nan());
    }
}
