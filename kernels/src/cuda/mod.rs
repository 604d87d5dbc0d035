//! The CUDA backend's kernels (feature `cuda`): CUDA C sources compiled at run time by NVRTC, so
//! the build needs no toolkit. `kernels/*.cu` hold the kernels (f32, bf16 and f16 entry points of
//! each, f32 arithmetic), `kernels/common.cuh` their shared device functions. [`compile`] builds
//! one source for one GPU architecture and reports, per entry point, the registers and spills
//! ptxas found: `tests/nvrtc_kernels.rs` compiles every source for sm_80 and sm_90 and fails on a
//! compile error or a spill, with no GPU (NVRTC and the headers: `tools/fetch_cuda_tools.sh`).
//! Launching them (cudarc's driver API) needs a GPU: `tools/gpu_check.sh` (issue 11).
//!
//! The backend itself: [`CudaDevice`] (context, stream, kernels, cuBLASLt), [`CudaStorage`]
//! (device memory of a tensor), the ops in `ops.rs` and the GEMM mapping in [`blas`].

use std::ffi::CString;
use std::path::Path;

use crate::{KernelError, Result};

pub mod blas;
mod device;
mod gpu_stream;
mod image_ops;
pub mod launch;
mod lt_handles;
mod ops;
pub mod plan;
mod staging;
mod storage;

pub use device::{cuda_include_dir, CudaDevice};
pub(crate) use ops::on_gpu;
pub use storage::CudaStorage;

/// The shared device code every source includes as `"common.cuh"` (it includes `"math.cuh"`).
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// The kernels' arithmetic as plain float functions (also compiled as host C++ by the tests).
pub const MATH: &str = include_str!("kernels/math.cuh");

/// Every kernel source, by file name.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("norm.cu", include_str!("kernels/norm.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    (
        "flash_attention.cu",
        include_str!("kernels/flash_attention.cu"),
    ),
    ("image.cu", include_str!("kernels/image.cu")),
];

/// The tensor-core kernels' source (needs sm_80: not loaded on older GPUs).
pub const FLASH_SOURCE: &str = "flash_attention.cu";

/// What ptxas reported for one entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryReport {
    /// The kernel's name (`extern "C"`).
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes spilled to local memory (stores + loads); 0 for a healthy kernel.
    pub spill_bytes: u32,
    /// Bytes of stack frame: local arrays the compiler could not keep in registers (a
    /// tensor-core kernel's fragments indexed at run time would land there).
    pub stack_bytes: u32,
}

/// One source compiled for one architecture.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// `sm_80`, `sm_90`, ...
    pub arch: String,
    /// The compiler's log (ptxas' per-function report included).
    pub log: String,
    /// Every entry point ptxas compiled.
    pub entries: Vec<EntryReport>,
}

fn nvrtc_error(file: &str, arch: &str, message: String) -> KernelError {
    KernelError::Nvrtc {
        file: file.to_string(),
        arch: arch.to_string(),
        message,
    }
}

/// Compiles kernel source `file` (one of [`SOURCES`]) for `arch` (`sm_80`, `sm_90`) with the
/// CUDA headers in `include` (`cuda_bf16.h`, `math_constants.h`, ...). Errors carry the
/// compiler's log; a missing libnvrtc is an error, not a panic.
pub fn compile(file: &str, arch: &str, include: &Path) -> Result<Compiled> {
    compile_source(file, source(file, arch)?, arch, include)
}

/// Kernel source `file` of [`SOURCES`].
fn source(file: &str, arch: &str) -> Result<&'static str> {
    SOURCES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, s)| *s)
        .ok_or_else(|| nvrtc_error(file, arch, "no such kernel source".into()))
}

/// `src` with its includes of the shared files resolved, once NVRTC is known to be there.
fn prepared(file: &str, src: &str, arch: &str) -> Result<String> {
    // SAFETY: only opens the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(nvrtc_error(
            file,
            arch,
            "libnvrtc.so.13 is not on the library path (tools/fetch_cuda_tools.sh fetches it)"
                .into(),
        ));
    }
    Ok(src
        .replace("#include \"common.cuh\"", COMMON)
        .replace("#include \"math.cuh\"", MATH))
}

/// [`compile`] for any source text (`#include "common.cuh"` is resolved to [`COMMON`]).
pub fn compile_source(file: &str, src: &str, arch: &str, include: &Path) -> Result<Compiled> {
    let src = prepared(file, src, arch)?;
    let (csrc, cname) = (
        CString::new(src).map_err(|e| nvrtc_error(file, arch, e.to_string()))?,
        CString::new(file).expect("file names have no NUL"),
    );
    let options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        format!("--include-path={}", include.display()),
    ];
    use cudarc::nvrtc::result;
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| nvrtc_error(file, arch, format!("{e:?}")))?;
    // SAFETY: `prog` is a live program of this call; it is destroyed below on every path.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    // SAFETY: destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    if let Err(e) = compiled {
        return Err(nvrtc_error(file, arch, format!("{e:?}\n{log}")));
    }
    Ok(Compiled {
        arch: arch.to_string(),
        entries: parse_ptxas_report(&log),
        log,
    })
}

/// PTX of kernel source `file` for virtual architecture `arch` (`compute_90`): what a GPU loads
/// (its driver finishes the compile for the exact chip).
pub fn compile_ptx(file: &str, arch: &str, include: &Path) -> Result<String> {
    let src = prepared(file, source(file, arch)?, arch)?;
    let options = cudarc::nvrtc::CompileOptions {
        arch: None,
        include_paths: vec![include.display().to_string()],
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, options)
        .map_err(|e| nvrtc_error(file, arch, format!("{e:?}")))?;
    Ok(ptx.to_src())
}

/// Entry points with their registers and spills from ptxas' `-v` report.
pub fn parse_ptxas_report(log: &str) -> Vec<EntryReport> {
    let mut entries: Vec<EntryReport> = Vec::new();
    let number_before = |line: &str, what: &str| -> Option<u32> {
        let i = line.find(what)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            entries.push(EntryReport {
                name,
                registers: 0,
                spill_bytes: 0,
                stack_bytes: 0,
            });
        } else if let Some(e) = entries.last_mut() {
            if let (Some(st), Some(ld)) = (
                number_before(line, "bytes spill stores"),
                number_before(line, "bytes spill loads"),
            ) {
                e.spill_bytes = st + ld;
            }
            if let Some(f) = number_before(line, "bytes stack frame") {
                e.stack_bytes = f;
            }
            if let Some(r) = number_before(line, "registers") {
                e.registers = r;
            }
        }
    }
    entries
}
