//! `Device`: the one place where ops dispatch to a backend. Every method checks shapes and returns
//! a [`KernelError`] naming the op instead of panicking. The image ops of the VAE decoder
//! (convolution, GroupNorm, upsampling, transpose) are in `device/image.rs`.

mod image;

use std::ops::Range;

use crate::cpu::attention::{AttnDims, AttnInput};
use crate::cpu::layout::PatchGeom;
use crate::cpu::{self, CpuDevice};
use crate::CudaDevice;
use crate::{CpuStorage, DType, KernelError, Result, Storage, Tensor};

/// Where ops run.
#[derive(Debug, Clone)]
pub enum Device {
    /// The CPU backend with its own thread pool.
    Cpu(CpuDevice),
    /// A CUDA GPU (feature `cuda`; uninhabited without it).
    Cuda(CudaDevice),
}

/// A `[batch, seq, heads, head_dim]` view into a tensor for [`Device::attention`]: element
/// `(b, s, h, j)` is at flat index `b * batch_stride + s * row_stride + col_offset + h * head_dim + j`.
/// With a fused QKV projection `[B, S, 3d]`, Q/K/V are the views at `col_offset` 0, d and 2d.
#[derive(Debug, Clone, Copy)]
pub struct AttnView<'a> {
    /// The tensor viewed.
    pub tensor: &'a Tensor,
    /// Tokens in the view.
    pub seq: usize,
    /// Elements between batches.
    pub batch_stride: usize,
    /// Elements between tokens.
    pub row_stride: usize,
    /// Offset of head 0 in a token row.
    pub col_offset: usize,
}

impl<'a> AttnView<'a> {
    /// Views a contiguous `[B, S, width]` tensor at column `col_offset`.
    pub fn of(tensor: &'a Tensor, col_offset: usize) -> Result<Self> {
        let &[_, seq, width] = tensor.shape() else {
            return Err(KernelError::shape(
                "attention",
                format!("expected [B, S, width], got {:?}", tensor.shape()),
            ));
        };
        Ok(AttnView {
            tensor,
            seq,
            batch_stride: seq * width,
            row_stride: width,
            col_offset,
        })
    }

    fn cpu(&self) -> Result<AttnInput<'a>> {
        Ok(AttnInput {
            data: self.tensor.as_f32()?,
            seq: self.seq,
            batch_stride: self.batch_stride,
            row_stride: self.row_stride,
            col_offset: self.col_offset,
        })
    }
}

fn last_dim(op: &'static str, t: &Tensor) -> Result<usize> {
    match t.shape().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(KernelError::shape(
            op,
            format!("needs a non-empty last dimension, got {:?}", t.shape()),
        )),
    }
}

/// `t` as a host f32 tensor: itself when it is one, else a converted copy.
fn host_f32(t: &Tensor) -> Result<std::borrow::Cow<'_, Tensor>> {
    if t.is_host() && t.dtype() == DType::F32 {
        Ok(std::borrow::Cow::Borrowed(t))
    } else {
        Ok(std::borrow::Cow::Owned(t.to_host()?.to_dtype(DType::F32)?))
    }
}

/// Checks `x[.., k]` against a packed weight of `(n, k)` (named by `w` in errors) and the
/// bias; the rows `m` and the output shape `[.., n]`.
fn packed_linear_shape(
    op: &'static str,
    x: &Tensor,
    (n, wk): (usize, usize),
    w: &dyn std::fmt::Debug,
    b: Option<&Tensor>,
) -> Result<(usize, Vec<usize>)> {
    let k = last_dim(op, x)?;
    if wk != k {
        return Err(KernelError::shape(
            op,
            format!("input {:?} vs weight {w:?}", x.shape()),
        ));
    }
    if let Some(b) = b {
        check_len(op, "bias", b, n)?;
    }
    if k == 0 {
        return Err(KernelError::shape(
            op,
            format!("input {:?} has no features", x.shape()),
        ));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("checked non-scalar") = n;
    Ok((x.elem_count() / k, shape))
}

fn check_len(op: &'static str, what: &str, t: &Tensor, want: usize) -> Result<()> {
    if t.elem_count() != want {
        return Err(KernelError::shape(
            op,
            format!("{what} has shape {:?}, expected {want} elements", t.shape()),
        ));
    }
    Ok(())
}

impl Device {
    /// A CPU device running its ops on `threads` threads.
    pub fn cpu(threads: usize) -> Result<Device> {
        Ok(Device::Cpu(CpuDevice::new(threads)?))
    }

    /// CUDA device `ordinal` with the kernels compiled for it: fails, saying why (no `cuda`
    /// feature, no driver, no such device, no CUDA headers or NVRTC), never panics. Tensors
    /// reach it with [`Tensor::to_device`]; ops it does not have yet return an error naming them.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        CudaDevice::new(ordinal).map(Device::Cuda)
    }

    /// The same device computing in `dtype`: a CUDA device converts weights and activations to
    /// it as they arrive ([`import`](Self::import)). A CPU device keeps its activations in f32
    /// (its bf16 linear layers are per layer: [`Device::linear_bf16`]; only the feed-forward
    /// hands its hidden layer over in bf16, [`Device::linear_bf16_gelu_bf16`]); with `bf16` its
    /// attention's products round to bf16 where the CPU has a bf16 kernel (AMX or AVX512-BF16:
    /// [`CpuDevice::with_bf16_attention`]).
    #[cfg_attr(not(feature = "cuda"), allow(unreachable_code))]
    pub fn with_compute_dtype(self, dtype: DType) -> Device {
        match self {
            Device::Cpu(c) => Device::Cpu(c.with_bf16_attention(dtype == DType::BF16)),
            Device::Cuda(c) => Device::Cuda(c.with_dtype(dtype)),
        }
    }

    /// The dtype activations have on this device (f32 on a CPU, but for the feed-forward's
    /// hidden layer: [`Device::linear_bf16_gelu_bf16`]).
    pub fn compute_dtype(&self) -> DType {
        match self {
            Device::Cpu(_) => DType::F32,
            Device::Cuda(c) => c.compute_dtype(),
        }
    }

    /// `t` where and as this device computes: in its memory and its compute dtype (a CPU
    /// device: host f32). A tensor already there is returned as it is, not copied.
    pub fn import(&self, t: Tensor) -> Result<Tensor> {
        let want = self.compute_dtype();
        let t = if t.dtype() == want {
            t
        } else {
            t.to_dtype(want)?
        };
        t.into_device(self)
    }

    /// `t` in this device's memory as f32 whatever the compute dtype (attention key biases).
    pub fn import_f32(&self, t: Tensor) -> Result<Tensor> {
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        t.into_device(self)
    }

    /// Zeros of `shape` in this device's memory and compute dtype.
    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        match self {
            Device::Cpu(_) => Ok(Tensor::zeros(shape)),
            Device::Cuda(_) => self.import(Tensor::zeros(&[0]))?.zeros_beside(shape),
        }
    }

    /// Whether `t` is in this device's memory (host memory for a CPU device, this GPU's for a
    /// CUDA device).
    pub fn holds(&self, t: &Tensor) -> bool {
        match (self, t.storage()) {
            (Device::Cpu(_), crate::Storage::Cpu(_)) => true,
            (Device::Cuda(c), crate::Storage::Cuda(s)) => c.ordinal() == s.ordinal(),
            _ => false,
        }
    }

    /// Waits until every op queued on this device has finished (a GPU's ops are asynchronous;
    /// a CPU's have finished when they return). Timing a GPU needs it.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu(_) => Ok(()),
            Device::Cuda(c) => c.synchronize(),
        }
    }

    /// Human-readable name, e.g. `cpu(2 threads)`.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu(c) => format!("{c:?}"),
            Device::Cuda(c) => format!("{c:?}"),
        }
    }

    /// Runs `f` with this device's threads available to nested parallel code.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Device::Cpu(c) => c.install(f),
            Device::Cuda(_) => f(),
        }
    }

    /// `x[.., k] · w[n, k]^T + b[n]` (torch `Linear` layout) -> `[.., n]`.
    pub fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.linear_with(x, w, b, false)
    }

    /// `gelu_tanh(x[.., k] · w[n, k]^T + b[n])`: [`Device::linear`] then
    /// [`Device::gelu_tanh_`], fused on a GPU (cuBLASLt's GELU epilogue, no second pass over
    /// the output).
    pub fn linear_gelu(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.linear_with(x, w, b, true)
    }

    fn linear_with(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Tensor> {
        let k = last_dim("linear", x)?;
        let &[n, wk] = w.shape() else {
            return Err(KernelError::shape(
                "linear",
                format!("weight must be [out, in], got {:?}", w.shape()),
            ));
        };
        if wk != k {
            return Err(KernelError::shape(
                "linear",
                format!("input {:?} vs weight {:?}", x.shape(), w.shape()),
            ));
        }
        if let Some(b) = b {
            check_len("linear", "bias", b, n)?;
        }
        if k == 0 {
            return Err(KernelError::shape(
                "linear",
                format!("input {:?} has no features", x.shape()),
            ));
        }
        let m = x.elem_count() / k;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("checked non-scalar") = n;
        match self {
            Device::Cpu(c) => {
                let mut y = vec![0f32; m * n];
                let (xs, ws) = (x.as_f32()?, w.as_f32()?);
                let bs = b.map(|b| b.as_f32()).transpose()?;
                c.install(|| {
                    cpu::matmul::linear(&mut y, xs, ws, bs, m, k, n, c.threads());
                    if gelu {
                        cpu::activation::gelu_tanh(&mut y);
                    }
                });
                Tensor::from_vec(y, &shape)
            }
            Device::Cuda(c) => c.linear(x, w, b, (m, k, n), &shape, gelu),
        }
    }

    /// `x[.., k] · w[n, k]^T + b[n]` in f32 with a weight packed once at load
    /// ([`crate::PackedF32`]: the AVX-512 kernel's panels where the CPU has AVX-512F).
    pub fn linear_packed(
        &self,
        x: &Tensor,
        w: &crate::PackedF32,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_packed_with(x, w, b, false)
    }

    /// [`Device::linear_packed`] followed by GELU (tanh), applied as each output tile is
    /// finished (while it is in L1), not in a second pass.
    pub fn linear_packed_gelu(
        &self,
        x: &Tensor,
        w: &crate::PackedF32,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_packed_with(x, w, b, true)
    }

    fn linear_packed_with(
        &self,
        x: &Tensor,
        w: &crate::PackedF32,
        b: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Tensor> {
        let (m, shape) = packed_linear_shape("linear_packed", x, (w.n(), w.k()), &w, b)?;
        match self {
            Device::Cpu(c) => {
                let xs = x.as_f32()?;
                let bs = b.map(|b| b.as_f32()).transpose()?;
                let y = c.install(|| cpu::f32_gemm::linear_packed(xs, w, bs, m, c.threads(), gelu));
                Tensor::from_vec(y, &shape)
            }
            Device::Cuda(c) => {
                Err(c.unsupported("linear_packed (use an f32 weight tensor with linear)"))
            }
        }
    }

    /// `bf16(x[.., k]) · w[n, k]^T + b[n]` with a bf16 weight packed once
    /// ([`crate::PackedBf16`]) and f32 accumulation -> `[.., n]` f32 (AMX tiles or AVX512-BF16
    /// where the CPU has them: [`crate::bf16_gemm_path`]). `x` is f32, or bf16 (read as it is,
    /// e.g. from [`Device::linear_bf16_gelu_bf16`]).
    pub fn linear_bf16(
        &self,
        x: &Tensor,
        w: &crate::PackedBf16,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_bf16_with(x, w, b, cpu::bf16_gemm::Epilogue::Bias, DType::F32)
    }

    /// [`Device::linear_bf16`] followed by GELU (tanh), fused: the activation is applied as the
    /// GEMM writes each output block, not in a second pass over the tensor.
    pub fn linear_bf16_gelu(
        &self,
        x: &Tensor,
        w: &crate::PackedBf16,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_bf16_with(x, w, b, cpu::bf16_gemm::Epilogue::BiasGeluTanh, DType::F32)
    }

    /// [`Device::linear_bf16_gelu`] with a bf16 output (each value rounded to nearest even after
    /// the GELU) for a product whose output only feeds another [`Device::linear_bf16`] (the
    /// feed-forward's fc1 -> fc2): that product rounds its input to bf16 anyway, so the numbers
    /// are the same, with half the bytes written and read and no conversion pass.
    pub fn linear_bf16_gelu_bf16(
        &self,
        x: &Tensor,
        w: &crate::PackedBf16,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_bf16_with(x, w, b, cpu::bf16_gemm::Epilogue::BiasGeluTanh, DType::BF16)
    }

    fn linear_bf16_with(
        &self,
        x: &Tensor,
        w: &crate::PackedBf16,
        b: Option<&Tensor>,
        epilogue: cpu::bf16_gemm::Epilogue,
        out: DType,
    ) -> Result<Tensor> {
        let (m, shape) = packed_linear_shape("linear_bf16", x, (w.n(), w.k()), &w, b)?;
        match self {
            Device::Cpu(c) => {
                let xs = match x.storage() {
                    Storage::Cpu(CpuStorage::BF16(v)) => {
                        cpu::bf16_io::Input::Bf16(bytemuck::cast_slice(v))
                    }
                    Storage::Cpu(CpuStorage::F16(_)) => {
                        return Err(KernelError::DType {
                            op: "linear_bf16",
                            expected: DType::F32,
                            got: DType::F16,
                        })
                    }
                    // f32 on the host; a GPU tensor gets as_f32's error naming where it is.
                    _ => cpu::bf16_io::Input::F32(x.as_f32()?),
                };
                let bs = b.map(|b| b.as_f32()).transpose()?;
                let threads = c.threads();
                let storage = c.install(|| match out {
                    DType::BF16 => CpuStorage::BF16(cpu::bf16_gemm::linear_bf16_alloc_bf16(
                        xs, w, bs, m, threads, epilogue,
                    )),
                    _ => CpuStorage::F32(cpu::bf16_gemm::linear_bf16_alloc(
                        xs, w, bs, m, threads, epilogue,
                    )),
                });
                Tensor::from_cpu(storage, &shape)
            }
            Device::Cuda(c) => Err(c.unsupported("linear_bf16 (use a bf16 weight with linear)")),
        }
    }

    /// GELU (tanh approximation) in place.
    pub fn gelu_tanh_(&self, x: &mut Tensor) -> Result<()> {
        match self {
            Device::Cpu(c) => {
                let xs = x.as_f32_mut()?;
                c.install(|| cpu::activation::gelu_tanh(xs));
                Ok(())
            }
            Device::Cuda(c) => c.activation_("gelu_tanh", x),
        }
    }

    /// SiLU, returning a new tensor.
    pub fn silu(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Device::Cpu(c) => {
                let mut y = x.clone();
                let ys = y.as_f32_mut()?;
                c.install(|| cpu::activation::silu(ys));
                Ok(y)
            }
            Device::Cuda(c) => {
                let mut y = x.clone();
                c.activation_("silu", &mut y)?;
                Ok(y)
            }
        }
    }

    /// adaLN: `LN_eps(x) * (1 + scale[b]) + shift[b]` for `x: [B, n, d]`, `shift, scale: [B, d]`.
    pub fn layer_norm_modulate(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let &[batch, _, d] = x.shape() else {
            return Err(KernelError::shape(
                "layer_norm_modulate",
                format!("x must be [B, n, d], got {:?}", x.shape()),
            ));
        };
        last_dim("layer_norm_modulate", x)?;
        check_len("layer_norm_modulate", "shift", shift, batch * d)?;
        check_len("layer_norm_modulate", "scale", scale, batch * d)?;
        match self {
            Device::Cpu(c) => {
                let (xs, sh, sc) = (x.as_f32()?, shift.as_f32()?, scale.as_f32()?);
                let len = xs.len();
                let mut y = Vec::with_capacity(len);
                let out = &mut y.spare_capacity_mut()[..len];
                c.install(|| cpu::norm::layer_norm_modulate(out, xs, sh, sc, batch, d, eps));
                // SAFETY: layer_norm_modulate writes every element of its output.
                unsafe { y.set_len(len) };
                Tensor::from_vec(y, x.shape())
            }
            Device::Cuda(c) => c.layer_norm_modulate(x, shift, scale, (x.dim(1), d), eps),
        }
    }

    /// LayerNorm over the last dimension with optional affine `gamma`, `beta` (`[d]`).
    pub fn layer_norm(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let d = last_dim("layer_norm", x)?;
        for (what, t) in [("gamma", gamma), ("beta", beta)] {
            if let Some(t) = t {
                check_len("layer_norm", what, t, d)?;
            }
        }
        match self {
            Device::Cpu(c) => {
                let xs = x.as_f32()?;
                let g = gamma.map(|t| t.as_f32()).transpose()?;
                let b = beta.map(|t| t.as_f32()).transpose()?;
                let mut y = Vec::with_capacity(xs.len());
                let out = &mut y.spare_capacity_mut()[..xs.len()];
                c.install(|| cpu::norm::layer_norm(out, xs, g, b, d, eps));
                // SAFETY: layer_norm writes every element of its output.
                unsafe { y.set_len(xs.len()) };
                Tensor::from_vec(y, x.shape())
            }
            Device::Cuda(c) => c.layer_norm(x, gamma, beta, d, eps),
        }
    }

    /// RMSNorm, in place, of every `weight.len()`-wide group of columns `offset..offset + cols`
    /// of the last dimension of `x` (per-head query/key norm on a fused `[B, n, 3d]` QKV):
    /// `v * weight / sqrt(mean(v^2) + eps)`.
    pub fn rms_norm_groups_(
        &self,
        x: &mut Tensor,
        offset: usize,
        cols: usize,
        weight: &Tensor,
        eps: f32,
    ) -> Result<()> {
        let width = last_dim("rms_norm_groups_", x)?;
        let g = weight.elem_count();
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
        if g == 0 || cols % g != 0 || offset + cols > width {
            return Err(KernelError::shape(
                "rms_norm_groups_",
                format!(
                    "columns {offset}..{} in groups of {g} do not fit rows of {width}",
                    offset + cols
                ),
            ));
        }
        match self {
            Device::Cpu(c) => {
                let w = weight.as_f32()?.to_vec();
                let xs = x.as_f32_mut()?;
                c.install(|| cpu::norm::rms_norm_groups_(xs, width, offset, cols, &w, eps));
                Ok(())
            }
            Device::Cuda(c) => c.rms_norm_groups_(x, (width, offset, cols), weight, eps),
        }
    }

    /// Rotary position embedding, in place, on the `head_dim`-wide heads of columns
    /// `offset..offset + cols` of `x: [B, S, width]` (queries and keys of a fused QKV), with
    /// `cos, sin: [S, head_dim]` per position; pairs of channels `(2i, 2i+1)` rotate together
    /// (Flux's interleaved convention): `(a cos - b sin, b cos + a sin)`.
    pub fn rope_(
        &self,
        x: &mut Tensor,
        offset: usize,
        cols: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<()> {
        let width = last_dim("rope_", x)?;
        let (&[s, hd], true) = (cos.shape(), cos.shape() == sin.shape()) else {
            return Err(KernelError::shape(
                "rope_",
                format!(
                    "cos {:?} and sin {:?} must both be [S, head_dim]",
                    cos.shape(),
                    sin.shape()
                ),
            ));
        };
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
        let bad = x.shape().len() != 3
            || x.dim(1) != s
            || hd == 0
            || hd % 2 != 0
            || cols % hd != 0
            || offset + cols > width;
        if bad {
            return Err(KernelError::shape(
                "rope_",
                format!(
                    "x {:?}, columns {offset}..{} in heads of {hd} for {s} positions do not fit",
                    x.shape(),
                    offset + cols
                ),
            ));
        }
        match self {
            Device::Cpu(c) => {
                let (co, si) = (cos.as_f32()?.to_vec(), sin.as_f32()?.to_vec());
                let xs = x.as_f32_mut()?;
                c.install(|| cpu::rotary::rope_(xs, width, s, offset, cols, &co, &si));
                Ok(())
            }
            Device::Cuda(c) => {
                // The tables stay f32 (as diffusers rotates in f32); host ones are uploaded.
                let (cos, sin) = (self.import_f32(cos.clone())?, self.import_f32(sin.clone())?);
                c.rope_(x, (width, s, offset, cols), &cos, &sin)
            }
        }
    }

    /// Multi-head attention of `q` against `k`/`v` (see [`AttnView`]); `key_bias: [B, Sk]` is added
    /// to the scores (`-inf` masks a key). Returns `[B, Sq, heads * head_dim]`.
    pub fn attention(
        &self,
        q: AttnView<'_>,
        k: AttnView<'_>,
        v: AttnView<'_>,
        key_bias: Option<&Tensor>,
        batch: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        Ok(self
            .attention_impl(q, k, v, key_bias, batch, heads, head_dim, false)?
            .0)
    }

    /// [`attention`](Self::attention) that also returns each row's log-sum-exp of the scaled
    /// scores, `[B, Sq, heads]` (`-inf` where every key is masked): attention over one block of
    /// keys, to be combined with other blocks by [`merge_attention_`](Self::merge_attention_)
    /// (Ring attention).
    pub fn attention_with_lse(
        &self,
        q: AttnView<'_>,
        k: AttnView<'_>,
        v: AttnView<'_>,
        key_bias: Option<&Tensor>,
        batch: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (out, lse) = self.attention_impl(q, k, v, key_bias, batch, heads, head_dim, true)?;
        Ok((out, lse.expect("asked for")))
    }

    /// Folds the attention of the same queries over another key block (`part`, `part_lse` from
    /// [`attention_with_lse`](Self::attention_with_lse)) into `acc`, `acc_lse`: afterwards `acc` is
    /// the attention over the union of the blocks, exactly up to rounding, in any merge order.
    pub fn merge_attention_(
        &self,
        acc: &mut Tensor,
        acc_lse: &mut Tensor,
        part: &Tensor,
        part_lse: &Tensor,
        heads: usize,
    ) -> Result<()> {
        let bad = |m: String| Err(KernelError::shape("merge_attention", m));
        if acc.shape() != part.shape() || acc_lse.shape() != part_lse.shape() {
            return bad(format!(
                "outputs {:?} vs {:?}, log-sum-exps {:?} vs {:?}",
                acc.shape(),
                part.shape(),
                acc_lse.shape(),
                part_lse.shape()
            ));
        }
        let width = acc.shape().last().copied().unwrap_or(0);
        if heads == 0
            || width % heads != 0
            || acc_lse.elem_count() * (width / heads) != acc.elem_count()
        {
            return bad(format!(
                "output {:?} and log-sum-exp {:?} do not match {heads} heads",
                acc.shape(),
                acc_lse.shape()
            ));
        }
        match self {
            Device::Cpu(c) => {
                let (p, pl) = (part.as_f32()?, part_lse.as_f32()?);
                let (a, al) = (acc.as_f32_mut()?, acc_lse.as_f32_mut()?);
                c.install(|| cpu::attention::merge_partial(a, al, p, pl, width / heads));
                Ok(())
            }
            Device::Cuda(c) => c.merge_attention_(acc, acc_lse, part, part_lse, width / heads),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_impl(
        &self,
        q: AttnView<'_>,
        k: AttnView<'_>,
        v: AttnView<'_>,
        key_bias: Option<&Tensor>,
        batch: usize,
        heads: usize,
        head_dim: usize,
        with_lse: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let width = heads * head_dim;
        if head_dim == 0 || heads == 0 {
            return Err(KernelError::shape(
                "attention",
                "heads and head_dim must be >= 1",
            ));
        }
        if k.seq != v.seq {
            return Err(KernelError::shape(
                "attention",
                format!("{} keys but {} values", k.seq, v.seq),
            ));
        }
        if let Some(kb) = key_bias {
            check_len("attention", "key bias", kb, batch * k.seq)?;
        }
        match self {
            Device::Cpu(c) => {
                let (qc, kc, vc) = (q.cpu()?, k.cpu()?, v.cpu()?);
                for (name, view) in [("q", &qc), ("k", &kc), ("v", &vc)] {
                    let fits = view
                        .extent(batch, width)
                        .is_some_and(|e| e <= view.data.len());
                    let strides_ok = view.row_stride <= isize::MAX as usize
                        && view.batch_stride <= isize::MAX as usize;
                    if !fits || !strides_ok {
                        return Err(KernelError::shape(
                            "attention",
                            format!(
                                "{name} view exceeds its tensor of {} elements",
                                view.data.len()
                            ),
                        ));
                    }
                }
                let kb = key_bias.map(|t| t.as_f32()).transpose()?;
                let mut out = vec![0f32; batch * q.seq * width];
                let mut lse = with_lse.then(|| vec![0f32; batch * q.seq * heads]);
                let dims = AttnDims {
                    batch,
                    heads,
                    head_dim,
                };
                c.install(|| {
                    #[cfg(target_arch = "x86_64")]
                    if c.bf16_attention() {
                        let l = lse.as_deref_mut();
                        return cpu::attention_bf16::attention_bf16(
                            &mut out, l, qc, kc, vc, kb, dims,
                        );
                    }
                    #[cfg(target_arch = "x86_64")]
                    if kc.seq > 0 && cpu::fma_attention::chosen() {
                        let l = lse.as_deref_mut();
                        return cpu::fma_attention::attention(&mut out, l, qc, kc, vc, kb, dims);
                    }
                    cpu::attention::attention(&mut out, lse.as_deref_mut(), qc, kc, vc, kb, dims)
                });
                let lse = lse
                    .map(|l| Tensor::from_vec(l, &[batch, q.seq, heads]))
                    .transpose()?;
                Ok((Tensor::from_vec(out, &[batch, q.seq, width])?, lse))
            }
            Device::Cuda(c) => c.attention(q, k, v, key_bias, (batch, heads, head_dim), with_lse),
        }
    }

    /// `x += gate[b] * y` (or `x += y` without a gate) for `x, y: [B, n, d]` (or any `[B, .., d]`,
    /// e.g. a `[B, C, H, W]` residual), `gate: [B, d]`.
    pub fn add_gated_(&self, x: &mut Tensor, y: &Tensor, gate: Option<&Tensor>) -> Result<()> {
        let rank = x.shape().len();
        if x.shape() != y.shape() || rank < 2 || x.dim(rank - 1) == 0 {
            return Err(KernelError::shape(
                "add_gated",
                format!("{:?} vs {:?}", x.shape(), y.shape()),
            ));
        }
        let (batch, d) = (x.dim(0), x.dim(rank - 1));
        if let Some(g) = gate {
            check_len("add_gated", "gate", g, batch * d)?;
        }
        match self {
            Device::Cpu(c) => {
                let ys = y.as_f32()?;
                let g = gate.map(|t| t.as_f32()).transpose()?;
                let xs = x.as_f32_mut()?;
                c.install(|| cpu::layout::add_gated(xs, ys, g, batch, d));
                Ok(())
            }
            Device::Cuda(c) => c.add_gated_(x, y, gate, (batch, d)),
        }
    }

    /// Adds `rows: [n, d]` to every batch of `x: [B, n, d]`.
    pub fn add_broadcast_(&self, x: &mut Tensor, rows: &Tensor) -> Result<()> {
        let &[b, n, d] = x.shape() else {
            return Err(KernelError::shape(
                "add_broadcast",
                format!("x must be [B, n, d], got {:?}", x.shape()),
            ));
        };
        check_len("add_broadcast", "rows", rows, n * d)?;
        if let Device::Cuda(c) = self {
            return c.add_cyclic_(x, rows);
        }
        let r = rows.as_f32()?;
        let xs = x.as_f32_mut()?;
        for i in 0..b {
            xs[i * n * d..(i + 1) * n * d]
                .iter_mut()
                .zip(r)
                .for_each(|(x, r)| *x += r);
        }
        Ok(())
    }

    /// Patch vectors `[B, rows.len() * W/p, C*p*p]` of token rows `rows` of `latent: [B, C, H, W]`,
    /// as a host f32 tensor on every device.
    pub fn patchify(&self, latent: &Tensor, patch: usize, rows: Range<usize>) -> Result<Tensor> {
        let &[batch, channels, height, width] = latent.shape() else {
            return Err(KernelError::shape(
                "patchify",
                format!("latent must be [B, C, H, W], got {:?}", latent.shape()),
            ));
        };
        if channels == 0
            || patch == 0
            || height % patch != 0
            || width % patch != 0
            || rows.end * patch > height
        {
            return Err(KernelError::shape(
                "patchify",
                format!(
                    "latent {:?} with patch {patch}, token rows {rows:?}",
                    latent.shape()
                ),
            ));
        }
        let g = PatchGeom {
            batch,
            channels,
            height,
            width,
            patch,
        };
        let n = rows.len() * (width / patch);
        // A layout op on the latent, which lives in host memory as f32: it runs on the host
        // whatever the device (a GPU stage imports the result).
        let host = host_f32(latent)?;
        let mut out = vec![0f32; batch * n * channels * patch * patch];
        let xs = host.as_f32()?;
        self.install(|| cpu::layout::patchify(&mut out, xs, g, rows));
        Tensor::from_vec(out, &[batch, n, channels * patch * patch])
    }

    /// Inverse of the final projection layout: `tokens: [B, token_rows * W/p, p*p*C]` to
    /// `[B, C, token_rows * p, W]`, as a host f32 tensor on every device.
    pub fn unpatchify(
        &self,
        tokens: &Tensor,
        channels: usize,
        token_rows: usize,
        width: usize,
        patch: usize,
    ) -> Result<Tensor> {
        let &[batch, n, feat] = tokens.shape() else {
            return Err(KernelError::shape(
                "unpatchify",
                format!("tokens must be [B, n, f], got {:?}", tokens.shape()),
            ));
        };
        if patch == 0
            || width % patch != 0
            || n != token_rows * (width / patch)
            || feat != patch * patch * channels
        {
            return Err(KernelError::shape("unpatchify", format!("tokens {:?} vs {token_rows} rows x width {width}, patch {patch}, {channels} channels", tokens.shape())));
        }
        let g = PatchGeom {
            batch,
            channels,
            height: token_rows * patch,
            width,
            patch,
        };
        // Like patchify, on the host (the result is the sampler's f32 latent rows).
        let host = host_f32(tokens)?;
        let mut out = vec![0f32; tokens.elem_count()];
        cpu::layout::unpatchify(&mut out, host.as_f32()?, g, token_rows);
        Tensor::from_vec(out, &[batch, channels, token_rows * patch, width])
    }

    /// Rows `ids` of `table: [N, d]` -> `[ids.len(), d]`; an id out of range is an error.
    pub fn embedding(&self, table: &Tensor, ids: &[usize]) -> Result<Tensor> {
        let &[rows, d] = table.shape() else {
            return Err(KernelError::shape(
                "embedding",
                format!("table must be [N, d], got {:?}", table.shape()),
            ));
        };
        if let Some(&i) = ids.iter().find(|&&i| i >= rows) {
            return Err(KernelError::shape(
                "embedding",
                format!("id {i} out of range for a table of {rows} rows"),
            ));
        }
        if ids.is_empty() {
            return table.zeros_beside(&[0, d]);
        }
        // One row copy per id (a block copy on any device; ids are a batch's labels).
        let rows: Vec<Tensor> = ids
            .iter()
            .map(|&i| table.narrow(0, i, 1))
            .collect::<Result<_>>()?;
        Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0)
    }
}
