//! The unit of transfer: one tensor of one (step, patch) with a small header. Both ends compute
//! the same static patch plan, so the header only names the work item, never negotiates shapes.

use crate::TransportError;

/// `FrameHeader::part` of a whole-image (warmup) item.
pub const PART_WHOLE: u32 = u32::MAX;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Hidden states `[B', n, d]` of a patch, stage s -> s+1.
    Hidden,
    /// Latent rows `[B, C, h, W]` for the next step, last stage -> stage 0.
    Latent,
    /// CFG parallel: one branch's noise prediction `[B, C, h, W]` for a part, between the two
    /// groups' last stages.
    CfgPrediction,
    /// Sequence parallelism: one part of a collective (Ulysses all-to-all or Ring shift) between
    /// the ranks of a group; the header's `step` carries the collective's sequence number.
    SpPart,
}

/// Element type of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    /// 32-bit float, little endian.
    F32,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
        }
    }
}

/// Names the work item and describes the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request id.
    pub request: u64,
    /// Sending device index.
    pub from: usize,
    /// Denoising step the receiver uses the payload for.
    pub step: u32,
    /// Patch index, or [`PART_WHOLE`].
    pub part: u32,
    /// Hidden states or latent.
    pub kind: FrameKind,
    /// Payload element type.
    pub dtype: WireDType,
    /// Payload shape.
    pub shape: Vec<u32>,
}

impl FrameHeader {
    /// Approximate encoded size in bytes (fixed fields plus the shape).
    pub fn encoded_len(&self) -> usize {
        8 + 4 + 4 + 4 + 1 + 1 + 4 * self.shape.len() + 1
    }
}

/// A header and the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub header: FrameHeader,
    /// `prod(shape) * dtype.size()` bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Checks that the payload length matches the header.
    pub fn validate(&self) -> Result<(), TransportError> {
        let want = self
            .header
            .shape
            .iter()
            .try_fold(self.header.dtype.size(), |n, &d| n.checked_mul(d as usize));
        let Some(want) = want else {
            return Err(TransportError::Malformed {
                from: self.header.from,
                message: format!("shape {:?} overflows", self.header.shape),
            });
        };
        if want != self.payload.len() {
            return Err(TransportError::Malformed {
                from: self.header.from,
                message: format!(
                    "shape {:?} needs {want} payload bytes, got {}",
                    self.header.shape,
                    self.payload.len()
                ),
            });
        }
        Ok(())
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.header.encoded_len() + self.payload.len()
    }
}
