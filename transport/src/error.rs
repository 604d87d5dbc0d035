//! The crate's one error type.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Frame;

/// A transport failure. Send errors hand the unsent frame back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer is unreachable: its inbox is closed (its device stopped) or the connection to its
    /// node is lost. The unsent frame is handed back.
    #[error("device {peer} is unreachable: its inbox is closed or its node's connection is lost ({} not sent)", frame.header.label)]
    PeerGone {
        /// The peer's device index.
        peer: usize,
        /// The frame that was not sent.
        frame: Box<Frame>,
    },
    /// The link's bounded send queue is full; the frame is handed back. Retry later, or use
    /// [`Link::send_async`](crate::Link::send_async), which waits for room.
    #[error("link to device {peer} is full ({} handed back)", frame.header.label)]
    Backpressure {
        /// The peer's device index.
        peer: usize,
        /// The frame that was not queued.
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
    /// A frame larger than the configured maximum (`QuicOptions::max_frame_bytes`); refused before
    /// it is queued, because the receiver would close the connection.
    #[error("frame for device {peer} has {bytes} payload bytes, more than the maximum {max}")]
    FrameTooLarge {
        /// The peer's device index.
        peer: usize,
        /// The payload size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A control message that is not valid: a tensor whose shape does not match its data, a
    /// device that is not on the node the message says, bytes that fail validation, or bytes
    /// over the size limit. Sending one is refused before it is queued (`node` is the
    /// destination); [`decode_control`](crate::decode_control) reports it with `node: None`.
    #[error("invalid control message{}: {message}", node.as_ref().map(|n| format!(" for node {n}")).unwrap_or_default())]
    InvalidControl {
        /// The node it was for, when sending.
        node: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// An encoded control message larger than `QuicOptions::max_control_bytes`; refused before
    /// it is queued, because the receiver would close the connection.
    #[error("control message for node {node} has {bytes} bytes, more than the maximum {max}")]
    ControlTooLarge {
        /// The destination node.
        node: String,
        /// The encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The connection to node `node` is lost, so a control message cannot be sent to it.
    #[error("node {node} is unreachable: {reason} (control message not sent)")]
    NodeGone {
        /// The peer node.
        node: String,
        /// Why the connection is gone.
        reason: String,
    },
    /// Certificates or keys could not be generated, parsed or turned into a TLS configuration.
    #[error("TLS setup failed ({what}): {message}")]
    Tls {
        /// Which step or item (`"cluster CA"`, `"certificate of node b"`, ...).
        what: String,
        /// The underlying error.
        message: String,
    },
    /// Invalid options or cluster map (unknown node, duplicate device, bad timeout ...).
    #[error("invalid transport configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A socket could not be bound or used.
    #[error("{op} {addr} failed: {source}")]
    Io {
        /// The operation (`"bind"`, `"connect"`, ...).
        op: &'static str,
        /// The local or remote address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A connection to a peer node could not be made, or the peer's TLS refused it (a certificate
    /// from another CA, no certificate, wrong name).
    #[error("connection to node {node} at {addr} failed: {message}")]
    Connect {
        /// The peer node's name (as this node expected it, or `"?"` for an unknown dialer).
        node: String,
        /// The peer's address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The pipefuse handshake refused a connection: another wire version, another topology
    /// fingerprint, or an unexpected node name. Both sides report it.
    #[error("handshake with node {node} at {addr} refused: {message}")]
    Handshake {
        /// The peer node's name.
        node: String,
        /// The peer's address.
        addr: SocketAddr,
        /// Which check failed, with both sides' values.
        message: String,
    },
    /// Peer nodes did not connect (or could not be reached) within the join timeout.
    #[error("node {node} at {addr}{} did not connect within {waited:?}", if others.is_empty() { String::new() } else { format!(" (and {})", others.join(", ")) })]
    JoinTimeout {
        /// The first missing node.
        node: String,
        /// Its address.
        addr: SocketAddr,
        /// The other missing nodes, as `name at address`.
        others: Vec<String>,
        /// How long this node waited.
        waited: Duration,
    },
    /// The QUIC endpoint is closed (the node was shut down) or already joined.
    #[error("QUIC node {node}: {message}")]
    Node {
        /// This node's name.
        node: String,
        /// What is wrong.
        message: String,
    },
}
