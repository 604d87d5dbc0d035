//! A tensor's elements as bytes, the one way its data leaves or enters a device: every wire
//! (frames between devices, control messages between nodes) carries a tensor as its dtype, shape
//! and these bytes. On the CPU both directions are one copy; a device backend implements them as
//! a copy to or from pinned host memory, so nothing above reads a device tensor element by
//! element.

use half::{bf16, f16};

use crate::tensor::{CpuStorage, Storage};
use crate::{DType, KernelError, Result, Tensor};

impl Tensor {
    /// The elements, row-major, little endian, in the tensor's dtype
    /// (`elem_count * dtype.size_in_bytes()` bytes).
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        let downloaded;
        let host = match self.storage() {
            Storage::Cpu(c) => c,
            Storage::Cuda(s) => {
                downloaded = s.download()?;
                &downloaded
            }
        };
        Ok(match host {
            CpuStorage::F32(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::F16(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v).to_vec(),
        })
    }

    /// A host tensor of `dtype` and `shape` from [`to_le_bytes`](Self::to_le_bytes)'s bytes;
    /// errors when their length is not what the shape needs (checked arithmetic).
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let want = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        if want != Some(bytes.len()) {
            return Err(KernelError::shape(
                "from_le_bytes",
                format!(
                    "{} bytes cannot hold a {dtype:?} tensor of shape {shape:?}",
                    bytes.len()
                ),
            ));
        }
        // Native endianness is little endian on every supported target; one aligned copy.
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec::<u8, f32>(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec::<u8, f16>(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)),
        };
        Tensor::from_cpu(storage, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_survives_the_bytes() {
        let t =
            Tensor::from_vec((0..12).map(|i| i as f32 * 0.75 - 4.0).collect(), &[3, 4]).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = t.to_dtype(dtype).unwrap();
            let bytes = t.to_le_bytes().unwrap();
            assert_eq!(bytes.len(), 12 * dtype.size_in_bytes());
            let back = Tensor::from_le_bytes(dtype, &[3, 4], &bytes).unwrap();
            assert_eq!(
                (back.dtype(), back.to_vec_f32().unwrap()),
                (dtype, t.to_vec_f32().unwrap())
            );
        }
        // Little endian: 1.0f32 is 00 00 80 3f.
        let one = Tensor::from_vec(vec![1.0], &[1]).unwrap();
        assert_eq!(one.to_le_bytes().unwrap(), [0, 0, 0x80, 0x3f]);
    }

    #[test]
    fn a_length_that_does_not_fit_the_shape_is_refused() {
        let e = Tensor::from_le_bytes(DType::F32, &[2, 3], &[0; 20]).unwrap_err();
        assert!(e.to_string().contains("20 bytes cannot hold"), "{e}");
        let e = Tensor::from_le_bytes(DType::F16, &[usize::MAX, 4], &[]).unwrap_err();
        assert!(e.to_string().contains("cannot hold"), "{e}");
        assert!(Tensor::from_le_bytes(DType::BF16, &[], &[0, 0]).is_ok());
    }
}
