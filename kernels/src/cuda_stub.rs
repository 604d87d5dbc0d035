//! The CUDA backend's types as seen by a build without it: `CudaStorage` is uninhabited, so every
//! `match` arm on it is statically dead, and `CudaDevice::new` reports that CUDA is unavailable.
//! The real backend (cudarc, runtime-loaded; NVRTC kernels) replaces this module behind the `cuda`
//! feature with the same names.

use crate::{KernelError, Result};

/// Device memory of a CUDA tensor (cannot exist in this build).
#[derive(Debug, Clone)]
pub enum CudaStorage {}

/// A CUDA GPU (cannot exist in this build).
#[derive(Debug, Clone)]
pub enum CudaDevice {}

impl CudaDevice {
    /// Always fails: this build has no CUDA backend.
    pub(crate) fn new(ordinal: usize) -> Result<CudaDevice> {
        Err(KernelError::CudaNotAvailable { ordinal })
    }
}
