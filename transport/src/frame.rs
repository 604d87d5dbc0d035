//! The unit of transfer: one tensor with a small header naming what it is for (a work item's
//! input, or a part of a collective call). Both ends compute the same static patch plan, so the
//! header only names, never negotiates shapes.

use crate::TransportError;

/// `FrameHeader::part` of a whole-image (warmup) item.
pub const PART_WHOLE: u32 = u32::MAX;

/// What a frame carries and what for: the input of a work item, or one member's part of a
/// collective call. Each kind names its own fields (no field means two things).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameLabel {
    /// Hidden states `[B', n, d]`, stage s -> s+1: the receiver's input for (`step`, `part`).
    Hidden {
        /// Denoising step.
        step: u32,
        /// Patch index, or [`PART_WHOLE`].
        part: u32,
    },
    /// Latent rows `[B, C, h, W]`, last stage -> stage 0: the input for (`step`, `part`).
    Latent {
        /// Denoising step.
        step: u32,
        /// Patch index, or [`PART_WHOLE`].
        part: u32,
    },
    /// One member's part of a collective call among a peer group (the sequence-parallel ranks of
    /// a stage, or the two CFG groups' last stages).
    Collective {
        /// Which of the device's peer groups.
        group: PeerGroupKind,
        /// The operation of the call (the receiver checks it is the one it is making).
        op: CollectiveOp,
        /// The call's sequence number in the request (1, 2, ...): every member makes the same
        /// calls in the same order.
        seq: u64,
    },
}

/// A device's peer groups (each numbers its calls on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerGroupKind {
    /// The sequence-parallel ranks of a stage (Ulysses, Ring, USP).
    SequenceParallel,
    /// The last stages of the two CFG groups (the noise-prediction swap).
    Cfg,
}

/// A collective operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CollectiveOp {
    /// Each member sends a different tensor to each other member.
    AllToAll,
    /// Each member sends one tensor to the next member of a ring.
    RingShift,
    /// Each member sends the same tensor to every other member.
    AllGather,
}

impl std::fmt::Display for FrameLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let part = |p: u32| match p {
            PART_WHOLE => "whole image".to_string(),
            p => format!("patch {p}"),
        };
        match *self {
            FrameLabel::Hidden { step, part: p } => {
                write!(f, "hidden states for step {step}, {}", part(p))
            }
            FrameLabel::Latent { step, part: p } => {
                write!(f, "latent for step {step}, {}", part(p))
            }
            FrameLabel::Collective { group, op, seq } => {
                write!(f, "{op:?} call {seq} of the {group:?} group")
            }
        }
    }
}

/// Element type of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    /// 32-bit float, little endian.
    F32,
    /// 16-bit IEEE half float, little endian.
    F16,
    /// bfloat16, little endian.
    BF16,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::BF16 => 2,
        }
    }
}

/// Names what the payload is for and describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request id.
    pub request: u64,
    /// Sending device (its rank in the plan).
    pub from: usize,
    /// What the payload is for.
    pub label: FrameLabel,
    /// Payload element type.
    pub dtype: WireDType,
    /// Payload shape.
    pub shape: Vec<u32>,
}

impl FrameHeader {
    /// Approximate encoded size in bytes (fixed fields plus the shape).
    pub fn encoded_len(&self) -> usize {
        8 + 4 + 8 + 4 + 4 + 1 + 1 + 1 + 1 + 4 * self.shape.len() + 1
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
