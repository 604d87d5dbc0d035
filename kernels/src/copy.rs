//! Block copies between tensors: the one primitive behind `narrow`, `cat` and writing rows into
//! a buffer (PipeFusion's K/V buffers), on every backend. A [`BlockCopy`] describes, in elements,
//! `batches` x `rows` runs of `width` contiguous elements, each side with its own offset and row
//! and batch strides. On the host it is a loop of slice copies; on a GPU one 2-D copy per batch
//! (`cuMemcpy2DAsync`), so no element passes through the host. Bounds are checked with checked
//! arithmetic before anything is copied.

use crate::tensor::{CpuStorage, Storage};
use crate::{KernelError, Result, Tensor};

/// `batches` x `rows` runs of `width` elements from `src` to `dst` (offsets and strides in
/// elements): run `(b, r)` starts at `offset + b * batch_stride + r * row_stride` on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// Outer repetitions.
    pub batches: usize,
    /// Runs per batch.
    pub rows: usize,
    /// Contiguous elements per run.
    pub width: usize,
    /// Source: first element, elements between runs, between batches.
    pub src: Strides,
    /// Destination: first element, elements between runs, between batches.
    pub dst: Strides,
}

/// One side of a [`BlockCopy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// First element.
    pub offset: usize,
    /// Elements between runs.
    pub row: usize,
    /// Elements between batches.
    pub batch: usize,
}

impl Strides {
    /// One past the last element a copy of `batches` x `rows` runs of `width` touches.
    fn end(&self, batches: usize, rows: usize, width: usize) -> Option<usize> {
        if batches == 0 || rows == 0 || width == 0 {
            return Some(0);
        }
        (batches - 1)
            .checked_mul(self.batch)?
            .checked_add((rows - 1).checked_mul(self.row)?)?
            .checked_add(self.offset)?
            .checked_add(width)
    }
}

impl BlockCopy {
    /// A copy no tensor can hold (what a constructor gives for a dimension past the shape).
    const NOTHING_FITS: BlockCopy = BlockCopy {
        batches: 1,
        rows: 1,
        width: usize::MAX,
        src: Strides {
            offset: 0,
            row: 0,
            batch: 0,
        },
        dst: Strides {
            offset: 0,
            row: 0,
            batch: 0,
        },
    };

    /// Rows `start..start + len` of dimension `dim` of a tensor of `shape`, into a new
    /// contiguous tensor (`narrow`). A `dim` past the shape gives a copy that fits nothing.
    pub fn narrow(shape: &[usize], dim: usize, start: usize, len: usize) -> BlockCopy {
        if dim >= shape.len() {
            return BlockCopy::NOTHING_FITS;
        }
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product();
        BlockCopy {
            batches: 1,
            rows: outer,
            width: len * inner,
            src: Strides {
                offset: start * inner,
                row: shape[dim] * inner,
                batch: 0,
            },
            dst: Strides {
                offset: 0,
                row: len * inner,
                batch: 0,
            },
        }
    }

    /// A whole contiguous tensor of `src_shape` into rows `start..` of dimension `dim` of a
    /// tensor of `dst_shape` (the other dimensions equal): `cat`, and writing into a buffer.
    pub fn into_rows(
        src_shape: &[usize],
        dst_shape: &[usize],
        dim: usize,
        start: usize,
    ) -> BlockCopy {
        if dim >= dst_shape.len() || dim >= src_shape.len() {
            return BlockCopy::NOTHING_FITS;
        }
        let outer: usize = dst_shape[..dim].iter().product();
        let inner: usize = dst_shape[dim + 1..].iter().product();
        let len = src_shape[dim];
        BlockCopy {
            batches: 1,
            rows: outer,
            width: len * inner,
            src: Strides {
                offset: 0,
                row: len * inner,
                batch: 0,
            },
            dst: Strides {
                offset: start * inner,
                row: dst_shape[dim] * inner,
                batch: 0,
            },
        }
    }

    /// Whether both sides lie inside tensors of `src_len` and `dst_len` elements and the
    /// destination's runs do not overlap each other.
    pub fn fits(&self, src_len: usize, dst_len: usize) -> bool {
        let (b, r, w) = (self.batches, self.rows, self.width);
        let empty = b == 0 || r == 0 || w == 0;
        // Runs are whole rows of both sides (no broadcasting of a row into several): the GPU's
        // 2-D copies read and write rows `row` apart, at least `width` apart.
        let rows_apart = empty || r == 1 || (self.dst.row >= w && self.src.row >= w);
        let disjoint = empty
            || b == 1
            || self.dst.batch >= self.dst.row.saturating_mul(r - 1).saturating_add(w);
        rows_apart
            && disjoint
            && self.src.end(b, r, w).is_some_and(|e| e <= src_len)
            && self.dst.end(b, r, w).is_some_and(|e| e <= dst_len)
    }

    /// The copy on host slices (bounds already checked by [`fits`](Self::fits)).
    pub(crate) fn apply<T: Copy>(&self, dst: &mut [T], src: &[T]) {
        for b in 0..self.batches {
            for r in 0..self.rows {
                let s = self.src.offset + b * self.src.batch + r * self.src.row;
                let d = self.dst.offset + b * self.dst.batch + r * self.dst.row;
                dst[d..d + self.width].copy_from_slice(&src[s..s + self.width]);
            }
        }
    }
}

impl Tensor {
    /// Copies the elements `copy` describes from `src` into `self` (same dtype, same device).
    /// Errors name what does not fit; nothing is copied then.
    pub fn copy_block(&mut self, src: &Tensor, copy: &BlockCopy) -> Result<()> {
        if src.dtype() != self.dtype() {
            return Err(KernelError::DType {
                op: "copy_block",
                expected: self.dtype(),
                got: src.dtype(),
            });
        }
        if !copy.fits(src.elem_count(), self.elem_count()) {
            return Err(KernelError::shape(
                "copy_block",
                format!(
                    "{copy:?} does not fit a source {:?} and a destination {:?}",
                    src.shape(),
                    self.shape()
                ),
            ));
        }
        match (self.storage_mut(), src.storage()) {
            (Storage::Cpu(d), Storage::Cpu(s)) => match (d, s) {
                (CpuStorage::F32(d), CpuStorage::F32(s)) => copy.apply(d, s),
                (CpuStorage::F16(d), CpuStorage::F16(s)) => copy.apply(d, s),
                (CpuStorage::BF16(d), CpuStorage::BF16(s)) => copy.apply(d, s),
                _ => unreachable!("dtypes checked above"),
            },
            (Storage::Cuda(d), Storage::Cuda(s)) if d.ordinal() == s.ordinal() => {
                d.copy_block_from(s, copy)?
            }
            (d, s) => {
                return Err(KernelError::DeviceMismatch {
                    op: "copy_block",
                    expected: storage_place(d),
                    got: storage_place(s),
                })
            }
        }
        Ok(())
    }
}

fn storage_place(s: &Storage) -> String {
    match s {
        Storage::Cpu(_) => "host memory".into(),
        Storage::Cuda(c) => format!("cuda:{}", c.ordinal()),
    }
}
