//! How activations travel between devices: a [`Frame`] (a small [`FrameHeader`] plus the bytes of
//! one tensor) sent over a [`Link`] to a peer device, arriving in that peer's inbox.
//!
//! Invariants: the transport does not know about tensors (it carries dtype + shape + bytes; the
//! `actors` crate converts); frames sent over one link arrive in the order sent; a send never
//! blocks (the receiver buffers), and a failed send hands the frame back in the error.
//!
//! Key types: [`Link`] (the narrow trait every transport implements), [`MemoryNetwork`] (the
//! in-process implementation used by local clusters and tests), [`Frame`].

mod error;
mod frame;
mod memory;

pub use error::TransportError;
pub use frame::{Frame, FrameHeader, FrameKind, WireDType, PART_WHOLE};
pub use memory::{Endpoint, MemoryNetwork};

/// A one-way connection to one peer device.
pub trait Link: Send + Sync + std::fmt::Debug {
    /// The peer's device index.
    fn peer(&self) -> usize;
    /// Queues `frame` for the peer without blocking; frames on one link arrive in order.
    fn send(&self, frame: Frame) -> Result<(), TransportError>;
    /// Payload and header bytes sent so far.
    fn bytes_sent(&self) -> u64;
}
