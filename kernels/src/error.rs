//! The kernels crate's error type.

use crate::DType;

/// Result alias of the kernels crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Everything a kernel can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// Operand shapes do not fit the op.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The op that refused.
        op: &'static str,
        /// Which shapes and why.
        detail: String,
    },
    /// The op needs another element type.
    #[error("{op}: expected dtype {expected}, got {got}")]
    DType {
        /// The op that refused.
        op: &'static str,
        /// What it accepts.
        expected: DType,
        /// What it was given.
        got: DType,
    },
    /// A tensor lives on another device than the op's.
    #[error("{op}: tensor is on {got}, op runs on {expected}")]
    DeviceMismatch {
        /// The op that refused.
        op: &'static str,
        /// The op's device.
        expected: String,
        /// The tensor's device.
        got: String,
    },
    /// No CUDA device can be used (built without the `cuda` feature, no driver, no such device,
    /// or the backend's ops are not built yet).
    #[error("CUDA device {ordinal} requested: {reason}")]
    CudaNotAvailable {
        /// Requested ordinal.
        ordinal: usize,
        /// Why not, for the user.
        reason: String,
    },
    /// A CUDA driver call failed on a GPU that is there (allocation, copy, launch).
    #[error("CUDA {op}: {message}")]
    Cuda {
        /// The call.
        op: String,
        /// The driver's error.
        message: String,
    },
    /// A CUDA kernel source did not compile (or NVRTC is missing), with the compiler's log.
    #[error("NVRTC, {file} for {arch}: {message}")]
    Nvrtc {
        /// The kernel source.
        file: String,
        /// The target architecture (`sm_90`).
        arch: String,
        /// What went wrong, and the compiler's log.
        message: String,
    },
    /// The thread pool of a CPU device could not be built.
    #[error("cannot start a CPU device with {threads} threads: {reason}")]
    ThreadPool {
        /// Requested thread count.
        threads: usize,
        /// What rayon said.
        reason: String,
    },
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Shape {
            op,
            detail: detail.into(),
        }
    }
}
