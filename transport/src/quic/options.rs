//! [`QuicOptions`]: the tuning and limits of a [`QuicNode`](super::QuicNode).

use std::time::Duration;

use super::WIRE_VERSION;
use crate::control::DEFAULT_MAX_CONTROL_BYTES;
use crate::TransportError;

/// Tuning and limits of a [`QuicNode`](super::QuicNode). `Default` gives the documented values.
#[derive(Debug, Clone)]
pub struct QuicOptions {
    /// Largest payload accepted or sent in one frame (default 256 MiB). A larger incoming frame
    /// closes the connection; a larger outgoing one is refused with
    /// [`TransportError::FrameTooLarge`].
    pub max_frame_bytes: usize,
    /// Frames a link may hold before [`crate::Link::send`] returns back-pressure, counting the
    /// frame being written (default 8).
    pub link_queue_frames: usize,
    /// Bytes (header + payload) a link may hold, counting the frame being written (default
    /// 64 MiB; at most `u32::MAX`). A single larger frame is admitted when the queue is empty.
    pub link_queue_bytes: usize,
    /// A connection with no packet for this long is lost (default 5 s; negotiated: the smaller
    /// of both sides' values applies).
    pub idle_timeout: Duration,
    /// Keep-alive interval, below `idle_timeout` (default 1 s).
    pub keep_alive: Duration,
    /// How long [`QuicNode::join`](super::QuicNode::join) waits for all peers (default 30 s).
    pub join_timeout: Duration,
    /// Per-stream receive window (default 16 MiB).
    pub stream_window: u32,
    /// Per-connection receive window (default 64 MiB).
    pub connection_window: u32,
    /// Per-connection send window (default 64 MiB).
    pub send_window: u64,
    /// Upper bound of path-MTU discovery (default 8952, a jumbo frame; loopback allows it).
    pub max_udp_payload: u16,
    /// Most unidirectional streams a peer may open: one per (remote device, local device) pair
    /// is needed (default 1024).
    pub max_streams: u32,
    /// The protocol version announced in the handshake (default [`WIRE_VERSION`]); changing it
    /// is only useful to test refusal.
    pub wire_version: u32,
    /// Largest encoded control message accepted or sent (default
    /// [`DEFAULT_MAX_CONTROL_BYTES`], 64 MiB: a `Begin` carries the noise and captions). A larger
    /// incoming one closes the connection; a larger outgoing one is refused with
    /// [`TransportError::ControlTooLarge`].
    pub max_control_bytes: usize,
    /// Control messages the node's control inbox holds before the readers of the control
    /// streams wait for the consumer (default 1024). Activation streams are not affected.
    pub control_inbox_capacity: usize,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            max_frame_bytes: 256 << 20,
            link_queue_frames: 8,
            link_queue_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            join_timeout: Duration::from_secs(30),
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            max_udp_payload: 8952,
            max_streams: 1024,
            wire_version: WIRE_VERSION,
            max_control_bytes: DEFAULT_MAX_CONTROL_BYTES,
            control_inbox_capacity: 1024,
        }
    }
}

impl QuicOptions {
    pub(super) fn validate(&self) -> Result<(), TransportError> {
        let bad = |m: String| Err(TransportError::Config { message: m });
        if self.link_queue_frames == 0 {
            return bad("link_queue_frames must be at least 1".into());
        }
        if self.link_queue_bytes == 0 || self.link_queue_bytes > u32::MAX as usize {
            return bad(format!(
                "link_queue_bytes {} outside 1..=u32::MAX",
                self.link_queue_bytes
            ));
        }
        if self.max_frame_bytes == 0 {
            return bad("max_frame_bytes must be at least 1".into());
        }
        if self.max_control_bytes == 0 || self.max_control_bytes > u32::MAX as usize {
            return bad(format!(
                "max_control_bytes {} outside 1..=u32::MAX",
                self.max_control_bytes
            ));
        }
        if self.control_inbox_capacity == 0 {
            return bad("control_inbox_capacity must be at least 1".into());
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad(format!(
                "keep_alive {:?} must be positive and below idle_timeout {:?}",
                self.keep_alive, self.idle_timeout
            ));
        }
        Ok(())
    }
}
