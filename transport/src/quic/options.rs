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
    /// Largest UDP payload this node receives and the upper bound of path-MTU discovery
    /// (1200..=65527). `None` (the default) picks it from the node's address:
    /// [`LOOPBACK_MAX_UDP_PAYLOAD`] on loopback, [`ETHERNET_MAX_UDP_PAYLOAD`] elsewhere; set
    /// 8952 on a jumbo-frame network. Connections start at 1200 bytes and probe upwards.
    /// Above [`GSO_MAX_UDP_PAYLOAD`] segmentation offload is turned off (see there).
    pub max_udp_payload: Option<u16>,
    /// Requested size of the UDP socket's send and receive buffers (default 8 MiB; the kernel
    /// caps it at `net.core.rmem_max` / `wmem_max`).
    pub socket_buffer_bytes: usize,
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
    /// Incoming connections in their TLS/pipefuse handshake at once (default 32). Beyond that a
    /// new connection is refused at once (QUIC `CONNECTION_REFUSED`) instead of costing a TLS
    /// handshake, so a flood of strangers cannot tie up the node.
    pub max_pending_handshakes: usize,
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
            max_udp_payload: None,
            socket_buffer_bytes: 8 << 20,
            max_streams: 1024,
            wire_version: WIRE_VERSION,
            max_control_bytes: DEFAULT_MAX_CONTROL_BYTES,
            control_inbox_capacity: 1024,
            max_pending_handshakes: 32,
        }
    }
}

/// The largest UDP payload over IPv4 loopback (64 KiB datagrams): one datagram per 64 KiB of
/// activation instead of ~45 keeps QUIC near plain TCP on loopback (BENCHMARKS.md).
pub const LOOPBACK_MAX_UDP_PAYLOAD: u16 = 65527;

/// The largest UDP payload of a 1500-byte Ethernet MTU (IPv4).
pub const ETHERNET_MAX_UDP_PAYLOAD: u16 = 1472;

/// The largest UDP payload sent with segmentation offload (GSO). quinn 0.11 hands the kernel up
/// to 10 datagrams per send, and Linux refuses a GSO send over 64 KiB with `EMSGSIZE`, which
/// quinn-udp treats as sent: every batch would be lost once path-MTU discovery climbs past this
/// size. Above it each datagram is sent on its own.
pub const GSO_MAX_UDP_PAYLOAD: u16 = 6550;

impl QuicOptions {
    /// The `max_udp_payload` that applies to a node bound at `ip`.
    pub fn max_udp_payload_for(&self, ip: std::net::IpAddr) -> u16 {
        self.max_udp_payload.unwrap_or(if ip.is_loopback() {
            LOOPBACK_MAX_UDP_PAYLOAD
        } else {
            ETHERNET_MAX_UDP_PAYLOAD
        })
    }

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
        if let Some(p) = self.max_udp_payload {
            if !(1200..=LOOPBACK_MAX_UDP_PAYLOAD).contains(&p) {
                return bad(format!("max_udp_payload {p} outside 1200..=65527"));
            }
        }
        if self.max_pending_handshakes == 0 {
            return bad("max_pending_handshakes must be at least 1".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_payload_follows_the_address_unless_set() {
        let o = QuicOptions::default();
        assert_eq!(
            o.max_udp_payload_for("127.0.0.1".parse().unwrap()),
            LOOPBACK_MAX_UDP_PAYLOAD
        );
        assert_eq!(
            o.max_udp_payload_for("10.0.0.2".parse().unwrap()),
            ETHERNET_MAX_UDP_PAYLOAD
        );
        let jumbo = QuicOptions {
            max_udp_payload: Some(8952),
            ..Default::default()
        };
        assert_eq!(
            jumbo.max_udp_payload_for("127.0.0.1".parse().unwrap()),
            8952
        );
    }

    #[test]
    fn udp_payload_out_of_range_is_refused() {
        for bad in [0u16, 1199, 65528] {
            let o = QuicOptions {
                max_udp_payload: Some(bad),
                ..Default::default()
            };
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains("max_udp_payload"), "{e}");
        }
    }
}
