//! Node-level control messages: how the coordinator node drives the device actors of other nodes
//! (begin a request, abort it) and how those devices report back (begin acknowledged, step done,
//! stage finished, device failed), plus a node's readiness. Plain Rust types with rkyv
//! derives; [`encode_control`] gives the archived bytes, [`decode_control`] validates them
//! (bytecheck, a size limit, every [`WireTensor`]'s shape against its data) before anything is
//! returned, and never panics on bad bytes.
//!
//! Over QUIC these travel on one ordered control stream per direction per pair of nodes (see
//! [`QuicNode::send_control`](crate::QuicNode::send_control)), framed as
//! `[u32 LE length][encode_control bytes]`.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::TransportError;

/// The largest encoded control message [`decode_control`] accepts, and the default of
/// [`QuicOptions::max_control_bytes`](crate::QuicOptions::max_control_bytes) (64 MiB: a
/// [`ControlMessage::Begin`] carries the initial noise and caption embeddings).
pub const DEFAULT_MAX_CONTROL_BYTES: usize = 64 << 20;

/// Most dimensions a [`WireTensor`] may have.
pub const MAX_TENSOR_RANK: usize = 8;

/// Alignment of the buffer the archive is read from (at least the archive's own alignment).
const ARCHIVE_ALIGN: usize = 16;

/// A dense f32 tensor on the wire. Valid when `shape` has at most [`MAX_TENSOR_RANK`]
/// dimensions and their product (checked multiplication; 1 for rank 0) equals `data.len()`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct WireTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<u32>,
    /// Row-major elements.
    pub data: Vec<f32>,
}

impl WireTensor {
    /// A tensor, checked as described on the type.
    pub fn new(shape: Vec<u32>, data: Vec<f32>) -> Result<Self, TransportError> {
        let t = Self { shape, data };
        t.check("tensor")
            .map_err(|message| invalid(None, message))?;
        Ok(t)
    }

    /// Why the tensor is invalid, naming it `what`.
    fn check(&self, what: &str) -> Result<(), String> {
        if self.shape.len() > MAX_TENSOR_RANK {
            return Err(format!(
                "{what}: shape {:?} has rank {}, more than {MAX_TENSOR_RANK}",
                self.shape,
                self.shape.len()
            ));
        }
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize));
        match n {
            None => Err(format!(
                "{what}: shape {:?} overflows the element count",
                self.shape
            )),
            Some(n) if n != self.data.len() => Err(format!(
                "{what}: shape {:?} has {n} elements, data has {}",
                self.shape,
                self.data.len()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Everything a node needs to rebuild the same request locally (the setup is deterministic, so
/// only the noise and the captions cross the wire, once per request).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Class labels (class-conditional models), one per image.
    pub class_labels: Vec<u32>,
    /// Caption embeddings (text-conditional models).
    pub caption: Option<WireTensor>,
    /// The caption's attention mask.
    pub caption_mask: Option<WireTensor>,
    /// Negative caption embeddings (classifier-free guidance).
    pub negative_caption: Option<WireTensor>,
    /// The negative caption's attention mask.
    pub negative_caption_mask: Option<WireTensor>,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// Latent height and width.
    pub latent_size: [u32; 2],
    /// Denoising steps.
    pub steps: u32,
    /// The scheduler's configuration (diffusers' `scheduler_config.json`).
    pub scheduler_json: String,
    /// The initial latent noise.
    pub noise: WireTensor,
    /// Token-row range `[start, end)` of each patch; `start <= end`.
    pub patches: Vec<[u32; 2]>,
    /// Warmup steps (whole-image, synchronous).
    pub warmup: u32,
    /// Pipeline stages (of one CFG group).
    pub stages: u32,
    /// CFG groups (1, or 2 with CFG parallel).
    pub cfg_degree: u32,
    /// Sequence-parallel ranks per stage (1 without).
    pub sp_degree: u32,
}

/// A message between nodes on the control channel. Device indices are global.
// `Begin` is much larger than the rest; messages are few (a handful per step), so an inline
// `RequestSpec` (built and matched without a `Box`) is worth the size.
#[allow(clippy::large_enum_variant)]
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// Coordinator -> a device's node: start `request` on `device`.
    Begin {
        /// Request id.
        request: u64,
        /// The device (on the receiving node).
        device: u32,
        /// The request.
        spec: RequestSpec,
    },
    /// Device's node -> coordinator: `device` set up `request` (`error: None`) or could not.
    BeginAck {
        /// Request id.
        request: u64,
        /// The device (on the sending node).
        device: u32,
        /// Why the device could not begin.
        error: Option<String>,
    },
    /// Coordinator -> nodes: stop `request` and return to idle.
    Abort {
        /// Request id.
        request: u64,
    },
    /// Last stage's node -> coordinator: `step` of `request` is done (progress).
    StepDone {
        /// Request id.
        request: u64,
        /// The finished step.
        step: u32,
    },
    /// Device's node -> coordinator: `device` finished its part of `request`.
    StageFinished {
        /// Request id.
        request: u64,
        /// The device (on the sending node).
        device: u32,
        /// Time spent running items (including `exchange_wait_ns`).
        busy_ns: u64,
        /// Of that, time spent waiting in exchanges with peer devices.
        exchange_wait_ns: u64,
        /// Work items computed.
        items: u32,
        /// Activation bytes sent.
        bytes_sent: u64,
        /// The final latent (last stage only).
        latent: Option<WireTensor>,
    },
    /// Device's node -> coordinator: `device` failed `request` (at `step` if known).
    DeviceFailed {
        /// Request id.
        request: u64,
        /// The device (on the sending node).
        device: u32,
        /// The step it failed at.
        step: Option<u32>,
        /// What went wrong.
        message: String,
    },
    /// A node -> coordinator: its device actors are up.
    NodeReady {
        /// The sending node's name.
        node: String,
        /// Its ready devices.
        devices: Vec<u32>,
    },
}

impl ControlMessage {
    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Begin { .. } => "Begin",
            ControlMessage::BeginAck { .. } => "BeginAck",
            ControlMessage::Abort { .. } => "Abort",
            ControlMessage::StepDone { .. } => "StepDone",
            ControlMessage::StageFinished { .. } => "StageFinished",
            ControlMessage::DeviceFailed { .. } => "DeviceFailed",
            ControlMessage::NodeReady { .. } => "NodeReady",
        }
    }

    /// The request the message is about (`None` for [`ControlMessage::NodeReady`]).
    pub fn request(&self) -> Option<u64> {
        match self {
            ControlMessage::Begin { request, .. }
            | ControlMessage::BeginAck { request, .. }
            | ControlMessage::Abort { request }
            | ControlMessage::StepDone { request, .. }
            | ControlMessage::StageFinished { request, .. }
            | ControlMessage::DeviceFailed { request, .. } => Some(*request),
            ControlMessage::NodeReady { .. } => None,
        }
    }

    /// Checks what bytecheck cannot: every tensor's shape against its data, patch ranges.
    pub fn validate(&self) -> Result<(), TransportError> {
        self.check().map_err(|m| invalid(None, m))
    }

    fn check(&self) -> Result<(), String> {
        match self {
            ControlMessage::Begin { spec, .. } => {
                let tensors = [
                    ("caption", &spec.caption),
                    ("caption_mask", &spec.caption_mask),
                    ("negative_caption", &spec.negative_caption),
                    ("negative_caption_mask", &spec.negative_caption_mask),
                ];
                for (what, t) in tensors {
                    if let Some(t) = t {
                        t.check(&format!("Begin.spec.{what}"))?;
                    }
                }
                spec.noise.check("Begin.spec.noise")?;
                if let Some((i, p)) = spec.patches.iter().enumerate().find(|(_, p)| p[0] > p[1]) {
                    return Err(format!(
                        "Begin.spec.patches[{i}]: range {}..{} is reversed",
                        p[0], p[1]
                    ));
                }
                Ok(())
            }
            ControlMessage::StageFinished {
                latent: Some(t), ..
            } => t.check("StageFinished.latent"),
            _ => Ok(()),
        }
    }
}

fn invalid(node: Option<&str>, message: String) -> TransportError {
    TransportError::InvalidControl {
        node: node.map(str::to_string),
        message,
    }
}

/// The archived bytes of `msg` (no length prefix). Fails only for a message that
/// [`ControlMessage::validate`] refuses, or one too large for the archive format (2 GiB).
pub fn encode_control(msg: &ControlMessage) -> Result<Vec<u8>, TransportError> {
    msg.validate()?;
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(msg, Vec::new()).map_err(|e| {
        invalid(
            None,
            format!("{} message could not be archived: {e}", msg.name()),
        )
    })
}

/// Decodes bytes from [`encode_control`]: at most [`DEFAULT_MAX_CONTROL_BYTES`], archive
/// validated by bytecheck, then [`ControlMessage::validate`]. Any alignment is accepted (an
/// unaligned slice is copied first). Errors are [`TransportError::InvalidControl`].
pub fn decode_control(bytes: &[u8]) -> Result<ControlMessage, TransportError> {
    decode_control_with_limit(bytes, DEFAULT_MAX_CONTROL_BYTES)
}

/// [`decode_control`] with another size limit.
pub fn decode_control_with_limit(
    bytes: &[u8],
    max_bytes: usize,
) -> Result<ControlMessage, TransportError> {
    if bytes.len() > max_bytes {
        return Err(invalid(
            None,
            format!(
                "{} bytes, more than the maximum control message size {max_bytes}",
                bytes.len()
            ),
        ));
    }
    let r = if (bytes.as_ptr() as usize) % ARCHIVE_ALIGN == 0 {
        decode_aligned(bytes)
    } else {
        let mut copy = AlignedVec::<ARCHIVE_ALIGN>::with_capacity(bytes.len());
        copy.extend_from_slice(bytes);
        decode_aligned(&copy)
    };
    r.map_err(|m| invalid(None, m))
}

/// Decodes a 16-byte aligned archive (what the stream reader holds); the error says what is
/// wrong.
pub(crate) fn decode_aligned(bytes: &[u8]) -> Result<ControlMessage, String> {
    if bytes.is_empty() {
        return Err("empty control message".into());
    }
    let msg = rkyv::from_bytes::<ControlMessage, rancor::Error>(bytes)
        .map_err(|e| format!("control message failed validation: {e}"))?;
    msg.check()?;
    Ok(msg)
}

#[cfg(test)]
pub(crate) mod tests;
