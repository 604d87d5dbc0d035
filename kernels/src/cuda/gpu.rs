//! A GPU with pipefuse's kernels loaded, driven from host slices: the first piece of the CUDA
//! backend that launches anything, used by the prepared GPU check (`examples/gpu_check.rs`,
//! `tools/gpu_check.sh`) to compare every kernel with the CPU backend on a lent GPU. The
//! `Device` ops on CUDA tensors (device-resident storage, cuBLASLt GEMMs) build on it next
//! (issue 11). Never run on a GPU yet: written against cudarc 0.19's documented API and compiled
//! here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::{KernelError, Result};

/// A strided view's layout as the attention kernel takes it (`struct View` in attention.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// Elements between batches.
    pub batch_stride: i64,
    /// Elements between tokens.
    pub row_stride: i64,
    /// Offset of head 0 in a token row.
    pub col_offset: i64,
}

// SAFETY: a plain #[repr(C)] struct of three i64, passed by value like the kernel's `View`.
unsafe impl DeviceRepr for View {}

fn gpu_error(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda {
        op: what.to_string(),
        message: format!("{e:?}"),
    }
}

/// A GPU's context and stream with every kernel source loaded.
pub struct GpuKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// `compute_XY` of the device.
    pub arch: String,
    /// The device's name.
    pub name: String,
}

impl GpuKernels {
    /// Opens GPU `ordinal` and compiles every kernel source for it (headers in `include`).
    pub fn new(ordinal: usize, include: &Path) -> Result<GpuKernels> {
        let devices = crate::cuda_devices()
            .map_err(|reason| KernelError::CudaNotAvailable { ordinal, reason })?;
        let info = devices
            .get(ordinal)
            .ok_or_else(|| KernelError::CudaNotAvailable {
                ordinal,
                reason: format!("{} CUDA device(s) are visible", devices.len()),
            })?;
        let ctx = CudaContext::new(ordinal).map_err(|e| gpu_error("context", e))?;
        let (major, minor) = info.compute_capability;
        let arch = format!("compute_{major}{minor}");
        let mut modules = HashMap::new();
        for (file, _) in super::SOURCES {
            let ptx = super::compile_ptx(file, &arch, include)?;
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|e| gpu_error(file, e))?;
            modules.insert(*file, module);
        }
        Ok(GpuKernels {
            stream: ctx.default_stream(),
            ctx,
            modules,
            arch,
            name: info.name.clone(),
        })
    }

    fn function(&self, file: &str, name: &str) -> Result<CudaFunction> {
        self.modules
            .get(file)
            .ok_or_else(|| gpu_error(file, "not loaded"))?
            .load_function(name)
            .map_err(|e| gpu_error(name, e))
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| gpu_error("upload", e))
    }

    fn download(&self, dev: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| gpu_error("download", e))
    }

    /// Grid-stride launch shape for `n` elements.
    fn elementwise_config(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `gelu_tanh_f32` or `silu_f32` (`name`) on `x` in place.
    pub fn activation_f32(&self, name: &str, x: &mut [f32]) -> Result<()> {
        let f = self.function("elementwise.cu", name)?;
        let mut d = self.upload(x)?;
        let n = x.len() as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&mut d).arg(&n);
        // SAFETY: the kernel reads and writes n floats of `d`.
        unsafe { launch.launch(Self::elementwise_config(x.len())) }
            .map_err(|e| gpu_error(name, e))?;
        x.copy_from_slice(&self.download(&d)?);
        Ok(())
    }

    /// `x[b, t, c] += gate[b, c] * y[b, t, c]` (`add_gated_f32`).
    pub fn add_gated_f32(
        &self,
        x: &mut [f32],
        y: &[f32],
        gate: &[f32],
        (batch, tokens, channels): (usize, usize, usize),
    ) -> Result<()> {
        let f = self.function("elementwise.cu", "add_gated_f32")?;
        let (mut dx, dy, dg) = (self.upload(x)?, self.upload(y)?, self.upload(gate)?);
        let dims = [batch as i64, tokens as i64, channels as i64];
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut dx)
            .arg(&dy)
            .arg(&dg)
            .arg(&dims[0])
            .arg(&dims[1])
            .arg(&dims[2]);
        // SAFETY: sizes as documented; every pointer covers its tensor.
        unsafe { launch.launch(Self::elementwise_config(x.len())) }
            .map_err(|e| gpu_error("add_gated_f32", e))?;
        x.copy_from_slice(&self.download(&dx)?);
        Ok(())
    }

    /// `LN(x) (1 + scale[b]) + shift[b]` over rows of `channels` (`layer_norm_modulate_f32`).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_modulate_f32(
        &self,
        x: &[f32],
        shift: &[f32],
        scale: &[f32],
        tokens: usize,
        channels: usize,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let f = self.function("norm.cu", "layer_norm_modulate_f32")?;
        let (dx, dsh, dsc) = (self.upload(x)?, self.upload(shift)?, self.upload(scale)?);
        let mut dy = self
            .stream
            .alloc_zeros::<f32>(x.len())
            .map_err(|e| gpu_error("alloc", e))?;
        let (t, c) = (tokens as i64, channels as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut dy)
            .arg(&dx)
            .arg(&dsh)
            .arg(&dsc)
            .arg(&t)
            .arg(&c)
            .arg(&eps);
        let rows = (x.len() / channels.max(1)) as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per row of `channels` floats; shift / scale are [B, C].
        unsafe { launch.launch(cfg) }.map_err(|e| gpu_error("layer_norm_modulate_f32", e))?;
        self.download(&dy)
    }

    /// Attention of contiguous `q: [B, Sq, H hd]`, `k, v: [B, Sk, H hd]` with an optional key bias
    /// `[B, Sk]`: the output `[B, Sq, H hd]` and the log-sum-exp `[B, Sq, H]` (`attention_f32`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_f32(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: Option<&[f32]>,
        batch: usize,
        heads: usize,
        head_dim: usize,
        (sq, sk): (usize, usize),
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if head_dim > 128 {
            return Err(gpu_error("attention_f32", "head_dim above 128"));
        }
        let f = self.function("attention.cu", "attention_f32")?;
        let d = heads * head_dim;
        let view = |s: usize| View {
            batch_stride: (s * d) as i64,
            row_stride: d as i64,
            col_offset: 0,
        };
        let (dq, dk, dv) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        let dbias = bias.map(|b| self.upload(b)).transpose()?;
        let mut dout = self
            .stream
            .alloc_zeros::<f32>(batch * sq * d)
            .map_err(|e| gpu_error("alloc", e))?;
        let mut dlse = self
            .stream
            .alloc_zeros::<f32>(batch * sq * heads)
            .map_err(|e| gpu_error("alloc", e))?;
        let null: u64 = 0;
        let (qv, kv, vv) = (view(sq), view(sk), view(sk));
        let (b32, h32, hd32) = (batch as i32, heads as i32, head_dim as i32);
        let (sq64, sk64, scale) = (sq as i64, sk as i64, 1.0f32 / (head_dim as f32).sqrt());
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut dlse)
            .arg(&mut dout)
            .arg(&dq)
            .arg(&qv)
            .arg(&dk)
            .arg(&kv)
            .arg(&dv)
            .arg(&vv);
        match &dbias {
            Some(b) => launch.arg(b),
            None => launch.arg(&null),
        };
        launch
            .arg(&b32)
            .arg(&h32)
            .arg(&hd32)
            .arg(&sq64)
            .arg(&sk64)
            .arg(&scale);
        let warps = batch * heads * sq;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (4 * head_dim * 4) as u32,
        };
        // SAFETY: one warp per (batch, head, query row), 4 warps per block, head_dim floats of
        // shared memory per warp; every view covers its tensor.
        unsafe { launch.launch(cfg) }.map_err(|e| gpu_error("attention_f32", e))?;
        Ok((self.download(&dout)?, self.download(&dlse)?))
    }

    /// Waits for the stream's work.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| gpu_error("synchronize", e))
    }
}
