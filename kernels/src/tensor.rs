//! The tensor type: contiguous row-major storage plus a shape.

use half::{bf16, f16};

use crate::{on_gpu, BlockCopy, CudaStorage, DType, Device, KernelError, Result};

/// Host memory of a tensor, one variant per dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    /// f32 elements (the CPU compute type).
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

/// Where a tensor's elements live. Dispatch over backends is one `match` on this enum.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// Device memory of a CUDA GPU (uninhabited in a build without the `cuda` feature).
    Cuda(CudaStorage),
}

/// A contiguous, row-major n-dimensional array.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl CpuStorage {
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
        }
    }
}

impl Tensor {
    /// A host f32 tensor from its elements. Errors when `data.len()` is not the shape's product.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Self::from_cpu(CpuStorage::F32(data), shape)
    }

    /// A host tensor of any dtype from its storage.
    pub fn from_cpu(storage: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if storage.len() != n {
            return Err(KernelError::shape(
                "from_vec",
                format!(
                    "{} elements cannot have shape {:?} ({} elements)",
                    storage.len(),
                    shape,
                    n
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(storage),
        })
    }

    /// A host f32 tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::F32(vec![0.0; n])),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Size of dimension `i` (negative counts from the end is not supported; use `shape()`).
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// The storage (for backends).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    /// A tensor of `shape` over a backend's storage; errors when the element counts differ.
    pub(crate) fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let (n, len) = (shape.iter().product::<usize>(), storage_len(&storage));
        if n != len {
            return Err(KernelError::shape(
                "from_storage",
                format!("{len} elements cannot have shape {shape:?}"),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// Whether the elements are in host memory (else on a GPU: [`Tensor::to_host`]).
    pub fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Cpu(_))
    }

    /// The tensor in host memory: itself when it is there, else a copy from its GPU (which waits
    /// for the GPU's queued work on it).
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Cpu(_) => Ok(self.clone()),
            Storage::Cuda(s) => Ok(Tensor {
                shape: self.shape.clone(),
                storage: Storage::Cpu(s.download()?),
            }),
        }
    }

    /// [`to_device`](Self::to_device) without a copy when the tensor is there already.
    pub fn into_device(self, device: &Device) -> Result<Tensor> {
        match (&self.storage, device) {
            (Storage::Cpu(_), Device::Cpu(_)) => Ok(self),
            _ => self.to_device(device),
        }
    }

    /// The tensor where `device` computes: host memory for a CPU device, that GPU's memory for
    /// a CUDA device (a copy unless it is there already; same dtype).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu(_) => self.to_host(),
            Device::Cuda(c) => c.upload(self),
        }
    }

    /// Same elements, new shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(KernelError::shape(
                "reshape",
                format!("cannot reshape {:?} to {:?}", self.shape, shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The f32 elements of a host tensor.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            Storage::Cpu(s) => Err(KernelError::DType {
                op: "as_f32",
                expected: DType::F32,
                got: s.dtype(),
            }),
            Storage::Cuda(s) => Err(on_gpu("as_f32", s)),
        }
    }

    /// The f32 elements of a host tensor, mutably.
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            Storage::Cpu(s) => Err(KernelError::DType {
                op: "as_f32_mut",
                expected: DType::F32,
                got: s.dtype(),
            }),
            Storage::Cuda(s) => Err(on_gpu("as_f32_mut", s)),
        }
    }

    /// Copies the elements to a host `Vec<f32>`, converting from f16 / bf16 (from a GPU tensor:
    /// a download, which can fail).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        let downloaded;
        let host = match &self.storage {
            Storage::Cpu(c) => c,
            Storage::Cuda(s) => {
                downloaded = s.download()?;
                &downloaded
            }
        };
        Ok(match host {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        })
    }

    /// Converts to another dtype (rounding to nearest even), in host memory; a GPU tensor is
    /// converted on the way back to its GPU (through host memory: a load-time operation).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let v = self.to_vec_f32()?;
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        let host = Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(storage),
        };
        match (&self.storage, host.storage) {
            (Storage::Cuda(s), Storage::Cpu(c)) => Ok(Tensor {
                shape: host.shape,
                storage: Storage::Cuda(s.upload_beside(&c)?),
            }),
            (_, storage) => Ok(Tensor {
                shape: host.shape,
                storage,
            }),
        }
    }

    /// A tensor of `shape` beside this one that the caller overwrites entirely (narrow, cat):
    /// zeros on the host, uninitialised memory on a GPU (no memset).
    fn overwritten_beside(&self, shape: &[usize]) -> Result<Tensor> {
        match &self.storage {
            Storage::Cuda(s) => Ok(Tensor {
                shape: shape.to_vec(),
                storage: Storage::Cuda(s.uninit_beside(s.dtype(), shape.iter().product())?),
            }),
            Storage::Cpu(_) => self.zeros_beside(shape),
        }
    }

    /// Zeros of `shape` with this tensor's dtype, where this tensor is (host or its GPU).
    pub fn zeros_beside(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let storage = match &self.storage {
            Storage::Cpu(CpuStorage::F32(_)) => Storage::Cpu(CpuStorage::F32(vec![0.0; n])),
            Storage::Cpu(CpuStorage::F16(_)) => Storage::Cpu(CpuStorage::F16(vec![f16::ZERO; n])),
            Storage::Cpu(CpuStorage::BF16(_)) => {
                Storage::Cpu(CpuStorage::BF16(vec![bf16::ZERO; n]))
            }
            Storage::Cuda(s) => Storage::Cuda(s.zeros_beside(s.dtype(), n)?),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// Copies rows `start..start + len` of dimension `dim` into a new tensor (any dtype, on the
    /// tensor's device).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.shape.len() || start.checked_add(len).is_none_or(|e| e > self.shape[dim]) {
            return Err(KernelError::shape(
                "narrow",
                format!(
                    "rows {start}..{} of dim {dim} out of range for {:?}",
                    start.saturating_add(len),
                    self.shape
                ),
            ));
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        let mut out = self.overwritten_beside(&shape)?;
        out.copy_block(self, &BlockCopy::narrow(&self.shape, dim, start, len))?;
        Ok(out)
    }

    /// Concatenates tensors along `dim`; all other dimensions, the dtype and the device must
    /// agree.
    pub fn cat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
        let first = parts
            .first()
            .ok_or_else(|| KernelError::shape("cat", "no tensors"))?;
        let rank = first.shape.len();
        for p in parts {
            let same = p.shape.len() == rank
                && (0..rank).all(|i| i == dim || p.shape[i] == first.shape[i]);
            if !same || dim >= rank {
                return Err(KernelError::shape(
                    "cat",
                    format!(
                        "cannot concatenate {:?} and {:?} along dim {dim}",
                        first.shape, p.shape
                    ),
                ));
            }
        }
        let mut shape = first.shape.clone();
        shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
        // The parts cover every row of the result.
        let mut out = first.overwritten_beside(&shape)?;
        let mut at = 0;
        for p in parts {
            out.copy_block(p, &BlockCopy::into_rows(&p.shape, &shape, dim, at))?;
            at += p.shape[dim];
        }
        Ok(out)
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn storage_len(s: &Storage) -> usize {
    match s {
        Storage::Cpu(c) => c.len(),
        Storage::Cuda(c) => c.len(),
    }
}
