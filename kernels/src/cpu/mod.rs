//! The CPU backend: a rayon pool per device and the f32 kernels it runs.

pub(crate) mod activation;
pub(crate) mod aligned;
#[cfg(target_arch = "x86_64")]
mod amx;
pub(crate) mod attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod attention_bf16;
#[cfg(test)]
mod attention_check;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16_attention;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16_tile;
pub(crate) mod bf16_gemm;
pub(crate) mod bf16_io;
pub(crate) mod conv;
pub(crate) mod f32_gemm;
#[cfg(target_arch = "x86_64")]
mod f32_tile;
#[cfg(target_arch = "x86_64")]
pub(crate) mod fma_attention;
#[cfg(target_arch = "x86_64")]
mod fma_gemm;
#[cfg(target_arch = "x86_64")]
mod fma_math;
#[cfg(target_arch = "x86_64")]
mod fma_tile;
pub(crate) mod layout;
pub(crate) mod math;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod rotary;
pub(crate) mod vector_math;

use std::sync::Arc;

/// `len` values in `[-amp, amp)` from a xorshift generator on `seed`: the CPU kernels' unit
/// tests' inputs (no dependency, the same values on every host).
#[cfg(test)]
pub(crate) fn test_values(seed: &mut u64, len: usize, amp: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * amp
        })
        .collect()
}

use crate::{KernelError, Result};

/// A CPU device: a thread pool of a fixed size on which all of its ops run.
#[derive(Clone)]
pub struct CpuDevice {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    /// Attention's products in bf16 ([`CpuDevice::with_bf16_attention`]).
    bf16_attention: bool,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cpu({} threads)", self.threads)?;
        if self.bf16_attention {
            write!(f, " bf16")?;
        }
        Ok(())
    }
}

impl CpuDevice {
    /// The most threads one CPU device may have. More than any CPU socket sold today has
    /// hardware threads; a larger figure is a typo (issue 16 group 6: `--threads 100000` spawned
    /// them all and ran on, `4294967296` failed after 53 s with EAGAIN).
    pub const MAX_THREADS: usize = 1024;

    /// A device with its own pool of `threads` threads (at least 1, at most
    /// [`CpuDevice::MAX_THREADS`]).
    pub fn new(threads: usize) -> Result<CpuDevice> {
        let threads = threads.max(1);
        if threads > Self::MAX_THREADS {
            return Err(KernelError::ThreadPool {
                threads,
                reason: format!(
                    "at most {} threads per CPU device (this machine has {} hardware threads)",
                    Self::MAX_THREADS,
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                ),
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pipefuse-cpu-{i}"))
            .build()
            .map_err(|e| KernelError::ThreadPool {
                threads,
                reason: e.to_string(),
            })?;
        Ok(CpuDevice {
            pool: Arc::new(pool),
            threads,
            bf16_attention: false,
        })
    }

    /// The same device (same pool) with attention's two products (`Q K^T`, `P V`) rounding
    /// their operands to bf16 and accumulating in f32, as a bf16 model's attention does: only
    /// where the CPU has a bf16 kernel (AMX-BF16 or AVX512-BF16: [`crate::bf16_gemm_path`]);
    /// elsewhere attention stays f32 (the same numbers as the f32 device).
    pub fn with_bf16_attention(mut self, on: bool) -> CpuDevice {
        self.bf16_attention = on && bf16_gemm::bf16_kernel();
        self
    }

    /// Whether attention runs in bf16 here (see [`CpuDevice::with_bf16_attention`]).
    pub fn bf16_attention(&self) -> bool {
        self.bf16_attention
    }

    /// Number of threads of this device.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on this device's pool (nested calls from inside the pool run directly).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}
