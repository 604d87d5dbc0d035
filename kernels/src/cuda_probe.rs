//! What CUDA this process can reach, asked without ever panicking: cudarc's loader panics when a
//! library is absent (DEPENDENCIES.md section 4), so every library's presence is checked first and
//! every driver call runs under `catch_unwind`. Built without the `cuda` feature, the answer is
//! that this binary has no CUDA backend.

/// One visible CUDA GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// Device ordinal (`kind = "cuda", index = N` in a topology).
    pub ordinal: usize,
    /// The driver's name for it.
    pub name: String,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Compute capability (major, minor): 8.0 is A100, 9.0 H100 / H200.
    pub compute_capability: (i32, i32),
}

/// The CUDA libraries this build loads at run time, and whether each is on the library path
/// (empty without the `cuda` feature).
pub fn cuda_libraries() -> Vec<(&'static str, bool)> {
    imp::libraries()
}

/// The visible CUDA GPUs, or why there are none (this build has no CUDA backend; no driver
/// library; the driver's error; no device), as a sentence for the user.
pub fn cuda_devices() -> std::result::Result<Vec<CudaDeviceInfo>, String> {
    imp::devices()
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub(super) fn libraries() -> Vec<(&'static str, bool)> {
        Vec::new()
    }

    pub(super) fn devices() -> Result<Vec<super::CudaDeviceInfo>, String> {
        Err(
            "this binary was built without the `cuda` feature (cargo build --release --features \
             cuda)"
                .into(),
        )
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use cudarc::driver::CudaContext;

    use super::CudaDeviceInfo;

    pub(super) fn libraries() -> Vec<(&'static str, bool)> {
        // SAFETY: these only try to open the shared libraries (dlopen), they call nothing in them.
        unsafe {
            vec![
                ("libcuda (driver)", cudarc::driver::sys::is_culib_present()),
                ("libcublas", cudarc::cublas::sys::is_culib_present()),
                ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
                ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ]
        }
    }

    /// Runs a driver call, turning a loader panic into an error.
    fn guarded<T>(
        what: &str,
        f: impl FnOnce() -> Result<T, cudarc::driver::DriverError>,
    ) -> Result<T, String> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{what}: {e:?}")),
            Err(_) => Err(format!(
                "{what}: the CUDA driver library could not be used (a symbol is missing: is the \
                 driver older than CUDA 13?)"
            )),
        }
    }

    pub(super) fn devices() -> Result<Vec<CudaDeviceInfo>, String> {
        // SAFETY: only opens the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(
                "no CUDA driver found: libcuda.so.1 is not on the library path (install \
                        the NVIDIA driver, or run on a machine with a GPU)"
                    .into(),
            );
        }
        let count = guarded("cuDeviceGetCount", CudaContext::device_count)?;
        (0..count.max(0) as usize)
            .map(|ordinal| {
                let ctx = guarded(&format!("device {ordinal}"), || CudaContext::new(ordinal))?;
                Ok(CudaDeviceInfo {
                    ordinal,
                    name: guarded("name", || ctx.name())?,
                    total_memory: guarded("memory", || ctx.total_mem())?,
                    compute_capability: guarded("compute capability", || ctx.compute_capability())?,
                })
            })
            .collect()
    }
}
