//! The CUDA backend's types until its ops exist: `CudaStorage` is uninhabited, so every `match`
//! arm on it is statically dead, and `CudaDevice::new` reports why no CUDA device can be used:
//! no `cuda` feature, no driver, no such device, or (with a GPU) that the ops are not built yet.
//! The real backend (cudarc, runtime-loaded; NVRTC kernels) replaces this module with the same
//! names (issue 11).

use crate::{KernelError, Result};

/// Device memory of a CUDA tensor (cannot exist in this build).
#[derive(Debug, Clone)]
pub enum CudaStorage {}

/// A CUDA GPU (cannot exist in this build).
#[derive(Debug, Clone)]
pub enum CudaDevice {}

impl CudaDevice {
    /// Always fails, saying why (see the module documentation); never panics.
    pub(crate) fn new(ordinal: usize) -> Result<CudaDevice> {
        let reason = match crate::cuda_probe::cuda_devices() {
            Err(why) => why,
            Ok(devices) => match devices.get(ordinal) {
                None => format!(
                    "{} CUDA device(s) are visible (ordinals 0..{})",
                    devices.len(),
                    devices.len()
                ),
                Some(d) => format!(
                    "{} is visible, but this build's CUDA ops are not implemented yet (issue 11); \
                     use a cpu device",
                    d.name
                ),
            },
        };
        Err(KernelError::CudaNotAvailable { ordinal, reason })
    }
}
