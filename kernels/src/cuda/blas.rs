//! GEMMs through cuBLASLt. The row-major products of the model are mapped to cuBLASLt's
//! column-major convention by [`linear_plan`], a pure function that the tests check on the CPU
//! against an emulation of cuBLASLt's definition (no GPU needed for the transposes and leading
//! dimensions, the part that is easy to get wrong). Compute is f32 for every dtype (f32 inputs:
//! `CUBLAS_COMPUTE_32F`, no TF32, so f32 results match the CPU to ~1e-6; bf16 / f16 inputs: f32
//! accumulation), the bias is fused as cuBLASLt's epilogue. cudarc's safe wrapper is not used:
//! it picks TF32 for f32 and panics when a descriptor fails to free.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream};

use super::lt_handles::{Desc, Layout, Pref};
use super::storage::driver_error;
use crate::{DType, KernelError, Result};

/// One cuBLASLt call in its own terms: `D (m x n) = op(A) (m x k) . op(B) (k x n)`, every matrix
/// column-major with its leading dimension; `op` transposes when `trans*` is set, and a bias of
/// `m` elements is added to every column of `D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

pub(super) fn blas_error(what: &str, e: impl std::fmt::Debug) -> KernelError {
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

/// What a GEMM's epilogue applies to `op(A) op(B) (+ bias)` as it writes D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Nothing.
    Identity,
    /// GELU, tanh approximation (cuBLASLt's GELU epilogue: PyTorch's `_addmm_activation`
    /// falls back to `gelu(approximate="tanh")` where it cannot use it; checked on a GPU by
    /// gpu_check's `linear gelu` against the CPU's tanh GELU at 1e-5 in f32, which the erf form
    /// would miss by ~1e-3).
    GeluTanh,
}

/// cuBLASLt's epilogue for a bias (or none) and an activation.
pub fn epilogue(bias: bool, activation: Activation) -> sys::cublasLtEpilogue_t {
    use sys::cublasLtEpilogue_t as E;
    match (bias, activation) {
        (false, Activation::Identity) => E::CUBLASLT_EPILOGUE_DEFAULT,
        (true, Activation::Identity) => E::CUBLASLT_EPILOGUE_BIAS,
        (false, Activation::GeluTanh) => E::CUBLASLT_EPILOGUE_GELU,
        (true, Activation::GeluTanh) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
    }
}

/// The largest power of two up to 256 that divides every address: the alignment cuBLASLt's
/// heuristic may assume of the operands (its default preference is 256 bytes; a narrower
/// operand needs a plan chosen for it).
pub fn common_alignment(addresses: &[u64]) -> u32 {
    addresses.iter().fold(256u32, |align, &a| {
        align.min(1 << a.trailing_zeros().min(8))
    })
}

/// What makes a GEMM's descriptors and algorithm reusable: everything but the pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    plan: ColumnMajorGemm,
    dtype: DType,
    bias: bool,
    activation: Activation,
    align: u32,
}

/// The descriptors and the heuristic's algorithm of one [`PlanKey`], made once.
struct Prepared {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// Prepared plans kept per handle; past this many (shapes change with every patch count and
/// batch, but a run has few) the cache starts over.
const MAX_PLANS: usize = 512;

/// A cuBLASLt handle, its workspace, and the plans prepared so far. A model's forward runs the
/// same few shapes again and again: creating four descriptors and asking the heuristic for an
/// algorithm costs tens of microseconds a call, as much as a small GEMM itself, so each shape's
/// are made once and only the pointers change between calls.
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<PlanKey, Prepared>>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").finish_non_exhaustive()
    }
}

// SAFETY: the handle and the prepared descriptors are only used with the device's one stream,
// and the descriptors only under the `plans` mutex (a bias pointer is set, then the call made).
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
        Ok(Blas {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `D = activation(op(A) op(B) (+ bias))` of `dtype` elements with f32 compute.
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
        (a, b, d): (u64, u64, u64),
        bias: Option<u64>,
        activation: Activation,
    ) -> Result<()> {
        // The raw cuBLASLt calls need this GPU's context current on this thread.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("cuBLASLt context", e))?;
        let key = PlanKey {
            plan,
            dtype,
            bias: bias.is_some(),
            activation,
            align: common_alignment(&[a, b, d]),
        };
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if !plans.contains_key(&key) {
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
            let prepared = self.prepare(&key, bias)?;
            plans.insert(key, prepared);
        }
        let p = &plans[&key];
        if let Some(ptr) = bias {
            p.desc.set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &ptr,
            )?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w, _guard) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, stream);
        // SAFETY: the caller's pointers (see above) and live descriptors; D is written in place.
        unsafe {
            result::matmul(
                self.handle,
                p.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                p.a.0,
                b as *const c_void,
                p.b.0,
                d as *const c_void,
                p.d.0,
                d as *mut c_void,
                p.d.0,
                &p.algo,
                w as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error("matmul", e))
    }

    /// The descriptors of `key` and the heuristic's best algorithm for them (`bias`: the first
    /// call's bias, set before the query as cuBLASLt's samples do).
    fn prepare(&self, key: &PlanKey, bias: Option<u64>) -> Result<Prepared> {
        let PlanKey { plan, dtype, .. } = *key;
        let ty = data_type(dtype);
        let desc = Desc::new(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F)?;
        let op = |t: bool| t as i32;
        use sys::cublasLtMatmulDescAttributes_t as A;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op(plan.transa))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op(plan.transb))?;
        if let Some(ptr) = bias {
            desc.set(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
        }
        desc.set(
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue(key.bias, key.activation),
        )?;
        let (ar, ac) = plan.a_stored();
        let (br, bc) = plan.b_stored();
        let a = Layout::new(ty, ar, ac, plan.lda)?;
        let b = Layout::new(ty, br, bc, plan.ldb)?;
        let d = Layout::new(ty, plan.m, plan.n, plan.ldc)?;
        let pref = Pref::new()?;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        pref.set(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &(WORKSPACE_BYTES as u64),
        )?;
        for attr in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            pref.set(attr, &key.align)?;
        }
        // SAFETY: live descriptors of this plan.
        let heuristic = unsafe {
            result::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }
        .map_err(|e| blas_error(&format!("no algorithm for {key:?}"), e))?;
        Ok(Prepared {
            desc,
            a,
            b,
            d,
            algo: heuristic.algo,
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // The prepared descriptors first (they do not refer to the handle, but go with it).
        self.plans
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}
