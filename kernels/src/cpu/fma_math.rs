//! The softmax's exponent loop with AVX2 and FMA, for CPUs without AVX-512 (AMD Zen 3, older
//! Intel): the scalar loop in [`super::vector_math::exp_scaled_sub_sum`] keeps its running sum
//! in order, so LLVM leaves it scalar (one `exp` after another, ~1.8 ns each on Zen 3). Here two
//! 8-lane vectors are in flight per step with their own partial sums. Same range reduction and
//! polynomial as [`super::math::exp_fast`] (a few ulp apart: the FMAs round once where the
//! scalar code may round twice).

use std::arch::x86_64::*;

/// Whether the CPU has AVX2 and FMA (what this module and [`super::fma_attention`] need).
pub(crate) fn available() -> bool {
    // std caches the detection: a relaxed load per call.
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `e^x` per lane: [`super::math::exp_fast`]'s range reduction and polynomial, 0 below -87.3
/// (and for -inf); NaN stays NaN.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp(x: __m256) -> __m256 {
    // `vmaxps` / `vminps` return their second operand when either is NaN: x goes second so
    // a NaN input stays NaN through the clamp (as `f32::clamp` in exp_fast).
    let xc = _mm256_min_ps(
        _mm256_set1_ps(88.3),
        _mm256_max_ps(_mm256_set1_ps(-87.3), x),
    );
    let t = _mm256_fmadd_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    );
    let n = _mm256_floor_ps(t);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_2e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n from n's bits, as exp_fast: n + 127 + 2^23 holds n + 127 in its low mantissa bits
    // (n is in [-126, 127] after the clamp; NaN lanes give some scale, y is NaN anyway).
    let biased = _mm256_and_si256(
        _mm256_castps_si256(_mm256_add_ps(n, _mm256_set1_ps(127.0 + 8_388_608.0))),
        _mm256_set1_epi32(0x7f_ffff),
    );
    let y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)));
    // Below the range (and -inf): exactly 0, as exp_fast; NaN compares false and stays.
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
    _mm256_andnot_ps(below, y)
}

/// `x[i] = e^(x[i] * scale - m)` in place; returns the sum of the new values. `-inf` gives 0.
///
/// # Safety
/// The CPU has AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_scaled_sub_sum(x: &mut [f32], scale: f32, m: f32) -> f32 {
    let (mv, sv) = (_mm256_set1_ps(m), _mm256_set1_ps(scale));
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let p = x.as_mut_ptr();
    let whole = x.len() / 16 * 16;
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 16 <= x.len().
        unsafe {
            let a = exp(_mm256_fmsub_ps(_mm256_loadu_ps(p.add(i)), sv, mv));
            let b = exp(_mm256_fmsub_ps(_mm256_loadu_ps(p.add(i + 8)), sv, mv));
            _mm256_storeu_ps(p.add(i), a);
            _mm256_storeu_ps(p.add(i + 8), b);
            s0 = _mm256_add_ps(s0, a);
            s1 = _mm256_add_ps(s1, b);
        }
        i += 16;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 floats into an 8-float array.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1)) };
    let mut sum: f32 = lanes.iter().sum();
    for v in &mut x[whole..] {
        // The tail one lane at a time through the same vector code (at most 15 elements).
        let e = exp(_mm256_set1_ps(v.mul_add(scale, -m)));
        *v = _mm256_cvtss_f32(e);
        sum += *v;
    }
    sum
}

#[cfg(test)]
mod tests {
    use std::arch::x86_64::*;

    use super::{available, exp, exp_scaled_sub_sum};
    use crate::cpu::math::exp_fast;

    fn exp_one(v: f32) -> f32 {
        #[target_feature(enable = "avx2,fma")]
        fn lane(v: f32) -> f32 {
            _mm256_cvtss_f32(exp(_mm256_set1_ps(v)))
        }
        // SAFETY: the tests call this only where `available()` holds.
        unsafe { lane(v) }
    }

    #[test]
    fn fma_exp_matches_exp_fast() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU: nothing to compare");
            return;
        }
        let mut x: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.0461).collect();
        x.extend([
            -87.3,
            -87.29,
            -87.31,
            88.3,
            88.4,
            1e30,
            -1e30,
            0.0,
            -0.0,
            f32::INFINITY,
        ]);
        x.push(f32::NEG_INFINITY);
        for &v in &x {
            let (g, w) = (exp_one(v), exp_fast(v));
            assert!(
                g == w || (g - w).abs() <= 4e-7 * g.abs().max(w.abs()),
                "exp({v}): {g} vs exp_fast {w}"
            );
        }
        assert!(exp_one(f32::NAN).is_nan(), "NaN must stay NaN");
        assert_eq!(exp_one(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn fma_exp_scaled_sub_sum_every_tail() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU: nothing to compare");
            return;
        }
        for len in [0, 1, 7, 8, 15, 16, 17, 31, 33, 100] {
            let x: Vec<f32> = (0..len)
                .map(|i| match i % 5 {
                    0 => f32::NEG_INFINITY,
                    1 => -40.0,
                    _ => (i as f32 * 0.37).sin() * 9.0,
                })
                .collect();
            let (scale, m) = (0.3, 1.25);
            let mut got = x.clone();
            // SAFETY: checked above.
            let sum = unsafe { exp_scaled_sub_sum(&mut got, scale, m) };
            let mut want_sum = 0f64;
            for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                let w = (v as f64 * scale as f64 - m as f64).exp();
                want_sum += w;
                assert!(
                    (g as f64 - w).abs() <= 1e-6 * w.max(1e-30),
                    "len {len} [{i}]: {g} vs {w}"
                );
            }
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1e-30),
                "len {len}: sum {sum} vs {want_sum}"
            );
        }
    }
}
