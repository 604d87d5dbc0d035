//! The [`crate::Device`] ops on CUDA tensors: the same contracts as the CPU backend's (shapes are
//! checked by `Device` before these run), every operand on this GPU and of one dtype (f32, bf16
//! or f16; f32 arithmetic inside every kernel, f32 accumulation in every GEMM), results on the
//! GPU in that dtype. Attention's key bias and log-sum-exp are f32 whatever the dtype. Ops queue
//! on the device's stream and return at once; a download (`Tensor::to_host`) waits for them.

use super::blas::{linear_plan, Activation};
use super::device::CudaDevice;
use super::launch::{ptr_or_null, KernelView};
use super::plan;
use super::storage::CudaStorage;
use crate::tensor::Storage;
use crate::{AttnView, DType, KernelError, Result, Tensor};

/// The error for a tensor that is in host memory, or on another GPU, when an op runs on a GPU.
pub(crate) fn not_here(op: &'static str, device: &CudaDevice, t: &Tensor) -> KernelError {
    KernelError::DeviceMismatch {
        op,
        expected: format!("cuda:{}", device.ordinal()),
        got: match t.storage() {
            Storage::Cpu(_) => "host memory".into(),
            Storage::Cuda(s) => format!("cuda:{}", s.ordinal()),
        },
    }
}

/// The error for a GPU tensor where host memory is needed.
pub(crate) fn on_gpu(op: &'static str, s: &CudaStorage) -> KernelError {
    KernelError::DeviceMismatch {
        op,
        expected: "host memory (Tensor::to_host)".into(),
        got: format!("cuda:{}", s.ordinal()),
    }
}

impl CudaDevice {
    pub(super) fn operand<'t>(&self, op: &'static str, t: &'t Tensor) -> Result<&'t CudaStorage> {
        match t.storage() {
            Storage::Cuda(s) if s.ordinal() == self.ordinal() => Ok(s),
            _ => Err(not_here(op, self, t)),
        }
    }

    fn operand_mut<'t>(&self, op: &'static str, t: &'t mut Tensor) -> Result<&'t mut CudaStorage> {
        self.operand(op, t)?;
        match t.storage_mut() {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => unreachable!("checked above"),
        }
    }

    /// `x` and its optional affine `gamma`, `beta` on this GPU, and the dtype they share.
    pub(super) fn affine_operands<'t>(
        &self,
        op: &'static str,
        x: &'t Tensor,
        gamma: Option<&'t Tensor>,
        beta: Option<&'t Tensor>,
    ) -> Result<(&'t CudaStorage, [Option<&'t CudaStorage>; 2], DType)> {
        let xs = self.operand(op, x)?;
        let g = gamma.map(|t| self.operand(op, t)).transpose()?;
        let b = beta.map(|t| self.operand(op, t)).transpose()?;
        let rest: Vec<&CudaStorage> = g.into_iter().chain(b).collect();
        Ok((xs, [g, b], Self::common_dtype(op, xs, &rest)?))
    }

    /// The dtype every operand shares, or an error naming the op.
    pub(super) fn common_dtype(
        op: &'static str,
        first: &CudaStorage,
        rest: &[&CudaStorage],
    ) -> Result<DType> {
        let dtype = first.dtype();
        match rest.iter().find(|s| s.dtype() != dtype) {
            Some(other) => Err(KernelError::DType {
                op,
                expected: dtype,
                got: other.dtype(),
            }),
            None => Ok(dtype),
        }
    }

    fn f32_operand<'t>(&self, op: &'static str, t: &'t Tensor) -> Result<&'t CudaStorage> {
        let s = self.operand(op, t)?;
        if s.dtype() != DType::F32 {
            return Err(KernelError::DType {
                op,
                expected: DType::F32,
                got: s.dtype(),
            });
        }
        Ok(s)
    }

    /// A copy of `t` in this GPU's memory (host tensors are uploaded; a tensor of another GPU
    /// goes through host memory).
    pub(crate) fn upload(&self, t: &Tensor) -> Result<Tensor> {
        let host = match t.storage() {
            Storage::Cuda(s) if s.ordinal() == self.ordinal() => return Ok(t.clone()),
            Storage::Cuda(s) => s.download()?,
            Storage::Cpu(c) => c.clone(),
        };
        let storage = CudaStorage::upload(self.stream(), &host)?;
        Tensor::from_storage(Storage::Cuda(storage), t.shape())
    }

    /// `x[m, k] . w[n, k]^T + b[n]` through cuBLASLt, then GELU (tanh) if `gelu` (in cuBLASLt's
    /// epilogue), `shape` the output's.
    pub(crate) fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        (m, k, n): (usize, usize, usize),
        shape: &[usize],
        gelu: bool,
    ) -> Result<Tensor> {
        let op = "linear";
        let (xs, ws) = (self.operand(op, x)?, self.operand(op, w)?);
        let bs = b.map(|b| self.operand(op, b)).transpose()?;
        let mut rest = vec![ws];
        rest.extend(bs);
        let dtype = Self::common_dtype(op, xs, &rest)?;
        // The GEMM (beta 0) writes all of Y (`Device::linear` refuses k = 0).
        let mut y = CudaStorage::uninit(self.stream(), dtype, m * n)?;
        if m * n > 0 && k > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (wp, _gw) = ws.ptr(s);
            let bias = bs.map(|b| b.ptr(s));
            let (yp, _gy) = y.ptr_mut(s)?;
            // SAFETY: W is [n, k], X [m, k], Y [m, n] and the bias n elements, all of `dtype`
            // on this device (checked above and by `Device::linear`).
            unsafe {
                self.blas().gemm(
                    s,
                    linear_plan(m, k, n),
                    dtype,
                    (wp, xp, yp),
                    bias.as_ref().map(|b| b.0),
                    match gelu {
                        true => Activation::GeluTanh,
                        false => Activation::Identity,
                    },
                )?
            };
        }
        Tensor::from_storage(Storage::Cuda(y), shape)
    }

    /// Element-wise activation `base` (`gelu_tanh`, `silu`) in place.
    pub(crate) fn activation_(&self, base: &'static str, x: &mut Tensor) -> Result<()> {
        let n = x.elem_count();
        let xs = self.operand_mut(base, x)?;
        let (dtype, s) = (xs.dtype(), self.stream());
        let (xp, _g) = xs.ptr_mut(s)?;
        // SAFETY: the kernel reads and writes the n elements of x.
        unsafe { self.run(&plan::activation(base == "silu", xp, n), dtype) }?;
        Ok(())
    }

    /// `LN(x) (1 + scale[b]) + shift[b]` for `x: [B, tokens, d]`.
    pub(crate) fn layer_norm_modulate(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        (tokens, d): (usize, usize),
        eps: f32,
    ) -> Result<Tensor> {
        let op = "layer_norm_modulate";
        let (xs, sh, sc) = (
            self.operand(op, x)?,
            self.operand(op, shift)?,
            self.operand(op, scale)?,
        );
        let dtype = Self::common_dtype(op, xs, &[sh, sc])?;
        // The kernel writes every row (one block each).
        let mut y = CudaStorage::uninit(self.stream(), dtype, x.elem_count())?;
        let rows = x.elem_count() / d;
        if rows > 0 {
            let s = self.stream();
            let ((xp, _gx), (shp, _gs), (scp, _gc)) = (xs.ptr(s), sh.ptr(s), sc.ptr(s));
            let (yp, _gy) = y.ptr_mut(s)?;
            let l = plan::layer_norm_modulate((yp, xp), (shp, scp), rows, (tokens, d), eps);
            // SAFETY: one block per row of d elements; shift / scale are [B, d].
            unsafe { self.run(&l, dtype) }?;
        }
        Tensor::from_storage(Storage::Cuda(y), x.shape())
    }

    /// LayerNorm over the last dimension `d` with optional affine `gamma`, `beta` (`[d]`).
    pub(crate) fn layer_norm(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        d: usize,
        eps: f32,
    ) -> Result<Tensor> {
        let (xs, [g, b], dtype) = self.affine_operands("layer_norm", x, gamma, beta)?;
        // The kernel writes every row (one block each).
        let mut y = CudaStorage::uninit(self.stream(), dtype, x.elem_count())?;
        let rows = x.elem_count() / d;
        if rows > 0 {
            let s = self.stream();
            let (xp, _gx) = xs.ptr(s);
            let (gg, bg) = (g.map(|t| t.ptr(s)), b.map(|t| t.ptr(s)));
            let (gp, bp) = (ptr_or_null(&gg), ptr_or_null(&bg));
            let (yp, _gy) = y.ptr_mut(s)?;
            let l = plan::layer_norm((yp, xp), (gp, bp), rows, d, eps);
            // SAFETY: one block per row of d elements; gamma / beta (or null) hold d.
            unsafe { self.run(&l, dtype) }?;
        }
        Tensor::from_storage(Storage::Cuda(y), x.shape())
    }

    /// Ring attention's merge: `acc`, `acc_lse` become the attention over both key blocks.
    pub(crate) fn merge_attention_(
        &self,
        acc: &mut Tensor,
        acc_lse: &mut Tensor,
        part: &Tensor,
        part_lse: &Tensor,
        head_dim: usize,
    ) -> Result<()> {
        let op = "merge_attention";
        let rows = acc_lse.elem_count();
        let ps = self.operand(op, part)?.clone();
        let pls = self.f32_operand(op, part_lse)?.clone();
        self.f32_operand(op, acc_lse)?;
        let ls = self.operand_mut(op, acc_lse)?;
        let s = self.stream();
        let (lp, _gl) = ls.ptr_mut(s)?;
        let acs = self.operand_mut(op, acc)?;
        let dtype = Self::common_dtype(op, acs, &[&ps])?;
        if rows == 0 {
            return Ok(());
        }
        let (pp, _gp) = ps.ptr(s);
        let (plp, _gpl) = pls.ptr(s);
        let (ap, _ga) = acs.ptr_mut(s)?;
        let l = plan::merge_attention((ap, lp), (pp, plp), rows, head_dim);
        // SAFETY: acc / part hold rows x head_dim elements, the log-sum-exps `rows` f32.
        unsafe { self.run(&l, dtype) }?;
        Ok(())
    }

    /// Per-group RMSNorm of columns `offset..offset + cols` of rows of `width`, in place.
    pub(crate) fn rms_norm_groups_(
        &self,
        x: &mut Tensor,
        (width, offset, cols): (usize, usize, usize),
        weight: &Tensor,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm_groups";
        let group = weight.elem_count();
        let rows = x.elem_count() / width;
        let ws = self.operand(op, weight)?.clone();
        let xs = self.operand_mut(op, x)?;
        let dtype = Self::common_dtype(op, xs, &[&ws])?;
        let warps = rows * (cols / group);
        if warps == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (wp, _gw) = ws.ptr(s);
        let (xp, _gx) = xs.ptr_mut(s)?;
        let l = plan::rms_norm_groups(xp, wp, rows, (width, offset, cols), group, eps);
        // SAFETY: one warp per (row, group) inside the checked columns; weight has `group`.
        unsafe { self.run(&l, dtype) }?;
        Ok(())
    }

    /// `x += gate[b] * y` over `x, y: [B, .., d]`, `gate: [B, d]`.
    pub(crate) fn add_gated_(
        &self,
        x: &mut Tensor,
        y: &Tensor,
        gate: Option<&Tensor>,
        (batch, d): (usize, usize),
    ) -> Result<()> {
        let op = "add_gated";
        let n = x.elem_count();
        let ys = self.operand(op, y)?.clone();
        let gs = gate.map(|g| self.operand(op, g)).transpose()?;
        let xs = self.operand_mut(op, x)?;
        let mut rest = vec![&ys];
        rest.extend(gs);
        let dtype = Self::common_dtype(op, xs, &rest)?;
        if n == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (yp, _gy) = ys.ptr(s);
        let g = gs.map(|g| g.ptr(s));
        let gp = ptr_or_null(&g);
        let (xp, _gx) = xs.ptr_mut(s)?;
        let l = plan::add_gated(xp, yp, gp, n, (batch, d));
        // SAFETY: x and y hold n elements, the gate (or null) B x d.
        unsafe { self.run(&l, dtype) }?;
        Ok(())
    }

    /// `x[i] += rows[i % rows.len()]` (`Device::add_broadcast_`).
    pub(crate) fn add_cyclic_(&self, x: &mut Tensor, rows: &Tensor) -> Result<()> {
        let op = "add_broadcast";
        let (n, period) = (x.elem_count(), rows.elem_count());
        let ys = self.operand(op, rows)?.clone();
        let xs = self.operand_mut(op, x)?;
        let dtype = Self::common_dtype(op, xs, &[&ys])?;
        if n == 0 || period == 0 {
            return Ok(());
        }
        let s = self.stream();
        let (yp, _gy) = ys.ptr(s);
        let (xp, _gx) = xs.ptr_mut(s)?;
        // SAFETY: x holds n elements, rows `period`.
        unsafe { self.run(&plan::add_cyclic(xp, yp, n, period), dtype) }?;
        Ok(())
    }

    /// Rotary embedding, in place, of the `head_dim`-wide heads in columns `offset..offset +
    /// cols` of `x` (rows `width` wide, `positions` per batch element) with f32 `cos, sin:
    /// [positions, head_dim]` on this GPU (`Device::rope_`).
    pub(crate) fn rope_(
        &self,
        x: &mut Tensor,
        (width, positions, offset, cols): (usize, usize, usize, usize),
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<()> {
        let op = "rope";
        let head_dim = cos.elem_count() / positions.max(1);
        let tables = [
            self.operand(op, cos)?.clone(),
            self.operand(op, sin)?.clone(),
        ];
        if let Some(t) = tables.iter().find(|t| t.dtype() != DType::F32) {
            return Err(KernelError::DType {
                op,
                expected: DType::F32,
                got: t.dtype(),
            });
        }
        let rows = x.elem_count() / width.max(1);
        let xs = self.operand_mut(op, x)?;
        let dtype = xs.dtype();
        if rows * (cols / 2) == 0 {
            return Ok(());
        }
        let s = self.stream();
        let ((cp, _gc), (sp, _gs)) = (tables[0].ptr(s), tables[1].ptr(s));
        let (xp, _gx) = xs.ptr_mut(s)?;
        let geometry = (width, positions, offset, cols);
        let l = plan::rope(xp, (cp, sp), rows, geometry, head_dim);
        // SAFETY: `Device::rope_` checked that the columns fit the rows and the heads the tables.
        unsafe { self.run(&l, dtype) }?;
        Ok(())
    }

    /// Attention of strided views (see [`AttnView`]) with an optional f32 key bias `[B, Sk]`:
    /// `[B, Sq, heads * head_dim]` in the views' dtype, and the f32 log-sum-exp `[B, Sq, heads]`
    /// when asked for. bf16 / f16 on sm_80 and later: the tensor-core kernel
    /// (flash_attention.cu); otherwise one warp per (batch, head, query row). Never an S x S
    /// matrix.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        q: AttnView<'_>,
        k: AttnView<'_>,
        v: AttnView<'_>,
        key_bias: Option<&Tensor>,
        (batch, heads, head_dim): (usize, usize, usize),
        with_lse: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let op = "attention";
        if head_dim > 128 {
            return Err(KernelError::shape(
                op,
                format!("head_dim {head_dim} above the CUDA kernel's 128"),
            ));
        }
        let width = heads * head_dim;
        let (qs, ks, vs) = (
            self.operand(op, q.tensor)?,
            self.operand(op, k.tensor)?,
            self.operand(op, v.tensor)?,
        );
        for (name, view, s) in [("q", &q, qs), ("k", &k, ks), ("v", &v, vs)] {
            if !view_fits(view, batch, width, s.len()) {
                return Err(KernelError::shape(
                    op,
                    format!("{name} view exceeds its tensor of {} elements", s.len()),
                ));
            }
        }
        let dtype = Self::common_dtype(op, qs, &[ks, vs])?;
        let bias = key_bias.map(|b| self.f32_operand(op, b)).transpose()?;
        let stream = self.stream();
        // Either kernel writes every output row and log-sum-exp.
        let mut out = CudaStorage::uninit(stream, dtype, batch * q.seq * width)?;
        let mut lse = if with_lse {
            Some(CudaStorage::uninit(
                stream,
                DType::F32,
                batch * q.seq * heads,
            )?)
        } else {
            None
        };
        let rows = batch * heads * q.seq;
        if rows > 0 {
            let ((qp, _gq), (kp, _gk), (vp, _gv)) =
                (qs.ptr(stream), ks.ptr(stream), vs.ptr(stream));
            let b = bias.map(|b| b.ptr(stream));
            let bp = ptr_or_null(&b);
            let l = lse.as_mut().map(|l| l.ptr_mut(stream)).transpose()?;
            let lp = ptr_or_null(&l);
            let (outp, _go) = out.ptr_mut(stream)?;
            let view = |p: u64, v: &AttnView<'_>| {
                let layout = KernelView {
                    batch_stride: v.batch_stride as i64,
                    row_stride: v.row_stride as i64,
                    col_offset: v.col_offset as i64,
                };
                (p, layout)
            };
            let args = plan::AttentionArgs {
                lse: lp,
                out: outp,
                q: view(qp, &q),
                k: view(kp, &k),
                v: view(vp, &v),
                bias: bp,
                batch,
                heads,
                head_dim,
                sq: q.seq,
                sk: k.seq,
            };
            let l = plan::attention(&args, dtype, self.tensor_core_attention());
            // SAFETY: every view was checked to lie inside its tensor, and either kernel reads
            // only rows < sq / sk and columns < head_dim of each head.
            unsafe { self.run(&l, dtype) }?;
        }
        let out = Tensor::from_storage(Storage::Cuda(out), &[batch, q.seq, width])?;
        let lse = lse
            .map(|l| Tensor::from_storage(Storage::Cuda(l), &[batch, q.seq, heads]))
            .transpose()?;
        Ok((out, lse))
    }

    /// The error for an op this backend does not have yet (issue 11), naming it and the GPU.
    pub(crate) fn unsupported(&self, op: &'static str) -> KernelError {
        KernelError::Cuda {
            op: op.to_string(),
            message: format!(
                "not implemented on CUDA yet (cuda:{}); run this stage on a cpu device",
                self.ordinal()
            ),
        }
    }
}

/// Whether a view's last element lies inside a tensor of `len` elements (checked arithmetic).
fn view_fits(view: &AttnView<'_>, batch: usize, width: usize, len: usize) -> bool {
    if batch == 0 || view.seq == 0 {
        return true;
    }
    let extent = (batch - 1)
        .checked_mul(view.batch_stride)
        .and_then(|a| {
            (view.seq - 1)
                .checked_mul(view.row_stride)
                .and_then(|b| a.checked_add(b))
        })
        .and_then(|e| e.checked_add(view.col_offset))
        .and_then(|e| e.checked_add(width));
    extent.is_some_and(|e| {
        e <= len && view.row_stride <= i64::MAX as usize && view.batch_stride <= i64::MAX as usize
    })
}
