//! The VAE decoder's image ops on CUDA tensors (`image.cu`): GroupNorm, 2x nearest upsampling,
//! the last-two-dimensions transpose, and stride-1 convolution as im2col + a cuBLASLt GEMM + a
//! transpose (shapes are checked by `Device` before these run). Every kernel here writes all of
//! its output, which is therefore allocated uninitialised.

use super::device::CudaDevice;
use super::launch::ptr_or_null;
use super::plan;
use super::storage::CudaStorage;
use crate::reference::ConvGeom;
use crate::tensor::Storage;
use crate::{Result, Tensor};

impl CudaDevice {
    /// GroupNorm of `x: [B, C, spatial...]` in `groups` groups, optional affine `[C]`.
    pub(crate) fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        (channels, spatial): (usize, usize),
        eps: f32,
    ) -> Result<Tensor> {
        let (xs, [g, b], dtype) = self.affine_operands("group_norm", x, gamma, beta)?;
        let mut y = CudaStorage::uninit(self.stream(), dtype, x.elem_count())?;
        let blocks = x.dim(0) * groups;
        if blocks > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (gg, bg) = (g.map(|t| t.ptr(s)), b.map(|t| t.ptr(s)));
            let (gp, bp) = (ptr_or_null(&gg), ptr_or_null(&bg));
            let (yp, _gy) = y.ptr_mut(s)?;
            let shape = (channels, spatial);
            let l = plan::group_norm((yp, xp), (gp, bp), (x.dim(0), groups), shape, eps);
            // SAFETY: one block per (batch, group) run of C / groups x spatial elements.
            unsafe { self.run(&l, dtype) }?;
        }
        Tensor::from_storage(Storage::Cuda(y), x.shape())
    }

    /// `[B, C, H, W]` -> `[B, C, 2H, 2W]`, nearest neighbour.
    pub(crate) fn upsample_nearest2x(&self, x: &Tensor, shape: &[usize; 4]) -> Result<Tensor> {
        let op = "upsample_nearest2x";
        let xs = self.operand(op, x)?;
        let [b, c, h2, w2] = *shape;
        let dtype = xs.dtype();
        let mut y = CudaStorage::uninit(self.stream(), dtype, b * c * h2 * w2)?;
        let n = b * c * h2 * w2;
        if n > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (yp, _gy) = y.ptr_mut(s)?;
            let l = plan::upsample_nearest2x((yp, xp), b * c, (h2 / 2, w2 / 2));
            // SAFETY: y holds planes x 2h x 2w, x planes x h x w.
            unsafe { self.run(&l, dtype) }?;
        }
        Tensor::from_storage(Storage::Cuda(y), shape)
    }

    /// `[B, R, C]` -> `[B, C, R]`.
    pub(crate) fn transpose_last2(
        &self,
        x: &Tensor,
        (b, r, c): (usize, usize, usize),
    ) -> Result<Tensor> {
        let op = "transpose_last2";
        let xs = self.operand(op, x)?;
        let dtype = xs.dtype();
        let n = b * r * c;
        let mut y = CudaStorage::uninit(self.stream(), dtype, n)?;
        if n > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (yp, _gy) = y.ptr_mut(s)?;
            // SAFETY: both hold b x r x c elements.
            unsafe { self.run(&plan::transpose_last2((yp, xp), (b, r, c)), dtype) }?;
        }
        Tensor::from_storage(Storage::Cuda(y), &[b, c, r])
    }

    /// Stride-1 convolution: per image, im2col `[P, C_in kh kw]`, then the GEMM with the weight
    /// `[O, C_in kh kw]` (+ bias) -> `[P, O]`, then the transpose to `[O, P]`.
    pub(crate) fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: ConvGeom,
    ) -> Result<Tensor> {
        let op = "conv2d";
        let xs = self.operand(op, x)?;
        let dtype = Self::common_dtype(op, xs, &[self.operand(op, w)?])?;
        let (p, kk) = (g.h_out() * g.w_out(), g.c_in * g.kh * g.kw);
        let weight = w.clone().reshape(&[g.c_out, kk])?;
        let image = g.c_in * g.h * g.w;
        let mut outs = Vec::with_capacity(g.batch);
        for bi in 0..g.batch {
            let mut cols = CudaStorage::uninit(self.stream(), dtype, p * kk)?;
            {
                let s = self.stream();
                let (xp, _gx) = xs.ptr(s);
                let (cp, _gc) = cols.ptr_mut(s)?;
                let size = dtype.size_in_bytes() as u64;
                let l = plan::im2col(cp, xp + (bi * image) as u64 * size, &g);
                // SAFETY: x holds `batch` images of c_in x h x w; cols P x K.
                unsafe { self.run(&l, dtype) }?;
            }
            let cols = Tensor::from_storage(Storage::Cuda(cols), &[p, kk])?;
            let y = self.linear(
                &cols,
                &weight,
                bias,
                (p, kk, g.c_out),
                &[1, p, g.c_out],
                false,
            )?;
            outs.push(self.transpose_last2(&y, (1, p, g.c_out))?);
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        Tensor::cat(&refs, 0)?.reshape(&[g.batch, g.c_out, g.h_out(), g.w_out()])
    }
}
