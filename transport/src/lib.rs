//! How activations travel between devices: a [`Frame`] (a small [`FrameHeader`] plus the bytes of
//! one tensor) sent over a [`Link`] to a peer device, arriving in that peer's inbox
//! ([`Endpoint::inbox`]). Two implementations give the same [`Endpoint`]s, so the actor layer does
//! not know which one it drives:
//!
//! - [`MemoryNetwork`]: in-process channels, for local clusters and actor tests (no sockets).
//! - [`QuicNode`]: one node of a multi-host cluster: QUIC (quinn) with mutual TLS, devices of
//!   other nodes reached over one connection per pair of nodes.
//!
//! Invariants common to both: the transport does not know about tensors (it carries dtype +
//! shape + bytes; the `actors` crate converts); frames sent over one link arrive in the order
//! sent; [`Link::send`] never blocks, and a failed send hands the frame back in the error.
//!
//! # The QUIC transport
//!
//! - **Membership and identity.** A cluster has one CA ([`generate_cluster_pki`]); each node holds
//!   a certificate whose DNS SAN is its node name. Both sides of every connection present a
//!   certificate: the server requires a client certificate signed by the cluster CA, the client
//!   checks the server's against the CA with SNI = the peer's node name, and the server binds the
//!   client's certificate to the node name it claims. A stranger (no certificate, or one from
//!   another CA) is refused during TLS and reported as [`PeerEvent::Refused`] with its address.
//! - **One connection per pair of nodes.** The node whose name sorts first dials, the other
//!   accepts; there is never a duplicate to resolve. A node dials again only while the peer is not
//!   yet listening (a handshake that times out) until [`QuicOptions::join_timeout`].
//! - **Rejoin.** After the cluster is formed, a lost peer is dialled again by the node that dialled
//!   it first (every 0.5 s until it answers or this node closes), and the accept loop admits a
//!   member that comes back; both run the full handshake. The new connection replaces the old
//!   one (an old one still believed alive is failed and reported `Lost` first) and is reported as
//!   [`PeerEvent::Rejoined`]. Devices reach the rejoined node through new endpoints
//!   ([`QuicNode::endpoints`], which also redirects arriving frames to the new inboxes); old
//!   links to it stay dead.
//! - **Handshake.** The first bidirectional stream carries a fixed-layout hello
//!   `{magic, wire_version, topology_fingerprint, node name}` each way; another wire version,
//!   another topology fingerprint or an unexpected node name refuses the connection, and both
//!   sides get a [`TransportError::Handshake`] saying which check failed.
//! - **Streams and frames.** Every unidirectional stream starts with one kind byte (0: frames,
//!   1: control; anything else is malformed). One long-lived frame stream per (from device, to
//!   device) direction, so frames between two devices are ordered and different pairs do not
//!   block each other. Each frame is `[u32 LE header length][rkyv header][raw payload]`; the header mirrors
//!   [`FrameHeader`] plus the destination device, and is validated (bytecheck, enum values, rank,
//!   `shape` product with checked multiplication equal to the payload length, payload at most
//!   [`QuicOptions::max_frame_bytes`], sender device on the peer node, destination device on this
//!   node) before any payload byte is allocated. A malformed, truncated or oversized frame closes
//!   that peer's connection ([`LostReason::Malformed`] naming the peer); nothing panics.
//! - **Control channel.** Node to node (not device to device): one long-lived control stream per
//!   direction per pair of nodes, opened with the first message and sent at a higher priority
//!   than the frame streams, so a control message never waits behind queued multi-MiB
//!   activations. Each message is `[u32 LE length][rkyv ControlMessage]` ([`encode_control`]),
//!   at most [`QuicOptions::max_control_bytes`]; the receiver validates the size, the archive
//!   (bytecheck) and which node each named device is on before the message
//!   reaches [`QuicNode::control_inbox`] (take-once, in order per sender, with the sender's
//!   name). [`QuicNode::send_control`] / [`ControlSender::send`] validate the same before
//!   queueing (unbounded, never blocks) and fail with [`TransportError::NodeGone`] once the node
//!   is lost. A malformed message, or a second control stream, closes that connection like a
//!   malformed frame. Counters per peer are in [`PeerStats`].
//! - **Back-pressure.** Each remote link has a bounded queue (frames and bytes,
//!   [`QuicOptions::link_queue_frames`] / [`QuicOptions::link_queue_bytes`]; the frame being
//!   written counts). [`Link::send`] returns [`TransportError::Backpressure`] with the frame when
//!   it is full; [`Link::send_async`] waits for room. Received frames go to the unbounded
//!   [`Endpoint::inbox`] (the receiving device drains it at once).
//! - **Failure detection.** QUIC keep-alives ([`QuicOptions::keep_alive`]) and the idle timeout
//!   ([`QuicOptions::idle_timeout`]) detect a silent peer; any lost connection is published once as
//!   [`PeerEvent::Lost`], and from then on sends to that node's devices return
//!   [`TransportError::PeerGone`].
//!
//! Key types: [`Link`] (the narrow trait every transport implements), [`Endpoint`] (one device's
//! links and inbox), [`MemoryNetwork`], [`QuicNode`], [`Frame`], [`ControlMessage`] and [`ControlSender`].
//!
//! # Feature flags
//!
//! - `test-hooks`: exposes `QuicNode::send_raw_stream` and `QuicNode::send_raw_control`, which
//!   write arbitrary bytes to a peer (on a new stream, or on the control stream), for the
//!   malformed-data tests only; `ClusterPki::issue_expired`; and the decoders of activation
//!   streams and hellos on plain bytes (`fuzz_frame_stream`, `fuzz_hello`) for the fuzzer.

use std::future::Future;
use std::pin::Pin;

mod bench;
mod control;
mod error;
mod frame;
mod memory;
mod pki;
mod quic;

pub use bench::{bench_quic_vs_tcp, BenchReport, BenchRow};
pub use control::{
    decode_control, decode_control_with_limit, encode_control, ControlMessage,
    DEFAULT_MAX_CONTROL_BYTES,
};
pub use error::TransportError;
pub use frame::{
    CollectiveOp, Frame, FrameHeader, FrameLabel, PeerGroupKind, WireDType, PART_WHOLE,
};
pub use memory::{Endpoint, MemoryNetwork};
pub use pki::{generate_cluster_pki, ClusterPki, NodeCert, NodeIdentity};
#[cfg(feature = "test-hooks")]
pub use quic::{fuzz_encode_frames, fuzz_encode_hello, fuzz_frame_stream, fuzz_hello};
pub use quic::{
    ClusterMap, ControlEnvelope, ControlSender, LostReason, NodeAddr, PeerEvent, PeerStats,
    QuicNode, QuicOptions, ETHERNET_MAX_UDP_PAYLOAD, GSO_MAX_UDP_PAYLOAD, LOOPBACK_MAX_UDP_PAYLOAD,
    WIRE_VERSION,
};

/// A boxed, sendable future (the return type of [`Link::send_async`]).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A one-way connection to one peer device.
pub trait Link: Send + Sync + std::fmt::Debug {
    /// The peer's device index.
    fn peer(&self) -> usize;
    /// Queues `frame` for the peer without blocking; frames on one link arrive in order. A
    /// bounded link returns [`TransportError::Backpressure`] (with the frame) when full.
    fn send(&self, frame: Frame) -> Result<(), TransportError>;
    /// Payload and header bytes sent so far.
    fn bytes_sent(&self) -> u64;
    /// Frames sent so far (0 where the implementation does not count them).
    fn messages_sent(&self) -> u64 {
        0
    }
    /// Queues `frame`, waiting for room in a bounded queue instead of returning
    /// [`TransportError::Backpressure`]. The default calls [`Link::send`].
    fn send_async(&self, frame: Frame) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move { self.send(frame) })
    }
}
