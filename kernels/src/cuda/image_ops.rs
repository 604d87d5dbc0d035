//! The VAE decoder's image ops on CUDA tensors (`image.cu`): GroupNorm, 2x nearest upsampling,
//! the last-two-dimensions transpose, and stride-1 convolution as im2col + a cuBLASLt GEMM + a
//! transpose (shapes are checked by `Device` before these run).

use super::device::CudaDevice;
use super::launch::{self as k, elementwise_config, per_row_config, ptr_or_null, Param};
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
        let mut y = CudaStorage::zeros(self.stream(), dtype, x.elem_count())?;
        let blocks = x.dim(0) * groups;
        if blocks > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (gg, bg) = (g.map(|t| t.ptr(s)), b.map(|t| t.ptr(s)));
            let (gp, bp) = (ptr_or_null(&gg), ptr_or_null(&bg));
            let (yp, _gy) = y.ptr_mut(s)?;
            let params = [
                Param::Ptr(yp),
                Param::Ptr(xp),
                Param::Ptr(gp),
                Param::Ptr(bp),
                Param::I32(channels as i32),
                Param::I32(groups as i32),
                Param::I64(spatial as i64),
                Param::F32(eps),
            ];
            let cfg = per_row_config(blocks);
            // SAFETY: one block per (batch, group) run of C / groups x spatial elements.
            unsafe { self.launch(&k::GROUP_NORM, dtype, &params, cfg) }?;
        }
        Tensor::from_storage(Storage::Cuda(y), x.shape())
    }

    /// `[B, C, H, W]` -> `[B, C, 2H, 2W]`, nearest neighbour.
    pub(crate) fn upsample_nearest2x(&self, x: &Tensor, shape: &[usize; 4]) -> Result<Tensor> {
        let op = "upsample_nearest2x";
        let xs = self.operand(op, x)?;
        let [b, c, h2, w2] = *shape;
        let dtype = xs.dtype();
        let mut y = CudaStorage::zeros(self.stream(), dtype, b * c * h2 * w2)?;
        let n = b * c * h2 * w2;
        if n > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (yp, _gy) = y.ptr_mut(s)?;
            let params = [
                Param::Ptr(yp),
                Param::Ptr(xp),
                Param::I64((b * c) as i64),
                Param::I32((h2 / 2) as i32),
                Param::I32((w2 / 2) as i32),
            ];
            // SAFETY: y holds planes x 2h x 2w, x planes x h x w.
            unsafe {
                self.launch(
                    &k::UPSAMPLE_NEAREST2X,
                    dtype,
                    &params,
                    elementwise_config(n),
                )
            }?;
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
        let mut y = CudaStorage::zeros(self.stream(), dtype, n)?;
        if n > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (yp, _gy) = y.ptr_mut(s)?;
            let params = [
                Param::Ptr(yp),
                Param::Ptr(xp),
                Param::I64(b as i64),
                Param::I32(r as i32),
                Param::I32(c as i32),
            ];
            // SAFETY: both hold b x r x c elements.
            unsafe { self.launch(&k::TRANSPOSE_LAST2, dtype, &params, elementwise_config(n)) }?;
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
            let mut cols = CudaStorage::zeros(self.stream(), dtype, p * kk)?;
            {
                let s = self.stream();
                let (xp, _gx) = xs.ptr(s);
                let (cp, _gc) = cols.ptr_mut(s)?;
                let size = dtype.size_in_bytes() as u64;
                let params = [
                    Param::Ptr(cp),
                    Param::Ptr(xp + (bi * image) as u64 * size),
                    Param::I32(g.c_in as i32),
                    Param::I32(g.h as i32),
                    Param::I32(g.w as i32),
                    Param::I32(g.kh as i32),
                    Param::I32(g.kw as i32),
                    Param::I32(g.pad as i32),
                    Param::I32(g.h_out() as i32),
                    Param::I32(g.w_out() as i32),
                ];
                // SAFETY: x holds `batch` images of c_in x h x w; cols P x K.
                unsafe { self.launch(&k::IM2COL, dtype, &params, elementwise_config(p * kk)) }?;
            }
            let cols = Tensor::from_storage(Storage::Cuda(cols), &[p, kk])?;
            let y = self.linear(&cols, &weight, bias, (p, kk, g.c_out), &[1, p, g.c_out])?;
            outs.push(self.transpose_last2(&y, (1, p, g.c_out))?);
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        Tensor::cat(&refs, 0)?.reshape(&[g.batch, g.c_out, g.h_out(), g.w_out()])
    }
}
