//! A CUDA GPU as a [`crate::Device`]: its context, the GPU's one stream on which every op runs
//! in order (`gpu_stream.rs`), the kernels compiled for its architecture by NVRTC when it is
//! opened, and a cuBLASLt handle. Device memory comes from the driver's stream-ordered pool
//! (cudarc allocates with `cuMemAllocAsync` where the GPU has it), so freeing a tensor returns
//! its memory to the pool without a device-wide synchronisation, and the pool keeps it. Opening never panics: libraries are checked for
//! before use and every first driver call runs under `catch_unwind` (DEPENDENCIES.md section 4).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::blas::Blas;
use super::gpu_stream::gpu_stream;
use super::storage::driver_error;
use crate::{DType, KernelError, Result};

/// A CUDA GPU with pipefuse's kernels loaded, computing in one dtype (f32, bf16 or f16: weights
/// and activations are converted to it as they reach the GPU). Cloning shares the context,
/// stream and kernels.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
    dtype: DType,
}

struct Inner {
    ordinal: usize,
    name: String,
    arch: String,
    // Declared before the context so that they are dropped first.
    blas: Blas,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Attention in bf16 / f16 runs on the tensor-core kernel (sm_80 on, not turned off).
    tensor_cores: bool,
    /// Entry points looked up so far, by (source, base name, dtype): a launch does not ask the
    /// driver for its function again.
    functions: Mutex<HashMap<(&'static str, &'static str, DType), CudaFunction>>,
    /// The GPU's one stream (shared with every device on this GPU: `gpu_stream.rs`); it holds
    /// the context.
    stream: Arc<CudaStream>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let attention = match self.inner.tensor_cores {
            true => "tensor-core attention",
            false => "row attention",
        };
        write!(
            f,
            "cuda:{} ({}, {}, {}, {attention})",
            self.inner.ordinal, self.inner.name, self.inner.arch, self.dtype
        )
    }
}

/// The folder holding the CUDA headers NVRTC needs (`cuda_bf16.h`, `cuda_fp16.h`,
/// `math_constants.h`): `PIPEFUSE_CUDA_INCLUDE`, else `$CUDA_HOME/include`, `$CUDA_PATH/include`
/// or `/usr/local/cuda/include`, whichever has them.
pub fn cuda_include_dir() -> std::result::Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PIPEFUSE_CUDA_INCLUDE") {
        let dir = PathBuf::from(dir);
        return if dir.join("cuda_bf16.h").is_file() {
            Ok(dir)
        } else {
            Err(format!(
                "PIPEFUSE_CUDA_INCLUDE={} has no cuda_bf16.h",
                dir.display()
            ))
        };
    }
    let candidates = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(|d| PathBuf::from(d).join("include")))
        .chain([PathBuf::from("/usr/local/cuda/include")]);
    for dir in candidates {
        if dir.join("cuda_bf16.h").is_file() {
            return Ok(dir);
        }
    }
    Err(
        "the CUDA headers (cuda_bf16.h) were not found: set PIPEFUSE_CUDA_INCLUDE to their \
         folder (a CUDA toolkit's include/, or site-packages/nvidia/cu13/include of the \
         nvidia-cuda-runtime wheel)"
            .into(),
    )
}

impl CudaDevice {
    /// Opens GPU `ordinal`: context, stream, cuBLASLt, and every kernel compiled for it. Fails
    /// with [`KernelError::CudaNotAvailable`] saying why (no driver, no such GPU, no headers or
    /// NVRTC), never a panic.
    pub(crate) fn new(ordinal: usize) -> Result<CudaDevice> {
        let unavailable = |reason: String| KernelError::CudaNotAvailable { ordinal, reason };
        let devices = crate::cuda_devices().map_err(unavailable)?;
        let info = devices.get(ordinal).ok_or_else(|| {
            unavailable(format!(
                "{} CUDA device(s) are visible (ordinals 0..{})",
                devices.len(),
                devices.len()
            ))
        })?;
        let include = cuda_include_dir().map_err(unavailable)?;
        let stream = gpu_stream(ordinal)?;
        let ctx = stream.context().clone();
        let (major, minor) = info.compute_capability;
        let arch = format!("compute_{major}{minor}");
        // The tensor-core kernels need mma.sync with bf16 (sm_80 on); `PIPEFUSE_CUDA_ATTENTION=
        // rows` keeps attention on the row kernel (a comparison on a GPU).
        let rows_only = std::env::var("PIPEFUSE_CUDA_ATTENTION").is_ok_and(|v| v == "rows");
        let mut tensor_cores = major >= 8 && !rows_only;
        let mut modules = HashMap::new();
        for (file, _) in super::SOURCES {
            let flash = *file == super::FLASH_SOURCE;
            if flash && !tensor_cores {
                continue;
            }
            let module = cached_ptx(file, &arch, &include).and_then(|ptx| {
                ctx.load_module(Ptx::from_src(ptx))
                    .map_err(|e| driver_error(&format!("load {file}"), e))
            });
            match module {
                Ok(m) => {
                    modules.insert(*file, m);
                }
                // The tensor-core kernel is an optimisation: without it attention runs on the
                // row kernel (every other source is needed).
                Err(e) if flash => {
                    tracing::warn!(ordinal, error = %e, "tensor-core attention unavailable; attention runs on the row kernel");
                    tensor_cores = false;
                }
                Err(e) => return Err(e),
            }
        }
        let blas = Blas::new(&stream)?;
        tracing::info!(ordinal, name = %info.name, %arch, tensor_cores, "CUDA device opened");
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ordinal,
                name: info.name.clone(),
                arch,
                blas,
                modules,
                tensor_cores,
                functions: Mutex::new(HashMap::new()),
                stream,
            }),
            dtype: DType::F32,
        })
    }

    /// Whether bf16 / f16 attention runs on the tensor-core kernel (flash_attention.cu).
    pub(crate) fn tensor_core_attention(&self) -> bool {
        self.inner.tensor_cores
    }

    /// The same GPU computing in `dtype`.
    pub(crate) fn with_dtype(&self, dtype: DType) -> CudaDevice {
        CudaDevice {
            inner: self.inner.clone(),
            dtype,
        }
    }

    /// The dtype this device computes in.
    pub(crate) fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The driver's name for the GPU.
    pub fn gpu_name(&self) -> &str {
        &self.inner.name
    }

    /// The virtual architecture the kernels were compiled for (`compute_90`).
    pub fn arch(&self) -> &str {
        &self.inner.arch
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn blas(&self) -> &Blas {
        &self.inner.blas
    }

    /// Entry point `{base}_{dtype}` of kernel source `file` (looked up once per device).
    pub(crate) fn kernel(
        &self,
        file: &'static str,
        base: &'static str,
        dtype: DType,
    ) -> Result<CudaFunction> {
        let key = (file, base, dtype);
        let mut functions = self
            .inner
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(&key) {
            return Ok(f.clone());
        }
        let name = format!("{base}_{dtype}");
        let f = self
            .inner
            .modules
            .get(file)
            .ok_or_else(|| driver_error(&name, format!("{file} is not loaded")))?
            .load_function(&name)
            .map_err(|e| driver_error(&name, e))?;
        functions.insert(key, f.clone());
        Ok(f)
    }

    /// Waits until every op queued on this device has finished (and reports a failed one).
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| driver_error("synchronize", e))
    }
}

/// The PTX of `file` for `arch`, compiled once per process (every stage on a GPU opens its own
/// device, and NVRTC takes seconds for all the sources).
fn cached_ptx(file: &str, arch: &str, include: &Path) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (file.to_string(), arch.to_string());
    if let Some(ptx) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(ptx.clone());
    }
    let ptx = super::compile_ptx(file, arch, include)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, ptx.clone());
    Ok(ptx)
}
