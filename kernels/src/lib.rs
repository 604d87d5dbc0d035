//! Tensors and the operations a Diffusion Transformer and its VAE decoder need, on a CPU backend
//! that is always built and (later) a CUDA backend behind the `cuda` feature.
//!
//! Key types: [`Tensor`] (contiguous row-major storage plus a shape), [`Device`] (where ops run and
//! on how many threads), [`DType`].
//!
//! # Design
//! Every op is a method of [`Device`] and dispatches with one `match` on the device; callers never
//! see which backend ran. The CPU backend computes in `f32` (f16 / bf16 tensors are converted at
//! load: no CPU GEMM crate offers bf16 yet). Each fast CPU kernel has a slow, obviously-correct
//! reference beside it (`*_slow`), and `tests/ops.rs` checks one against the other.
//!
//! A CPU device owns a rayon thread pool; its ops (GEMMs included) run only on that pool, so two
//! devices in one process with one thread each never compete for each other's threads.
//!
//! The CUDA backend's ops are not built yet: [`Device::cuda`] returns
//! [`KernelError::CudaNotAvailable`] saying why (no `cuda` feature, no driver, no such device, or
//! not implemented); [`cuda_devices`] lists the visible GPUs without ever panicking.
//! The storage enum already has its CUDA arm (an uninhabited type), so adding the backend changes
//! no caller.
//!
//! # Invariant
//! Tensors are always contiguous and row-major; ops never panic on bad shapes but return
//! [`KernelError::Shape`] naming the op and the shapes.

mod copy;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod cuda_probe;
#[cfg(not(feature = "cuda"))]
mod cuda_stub;
#[cfg(feature = "cuda")]
use cuda::{on_gpu, CudaDevice, CudaStorage};
#[cfg(not(feature = "cuda"))]
use cuda_stub::{on_gpu, CudaDevice, CudaStorage};
mod device;
mod dtype;
mod error;
mod host_bytes;
mod host_memory;
mod tensor;
pub mod ulysses;

pub use copy::{BlockCopy, Strides};
pub use cpu::attention::f32_attention_path;
pub use cpu::bf16_gemm::{
    bf16_bits, bf16_gemm_path, bf16_kernel, bf16_to_f32, bf16_weight_bytes, PackedBf16,
};
pub use cpu::f32_gemm::{
    f32_gemm_avx512, f32_gemm_packed, f32_gemm_path, f32_kernel, F32Kernel, PackedF32,
};
pub use cpu::math::{exp_fast, gelu_tanh_scalar};
pub use cpu::CpuDevice;
pub use cuda_probe::{cuda_devices, cuda_libraries, CudaDeviceInfo};
pub use device::AttnView;
pub use device::Device;
pub use dtype::DType;
pub use error::{KernelError, Result};
pub use host_memory::{host_memory, HostMemory, MemoryLimit};
pub use tensor::{CpuStorage, Storage, Tensor};

/// Slow reference implementations of every fast op, for tests and validation harnesses.
pub mod reference {
    pub use crate::cpu::activation::{gelu_tanh_slow, silu_slow};
    pub use crate::cpu::attention::{
        attention_slow, merge_partial_slow, AttnInput as SlowAttnInput,
    };
    pub use crate::cpu::bf16_gemm::linear_bf16_slow;
    pub use crate::cpu::conv::{
        conv2d_slow, transpose_last2_slow, upsample_nearest2x_slow, ConvGeom,
    };
    pub use crate::cpu::matmul::linear_slow;
    pub use crate::cpu::norm::{
        group_norm_slow, layer_norm_modulate_slow, layer_norm_slow, rms_norm_groups_slow,
    };
    pub use crate::cpu::rotary::rope_slow;
}
