//! cuBLASLt's descriptors as owned values, each freed on drop (an error on free is ignored, never
//! a panic: cudarc's safe wrapper panics there).

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::{result, sys};

use super::blas::blas_error;
use crate::Result;

/// A matmul descriptor, freed on drop (errors on free are ignored, never a panic).
pub(super) struct Desc(pub(super) sys::cublasLtMatmulDesc_t);

impl Desc {
    pub(super) fn new(compute: sys::cublasComputeType_t) -> Result<Desc> {
        result::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)
            .map(Desc)
            .map_err(|e| blas_error("descriptor", e))
    }

    pub(super) fn set<T>(
        &self,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: &T,
    ) -> Result<()> {
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
pub(super) struct Layout(pub(super) sys::cublasLtMatrixLayout_t);

impl Layout {
    pub(super) fn new(ty: sys::cudaDataType, rows: u64, cols: u64, ld: i64) -> Result<Layout> {
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
pub(super) struct Pref(pub(super) sys::cublasLtMatmulPreference_t);

impl Pref {
    pub(super) fn new() -> Result<Pref> {
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

impl Pref {
    pub(super) fn set<T>(
        &self,
        attr: sys::cublasLtMatmulPreferenceAttributes_t,
        value: &T,
    ) -> Result<()> {
        // SAFETY: a live preference descriptor; `value` is the attribute's type (u64 / u32).
        unsafe {
            result::set_matmul_pref_attribute(
                self.0,
                attr,
                value as *const T as *const c_void,
                size_of::<T>(),
            )
        }
        .map_err(|e| blas_error(&format!("{attr:?}"), e))
    }
}
