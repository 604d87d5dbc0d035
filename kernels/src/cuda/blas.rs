//! GEMMs through cuBLASLt. The row-major products of the model are mapped to cuBLASLt's
//! column-major convention by [`linear_plan`], a pure function that the tests check on the CPU
//! against an emulation of cuBLASLt's definition (no GPU needed for the transposes and leading
//! dimensions, the part that is easy to get wrong). Compute is f32 for every dtype (f32 inputs:
//! `CUBLAS_COMPUTE_32F`, no TF32, so f32 results match the CPU to ~1e-6; bf16 / f16 inputs: f32
//! accumulation), the bias is fused as cuBLASLt's epilogue. cudarc's safe wrapper is not used:
//! it picks TF32 for f32 and panics when a descriptor fails to free.

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream};

use super::storage::driver_error;
use crate::{DType, KernelError, Result};

/// One cuBLASLt call in its own terms: `D (m x n) = op(A) (m x k) . op(B) (k x n)`, every matrix
/// column-major with its leading dimension; `op` transposes when `trans*` is set, and a bias of
/// `m` elements is added to every column of `D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    /// `op(A) = A^T`.
    pub transa: bool,
    /// `op(B) = B^T`.
    pub transb: bool,
    /// Rows of `D`.
    pub m: u64,
    /// Columns of `D`.
    pub n: u64,
    /// The summed dimension.
    pub k: u64,
    /// Leading dimension of A as stored.
    pub lda: i64,
    /// Leading dimension of B as stored.
    pub ldb: i64,
    /// Leading dimension of D.
    pub ldc: i64,
}

impl ColumnMajorGemm {
    /// (rows, columns) of A as stored.
    pub fn a_stored(&self) -> (u64, u64) {
        if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// (rows, columns) of B as stored.
    pub fn b_stored(&self) -> (u64, u64) {
        if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }
}

/// The cuBLASLt call for the row-major linear layer `Y[rows, n] = X[rows, k] . W[n, k]^T + b[n]`
/// with A = W and B = X: column-major, `Y^T (n x rows) = W (k x n as stored, transposed) .
/// X^T (k x rows as stored)`, so the bias (one per output feature) is cuBLASLt's per-row bias.
pub fn linear_plan(rows: usize, k: usize, n: usize) -> ColumnMajorGemm {
    ColumnMajorGemm {
        transa: true,
        transb: false,
        m: n as u64,
        n: rows as u64,
        k: k as u64,
        lda: k as i64,
        ldb: k as i64,
        ldc: n as i64,
    }
}

fn blas_error(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda {
        op: format!("cuBLASLt {what}"),
        message: format!("{e:?}"),
    }
}

fn data_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// A cuBLASLt handle and its workspace, bound to one device's stream.
#[derive(Debug)]
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is only used with the device's one stream, behind the device's mutex-free
// single compute thread or `&self` calls that cuBLASLt documents as thread safe per handle.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

/// Workspace for cuBLASLt's algorithms (NVIDIA recommends 32 MiB on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

impl Blas {
    /// A handle on `stream`'s device (libcublasLt must be on the library path: checked first).
    pub(crate) fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Blas> {
        // SAFETY: only opens the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(blas_error(
                "init",
                "libcublasLt.so.13 is not on the library path",
            ));
        }
        let handle = std::panic::catch_unwind(result::create_handle)
            .map_err(|_| blas_error("init", "the library could not be loaded"))?
            .map_err(|e| blas_error("init", e))?;
        let workspace = match stream.alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created above, not shared.
                let _ = unsafe { result::destroy_handle(handle) };
                return Err(driver_error("cuBLASLt workspace", e));
            }
        };
        Ok(Blas { handle, workspace })
    }

    /// `D = op(A) op(B) (+ bias)` of `dtype` elements with f32 compute.
    ///
    /// # Safety
    /// `a`, `b`, `d` (and `bias`) must be device pointers of this device holding the matrices
    /// `plan` describes (bias: `plan.m` elements), all of `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm(
        &self,
        stream: &CudaStream,
        plan: ColumnMajorGemm,
        dtype: DType,
        a: u64,
        b: u64,
        d: u64,
        bias: Option<u64>,
    ) -> Result<()> {
        // The raw cuBLASLt call needs this GPU's context current on this thread.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("cuBLASLt context", e))?;
        let ty = data_type(dtype);
        let desc = Desc::new(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F)?;
        let op = |t: bool| t as i32;
        use sys::cublasLtMatmulDescAttributes_t as A;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op(plan.transa))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op(plan.transb))?;
        let epilogue = match bias {
            Some(ptr) => {
                desc.set(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            }
            None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
        };
        desc.set(A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        let (ar, ac) = plan.a_stored();
        let (br, bc) = plan.b_stored();
        let la = Layout::new(ty, ar, ac, plan.lda)?;
        let lb = Layout::new(ty, br, bc, plan.ldb)?;
        let ld = Layout::new(ty, plan.m, plan.n, plan.ldc)?;
        let pref = Pref::new()?;
        let size = WORKSPACE_BYTES as u64;
        // SAFETY: a live preference descriptor and a u64 attribute.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &size as *const u64 as *const c_void,
                size_of::<u64>(),
            )
        }
        .map_err(|e| blas_error("preference", e))?;
        // SAFETY: live descriptors of this call.
        let heuristic = unsafe {
            result::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, ld.0, ld.0, pref.0)
        }
        .map_err(|e| blas_error(&format!("no algorithm for {plan:?} in {dtype}"), e))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w, _guard) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, stream);
        // SAFETY: the caller's pointers (see above) and live descriptors; D is written in place.
        unsafe {
            result::matmul(
                self.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                la.0,
                b as *const c_void,
                lb.0,
                d as *const c_void,
                ld.0,
                d as *mut c_void,
                ld.0,
                &heuristic.algo,
                w as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error("matmul", e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// A matmul descriptor, freed on drop (errors on free are ignored, never a panic).
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn new(compute: sys::cublasComputeType_t) -> Result<Desc> {
        result::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)
            .map(Desc)
            .map_err(|e| blas_error("descriptor", e))
    }

    fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
        // SAFETY: a live descriptor; `value` is the attribute's type (i32 / enum / pointer).
        unsafe {
            result::set_matmul_desc_attribute(
                self.0,
                attr,
                value as *const T as *const c_void,
                size_of::<T>(),
            )
        }
        .map_err(|e| blas_error(&format!("{attr:?}"), e))
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

/// A matrix layout, freed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(ty: sys::cudaDataType, rows: u64, cols: u64, ld: i64) -> Result<Layout> {
        result::create_matrix_layout(ty, rows, cols, ld)
            .map(Layout)
            .map_err(|e| blas_error("layout", e))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

/// A heuristic preference, freed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    fn new() -> Result<Pref> {
        result::create_matmul_pref()
            .map(Pref)
            .map_err(|e| blas_error("preference", e))
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}
