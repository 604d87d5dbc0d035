//! The QUIC transport: one [`QuicNode`] per host, one connection per pair of nodes, one
//! unidirectional stream per (from device, to device) direction. See the crate documentation for
//! the invariants; this module holds the public types.
//!
//! Lifecycle: [`QuicNode::bind`] (socket and TLS configuration, nothing accepted yet), then
//! [`QuicNode::join`] on every node of the cluster (concurrently: each waits for all its peers),
//! which returns one [`Endpoint`] per local device. Keep the `QuicNode` alive while its endpoints
//! are used: dropping it closes every connection.

mod handshake;
mod join;
mod link;
mod peer;
mod tls;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::broadcast;

use crate::pki::check_node_name;
use crate::{Endpoint, NodeIdentity, TransportError};
pub(crate) use peer::Peer;
pub(crate) use wire::{encode_header, read_frame, ReadFail};

/// The protocol version announced in the handshake; nodes with another version refuse each other.
pub const WIRE_VERSION: u32 = 1;

/// Close codes carried by QUIC `CONNECTION_CLOSE` (the reason text says more).
pub(crate) mod close_code {
    use super::VarInt;
    /// The handshake refused the peer.
    pub(crate) const HANDSHAKE: VarInt = VarInt::from_u32(1);
    /// The peer sent a malformed frame.
    pub(crate) const MALFORMED: VarInt = VarInt::from_u32(2);
    /// This node shut down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(3);
    /// A stream of this connection failed.
    pub(crate) const STREAM: VarInt = VarInt::from_u32(4);
    /// A connection arrived when none was expected (after join, or a duplicate).
    pub(crate) const UNEXPECTED: VarInt = VarInt::from_u32(5);
}

/// Tuning and limits of a [`QuicNode`]. `Default` gives the documented values.
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
    /// How long [`QuicNode::join`] waits for all peers (default 30 s).
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
        }
    }
}

impl QuicOptions {
    fn validate(&self) -> Result<(), TransportError> {
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
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad(format!(
                "keep_alive {:?} must be positive and below idle_timeout {:?}",
                self.keep_alive, self.idle_timeout
            ));
        }
        Ok(())
    }
}

/// One node of the cluster as every node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// Node name: a DNS name, equal to the SAN of its certificate.
    pub name: String,
    /// Where its [`QuicNode`] listens.
    pub addr: SocketAddr,
    /// The global device indices it hosts.
    pub devices: Vec<usize>,
}

/// The whole cluster: every node, and an opaque fingerprint of the topology that all nodes must
/// share (e.g. a hash of the topology file and model), checked in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMap {
    /// Opaque bytes; two nodes with different fingerprints refuse each other.
    pub fingerprint: [u8; 32],
    /// Every node; device indices over all nodes must be exactly `0..N`, each once.
    pub nodes: Vec<NodeAddr>,
}

/// Why a connection to a peer node is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// No packet within the idle timeout (the peer crashed, hangs or is unreachable).
    IdleTimeout,
    /// The peer sent a malformed, truncated or oversized frame; this node closed the connection.
    Malformed {
        /// What was wrong with the bytes.
        message: String,
    },
    /// The peer closed the connection (it shut down, or refused something this node sent).
    ClosedByPeer {
        /// The peer's reason.
        reason: String,
    },
    /// This node closed the connection (shutdown).
    Closed,
    /// Any other failure (transport error, reset, a stream that failed).
    Failed {
        /// The error.
        message: String,
    },
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::IdleTimeout => write!(f, "no packet within the idle timeout"),
            LostReason::Malformed { message } => write!(f, "malformed frame: {message}"),
            LostReason::ClosedByPeer { reason } => write!(f, "closed by the peer: {reason}"),
            LostReason::Closed => write!(f, "closed by this node"),
            LostReason::Failed { message } => write!(f, "{message}"),
        }
    }
}

/// Something that happened to a peer node; see [`QuicNode::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// The handshake with `node` succeeded.
    Connected {
        /// The peer node.
        node: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// The connection to `node` is gone; sends to its devices now return
    /// [`TransportError::PeerGone`]. Published once per peer.
    Lost {
        /// The peer node.
        node: String,
        /// Why.
        reason: LostReason,
    },
    /// An incoming connection was refused before it could join: no or an invalid certificate,
    /// a failed handshake, or a connection after the cluster was formed.
    Refused {
        /// Where it came from.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for PeerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEvent::Connected { node, addr } => write!(f, "node {node} at {addr} connected"),
            PeerEvent::Lost { node, reason } => {
                write!(f, "connection to node {node} lost: {reason}")
            }
            PeerEvent::Refused { addr, reason } => {
                write!(f, "refused a connection from {addr}: {reason}")
            }
        }
    }
}

/// Counters and state of one peer node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// Frames received from the node's devices.
    pub messages_received: u64,
    /// Bytes of those frames on the wire (length prefix + header + payload).
    pub bytes_received: u64,
    /// Why the connection is gone, or `None` while it is up.
    pub lost: Option<LostReason>,
    /// The current round-trip estimate.
    pub rtt: Duration,
}

/// State shared by a node's handle and its tasks.
pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) client: quinn::ClientConfig,
    pub(crate) options: QuicOptions,
    pub(crate) events: broadcast::Sender<PeerEvent>,
    pub(crate) peers: Mutex<Option<HashMap<String, Arc<Peer>>>>,
}

impl NodeInner {
    /// Publishes an event (nobody listening is fine).
    pub(crate) fn publish(&self, e: PeerEvent) {
        tracing::debug!(node = %self.name, event = %e, "peer event");
        let _ = self.events.send(e);
    }
}

/// One host of a QUIC cluster. See the module documentation for the lifecycle.
pub struct QuicNode {
    inner: Arc<NodeInner>,
    addr: SocketAddr,
}

impl std::fmt::Debug for QuicNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicNode")
            .field("name", &self.inner.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl QuicNode {
    /// Binds the node's UDP socket at `addr` (port 0 picks one) with its TLS identity. Must be
    /// called inside a tokio runtime; accepts nothing until [`QuicNode::join`].
    pub fn bind(
        identity: NodeIdentity,
        addr: SocketAddr,
        options: QuicOptions,
    ) -> Result<Self, TransportError> {
        check_node_name(&identity.name)?;
        options.validate()?;
        let (server, client) = tls::configs(&identity, &options)?;
        let endpoint =
            quinn::Endpoint::server(server, addr).map_err(|source| TransportError::Io {
                op: "bind QUIC endpoint",
                addr,
                source,
            })?;
        let addr = endpoint.local_addr().map_err(|source| TransportError::Io {
            op: "read local address of",
            addr,
            source,
        })?;
        let (events, _) = broadcast::channel(256);
        Ok(Self {
            inner: Arc::new(NodeInner {
                name: identity.name,
                endpoint,
                client,
                options,
                events,
                peers: Mutex::new(None),
            }),
            addr,
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peer events from now on. Subscribe before [`QuicNode::join`] to see every event; the
    /// current state is also in [`QuicNode::peer_stats`].
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// Connects to every other node of `cluster` (this node must be in it, under its name) and
    /// returns one [`Endpoint`] per local device, in the order of this node's `devices`: links
    /// to local devices are in-process, links to remote devices go over QUIC. Waits until every
    /// peer has completed the handshake; fails on the first refused handshake or after
    /// [`QuicOptions::join_timeout`]. Can be called once.
    pub async fn join(&self, cluster: &ClusterMap) -> Result<Vec<Endpoint>, TransportError> {
        join::join(&self.inner, cluster).await
    }

    /// Counters and state of peer node `node`, or `None` for a node it is not connected to.
    pub fn peer_stats(&self, node: &str) -> Option<PeerStats> {
        let peers = self.inner.peers.lock().expect("peers lock");
        peers.as_ref()?.get(node).map(|p| p.stats())
    }

    /// Closes every connection (peers see [`LostReason::ClosedByPeer`]) and the socket. Also
    /// done on drop.
    pub fn close(&self) {
        self.inner.endpoint.close(
            close_code::SHUTDOWN,
            format!("node {} shut down", self.inner.name).as_bytes(),
        );
    }

    /// Test hook: opens a new stream to `node` and writes `bytes` on it as they are.
    #[cfg(feature = "test-hooks")]
    pub async fn send_raw_stream(&self, node: &str, bytes: &[u8]) -> Result<(), TransportError> {
        let peer = {
            let peers = self.inner.peers.lock().expect("peers lock");
            peers.as_ref().and_then(|p| p.get(node).cloned())
        };
        let peer = peer.ok_or_else(|| TransportError::Node {
            node: self.inner.name.clone(),
            message: format!("not connected to node {node}"),
        })?;
        peer.send_raw(bytes).await
    }
}

impl Drop for QuicNode {
    fn drop(&mut self) {
        self.close();
    }
}
