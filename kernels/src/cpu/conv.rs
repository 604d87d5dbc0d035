//! Image-shaped ops of the VAE decoder: the stride-1 2-D convolution (im2col plus the GEMM),
//! nearest-neighbour 2x upsampling and the batched transpose of the last two dimensions, each
//! beside its slow reference.
//!
//! The convolution works on bands of output rows: a band's im2col matrix `[C*kh*kw, rows*W']` is
//! at most [`COLS_BUDGET`] elements (never the whole image's, which for a 256x256 SD-VAE stage
//! would be hundreds of MB), and one GEMM per band, `w [O, C*kh*kw] · cols`, writes straight into
//! the band's columns of the `[O, H'*W']` output plane.
//! A 1x1 convolution without padding needs no im2col: the GEMM reads the input in place.

use gemm::Parallelism;
use rayon::prelude::*;

use super::matmul::{matmul_strided_par, MatRef};

/// Largest im2col buffer, in elements (16 MiB of f32).
const COLS_BUDGET: usize = 1 << 22;

/// Shapes of a stride-1 convolution of `x: [batch, c_in, h, w]` with `w: [c_out, c_in, kh, kw]`
/// and `pad` zeros on every side; the output is `[batch, c_out, h_out, w_out]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Images.
    pub batch: usize,
    /// Input channels C.
    pub c_in: usize,
    /// Input height H.
    pub h: usize,
    /// Input width W.
    pub w: usize,
    /// Output channels O.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl ConvGeom {
    /// Output height `H + 2 pad - kh + 1` (the caller checks `H + 2 pad >= kh`).
    pub fn h_out(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.kh
    }
    /// Output width `W + 2 pad - kw + 1`.
    pub fn w_out(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.kw
    }
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// Fills `cols: [C*kh*kw, rows*W']`, the patch matrix of output rows `r0..r0+rows` of one image
/// `xb: [C, H, W]`: row `(c, ky, kx)`, column `(r, ox)` holds `x[c, r0+r+ky-pad, ox+kx-pad]`, or
/// 0 in the padding. Every element is written (the buffer is reused across bands); parallel over
/// the rows of `cols`.
fn im2col(cols: &mut [f32], xb: &[f32], g: ConvGeom, r0: usize, rows: usize) {
    let wo = g.w_out();
    let n = rows * wo;
    cols[..g.k() * n]
        .par_chunks_mut(n)
        .with_min_len(8)
        .enumerate()
        .for_each(|(kk, dst)| {
            let (c, ky, kx) = (kk / (g.kh * g.kw), kk / g.kw % g.kh, kk % g.kw);
            // Output columns whose input column ox + kx - pad lies inside the image.
            let ox0 = g.pad.saturating_sub(kx).min(wo);
            let ox1 = wo.min((g.w + g.pad).saturating_sub(kx)).max(ox0);
            for (r, seg) in dst.chunks_exact_mut(wo).enumerate() {
                match (r0 + r + ky).checked_sub(g.pad).filter(|&iy| iy < g.h) {
                    Some(iy) if ox0 < ox1 => {
                        seg[..ox0].fill(0.0);
                        let src = &xb[(c * g.h + iy) * g.w + ox0 + kx - g.pad..][..ox1 - ox0];
                        seg[ox0..ox1].copy_from_slice(src);
                        seg[ox1..].fill(0.0);
                    }
                    _ => seg.fill(0.0),
                }
            }
        });
}

/// `y = conv2d(x, w) + b` (stride 1, zero padding `g.pad`); `y: [B, O, H', W']` is overwritten.
///
/// Image by image, band of output rows by band: the band's im2col matrix is built in parallel,
/// then one GEMM `w [O, C*kh*kw] · cols` (the gemm crate's own parallelism, which splits it
/// evenly over the threads) writes the band's columns of the `[O, H'*W']` plane. A 1x1 conv
/// without padding reads the input plane in place.
pub(crate) fn conv2d(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    g: ConvGeom,
    threads: usize,
) {
    let (ho, wo) = (g.h_out(), g.w_out());
    let plane = ho * wo;
    let k = g.k();
    assert!(
        y.len() == g.batch * g.c_out * plane
            && x.len() == g.batch * g.c_in * g.h * g.w
            && w.len() == g.c_out * k
            && b.is_none_or(|b| b.len() == g.c_out),
        "conv2d: operand lengths"
    );
    if y.is_empty() {
        return;
    }
    // With a bias, the GEMMs accumulate onto it; without, they overwrite `y`.
    if let Some(b) = b {
        y.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(i, p)| p.fill(b[i % g.c_out]));
    }
    let direct = g.kh == 1 && g.kw == 1 && g.pad == 0;
    let rows = if direct {
        ho
    } else {
        (COLS_BUDGET / (k * wo)).clamp(1, ho)
    };
    let mut cols = if direct {
        Vec::new()
    } else {
        vec![0f32; k * rows * wo]
    };
    // Like `linear`: products below about a MFLOP are not worth waking the other threads.
    let par = if threads > 1 && g.c_out * k * rows * wo > 1 << 20 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let image = g.c_in * g.h * g.w;
    let lhs = MatRef {
        ptr: w.as_ptr(),
        rs: k as isize,
        cs: 1,
    };
    for bi in 0..g.batch {
        let xb = &x[bi * image..(bi + 1) * image];
        for r0 in (0..ho).step_by(rows) {
            let nr = rows.min(ho - r0);
            let rhs = if direct {
                // The input plane is the GEMM operand [C, H*W].
                MatRef {
                    ptr: xb.as_ptr(),
                    rs: (g.h * g.w) as isize,
                    cs: 1,
                }
            } else {
                im2col(&mut cols, xb, g, r0, nr);
                MatRef {
                    ptr: cols.as_ptr(),
                    rs: (nr * wo) as isize,
                    cs: 1,
                }
            };
            let dst = y[bi * g.c_out * plane + r0 * wo..].as_mut_ptr();
            // SAFETY: the GEMM writes O rows (row stride H'*W') of nr*W' columns starting at
            // column r0*W' of image bi's output, inside `y`; `w` is [O, k] and `rhs` addresses k
            // rows of nr*W' elements inside `xb` or `cols` (lengths asserted above); `y` aliases
            // neither.
            unsafe {
                matmul_strided_par(
                    dst,
                    plane as isize,
                    g.c_out,
                    nr * wo,
                    k,
                    lhs,
                    rhs,
                    b.is_some(),
                    par,
                )
            };
        }
    }
}

/// Reference convolution: direct sum in f64 over `(c, ky, kx)` for every output element.
pub fn conv2d_slow(x: &[f32], w: &[f32], b: Option<&[f32]>, g: ConvGeom) -> Vec<f32> {
    let (ho, wo) = (g.h_out(), g.w_out());
    let mut y = vec![0f32; g.batch * g.c_out * ho * wo];
    for bi in 0..g.batch {
        for o in 0..g.c_out {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = b.map_or(0.0, |b| b[o] as f64);
                    for c in 0..g.c_in {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let (iy, ix) = (oy + ky, ox + kx);
                                if iy < g.pad
                                    || ix < g.pad
                                    || iy - g.pad >= g.h
                                    || ix - g.pad >= g.w
                                {
                                    continue;
                                }
                                let xv =
                                    x[((bi * g.c_in + c) * g.h + iy - g.pad) * g.w + ix - g.pad];
                                let wv = w[((o * g.c_in + c) * g.kh + ky) * g.kw + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((bi * g.c_out + o) * ho + oy) * wo + ox] = acc as f32;
                }
            }
        }
    }
    y
}

/// Nearest-neighbour 2x upsampling of planes of `h x w` (`x` holds whole planes): every input row
/// becomes two output rows of `2w`.
pub(crate) fn upsample_nearest2x(out: &mut [f32], x: &[f32], w: usize) {
    out.par_chunks_mut(4 * w)
        .zip(x.par_chunks(w))
        .with_min_len(64)
        .for_each(|(o, r)| {
            let (top, bottom) = o.split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(r) {
                pair[0] = v;
                pair[1] = v;
            }
            bottom.copy_from_slice(top);
        });
}

/// Reference upsampling: `out[p, y, x] = x[p, y / 2, x / 2]` for planes `p` of `h x w`.
pub fn upsample_nearest2x_slow(x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let planes = x.len() / (h * w).max(1);
    let mut out = vec![0f32; planes * 4 * h * w];
    for p in 0..planes {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                out[(p * 2 * h + y) * 2 * w + xx] = x[(p * h + y / 2) * w + xx / 2];
            }
        }
    }
    out
}

/// Batched transpose `x: [B, r, c] -> out: [B, c, r]`, in 32x32 tiles, parallel over batches and
/// 32-row blocks of the output.
pub(crate) fn transpose_last2(out: &mut [f32], x: &[f32], r: usize, c: usize) {
    const T: usize = 32;
    out.par_chunks_mut(r * c)
        .zip(x.par_chunks(r * c))
        .for_each(|(ob, xb)| {
            ob.par_chunks_mut(T * r).enumerate().for_each(|(blk, oc)| {
                let (c0, cols) = (blk * T, oc.len() / r);
                for i0 in (0..r).step_by(T) {
                    for j in 0..cols {
                        for i in i0..(i0 + T).min(r) {
                            oc[j * r + i] = xb[i * c + c0 + j];
                        }
                    }
                }
            });
        });
}

/// Reference transpose `[B, r, c] -> [B, c, r]`.
pub fn transpose_last2_slow(x: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for b in 0..x.len() / (r * c).max(1) {
        for i in 0..r {
            for j in 0..c {
                out[(b * c + j) * r + i] = x[(b * r + i) * c + j];
            }
        }
    }
    out
}
