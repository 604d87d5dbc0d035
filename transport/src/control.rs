//! Node-level control messages: how the coordinator node drives the device actors of other nodes
//! (begin a request, abort it) and how those devices report back (begin acknowledged, step done,
//! stage finished, device failed), plus a node's readiness. Plain Rust types with rkyv
//! derives; [`encode_control`] gives the archived bytes, [`decode_control`] validates them
//! (bytecheck, a size limit) before anything is returned, and never panics on bad bytes.
//!
//! What a request is, and how a tensor is written, belongs to the layer above: a request
//! ([`ControlMessage::Begin`]) and a final latent ([`ControlMessage::StageFinished`]) travel as
//! opaque bytes that the runtime encodes, versions and validates itself.
//!
//! Over QUIC these travel on one ordered control stream per direction per pair of nodes (see
//! [`QuicNode::send_control`](crate::QuicNode::send_control)), framed as
//! `[u32 LE length][encode_control bytes]`.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::TransportError;

/// The largest encoded control message [`decode_control`] accepts, and the default of
/// [`QuicOptions::max_control_bytes`](crate::QuicOptions::max_control_bytes) (64 MiB: a
/// [`ControlMessage::Begin`] carries a request with its initial noise and caption embeddings).
pub const DEFAULT_MAX_CONTROL_BYTES: usize = 64 << 20;

/// Alignment of the buffer the archive is read from (at least the archive's own alignment).
const ARCHIVE_ALIGN: usize = 16;

/// A message between nodes on the control channel. Device indices are global.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// Coordinator -> a device's node: start `request` on `device`.
    Begin {
        /// Request id.
        request: u64,
        /// The device (on the receiving node).
        device: u32,
        /// The request, as the runtime encodes it (opaque here).
        spec: Vec<u8>,
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
        /// Of those, bytes sent to each peer device: (peer rank, bytes), peers sent nothing left out.
        sent_to: Vec<(u32, u64)>,
        /// The final latent (last stage only), as the runtime encodes tensors (opaque here).
        latent: Option<Vec<u8>>,
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
        /// The failure was a peer device it lost (its node gone): that device.
        lost_peer: Option<u32>,
    },
    /// Last stage's node -> coordinator: the state after `step` of `request` on `device`, kept
    /// as the request's checkpoint (a request resumes from it after a node is lost).
    Checkpoint {
        /// Request id.
        request: u64,
        /// The device (on the sending node).
        device: u32,
        /// The completed step.
        step: u32,
        /// The latent, as the runtime encodes tensors (opaque here).
        latent: Vec<u8>,
        /// The multistep sampler's history (same encoding), for samplers that keep one.
        history: Option<Vec<u8>>,
    },
    /// Coordinator -> a member node: restart your devices in the roles of the plan over
    /// `members` (every node computes the same plan from the topology and this list); runs up to
    /// `floor` are over. Answered with [`ControlMessage::Reconfigured`].
    Reconfigure {
        /// Numbers the coordinator's reconfigurations (the answer names it).
        epoch: u64,
        /// The nodes of the new layout, in topology order.
        members: Vec<String>,
        /// The newest run id begun so far.
        floor: u64,
    },
    /// A member node -> coordinator: its devices run in the roles of reconfiguration `epoch`
    /// (`error: None`), or why they could not.
    Reconfigured {
        /// The reconfiguration answered.
        epoch: u64,
        /// Why it failed on this node.
        error: Option<String>,
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
            ControlMessage::Checkpoint { .. } => "Checkpoint",
            ControlMessage::Reconfigure { .. } => "Reconfigure",
            ControlMessage::Reconfigured { .. } => "Reconfigured",
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
            | ControlMessage::DeviceFailed { request, .. }
            | ControlMessage::Checkpoint { request, .. } => Some(*request),
            ControlMessage::NodeReady { .. }
            | ControlMessage::Reconfigure { .. }
            | ControlMessage::Reconfigured { .. } => None,
        }
    }

    /// Checks what bytecheck cannot (nothing yet: the payloads of the layer above are checked
    /// there); kept so that every decoded message passes one gate.
    pub fn validate(&self) -> Result<(), TransportError> {
        self.check().map_err(|m| invalid(None, m))
    }

    fn check(&self) -> Result<(), String> {
        Ok(())
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
