//! LayerNorm without affine parameters, with and without adaLN modulation, and with affine
//! parameters; GroupNorm over `[B, C, spatial]`. LayerNorm row statistics are f32 sums (rows are
//! short: d <= a few thousand); GroupNorm groups are long, so their block sums combine in f64; the
//! references accumulate in f64.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::math::{sum_lanes, sum_sq_dev_lanes};

/// A row's mean and `1 / sqrt(var + eps)` (biased variance).
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum_lanes(x) / d;
    (mean, 1.0 / (sum_sq_dev_lanes(x, mean) / d + eps).sqrt())
}

/// `y = LN(x) * (1 + scale[b]) + shift[b]` for `x: [B, n, d]`, `shift, scale: [B, d]`; every
/// element of `y` is written (it may start uninitialised: no zeroing pass before).
pub(crate) fn layer_norm_modulate(
    y: &mut [MaybeUninit<f32>],
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
            let (mean, inv) = row_stats(xr, eps);
            let (sh, sc) = (&shift[b * d..(b + 1) * d], &scale[b * d..(b + 1) * d]);
            for (((o, v), s), c) in yr.iter_mut().zip(xr).zip(sh).zip(sc) {
                o.write((v - mean) * inv * (1.0 + c) + s);
            }
        });
}

/// `y = LN(x) * gamma + beta` (affine LayerNorm; `gamma`, `beta` optional) over rows of length
/// `d`; every element of `y` is written.
pub(crate) fn layer_norm(
    y: &mut [MaybeUninit<f32>],
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    d: usize,
    eps: f32,
) {
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let (mean, inv) = row_stats(xr, eps);
            for (j, (o, v)) in yr.iter_mut().zip(xr).enumerate() {
                let mut n = (v - mean) * inv;
                if let Some(g) = gamma {
                    n *= g[j];
                }
                if let Some(b) = beta {
                    n += b[j];
                }
                o.write(n);
            }
        });
}

/// RMSNorm, in place, of every `weight.len()`-wide group of columns `offset..offset + cols` of
/// each row (`width` values) of `x`: `v * weight / sqrt(mean(v^2) + eps)`. The per-head query and
/// key norm of MMDiT models, applied to a fused QKV tensor.
pub(crate) fn rms_norm_groups_(
    x: &mut [f32],
    width: usize,
    offset: usize,
    cols: usize,
    weight: &[f32],
    eps: f32,
) {
    let g = weight.len();
    x.par_chunks_mut(width).for_each(|row| {
        for grp in row[offset..offset + cols].chunks_mut(g) {
            let ss: f32 = grp.iter().map(|v| v * v).sum();
            let inv = 1.0 / (ss / g as f32 + eps).sqrt();
            grp.iter_mut()
                .zip(weight)
                .for_each(|(v, w)| *v = *v * inv * w);
        }
    });
}

/// Reference [`rms_norm_groups_`] in f64 (returns a copy).
pub fn rms_norm_groups_slow(
    x: &[f32],
    width: usize,
    offset: usize,
    cols: usize,
    weight: &[f32],
    eps: f32,
) -> Vec<f32> {
    let g = weight.len();
    let mut y = x.to_vec();
    for row in y.chunks_mut(width) {
        for grp in row[offset..offset + cols].chunks_mut(g) {
            let ms = grp.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / g as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for (v, w) in grp.iter_mut().zip(weight) {
                *v = (*v as f64 * inv * *w as f64) as f32;
            }
        }
    }
    y
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

/// Sum of a long slice: 16-lane f32 sums over blocks of 4096, combined in f64 (a group of a
/// 256x256 image has ~10^5-10^6 elements, too many for one f32 accumulator per lane).
fn sum_long(x: &[f32]) -> f64 {
    x.chunks(4096).map(|c| sum_lanes(c) as f64).sum()
}

/// GroupNorm of `x: [B, C, spatial]` with `groups` groups of `C / groups` channels: each group is
/// normalised over its `C/groups * spatial` elements (biased variance, two passes), then channel
/// `ch` is scaled by `gamma[ch]` and shifted by `beta[ch]`. One task per (image, group).
pub(crate) fn group_norm(
    y: &mut [f32],
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    channels: usize,
    groups: usize,
    spatial: usize,
    eps: f32,
) {
    let per_group = channels / groups;
    let len = per_group * spatial;
    y.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .for_each(|(i, (yg, xg))| {
            let g = i % groups;
            let mean = (sum_long(xg) / len as f64) as f32;
            for (o, v) in yg.iter_mut().zip(xg) {
                *o = (v - mean) * (v - mean);
            }
            let var = (sum_long(yg) / len as f64) as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (ci, (yc, xc)) in yg.chunks_mut(spatial).zip(xg.chunks(spatial)).enumerate() {
                let ch = g * per_group + ci;
                let a = inv * gamma.map_or(1.0, |t| t[ch]);
                let b = beta.map_or(0.0, |t| t[ch]) - mean * a;
                yc.iter_mut().zip(xc).for_each(|(o, v)| *o = v * a + b);
            }
        });
}

/// Reference GroupNorm of `x: [B, C, spatial]` in f64, two passes.
pub fn group_norm_slow(
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    channels: usize,
    groups: usize,
    spatial: usize,
    eps: f32,
) -> Vec<f32> {
    let len = channels / groups * spatial;
    let mut y = vec![0f32; x.len()];
    for (i, (yg, xg)) in y.chunks_mut(len).zip(x.chunks(len)).enumerate() {
        let mean = xg.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let var = xg.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (j, (o, &v)) in yg.iter_mut().zip(xg).enumerate() {
            let ch = (i % groups) * (channels / groups) + j / spatial;
            let (g, b) = (
                gamma.map_or(1.0, |t| t[ch] as f64),
                beta.map_or(0.0, |t| t[ch] as f64),
            );
            *o = ((v as f64 - mean) * inv * g + b) as f32;
        }
    }
    y
}
