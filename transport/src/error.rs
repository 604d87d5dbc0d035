//! The crate's one error type.

use crate::Frame;

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer's inbox is gone (its device stopped); the unsent frame is handed back.
    #[error("device {peer} is unreachable: its inbox is closed (frame for step {}, part {} not sent)", frame.header.step, frame.header.part)]
    PeerGone {
        /// The peer's device index.
        peer: usize,
        /// The frame that was not sent.
        frame: Box<Frame>,
    },
    /// A frame whose header does not describe its payload.
    #[error("malformed frame from device {from}: {message}")]
    Malformed {
        /// The sender.
        from: usize,
        /// What is wrong.
        message: String,
    },
}
