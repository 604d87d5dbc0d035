//! LayerNorm without affine parameters, with and without adaLN modulation, and with affine
//! parameters. Row statistics are f32 sums (rows are short: d <= a few thousand); the references
//! accumulate in f64.

use rayon::prelude::*;

use super::math::sum_lanes;

/// Normalises one row into `out`: `(x - mean) / sqrt(var + eps)`, biased variance.
#[inline]
fn normalize_row(x: &[f32], eps: f32, out: &mut [f32]) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum_lanes(x) / d;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - mean) * (v - mean);
    }
    let inv = 1.0 / (sum_lanes(out) / d + eps).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - mean) * inv;
    }
    (mean, inv)
}

/// `y = LN(x) * (1 + scale[b]) + shift[b]` for `x: [B, n, d]`, `shift, scale: [B, d]`.
pub(crate) fn layer_norm_modulate(
    y: &mut [f32],
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    batch: usize,
    d: usize,
    eps: f32,
) {
    let per_batch = x.len() / batch.max(1);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let b = row * d / per_batch;
            normalize_row(xr, eps, yr);
            let (sh, sc) = (&shift[b * d..(b + 1) * d], &scale[b * d..(b + 1) * d]);
            for ((o, s), c) in yr.iter_mut().zip(sh).zip(sc) {
                *o = *o * (1.0 + c) + s;
            }
        });
}

/// `y = LN(x) * gamma + beta` (affine LayerNorm; `gamma`, `beta` optional) over rows of length `d`.
pub(crate) fn layer_norm(
    y: &mut [f32],
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    d: usize,
    eps: f32,
) {
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            normalize_row(xr, eps, yr);
            if let Some(g) = gamma {
                yr.iter_mut().zip(g).for_each(|(o, g)| *o *= g);
            }
            if let Some(b) = beta {
                yr.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        });
}

/// Reference LayerNorm (no affine) in f64, two passes.
pub fn layer_norm_slow(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|r| {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            r.iter()
                .map(move |&v| ((v as f64 - mean) * inv) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reference of [`layer_norm_modulate`].
pub fn layer_norm_modulate_slow(
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    batch: usize,
    d: usize,
    eps: f32,
) -> Vec<f32> {
    let n = x.len() / (batch * d);
    let mut y = layer_norm_slow(x, d, eps);
    for b in 0..batch {
        for t in 0..n {
            for j in 0..d {
                let i = (b * n + t) * d + j;
                y[i] = y[i] * (1.0 + scale[b * d + j]) + shift[b * d + j];
            }
        }
    }
    y
}
