//! Device memory of a CUDA tensor: one byte buffer per tensor, tagged with its dtype. Kernels and
//! cuBLASLt take raw device pointers, so the buffer is untyped; the dtype picks the kernel's entry
//! point (`_f32`, `_bf16`, `_f16`). Cloning a tensor shares its buffer (an `Arc`); an in-place op
//! on a shared buffer copies it first (copy on write), so no clone ever sees another's writes and
//! no clone allocates (or can fail) until it is written.

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::copy::BlockCopy;
use crate::tensor::CpuStorage;
use crate::{DType, KernelError, Result};

/// A CUDA tensor's elements: `len` elements of `dtype` in device memory of GPU `ordinal`.
#[derive(Debug, Clone)]
pub struct CudaStorage {
    bytes: Arc<CudaSlice<u8>>,
    dtype: DType,
    len: usize,
}

pub(crate) fn driver_error(op: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda {
        op: op.to_string(),
        message: format!("{e:?}"),
    }
}

impl CudaStorage {
    /// Copies host elements to the GPU of `stream` (one copy of their bytes, queued: the host
    /// does not wait for it).
    pub(crate) fn upload(stream: &Arc<CudaStream>, host: &CpuStorage) -> Result<CudaStorage> {
        let (bytes, dtype, len): (&[u8], DType, usize) = match host {
            CpuStorage::F32(v) => (bytemuck::cast_slice(v), DType::F32, v.len()),
            CpuStorage::F16(v) => (bytemuck::cast_slice(v), DType::F16, v.len()),
            CpuStorage::BF16(v) => (bytemuck::cast_slice(v), DType::BF16, v.len()),
        };
        // Through page-locked staging (`staging.rs`); an empty tensor keeps one byte.
        let slice = super::staging::upload(stream, bytes)?;
        Ok(CudaStorage {
            bytes: Arc::new(slice),
            dtype,
            len,
        })
    }

    /// Host elements copied to the GPU (and stream) that holds `self`.
    pub(crate) fn upload_beside(&self, host: &CpuStorage) -> Result<CudaStorage> {
        Self::upload(self.bytes.stream(), host)
    }

    /// `len` zeroed elements of `dtype` on the GPU (and stream) that holds `self`.
    pub(crate) fn zeros_beside(&self, dtype: DType, len: usize) -> Result<CudaStorage> {
        Self::zeros(self.bytes.stream(), dtype, len)
    }

    /// `len` elements of `dtype` beside `self`, not initialised: for an output the caller
    /// overwrites entirely before anything reads it (see [`CudaStorage::uninit`]).
    pub(crate) fn uninit_beside(&self, dtype: DType, len: usize) -> Result<CudaStorage> {
        Self::uninit(self.bytes.stream(), dtype, len)
    }

    /// The block copy `copy` (elements, checked by the caller to fit both sides) from `src` on
    /// this GPU into `self`, one 2-D copy per batch on `self`'s stream.
    pub(crate) fn copy_block_from(&mut self, src: &CudaStorage, copy: &BlockCopy) -> Result<()> {
        let size = self.dtype.size_in_bytes();
        if copy.batches == 0 || copy.rows == 0 || copy.width == 0 {
            return Ok(());
        }
        let stream = self.bytes.stream().clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("copy_block", e))?;
        let (s, _gs) = src.ptr(&stream);
        let (d, _gd) = self.ptr_mut(&stream)?;
        let width = copy.width * size;
        for b in 0..copy.batches {
            let (src_at, dst_at) = (
                s + ((copy.src.offset + b * copy.src.batch) * size) as u64,
                d + ((copy.dst.offset + b * copy.dst.batch) * size) as u64,
            );
            if copy.rows == 1 {
                // One run: a plain copy (a 2-D copy's pitch is limited to ~2 GiB).
                // SAFETY: both runs lie inside their buffers (`BlockCopy::fits`).
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst_at,
                        src_at,
                        width,
                        stream.cu_stream(),
                    )
                }
                .map_err(|e| driver_error("copy_block", e))?;
                continue;
            }
            let params = sys::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: src_at,
                srcArray: std::ptr::null_mut(),
                srcPitch: copy.src.row * size,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: dst_at,
                dstArray: std::ptr::null_mut(),
                dstPitch: copy.dst.row * size,
                WidthInBytes: width,
                Height: copy.rows,
            };
            // SAFETY: both regions were checked to lie inside their buffers (`BlockCopy::fits`);
            // the guards keep both buffers alive and ordered on this stream.
            unsafe { sys::cuMemcpy2DAsync_v2(&params, stream.cu_stream()) }
                .result()
                .map_err(|e| driver_error("copy_block", e))?;
        }
        Ok(())
    }

    /// `len` elements of `dtype` on the GPU of `stream`, not initialised (no memset): only for
    /// an output that a kernel, GEMM (beta 0) or block copy writes entirely before anything reads
    /// it. The emulated kernel tests poison such outputs with NaN, so a kernel that leaves an
    /// element unwritten fails them.
    pub(crate) fn uninit(
        stream: &Arc<CudaStream>,
        dtype: DType,
        len: usize,
    ) -> Result<CudaStorage> {
        let n = (len * dtype.size_in_bytes()).max(1);
        // SAFETY: the bytes are plain data (any bit pattern is a valid u8), and the callers write
        // every element before reading (above).
        let slice = unsafe { stream.alloc::<u8>(n) }.map_err(|e| driver_error("alloc", e))?;
        Ok(CudaStorage {
            bytes: Arc::new(slice),
            dtype,
            len,
        })
    }

    /// `len` elements of `dtype`, zeroed, on the GPU of `stream`.
    pub(crate) fn zeros(stream: &Arc<CudaStream>, dtype: DType, len: usize) -> Result<CudaStorage> {
        let n = (len * dtype.size_in_bytes()).max(1);
        let slice = stream
            .alloc_zeros::<u8>(n)
            .map_err(|e| driver_error("alloc", e))?;
        Ok(CudaStorage {
            bytes: Arc::new(slice),
            dtype,
            len,
        })
    }

    /// Copies the elements back to host memory (waits for the GPU's work on them).
    pub(crate) fn download(&self) -> Result<CpuStorage> {
        let n = self.len * self.dtype.size_in_bytes();
        let bytes = super::staging::download(&self.bytes, n)?;
        let bytes = &bytes[..];
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
        })
    }

    /// Element type.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The GPU holding the elements.
    pub(crate) fn ordinal(&self) -> usize {
        self.bytes.ordinal()
    }

    /// The device pointer for reading on `stream`; keep the guard until the read is scheduled.
    pub(crate) fn ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.bytes.device_ptr(stream)
    }

    /// The device pointer for writing on `stream`, after copying a shared buffer (copy on
    /// write); keep the guard until the write is scheduled.
    pub(crate) fn ptr_mut<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        if Arc::get_mut(&mut self.bytes).is_none() {
            let copy = self
                .bytes
                .try_clone()
                .map_err(|e| driver_error("copy on write", e))?;
            self.bytes = Arc::new(copy);
        }
        let bytes = Arc::get_mut(&mut self.bytes).expect("unshared after the copy above");
        Ok(bytes.device_ptr_mut(stream))
    }
}
