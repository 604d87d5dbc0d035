//! Scalar math written so that LLVM vectorises loops over it (no libm calls, no branches that
//! block vectorisation): `exp` by range reduction plus a Cephes polynomial, and GELU / SiLU on top.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` with about 2 ulp error over the f32 range; returns 0 below -87.3 (and for -inf) and
/// saturates at `e^88.3` above. Vectorisable.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.3);
    // n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2]
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits: n + 127 + 2^23 is an integer in [2^23, 2^24) (n is in [-126, 127]
    // after the clamp), so its low 23 mantissa bits are n + 127, the biased exponent. No
    // float -> int conversion: a saturating `as i32` made LLVM convert lane by lane.
    let biased = (n + (127.0 + 8_388_608.0)).to_bits() & 0x7f_ffff;
    let scale = f32::from_bits(biased << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// `gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as `x * sigmoid(2u)`,
/// which is the same function.
#[inline(always)]
pub fn gelu_tanh_scalar(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = K * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_fast(-2.0 * u))
}

/// `silu(x) = x * sigmoid(x)`.
#[inline(always)]
pub(crate) fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

const LANES: usize = 16;

/// Sum with 16 independent accumulators, so LLVM can vectorise it (a plain `iter().sum()` is a
/// strict serial chain of additions).
#[inline]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `sum((x - mean)^2)` with 16 independent accumulators (vectorisable, like [`sum_lanes`]; the
/// same value as [`sum_lanes`] over the stored squares).
#[inline]
pub(crate) fn sum_sq_dev_lanes(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += (c[i] - mean) * (c[i] - mean);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()
}

/// Dot product with 16 independent accumulators (vectorisable, like [`sum_lanes`]).
#[inline]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum with 16 independent lanes (vectorisable); `-inf` for an empty slice.
#[inline]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    rest.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}
