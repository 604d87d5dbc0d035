//! Data movement: patchify / unpatchify of latents and the gated residual add.

use rayon::prelude::*;

/// Geometry of a latent `[batch, channels, height, width]` cut into `p x p` patches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PatchGeom {
    pub(crate) batch: usize,
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) patch: usize,
}

/// Gathers the patches of token rows `rows` of a latent into `[batch, n, C*p*p]` vectors in
/// `(channel, ky, kx)` order (the order of a flattened conv weight `[d, C, p, p]`).
pub(crate) fn patchify(out: &mut [f32], x: &[f32], g: PatchGeom, rows: std::ops::Range<usize>) {
    let PatchGeom {
        batch,
        channels: c,
        height: hh,
        width: ww,
        patch: p,
    } = g;
    let w = ww / p;
    let n = rows.len() * w;
    let feat = c * p * p;
    out.par_chunks_mut(feat).enumerate().for_each(|(i, dst)| {
        let (b, t) = (i / n, i % n);
        let (r, col) = (rows.start + t / w, t % w);
        let _ = batch;
        for ch in 0..c {
            for ky in 0..p {
                let src = ((b * c + ch) * hh + r * p + ky) * ww + col * p;
                dst[(ch * p + ky) * p..(ch * p + ky + 1) * p].copy_from_slice(&x[src..src + p]);
            }
        }
    });
}

/// Scatters final tokens `[batch, n, p*p*C]` (channel index `(py*p + px)*C + c`) of `rows` token
/// rows back to a latent strip `[batch, C, rows*p, width]`.
pub(crate) fn unpatchify(out: &mut [f32], tok: &[f32], g: PatchGeom, token_rows: usize) {
    let PatchGeom {
        batch,
        channels: c,
        width: ww,
        patch: p,
        ..
    } = g;
    let w = ww / p;
    let hh = token_rows * p;
    let feat = p * p * c;
    for b in 0..batch {
        for r in 0..token_rows {
            for col in 0..w {
                let t = &tok[((b * token_rows + r) * w + col) * feat..][..feat];
                for py in 0..p {
                    for px in 0..p {
                        for ch in 0..c {
                            out[((b * c + ch) * hh + r * p + py) * ww + col * p + px] =
                                t[(py * p + px) * c + ch];
                        }
                    }
                }
            }
        }
    }
}

/// `x[b, t, :] += gate[b, :] * y[b, t, :]` (`gate` absent: plain add) for `x, y: [B, n, d]`.
pub(crate) fn add_gated(x: &mut [f32], y: &[f32], gate: Option<&[f32]>, batch: usize, d: usize) {
    let per_batch = x.len() / batch.max(1);
    x.par_chunks_mut(d)
        .zip(y.par_chunks(d))
        .enumerate()
        .for_each(|(row, (xr, yr))| match gate {
            Some(g) => {
                let b = row * d / per_batch;
                let g = &g[b * d..(b + 1) * d];
                xr.iter_mut()
                    .zip(yr)
                    .zip(g)
                    .for_each(|((x, y), g)| *x += g * y);
            }
            None => xr.iter_mut().zip(yr).for_each(|(x, y)| *x += y),
        });
}
